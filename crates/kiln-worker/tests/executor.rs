//! The executor end to end: real CAS over gRPC, real processes in the
//! real sandbox.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::reapi::{Command, Tree};
use kiln_proto::rpc_details::PreconditionFailure;
use kiln_worker::metadata::{RESOURCE_USAGE_TYPE_URL, ResourceUsage};
use prost::Message;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn runs_command_and_uploads_output_file() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().file("in.txt", b"input\n").upload(&cas).await;
    let mut cmd = sh("echo hi > out/x; cat in.txt; echo err >&2; exit 3");
    cmd.output_paths = vec!["out/x".into()];
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let result = resp.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 3);
    let outs = outputs_by_path(&resp);
    assert_eq!(read_blob(&cas, &outs["out/x"]).await, b"hi\n");
    assert_eq!(stdout_of(&cas, &resp).await, "input\n");
    assert_eq!(stderr_of(&cas, &resp).await, "err\n");
    // Small stdio is inlined as well.
    assert_eq!(result.stdout_raw, b"input\n");

    // Every phase is timed, in order, and resource usage is attached.
    let md = result.execution_metadata.as_ref().unwrap();
    assert_eq!(md.worker, "test-worker");
    let ts = |t: &Option<kiln_proto::protobuf::Timestamp>| {
        let t = t.unwrap();
        t.seconds as i128 * 1_000_000_000 + t.nanos as i128
    };
    let order = [
        ts(&md.worker_start_timestamp),
        ts(&md.input_fetch_start_timestamp),
        ts(&md.input_fetch_completed_timestamp),
        ts(&md.execution_start_timestamp),
        ts(&md.execution_completed_timestamp),
        ts(&md.output_upload_start_timestamp),
        ts(&md.output_upload_completed_timestamp),
        ts(&md.worker_completed_timestamp),
    ];
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    let aux = md
        .auxiliary_metadata
        .iter()
        .find(|a| a.type_url == RESOURCE_USAGE_TYPE_URL)
        .unwrap();
    let usage = ResourceUsage::decode(aux.value.as_slice()).unwrap();
    assert!(usage.peak_memory_bytes > 0);
    assert!(usage.sandboxed);
    assert!(!usage.network);
    // The action directory is gone.
    assert!(
        slots_are_clean(&tmp.path().join("work")),
        "{:?}",
        list_files(&tmp.path().join("work"))
    );
}

#[tokio::test]
async fn environment_working_directory_and_legacy_outputs() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default()
        .dir("sub", TreeSpec::default().file("data", b"d"))
        .upload(&cas)
        .await;
    let mut cmd = sh("pwd > ../o/pwd; echo $FOO > ../o/foo; mkdir -p ../od/x; echo y > ../od/x/y");
    // An unqualified program is looked up on the action's PATH.
    cmd.arguments[0] = "sh".into();
    cmd.working_directory = "sub".into();
    cmd.environment_variables
        .push(kiln_proto::reapi::command::EnvironmentVariable {
            name: "FOO".into(),
            value: "bar".into(),
        });
    #[allow(deprecated)]
    {
        cmd.output_files = vec!["../o/foo".into(), "../o/pwd".into()];
        cmd.output_directories = vec!["../od".into()];
    }
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let outs = outputs_by_path(&resp);
    assert_eq!(read_blob(&cas, &outs["../o/foo"]).await, b"bar\n");
    let pwd = String::from_utf8(read_blob(&cas, &outs["../o/pwd"]).await).unwrap();
    assert!(pwd.trim_end().ends_with("/root/sub"), "{pwd}");
    let dirs = &resp.result.as_ref().unwrap().output_directories;
    assert_eq!(dirs.len(), 1);
    assert_eq!(dirs[0].path, "../od");
}

#[tokio::test]
async fn action_environment_does_not_reach_the_helper() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let mut cmd = sh(&format!("sleep {tok}"));
    cmd.environment_variables
        .push(kiln_proto::reapi::command::EnvironmentVariable {
            name: "LD_PRELOAD".into(),
            value: "/nonexistent/kiln-preload.so".into(),
        });
    let j = job(&cas, cmd, root, T).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let (e, c) = (exec.clone(), cancel.clone());
    let task = tokio::spawn(async move { e.execute(j, c).await });
    let start = std::time::Instant::now();
    let environ = |pid: u32| std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    // Wait for the command itself (its argv has no "kiln-sandbox").
    let command_pid = loop {
        let pids = processes_with(&tok);
        if let Some(p) = pids.iter().copied().find(|p| cmdline(*p).starts_with("sleep ")) {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let preload = b"LD_PRELOAD=/nonexistent/kiln-preload.so";
    let has = |env: &[u8]| env.split(|b| *b == 0).any(|v| v == preload);
    assert!(has(&environ(command_pid)), "the command lost its environment");
    // Above the command (and the shell that runs it) are the action's init
    // (a clone of the zygote, so with the zygote's command line) and the
    // slot's zygote.
    let helpers = zygotes_above(command_pid);
    assert_eq!(helpers.len(), 2, "init and zygote above the command");
    for p in helpers {
        assert!(
            !has(&environ(p)),
            "the helper {} got the action's LD_PRELOAD",
            cmdline(p)
        );
    }
    cancel.cancel();
    assert_eq!(code(&task.await.unwrap()), tonic::Code::Cancelled as i32);
}

#[tokio::test]
async fn output_directory_is_a_deduplicated_tree() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    // Two identical sub-directories (stored once), an executable, a symlink.
    let mut cmd = sh(
        "mkdir -p d/a d/b d/c/deep && echo same > d/a/f && echo same > d/b/f && \
         printf '#!/bin/sh\\n' > d/c/deep/tool && chmod +x d/c/deep/tool && ln -s ../a/f d/c/link",
    );
    cmd.output_paths = vec!["d".into()];
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let result = resp.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0, "{}", stderr_of(&cas, &resp).await);
    let od = &result.output_directories[0];
    assert_eq!(od.path, "d");
    assert!(od.is_topologically_sorted);
    let tree = Tree::decode(read_blob(&cas, od.tree_digest.as_ref().unwrap()).await.as_slice()).unwrap();
    let root = tree.root.unwrap();
    let names: Vec<_> = root.directories.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    // a and b are identical: one child Directory for both.
    assert_eq!(root.directories[0].digest, root.directories[1].digest);
    // children: {a==b}, c, deep = 3 distinct directories.
    assert_eq!(tree.children.len(), 3);
    let c = tree
        .children
        .iter()
        .find(|d| !d.symlinks.is_empty())
        .expect("directory c with the symlink");
    assert_eq!(c.symlinks[0].name, "link");
    assert_eq!(c.symlinks[0].target, "../a/f");
    let deep = tree
        .children
        .iter()
        .find(|d| d.files.iter().any(|f| f.name == "tool"))
        .unwrap();
    assert!(deep.files[0].is_executable);
    // File contents are in the CAS.
    let a = tree
        .children
        .iter()
        .find(|d| d.files.iter().any(|f| f.name == "f"))
        .unwrap();
    assert_eq!(
        read_blob(&cas, a.files[0].digest.as_ref().unwrap()).await,
        b"same\n"
    );
}

#[tokio::test]
async fn symlink_to_host_file_is_uploaded_as_a_symlink() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let mut cmd = sh("ln -s /etc/passwd leak && mkdir d && ln -s /etc/passwd d/leak2 && ln -s /etc escape");
    cmd.output_paths = vec!["leak".into(), "d".into(), "escape/passwd".into()];
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let result = resp.result.as_ref().unwrap();
    // `leak` is a symlink with its target, not the file's content.
    assert!(result.output_files.is_empty(), "{:?}", result.output_files);
    assert_eq!(result.output_symlinks.len(), 1);
    assert_eq!(result.output_symlinks[0].path, "leak");
    assert_eq!(result.output_symlinks[0].target, "/etc/passwd");
    // Inside an output directory too.
    let tree = Tree::decode(
        read_blob(&cas, result.output_directories[0].tree_digest.as_ref().unwrap())
            .await
            .as_slice(),
    )
    .unwrap();
    let root = tree.root.unwrap();
    assert!(root.files.is_empty());
    assert_eq!(root.symlinks[0].target, "/etc/passwd");
    // `escape/passwd` goes through a symlink out of the action: not an output.
    assert_eq!(result.output_directories.len(), 1);
    // And the CAS never received /etc/passwd.
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let missing = cas_client(&cas)
        .find_missing_blobs(kiln_proto::reapi::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![digest_of(&passwd)],
            digest_function: F.to_proto() as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1, "/etc/passwd was uploaded");
}

/// Runs `cmd` over `root` and expects INVALID_ARGUMENT with nothing
/// written outside the work directory.
async fn expect_invalid(tree: TreeSpec, cmd: Command, allow_absolute: bool) {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.allow_absolute_symlinks = allow_absolute).await;
    let root = tree.upload(&cas).await;
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    assert_eq!(
        code(&resp),
        tonic::Code::InvalidArgument as i32,
        "{:?}",
        resp.status
    );
    assert!(
        list_files(&outside).is_empty(),
        "written outside: {:?}",
        list_files(&outside)
    );
    assert!(
        slots_are_clean(&tmp.path().join("work")),
        "{:?}",
        list_files(&tmp.path().join("work"))
    );
}

#[tokio::test]
async fn malformed_input_entries_are_invalid_argument() {
    let cmd = || sh("touch ../../outside/pwned; true");
    for name in ["..", ".", "", "a/b", "../outside/x"] {
        expect_invalid(TreeSpec::default().file(name, b"x"), cmd(), true).await;
        expect_invalid(TreeSpec::default().dir(name, TreeSpec::default()), cmd(), true).await;
        expect_invalid(TreeSpec::default().symlink(name, "t"), cmd(), true).await;
    }
    // Duplicate names (file + directory).
    expect_invalid(
        TreeSpec::default().file("a", b"x").dir("a", TreeSpec::default()),
        cmd(),
        true,
    )
    .await;
    // Absolute symlink targets when the strategy disallows them.
    expect_invalid(TreeSpec::default().symlink("l", "/etc/passwd"), cmd(), false).await;
}

#[tokio::test]
async fn escaping_paths_are_invalid_argument() {
    let tree = || {
        TreeSpec::default()
            .dir("w", TreeSpec::default())
            .symlink("link", "../outside")
    };
    let base = || sh("echo pwned > ../outside/x; true");
    let mut c = base();
    c.working_directory = "../..".into();
    expect_invalid(tree(), c, true).await;
    let mut c = base();
    c.working_directory = "/tmp".into();
    expect_invalid(tree(), c, true).await;
    let mut c = base();
    c.output_paths = vec!["../outside/x".into()];
    expect_invalid(tree(), c, true).await;
    let mut c = base();
    c.working_directory = "w".into();
    c.output_paths = vec!["../../x".into()];
    expect_invalid(tree(), c, true).await;
    let mut c = base();
    c.output_paths = vec!["/etc/x".into()];
    expect_invalid(tree(), c, true).await;
    // An output whose parent is an input symlink (creating it would write
    // through the symlink).
    let mut c = base();
    c.output_paths = vec!["link/sub/x".into()];
    expect_invalid(tree(), c, true).await;
    #[allow(deprecated)]
    {
        let mut c = base();
        c.output_files = vec!["../x".into()];
        expect_invalid(tree(), c, true).await;
        let mut c = base();
        c.output_directories = vec!["/abs".into()];
        expect_invalid(tree(), c, true).await;
    }
}

#[tokio::test]
async fn missing_input_blob_is_failed_precondition_with_violations() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    // A Directory referring to a file that was never uploaded.
    let ghost = b"never uploaded".to_vec();
    let dir = kiln_proto::reapi::Directory {
        files: vec![kiln_proto::reapi::FileNode {
            name: "ghost".into(),
            digest: Some(digest_of(&ghost)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let root = upload_msg(&cas, &dir).await;
    let resp = run(&exec, job(&cas, sh("cat ghost"), root, T).await).await;
    assert_eq!(code(&resp), tonic::Code::FailedPrecondition as i32);
    let status = resp.status.unwrap();
    let pf = PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(pf.violations.len(), 1);
    assert_eq!(pf.violations[0].r#type, "MISSING");
    let d = digest_of(&ghost);
    assert_eq!(
        pf.violations[0].subject,
        format!("blobs/{}/{}", d.hash, d.size_bytes)
    );
}

#[tokio::test]
async fn executable_input_runs_and_cannot_be_modified_through_the_hardlink() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let tool = b"#!/bin/sh\necho tool-ran\n".to_vec();
    let root = TreeSpec::default()
        .exec("tool", &tool)
        .file("data", b"plain\n")
        .upload(&cas)
        .await;
    let mut cmd = sh("./tool > out; \
         (echo hacked >> tool) 2>/dev/null; echo $? > rc_write; \
         (echo hacked >> data) 2>/dev/null; echo $? >> rc_write; \
         (chmod u+w tool && echo hacked >> tool) 2>/dev/null; true");
    cmd.output_paths = vec!["out".into(), "rc_write".into()];
    let resp = run(&exec, job(&cas, cmd.clone(), root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let outs = outputs_by_path(&resp);
    assert_eq!(read_blob(&cas, &outs["out"]).await, b"tool-ran\n");
    let rc = String::from_utf8(read_blob(&cas, &outs["rc_write"]).await).unwrap();
    assert!(
        rc.lines().all(|l| l != "0"),
        "a write through a hardlink succeeded: {rc}"
    );
    // Whatever the action did, the cache never serves modified content:
    // every cached file still hashes to its name.
    for f in list_files(exec.local_cas().dir()) {
        let p = exec.local_cas().dir().join(&f);
        if !p.is_file() || p.parent().unwrap().parent().unwrap().file_name().unwrap() != "sha256" {
            continue;
        }
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let hash = name.split('-').next().unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(
            kiln_digest::BlobKey::of(F, &data).hash_hex(),
            hash,
            "{name} corrupted"
        );
    }
    // A second run gets the original tool.
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    let outs = outputs_by_path(&resp);
    assert_eq!(read_blob(&cas, &outs["out"]).await, b"tool-ran\n");
}

#[tokio::test]
async fn sandbox_hides_worker_directories_and_gives_private_tmp() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let cache_dir = exec.local_cas().dir().to_path_buf();
    let marker = std::env::temp_dir().join(format!("kiln-host-marker-{}", std::process::id()));
    std::fs::write(&marker, b"host").unwrap();
    let leak = std::env::temp_dir().join(format!("kiln-sandbox-leak-{}", std::process::id()));
    let root = TreeSpec::default().file("f", b"x").upload(&cas).await;
    let script = format!(
        "ls {cache} | wc -l > o; test -e {marker}; echo $? >> o; echo hi > {leak}; id -u >> o; hostname >> o; \
         touch /etc/kiln-ro-probe 2>&1 | grep -c 'Read-only' >> o; touch /tmp/private && echo tmp-ok >> o",
        cache = cache_dir.display(),
        marker = marker.display(),
        leak = leak.display()
    );
    let mut cmd = sh(&script);
    cmd.output_paths = vec!["o".into()];
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let o = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["o"]).await).unwrap();
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines[0].trim(), "0", "the local cache is visible in the sandbox");
    assert_eq!(lines[1], "1", "the host's /tmp is visible in the sandbox");
    assert_ne!(lines[2], "0", "the action runs as root");
    assert_eq!(lines[3], "localhost");
    assert_eq!(lines[4], "1", "the host file system is writable from the sandbox");
    assert_eq!(lines[5], "tmp-ok");
    assert!(!leak.exists(), "the sandbox wrote into the host's /tmp");
}

/// Consecutive actions of one slot share its zygote: nothing the first
/// leaves in the private tmpfs's, in SysV IPC, in the input root or in the
/// host name reaches the second.
#[tokio::test]
async fn consecutive_actions_of_a_slot_do_not_see_each_others_leftovers() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.slots = Some(1)).await;
    let root = TreeSpec::default().upload(&cas).await;
    // Leave files (one in a directory the action locks), an IPC segment, a
    // changed host name and junk in the input root behind.
    let dirty = sh(
        "set -e; echo a > /tmp/left; mkdir -p /tmp/locked/d; echo b > /tmp/locked/d/f; chmod 000 /tmp/locked/d /tmp/locked; \
         echo c > /dev/shm/left; echo d > /var/tmp/left; ipcmk -M 4096 >/dev/null; test \"$(ipcs -m | grep -c '^0x')\" = 1; \
         hostname changed 2>/dev/null || true; mkdir junk; echo e > junk/f; chmod 000 junk; chmod 700 .",
    );
    let resp = run(&exec, job(&cas, dirty, root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    // The work directory lives under the test's temporary directory: when
    // that is in /tmp, the way to the input root is (rightly) kept there.
    let way = way_in_tmp(tmp.path());
    let mut probe = sh(&format!(
        "ls -A /tmp /dev/shm /var/tmp . | grep -v ':$' | grep -v '^$' | grep -v '^o$' | grep -vx -- '{way}' > o; \
         ipcs -m | grep -c '^0x' >> o; hostname >> o; stat -c %a . >> o"
    ));
    probe.output_paths = vec!["o".into()];
    let resp = run(&exec, job(&cas, probe, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let o = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["o"]).await).unwrap();
    assert_eq!(o, "0\nlocalhost\n755\n", "leftovers seen by the next action");
    assert!(slots_are_clean(&tmp.path().join("work")));
}

/// add_key(2) of a "user" key `kiln-leak` in the user keyring (x86-64:
/// syscall 248 from Python; elsewhere nothing).
const ADD_KEY: &str = if cfg!(target_arch = "x86_64") {
    "python3 -c 'import ctypes; l=ctypes.CDLL(None); \
     assert l.syscall(248, b\"user\", b\"kiln-leak\", b\"secret\", 6, -4) > 0'"
} else {
    "true"
};

/// Appends "key" to `o` if the key of [`ADD_KEY`] is there, "no key"
/// otherwise (keyctl(2), syscall 250: KEYCTL_SEARCH (10) of the user
/// keyring (-4)).
const SEARCH_KEY: &str = if cfg!(target_arch = "x86_64") {
    "python3 -c 'import ctypes; l=ctypes.CDLL(None); \
     print(\"key\" if l.syscall(250, 10, -4, b\"user\", b\"kiln-leak\", 0) > 0 else \"no key\")' >> o"
} else {
    "echo no key >> o"
};

/// More state an action could leave for the next one of its slot:
/// extended attributes on the input root, keys in the kernel keyrings
/// (x86-64: raw syscalls from Python), trees too deep for recursive
/// removal in the input root and in the private /tmp. None of it reaches
/// the next action, and the slot's zygote cleans it up itself (a zygote
/// that fails to is replaced, with fresh tmpfs's: that would hide a
/// failure here).
#[tokio::test]
async fn attributes_keys_and_deep_trees_do_not_outlive_an_action() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.slots = Some(1)).await;
    let zygotes = exec.sandbox().zygote_pids();
    let root = TreeSpec::default().upload(&cas).await;
    let deep = "python3 -c 'import os\nfor i in range(3000): os.mkdir(\"d\"); os.chdir(\"d\")\nopen(\"f\",\"w\").write(\"x\")'";
    let dirty = sh(&format!(
        "set -e; python3 -c 'import os; os.setxattr(\".\", \"user.kiln\", b\"leak\")'; {ADD_KEY}; \
         {deep}; (cd /tmp && {deep})"
    ));
    let resp = run(&exec, job(&cas, dirty, root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    assert_eq!(
        resp.result.as_ref().unwrap().exit_code,
        0,
        "{}",
        stderr_of(&cas, &resp).await
    );
    let way = way_in_tmp(tmp.path());
    let mut probe = sh(&format!(
        "python3 -c 'import os; print(os.listxattr(\".\"), sorted(os.listdir(\".\")))' > o; {SEARCH_KEY}; \
         ls -A /tmp | grep -vx -- '{way}' >> o || true"
    ));
    probe.output_paths = vec!["o".into()];
    let resp = run(&exec, job(&cas, probe, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let o = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["o"]).await).unwrap();
    assert_eq!(o, "[] ['o']\nno key\n", "leftovers seen by the next action");
    assert_eq!(exec.sandbox().zygote_pids(), zygotes, "the zygote was replaced");
    assert!(slots_are_clean(&tmp.path().join("work")));
}

/// A slot without private tmpfs's (`sandbox.tmpfs = []`) still has its
/// keyrings cleared between actions.
#[tokio::test]
async fn keys_do_not_outlive_an_action_without_private_tmpfs() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| {
        c.slots = Some(1);
        c.sandbox.tmpfs = Vec::new();
    })
    .await;
    let zygotes = exec.sandbox().zygote_pids();
    let root = TreeSpec::default().upload(&cas).await;
    let dirty = sh(&format!("set -e; {ADD_KEY}; rm -f o; {SEARCH_KEY}; cat o"));
    let resp = run(&exec, job(&cas, dirty, root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let added = if cfg!(target_arch = "x86_64") {
        "key\n"
    } else {
        "no key\n"
    };
    assert_eq!(
        stdout_of(&cas, &resp).await,
        added,
        "{}",
        stderr_of(&cas, &resp).await
    );
    let mut probe = sh(SEARCH_KEY);
    probe.output_paths = vec!["o".into()];
    let resp = run(&exec, job(&cas, probe, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let o = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["o"]).await).unwrap();
    assert_eq!(o, "no key\n", "a key outlived its action");
    assert_eq!(exec.sandbox().zygote_pids(), zygotes, "the zygote was replaced");
}

/// The zygote gives the private /tmp its mode (1777) and extended
/// attributes back after an action changed them. (With a root worker the
/// tmpfs is root's and the action cannot change it at all; with a non-root
/// worker the action owns it and the zygote undoes what it did.)
#[tokio::test]
async fn the_private_tmp_gets_its_mode_and_attributes_back() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.slots = Some(1)).await;
    let zygotes = exec.sandbox().zygote_pids();
    let root = TreeSpec::default().upload(&cas).await;
    let mut dirty = sh(
        "chmod 700 /tmp 2>/dev/null && echo chmod-ok > o || echo chmod-refused > o; \
         python3 -c 'import os\ntry:\n os.setxattr(\"/tmp\", \"user.kiln\", b\"leak\"); print(\"xattr-ok\")\nexcept OSError as e:\n print(\"xattr-refused\", e.errno)' >> o",
    );
    dirty.output_paths = vec!["o".into()];
    let resp = run(&exec, job(&cas, dirty, root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let o = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["o"]).await).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            o, "chmod-refused\nxattr-refused 1\n",
            "the action changed root's tmpfs"
        );
    } else {
        // Kernels before 6.6 have no user attributes on tmpfs.
        assert!(
            o == "chmod-ok\nxattr-ok\n" || o == "chmod-ok\nxattr-refused 95\n",
            "{o}"
        );
    }
    let mut probe = sh("stat -c %a /tmp > o; \
         python3 -c 'import os; print([a for a in os.listxattr(\"/tmp\") if a.startswith(\"user.\")])' >> o");
    probe.output_paths = vec!["o".into()];
    let resp = run(&exec, job(&cas, probe, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let o = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["o"]).await).unwrap();
    assert_eq!(o, "1777\n[]\n", "the next action saw the changed /tmp");
    assert_eq!(exec.sandbox().zygote_pids(), zygotes, "the zygote was replaced");
}

/// A descriptor the worker inherited without close-on-exec (from whatever
/// started it) does not reach actions: they start with 0, 1 and 2 only.
#[tokio::test]
async fn inherited_descriptors_do_not_reach_actions() {
    use std::os::fd::AsRawFd;
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    // Opened without O_CLOEXEC, before the executor starts its zygotes.
    let leaked = nix::fcntl::open(
        "/etc/hostname",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let mut cmd = sh("");
    // Not through a shell: `ls` itself lists its descriptors (plus the one
    // it reads the directory with).
    cmd.arguments = vec!["/bin/ls".into(), "/proc/self/fd".into()];
    let resp = run(&exec, job(&cas, cmd, root, T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let listed: Vec<u32> = stdout_of(&cas, &resp)
        .await
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        !listed.contains(&(leaked.as_raw_fd() as u32)),
        "the inherited descriptor {} reached the action: {listed:?}",
        leaked.as_raw_fd()
    );
    assert!(
        listed.len() <= 4,
        "descriptors beyond 0-2 and ls's own: {listed:?}"
    );
}

/// An action writing more than `max_stdio_bytes` to stdout is terminated
/// and fails with RESOURCE_EXHAUSTED instead of filling memory.
#[tokio::test]
async fn too_much_stdout_is_resource_exhausted() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.sandbox.max_stdio_bytes = 1 << 20).await;
    let root = TreeSpec::default().upload(&cas).await;
    let start = std::time::Instant::now();
    let resp = run(&exec, job(&cas, sh("yes"), root, T).await).await;
    assert_eq!(
        code(&resp),
        tonic::Code::ResourceExhausted as i32,
        "{:?}",
        resp.status
    );
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    assert!(slots_are_clean(&tmp.path().join("work")));
}
