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
/// [`MAX_MESSAGE_BYTES`] or undecodable → 422. The empty blob (the empty
/// Directory, among others) is always present.
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
    let data = if key.is_empty_blob() {
        // Never stored, always present (REAPI), as in `read_prefix`.
        Bytes::new()
    } else {
        codec::get_identity(instance.cas.as_ref(), key)
            .await
            .map_err(DashboardError::store(format!(
                "reading {what} {key} from the CAS of instance {:?}",
                instance.name
            )))?
            .ok_or_else(|| DashboardError::NotFound(format!("{what} {key} is not in the CAS")))?
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use kiln_digest::DigestFunction;
    use kiln_proto::reapi::Directory;
    use kiln_store::Store;
    use kiln_store::memory::MemoryStore;

    #[tokio::test]
    async fn the_empty_blob_is_present_without_being_stored() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
        let instance = Instance::new("", store.clone(), store);
        let empty = BlobKey::empty(DigestFunction::Sha256);
        let dir: Directory = read_message(&instance, &empty, "Directory").await.unwrap();
        assert_eq!(dir, Directory::default());
        let opt: Option<Directory> = read_message_opt(&instance, &empty, "Directory").await.unwrap();
        assert_eq!(opt, Some(Directory::default()));
        assert_eq!(
            read_prefix(&instance, &empty, PREVIEW_BYTES).await.unwrap(),
            Some((Bytes::new(), false))
        );
        // Any other absent blob is still missing.
        let absent = BlobKey::of(DigestFunction::Sha256, b"absent");
        assert!(matches!(
            read_message::<Directory>(&instance, &absent, "Directory").await,
            Err(DashboardError::NotFound(_))
        ));
        assert_eq!(
            read_prefix(&instance, &absent, PREVIEW_BYTES).await.unwrap(),
            None
        );
    }
}
