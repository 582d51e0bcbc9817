//! The startup scan: walks `blobs/` in the background and rebuilds the
//! index (key and encoding from each file name, payload length and LRU
//! position from one metadata call per file).
//!
//! The fan-out directories are spread over several blocking workers. The
//! files found are merged oldest-mtime first, in batches so that the index
//! lock is never held for long while readers are served. Files this store
//! would not have written (bad names, the older of two encodings of one key) are deleted before writes are
//! allowed, so the accounting matches the files on disk from then on.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Instant, UNIX_EPOCH};

use kiln_digest::DigestFunction;

use super::index::Scanned;
use super::layout::parse_file_name;
use super::{Inner, Phase, now_secs};
use crate::task;

/// Files merged into the index per lock acquisition.
const MERGE_BATCH: usize = 16 * 1024;

/// One `blobs/<function>/<xx>/` directory.
#[derive(Debug, Clone)]
struct FanoutDir {
    function: DigestFunction,
    fanout: String,
    path: PathBuf,
}

/// What a worker found.
#[derive(Debug, Default)]
struct Found {
    files: Vec<Scanned>,
    junk: Vec<PathBuf>,
    errors: Vec<String>,
}

/// Runs the startup scan and publishes its outcome. Holds the store only
/// weakly, so a store dropped meanwhile stops the scan.
pub(super) async fn run(store: Weak<Inner>) {
    let started = Instant::now();
    let outcome = scan(&store).await;
    let Some(s) = store.upgrade() else {
        return;
    };
    match outcome {
        Ok(Some((files, bytes, junk))) => {
            s.index.lock().finish_scan(now_secs());
            // The capacity may have been lowered since the last run.
            if let Err(e) = s.reserve(0).await {
                tracing::error!(error = %e, "cannot trim the disk store to its capacity");
            }
            s.phase.send_replace(Phase::Ready);
            tracing::info!(
                root = %s.layout.root().display(),
                files,
                bytes,
                junk,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "disk store indexed"
            );
        }
        Ok(None) => return,
        Err(e) => {
            tracing::error!(root = %s.layout.root().display(), error = %e, "disk store scan failed; writes disabled");
            s.phase.send_replace(Phase::Failed(e));
        }
    }
    s.changed.notify_waiters();
}

/// `Ok(None)`: the store was dropped. Otherwise (files, bytes, junk deleted).
async fn scan(store: &Weak<Inner>) -> Result<Option<(u64, u64, u64)>, String> {
    let Some(s) = store.upgrade() else {
        return Ok(None);
    };
    let blobs = s.layout.blobs().to_path_buf();
    drop(s);

    let listed = task::blocking("disk-scan-list", {
        let blobs = blobs.clone();
        move || list_fanout_dirs(&blobs)
    })
    .await
    .map_err(|e| e.to_string())?;
    let (dirs, mut junk) = listed.map_err(|e| format!("cannot list {}: {e}", blobs.display()))?;

    // Two walkers per core: the walk is syscall-bound when the metadata is
    // cached and latency-bound when it is not.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
        * 2;
    let mut groups: Vec<Vec<FanoutDir>> = vec![Vec::new(); workers];
    for (i, d) in dirs.into_iter().enumerate() {
        groups[i % workers].push(d);
    }
    let walks = groups
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(|g| task::blocking("disk-scan-walk", move || walk(g)));
    let mut files = Vec::new();
    for found in futures::future::join_all(walks).await {
        let found = found.map_err(|e| e.to_string())?;
        if let Some(first) = found.errors.first() {
            return Err(format!(
                "{} errors while scanning, first: {first}",
                found.errors.len()
            ));
        }
        if files.is_empty() {
            files = found.files;
        } else {
            files.extend(found.files);
        }
        junk.extend(found.junk);
    }
    // Oldest first: each file is appended at the most-recently-used end.
    files.sort_unstable_by_key(|f| f.mtime);
    let count = files.len() as u64;
    let bytes: u64 = files.iter().map(|f| f.len).sum();

    match store.upgrade() {
        Some(s) => s.index.lock().reserve_entries(files.len()),
        None => return Ok(None),
    }
    let mut losers = Vec::new();
    let mut iter = files.into_iter();
    loop {
        let batch: Vec<Scanned> = iter.by_ref().take(MERGE_BATCH).collect();
        if batch.is_empty() {
            break;
        }
        let Some(s) = store.upgrade() else {
            return Ok(None);
        };
        let lost = s.index.lock().insert_scanned(batch);
        losers.extend(lost.into_iter().map(|(key, enc)| s.layout.blob_path(&key, enc)));
        drop(s);
        tokio::task::yield_now().await;
    }
    junk.extend(losers);
    let junk_count = junk.len() as u64;
    if !junk.is_empty() {
        let failed = task::blocking("disk-scan-cleanup", move || delete_junk(junk))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(e) = failed {
            // Not fatal: the file is merely not counted.
            tracing::error!(error = %e, "cannot delete an unexpected file in the blob store");
        }
    }
    Ok(Some((count, bytes, junk_count)))
}

/// Lists `blobs/<function>/<xx>/` directories; stray files at these levels
/// are returned as junk.
fn list_fanout_dirs(blobs: &Path) -> io::Result<(Vec<FanoutDir>, Vec<PathBuf>)> {
    let mut dirs = Vec::new();
    let mut junk = Vec::new();
    for entry in std::fs::read_dir(blobs)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let name = entry.file_name();
        let function = name.to_str().and_then(DigestFunction::from_name);
        match function {
            Some(function) if ft.is_dir() => {
                for sub in std::fs::read_dir(entry.path())? {
                    let sub = sub?;
                    let sub_ft = sub.file_type()?;
                    let sub_name = sub.file_name();
                    match sub_name.to_str() {
                        Some(fanout) if sub_ft.is_dir() && is_fanout_name(fanout) => dirs.push(FanoutDir {
                            function,
                            fanout: fanout.to_string(),
                            path: sub.path(),
                        }),
                        _ if sub_ft.is_file() => junk.push(sub.path()),
                        _ => {
                            tracing::warn!(path = %sub.path().display(), "ignoring unexpected entry in blob store")
                        }
                    }
                }
            }
            _ if ft.is_file() => junk.push(entry.path()),
            _ => tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in blob store"),
        }
    }
    Ok((dirs, junk))
}

fn is_fanout_name(name: &str) -> bool {
    name.len() == 2
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn walk(dirs: Vec<FanoutDir>) -> Found {
    let mut found = Found::default();
    for dir in dirs {
        let entries = match std::fs::read_dir(&dir.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                found
                    .errors
                    .push(format!("cannot list {}: {e}", dir.path.display()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    found
                        .errors
                        .push(format!("cannot list {}: {e}", dir.path.display()));
                    break;
                }
            };
            match entry.file_type() {
                Ok(ft) if ft.is_file() => {}
                Ok(_) => {
                    tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in blob store");
                    continue;
                }
                Err(e) => {
                    found
                        .errors
                        .push(format!("cannot stat {}: {e}", entry.path().display()));
                    continue;
                }
            }
            let name = entry.file_name();
            let parsed = name
                .to_str()
                .and_then(|n| parse_file_name(dir.function, &dir.fanout, n));
            let Some((key, encoding)) = parsed else {
                found.junk.push(entry.path());
                continue;
            };
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    found
                        .errors
                        .push(format!("cannot stat {}: {e}", entry.path().display()));
                    continue;
                }
            };
            // No length check against the key's size: stores are content
            // agnostic (Action Cache payloads are not the size of their key).
            let len = meta.len();
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32)
                .unwrap_or(0);
            found.files.push(Scanned {
                key,
                encoding,
                len,
                mtime,
            });
        }
    }
    found
}

/// Deletes files the index does not count. Returns the first failure.
fn delete_junk(paths: Vec<PathBuf>) -> Option<String> {
    let mut first = None;
    for path in paths {
        tracing::warn!(path = %path.display(), "deleting a file the blob store did not expect");
        if let Err(e) = super::fsio::remove_if_exists(&path) {
            first.get_or_insert_with(|| format!("cannot delete {}: {e}", path.display()));
        }
    }
    first
}
