//! Text formats: digests (`hash/size`), sizes, timestamps, and the
//! pretty-printed ActionResult of `kiln ac get`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{ActionResult, Digest, ExecutedActionMetadata};

use crate::error::{ClientError, ClientResult};

/// `hash/size`, the form every command prints and accepts.
pub fn digest_str(key: &BlobKey) -> String {
    format!("{}/{}", key.hash_hex(), key.size())
}

/// `hash/size` of a proto digest.
pub fn proto_digest_str(d: &Digest) -> String {
    format!("{}/{}", d.hash, d.size_bytes)
}

/// Parses `hash/size` (optionally `FUNCTION:hash/size`, where FUNCTION
/// must be `function`).
pub fn parse_digest(text: &str, function: DigestFunction) -> ClientResult<BlobKey> {
    let t = text.trim();
    let body = match t.split_once(':') {
        Some((f, rest)) => {
            if DigestFunction::from_name(f) != Some(function) {
                return Err(ClientError::Usage(format!(
                    "digest {text:?} names the function {f:?}, but --digest-function is {function}"
                )));
            }
            rest
        }
        None => t,
    };
    let bad = || {
        ClientError::Usage(format!(
            "invalid digest {text:?}: expected HASH/SIZE with a {}-character lowercase {function} hash",
            function.hex_len()
        ))
    };
    let (hash, size) = body.split_once('/').ok_or_else(bad)?;
    let size: i64 = size.parse().map_err(|_| bad())?;
    BlobKey::from_hex(function, hash, size)
        .map_err(|e| ClientError::Usage(format!("invalid digest {text:?}: {e}")))
}

/// Parses a digest the server sent.
pub fn server_digest(d: Option<&Digest>, function: DigestFunction, what: &str) -> ClientResult<BlobKey> {
    let d = d.ok_or_else(|| ClientError::BadResponse(format!("the server sent {what} without a digest")))?;
    BlobKey::from_digest(function, d)
        .map_err(|e| ClientError::BadResponse(format!("the server sent {what} with an invalid digest: {e}")))
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A protobuf timestamp as a point in time (None when unset/negative).
pub fn to_system_time(t: Option<&Timestamp>) -> Option<SystemTime> {
    let t = t?;
    if t.seconds <= 0 && t.nanos <= 0 {
        return None;
    }
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `1.234 s` / `12 ms`.
pub fn human_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.3} s", d.as_secs_f64())
    } else if d >= Duration::from_millis(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} µs", d.as_micros())
    }
}

/// Largest stdout/stderr printed inline by `ac get`.
pub const PRINT_INLINE_MAX: u64 = 16 << 10;

/// Formats an ActionResult. `stdout`/`stderr` are the contents when known
/// (inlined by the server or fetched), printed when small.
pub fn action_result(r: &ActionResult, stdout: Option<&[u8]>, stderr: Option<&[u8]>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "exit code: {}", r.exit_code);
    if !r.output_files.is_empty() {
        let _ = writeln!(s, "output files:");
        for f in &r.output_files {
            let d = f
                .digest
                .as_ref()
                .map(proto_digest_str)
                .unwrap_or_else(|| "(no digest)".into());
            let exec = if f.is_executable { "  (executable)" } else { "" };
            let _ = writeln!(s, "  {}  {d}{exec}", f.path);
        }
    }
    if !r.output_directories.is_empty() {
        let _ = writeln!(s, "output directories:");
        for d in &r.output_directories {
            let tree = d
                .tree_digest
                .as_ref()
                .map(proto_digest_str)
                .unwrap_or_else(|| "-".into());
            let _ = write!(s, "  {}  tree {tree}", d.path);
            if let Some(root) = &d.root_directory_digest {
                let _ = write!(s, "  root {}", proto_digest_str(root));
            }
            let _ = writeln!(s);
        }
    }
    #[allow(deprecated)]
    let symlinks = r
        .output_symlinks
        .iter()
        .chain(&r.output_file_symlinks)
        .chain(&r.output_directory_symlinks);
    let mut first = true;
    for l in symlinks {
        if first {
            let _ = writeln!(s, "output symlinks:");
            first = false;
        }
        let _ = writeln!(s, "  {} -> {}", l.path, l.target);
    }
    stream(&mut s, "stdout", r.stdout_digest.as_ref(), stdout);
    stream(&mut s, "stderr", r.stderr_digest.as_ref(), stderr);
    if let Some(md) = &r.execution_metadata {
        metadata(&mut s, md);
    }
    s
}

fn stream(s: &mut String, name: &str, digest: Option<&Digest>, content: Option<&[u8]>) {
    let size = digest
        .map(|d| d.size_bytes.max(0) as u64)
        .or(content.map(|c| c.len() as u64))
        .unwrap_or(0);
    if size == 0 {
        let _ = writeln!(s, "{name}: (empty)");
        return;
    }
    let d = digest
        .map(proto_digest_str)
        .unwrap_or_else(|| "(inline only)".into());
    let _ = writeln!(s, "{name}: {d} ({})", human_bytes(size));
    match content {
        Some(c) if (c.len() as u64) <= PRINT_INLINE_MAX => match std::str::from_utf8(c) {
            Ok(text) => {
                for line in text.lines() {
                    let _ = writeln!(s, "  | {line}");
                }
            }
            Err(_) => {
                let _ = writeln!(s, "  (binary content)");
            }
        },
        _ => {
            if let Some(d) = digest {
                let _ = writeln!(s, "  (not shown; `kiln cas get {}`)", proto_digest_str(d));
            }
        }
    }
}

fn metadata(s: &mut String, md: &ExecutedActionMetadata) {
    let _ = writeln!(s, "execution metadata:");
    if !md.worker.is_empty() {
        let _ = writeln!(s, "  worker: {}", md.worker);
    }
    let stamps = [
        ("queued", &md.queued_timestamp),
        ("worker start", &md.worker_start_timestamp),
        ("input fetch start", &md.input_fetch_start_timestamp),
        ("input fetch completed", &md.input_fetch_completed_timestamp),
        ("execution start", &md.execution_start_timestamp),
        ("execution completed", &md.execution_completed_timestamp),
        ("output upload start", &md.output_upload_start_timestamp),
        ("output upload completed", &md.output_upload_completed_timestamp),
        ("worker completed", &md.worker_completed_timestamp),
    ];
    for (name, t) in stamps {
        if let Some(t) = to_system_time(t.as_ref()) {
            let _ = writeln!(s, "  {:<24} {}", format!("{name}:"), rfc3339(t));
        }
    }
    let span = |a: &Option<Timestamp>, b: &Option<Timestamp>| {
        let (a, b) = (to_system_time(a.as_ref())?, to_system_time(b.as_ref())?);
        b.duration_since(a).ok()
    };
    let phases = [
        (
            "input fetch",
            span(
                &md.input_fetch_start_timestamp,
                &md.input_fetch_completed_timestamp,
            ),
        ),
        (
            "execution",
            span(&md.execution_start_timestamp, &md.execution_completed_timestamp),
        ),
        (
            "output upload",
            span(
                &md.output_upload_start_timestamp,
                &md.output_upload_completed_timestamp,
            ),
        ),
        (
            "queued to completed",
            span(&md.queued_timestamp, &md.worker_completed_timestamp),
        ),
    ];
    let durations: Vec<String> = phases
        .iter()
        .filter_map(|(name, d)| d.map(|d| format!("{name} {}", human_duration(d))))
        .collect();
    if !durations.is_empty() {
        let _ = writeln!(s, "  durations: {}", durations.join(", "));
    }
    if let Some(v) = &md.virtual_execution_duration
        && (v.seconds > 0 || v.nanos > 0)
    {
        let d = Duration::new(v.seconds.max(0) as u64, v.nanos.max(0) as u32);
        let _ = writeln!(s, "  virtual execution duration: {}", human_duration(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print() {
        let f = DigestFunction::Sha256;
        let key = BlobKey::of(f, b"hello");
        let text = digest_str(&key);
        assert_eq!(parse_digest(&text, f).unwrap(), key);
        assert_eq!(parse_digest(&format!("sha256:{text}"), f).unwrap(), key);
        assert!(parse_digest(&format!("blake3:{text}"), f).is_err());
        assert!(parse_digest("abc/1", f).is_err());
        assert!(parse_digest(&key.hash_hex(), f).is_err());
        assert!(parse_digest(&format!("{}/-1", key.hash_hex()), f).is_err());
        assert!(parse_digest(&format!("{}/x", key.hash_hex()), f).is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 20), "4.0 MiB");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.500 s");
        assert_eq!(human_duration(Duration::from_millis(12)), "12 ms");
    }
}
