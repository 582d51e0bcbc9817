//! `bs-write`: ByteStream.Write of large random blobs: N x 16 MiB at
//! concurrency 4, then one 256 MiB stream. Content is generated, hashed and
//! split into WriteRequests of `--chunk-size` bytes before timing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi::Digest;

use crate::Ctx;
use crate::client::{self, ConnSpec};
use crate::error::Result;
use crate::load::{self, Done, Outcome};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "bs-write";
/// NativeLink 1.6.6, 16 x 16 MiB at concurrency 4: GB/s and CPU s/GB.
const REF_MANY_GBPS: f64 = 0.49;
const REF_MANY_CPU: f64 = 2.8;
/// NativeLink 1.6.6, one 256 MiB stream: GB/s without / with TCP_NODELAY.
const REF_ONE_GBPS: f64 = 0.10;
const REF_ONE_GBPS_NODELAY: f64 = 0.33;
/// Kiln's own targets for the single stream.
const TARGET_ONE_GBPS: f64 = 1.2;
const TARGET_ONE_CPU: f64 = 1.0;
/// Count-bounded phases get at least this long before they are cut off.
const MIN_DEADLINE: Duration = Duration::from_secs(120);

/// One prepared upload.
pub struct Upload {
    pub digest: Digest,
    pub reqs: Vec<WriteRequest>,
    pub size: u64,
}

/// Generates `count` blobs of `size` bytes and splits each into requests.
pub fn prepare(conn: &ConnSpec, count: usize, size: usize, chunk: usize, seed: u64) -> Vec<Upload> {
    client::random_blobs(count, size, seed)
        .into_iter()
        .map(|b| {
            let reqs = client::write_requests(conn.upload_resource(&b.digest), &b.data, chunk);
            Upload {
                size: b.data.len() as u64,
                digest: b.digest,
                reqs,
            }
        })
        .collect()
}

/// Uploads every prepared blob, `concurrency` streams at a time.
async fn write_all(ctx: &Ctx, uploads: Vec<Upload>, concurrency: usize) -> Result<Outcome> {
    let pool = ctx.conn.channels(concurrency).await?;
    let count = uploads.len() as u64;
    let queue = Arc::new(Mutex::new(uploads.into_iter().rev().collect::<Vec<_>>()));
    let spec = load::Spec {
        concurrency,
        duration: ctx.args.duration.max(MIN_DEADLINE),
        max_ops: count,
    };
    load::run(spec, &ctx.meters, |_w| {
        let bs = pool.bytestream();
        let queue = queue.clone();
        move |_op: u64| {
            let mut bs = bs.clone();
            // Never held across an await: popped here, before the future.
            let next = queue.lock().ok().and_then(|mut q| q.pop());
            async move {
                match next {
                    None => Ok(None),
                    Some(up) => {
                        let n = client::bytestream_write(&mut bs, up.reqs, up.size).await?;
                        Ok(Some(Done { items: 1, bytes: n }))
                    }
                }
            }
        }
    })
    .await
    .require_success(NAME)
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let chunk = a.chunk_size as usize;
    let mut rep = ScenarioReport::new(NAME);

    let uploads = prepare(
        &ctx.conn,
        a.bs_blobs.max(1),
        a.bs_blob_size as usize,
        chunk,
        ctx.seed_for("bs-write-many"),
    );
    let many = write_all(ctx, uploads, a.bs_concurrency.max(1)).await?;
    let label = format!(
        "{} x {} MiB, concurrency {}",
        a.bs_blobs,
        a.bs_blob_size >> 20,
        a.bs_concurrency
    );
    rep.row(
        Row::new(
            NAME,
            &format!("{label}: throughput"),
            "GB/s",
            Some(many.gb_per_sec()),
        )
        .reference(REF_MANY_GBPS)
        .target(Target::times_ref(REF_MANY_GBPS, 1.5)),
    );
    rep.row(
        Row::new(
            NAME,
            &format!("{label}: server CPU"),
            "s/GB",
            many.server_s_per_gb(),
        )
        .reference(REF_MANY_CPU)
        .target(Target::fraction_of_ref(REF_MANY_CPU, 0.5)),
    );
    rep.note(format!("{label}, {} KiB chunks: {}", chunk >> 10, many.summary()));

    if a.bs_single_size > 0 {
        let one = prepare(
            &ctx.conn,
            1,
            a.bs_single_size as usize,
            chunk,
            ctx.seed_for("bs-write-one"),
        );
        let single = write_all(ctx, one, 1).await?;
        let label = format!("1 x {} MiB stream", a.bs_single_size >> 20);
        rep.row(
            Row::new(
                NAME,
                &format!("{label}: throughput"),
                "GB/s",
                Some(single.gb_per_sec()),
            )
            .reference(REF_ONE_GBPS_NODELAY)
            .target(Target::AtLeast(TARGET_ONE_GBPS)),
        );
        rep.row(
            Row::new(
                NAME,
                &format!("{label}: server CPU"),
                "s/GB",
                single.server_s_per_gb(),
            )
            .target(Target::AtMost(TARGET_ONE_CPU)),
        );
        rep.note(format!(
            "{label}: {}; reference {REF_ONE_GBPS_NODELAY} GB/s with TCP_NODELAY ({REF_ONE_GBPS} without)",
            single.summary()
        ));
    }
    rep.note("GB = 10^9 bytes; server CPU = utime+stime of the server process over the phase");
    Ok(rep)
}
