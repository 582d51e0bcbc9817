//! Finished actions, fed by the scheduler's observe hook
//! ([`kiln_scheduler::observe`]):
//!
//! * `kiln_actions_total{outcome}`: "cached" (Execute answered from the
//!   Action Cache), and results workers reported: "success" (exit code 0),
//!   "failure" (non-zero exit code), "error" (an error status or no
//!   result: the action could not run, timed out, was cancelled on the
//!   worker). Actions the scheduler ends itself are not observed;
//! * `kiln_action_queue_wait_seconds`: queued → a worker started it;
//! * `kiln_action_execution_seconds`: the command's run (execution start →
//!   completed);
//! * `kiln_worker_phase_seconds{worker,phase}`: per worker, the input fetch
//!   ("fetch"), command ("execute") and output upload ("upload") phases.
//!
//! The times are the `ExecutedActionMetadata` timestamps of executed
//! actions (cache hits observe no time). At most [`MAX_WORKER_LABELS`]
//! worker names get their own label; further ones are "other".

use std::collections::HashSet;

use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::ExecutedActionMetadata;
use kiln_scheduler::observe::{ActionObserver, ActionOutcome, ActionRecord};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Distinct `worker` label values before further ones become "other".
pub const MAX_WORKER_LABELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    worker: String,
    phase: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~17 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 21))
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The `outcome` label values, in [`outcome_index`] order.
const OUTCOMES: [&str; 4] = ["cached", "success", "failure", "error"];

/// The index of `outcome`'s label in [`OUTCOMES`].
fn outcome_index(outcome: ActionOutcome) -> usize {
    match outcome {
        ActionOutcome::Cached => 0,
        ActionOutcome::Success => 1,
        ActionOutcome::Failure => 2,
        ActionOutcome::Error => 3,
    }
}

#[derive(Debug)]
pub(crate) struct ActionMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    /// The counters of [`OUTCOMES`], resolved once (a cache-hit Execute
    /// costs one atomic add here).
    by_outcome: [Counter; 4],
    queue_wait: Histogram,
    execution: Histogram,
    phases: Histograms<PhaseLabels>,
    workers: Mutex<HashSet<String>>,
}

impl ActionMetrics {
    pub fn new() -> Self {
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let by_outcome = OUTCOMES.map(|outcome| outcomes.get_or_create(&OutcomeLabels { outcome }).clone());
        ActionMetrics {
            outcomes,
            by_outcome,
            queue_wait: seconds_histogram(),
            execution: seconds_histogram(),
            phases: Family::new_with_constructor(seconds_histogram),
            workers: Mutex::new(HashSet::new()),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_actions",
            "Finished Execute requests by outcome: cached, success (exit 0), failure (non-zero exit), error (no result).",
            self.outcomes.clone(),
        );
        registry.register_with_unit(
            "kiln_action_queue_wait",
            "Time an executed action waited from queued to a worker starting it.",
            Unit::Seconds,
            self.queue_wait.clone(),
        );
        registry.register_with_unit(
            "kiln_action_execution",
            "Time an executed action's command ran (execution start to completed).",
            Unit::Seconds,
            self.execution.clone(),
        );
        registry.register_with_unit(
            "kiln_worker_phase",
            "Time of a worker's phases of one action: fetch (inputs), execute (the command), upload (outputs).",
            Unit::Seconds,
            self.phases.clone(),
        );
    }

    /// The `worker` label for `name`, bounded.
    fn worker_label(&self, name: &str) -> String {
        let mut known = self.workers.lock();
        if known.contains(name) {
            return name.to_string();
        }
        if known.len() >= MAX_WORKER_LABELS || name.is_empty() {
            return "other".into();
        }
        known.insert(name.to_string());
        name.to_string()
    }
}

/// Seconds from `start` to `end` when both are set and in order
/// ([`kiln_proto::time::interval`]).
fn between(start: Option<&Timestamp>, end: Option<&Timestamp>) -> Option<f64> {
    kiln_proto::time::interval(start, end).map(|d| d.as_secs_f64())
}

impl ActionObserver for ActionMetrics {
    fn action_completed(&self, record: &ActionRecord) {
        self.by_outcome[outcome_index(record.outcome())].inc();
        if record.cached {
            return;
        }
        let Some(md) = &record.metadata else {
            return;
        };
        let md: &ExecutedActionMetadata = md;
        if let Some(s) = between(md.queued_timestamp.as_ref(), md.worker_start_timestamp.as_ref()) {
            self.queue_wait.observe(s);
        }
        let execute = between(
            md.execution_start_timestamp.as_ref(),
            md.execution_completed_timestamp.as_ref(),
        );
        if let Some(s) = execute {
            self.execution.observe(s);
        }
        let phases = [
            (
                "fetch",
                between(
                    md.input_fetch_start_timestamp.as_ref(),
                    md.input_fetch_completed_timestamp.as_ref(),
                ),
            ),
            ("execute", execute),
            (
                "upload",
                between(
                    md.output_upload_start_timestamp.as_ref(),
                    md.output_upload_completed_timestamp.as_ref(),
                ),
            ),
        ];
        if phases.iter().all(|(_, s)| s.is_none()) {
            return;
        }
        let worker = self.worker_label(&record.worker);
        for (phase, seconds) in phases {
            if let Some(s) = seconds {
                self.phases
                    .get_or_create(&PhaseLabels {
                        worker: worker.clone(),
                        phase,
                    })
                    .observe(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    #[test]
    fn intervals_need_both_ends_in_order() {
        assert_eq!(
            between(ts(10, 500_000_000).as_ref(), ts(12, 0).as_ref()),
            Some(1.5)
        );
        assert_eq!(between(ts(10, 0).as_ref(), None), None);
        assert_eq!(between(ts(12, 0).as_ref(), ts(10, 0).as_ref()), None);
        // An unset start is no start (not decades ago).
        assert_eq!(between(ts(0, 0).as_ref(), ts(12, 0).as_ref()), None);
    }

    #[test]
    fn worker_labels_are_bounded() {
        let m = ActionMetrics::new();
        for i in 0..MAX_WORKER_LABELS {
            assert_eq!(m.worker_label(&format!("w{i}")), format!("w{i}"));
        }
        assert_eq!(m.worker_label("one-too-many"), "other");
        assert_eq!(m.worker_label("w3"), "w3");
        assert_eq!(m.worker_label(""), "other");
    }
}
