//! `kiln ac get`.

use bytes::Bytes;
use kiln_digest::BlobKey;
use kiln_proto::reapi::{Digest, GetActionResultRequest};

use crate::console::Console;
use crate::error::{ClientError, ClientResult, EXIT_OK};
use crate::format::{PRINT_INLINE_MAX, action_result, digest_str, parse_digest};
use crate::remote::Remote;
use crate::{AcCommand, ClientOptions};

pub(crate) async fn run(cmd: AcCommand, opts: &ClientOptions, console: &mut Console) -> ClientResult<u8> {
    let AcCommand::Get { digest } = cmd;
    let key = parse_digest(&digest, opts.digest_function)?;
    let remote = Remote::connect(opts).await?;
    let result = remote
        .ac_client()
        .get_action_result(GetActionResultRequest {
            instance_name: remote.instance().to_string(),
            action_digest: Some(key.to_digest()),
            inline_stdout: true,
            inline_stderr: true,
            inline_output_files: Vec::new(),
            digest_function: remote.function().to_proto() as i32,
        })
        .await
        .map_err(ClientError::rpc_or_not_found(
            format!("GetActionResult of {}", digest_str(&key)),
            format!("no action result for {}", digest_str(&key)),
        ))?
        .into_inner();
    let stdout = stream_content(&remote, &result.stdout_raw, result.stdout_digest.as_ref()).await;
    let stderr = stream_content(&remote, &result.stderr_raw, result.stderr_digest.as_ref()).await;
    let text = action_result(&result, stdout.as_deref(), stderr.as_deref());
    console.out_bytes(text.as_bytes()).await?;
    Ok(EXIT_OK)
}

/// The content of stdout/stderr when inlined, or fetched when small (best
/// effort: a failure to fetch only means it is not shown).
async fn stream_content(remote: &Remote, raw: &[u8], digest: Option<&Digest>) -> Option<Bytes> {
    if !raw.is_empty() {
        return Some(Bytes::copy_from_slice(raw));
    }
    let d = digest?;
    if d.size_bytes <= 0 || d.size_bytes as u64 > PRINT_INLINE_MAX {
        return None;
    }
    let key = BlobKey::from_digest(remote.function(), d).ok()?;
    remote.read_blob(&key).await.ok()
}
