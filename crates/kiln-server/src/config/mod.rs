//! Kiln's declarative configuration: one TOML file (comments allowed).
//!
//! Unknown keys are rejected with their line and the list of valid keys;
//! sizes (`"4 MiB"`) and durations (`"30s"`) are human-readable. Every
//! default is stated next to the field that has it. Stores are declared by
//! name under `[stores.NAME]` with exactly one backend or decorator table;
//! decorators refer to other stores by name, so the file mirrors the tree
//! of stores that is built (see docs/configuration.md).

mod duration;
mod load;
mod reference;
mod size;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use duration::HumanDuration;
pub use load::{ConfigError, default_config_text, load_file, parse};
pub use reference::reference_markdown;
pub use size::ByteSize;
pub use validate::children as store_children;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and the data directory.
    #[serde(default)]
    pub server: ServerConfig,
    /// Limits advertised in Capabilities and enforced by the services.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Named stores. Required: at least the stores the instances use.
    pub stores: std::collections::BTreeMap<String, StoreConfig>,
    /// Instance names served, each with its CAS and Action Cache store.
    pub instances: Vec<InstanceConfig>,
    /// Remote execution. With a `[scheduler]` table Kiln also serves the
    /// Execution and Operations services for every instance and accepts
    /// workers on the gRPC port. Default: absent (cache only).
    #[serde(default)]
    pub scheduler: Option<kiln_scheduler::SchedulerConfig>,
    /// Workers run inside this server process (the all-in-one setup), each
    /// connecting to this server's own gRPC port. Requires `[scheduler]`.
    /// Relative `work_dir`/`cache_dir` are under `server.data_dir`; two
    /// workers may not share them. Default: none (workers can also run as
    /// `kiln worker --scheduler URL --cas URL`).
    #[serde(default)]
    pub workers: Vec<kiln_worker::WorkerConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (all REAPI services and grpc.health.v1).
    /// Default: "127.0.0.1:50051".
    #[serde(default = "default_listen")]
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// HTTP listen address (`/healthz`). Default: "127.0.0.1:50052".
    #[serde(default = "default_http_listen")]
    #[schemars(with = "String")]
    pub http_listen: SocketAddr,
    /// Base directory for disk stores with relative paths. Default: the
    /// `KILN_DATA_DIR` environment variable, else `$XDG_DATA_HOME/kiln`,
    /// else `~/.local/share/kiln`, else `./kiln-data`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Collect and serve Prometheus metrics (`GET /metrics`; per-call gRPC
    /// counts, errors and latency; scheduler histograms). With `false`
    /// `/metrics` answers 404 and gRPC calls are not counted (they still
    /// get their tracing span). Default: true.
    #[serde(default = "default_true")]
    pub metrics: bool,
    /// OpenTelemetry OTLP/HTTP endpoint to export tracing spans to, e.g.
    /// "http://127.0.0.1:4318" (spans are posted to `/v1/traces` under
    /// it). Without it the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` environment variables are used;
    /// with neither, nothing is exported. Default: none.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Serve the web dashboard (`/`, `/assets/...`, `/api/...`) on the HTTP
    /// port. It shows every action's command line, environment and output
    /// and any CAS blob to whoever can reach the port: turn it off, or keep
    /// the port private (Kiln has no authentication), where that matters.
    /// On a loopback address it answers only requests whose Host is that
    /// loopback address (DNS rebinding protection). Default: true.
    #[serde(default = "default_true")]
    pub dashboard: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50052))
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            http_listen: default_http_listen(),
            data_dir: None,
            metrics: true,
            otlp_endpoint: None,
            dashboard: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest total blob size of one BatchUpdateBlobs/BatchReadBlobs call
    /// (advertised as `max_batch_total_size_bytes`). Default: "4 MiB".
    #[serde(default = "default_max_batch")]
    pub max_batch_total_size: ByteSize,
    /// Largest blob accepted for upload (advertised as
    /// `max_cas_blob_size_bytes`); 0 means no limit. Default: 0.
    #[serde(default)]
    pub max_cas_blob_size: ByteSize,
    /// Largest stdout/stderr/output file GetActionResult inlines when asked.
    /// Default: "1 MiB".
    #[serde(default = "default_max_inline")]
    pub max_inline_size: ByteSize,
}

fn default_max_batch() -> ByteSize {
    ByteSize(4 << 20)
}

fn default_max_inline() -> ByteSize {
    ByteSize(1 << 20)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_batch_total_size: default_max_batch(),
            max_cas_blob_size: ByteSize(0),
            max_inline_size: default_max_inline(),
        }
    }
}

/// One store: exactly one of the tables below, e.g.
/// `[stores.cas.disk]` with `path` and `capacity`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// Blobs in RAM, evicted least-recently-used beyond `capacity`.
    Memory(MemoryStoreConfig),
    /// Blobs in files under `path`; survives restarts and crashes.
    Disk(DiskStoreConfig),
    /// `fast` in front of `slow`: reads fill `fast`, writes go to both.
    Tiered(TieredStoreConfig),
    /// zstd compression at rest in `inner`.
    Compressed(CompressedStoreConfig),
    /// Remembers which blobs `inner` has, to answer FindMissingBlobs quickly.
    ExistenceCache(ExistenceCacheConfig),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryStoreConfig {
    /// Most payload bytes held. Required.
    pub capacity: ByteSize,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskStoreConfig {
    /// Directory of the store; relative paths are under `server.data_dir`.
    /// Required. Two disk stores may not share a directory.
    pub path: PathBuf,
    /// Most payload bytes kept on disk; least-recently-used blobs are
    /// evicted to stay under it. Required.
    pub capacity: ByteSize,
    /// fsync every blob before it becomes visible (survives power loss,
    /// slower). Without it, blobs survive a crash of Kiln but not of the
    /// machine. Default: false.
    #[serde(default)]
    pub sync_writes: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TieredStoreConfig {
    /// Name of the fast store (e.g. memory). Required.
    #[schemars(with = "String")]
    pub fast: Spanned<String>,
    /// Name of the slow, authoritative store (e.g. disk). Required.
    #[schemars(with = "String")]
    pub slow: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompressedStoreConfig {
    /// Name of the store that holds the compressed payloads. Required.
    #[schemars(with = "String")]
    pub inner: Spanned<String>,
    /// zstd level, 1 (fastest) to 19. Default: 1.
    #[serde(default = "default_zstd_level")]
    pub level: i32,
}

fn default_zstd_level() -> i32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExistenceCacheConfig {
    /// Name of the store whose contents are remembered. Required.
    #[schemars(with = "String")]
    pub inner: Spanned<String>,
    /// How long a blob seen present is assumed present. Default: "1m".
    #[serde(default = "default_existence_ttl")]
    pub ttl: HumanDuration,
    /// Most digests remembered. Default: 1000000.
    #[serde(default = "default_existence_entries")]
    pub max_entries: usize,
}

fn default_existence_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}

fn default_existence_entries() -> usize {
    1_000_000
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// The REAPI instance name; "" (the default) is the unnamed instance.
    #[serde(default)]
    pub name: String,
    /// Store holding the CAS. Required.
    #[schemars(with = "String")]
    pub cas: Spanned<String>,
    /// Store holding the Action Cache. Required.
    #[schemars(with = "String")]
    pub ac: Spanned<String>,
    /// Refuse UpdateActionResult with PERMISSION_DENIED. Default: false.
    #[serde(default)]
    pub read_only: bool,
    /// Answer GetActionResult with NOT_FOUND when any blob the result
    /// references is missing from the CAS. Default: true.
    #[serde(default = "default_true")]
    pub completeness_check: bool,
    /// Digest functions accepted: any of sha256, sha1, md5, sha384, sha512,
    /// blake3, gitsha1. Default: all of them.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub digest_functions: Option<Vec<Spanned<String>>>,
}

fn default_true() -> bool {
    true
}
