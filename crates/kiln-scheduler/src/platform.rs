//! Platform matching: what an action requires ([`Requirements`]) and what a
//! worker offers ([`WorkerCaps`]), under the configured per-property rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use kiln_proto::reapi::{Action, Command, Platform};

use crate::config::{PropertyRule, SchedulerConfig};
use crate::error::{SchedulerError, SchedulerResult};

/// The effective platform of an action: Action.platform, or Command.platform
/// when the Action has none (Buck2 sends only the latter).
#[allow(deprecated)] // Command.platform is deprecated in favour of Action.platform
pub fn effective_platform(action: &Action, command: &Command) -> Platform {
    match &action.platform {
        Some(p) if !p.properties.is_empty() => p.clone(),
        _ => command.platform.clone().unwrap_or_default(),
    }
}

/// What an action needs, canonical (sorted, deduplicated) so that equal
/// requirements compare and hash equal: it keys the ready queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirements {
    /// (name, value) pairs matched exactly.
    pub exact: Vec<(String, String)>,
    /// (name, amount) capacities, reserved while the action runs.
    pub minimum: Vec<(String, u64)>,
}

impl Requirements {
    pub fn from_platform(platform: &Platform, config: &SchedulerConfig) -> SchedulerResult<Self> {
        let mut exact = BTreeSet::new();
        let mut minimum: BTreeMap<String, u64> = BTreeMap::new();
        for p in &platform.properties {
            match config.rule(&p.name) {
                PropertyRule::Exact => {
                    exact.insert((p.name.clone(), p.value.clone()));
                }
                PropertyRule::Minimum => {
                    let amount = p.value.trim().parse::<u64>().map_err(|_| {
                        SchedulerError::InvalidArgument(format!(
                            "platform property {}={:?} must be a non-negative integer",
                            p.name, p.value
                        ))
                    })?;
                    let slot = minimum.entry(p.name.clone()).or_default();
                    *slot = (*slot).max(amount);
                }
                PropertyRule::Ignore => {}
            }
        }
        Ok(Requirements {
            exact: exact.into_iter().collect(),
            minimum: minimum.into_iter().filter(|(_, v)| *v > 0).collect(),
        })
    }
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.exact.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.extend(self.minimum.iter().map(|(k, v)| format!("{k}>={v}")));
        if parts.is_empty() {
            f.write_str("(no platform properties)")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What a worker offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerCaps {
    /// Values listed per property name (exact-matched names).
    pub values: HashMap<String, BTreeSet<String>>,
    /// Total capacity per minimum-matched name.
    pub capacity: HashMap<String, u64>,
}

impl WorkerCaps {
    /// Reads a worker's advertised properties. A minimum-matched property
    /// whose value is not an integer is ignored (and logged).
    pub fn from_properties(
        properties: &[kiln_proto::reapi::platform::Property],
        config: &SchedulerConfig,
        worker: &str,
    ) -> Self {
        let mut caps = WorkerCaps::default();
        for p in properties {
            match config.rule(&p.name) {
                PropertyRule::Minimum => match p.value.trim().parse::<u64>() {
                    Ok(v) => {
                        let slot = caps.capacity.entry(p.name.clone()).or_default();
                        *slot = (*slot).max(v);
                    }
                    Err(_) => tracing::warn!(
                        worker,
                        property = %p.name,
                        value = %p.value,
                        "capacity property is not an integer; ignored"
                    ),
                },
                // Ignored names are still recorded: a rule change does not
                // need the worker to re-register to be meaningful.
                PropertyRule::Exact | PropertyRule::Ignore => {
                    caps.values
                        .entry(p.name.clone())
                        .or_default()
                        .insert(p.value.clone());
                }
            }
        }
        caps
    }

    fn has_exact(&self, name: &str, value: &str) -> bool {
        self.values.get(name).is_some_and(|v| v.contains(value))
    }

    fn capacity_of(&self, name: &str) -> u64 {
        self.capacity.get(name).copied().unwrap_or(0)
    }

    /// Whether this worker could ever run an action with `req` (when idle).
    pub fn can_ever(&self, req: &Requirements) -> bool {
        req.exact.iter().all(|(k, v)| self.has_exact(k, v))
            && req.minimum.iter().all(|(k, v)| self.capacity_of(k) >= *v)
    }

    /// Whether `req` fits now, given what is reserved on the worker.
    pub fn fits_now(&self, req: &Requirements, reserved: &HashMap<String, u64>) -> bool {
        req.exact.iter().all(|(k, v)| self.has_exact(k, v))
            && req.minimum.iter().all(|(k, v)| {
                let used = reserved.get(k).copied().unwrap_or(0);
                self.capacity_of(k).saturating_sub(used) >= *v
            })
    }
}

/// Why no worker among `workers` can ever run `req`, naming the property;
/// `None` if one can.
pub fn unsatisfiable_reason<'a>(
    req: &Requirements,
    workers: impl Iterator<Item = &'a WorkerCaps> + Clone,
) -> Option<String> {
    if workers.clone().any(|w| w.can_ever(req)) {
        return None;
    }
    for (k, v) in &req.exact {
        if !workers.clone().any(|w| w.has_exact(k, v)) {
            let mut offered: BTreeSet<&str> = BTreeSet::new();
            for w in workers.clone() {
                if let Some(vals) = w.values.get(k) {
                    offered.extend(vals.iter().map(String::as_str));
                }
            }
            let offered = if offered.is_empty() {
                "no worker has that property".to_string()
            } else {
                format!(
                    "workers offer {k}={}",
                    offered.into_iter().collect::<Vec<_>>().join("|")
                )
            };
            return Some(format!(
                "no registered worker satisfies platform property {k}={v} ({offered})"
            ));
        }
    }
    for (k, v) in &req.minimum {
        if !workers.clone().any(|w| w.capacity_of(k) >= *v) {
            let best = workers.clone().map(|w| w.capacity_of(k)).max().unwrap_or(0);
            return Some(format!(
                "no registered worker satisfies platform property {k}={v} (largest {k} capacity is {best})"
            ));
        }
    }
    Some(format!(
        "no single registered worker satisfies all platform properties {req}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::platform::Property;

    fn prop(k: &str, v: &str) -> Property {
        Property {
            name: k.into(),
            value: v.into(),
        }
    }

    fn config() -> SchedulerConfig {
        let mut c = SchedulerConfig::default();
        c.property_rules.insert("cores".into(), PropertyRule::Minimum);
        c.property_rules.insert("pool".into(), PropertyRule::Ignore);
        c
    }

    #[test]
    fn rules_apply() {
        let c = config();
        let platform = Platform {
            properties: vec![prop("OSFamily", "linux"), prop("cores", "2"), prop("pool", "x")],
        };
        let req = Requirements::from_platform(&platform, &c).unwrap();
        assert_eq!(req.exact, vec![("OSFamily".to_string(), "linux".to_string())]);
        assert_eq!(req.minimum, vec![("cores".to_string(), 2)]);
        let w = WorkerCaps::from_properties(&[prop("OSFamily", "linux"), prop("cores", "4")], &c, "w");
        assert!(w.can_ever(&req));
        let mut reserved = HashMap::new();
        assert!(w.fits_now(&req, &reserved));
        reserved.insert("cores".to_string(), 3);
        assert!(!w.fits_now(&req, &reserved));
        let bad = Platform {
            properties: vec![prop("cores", "many")],
        };
        assert!(Requirements::from_platform(&bad, &c).is_err());
    }

    #[test]
    fn reason_names_property() {
        let c = config();
        let w = WorkerCaps::from_properties(&[prop("OSFamily", "linux"), prop("cores", "4")], &c, "w");
        let req = Requirements::from_platform(
            &Platform {
                properties: vec![prop("OSFamily", "windows")],
            },
            &c,
        )
        .unwrap();
        let r = unsatisfiable_reason(&req, [&w].into_iter()).unwrap();
        assert!(r.contains("OSFamily=windows") && r.contains("linux"), "{r}");
        let req = Requirements::from_platform(
            &Platform {
                properties: vec![prop("cores", "8")],
            },
            &c,
        )
        .unwrap();
        let r = unsatisfiable_reason(&req, [&w].into_iter()).unwrap();
        assert!(r.contains("cores=8") && r.contains("4"), "{r}");
    }

    #[test]
    #[allow(deprecated)]
    fn command_platform_fallback() {
        let cmd = Command {
            platform: Some(Platform {
                properties: vec![prop("a", "b")],
            }),
            ..Default::default()
        };
        assert_eq!(effective_platform(&Action::default(), &cmd).properties.len(), 1);
    }
}
