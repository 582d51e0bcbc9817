//! A real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3, run as `bazel-4`)
//! against the kiln binary, through two driver scripts:
//!
//! * tests/bazel/run.sh: Bazel uses kiln as its remote cache. It builds and
//!   tests a small offline workspace twice, from two fresh output bases, and
//!   requires every action of the second run to be a remote cache hit with
//!   byte-identical outputs.
//! * tests/bazel/run-re.sh: Bazel builds and tests a generated C++ workspace
//!   (60 layered cc_library targets, cc_binary, cc_test and genrule targets)
//!   through kiln's remote execution (embedded default: CAS, AC, scheduler
//!   and an in-process sandboxed worker). Every spawn must run on kiln
//!   (`--spawn_strategy=remote`), the tests must pass and the outputs be
//!   right; a second build from a fresh output base must be served entirely
//!   from the cache with byte-identical outputs; a failing test is never
//!   cached, a test over its timeout is reported TIMEOUT and killed, and
//!   kiln shuts down cleanly.
//!
//! Bazel is required, not optional: CI installs it with
//! `.ci/install-bazel.sh`. Without it these tests fail and say how to
//! install it. `BAZEL` may name another Bazel 4.2.3 binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The two scripts each keep 2 cores busy: run them one after the other.
static ONE_BAZEL_AT_A_TIME: Mutex<()> = Mutex::new(());

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

/// Runs `tests/bazel/SCRIPT KILN_BIN` and requires it to succeed and to
/// print `final_check` (its last assertion passed).
fn run_driver(script: &str, final_check: &str, what: &str) {
    let _one = ONE_BAZEL_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/bazel")
        .join(script);
    assert!(path.is_file(), "driver script {} is missing", path.display());
    assert!(
        find_bazel().is_some(),
        "bazel-4 (Debian's bazel-bootstrap, Bazel 4.2.3) is not installed, and this \
         end-to-end test needs it. Install it with `.ci/install-bazel.sh` \
         (as root: apt-get update && apt-get install -y bazel-bootstrap), \
         or point BAZEL at a Bazel 4.2.3 binary."
    );
    // The script bounds every wait itself (server start, each Bazel command,
    // server stop), so waiting for it here is bounded too.
    let output = Command::new("bash")
        .arg(&path)
        .arg(kiln)
        .output()
        .unwrap_or_else(|e| panic!("failed to start bash to run tests/bazel/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Captured by the test harness: shown on failure or with `--nocapture`.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "tests/bazel/{script} failed ({}): {what}; its diagnostics (Bazel output, kiln's log) \
         are printed above",
        output.status
    );
    assert!(
        stdout.contains(final_check),
        "tests/bazel/{script} exited 0 without reporting its final check"
    );
}

#[test]
fn bazel_builds_and_tests_from_kiln_remote_cache() {
    run_driver(
        "run.sh",
        "every action a remote cache hit",
        "Bazel could not use kiln as its remote cache",
    );
}

#[test]
fn bazel_builds_and_tests_through_kiln_remote_execution() {
    run_driver(
        "run-re.sh",
        "every action ran through kiln's remote execution",
        "Bazel could not build and test through kiln's remote execution",
    );
}
