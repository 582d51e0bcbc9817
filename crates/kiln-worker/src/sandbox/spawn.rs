//! Starting an action's command from its init with `posix_spawn`, in a
//! clean state: an empty signal mask and every signal at its default
//! disposition (init keeps SIGCHLD and SIGTERM blocked, and signals the
//! worker's environment ignores must not stay ignored: a command whose
//! SIGTERM is blocked or ignored would only die by SIGKILL after the grace
//! period), standard input from /dev/null, stdout and stderr on the
//! action's memory files. Every other descriptor of init is close-on-exec.
//!
//! The program is resolved like a shell would: a name with a `/` is a
//! path (relative to the working directory, which init has entered);
//! otherwise it is looked up in the action's own `PATH` (the default
//! `/bin:/usr/bin` when it sets none), the first executable file wins.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{AccessFlags, Pid, access};

/// The search path when the action sets no `PATH` (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Why the command could not start: the exit code a shell would report
/// (127 not found, 126 not executable) and a message for its stderr.
#[derive(Debug)]
pub struct SpawnFailure {
    pub code: i32,
    pub message: String,
}

fn failure(code: i32, message: String) -> SpawnFailure {
    SpawnFailure { code, message }
}

/// Where `program` is, per the module documentation.
fn resolve(program: &str, env: &[(&str, &str)]) -> Result<PathBuf, SpawnFailure> {
    if program.is_empty() {
        return Err(failure(127, "the command is empty".into()));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "PATH")
        .map(|(_, v)| *v)
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        // An empty entry means the working directory.
        let candidate = if dir.is_empty() {
            PathBuf::from(program)
        } else {
            Path::new(dir).join(program)
        };
        if candidate.is_file() && access(&candidate, AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
    }
    Err(failure(127, format!("{program:?} not found in PATH {path:?}")))
}

fn c_string(s: &str, what: &str) -> Result<CString, SpawnFailure> {
    CString::new(s).map_err(|_| failure(126, format!("{what} contains a NUL byte")))
}

/// Starts the command; `new_group` puts it in a process group of its own
/// (unsandboxed mode, where the group is what gets killed).
pub fn spawn(
    argv: &[String],
    env: &[(&str, &str)],
    stdout: &OwnedFd,
    stderr: &OwnedFd,
    new_group: bool,
) -> Result<Pid, SpawnFailure> {
    let Some(program) = argv.first() else {
        return Err(failure(127, "no command given".into()));
    };
    let path = resolve(program, env)?;
    let args = argv
        .iter()
        .map(|a| c_string(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| c_string(&format!("{k}={v}"), "an environment variable"))
        .collect::<Result<Vec<_>, _>>()?;
    let setup = |e: Errno| failure(126, format!("preparing to start the command: {e}"));

    // Close-on-exec: only its duplicate on fd 0 reaches the command.
    let devnull =
        std::fs::File::open("/dev/null").map_err(|e| failure(126, format!("opening /dev/null: {e}")))?;
    let mut actions = PosixSpawnFileActions::init().map_err(setup)?;
    actions.add_dup2(devnull.as_raw_fd(), 0).map_err(setup)?;
    actions.add_dup2(stdout.as_raw_fd(), 1).map_err(setup)?;
    actions.add_dup2(stderr.as_raw_fd(), 2).map_err(setup)?;

    let mut attr = PosixSpawnAttr::init().map_err(setup)?;
    let mut defaults = SigSet::all();
    defaults.remove(Signal::SIGKILL);
    defaults.remove(Signal::SIGSTOP);
    attr.set_sigdefault(&defaults).map_err(setup)?;
    attr.set_sigmask(&SigSet::empty()).map_err(setup)?;
    let mut flags = PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF;
    if new_group {
        attr.set_pgroup(Pid::from_raw(0)).map_err(setup)?;
        flags |= PosixSpawnFlags::POSIX_SPAWN_SETPGROUP;
    }
    attr.set_flags(flags).map_err(setup)?;

    posix_spawn(path.as_os_str().as_bytes(), &actions, &attr, &args, &envp).map_err(|e| {
        let code = if e == Errno::ENOENT { 127 } else { 126 };
        failure(code, format!("cannot execute {program:?}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_follows_the_actions_path() {
        assert_eq!(resolve("/bin/sh", &[]).unwrap(), PathBuf::from("/bin/sh"));
        assert_eq!(resolve("./x", &[]).unwrap(), PathBuf::from("./x"));
        assert_eq!(resolve("sh", &[]).unwrap(), PathBuf::from("/bin/sh"));
        assert_eq!(
            resolve("sh", &[("PATH", "/nonexistent:/usr/bin")]).unwrap(),
            PathBuf::from("/usr/bin/sh")
        );
        let e = resolve("sh", &[("PATH", "/nonexistent")]).unwrap_err();
        assert_eq!(e.code, 127);
        assert_eq!(resolve("", &[]).unwrap_err().code, 127);
    }
}
