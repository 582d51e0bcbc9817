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

/// How a finished action ended, by one rule for every observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionOutcome {
    /// Answered from the Action Cache at Execute.
    Cached,
    /// Ran with an OK status and exit code 0.
    Success,
    /// Ran with an OK status and a non-zero exit code.
    Failure,
    /// An error status, or an OK status without an ActionResult: the action
    /// could not run, timed out, or was cancelled on the worker.
    Error,
}

impl ActionRecord {
    /// How this action ended.
    pub fn outcome(&self) -> ActionOutcome {
        if self.cached {
            return ActionOutcome::Cached;
        }
        match (self.status_code, self.exit_code) {
            (0, Some(0)) => ActionOutcome::Success,
            (0, Some(_)) => ActionOutcome::Failure,
            _ => ActionOutcome::Error,
        }
    }

    /// Ran and did not succeed (a non-zero exit code or an error).
    pub fn failed(&self) -> bool {
        matches!(self.outcome(), ActionOutcome::Failure | ActionOutcome::Error)
    }
}

pub trait ActionObserver: Send + Sync + 'static {
    /// Called once per finished execution or Execute cache hit. Must be
    /// cheap and never block.
    fn action_completed(&self, record: &ActionRecord);
}

type ObserverList = Arc<[Arc<dyn ActionObserver>]>;

/// The registered observers. Reading takes a shared lock once per event,
/// just long enough to clone one `Arc`; observers are called with no lock
/// held.
#[derive(Default)]
pub(crate) struct Observers {
    list: RwLock<ObserverList>,
}

/// The observers registered when an event happened (at least one).
pub(crate) struct Listeners(ObserverList);

impl Listeners {
    /// Reports a record to every observer.
    pub(crate) fn report(&self, record: &ActionRecord) {
        for observer in self.0.iter() {
            observer.action_completed(record);
        }
    }
}

impl Observers {
    pub(crate) fn add(&self, observer: Arc<dyn ActionObserver>) {
        let mut list = self.list.write();
        let mut next: Vec<Arc<dyn ActionObserver>> = list.iter().cloned().collect();
        next.push(observer);
        *list = next.into();
    }

    /// The observers registered now, or `None` when there are none (build
    /// no record then).
    pub(crate) fn listeners(&self) -> Option<Listeners> {
        let list = self.list.read();
        (!list.is_empty()).then(|| Listeners(list.clone()))
    }

    /// Builds the record (only when someone listens) and reports it.
    pub(crate) fn notify(&self, build: impl FnOnce() -> ActionRecord) {
        if let Some(listeners) = self.listeners() {
            listeners.report(&build());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cached: bool, status_code: i32, exit_code: Option<i32>) -> ActionRecord {
        ActionRecord {
            operation: String::new(),
            instance_name: String::new(),
            digest_function: DigestFunction::Sha256,
            action_digest: Digest::default(),
            cached,
            status_code,
            exit_code,
            worker: String::new(),
            metadata: None,
            request: RequestInfo::default(),
            platform: Platform::default(),
            completed_at: SystemTime::now(),
        }
    }

    #[test]
    fn one_rule_for_outcomes() {
        assert_eq!(record(true, 0, Some(0)).outcome(), ActionOutcome::Cached);
        assert_eq!(record(false, 0, Some(0)).outcome(), ActionOutcome::Success);
        assert_eq!(record(false, 0, Some(3)).outcome(), ActionOutcome::Failure);
        // An error status wins over the exit code.
        assert_eq!(record(false, 4, Some(0)).outcome(), ActionOutcome::Error);
        assert_eq!(record(false, 4, None).outcome(), ActionOutcome::Error);
        // OK but no ActionResult: the action did not run to an end.
        assert_eq!(record(false, 0, None).outcome(), ActionOutcome::Error);
    }
}
