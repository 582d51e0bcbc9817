//! `exec-noop`: uncached no-op actions (`/bin/true`, empty input root, each
//! Command unique) executed end to end at concurrency 8; `exec-queue`: the
//! same at concurrency 1, reporting queue-to-start latency from the
//! results' ExecutedActionMetadata (worker_start - queued) while the
//! workers are idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Ctx;
use crate::client::{self, Blob};
use crate::error::{BenchError, Result};
use crate::exec::{self, PhaseLog, TreeMark};
use crate::load::{self, Done, Outcome};
use crate::procstat::clock_ticks_per_sec;
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "exec-noop";
const QUEUE_NAME: &str = "exec-queue";
/// NativeLink 1.6.6 with one local worker, no-op actions/s at
/// concurrency 8, without / with TCP_NODELAY forced.
const REF_RATE: f64 = 174.0;
const REF_RATE_NODELAY: f64 = 405.0;
/// NativeLink's server CPU per action, spawned process included (4-5 ms).
const REF_CPU_MS: f64 = 4.5;
/// Kiln's targets.
const TARGET_RATE: f64 = 800.0;
const TARGET_QUEUE_P99_MS: f64 = 10.0;

/// What one timed phase of unique no-op Executes measured.
struct Phase {
    out: Outcome,
    tree_cpu: Option<std::time::Duration>,
    phases: PhaseLog,
    cached: u64,
    connections: usize,
    prepared: usize,
}

async fn phase(ctx: &Ctx, tag: &str, concurrency: usize) -> Result<Phase> {
    let a = &ctx.args;
    let drain = a.exec_stream_end == crate::StreamEnd::Drain;
    let instance = ctx.conn.instance.clone();
    let pool = ctx.conn.channels(concurrency).await?;
    let caps = client::capabilities(&pool, &instance).await?;
    if caps
        .execution_capabilities
        .as_ref()
        .is_none_or(|e| !e.exec_enabled)
    {
        return Err(BenchError::new(
            "the server does not advertise execution (exec_enabled false)",
        ));
    }
    let root = exec::empty_root();
    let prepared = exec::prepare_noops(a.exec_actions.max(1), ctx.seed, tag, &root.digest);
    let mut blobs: Vec<Blob> = vec![root];
    let mut actions = Vec::with_capacity(prepared.len());
    for p in prepared {
        actions.push(p.action);
        blobs.extend(p.blobs);
    }
    exec::upload(&pool, &instance, client::max_batch_bytes(&caps), blobs).await?;
    let n_prepared = actions.len();

    let actions = Arc::new(actions);
    let next = Arc::new(AtomicUsize::new(0));
    let phases: PhaseLog = Arc::default();
    let cached = Arc::new(AtomicUsize::new(0));
    let tree = TreeMark::now(a.server_pid, clock_ticks_per_sec());
    let out = load::run(ctx.spec(concurrency), &ctx.meters, |_w| {
        let client = exec::execution(&pool);
        let (actions, next, phases, cached, instance) = (
            actions.clone(),
            next.clone(),
            phases.clone(),
            cached.clone(),
            instance.clone(),
        );
        move |_op: u64| {
            let mut client = client.clone();
            let i = next.fetch_add(1, Ordering::Relaxed);
            let req = actions.get(i).map(|d| exec::execute_request(&instance, d));
            let (phases, cached) = (phases.clone(), cached.clone());
            async move {
                let Some(req) = req else { return Ok(None) };
                let resp = exec::execute(&mut client, req, drain).await?;
                if resp.cached_result {
                    // A unique action must not hit: count it, do not time it
                    // as an execution.
                    cached.fetch_add(1, Ordering::Relaxed);
                    return Err(BenchError::new("a unique action was answered from the cache"));
                }
                exec::record(
                    &phases,
                    resp.result.as_ref().and_then(|r| r.execution_metadata.as_ref()),
                );
                Ok(Some(Done { items: 1, bytes: 0 }))
            }
        }
    })
    .await;
    let tree_cpu = tree.elapsed_cpu();
    let out = out.require_success(tag)?;
    Ok(Phase {
        out,
        tree_cpu,
        phases,
        cached: cached.load(Ordering::Relaxed) as u64,
        connections: pool.len(),
        prepared: n_prepared,
    })
}

fn common_notes(rep: &mut ScenarioReport, p: &Phase, concurrency: usize) {
    let (q, prep, run, fin, incomplete) = exec::take(&p.phases);
    rep.note(format!(
        "{} executed, {} prepared unique actions, concurrency {concurrency}, {} connections",
        p.out.items, p.prepared, p.connections
    ));
    rep.note(format!(
        "server-side phases: {}; {}; {}; {}{}",
        exec::describe("queued->worker start", &q),
        exec::describe("worker start->exec start (fetch, sandbox)", &prep),
        exec::describe("exec start->completed", &run),
        exec::describe("exec completed->worker completed (upload)", &fin),
        if incomplete > 0 {
            format!("; {incomplete} results lacked timestamps")
        } else {
            String::new()
        }
    ));
    if p.cached > 0 {
        rep.note(format!(
            "{} unique actions were answered from the cache (errors)",
            p.cached
        ));
    }
    if let (Some(t), Some(s)) = (p.tree_cpu, p.out.cpu.server) {
        rep.note(format!(
            "server CPU: {:.2} s in the server process's own threads, {:.2} s with its descendants (sandbox zygotes, per-action init, the actions)",
            s.as_secs_f64(),
            t.as_secs_f64()
        ));
    }
    rep.note(p.out.summary());
}

fn tree_ms_per_item(p: &Phase) -> Option<f64> {
    let t = p.tree_cpu?;
    (p.out.items > 0).then(|| t.as_secs_f64() * 1e3 / p.out.items as f64)
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let c = ctx.args.exec_concurrency.max(1);
    let p = phase(ctx, NAME, c).await?;
    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(
            NAME,
            "uncached no-op actions",
            "actions/s",
            Some(p.out.items_per_sec()),
        )
        .reference(REF_RATE_NODELAY)
        .target(Target::AtLeast(TARGET_RATE)),
    );
    let ms = |q: f64| p.out.latency.percentile(q).map(|d| d.as_secs_f64() * 1e3);
    rep.row(Row::new(NAME, "end-to-end latency p50", "ms", ms(50.0)));
    rep.row(Row::new(NAME, "end-to-end latency p99", "ms", ms(99.0)));
    rep.row(
        Row::new(
            NAME,
            "server CPU per action, descendants included",
            "ms",
            tree_ms_per_item(&p),
        )
        .reference(REF_CPU_MS)
        .target(Target::fraction_of_ref(REF_CPU_MS, 0.5)),
    );
    rep.row(Row::new(
        NAME,
        "server CPU per action, server process only",
        "ms",
        p.out.server_us_per_item().map(|us| us / 1e3),
    ));
    rep.note(format!(
        "reference {REF_RATE_NODELAY} actions/s with TCP_NODELAY forced ({REF_RATE} without), NativeLink with one local worker"
    ));
    common_notes(&mut rep, &p, c);
    Ok(rep)
}

pub async fn run_queue(ctx: &Ctx) -> Result<ScenarioReport> {
    let c = ctx.args.exec_queue_concurrency.max(1);
    let p = phase(ctx, QUEUE_NAME, c).await?;
    let mut rep = ScenarioReport::new(QUEUE_NAME);
    let q = {
        let log = p.phases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::stats::Latencies::from_samples(log.queue.clone())
    };
    rep.row(Row::new(
        QUEUE_NAME,
        "queue-to-start p50",
        "ms",
        exec::ms(&q, 50.0),
    ));
    rep.row(
        Row::new(QUEUE_NAME, "queue-to-start p99", "ms", exec::ms(&q, 99.0))
            .target(Target::AtMost(TARGET_QUEUE_P99_MS)),
    );
    let ms = |x: f64| p.out.latency.percentile(x).map(|d| d.as_secs_f64() * 1e3);
    rep.row(Row::new(QUEUE_NAME, "end-to-end latency p50", "ms", ms(50.0)));
    rep.row(Row::new(QUEUE_NAME, "end-to-end latency p99", "ms", ms(99.0)));
    rep.row(Row::new(
        QUEUE_NAME,
        "actions at this concurrency",
        "actions/s",
        Some(p.out.items_per_sec()),
    ));
    rep.note(
        "queue-to-start = worker_start_timestamp - queued_timestamp of each result's ExecutedActionMetadata (server clock)",
    );
    common_notes(&mut rep, &p, c);
    Ok(rep)
}
