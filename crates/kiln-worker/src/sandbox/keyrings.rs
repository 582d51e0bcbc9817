//! Kernel keyrings: the one piece of kernel state an unprivileged action
//! can leave behind that is tied to neither its processes nor its files.
//! A slot's actions share its user namespace, hence its user keyrings, and
//! a process's session keyring is inherited from the worker. So the
//! zygote gives the slot a session keyring of its own at start, and
//! clears the slot's session, user and user-session keyrings after every
//! action: nothing an action stores there reaches the next one, or the
//! worker.

use nix::errno::Errno;

const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
const KEYCTL_CLEAR: libc::c_long = 7;
const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
const KEY_SPEC_USER_SESSION_KEYRING: libc::c_long = -5;

/// `keyctl(2)` with integer arguments only.
fn keyctl(op: libc::c_long, arg: libc::c_long) -> Result<(), Errno> {
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a null name and
    // KEYCTL_CLEAR with a keyring id take no pointer the kernel would read
    // or write (the second argument is 0 or an integer id); the call has
    // no effect on this process's memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            op,
            arg,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Gives this process (and the actions it clones) a new, anonymous
/// session keyring instead of the worker's.
pub fn join_new_session() -> Result<(), String> {
    keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0).map_err(|e| format!("keyctl(JOIN_SESSION_KEYRING): {e}"))
}

/// Empties the session, user and user-session keyrings (a keyring that
/// does not exist, or keyrings the kernel does not support, are fine).
pub fn clear() -> Result<(), String> {
    for (id, name) in [
        (KEY_SPEC_SESSION_KEYRING, "session"),
        (KEY_SPEC_USER_KEYRING, "user"),
        (KEY_SPEC_USER_SESSION_KEYRING, "user-session"),
    ] {
        match keyctl(KEYCTL_CLEAR, id) {
            Ok(()) | Err(Errno::ENOKEY) | Err(Errno::ENOSYS) | Err(Errno::EOPNOTSUPP) => {}
            Err(e) => return Err(format!("clearing the {name} keyring: {e}")),
        }
    }
    Ok(())
}
