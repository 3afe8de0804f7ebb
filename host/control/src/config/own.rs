//! What a store added at run time (through the API, a webhook or the reconciler) set itself,
//! apart from what it takes from the host's `[defaults]`: the rest of its spec follows the
//! defaults, also when a config reload changes them or the host starts with new ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use storehost_store::quotas::Quotas;

use super::StoreSpec;

/// The settings a store chose itself. Kept in `host.db`: a field a later version adds is
/// ignored by this one rather than losing the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnSettings {
    /// Its plugin, if it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// The quotas it set, by name, in the form [`Quotas`] serializes them.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub quotas: Map<String, Value>,
    /// Its config keys, over the host-wide ones (`LLM_MAX_ITERATIONS`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl OwnSettings {
    /// What the store running under `spec` set itself: what it recorded, or for a store
    /// recorded before stores kept it apart, [`OwnSettings::apart_from`] `defaults`.
    pub fn of(spec: &StoreSpec, defaults: &StoreSpec) -> Self {
        spec.own
            .clone()
            .unwrap_or_else(|| Self::apart_from(spec, defaults))
    }

    /// What `spec` sets apart from `defaults`: for a store recorded before stores kept their
    /// own settings apart (each value equal to today's default is taken to follow it).
    pub fn apart_from(spec: &StoreSpec, defaults: &StoreSpec) -> Self {
        let (quotas, default_quotas) = (quota_fields(&spec.quotas), quota_fields(&defaults.quotas));
        Self {
            plugin: (spec.plugin != defaults.plugin).then(|| spec.plugin.clone()),
            quotas: quotas
                .into_iter()
                .filter(|(name, value)| default_quotas.get(name) != Some(value))
                .collect(),
            config: spec
                .config
                .iter()
                .filter(|(key, value)| defaults.config.get(*key) != Some(*value))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        }
    }

    /// Sets the quotas named in `names` to their values in `quotas`.
    pub fn set_quotas<'a>(&mut self, quotas: &Quotas, names: impl IntoIterator<Item = &'a String>) {
        let fields = quota_fields(quotas);
        for name in names {
            if let Some(value) = fields.get(name) {
                self.quotas.insert(name.clone(), value.clone());
            }
        }
    }

    /// Hands quota `name` back to the defaults; false when no quota has that name.
    pub fn reset_quota(&mut self, name: &str) -> bool {
        let known = quota_fields(&Quotas::default()).contains_key(name);
        if known {
            self.quotas.remove(name);
        }
        known
    }

    /// The whole spec: these settings over `defaults`.
    pub fn over(self, defaults: &StoreSpec) -> StoreSpec {
        let mut quotas = quota_fields(&defaults.quotas);
        for (name, value) in &self.quotas {
            // A quota this version does not know (written by a later one) is left out.
            if let Some(field) = quotas.get_mut(name) {
                *field = value.clone();
            }
        }
        let quotas = serde_json::from_value(Value::Object(quotas)).unwrap_or_else(|err| {
            // Only a registry entry written by another version could hold such a value.
            tracing::error!("a store's own quotas do not apply ({err}); it runs on the defaults");
            defaults.quotas.clone()
        });
        let mut config = defaults.config.clone();
        config.extend(self.config.clone());
        StoreSpec {
            plugin: self
                .plugin
                .clone()
                .unwrap_or_else(|| defaults.plugin.clone()),
            quotas,
            config,
            own: Some(self),
        }
    }
}

/// `quotas` as a JSON object, by field name.
fn quota_fields(quotas: &Quotas) -> Map<String, Value> {
    match serde_json::to_value(quotas) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> StoreSpec {
        StoreSpec {
            plugin: "agent".into(),
            quotas: Quotas::default(),
            config: BTreeMap::from([("LLM_MAX_ITERATIONS".into(), "20".into())]),
            own: None,
        }
    }

    #[test]
    fn own_settings_win_and_the_rest_follows_the_defaults() {
        let mut own = OwnSettings {
            plugin: Some("counter".into()),
            config: BTreeMap::from([("MODE".into(), "fast".into())]),
            ..OwnSettings::default()
        };
        let chosen = Quotas {
            memory: 32 << 20,
            ..Quotas::default()
        };
        own.set_quotas(&chosen, &["memory".to_owned()]);
        let spec = own.clone().over(&defaults());
        assert_eq!(spec.plugin, "counter");
        assert_eq!(spec.quotas.memory, 32 << 20);
        assert_eq!(spec.config.get("MODE").map(String::as_str), Some("fast"));

        // New defaults: what the store did not set moves with them.
        let mut next = defaults();
        next.quotas.memory = 128 << 20;
        next.quotas.disk = 2 << 30;
        next.config.insert("LLM_MAX_ITERATIONS".into(), "30".into());
        next.plugin = "other".into();
        let spec = own.over(&next);
        assert_eq!(spec.plugin, "counter");
        assert_eq!(spec.quotas.memory, 32 << 20);
        assert_eq!(spec.quotas.disk, 2 << 30);
        assert_eq!(
            spec.config.get("LLM_MAX_ITERATIONS").map(String::as_str),
            Some("30")
        );
    }

    #[test]
    fn a_spec_recorded_whole_keeps_what_differs_from_the_defaults() {
        let mut recorded = defaults();
        recorded.quotas.cpu_ms_per_call = 50;
        recorded.config.insert("MODE".into(), "slow".into());
        let own = OwnSettings::apart_from(&recorded, &defaults());
        assert_eq!(own.plugin, None);
        assert_eq!(own.quotas.keys().collect::<Vec<_>>(), ["cpu_ms_per_call"]);
        assert_eq!(own.config.keys().collect::<Vec<_>>(), ["MODE"]);
        let spec = own.over(&defaults());
        assert_eq!(spec.quotas, recorded.quotas);
        assert_eq!(spec.config, recorded.config);
    }

    #[test]
    fn what_a_later_version_recorded_is_left_out_and_the_rest_applies() {
        let own: OwnSettings = serde_json::from_str(
            r#"{"quotas": {"memory": 33554432, "gpu_ms": 5}, "config": {"A": "b"}, "tier": "gold"}"#,
        )
        .unwrap();
        let spec = own.over(&defaults());
        assert_eq!(spec.quotas.memory, 32 << 20);
        assert_eq!(spec.quotas.disk, Quotas::default().disk);
        assert_eq!(spec.config.get("A").map(String::as_str), Some("b"));
    }
}
