//! The scheduler's direct use of the Action Cache and CAS stores (no gRPC
//! hop): the lookup before scheduling, the write after a successful run,
//! and inlining of stdout/stderr/output files into results on request.

use bytes::Bytes;
use kiln_cache::Instance;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::{ActionResult, Digest, ExecuteResponse};
use kiln_store::{Blob, codec};
use prost::Message;

use crate::error::{SchedulerError, SchedulerResult};

/// Largest total of bytes inlined into one response.
const INLINE_BUDGET: u64 = 4 << 20;

/// The cached result of `key` if there is one whose referenced blobs
/// (output files, stdout, stderr, output directory trees) are all in the
/// CAS. An undecodable entry is logged and treated as a miss. Counted as an
/// Action Cache hit or miss in the instance's counters.
pub async fn lookup(instance: &Instance, key: &BlobKey) -> SchedulerResult<Option<ActionResult>> {
    let found = find(instance, key).await?;
    instance.counters().ac_lookup(found.is_some());
    Ok(found)
}

async fn find(instance: &Instance, key: &BlobKey) -> SchedulerResult<Option<ActionResult>> {
    let Some(data) = codec::get_identity(instance.ac.as_ref(), key)
        .await
        .map_err(SchedulerError::store(format!(
            "reading the action cache entry of {key}"
        )))?
    else {
        return Ok(None);
    };
    let result = match ActionResult::decode(data) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(action = %key, error = %e, "undecodable action cache entry; treated as a miss");
            return Ok(None);
        }
    };
    let f = key.function();
    let mut refs: Vec<BlobKey> = Vec::new();
    let mut push = |d: Option<&Digest>| -> bool {
        match d {
            None => true,
            Some(d) => match BlobKey::from_digest(f, d) {
                Ok(k) => {
                    if !k.is_empty_blob() {
                        refs.push(k);
                    }
                    true
                }
                Err(_) => false,
            },
        }
    };
    let mut well_formed = true;
    for file in &result.output_files {
        well_formed &= push(file.digest.as_ref());
    }
    for dir in &result.output_directories {
        well_formed &= push(dir.tree_digest.as_ref());
        well_formed &= push(dir.root_directory_digest.as_ref());
    }
    well_formed &= push(result.stdout_digest.as_ref());
    well_formed &= push(result.stderr_digest.as_ref());
    if !well_formed {
        return Ok(None);
    }
    if !refs.is_empty() {
        let found = instance
            .cas
            .has_many(&refs)
            .await
            .map_err(SchedulerError::store("checking a cached result's outputs"))?;
        if found.iter().any(|f| !f) {
            return Ok(None);
        }
    }
    Ok(Some(result))
}

/// Whether a finished execution may be cached: OK status, exit code 0.
pub fn cacheable_response(response: &ExecuteResponse) -> bool {
    let ok = response.status.as_ref().is_none_or(|s| s.code == 0);
    ok && response.result.as_ref().is_some_and(|r| r.exit_code == 0)
}

async fn put_cas(instance: &Instance, f: DigestFunction, data: &[u8]) -> SchedulerResult<Digest> {
    let key = BlobKey::of(f, data);
    instance
        .cas
        .put(&key, Blob::identity(Bytes::copy_from_slice(data)))
        .await
        .map_err(SchedulerError::store(format!(
            "storing inline output {key} in the CAS"
        )))?;
    Ok(key.to_digest())
}

/// Writes `result` as the Action Cache entry of `key`. Inline data
/// (stdout_raw, stderr_raw, file contents) is moved to the CAS first: AC
/// entries hold digests only.
pub async fn write(instance: &Instance, key: &BlobKey, result: &ActionResult) -> SchedulerResult<()> {
    let f = key.function();
    let mut stored = result.clone();
    if !stored.stdout_raw.is_empty() {
        let d = put_cas(instance, f, &stored.stdout_raw).await?;
        stored.stdout_digest.get_or_insert(d);
        stored.stdout_raw.clear();
    }
    if !stored.stderr_raw.is_empty() {
        let d = put_cas(instance, f, &stored.stderr_raw).await?;
        stored.stderr_digest.get_or_insert(d);
        stored.stderr_raw.clear();
    }
    for file in &mut stored.output_files {
        if !file.contents.is_empty() {
            let d = put_cas(instance, f, &file.contents).await?;
            file.digest.get_or_insert(d);
            file.contents.clear();
        }
    }
    instance
        .ac
        .put(key, Blob::identity(Bytes::from(stored.encode_to_vec())))
        .await
        .map_err(SchedulerError::store(format!(
            "writing the action cache entry of {key}"
        )))
}

/// What a client asked to have inlined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InlineRequest {
    pub stdout: bool,
    pub stderr: bool,
    pub output_files: Vec<String>,
}

impl InlineRequest {
    pub fn is_empty(&self) -> bool {
        !self.stdout && !self.stderr && self.output_files.is_empty()
    }
}

/// Fills the raw fields asked for, for blobs of at most `max_blob` bytes,
/// within a total budget. A blob that cannot be read is simply not inlined.
pub async fn inline(
    instance: &Instance,
    f: DigestFunction,
    result: &mut ActionResult,
    req: &InlineRequest,
    max_blob: u64,
) {
    let mut budget = INLINE_BUDGET;
    let mut fetch = async |d: Option<&Digest>| -> Option<Bytes> {
        let key = BlobKey::from_digest(f, d?).ok()?;
        if key.size() > max_blob || key.size() > budget {
            return None;
        }
        let data = codec::get_identity(instance.cas.as_ref(), &key).await.ok()??;
        budget -= key.size();
        Some(data)
    };
    if req.stdout
        && result.stdout_raw.is_empty()
        && let Some(data) = fetch(result.stdout_digest.as_ref()).await
    {
        result.stdout_raw = data.to_vec();
    }
    if req.stderr
        && result.stderr_raw.is_empty()
        && let Some(data) = fetch(result.stderr_digest.as_ref()).await
    {
        result.stderr_raw = data.to_vec();
    }
    for file in &mut result.output_files {
        if file.contents.is_empty()
            && req.output_files.contains(&file.path)
            && let Some(data) = fetch(file.digest.as_ref()).await
        {
            file.contents = data.to_vec();
        }
    }
}
