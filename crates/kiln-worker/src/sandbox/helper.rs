//! The sandbox helper's entry point: the program (`kiln-sandbox`, or the
//! `kiln` binary's helper sub-command calling [`helper_main`]) the worker
//! starts once per slot as that slot's zygote ([`super::zygote`]). It is a
//! separate, single-threaded process because `unshare(CLONE_NEWUSER)`
//! needs a single-threaded caller, which the worker is not, and because
//! cloning a process is only sound in a single-threaded one.
//!
//! Usage (internal to Kiln; may change between versions):
//! `zygote [--uid U --gid G] --root DIR [--hide DIR]... [--tmpfs DIR]...
//! [--hostname NAME] [--tmpfs-size BYTES] [--network] [--no-namespaces]`, with a Unix stream
//! socket as standard input.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid};

use super::errno;
use super::zygote::{ZygoteOptions, zygote_main};

/// Exit code of the helper when it could not set the sandbox up.
pub const SETUP_FAILED: i32 = 125;

/// Entry point: `args` are the arguments after the program (and after any
/// sub-command prefix), starting with the mode. Returns the exit code.
pub fn helper_main(args: Vec<OsString>) -> i32 {
    let args: Vec<String> = match args.into_iter().map(|a| a.into_string()).collect() {
        Ok(a) => a,
        Err(_) => return fail("arguments must be UTF-8"),
    };
    let Some((mode, rest)) = args.split_first() else {
        return fail("usage: kiln-sandbox zygote ...");
    };
    let r = match mode.as_str() {
        "zygote" => parse(rest).and_then(|o| zygote_main(&o)),
        other => Err(format!("unknown mode {other:?}")),
    };
    match r {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "kiln-sandbox: {msg}");
    SETUP_FAILED
}

fn parse(args: &[String]) -> Result<ZygoteOptions, String> {
    let mut o = ZygoteOptions {
        uid: None,
        gid: None,
        root: PathBuf::new(),
        hide: Vec::new(),
        tmpfs: Vec::new(),
        hostname: None,
        network: false,
        namespaces: true,
        tmpfs_size: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--network" => {
                o.network = true;
                continue;
            }
            "--no-namespaces" => {
                o.namespaces = false;
                continue;
            }
            _ => {}
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?.clone();
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--uid" => o.uid = Some(num(&value)?),
            "--gid" => o.gid = Some(num(&value)?),
            "--root" => o.root = value.into(),
            "--hide" => o.hide.push(value.into()),
            "--tmpfs" => o.tmpfs.push(value.into()),
            "--hostname" => o.hostname = Some(value),
            "--tmpfs-size" => {
                o.tmpfs_size = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("--tmpfs-size: {value:?} is not a number"))?,
                )
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.root.as_os_str().is_empty() {
        return Err("zygote needs --root".into());
    }
    Ok(o)
}

/// Root drops to the sandbox user before creating the user namespace, so
/// that it is owned by that user and nothing an action does can act as
/// root on the host's files.
pub(super) fn drop_privileges(uid: Option<u32>, gid: Option<u32>) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let (Some(uid), Some(gid)) = (uid, gid) else {
        return Err("running as root needs --uid and --gid".into());
    };
    if uid == 0 || gid == 0 {
        return Err("refusing to run actions as root (uid/gid 0)".into());
    }
    nix::unistd::setgroups(&[]).map_err(errno("setgroups"))?;
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(errno("setresgid"))?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(errno("setresuid"))?;
    // A uid change makes the process non-dumpable, which hands its /proc
    // files to root: we could no longer write our own uid_map.
    nix::sys::prctl::set_dumpable(true).map_err(errno("prctl(PR_SET_DUMPABLE)"))?;
    Ok(())
}

/// Creates a user namespace (plus the namespaces in `extra`) mapping our
/// own unprivileged ids to themselves: actions are not root inside, so
/// they get no capabilities when they exec.
pub(super) fn new_user_namespace(extra: CloneFlags) -> Result<(), String> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    unshare(CloneFlags::CLONE_NEWUSER | extra).map_err(errno("unshare(user namespace)"))?;
    std::fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("writing setgroups: {e}"))?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))
        .map_err(|e| format!("writing uid_map: {e}"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
        .map_err(|e| format!("writing gid_map: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zygote_args_parse() {
        let o = parse(
            &[
                "--uid",
                "5",
                "--gid",
                "6",
                "--root",
                "/w/s0/root",
                "--tmpfs",
                "/tmp",
                "--hide",
                "/w",
                "--network",
                "--hostname",
                "h",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!((o.uid, o.gid), (Some(5), Some(6)));
        assert_eq!(o.root, PathBuf::from("/w/s0/root"));
        assert!(o.network && o.namespaces);
        assert_eq!(o.hostname.as_deref(), Some("h"));
        assert!(parse(&["--uid".to_string()]).is_err());
        assert!(parse(&["--bogus".to_string(), "1".to_string()]).is_err());
        assert!(
            parse(&["--uid".to_string(), "1".to_string()]).is_err(),
            "--root is required"
        );
    }
}
