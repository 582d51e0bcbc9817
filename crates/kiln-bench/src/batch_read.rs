//! `batch-read`: BatchReadBlobs of stored 4 KiB blobs (windows of the
//! stored set, as many per call as the server's limit allows, capped), at
//! concurrency 16. Each returned blob's status and size are checked.

use std::sync::Arc;

use kiln_proto::reapi::{BatchReadBlobsRequest, Digest};

use crate::Ctx;
use crate::client::{self, FUNCTION};
use crate::error::{BenchError, Context as _, Result};
use crate::load::{self, Done};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "batch-read";
/// NativeLink 1.6.6: blobs/s and server CPU µs per blob.
const REF_RATE: f64 = 131_000.0;
const REF_CPU_US: f64 = 7.8;

/// `count` digests starting at `start`, wrapping around.
fn window(digests: &[Digest], start: usize, count: usize) -> Vec<Digest> {
    (0..count.min(digests.len()))
        .map(|k| digests[(start + k) % digests.len()].clone())
        .collect()
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let size = a.batch_blob_size as usize;
    let instance = ctx.conn.instance.clone();
    let pool = ctx.conn.channels(a.batch_concurrency).await?;
    let caps = client::capabilities(&pool, &instance).await?;
    let max_batch = client::max_batch_bytes(&caps);
    let per_call = client::blobs_per_batch(max_batch, size, a.batch_max_per_call);

    let blobs = client::random_blobs(a.batch_read_blobs.max(1), size, ctx.seed_for("batch-read"));
    let digests: Arc<Vec<Digest>> = Arc::new(blobs.iter().map(|b| b.digest.clone()).collect());
    client::upload_all(&pool, client::pack_batches(&instance, blobs, per_call), 4)
        .await
        .ctx("storing blobs to read")?;

    let out = load::run(ctx.spec(a.batch_concurrency), &ctx.meters, |_w| {
        let cas = pool.cas();
        let digests = digests.clone();
        let instance = instance.clone();
        move |op: u64| {
            let mut cas = cas.clone();
            let start = (op.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as usize % digests.len();
            let req = BatchReadBlobsRequest {
                instance_name: instance.clone(),
                digests: window(&digests, start, per_call),
                acceptable_compressors: Vec::new(),
                digest_function: FUNCTION.to_proto() as i32,
            };
            let asked = req.digests.len();
            async move {
                let r = cas
                    .batch_read_blobs(req)
                    .await
                    .ctx("BatchReadBlobs")?
                    .into_inner();
                if r.responses.len() != asked {
                    return Err(BenchError::new(format!(
                        "BatchReadBlobs: asked {asked} blobs, got {} responses",
                        r.responses.len()
                    )));
                }
                let mut bytes = 0u64;
                for b in &r.responses {
                    let code = b.status.as_ref().map(|s| s.code).unwrap_or(0);
                    if code != 0 || b.data.len() != size {
                        return Err(BenchError::new(format!(
                            "BatchReadBlobs: blob returned code {code} with {} bytes (expected {size})",
                            b.data.len()
                        )));
                    }
                    bytes += b.data.len() as u64;
                }
                Ok(Some(Done {
                    items: asked as u64,
                    bytes,
                }))
            }
        }
    })
    .await
    .require_success(NAME)?;

    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(NAME, "blobs read", "blobs/s", Some(out.items_per_sec()))
            .reference(REF_RATE)
            .target(Target::times_ref(REF_RATE, 1.5)),
    );
    rep.row(
        Row::new(NAME, "server CPU per blob", "µs", out.server_us_per_item())
            .reference(REF_CPU_US)
            .target(Target::fraction_of_ref(REF_CPU_US, 0.5)),
    );
    rep.note(format!(
        "{size} B blobs, {per_call} per call (server max_batch_total_size_bytes {max_batch}), {} stored, concurrency {}, {} connections",
        digests.len(),
        a.batch_concurrency,
        pool.len()
    ));
    rep.note(out.summary());
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_wrap() {
        let d: Vec<Digest> = (0..5)
            .map(|i| Digest {
                hash: i.to_string(),
                size_bytes: 1,
            })
            .collect();
        let w: Vec<String> = window(&d, 3, 4).into_iter().map(|d| d.hash).collect();
        assert_eq!(w, vec!["3", "4", "0", "1"]);
        assert_eq!(window(&d, 0, 99).len(), 5);
    }
}
