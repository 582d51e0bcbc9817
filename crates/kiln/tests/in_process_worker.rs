//! The all-in-one default's in-process worker, through the real `kiln`
//! binary and `kiln exec`: its actions cannot see the server's own data
//! (the CAS and Action Cache files), and on SIGTERM a running action
//! finishes and uploads its outputs before the listeners close.

mod common;

use std::process::Command;

use common::{KilnProcess, output_within};

/// Longest a `kiln exec` of these tests may take.
const EXEC_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

#[test]
fn actions_of_the_in_process_worker_cannot_read_the_servers_stores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let kiln = KilnProcess::embedded(&data);
    // Something in the CAS for the action to look for.
    assert!(data.join("cas").is_dir() && data.join("ac").is_dir());
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let script = format!(
        "ls -A {d} | tr '\\n' ' '; echo; for p in cas ac kiln-worker; do test -e {d}/$p && echo \"$p visible\" || echo \"$p hidden\"; done",
        d = data.display()
    );
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "exec",
                "--endpoint",
                &format!("grpc://{}", kiln.grpc),
                "--input-root",
            ])
            .arg(&root)
            .args(["--", "sh", "-c", &script]),
        EXEC_LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    // Only the way to the action's own input root is there.
    assert_eq!(lines[0].trim(), "kiln-worker", "{stdout}");
    assert_eq!(
        &lines[1..],
        ["cas hidden", "ac hidden", "kiln-worker visible"],
        "{stdout}"
    );
    drop(kiln);
}

#[test]
fn sigterm_lets_a_running_action_finish_and_upload_before_the_listeners_close() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut kiln = KilnProcess::embedded(&data);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // The client runs on a thread, bounded, while the server is stopped.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args([
        "exec",
        "--endpoint",
        &format!("grpc://{}", kiln.grpc),
        "--input-root",
    ])
    .arg(&root)
    .args([
        "--output",
        "out",
        "--",
        "sh",
        "-c",
        "sleep 2.0137; echo finished > out",
    ]);
    let exec = std::thread::spawn(move || output_within(&mut cmd, EXEC_LIMIT));
    // Once the action runs (its `sleep`, not the client whose command line
    // also holds the text), ask the server to stop.
    let running = || {
        common::processes_with("2.0137")
            .into_iter()
            .any(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep\0")))
    };
    let started = std::time::Instant::now();
    while !running() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the action never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    common::sigterm(kiln.child.id());
    let out = exec.join().expect("the client thread");
    assert!(
        out.status.success(),
        "the action failed during the drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(root.join("out")).unwrap(), "finished\n");
    // And the server then exits by itself.
    let (status, _) = common::wait_exit(&mut kiln.child, std::time::Duration::from_secs(60));
    assert!(status.success(), "kiln exited with {status}");
}
