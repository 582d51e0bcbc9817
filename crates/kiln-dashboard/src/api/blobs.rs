//! Bounded reads of blobs from an instance's CAS for the API.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kiln_cache::Instance;
use kiln_digest::BlobKey;
use kiln_store::codec;
use prost::Message;

use crate::error::{DashboardError, DashboardResult};

/// Largest metadata message (Action, Command, Directory, Tree) decoded.
pub const MAX_MESSAGE_BYTES: u64 = 16 << 20;
/// Bytes of stdout/stderr or a blob shown inline; the rest is downloaded.
pub const PREVIEW_BYTES: u64 = 64 << 10;

/// The first `limit` bytes of a blob (`None` if absent) and whether there
/// is more.
pub async fn read_prefix(
    instance: &Instance,
    key: &BlobKey,
    limit: u64,
) -> DashboardResult<Option<(Bytes, bool)>> {
    if key.is_empty_blob() {
        // The empty blob is always present (REAPI), stored or not.
        return Ok(Some((Bytes::new(), false)));
    }
    let context = || format!("reading {key} from the CAS of instance {:?}", instance.name);
    let Some(read) = instance
        .cas
        .read(key, 0)
        .await
        .map_err(DashboardError::store(context()))?
    else {
        return Ok(None);
    };
    let mut stream = codec::identity_stream(read, 0);
    let cap = usize::try_from(limit.min(key.size())).unwrap_or(usize::MAX);
    let mut out = BytesMut::with_capacity(cap);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(DashboardError::store(context()))?;
        let room = cap - out.len();
        if chunk.len() >= room {
            out.extend_from_slice(&chunk[..room]);
            break;
        }
        out.extend_from_slice(&chunk);
    }
    let truncated = key.size() > out.len() as u64;
    Ok(Some((out.freeze(), truncated)))
}

/// Decodes a protocol message stored in the CAS. Absent → 404; larger than
/// [`MAX_MESSAGE_BYTES`] or undecodable → 422.
pub async fn read_message<M: Message + Default>(
    instance: &Instance,
    key: &BlobKey,
    what: &str,
) -> DashboardResult<M> {
    if key.size() > MAX_MESSAGE_BYTES {
        return Err(DashboardError::Unprocessable(format!(
            "{key} is {} bytes: too large to decode as a {what} here (limit {MAX_MESSAGE_BYTES}); download it instead",
            key.size()
        )));
    }
    let data = codec::get_identity(instance.cas.as_ref(), key)
        .await
        .map_err(DashboardError::store(format!(
            "reading {what} {key} from the CAS of instance {:?}",
            instance.name
        )))?
        .ok_or_else(|| DashboardError::NotFound(format!("{what} {key} is not in the CAS")))?;
    M::decode(data).map_err(|e| DashboardError::Unprocessable(format!("{key} is not a valid {what}: {e}")))
}

/// Like [`read_message`], but a missing blob is `None`.
pub async fn read_message_opt<M: Message + Default>(
    instance: &Instance,
    key: &BlobKey,
    what: &str,
) -> DashboardResult<Option<M>> {
    match read_message(instance, key, what).await {
        Ok(m) => Ok(Some(m)),
        Err(DashboardError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
