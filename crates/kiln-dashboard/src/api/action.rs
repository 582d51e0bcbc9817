//! `/api/action`: everything about one action — Action, Command, input
//! root, result (from the retained operation or the Action Cache),
//! stdout/stderr previews, outputs, the worker that ran it — read directly
//! from the instance's stores.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use kiln_cache::Instance;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::{Action, ActionResult, Command, Digest, Directory, ExecuteResponse};
use kiln_scheduler::operations;
use kiln_scheduler::state::OperationView;
use kiln_scheduler::state::snapshot::{ActionSnapshot, StateSnapshot};
use kiln_store::codec;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::actions::RecordJson;
use super::blobs::{PREVIEW_BYTES, read_message_opt, read_prefix};
use crate::digest_path::{self, instance_segment};
use crate::error::{DashboardError, DashboardResult};
use crate::json::{self, DigestJson, DirectoryJson, MetadataJson, Property, code_name};
use crate::recent::Recent;
use crate::state::Shared;

#[derive(Deserialize)]
pub struct OperationQuery {
    operation: String,
}

/// `GET /api/action?operation=NAME`.
pub async fn by_operation(
    State(state): State<Shared>,
    Query(q): Query<OperationQuery>,
) -> DashboardResult<Json<ActionDetail>> {
    let name = q.operation;
    if name.is_empty() {
        return Err(DashboardError::BadRequest("operation must not be empty".into()));
    }
    let record = state.recent.find(|r| r.record.operation == name);
    let (snapshot, view) = match &state.scheduler {
        Some(s) => (Some(s.snapshot().await), s.operation(&name).await),
        None => (None, None),
    };
    // The action: from the recent record, else the live queue, else the
    // retained operation.
    let (instance, key) = {
        let (instance_name, f, digest, what) = if let Some(r) = &record {
            let rec = &r.record;
            (
                &rec.instance_name,
                rec.digest_function,
                &rec.action_digest,
                "recorded",
            )
        } else if let Some(a) = snapshot
            .as_ref()
            .and_then(|snap| queued_or_executing(snap, &name))
        {
            (&a.instance_name, a.digest_function, &a.action_digest, "queued")
        } else if let Some(v) = &view {
            (&v.instance_name, v.digest_function, &v.action_digest, "operation")
        } else {
            return Err(DashboardError::NotFound(format!(
                "operation {name:?} is not known (finished operations are kept for a while, the last {} actions in the recent list)",
                crate::RECENT_ACTIONS
            )));
        };
        let instance = state
            .instances
            .get(instance_name)
            .map_err(|e| DashboardError::NotFound(e.to_string()))?
            .clone();
        let key = BlobKey::from_digest(f, digest)
            .map_err(|e| DashboardError::Unprocessable(format!("{what} digest: {e}")))?;
        (instance, key)
    };
    let record = record.or_else(|| latest_record(&state, &instance, &key));
    let known = Known {
        operation: Some(name),
        record,
        snapshot,
        view,
    };
    detail(instance, key, known).await
}

/// `GET /api/action/{instance}/{function}/{hash}/{size}`.
pub async fn by_digest(
    State(state): State<Shared>,
    Path(p): Path<(String, String, String, String)>,
) -> DashboardResult<Json<ActionDetail>> {
    let (instance, key) = digest_path::blob(&state.instances, &p.0, &p.1, &p.2, &p.3)?;
    let record = latest_record(&state, &instance, &key);
    let operation = record
        .as_ref()
        .map(|r| r.record.operation.clone())
        .filter(|o| !o.is_empty());
    let (snapshot, view) = match (&state.scheduler, &operation) {
        (Some(s), Some(op)) => (Some(s.snapshot().await), s.operation(op).await),
        (Some(s), None) => (Some(s.snapshot().await), None),
        (None, _) => (None, None),
    };
    let known = Known {
        operation,
        record,
        snapshot,
        view,
    };
    detail(instance, key, known).await
}

/// The queued or executing action that `operation` waits for.
fn queued_or_executing<'a>(snap: &'a StateSnapshot, operation: &str) -> Option<&'a ActionSnapshot> {
    snap.queued
        .iter()
        .map(|q| &q.action)
        .chain(snap.executing.iter().map(|e| &e.action))
        .find(|a| a.operations.iter().any(|o| o == operation))
}

/// The newest recent record of this action.
fn latest_record(state: &Shared, instance: &Instance, key: &BlobKey) -> Option<Arc<Recent>> {
    let digest = key.to_digest();
    state
        .recent
        .find(|r| r.record.instance_name == instance.name && r.record.action_digest == digest)
}

/// What the recent list and the scheduler know of one action, looked up
/// once by the handler.
struct Known {
    operation: Option<String>,
    record: Option<Arc<Recent>>,
    snapshot: Option<StateSnapshot>,
    /// The operation's current view (running or retained).
    view: Option<Arc<OperationView>>,
}

#[derive(Serialize)]
pub struct ActionJson {
    command_digest: Option<DigestJson>,
    input_root_digest: Option<DigestJson>,
    timeout_ms: Option<i64>,
    do_not_cache: bool,
    salt_hex: String,
    platform: Vec<Property>,
}

#[derive(Serialize)]
pub struct CommandJson {
    arguments: Vec<String>,
    environment: Vec<Property>,
    output_paths: Vec<String>,
    output_files: Vec<String>,
    output_directories: Vec<String>,
    working_directory: String,
    platform: Vec<Property>,
}

#[derive(Serialize)]
pub struct StreamJson {
    digest: Option<DigestJson>,
    size: i64,
    /// The first bytes, as text (invalid UTF-8 replaced).
    preview: String,
    truncated: bool,
    /// The blob is gone from the CAS.
    missing: bool,
}

#[derive(Serialize)]
pub struct OutputFileJson {
    path: String,
    digest: Option<DigestJson>,
    executable: bool,
}

#[derive(Serialize)]
pub struct OutputDirJson {
    path: String,
    tree_digest: Option<DigestJson>,
}

#[derive(Serialize)]
pub struct OutputSymlinkJson {
    path: String,
    target: String,
}

#[derive(Serialize)]
pub struct ResultJson {
    /// "operation" (the retained operation's response) or "action_cache".
    source: &'static str,
    status_code: i32,
    status: &'static str,
    status_message: String,
    cached_result: bool,
    exit_code: i32,
    worker: String,
    metadata: Option<MetadataJson>,
    output_files: Vec<OutputFileJson>,
    output_directories: Vec<OutputDirJson>,
    output_symlinks: Vec<OutputSymlinkJson>,
    stdout: Option<StreamJson>,
    stderr: Option<StreamJson>,
    /// ExecuteResponse.message (server-side explanation), if any.
    message: String,
}

#[derive(Serialize)]
pub struct LiveJson {
    /// "queued" or "executing".
    state: &'static str,
    worker: String,
    phase: &'static str,
    queued_at: i64,
    assigned_at: Option<i64>,
    attempts: u32,
    mnemonic: String,
    target_id: String,
    invocation_id: String,
}

#[derive(Serialize)]
pub struct ActionDetail {
    instance: String,
    digest: DigestJson,
    operation: Option<String>,
    /// "queued", "executing", "completed" or "unknown".
    state: &'static str,
    live: Option<LiveJson>,
    record: Option<RecordJson>,
    action: Option<ActionJson>,
    command: Option<CommandJson>,
    input_root: Option<DirectoryJson>,
    result: Option<ResultJson>,
    /// What could not be shown and why.
    notes: Vec<String>,
}

fn key_of(f: DigestFunction, d: Option<&Digest>) -> Option<BlobKey> {
    d.and_then(|d| BlobKey::from_digest(f, d).ok())
}

/// stdout or stderr: inlined in the result, else the start of its blob.
async fn stream_json(
    instance: &Instance,
    f: DigestFunction,
    raw: &[u8],
    digest: Option<&Digest>,
) -> DashboardResult<Option<StreamJson>> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (size, preview, truncated, missing) = if !raw.is_empty() {
        let shown = &raw[..raw.len().min(PREVIEW_BYTES as usize)];
        (raw.len() as u64, text(shown), shown.len() < raw.len(), false)
    } else {
        let Some(key) = key_of(f, digest) else {
            return Ok(None);
        };
        match read_prefix(instance, &key, PREVIEW_BYTES).await? {
            Some((bytes, truncated)) => (key.size(), text(&bytes), truncated, false),
            None => (key.size(), String::new(), false, true),
        }
    };
    Ok(Some(StreamJson {
        digest: DigestJson::opt(f, digest),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        preview,
        truncated,
        missing,
    }))
}

#[allow(deprecated)]
async fn result_json(
    instance: &Instance,
    f: DigestFunction,
    source: &'static str,
    response: Option<&ExecuteResponse>,
    result: &ActionResult,
) -> DashboardResult<ResultJson> {
    let status = response.and_then(|r| r.status.as_ref());
    let code = status.map(|s| s.code).unwrap_or(0);
    let mut symlinks: Vec<OutputSymlinkJson> = Vec::new();
    for s in result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks)
    {
        if !symlinks.iter().any(|x| x.path == s.path) {
            symlinks.push(OutputSymlinkJson {
                path: s.path.clone(),
                target: s.target.clone(),
            });
        }
    }
    Ok(ResultJson {
        source,
        status_code: code,
        status: code_name(code),
        status_message: status.map(|s| s.message.clone()).unwrap_or_default(),
        cached_result: response.is_some_and(|r| r.cached_result),
        exit_code: result.exit_code,
        worker: result
            .execution_metadata
            .as_ref()
            .map(|m| m.worker.clone())
            .unwrap_or_default(),
        metadata: result.execution_metadata.as_ref().map(MetadataJson::of),
        output_files: result
            .output_files
            .iter()
            .map(|o| OutputFileJson {
                path: o.path.clone(),
                digest: DigestJson::opt(f, o.digest.as_ref()),
                executable: o.is_executable,
            })
            .collect(),
        output_directories: result
            .output_directories
            .iter()
            .map(|o| OutputDirJson {
                path: o.path.clone(),
                tree_digest: DigestJson::opt(f, o.tree_digest.as_ref()),
            })
            .collect(),
        output_symlinks: symlinks,
        stdout: stream_json(instance, f, &result.stdout_raw, result.stdout_digest.as_ref()).await?,
        stderr: stream_json(instance, f, &result.stderr_raw, result.stderr_digest.as_ref()).await?,
        message: response.map(|r| r.message.clone()).unwrap_or_default(),
    })
}

/// The Action Cache entry, read directly (not counted as a client lookup).
async fn ac_entry(instance: &Instance, key: &BlobKey) -> DashboardResult<Option<ActionResult>> {
    let data = codec::get_identity(instance.ac.as_ref(), key)
        .await
        .map_err(DashboardError::store(format!(
            "reading the Action Cache entry of {key}"
        )))?;
    Ok(data.and_then(|d| ActionResult::decode(d).ok()))
}

async fn detail(instance: Arc<Instance>, key: BlobKey, known: Known) -> DashboardResult<Json<ActionDetail>> {
    let Known {
        operation,
        record,
        snapshot,
        view,
    } = known;
    let f = key.function();
    let digest = key.to_digest();
    let mut notes = Vec::new();

    // Live state.
    let mut live = None;
    if let Some(snap) = &snapshot {
        let matches = |a: &ActionSnapshot| a.instance_name == instance.name && a.action_digest == digest;
        if let Some(e) = snap.executing.iter().find(|e| matches(&e.action)) {
            live = Some(LiveJson {
                state: "executing",
                worker: e.worker_name.clone(),
                phase: json::phase(e.started, e.progress.as_ref()),
                queued_at: json::ms(e.action.queued_at),
                assigned_at: Some(json::ms(e.assigned_at)),
                attempts: e.action.attempts,
                mnemonic: e.action.mnemonic.clone(),
                target_id: e.action.target_id.clone(),
                invocation_id: e.action.invocation_id.clone(),
            });
        } else if let Some(q) = snap.queued.iter().find(|q| matches(&q.action)) {
            live = Some(LiveJson {
                state: "queued",
                worker: String::new(),
                phase: "queued",
                queued_at: json::ms(q.action.queued_at),
                assigned_at: None,
                attempts: q.action.attempts,
                mnemonic: q.action.mnemonic.clone(),
                target_id: q.action.target_id.clone(),
                invocation_id: q.action.invocation_id.clone(),
            });
        }
    }

    // Action, Command, input root.
    let action: Option<Action> = read_message_opt(&instance, &key, "Action").await?;
    if action.is_none() {
        notes.push(format!("the Action {key} is not in the CAS"));
    }
    let mut command = None;
    let mut input_root = None;
    if let Some(a) = &action {
        match key_of(f, a.command_digest.as_ref()) {
            Some(ck) => {
                command = read_message_opt::<Command>(&instance, &ck, "Command").await?;
                if command.is_none() {
                    notes.push(format!("the Command {ck} is not in the CAS"));
                }
            }
            None => notes.push("the Action has no valid command digest".into()),
        }
        match key_of(f, a.input_root_digest.as_ref()) {
            Some(rk) => {
                input_root = read_message_opt::<Directory>(&instance, &rk, "Directory")
                    .await?
                    .map(|d| DirectoryJson::of(&instance.name, f, &d));
                if input_root.is_none() {
                    notes.push(format!("the input root {rk} is not in the CAS"));
                }
            }
            None => notes.push("the Action has no valid input root digest".into()),
        }
    }

    // Result: the retained operation first (it has failures too), else the
    // Action Cache.
    let mut result = None;
    if let Some(resp) = view.as_ref().and_then(|v| v.response.as_ref()) {
        let empty = ActionResult::default();
        let r = resp.result.as_ref().unwrap_or(&empty);
        result = Some(result_json(&instance, f, "operation", Some(resp), r).await?);
    }
    if result.is_none()
        && let Some(r) = ac_entry(&instance, &key).await?
    {
        result = Some(result_json(&instance, f, "action_cache", None, &r).await?);
    }
    if result.is_none() && live.is_none() {
        if record.is_some() {
            notes.push(
                "the result is no longer retained (finished operations are kept for a while; failed results are not cached)"
                    .into(),
            );
        } else {
            notes.push(
                "no result: the action is not running, not recently finished and not in the Action Cache"
                    .into(),
            );
        }
    }
    let state_name = match (&live, &result, &record) {
        (Some(l), _, _) => l.state,
        (None, Some(_), _) | (None, None, Some(_)) => "completed",
        _ => "unknown",
    };

    Ok(Json(ActionDetail {
        instance: instance_segment(&instance.name).to_string(),
        digest: DigestJson::new(f, &digest),
        operation,
        state: state_name,
        live,
        record: record.as_deref().map(RecordJson::of),
        action: action.as_ref().map(|a| ActionJson {
            command_digest: DigestJson::opt(f, a.command_digest.as_ref()),
            input_root_digest: DigestJson::opt(f, a.input_root_digest.as_ref()),
            timeout_ms: operations::from_proto_duration(a.timeout.as_ref())
                .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            do_not_cache: a.do_not_cache,
            salt_hex: a.salt.iter().map(|b| format!("{b:02x}")).collect(),
            platform: json::platform(a.platform.as_ref()),
        }),
        command: command.as_ref().map(|c| CommandJson {
            arguments: c.arguments.clone(),
            environment: json::properties(c.environment_variables.iter().map(|e| (&e.name, &e.value))),
            output_paths: c.output_paths.clone(),
            #[allow(deprecated)]
            output_files: c.output_files.clone(),
            #[allow(deprecated)]
            output_directories: c.output_directories.clone(),
            working_directory: c.working_directory.clone(),
            #[allow(deprecated)]
            platform: json::platform(c.platform.as_ref()),
        }),
        input_root,
        result,
        notes,
    }))
}
