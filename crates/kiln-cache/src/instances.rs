//! Instance names and the stores and limits behind each.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use kiln_proto::reapi::ExecutionCapabilities;

use kiln_digest::DigestFunction;
use kiln_store::Store;

use crate::{CacheError, CacheResult};

/// Server-wide limits advertised in Capabilities and enforced by the services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLimits {
    /// Largest total of blob bytes in one BatchUpdateBlobs / BatchReadBlobs.
    pub max_batch_total_size_bytes: u64,
    /// Largest blob accepted for upload; 0 = no limit.
    pub max_cas_blob_size_bytes: u64,
    /// Largest stdout/stderr/output file the Action Cache inlines.
    pub max_inline_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_batch_total_size_bytes: 4 << 20,
            max_cas_blob_size_bytes: 0,
            max_inline_bytes: 1 << 20,
        }
    }
}

/// One instance name's stores and policy.
pub struct Instance {
    pub name: String,
    pub cas: Arc<dyn Store>,
    pub ac: Arc<dyn Store>,
    /// UpdateActionResult answers PERMISSION_DENIED when set.
    pub ac_read_only: bool,
    /// GetActionResult answers NOT_FOUND when a referenced blob is missing.
    pub ac_completeness_check: bool,
    /// Digest functions accepted on this instance (SHA-256 first).
    pub digest_functions: Vec<DigestFunction>,
    /// The activity counters of the [`Instances`] holding this instance
    /// (its own until [`Instances::new`] shares one set among all).
    counters: Arc<crate::CacheCounters>,
}

impl Instance {
    /// An instance with every supported digest function and completeness
    /// checking on.
    pub fn new(name: impl Into<String>, cas: Arc<dyn Store>, ac: Arc<dyn Store>) -> Self {
        Instance {
            name: name.into(),
            cas,
            ac,
            ac_read_only: false,
            ac_completeness_check: true,
            digest_functions: DigestFunction::ALL.to_vec(),
            counters: Arc::default(),
        }
    }

    /// The cache activity counters this instance's requests count into
    /// (shared by every instance of one [`Instances`]).
    pub fn counters(&self) -> &crate::CacheCounters {
        &self.counters
    }

    /// Resolves a request's digest function (explicit value or legacy
    /// inference from `hash_hex`'s length) and checks this instance accepts it.
    pub fn digest_function(&self, proto_value: i32, hash_hex: &str) -> CacheResult<DigestFunction> {
        let f = DigestFunction::resolve(proto_value, hash_hex)?;
        self.check_function(f)?;
        Ok(f)
    }

    pub fn check_function(&self, f: DigestFunction) -> CacheResult<()> {
        if self.digest_functions.contains(&f) {
            Ok(())
        } else {
            Err(CacheError::InvalidArgument(format!(
                "digest function {f} is not enabled on instance {:?}",
                self.name
            )))
        }
    }
}

/// Reports an instance's ExecutionCapabilities (set by the scheduler).
pub type ExecutionCapabilitiesFn = dyn Fn(&str) -> Option<ExecutionCapabilities> + Send + Sync;

/// All instances served, by name ("" is a valid name).
pub struct Instances {
    by_name: HashMap<String, Arc<Instance>>,
    limits: CacheLimits,
    execution: OnceLock<Box<ExecutionCapabilitiesFn>>,
    counters: Arc<crate::CacheCounters>,
}

impl Instances {
    pub fn new(instances: impl IntoIterator<Item = Instance>, limits: CacheLimits) -> Self {
        let counters: Arc<crate::CacheCounters> = Arc::default();
        Instances {
            by_name: instances
                .into_iter()
                .map(|mut i| {
                    i.counters = counters.clone();
                    (i.name.clone(), Arc::new(i))
                })
                .collect(),
            limits,
            execution: OnceLock::new(),
            counters,
        }
    }

    /// The cache activity counters every service of these instances counts into.
    pub fn counters(&self) -> &Arc<crate::CacheCounters> {
        &self.counters
    }

    /// Installs the source of ExecutionCapabilities (once, when a scheduler
    /// serves these instances); without it Capabilities reports no execution.
    pub fn set_execution_capabilities(&self, f: Box<ExecutionCapabilitiesFn>) {
        if self.execution.set(f).is_err() {
            tracing::warn!("execution capabilities were already set; keeping the first");
        }
    }

    /// The ExecutionCapabilities of instance `name`, if execution is served.
    pub fn execution_capabilities(&self, name: &str) -> Option<ExecutionCapabilities> {
        self.execution.get().and_then(|f| f(name))
    }

    /// The instance called `name`, or INVALID_ARGUMENT naming the known ones.
    pub fn get(&self, name: &str) -> CacheResult<&Arc<Instance>> {
        self.by_name.get(name).ok_or_else(|| {
            let mut known: Vec<_> = self.by_name.keys().map(|k| format!("{k:?}")).collect();
            known.sort();
            CacheError::InvalidArgument(format!(
                "unknown instance name {name:?}; this server has {}",
                known.join(", ")
            ))
        })
    }

    pub fn limits(&self) -> &CacheLimits {
        &self.limits
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.by_name.values()
    }
}
