//! The closed-loop load driver: `concurrency` workers each issue one
//! operation at a time until the deadline, the operation budget, or their
//! own supply of work runs out. Server and client CPU are sampled around
//! the whole timed phase.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::procstat::{CpuTicks, ProcWatch};
use crate::stats::Latencies;

/// Latency samples kept across all workers (bounds client memory).
const MAX_SAMPLES: usize = 4_000_000;
/// A worker gives up after this many consecutive failures.
const MAX_CONSECUTIVE_ERRORS: u32 = 20;

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub concurrency: usize,
    pub duration: Duration,
    pub max_ops: u64,
}

/// What one successful operation did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Done {
    /// Items served (results, digests, blobs).
    pub items: u64,
    /// Payload bytes moved.
    pub bytes: u64,
}

/// Processes whose CPU is accounted.
#[derive(Debug, Clone)]
pub struct Meters {
    pub server: Option<ProcWatch>,
    pub client: ProcWatch,
}

/// A snapshot of both processes' CPU.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    server: Option<CpuTicks>,
    client: Option<CpuTicks>,
}

/// CPU used between two marks.
#[derive(Debug, Clone, Copy)]
pub struct CpuSpan {
    pub wall: Duration,
    pub server: Option<Duration>,
    pub client: Option<Duration>,
}

impl Meters {
    pub fn mark(&self) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: self.server.as_ref().and_then(|s| s.cpu().ok()),
            client: self.client.cpu().ok(),
        }
    }

    pub fn span(&self, from: &CpuMark) -> CpuSpan {
        let to = self.mark();
        let server = match (&self.server, from.server, to.server) {
            (Some(w), Some(a), Some(b)) => Some(w.ticks_to_duration(b.since(&a).total())),
            _ => None,
        };
        let client = match (from.client, to.client) {
            (Some(a), Some(b)) => Some(self.client.ticks_to_duration(b.since(&a).total())),
            _ => None,
        };
        CpuSpan {
            wall: to.at.duration_since(from.at),
            server,
            client,
        }
    }
}

#[derive(Debug)]
pub struct Outcome {
    pub ops: u64,
    pub items: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub cpu: CpuSpan,
    pub latency: Latencies,
    /// Some worker ran out of prepared work before the deadline.
    pub exhausted: bool,
}

impl Outcome {
    pub fn secs(&self) -> f64 {
        self.cpu.wall.as_secs_f64().max(1e-9)
    }

    pub fn items_per_sec(&self) -> f64 {
        self.items as f64 / self.secs()
    }

    /// Decimal GB/s.
    pub fn gb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e9 / self.secs()
    }

    /// Server CPU µs per item.
    pub fn server_us_per_item(&self) -> Option<f64> {
        per(self.cpu.server?, self.items as f64).map(|s| s * 1e6)
    }

    /// Server CPU seconds per decimal GB moved.
    pub fn server_s_per_gb(&self) -> Option<f64> {
        per(self.cpu.server?, self.bytes as f64 / 1e9)
    }

    /// Client CPU as a share of one core over the run.
    pub fn client_cores(&self) -> Option<f64> {
        Some(self.cpu.client?.as_secs_f64() / self.secs())
    }

    pub fn server_cores(&self) -> Option<f64> {
        Some(self.cpu.server?.as_secs_f64() / self.secs())
    }

    /// A short line: ops, errors, CPU shares, latency.
    pub fn summary(&self) -> String {
        let mut s = format!("{} ops in {:.2} s", self.ops, self.secs());
        if let (Some(p50), Some(p99), Some(max), Some(mean)) = (
            self.latency.percentile(50.0),
            self.latency.percentile(99.0),
            self.latency.max(),
            self.latency.mean(),
        ) {
            use crate::stats::fmt_latency as f;
            s.push_str(&format!(
                ", latency p50 {} p99 {} max {} mean {}",
                f(p50),
                f(p99),
                f(max),
                f(mean)
            ));
        }
        if let Some(c) = self.server_cores() {
            s.push_str(&format!(", server {c:.2} cores"));
        }
        if let Some(c) = self.client_cores() {
            s.push_str(&format!(", client {c:.2} cores"));
        }
        if self.errors > 0 {
            s.push_str(&format!(
                ", {} ERRORS (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        if self.exhausted {
            s.push_str(", prepared work ran out before the deadline");
        }
        s
    }

    /// Fails when nothing succeeded.
    pub fn require_success(self, what: &str) -> Result<Self> {
        if self.ops == 0 {
            return Err(BenchError::new(format!(
                "{what}: no operation succeeded ({} errors; first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("none")
            )));
        }
        Ok(self)
    }
}

fn per(cpu: Duration, units: f64) -> Option<f64> {
    (units > 0.0).then(|| cpu.as_secs_f64() / units)
}

struct WorkerResult {
    ops: u64,
    items: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    samples: Vec<u64>,
    exhausted: bool,
}

/// Runs the closed loop. `make(worker_index)` builds each worker's
/// operation; the operation is called with a global operation number and
/// returns `Ok(None)` when that worker has no more work.
pub async fn run<M, F, Fut>(spec: Spec, meters: &Meters, mut make: M) -> Outcome
where
    M: FnMut(usize) -> F,
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<Done>>> + Send,
{
    let concurrency = spec.concurrency.max(1);
    let budget = Arc::new(AtomicU64::new(0));
    let per_worker_samples = MAX_SAMPLES / concurrency;
    let ops: Vec<F> = (0..concurrency).map(&mut make).collect();

    let start = meters.mark();
    let deadline = start.at + spec.duration;
    let mut set = tokio::task::JoinSet::new();
    for mut op in ops {
        let budget = budget.clone();
        let max_ops = spec.max_ops;
        set.spawn(async move {
            let mut r = WorkerResult {
                ops: 0,
                items: 0,
                bytes: 0,
                errors: 0,
                first_error: None,
                samples: Vec::with_capacity(per_worker_samples.min(1 << 16)),
                exhausted: false,
            };
            let mut consecutive = 0u32;
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                let n = budget.fetch_add(1, Ordering::Relaxed);
                if n >= max_ops {
                    break;
                }
                let t0 = Instant::now();
                match op(n).await {
                    Ok(Some(done)) => {
                        let ns = t0.elapsed().as_nanos() as u64;
                        if r.samples.len() < per_worker_samples {
                            r.samples.push(ns);
                        }
                        r.ops += 1;
                        r.items += done.items;
                        r.bytes += done.bytes;
                        consecutive = 0;
                    }
                    Ok(None) => {
                        r.exhausted = true;
                        break;
                    }
                    Err(e) => {
                        r.errors += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(e.to_string());
                        }
                        consecutive += 1;
                        if consecutive >= MAX_CONSECUTIVE_ERRORS {
                            break;
                        }
                    }
                }
            }
            r
        });
    }
    let mut results = Vec::with_capacity(concurrency);
    let mut join_errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(r) => results.push(r),
            Err(e) => join_errors.push(e.to_string()),
        }
    }
    let cpu = meters.span(&start);

    let mut samples = Vec::new();
    let mut out = Outcome {
        ops: 0,
        items: 0,
        bytes: 0,
        errors: join_errors.len() as u64,
        first_error: join_errors.into_iter().next(),
        cpu,
        latency: Latencies::default(),
        exhausted: false,
    };
    for r in results {
        out.ops += r.ops;
        out.items += r.items;
        out.bytes += r.bytes;
        out.errors += r.errors;
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
        out.exhausted |= r.exhausted;
        samples.extend(r.samples);
    }
    out.latency = Latencies::from_samples(samples);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procstat::clock_ticks_per_sec;

    fn meters() -> Meters {
        Meters {
            server: None,
            client: ProcWatch::this_process(clock_ticks_per_sec()),
        }
    }

    #[tokio::test]
    async fn bounded_by_op_budget() {
        let spec = Spec {
            concurrency: 4,
            duration: Duration::from_secs(30),
            max_ops: 1000,
        };
        let out = run(spec, &meters(), |_| {
            |_n| async { Ok(Some(Done { items: 3, bytes: 10 })) }
        })
        .await;
        assert_eq!(out.ops, 1000);
        assert_eq!(out.items, 3000);
        assert_eq!(out.bytes, 10_000);
        assert_eq!(out.latency.len(), 1000);
        assert!(out.cpu.wall < Duration::from_secs(30));
        assert!(out.cpu.server.is_none());
        assert!(!out.exhausted);
    }

    #[tokio::test]
    async fn bounded_by_deadline() {
        let spec = Spec {
            concurrency: 2,
            duration: Duration::from_millis(100),
            max_ops: u64::MAX,
        };
        let t0 = Instant::now();
        let out = run(spec, &meters(), |_| {
            |_n| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(Some(Done::default()))
            }
        })
        .await;
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(out.ops >= 2 && out.ops <= 2 * 21, "{}", out.ops);
    }

    #[tokio::test]
    async fn exhaustion_and_errors() {
        let spec = Spec {
            concurrency: 2,
            duration: Duration::from_secs(30),
            max_ops: u64::MAX,
        };
        // Worker 0 does 5 ops then runs dry; worker 1 always fails and
        // gives up after MAX_CONSECUTIVE_ERRORS.
        let out = run(spec, &meters(), |w| {
            let mut left = 5u32;
            move |_n| {
                let r = if w == 1 {
                    Err(BenchError::new("boom"))
                } else if left == 0 {
                    Ok(None)
                } else {
                    left -= 1;
                    Ok(Some(Done { items: 1, bytes: 0 }))
                };
                async move { r }
            }
        })
        .await;
        assert_eq!(out.ops, 5);
        assert!(out.exhausted);
        assert_eq!(out.errors, MAX_CONSECUTIVE_ERRORS as u64);
        assert_eq!(out.first_error.as_deref(), Some("boom"));
        assert!(out.summary().contains("ERRORS"));
        let failed = run(spec, &meters(), |_| {
            |_n| async { Err::<Option<Done>, _>(BenchError::new("x")) }
        })
        .await;
        assert!(failed.require_success("t").is_err());
    }
}
