//! Phase timestamps and the resource usage Kiln attaches to
//! `ExecutedActionMetadata.auxiliary_metadata`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::protobuf::{Any, Duration as ProtoDuration, Timestamp};

/// Type URL of [`ResourceUsage`] inside `auxiliary_metadata`.
pub const RESOURCE_USAGE_TYPE_URL: &str = "type.googleapis.com/kiln.worker.v1.ResourceUsage";

/// Resources the action's processes used (all of them: the command and
/// every process it started), from `getrusage(RUSAGE_CHILDREN)` of the
/// sandbox's init after it reaped them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceUsage {
    /// CPU time in user mode.
    #[prost(message, optional, tag = "1")]
    pub user_cpu: Option<ProtoDuration>,
    /// CPU time in the kernel.
    #[prost(message, optional, tag = "2")]
    pub system_cpu: Option<ProtoDuration>,
    /// Largest resident set size of any single process, in bytes.
    #[prost(uint64, tag = "3")]
    pub peak_memory_bytes: u64,
    /// Whether the action ran in the namespace sandbox.
    #[prost(bool, tag = "4")]
    pub sandboxed: bool,
    /// Whether the action had network access.
    #[prost(bool, tag = "5")]
    pub network: bool,
    /// Signal that terminated the command (0 if it exited).
    #[prost(int32, tag = "6")]
    pub signal: i32,
}

impl ResourceUsage {
    pub fn to_any(&self) -> Any {
        kiln_proto::rpc_details::to_any(RESOURCE_USAGE_TYPE_URL, self)
    }
}

/// A protobuf Timestamp of `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The current time as a Timestamp.
pub fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

/// A protobuf Duration of `d`.
pub fn proto_duration(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A std Duration from a protobuf one (negative = zero).
pub fn std_duration(d: &ProtoDuration) -> Duration {
    if d.seconds < 0 || (d.seconds == 0 && d.nanos <= 0) {
        return Duration::ZERO;
    }
    Duration::new(d.seconds as u64, d.nanos.max(0) as u32)
}
