//! The ready queue: actions waiting for a worker.
//!
//! * **Keyed by platform.** One [`ClassQueue`] per distinct [`Requirements`];
//!   a worker with a free slot looks only at the classes it can run now, so
//!   the cost of a match grows with the number of distinct platforms and
//!   concurrent invocations, never with the number of queued actions (in
//!   particular not with actions no worker can run).
//! * **Priority with aging.** REAPI priority: lower runs sooner, 0 is the
//!   default. Waiting one `aging_interval` improves an action's effective
//!   priority by one level, down to `min(priority, 0)`: a low-priority action
//!   eventually competes as a default one, while aging never lets an old
//!   default-priority action overtake a high-priority one. Each invocation
//!   keeps one FIFO per priority value; its candidate is the FIFO head with
//!   the best effective priority (then the oldest).
//! * **Fair share.** Among the invocations (RequestMetadata.tool_invocation_id)
//!   whose heads share the best effective priority, the one with the fewest
//!   actions running wins, then the one served least recently, then the
//!   oldest head: a huge build and a small one alternate instead of the
//!   small one waiting behind the whole backlog.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use crate::platform::Requirements;

pub type JobId = u64;

/// One queued action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEntry {
    pub job: JobId,
    pub priority: i32,
    /// Milliseconds since the Unix epoch when the action was first queued
    /// (kept across re-queues, so a retried action keeps its age).
    pub enqueued_ms: i64,
}

/// Where an entry sits, for removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePos {
    pub class: Arc<Requirements>,
    pub invocation: Arc<str>,
    /// (priority, enqueued_ms, sequence).
    key: (i32, i64, u64),
}

/// One invocation's entries: a FIFO per priority value.
type PerPriority = BTreeMap<i32, BTreeMap<(i64, u64), QueueEntry>>;

#[derive(Default)]
struct ClassQueue {
    by_invocation: HashMap<Arc<str>, PerPriority>,
    len: usize,
    unsatisfiable_since: Option<SystemTime>,
}

#[derive(Default, Debug, Clone, Copy)]
struct InvocationStats {
    running: usize,
    queued: usize,
    last_served: u64,
}

pub struct ReadyQueue {
    aging_ms: i64,
    classes: HashMap<Arc<Requirements>, ClassQueue>,
    invocations: HashMap<Arc<str>, InvocationStats>,
    seq: u64,
    serve_seq: u64,
    len: usize,
}

impl ReadyQueue {
    pub fn new(aging_interval: std::time::Duration) -> Self {
        ReadyQueue {
            aging_ms: i64::try_from(aging_interval.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
            classes: HashMap::new(),
            invocations: HashMap::new(),
            seq: 0,
            serve_seq: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues an entry; returns its position for [`Self::remove`].
    pub fn push(&mut self, class: Arc<Requirements>, invocation: Arc<str>, entry: QueueEntry) -> QueuePos {
        self.seq += 1;
        let key = (entry.priority, entry.enqueued_ms, self.seq);
        let cq = self.classes.entry(class.clone()).or_default();
        cq.by_invocation
            .entry(invocation.clone())
            .or_default()
            .entry(key.0)
            .or_default()
            .insert((key.1, key.2), entry);
        cq.len += 1;
        self.len += 1;
        self.invocations.entry(invocation.clone()).or_default().queued += 1;
        QueuePos {
            class,
            invocation,
            key,
        }
    }

    /// Removes a queued entry (cancelled or failed); false if not queued.
    pub fn remove(&mut self, pos: &QueuePos) -> bool {
        let Some(cq) = self.classes.get_mut(&pos.class) else {
            return false;
        };
        let Some(q) = cq.by_invocation.get_mut(&pos.invocation) else {
            return false;
        };
        let Some(fifo) = q.get_mut(&pos.key.0) else {
            return false;
        };
        if fifo.remove(&(pos.key.1, pos.key.2)).is_none() {
            return false;
        }
        if fifo.is_empty() {
            q.remove(&pos.key.0);
        }
        if q.is_empty() {
            cq.by_invocation.remove(&pos.invocation);
        }
        cq.len -= 1;
        self.len -= 1;
        if cq.len == 0 {
            self.classes.remove(&pos.class);
        }
        self.dec_queued(&pos.invocation);
        true
    }

    fn dec_queued(&mut self, invocation: &Arc<str>) {
        if let Some(s) = self.invocations.get_mut(invocation) {
            s.queued = s.queued.saturating_sub(1);
            if s.queued == 0 && s.running == 0 {
                self.invocations.remove(invocation);
            }
        }
    }

    fn effective_level(&self, e: &QueueEntry, now_ms: i64) -> i64 {
        let levels = now_ms.saturating_sub(e.enqueued_ms).max(0) / self.aging_ms;
        let p = i64::from(e.priority);
        (p - levels).max(p.min(0))
    }

    /// Takes the best entry among the classes for which `fits` holds and
    /// counts it as running for its invocation (until [`Self::release`]).
    pub fn pick(
        &mut self,
        now_ms: i64,
        mut fits: impl FnMut(&Requirements) -> bool,
    ) -> Option<(QueueEntry, Arc<Requirements>, Arc<str>)> {
        // (effective level, running, last served, enqueued, sequence).
        type Score = (i64, usize, u64, i64, u64);
        let mut best: Option<(Score, i32, Arc<Requirements>, Arc<str>)> = None;
        for (class, cq) in &self.classes {
            if cq.len == 0 || !fits(class) {
                continue;
            }
            for (inv, q) in &cq.by_invocation {
                let stats = self.invocations.get(inv).copied().unwrap_or_default();
                for (priority, fifo) in q {
                    let Some((&(enq, seq), head)) = fifo.first_key_value() else {
                        continue;
                    };
                    let score = (
                        self.effective_level(head, now_ms),
                        stats.running,
                        stats.last_served,
                        enq,
                        seq,
                    );
                    if best.as_ref().is_none_or(|(s, ..)| score < *s) {
                        best = Some((score, *priority, class.clone(), inv.clone()));
                    }
                }
            }
        }
        let (score, priority, class, inv) = best?;
        let pos = QueuePos {
            class: class.clone(),
            invocation: inv.clone(),
            key: (priority, score.3, score.4),
        };
        let entry = self
            .classes
            .get(&class)
            .and_then(|cq| cq.by_invocation.get(&inv))
            .and_then(|q| q.get(&priority))
            .and_then(|fifo| fifo.get(&(score.3, score.4)))
            .copied()?;
        self.remove(&pos);
        self.serve_seq += 1;
        let s = self.invocations.entry(inv.clone()).or_default();
        s.running += 1;
        s.last_served = self.serve_seq;
        Some((entry, class, inv))
    }

    /// An action picked for `invocation` is no longer running.
    pub fn release(&mut self, invocation: &Arc<str>) {
        if let Some(s) = self.invocations.get_mut(invocation) {
            s.running = s.running.saturating_sub(1);
            if s.queued == 0 && s.running == 0 {
                self.invocations.remove(invocation);
            }
        }
    }

    /// Queued entries per requirement class (display form), sorted.
    pub fn class_lens(&self) -> Vec<(String, usize)> {
        let mut lens: Vec<(String, usize)> = self
            .classes
            .iter()
            .filter(|(_, q)| q.len > 0)
            .map(|(c, q)| (c.to_string(), q.len))
            .collect();
        lens.sort();
        lens
    }

    /// The requirement classes that have queued entries.
    pub fn classes(&self) -> Vec<Arc<Requirements>> {
        self.classes.keys().cloned().collect()
    }

    /// When `class` was first seen with no registered worker able to run
    /// it; updated by the caller through [`Self::set_unsatisfiable_since`].
    pub fn unsatisfiable_since(&self, class: &Requirements) -> Option<SystemTime> {
        self.classes.get(class).and_then(|c| c.unsatisfiable_since)
    }

    pub fn set_unsatisfiable_since(&mut self, class: &Requirements, since: Option<SystemTime>) {
        if let Some(c) = self.classes.get_mut(class) {
            c.unsatisfiable_since = since;
        }
    }

    /// Removes and returns every entry of `class`.
    pub fn drain_class(&mut self, class: &Requirements) -> Vec<QueueEntry> {
        let Some(cq) = self.classes.remove(class) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(cq.len);
        for (inv, q) in cq.by_invocation {
            for e in q.into_values().flat_map(|fifo| fifo.into_values()) {
                out.push(e);
                self.len -= 1;
                self.dec_queued(&inv);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(job: JobId, priority: i32, enqueued_ms: i64) -> QueueEntry {
        QueueEntry {
            job,
            priority,
            enqueued_ms,
        }
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = ReadyQueue::new(Duration::from_secs(3600));
        let c = Arc::new(Requirements::default());
        let inv: Arc<str> = Arc::from("i");
        q.push(c.clone(), inv.clone(), entry(1, 5, 0));
        q.push(c.clone(), inv.clone(), entry(2, 0, 1));
        q.push(c.clone(), inv.clone(), entry(3, -3, 2));
        q.push(c.clone(), inv.clone(), entry(4, 0, 3));
        let order: Vec<_> = std::iter::from_fn(|| q.pick(10, |_| true).map(|(e, _, _)| e.job)).collect();
        assert_eq!(order, vec![3, 2, 4, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn aging_lifts_low_priority_to_default_only() {
        let mut q = ReadyQueue::new(Duration::from_millis(10));
        let c = Arc::new(Requirements::default());
        let inv: Arc<str> = Arc::from("i");
        q.push(c.clone(), inv.clone(), entry(1, 3, 0));
        q.push(c.clone(), inv.clone(), entry(2, 0, 35));
        q.push(c.clone(), inv.clone(), entry(3, -1, 40));
        // At t=40 job 1 has aged 4 levels: effective 0, not below, so job 3
        // (-1) still goes first; then job 1 competes as a priority-0 action
        // and is older than job 2.
        let order: Vec<_> = std::iter::from_fn(|| q.pick(40, |_| true).map(|(e, _, _)| e.job)).collect();
        assert_eq!(order, vec![3, 1, 2]);
    }

    #[test]
    fn fair_share_alternates() {
        let mut q = ReadyQueue::new(Duration::from_secs(3600));
        let c = Arc::new(Requirements::default());
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        for i in 0..4 {
            q.push(c.clone(), a.clone(), entry(i, 0, i as i64));
        }
        q.push(c.clone(), b.clone(), entry(10, 0, 100));
        q.push(c.clone(), b.clone(), entry(11, 0, 101));
        let mut order = Vec::new();
        while let Some((e, _, inv)) = q.pick(1000, |_| true) {
            order.push(e.job);
            q.release(&inv);
        }
        assert_eq!(order, vec![0, 10, 1, 11, 2, 3]);
    }

    #[test]
    fn classes_filtered_and_removed() {
        let mut q = ReadyQueue::new(Duration::from_secs(1));
        let linux = Arc::new(Requirements {
            exact: vec![("os".into(), "linux".into())],
            minimum: vec![],
        });
        let win = Arc::new(Requirements {
            exact: vec![("os".into(), "windows".into())],
            minimum: vec![],
        });
        let inv: Arc<str> = Arc::from("");
        let p = q.push(win.clone(), inv.clone(), entry(1, 0, 0));
        q.push(linux.clone(), inv.clone(), entry(2, 0, 1));
        assert_eq!(q.pick(5, |r| *r == *linux).map(|(e, _, _)| e.job), Some(2));
        assert!(q.pick(5, |r| *r == *linux).is_none());
        assert!(q.remove(&p));
        assert!(!q.remove(&p));
        assert!(q.is_empty());
        q.push(win.clone(), inv, entry(3, 0, 0));
        assert_eq!(q.drain_class(&win).len(), 1);
        assert!(q.is_empty());
    }
}
