use std::fmt;

use kiln_proto::reapi::digest_function::Value as ProtoFn;

use crate::DigestError;

/// A digest function Kiln can compute. SHA256TREE, VSO and MURMUR3 are not
/// implemented and are therefore never advertised in Capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DigestFunction {
    Sha256 = 1,
    Sha1 = 2,
    Md5 = 3,
    Sha384 = 4,
    Sha512 = 5,
    Blake3 = 6,
    GitSha1 = 7,
}

impl DigestFunction {
    /// Every supported function, SHA-256 (the default) first.
    pub const ALL: [DigestFunction; 7] = [
        DigestFunction::Sha256,
        DigestFunction::Sha1,
        DigestFunction::Md5,
        DigestFunction::Sha384,
        DigestFunction::Sha512,
        DigestFunction::Blake3,
        DigestFunction::GitSha1,
    ];

    /// Length of the raw hash in bytes.
    pub const fn hash_len(self) -> usize {
        match self {
            DigestFunction::Md5 => 16,
            DigestFunction::Sha1 | DigestFunction::GitSha1 => 20,
            DigestFunction::Sha256 | DigestFunction::Blake3 => 32,
            DigestFunction::Sha384 => 48,
            DigestFunction::Sha512 => 64,
        }
    }

    /// Length of the hash in hex characters.
    pub const fn hex_len(self) -> usize {
        self.hash_len() * 2
    }

    /// Lowercase name as used in ByteStream resource names and on disk.
    pub const fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Sha1 => "sha1",
            DigestFunction::Md5 => "md5",
            DigestFunction::Sha384 => "sha384",
            DigestFunction::Sha512 => "sha512",
            DigestFunction::Blake3 => "blake3",
            DigestFunction::GitSha1 => "gitsha1",
        }
    }

    /// Parses the lowercase name (`sha256`, `blake3`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the spec requires the function to be named explicitly in
    /// ByteStream resource names (it cannot be inferred from hash length).
    /// MD5, SHA1, SHA256, SHA384 and SHA512 are inferred; the others are named.
    pub const fn named_in_resource(self) -> bool {
        matches!(self, DigestFunction::Blake3 | DigestFunction::GitSha1)
    }

    pub fn to_proto(self) -> ProtoFn {
        match self {
            DigestFunction::Sha256 => ProtoFn::Sha256,
            DigestFunction::Sha1 => ProtoFn::Sha1,
            DigestFunction::Md5 => ProtoFn::Md5,
            DigestFunction::Sha384 => ProtoFn::Sha384,
            DigestFunction::Sha512 => ProtoFn::Sha512,
            DigestFunction::Blake3 => ProtoFn::Blake3,
            DigestFunction::GitSha1 => ProtoFn::Gitsha1,
        }
    }

    /// Maps a proto enum value. `Ok(None)` means UNKNOWN (unset): the caller
    /// infers the function from the hash length with [`Self::infer`].
    pub fn from_proto(value: i32) -> Result<Option<Self>, DigestError> {
        let f = match ProtoFn::try_from(value) {
            Ok(ProtoFn::Unknown) => return Ok(None),
            Ok(ProtoFn::Sha256) => DigestFunction::Sha256,
            Ok(ProtoFn::Sha1) => DigestFunction::Sha1,
            Ok(ProtoFn::Md5) => DigestFunction::Md5,
            Ok(ProtoFn::Sha384) => DigestFunction::Sha384,
            Ok(ProtoFn::Sha512) => DigestFunction::Sha512,
            Ok(ProtoFn::Blake3) => DigestFunction::Blake3,
            Ok(ProtoFn::Gitsha1) => DigestFunction::GitSha1,
            Ok(other) => return Err(DigestError::Unsupported(other.as_str_name().to_string())),
            Err(_) => return Err(DigestError::Unsupported(format!("enum value {value}"))),
        };
        Ok(Some(f))
    }

    /// The spec's legacy inference when `digest_function` is unset: the
    /// function is deduced from the hash length among MD5, SHA1, SHA256,
    /// SHA384 and SHA512. BLAKE3 and GITSHA1 must always be named.
    pub fn infer(hex_len: usize) -> Result<Self, DigestError> {
        match hex_len {
            32 => Ok(DigestFunction::Md5),
            40 => Ok(DigestFunction::Sha1),
            64 => Ok(DigestFunction::Sha256),
            96 => Ok(DigestFunction::Sha384),
            128 => Ok(DigestFunction::Sha512),
            n => Err(DigestError::CannotInfer(n)),
        }
    }

    /// Resolves a request's `digest_function` field against a hash: explicit
    /// values win, UNKNOWN falls back to [`Self::infer`].
    pub fn resolve(proto_value: i32, hash_hex: &str) -> Result<Self, DigestError> {
        match Self::from_proto(proto_value)? {
            Some(f) => Ok(f),
            None => Self::infer(hash_hex.len()),
        }
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in DigestFunction::ALL {
            assert_eq!(DigestFunction::from_name(f.name()), Some(f));
            assert_eq!(DigestFunction::from_proto(f.to_proto() as i32), Ok(Some(f)));
        }
        assert_eq!(DigestFunction::from_name("sha256tree"), None);
    }

    #[test]
    fn legacy_inference_by_length() {
        assert_eq!(DigestFunction::infer(64), Ok(DigestFunction::Sha256));
        assert_eq!(DigestFunction::infer(40), Ok(DigestFunction::Sha1));
        assert_eq!(DigestFunction::infer(32), Ok(DigestFunction::Md5));
        assert_eq!(DigestFunction::infer(96), Ok(DigestFunction::Sha384));
        assert_eq!(DigestFunction::infer(128), Ok(DigestFunction::Sha512));
        assert!(DigestFunction::infer(63).is_err());
        // An explicit BLAKE3 wins over the SHA-256 length inference.
        let blake = DigestFunction::to_proto(DigestFunction::Blake3) as i32;
        assert_eq!(
            DigestFunction::resolve(blake, &"a".repeat(64)),
            Ok(DigestFunction::Blake3)
        );
        assert_eq!(
            DigestFunction::resolve(0, &"a".repeat(64)),
            Ok(DigestFunction::Sha256)
        );
    }

    #[test]
    fn unimplemented_functions_rejected() {
        let tree = ProtoFn::Sha256tree as i32;
        assert!(matches!(
            DigestFunction::from_proto(tree),
            Err(DigestError::Unsupported(_))
        ));
    }
}
