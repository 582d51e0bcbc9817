//! `find-missing`: FindMissingBlobs with 1000 digests per call, half of
//! them present, at concurrency 16.

use std::sync::Arc;

use kiln_proto::reapi::{Digest, FindMissingBlobsRequest};

use crate::Ctx;
use crate::client::{self, FUNCTION};
use crate::error::{BenchError, Context as _, Result};
use crate::load::{self, Done};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "find-missing";
/// NativeLink 1.6.6: digests/s and server CPU µs per digest.
const REF_RATE: f64 = 2_200_000.0;
const REF_CPU_US: f64 = 0.60;
/// Distinct prepared requests cycled through.
const VARIANTS: usize = 64;
/// Size of the present blobs.
const BLOB_SIZE: usize = 256;

/// Builds `VARIANTS` requests, each interleaving `per_call - per_call/2`
/// present digests with `per_call/2` missing ones, drawn round-robin from
/// the pools. Returns the requests and the number missing in each.
fn build_requests(
    instance: &str,
    present: &[Digest],
    missing: &[Digest],
    per_call: usize,
) -> (Vec<FindMissingBlobsRequest>, usize) {
    let n_missing = per_call / 2;
    let n_present = per_call - n_missing;
    let reqs = (0..VARIANTS)
        .map(|v| {
            let mut digests = Vec::with_capacity(per_call);
            for j in 0..per_call.max(n_present.max(n_missing) * 2) {
                let k = j / 2;
                if j % 2 == 0 && k < n_present {
                    digests.push(present[(v * n_present + k) % present.len()].clone());
                } else if j % 2 == 1 && k < n_missing {
                    digests.push(missing[(v * n_missing + k) % missing.len()].clone());
                }
            }
            FindMissingBlobsRequest {
                instance_name: instance.to_string(),
                blob_digests: digests,
                digest_function: FUNCTION.to_proto() as i32,
            }
        })
        .collect();
    (reqs, n_missing)
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let per_call = a.fmb_digests_per_call.max(2);
    let instance = ctx.conn.instance.clone();
    let pool = ctx.conn.channels(a.fmb_concurrency).await?;
    let caps = client::capabilities(&pool, &instance).await?;

    // Pools big enough that one call never repeats a digest.
    let pool_size = (per_call * 4).max(4000);
    let present = client::random_blobs(pool_size, BLOB_SIZE, ctx.seed_for("fmb-present"));
    let present_digests: Vec<Digest> = present.iter().map(|b| b.digest.clone()).collect();
    let per_batch = client::blobs_per_batch(client::max_batch_bytes(&caps), BLOB_SIZE, 1000);
    client::upload_all(&pool, client::pack_batches(&instance, present, per_batch), 4)
        .await
        .ctx("uploading present blobs")?;
    let missing_digests: Vec<Digest> = (0..pool_size as u64)
        .map(|i| client::random_blob(BLOB_SIZE, ctx.seed_for("fmb-missing"), i).digest)
        .collect();
    let (reqs, expect_missing) = build_requests(&instance, &present_digests, &missing_digests, per_call);
    let reqs = Arc::new(reqs);

    let out = load::run(ctx.spec(a.fmb_concurrency), &ctx.meters, |_w| {
        let cas = pool.cas();
        let reqs = reqs.clone();
        move |op: u64| {
            let mut cas = cas.clone();
            let req = reqs[op as usize % reqs.len()].clone();
            let items = req.blob_digests.len() as u64;
            async move {
                let r = cas
                    .find_missing_blobs(req)
                    .await
                    .ctx("FindMissingBlobs")?
                    .into_inner();
                if r.missing_blob_digests.len() != expect_missing {
                    return Err(BenchError::new(format!(
                        "FindMissingBlobs reported {} missing, expected {expect_missing}",
                        r.missing_blob_digests.len()
                    )));
                }
                Ok(Some(Done { items, bytes: 0 }))
            }
        }
    })
    .await
    .require_success(NAME)?;

    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(NAME, "digests checked", "digests/s", Some(out.items_per_sec()))
            .reference(REF_RATE)
            .target(Target::times_ref(REF_RATE, 1.5)),
    );
    rep.row(
        Row::new(NAME, "server CPU per digest", "µs", out.server_us_per_item())
            .reference(REF_CPU_US)
            .target(Target::fraction_of_ref(REF_CPU_US, 0.5)),
    );
    rep.note(format!(
        "{per_call} digests per call ({expect_missing} missing), concurrency {}, {} connections",
        a.fmb_concurrency,
        pool.len()
    ));
    rep.note(out.summary());
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(tag: char, n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| Digest {
                hash: format!("{tag}{i}"),
                size_bytes: 1,
            })
            .collect()
    }

    #[test]
    fn half_present_half_missing() {
        let p = digests('p', 4000);
        let m = digests('m', 4000);
        let (reqs, n_missing) = build_requests("", &p, &m, 1000);
        assert_eq!(n_missing, 500);
        assert_eq!(reqs.len(), VARIANTS);
        for r in &reqs {
            assert_eq!(r.blob_digests.len(), 1000);
            let missing = r.blob_digests.iter().filter(|d| d.hash.starts_with('m')).count();
            assert_eq!(missing, 500);
            let mut h: Vec<_> = r.blob_digests.iter().map(|d| d.hash.clone()).collect();
            h.sort();
            h.dedup();
            assert_eq!(h.len(), 1000, "no duplicates within a call");
        }
        let (odd, n_missing) = build_requests("", &p, &m, 7);
        assert_eq!(n_missing, 3);
        assert_eq!(odd[0].blob_digests.len(), 7);
    }
}
