//! Digests: which hash functions Kiln supports, how a blob is keyed, and
//! streaming hashers that verify content as it arrives.
//!
//! Storage is keyed by [`BlobKey`] = (digest function, hash, size): hash
//! lengths collide across functions (BLAKE3 and SHA-256 are both 64 hex
//! characters; SHA-1 and GITSHA1 both 40), so the function is part of the key.

pub mod batch;
mod error;
mod function;
mod hasher;
mod key;

pub use error::DigestError;
pub use function::DigestFunction;
pub use hasher::{Hasher, hash_bytes};
pub use key::{BlobKey, HashBytes};
