//! `bs-read`: ByteStream.Read of stored 16 MiB blobs at concurrency 4,
//! once without verification (bytes counted) and once with the client
//! hashing every blob (SHA-256) and checking it. Each pass runs for
//! `--duration`, cycling over the stored blobs.

use std::sync::Arc;

use futures::StreamExt as _;
use kiln_proto::reapi::Digest;

use crate::Ctx;
use crate::bs_write;
use crate::client;
use crate::error::{Context as _, Result};
use crate::load::{self, Done, Outcome};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "bs-read";
/// NativeLink 1.6.6: GB/s verified / unverified, server CPU s/GB.
const REF_VERIFIED_GBPS: f64 = 0.93;
const REF_UNVERIFIED_GBPS: f64 = 1.71;
const REF_CPU: f64 = 0.65;

async fn read_pass(ctx: &Ctx, digests: &Arc<Vec<Digest>>, verify: bool) -> Result<Outcome> {
    let conc = ctx.args.bs_concurrency.max(1);
    let pool = ctx.conn.channels(conc).await?;
    load::run(ctx.spec(conc), &ctx.meters, |_w| {
        let bs = pool.bytestream();
        let digests = digests.clone();
        let conn = ctx.conn.clone();
        move |op: u64| {
            let mut bs = bs.clone();
            let d = digests[op as usize % digests.len()].clone();
            let resource = conn.read_resource(&d);
            async move {
                let n = client::bytestream_read(&mut bs, resource, &d, verify).await?;
                Ok(Some(Done { items: 1, bytes: n }))
            }
        }
    })
    .await
    .require_success(NAME)
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let conc = a.bs_concurrency.max(1);
    let uploads = bs_write::prepare(
        &ctx.conn,
        a.bs_blobs.max(1),
        a.bs_blob_size as usize,
        a.chunk_size as usize,
        ctx.seed_for("bs-read"),
    );
    let digests: Arc<Vec<Digest>> = Arc::new(uploads.iter().map(|u| u.digest.clone()).collect());
    // Untimed: store the blobs.
    let pool = ctx.conn.channels(conc).await?;
    let results: Vec<Result<u64>> = futures::stream::iter(uploads)
        .map(|up| {
            let mut bs = pool.bytestream();
            async move { client::bytestream_write(&mut bs, up.reqs, up.size).await }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    for r in results {
        r.ctx("storing blobs to read")?;
    }

    let plain = read_pass(ctx, &digests, false).await?;
    let verified = read_pass(ctx, &digests, true).await?;

    let label = format!("{} MiB blobs, concurrency {conc}", a.bs_blob_size >> 20);
    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(
            NAME,
            &format!("{label}, unverified"),
            "GB/s",
            Some(plain.gb_per_sec()),
        )
        .reference(REF_UNVERIFIED_GBPS)
        .target(Target::times_ref(REF_UNVERIFIED_GBPS, 1.5)),
    );
    rep.row(
        Row::new(
            NAME,
            &format!("{label}, client verifies SHA-256"),
            "GB/s",
            Some(verified.gb_per_sec()),
        )
        .reference(REF_VERIFIED_GBPS)
        .target(Target::times_ref(REF_VERIFIED_GBPS, 1.5)),
    );
    rep.row(
        Row::new(
            NAME,
            "server CPU (unverified pass)",
            "s/GB",
            plain.server_s_per_gb(),
        )
        .reference(REF_CPU)
        .target(Target::fraction_of_ref(REF_CPU, 0.5)),
    );
    rep.row(
        Row::new(
            NAME,
            "server CPU (verified pass)",
            "s/GB",
            verified.server_s_per_gb(),
        )
        .reference(REF_CPU)
        .target(Target::fraction_of_ref(REF_CPU, 0.5)),
    );
    rep.note(format!("unverified: {}", plain.summary()));
    rep.note(format!("verified: {}", verified.summary()));
    Ok(rep)
}
