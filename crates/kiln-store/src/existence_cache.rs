//! Remembers keys recently confirmed present, so that repeated
//! `has_many` calls (FindMissingBlobs) skip the inner store for them.
//!
//! A key is recorded when the inner store confirms it: a positive
//! `has_many`, a `get`/`read` that found it, a successful `put` or writer
//! commit. `has_many` answers "present" from the cache for keys confirmed
//! within `ttl` and asks the inner store about the rest. Absence is never
//! cached, and a `get`/`read` that finds nothing forgets the key.
//!
//! The trade-off: a blob evicted from the inner store within `ttl` of its
//! last confirmation is still reported present until the entry expires, so
//! `ttl` should stay well below the inner store's eviction horizon.
//!
//! The cache is sharded maps (`IndexMap` behind `parking_lot::Mutex`) holding
//! at most `max_entries` keys; when a shard is full, expired entries found
//! by sampling are dropped, else a random entry is.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use hashbrown::DefaultHashBuilder;
use indexmap::IndexMap;
use kiln_digest::BlobKey;
use parking_lot::Mutex;
use rand::Rng;

use crate::{Blob, BlobRead, BlobWriter, Encoding, Store, StoreResult, StoreStats};

const SHARDS: usize = 16;
/// Random entries probed for expiry before evicting one at random.
const EXPIRY_PROBES: usize = 4;

type Shard = Mutex<IndexMap<BlobKey, Instant, DefaultHashBuilder>>;

struct Cache {
    shards: Box<[Shard]>,
    hasher: DefaultHashBuilder,
    ttl: Duration,
    per_shard: usize,
}

impl Cache {
    fn shard(&self, key: &BlobKey) -> &Shard {
        let h = self.hasher.hash_one(key);
        &self.shards[(h >> 32) as usize % SHARDS]
    }

    fn fresh(&self, key: &BlobKey, now: Instant) -> bool {
        let mut map = self.shard(key).lock();
        match map.get(key) {
            Some(&seen) if now.saturating_duration_since(seen) < self.ttl => true,
            Some(_) => {
                map.swap_remove(key);
                false
            }
            None => false,
        }
    }

    fn record(&self, key: &BlobKey, now: Instant) {
        if self.per_shard == 0 {
            return;
        }
        let mut map = self.shard(key).lock();
        if let Some(seen) = map.get_mut(key) {
            *seen = now;
            return;
        }
        if map.len() >= self.per_shard {
            let mut rng = rand::rng();
            let mut freed = false;
            for _ in 0..EXPIRY_PROBES {
                let i = rng.random_range(0..map.len());
                let expired = map
                    .get_index(i)
                    .is_some_and(|(_, &seen)| now.saturating_duration_since(seen) >= self.ttl);
                if expired {
                    map.swap_remove_index(i);
                    freed = true;
                    break;
                }
            }
            if !freed {
                let i = rng.random_range(0..map.len());
                map.swap_remove_index(i);
            }
        }
        map.insert(key.clone(), now);
    }

    fn forget(&self, key: &BlobKey) {
        self.shard(key).lock().swap_remove(key);
    }
}

/// Caches positive existence answers of an inner store.
pub struct ExistenceCache {
    inner: Arc<dyn Store>,
    cache: Arc<Cache>,
}

impl ExistenceCache {
    /// Remembers up to `max_entries` keys for `ttl` after each confirmation.
    pub fn new(inner: Arc<dyn Store>, ttl: Duration, max_entries: usize) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(IndexMap::default())).collect();
        ExistenceCache {
            inner,
            cache: Arc::new(Cache {
                shards,
                hasher: DefaultHashBuilder::default(),
                ttl,
                per_shard: max_entries.div_ceil(SHARDS),
            }),
        }
    }
}

#[async_trait]
impl Store for ExistenceCache {
    fn describe(&self) -> String {
        format!(
            "existence-cache(ttl {:?}, {} entries, {})",
            self.cache.ttl,
            self.cache.per_shard * SHARDS,
            self.inner.describe()
        )
    }

    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        let now = Instant::now();
        let mut found: Vec<bool> = keys.iter().map(|k| self.cache.fresh(k, now)).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| !found[i]).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let ask: Vec<BlobKey> = missing.iter().map(|&i| keys[i].clone()).collect();
        let answers = self.inner.has_many(&ask).await?;
        if answers.len() != ask.len() {
            return Err(crate::StoreError::Internal(format!(
                "inner store has_many answered {} of {} keys",
                answers.len(),
                ask.len()
            )));
        }
        let now = Instant::now();
        for (i, present) in missing.into_iter().zip(answers) {
            if present {
                self.cache.record(&keys[i], now);
            }
            found[i] = present;
        }
        Ok(found)
    }

    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>> {
        let blob = self.inner.get(key).await?;
        match blob {
            Some(_) => self.cache.record(key, Instant::now()),
            None => self.cache.forget(key),
        }
        Ok(blob)
    }

    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        let read = self.inner.read(key, offset).await?;
        match read {
            Some(_) => self.cache.record(key, Instant::now()),
            None => self.cache.forget(key),
        }
        Ok(read)
    }

    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()> {
        self.inner.put(key, blob).await?;
        self.cache.record(key, Instant::now());
        Ok(())
    }

    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        let inner = self.inner.begin_write(key, encoding).await?;
        Ok(Box::new(RecordingWriter {
            key: key.clone(),
            cache: self.cache.clone(),
            inner,
        }))
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

/// Records the key once the inner writer committed.
struct RecordingWriter {
    key: BlobKey,
    cache: Arc<Cache>,
    inner: Box<dyn BlobWriter>,
}

#[async_trait]
impl BlobWriter for RecordingWriter {
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        self.inner.write(chunk).await
    }

    async fn commit(self: Box<Self>) -> StoreResult<()> {
        let RecordingWriter { key, cache, inner } = *self;
        inner.commit().await?;
        cache.record(&key, Instant::now());
        Ok(())
    }
}
