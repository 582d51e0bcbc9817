//! Checks that need the whole file: references, cycles, duplicates, ranges.

use std::collections::{BTreeMap, HashSet};

use kiln_digest::DigestFunction;
use toml::Spanned;

use super::load::line_of;
use super::{Config, StoreConfig};

pub(super) fn validate(config: &Config, text: &str) -> Result<(), String> {
    let at = |s: &Spanned<String>| format!("line {}", line_of(text, s.span().start));
    let stores = &config.stores;
    let check_ref = |r: &Spanned<String>| -> Result<(), String> {
        if stores.contains_key(r.get_ref()) {
            Ok(())
        } else {
            Err(format!(
                "{}: no store named {:?}; declared stores: {}",
                at(r),
                r.get_ref(),
                names(stores)
            ))
        }
    };
    let mut disk_paths = HashSet::new();
    for (name, store) in stores {
        match store {
            StoreConfig::Memory(m) if m.capacity.bytes() == 0 => {
                return Err(format!("store {name:?}: memory capacity must be above 0"));
            }
            StoreConfig::Disk(d) => {
                if d.capacity.bytes() == 0 {
                    return Err(format!("store {name:?}: disk capacity must be above 0"));
                }
                if !disk_paths.insert(d.path.clone()) {
                    return Err(format!(
                        "store {name:?}: disk path {} is used by another disk store",
                        d.path.display()
                    ));
                }
            }
            StoreConfig::Tiered(t) => {
                check_ref(&t.fast)?;
                check_ref(&t.slow)?;
                if t.fast.get_ref() == t.slow.get_ref() {
                    return Err(format!(
                        "{}: store {name:?} tiers a store in front of itself",
                        at(&t.fast)
                    ));
                }
            }
            StoreConfig::Compressed(c) => {
                check_ref(&c.inner)?;
                if !(1..=19).contains(&c.level) {
                    return Err(format!("store {name:?}: zstd level {} is not in 1..=19", c.level));
                }
            }
            StoreConfig::ExistenceCache(e) => {
                check_ref(&e.inner)?;
                if e.max_entries == 0 {
                    return Err(format!("store {name:?}: max_entries must be above 0"));
                }
            }
            StoreConfig::Memory(_) => {}
        }
    }
    for name in stores.keys() {
        find_cycle(stores, name, &mut Vec::new())?;
    }
    if config.instances.is_empty() {
        return Err(
            "no [[instances]]: declare at least one, e.g. name = \"\", cas = \"cas\", ac = \"ac\"".into(),
        );
    }
    if !config.workers.is_empty() && config.scheduler.is_none() {
        return Err(
            "[[workers]] need a [scheduler] table: in-process workers take work from this server's scheduler"
                .into(),
        );
    }
    let mut dirs = HashSet::new();
    for (i, w) in config.workers.iter().enumerate() {
        w.validate().map_err(|e| format!("[[workers]] #{}: {e}", i + 1))?;
        for d in [&w.work_dir, &w.cache_dir] {
            if !dirs.insert(d.clone()) {
                return Err(format!(
                    "[[workers]] #{}: directory {} is used by another worker",
                    i + 1,
                    d.display()
                ));
            }
        }
    }
    if let Some(s) = &config.scheduler {
        s.validate().map_err(|e| format!("[scheduler]: {e}"))?;
    }
    let mut seen = HashSet::new();
    for inst in &config.instances {
        if !seen.insert(inst.name.as_str()) {
            return Err(format!("instance name {:?} is declared twice", inst.name));
        }
        if inst.name.split('/').any(|seg| RESERVED.contains(&seg)) {
            return Err(format!(
                "instance name {:?} contains a segment reserved by the ByteStream resource names ({})",
                inst.name,
                RESERVED.join(", ")
            ));
        }
        check_ref(&inst.cas)?;
        check_ref(&inst.ac)?;
        if let Some(fns) = &inst.digest_functions {
            if fns.is_empty() {
                return Err(format!("instance {:?}: digest_functions is empty", inst.name));
            }
            for f in fns {
                if DigestFunction::from_name(f.get_ref()).is_none() {
                    let all: Vec<_> = DigestFunction::ALL.iter().map(|f| f.name()).collect();
                    return Err(format!(
                        "{}: unknown digest function {:?}; supported: {}",
                        at(f),
                        f.get_ref(),
                        all.join(", ")
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Path segments that may not appear in an instance name (REAPI spec).
const RESERVED: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

fn names(stores: &BTreeMap<String, StoreConfig>) -> String {
    stores
        .keys()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Children a store refers to.
pub fn children(store: &StoreConfig) -> Vec<&str> {
    match store {
        StoreConfig::Memory(_) | StoreConfig::Disk(_) => vec![],
        StoreConfig::Tiered(t) => vec![t.fast.get_ref(), t.slow.get_ref()],
        StoreConfig::Compressed(c) => vec![c.inner.get_ref()],
        StoreConfig::ExistenceCache(e) => vec![e.inner.get_ref()],
    }
}

fn find_cycle<'a>(
    stores: &'a BTreeMap<String, StoreConfig>,
    name: &'a str,
    path: &mut Vec<&'a str>,
) -> Result<(), String> {
    if path.contains(&name) {
        path.push(name);
        return Err(format!(
            "stores refer to each other in a cycle: {}",
            path.join(" -> ")
        ));
    }
    let Some(store) = stores.get(name) else {
        return Ok(());
    };
    path.push(name);
    for child in children(store) {
        find_cycle(stores, child, path)?;
    }
    path.pop();
    Ok(())
}
