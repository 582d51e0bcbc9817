//! `/api/actions`: the last finished actions, newest first.

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};

use crate::digest_path::instance_segment;
use crate::json::{self, DigestJson, MetadataJson, Property, code_name};
use crate::recent::{RECENT_ACTIONS, Recent};
use crate::state::Shared;

/// One finished action as the Actions page shows it.
#[derive(Serialize)]
pub struct RecordJson {
    seq: u64,
    operation: String,
    instance: String,
    digest: DigestJson,
    cached: bool,
    status_code: i32,
    status: &'static str,
    exit_code: Option<i32>,
    /// Failed: non-zero exit code or an error status.
    failed: bool,
    worker: String,
    mnemonic: String,
    target_id: String,
    invocation_id: String,
    correlated_invocations_id: String,
    tool: String,
    platform: Vec<Property>,
    completed_at: i64,
    /// The execution's timestamps and phases (`metadata.timing`); for a
    /// cache hit, of the run that produced the cached result.
    metadata: Option<MetadataJson>,
}

impl RecordJson {
    pub fn of(r: &Recent) -> Self {
        let rec = &r.record;
        let tool = match (rec.request.tool_name.as_str(), rec.request.tool_version.as_str()) {
            ("", _) => String::new(),
            (name, "") => name.to_string(),
            (name, version) => format!("{name} {version}"),
        };
        RecordJson {
            seq: r.seq,
            operation: rec.operation.clone(),
            instance: instance_segment(&rec.instance_name).to_string(),
            digest: DigestJson::new(rec.digest_function, &rec.action_digest),
            cached: rec.cached,
            status_code: rec.status_code,
            status: code_name(rec.status_code),
            exit_code: rec.exit_code,
            failed: rec.failed(),
            worker: rec.worker.clone(),
            mnemonic: rec.request.action_mnemonic.clone(),
            target_id: rec.request.target_id.clone(),
            invocation_id: rec.request.tool_invocation_id.clone(),
            correlated_invocations_id: rec.request.correlated_invocations_id.clone(),
            tool,
            platform: json::platform(Some(&rec.platform)),
            completed_at: json::ms(rec.completed_at),
            metadata: rec.metadata.as_ref().map(MetadataJson::of),
        }
    }
}

#[derive(Deserialize)]
pub struct RecentQuery {
    /// At most this many (default 200, at most the ring's size).
    limit: Option<usize>,
    /// Only records newer than this sequence number.
    after: Option<u64>,
    /// "cached", "executed" or "failed".
    filter: Option<String>,
    /// Case-insensitive substring of mnemonic, target, digest, worker,
    /// operation or invocation id.
    q: Option<String>,
}

#[derive(Serialize)]
pub struct RecentJson {
    execution: bool,
    /// Records kept (the ring holds at most `capacity`).
    kept: usize,
    capacity: usize,
    latest_seq: u64,
    actions: Vec<RecordJson>,
}

pub async fn recent(State(state): State<Shared>, Query(q): Query<RecentQuery>) -> Json<RecentJson> {
    let limit = q.limit.unwrap_or(200).min(RECENT_ACTIONS);
    let after = q.after.unwrap_or(0);
    let needle = q.q.as_deref().map(str::to_lowercase).filter(|s| !s.is_empty());
    let filter = q.filter.as_deref().unwrap_or("");
    let keep = |r: &Recent| {
        let rec = &r.record;
        if r.seq <= after {
            return false;
        }
        let kind_ok = match filter {
            "cached" => rec.cached,
            "executed" => !rec.cached,
            "failed" => rec.failed(),
            _ => true,
        };
        kind_ok
            && needle.as_ref().is_none_or(|n| {
                [
                    rec.request.action_mnemonic.as_str(),
                    rec.request.target_id.as_str(),
                    rec.action_digest.hash.as_str(),
                    rec.worker.as_str(),
                    rec.operation.as_str(),
                    rec.request.tool_invocation_id.as_str(),
                ]
                .iter()
                .any(|field| field.to_lowercase().contains(n.as_str()))
            })
    };
    let actions = state
        .recent
        .newest(limit, keep)
        .iter()
        .map(|r| RecordJson::of(r))
        .collect();
    Json(RecentJson {
        execution: state.scheduler.is_some(),
        kept: state.recent.len(),
        capacity: RECENT_ACTIONS,
        latest_seq: state.recent.latest_seq(),
        actions,
    })
}
