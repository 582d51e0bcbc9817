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
use kiln_server::{Overrides, start};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Remote build cache speaking Bazel's Remote Execution API v2",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, `kiln` serves (same flags as `kiln serve`).
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(clap::Args, Clone)]
struct LogArgs {
    /// Log filter (tracing EnvFilter syntax); default from KILN_LOG or "info".
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format.
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
    /// Print the configuration reference (Markdown), generated from the config types.
    ConfigReference,
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

fn init_logging(args: &LogArgs) {
    let filter = args
        .log_level
        .clone()
        .or_else(|| std::env::var("KILN_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
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
        Command::Serve(args) => {
            init_logging(&cli.log);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("kiln: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(args))
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let loaded = match &args.config {
        Some(path) => config::load_file(path),
        None => config::parse(config::default_config_text(), "embedded default config"),
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(2);
        }
    };
    let overrides = Overrides {
        listen: args.listen,
        http_listen: args.http_listen,
        data_dir: args.data_dir,
    };
    let server = match start(cfg, overrides).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("kiln: data directory {}", server.data_dir.display());
    println!("kiln: grpc listening on {}", server.grpc_addr);
    println!("kiln: http listening on {}", server.http_addr);
    let mut names: Vec<String> = server.instances.iter().map(|i| i.name.clone()).collect();
    names.sort();
    for name in names {
        let instance = if name.is_empty() {
            String::new()
        } else {
            format!(" --remote_instance_name={name}")
        };
        println!(
            "kiln: bazel flags: --remote_cache=grpc://{}{instance} --remote_upload_local_results",
            server.grpc_addr
        );
    }
    wait_for_signal().await;
    eprintln!("kiln: shutting down");
    server.shutdown();
    match tokio::time::timeout(std::time::Duration::from_secs(30), server.wait()).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("kiln: in-flight calls did not finish within 30 s; exiting");
            ExitCode::FAILURE
        }
    }
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
