//! The sandbox helper of the Kiln worker (see `kiln_worker::sandbox`).
//! Internal: started by the worker, not by people.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::exit(kiln_worker::helper_main(args));
}
