//! Where things live under the store's root, and how a blob's file name
//! encodes its key and encoding.
//!
//! ```text
//! <root>/blobs/<function>/<first 2 hash hex chars>/<hash>-<size>[.zst]
//! <root>/tmp/<unique name>            payloads being written
//! <root>/tmp-stale-<unique>/          a previous run's tmp/, being deleted
//! ```
//!
//! A file name alone identifies the blob (function from the directory, hash,
//! size and encoding from the name), so the startup scan needs no metadata
//! besides the file's length and mtime.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_digest::{BlobKey, DigestFunction};

use crate::Encoding;

pub(crate) const BLOBS_DIR: &str = "blobs";
pub(crate) const TMP_DIR: &str = "tmp";
pub(crate) const STALE_TMP_PREFIX: &str = "tmp-stale-";
const ZSTD_SUFFIX: &str = ".zst";

/// Paths of one store root.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    /// Distinguishes this process's temp files from any other's.
    tag: u64,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Layout {
            blobs: root.join(BLOBS_DIR),
            tmp: root.join(TMP_DIR),
            root,
            tag: rand::random(),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blobs(&self) -> &Path {
        &self.blobs
    }

    pub(crate) fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// The final path of `key` stored in `encoding`.
    pub(crate) fn blob_path(&self, key: &BlobKey, encoding: Encoding) -> PathBuf {
        let hash = key.hash_hex();
        let mut p = self.blobs.join(key.function().name());
        p.push(&hash[..2]);
        p.push(file_name(&hash, key.size(), encoding));
        p
    }

    /// A fresh, unique path under `tmp/`.
    pub(crate) fn new_tmp_path(&self) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{:016x}-{n}", self.tag))
    }

    /// A fresh, unique name for moving a stale `tmp/` aside.
    pub(crate) fn new_stale_tmp_path(&self) -> PathBuf {
        let n: u64 = rand::random();
        self.root.join(format!("{STALE_TMP_PREFIX}{n:016x}"))
    }
}

/// `<hash>-<size>` plus `.zst` for zstd payloads.
pub(crate) fn file_name(hash_hex: &str, size: u64, encoding: Encoding) -> String {
    match encoding {
        Encoding::Identity => format!("{hash_hex}-{size}"),
        Encoding::Zstd => format!("{hash_hex}-{size}{ZSTD_SUFFIX}"),
    }
}

/// Parses a blob file name found in the fan-out directory `fanout` (the
/// first two hex characters of the hash) of `function`. `None` for anything
/// this store did not write.
pub(crate) fn parse_file_name(
    function: DigestFunction,
    fanout: &str,
    name: &str,
) -> Option<(BlobKey, Encoding)> {
    let (stem, encoding) = match name.strip_suffix(ZSTD_SUFFIX) {
        Some(stem) => (stem, Encoding::Zstd),
        None => (name, Encoding::Identity),
    };
    let (hash, size) = stem.split_once('-')?;
    if !hash.starts_with(fanout) || fanout.len() != 2 {
        return None;
    }
    // Canonical decimal only, so that a key has exactly one file name.
    if size.is_empty()
        || (size.len() > 1 && size.starts_with('0'))
        || !size.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let size: i64 = size.parse().ok()?;
    let key = BlobKey::from_hex(function, hash, size).ok()?;
    Some((key, encoding))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let key = BlobKey::of(DigestFunction::Blake3, b"hello");
        let layout = Layout::new(PathBuf::from("/r"));
        for enc in [Encoding::Identity, Encoding::Zstd] {
            let p = layout.blob_path(&key, enc);
            let fanout = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(p.starts_with("/r/blobs/blake3/"));
            assert_eq!(
                parse_file_name(DigestFunction::Blake3, fanout, name),
                Some((key.clone(), enc))
            );
            // The same name under another function is another key.
            let other = parse_file_name(DigestFunction::Sha256, fanout, name).unwrap().0;
            assert_ne!(other, key);
        }
    }

    #[test]
    fn rejects_foreign_names() {
        let key = BlobKey::of(DigestFunction::Sha256, b"x");
        let hash = key.hash_hex();
        let f = DigestFunction::Sha256;
        let fan = &hash[..2];
        assert!(parse_file_name(f, fan, &format!("{hash}-1")).is_some());
        assert!(parse_file_name(f, fan, &format!("{hash}-01")).is_none());
        assert!(parse_file_name(f, fan, &format!("{hash}--1")).is_none());
        assert!(parse_file_name(f, fan, &format!("{hash}-1.gz")).is_none());
        assert!(parse_file_name(f, fan, &hash).is_none());
        assert!(parse_file_name(f, "zz", &format!("{hash}-1")).is_none());
        assert!(parse_file_name(f, fan, &format!("{}-1", &hash[..10])).is_none());
        assert!(parse_file_name(f, fan, "garbage").is_none());
    }
}
