//! Intervals between protobuf timestamps, by one rule for every reader of
//! `ExecutedActionMetadata` (metrics, the dashboard, the benchmarks).

use std::time::Duration;

use crate::protobuf::Timestamp;

/// The time from `from` to `to`; `None` when either is absent or unset
/// (the zero timestamp, as proto3 encodes an unset field) or when `to` is
/// before `from`.
pub fn interval(from: Option<&Timestamp>, to: Option<&Timestamp>) -> Option<Duration> {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let d = u128::try_from(nanos(to?)? - nanos(from?)?).ok()?;
    Some(Duration::new(
        u64::try_from(d / NANOS_PER_SEC).ok()?,
        u32::try_from(d % NANOS_PER_SEC).ok()?,
    ))
}

/// Nanoseconds since the epoch of a set timestamp.
fn nanos(t: &Timestamp) -> Option<i128> {
    if t.seconds == 0 && t.nanos == 0 {
        return None;
    }
    Some(i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    #[test]
    fn both_ends_set_and_in_order() {
        assert_eq!(
            interval(ts(10, 500_000_000).as_ref(), ts(12, 0).as_ref()),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            interval(ts(10, 7).as_ref(), ts(10, 7).as_ref()),
            Some(Duration::ZERO)
        );
        assert_eq!(interval(ts(10, 0).as_ref(), None), None);
        assert_eq!(interval(None, ts(10, 0).as_ref()), None);
        assert_eq!(interval(ts(12, 0).as_ref(), ts(10, 0).as_ref()), None);
        assert_eq!(interval(ts(10, 1).as_ref(), ts(10, 0).as_ref()), None);
    }

    #[test]
    fn an_unset_timestamp_is_no_end() {
        // Not 1.7e9 seconds since the epoch.
        assert_eq!(interval(ts(0, 0).as_ref(), ts(1_700_000_000, 0).as_ref()), None);
        assert_eq!(interval(ts(1_700_000_000, 0).as_ref(), ts(0, 0).as_ref()), None);
    }
}
