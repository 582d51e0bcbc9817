//! Observation hook: every finished execution and every Execute answered
//! from the Action Cache is reported once, as an [`ActionRecord`], to the
//! [`ActionObserver`]s registered with [`crate::Scheduler::add_observer`]
//! (metrics, the dashboard's recent-actions list).
//!
//! Observers run inline on the request path: they must be cheap and never
//! block. When none is registered no record is built.

use std::sync::Arc;
use std::time::SystemTime;

use kiln_digest::DigestFunction;
use kiln_proto::reapi::{Digest, ExecutedActionMetadata, Platform};
use kiln_proto::request_info::RequestInfo;
use parking_lot::RwLock;

/// One finished action.
#[derive(Debug, Clone)]
pub struct ActionRecord {
    /// Operation name ("" for cache hits if none was made); the first one
    /// when identical actions were merged.
    pub operation: String,
    pub instance_name: String,
    pub digest_function: DigestFunction,
    pub action_digest: Digest,
    /// Answered from the Action Cache at Execute.
    pub cached: bool,
    /// `google.rpc.Code` of `ExecuteResponse.status` (0 = OK).
    pub status_code: i32,
    /// `None` when there is no ActionResult.
    pub exit_code: Option<i32>,
    /// Worker name ("" for cache hits).
    pub worker: String,
    pub metadata: Option<ExecutedActionMetadata>,
    /// From the Execute call's RequestMetadata.
    pub request: RequestInfo,
    /// Effective platform (empty for cache hits).
    pub platform: Platform,
    pub completed_at: SystemTime,
}

pub trait ActionObserver: Send + Sync + 'static {
    /// Called once per finished execution or Execute cache hit. Must be
    /// cheap and never block.
    fn action_completed(&self, record: &ActionRecord);
}

/// The registered observers. Reading takes a shared lock just long enough
/// to clone one `Arc`; observers are called with no lock held.
#[derive(Default)]
pub(crate) struct Observers {
    list: RwLock<Arc<[Arc<dyn ActionObserver>]>>,
}

impl Observers {
    pub(crate) fn add(&self, observer: Arc<dyn ActionObserver>) {
        let mut list = self.list.write();
        let mut next: Vec<Arc<dyn ActionObserver>> = list.iter().cloned().collect();
        next.push(observer);
        *list = next.into();
    }

    /// Whether any observer is registered (build no record otherwise).
    pub(crate) fn listening(&self) -> bool {
        !self.list.read().is_empty()
    }

    /// Reports a record to every observer.
    pub(crate) fn report(&self, record: &ActionRecord) {
        let list = self.list.read().clone();
        for observer in list.iter() {
            observer.action_completed(record);
        }
    }

    /// Builds the record (only when someone listens) and reports it.
    pub(crate) fn notify(&self, build: impl FnOnce() -> ActionRecord) {
        if self.listening() {
            self.report(&build());
        }
    }
}
