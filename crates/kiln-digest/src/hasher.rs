use sha1::Digest as _;

use crate::{BlobKey, DigestError, DigestFunction};

/// An incremental hasher for any supported function. SHA-1/SHA-2 use the
/// CPU's SHA extensions when present (the `sha2`/`sha1` crates detect them
/// at run time; the `asm` feature covers CPUs without them).
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
    Blake3(Box<blake3::Hasher>),
    /// Git's blob hash: SHA-1 over `blob {size}\0` followed by the content.
    GitSha1(sha1::Sha1),
}

impl Hasher {
    /// A hasher for content of `size` bytes (`size` only matters for
    /// GITSHA1, whose header includes the length).
    pub fn new(function: DigestFunction, size: u64) -> Self {
        match function {
            DigestFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestFunction::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            DigestFunction::Md5 => Hasher::Md5(md5::Md5::new()),
            DigestFunction::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            DigestFunction::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            DigestFunction::GitSha1 => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Hasher::GitSha1(h)
            }
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha1(h) | Hasher::GitSha1(h) => h.update(data),
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The raw hash.
    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) | Hasher::GitSha1(h) => h.finalize().to_vec(),
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
            Hasher::Blake3(h) => h.finalize().as_bytes().to_vec(),
        }
    }

    /// Finishes and checks the result against `expected` (hash and size;
    /// `actual_size` is the number of bytes fed in).
    pub fn verify(self, expected: &BlobKey, actual_size: u64) -> Result<(), DigestError> {
        if actual_size != expected.size() {
            return Err(DigestError::SizeMismatch {
                expected: expected.size(),
                actual: actual_size,
            });
        }
        let raw = self.finish();
        if raw != expected.hash_raw() {
            return Err(DigestError::Mismatch {
                expected: expected.hash_hex(),
                actual: hex::encode(raw),
            });
        }
        Ok(())
    }
}

/// Hashes a whole buffer.
pub fn hash_bytes(function: DigestFunction, data: &[u8]) -> Vec<u8> {
    let mut h = Hasher::new(function, data.len() as u64);
    h.update(data);
    h.finish()
}

impl BlobKey {
    /// Computes the key of `data` under `function`.
    pub fn of(function: DigestFunction, data: &[u8]) -> BlobKey {
        let raw = hash_bytes(function, data);
        // `hash_bytes` yields exactly `function.hash_len()` bytes.
        match BlobKey::from_raw(function, &raw, data.len() as u64) {
            Ok(k) => k,
            Err(_) => unreachable!("hasher output length always matches the function"),
        }
    }

    /// Verifies that `data` is the content of this key.
    pub fn verify(&self, data: &[u8]) -> Result<(), DigestError> {
        let mut h = Hasher::new(self.function(), data.len() as u64);
        h.update(data);
        h.verify(self, data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        let cases = [
            (
                DigestFunction::Sha256,
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            ),
            (DigestFunction::Sha1, "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
            (DigestFunction::Md5, "5d41402abc4b2a76b9719d911017c592"),
            (
                DigestFunction::Blake3,
                "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f",
            ),
            // `echo -n hello | git hash-object --stdin`
            (
                DigestFunction::GitSha1,
                "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(hex::encode(hash_bytes(f, b"hello")), want, "{f}");
        }
        assert_eq!(hash_bytes(DigestFunction::Sha384, b"").len(), 48);
        assert_eq!(hash_bytes(DigestFunction::Sha512, b"").len(), 64);
    }

    #[test]
    fn verify_detects_mismatch() {
        let key = BlobKey::of(DigestFunction::Sha256, b"abc");
        assert!(key.verify(b"abc").is_ok());
        assert!(matches!(key.verify(b"abd"), Err(DigestError::Mismatch { .. })));
        assert!(matches!(
            key.verify(b"abcd"),
            Err(DigestError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for f in DigestFunction::ALL {
            let mut h = Hasher::new(f, data.len() as u64);
            for chunk in data.chunks(7777) {
                h.update(chunk);
            }
            assert_eq!(h.finish(), hash_bytes(f, &data), "{f}");
        }
    }
}
