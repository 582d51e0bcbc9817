//! Kiln server wiring: reads the configuration, builds the stores and
//! instances it declares, and serves the REAPI services over gRPC and
//! health over HTTP.

pub mod call_context;
pub mod config;
mod data_dir;
mod error;
pub mod grpc;
mod http;
mod local_link;
pub mod metrics;
mod server;
mod stores;
pub mod telemetry;

pub use error::ServerError;
pub use server::{Overrides, RunningServer, start};
