//! Blob storage for Kiln.
//!
//! Every store implements [`Store`]: a map from [`BlobKey`] to an opaque
//! payload tagged with its [`Encoding`]. Backends ([`memory`], [`disk`]) hold
//! data; decorators ([`tiered`], [`compressed`], [`existence_cache`]) wrap any
//! `Arc<dyn Store>` and add one behaviour each, so a configuration is a tree
//! of stores. Nothing downcasts to a concrete type.
//!
//! Stores never verify content: callers (the CAS services) verify digests
//! before `put` or before [`BlobWriter::commit`]. The same trait backs the
//! Action Cache, whose payloads are serialized `ActionResult`s keyed by the
//! action digest.

pub mod codec;
pub mod compressed;
pub mod disk;
mod error;
pub mod existence_cache;
pub mod memory;
pub mod task;
pub mod tiered;
pub mod touch_behind;
mod types;

pub use error::{StoreError, StoreResult};
pub use kiln_digest::BlobKey;
pub use types::{Blob, BlobRead, BlobWriter, ChunkStream, Encoding, Store, StoreStats};
