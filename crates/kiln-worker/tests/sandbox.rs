//! The sandbox: network isolation, process-tree kill on timeout and
//! cancel, and the cost of setting it up.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_proto::reapi::Platform;
use kiln_proto::reapi::platform::Property;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);

fn network_on() -> Option<Platform> {
    Some(Platform {
        properties: vec![Property {
            name: "network".into(),
            value: "on".into(),
        }],
    })
}

/// A script that connects to 127.0.0.1:`port` and records the outcome.
fn connect_script(port: u16) -> String {
    // bash's /dev/tcp; `timeout` bounds a hang.
    format!(
        "if timeout 5 bash -c 'echo ping > /dev/tcp/127.0.0.1/{port}' 2>/dev/null; \
         then echo connected > result; else echo failed > result; fi"
    )
}

#[tokio::test]
async fn no_network_by_default_network_with_platform_property() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut buf)
            .await
            .unwrap();
        buf
    });
    let root = TreeSpec::default().upload(&cas).await;
    let mut cmd = sh(&connect_script(port));
    cmd.output_paths = vec!["result".into()];

    // Default: the host's loopback is unreachable.
    let resp = run(&exec, job(&cas, cmd.clone(), root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let r = read_blob(&cas, &outputs_by_path(&resp)["result"]).await;
    assert_eq!(r, b"failed\n", "a sandboxed action reached the host network");
    assert!(!accepted.is_finished());

    // network=on: it connects.
    let mut j = job(&cas, cmd, root, T).await;
    j.platform = network_on();
    let resp = run(&exec, j).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let r = read_blob(&cas, &outputs_by_path(&resp)["result"]).await;
    assert_eq!(r, b"connected\n", "{}", stderr_of(&cas, &resp).await);
    let got = tokio::time::timeout(Duration::from_secs(10), accepted)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "ping\n");
}

#[tokio::test]
async fn loopback_works_inside_the_sandbox_and_is_private_per_slot() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    // A server and a client inside the same action talk over 127.0.0.1.
    let mut cmd = sh("ip -br addr show lo > lo 2>&1 || echo no-ip > lo");
    cmd.output_paths = vec!["lo".into()];
    let resp = run(&exec, job(&cas, cmd, root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let lo = String::from_utf8(read_blob(&cas, &outputs_by_path(&resp)["lo"]).await).unwrap();
    if !lo.starts_with("no-ip") {
        assert!(lo.contains("127.0.0.1"), "{lo}");
        assert!(lo.contains("UNKNOWN") || lo.contains("UP"), "{lo}");
    }

    // Private per slot: while an action of one slot listens on
    // 127.0.0.1:PORT, an action of the other slot cannot connect to it,
    // and the listener itself still can. (Python is needed, and a missing
    // one fails the test: the listener exits 127.)
    let listener = job(&cas, python(LISTEN, &[]), root.clone(), T).await;
    let e = exec.clone();
    let listening = tokio::spawn(async move { e.execute(listener, CancellationToken::new()).await });
    let roots = [slot_root(tmp.path(), 0), slot_root(tmp.path(), 1)];
    let start = Instant::now();
    let (port, listener_root) = loop {
        if let Some((port, root)) = roots
            .iter()
            .find_map(|r| Some((std::fs::read_to_string(r.join("port")).ok()?, r.clone())))
        {
            break (port, root);
        }
        if listening.is_finished() {
            let resp = listening.await.unwrap();
            panic!(
                "the listener ended before listening: {:?}, exit code {}, {}",
                resp.status,
                resp.result.as_ref().map_or(-1, |r| r.exit_code),
                stderr_of(&cas, &resp).await
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the listener never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let other = job(&cas, python(CONNECT, &[&port]), root, T).await;
    let resp = tokio::time::timeout(Duration::from_secs(30), run(&exec, other))
        .await
        .expect("the connecting action hung");
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    assert_eq!(
        stdout_of(&cas, &resp).await,
        "refused\n",
        "the other slot reached 127.0.0.1:{port}: {}",
        stderr_of(&cas, &resp).await
    );
    std::fs::write(listener_root.join("stop"), b"").unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), listening)
        .await
        .expect("the listener hung")
        .unwrap();
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    assert_eq!(
        stdout_of(&cas, &resp).await,
        "accepted 0, then itself\n",
        "{}",
        stderr_of(&cas, &resp).await
    );
}

/// Listens on 127.0.0.1 (a free port, written to `port`) until a file
/// `stop` appears (at most 30 s), counting connections; then connects to
/// itself.
const LISTEN: &str = r#"
import os, socket, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
s.settimeout(0.05)
port = s.getsockname()[1]
with open("port.tmp", "w") as f:
    f.write(str(port))
os.rename("port.tmp", "port")
accepted = 0
deadline = time.monotonic() + 30
while not os.path.exists("stop"):
    if time.monotonic() > deadline:
        raise SystemExit("never told to stop")
    try:
        s.accept()[0].close()
        accepted += 1
    except socket.timeout:
        pass
c = socket.create_connection(("127.0.0.1", port), timeout=5)
s.settimeout(5)
s.accept()[0].close()
print(f"accepted {accepted}, then itself")
"#;

/// Connects to 127.0.0.1:`argv[1]`.
const CONNECT: &str = r#"
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
"#;

/// `python3 -c SCRIPT ARGS...` (looked up on the action's PATH).
fn python(script: &str, args: &[&str]) -> kiln_proto::reapi::Command {
    let mut cmd = sh("");
    cmd.arguments = ["python3", "-c", script]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect();
    cmd
}

/// A command whose children and grandchildren sleep, one in a new session
/// and process group (so only a PID namespace can find it).
fn tree_script(tok: &str) -> String {
    format!(
        "sleep {tok} & (sleep {tok} & sleep {tok}) & setsid sh -c 'sleep {tok}' & \
         trap '' TERM; echo started > started; wait"
    )
}

async fn wait_for_processes(tok: &str, n: usize) {
    let start = Instant::now();
    while processes_with(tok).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "processes never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(tok: &str) {
    // The worker returns after the whole tree is reaped; allow the kernel a
    // moment to drop /proc entries of zombies being reaped.
    let start = Instant::now();
    while !processes_with(tok).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "processes survived: {:?}",
            processes_with(tok)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn timeout_is_deadline_exceeded_and_kills_the_process_tree() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let mut cmd = sh(&format!("echo before-timeout; {}", tree_script(&tok)));
    cmd.output_paths = vec!["started".into()];
    let start = Instant::now();
    let resp = run(&exec, job(&cas, cmd, root, Duration::from_secs(2)).await).await;
    let took = start.elapsed();
    assert_eq!(
        code(&resp),
        tonic::Code::DeadlineExceeded as i32,
        "{:?}",
        resp.status
    );
    // The shell ignores SIGTERM: SIGKILL after the 500 ms grace.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    wait_gone(&tok).await;
    // What was captured is still reported.
    assert_eq!(stdout_of(&cas, &resp).await, "before-timeout\n");
    assert!(resp.result.unwrap().execution_metadata.is_some());
}

#[tokio::test]
async fn cancel_kills_the_process_tree() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let j = job(&cas, sh(&tree_script(&tok)), root, T).await;
    let cancel = CancellationToken::new();
    let e = exec.clone();
    let c = cancel.clone();
    let task = tokio::spawn(async move { e.execute(j, c).await });
    wait_for_processes(&tok, 4).await;
    let start = Instant::now();
    cancel.cancel();
    let resp = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code(&resp), tonic::Code::Cancelled as i32, "{:?}", resp.status);
    assert!(start.elapsed() < Duration::from_secs(10));
    wait_gone(&tok).await;
    assert!(
        slots_are_clean(&tmp.path().join("work")),
        "{:?}",
        list_files(&tmp.path().join("work"))
    );
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_command() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let resp = run(
        &exec,
        job(
            &cas,
            sh(&format!("setsid sleep {tok} & sleep {tok} & exit 0")),
            root,
            T,
        )
        .await,
    )
    .await;
    assert_eq!(code(&resp), 0);
    assert_eq!(resp.result.unwrap().exit_code, 0);
    wait_gone(&tok).await;
}

#[tokio::test]
async fn unsandboxed_mode_kills_the_process_group() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.sandbox.enabled = false).await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let resp = run(
        &exec,
        job(
            &cas,
            sh(&format!("sleep {tok} & (sleep {tok} &); wait")),
            root,
            Duration::from_secs(1),
        )
        .await,
    )
    .await;
    assert_eq!(
        code(&resp),
        tonic::Code::DeadlineExceeded as i32,
        "{:?}",
        resp.status
    );
    wait_gone(&tok).await;
}

#[tokio::test]
async fn helper_as_a_sub_command_of_a_multi_call_binary() {
    // As `kiln sandbox-helper ...` would be configured: program plus a
    // leading argument before the mode.
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| {
        c.sandbox.helper = vec![helper(), "sandbox-helper".into()]
    })
    .await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let j = job(&cas, sh(&format!("sleep {tok}")), root, T).await;
    let cancel = CancellationToken::new();
    let (e, c) = (exec.clone(), cancel.clone());
    let task = tokio::spawn(async move { e.execute(j, c).await });
    wait_for_processes(&tok, 1).await;
    // The action's ancestors: its init and the slot's zygote, both started
    // as `<helper> sandbox-helper zygote ...`.
    let helpers: Vec<String> = zygotes_above(processes_with(&tok)[0])
        .into_iter()
        .map(cmdline)
        .collect();
    assert_eq!(helpers.len(), 2, "{helpers:?}");
    assert!(
        helpers
            .iter()
            .all(|c| c.contains("kiln-sandbox") && c.contains("sandbox-helper zygote")),
        "{helpers:?}"
    );
    cancel.cancel();
    assert_eq!(code(&task.await.unwrap()), tonic::Code::Cancelled as i32);
}

/// CPU time of this process, of its reaped children, and of every live
/// descendant (the zygotes) with the children they reaped (the actions).
fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let t = |u: nix::sys::resource::Usage| {
        let tv = |v: nix::sys::time::TimeVal| Duration::new(v.tv_sec() as u64, v.tv_usec() as u32 * 1000);
        tv(u.user_time()) + tv(u.system_time())
    };
    let own = t(getrusage(UsageWho::RUSAGE_SELF).unwrap()) + t(getrusage(UsageWho::RUSAGE_CHILDREN).unwrap());
    let tick = Duration::from_secs(1) / 100;
    let mut ticks = 0u64;
    // Walk the live descendants through /proc/PID/task/TID/children.
    let mut stack = vec![std::process::id()];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    stack.extend(c.split_whitespace().filter_map(|v| v.parse::<u32>().ok()));
                }
            }
        }
        if pid == std::process::id() {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, after)) = stat.rsplit_once(')')
        {
            // Fields 14-17 (utime, stime, cutime, cstime) are the 12th to
            // 15th after the command name.
            ticks += after
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    own + tick * ticks as u32
}

/// Measures a no-op action end to end and prints the figures; the bound
/// only catches pathological regressions on a loaded 2-core machine.
#[tokio::test]
async fn noop_action_overhead() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor(tmp.path(), &cas).await;
    let root = TreeSpec::default().upload(&cas).await;
    let mut cmd = sh("true");
    cmd.arguments = vec!["/bin/true".into()];
    let j = job(&cas, cmd, root, T).await;
    let n = 40;
    // Warm up (connections, capabilities).
    for _ in 0..3 {
        assert_eq!(code(&run(&exec, j.clone()).await), 0);
    }
    let plain = executor_with(&tmp.path().join("unsandboxed"), &cas, |c| {
        c.sandbox.enabled = false
    })
    .await;
    for _ in 0..3 {
        assert_eq!(code(&run(&plain, j.clone()).await), 0);
    }
    // Interleaved rounds so that machine noise hits every variant alike.
    let variants = ["sandbox, no network", "sandbox, network on", "unsandboxed"];
    let mut total = [Duration::ZERO; 3];
    let mut in_run = [Duration::ZERO; 3];
    let mut cpu = [Duration::ZERO; 3];
    for _ in 0..n {
        for (i, _) in variants.iter().enumerate() {
            let cpu_before = cpu_time();
            let mut jj = j.clone();
            if i == 1 {
                jj.platform = network_on();
            }
            let e = if i == 2 { &plain } else { &exec };
            let start = Instant::now();
            let resp = run(e, jj).await;
            total[i] += start.elapsed();
            assert_eq!(code(&resp), 0);
            let md = resp.result.unwrap().execution_metadata.unwrap();
            let (a, b) = (
                md.execution_start_timestamp.unwrap(),
                md.execution_completed_timestamp.unwrap(),
            );
            in_run[i] += Duration::from_nanos(
                ((b.seconds - a.seconds) * 1_000_000_000 + (b.nanos - a.nanos) as i64) as u64,
            );
            cpu[i] += cpu_time().saturating_sub(cpu_before);
        }
    }
    for (i, name) in variants.iter().enumerate() {
        let per = total[i] / n;
        println!(
            "no-op action ({name}): {:.2} ms end to end, {:.2} ms running the command, \
             {:.2} ms CPU (worker, zygote, init and command; CAS server included; 10 ms ticks)",
            per.as_secs_f64() * 1e3,
            (in_run[i] / n).as_secs_f64() * 1e3,
            (cpu[i] / n).as_secs_f64() * 1e3
        );
        assert!(per < Duration::from_millis(500), "{per:?} per no-op action");
    }
    // Concurrency: 2 slots busy at once.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let e = exec.clone();
        let jj = j.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 2 {
                assert_eq!(code(&e.execute(jj.clone(), CancellationToken::new()).await), 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "no-op actions, 2 concurrent: {:.0} actions/s",
        n as f64 / start.elapsed().as_secs_f64()
    );
}

/// A slot's zygote killed with SIGKILL while its action runs: the whole
/// action dies with it (nothing is left unsupervised), the action fails
/// with INTERNAL, and the next action on that worker runs in a new zygote.
#[tokio::test]
async fn killing_a_zygote_kills_its_action_and_the_slot_recovers() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| c.slots = Some(1)).await;
    let root = TreeSpec::default().upload(&cas).await;
    let tok = token();
    let j = job(&cas, sh(&tree_script(&tok)), root.clone(), T).await;
    let e = exec.clone();
    let task = tokio::spawn(async move { e.execute(j, CancellationToken::new()).await });
    wait_for_processes(&tok, 4).await;
    // The outermost ancestor started as a zygote is the slot's zygote (the
    // action's init, a clone of it, has the same command line).
    let zygote = *zygotes_above(processes_with(&tok)[0])
        .last()
        .expect("the action runs under a zygote");
    // Started by the worker (this process) itself.
    assert_eq!(parent_of(zygote), Some(std::process::id()));
    kill9(zygote);
    let resp = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the execution ended")
        .unwrap();
    assert_eq!(code(&resp), tonic::Code::Internal as i32, "{:?}", resp.status);
    wait_gone(&tok).await;
    // The slot works again, with a new zygote.
    let j = job(&cas, sh("echo again"), root, T).await;
    let resp = run(&exec, j).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    assert_eq!(stdout_of(&cas, &resp).await, "again\n");
    assert!(!exec.sandbox().zygote_pids().contains(&zygote));
    assert!(slots_are_clean(&tmp.path().join("work")));
}

/// A command started directly (no shell in between) gets SIGTERM on
/// timeout and, with its default disposition, dies of it at once: not of
/// the SIGKILL that follows the grace period. It starts with no blocked and
/// no ignored signals, whatever init or the worker had.
#[tokio::test]
async fn timeout_terminates_a_direct_command_with_sigterm() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| {
        c.sandbox.kill_grace = Duration::from_secs(20)
    })
    .await;
    let root = TreeSpec::default().upload(&cas).await;

    let mut signals = sh("");
    signals.arguments = vec![
        "grep".into(),
        "-E".into(),
        "^Sig(Blk|Ign)".into(),
        "/proc/self/status".into(),
    ];
    let resp = run(&exec, job(&cas, signals, root.clone(), T).await).await;
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let out = stdout_of(&cas, &resp).await;
    let mask = |name: &str| {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{out}"));
        u64::from_str_radix(line.rsplit('\t').next().unwrap(), 16).unwrap()
    };
    assert_eq!(mask("SigBlk:"), 0, "{out}");
    // Signals 1-31; 32 and 33 are glibc's own and stay as they are.
    assert_eq!(mask("SigIgn:") & 0x7fff_ffff, 0, "{out}");

    let tok = token();
    let mut sleep = sh("");
    sleep.arguments = vec!["sleep".into(), tok.clone()];
    let start = Instant::now();
    let resp = run(&exec, job(&cas, sleep, root, Duration::from_secs(1)).await).await;
    let took = start.elapsed();
    assert_eq!(
        code(&resp),
        tonic::Code::DeadlineExceeded as i32,
        "{:?}",
        resp.status
    );
    assert_eq!(
        resp.result.as_ref().unwrap().exit_code,
        128 + 15,
        "killed by SIGTERM"
    );
    assert!(
        took < Duration::from_secs(10),
        "waited for the 20 s grace: {took:?}"
    );
    wait_gone(&tok).await;
}

/// A slot whose zygote dies and cannot be restarted (the helper binary is
/// gone) fails one action, then goes out of service: the other slot runs
/// the next actions, and the slot comes back once the helper is there
/// again. With every slot out of service an action fails UNAVAILABLE at
/// once instead of waiting.
#[tokio::test]
async fn a_slot_that_cannot_restart_goes_out_of_service_and_recovers() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("kiln-sandbox-copy");
    std::fs::copy(helper(), &copy).unwrap();
    let exec = executor_with(tmp.path(), &cas, |c| {
        c.sandbox.helper = vec![copy.to_string_lossy().into_owned()]
    })
    .await;
    let root = TreeSpec::default().upload(&cas).await;
    // The helper disappears and the zygote of the slot used next dies.
    std::fs::rename(&copy, tmp.path().join("away")).unwrap();
    let first = exec.sandbox().zygote_pids()[0];
    kill9(first);
    wait_dead(first).await;
    let mut codes = Vec::new();
    for i in 0..4 {
        let j = job(&cas, sh(&format!("echo {i}")), root.clone(), T).await;
        let resp = tokio::time::timeout(Duration::from_secs(30), run(&exec, j))
            .await
            .unwrap_or_else(|_| panic!("action {i} hung"));
        codes.push(code(&resp));
    }
    assert_eq!(
        codes,
        vec![tonic::Code::Internal as i32, 0, 0, 0],
        "one failure, then the healthy slot"
    );
    assert_eq!(exec.sandbox().out_of_service(), 1);

    // The helper is back: the slot recovers in the background.
    std::fs::rename(tmp.path().join("away"), &copy).unwrap();
    let start = Instant::now();
    while exec.sandbox().out_of_service() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the slot never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both slots run actions at once again: each action says it started
    // and waits (at most 20 s) to be let go, which happens only once both
    // have started.
    let mut tasks = Vec::new();
    for name in ["a", "b"] {
        let script = format!(
            "touch started; i=0; while [ ! -e go ]; do i=$((i+1)); [ $i -le 400 ] || exit 9; \
             sleep 0.05; done; echo {name}"
        );
        let (e, j) = (exec.clone(), job(&cas, sh(&script), root.clone(), T).await);
        tasks.push(tokio::spawn(async move {
            e.execute(j, CancellationToken::new()).await
        }));
    }
    let roots = [slot_root(tmp.path(), 0), slot_root(tmp.path(), 1)];
    wait_until("both slots running an action", Duration::from_secs(20), || {
        roots.iter().all(|r| r.join("started").exists())
    })
    .await;
    for r in &roots {
        std::fs::write(r.join("go"), b"").unwrap();
    }
    let mut outs = Vec::new();
    for t in tasks {
        let resp = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a parallel action hung")
            .unwrap();
        assert_eq!(code(&resp), 0, "{:?}", resp.status);
        assert_eq!(resp.result.as_ref().unwrap().exit_code, 0, "never let go");
        outs.push(stdout_of(&cas, &resp).await);
    }
    assert_eq!(outs, ["a\n", "b\n"]);

    // Every slot out of service: UNAVAILABLE, promptly.
    std::fs::rename(&copy, tmp.path().join("away")).unwrap();
    for pid in exec.sandbox().zygote_pids() {
        kill9(pid);
        wait_dead(pid).await;
    }
    for _ in 0..2 {
        let _ = run(&exec, job(&cas, sh("true"), root.clone(), T).await).await;
    }
    assert_eq!(exec.sandbox().out_of_service(), 2);
    let start = Instant::now();
    let resp = run(&exec, job(&cas, sh("true"), root, T).await).await;
    assert_eq!(code(&resp), tonic::Code::Unavailable as i32, "{:?}", resp.status);
    assert!(start.elapsed() < Duration::from_secs(5));
}
