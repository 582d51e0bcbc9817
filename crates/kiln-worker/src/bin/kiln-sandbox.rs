//! The sandbox helper of the Kiln worker (see `kiln_worker::sandbox`).
//! Internal: started by the worker, not by people. A leading
//! `sandbox-helper` argument is skipped, so this binary also stands in for
//! a multi-call binary's `sandbox-helper` sub-command.

fn main() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "sandbox-helper") {
        args.remove(0);
    }
    std::process::exit(kiln_worker::helper_main(args));
}
