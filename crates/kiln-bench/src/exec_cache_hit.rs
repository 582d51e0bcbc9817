//! `exec-cache-hit`: Execute of actions whose results are already in the
//! Action Cache (put there by executing them once before timing), at
//! concurrency 16. Every answer must be a cached, successful result.

use std::sync::Arc;

use futures::StreamExt as _;

use kiln_proto::reapi::{RequestMetadata, ToolDetails};
use kiln_proto::request_info::REQUEST_METADATA_HEADER;
use prost::Message as _;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};

use crate::Ctx;
use crate::client::{self, Blob};
use crate::error::{BenchError, Context as _, Result};
use crate::exec;
use crate::load::{self, Done};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "exec-cache-hit";
/// NativeLink 1.6.6: Executes/s at concurrency 16 without / with
/// TCP_NODELAY, and server CPU per Execute.
const REF_RATE: f64 = 1_880.0;
const REF_RATE_NODELAY: f64 = 12_700.0;
const REF_CPU_US: f64 = 86.0;
const TARGET_RATE: f64 = 25_000.0;

/// A RequestMetadata like the one Bazel sends with each remote call.
fn bazel_metadata(seed: u64) -> BinaryMetadataValue {
    let md = RequestMetadata {
        tool_details: Some(ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "8.0.0".into(),
        }),
        action_id: format!("{seed:016x}0123456789abcdef0123456789abcdef0123456789abcdef"),
        tool_invocation_id: format!("kiln-bench-{seed:016x}-invocation-0000-000000000000"),
        correlated_invocations_id: format!("kiln-bench-{seed:016x}-build-0000-000000000000"),
        action_mnemonic: "CppCompile".into(),
        target_id: "//bench/some/package:some_target".into(),
        configuration_id: "k8-fastbuild".into(),
    };
    MetadataValue::from_bytes(&md.encode_to_vec())
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let c = a.exec_hit_concurrency.max(1);
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

    // Untimed: upload and execute each action once, so its result is cached.
    let root = exec::empty_root();
    let prepared = exec::prepare_noops(a.exec_hit_actions.max(1), ctx.seed, NAME, &root.digest);
    let mut blobs: Vec<Blob> = vec![root];
    let mut actions = Vec::with_capacity(prepared.len());
    for p in prepared {
        actions.push(p.action);
        blobs.extend(p.blobs);
    }
    exec::upload(&pool, &instance, client::max_batch_bytes(&caps), blobs).await?;
    let warm: Vec<Result<()>> = futures::stream::iter(actions.iter().cloned())
        .map(|d| {
            let mut client = exec::execution(&pool);
            let req = exec::execute_request(&instance, &d);
            async move {
                exec::execute(&mut client, req, true)
                    .await
                    .ctx("executing an action once to cache it")
                    .map(|_| ())
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for r in warm {
        r?;
    }

    let actions = Arc::new(actions);
    let metadata = a.request_metadata.then(|| bazel_metadata(ctx.seed));
    let out = load::run(ctx.spec(c), &ctx.meters, |_w| {
        let client = exec::execution(&pool);
        let (actions, instance, metadata) = (actions.clone(), instance.clone(), metadata.clone());
        move |op: u64| {
            let mut client = client.clone();
            let idx = (op.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as usize % actions.len();
            let mut req = tonic::Request::new(exec::execute_request(&instance, &actions[idx]));
            if let Some(md) = &metadata {
                req.metadata_mut().insert_bin(REQUEST_METADATA_HEADER, md.clone());
            }
            async move {
                let resp = exec::execute(&mut client, req, drain).await?;
                if !resp.cached_result {
                    return Err(BenchError::new(
                        "Execute of a cached action was not answered from the cache",
                    ));
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
            "cache-hit Executes",
            "Executes/s",
            Some(out.items_per_sec()),
        )
        .reference(REF_RATE_NODELAY)
        .target(Target::AtLeast(TARGET_RATE)),
    );
    let us = |p: f64| out.latency.percentile(p).map(|d| d.as_secs_f64() * 1e6);
    rep.row(Row::new(NAME, "latency p50", "µs", us(50.0)));
    rep.row(Row::new(NAME, "latency p99", "µs", us(99.0)));
    rep.row(Row::new(NAME, "errors", "", Some(out.errors as f64)).target(Target::AtMost(0.0)));
    rep.row(
        Row::new(NAME, "server CPU per Execute", "µs", out.server_us_per_item())
            .reference(REF_CPU_US)
            .target(Target::fraction_of_ref(REF_CPU_US, 0.5)),
    );
    rep.note(format!(
        "{} cached actions (executed once before timing), concurrency {c}, {} connections; reference {REF_RATE_NODELAY}/s with TCP_NODELAY ({REF_RATE} without), NativeLink fails a few in 10,000 with INTERNAL \"channel closed\"",
        actions.len(),
        pool.len()
    ));
    rep.note(format!("Execute stream after done: {:?}", a.exec_stream_end));
    if a.request_metadata {
        rep.note("every Execute carries a Bazel-like RequestMetadata header".to_string());
    }
    rep.note(out.summary());
    Ok(rep)
}
