//! Scheduler configuration. Every field has a documented default, so an
//! empty table is a valid configuration; durations are human-readable
//! strings (`"30s"`, `"1m 30s"`, `"250ms"`).

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a platform property of an action is matched against workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PropertyRule {
    /// The worker must list the property with exactly the requested value.
    Exact,
    /// Integer capacity: the worker's value must be at least the requested
    /// one; the requested amount is reserved on the worker while the action
    /// runs and released after.
    Minimum,
    /// Not used for matching (a hint such as a priority or a cache salt).
    /// `priority` is accepted as a synonym.
    #[serde(alias = "priority")]
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Rule per platform property name. Default: empty (every property is
    /// matched with `default_property_rule`).
    pub property_rules: BTreeMap<String, PropertyRule>,
    /// Rule for properties not listed in `property_rules`. Default `exact`.
    pub default_property_rule: PropertyRule,
    /// Timeout of an action whose Action.timeout is unset. Default 15 min.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub default_action_timeout: Duration,
    /// Upper bound of any action's timeout (effective timeout =
    /// min(Action.timeout, this)). Default 1 h.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub max_action_timeout: Duration,
    /// Extra time the scheduler grants past an action's timeout before it
    /// cancels the lease itself and reports DEADLINE_EXCEEDED (the worker
    /// normally enforces the timeout first). Default 30 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub lease_grace: Duration,
    /// How often workers send heartbeats. Default 5 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is declared lost and its actions are
    /// re-queued. Default 30 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub heartbeat_timeout: Duration,
    /// Times an action is assigned before the scheduler gives up after
    /// losing the workers running it (UNAVAILABLE). Default 3.
    pub max_attempts: u32,
    /// How long an action waits when no worker able to run it is registered
    /// (e.g. no worker at all yet) before failing with FAILED_PRECONDITION.
    /// When workers are registered and none could ever run the action, it
    /// fails at once. Default 30 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub no_worker_wait: Duration,
    /// An unfinished operation nobody watches (no Execute/WaitExecution
    /// stream, no GetOperation) for this long is cancelled. Default 60 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub unwatched_grace: Duration,
    /// Completed operations stay queryable this long. Default 5 min.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub completed_retention: Duration,
    /// At most this many completed operations are kept. Default 10000.
    pub max_completed_operations: usize,
    /// Waiting this long raises an action's priority by one level (lower
    /// value = sooner), until it reaches the default priority 0, so
    /// low-priority work still progresses. Default 30 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub aging_interval: Duration,
    /// Period of the reaper that enforces every deadline above. Default 100 ms.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub tick_interval: Duration,
    /// Longest WaitOperation. Default 60 s.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    #[schemars(with = "String")]
    pub max_wait_operation: Duration,
    /// Largest blob (Action, Command or Directory) the scheduler reads to
    /// validate an action. Default 16 MiB.
    pub max_metadata_blob_bytes: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            property_rules: BTreeMap::new(),
            default_property_rule: PropertyRule::Exact,
            default_action_timeout: Duration::from_secs(15 * 60),
            max_action_timeout: Duration::from_secs(3600),
            lease_grace: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(30),
            max_attempts: 3,
            no_worker_wait: Duration::from_secs(30),
            unwatched_grace: Duration::from_secs(60),
            completed_retention: Duration::from_secs(300),
            max_completed_operations: 10_000,
            aging_interval: Duration::from_secs(30),
            tick_interval: Duration::from_millis(100),
            max_wait_operation: Duration::from_secs(60),
            max_metadata_blob_bytes: 16 << 20,
        }
    }
}

impl SchedulerConfig {
    /// The rule for property `name`.
    pub fn rule(&self, name: &str) -> PropertyRule {
        self.property_rules
            .get(name)
            .copied()
            .unwrap_or(self.default_property_rule)
    }

    /// Effective timeout of an action whose Action.timeout is `requested`.
    pub fn effective_timeout(&self, requested: Option<Duration>) -> Duration {
        match requested {
            Some(d) if !d.is_zero() => d.min(self.max_action_timeout),
            _ => self.default_action_timeout.min(self.max_action_timeout),
        }
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return Err("heartbeat_timeout must be longer than a non-zero heartbeat_interval".into());
        }
        if self.tick_interval.is_zero() || self.aging_interval.is_zero() {
            return Err("tick_interval and aging_interval must be non-zero".into());
        }
        Ok(())
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_parse() {
        let c: SchedulerConfig = toml::from_str("").unwrap();
        assert_eq!(c, SchedulerConfig::default());
        assert!(c.validate().is_ok());
        let c: SchedulerConfig = toml::from_str(
            "heartbeat_timeout = \"2s\"\nproperty_rules = { cores = \"minimum\", pool = \"priority\" }",
        )
        .unwrap();
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(2));
        assert_eq!(c.rule("cores"), PropertyRule::Minimum);
        assert_eq!(c.rule("pool"), PropertyRule::Ignore);
        assert_eq!(c.rule("OSFamily"), PropertyRule::Exact);
        assert!(toml::from_str::<SchedulerConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<SchedulerConfig>("lease_grace = \"soon\"").is_err());
    }

    #[test]
    fn timeout_is_capped() {
        let c = SchedulerConfig::default();
        assert_eq!(c.effective_timeout(None), Duration::from_secs(900));
        assert_eq!(
            c.effective_timeout(Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            c.effective_timeout(Some(Duration::from_secs(99_999))),
            Duration::from_secs(3600)
        );
    }
}
