//! Partial quota overrides: what `[defaults.quotas]` and `[stores.<id>.quotas]` may set, merged
//! over [`Quotas::default`] and then over each other.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use storehost_store::quotas::Quotas;

use super::size;

pub use storehost_store::quotas::{MIN_SIZE_QUOTA, QuotaProblem};

/// The word that sets `fuel_per_call` back to unmetered over a metered default.
pub const UNMETERED: &str = "unmetered";

/// Some or all fields of [`Quotas`]; an absent field keeps the value it overrides.
///
/// Sizes (`memory`, `disk`, `files`, `db_cache`, `event_log`, `ingress_bytes_per_second`) accept an integer of bytes or a string like `"64MiB"`;
/// `fuel_per_call` accepts an integer or `"unmetered"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasOverride {
    /// Maximum guest linear memory, in bytes.
    #[serde(deserialize_with = "size::deserialize_option")]
    pub memory: Option<u64>,
    /// Fuel per invocation: `Some(None)` = unmetered, `Some(Some(n))` = `n` units.
    #[serde(deserialize_with = "deserialize_fuel")]
    pub fuel_per_call: Option<Option<u64>>,
    /// CPU time per invocation, in milliseconds.
    pub cpu_ms_per_call: Option<u64>,
    /// Wall time per invocation, in milliseconds.
    pub wall_ms_per_call: Option<u64>,
    /// CPU time budget per minute, in milliseconds.
    pub cpu_ms_per_minute: Option<u64>,
    /// Maximum database size, in bytes.
    #[serde(deserialize_with = "size::deserialize_option")]
    pub disk: Option<u64>,
    /// Most the store's files directory may hold, in bytes.
    #[serde(deserialize_with = "size::deserialize_option")]
    pub files: Option<u64>,
    /// Page cache of the store's database while it is awake, in bytes.
    #[serde(deserialize_with = "size::deserialize_option")]
    pub db_cache: Option<u64>,
    /// Most the store's event log may hold on disk, in bytes.
    #[serde(deserialize_with = "size::deserialize_option")]
    pub event_log: Option<u64>,
    /// Sustained ingress rate, in events per second.
    pub events_per_second: Option<u32>,
    /// Ingress burst above the sustained rate, in events.
    pub burst: Option<u32>,
    /// Sustained ingress rate, in bytes of events per second.
    #[serde(deserialize_with = "size::deserialize_option")]
    pub ingress_bytes_per_second: Option<u64>,
    /// Maximum events accepted but not yet processed.
    pub max_pending_events: Option<u64>,
    /// LLM calls per minute.
    pub llm_calls_per_minute: Option<u32>,
}

impl QuotasOverride {
    /// Returns `base` with every field set here replaced.
    pub fn apply_to(&self, base: &Quotas) -> Quotas {
        Quotas {
            memory: self.memory.unwrap_or(base.memory),
            fuel_per_call: self.fuel_per_call.unwrap_or(base.fuel_per_call),
            cpu_ms_per_call: self.cpu_ms_per_call.unwrap_or(base.cpu_ms_per_call),
            wall_ms_per_call: self.wall_ms_per_call.unwrap_or(base.wall_ms_per_call),
            cpu_ms_per_minute: self.cpu_ms_per_minute.unwrap_or(base.cpu_ms_per_minute),
            disk: self.disk.unwrap_or(base.disk),
            files: self.files.unwrap_or(base.files),
            db_cache: self.db_cache.unwrap_or(base.db_cache),
            event_log: self.event_log.unwrap_or(base.event_log),
            events_per_second: self.events_per_second.unwrap_or(base.events_per_second),
            burst: self.burst.unwrap_or(base.burst),
            ingress_bytes_per_second: self
                .ingress_bytes_per_second
                .unwrap_or(base.ingress_bytes_per_second),
            max_pending_events: self.max_pending_events.unwrap_or(base.max_pending_events),
            llm_calls_per_minute: self
                .llm_calls_per_minute
                .unwrap_or(base.llm_calls_per_minute),
        }
    }

    /// Reads overrides given as JSON fields (the `quotas` of `PUT /v1/stores/{id}`) as a config
    /// file's are read: each field alone, so that every refusal names its quota and says what
    /// it accepts, in the config file's words. The overrides of the fields accepted, and one
    /// message per field refused (an unknown one included).
    pub fn from_json_fields(
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> (Self, Vec<String>) {
        let mut accepted = serde_json::Map::new();
        let mut refused = Vec::new();
        for (name, value) in fields {
            let alone = serde_json::Map::from_iter([(name.clone(), value.clone())]);
            match serde_json::from_value::<Self>(alone.into()) {
                Ok(_) => {
                    accepted.insert(name.clone(), value.clone());
                }
                Err(err) => refused.push(format!(
                    "quotas.{name}: {}",
                    super::load::humanize(&err.to_string())
                )),
            }
        }
        // Each field was read alone, so all of them together read as well.
        let overrides = serde_json::from_value(accepted.into()).unwrap_or_default();
        (overrides, refused)
    }

    /// Every value set here that no store could run under (see [`Quotas::problems`]; a value
    /// left unset keeps a default, which is fine).
    pub fn problems(&self) -> Vec<QuotaProblem> {
        self.apply_to(&Quotas::default()).problems()
    }
}

/// Serde visitor for `fuel_per_call`: an integer or the word `"unmetered"`.
struct FuelVisitor;

impl Visitor<'_> for FuelVisitor {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a whole number of fuel units, or \"{UNMETERED}\" (null in JSON)"
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    /// JSON's `null`, which is how the API shows an unmetered store's `fuel_per_call`.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v == UNMETERED {
            Ok(None)
        } else {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        }
    }
}

/// Deserializes `fuel_per_call`; `Some` whenever the key is present.
fn deserialize_fuel<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<u64>>, D::Error> {
    deserializer.deserialize_any(FuelVisitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::struct_fields;

    #[test]
    fn overrides_name_exactly_the_fields_of_quotas() {
        assert_eq!(
            struct_fields::<QuotasOverride>(),
            struct_fields::<Quotas>(),
            "QuotasOverride must follow storehost_store::quotas::Quotas field for field"
        );
    }

    #[test]
    fn an_override_replaces_only_what_it_sets() {
        let base = Quotas {
            fuel_per_call: Some(5),
            ..Quotas::default()
        };
        let merged = QuotasOverride {
            memory: Some(128 << 20),
            fuel_per_call: Some(None),
            burst: Some(7),
            ..QuotasOverride::default()
        }
        .apply_to(&base);
        assert_eq!(merged.memory, 128 << 20);
        assert_eq!(merged.fuel_per_call, None);
        assert_eq!(merged.burst, 7);
        assert_eq!(merged.disk, base.disk);
        assert_eq!(merged.cpu_ms_per_call, base.cpu_ms_per_call);
    }

    #[test]
    fn reads_sizes_and_unmetered_fuel_from_json_too() {
        let parsed: QuotasOverride = serde_json::from_str(
            r#"{"memory":"32MiB","disk":1048576,"db_cache":"512KiB","fuel_per_call":"unmetered"}"#,
        )
        .unwrap();
        assert_eq!(parsed.memory, Some(32 << 20));
        assert_eq!(parsed.db_cache, Some(512 << 10));
        assert_eq!(parsed.disk, Some(1 << 20));
        assert_eq!(parsed.fuel_per_call, Some(None));
        let parsed: QuotasOverride = serde_json::from_str(r#"{"fuel_per_call":null}"#).unwrap();
        assert_eq!(
            parsed.fuel_per_call,
            Some(None),
            "null is unmetered, as the API shows it"
        );
    }

    #[test]
    fn zero_limits_and_tiny_sizes_are_problems() {
        let problems = QuotasOverride {
            memory: Some(1024),
            db_cache: Some(4096),
            burst: Some(0),
            ..QuotasOverride::default()
        }
        .problems();
        let keys: Vec<_> = problems.iter().map(|p| p.key).collect();
        assert_eq!(keys, ["memory", "db_cache", "burst"]);
    }
}
