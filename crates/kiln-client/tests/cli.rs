//! The client commands against a real Kiln server started in-process
//! (real gRPC over loopback, real files in temporary directories). The
//! same commands through the real `kiln` binary: crates/kiln/tests/cli.rs.
//!
//! This test binary has its own `main` (`harness = false`): it doubles as
//! the sandbox helper of the server's in-process worker
//! (`cli sandbox-helper ...`), then runs the tests below one after the
//! other, each on its own runtime, and prints libtest's summary line.
//! Arguments that do not start with `-` filter tests by name.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_client::{ClientCommand, ClientOptions, Console, Remote};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_server::{Overrides, RunningServer};

// ---------------------------------------------------------------- runner

enum Ran {
    Passed,
}

type BoxFut = Pin<Box<dyn Future<Output = Ran> + Send>>;
type TestFn = fn() -> BoxFut;

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), (|| Box::pin($name()) as BoxFut) as TestFn)),*]
    };
}

const TESTS: &[(&str, TestFn)] = tests![
    put_get_file_round_trip,
    put_get_directory_round_trip,
    missing_digests_and_bad_input,
    unreachable_server,
    named_and_unknown_instances,
    status_shows_capabilities,
    exec_writes_declared_output,
    exec_streams_exit_code_and_caches,
    exec_output_directory_and_ac_get,
    exec_timeout_is_an_execution_failure,
    exec_without_execution_support,
];

/// Longest a single test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "sandbox-helper") {
        let code = kiln_worker::helper_main(argv[2..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let args: Vec<String> = argv[1..]
        .iter()
        .filter_map(|a| a.to_str().map(String::from))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let started = Instant::now();
    let (mut passed, mut failed, mut filtered) = (0, Vec::new(), 0);
    let selected: Vec<_> = TESTS
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    filtered += TESTS.len() - selected.len();
    println!("\nrunning {} tests", selected.len());
    for (name, f) in selected {
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async { tokio::time::timeout(TEST_TIMEOUT, f()).await })
        }));
        rt.shutdown_timeout(Duration::from_secs(5));
        match outcome {
            Ok(Ok(Ran::Passed)) => {
                println!("ok");
                passed += 1;
            }
            Ok(Err(_)) => {
                println!("FAILED (timed out after {} s)", TEST_TIMEOUT.as_secs());
                failed.push(*name);
            }
            Err(_) => {
                println!("FAILED");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// --------------------------------------------------------------- harness

/// Batch limit of the test server: small, so that files of a few hundred
/// KiB take the ByteStream path.
const MAX_BATCH: u64 = 64 << 10;

fn config_text(exec: bool) -> String {
    let mut text = format!(
        r#"
[limits]
max_batch_total_size = "{MAX_BATCH} B"

[stores.cas.memory]
capacity = "256 MiB"

[stores.ac.memory]
capacity = "16 MiB"

[[instances]]
name = ""
cas = "cas"
ac = "ac"

[[instances]]
name = "second"
cas = "cas"
ac = "ac"
"#
    );
    if exec {
        text.push_str(
            r#"
[scheduler]

[[workers]]
name = "cli-test-worker"
slots = 2

[workers.sandbox]
enabled = false
"#,
        );
    }
    text
}

struct Server {
    running: RunningServer,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(exec: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = kiln_server::config::parse(&config_text(exec), "test config").unwrap();
        let exe = std::env::current_exe().unwrap().to_string_lossy().into_owned();
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(dir.path().join("data")),
            sandbox_helper: Some(vec![exe, "sandbox-helper".into()]),
        };
        let running = kiln_server::start(cfg, overrides).await.unwrap();
        Server { running, _dir: dir }
    }

    fn endpoint(&self) -> String {
        format!("grpc://{}", self.running.grpc_addr)
    }

    async fn stop(self) {
        self.running.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.running.wait()).await;
    }
}

#[derive(Parser)]
struct TestCli {
    #[command(subcommand)]
    cmd: ClientCommand,
    #[command(flatten)]
    opts: ClientOptions,
}

struct Out {
    code: u8,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `kiln --endpoint ENDPOINT ARGS...` through the library.
async fn kiln(endpoint: &str, args: &[&str]) -> Out {
    let mut argv = vec!["kiln", "--endpoint", endpoint];
    argv.extend_from_slice(args);
    let cli = TestCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let (mut console, captured) = Console::capture();
    let code = kiln_client::run_with(cli.cmd, cli.opts, &mut console).await;
    let out = Out {
        code,
        stdout: captured.stdout(),
        stderr: captured.stderr_text(),
    };
    // KILN_CLI_TEST_ECHO=1 shows every command and what it printed.
    if std::env::var_os("KILN_CLI_TEST_ECHO").is_some() {
        let shown = if out.stdout.len() > 2000 {
            "(long)".into()
        } else {
            out.text()
        };
        eprintln!("$ {}\n[exit {}]\n{shown}{}", args.join(" "), out.code, out.stderr);
    }
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest_of(bytes: &[u8]) -> String {
    let k = BlobKey::of(DigestFunction::Sha256, bytes);
    format!("{}/{}", k.hash_hex(), k.size())
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File { content: Vec<u8>, executable: bool },
    Dir,
    Symlink(PathBuf),
}

/// Everything under `root`, by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let entry = if meta.file_type().is_symlink() {
                Entry::Symlink(std::fs::read_link(e.path()).unwrap())
            } else if meta.is_dir() {
                stack.push(r.clone());
                Entry::Dir
            } else {
                Entry::File {
                    content: std::fs::read(e.path()).unwrap(),
                    executable: meta.permissions().mode() & 0o111 != 0,
                }
            };
            out.insert(r, entry);
        }
    }
    out
}

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got {stderr:?}");
    assert!(lines[0].starts_with("kiln: "), "{stderr:?}");
    lines[0]
}

/// An address nothing listens on.
fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// The `action HASH/SIZE` digest `kiln exec` reports on stderr.
fn action_digest(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("kiln exec: action "))
        .unwrap_or_else(|| panic!("no action digest in {stderr:?}"))
        .trim()
        .to_string()
}

// ----------------------------------------------------------------- tests

/// Files (empty, batch-sized and ByteStream-sized) go up and come back
/// byte-identical, to stdout and to a file; a second upload finds them
/// present.
async fn put_get_file_round_trip() -> Ran {
    let srv = Server::start(false).await;
    let ep = srv.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    for (name, content) in [
        ("empty", Vec::new()),
        ("small", data(1000, 1)),
        ("large", data(300_000, 2)),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, &content).unwrap();
        let put = kiln(&ep, &["cas", "put", p(&path)]).await;
        assert_eq!(put.code, 0, "{}", put.stderr);
        let digest = put.text().trim().to_string();
        assert_eq!(digest, digest_of(&content), "{name}");

        let got = kiln(&ep, &["cas", "get", &digest]).await;
        assert_eq!(got.code, 0, "{}", got.stderr);
        assert!(got.stdout == content, "{name}: stdout differs");

        let copy = tmp.path().join(format!("{name}.copy"));
        let got = kiln(&ep, &["cas", "get", &digest, "-o", p(&copy)]).await;
        assert_eq!(got.code, 0, "{}", got.stderr);
        assert!(std::fs::read(&copy).unwrap() == content, "{name}: file differs");

        let missing = kiln(&ep, &["cas", "missing", &digest]).await;
        assert_eq!(
            (missing.code, missing.text()),
            (0, String::new()),
            "{}",
            missing.stderr
        );
    }
    // Other digest functions, including ones named in ByteStream
    // resource names (blake3, gitsha1), through batches and ByteStream.
    for f in [
        DigestFunction::Blake3,
        DigestFunction::GitSha1,
        DigestFunction::Sha512,
    ] {
        for size in [5000, 200_000] {
            let content = data(size, 7);
            let path = tmp.path().join(format!("{f}-{size}"));
            std::fs::write(&path, &content).unwrap();
            let put = kiln(&ep, &["cas", "put", p(&path), "--digest-function", f.name()]).await;
            assert_eq!(put.code, 0, "{}", put.stderr);
            let key = BlobKey::of(f, &content);
            let digest = format!("{}/{}", key.hash_hex(), key.size());
            assert_eq!(put.text().trim(), digest);
            let got = kiln(&ep, &["cas", "get", &digest, "--digest-function", f.name()]).await;
            assert_eq!(got.code, 0, "{}", got.stderr);
            assert!(got.stdout == content, "{f} {size}");
        }
    }
    // Uploading again sends nothing.
    let again = kiln(&ep, &["cas", "put", p(&tmp.path().join("large"))]).await;
    assert_eq!(again.code, 0);
    assert!(again.stderr.contains("uploaded 0 of 1 blobs"), "{}", again.stderr);
    srv.stop().await;
    Ran::Passed
}

/// A tree with nested and empty directories, an executable, symlinks
/// (relative, dangling, absolute), duplicate contents and a large file
/// round-trips byte-identically with `cas get --dir`, also when the
/// Directory messages are read one by one instead of with GetTree.
async fn put_get_directory_round_trip() -> Ran {
    let srv = Server::start(false).await;
    let ep = srv.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("readme.txt"), b"hello\n").unwrap();
    std::fs::write(src.join("a/same.txt"), b"hello\n").unwrap();
    std::fs::write(src.join("a/b/empty-file"), b"").unwrap();
    std::fs::write(src.join("a/b/c/big.bin"), data(200_000, 3)).unwrap();
    std::fs::write(src.join("run.sh"), b"#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("readme.txt", src.join("link")).unwrap();
    std::os::unix::fs::symlink("../nowhere", src.join("a/dangling")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("a/b/absolute")).unwrap();
    let before = snapshot(&src);

    let put = kiln(&ep, &["cas", "put", p(&src)]).await;
    assert_eq!(put.code, 0, "{}", put.stderr);
    let digest = put.text().trim().to_string();
    assert!(put.stderr.contains("5 files"), "{}", put.stderr);

    let dest = tmp.path().join("dest");
    let got = kiln(&ep, &["cas", "get", "--dir", &digest, "-o", p(&dest)]).await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(snapshot(&dest), before);
    assert!(matches!(
        snapshot(&dest).get(Path::new("run.sh")),
        Some(Entry::File { executable: true, .. })
    ));

    // Same tree again: the same digest.
    let put2 = kiln(&ep, &["cas", "put", p(&dest)]).await;
    assert_eq!(put2.text().trim(), digest);

    // A non-empty destination is refused.
    let again = kiln(&ep, &["cas", "get", "--dir", &digest, "-o", p(&dest)]).await;
    assert_eq!(again.code, 2, "{}", again.stderr);
    one_line(&again.stderr);
    // --dir needs -o.
    let no_o = kiln(&ep, &["cas", "get", "--dir", &digest]).await;
    assert_eq!(no_o.code, 2);

    // The GetTree-less path: read every Directory as a blob.
    let remote = Remote::connect(&ClientOptions::new(ep.clone())).await.unwrap();
    let root = kiln_client::format::parse_digest(&digest, DigestFunction::Sha256).unwrap();
    let mut dirs = std::collections::HashMap::new();
    kiln_client::fetch::complete_directories(&remote, &root, &mut dirs)
        .await
        .unwrap();
    assert_eq!(dirs.len(), 5, "root, a, a/b, a/b/c, empty");
    let plan = kiln_client::fetch::plan_tree(&dirs[&root], &dirs, DigestFunction::Sha256).unwrap();
    let dest2 = tmp.path().join("dest2");
    std::fs::create_dir(&dest2).unwrap();
    kiln_client::fetch::materialize(&remote, &plan, &dest2, false)
        .await
        .unwrap();
    assert_eq!(snapshot(&dest2), before);
    srv.stop().await;
    Ran::Passed
}

/// Missing digests are one line and exit 1; malformed input is exit 2.
async fn missing_digests_and_bad_input() -> Ran {
    let srv = Server::start(false).await;
    let ep = srv.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let present = tmp.path().join("present");
    std::fs::write(&present, b"present").unwrap();
    assert_eq!(kiln(&ep, &["cas", "put", p(&present)]).await.code, 0);
    let known = digest_of(b"present");
    let unknown = digest_of(b"never uploaded");
    let unknown_big = digest_of(&data(500_000, 9));

    for d in [&unknown, &unknown_big] {
        let got = kiln(&ep, &["cas", "get", d]).await;
        assert_eq!(got.code, 1, "{}", got.stderr);
        assert!(got.stdout.is_empty());
        let line = one_line(&got.stderr);
        assert!(line.contains("not found") && line.contains(d.as_str()), "{line}");
        let file = tmp.path().join("never");
        let got = kiln(&ep, &["cas", "get", d, "-o", p(&file)]).await;
        assert_eq!(got.code, 1, "{}", got.stderr);
        assert!(!file.exists(), "no partial file is left behind");
    }
    let got = kiln(
        &ep,
        &["cas", "get", "--dir", &unknown, "-o", p(&tmp.path().join("d"))],
    )
    .await;
    assert_eq!(got.code, 1, "{}", got.stderr);
    one_line(&got.stderr);

    let missing = kiln(&ep, &["cas", "missing", &known, &unknown, &unknown_big]).await;
    assert_eq!(missing.code, 1);
    assert_eq!(missing.text(), format!("{unknown}\n{unknown_big}\n"));

    let ac = kiln(&ep, &["ac", "get", &unknown]).await;
    assert_eq!(ac.code, 1, "{}", ac.stderr);
    assert!(one_line(&ac.stderr).contains("no action result"), "{}", ac.stderr);

    for bad in [
        "xyz",
        "abc/12",
        &format!("{}/-1", "a".repeat(64)),
        &"a".repeat(64),
    ] {
        let got = kiln(&ep, &["cas", "get", bad]).await;
        assert_eq!(got.code, 2, "{bad}: {}", got.stderr);
        one_line(&got.stderr);
    }
    let nofile = kiln(&ep, &["cas", "put", p(&tmp.path().join("no-such-file"))]).await;
    assert_eq!(nofile.code, 2, "{}", nofile.stderr);
    one_line(&nofile.stderr);
    let tls = kiln("grpcs://127.0.0.1:1", &["status"]).await;
    assert_eq!(tls.code, 2, "{}", tls.stderr);
    srv.stop().await;
    Ran::Passed
}

/// An unreachable server: one line naming the endpoint, exit 3, quickly.
async fn unreachable_server() -> Ran {
    let addr = dead_address();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    for endpoint in [
        format!("grpc://{addr}"),
        addr.to_string(),
        format!("http://{addr}"),
    ] {
        for args in [
            vec!["status"],
            vec!["cas", "put", p(&file)],
            vec!["cas", "missing", &digest_of(b"x")],
            vec!["exec", "--", "true"],
        ] {
            let started = Instant::now();
            let out = kiln(&endpoint, &args).await;
            assert_eq!(out.code, 3, "{args:?}: {}", out.stderr);
            let line = one_line(&out.stderr);
            assert!(
                line.contains(&endpoint) && line.contains("cannot reach"),
                "{line}"
            );
            assert!(started.elapsed() < Duration::from_secs(7));
        }
    }
    Ran::Passed
}

/// `--instance` reaches a named instance; an unknown one is an RPC error
/// (exit 3) naming it, not a missing blob.
async fn named_and_unknown_instances() -> Ran {
    let srv = Server::start(false).await;
    let ep = srv.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f");
    let content = data(100_000, 5);
    std::fs::write(&file, &content).unwrap();
    let put = kiln(&ep, &["cas", "put", p(&file), "--instance", "second"]).await;
    assert_eq!(put.code, 0, "{}", put.stderr);
    let digest = put.text().trim().to_string();
    let got = kiln(&ep, &["--instance", "second", "cas", "get", &digest]).await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert!(got.stdout == content);
    for args in [
        vec!["cas", "get", &digest],
        vec!["cas", "missing", &digest],
        vec!["status"],
    ] {
        let mut a = vec!["--instance", "nope"];
        a.extend(args);
        let out = kiln(&ep, &a).await;
        assert_eq!(out.code, 3, "{a:?}: {}", out.stderr);
        let line = one_line(&out.stderr);
        assert!(line.contains("unknown instance name \"nope\""), "{line}");
    }
    srv.stop().await;
    Ran::Passed
}

/// `status` prints what GetCapabilities says and, from a Kiln scheduler,
/// its workers and queue; a server without `kiln.status.v1` gets a clear
/// "not available".
async fn status_shows_capabilities() -> Ran {
    let srv = Server::start(true).await;
    // The in-process worker registers shortly after the server starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let out = kiln(&srv.endpoint(), &["status"]).await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        let text = out.text();
        if text.contains("workers: 1 (1 connected)") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for want in [
        "api versions: 2.0 to 2.",
        "digest functions: sha256",
        "blake3",
        "max batch total size: 64.0 KiB (65536 bytes)",
        "execution: enabled",
        "workers: 1 (1 connected), 0 of 2 slots busy",
        "  cli-test-worker  0/2 slots busy",
        "OSFamily=",
        "queue: 0 queued, 0 executing",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // A running action is listed with its worker.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let ep = srv.endpoint();
    // Long enough to be seen running by the polls below on a busy machine.
    let slow =
        tokio::spawn(
            async move { kiln(&ep, &["exec", "--input-root", p(&root), "--", "sleep", "10"]).await },
        );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = kiln(&srv.endpoint(), &["status"]).await.text();
        if text.contains("running (longest first)") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for want in [
        "queue: 0 queued, 1 executing",
        "running (longest first):",
        "on cli-test-worker",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    assert_eq!(slow.await.unwrap().code, 0);
    srv.stop().await;
    let cache_only = Server::start(false).await;
    let out = kiln(&cache_only.endpoint(), &["status"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.text().contains("execution: not enabled"), "{}", out.text());
    assert!(
        out.text().contains("workers and queue: not available"),
        "{}",
        out.text()
    );
    cache_only.stop().await;
    Ran::Passed
}

/// The brief's example: `exec --output out -- sh -c 'echo hi > out'`
/// writes `hi` into the input root.
async fn exec_writes_declared_output() -> Ran {
    let srv = Server::start(true).await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("input.txt"), b"data\n").unwrap();
    let out = kiln(
        &srv.endpoint(),
        &[
            "exec",
            "--input-root",
            p(&root),
            "--output",
            "out",
            "--",
            "sh",
            "-c",
            "echo hi > out",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(root.join("out")).unwrap(), "hi\n");
    assert!(out.stderr.contains("COMPLETED (exit code 0"), "{}", out.stderr);
    assert!(out.stderr.contains("wrote 1 output"), "{}", out.stderr);
    srv.stop().await;
    Ran::Passed
}

/// stdout/stderr come back, the exit code is the command's, inputs are
/// visible, a second run of a successful action is a cache hit and
/// `--no-cache` runs it again.
async fn exec_streams_exit_code_and_caches() -> Ran {
    let srv = Server::start(true).await;
    let ep = srv.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("in.txt"), b"from the input root\n").unwrap();
    let r = p(&root);
    let out = kiln(
        &ep,
        &[
            "exec",
            "--input-root",
            r,
            "--",
            "sh",
            "-c",
            "cat in.txt; echo oops >&2; exit 3",
        ],
    )
    .await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert_eq!(out.text(), "from the input root\n");
    assert!(out.stderr.contains("oops\n"), "{}", out.stderr);
    assert!(out.stderr.contains("COMPLETED (exit code 3"), "{}", out.stderr);

    // Environment and platform reach the action.
    let out = kiln(
        &ep,
        &[
            "exec",
            "--input-root",
            r,
            "--env",
            "GREETING=hello",
            "--platform",
            "OSFamily=Linux",
            "--",
            "sh",
            "-c",
            "echo $GREETING",
        ],
    )
    .await;
    assert_eq!(
        (out.code, out.text()),
        (0, "hello\n".to_string()),
        "{}",
        out.stderr
    );

    // Outputs into --output-dir keep the input root unchanged, so the
    // second run is the same action: a cache hit.
    let args = |dir: &Path| -> Vec<String> {
        [
            "exec",
            "--input-root",
            r,
            "--output",
            "o.txt",
            "--output-dir",
            p(dir),
            "--",
            "sh",
            "-c",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["echo cached > o.txt; echo printed".to_string()])
        .collect()
    };
    let d1 = tmp.path().join("d1");
    let d2 = tmp.path().join("d2");
    let d3 = tmp.path().join("d3");
    let run = |dir: PathBuf, extra: Option<&'static str>| {
        let ep = ep.clone();
        let mut a = args(&dir);
        if let Some(x) = extra {
            a.insert(1, x.to_string());
        }
        async move {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            kiln(&ep, &refs).await
        }
    };
    let first = run(d1.clone(), None).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(!first.stderr.contains("cached result"), "{}", first.stderr);
    let second = run(d2.clone(), None).await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(second.stderr.contains("cached result"), "{}", second.stderr);
    assert_eq!(second.text(), "printed\n");
    assert_eq!(action_digest(&first.stderr), action_digest(&second.stderr));
    let third = run(d3.clone(), Some("--no-cache")).await;
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert!(!third.stderr.contains("cached result"), "{}", third.stderr);
    for d in [&d1, &d2, &d3] {
        assert_eq!(std::fs::read_to_string(d.join("o.txt")).unwrap(), "cached\n");
    }
    assert!(!root.join("o.txt").exists());
    srv.stop().await;
    Ran::Passed
}

/// An output directory comes back as a tree (nested file, symlink,
/// executable); a declared output the command did not create is
/// reported; `ac get` pretty-prints the cached result.
async fn exec_output_directory_and_ac_get() -> Ran {
    let srv = Server::start(true).await;
    let ep = srv.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let script = "mkdir -p d/e && printf x > d/e/f && ln -s f d/e/l && printf '#!/bin/sh\\n' > d/x \
                  && chmod +x d/x && echo done";
    let out = kiln(
        &ep,
        &[
            "exec",
            "--input-root",
            p(&root),
            "--output",
            "d",
            "--output",
            "never",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("output never was not produced"),
        "{}",
        out.stderr
    );
    let got = snapshot(&root.join("d"));
    assert_eq!(
        got.get(Path::new("e/f")),
        Some(&Entry::File {
            content: b"x".to_vec(),
            executable: false
        })
    );
    assert_eq!(got.get(Path::new("e/l")), Some(&Entry::Symlink("f".into())));
    assert!(matches!(
        got.get(Path::new("x")),
        Some(Entry::File { executable: true, .. })
    ));

    let action = action_digest(&out.stderr);
    let ac = kiln(&ep, &["ac", "get", &action]).await;
    assert_eq!(ac.code, 0, "{}", ac.stderr);
    let text = ac.text();
    for want in [
        "exit code: 0",
        "output directories:\n  d  tree ",
        "stdout: ",
        "  | done",
        "stderr: (empty)",
        "worker: cli-test-worker",
        "execution start:",
        "durations: ",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    srv.stop().await;
    Ran::Passed
}

/// A command that outlives its timeout is an execution failure: exit 4.
async fn exec_timeout_is_an_execution_failure() -> Ran {
    let srv = Server::start(true).await;
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = kiln(
        &srv.endpoint(),
        &[
            "exec",
            "--input-root",
            p(tmp.path()),
            "--timeout",
            "1s",
            "--",
            "sleep",
            "30",
        ],
    )
    .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("DEADLINE_EXCEEDED"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(25));
    srv.stop().await;
    Ran::Passed
}

/// A cache-only server: exec says so and exits 4.
async fn exec_without_execution_support() -> Ran {
    let srv = Server::start(false).await;
    let tmp = tempfile::tempdir().unwrap();
    let out = kiln(
        &srv.endpoint(),
        &["exec", "--input-root", p(tmp.path()), "--", "true"],
    )
    .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        one_line(&out.stderr).contains("does not offer remote execution"),
        "{}",
        out.stderr
    );
    srv.stop().await;
    Ran::Passed
}
