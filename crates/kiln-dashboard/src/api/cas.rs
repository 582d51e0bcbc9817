//! The CAS browser's endpoints: raw download, a preview that recognises
//! Directory / Tree / Action messages and text, and decoded Directory and
//! Tree views.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kiln_cache::Instance;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::{Action, Digest, Directory, Tree};
use kiln_store::codec;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::blobs::{PREVIEW_BYTES, read_message, read_prefix};
use crate::digest_path;
use crate::error::{DashboardError, DashboardResult};
use crate::json::{DigestJson, DirectoryJson};
use crate::state::Shared;

pub type BlobPath = Path<(String, String, String, String)>;

fn resolve(
    state: &Shared,
    p: &(String, String, String, String),
) -> DashboardResult<(std::sync::Arc<Instance>, BlobKey)> {
    digest_path::blob(&state.instances, &p.0, &p.1, &p.2, &p.3)
}

#[derive(Deserialize)]
pub struct DownloadQuery {
    /// File name to save as (default: the hash).
    name: Option<String>,
    /// `1`: show in the browser as plain text instead of downloading.
    inline: Option<u8>,
}

/// A safe file name for Content-Disposition.
fn file_name(name: Option<&str>, key: &BlobKey) -> String {
    let raw = name
        .filter(|n| !n.is_empty())
        .map(|n| n.rsplit('/').next().unwrap_or(n));
    let cleaned: String = raw
        .unwrap_or(&key.hash_hex())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        key.hash_hex()
    } else {
        cleaned
    }
}

/// `GET /api/cas/{instance}/{function}/{hash}/{size}`: the blob's bytes,
/// streamed (any size), as an attachment unless `?inline=1`.
pub async fn download(
    State(state): State<Shared>,
    path: BlobPath,
    Query(q): Query<DownloadQuery>,
) -> DashboardResult<Response> {
    let (instance, key) = resolve(&state, &path)?;
    if key.is_empty_blob() {
        return Ok(attachment(Body::empty(), &key, q));
    }
    let read = instance
        .cas
        .read(&key, 0)
        .await
        .map_err(DashboardError::store(format!("reading {key}")))?
        .ok_or_else(|| {
            DashboardError::NotFound(format!(
                "blob {key} is not in the CAS of instance {:?}",
                instance.name
            ))
        })?;
    Ok(attachment(
        Body::from_stream(codec::identity_stream(read, 0)),
        &key,
        q,
    ))
}

fn attachment(body: Body, key: &BlobKey, q: DownloadQuery) -> Response {
    let name = file_name(q.name.as_deref(), key);
    let inline = q.inline == Some(1);
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    let (content_type, disposition) = if inline {
        (
            "text/plain; charset=utf-8",
            format!("inline; filename=\"{name}\""),
        )
    } else {
        (
            "application/octet-stream",
            format!("attachment; filename=\"{name}\""),
        )
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(key.size()));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// What a blob looks like.
#[derive(Serialize)]
pub struct InfoJson {
    instance: String,
    digest: DigestJson,
    /// "empty", "directory", "tree", "action", "text" or "binary".
    kind: &'static str,
    /// The first bytes as text (kind "text") or hex (kind "binary").
    preview: String,
    /// Whether the preview is shorter than the blob.
    truncated: bool,
    /// The decoded Directory (kind "directory").
    #[serde(skip_serializing_if = "Option::is_none")]
    directory: Option<DirectoryJson>,
    /// The Action's command and input root (kind "action").
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<ActionRefs>,
}

#[derive(Serialize)]
struct ActionRefs {
    command: Option<DigestJson>,
    input_root: Option<DigestJson>,
}

fn plausible_digest(f: DigestFunction, d: Option<&Digest>) -> bool {
    d.is_some_and(|d| BlobKey::from_digest(f, d).is_ok())
}

fn plausible_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.chars().any(char::is_control)
}

fn plausible_directory(f: DigestFunction, d: &Directory) -> bool {
    let entries = d.files.len() + d.directories.len() + d.symlinks.len();
    entries > 0
        && d.files
            .iter()
            .all(|x| plausible_name(&x.name) && plausible_digest(f, x.digest.as_ref()))
        && d.directories
            .iter()
            .all(|x| plausible_name(&x.name) && plausible_digest(f, x.digest.as_ref()))
        && d.symlinks
            .iter()
            .all(|x| plausible_name(&x.name) && !x.target.is_empty())
}

/// Text if valid UTF-8 (a character cut by truncation allowed) without NULs.
fn as_text(data: &[u8], truncated: bool) -> Option<String> {
    let valid = match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&data[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    (!valid.contains('\0')).then(|| valid.to_string())
}

fn hex_preview(data: &[u8]) -> String {
    data.chunks(16)
        .take(64)
        .enumerate()
        .map(|(i, row)| {
            let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
            let ascii: String = row
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            format!("{:08x}  {:<47}  {ascii}", i * 16, hex.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `GET .../info`: presence, a guess at what the blob is, and a preview.
pub async fn info(State(state): State<Shared>, path: BlobPath) -> DashboardResult<Json<InfoJson>> {
    let (instance, key) = resolve(&state, &path)?;
    let f = key.function();
    let (data, truncated) = read_prefix(&instance, &key, PREVIEW_BYTES)
        .await?
        .ok_or_else(|| {
            DashboardError::NotFound(format!(
                "blob {key} is not in the CAS of instance {:?}",
                instance.name
            ))
        })?;
    let mut out = InfoJson {
        instance: digest_path::instance_segment(&instance.name).to_string(),
        digest: DigestJson::new(f, &key.to_digest()),
        kind: "binary",
        preview: String::new(),
        truncated,
        directory: None,
        action: None,
    };
    if key.size() == 0 {
        out.kind = "empty";
        return Ok(Json(out));
    }
    if !truncated {
        if let Ok(a) = Action::decode(data.clone())
            && plausible_digest(f, a.command_digest.as_ref())
            && plausible_digest(f, a.input_root_digest.as_ref())
        {
            out.kind = "action";
            out.action = Some(ActionRefs {
                command: DigestJson::opt(f, a.command_digest.as_ref()),
                input_root: DigestJson::opt(f, a.input_root_digest.as_ref()),
            });
            return Ok(Json(out));
        }
        if let Ok(t) = Tree::decode(data.clone())
            && t.root.as_ref().is_some_and(|r| plausible_directory(f, r))
        {
            out.kind = "tree";
            return Ok(Json(out));
        }
        if let Ok(d) = Directory::decode(data.clone())
            && plausible_directory(f, &d)
        {
            out.kind = "directory";
            out.directory = Some(DirectoryJson::of(&instance.name, f, &d));
            return Ok(Json(out));
        }
    }
    match as_text(&data, truncated) {
        Some(text) => {
            out.kind = "text";
            out.preview = text;
        }
        None => {
            out.preview = hex_preview(&data);
            out.truncated = truncated || data.len() > 1024;
        }
    }
    Ok(Json(out))
}

#[derive(Serialize)]
pub struct DirectoryView {
    digest: DigestJson,
    #[serde(flatten)]
    directory: DirectoryJson,
}

/// `GET .../directory`: the blob decoded as a Directory (404 absent, 422
/// not a Directory).
pub async fn directory(State(state): State<Shared>, path: BlobPath) -> DashboardResult<Json<DirectoryView>> {
    let (instance, key) = resolve(&state, &path)?;
    let d: Directory = read_message(&instance, &key, "Directory").await?;
    Ok(Json(DirectoryView {
        digest: DigestJson::new(key.function(), &key.to_digest()),
        directory: DirectoryJson::of(&instance.name, key.function(), &d),
    }))
}

#[derive(Serialize)]
pub struct TreeChild {
    digest: DigestJson,
    directory: DirectoryJson,
}

#[derive(Serialize)]
pub struct TreeView {
    digest: DigestJson,
    root: Option<DirectoryJson>,
    /// Every child Directory with its digest, so the tree can be browsed
    /// without further requests (children need not be in the CAS).
    children: Vec<TreeChild>,
}

/// `GET .../tree`: the blob decoded as a Tree (an output directory).
pub async fn tree(State(state): State<Shared>, path: BlobPath) -> DashboardResult<Json<TreeView>> {
    let (instance, key) = resolve(&state, &path)?;
    let f = key.function();
    let t: Tree = read_message(&instance, &key, "Tree").await?;
    let children = t
        .children
        .iter()
        .map(|c| {
            let child = BlobKey::of(f, &c.encode_to_vec());
            TreeChild {
                digest: DigestJson::new(f, &child.to_digest()),
                directory: DirectoryJson::of(&instance.name, f, c),
            }
        })
        .collect();
    Ok(Json(TreeView {
        digest: DigestJson::new(f, &key.to_digest()),
        root: t.root.as_ref().map(|r| DirectoryJson::of(&instance.name, f, r)),
        children,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_sanitised() {
        let key = BlobKey::of(DigestFunction::Sha256, b"x");
        assert_eq!(file_name(Some("out/report.txt"), &key), "report.txt");
        assert_eq!(file_name(Some("a\"b\r\nc"), &key), "a_b__c");
        assert_eq!(file_name(Some(".."), &key), key.hash_hex());
        assert_eq!(file_name(None, &key), key.hash_hex());
    }

    #[test]
    fn text_detection() {
        assert_eq!(as_text(b"hello\n", false).as_deref(), Some("hello\n"));
        assert!(as_text(b"a\0b", false).is_none());
        assert!(as_text(&[0xff, 0xfe], false).is_none());
        // "é" cut in half by truncation is still text.
        assert_eq!(as_text(&[b'a', 0xc3], true).as_deref(), Some("a"));
        assert!(hex_preview(&[0, 1, 2]).starts_with("00000000  00 01 02"));
    }
}
