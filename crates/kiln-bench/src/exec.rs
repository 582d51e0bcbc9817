//! Plumbing shared by the execution scenarios (`exec-noop`, `exec-queue`,
//! `exec-cache-hit`, `exec-mixed`): building and uploading unique no-op
//! actions, one Execute call followed to its end, the phase timestamps of
//! ExecutedActionMetadata, and CPU accounting of a whole process tree
//! (the server plus every descendant: sandbox zygotes, per-action init
//! processes, the actions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_digest::BlobKey;
use kiln_proto::longrunning::{Operation, operation};
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    Action, Command, Digest, Directory, ExecuteRequest, ExecuteResponse, ExecutedActionMetadata, command,
};
use prost::Message as _;
use tonic::transport::Channel;

use crate::client::{self, Blob, FUNCTION, Pool};
use crate::error::{BenchError, Context as _, Result};
use crate::procstat::ticks_to_duration;
use crate::stats::{Latencies, fmt_latency};

/// Largest message the execution client will decode.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// An Execution client on the pool's next channel.
pub fn execution(pool: &Pool) -> ExecutionClient<Channel> {
    ExecutionClient::new(pool.channel())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A protobuf message as a CAS blob.
pub fn message_blob(m: &impl prost::Message) -> Blob {
    let data = m.encode_to_vec();
    let digest = BlobKey::of(FUNCTION, &data).to_digest();
    Blob { digest, data }
}

/// The empty Directory (every no-op action's input root).
pub fn empty_root() -> Blob {
    message_blob(&Directory::default())
}

/// A no-op command (`/bin/true`) made unique by an environment variable
/// carrying the run's seed, a tag and the index: a new Command, so a new
/// Action, so never a cache hit (exactly what a fresh build action is).
pub fn noop_command(seed: u64, tag: &str, index: u64) -> Command {
    Command {
        arguments: vec!["/bin/true".to_string()],
        environment_variables: vec![command::EnvironmentVariable {
            name: "KILN_BENCH_NONCE".to_string(),
            value: format!("{seed:016x}-{tag}-{index}"),
        }],
        ..Default::default()
    }
}

/// A prepared action: its digest plus the Command and Action blobs a client
/// must upload for it.
pub struct Prepared {
    pub action: Digest,
    pub blobs: [Blob; 2],
}

/// Builds `count` unique no-op actions on the given input root.
pub fn prepare_noops(count: usize, seed: u64, tag: &str, root: &Digest) -> Vec<Prepared> {
    (0..count as u64)
        .map(|i| {
            let cmd = message_blob(&noop_command(seed, tag, i));
            let action = message_blob(&Action {
                command_digest: Some(cmd.digest.clone()),
                input_root_digest: Some(root.clone()),
                ..Default::default()
            });
            Prepared {
                action: action.digest.clone(),
                blobs: [cmd, action],
            }
        })
        .collect()
}

/// Uploads blobs with BatchUpdateBlobs (untimed set-up).
pub async fn upload(pool: &Pool, instance: &str, max_batch: u64, blobs: Vec<Blob>) -> Result<()> {
    let per_call = client::blobs_per_batch(max_batch, 256, 1000);
    client::upload_all(pool, client::pack_batches(instance, blobs, per_call), 4)
        .await
        .map(|_| ())
}

/// An ExecuteRequest for `action` (cache lookup on, SHA-256).
pub fn execute_request(instance: &str, action: &Digest) -> ExecuteRequest {
    ExecuteRequest {
        instance_name: instance.to_string(),
        skip_cache_lookup: false,
        action_digest: Some(action.clone()),
        execution_policy: None,
        results_cache_policy: None,
        digest_function: FUNCTION.to_proto() as i32,
        inline_stdout: false,
        inline_stderr: false,
        inline_output_files: Vec::new(),
    }
}

/// Calls Execute and reads the operation stream until `done`; returns the
/// ExecuteResponse. A stream that ends early, an operation error, a
/// non-OK status or a non-zero exit code are errors. With `drain`, the
/// stream is read to its end (trailers) after the `done` Operation, as
/// Bazel's blocking iterator does; without, it is dropped at once, which
/// makes the client cancel it with RST_STREAM (what a client that stops at
/// `done` does).
pub async fn execute(
    client: &mut ExecutionClient<Channel>,
    req: impl tonic::IntoRequest<ExecuteRequest>,
    drain: bool,
) -> Result<ExecuteResponse> {
    let mut stream = client
        .execute(req)
        .await
        .map_err(|s| chained(&s).context("Execute"))?
        .into_inner();
    loop {
        match stream
            .message()
            .await
            .map_err(|s| chained(&s).context("Execute stream"))?
        {
            Some(op) if op.done => {
                if drain {
                    // Read to the end (trailers), as Bazel's blocking
                    // iterator does, instead of dropping the stream (which
                    // makes the client reset it with RST_STREAM).
                    while stream
                        .message()
                        .await
                        .map_err(|s| chained(&s).context("Execute stream after done"))?
                        .is_some()
                    {}
                }
                return finish(op);
            }
            Some(_) => continue,
            None => {
                return Err(BenchError::new(
                    "Execute stream ended before the operation was done",
                ));
            }
        }
    }
}

/// A Status with its source chain (transport errors say there who
/// initiated an HTTP/2 reset or GOAWAY, e.g. "connection error received").
fn chained(s: &tonic::Status) -> BenchError {
    let mut msg = format!("rpc failed: {:?}: {}", s.code(), s.message());
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        msg.push_str(&format!(": {e}"));
        src = e.source();
    }
    BenchError::new(msg)
}

fn finish(op: Operation) -> Result<ExecuteResponse> {
    let any = match op.result {
        Some(operation::Result::Response(any)) => any,
        Some(operation::Result::Error(s)) => {
            return Err(BenchError::new(format!(
                "operation {} failed: code {}: {}",
                op.name, s.code, s.message
            )));
        }
        None => {
            return Err(BenchError::new(format!(
                "operation {} done without a result",
                op.name
            )));
        }
    };
    if !any
        .type_url
        .ends_with("/build.bazel.remote.execution.v2.ExecuteResponse")
    {
        return Err(BenchError::new(format!(
            "operation {} ended with a {:?}, not an ExecuteResponse",
            op.name, any.type_url
        )));
    }
    let resp = ExecuteResponse::decode(any.value.as_slice())
        .map_err(|e| BenchError::new(format!("undecodable ExecuteResponse: {e}")))?;
    if let Some(s) = &resp.status
        && s.code != 0
    {
        return Err(BenchError::new(format!(
            "ExecuteResponse status code {}: {}",
            s.code, s.message
        )));
    }
    let exit = resp.result.as_ref().map(|r| r.exit_code);
    if exit != Some(0) {
        return Err(BenchError::new(format!(
            "ExecuteResponse without a successful result (exit code {exit:?}, message {:?})",
            resp.message
        )));
    }
    Ok(resp)
}

/// Nanoseconds from `a` to `b` when both are set and in order
/// ([`kiln_proto::time::interval`]).
fn between(a: Option<&Timestamp>, b: Option<&Timestamp>) -> Option<u64> {
    u64::try_from(kiln_proto::time::interval(a, b)?.as_nanos()).ok()
}

/// Phase durations of executed (not cached) actions, in nanoseconds, from
/// ExecutedActionMetadata.
#[derive(Default)]
pub struct Phases {
    /// queued -> worker start (queue-to-start).
    pub queue: Vec<u64>,
    /// worker start -> execution start (input fetch, sandbox set-up).
    pub prepare: Vec<u64>,
    /// execution start -> execution completed (the command itself).
    pub run: Vec<u64>,
    /// execution completed -> worker completed (output upload).
    pub finish: Vec<u64>,
    /// Results without the timestamps needed.
    pub incomplete: u64,
}

/// Shared collector of [`Phases`] (a std Mutex held only to push).
pub type PhaseLog = Arc<Mutex<Phases>>;

/// Records one result's phases.
pub fn record(log: &PhaseLog, md: Option<&ExecutedActionMetadata>) {
    let mut p = log.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(md) = md else {
        p.incomplete += 1;
        return;
    };
    match between(md.queued_timestamp.as_ref(), md.worker_start_timestamp.as_ref()) {
        Some(q) => p.queue.push(q),
        None => p.incomplete += 1,
    }
    if let Some(d) = between(
        md.worker_start_timestamp.as_ref(),
        md.execution_start_timestamp.as_ref(),
    ) {
        p.prepare.push(d);
    }
    if let Some(d) = between(
        md.execution_start_timestamp.as_ref(),
        md.execution_completed_timestamp.as_ref(),
    ) {
        p.run.push(d);
    }
    if let Some(d) = between(
        md.execution_completed_timestamp.as_ref(),
        md.worker_completed_timestamp.as_ref(),
    ) {
        p.finish.push(d);
    }
}

/// Takes the phases out of the log, as sorted latency sets.
pub fn take(log: &PhaseLog) -> (Latencies, Latencies, Latencies, Latencies, u64) {
    let mut p = log.lock().unwrap_or_else(PoisonError::into_inner);
    let p = std::mem::take(&mut *p);
    (
        Latencies::from_samples(p.queue),
        Latencies::from_samples(p.prepare),
        Latencies::from_samples(p.run),
        Latencies::from_samples(p.finish),
        p.incomplete,
    )
}

/// `name p50 X p99 Y` for a note.
pub fn describe(name: &str, l: &Latencies) -> String {
    match (l.percentile(50.0), l.percentile(99.0)) {
        (Some(a), Some(b)) => format!("{name} p50 {} p99 {}", fmt_latency(a), fmt_latency(b)),
        _ => format!("{name}: no samples"),
    }
}

/// Milliseconds of a percentile, for a row.
pub fn ms(l: &Latencies, p: f64) -> Option<f64> {
    l.percentile(p).map(|d| d.as_secs_f64() * 1e3)
}

/// One process's line of `/proc/PID/stat`: parent, and utime + stime +
/// cutime + cstime (fields 4, 14-17 of proc(5)), in ticks.
fn parse_tree_stat(content: &str) -> Option<(u32, u64)> {
    let close = content.rfind(')')?;
    let rest: Vec<&str> = content[close + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    let ppid = u32::try_from(field(4)?).ok()?;
    Some((ppid, field(14)? + field(15)? + field(16)? + field(17)?))
}

/// CPU of a process tree, in ticks: for the root and every live descendant,
/// utime + stime (its own threads) + cutime + cstime (its children that
/// exited and were waited for). A process that exits between two readings
/// moves from "live descendant" to its parent's cutime, so the difference
/// of two readings counts it once. Not counted: a descendant that exited
/// and was never reaped by anyone in the tree (none, for a server that
/// waits for its children), and processes that left the tree (daemonized).
pub fn tree_ticks(root: u32) -> Result<u64> {
    let mut parent_of: HashMap<u32, (u32, u64)> = HashMap::new();
    let dir = std::fs::read_dir("/proc").ctx("listing /proc")?;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A process may exit between listing and reading: skip it.
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(v) = parse_tree_stat(&s)
        {
            parent_of.insert(pid, v);
        }
    }
    let root_ticks = parent_of
        .get(&root)
        .map(|v| v.1)
        .ok_or_else(|| BenchError::new(format!("process {root} not found in /proc")))?;
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(ppid, _)) in &parent_of {
        children.entry(ppid).or_default().push(pid);
    }
    let mut total = root_ticks;
    let mut stack = vec![root];
    let mut seen = 0usize;
    while let Some(p) = stack.pop() {
        seen += 1;
        if seen > parent_of.len() {
            break;
        }
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            total += parent_of.get(&c).map(|v| v.1).unwrap_or(0);
            stack.push(c);
        }
    }
    Ok(total)
}

/// Server tree CPU between two readings (None without --server-pid or when
/// /proc could not be read).
pub struct TreeMark {
    pid: Option<u32>,
    ticks: Option<u64>,
    tps: u64,
}

impl TreeMark {
    pub fn now(pid: Option<u32>, tps: u64) -> TreeMark {
        TreeMark {
            pid,
            ticks: pid.and_then(|p| tree_ticks(p).ok()),
            tps,
        }
    }

    pub fn elapsed_cpu(&self) -> Option<Duration> {
        let now = tree_ticks(self.pid?).ok()?;
        Some(ticks_to_duration(now.saturating_sub(self.ticks?), self.tps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_stat_fields() {
        let line = "4242 (kiln (x) y) S 17 4242 4242 0 -1 4194560 1234 0 0 0 \
                    700 300 40 60 20 0 9 0 12345 1000000 2000";
        assert_eq!(parse_tree_stat(line), Some((17, 1100)));
        assert_eq!(parse_tree_stat("1 (a) S 1 2"), None);
    }

    #[test]
    fn own_tree_includes_a_waited_child() {
        let me = std::process::id();
        let a = tree_ticks(me).unwrap();
        // A child that burns CPU and is waited for lands in our cstime/cutime.
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")
            .status()
            .unwrap();
        assert!(st.success());
        let b = tree_ticks(me).unwrap();
        assert!(b > a, "{a} -> {b}");
    }

    #[test]
    fn phases_from_metadata() {
        let ts = |ms: i64| {
            Some(Timestamp {
                seconds: ms / 1000,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            })
        };
        let md = ExecutedActionMetadata {
            queued_timestamp: ts(1_000),
            worker_start_timestamp: ts(1_002),
            execution_start_timestamp: ts(1_005),
            execution_completed_timestamp: ts(1_006),
            worker_completed_timestamp: ts(1_010),
            ..Default::default()
        };
        let log: PhaseLog = Arc::default();
        record(&log, Some(&md));
        record(&log, None);
        let (q, p, r, f, incomplete) = take(&log);
        assert_eq!(q.percentile(50.0), Some(Duration::from_millis(2)));
        assert_eq!(p.percentile(50.0), Some(Duration::from_millis(3)));
        assert_eq!(r.percentile(50.0), Some(Duration::from_millis(1)));
        assert_eq!(f.percentile(50.0), Some(Duration::from_millis(4)));
        assert_eq!(incomplete, 1);
    }
}
