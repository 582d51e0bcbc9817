//! A real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3, run as `bazel-4`)
//! uses the kiln binary as its remote cache: tests/bazel/run.sh builds and
//! tests a small offline workspace twice, from two fresh output bases, and
//! requires every action of the second run to be a remote cache hit with
//! byte-identical outputs.
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
fn bazel_builds_and_tests_from_kiln_remote_cache() {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bazel/run.sh");
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
        .expect("failed to start bash to run tests/bazel/run.sh");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Captured by the test harness: shown when the test fails or with
    // `--nocapture`.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "tests/bazel/run.sh failed ({}): Bazel could not use kiln as its remote cache; \
         its diagnostics are printed above",
        output.status
    );
    assert!(
        stdout.contains("every action a remote cache hit"),
        "tests/bazel/run.sh exited 0 without reporting its final check"
    );
}
