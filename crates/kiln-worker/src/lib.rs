//! Kiln's remote execution worker.
//!
//! A library first: the all-in-one server runs workers in-process and the
//! `kiln worker --scheduler URL --cas URL` command runs one standalone;
//! both call [`run_worker`]. The pieces, one purpose each:
//!
//! * [`executor`]: one action end to end, every phase timed into
//!   `ExecutedActionMetadata`, resource usage in `auxiliary_metadata`.
//! * [`local_cas`]: the local disk cache of CAS blobs (LRU by bytes,
//!   pinned while in use, fetched concurrently and verified).
//! * [`tree`], [`materialize`], [`paths`], [`command`]: validating the
//!   input tree, paths and command before touching the disk, then building
//!   the input root by hardlink.
//! * [`sandbox`]: user/mount/PID/IPC/UTS namespaces, no network unless
//!   asked, process-tree kill; the `kiln-sandbox` helper.
//! * [`outputs`], [`upload`]: outputs (Trees, symlinks), stdout/stderr to
//!   the CAS.
//! * [`cas`]: the CAS client (batch and ByteStream).
//! * [`worker`]: the connection to the scheduler (kiln.worker.v1), over
//!   a [`link`] (gRPC, or direct in-process streams).

pub mod cas;
pub mod command;
pub mod config;
pub mod error;
pub mod executor;
pub mod link;
pub mod local_cas;
pub mod materialize;
pub mod metadata;
pub mod outputs;
pub mod paths;
pub mod sandbox;
pub mod tree;
pub mod upload;
pub mod wipe;
pub mod worker;

pub use config::{PropertyValues, SandboxConfig, WorkerConfig};
pub use error::{WorkerError, WorkerResult};
pub use executor::{Executor, Job};
pub use link::SchedulerLink;
pub use sandbox::helper_main;
pub use worker::run_worker;

/// A `google.rpc.Status` with code OK.
pub fn ok_status() -> kiln_proto::rpc::Status {
    kiln_proto::rpc::Status {
        code: 0,
        message: String::new(),
        details: Vec::new(),
    }
}
