//! Loading and checking an action before it is queued: the Action and
//! Command are read from the CAS and decoded, and the whole input tree is
//! walked (Directory messages from the CAS, level by level, concurrently),
//! then ONE `has_many` checks every file and directory. Any absent blob
//! yields FAILED_PRECONDITION with one MISSING violation per blob.
//!
//! Decoded directories are cached by digest (a pure function of the
//! digest) in a bounded two-generation map, so actions sharing subtrees do
//! not fetch and decode them again. Existence is never cached.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use kiln_cache::Instance;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::{Action, Command, Directory};
use kiln_store::{Store, codec};
use parking_lot::Mutex;
use prost::Message;

use crate::error::{SchedulerError, SchedulerResult};

/// Directories fetched concurrently while walking a tree.
const FETCH_CONCURRENCY: usize = 32;

/// One directory's children.
#[derive(Debug, Default)]
pub struct DirListing {
    pub dirs: Vec<BlobKey>,
    pub files: Vec<BlobKey>,
}

type Generation = HashMap<BlobKey, Arc<DirListing>>;

/// Bounded cache of decoded directories: two generations of at most
/// `per_generation` entries; a hit in the old generation is promoted.
pub struct DirCache {
    per_generation: usize,
    inner: Mutex<(Generation, Generation)>,
}

impl DirCache {
    pub fn new(per_generation: usize) -> Self {
        DirCache {
            per_generation: per_generation.max(1),
            inner: Mutex::new((HashMap::new(), HashMap::new())),
        }
    }

    fn get(&self, key: &BlobKey) -> Option<Arc<DirListing>> {
        let mut g = self.inner.lock();
        if let Some(v) = g.0.get(key) {
            return Some(v.clone());
        }
        let v = g.1.remove(key)?;
        self.insert_locked(&mut g, key.clone(), v.clone());
        Some(v)
    }

    fn insert(&self, key: BlobKey, v: Arc<DirListing>) {
        let mut g = self.inner.lock();
        self.insert_locked(&mut g, key, v);
    }

    fn insert_locked(&self, g: &mut (Generation, Generation), key: BlobKey, v: Arc<DirListing>) {
        if g.0.len() >= self.per_generation {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(key, v);
    }
}

fn key_of(f: DigestFunction, d: Option<&kiln_proto::reapi::Digest>, what: &str) -> SchedulerResult<BlobKey> {
    BlobKey::from_opt_digest(f, d).map_err(|e| SchedulerError::InvalidArgument(format!("{what}: {e}")))
}

/// Reads a small blob as plain bytes, `None` if absent.
async fn read_small(
    cas: &dyn Store,
    key: &BlobKey,
    limit: u64,
    what: &str,
) -> SchedulerResult<Option<bytes::Bytes>> {
    if key.size() > limit {
        return Err(SchedulerError::InvalidArgument(format!(
            "{what} {key} is {} bytes, more than the {limit} bytes the scheduler reads",
            key.size()
        )));
    }
    if key.is_empty_blob() {
        return Ok(Some(bytes::Bytes::new()));
    }
    codec::get_identity(cas, key)
        .await
        .map_err(SchedulerError::store(format!(
            "reading {what} {key} from the CAS"
        )))
}

/// Reads and decodes the Action; MISSING if absent.
pub async fn load_action(instance: &Instance, key: &BlobKey, limit: u64) -> SchedulerResult<Action> {
    let Some(data) = read_small(instance.cas.as_ref(), key, limit, "action").await? else {
        return Err(SchedulerError::missing(
            "the action is not in the CAS",
            std::slice::from_ref(key),
        ));
    };
    Action::decode(data)
        .map_err(|e| SchedulerError::InvalidArgument(format!("action {key} is not a valid Action: {e}")))
}

/// Reads the Command and checks the input tree of `action`. Returns the
/// Command, or MISSING listing every absent blob (command, directories,
/// files).
pub async fn load_inputs(
    instance: &Instance,
    f: DigestFunction,
    action: &Action,
    limit: u64,
    dirs: &DirCache,
) -> SchedulerResult<Command> {
    let command_key = key_of(f, action.command_digest.as_ref(), "action.command_digest")?;
    let root_key = key_of(f, action.input_root_digest.as_ref(), "action.input_root_digest")?;
    let cas = instance.cas.as_ref();
    let (command, tree) = futures::join!(
        read_small(cas, &command_key, limit, "command"),
        walk_tree(cas, f, root_key, limit, dirs)
    );
    let (mut missing, present_check) = tree?;
    let command = command?;
    if command.is_none() {
        missing.insert(0, command_key.clone());
    }
    // One existence check for everything not fetched just now.
    if !present_check.is_empty() {
        let found = cas
            .has_many(&present_check)
            .await
            .map_err(SchedulerError::store("checking the input tree in the CAS"))?;
        missing.extend(
            present_check
                .into_iter()
                .zip(found)
                .filter(|(_, f)| !f)
                .map(|(k, _)| k),
        );
    }
    if !missing.is_empty() {
        return Err(SchedulerError::missing(
            "inputs of the action are missing",
            &missing,
        ));
    }
    let data = command.unwrap_or_default();
    Command::decode(data).map_err(|e| {
        SchedulerError::InvalidArgument(format!("command {command_key} is not a valid Command: {e}"))
    })
}

/// Walks the tree under `root`. Returns (directories found missing while
/// fetching, keys whose existence must still be checked).
async fn walk_tree(
    cas: &dyn Store,
    f: DigestFunction,
    root: BlobKey,
    limit: u64,
    dirs: &DirCache,
) -> SchedulerResult<(Vec<BlobKey>, Vec<BlobKey>)> {
    let mut missing = Vec::new();
    let mut check: Vec<BlobKey> = Vec::new();
    let mut seen: HashSet<BlobKey> = HashSet::new();
    let mut files_seen: HashSet<BlobKey> = HashSet::new();
    let mut level = vec![root];
    while !level.is_empty() {
        let mut to_fetch = Vec::new();
        let mut listings = Vec::new();
        for key in level.drain(..) {
            if !seen.insert(key.clone()) {
                continue;
            }
            if key.is_empty_blob() {
                continue; // the empty Directory
            }
            match dirs.get(&key) {
                Some(l) => {
                    check.push(key);
                    listings.push(l);
                }
                None => to_fetch.push(key),
            }
        }
        let fetched: Vec<(BlobKey, SchedulerResult<Option<bytes::Bytes>>)> = futures::stream::iter(to_fetch)
            .map(|key| async move {
                let r = read_small(cas, &key, limit, "directory").await;
                (key, r)
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        for (key, r) in fetched {
            let Some(data) = r? else {
                missing.push(key);
                continue;
            };
            let dir = Directory::decode(data).map_err(|e| {
                SchedulerError::InvalidArgument(format!(
                    "input directory {key} is not a valid Directory: {e}"
                ))
            })?;
            let listing = Arc::new(listing_of(f, &dir, &key)?);
            dirs.insert(key, listing.clone());
            listings.push(listing);
        }
        for l in listings {
            level.extend(l.dirs.iter().cloned());
            for file in &l.files {
                if !file.is_empty_blob() && files_seen.insert(file.clone()) {
                    check.push(file.clone());
                }
            }
        }
    }
    missing.sort();
    Ok((missing, check))
}

fn listing_of(f: DigestFunction, dir: &Directory, key: &BlobKey) -> SchedulerResult<DirListing> {
    let mut listing = DirListing::default();
    for d in &dir.directories {
        listing.dirs.push(key_of(
            f,
            d.digest.as_ref(),
            &format!("directory {key} entry {:?}", d.name),
        )?);
    }
    for file in &dir.files {
        listing.files.push(key_of(
            f,
            file.digest.as_ref(),
            &format!("directory {key} file {:?}", file.name),
        )?);
    }
    Ok(listing)
}
