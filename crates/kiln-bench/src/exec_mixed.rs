//! `exec-mixed`: a Bazel-like load of simulated actions. Four in five are
//! cache hits (GetActionResult on stored results); one in five is a miss
//! that does what Bazel does next: GetActionResult (NOT_FOUND),
//! FindMissingBlobs of its input file, input root, Command and Action,
//! BatchUpdateBlobs of the missing ones (a fresh 1 KiB input each time),
//! then Execute of the (unique, uncached) action. Throughput is simulated
//! actions per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt as _;
use kiln_proto::reapi::batch_update_blobs_request;
use kiln_proto::reapi::{
    Action, ActionResult, BatchUpdateBlobsRequest, Digest, Directory, FileNode, FindMissingBlobsRequest,
    GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};

use crate::Ctx;
use crate::client::{self, Blob, FUNCTION};
use crate::error::{BenchError, Context as _, Result};
use crate::exec::{self, TreeMark};
use crate::load::{self, Done};
use crate::procstat::clock_ticks_per_sec;
use crate::report::{Row, ScenarioReport};

const NAME: &str = "exec-mixed";
/// NativeLink 1.6.6: simulated actions/s without / with TCP_NODELAY.
const REF_RATE: f64 = 475.0;
const REF_RATE_NODELAY: f64 = 7_400.0;
/// Stored results the hits are drawn from.
const HIT_KEYS: usize = 1000;
const OUTPUT_SIZE: usize = 200;
const INPUT_SIZE: usize = 1024;

/// One miss, prepared before timing but uploaded during it.
struct Miss {
    action: Digest,
    /// Input file, input root, Command, Action.
    blobs: Vec<Blob>,
}

fn prepare_miss(ctx: &Ctx, i: u64) -> Miss {
    let input = client::random_blob(INPUT_SIZE, ctx.seed_for("mixed-inputs"), i);
    let root = exec::message_blob(&Directory {
        files: vec![FileNode {
            name: "in.txt".to_string(),
            digest: Some(input.digest.clone()),
            is_executable: false,
            ..Default::default()
        }],
        ..Default::default()
    });
    let cmd = exec::message_blob(&exec::noop_command(ctx.seed, NAME, i));
    let action = exec::message_blob(&Action {
        command_digest: Some(cmd.digest.clone()),
        input_root_digest: Some(root.digest.clone()),
        ..Default::default()
    });
    Miss {
        action: action.digest.clone(),
        blobs: vec![input, root, cmd, action],
    }
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let c = a.mixed_concurrency.max(1);
    let drain = a.exec_stream_end == crate::StreamEnd::Drain;
    let instance = ctx.conn.instance.clone();
    let pool = ctx.conn.channels(c).await?;
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

    // Hits: stored ActionResults whose two outputs exist.
    let outputs = client::random_blobs(HIT_KEYS * 2, OUTPUT_SIZE, ctx.seed_for("mixed-outputs"));
    let out_digests: Vec<Digest> = outputs.iter().map(|b| b.digest.clone()).collect();
    exec::upload(&pool, &instance, client::max_batch_bytes(&caps), outputs).await?;
    let hit_keys: Vec<Digest> = (0..HIT_KEYS as u64)
        .map(|i| client::random_blob(96, ctx.seed_for("mixed-keys"), i).digest)
        .collect();
    let updates: Vec<Result<()>> = futures::stream::iter(hit_keys.iter().cloned().enumerate())
        .map(|(i, d)| {
            let mut ac = pool.ac();
            let req = UpdateActionResultRequest {
                instance_name: instance.clone(),
                action_digest: Some(d),
                action_result: Some(ActionResult {
                    output_files: (0..2)
                        .map(|k| OutputFile {
                            path: format!("bazel-out/k8-fastbuild/bin/mixed{i}/out{k}.o"),
                            digest: Some(out_digests[i * 2 + k].clone()),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                results_cache_policy: None,
                digest_function: FUNCTION.to_proto() as i32,
            };
            async move {
                ac.update_action_result(req)
                    .await
                    .ctx("UpdateActionResult")
                    .map(|_| ())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in updates {
        r?;
    }

    // Misses: prepared, not uploaded.
    let misses: Vec<Miss> = (0..a.exec_actions.max(1) as u64)
        .map(|i| prepare_miss(ctx, i))
        .collect();
    let misses = Arc::new(misses);
    let hit_keys = Arc::new(hit_keys);
    let next_miss = Arc::new(AtomicUsize::new(0));
    let executed = Arc::new(AtomicUsize::new(0));
    let pct = a.mixed_exec_percent.min(100) as u64;

    let tree = TreeMark::now(a.server_pid, clock_ticks_per_sec());
    let out = load::run(ctx.spec(c), &ctx.meters, |_w| {
        let (ac, cas, exe) = (pool.ac(), pool.cas(), exec::execution(&pool));
        let (misses, hit_keys, next_miss, executed, instance) = (
            misses.clone(),
            hit_keys.clone(),
            next_miss.clone(),
            executed.clone(),
            instance.clone(),
        );
        move |op: u64| {
            let (mut ac, mut cas, mut exe) = (ac.clone(), cas.clone(), exe.clone());
            let (misses, executed, instance) = (misses.clone(), executed.clone(), instance.clone());
            // Spread the misses evenly: op n is a miss when its position in
            // each block of 100 falls below the percentage.
            let miss = (op % 100) < pct;
            let hit_key =
                hit_keys[(op.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as usize % hit_keys.len()].clone();
            let miss_idx = miss.then(|| next_miss.fetch_add(1, Ordering::Relaxed));
            async move {
                let get = |d: Digest| GetActionResultRequest {
                    instance_name: instance.clone(),
                    action_digest: Some(d),
                    inline_stdout: false,
                    inline_stderr: false,
                    inline_output_files: Vec::new(),
                    digest_function: FUNCTION.to_proto() as i32,
                };
                let Some(idx) = miss_idx else {
                    ac.get_action_result(get(hit_key))
                        .await
                        .ctx("GetActionResult (hit)")?;
                    return Ok(Some(Done { items: 1, bytes: 0 }));
                };
                let Some(m) = misses.get(idx) else { return Ok(None) };
                match ac.get_action_result(get(m.action.clone())).await {
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(BenchError::from(s).context("GetActionResult (miss)")),
                    Ok(_) => return Err(BenchError::new("GetActionResult hit on a fresh action")),
                }
                let missing = cas
                    .find_missing_blobs(FindMissingBlobsRequest {
                        instance_name: instance.clone(),
                        blob_digests: m.blobs.iter().map(|b| b.digest.clone()).collect(),
                        digest_function: FUNCTION.to_proto() as i32,
                    })
                    .await
                    .ctx("FindMissingBlobs")?
                    .into_inner()
                    .missing_blob_digests;
                let requests: Vec<batch_update_blobs_request::Request> = m
                    .blobs
                    .iter()
                    .filter(|b| missing.iter().any(|d| d.hash == b.digest.hash))
                    .map(|b| batch_update_blobs_request::Request {
                        digest: Some(b.digest.clone()),
                        data: b.data.clone(),
                        compressor: 0,
                    })
                    .collect();
                let mut bytes = 0u64;
                if !requests.is_empty() {
                    bytes = requests.iter().map(|r| r.data.len() as u64).sum();
                    let resp = cas
                        .batch_update_blobs(BatchUpdateBlobsRequest {
                            instance_name: instance.clone(),
                            requests,
                            digest_function: FUNCTION.to_proto() as i32,
                        })
                        .await
                        .ctx("BatchUpdateBlobs")?
                        .into_inner();
                    if let Some(bad) = resp
                        .responses
                        .iter()
                        .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
                    {
                        return Err(BenchError::new(format!(
                            "BatchUpdateBlobs refused a blob: {:?}",
                            bad.status
                        )));
                    }
                }
                let resp =
                    exec::execute(&mut exe, exec::execute_request(&instance, &m.action), drain).await?;
                if resp.cached_result {
                    return Err(BenchError::new("a unique action was answered from the cache"));
                }
                executed.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Done { items: 1, bytes }))
            }
        }
    })
    .await;
    let tree_cpu = tree.elapsed_cpu();
    let out = out.require_success(NAME)?;

    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(NAME, "simulated actions", "actions/s", Some(out.items_per_sec()))
            .reference(REF_RATE_NODELAY),
    );
    let ms = |p: f64| out.latency.percentile(p).map(|d| d.as_secs_f64() * 1e3);
    rep.row(Row::new(NAME, "latency p50", "ms", ms(50.0)));
    rep.row(Row::new(NAME, "latency p99", "ms", ms(99.0)));
    rep.row(Row::new(
        NAME,
        "server CPU per simulated action, descendants included",
        "µs",
        tree_cpu.and_then(|t| (out.items > 0).then(|| t.as_secs_f64() * 1e6 / out.items as f64)),
    ));
    rep.note(format!(
        "{pct}% misses (GetActionResult miss, FindMissingBlobs, BatchUpdateBlobs of a 1 KiB input + root + Command + Action, Execute of /bin/true), the rest GetActionResult hits on {HIT_KEYS} results; {} Executes ran; concurrency {c}, {} connections; reference {REF_RATE_NODELAY}/s with TCP_NODELAY ({REF_RATE} without); no Kiln target is set for this row",
        executed.load(Ordering::Relaxed),
        pool.len()
    ));
    rep.note(out.summary());
    Ok(rep)
}
