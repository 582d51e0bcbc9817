//! `kiln status`: what the server advertises in GetCapabilities and, from
//! a Kiln scheduler, its workers, queue and running actions
//! (`kiln.status.v1.Status`; other servers have no such call).

use std::fmt::Write as _;

use kiln_proto::reapi::compressor::Value as Compressor;
use kiln_proto::reapi::digest_function::Value as ProtoFn;
use kiln_proto::reapi::symlink_absolute_path_strategy::Value as SymlinkStrategy;
use kiln_proto::reapi::{PriorityCapabilities, ServerCapabilities};
use kiln_proto::semver::SemVer;

use crate::ClientOptions;
use crate::console::Console;
use crate::error::{ClientResult, EXIT_OK};
use crate::format::human_bytes;
use crate::remote::Remote;

pub(crate) async fn run(opts: &ClientOptions, console: &mut Console) -> ClientResult<u8> {
    let remote = Remote::connect(opts).await?;
    let caps = remote.capabilities().await?;
    let mut text = describe(&remote, caps);
    match remote.kiln_status().await? {
        Some(st) => describe_live(&mut text, &st),
        None => {
            let _ = writeln!(
                text,
                "workers and queue: not available (the server does not serve kiln.status.v1.Status: \
                 not Kiln, or Kiln without a scheduler)"
            );
        }
    }
    console.out_bytes(text.as_bytes()).await?;
    Ok(EXIT_OK)
}

fn semver(v: Option<&SemVer>) -> Option<String> {
    let v = v?;
    let mut s = format!("{}.{}", v.major, v.minor);
    if v.patch != 0 {
        let _ = write!(s, ".{}", v.patch);
    }
    if !v.prerelease.is_empty() {
        let _ = write!(s, "-{}", v.prerelease);
    }
    Some(s)
}

fn function_names(values: &[i32]) -> String {
    if values.is_empty() {
        return "(none listed)".into();
    }
    values
        .iter()
        .map(|v| match ProtoFn::try_from(*v) {
            Ok(f) => f.as_str_name().to_ascii_lowercase(),
            Err(_) => format!("#{v}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn compressor_names(values: &[i32]) -> String {
    let mut names: Vec<String> = vec!["identity".into()];
    for v in values {
        let name = match Compressor::try_from(*v) {
            Ok(Compressor::Identity) => continue,
            Ok(c) => c.as_str_name().to_ascii_lowercase(),
            Err(_) => format!("#{v}"),
        };
        names.push(name);
    }
    names.join(", ")
}

fn priorities(p: Option<&PriorityCapabilities>) -> Option<String> {
    let p = p?;
    if p.priorities.is_empty() {
        return None;
    }
    Some(
        p.priorities
            .iter()
            .map(|r| format!("{}..{}", r.min_priority, r.max_priority))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The status report.
pub(crate) fn describe(remote: &Remote, caps: &ServerCapabilities) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "endpoint: {}", remote.endpoint());
    let _ = writeln!(s, "instance: {:?}", remote.instance());
    let low = semver(caps.low_api_version.as_ref());
    let high = semver(caps.high_api_version.as_ref());
    match (low, high) {
        (Some(l), Some(h)) => {
            let _ = writeln!(s, "api versions: {l} to {h}");
        }
        (l, h) => {
            let _ = writeln!(
                s,
                "api versions: {} to {}",
                l.unwrap_or_else(|| "?".into()),
                h.unwrap_or_else(|| "?".into())
            );
        }
    }
    if let Some(d) = semver(caps.deprecated_api_version.as_ref()) {
        let _ = writeln!(s, "deprecated api version: {d}");
    }
    match &caps.cache_capabilities {
        None => {
            let _ = writeln!(s, "cache: not advertised");
        }
        Some(c) => {
            let _ = writeln!(s, "cache:");
            let _ = writeln!(s, "  digest functions: {}", function_names(&c.digest_functions));
            let update = c
                .action_cache_update_capabilities
                .as_ref()
                .is_some_and(|u| u.update_enabled);
            let _ = writeln!(
                s,
                "  action cache updates by clients: {}",
                if update { "allowed" } else { "not allowed" }
            );
            let batch = if c.max_batch_total_size_bytes > 0 {
                format!(
                    "{} ({} bytes)",
                    human_bytes(c.max_batch_total_size_bytes as u64),
                    c.max_batch_total_size_bytes
                )
            } else {
                "no limit advertised".into()
            };
            let _ = writeln!(s, "  max batch total size: {batch}");
            let blob = if c.max_cas_blob_size_bytes > 0 {
                format!(
                    "{} ({} bytes)",
                    human_bytes(c.max_cas_blob_size_bytes as u64),
                    c.max_cas_blob_size_bytes
                )
            } else {
                "no limit".into()
            };
            let _ = writeln!(s, "  max blob size: {blob}");
            let _ = writeln!(s, "  compressors: {}", compressor_names(&c.supported_compressors));
            let _ = writeln!(
                s,
                "  batch update compressors: {}",
                compressor_names(&c.supported_batch_update_compressors)
            );
            let symlinks = match SymlinkStrategy::try_from(c.symlink_absolute_path_strategy) {
                Ok(SymlinkStrategy::Allowed) => "allowed",
                Ok(SymlinkStrategy::Disallowed) => "disallowed",
                _ => "unspecified",
            };
            let _ = writeln!(s, "  absolute symlink targets: {symlinks}");
            let _ = writeln!(
                s,
                "  split/splice blobs: {}/{}",
                yes_no(c.split_blob_support),
                yes_no(c.splice_blob_support)
            );
            if let Some(p) = priorities(c.cache_priority_capabilities.as_ref()) {
                let _ = writeln!(s, "  cache priorities: {p}");
            }
        }
    }
    match &caps.execution_capabilities {
        Some(e) if e.exec_enabled => {
            let _ = writeln!(s, "execution: enabled");
            let mut fns = e.digest_functions.clone();
            if fns.is_empty() && e.digest_function != 0 {
                fns.push(e.digest_function);
            }
            let _ = writeln!(s, "  digest functions: {}", function_names(&fns));
            if let Some(p) = priorities(e.execution_priority_capabilities.as_ref()) {
                let _ = writeln!(s, "  priorities: {p}");
            }
            if !e.supported_node_properties.is_empty() {
                let _ = writeln!(s, "  node properties: {}", e.supported_node_properties.join(", "));
            }
        }
        _ => {
            let _ = writeln!(s, "execution: not enabled");
        }
    }
    s
}

/// Workers, queue and running actions from `kiln.status.v1.Status`.
pub(crate) fn describe_live(s: &mut String, st: &kiln_proto::status::StatusResponse) {
    let slots: u32 = st.workers.iter().filter(|w| w.connected).map(|w| w.slots).sum();
    let busy: u32 = st.workers.iter().filter(|w| w.connected).map(|w| w.busy).sum();
    let _ = writeln!(
        s,
        "workers: {} ({} connected), {busy} of {slots} slots busy",
        st.workers.len(),
        st.workers.iter().filter(|w| w.connected).count()
    );
    // Worker- and client-supplied strings are printed with control
    // characters escaped.
    for w in &st.workers {
        let mut state = if w.connected { "connected" } else { "disconnected" }.to_string();
        if w.draining {
            state.push_str(", draining");
        }
        let _ = writeln!(
            s,
            "  {}  {}/{} slots busy  load {:.2}  {state}  seen {:.0}s ago",
            w.name.escape_debug(),
            w.busy,
            w.slots,
            w.load,
            w.last_seen_seconds
        );
        if !w.properties.is_empty() {
            let _ = writeln!(s, "    {}", w.properties.join(" ").escape_debug());
        }
    }
    let _ = writeln!(s, "queue: {} queued, {} executing", st.queued, st.executing);
    for q in &st.queues {
        let platform = if q.platform.is_empty() {
            "(no properties)".to_string()
        } else {
            q.platform.escape_debug().to_string()
        };
        let _ = writeln!(s, "  {platform}: {} queued", q.queued);
    }
    if !st.running.is_empty() {
        let _ = writeln!(s, "running (longest first):");
        for r in &st.running {
            let digest = r
                .action_digest
                .as_ref()
                .map(crate::format::proto_digest_str)
                .unwrap_or_default();
            let what = [r.mnemonic.as_str(), r.target_id.as_str()]
                .iter()
                .filter(|x| !x.is_empty())
                .map(|x| x.escape_debug().to_string())
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                s,
                "  {digest}  on {}  {:.1}s  {what}",
                r.worker_name.escape_debug(),
                r.running_seconds
            );
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use kiln_proto::reapi::Digest;
    use kiln_proto::status::{PlatformQueue, RunningAction, StatusResponse, WorkerStatus};

    use super::*;

    #[test]
    fn live_status_escapes_supplied_strings() {
        let st = StatusResponse {
            workers: vec![WorkerStatus {
                id: "w1".into(),
                name: "w\x1b[1".into(),
                slots: 2,
                busy: 1,
                properties: vec!["OSFamily=linux\n".into(), "pool=a\x07".into()],
                connected: true,
                ..Default::default()
            }],
            queued: 1,
            executing: 1,
            queues: vec![PlatformQueue {
                platform: "OSFamily=li\rnux".into(),
                queued: 1,
            }],
            running: vec![RunningAction {
                action_digest: Some(Digest {
                    hash: "ab".repeat(32),
                    size_bytes: 42,
                }),
                worker_name: "evil\x1b]0;x\x07".into(),
                mnemonic: "Gen\nrule".into(),
                ..Default::default()
            }],
            server_version: String::new(),
        };
        let mut s = String::new();
        describe_live(&mut s, &st);
        assert!(
            !s.chars().any(|c| c.is_control() && c != '\n'),
            "control characters printed raw: {s:?}"
        );
        assert_eq!(s.lines().count(), 7, "{s}");
        assert!(s.contains(r"w\u{1b}[1  1/2 slots busy"), "{s}");
        assert!(s.contains(r"    OSFamily=linux\n pool=a\u{7}"), "{s}");
        assert!(s.contains(r"  OSFamily=li\rnux: 1 queued"), "{s}");
        assert!(
            s.contains(&format!(
                r"  {}/42  on evil\u{{1b}}]0;x\u{{7}}  0.0s  Gen\nrule",
                "ab".repeat(32)
            )),
            "{s}"
        );
    }
}
