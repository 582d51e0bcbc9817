//! Digests of the zero-copy wire types ([`kiln_proto::fast`]): parsing a
//! hash held as bytes into a [`BlobKey`] without allocating, and the digest
//! function of a request.

use bytes::Bytes;
use kiln_digest::{BlobKey, DigestError, DigestFunction};
use kiln_proto::fast;

use crate::{CacheError, CacheResult, Instance};

/// Value of each lowercase hex digit; 0xFF for every other byte.
static HEX: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Decodes lowercase hex into `out` (exactly `2 * out.len()` digits);
/// false if any byte is not a lowercase hex digit or the length is wrong.
fn decode_lower_hex(src: &[u8], out: &mut [u8]) -> bool {
    if src.len() != 2 * out.len() {
        return false;
    }
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(src.chunks_exact(2)) {
        let hi = HEX[pair[0] as usize];
        let lo = HEX[pair[1] as usize];
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    bad & 0xF0 == 0
}

/// Parses a digest for a known function. The fast path decodes the hex in
/// place; anything malformed is re-parsed by [`BlobKey::from_hex`] so that
/// errors read exactly as they do everywhere else.
pub fn parse_key(function: DigestFunction, digest: &fast::Digest) -> Result<BlobKey, DigestError> {
    let mut raw = [0u8; 64];
    let raw = &mut raw[..function.hash_len()];
    if digest.size_bytes >= 0
        && decode_lower_hex(&digest.hash, raw)
        && let Ok(key) = BlobKey::from_raw(function, raw, digest.size_bytes as u64)
    {
        return Ok(key);
    }
    BlobKey::from_hex(
        function,
        &String::from_utf8_lossy(&digest.hash),
        digest.size_bytes,
    )
}

/// The digest function of a request whose digests all use one function:
/// the request's `digest_function`, or when unset the one inferred from the
/// length of the first digest's hash (the spec's legacy rule). The instance
/// must accept it.
pub fn request_function(
    instance: &Instance,
    proto_value: i32,
    first_hash: &[u8],
) -> CacheResult<DigestFunction> {
    let f = match DigestFunction::from_proto(proto_value)? {
        Some(f) => f,
        None => DigestFunction::infer(first_hash.len())?,
    };
    instance.check_function(f)?;
    Ok(f)
}

/// The wire digest of a key.
pub fn digest_of(key: &BlobKey) -> fast::Digest {
    fast::Digest {
        hash: Bytes::from(key.hash_hex().into_bytes()),
        size_bytes: key.size() as i64,
    }
}

/// Refuses a request carrying a hash that is not UTF-8: a protobuf `string`
/// must be, and per-item answers echo the digest back.
pub fn check_utf8(digest: &fast::Digest) -> CacheResult<()> {
    if digest.hash_str().is_some() {
        return Ok(());
    }
    Err(CacheError::InvalidArgument(format!(
        "digest hash is not valid UTF-8 ({} bytes)",
        digest.hash.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(hash: &str, size: i64) -> fast::Digest {
        fast::Digest {
            hash: Bytes::copy_from_slice(hash.as_bytes()),
            size_bytes: size,
        }
    }

    #[test]
    fn fast_parse_agrees_with_from_hex() {
        for f in DigestFunction::ALL {
            let key = BlobKey::of(f, b"some content");
            let hex = key.hash_hex();
            assert_eq!(parse_key(f, &digest(&hex, 12)).unwrap(), key, "{f}");
            assert_eq!(digest_of(&key), digest(&hex, 12));
        }
    }

    #[test]
    fn malformed_digests_fail_like_from_hex() {
        let f = DigestFunction::Sha256;
        let good = "ab".repeat(32);
        let cases = [
            ("AB".repeat(32), 1),
            ("ab".repeat(31), 1),
            ("ab".repeat(33), 1),
            ("zz".repeat(32), 1),
            (format!("{}g", &good[..63]), 1),
            (good.clone(), -1),
        ];
        for (hash, size) in cases {
            let fast = parse_key(f, &digest(&hash, size)).unwrap_err();
            let slow = BlobKey::from_hex(f, &hash, size).unwrap_err();
            assert_eq!(fast, slow, "{hash:?} {size}");
        }
        // Every single-byte corruption is caught.
        for pos in 0..64 {
            for b in [b'/', b':', b'`', b'g', b'F', 0u8, 0xff] {
                let mut h = good.clone().into_bytes();
                h[pos] = b;
                let d = fast::Digest {
                    hash: Bytes::from(h),
                    size_bytes: 1,
                };
                assert!(parse_key(f, &d).is_err(), "pos {pos} byte {b}");
            }
        }
        let bad = fast::Digest {
            hash: Bytes::from_static(&[0xff; 64]),
            size_bytes: 1,
        };
        assert!(check_utf8(&bad).is_err());
        assert!(check_utf8(&digest(&good, 1)).is_ok());
    }
}
