//! `kiln cas put|get|missing`.

use std::path::Path;

use crate::console::Console;
use crate::error::{ClientError, ClientResult, EXIT_NOT_FOUND, EXIT_OK};
use crate::fetch::{blob_to_file, blob_to_stdout, fetch_directories, materialize, plan_tree};
use crate::format::{digest_str, human_bytes, parse_digest};
use crate::remote::Remote;
use crate::upload::{UploadStats, put_file, put_tree};
use crate::{CasCommand, ClientOptions};

pub(crate) async fn run(cmd: CasCommand, opts: &ClientOptions, console: &mut Console) -> ClientResult<u8> {
    match cmd {
        CasCommand::Put { path } => put(&path, opts, console).await,
        CasCommand::Get { digest, output, dir } => {
            let key = parse_digest(&digest, opts.digest_function)?;
            if dir {
                let Some(out) = output else {
                    return Err(ClientError::Usage("cas get --dir needs -o PATH".into()));
                };
                check_empty_destination(&out).await?;
                let remote = Remote::connect(opts).await?;
                let dirs = fetch_directories(&remote, &key).await?;
                let root = dirs.get(&key).ok_or_else(|| {
                    ClientError::NotFound(format!("directory {} not found", digest_str(&key)))
                })?;
                let plan = plan_tree(root, &dirs, remote.function())?;
                tokio::fs::create_dir_all(&out)
                    .await
                    .map_err(ClientError::io(format!("creating {}", out.display())))?;
                materialize(&remote, &plan, &out, console.progress_enabled()).await?;
                console
                    .eline(&format!(
                        "kiln: restored {} files, {} directories and {} symlinks into {}",
                        plan.files.len(),
                        plan.dirs.len() + 1,
                        plan.symlinks.len(),
                        out.display()
                    ))
                    .await?;
                return Ok(EXIT_OK);
            }
            let remote = Remote::connect(opts).await?;
            match output {
                Some(path) => blob_to_file(&remote, &key, &path, console.progress_enabled()).await?,
                None => blob_to_stdout(&remote, &key, console).await?,
            }
            Ok(EXIT_OK)
        }
        CasCommand::Missing { digests } => {
            let keys = digests
                .iter()
                .map(|d| parse_digest(d, opts.digest_function))
                .collect::<ClientResult<Vec<_>>>()?;
            let remote = Remote::connect(opts).await?;
            let missing = remote.find_missing(&keys).await?;
            // Report in the order given, each once.
            let mut printed = std::collections::HashSet::new();
            for k in &keys {
                if missing.contains(k) && printed.insert(k.clone()) {
                    console.line(&digest_str(k)).await?;
                }
            }
            Ok(if missing.is_empty() {
                EXIT_OK
            } else {
                EXIT_NOT_FOUND
            })
        }
    }
}

async fn put(path: &Path, opts: &ClientOptions, console: &mut Console) -> ClientResult<u8> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(ClientError::io(format!("reading {}", path.display())))?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(ClientError::Usage(format!(
            "{} is neither a file nor a directory",
            path.display()
        )));
    }
    let remote = Remote::connect(opts).await?;
    let progress = console.progress_enabled();
    let (key, stats, what) = if meta.is_dir() {
        let (tree, stats) = put_tree(&remote, path, progress).await?;
        let what = format!(
            "{} files ({}), {} directories, {} symlinks",
            tree.file_count,
            human_bytes(tree.file_bytes),
            tree.dir_count,
            tree.symlink_count
        );
        (tree.root, stats, what)
    } else {
        let (key, stats) = put_file(&remote, path, progress).await?;
        (key, stats, format!("1 file ({})", human_bytes(meta.len())))
    };
    console.line(&digest_str(&key)).await?;
    console.eline(&summary(&what, &stats)).await?;
    Ok(EXIT_OK)
}

fn summary(what: &str, stats: &UploadStats) -> String {
    format!(
        "kiln: {what}: uploaded {} of {} blobs ({}), {} already present",
        stats.uploaded,
        stats.blobs,
        human_bytes(stats.uploaded_bytes),
        stats.blobs - stats.uploaded
    )
}

/// `--dir -o PATH`: PATH must not exist or be an empty directory.
async fn check_empty_destination(path: &Path) -> ClientResult<()> {
    match tokio::fs::symlink_metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClientError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
        Ok(m) if m.is_dir() => {
            let mut rd = tokio::fs::read_dir(path)
                .await
                .map_err(ClientError::io(format!("listing {}", path.display())))?;
            match rd.next_entry().await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(ClientError::Usage(format!(
                    "{} is not empty; cas get --dir restores into a new or empty directory",
                    path.display()
                ))),
                Err(e) => Err(ClientError::Io {
                    context: format!("listing {}", path.display()),
                    source: e,
                }),
            }
        }
        Ok(_) => Err(ClientError::Usage(format!(
            "{} exists and is not a directory",
            path.display()
        ))),
    }
}
