//! `kiln exec`: upload the input root, build Command and Action, Execute,
//! follow the operation, print the command's stdout/stderr, download its
//! outputs and exit with its exit code.

use std::path::{Path, PathBuf};

use kiln_digest::BlobKey;
use kiln_proto::longrunning::{Operation, operation};
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::{
    Action, ActionResult, Command, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, Platform, Tree,
    WaitExecutionRequest, command::EnvironmentVariable, platform::Property,
};
use prost::Message;
use tonic::Code;

use crate::console::Console;
use crate::error::{ClientError, ClientResult, code_name};
use crate::fetch::{
    blob_to_file, clear_path, fetch_directories, materialize, plan_tree, safe_relative, set_mode,
    tree_directories, write_file,
};
use crate::format::{digest_str, human_duration, server_digest, to_system_time};
use crate::remote::Remote;
use crate::upload::{put_messages, put_tree};
use crate::{ClientOptions, ExecArgs};

/// Times a broken Execute stream is resumed with WaitExecution.
const MAX_RESUMES: u32 = 5;

pub(crate) async fn run(args: ExecArgs, opts: &ClientOptions, console: &mut Console) -> ClientResult<u8> {
    let platform = parse_pairs(&args.platform, "--platform")?;
    let env = parse_pairs(&args.env, "--env")?;
    for w in env.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(ClientError::Usage(format!("--env {} is given twice", w[0].0)));
        }
    }
    let outputs = normalize_outputs(&args.outputs)?;
    let dest = args.output_dir.clone().unwrap_or_else(|| args.input_root.clone());

    let remote = Remote::connect(opts).await?;
    let caps = remote.capabilities().await?;
    if !caps
        .execution_capabilities
        .as_ref()
        .is_some_and(|e| e.exec_enabled)
    {
        return Err(ClientError::Execution(format!(
            "the server at {} does not offer remote execution for instance {:?}",
            remote.endpoint(),
            remote.instance()
        )));
    }
    // Servers before v2.1 only know output_files/output_directories.
    let output_paths_supported = caps
        .high_api_version
        .as_ref()
        .is_none_or(|v| (v.major, v.minor) >= (2, 1));

    let (tree, stats) = put_tree(&remote, &args.input_root, console.progress_enabled()).await?;
    console
        .eline(&format!(
            "kiln exec: input root {} ({} file{}; uploaded {} of {} blobs)",
            digest_str(&tree.root),
            tree.file_count,
            if tree.file_count == 1 { "" } else { "s" },
            stats.uploaded,
            stats.blobs
        ))
        .await?;

    let platform = (!platform.is_empty()).then(|| Platform {
        properties: platform
            .iter()
            .map(|(name, value)| Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
    });
    #[allow(deprecated)]
    let command = Command {
        arguments: args.command.clone(),
        environment_variables: env
            .iter()
            .map(|(name, value)| EnvironmentVariable {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        output_files: if output_paths_supported {
            Vec::new()
        } else {
            outputs.clone()
        },
        output_paths: if output_paths_supported {
            outputs.clone()
        } else {
            Vec::new()
        },
        platform: platform.clone(),
        ..Default::default()
    };
    let command_bytes = bytes::Bytes::from(command.encode_to_vec());
    let command_key = BlobKey::of(remote.function(), &command_bytes);
    let action = Action {
        command_digest: Some(command_key.to_digest()),
        input_root_digest: Some(tree.root.to_digest()),
        timeout: args.timeout.map(|t| kiln_proto::protobuf::Duration {
            seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            nanos: t.subsec_nanos() as i32,
        }),
        do_not_cache: args.no_cache,
        salt: Vec::new(),
        platform,
    };
    let action_bytes = bytes::Bytes::from(action.encode_to_vec());
    let keys = put_messages(&remote, vec![command_bytes, action_bytes]).await?;
    let action_key = keys
        .get(1)
        .cloned()
        .ok_or_else(|| ClientError::Internal("the Action was not uploaded".into()))?;
    console
        .eline(&format!("kiln exec: action {}", digest_str(&action_key)))
        .await?;

    let response = execute(&remote, &action_key, args.no_cache, console).await?;
    if !response.message.is_empty() {
        console
            .eline(&format!("kiln exec: server message: {}", response.message))
            .await?;
    }
    let failure = response.status.as_ref().filter(|s| s.code != 0).map(|s| {
        format!(
            "execution of {} failed: {}: {}",
            digest_str(&action_key),
            code_name(Code::from_i32(s.code)),
            s.message
        )
    });
    let Some(result) = response.result else {
        return Err(match failure {
            Some(f) => ClientError::Execution(f),
            None => ClientError::BadResponse("the server completed the action without a result".into()),
        });
    };
    console
        .eline(&completed_line(
            &result,
            response.cached_result,
            failure.is_some(),
        ))
        .await?;
    print_streams(&remote, &result, console).await?;
    if let Some(f) = failure {
        return Err(ClientError::Execution(f));
    }
    download_outputs(&remote, &result, &outputs, &dest, console).await?;
    Ok(u8::try_from(result.exit_code).unwrap_or(255))
}

/// `NAME=VALUE` pairs, sorted by name then value, duplicates removed.
fn parse_pairs(items: &[String], flag: &str) -> ClientResult<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Some((name, value)) = item.split_once('=') else {
            return Err(ClientError::Usage(format!(
                "{flag} {item:?}: expected NAME=VALUE"
            )));
        };
        if name.is_empty() {
            return Err(ClientError::Usage(format!("{flag} {item:?}: the name is empty")));
        }
        out.push((name.to_string(), value.to_string()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Output paths as the spec wants them: relative, `/`-separated, no `.`
/// or `..`, sorted and deduplicated.
fn normalize_outputs(outputs: &[String]) -> ClientResult<Vec<String>> {
    let mut out = Vec::with_capacity(outputs.len());
    for o in outputs {
        let rel = safe_relative(o)
            .filter(|p| !p.as_os_str().is_empty() && !o.starts_with('/'))
            .ok_or_else(|| {
                ClientError::Usage(format!(
                    "--output {o:?}: expected a path inside the input root (relative, without ..)"
                ))
            })?;
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        out.push(parts.join("/"));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn stage_of(op: &Operation) -> Option<Stage> {
    let md = op.metadata.as_ref()?;
    if !md
        .type_url
        .ends_with("/build.bazel.remote.execution.v2.ExecuteOperationMetadata")
    {
        return None;
    }
    let md = ExecuteOperationMetadata::decode(md.value.as_slice()).ok()?;
    Stage::try_from(md.stage).ok()
}

/// Calls Execute and follows the operation to its end (resuming a broken
/// stream with WaitExecution), reporting stage changes on stderr.
async fn execute(
    remote: &Remote,
    action: &BlobKey,
    skip_cache: bool,
    console: &mut Console,
) -> ClientResult<ExecuteResponse> {
    let request = ExecuteRequest {
        instance_name: remote.instance().to_string(),
        skip_cache_lookup: skip_cache,
        action_digest: Some(action.to_digest()),
        execution_policy: None,
        results_cache_policy: None,
        digest_function: remote.function().to_proto() as i32,
        inline_stdout: true,
        inline_stderr: true,
        inline_output_files: Vec::new(),
    };
    let mut stream = remote
        .execution_client()
        .execute(request)
        .await
        .map_err(ClientError::rpc("Execute"))?
        .into_inner();
    let mut name = String::new();
    let mut last_stage = None;
    let mut resumes = 0;
    loop {
        let broken = match stream.message().await {
            Ok(Some(op)) => {
                if !op.name.is_empty() {
                    name = op.name.clone();
                }
                if let Some(stage) = stage_of(&op) {
                    if last_stage != Some(stage) && stage != Stage::Completed && stage != Stage::Unknown {
                        console
                            .eline(&format!("kiln exec: {}", stage.as_str_name()))
                            .await?;
                    }
                    last_stage = Some(stage);
                }
                if op.done {
                    return finish(op);
                }
                continue;
            }
            Ok(None) => {
                tonic::Status::unavailable("the operation stream ended before the operation was done")
            }
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Cancelled | Code::Unknown) => s,
            Err(s) => return Err(ClientError::rpc("Execute")(s)),
        };
        if name.is_empty() || resumes >= MAX_RESUMES {
            return Err(ClientError::rpc("Execute")(broken));
        }
        resumes += 1;
        stream = remote
            .execution_client()
            .wait_execution(WaitExecutionRequest { name: name.clone() })
            .await
            .map_err(|s| {
                if s.code() == Code::NotFound {
                    ClientError::Execution(format!("the operation {name} was lost by the server"))
                } else {
                    ClientError::rpc(format!("WaitExecution of {name}"))(s)
                }
            })?
            .into_inner();
    }
}

fn finish(op: Operation) -> ClientResult<ExecuteResponse> {
    match op.result {
        Some(operation::Result::Error(s)) => Err(ClientError::Execution(format!(
            "the operation {} failed: {}: {}",
            op.name,
            code_name(Code::from_i32(s.code)),
            s.message
        ))),
        Some(operation::Result::Response(any)) => {
            if !any
                .type_url
                .ends_with("/build.bazel.remote.execution.v2.ExecuteResponse")
            {
                return Err(ClientError::BadResponse(format!(
                    "the operation {} ended with a {:?} instead of an ExecuteResponse",
                    op.name, any.type_url
                )));
            }
            ExecuteResponse::decode(any.value.as_slice())
                .map_err(|e| ClientError::BadResponse(format!("undecodable ExecuteResponse: {e}")))
        }
        None => Err(ClientError::BadResponse(format!(
            "the operation {} is done without a result",
            op.name
        ))),
    }
}

fn completed_line(result: &ActionResult, cached: bool, failed: bool) -> String {
    let mut parts = vec![format!("exit code {}", result.exit_code)];
    if cached {
        parts.push("cached result".into());
    } else if let Some(md) = &result.execution_metadata {
        if !md.worker.is_empty() {
            parts.push(format!("worker {}", md.worker));
        }
        let (a, b) = (
            to_system_time(md.execution_start_timestamp.as_ref()),
            to_system_time(md.execution_completed_timestamp.as_ref()),
        );
        if let (Some(a), Some(b)) = (a, b)
            && let Ok(d) = b.duration_since(a)
        {
            parts.push(format!("ran {}", human_duration(d)));
        }
    }
    let what = if failed { "FAILED" } else { "COMPLETED" };
    format!("kiln exec: {what} ({})", parts.join(", "))
}

/// The command's stdout to stdout and stderr to stderr (inlined, or read
/// from the CAS).
async fn print_streams(remote: &Remote, result: &ActionResult, console: &mut Console) -> ClientResult<()> {
    for is_err in [false, true] {
        let (raw, digest) = if is_err {
            (&result.stderr_raw, result.stderr_digest.as_ref())
        } else {
            (&result.stdout_raw, result.stdout_digest.as_ref())
        };
        if !raw.is_empty() {
            write_stream(console, is_err, raw).await?;
            continue;
        }
        let Some(d) = digest.filter(|d| d.size_bytes > 0) else {
            continue;
        };
        let key = server_digest(
            Some(d),
            remote.function(),
            if is_err { "stderr" } else { "stdout" },
        )?;
        let mut reader = remote.open_read(&key).await?;
        while let Some(chunk) = reader.next_chunk().await? {
            write_stream(console, is_err, &chunk).await?;
        }
    }
    Ok(())
}

async fn write_stream(console: &mut Console, is_err: bool, data: &[u8]) -> ClientResult<()> {
    if is_err {
        console.err_bytes(data).await
    } else {
        console.out_bytes(data).await
    }
}

/// An output path from the server, checked to stay inside `dest`.
fn output_target(dest: &Path, path: &str) -> ClientResult<PathBuf> {
    match safe_relative(path) {
        Some(rel) if !rel.as_os_str().is_empty() => Ok(dest.join(rel)),
        _ => Err(ClientError::BadResponse(format!(
            "the server returned the output path {path:?}, which leaves the output directory"
        ))),
    }
}

async fn create_parent(path: &Path) -> ClientResult<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(ClientError::io(format!("creating {}", parent.display())))?;
    }
    Ok(())
}

/// Writes every output of `result` under `dest`, replacing what is there.
async fn download_outputs(
    remote: &Remote,
    result: &ActionResult,
    declared: &[String],
    dest: &Path,
    console: &mut Console,
) -> ClientResult<()> {
    let function = remote.function();
    let progress = console.progress_enabled();
    let mut produced: Vec<String> = Vec::new();
    for f in &result.output_files {
        let target = output_target(dest, &f.path)?;
        let key = server_digest(f.digest.as_ref(), function, &format!("output file {}", f.path))?;
        clear_path(&target).await?;
        create_parent(&target).await?;
        if !f.contents.is_empty() && key.verify(&f.contents).is_ok() {
            write_file(&target, &f.contents, f.is_executable).await?;
        } else {
            blob_to_file(remote, &key, &target, progress).await?;
            set_mode(&target, f.is_executable).await?;
        }
        produced.push(f.path.clone());
    }
    for d in &result.output_directories {
        let target = output_target(dest, &d.path)?;
        let (root, dirs) = match (&d.tree_digest, &d.root_directory_digest) {
            (Some(t), _) => {
                let key = server_digest(Some(t), function, &format!("output directory {}", d.path))?;
                let data = remote.read_blob(&key).await?;
                let tree = Tree::decode(data).map_err(|e| {
                    ClientError::BadResponse(format!(
                        "the Tree of output directory {} is undecodable: {e}",
                        d.path
                    ))
                })?;
                tree_directories(tree, function)?
            }
            (None, Some(r)) => {
                let key = server_digest(Some(r), function, &format!("output directory {}", d.path))?;
                let dirs = fetch_directories(remote, &key).await?;
                let root = dirs.get(&key).cloned().ok_or_else(|| {
                    ClientError::NotFound(format!("directory {} not found", digest_str(&key)))
                })?;
                (root, dirs)
            }
            (None, None) => {
                return Err(ClientError::BadResponse(format!(
                    "output directory {} has neither a tree nor a root directory digest",
                    d.path
                )));
            }
        };
        let plan = plan_tree(&root, &dirs, function)?;
        clear_path(&target).await?;
        tokio::fs::create_dir_all(&target)
            .await
            .map_err(ClientError::io(format!("creating {}", target.display())))?;
        materialize(remote, &plan, &target, progress).await?;
        produced.push(d.path.clone());
    }
    #[allow(deprecated)]
    let symlinks = result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks);
    for l in symlinks {
        let target = output_target(dest, &l.path)?;
        clear_path(&target).await?;
        create_parent(&target).await?;
        tokio::fs::symlink(&l.target, &target)
            .await
            .map_err(ClientError::io(format!(
                "creating the symlink {}",
                target.display()
            )))?;
        produced.push(l.path.clone());
    }
    if !produced.is_empty() {
        console
            .eline(&format!(
                "kiln exec: wrote {} output{} into {}",
                produced.len(),
                if produced.len() == 1 { "" } else { "s" },
                dest.display()
            ))
            .await?;
    }
    for d in declared {
        if !produced.iter().any(|p| p == d) {
            console
                .eline(&format!("kiln exec: output {d} was not produced"))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_normalised() {
        let outs = normalize_outputs(&["b".into(), "./a/x/".into(), "b".into()]).unwrap();
        assert_eq!(outs, ["a/x", "b"]);
        assert!(normalize_outputs(&["../x".into()]).is_err());
        assert!(normalize_outputs(&["/abs".into()]).is_err());
        assert!(normalize_outputs(&[".".into()]).is_err());
    }

    #[test]
    fn pairs_are_sorted() {
        let p = parse_pairs(&["b=2".into(), "a=1".into(), "a=1".into()], "--platform").unwrap();
        assert_eq!(p, [("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert!(parse_pairs(&["novalue".into()], "--env").is_err());
        assert!(parse_pairs(&["=x".into()], "--env").is_err());
    }
}
