//! Kiln's client commands: `kiln cas`, `kiln ac`, `kiln exec` and
//! `kiln status`. They speak plain REAPI v2 (Capabilities, CAS,
//! ByteStream, Action Cache, Execution) and work against any compliant
//! server, Kiln or not.
//!
//! The `kiln` binary embeds [`ClientCommand`] as sub-commands and
//! [`ClientOptions`] as global options, and calls [`run`].
//!
//! # Commands
//!
//! - `kiln cas put FILE|DIR` uploads a file, or a directory as its Merkle
//!   tree of Directory messages, and prints the digest (`hash/size`; for a
//!   directory the root Directory's digest).
//! - `kiln cas get DIGEST [-o PATH]` writes a blob to stdout or PATH;
//!   `kiln cas get --dir DIGEST -o PATH` restores a whole directory tree.
//! - `kiln cas missing DIGEST...` prints the digests the server lacks.
//! - `kiln ac get DIGEST` pretty-prints an ActionResult.
//! - `kiln exec [OPTIONS] -- CMD ARGS...` runs a command remotely.
//! - `kiln status` prints the server's capabilities.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success (`exec`: the remote command exited 0) |
//! | 1 | a defined negative answer: blob or action result not found, `cas missing` found missing blobs |
//! | 2 | usage error, bad input (an invalid digest, an unreadable path) or a local file problem |
//! | 3 | the server is unreachable (within 5 s), an RPC failed, or the server sent invalid data |
//! | 4 | `exec` only: the server could not run the action to completion (no execution support, timeout, no suitable worker, invalid action, ...) |
//! | other | `exec` only: the remote command's own exit code (0-255; larger values become 255) |
//!
//! For `exec`, codes 1-4 are ambiguous with the command's own exit codes;
//! every failure of the client or the server prints one line starting
//! with `kiln:` on stderr, and a command's own exit is reported on stderr
//! as `kiln exec: COMPLETED (exit code N ...)`.

pub mod console;
pub mod error;
pub mod fetch;
pub mod format;
pub mod progress;
pub mod remote;
pub mod tree;
pub mod upload;

mod ac_cmd;
mod cas_cmd;
mod exec_cmd;
mod status_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kiln_digest::DigestFunction;

pub use console::{Captured, Console};
pub use error::{
    ClientError, ClientResult, EXIT_EXECUTION, EXIT_NOT_FOUND, EXIT_OK, EXIT_SERVER, EXIT_USAGE,
};
pub use remote::Remote;

/// The default server endpoint.
pub const DEFAULT_ENDPOINT: &str = "grpc://127.0.0.1:50051";

/// Options shared by every client command (usable before or after the
/// sub-command).
#[derive(clap::Args, Debug, Clone)]
pub struct ClientOptions {
    /// Server endpoint: grpc://HOST:PORT, http://HOST:PORT or HOST:PORT.
    #[arg(long, global = true, env = "KILN_ENDPOINT", default_value = DEFAULT_ENDPOINT, help_heading = "Server options")]
    pub endpoint: String,
    /// REAPI instance name ("" is the unnamed instance).
    #[arg(
        long,
        global = true,
        env = "KILN_INSTANCE",
        default_value = "",
        help_heading = "Server options"
    )]
    pub instance: String,
    /// Digest function: sha256, sha1, md5, sha384, sha512, blake3 or gitsha1.
    #[arg(
        long,
        global = true,
        default_value = "sha256",
        value_parser = parse_digest_function,
        help_heading = "Server options"
    )]
    pub digest_function: DigestFunction,
}

impl ClientOptions {
    /// Options for `endpoint`, the unnamed instance and SHA-256.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientOptions {
            endpoint: endpoint.into(),
            instance: String::new(),
            digest_function: DigestFunction::Sha256,
        }
    }
}

fn parse_digest_function(s: &str) -> Result<DigestFunction, String> {
    DigestFunction::from_name(&s.to_ascii_lowercase()).ok_or_else(|| {
        let names: Vec<&str> = DigestFunction::ALL.iter().map(|f| f.name()).collect();
        format!(
            "unknown digest function {s:?}; expected one of {}",
            names.join(", ")
        )
    })
}

/// The client sub-commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Content-addressable storage: upload, download and check blobs.
    #[command(subcommand)]
    Cas(CasCommand),
    /// Action cache: look up action results.
    #[command(subcommand)]
    Ac(AcCommand),
    /// Run a command remotely (REAPI Execute) and fetch its outputs.
    Exec(ExecArgs),
    /// Show what the server supports (its REAPI capabilities).
    Status(StatusArgs),
}

/// `kiln cas ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum CasCommand {
    /// Upload a file or a directory tree; prints its digest (HASH/SIZE).
    Put {
        /// File or directory to upload. For a directory the printed digest
        /// is the root Directory message's.
        path: PathBuf,
    },
    /// Download a blob (to stdout or -o PATH), or with --dir a directory tree.
    Get {
        /// Digest as HASH/SIZE.
        digest: String,
        /// Where to write (default stdout). Required with --dir: a
        /// directory that does not exist yet or is empty.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// DIGEST is a Directory: restore the whole tree into -o PATH.
        #[arg(long)]
        dir: bool,
    },
    /// Print which of the digests the server lacks (exit 1 if any).
    Missing {
        /// Digests as HASH/SIZE.
        #[arg(required = true)]
        digests: Vec<String>,
    },
}

/// `kiln ac ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AcCommand {
    /// Print the ActionResult cached for an Action digest (exit 1 if none).
    Get {
        /// Action digest as HASH/SIZE.
        digest: String,
    },
}

/// `kiln exec ...`
#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {
    /// Platform property NAME=VALUE the worker must offer (repeatable).
    #[arg(long = "platform", value_name = "NAME=VALUE")]
    pub platform: Vec<String>,
    /// Environment variable NAME=VALUE of the command (repeatable). The
    /// command gets no other environment.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Directory uploaded as the input root; the command runs in it.
    #[arg(long, default_value = ".")]
    pub input_root: PathBuf,
    /// Output path (file or directory, relative to the input root) to
    /// download after the command ran (repeatable).
    #[arg(long = "output", value_name = "PATH")]
    pub outputs: Vec<String>,
    /// Where outputs are written (default: the input root).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Timeout of the action, e.g. 60s or 10m (default: the server's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Neither use nor store a cached result.
    #[arg(long)]
    pub no_cache: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `kiln status`
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StatusArgs {}

/// Runs a client command with the process's stdout and stderr and
/// returns the exit code (see the crate documentation).
pub async fn run(cmd: ClientCommand, opts: ClientOptions) -> ExitCode {
    let mut console = Console::stdio();
    ExitCode::from(run_with(cmd, opts, &mut console).await)
}

/// Runs a client command writing to `console`; returns the exit code.
/// Errors are reported on the console's stderr as one `kiln: ...` line.
pub async fn run_with(cmd: ClientCommand, opts: ClientOptions, console: &mut Console) -> u8 {
    let result = dispatch(cmd, &opts, console).await;
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let _ = console.eline(&format!("kiln: {e}")).await;
            e.exit_code()
        }
    };
    console.flush().await;
    code
}

async fn dispatch(cmd: ClientCommand, opts: &ClientOptions, console: &mut Console) -> ClientResult<u8> {
    match cmd {
        ClientCommand::Cas(c) => cas_cmd::run(c, opts, console).await,
        ClientCommand::Ac(c) => ac_cmd::run(c, opts, console).await,
        ClientCommand::Exec(a) => exec_cmd::run(a, opts, console).await,
        ClientCommand::Status(_) => status_cmd::run(opts, console).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
        #[command(flatten)]
        opts: ClientOptions,
    }

    #[test]
    fn global_options_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "kiln",
            "cas",
            "put",
            "f",
            "--endpoint",
            "host:1",
            "--instance",
            "main",
            "--digest-function",
            "blake3",
        ])
        .unwrap();
        assert_eq!(cli.opts.endpoint, "host:1");
        assert_eq!(cli.opts.instance, "main");
        assert_eq!(cli.opts.digest_function, DigestFunction::Blake3);
        assert!(matches!(cli.cmd, ClientCommand::Cas(CasCommand::Put { .. })));
        assert!(Cli::try_parse_from(["kiln", "status", "--digest-function", "nope"]).is_err());
    }

    #[test]
    fn exec_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "kiln",
            "exec",
            "--platform",
            "OSFamily=Linux",
            "--output",
            "out",
            "--timeout",
            "90s",
            "--",
            "sh",
            "-c",
            "echo hi > out",
        ])
        .unwrap();
        let ClientCommand::Exec(a) = cli.cmd else { panic!() };
        assert_eq!(a.command, ["sh", "-c", "echo hi > out"]);
        assert_eq!(a.outputs, ["out"]);
        assert_eq!(a.timeout, Some(Duration::from_secs(90)));
        assert_eq!(cli.opts.endpoint, DEFAULT_ENDPOINT);
    }
}
