//! A real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3, run as `bazel-4`)
//! builds and tests a C++ workspace through the kiln binary's remote
//! execution (embedded default: CAS, AC, scheduler and an in-process
//! sandboxed worker). tests/bazel/run-re.sh generates the workspace (60
//! layered cc_library targets, cc_binary, cc_test and genrule targets),
//! requires every spawn to run on kiln (`--spawn_strategy=remote`), the tests
//! to pass and the outputs to be right; then a second build from a fresh
//! output base must be served entirely from the cache with byte-identical
//! outputs; a failing test must never be cached, a test over its timeout
//! must be reported TIMEOUT and killed, and kiln must shut down cleanly.
//!
//! Bazel is required, not optional: CI installs it with
//! `.ci/install-bazel.sh`. Without it this test fails and says how to install
//! it. `BAZEL` may name another Bazel 4.2.3 binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Bazel binary the script will run, found on PATH like the shell would.
fn find_bazel() -> Option<PathBuf> {
    let name = env::var("BAZEL").unwrap_or_else(|_| "bazel-4".to_string());
    let candidate = Path::new(&name);
    if candidate.components().count() > 1 {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
}

#[test]
fn bazel_builds_and_tests_through_kiln_remote_execution() {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bazel/run-re.sh");
    assert!(script.is_file(), "driver script {} is missing", script.display());

    let bazel = find_bazel();
    assert!(
        bazel.is_some(),
        "bazel-4 (Debian's bazel-bootstrap, Bazel 4.2.3) is not installed, and this \
         end-to-end test needs it. Install it with `.ci/install-bazel.sh` \
         (as root: apt-get update && apt-get install -y bazel-bootstrap), \
         or point BAZEL at a Bazel 4.2.3 binary."
    );

    // The script bounds every wait itself (server start, each Bazel command,
    // server stop), so waiting for it here is bounded too.
    let output = Command::new("bash")
        .arg(&script)
        .arg(kiln)
        .output()
        .expect("failed to start bash to run tests/bazel/run-re.sh");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Captured by the test harness: shown when the test fails or with
    // `--nocapture`.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "tests/bazel/run-re.sh failed ({}): Bazel could not build and test through \
         kiln's remote execution; its diagnostics (Bazel output, kiln's log) are printed above",
        output.status
    );
    assert!(
        stdout.contains("every action ran through kiln's remote execution"),
        "tests/bazel/run-re.sh exited 0 without reporting its final check"
    );
}
