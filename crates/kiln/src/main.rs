//! `kiln`: the command-line entry point.
//!
//! `kiln` with no arguments serves the embedded default configuration (an
//! all-in-one cache on 127.0.0.1:50051 with disk stores under the data
//! directory). `kiln serve --config FILE` serves a config file;
//! `kiln check-config FILE` validates one without starting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kiln_server::config;
use kiln_server::telemetry::{self, Telemetry, TelemetryOptions};
use kiln_server::{Overrides, start};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Remote build cache and remote execution speaking Bazel's Remote Execution API v2"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, `kiln` serves (same flags as `kiln serve`).
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    client: kiln_client::ClientOptions,
}

#[derive(clap::Args, Clone)]
struct LogArgs {
    /// Log filter in tracing EnvFilter syntax, e.g. "debug", or
    /// "info,kiln::grpc=debug" to put every gRPC call's method and
    /// RequestMetadata on the log lines it causes. Default: the KILN_LOG
    /// environment variable, else RUST_LOG, else "info".
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format: human-readable lines or one JSON object per line (both
    /// carry the fields of the enclosing spans, e.g. a gRPC call's method
    /// and RequestMetadata).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a configuration (the embedded default without --config).
    Serve(ServeArgs),
    /// Validate a configuration file without starting.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    #[command(flatten)]
    Client(kiln_client::ClientCommand),
    /// Run a remote execution worker that takes work from a scheduler.
    Worker(WorkerArgs),
    /// Internal: the sandbox helper the worker executes for every action.
    #[command(hide = true)]
    SandboxHelper {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Print the configuration reference (Markdown), generated from the config types.
    ConfigReference,
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// Scheduler endpoint, e.g. grpc://127.0.0.1:50051 (also http://).
    #[arg(long)]
    scheduler: String,
    /// CAS endpoint; defaults to the scheduler's.
    #[arg(long)]
    cas: Option<String>,
    /// Worker configuration (TOML: the keys of a `[[workers]]` table).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base directory for the worker's work and cache directories
    /// (overrides relative paths in the config). Default: ./kiln-worker.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Slots (actions at once), overriding the config. Default: cores.
    #[arg(long)]
    slots: Option<u32>,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Configuration file (TOML). Without it, the embedded default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address, overriding the config (port 0 picks a free one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP listen address, overriding the config.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Data directory for disk stores with relative paths, overriding the config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Installs logging (and OTLP export when an endpoint is configured: the
/// config's `otlp_endpoint` or the OTEL_EXPORTER_OTLP_* variables). The
/// guard flushes exported spans when dropped.
fn init_logging(args: &LogArgs, otlp_endpoint: Option<String>) -> Result<Telemetry, ExitCode> {
    let options = TelemetryOptions {
        filter: args.log_level.clone(),
        format: match args.log_format {
            LogFormat::Human => telemetry::LogFormat::Human,
            LogFormat::Json => telemetry::LogFormat::Json,
        },
        otlp_endpoint,
    };
    telemetry::init(&options).map_err(|e| {
        eprintln!("kiln: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    // The sandbox helper must run before any thread exists (it creates
    // user namespaces), so it is dispatched before clap and the runtime.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "sandbox-helper") {
        let code = kiln_worker::helper_main(argv[2..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::CheckConfig { file } => match config::load_file(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} stores, {} instances)",
                    file.display(),
                    c.stores.len(),
                    c.instances.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::ConfigReference => {
            print!("{}", config::reference_markdown());
            ExitCode::SUCCESS
        }
        Command::DefaultConfig => {
            print!("{}", config::default_config_text());
            ExitCode::SUCCESS
        }
        Command::SandboxHelper { args } => {
            ExitCode::from(u8::try_from(kiln_worker::helper_main(args)).unwrap_or(1))
        }
        Command::Serve(args) => {
            let cfg = match load_config(&args) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _telemetry = match init_logging(&cli.log, cfg.server.otlp_endpoint.clone()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match runtime() {
                // The runtime is dropped before the telemetry guard, which
                // then flushes the spans of the whole run.
                Some(rt) => rt.block_on(serve(cfg, args)),
                None => ExitCode::FAILURE,
            }
        }
        Command::Client(cmd) => match runtime() {
            Some(rt) => rt.block_on(kiln_client::run(cmd, cli.client)),
            None => ExitCode::FAILURE,
        },
        Command::Worker(args) => {
            let _telemetry = match init_logging(&cli.log, None) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match runtime() {
                Some(rt) => rt.block_on(worker(args)),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            None
        }
    }
}

/// The sandbox helper is this very binary: `/proc/self/exe`, so that a
/// zygote restarted after the file was replaced (a package upgrade) runs
/// the same version as the worker that speaks to it.
fn self_helper() -> Option<Vec<String>> {
    Some(vec![
        kiln_worker::sandbox::SELF_EXE.into(),
        "sandbox-helper".into(),
    ])
}

fn endpoint(url: &str) -> Result<tonic::transport::Channel, String> {
    let url = url
        .strip_prefix("grpc://")
        .map(|rest| format!("http://{rest}"))
        .unwrap_or_else(|| url.to_string());
    let ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| format!("bad endpoint {url:?}: {e}"))?;
    Ok(ep
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .connect_lazy())
}

async fn worker(args: WorkerArgs) -> ExitCode {
    let mut wc: kiln_worker::WorkerConfig = match &args.config {
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("kiln: cannot read {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            };
            match toml::from_str(&text) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kiln: {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        }
        None => kiln_worker::WorkerConfig::with_base_dir("kiln-worker"),
    };
    if let Some(dir) = &args.dir {
        wc.work_dir = dir.join(&wc.work_dir);
        wc.cache_dir = dir.join(&wc.cache_dir);
    }
    if args.slots.is_some() {
        wc.slots = args.slots;
    }
    if wc.sandbox.helper.is_empty() {
        wc.sandbox.helper = self_helper().unwrap_or_default();
    }
    if let Err(e) = wc.validate() {
        eprintln!("kiln: worker config: {e}");
        return ExitCode::from(2);
    }
    let scheduler = match endpoint(&args.scheduler) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(2);
        }
    };
    let cas = match args
        .cas
        .as_deref()
        .map(endpoint)
        .unwrap_or_else(|| Ok(scheduler.clone()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(2);
        }
    };
    match kiln_worker::run_worker(wc, scheduler, cas, wait_for_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The config to serve: `--config FILE` or the embedded default.
fn load_config(args: &ServeArgs) -> Result<config::Config, ExitCode> {
    let loaded = match &args.config {
        Some(path) => config::load_file(path),
        None => config::parse(config::default_config_text(), "embedded default config"),
    };
    loaded.map_err(|e| {
        eprintln!("kiln: {e}");
        ExitCode::from(2)
    })
}

async fn serve(cfg: config::Config, args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        http_listen: args.http_listen,
        data_dir: args.data_dir,
        sandbox_helper: self_helper(),
    };
    let dashboard = cfg.server.dashboard;
    let server = match start(cfg, overrides).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::FAILURE;
        }
    };
    banner(&format!("kiln: data directory {}", server.data_dir.display()));
    banner(&format!("kiln: grpc listening on {}", server.grpc_addr));
    banner(&format!("kiln: http listening on {}", server.http_addr));
    if dashboard {
        banner(&format!("kiln: dashboard http://{}/", server.http_addr));
    }
    let mut names: Vec<String> = server.instances.iter().map(|i| i.name.clone()).collect();
    names.sort();
    for name in names {
        let instance = if name.is_empty() {
            String::new()
        } else {
            format!(" --remote_instance_name={name}")
        };
        let flag = if server.scheduler.is_some() {
            "--remote_executor"
        } else {
            "--remote_cache"
        };
        banner(&format!(
            "kiln: bazel flags: {flag}=grpc://{}{instance}",
            server.grpc_addr
        ));
    }
    wait_for_signal().await;
    eprintln!("kiln: shutting down");
    server.shutdown();
    // In-process workers drain first (up to their drain_timeout), then the
    // listeners finish in-flight calls.
    let budget = server.stop_budget();
    match tokio::time::timeout(budget, server.wait()).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "kiln: workers and in-flight calls did not finish within {} s; exiting",
                budget.as_secs()
            );
            ExitCode::FAILURE
        }
    }
}

/// Prints a start-up line. A closed or broken standard output (a
/// supervisor that stopped reading) must not take the server down, so
/// write errors are ignored.
fn banner(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
