//! ContentAddressableStorage.GetTree: a breadth-first walk of a Directory
//! tree, streamed in pages.
//!
//! * One call streams every remaining directory, `page_size` per message
//!   (0 = [`DEFAULT_PAGE_SIZE`], capped at [`MAX_PAGE_SIZE`]; a page is also
//!   cut early at [`PAGE_BYTES`] of encoded directories). Every message
//!   carries a `next_page_token`, empty on the last one.
//! * The token encodes the pending frontier: the digests of the directories
//!   not yet emitted, in walk order. Resuming from it continues the walk
//!   without re-reading anything already emitted. Format (opaque to
//!   clients): base64url (no padding) of
//!   `version(1) | function(u8) | root hash | varint root size | varint count
//!   | count × (hash | varint size)`, hashes raw at the function's length. A
//!   token that does not parse, or that belongs to another root or digest
//!   function, is INVALID_ARGUMENT.
//! * A directory reachable through several paths is emitted once per call
//!   (digests are de-duplicated as they are discovered). A call resumed from
//!   a token only knows the frontier, so a subtree already emitted before the
//!   token may be emitted again if it is reachable from the frontier too.
//! * The root missing is NOT_FOUND; a root that does not decode as a
//!   Directory is INVALID_ARGUMENT. Below the root, the spec says the server
//!   returns the portion present: missing directories, and directories that
//!   do not decode or have malformed child digests, are skipped (logged).
//!   Store faults end the stream with the mapped status (INTERNAL, ...).
//! * Each batch of pending directories (up to [`FETCH_BATCH`], i.e. a BFS
//!   level or a slice of one) is fetched concurrently.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::{Directory, GetTreeRequest, GetTreeResponse};
use kiln_store::{Store, codec};
use prost::Message;
use tonic::Status;

use crate::{CacheError, CacheResult, Instances};

/// Directories per message when the request's page_size is 0.
pub const DEFAULT_PAGE_SIZE: usize = 1000;
/// Largest page_size honoured.
pub const MAX_PAGE_SIZE: usize = 10_000;
/// A page is cut once its directories' encoded size reaches this.
pub const PAGE_BYTES: u64 = 4 << 20;
/// Pending directories fetched per round.
const FETCH_BATCH: usize = 256;
/// Concurrent store reads within a round.
const FETCH_CONCURRENCY: usize = 64;
const TOKEN_VERSION: u8 = 1;

pub type GetTreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send + 'static>>;

/// Starts a GetTree walk. Request-level errors (unknown instance, bad
/// digest, bad token, missing root) are returned before streaming starts.
pub async fn get_tree(instances: &Instances, req: GetTreeRequest) -> CacheResult<GetTreeStream> {
    let instance = instances.get(&req.instance_name)?;
    let root_digest = req
        .root_digest
        .as_ref()
        .ok_or_else(|| CacheError::InvalidArgument("root_digest is missing".into()))?;
    let function = instance.digest_function(req.digest_function, &root_digest.hash)?;
    let root = BlobKey::from_digest(function, root_digest)?;
    let page_size = match req.page_size {
        n if n < 0 => {
            return Err(CacheError::InvalidArgument(format!("page_size {n} is negative")));
        }
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    };
    let mut walk = Walk {
        cas: instance.cas.clone(),
        function,
        root: root.clone(),
        ready: VecDeque::new(),
        queue: VecDeque::new(),
        seen: HashSet::new(),
        page_size,
    };
    if req.page_token.is_empty() {
        let dir = match fetch(walk.cas.as_ref(), &root).await? {
            Fetched::Missing => {
                return Err(CacheError::NotFound(format!("root directory {root} not found")));
            }
            Fetched::Undecodable(e) => {
                return Err(CacheError::InvalidArgument(format!(
                    "root {root} is not a Directory message: {e}"
                )));
            }
            Fetched::Dir(dir) => dir,
        };
        walk.seen.insert(root.clone());
        walk.ready.push_back((root, Some(dir)));
    } else {
        for key in decode_token(&req.page_token, function, &root)? {
            if walk.seen.insert(key.clone()) {
                walk.queue.push_back(key);
            }
        }
    }
    let stream = futures::stream::unfold(Some(walk), |walk| async move {
        let mut walk = walk?;
        match walk.next_page().await {
            Ok(page) => {
                let more = !page.next_page_token.is_empty();
                Some((Ok(page), more.then_some(walk)))
            }
            Err(e) => Some((Err(Status::from(e)), None)),
        }
    });
    Ok(stream.boxed())
}

enum Fetched {
    Dir(Directory),
    Missing,
    Undecodable(prost::DecodeError),
}

async fn fetch(cas: &dyn Store, key: &BlobKey) -> CacheResult<Fetched> {
    let Some(bytes) = codec::get_identity(cas, key)
        .await
        .map_err(CacheError::store(format!("reading directory {key}")))?
    else {
        return Ok(Fetched::Missing);
    };
    Ok(match Directory::decode(bytes) {
        Ok(dir) => Fetched::Dir(dir),
        Err(e) => Fetched::Undecodable(e),
    })
}

struct Walk {
    cas: Arc<dyn Store>,
    function: DigestFunction,
    root: BlobKey,
    /// Fetched, not yet emitted (`None`: skipped). Precedes `queue`.
    ready: VecDeque<(BlobKey, Option<Directory>)>,
    /// Discovered, not yet fetched.
    queue: VecDeque<BlobKey>,
    /// Every digest ever queued during this call.
    seen: HashSet<BlobKey>,
    page_size: usize,
}

impl Walk {
    async fn next_page(&mut self) -> CacheResult<GetTreeResponse> {
        let mut directories = Vec::new();
        let mut bytes = 0u64;
        while directories.len() < self.page_size && bytes < PAGE_BYTES {
            if self.ready.is_empty() {
                if self.queue.is_empty() {
                    break;
                }
                self.fetch_round().await?;
            }
            let Some((key, dir)) = self.ready.pop_front() else {
                continue;
            };
            let Some(dir) = dir else { continue };
            for child in &dir.directories {
                match child
                    .digest
                    .as_ref()
                    .map(|d| BlobKey::from_digest(self.function, d))
                {
                    Some(Ok(k)) => {
                        if self.seen.insert(k.clone()) {
                            self.queue.push_back(k);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(directory = %key, child = %child.name, error = %e, "GetTree: skipping child with a malformed digest");
                    }
                    None => {
                        tracing::warn!(directory = %key, child = %child.name, "GetTree: skipping child without a digest");
                    }
                }
            }
            bytes += key.size();
            directories.push(dir);
        }
        let next_page_token = if self.ready.is_empty() && self.queue.is_empty() {
            String::new()
        } else {
            encode_token(
                self.function,
                &self.root,
                self.ready.iter().map(|(k, _)| k).chain(self.queue.iter()),
            )
        };
        Ok(GetTreeResponse {
            directories,
            next_page_token,
        })
    }

    /// Fetches the next batch of queued directories concurrently into `ready`.
    async fn fetch_round(&mut self) -> CacheResult<()> {
        let n = self.queue.len().min(FETCH_BATCH);
        let keys: Vec<BlobKey> = self.queue.iter().take(n).cloned().collect();
        let cas = self.cas.clone();
        let results: Vec<CacheResult<Fetched>> = futures::stream::iter(keys.clone())
            .map(|k| {
                let cas = cas.clone();
                async move { fetch(cas.as_ref(), &k).await }
            })
            .buffered(FETCH_CONCURRENCY)
            .collect()
            .await;
        // Only dequeue once the whole round succeeded, so the state stays
        // consistent if an error ends the stream.
        let mut fetched = Vec::with_capacity(n);
        for (key, r) in keys.into_iter().zip(results) {
            let dir = match r? {
                Fetched::Dir(d) => Some(d),
                Fetched::Missing => {
                    tracing::debug!(directory = %key, "GetTree: directory missing, skipped");
                    None
                }
                Fetched::Undecodable(e) => {
                    tracing::warn!(directory = %key, error = %e, "GetTree: blob is not a Directory, skipped");
                    None
                }
            };
            fetched.push((key, dir));
        }
        self.queue.drain(..n);
        self.ready.extend(fetched);
        Ok(())
    }
}

fn put_key(out: &mut Vec<u8>, key: &BlobKey) {
    out.extend_from_slice(&key.hash_raw());
    prost::encoding::encode_varint(key.size(), out);
}

/// Encodes a page token for the pending `frontier` of the walk from `root`.
pub(crate) fn encode_token<'a>(
    function: DigestFunction,
    root: &BlobKey,
    frontier: impl Iterator<Item = &'a BlobKey>,
) -> String {
    let frontier: Vec<&BlobKey> = frontier.collect();
    let mut out = Vec::with_capacity(2 + (frontier.len() + 1) * (function.hash_len() + 4));
    out.push(TOKEN_VERSION);
    out.push(function as u8);
    put_key(&mut out, root);
    prost::encoding::encode_varint(frontier.len() as u64, &mut out);
    for key in frontier {
        put_key(&mut out, key);
    }
    URL_SAFE_NO_PAD.encode(out)
}

/// Decodes a page token, checking it belongs to `root` under `function`.
pub(crate) fn decode_token(
    token: &str,
    function: DigestFunction,
    root: &BlobKey,
) -> CacheResult<Vec<BlobKey>> {
    let bad = |why: &str| CacheError::InvalidArgument(format!("invalid page_token: {why}"));
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad("not base64url"))?;
    let mut buf = Bytes::from(raw);
    if buf.remaining() < 2 || buf.get_u8() != TOKEN_VERSION {
        return Err(bad("unknown format"));
    }
    if buf.get_u8() != function as u8 {
        return Err(bad("issued for another digest function"));
    }
    let hash_len = function.hash_len();
    let read_key = |buf: &mut Bytes| -> CacheResult<BlobKey> {
        if buf.remaining() < hash_len {
            return Err(bad("truncated"));
        }
        let hash = buf.split_to(hash_len);
        let size = prost::encoding::decode_varint(buf).map_err(|_| bad("truncated"))?;
        if size > i64::MAX as u64 {
            return Err(bad("size out of range"));
        }
        BlobKey::from_raw(function, &hash, size).map_err(|_| bad("bad hash"))
    };
    if read_key(&mut buf)? != *root {
        return Err(bad("issued for another root_digest"));
    }
    let count = prost::encoding::decode_varint(&mut buf).map_err(|_| bad("truncated"))?;
    if count > (buf.remaining() / (hash_len + 1)) as u64 {
        return Err(bad("truncated"));
    }
    let mut keys = Vec::with_capacity(count as usize);
    for _ in 0..count {
        keys.push(read_key(&mut buf)?);
    }
    if buf.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_rejections() {
        let f = DigestFunction::Sha256;
        let root = BlobKey::of(f, b"root");
        let keys: Vec<BlobKey> = (0..5u8).map(|i| BlobKey::of(f, &[i; 300])).collect();
        let token = encode_token(f, &root, keys.iter());
        assert_eq!(decode_token(&token, f, &root).unwrap(), keys);
        let other = BlobKey::of(f, b"other");
        assert!(decode_token(&token, f, &other).is_err());
        assert!(decode_token(&token, DigestFunction::Blake3, &root).is_err());
        assert!(decode_token("!!", f, &root).is_err());
        assert!(decode_token(&token[..token.len() - 3], f, &root).is_err());
        let empty = encode_token(f, &root, std::iter::empty());
        assert!(decode_token(&empty, f, &root).unwrap().is_empty());
    }
}
