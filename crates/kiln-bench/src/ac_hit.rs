//! `ac-hit`: GetActionResult on stored ActionResults whose outputs exist
//! (so a completeness-checking server hits), at concurrency 32.

use std::sync::Arc;

use futures::StreamExt as _;
use kiln_proto::reapi::{
    ActionResult, Digest, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};

use crate::Ctx;
use crate::client::{self, FUNCTION};
use crate::error::{BenchError, Context as _, Result};
use crate::load::{self, Done};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "ac-hit";
/// NativeLink 1.6.6, results/s, without / with TCP_NODELAY.
const REF_RATE: f64 = 22_700.0;
const REF_RATE_NODELAY: f64 = 28_200.0;
/// NativeLink 1.6.6 server CPU per result, µs.
const REF_CPU_US: f64 = 41.0;
/// Size of each output blob.
const OUTPUT_SIZE: usize = 200;
const OUTPUTS_PER_RESULT: usize = 2;

fn action_result(i: usize, outputs: &[Digest]) -> ActionResult {
    ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(k, d)| OutputFile {
                path: format!("bazel-out/k8-fastbuild/bin/pkg{i}/out{k}.o"),
                digest: Some(d.clone()),
                is_executable: k == 0,
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        ..Default::default()
    }
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let n = a.ac_entries.max(1);
    let instance = ctx.conn.instance.clone();
    let pool = ctx.conn.channels(a.ac_concurrency).await?;
    let caps = client::capabilities(&pool, &instance).await?;

    // Outputs first, so the results are complete.
    let outputs = client::random_blobs(n * OUTPUTS_PER_RESULT, OUTPUT_SIZE, ctx.seed_for("ac-outputs"));
    let output_digests: Vec<Digest> = outputs.iter().map(|b| b.digest.clone()).collect();
    let per_call = client::blobs_per_batch(client::max_batch_bytes(&caps), OUTPUT_SIZE, 1000);
    client::upload_all(&pool, client::pack_batches(&instance, outputs, per_call), 4)
        .await
        .ctx("uploading ActionResult outputs")?;

    // Action digests: digests of distinct random "Action" bytes.
    let actions: Vec<Digest> = (0..n as u64)
        .map(|i| client::random_blob(96, ctx.seed_for("ac-actions"), i).digest)
        .collect();
    let updates: Vec<UpdateActionResultRequest> = actions
        .iter()
        .enumerate()
        .map(|(i, d)| UpdateActionResultRequest {
            instance_name: instance.clone(),
            action_digest: Some(d.clone()),
            action_result: Some(action_result(
                i,
                &output_digests[i * OUTPUTS_PER_RESULT..(i + 1) * OUTPUTS_PER_RESULT],
            )),
            results_cache_policy: None,
            digest_function: FUNCTION.to_proto() as i32,
        })
        .collect();
    let results: Vec<Result<()>> = futures::stream::iter(updates)
        .map(|req| {
            let mut ac = pool.ac();
            async move {
                ac.update_action_result(req).await.ctx("UpdateActionResult")?;
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }

    let actions = Arc::new(actions);
    let out = load::run(ctx.spec(a.ac_concurrency), &ctx.meters, |_w| {
        let ac = pool.ac();
        let actions = actions.clone();
        let instance = instance.clone();
        move |op: u64| {
            let mut ac = ac.clone();
            // Spread successive operations over the whole key set.
            let idx = (op.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as usize % actions.len();
            let req = GetActionResultRequest {
                instance_name: instance.clone(),
                action_digest: Some(actions[idx].clone()),
                inline_stdout: false,
                inline_stderr: false,
                inline_output_files: Vec::new(),
                digest_function: FUNCTION.to_proto() as i32,
            };
            async move {
                let r = ac
                    .get_action_result(req)
                    .await
                    .ctx("GetActionResult")?
                    .into_inner();
                if r.output_files.len() != OUTPUTS_PER_RESULT {
                    return Err(BenchError::new(format!(
                        "GetActionResult returned {} output files, stored {OUTPUTS_PER_RESULT}",
                        r.output_files.len()
                    )));
                }
                Ok(Some(Done { items: 1, bytes: 0 }))
            }
        }
    })
    .await
    .require_success(NAME)?;

    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(
            NAME,
            "GetActionResult hits",
            "results/s",
            Some(out.items_per_sec()),
        )
        .reference(REF_RATE_NODELAY)
        .target(Target::times_ref(REF_RATE_NODELAY, 1.5)),
    );
    let us = |p: f64| out.latency.percentile(p).map(|d| d.as_secs_f64() * 1e6);
    rep.row(Row::new(NAME, "latency p50", "µs", us(50.0)));
    rep.row(Row::new(NAME, "latency p99", "µs", us(99.0)));
    rep.row(
        Row::new(NAME, "server CPU per result", "µs", out.server_us_per_item())
            .reference(REF_CPU_US)
            .target(Target::fraction_of_ref(REF_CPU_US, 0.5)),
    );
    rep.note(format!(
        "{n} results x {OUTPUTS_PER_RESULT} outputs of {OUTPUT_SIZE} B, concurrency {}, {} connections; reference is {REF_RATE_NODELAY} results/s with TCP_NODELAY ({REF_RATE} without)",
        a.ac_concurrency,
        pool.len()
    ));
    rep.note(out.summary());
    Ok(rep)
}
