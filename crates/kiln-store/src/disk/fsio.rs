//! Blocking file operations of the disk store. Every function here runs on
//! the blocking pool (via `task::blocking`), never on an async thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

use crate::Encoding;

/// Creates a new temp file (fails if the name exists).
pub(crate) fn create_tmp(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

/// Writes chunks to `file` in order.
pub(crate) fn write_chunks(file: &mut File, chunks: &[Bytes]) -> io::Result<()> {
    for chunk in chunks {
        file.write_all(chunk)?;
    }
    Ok(())
}

/// Writes a whole payload to a new temp file, flushed to stable storage
/// when `sync`.
pub(crate) fn write_tmp(path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
    let result = (|| {
        let mut f = create_tmp(path)?;
        f.write_all(data)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = remove_if_exists(path);
    }
    result
}

/// Deletes a file; a missing file is not an error. Returns whether it existed.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Flushes a directory's entries to stable storage.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames a complete temp file to its final path, creating the fan-out
/// directories on first use. With `sync`, the directory entry is flushed
/// too, so the blob survives a power loss once this returns.
pub(crate) fn install(tmp: &Path, dst: &Path, sync: bool) -> io::Result<()> {
    match std::fs::rename(tmp, dst) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && !tmp.exists() => return Err(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dst.parent().ok_or(e)?;
            let created = create_dirs(parent)?;
            std::fs::rename(tmp, dst)?;
            if sync {
                // New directories must be reachable after a power loss too.
                for dir in created.iter().rev() {
                    if let Some(p) = dir.parent() {
                        sync_dir(p)?;
                    }
                }
            }
        }
        Err(e) => return Err(e),
    }
    if sync && let Some(parent) = dst.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// `create_dir_all` that reports which directories it created (deepest last).
fn create_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.is_dir() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    missing.reverse();
    for d in &missing {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(missing)
}

/// An opened payload file.
#[derive(Debug)]
pub(crate) struct Opened {
    pub encoding: Encoding,
    pub file: File,
    pub len: u64,
}

/// Opens the first of `candidates` that exists. `Ok(None)`: none does.
pub(crate) fn open_first(candidates: &[(Encoding, PathBuf)]) -> io::Result<Option<Opened>> {
    for (encoding, path) in candidates {
        match File::open(path) {
            Ok(file) => {
                let len = file.metadata()?.len();
                return Ok(Some(Opened {
                    encoding: *encoding,
                    file,
                    len,
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Whether any of `candidates` exists.
pub(crate) fn exists_any(candidates: &[PathBuf]) -> io::Result<bool> {
    for path in candidates {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Reads a whole file of `len` bytes (as measured when it was opened).
pub(crate) fn read_all(mut file: File, len: u64) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(len as usize);
    file.read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("file changed length while read: {} of {len} bytes", buf.len()),
        ));
    }
    Ok(Bytes::from(buf))
}

/// Positions `file` at `offset`.
pub(crate) fn seek_to(file: &mut File, offset: u64) -> io::Result<()> {
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))?;
    }
    Ok(())
}

/// Reads exactly `n` bytes (fewer only at an unexpected end of file, which
/// is an error).
pub(crate) fn read_chunk(file: &mut File, n: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(n);
    let mut filled = 0;
    while filled < n {
        match file.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ended {} bytes early", n - filled),
                ));
            }
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf.freeze())
}
