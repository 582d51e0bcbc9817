//! The in-memory index of the disk store: which keys are on disk, in which
//! encoding and with what payload length, in least-recently-used order, and
//! the byte accounting that keeps the store within its capacity.
//!
//! Pure bookkeeping: nothing here does I/O. The store holds an [`Index`]
//! under one mutex, decides under it, and does unlink/rename outside it.
//!
//! # Per-key states
//!
//! A key's node is `Idle` (its file is on disk, counted, and linked in the
//! LRU list) or *busy*: `Replacing` (a commit owns the key and is renaming a
//! new payload in) or `Deleting` (an eviction owns it and is unlinking its
//! file). Busy nodes are not in the LRU list, so eviction never picks a key
//! that another operation is changing on disk, and only the owner of a busy
//! node changes or removes it. That is what keeps the accounting equal to
//! the files on disk under concurrent put/evict/replace of the same key.
//!
//! # Accounting
//!
//! `used` = payload lengths of all present nodes (idle or busy) + space
//! reserved by commits that have not finished. Space is reserved before a
//! file is renamed in and released only after a file has been unlinked, so
//! the bytes under `blobs/` never exceed `used`, and `used` never exceeds the
//! capacity. With no operation in flight, `used` equals the bytes on disk.

use std::collections::HashSet;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use kiln_digest::BlobKey;

use crate::Encoding;

const NIL: u32 = u32::MAX;

/// What a node's owner is doing with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeState {
    /// On disk, counted, in the LRU list.
    Idle,
    /// A commit owns the key (the node may or may not have a payload yet).
    Replacing,
    /// An eviction is unlinking the file.
    Deleting,
    /// Slab slot not in use.
    Free,
}

pub(crate) struct Node {
    key: BlobKey,
    len: u64,
    /// Changes with every commit; tells a stale lookup from a fresh one.
    generation: u64,
    /// Unix seconds of last use (LRU age).
    last_use: u32,
    /// Unix seconds of the file's mtime as far as we know.
    mtime: u32,
    prev: u32,
    next: u32,
    encoding: Encoding,
    /// Whether a payload of this key is on disk (false for a new key whose
    /// first commit is in progress).
    present: bool,
    state: NodeState,
}

/// What a lookup saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    pub encoding: Encoding,
    pub generation: u64,
    /// Whether the file's mtime should be bumped (it is older than the
    /// refresh interval); the caller does it off the request path.
    pub bump_mtime: bool,
    pub state: NodeState,
}

/// A payload chosen for eviction; the node is `Deleting` until
/// [`Index::finish_delete`].
#[derive(Debug, Clone)]
pub(crate) struct Victim {
    pub slot: u32,
    pub key: BlobKey,
    pub encoding: Encoding,
    pub len: u64,
}

/// Outcome of [`Index::try_reserve`].
#[derive(Debug)]
pub(crate) enum Reserve {
    /// The bytes are now counted.
    Done,
    /// Unlink these files, call [`Index::finish_delete`], and try again.
    Evict(Vec<Victim>),
    /// All space that could be freed is held by in-flight operations: wait
    /// for one of them to finish and try again.
    Wait,
}

/// Outcome of [`Index::claim`].
#[derive(Debug)]
pub(crate) enum Claim {
    /// The caller owns `slot` (state `Replacing`); `old` is the payload
    /// currently on disk, if any.
    Owned { slot: u32, old: Option<(Encoding, u64)> },
    /// Another operation owns the key: wait and try again.
    Busy,
}

/// A file the startup scan found.
#[derive(Debug, Clone)]
pub(crate) struct Scanned {
    pub key: BlobKey,
    pub encoding: Encoding,
    pub len: u64,
    pub mtime: u32,
}

pub(crate) struct Index {
    /// Randomly seeded: keys come from clients.
    hasher: DefaultHashBuilder,
    table: HashTable<u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Least recently used idle node.
    head: u32,
    /// Most recently used idle node.
    tail: u32,
    used: u64,
    /// Part of `used` whose files are being unlinked.
    deleting: u64,
    items: u64,
    evictions: u64,
    next_generation: u64,
    /// Keys used while the startup scan runs, moved to the MRU end once it
    /// has inserted everything (`None` after the scan).
    scan_touched: Option<HashSet<BlobKey>>,
}

/// Counters reported by `stats()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counters {
    pub used: u64,
    pub items: u64,
    pub evictions: u64,
    pub oldest_use: Option<u32>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            hasher: DefaultHashBuilder::default(),
            table: HashTable::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            used: 0,
            deleting: 0,
            items: 0,
            evictions: 0,
            next_generation: 1,
            scan_touched: Some(HashSet::new()),
        }
    }
}

impl Index {
    fn find(&self, key: &BlobKey) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&i| self.nodes[i as usize].key == *key)
            .copied()
    }

    fn node(&self, slot: u32) -> &Node {
        &self.nodes[slot as usize]
    }

    fn node_mut(&mut self, slot: u32) -> &mut Node {
        &mut self.nodes[slot as usize]
    }

    fn bump_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let n = self.node(slot);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
        let n = self.node_mut(slot);
        n.prev = NIL;
        n.next = NIL;
    }

    fn push_mru(&mut self, slot: u32) {
        let tail = self.tail;
        {
            let n = self.node_mut(slot);
            n.prev = tail;
            n.next = NIL;
        }
        if tail == NIL {
            self.head = slot;
        } else {
            self.node_mut(tail).next = slot;
        }
        self.tail = slot;
    }

    fn alloc(&mut self, node: Node) -> u32 {
        let hash = self.hasher.hash_one(&node.key);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let nodes = &self.nodes;
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash, slot, |&i| hasher.hash_one(&nodes[i as usize].key));
        slot
    }

    fn remove(&mut self, slot: u32) {
        let hash = self.hasher.hash_one(&self.node(slot).key);
        if let Ok(entry) = self.table.find_entry(hash, |&i| i == slot) {
            entry.remove();
        }
        let n = self.node_mut(slot);
        n.state = NodeState::Free;
        n.present = false;
        n.prev = NIL;
        n.next = NIL;
        self.free.push(slot);
    }

    /// Whether the startup scan has been merged in.
    pub(crate) fn is_indexed(&self) -> bool {
        self.scan_touched.is_none()
    }

    /// Looks `key` up and, when its payload is on disk, counts a use
    /// (moves it to the MRU end). `None`: no payload in the index (during
    /// the startup scan the file may still be on disk).
    pub(crate) fn lookup(&mut self, key: &BlobKey, now: u32, refresh_secs: u32) -> Option<Found> {
        let slot = self.find(key)?;
        let n = self.node(slot);
        if !n.present {
            // A first commit in progress: not visible yet.
            return None;
        }
        let state = n.state;
        let mut bump_mtime = false;
        if state == NodeState::Idle {
            self.unlink(slot);
            self.push_mru(slot);
            let n = self.node_mut(slot);
            n.last_use = now;
            if now.saturating_sub(n.mtime) > refresh_secs {
                n.mtime = now;
                bump_mtime = true;
            }
        }
        if let Some(touched) = self.scan_touched.as_mut() {
            touched.insert(key.clone());
        }
        let n = self.node(slot);
        Some(Found {
            encoding: n.encoding,
            generation: n.generation,
            bump_mtime,
            state,
        })
    }

    /// Records a use of a key found on disk but not yet indexed (only while
    /// the startup scan runs).
    pub(crate) fn note_unindexed_use(&mut self, key: &BlobKey) {
        if let Some(touched) = self.scan_touched.as_mut() {
            touched.insert(key.clone());
        }
    }

    /// Makes room for `additional` more entries (before a large merge).
    pub(crate) fn reserve_entries(&mut self, additional: usize) {
        self.nodes.reserve(additional);
        let nodes = &self.nodes;
        let hasher = &self.hasher;
        self.table
            .reserve(additional, |&i| hasher.hash_one(&nodes[i as usize].key));
    }

    /// Merges files found by the startup scan, oldest first. Returns the
    /// (key, encoding) of files that lost to another file of the same key
    /// (a crash between renaming a new encoding in and unlinking the old
    /// one); the caller deletes them. Only called before writes are allowed.
    pub(crate) fn insert_scanned(
        &mut self,
        batch: impl IntoIterator<Item = Scanned>,
    ) -> Vec<(BlobKey, Encoding)> {
        let mut losers = Vec::new();
        for s in batch {
            if let Some(slot) = self.find(&s.key) {
                let n = self.node(slot);
                if n.state != NodeState::Idle || !n.present || n.encoding == s.encoding {
                    // Same file seen twice, or a key that is busy: keep what we have.
                    continue;
                }
                if s.mtime < n.mtime {
                    losers.push((s.key, s.encoding));
                    continue;
                }
                losers.push((s.key, n.encoding));
                let old_len = n.len;
                let n = self.node_mut(slot);
                n.encoding = s.encoding;
                n.len = s.len;
                n.mtime = s.mtime;
                n.last_use = n.last_use.max(s.mtime);
                self.used = self.used - old_len + s.len;
                continue;
            }
            let generation = self.bump_generation();
            let slot = self.alloc(Node {
                key: s.key,
                len: s.len,
                generation,
                last_use: s.mtime,
                mtime: s.mtime,
                prev: NIL,
                next: NIL,
                encoding: s.encoding,
                present: true,
                state: NodeState::Idle,
            });
            self.push_mru(slot);
            self.used += s.len;
            self.items += 1;
        }
        losers
    }

    /// Ends the startup scan: keys used meanwhile become the most recent.
    pub(crate) fn finish_scan(&mut self, now: u32) {
        let Some(touched) = self.scan_touched.take() else {
            return;
        };
        for key in touched {
            if let Some(slot) = self.find(&key)
                && self.node(slot).state == NodeState::Idle
            {
                self.unlink(slot);
                self.push_mru(slot);
                self.node_mut(slot).last_use = now;
            }
        }
    }

    /// Counts `len` more bytes if they fit within `capacity` (0 = unbounded),
    /// otherwise picks least-recently-used victims to make room.
    pub(crate) fn try_reserve(&mut self, len: u64, capacity: u64) -> Reserve {
        if capacity == 0 || self.used + len <= capacity {
            self.used += len;
            return Reserve::Done;
        }
        let over = self.used + len - capacity;
        if self.deleting >= over {
            return Reserve::Wait;
        }
        let mut want = over - self.deleting;
        let mut victims = Vec::new();
        while want > 0 && self.head != NIL {
            let slot = self.head;
            self.unlink(slot);
            let n = self.node_mut(slot);
            n.state = NodeState::Deleting;
            let v = Victim {
                slot,
                key: n.key.clone(),
                encoding: n.encoding,
                len: n.len,
            };
            want = want.saturating_sub(v.len);
            self.deleting += v.len;
            victims.push(v);
        }
        if victims.is_empty() {
            Reserve::Wait
        } else {
            Reserve::Evict(victims)
        }
    }

    /// Gives back bytes counted by [`Self::try_reserve`].
    pub(crate) fn release(&mut self, len: u64) {
        debug_assert!(self.used >= len);
        self.used = self.used.saturating_sub(len);
    }

    /// Ends an eviction: `unlinked` says whether the file is gone (or was
    /// already gone). If not, the entry goes back to the MRU end, so that a
    /// file that cannot be deleted is not retried at once.
    pub(crate) fn finish_delete(&mut self, victim: &Victim, unlinked: bool) {
        self.deleting = self.deleting.saturating_sub(victim.len);
        if unlinked {
            self.used = self.used.saturating_sub(victim.len);
            self.items = self.items.saturating_sub(1);
            self.evictions += 1;
            self.remove(victim.slot);
        } else {
            self.node_mut(victim.slot).state = NodeState::Idle;
            self.push_mru(victim.slot);
        }
    }

    /// Takes ownership of `key` for a commit. A new key gets a node without
    /// payload, invisible to readers.
    pub(crate) fn claim(&mut self, key: &BlobKey) -> Claim {
        match self.find(key) {
            Some(slot) => {
                let n = self.node(slot);
                if n.state != NodeState::Idle {
                    return Claim::Busy;
                }
                let old = n.present.then_some((n.encoding, n.len));
                self.unlink(slot);
                self.node_mut(slot).state = NodeState::Replacing;
                Claim::Owned { slot, old }
            }
            None => {
                let generation = self.bump_generation();
                let slot = self.alloc(Node {
                    key: key.clone(),
                    len: 0,
                    generation,
                    last_use: 0,
                    mtime: 0,
                    prev: NIL,
                    next: NIL,
                    encoding: Encoding::Identity,
                    present: false,
                    state: NodeState::Replacing,
                });
                Claim::Owned { slot, old: None }
            }
        }
    }

    /// Ends a successful commit: the new payload (`len` bytes, already
    /// reserved) replaced `old`, whose file is gone.
    pub(crate) fn finish_commit(
        &mut self,
        slot: u32,
        old: Option<(Encoding, u64)>,
        encoding: Encoding,
        len: u64,
        now: u32,
    ) {
        match old {
            Some((_, old_len)) => self.used = self.used.saturating_sub(old_len),
            None => self.items += 1,
        }
        let generation = self.bump_generation();
        let n = self.node_mut(slot);
        n.encoding = encoding;
        n.len = len;
        n.present = true;
        n.generation = generation;
        n.last_use = now;
        n.mtime = now;
        n.state = NodeState::Idle;
        self.push_mru(slot);
    }

    /// Ends a failed commit (the `len` reserved bytes are released).
    /// `old_on_disk` says whether the previous payload is still there.
    pub(crate) fn abort_commit(
        &mut self,
        slot: u32,
        old: Option<(Encoding, u64)>,
        old_on_disk: bool,
        len: u64,
    ) {
        self.release(len);
        match old {
            Some(_) if old_on_disk => {
                self.node_mut(slot).state = NodeState::Idle;
                self.push_mru(slot);
            }
            Some((_, old_len)) => {
                self.used = self.used.saturating_sub(old_len);
                self.items = self.items.saturating_sub(1);
                self.remove(slot);
            }
            None => self.remove(slot),
        }
    }

    /// Drops an idle entry whose file turned out to be missing (deleted
    /// behind the store's back), if it is still the one the caller saw.
    pub(crate) fn forget_missing(&mut self, key: &BlobKey, generation: u64) -> bool {
        let Some(slot) = self.find(key) else {
            return false;
        };
        let n = self.node(slot);
        if n.state != NodeState::Idle || !n.present || n.generation != generation {
            return false;
        }
        let len = n.len;
        self.unlink(slot);
        self.used = self.used.saturating_sub(len);
        self.items = self.items.saturating_sub(1);
        self.remove(slot);
        true
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            used: self.used,
            items: self.items,
            evictions: self.evictions,
            oldest_use: (self.head != NIL).then(|| self.node(self.head).last_use),
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_digest::DigestFunction;

    use super::*;

    fn key(i: u64) -> BlobKey {
        BlobKey::of(DigestFunction::Sha256, &i.to_le_bytes())
    }

    fn ready() -> Index {
        let mut index = Index::default();
        index.finish_scan(0);
        index
    }

    /// Commits `key` with `len` bytes (reservation included).
    fn commit(index: &mut Index, k: &BlobKey, len: u64, now: u32) {
        assert!(matches!(index.try_reserve(len, 0), Reserve::Done));
        let Claim::Owned { slot, old } = index.claim(k) else {
            panic!("busy")
        };
        index.finish_commit(slot, old, Encoding::Identity, len, now);
    }

    #[test]
    fn eviction_picks_least_recently_used_and_skips_busy_keys() {
        let mut index = ready();
        for i in 0..4 {
            commit(&mut index, &key(i), 10, i as u32);
        }
        // Use key 0: key 1 is now the oldest. Claim key 1: it is skipped.
        assert!(index.lookup(&key(0), 10, 3600).is_some());
        let Claim::Owned { slot, old } = index.claim(&key(1)) else {
            panic!("busy")
        };
        assert!(matches!(index.claim(&key(1)), Claim::Busy));
        let Reserve::Evict(victims) = index.try_reserve(15, 40) else {
            panic!("expected victims")
        };
        let names: Vec<BlobKey> = victims.iter().map(|v| v.key.clone()).collect();
        assert_eq!(names, vec![key(2), key(3)]);
        // While the victims are being deleted, a second reservation waits.
        assert!(matches!(index.try_reserve(15, 40), Reserve::Wait));
        assert_eq!(
            index.lookup(&key(2), 11, 3600).map(|f| f.state),
            Some(NodeState::Deleting)
        );
        for v in &victims {
            index.finish_delete(v, true);
        }
        assert!(matches!(index.try_reserve(15, 40), Reserve::Done));
        // The reservation was for key 1's new payload, which replaces 10 bytes.
        index.finish_commit(slot, old, Encoding::Zstd, 15, 12);
        assert_eq!(index.counters().used, 25);
        assert_eq!(index.counters().items, 2);
        assert_eq!(index.counters().evictions, 2);
    }

    #[test]
    fn failed_commits_restore_or_drop_the_old_payload() {
        let mut index = ready();
        commit(&mut index, &key(1), 10, 1);
        commit(&mut index, &key(2), 20, 1);
        // Old payload still on disk: back to idle.
        assert!(matches!(index.try_reserve(7, 0), Reserve::Done));
        let Claim::Owned { slot, old } = index.claim(&key(1)) else {
            panic!("busy")
        };
        index.abort_commit(slot, old, true, 7);
        assert_eq!(index.counters().used, 30);
        assert!(index.lookup(&key(1), 2, 3600).is_some());
        // Old payload removed before the failure: the key is gone.
        assert!(matches!(index.try_reserve(7, 0), Reserve::Done));
        let Claim::Owned { slot, old } = index.claim(&key(2)) else {
            panic!("busy")
        };
        index.abort_commit(slot, old, false, 7);
        assert_eq!((index.counters().used, index.counters().items), (10, 1));
        assert!(index.lookup(&key(2), 2, 3600).is_none());
        // A new key's failed first commit leaves nothing.
        let Claim::Owned { slot, old } = index.claim(&key(3)) else {
            panic!("busy")
        };
        assert!(index.lookup(&key(3), 2, 3600).is_none());
        index.abort_commit(slot, old, true, 0);
        assert!(matches!(index.claim(&key(3)), Claim::Owned { old: None, .. }));
    }

    #[test]
    fn scan_merge_keeps_newest_encoding_and_orders_by_mtime() {
        let mut index = Index::default();
        let scanned = |i: u64, encoding, len, mtime| Scanned {
            key: key(i),
            encoding,
            len,
            mtime,
        };
        let losers = index.insert_scanned(vec![
            scanned(1, Encoding::Identity, 100, 5),
            scanned(2, Encoding::Identity, 10, 6),
            scanned(1, Encoding::Zstd, 40, 7),
            scanned(3, Encoding::Zstd, 1, 8),
        ]);
        assert_eq!(losers, vec![(key(1), Encoding::Identity)]);
        assert!(!index.is_indexed());
        // Used during the scan: becomes the most recent at the end.
        assert!(index.lookup(&key(2), 9, 3600).is_some());
        index.finish_scan(10);
        assert_eq!(index.counters().used, 51);
        assert_eq!(index.counters().items, 3);
        let Reserve::Evict(v) = index.try_reserve(1, 51) else {
            panic!("expected a victim")
        };
        assert_eq!(v[0].key, key(1));
        assert_eq!(v[0].encoding, Encoding::Zstd);
    }

    #[test]
    fn lookups_ask_for_an_mtime_refresh_once_per_interval() {
        let mut index = ready();
        commit(&mut index, &key(1), 1, 100);
        assert!(!index.lookup(&key(1), 200, 3600).unwrap().bump_mtime);
        assert!(index.lookup(&key(1), 4000, 3600).unwrap().bump_mtime);
        assert!(!index.lookup(&key(1), 4001, 3600).unwrap().bump_mtime);
        assert_eq!(index.counters().oldest_use, Some(4001));
    }

    #[test]
    fn forgetting_a_missing_file_needs_the_same_generation() {
        let mut index = ready();
        commit(&mut index, &key(1), 5, 1);
        let seen = index.lookup(&key(1), 2, 3600).unwrap().generation;
        commit(&mut index, &key(1), 6, 3);
        assert!(!index.forget_missing(&key(1), seen));
        let now = index.lookup(&key(1), 4, 3600).unwrap().generation;
        assert!(index.forget_missing(&key(1), now));
        assert_eq!(index.counters().used, 0);
    }
}
