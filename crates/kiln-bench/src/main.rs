//! kiln-bench: drives a running REAPI server (Kiln or any other) over gRPC
//! and reports throughput, latency, and the server's CPU time per item and
//! memory, beside reference figures. See docs/benchmarks.md.

mod ac_hit;
mod batch_read;
mod batch_update;
mod bs_read;
mod bs_write;
mod client;
mod error;
mod exec;
mod exec_cache_hit;
mod exec_mixed;
mod exec_noop;
mod find_missing;
mod load;
mod memory;
mod procstat;
mod report;
mod startup;
mod stats;

use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::client::ConnSpec;
use crate::error::{BenchError, Result};
use crate::load::Meters;
use crate::procstat::ProcWatch;
use crate::report::ScenarioReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// GetActionResult hits on pre-populated ActionResults.
    AcHit,
    /// FindMissingBlobs, half of the digests present.
    FindMissing,
    /// BatchUpdateBlobs of fresh 4 KiB blobs.
    BatchUpdate,
    /// BatchReadBlobs of stored 4 KiB blobs.
    BatchRead,
    /// ByteStream.Write of 16 MiB blobs and one 256 MiB blob.
    BsWrite,
    /// ByteStream.Read of 16 MiB blobs, verified and not.
    BsRead,
    /// Server RSS per stored 4 KiB blob beyond its payload (fresh server!).
    Memory,
    /// Spawn --server-cmd and time until it answers.
    Startup,
    /// Uncached unique no-op actions executed end to end (concurrency 8).
    ExecNoop,
    /// Queue-to-start latency of no-op actions on idle workers (concurrency 1).
    ExecQueue,
    /// Execute of actions whose results are cached (concurrency 16).
    ExecCacheHit,
    /// Bazel-like mix: 80% AC hits, 20% misses uploaded and executed.
    ExecMixed,
    /// Every cache scenario (memory first; startup only with --server-cmd;
    /// the exec-* scenarios only when named).
    All,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::AcHit => "ac-hit",
            Scenario::FindMissing => "find-missing",
            Scenario::BatchUpdate => "batch-update",
            Scenario::BatchRead => "batch-read",
            Scenario::BsWrite => "bs-write",
            Scenario::BsRead => "bs-read",
            Scenario::Memory => "memory",
            Scenario::Startup => "startup",
            Scenario::ExecNoop => "exec-noop",
            Scenario::ExecQueue => "exec-queue",
            Scenario::ExecCacheHit => "exec-cache-hit",
            Scenario::ExecMixed => "exec-mixed",
            Scenario::All => "all",
        }
    }
}

/// Benchmark a running REAPI server.
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-bench", version)]
pub struct Args {
    /// gRPC endpoint of the server under test.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// PID of the server process, for CPU (/proc/PID/stat) and RSS accounting.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Length of each timed phase.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Upper bound on operations in each timed phase.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_ops: u64,
    /// Scenarios to run (repeatable, or comma-separated).
    #[arg(long = "scenario", value_enum, value_delimiter = ',', default_value = "all")]
    pub scenarios: Vec<Scenario>,
    /// Print the results as a markdown table.
    #[arg(long)]
    pub markdown: bool,
    /// Tokio worker threads of this client.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Concurrent workers per gRPC channel (TCP connection).
    #[arg(long, default_value_t = 4)]
    pub workers_per_connection: usize,
    /// HTTP/2 stream flow-control window the client advertises.
    #[arg(long, default_value = "2MiB", value_parser = parse_size)]
    pub h2_stream_window: u64,
    /// HTTP/2 connection flow-control window the client advertises.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub h2_conn_window: u64,
    /// Seed for blob contents (default: random, so reruns upload new blobs).
    #[arg(long)]
    pub seed: Option<u64>,

    /// ac-hit: ActionResults stored before the timed phase.
    #[arg(long, default_value_t = 1000)]
    pub ac_entries: usize,
    /// ac-hit: concurrent GetActionResult calls.
    #[arg(long, default_value_t = 32)]
    pub ac_concurrency: usize,

    /// find-missing: digests per FindMissingBlobs call (half present).
    #[arg(long, default_value_t = 1000)]
    pub fmb_digests_per_call: usize,
    /// find-missing: concurrent calls.
    #[arg(long, default_value_t = 16)]
    pub fmb_concurrency: usize,

    /// batch-update / batch-read: concurrent calls.
    #[arg(long, default_value_t = 16)]
    pub batch_concurrency: usize,
    /// batch-update / batch-read: most blobs per call (the server's
    /// max_batch_total_size_bytes may lower it).
    #[arg(long, default_value_t = 256)]
    pub batch_max_per_call: usize,
    /// batch-update / batch-read: blob size.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    pub batch_blob_size: u64,
    /// batch-update: fresh blobs prepared before timing (bounds the run).
    #[arg(long, default_value_t = 200_000)]
    pub batch_update_blobs: usize,
    /// batch-read: blobs stored before timing and read at random.
    #[arg(long, default_value_t = 16_384)]
    pub batch_read_blobs: usize,

    /// bs-write / bs-read: number of large blobs.
    #[arg(long, default_value_t = 16)]
    pub bs_blobs: usize,
    /// bs-write / bs-read: size of each large blob.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub bs_blob_size: u64,
    /// bs-write / bs-read: concurrent streams.
    #[arg(long, default_value_t = 4)]
    pub bs_concurrency: usize,
    /// bs-write: size of the single large stream (0 skips it).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub bs_single_size: u64,
    /// ByteStream.Write chunk (message) size. Bazel uses 16 KiB.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub chunk_size: u64,

    /// memory: 4 KiB blobs uploaded between the two RSS readings.
    #[arg(long, default_value_t = 200_000)]
    pub memory_blobs: u64,

    /// exec-noop / exec-queue / exec-mixed: unique actions prepared per
    /// phase (bounds the phase; upload happens before timing except in
    /// exec-mixed).
    #[arg(long, default_value_t = 10_000)]
    pub exec_actions: usize,
    /// exec-*: after the `done` Operation, `drain` reads the Execute stream
    /// to its end (as Bazel does); `drop` drops it at once (the client then
    /// cancels the stream with RST_STREAM).
    #[arg(long, value_enum, default_value = "drain")]
    pub exec_stream_end: StreamEnd,
    /// exec-noop: concurrent Execute calls.
    #[arg(long, default_value_t = 8)]
    pub exec_concurrency: usize,
    /// exec-queue: concurrent Execute calls (low, so workers are idle).
    #[arg(long, default_value_t = 1)]
    pub exec_queue_concurrency: usize,
    /// exec-cache-hit: concurrent Execute calls.
    #[arg(long, default_value_t = 16)]
    pub exec_hit_concurrency: usize,
    /// exec-cache-hit: actions executed once before timing, then Executed
    /// again at random.
    #[arg(long, default_value_t = 64)]
    pub exec_hit_actions: usize,
    /// exec-cache-hit: attach a RequestMetadata header to every Execute, as
    /// Bazel does (tool, invocation and correlated ids, mnemonic, target,
    /// action id), so the server's per-call decoding and logging is measured.
    #[arg(long)]
    pub request_metadata: bool,
    /// exec-mixed: concurrent simulated actions.
    #[arg(long, default_value_t = 16)]
    pub mixed_concurrency: usize,
    /// exec-mixed: percentage of simulated actions that miss and execute.
    #[arg(long, default_value_t = 20)]
    pub mixed_exec_percent: u32,

    /// startup: command that starts the server listening on --endpoint
    /// (run with `sh -c 'exec CMD'`).
    #[arg(long)]
    pub server_cmd: Option<String>,
    /// startup: timed starts.
    #[arg(long, default_value_t = 3)]
    pub startup_runs: usize,
    /// startup: give up on a start after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub startup_timeout: Duration,
    /// startup: first start the server once and store this many tiny blobs
    /// (through BatchUpdateBlobs), stop it, then time the starts.
    #[arg(long, default_value_t = 0)]
    pub populate: u64,
    /// startup: size of each populated blob.
    #[arg(long, default_value_t = 64)]
    pub populate_blob_size: usize,
    /// startup: most blobs per populate call.
    #[arg(long, default_value_t = 10_000)]
    pub populate_batch: usize,
}

/// What an Execute client does with the stream after the `done` Operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamEnd {
    /// Read on until the stream ends (trailers).
    Drain,
    /// Drop the stream at once.
    Drop,
}

/// Parses `4096`, `4KiB`, `16MiB`, `1GiB`, `64K`, `1M` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|e| format!("size {s:?}: {e}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))
}

/// What every scenario gets.
pub struct Ctx {
    pub args: Args,
    pub conn: ConnSpec,
    pub meters: Meters,
    pub seed: u64,
}

impl Ctx {
    pub fn spec(&self, concurrency: usize) -> load::Spec {
        load::Spec {
            concurrency,
            duration: self.args.duration,
            max_ops: self.args.max_ops,
        }
    }

    /// Server RSS now, if a server PID was given and readable.
    pub fn server_rss(&self) -> Option<u64> {
        self.meters.server.as_ref().and_then(|s| s.rss_bytes().ok())
    }

    /// Derives a seed for one use, so scenarios never share blobs.
    pub fn seed_for(&self, salt: &str) -> u64 {
        salt.bytes().fold(self.seed, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
        })
    }
}

/// The scenarios `all` stands for, in run order. `memory` goes first
/// because it needs a server whose allocator has not yet grown.
fn expand(selected: &[Scenario], has_server_cmd: bool) -> Vec<Scenario> {
    let mut out = Vec::new();
    for &s in selected {
        let add: Vec<Scenario> = if s == Scenario::All {
            let mut v = vec![
                Scenario::Memory,
                Scenario::AcHit,
                Scenario::FindMissing,
                Scenario::BatchUpdate,
                Scenario::BatchRead,
                Scenario::BsWrite,
                Scenario::BsRead,
            ];
            if has_server_cmd {
                v.push(Scenario::Startup);
            }
            v
        } else {
            vec![s]
        };
        for a in add {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

async fn run_one(ctx: &Ctx, s: Scenario) -> Result<ScenarioReport> {
    match s {
        Scenario::AcHit => ac_hit::run(ctx).await,
        Scenario::FindMissing => find_missing::run(ctx).await,
        Scenario::BatchUpdate => batch_update::run(ctx).await,
        Scenario::BatchRead => batch_read::run(ctx).await,
        Scenario::BsWrite => bs_write::run(ctx).await,
        Scenario::BsRead => bs_read::run(ctx).await,
        Scenario::Memory => memory::run(ctx).await,
        Scenario::Startup => startup::run(ctx).await,
        Scenario::ExecNoop => exec_noop::run(ctx).await,
        Scenario::ExecQueue => exec_noop::run_queue(ctx).await,
        Scenario::ExecCacheHit => exec_cache_hit::run(ctx).await,
        Scenario::ExecMixed => exec_mixed::run(ctx).await,
        Scenario::All => Err(BenchError::new("'all' is expanded before running")),
    }
}

async fn run_all(ctx: Ctx, command_line: String) -> Result<()> {
    let scenarios = expand(&ctx.args.scenarios, ctx.args.server_cmd.is_some());
    let mut reports = Vec::new();
    let rss0 = ctx.server_rss();
    for s in scenarios {
        eprintln!("kiln-bench: running {} ...", s.name());
        let report = match run_one(&ctx, s).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("kiln-bench: {} FAILED: {e}", s.name());
                let mut r = ScenarioReport::new(s.name());
                r.note(format!("FAILED: {e}"));
                r
            }
        };
        for n in &report.notes {
            eprintln!("kiln-bench:   {n}");
        }
        reports.push(report);
    }
    let rss1 = ctx.server_rss();

    let md = ctx.args.markdown;
    let mut out = String::new();
    if md {
        out.push_str(&format!("```\n{command_line}\n```\n\n"));
    } else {
        out.push_str(&format!("command: {command_line}\n"));
    }
    let mut env = vec![
        format!("endpoint {}", ctx.conn.url),
        format!(
            "client: {} tokio threads, {} workers per TCP connection, TCP_NODELAY on, h2 windows {}/{} bytes",
            ctx.args.client_threads, ctx.conn.workers_per_conn, ctx.conn.stream_window, ctx.conn.conn_window
        ),
        format!(
            "{} CPUs, CLK_TCK {}",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            procstat::clock_ticks_per_sec()
        ),
    ];
    if let (Some(a), Some(b)) = (rss0, rss1) {
        env.push(format!(
            "server RSS {:.1} MiB before, {:.1} MiB after",
            a as f64 / 1048576.0,
            b as f64 / 1048576.0
        ));
    } else if ctx.meters.server.is_none() {
        env.push("no --server-pid: server CPU and RSS not measured".into());
    }
    for e in env {
        out.push_str(&format!("{}{e}\n", if md { "- " } else { "" }));
    }
    out.push('\n');
    out.push_str(&report::render(&reports, md));
    print!("{out}");
    Ok(())
}

fn main() {
    let args = Args::parse();
    let command_line = report::shell_line(&std::env::args().collect::<Vec<_>>());
    let ticks = procstat::clock_ticks_per_sec();
    let meters = Meters {
        server: args.server_pid.map(|p| ProcWatch::pid(p, ticks)),
        client: ProcWatch::this_process(ticks),
    };
    if let Some(w) = &meters.server
        && let Err(e) = w.cpu()
    {
        eprintln!("kiln-bench: cannot read the server's CPU time: {e}");
        std::process::exit(2);
    }
    let conn = ConnSpec {
        url: args.endpoint.clone(),
        instance: args.instance.clone(),
        stream_window: args.h2_stream_window.min(u32::MAX as u64) as u32,
        conn_window: args.h2_conn_window.min(u32::MAX as u64) as u32,
        workers_per_conn: args.workers_per_connection.max(1),
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-bench: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let ctx = Ctx {
        args,
        conn,
        meters,
        seed,
    };
    if let Err(e) = runtime.block_on(run_all(ctx, command_line)) {
        eprintln!("kiln-bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn all_expands_in_order_without_duplicates() {
        let v = expand(&[Scenario::AcHit, Scenario::All], false);
        assert_eq!(v[0], Scenario::AcHit);
        assert_eq!(v.len(), 7);
        assert!(!v.contains(&Scenario::Startup));
        assert!(expand(&[Scenario::All], true).contains(&Scenario::Startup));
        assert_eq!(expand(&[Scenario::All], true)[0], Scenario::Memory);
    }

    #[test]
    fn cli_parses() {
        let a = Args::try_parse_from([
            "kiln-bench",
            "--endpoint",
            "http://127.0.0.1:9",
            "--server-pid",
            "42",
            "--duration",
            "2s",
            "--scenario",
            "ac-hit,bs-read",
            "--scenario",
            "memory",
            "--markdown",
        ])
        .unwrap();
        assert_eq!(a.server_pid, Some(42));
        assert_eq!(a.duration, Duration::from_secs(2));
        assert_eq!(
            a.scenarios,
            vec![Scenario::AcHit, Scenario::BsRead, Scenario::Memory]
        );
        assert!(a.markdown);
        let d = Args::try_parse_from(["kiln-bench"]).unwrap();
        assert_eq!(d.scenarios, vec![Scenario::All]);
        assert_eq!(d.chunk_size, 64 * 1024);
    }
}
