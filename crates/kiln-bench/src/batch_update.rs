//! `batch-update`: BatchUpdateBlobs of fresh random 4 KiB blobs, as many
//! per call as the server's advertised limit allows (capped), at
//! concurrency 16. Every blob is generated and hashed before timing, and
//! the requests are built up front so the timed phase only sends them.

use kiln_proto::reapi::BatchUpdateBlobsRequest;

use crate::Ctx;
use crate::client;
use crate::error::Result;
use crate::load::{self, Done};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "batch-update";
/// NativeLink 1.6.6: blobs/s without / with TCP_NODELAY, server CPU µs/blob.
const REF_RATE: f64 = 5_500.0;
const REF_RATE_NODELAY: f64 = 61_000.0;
const REF_CPU_US: f64 = 24.0;

/// Deals requests round-robin to `workers` queues (each popped from the back).
fn deal(reqs: Vec<BatchUpdateBlobsRequest>, workers: usize) -> Vec<Vec<BatchUpdateBlobsRequest>> {
    let workers = workers.max(1);
    let mut out: Vec<Vec<BatchUpdateBlobsRequest>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, r) in reqs.into_iter().enumerate() {
        out[i % workers].push(r);
    }
    for q in &mut out {
        q.reverse();
    }
    out
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let size = a.batch_blob_size as usize;
    let instance = ctx.conn.instance.clone();
    let pool = ctx.conn.channels(a.batch_concurrency).await?;
    let caps = client::capabilities(&pool, &instance).await?;
    let max_batch = client::max_batch_bytes(&caps);
    let per_call = client::blobs_per_batch(max_batch, size, a.batch_max_per_call);

    let blobs = client::random_blobs(a.batch_update_blobs, size, ctx.seed_for("batch-update"));
    let reqs = client::pack_batches(&instance, blobs, per_call);
    let mut queues = deal(reqs, a.batch_concurrency).into_iter();

    let out = load::run(ctx.spec(a.batch_concurrency), &ctx.meters, |_w| {
        let cas = pool.cas();
        let mut queue = queues.next().unwrap_or_default();
        move |_op: u64| {
            let mut cas = cas.clone();
            let next = queue.pop();
            async move {
                match next {
                    None => Ok(None),
                    Some(req) => {
                        let n = client::batch_update(&mut cas, req).await?;
                        Ok(Some(Done {
                            items: n,
                            bytes: n * size as u64,
                        }))
                    }
                }
            }
        }
    })
    .await
    .require_success(NAME)?;

    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(NAME, "blobs stored", "blobs/s", Some(out.items_per_sec()))
            .reference(REF_RATE_NODELAY)
            .target(Target::times_ref(REF_RATE_NODELAY, 1.5)),
    );
    rep.row(
        Row::new(NAME, "server CPU per blob", "µs", out.server_us_per_item())
            .reference(REF_CPU_US)
            .target(Target::fraction_of_ref(REF_CPU_US, 0.5)),
    );
    rep.note(format!(
        "{size} B blobs, {per_call} per call (server max_batch_total_size_bytes {max_batch}), concurrency {}, {} connections, {} blobs prepared; reference is {REF_RATE_NODELAY} blobs/s with TCP_NODELAY ({REF_RATE} without)",
        a.batch_concurrency,
        pool.len(),
        a.batch_update_blobs
    ));
    rep.note(out.summary());
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deal_round_robin_in_order() {
        let reqs: Vec<_> = (0..5)
            .map(|i| BatchUpdateBlobsRequest {
                instance_name: format!("{i}"),
                ..Default::default()
            })
            .collect();
        let mut qs = deal(reqs, 2);
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].pop().unwrap().instance_name, "0");
        assert_eq!(qs[0].pop().unwrap().instance_name, "2");
        assert_eq!(qs[1].pop().unwrap().instance_name, "1");
        assert_eq!(qs[0].len() + qs[1].len(), 2);
    }
}
