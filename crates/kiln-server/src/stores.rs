//! Builds the tree of stores a config declares, each store once, shared by
//! every instance that names it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kiln_store::Store;
use kiln_store::compressed::CompressedStore;
use kiln_store::disk::{DiskConfig, DiskStore};
use kiln_store::existence_cache::ExistenceCache;
use kiln_store::memory::MemoryStore;
use kiln_store::tiered::TieredStore;

use crate::ServerError;
use crate::config::{Config, StoreConfig};

/// Every declared store, by name, plus the disk stores (for start-up waits).
pub struct BuiltStores {
    pub by_name: HashMap<String, Arc<dyn Store>>,
    pub disks: Vec<(String, Arc<DiskStore>)>,
}

pub async fn build_stores(config: &Config, data_dir: &Path) -> Result<BuiltStores, ServerError> {
    let mut built = BuiltStores {
        by_name: HashMap::new(),
        disks: Vec::new(),
    };
    // Validation rejected cycles and dangling names, so building in
    // dependency order terminates: repeat until every store is built.
    while built.by_name.len() < config.stores.len() {
        let before = built.by_name.len();
        for (name, spec) in &config.stores {
            if built.by_name.contains_key(name) {
                continue;
            }
            let children = crate::config::store_children(spec);
            if !children.iter().all(|c| built.by_name.contains_key(*c)) {
                continue;
            }
            let get = |n: &str| built.by_name[n].clone();
            let store: Arc<dyn Store> = match spec {
                StoreConfig::Memory(m) => Arc::new(MemoryStore::new(m.capacity.bytes())),
                StoreConfig::Disk(d) => {
                    let root = data_dir.join(&d.path);
                    let disk = DiskStore::open(DiskConfig {
                        root,
                        capacity_bytes: d.capacity.bytes(),
                        sync_writes: d.sync_writes,
                    })
                    .await
                    .map_err(|source| ServerError::Store {
                        name: name.clone(),
                        source,
                    })?;
                    built.disks.push((name.clone(), disk.clone()));
                    disk
                }
                StoreConfig::Tiered(t) => {
                    Arc::new(TieredStore::new(get(t.fast.get_ref()), get(t.slow.get_ref())))
                }
                StoreConfig::Compressed(c) => Arc::new(CompressedStore::new(get(c.inner.get_ref()), c.level)),
                StoreConfig::ExistenceCache(e) => Arc::new(ExistenceCache::new(
                    get(e.inner.get_ref()),
                    e.ttl.0,
                    e.max_entries,
                )),
            };
            built.by_name.insert(name.clone(), store);
        }
        if built.by_name.len() == before {
            // Unreachable after validation; report rather than loop forever.
            return Err(ServerError::Store {
                name: "(config)".into(),
                source: kiln_store::StoreError::Internal("store references cannot be resolved".into()),
            });
        }
    }
    Ok(built)
}
