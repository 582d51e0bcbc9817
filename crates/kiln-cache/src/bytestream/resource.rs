//! Parsing ByteStream resource names (REAPI v2, ContentAddressableStorage
//! service comment):
//!
//! - read:  `{instance}/blobs/{digest_function/}{hash}/{size}`
//! - read:  `{instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}`
//! - write: `{instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/metadata}`
//! - write: `{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/metadata}`
//!
//! The instance name is optional and may span several segments: it is
//! everything before the first keyword segment. The digest function segment
//! is present for functions that cannot be inferred from the hash length
//! (BLAKE3, GITSHA1); an explicit name is accepted for the others too.

use kiln_digest::{BlobKey, DigestFunction};

use crate::{CacheError, CacheResult};

/// Segments that can never be part of an instance name.
const KEYWORDS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// How the bytes of a resource are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    /// `blobs/...`: the blob's plain bytes.
    Identity,
    /// `compressed-blobs/zstd/...`.
    Zstd,
}

/// A parsed read resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource<'a> {
    pub instance: &'a str,
    pub compressor: Compressor,
    pub key: BlobKey,
}

/// A parsed upload resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource<'a> {
    pub instance: &'a str,
    pub uuid: &'a str,
    pub compressor: Compressor,
    pub key: BlobKey,
}

fn invalid(name: &str, problem: impl std::fmt::Display) -> CacheError {
    let shown: String = name.chars().take(300).collect();
    CacheError::InvalidArgument(format!("invalid resource name {shown:?}: {problem}"))
}

/// Splits off the instance name: everything before the first segment for
/// which `is_keyword` holds. Returns the instance and the remaining segments
/// (starting at the keyword).
fn split_instance<'a>(
    name: &'a str,
    is_keyword: impl Fn(&str) -> bool,
    expected: &str,
) -> CacheResult<(&'a str, Vec<&'a str>)> {
    let segments: Vec<&str> = name.split('/').collect();
    let Some(pos) = segments.iter().position(|s| is_keyword(s)) else {
        return Err(invalid(name, format_args!("no {expected} segment")));
    };
    let instance_segments = &segments[..pos];
    if let Some(bad) = instance_segments.iter().find(|s| KEYWORDS.contains(s)) {
        return Err(invalid(
            name,
            format_args!("instance name contains the reserved segment {bad:?}"),
        ));
    }
    if instance_segments.iter().any(|s| s.is_empty()) {
        return Err(invalid(name, "instance name has an empty path segment"));
    }
    // The instance's bytes are the prefix before the keyword (minus the '/').
    let instance_len: usize = instance_segments.iter().map(|s| s.len() + 1).sum();
    let instance = &name[..instance_len.saturating_sub(1)];
    Ok((instance, segments[pos..].to_vec()))
}

/// Parses `blobs/{fn/}{hash}/{size}` or `compressed-blobs/{c}/{fn/}{hash}/{size}`
/// from `segs` (starting at the keyword). Returns the compressor, the key and
/// the number of segments consumed.
fn parse_blob_part(name: &str, segs: &[&str]) -> CacheResult<(Compressor, BlobKey, usize)> {
    let mut i = 0;
    let compressor = match segs.first().copied() {
        Some("blobs") => {
            i += 1;
            Compressor::Identity
        }
        Some("compressed-blobs") => {
            let c = segs
                .get(1)
                .copied()
                .ok_or_else(|| invalid(name, "missing compressor after compressed-blobs"))?;
            i += 2;
            match c {
                "zstd" => Compressor::Zstd,
                "identity" => {
                    return Err(invalid(
                        name,
                        "compressor \"identity\" is not allowed in compressed-blobs; use blobs/",
                    ));
                }
                "deflate" | "brotli" => {
                    return Err(invalid(
                        name,
                        format_args!("compressor {c:?} is not supported (only zstd)"),
                    ));
                }
                other => return Err(invalid(name, format_args!("unknown compressor {other:?}"))),
            }
        }
        _ => return Err(invalid(name, "expected blobs or compressed-blobs")),
    };

    let seg = segs
        .get(i)
        .copied()
        .ok_or_else(|| invalid(name, "missing hash"))?;
    let explicit = if let Some(f) = DigestFunction::from_name(seg) {
        i += 1;
        Some(f)
    } else if seg.is_empty() || seg.bytes().all(|b| b.is_ascii_hexdigit()) {
        None
    } else {
        return Err(invalid(
            name,
            format_args!("{seg:?} is neither a supported digest function nor a hex hash"),
        ));
    };
    let hash = segs
        .get(i)
        .copied()
        .ok_or_else(|| invalid(name, "missing hash"))?;
    let size_seg = segs
        .get(i + 1)
        .copied()
        .ok_or_else(|| invalid(name, "missing size"))?;
    i += 2;

    let function = match explicit {
        Some(f) => f,
        None => DigestFunction::infer(hash.len()).map_err(|e| invalid(name, e))?,
    };
    let size = parse_size(size_seg).ok_or_else(|| {
        invalid(
            name,
            format_args!("size {size_seg:?} is not a non-negative decimal integer"),
        )
    })?;
    let key = BlobKey::from_hex(function, hash, size).map_err(|e| invalid(name, e))?;
    Ok((compressor, key, i))
}

/// A size segment: ASCII digits only (no sign), fitting an i64.
fn parse_size(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok()
}

/// Parses a `ReadRequest.resource_name`.
pub fn parse_read(name: &str) -> CacheResult<ReadResource<'_>> {
    let (instance, segs) = split_instance(
        name,
        |s| s == "blobs" || s == "compressed-blobs",
        "blobs or compressed-blobs",
    )?;
    let (compressor, key, used) = parse_blob_part(name, &segs)?;
    if used != segs.len() {
        return Err(invalid(name, "unexpected segments after the size"));
    }
    Ok(ReadResource {
        instance,
        compressor,
        key,
    })
}

/// Parses a `WriteRequest.resource_name` (or a QueryWriteStatus one).
pub fn parse_write(name: &str) -> CacheResult<WriteResource<'_>> {
    let (instance, segs) = split_instance(name, |s| s == "uploads", "uploads")?;
    let uuid = segs
        .get(1)
        .copied()
        .ok_or_else(|| invalid(name, "missing upload id after uploads"))?;
    if uuid.is_empty() || KEYWORDS.contains(&uuid) {
        return Err(invalid(name, "missing upload id after uploads"));
    }
    // Trailing segments after the size are optional metadata, ignored.
    let (compressor, key, _) = parse_blob_part(name, &segs[2..])?;
    Ok(WriteResource {
        instance,
        uuid,
        compressor,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn sha_key(size: i64) -> BlobKey {
        BlobKey::from_hex(DigestFunction::Sha256, SHA, size).unwrap()
    }

    /// Parses a read name into owned parts: (instance, compressor, key).
    fn read_ok(name: &str) -> (String, Compressor, BlobKey) {
        let r = parse_read(name).unwrap();
        (r.instance.to_string(), r.compressor, r.key)
    }

    /// Parses an upload name into owned parts: (instance, uuid, compressor, key).
    fn write_ok(name: &str) -> (String, String, Compressor, BlobKey) {
        let w = parse_write(name).unwrap();
        (w.instance.to_string(), w.uuid.to_string(), w.compressor, w.key)
    }

    #[test]
    fn read_names() {
        let (inst, c, key) = read_ok(&format!("blobs/{SHA}/12"));
        assert_eq!((inst.as_str(), c, key), ("", Compressor::Identity, sha_key(12)));

        let (inst, c, key) = read_ok(&format!("a/b/c/blobs/{SHA}/0"));
        assert_eq!(
            (inst.as_str(), c, key),
            ("a/b/c", Compressor::Identity, sha_key(0))
        );

        let (inst, c, key) = read_ok(&format!("main/compressed-blobs/zstd/{SHA}/7"));
        assert_eq!((inst.as_str(), c, key), ("main", Compressor::Zstd, sha_key(7)));

        // Explicit function: BLAKE3 has the same length as SHA-256.
        let (_, _, key) = read_ok(&format!("x/blobs/blake3/{SHA}/3"));
        assert_eq!(key.function(), DigestFunction::Blake3);
        let (_, c, key) = read_ok(&format!("compressed-blobs/zstd/sha256/{SHA}/3"));
        assert_eq!((c, key), (Compressor::Zstd, sha_key(3)));

        // Inference from length.
        let md5 = "d41d8cd98f00b204e9800998ecf8427e";
        let (_, _, key) = read_ok(&format!("blobs/{md5}/0"));
        assert_eq!(key.function(), DigestFunction::Md5);
        let sha1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709";
        let (_, _, key) = read_ok(&format!("blobs/gitsha1/{sha1}/0"));
        assert_eq!(key.function(), DigestFunction::GitSha1);
        let (_, _, key) = read_ok(&format!("blobs/{sha1}/0"));
        assert_eq!(key.function(), DigestFunction::Sha1);
    }

    #[test]
    fn write_names() {
        let (inst, uuid, c, key) = write_ok(&format!("uploads/u-1/blobs/{SHA}/12"));
        assert_eq!(
            (inst.as_str(), uuid.as_str(), c, key),
            ("", "u-1", Compressor::Identity, sha_key(12))
        );

        let (inst, _, c, key) = write_ok(&format!(
            "in/st/uploads/u/compressed-blobs/zstd/{SHA}/5/meta/data"
        ));
        assert_eq!((inst.as_str(), c, key), ("in/st", Compressor::Zstd, sha_key(5)));

        let (_, _, _, key) = write_ok(&format!("uploads/u/blobs/blake3/{SHA}/5/extra"));
        assert_eq!(key.function(), DigestFunction::Blake3);
    }

    #[test]
    fn malformed_names() {
        let bad_reads = [
            String::new(),
            "blobs".to_string(),
            format!("blobs/{SHA}"),
            format!("blobs/{SHA}/"),
            format!("blobs/{SHA}/-1"),
            format!("blobs/{SHA}/+1"),
            format!("blobs/{SHA}/1x"),
            format!("blobs/{SHA}/99999999999999999999"),
            format!("blobs/{SHA}/1/extra"),
            "blobs/abc/1".to_string(),
            format!("blobs/{}/1", SHA.to_uppercase()),
            format!("blobs/sha512/{SHA}/1"),
            format!("blobs/murmur3/{SHA}/1"),
            format!("compressed-blobs/{SHA}/1"),
            format!("compressed-blobs/identity/{SHA}/1"),
            format!("compressed-blobs/deflate/{SHA}/1"),
            format!("compressed-blobs/lz4/{SHA}/1"),
            format!("/blobs/{SHA}/1"),
            format!("a//b/blobs/{SHA}/1"),
            format!("uploads/u/blobs/{SHA}/1"),
            format!("actions/blobs/{SHA}/1"),
            format!("main/{SHA}/1"),
        ];
        for name in &bad_reads {
            let err = parse_read(name).expect_err(name);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err}");
        }
        let bad_writes = [
            format!("blobs/{SHA}/1"),
            format!("uploads/blobs/{SHA}/1"),
            format!("uploads//blobs/{SHA}/1"),
            format!("uploads/u/{SHA}/1"),
            format!("uploads/u/blobs/{SHA}"),
            format!("uploads/u/blobs/{SHA}/-5"),
            format!("uploads/u/compressed-blobs/identity/{SHA}/1"),
            format!("uploads/u/compressed-blobs/zstd/{SHA}"),
            "uploads/u".to_string(),
        ];
        for name in &bad_writes {
            let err = parse_write(name).expect_err(name);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err}");
        }
    }

    #[test]
    fn messages_name_the_problem() {
        let e = parse_read(&format!("compressed-blobs/identity/{SHA}/1")).unwrap_err();
        assert!(e.to_string().contains("identity"), "{e}");
        let e = parse_read(&format!("blobs/{SHA}/-1")).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let e = parse_read(&format!("compressed-blobs/br/{SHA}/1")).unwrap_err();
        assert!(e.to_string().contains("unknown compressor"), "{e}");
    }
}
