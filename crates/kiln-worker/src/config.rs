//! The worker's configuration. Every field has a documented default, so an
//! empty table is a valid configuration; unknown keys are rejected.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How one worker runs: where it works, how much it caches, what it offers.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Name reported in `ExecutedActionMetadata.worker` and to the
    /// scheduler. Default: `kiln-worker@<hostname>`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Directory holding one sub-directory per running action. Wiped at
    /// start. Must be on the same file system as `cache_dir` (inputs are
    /// hardlinked from the cache). Default: `./kiln-worker/work`.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// Local cache of CAS blobs. Default: `./kiln-worker/cache`.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Bytes the local cache may hold. Blobs in use by a running action are
    /// never evicted, so the cache can exceed this while a large action runs.
    /// Default: 10 GiB.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity_bytes: u64,
    /// Actions run at once. Default: the number of CPU cores.
    #[serde(default)]
    pub slots: Option<u32>,
    /// Platform properties this worker offers to the scheduler, as
    /// `name = "value"` or `name = ["v1", "v2"]`. Default: `OSFamily = "Linux"`
    /// and `ISA` = this machine's architecture (`x86-64`, `aarch64`, ...).
    /// `network` is interpreted by the worker itself (see [`SandboxConfig`]).
    #[serde(default = "default_properties")]
    pub properties: std::collections::BTreeMap<String, PropertyValues>,
    /// Sandbox settings.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// stdout/stderr up to this size are also inlined in the result
    /// (`stdout_raw`/`stderr_raw`); they always go to the CAS.
    /// Default: 64 KiB.
    #[serde(default = "default_inline_stdio")]
    pub inline_stdio_bytes: u64,
    /// Whether input symlinks may have absolute targets (the Capabilities
    /// `symlink_absolute_path_strategy`: ALLOWED when true). When false an
    /// absolute target is INVALID_ARGUMENT. Default: true.
    #[serde(default = "default_true")]
    pub allow_absolute_symlinks: bool,
    /// Largest number of files, directories and symlinks one input root may
    /// materialise (a Directory DAG can expand exponentially). Default:
    /// 2,000,000.
    #[serde(default = "default_max_input_nodes")]
    pub max_input_nodes: u64,
    /// CAS requests in flight at once per action while fetching inputs or
    /// uploading outputs. Default: 8.
    #[serde(default = "default_cas_concurrency")]
    pub cas_concurrency: usize,
    /// Delay before the first reconnect to the scheduler; doubles up to
    /// `reconnect_max`. Default: "100ms".
    #[serde(default = "default_reconnect_min", with = "human_duration")]
    #[schemars(with = "String")]
    pub reconnect_min: Duration,
    /// Longest delay between reconnect attempts. Default: "10s".
    #[serde(default = "default_reconnect_max", with = "human_duration")]
    #[schemars(with = "String")]
    pub reconnect_max: Duration,
    /// On shutdown (SIGTERM), how long running actions may take to finish
    /// before they are killed and handed back. Default: "60s".
    #[serde(default = "default_drain_timeout", with = "human_duration")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
}

/// One or several values of a platform property.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum PropertyValues {
    One(String),
    Many(Vec<String>),
}

impl PropertyValues {
    pub fn values(&self) -> Vec<String> {
        match self {
            PropertyValues::One(v) => vec![v.clone()],
            PropertyValues::Many(v) => v.clone(),
        }
    }
}

/// How actions are isolated (Linux).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Run every action sandboxed: user and mount namespaces per slot (set
    /// up once by the slot's zygote), fresh PID, IPC and UTS namespaces per
    /// action, and no network unless the action's platform has
    /// `network = on`. The worker refuses to start when namespaces are
    /// unavailable.
    /// `false` is UNSAFE: actions then run as the worker's own user with its
    /// full view of the machine and network, and a process that escapes its
    /// process group survives a timeout. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Command (program and leading arguments) of the sandbox helper that
    /// runs each slot's zygote (`kiln-sandbox`, or the `kiln` binary's
    /// `sandbox-helper` sub-command). Default: `kiln worker` and the
    /// in-process workers of `kiln` use the running binary itself
    /// (`/proc/self/exe sandbox-helper`); other embedders use
    /// `kiln-sandbox` next to the running executable, else on `PATH`.
    #[serde(default)]
    pub helper: Vec<String>,
    /// When the worker runs as root, actions run as this user id (never 0)
    /// so that they cannot modify the worker's files. Default: 65534.
    #[serde(default = "default_nobody")]
    pub uid: u32,
    /// Group id paired with `uid`. Default: 65534.
    #[serde(default = "default_nobody")]
    pub gid: u32,
    /// Directories that get a private, empty, writable tmpfs in every
    /// sandbox (everything else but the action's directory is read-only).
    /// Default: ["/tmp", "/var/tmp", "/dev/shm"] (those that exist).
    #[serde(default = "default_tmpfs")]
    pub tmpfs: Vec<PathBuf>,
    /// Host name inside the sandbox. Default: "localhost".
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// After SIGTERM on timeout or cancel, how long the action's processes
    /// have before SIGKILL. Default: "2s".
    #[serde(default = "default_kill_grace", with = "human_duration")]
    #[schemars(with = "String")]
    pub kill_grace: Duration,
    /// More directories covered by an empty, read-only tmpfs in every
    /// sandbox, besides the worker's work and cache directories (which are
    /// always hidden). An in-process worker also hides its server's data
    /// directory and store directories. Default: [].
    #[serde(default)]
    pub hide: Vec<PathBuf>,
    /// Size limit of each private tmpfs (`/tmp`, ...), in bytes; a write
    /// beyond it fails with ENOSPC. Default: none (the kernel's default,
    /// half of RAM per tmpfs).
    #[serde(default)]
    pub tmpfs_size_bytes: Option<u64>,
    /// Largest stdout, and largest stderr, of an action, in bytes (both are
    /// kept in memory until uploaded): an action writing more is terminated
    /// and fails with RESOURCE_EXHAUSTED. Default: 1 GiB.
    #[serde(default = "default_max_stdio")]
    pub max_stdio_bytes: u64,
}

fn default_max_stdio() -> u64 {
    1 << 30
}

fn default_true() -> bool {
    true
}

fn default_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("kiln-worker@{host}")
}

fn default_work_dir() -> PathBuf {
    PathBuf::from("kiln-worker/work")
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("kiln-worker/cache")
}

fn default_cache_capacity() -> u64 {
    10 << 30
}

/// The ISA name Bazel's platforms use for this machine.
pub fn native_isa() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        other => other,
    }
}

fn default_properties() -> std::collections::BTreeMap<String, PropertyValues> {
    [
        ("OSFamily".to_string(), PropertyValues::One("Linux".into())),
        ("ISA".to_string(), PropertyValues::One(native_isa().into())),
    ]
    .into_iter()
    .collect()
}

fn default_inline_stdio() -> u64 {
    64 << 10
}

fn default_max_input_nodes() -> u64 {
    2_000_000
}

fn default_cas_concurrency() -> usize {
    8
}

fn default_reconnect_min() -> Duration {
    Duration::from_millis(100)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(10)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_nobody() -> u32 {
    65534
}

fn default_tmpfs() -> Vec<PathBuf> {
    vec![
        PathBuf::from("/tmp"),
        PathBuf::from("/var/tmp"),
        PathBuf::from("/dev/shm"),
    ]
}

fn default_hostname() -> String {
    "localhost".into()
}

fn default_kill_grace() -> Duration {
    Duration::from_secs(2)
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            enabled: true,
            helper: Vec::new(),
            uid: default_nobody(),
            gid: default_nobody(),
            tmpfs: default_tmpfs(),
            hostname: default_hostname(),
            kill_grace: default_kill_grace(),
            hide: Vec::new(),
            tmpfs_size_bytes: None,
            max_stdio_bytes: default_max_stdio(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: default_name(),
            work_dir: default_work_dir(),
            cache_dir: default_cache_dir(),
            cache_capacity_bytes: default_cache_capacity(),
            slots: None,
            properties: default_properties(),
            sandbox: SandboxConfig::default(),
            inline_stdio_bytes: default_inline_stdio(),
            allow_absolute_symlinks: true,
            max_input_nodes: default_max_input_nodes(),
            cas_concurrency: default_cas_concurrency(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

impl WorkerConfig {
    /// A default configuration whose work and cache directories live under
    /// `base` (`base/work`, `base/cache`).
    pub fn with_base_dir(base: impl Into<PathBuf>) -> Self {
        let base = base.into();
        WorkerConfig {
            work_dir: base.join("work"),
            cache_dir: base.join("cache"),
            ..WorkerConfig::default()
        }
    }

    /// Slots to run: the configured number, else the number of cores.
    pub fn effective_slots(&self) -> u32 {
        match self.slots {
            Some(n) if n > 0 => n,
            _ => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        }
    }

    /// Properties as (name, value) pairs, one pair per value.
    pub fn property_pairs(&self) -> Vec<(String, String)> {
        self.properties
            .iter()
            .flat_map(|(k, v)| v.values().into_iter().map(move |v| (k.clone(), v)))
            .collect()
    }

    /// Checks values that serde cannot: returns a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("worker.name must not be empty".into());
        }
        if self.sandbox.uid == 0 || self.sandbox.gid == 0 {
            return Err("worker.sandbox.uid and gid must not be 0 (root)".into());
        }
        if self.cas_concurrency == 0 {
            return Err("worker.cas_concurrency must be at least 1".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return Err("worker.reconnect_min must be > 0 and <= reconnect_max".into());
        }
        Ok(())
    }
}

/// Serde for `Duration` as a human-readable string ("30s", "10m").
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"30s\" or \"10m\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_is_the_default() {
        let c: WorkerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.cache_capacity_bytes, 10 << 30);
        assert!(c.sandbox.enabled);
        assert_eq!(c.sandbox.kill_grace, Duration::from_secs(2));
        assert!(c.effective_slots() >= 1);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_keys_rejected_and_durations_parsed() {
        assert!(serde_json::from_str::<WorkerConfig>(r#"{"bogus": 1}"#).is_err());
        assert!(serde_json::from_str::<WorkerConfig>(r#"{"sandbox": {"bogus": 1}}"#).is_err());
        let c: WorkerConfig = serde_json::from_str(
            r#"{"drain_timeout": "5m", "properties": {"OSFamily": "Linux", "cpu": ["a", "b"]}}"#,
        )
        .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(300));
        let pairs = c.property_pairs();
        assert!(pairs.contains(&("cpu".into(), "b".into())));
        assert!(serde_json::from_str::<WorkerConfig>(r#"{"drain_timeout": "soon"}"#).is_err());
    }
}
