//! The ActionCache service.
//!
//! GetActionResult (the hottest path of a cache):
//! * unknown instance, missing or malformed action digest: INVALID_ARGUMENT;
//!   no entry: NOT_FOUND; store fault: INTERNAL (or the store's mapped code);
//!   an entry that does not decode as an ActionResult: logged, NOT_FOUND.
//! * Completeness (when `Instance::ac_completeness_check`): NOT_FOUND unless
//!   every blob the result references is in the CAS: output files, stdout and
//!   stderr, each output directory's Tree blob and every file inside the
//!   Tree, and `root_directory_digest` (for a result carrying only
//!   `root_directory_digest`, the Directory hierarchy under it is walked).
//!   Trees are fetched concurrently, then ONE `has_many` checks everything.
//!   A malformed digest inside the result or a Tree makes it incomplete.
//! * The expansion of a Tree (or Directory hierarchy) into the blob keys it
//!   references is a pure function of its digest, so it is cached in a
//!   bounded two-generation map ([`ExpansionCache`]): a repeated hit costs one
//!   `has_many` and no Tree fetch or decode. Existence itself is never
//!   cached, so evictions from the CAS are always noticed.
//! * Inlining (`inline_stdout`, `inline_stderr`, `inline_output_files` by
//!   exact path) fills the raw fields of blobs of at most
//!   `limits.max_inline_bytes`, within a total budget that keeps the
//!   response under the gRPC message limit. The fetches run concurrently
//!   with the completeness check. A blob that cannot be read is simply not
//!   inlined.
//!
//! UpdateActionResult:
//! * read-only instance: PERMISSION_DENIED; every digest in the result must
//!   be well formed for the request's digest function and every output path
//!   relative (and non-empty, except output directories): INVALID_ARGUMENT.
//! * Inline data (stdout_raw, stderr_raw, output file contents) is written to
//!   the CAS (verified against its digest if one is given, digest computed
//!   otherwise) and removed from the stored result: entries hold digests
//!   only, and GetActionResult inlines on request. The stored result is
//!   returned.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read as _;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::action_cache_server::ActionCache;
use kiln_proto::reapi::{
    ActionResult, Digest, Directory, GetActionResultRequest, OutputDirectory, Tree, UpdateActionResultRequest,
};
use kiln_store::{Blob, Encoding, Store, codec};
use parking_lot::Mutex;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::cas::STORE_CONCURRENCY;
use crate::{CacheCounters, CacheError, CacheResult, Instance, Instances};

/// Largest decoded ActionResult accepted from a zstd-encoded AC payload.
const MAX_AC_PAYLOAD: u64 = 64 << 20;
/// Blob keys held by one generation of the expansion cache.
const EXPANSION_CACHE_KEYS: usize = 1 << 18;
/// Trees expanded concurrently for one result.
const TREE_CONCURRENCY: usize = 16;

pub struct ActionCacheService {
    instances: Arc<Instances>,
    expansions: ExpansionCache,
}

impl ActionCacheService {
    pub fn new(instances: Arc<Instances>) -> Self {
        ActionCacheService {
            instances,
            expansions: ExpansionCache::new(EXPANSION_CACHE_KEYS),
        }
    }
}

/// What an output directory's digest refers to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum ExpansionKind {
    /// A `Tree` message: the keys are the files inside it.
    Tree,
    /// A root `Directory`: the keys are every file and sub-directory below it.
    Directory,
}

/// A bounded map from (kind, digest) to the blob keys the Tree or Directory
/// hierarchy references. Two generations approximate LRU: lookups promote
/// from the old generation; when the current one holds more than `capacity`
/// keys it becomes the old one. No lock is held across I/O.
struct ExpansionCache {
    capacity: usize,
    inner: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    current: HashMap<(ExpansionKind, BlobKey), Arc<[BlobKey]>>,
    current_keys: usize,
    old: HashMap<(ExpansionKind, BlobKey), Arc<[BlobKey]>>,
}

impl ExpansionCache {
    fn new(capacity: usize) -> Self {
        ExpansionCache {
            capacity,
            inner: Mutex::new(Generations::default()),
        }
    }

    fn get(&self, kind: ExpansionKind, key: &BlobKey) -> Option<Arc<[BlobKey]>> {
        let mut g = self.inner.lock();
        let k = (kind, key.clone());
        if let Some(v) = g.current.get(&k) {
            return Some(v.clone());
        }
        let v = g.old.remove(&k)?;
        g.current_keys += v.len() + 1;
        g.current.insert(k, v.clone());
        Some(v)
    }

    fn insert(&self, kind: ExpansionKind, key: BlobKey, keys: Arc<[BlobKey]>) {
        if keys.len() >= self.capacity {
            return;
        }
        let mut g = self.inner.lock();
        g.current_keys += keys.len() + 1;
        g.current.insert((kind, key), keys);
        if g.current_keys > self.capacity {
            g.old = std::mem::take(&mut g.current);
            g.current_keys = 0;
        }
    }
}

/// Where an inlined blob goes.
#[derive(Clone, Copy)]
enum InlineTarget {
    Stdout,
    Stderr,
    File(usize),
}

/// Decodes a stored AC payload into the serialized ActionResult bytes.
fn ac_payload(blob: Blob) -> Result<Bytes, String> {
    match blob.encoding {
        Encoding::Identity => Ok(blob.data),
        Encoding::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::new(&blob.data[..]).map_err(|e| format!("zstd: {e}"))?;
            let mut out = Vec::new();
            decoder
                .take(MAX_AC_PAYLOAD + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("zstd: {e}"))?;
            if out.len() as u64 > MAX_AC_PAYLOAD {
                return Err(format!("decoded payload exceeds {MAX_AC_PAYLOAD} bytes"));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Parses an optional digest; `None` when absent, `Err` when malformed.
fn opt_key(
    function: DigestFunction,
    digest: Option<&Digest>,
) -> Result<Option<BlobKey>, kiln_digest::DigestError> {
    digest.map(|d| BlobKey::from_digest(function, d)).transpose()
}

impl ActionCacheService {
    async fn get(&self, req: GetActionResultRequest) -> CacheResult<ActionResult> {
        let instance = self.instances.get(&req.instance_name)?;
        let digest = req
            .action_digest
            .as_ref()
            .ok_or_else(|| CacheError::InvalidArgument("action_digest is missing".into()))?;
        let function = instance.digest_function(req.digest_function, &digest.hash)?;
        let key = BlobKey::from_digest(function, digest)?;
        let blob = instance
            .ac
            .get(&key)
            .await
            .map_err(CacheError::store(format!("reading the action result of {key}")))?
            .ok_or_else(|| CacheError::NotFound(format!("no action result for {key}")))?;
        let decoded = ac_payload(blob).and_then(|b| ActionResult::decode(b).map_err(|e| e.to_string()));
        let mut result = match decoded {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(action = %key, error = %e, "stored action result does not decode; treating as a miss");
                return Err(CacheError::NotFound(format!("no usable action result for {key}")));
            }
        };

        let plan = self.plan_inline(&req, &result, function);
        let completeness = async {
            if instance.ac_completeness_check {
                self.is_complete(instance, function, &result).await
            } else {
                Ok(true)
            }
        };
        let inline = fetch_inline(instance.cas.as_ref(), plan);
        let (complete, inlined) = futures::join!(completeness, inline);
        if !complete? {
            return Err(CacheError::NotFound(format!(
                "the action result of {key} references blobs missing from the CAS"
            )));
        }
        for (target, data) in inlined {
            let slot = match target {
                InlineTarget::Stdout => &mut result.stdout_raw,
                InlineTarget::Stderr => &mut result.stderr_raw,
                InlineTarget::File(i) => match result.output_files.get_mut(i) {
                    Some(f) => &mut f.contents,
                    None => continue,
                },
            };
            *slot = Vec::from(data);
        }
        Ok(result)
    }

    /// The blobs to inline: requested, not already inline, small enough, and
    /// within the response's size budget.
    fn plan_inline(
        &self,
        req: &GetActionResultRequest,
        result: &ActionResult,
        function: DigestFunction,
    ) -> Vec<(InlineTarget, BlobKey)> {
        let limits = self.instances.limits();
        let mut plan = Vec::new();
        if !req.inline_stdout && !req.inline_stderr && req.inline_output_files.is_empty() {
            return plan;
        }
        let mut budget = (crate::max_message_size(limits) as u64)
            .saturating_sub(1 << 20)
            .saturating_sub(result.encoded_len() as u64);
        let mut consider = |target: InlineTarget, digest: Option<&Digest>, raw: &[u8]| {
            let Ok(Some(key)) = opt_key(function, digest) else {
                return;
            };
            let size = key.size();
            if !raw.is_empty() || size == 0 || size > limits.max_inline_bytes || size > budget {
                return;
            }
            budget -= size;
            plan.push((target, key));
        };
        if req.inline_stdout {
            consider(
                InlineTarget::Stdout,
                result.stdout_digest.as_ref(),
                &result.stdout_raw,
            );
        }
        if req.inline_stderr {
            consider(
                InlineTarget::Stderr,
                result.stderr_digest.as_ref(),
                &result.stderr_raw,
            );
        }
        if !req.inline_output_files.is_empty() {
            let wanted: HashSet<&str> = req.inline_output_files.iter().map(String::as_str).collect();
            for (i, f) in result.output_files.iter().enumerate() {
                if wanted.contains(f.path.as_str()) {
                    consider(InlineTarget::File(i), f.digest.as_ref(), &f.contents);
                }
            }
        }
        plan
    }

    /// Whether every blob `result` references is in the instance's CAS.
    async fn is_complete(
        &self,
        instance: &Instance,
        function: DigestFunction,
        result: &ActionResult,
    ) -> CacheResult<bool> {
        let mut keys: Vec<BlobKey> = Vec::new();
        let mut roots: Vec<(ExpansionKind, BlobKey)> = Vec::new();
        let direct = result
            .output_files
            .iter()
            .map(|f| f.digest.as_ref().ok_or(kiln_digest::DigestError::Missing))
            .map(|d| d.and_then(|d| BlobKey::from_digest(function, d)).map(Some))
            .chain([
                opt_key(function, result.stdout_digest.as_ref()),
                opt_key(function, result.stderr_digest.as_ref()),
            ]);
        for k in direct {
            match k {
                Ok(Some(k)) => keys.push(k),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "action result holds a malformed digest; treating as incomplete");
                    return Ok(false);
                }
            }
        }
        for dir in &result.output_directories {
            match output_dir_roots(function, dir) {
                Ok((Some(tree), root_dir)) => {
                    roots.push((ExpansionKind::Tree, tree));
                    keys.extend(root_dir);
                }
                Ok((None, Some(root_dir))) => roots.push((ExpansionKind::Directory, root_dir)),
                Ok((None, None)) => {
                    tracing::warn!(path = %dir.path, "output directory has no digest; treating as incomplete");
                    return Ok(false);
                }
                Err(e) => {
                    tracing::warn!(path = %dir.path, error = %e, "output directory has a malformed digest; treating as incomplete");
                    return Ok(false);
                }
            }
        }

        let cas = instance.cas.clone();
        let mut expansions = futures::stream::iter(roots)
            .map(|(kind, root)| {
                let cas = cas.clone();
                async move {
                    let r = self.expand(cas.as_ref(), function, kind, root.clone()).await;
                    (root, r)
                }
            })
            .buffer_unordered(TREE_CONCURRENCY);
        while let Some((root, expansion)) = expansions.next().await {
            let Some(expansion) = expansion? else {
                return Ok(false);
            };
            // The root itself (a cache hit did not read it) and what it holds.
            keys.push(root);
            keys.extend(expansion.iter().cloned());
        }
        drop(expansions);

        keys.retain(|k| !k.is_empty_blob());
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(true);
        }
        let present = instance
            .cas
            .has_many(&keys)
            .await
            .map_err(CacheError::store("checking the outputs of an action result"))?;
        Ok(present.into_iter().all(|p| p))
    }

    /// The blob keys a Tree or Directory hierarchy references, from the
    /// cache or by reading it. `None` when it is missing or malformed.
    async fn expand(
        &self,
        cas: &dyn Store,
        function: DigestFunction,
        kind: ExpansionKind,
        root: BlobKey,
    ) -> CacheResult<Option<Arc<[BlobKey]>>> {
        if let Some(hit) = self.expansions.get(kind, &root) {
            return Ok(Some(hit));
        }
        let keys = match kind {
            ExpansionKind::Tree => expand_tree(cas, function, &root).await?,
            ExpansionKind::Directory => expand_directory(cas, function, &root).await?,
        };
        let Some(keys) = keys else { return Ok(None) };
        let keys: Arc<[BlobKey]> = keys.into();
        self.expansions.insert(kind, root, keys.clone());
        Ok(Some(keys))
    }

    async fn update(&self, req: UpdateActionResultRequest) -> CacheResult<ActionResult> {
        let instance = self.instances.get(&req.instance_name)?;
        if instance.ac_read_only {
            return Err(CacheError::PermissionDenied(format!(
                "the action cache of instance {:?} is read-only",
                instance.name
            )));
        }
        let digest = req
            .action_digest
            .as_ref()
            .ok_or_else(|| CacheError::InvalidArgument("action_digest is missing".into()))?;
        let function = instance.digest_function(req.digest_function, &digest.hash)?;
        let key = BlobKey::from_digest(function, digest)?;
        let mut result = req
            .action_result
            .ok_or_else(|| CacheError::InvalidArgument("action_result is missing".into()))?;

        let mut uploads: Vec<(BlobKey, Bytes)> = Vec::new();
        take_inline(
            function,
            &mut result.stdout_digest,
            &mut result.stdout_raw,
            "stdout",
            &mut uploads,
        )?;
        take_inline(
            function,
            &mut result.stderr_digest,
            &mut result.stderr_raw,
            "stderr",
            &mut uploads,
        )?;
        for (i, f) in result.output_files.iter_mut().enumerate() {
            let field = format!("output_files[{i}]");
            check_path(&f.path, &field, false)?;
            take_inline(function, &mut f.digest, &mut f.contents, &field, &mut uploads)?;
            if f.digest.is_none() {
                return Err(CacheError::InvalidArgument(format!(
                    "{field} ({:?}) has no digest",
                    f.path
                )));
            }
        }
        for (i, d) in result.output_directories.iter().enumerate() {
            let field = format!("output_directories[{i}]");
            check_path(&d.path, &field, true)?;
            let (tree, root) = output_dir_roots(function, d)
                .map_err(|e| CacheError::InvalidArgument(format!("{field} ({:?}): {e}", d.path)))?;
            if tree.is_none() && root.is_none() {
                return Err(CacheError::InvalidArgument(format!(
                    "{field} ({:?}) has neither tree_digest nor root_directory_digest",
                    d.path
                )));
            }
        }
        #[allow(deprecated)]
        let symlinks = result
            .output_symlinks
            .iter()
            .map(|s| ("output_symlinks", s))
            .chain(
                result
                    .output_file_symlinks
                    .iter()
                    .map(|s| ("output_file_symlinks", s)),
            )
            .chain(
                result
                    .output_directory_symlinks
                    .iter()
                    .map(|s| ("output_directory_symlinks", s)),
            );
        for (field, s) in symlinks {
            check_path(&s.path, field, false)?;
            if s.target.is_empty() {
                return Err(CacheError::InvalidArgument(format!(
                    "{field}: symlink {:?} has an empty target",
                    s.path
                )));
            }
        }

        self.store_inline(instance, uploads).await?;
        let encoded = Bytes::from(result.encode_to_vec());
        instance
            .ac
            .put(&key, Blob::identity(encoded))
            .await
            .map_err(CacheError::store(format!("storing the action result of {key}")))?;
        Ok(result)
    }

    /// Writes inline data of an uploaded result into the CAS (skipping
    /// blobs already present).
    async fn store_inline(&self, instance: &Instance, mut uploads: Vec<(BlobKey, Bytes)>) -> CacheResult<()> {
        if uploads.is_empty() {
            return Ok(());
        }
        let max = self.instances.limits().max_cas_blob_size_bytes;
        if let Some((k, _)) = uploads.iter().find(|(k, _)| max > 0 && k.size() > max) {
            return Err(CacheError::InvalidArgument(format!(
                "inline blob {k} exceeds the maximum blob size of {max} bytes"
            )));
        }
        uploads.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        uploads.dedup_by(|a, b| a.0 == b.0);
        let keys: Vec<BlobKey> = uploads.iter().map(|(k, _)| k.clone()).collect();
        let present = instance
            .cas
            .has_many(&keys)
            .await
            .map_err(CacheError::store("checking inline outputs"))?;
        let cas = instance.cas.clone();
        let mut writes = futures::stream::iter(uploads.into_iter().zip(present).filter(|(_, p)| !p))
            .map(|((key, data), _)| {
                let cas = cas.clone();
                async move {
                    cas.put(&key, Blob::identity(data))
                        .await
                        .map_err(CacheError::store(format!("storing inline output {key}")))
                }
            })
            .buffer_unordered(STORE_CONCURRENCY);
        while let Some(r) = writes.next().await {
            r?;
        }
        Ok(())
    }
}

/// The Tree and root Directory keys of an output directory.
fn output_dir_roots(
    function: DigestFunction,
    dir: &OutputDirectory,
) -> Result<(Option<BlobKey>, Option<BlobKey>), kiln_digest::DigestError> {
    Ok((
        opt_key(function, dir.tree_digest.as_ref())?,
        opt_key(function, dir.root_directory_digest.as_ref())?,
    ))
}

/// Validates an output path: relative, and non-empty unless `allow_empty`.
fn check_path(path: &str, field: &str, allow_empty: bool) -> CacheResult<()> {
    if path.is_empty() && !allow_empty {
        return Err(CacheError::InvalidArgument(format!("{field}: path is empty")));
    }
    if path.starts_with('/') {
        return Err(CacheError::InvalidArgument(format!(
            "{field}: path {path:?} must be relative"
        )));
    }
    Ok(())
}

/// Moves inline data out of a result being stored: checks it against its
/// digest (or computes the digest) and queues it for the CAS.
fn take_inline(
    function: DigestFunction,
    digest: &mut Option<Digest>,
    raw: &mut Vec<u8>,
    field: &str,
    uploads: &mut Vec<(BlobKey, Bytes)>,
) -> CacheResult<()> {
    let parsed = opt_key(function, digest.as_ref())
        .map_err(|e| CacheError::InvalidArgument(format!("{field}: {e}")))?;
    if raw.is_empty() {
        return Ok(());
    }
    let data = Bytes::from(std::mem::take(raw));
    let key = match parsed {
        Some(k) => {
            k.verify(&data).map_err(|e| {
                CacheError::InvalidArgument(format!("{field}: inline data does not match its digest: {e}"))
            })?;
            k
        }
        None => {
            let k = BlobKey::of(function, &data);
            *digest = Some(k.to_digest());
            k
        }
    };
    if !key.is_empty_blob() {
        uploads.push((key, data));
    }
    Ok(())
}

/// Reads the blobs to inline concurrently; unreadable ones are skipped.
async fn fetch_inline(cas: &dyn Store, plan: Vec<(InlineTarget, BlobKey)>) -> Vec<(InlineTarget, Bytes)> {
    if plan.is_empty() {
        return Vec::new();
    }
    futures::stream::iter(plan)
        .map(|(target, key)| async move {
            match codec::get_identity(cas, &key).await {
                Ok(Some(data)) => Some((target, data)),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(blob = %key, error = %e, "cannot read a blob to inline; leaving it out");
                    None
                }
            }
        })
        .buffer_unordered(STORE_CONCURRENCY)
        .filter_map(futures::future::ready)
        .collect()
        .await
}

fn file_keys(function: DigestFunction, dir: &Directory, out: &mut Vec<BlobKey>) -> bool {
    for f in &dir.files {
        match opt_key(function, f.digest.as_ref()) {
            Ok(Some(k)) => out.push(k),
            _ => return false,
        }
    }
    true
}

/// The files of a Tree blob; `None` if it is missing or malformed.
async fn expand_tree(
    cas: &dyn Store,
    function: DigestFunction,
    key: &BlobKey,
) -> CacheResult<Option<Vec<BlobKey>>> {
    let Some(bytes) = codec::get_identity(cas, key)
        .await
        .map_err(CacheError::store(format!("reading output tree {key}")))?
    else {
        return Ok(None);
    };
    let tree = match Tree::decode(bytes) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(tree = %key, error = %e, "output tree does not decode; treating as incomplete");
            return Ok(None);
        }
    };
    let mut keys = Vec::new();
    for dir in tree.root.iter().chain(tree.children.iter()) {
        if !file_keys(function, dir, &mut keys) {
            tracing::warn!(tree = %key, "output tree holds a malformed file digest; treating as incomplete");
            return Ok(None);
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(Some(keys))
}

/// The files and sub-directories under a root Directory, walked breadth
/// first with each level fetched concurrently; `None` if any directory is
/// missing or malformed.
async fn expand_directory(
    cas: &dyn Store,
    function: DigestFunction,
    root: &BlobKey,
) -> CacheResult<Option<Vec<BlobKey>>> {
    let mut keys = Vec::new();
    let mut seen: HashSet<BlobKey> = HashSet::from([root.clone()]);
    let mut level: VecDeque<BlobKey> = VecDeque::from([root.clone()]);
    while !level.is_empty() {
        let fetched: Vec<(BlobKey, CacheResult<Option<Bytes>>)> = futures::stream::iter(level.drain(..))
            .map(|k| async move {
                let r = codec::get_identity(cas, &k)
                    .await
                    .map_err(CacheError::store(format!("reading output directory {k}")));
                (k, r)
            })
            .buffered(STORE_CONCURRENCY)
            .collect()
            .await;
        for (k, r) in fetched {
            let Some(bytes) = r? else { return Ok(None) };
            let Ok(dir) = Directory::decode(bytes) else {
                tracing::warn!(directory = %k, "output directory does not decode; treating as incomplete");
                return Ok(None);
            };
            if !file_keys(function, &dir, &mut keys) {
                return Ok(None);
            }
            for child in &dir.directories {
                let Ok(Some(ck)) = opt_key(function, child.digest.as_ref()) else {
                    return Ok(None);
                };
                if seen.insert(ck.clone()) {
                    keys.push(ck.clone());
                    level.push_back(ck);
                }
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(Some(keys))
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let result = self.get(request.into_inner()).await;
        match &result {
            Ok(_) => self.instances.counters().ac_lookup(true),
            Err(CacheError::NotFound(_)) => self.instances.counters().ac_lookup(false),
            Err(_) => {}
        }
        Ok(Response::new(result?))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let result = self.update(request.into_inner()).await?;
        CacheCounters::add(&self.instances.counters().ac_updates, 1);
        Ok(Response::new(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_cache_promotes_and_rotates() {
        let f = DigestFunction::Sha256;
        let cache = ExpansionCache::new(10);
        let a = BlobKey::of(f, b"a");
        let b = BlobKey::of(f, b"b");
        let keys: Arc<[BlobKey]> = vec![BlobKey::of(f, b"x"); 4].into();
        cache.insert(ExpansionKind::Tree, a.clone(), keys.clone());
        assert!(cache.get(ExpansionKind::Tree, &a).is_some());
        assert!(cache.get(ExpansionKind::Directory, &a).is_none());
        // Pushes the current generation over capacity: it becomes old.
        cache.insert(
            ExpansionKind::Tree,
            b.clone(),
            vec![BlobKey::of(f, b"y"); 6].into(),
        );
        assert!(cache.get(ExpansionKind::Tree, &a).is_some(), "promoted from old");
        assert!(cache.get(ExpansionKind::Tree, &b).is_some());
    }
}
