//! JSON shapes shared by the API endpoints, converted from the protocol
//! types. Times are milliseconds since the Unix epoch; durations are
//! milliseconds.

use kiln_digest::DigestFunction;
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{Digest, Directory, ExecutedActionMetadata, Platform};
use serde::Serialize;

use crate::digest_path::instance_segment;

/// A time as milliseconds since the Unix epoch.
pub use kiln_scheduler::operations::epoch_ms as ms;

/// A digest with its function, as the front-end links it.
#[derive(Debug, Clone, Serialize)]
pub struct DigestJson {
    pub function: &'static str,
    pub hash: String,
    pub size: i64,
}

impl DigestJson {
    pub fn new(f: DigestFunction, d: &Digest) -> Self {
        DigestJson {
            function: f.name(),
            hash: d.hash.clone(),
            size: d.size_bytes,
        }
    }

    pub fn opt(f: DigestFunction, d: Option<&Digest>) -> Option<Self> {
        d.map(|d| Self::new(f, d))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Property {
    pub name: String,
    pub value: String,
}

/// Name/value pairs (platform properties, environment variables) as JSON.
pub fn properties<N: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (N, V)>) -> Vec<Property> {
    pairs
        .into_iter()
        .map(|(name, value)| Property {
            name: name.as_ref().to_owned(),
            value: value.as_ref().to_owned(),
        })
        .collect()
}

pub fn platform(p: Option<&Platform>) -> Vec<Property> {
    p.map(|p| properties(p.properties.iter().map(|x| (&x.name, &x.value))))
        .unwrap_or_default()
}

pub fn ts_ms(t: Option<&Timestamp>) -> Option<i64> {
    let t = t?;
    if t.seconds == 0 && t.nanos == 0 {
        return None;
    }
    Some(t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000))
}

/// Milliseconds between two timestamps when both are set and ordered.
fn span(a: Option<&Timestamp>, b: Option<&Timestamp>) -> Option<i64> {
    i64::try_from(kiln_proto::time::interval(a, b)?.as_millis()).ok()
}

/// The phases of one execution, from its ExecutedActionMetadata.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Queued until a worker started it.
    pub queued_ms: Option<i64>,
    pub fetch_ms: Option<i64>,
    pub execute_ms: Option<i64>,
    pub upload_ms: Option<i64>,
    /// Queued until the worker completed it.
    pub total_ms: Option<i64>,
    /// Worker start to worker completion.
    pub worker_ms: Option<i64>,
}

impl Timing {
    pub fn of(md: &ExecutedActionMetadata) -> Self {
        Timing {
            queued_ms: span(md.queued_timestamp.as_ref(), md.worker_start_timestamp.as_ref()),
            fetch_ms: span(
                md.input_fetch_start_timestamp.as_ref(),
                md.input_fetch_completed_timestamp.as_ref(),
            ),
            execute_ms: span(
                md.execution_start_timestamp.as_ref(),
                md.execution_completed_timestamp.as_ref(),
            ),
            upload_ms: span(
                md.output_upload_start_timestamp.as_ref(),
                md.output_upload_completed_timestamp.as_ref(),
            ),
            total_ms: span(
                md.queued_timestamp.as_ref(),
                md.worker_completed_timestamp.as_ref(),
            ),
            worker_ms: span(
                md.worker_start_timestamp.as_ref(),
                md.worker_completed_timestamp.as_ref(),
            ),
        }
    }
}

/// Every timestamp of an ExecutedActionMetadata.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataJson {
    pub worker: String,
    pub queued: Option<i64>,
    pub worker_start: Option<i64>,
    pub input_fetch_start: Option<i64>,
    pub input_fetch_completed: Option<i64>,
    pub execution_start: Option<i64>,
    pub execution_completed: Option<i64>,
    pub output_upload_start: Option<i64>,
    pub output_upload_completed: Option<i64>,
    pub worker_completed: Option<i64>,
    pub timing: Timing,
}

impl MetadataJson {
    pub fn of(md: &ExecutedActionMetadata) -> Self {
        MetadataJson {
            worker: md.worker.clone(),
            queued: ts_ms(md.queued_timestamp.as_ref()),
            worker_start: ts_ms(md.worker_start_timestamp.as_ref()),
            input_fetch_start: ts_ms(md.input_fetch_start_timestamp.as_ref()),
            input_fetch_completed: ts_ms(md.input_fetch_completed_timestamp.as_ref()),
            execution_start: ts_ms(md.execution_start_timestamp.as_ref()),
            execution_completed: ts_ms(md.execution_completed_timestamp.as_ref()),
            output_upload_start: ts_ms(md.output_upload_start_timestamp.as_ref()),
            output_upload_completed: ts_ms(md.output_upload_completed_timestamp.as_ref()),
            worker_completed: ts_ms(md.worker_completed_timestamp.as_ref()),
            timing: Timing::of(md),
        }
    }
}

/// The phase a running action is in, from its partial metadata.
pub fn phase(started: bool, md: Option<&ExecutedActionMetadata>) -> &'static str {
    let set = |t: Option<&Timestamp>| ts_ms(t).is_some();
    match md {
        Some(m) if set(m.output_upload_start_timestamp.as_ref()) => "uploading",
        Some(m) if set(m.execution_start_timestamp.as_ref()) => "executing",
        Some(m) if set(m.input_fetch_start_timestamp.as_ref()) => "fetching",
        _ if started => "started",
        _ => "assigned",
    }
}

/// The canonical name of a `google.rpc.Code` number (unknown numbers are
/// `UNKNOWN`).
pub fn code_name(code: i32) -> &'static str {
    kiln_proto::rpc_details::code_name(code.into())
}

#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    pub name: String,
    pub digest: Option<DigestJson>,
    pub executable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirEntry {
    pub name: String,
    pub digest: Option<DigestJson>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SymlinkEntry {
    pub name: String,
    pub target: String,
}

/// A decoded Directory.
#[derive(Debug, Clone, Serialize)]
pub struct DirectoryJson {
    pub instance: String,
    pub files: Vec<FileEntry>,
    pub directories: Vec<DirEntry>,
    pub symlinks: Vec<SymlinkEntry>,
}

impl DirectoryJson {
    pub fn of(instance: &str, f: DigestFunction, d: &Directory) -> Self {
        DirectoryJson {
            instance: instance_segment(instance).to_string(),
            files: d
                .files
                .iter()
                .map(|x| FileEntry {
                    name: x.name.clone(),
                    digest: DigestJson::opt(f, x.digest.as_ref()),
                    executable: x.is_executable,
                })
                .collect(),
            directories: d
                .directories
                .iter()
                .map(|x| DirEntry {
                    name: x.name.clone(),
                    digest: DigestJson::opt(f, x.digest.as_ref()),
                })
                .collect(),
            symlinks: d
                .symlinks
                .iter()
                .map(|x| SymlinkEntry {
                    name: x.name.clone(),
                    target: x.target.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: i64) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        })
    }

    #[test]
    fn timing_from_metadata() {
        let md = ExecutedActionMetadata {
            queued_timestamp: ts(1_000),
            worker_start_timestamp: ts(1_250),
            input_fetch_start_timestamp: ts(1_300),
            input_fetch_completed_timestamp: ts(1_400),
            execution_start_timestamp: ts(1_400),
            execution_completed_timestamp: ts(2_400),
            output_upload_start_timestamp: ts(2_400),
            output_upload_completed_timestamp: ts(2_450),
            worker_completed_timestamp: ts(2_500),
            ..Default::default()
        };
        let t = Timing::of(&md);
        assert_eq!(t.queued_ms, Some(250));
        assert_eq!(t.fetch_ms, Some(100));
        assert_eq!(t.execute_ms, Some(1000));
        assert_eq!(t.upload_ms, Some(50));
        assert_eq!(t.total_ms, Some(1500));
        assert_eq!(t.worker_ms, Some(1250));
        assert_eq!(phase(true, Some(&md)), "uploading");
        assert_eq!(phase(true, None), "started");
        assert_eq!(phase(false, Some(&ExecutedActionMetadata::default())), "assigned");
        assert_eq!(Timing::of(&ExecutedActionMetadata::default()).total_ms, None);
    }
}
