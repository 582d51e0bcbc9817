//! `memory`: server RSS per stored blob beyond its payload. Reads the
//! server's VmRSS, stores N random 4 KiB blobs through BatchUpdateBlobs,
//! reads VmRSS again (immediately and after a 1 s settle, keeping the
//! larger), and reports (delta - N x 4096) / N. Meaningful only on a fresh
//! server: an allocator that already grew hides new allocations.

use std::time::{Duration, Instant};

use crate::Ctx;
use crate::client;
use crate::error::{BenchError, Context as _, Result};
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "memory";
/// NativeLink 1.6.6: bytes of RSS per stored 4 KiB blob beyond its payload.
const REF_OVERHEAD: f64 = 540.0;
/// Kiln's target.
const TARGET_OVERHEAD: f64 = 150.0;
const BLOB_SIZE: usize = 4096;
const SETTLE: Duration = Duration::from_secs(1);

/// Bytes of RSS per blob beyond the payload (may be negative when the
/// server stores less than the payload, e.g. after eviction).
pub fn overhead_per_blob(rss_before: u64, rss_after: u64, blobs: u64, blob_size: u64) -> Option<f64> {
    if blobs == 0 {
        return None;
    }
    let delta = rss_after as f64 - rss_before as f64;
    Some((delta - (blobs * blob_size) as f64) / blobs as f64)
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let server = ctx
        .meters
        .server
        .as_ref()
        .ok_or_else(|| BenchError::new("memory needs --server-pid"))?;
    let instance = ctx.conn.instance.clone();
    let conc = 4;
    let pool = ctx.conn.channels(conc).await?;
    let caps = client::capabilities(&pool, &instance).await?;
    let per_call = client::blobs_per_batch(client::max_batch_bytes(&caps), BLOB_SIZE, a.batch_max_per_call);

    let rss0 = server.rss_bytes()?;
    let t0 = Instant::now();
    let (stored, sample) = client::upload_generated(
        &pool,
        &instance,
        a.memory_blobs,
        BLOB_SIZE,
        ctx.seed_for("memory"),
        per_call,
        conc,
    )
    .await
    .ctx("storing blobs")?;
    let upload_time = t0.elapsed();
    let rss1 = server.rss_bytes()?;
    tokio::time::sleep(SETTLE).await;
    let rss2 = server.rss_bytes()?;
    let rss_after = rss1.max(rss2);
    let missing = client::count_missing(&pool, &instance, &sample).await?;

    let mut rep = ScenarioReport::new(NAME);
    rep.row(
        Row::new(
            NAME,
            &format!("RSS per stored {BLOB_SIZE} B blob beyond payload"),
            "bytes",
            overhead_per_blob(rss0, rss_after, stored, BLOB_SIZE as u64),
        )
        .reference(REF_OVERHEAD)
        .target(Target::AtMost(TARGET_OVERHEAD)),
    );
    rep.note(format!(
        "{stored} blobs in {:.1} s; RSS {:.1} MiB before, {:.1} MiB right after, {:.1} MiB {} s later",
        upload_time.as_secs_f64(),
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0,
        rss2 as f64 / 1048576.0,
        SETTLE.as_secs()
    ));
    if missing > 0 {
        rep.note(format!(
            "WARNING: {missing} of {} sampled blobs are missing afterwards (evicted?): the figure is not valid",
            sample.len()
        ));
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_arithmetic() {
        // 1000 blobs of 4096 B with 150 B of overhead each.
        let before = 10 << 20;
        let after = before + 1000 * (4096 + 150);
        assert_eq!(overhead_per_blob(before, after, 1000, 4096), Some(150.0));
        assert_eq!(overhead_per_blob(before, before, 0, 4096), None);
        assert!(overhead_per_blob(before, before, 10, 4096).unwrap() < 0.0);
    }
}
