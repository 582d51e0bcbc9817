//! Running one action end to end: validate, fetch and materialise inputs,
//! run the command in the sandbox, upload outputs, and answer an
//! `ExecuteResponse` whose `ExecutedActionMetadata` times every phase.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::command::OutputDirectoryFormat;
use kiln_proto::reapi::{
    Action, ActionResult, Command, Digest, ExecuteResponse, ExecutedActionMetadata, Platform,
};
use kiln_proto::worker::Phase;
use kiln_store::task;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cas::{CasClient, InstanceCas};
use crate::command;
use crate::config::WorkerConfig;
use crate::error::{WorkerError, WorkerResult};
use crate::local_cas::LocalCas;
use crate::materialize;
use crate::metadata::{ResourceUsage, now, proto_duration};
use crate::outputs::{self, Upload};
use crate::sandbox::{Ending, Report, RunOutcome, RunSpec, Sandbox, SlotLease};
use crate::tree::{DirectoryCache, InputTree};
use crate::upload::upload_all;

/// Called as each phase of an action starts, with the metadata so far.
pub type ProgressFn<'a> = &'a (dyn Fn(Phase, &ExecutedActionMetadata) + Send + Sync);

/// Timeout used when neither the Action nor the scheduler gives one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// One action to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub instance_name: String,
    pub digest_function: DigestFunction,
    pub action_digest: Digest,
    pub action: Action,
    pub command: Command,
    /// Effective platform (Action.platform, else Command.platform).
    pub platform: Option<Platform>,
    /// Effective timeout (the scheduler already applied its maximum).
    pub timeout: Duration,
    /// When the action was queued, for ExecutedActionMetadata.
    pub queued_at: Option<Timestamp>,
}

/// Runs actions for one worker. Cheap to share (`Arc`).
pub struct Executor {
    name: String,
    config: WorkerConfig,
    cas: CasClient,
    local: Arc<LocalCas>,
    dirs: DirectoryCache,
    sandbox: Arc<Sandbox>,
}

impl Executor {
    /// Prepares the work directory (wiped), opens the local cache and
    /// starts the sandbox (failing clearly when it cannot work).
    pub async fn new(mut config: WorkerConfig, cas: Channel) -> WorkerResult<Arc<Executor>> {
        config.validate().map_err(WorkerError::InvalidArgument)?;
        let work = config.work_dir.clone();
        let cache = config.cache_dir.clone();
        let (work_dir, cache_dir) =
            task::blocking("worker-dirs", move || prepare_dirs(&work, &cache)).await??;
        config.work_dir = work_dir.clone();
        config.cache_dir = cache_dir.clone();
        let local = LocalCas::open(cache_dir, config.cache_capacity_bytes).await?;
        let slots = config.effective_slots();
        let sandbox = Sandbox::start(&config, slots, &work_dir).await?;
        Ok(Arc::new(Executor {
            name: config.name.clone(),
            config,
            cas: CasClient::new(cas),
            local,
            dirs: DirectoryCache::new(64 << 20),
            sandbox,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    pub fn local_cas(&self) -> &Arc<LocalCas> {
        &self.local
    }

    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// Flushes and marks the local cache clean (call once, at shutdown).
    pub async fn shutdown(&self) {
        if let Err(e) = self.local.close().await {
            tracing::warn!(error = %e, "closing the local cache failed");
        }
    }

    /// Runs `job`. Never fails: problems become the response's status
    /// (INVALID_ARGUMENT, FAILED_PRECONDITION with MISSING violations,
    /// DEADLINE_EXCEEDED, CANCELLED, INTERNAL, ...).
    pub async fn execute(&self, job: Job, cancel: CancellationToken) -> ExecuteResponse {
        self.execute_with_progress(job, cancel, &|_, _| {}).await
    }

    /// [`Executor::execute`], calling `progress` as each phase starts
    /// (fetching inputs, executing, uploading) with the timestamps so far.
    pub async fn execute_with_progress(
        &self,
        job: Job,
        cancel: CancellationToken,
        progress: ProgressFn<'_>,
    ) -> ExecuteResponse {
        let mut md = ExecutedActionMetadata {
            worker: self.name.clone(),
            queued_timestamp: job.queued_at,
            worker_start_timestamp: Some(now()),
            ..Default::default()
        };
        let r = self.execute_inner(&job, &cancel, &mut md, progress).await;
        md.worker_completed_timestamp = Some(now());
        match r {
            Ok((mut result, timed_out)) => {
                result.execution_metadata = Some(md);
                let status = if timed_out {
                    WorkerError::DeadlineExceeded(format!(
                        "the action exceeded its timeout of {}",
                        humantime::format_duration(job.timeout)
                    ))
                    .to_rpc_status()
                } else {
                    crate::ok_status()
                };
                ExecuteResponse {
                    result: Some(result),
                    cached_result: false,
                    message: if timed_out {
                        status.message.clone()
                    } else {
                        String::new()
                    },
                    status: Some(status),
                    server_logs: Default::default(),
                }
            }
            Err(e) => {
                if !matches!(
                    e,
                    WorkerError::Cancelled(_)
                        | WorkerError::InvalidArgument(_)
                        | WorkerError::MissingBlobs(_)
                ) {
                    tracing::warn!(error = %e, action = %job.action_digest.hash, "action failed");
                }
                let status = e.to_rpc_status();
                ExecuteResponse {
                    result: None,
                    cached_result: false,
                    message: status.message.clone(),
                    status: Some(status),
                    server_logs: Default::default(),
                }
            }
        }
    }

    async fn execute_inner(
        &self,
        job: &Job,
        cancel: &CancellationToken,
        md: &mut ExecutedActionMetadata,
        progress: ProgressFn<'_>,
    ) -> WorkerResult<(ActionResult, bool)> {
        // Everything the client gave is checked before the disk is touched.
        let function = job.digest_function;
        let input_root = BlobKey::from_opt_digest(function, job.action.input_root_digest.as_ref())
            .map_err(|e| WorkerError::invalid(format!("input_root_digest: {e}")))?;
        let checked = command::check(&job.command)?;
        let network = command::wants_network(job.platform.as_ref());
        let format = OutputDirectoryFormat::try_from(job.command.output_directory_format)
            .unwrap_or(OutputDirectoryFormat::TreeOnly);

        md.input_fetch_start_timestamp = Some(now());
        progress(Phase::Fetching, md);
        let cas = self.cas.instance(&job.instance_name, function).await;
        let tree = InputTree::fetch(
            &cas,
            &self.dirs,
            input_root,
            self.config.allow_absolute_symlinks,
            self.config.max_input_nodes,
        )
        .await?;
        let plan = tree.plan()?;
        let parents = materialize::output_parents(&tree, &checked.layout)?;
        drop(tree);
        if cancel.is_cancelled() {
            return Err(WorkerError::Cancelled(
                "cancelled before inputs were fetched".into(),
            ));
        }
        let pins = tokio::select! {
            p = self.local.ensure(&cas, plan.blobs(), self.config.cas_concurrency) => p?,
            _ = cancel.cancelled() => return Err(WorkerError::Cancelled("cancelled while fetching inputs".into())),
        };

        let slot = self.sandbox.acquire(cancel).await?;
        let r = self
            .run_in_slot(
                job, cancel, md, &cas, &slot, plan, parents, &pins, checked, network, format, progress,
            )
            .await;
        drop(pins);
        if let Err(e) = slot.release().await {
            tracing::warn!(error = %e, "emptying a sandbox slot failed");
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_in_slot(
        &self,
        job: &Job,
        cancel: &CancellationToken,
        md: &mut ExecutedActionMetadata,
        cas: &InstanceCas,
        slot: &SlotLease,
        plan: crate::tree::InputPlan,
        parents: Vec<crate::paths::RelPath>,
        pins: &crate::local_cas::Pins,
        checked: command::CheckedCommand,
        network: bool,
        format: OutputDirectoryFormat,
        progress: ProgressFn<'_>,
    ) -> WorkerResult<(ActionResult, bool)> {
        // The slot's input root exists and is empty.
        let exec_root = slot.root().to_path_buf();
        let owner = self.sandbox.owner();
        let local = self.local.clone();
        if !plan.is_empty() || !parents.is_empty() {
            let exec_root = exec_root.clone();
            task::blocking("materialize", move || -> WorkerResult<()> {
                materialize::materialize(&exec_root, &plan, |k| local.path_of(k), &parents, owner)
            })
            .await??;
        }
        md.input_fetch_completed_timestamp = Some(now());
        if cancel.is_cancelled() {
            return Err(WorkerError::Cancelled(
                "cancelled before the command started".into(),
            ));
        }

        let spec = RunSpec {
            cwd: checked.layout.working_dir.on_disk(&exec_root),
            argv: checked.argv.clone(),
            env: checked.env.clone(),
            network,
            timeout: if job.timeout.is_zero() {
                DEFAULT_TIMEOUT
            } else {
                job.timeout
            },
        };
        md.execution_start_timestamp = Some(now());
        progress(Phase::Executing, md);
        let outcome = slot.run(&spec, cancel).await?;
        md.execution_completed_timestamp = Some(now());
        if outcome.ending == Ending::Cancelled {
            return Err(WorkerError::Cancelled("the action was cancelled".into()));
        }
        if outcome.ending == Ending::OutputLimit {
            return Err(WorkerError::ResourceExhausted(format!(
                "the action wrote more than {} bytes to stdout or stderr (worker.sandbox.max_stdio_bytes) and was terminated",
                self.config.sandbox.max_stdio_bytes
            )));
        }
        if self.sandbox.shares_cache_owner() {
            pins.drop_modified().await?;
        }

        md.output_upload_start_timestamp = Some(now());
        progress(Phase::Uploading, md);
        let layout = checked.layout.clone();
        let function = job.digest_function;
        let inline = self.config.inline_stdio_bytes;
        let RunOutcome {
            ending,
            report,
            sandboxed,
            network: had_network,
            stdout,
            stderr,
        } = outcome;
        let (mut collected, stdio) = task::blocking("collect-outputs", move || -> WorkerResult<_> {
            let collected = outputs::collect(&exec_root, &layout, function, format)?;
            let stdout = stdio_blob(function, stdout, inline, "stdout")?;
            let stderr = stdio_blob(function, stderr, inline, "stderr")?;
            Ok((collected, [stdout, stderr]))
        })
        .await??;
        let [(out_key, out_upload, out_raw), (err_key, err_upload, err_raw)] = stdio;
        collected.result.stdout_digest = Some(out_key.to_digest());
        collected.result.stdout_raw = out_raw;
        collected.result.stderr_digest = Some(err_key.to_digest());
        collected.result.stderr_raw = err_raw;
        collected.uploads.extend(out_upload);
        collected.uploads.extend(err_upload);
        let result_uploads = std::mem::take(&mut collected.uploads);
        tokio::select! {
            r = upload_all(cas, result_uploads, self.config.cas_concurrency) => r?,
            _ = cancel.cancelled() => return Err(WorkerError::Cancelled("cancelled while uploading outputs".into())),
        }
        md.output_upload_completed_timestamp = Some(now());

        let mut result = collected.result;
        result.exit_code = report.exit_code;
        md.auxiliary_metadata
            .push(resource_usage(&report, sandboxed, had_network).to_any());
        Ok((result, ending == Ending::TimedOut))
    }
}

/// The resource usage of a run, for `auxiliary_metadata`.
fn resource_usage(r: &Report, sandboxed: bool, network: bool) -> ResourceUsage {
    let us = |v: i64| proto_duration(Duration::from_micros(v.max(0) as u64));
    ResourceUsage {
        user_cpu: Some(us(r.user_cpu_us)),
        system_cpu: Some(us(r.system_cpu_us)),
        peak_memory_bytes: (r.max_rss_kb.max(0) as u64) * 1024,
        sandboxed,
        network,
        signal: r.signal,
    }
}

/// Digest, upload and inline copy (when at most `inline` bytes) of the
/// command's stdout or stderr.
fn stdio_blob(
    function: DigestFunction,
    file: std::fs::File,
    inline: u64,
    what: &str,
) -> WorkerResult<(BlobKey, Option<Upload>, Vec<u8>)> {
    let Some((key, upload)) = outputs::hash_open_file(function, file, what)? else {
        return Ok((BlobKey::empty(function), None, Vec::new()));
    };
    let raw = match &upload {
        Upload::Bytes(_, b) if b.len() as u64 <= inline => b.to_vec(),
        _ => Vec::new(),
    };
    Ok((key, Some(upload), raw))
}

/// Creates (and wipes) the work directory, creates the cache directory,
/// and returns both as absolute paths.
fn prepare_dirs(work: &Path, cache: &Path) -> WorkerResult<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(work).map_err(WorkerError::io(format!("creating {}", work.display())))?;
    // Whatever a previous run left (any depth: actions write here).
    crate::wipe::empty_dir(work)
        .map_err(|e| WorkerError::Sandbox(format!("emptying {}: {e}", work.display())))?;
    std::fs::create_dir_all(cache).map_err(WorkerError::io(format!("creating {}", cache.display())))?;
    let work =
        std::fs::canonicalize(work).map_err(WorkerError::io(format!("resolving {}", work.display())))?;
    let cache =
        std::fs::canonicalize(cache).map_err(WorkerError::io(format!("resolving {}", cache.display())))?;
    if cache.starts_with(&work) || work.starts_with(&cache) {
        return Err(WorkerError::InvalidArgument(
            "worker.work_dir and worker.cache_dir must not contain each other".into(),
        ));
    }
    use std::os::unix::fs::MetadataExt;
    let (wd, cd) = (
        std::fs::metadata(&work)
            .map_err(WorkerError::io("stat of the work directory"))?
            .dev(),
        std::fs::metadata(&cache)
            .map_err(WorkerError::io("stat of the cache directory"))?
            .dev(),
    );
    if wd != cd {
        tracing::warn!(
            work = %work.display(),
            cache = %cache.display(),
            "work and cache directories are on different file systems: inputs will be copied, not hardlinked"
        );
    }
    Ok((work, cache))
}
