use std::fmt;

use kiln_proto::reapi::Digest;

use crate::{DigestError, DigestFunction};

/// A raw hash of up to 64 bytes, stored compactly: the first 32 bytes
/// inline, the rest (SHA-384/SHA-512 only) boxed. Its length is implied by
/// the digest function of the [`BlobKey`] that holds it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HashBytes {
    head: [u8; 32],
    tail: Option<Box<[u8; 32]>>,
}

impl HashBytes {
    fn from_slice(raw: &[u8]) -> Self {
        let mut head = [0u8; 32];
        let n = raw.len().min(32);
        head[..n].copy_from_slice(&raw[..n]);
        let tail = (raw.len() > 32).then(|| {
            let mut t = [0u8; 32];
            t[..raw.len() - 32].copy_from_slice(&raw[32..]);
            Box::new(t)
        });
        HashBytes { head, tail }
    }
}

/// The identity of a blob in every store: (digest function, hash, size).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    function: DigestFunction,
    size: u64,
    hash: HashBytes,
}

impl BlobKey {
    /// Builds a key from raw hash bytes; the length must match the function.
    pub fn from_raw(function: DigestFunction, raw: &[u8], size: u64) -> Result<Self, DigestError> {
        if raw.len() != function.hash_len() {
            return Err(DigestError::BadHash {
                hash: hex::encode(raw),
                function: function.name(),
                expected: function.hex_len(),
            });
        }
        Ok(BlobKey {
            function,
            size,
            hash: HashBytes::from_slice(raw),
        })
    }

    /// Parses a lowercase hex hash and a size (as found in a Digest or a
    /// resource name) for a known function.
    pub fn from_hex(function: DigestFunction, hash: &str, size: i64) -> Result<Self, DigestError> {
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        let bad = || DigestError::BadHash {
            hash: hash.chars().take(160).collect(),
            function: function.name(),
            expected: function.hex_len(),
        };
        if hash.len() != function.hex_len()
            || !hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let mut raw = [0u8; 64];
        let raw = &mut raw[..function.hash_len()];
        hex::decode_to_slice(hash, raw).map_err(|_| bad())?;
        Self::from_raw(function, raw, size as u64)
    }

    /// Parses a proto Digest for a known function.
    pub fn from_digest(function: DigestFunction, digest: &Digest) -> Result<Self, DigestError> {
        Self::from_hex(function, &digest.hash, digest.size_bytes)
    }

    /// Parses an optional proto Digest (a missing one is an error).
    pub fn from_opt_digest(function: DigestFunction, digest: Option<&Digest>) -> Result<Self, DigestError> {
        Self::from_digest(function, digest.ok_or(DigestError::Missing)?)
    }

    /// The key of the empty blob for `function`.
    pub fn empty(function: DigestFunction) -> Self {
        let raw = crate::hash_bytes(function, &[]);
        // The hasher always yields `function.hash_len()` bytes.
        BlobKey {
            function,
            size: 0,
            hash: HashBytes::from_slice(&raw),
        }
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == Self::empty(self.function)
    }

    /// The raw hash bytes.
    pub fn hash_raw(&self) -> Vec<u8> {
        let n = self.function.hash_len();
        let mut out = Vec::with_capacity(n);
        out.extend_from_slice(&self.hash.head[..n.min(32)]);
        if let Some(t) = &self.hash.tail {
            out.extend_from_slice(&t[..n - 32]);
        }
        out
    }

    /// The lowercase hex hash.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash_raw())
    }

    /// The proto Digest of this key.
    pub fn to_digest(&self) -> Digest {
        Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    /// A stable 64-bit fingerprint (first 8 hash bytes), for sharding.
    pub fn fingerprint(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.hash.head[..8]);
        u64::from_le_bytes(b) ^ (self.function as u64).rotate_left(56)
    }
}

impl fmt::Display for BlobKey {
    /// `{function}:{hash}/{size}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.function, self.hash_hex(), self.size)
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_bytes;

    #[test]
    fn hex_round_trip_all_functions() {
        for f in DigestFunction::ALL {
            let raw = hash_bytes(f, b"hello");
            let hex = hex::encode(&raw);
            let key = BlobKey::from_hex(f, &hex, 5).unwrap();
            assert_eq!(key.hash_hex(), hex);
            assert_eq!(key.size(), 5);
            assert_eq!(key.to_digest().hash, hex);
        }
    }

    #[test]
    fn same_hash_different_function_are_different_keys() {
        let hex = "ab".repeat(32);
        let a = BlobKey::from_hex(DigestFunction::Sha256, &hex, 1).unwrap();
        let b = BlobKey::from_hex(DigestFunction::Blake3, &hex, 1).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_bad_hashes() {
        let f = DigestFunction::Sha256;
        assert!(BlobKey::from_hex(f, &"AB".repeat(32), 1).is_err(), "uppercase");
        assert!(BlobKey::from_hex(f, &"ab".repeat(31), 1).is_err(), "short");
        assert!(BlobKey::from_hex(f, &"zz".repeat(32), 1).is_err(), "not hex");
        assert!(matches!(
            BlobKey::from_hex(f, &"ab".repeat(32), -1),
            Err(DigestError::NegativeSize(-1))
        ));
    }

    #[test]
    fn empty_blob_key() {
        let e = BlobKey::empty(DigestFunction::Sha256);
        assert_eq!(
            e.hash_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(e.is_empty_blob());
    }
}
