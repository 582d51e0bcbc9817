//! Latency samples and percentiles (exact: sorted samples, nearest rank).

use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Nanoseconds, sorted ascending.
    sorted: Vec<u64>,
}

impl Latencies {
    pub fn from_samples(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Latencies { sorted: samples }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Nearest-rank percentile `p` in [0, 100]: the smallest sample such
    /// that at least p% of samples are <= it. `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.sorted.len();
        if n == 0 {
            return None;
        }
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        Some(Duration::from_nanos(self.sorted[idx]))
    }

    pub fn max(&self) -> Option<Duration> {
        self.sorted.last().map(|&n| Duration::from_nanos(n))
    }

    pub fn mean(&self) -> Option<Duration> {
        if self.sorted.is_empty() {
            return None;
        }
        let sum: u128 = self.sorted.iter().map(|&n| n as u128).sum();
        Some(Duration::from_nanos((sum / self.sorted.len() as u128) as u64))
    }
}

/// Human form of a latency: µs below 10 ms, ms above.
pub fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latencies::from_samples((1..=100).rev().collect());
        assert_eq!(l.percentile(50.0), Some(Duration::from_nanos(50)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_nanos(99)));
        assert_eq!(l.percentile(100.0), Some(Duration::from_nanos(100)));
        assert_eq!(l.percentile(0.0), Some(Duration::from_nanos(1)));
        assert_eq!(l.percentile(0.5), Some(Duration::from_nanos(1)));
        assert_eq!(l.max(), Some(Duration::from_nanos(100)));
        assert_eq!(l.mean(), Some(Duration::from_nanos(50)));
    }

    #[test]
    fn small_and_empty() {
        assert_eq!(Latencies::default().percentile(50.0), None);
        assert_eq!(Latencies::default().mean(), None);
        let one = Latencies::from_samples(vec![7]);
        assert_eq!(one.percentile(99.0), Some(Duration::from_nanos(7)));
        let two = Latencies::from_samples(vec![10, 20]);
        assert_eq!(two.percentile(50.0), Some(Duration::from_nanos(10)));
        assert_eq!(two.percentile(51.0), Some(Duration::from_nanos(20)));
    }

    #[test]
    fn latency_format() {
        assert_eq!(fmt_latency(Duration::from_micros(41)), "41 µs");
        assert_eq!(fmt_latency(Duration::from_millis(42)), "42.0 ms");
    }
}
