//! Environment overrides kept from the service storehost replaces (SPEC §5a).
//!
//! Variables are read through [`Env`] so tests feed values without touching the process
//! environment. A value that cannot be used is an error naming the variable, the value and
//! what is accepted — never silently used or ignored. An empty value counts as unset.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use storehost_llm::StubProvider;
use storehost_llm::openai::{CREDENTIALS_IN_BASE_URL, base_url_has_credentials};
use storehost_store::id::{STORE_ID_RULE, StoreId};

use super::error::{ConfigError, ConfigErrorKind as Kind, ConfigErrors};
use super::load::is_env_var_name;
use super::{HostConfig, LlmProviderKind};

/// Default of `WORKSPACE_RECONCILE_INTERVAL_MS`: 5 minutes.
pub const DEFAULT_WORKSPACE_RECONCILE_INTERVAL_MS: u64 = 5 * 60 * 1000;
/// Smallest `WORKSPACE_RECONCILE_INTERVAL_MS`: 30 seconds.
pub const MIN_RECONCILE_INTERVAL_MS: u64 = 30_000;
/// Default of `MANUAL_RECONCILE_MIN_INTERVAL_MS`: 60 seconds.
pub const DEFAULT_MANUAL_RECONCILE_MIN_INTERVAL_MS: u64 = 60_000;
/// Default of `LLM_MAX_ITERATIONS`.
pub const DEFAULT_LLM_MAX_ITERATIONS: u32 = 15;
/// Largest `LLM_MAX_ITERATIONS`.
const MAX_LLM_MAX_ITERATIONS: u32 = 100;

/// What is wrong with a store's plugin config, in the keys the host gives a meaning to
/// (`LLM_MAX_ITERATIONS`, checked as the environment variable is); empty when nothing is.
/// Other keys belong to the plugin and are passed on as they are.
pub fn store_config_problems(config: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(text) = config.get("LLM_MAX_ITERATIONS") {
        let in_range = text
            .trim()
            .parse::<u32>()
            .is_ok_and(|n| (1..=MAX_LLM_MAX_ITERATIONS).contains(&n));
        if !in_range {
            problems.push(format!(
                "config LLM_MAX_ITERATIONS = {text:?} is not a whole number from 1 to {MAX_LLM_MAX_ITERATIONS} (the most LLM calls one run of the agentic loop makes)"
            ));
        }
    }
    problems
}

/// Where environment variables are read from.
pub trait Env {
    /// The value of variable `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment. Values that are not UTF-8 are read lossily (and then usually
/// refused by validation rather than ignored).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
    }
}

/// A fixed set of variables, for tests and for callers that gathered them elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEnv(BTreeMap<String, String>);

impl MapEnv {
    /// An environment holding exactly `pairs`.
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for MapEnv {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Self::new(pairs)
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// A secret value; its `Debug` does not show it, so it cannot leak into logs by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; use it only to send it or to compare it (in constant time).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Settings that only the environment gives (for the webhook, the reconciler and the LLM),
/// plus the stores `STORE_IDS` names.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvOverrides {
    /// Valid ids from `STORE_IDS`, deduplicated, in the order given.
    pub store_ids: Vec<StoreId>,
    /// `WEBHOOK_SECRET`: the shared secret of `X-Webhook-Secret` and webhook signing.
    pub webhook_secret: Option<Secret>,
    /// `SERVER_BYPASS_TOKEN`: the token for `/admin/reconcile` and the registry.
    pub server_bypass_token: Option<Secret>,
    /// `AUTH_WORKER_INTERNAL_URL`: the registry's base URL (http or https, no trailing '/').
    pub auth_worker_internal_url: Option<String>,
    /// `WORKSPACE_RECONCILE_INTERVAL_MS`: time between reconciler passes.
    pub workspace_reconcile_interval_ms: u64,
    /// `MANUAL_RECONCILE_MIN_INTERVAL_MS`: shortest time between manual passes.
    pub manual_reconcile_min_interval_ms: u64,
    /// `LLM_MAX_ITERATIONS`: most LLM round trips in one agentic loop (1 to 100).
    pub llm_max_iterations: u32,
    /// `LLM_STUB_RESPONSES`: rules of the offline LLM provider, a JSON object.
    pub llm_stub_responses: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Default for EnvOverrides {
    fn default() -> Self {
        Self {
            store_ids: Vec::new(),
            webhook_secret: None,
            server_bypass_token: None,
            auth_worker_internal_url: None,
            workspace_reconcile_interval_ms: DEFAULT_WORKSPACE_RECONCILE_INTERVAL_MS,
            manual_reconcile_min_interval_ms: DEFAULT_MANUAL_RECONCILE_MIN_INTERVAL_MS,
            llm_max_iterations: DEFAULT_LLM_MAX_ITERATIONS,
            llm_stub_responses: None,
        }
    }
}

/// What [`apply_env`] did, for the caller to log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvReport {
    /// The variables that were set (non-empty) and applied, in the order checked.
    pub applied: Vec<&'static str>,
    /// Stores added from `STORE_IDS` (source `"env"`): listed there and not in the config.
    pub env_stores: Vec<StoreId>,
    /// Ids listed in `STORE_IDS` that the config also declares; the config's spec is kept.
    pub also_in_config: Vec<StoreId>,
    /// Things to log as warnings (duplicates, empty variables).
    pub warnings: Vec<String>,
    /// Things to log as errors that do not stop the host (invalid `STORE_IDS` entries).
    pub errors: Vec<String>,
}

/// Every variable [`apply_env`] reads.
pub const ENV_VARS: &[&str] = &[
    "PORT",
    "STORE_DATA_PATH",
    "MAX_INSTANCES_PER_SERVER",
    "STORE_IDS",
    "WEBHOOK_SECRET",
    "SERVER_BYPASS_TOKEN",
    "AUTH_WORKER_INTERNAL_URL",
    "WORKSPACE_RECONCILE_INTERVAL_MS",
    "MANUAL_RECONCILE_MIN_INTERVAL_MS",
    "LLM_MAX_ITERATIONS",
    "LLM_STUB_RESPONSES",
    "LLM_PROVIDER",
    "LLM_BASE_URL",
    "LLM_MODEL",
    "LLM_API_KEY_ENV",
];

/// Applies the environment overrides of SPEC §5a to `config`.
///
/// Checks every variable first and changes nothing when any is unusable; then the error list
/// holds one entry per bad variable.
pub fn apply_env(config: &mut HostConfig, env: &dyn Env) -> Result<EnvReport, ConfigErrors> {
    let mut reader = Reader {
        env,
        errors: Vec::new(),
        report: EnvReport::default(),
    };
    let mut next = config.clone();

    if let Some(port) = reader.number::<u16>("PORT", 0, u64::from(u16::MAX)) {
        if next.embedded {
            // No config file chose an address: every interface, as the service this
            // replaces listens (a container that sets only PORT stays reachable).
            next.listen = SocketAddr::from(([0, 0, 0, 0], port));
            reader.report.warnings.push(format!(
                "PORT is set and no config file gives `listen`: every interface ({}) unless --listen says otherwise, as the service this replaces listens; --listen or a config's `listen` chooses the address",
                next.listen
            ));
        } else {
            next.listen.set_port(port);
        }
    }
    if let Some(path) = reader.text("STORE_DATA_PATH") {
        next.data_dir = PathBuf::from(path);
    }
    if let Some(max) = reader.number::<usize>("MAX_INSTANCES_PER_SERVER", 1, u64::MAX) {
        next.max_stores = max;
    }
    if let Some(ids) = reader.store_ids() {
        next.env.store_ids = ids;
        if next.embedded {
            // The stores to run are named: the embedded default's demo stores are not among
            // them.
            next.stores
                .retain(|id, _| !super::DEMO_STORES.contains(&id.as_str()));
        }
    }
    if let Some(secret) = reader.text("WEBHOOK_SECRET") {
        next.env.webhook_secret = Some(Secret::new(secret));
    }
    if let Some(token) = reader.text("SERVER_BYPASS_TOKEN") {
        next.env.server_bypass_token = Some(Secret::new(token));
    }
    if let Some(url) = reader.http_url("AUTH_WORKER_INTERNAL_URL") {
        next.env.auth_worker_internal_url = Some(url);
    }
    if let Some(ms) = reader.number::<u64>(
        "WORKSPACE_RECONCILE_INTERVAL_MS",
        MIN_RECONCILE_INTERVAL_MS,
        u64::MAX,
    ) {
        next.env.workspace_reconcile_interval_ms = ms;
    }
    if let Some(ms) = reader.number::<u64>("MANUAL_RECONCILE_MIN_INTERVAL_MS", 0, u64::MAX) {
        next.env.manual_reconcile_min_interval_ms = ms;
    }
    if let Some(n) =
        reader.number::<u32>("LLM_MAX_ITERATIONS", 1, u64::from(MAX_LLM_MAX_ITERATIONS))
    {
        next.env.llm_max_iterations = n;
    }
    if let Some(rules) = reader.json_object("LLM_STUB_RESPONSES") {
        let rules = serde_json::Value::Object(rules);
        match StubProvider::from_value(&rules) {
            Ok(_) => next.env.llm_stub_responses = rules.as_object().cloned(),
            Err(err) => reader.refuse("LLM_STUB_RESPONSES", &rules.to_string(), &err.message),
        }
    }
    if let Some(provider) = reader.text("LLM_PROVIDER") {
        match provider.to_ascii_lowercase().as_str() {
            "stub" => next.llm.provider = LlmProviderKind::Stub,
            "openai" => next.llm.provider = LlmProviderKind::OpenAi,
            _ => reader.refuse(
                "LLM_PROVIDER",
                &provider,
                "expected \"stub\" (offline rules) or \"openai\" (an OpenAI-compatible server)",
            ),
        }
    }
    if reader
        .env
        .var("LLM_BASE_URL")
        .is_some_and(|url| base_url_has_credentials(&url))
    {
        // The value is not echoed: it holds a secret.
        reader.errors.push(ConfigError::env(
            "LLM_BASE_URL",
            Kind::InvalidEnv,
            format!("LLM_BASE_URL {CREDENTIALS_IN_BASE_URL}"),
        ));
    } else if let Some(url) = reader.http_url("LLM_BASE_URL") {
        next.llm.base_url = url;
    }
    if let Some(model) = reader.text("LLM_MODEL") {
        next.llm.model = model;
    }
    if let Some(name) = reader.text("LLM_API_KEY_ENV") {
        if is_env_var_name(&name) {
            next.llm.api_key_env = name;
        } else {
            // The value is not echoed: it may be a pasted key.
            reader
                .report
                .applied
                .retain(|applied| *applied != "LLM_API_KEY_ENV");
            reader.errors.push(ConfigError::env(
                "LLM_API_KEY_ENV",
                Kind::InvalidEnv,
                "LLM_API_KEY_ENV is not an environment variable name: give the name of the variable that holds the API key, not the key itself (like OPENAI_API_KEY)",
            ));
        }
    }
    if next.env.llm_stub_responses.is_some() && next.llm.provider != LlmProviderKind::Stub {
        reader.report.warnings.push(format!(
            "LLM_STUB_RESPONSES is set but the LLM provider is {:?}, so its rules are unused; set LLM_PROVIDER=stub to use them",
            next.llm.provider.as_str()
        ));
    }

    let total = next.store_ids().len();
    if total > next.max_stores {
        let variable = if reader.report.applied.contains(&"MAX_INSTANCES_PER_SERVER") {
            "MAX_INSTANCES_PER_SERVER"
        } else {
            "STORE_IDS"
        };
        reader.errors.push(ConfigError::env(
            variable,
            Kind::TooManyStores,
            format!(
                "the config and STORE_IDS name {total} stores but at most {} may run (max_stores / MAX_INSTANCES_PER_SERVER); raise the limit or list fewer stores",
                next.max_stores
            ),
        ));
    }
    if let Some(errors) = ConfigErrors::from_vec(reader.errors) {
        return Err(errors);
    }
    let mut report = reader.report;
    for id in &next.env.store_ids {
        if config.stores.contains_key(id) {
            report.also_in_config.push(id.clone());
        } else {
            report.env_stores.push(id.clone());
        }
    }
    *config = next;
    Ok(report)
}

/// Reads and checks variables, collecting errors and the report.
struct Reader<'e> {
    env: &'e dyn Env,
    errors: Vec<ConfigError>,
    report: EnvReport,
}

impl Reader<'_> {
    /// The trimmed value of `name`; `None` when unset or empty (an empty one is warned about).
    fn text(&mut self, name: &'static str) -> Option<String> {
        let value = self.env.var(name)?;
        let trimmed = value.trim();
        if trimmed.is_empty() {
            self.report
                .warnings
                .push(format!("{name} is set but empty; it is treated as unset"));
            return None;
        }
        self.report.applied.push(name);
        Some(trimmed.to_owned())
    }

    /// Records that `name` holds an unusable `value`.
    fn refuse(&mut self, name: &'static str, value: &str, accepted: &str) {
        self.report.applied.retain(|applied| *applied != name);
        self.errors.push(ConfigError::env(
            name,
            Kind::InvalidEnv,
            format!("{name}={} cannot be used: {accepted}", shown(value)),
        ));
    }

    /// A whole number in `min..=max` (and in `T`'s range).
    fn number<T: TryFrom<u64>>(&mut self, name: &'static str, min: u64, max: u64) -> Option<T> {
        let value = self.text(name)?;
        let accepted = if max == u64::MAX {
            format!("expected a whole number of at least {min}")
        } else {
            format!("expected a whole number from {min} to {max}")
        };
        let parsed = value
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| value.parse::<u64>().ok())
            .flatten()
            .filter(|n| (min..=max).contains(n))
            .and_then(|n| T::try_from(n).ok());
        if parsed.is_none() {
            self.refuse(name, &value, &accepted);
        }
        parsed
    }

    /// An `http://` or `https://` URL with a host; trailing '/' removed.
    fn http_url(&mut self, name: &'static str) -> Option<String> {
        let value = self.text(name)?;
        let rest = value
            .strip_prefix("http://")
            .or_else(|| value.strip_prefix("https://"));
        let host = rest.and_then(|rest| rest.split(['/', '?', '#']).next());
        let valid =
            host.is_some_and(|host| !host.is_empty()) && !value.chars().any(char::is_whitespace);
        if !valid {
            self.refuse(
                name,
                &value,
                "expected an http:// or https:// URL with a host, like \"http://auth-worker:8787\"",
            );
            return None;
        }
        Some(value.trim_end_matches('/').to_owned())
    }

    /// A JSON object.
    fn json_object(
        &mut self,
        name: &'static str,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        let value = self.text(name)?;
        match serde_json::from_str::<serde_json::Value>(&value) {
            Ok(serde_json::Value::Object(object)) => Some(object),
            Ok(_) => {
                self.refuse(
                    name,
                    &value,
                    "expected a JSON object like {\"rules\":[...],\"defaultResponse\":\"...\"}",
                );
                None
            }
            Err(err) => {
                let accepted = format!(
                    "it is not valid JSON ({err}); expected a JSON object like {{\"rules\":[...],\"defaultResponse\":\"...\"}}"
                );
                self.refuse(name, &value, &accepted);
                None
            }
        }
    }

    /// `STORE_IDS`: trimmed, empties dropped, duplicates warned, invalid ids reported and
    /// skipped; an error when ids were given and none is valid.
    fn store_ids(&mut self) -> Option<Vec<StoreId>> {
        const NAME: &str = "STORE_IDS";
        let value = self.text(NAME)?;
        let given: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .collect();
        if given.is_empty() {
            // Set, but naming no store: without --config the host then runs none (not even the
            // embedded default's demo stores). Allowed — an empty list is a list — but said.
            self.report.warnings.push(format!(
                "{NAME} is set but names no store ({}); the host starts with none of its own",
                shown(&value)
            ));
        }
        let mut seen = BTreeSet::new();
        let mut valid = Vec::new();
        let mut invalid = 0;
        for id in &given {
            if !seen.insert(*id) {
                continue;
            }
            match StoreId::new(id) {
                Ok(id) => valid.push(id),
                Err(err) => {
                    invalid += 1;
                    self.report
                        .errors
                        .push(format!("{NAME}: skipped {:?}: {STORE_ID_RULE}", err.given));
                }
            }
        }
        for id in &seen {
            let count = given.iter().filter(|given| *given == id).count();
            if count > 1 {
                self.report.warnings.push(format!(
                    "{NAME} lists {} {count} times; it is used once",
                    shown(id)
                ));
            }
        }
        if !given.is_empty() && valid.is_empty() {
            self.refuse(
                NAME,
                &value,
                &format!(
                    "none of its {invalid} ids is valid, so no store could start; {STORE_ID_RULE}"
                ),
            );
            return None;
        }
        Some(valid)
    }
}

/// `value` quoted for a message, cut to 80 characters.
fn shown(value: &str) -> String {
    let mut cut: String = value.chars().take(80).collect();
    if cut.len() < value.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        pairs.iter().copied().collect()
    }

    fn apply(pairs: &[(&str, &str)]) -> (HostConfig, Result<EnvReport, ConfigErrors>) {
        let mut config = HostConfig::default();
        let result = apply_env(&mut config, &env(pairs));
        (config, result)
    }

    /// The single error of applying `pairs`, after checking it names `variable`.
    fn refused(pairs: &[(&str, &str)], variable: &str) -> String {
        let (config, result) = apply(pairs);
        let errors = result.expect_err("expected the environment to be refused");
        assert_eq!(errors.len(), 1, "{errors}");
        assert_eq!(
            errors.errors()[0].location,
            super::super::Location::Env {
                variable: variable.to_owned()
            }
        );
        assert_eq!(
            config,
            HostConfig::default(),
            "a refused environment changes nothing"
        );
        errors.to_string()
    }

    fn ids(ids: &[StoreId]) -> Vec<&str> {
        ids.iter().map(StoreId::as_str).collect()
    }

    #[test]
    fn an_empty_environment_changes_nothing() {
        let (config, report) = apply(&[]);
        assert_eq!(config, HostConfig::default());
        assert_eq!(report.unwrap(), EnvReport::default());
    }

    #[test]
    fn port_replaces_the_port_and_keeps_the_address() {
        let mut config = HostConfig {
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..HostConfig::default()
        };
        let report = apply_env(&mut config, &env(&[("PORT", " 3000 ")])).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:3000");
        assert_eq!(report.applied, ["PORT"]);
    }

    /// Without a config file `PORT` listens on every interface, as the service this
    /// replaces does, and says so; `STORE_IDS` names the stores to run, so the embedded
    /// default's demo stores are left out (they took `MAX_INSTANCES_PER_SERVER` slots, and a
    /// host given two ids with a limit of two refused to start).
    #[test]
    fn without_a_config_file_port_listens_everywhere_and_store_ids_replace_the_demo_stores() {
        let mut config = HostConfig::embedded_default();
        let report = apply_env(
            &mut config,
            &env(&[
                ("PORT", "3000"),
                ("STORE_IDS", "ws-one,ws-two"),
                ("MAX_INSTANCES_PER_SERVER", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:3000");
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("every interface")),
            "{:?}",
            report.warnings
        );
        let running: Vec<StoreId> = config.store_ids().into_iter().collect();
        assert_eq!(ids(&running), ["ws-one", "ws-two"]);

        // Without STORE_IDS the demo stores stay.
        let mut config = HostConfig::embedded_default();
        apply_env(&mut config, &env(&[("PORT", "3000")])).unwrap();
        assert_eq!(config.store_ids().len(), super::super::DEMO_STORES.len());
        // A config file's stores stay beside STORE_IDS's, and its address with PORT.
        let (config, report) = apply(&[("PORT", "3000"), ("STORE_IDS", "ws-one")]);
        assert_eq!(config.listen.to_string(), "127.0.0.1:3000");
        assert!(report.unwrap().warnings.is_empty());
    }

    #[test]
    fn data_path_and_max_instances_override_the_config() {
        let (config, report) = apply(&[
            ("STORE_DATA_PATH", "/srv/stores"),
            ("MAX_INSTANCES_PER_SERVER", "7"),
        ]);
        report.unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/stores"));
        assert_eq!(config.max_stores, 7);
    }

    #[test]
    fn store_ids_are_trimmed_empties_dropped_duplicates_warned_invalid_skipped() {
        let (config, report) = apply(&[("STORE_IDS", " ws-one, ,ws-two,,ws-one ,a b,ws-one, x ")]);
        let report = report.unwrap();
        assert_eq!(ids(&config.env.store_ids), ["ws-one", "ws-two"]);
        assert_eq!(ids(&report.env_stores), ["ws-one", "ws-two"]);
        assert_eq!(
            report.warnings,
            ["STORE_IDS lists \"ws-one\" 3 times; it is used once"]
        );
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(report.errors[0].contains("\"a b\"") && report.errors[0].contains("3 to 64"));
        assert!(report.errors[1].contains("\"x\""));
        let specs = config.store_specs();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[&StoreId::new("ws-one").unwrap()].plugin, "agent");
        let ws_two = StoreId::new("ws-two").unwrap();
        assert!(config.is_env_store(&ws_two));
    }

    #[test]
    fn store_ids_that_are_all_invalid_refuse_to_start() {
        let message = refused(&[("STORE_IDS", "a, ../etc ,b c")], "STORE_IDS");
        assert!(message.contains("none of its 3 ids is valid"), "{message}");
        assert!(message.contains("3 to 64 characters"), "{message}");
    }

    #[test]
    fn store_ids_with_only_separators_add_nothing_and_are_not_an_error() {
        let (config, report) = apply(&[("STORE_IDS", " , ,")]);
        let report = report.unwrap();
        assert!(report.env_stores.is_empty());
        assert!(config.store_specs().is_empty());
        assert!(
            report.warnings.iter().any(|w| w.contains("names no store")),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn an_env_store_also_in_the_config_keeps_the_config_spec() {
        let mut config = super::super::parse_str(
            "[stores.acme]\n[stores.acme.quotas]\nburst = 5\n[defaults.quotas]\nburst = 9\n",
            "storehost.toml",
        )
        .unwrap();
        let report = apply_env(&mut config, &env(&[("STORE_IDS", "acme,beta")])).unwrap();
        assert_eq!(ids(&report.env_stores), ["beta"]);
        assert_eq!(ids(&report.also_in_config), ["acme"]);
        let specs = config.store_specs();
        assert_eq!(specs[&StoreId::new("acme").unwrap()].quotas.burst, 5);
        assert_eq!(specs[&StoreId::new("beta").unwrap()].quotas.burst, 9);
        let acme = StoreId::new("acme").unwrap();
        assert!(!config.is_env_store(&acme), "the config declares it");
    }

    #[test]
    fn more_stores_than_the_limit_is_refused() {
        let message = refused(
            &[
                ("STORE_IDS", "one1,two2,three"),
                ("MAX_INSTANCES_PER_SERVER", "2"),
            ],
            "MAX_INSTANCES_PER_SERVER",
        );
        assert!(message.contains("3 stores but at most 2"), "{message}");
    }

    #[test]
    fn each_numeric_variable_names_itself_its_value_and_its_range() {
        let cases = [
            ("PORT", "http", "from 0 to 65535"),
            ("PORT", "70000", "from 0 to 65535"),
            ("PORT", "-1", "from 0 to 65535"),
            ("MAX_INSTANCES_PER_SERVER", "0", "at least 1"),
            ("MAX_INSTANCES_PER_SERVER", "lots", "at least 1"),
            ("WORKSPACE_RECONCILE_INTERVAL_MS", "1000", "at least 30000"),
            ("WORKSPACE_RECONCILE_INTERVAL_MS", "5m", "at least 30000"),
            ("MANUAL_RECONCILE_MIN_INTERVAL_MS", "1.5", "at least 0"),
            ("MANUAL_RECONCILE_MIN_INTERVAL_MS", "+60000", "at least 0"),
            ("LLM_MAX_ITERATIONS", "0", "from 1 to 100"),
            ("LLM_MAX_ITERATIONS", "101", "from 1 to 100"),
            ("LLM_MAX_ITERATIONS", "ten", "from 1 to 100"),
        ];
        for (variable, value, range) in cases {
            let message = refused(&[(variable, value)], variable);
            assert!(
                message.contains(&format!("{variable}={value:?}")) && message.contains(range),
                "{message}"
            );
        }
    }

    #[test]
    fn the_registry_url_must_be_http_or_https() {
        for bad in [
            "auth-worker:8787",
            "ftp://x",
            "http://",
            "https:// spaced.example",
        ] {
            let message = refused(
                &[("AUTH_WORKER_INTERNAL_URL", bad)],
                "AUTH_WORKER_INTERNAL_URL",
            );
            assert!(message.contains("http:// or https://"), "{message}");
        }
        let (config, report) = apply(&[("AUTH_WORKER_INTERNAL_URL", "https://auth.internal/")]);
        report.unwrap();
        assert_eq!(
            config.env.auth_worker_internal_url.as_deref(),
            Some("https://auth.internal")
        );
    }

    #[test]
    fn stub_responses_must_be_a_json_object() {
        let message = refused(
            &[("LLM_STUB_RESPONSES", "{rules: []}")],
            "LLM_STUB_RESPONSES",
        );
        assert!(message.contains("not valid JSON"), "{message}");
        let message = refused(&[("LLM_STUB_RESPONSES", "[1, 2]")], "LLM_STUB_RESPONSES");
        assert!(message.contains("expected a JSON object"), "{message}");
        let (config, report) = apply(&[(
            "LLM_STUB_RESPONSES",
            r#"{"rules":[{"match":"hi","matchType":"exact","response":"hello"}],"defaultResponse":"ok"}"#,
        )]);
        report.unwrap();
        let rules = config.env.llm_stub_responses.unwrap();
        assert_eq!(rules["defaultResponse"], "ok");
    }

    #[test]
    fn valid_values_land_in_env_overrides() {
        let (config, report) = apply(&[
            ("WEBHOOK_SECRET", "s3cret"),
            ("SERVER_BYPASS_TOKEN", "bypass"),
            ("WORKSPACE_RECONCILE_INTERVAL_MS", "30000"),
            ("MANUAL_RECONCILE_MIN_INTERVAL_MS", "0"),
            ("LLM_MAX_ITERATIONS", "100"),
        ]);
        assert_eq!(report.unwrap().applied.len(), 5);
        let env = &config.env;
        assert_eq!(
            env.webhook_secret.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert_eq!(
            env.server_bypass_token.as_ref().map(Secret::expose),
            Some("bypass")
        );
        assert_eq!(env.workspace_reconcile_interval_ms, 30_000);
        assert_eq!(env.manual_reconcile_min_interval_ms, 0);
        assert_eq!(env.llm_max_iterations, 100);
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn defaults_hold_when_the_variables_are_unset() {
        let env = EnvOverrides::default();
        assert_eq!(env.manual_reconcile_min_interval_ms, 60_000);
        assert_eq!(env.llm_max_iterations, 15);
        assert_eq!(env.workspace_reconcile_interval_ms, 300_000);
    }

    #[test]
    fn an_empty_variable_counts_as_unset_with_a_warning() {
        let (config, report) = apply(&[("PORT", ""), ("WEBHOOK_SECRET", "  ")]);
        let report = report.unwrap();
        assert_eq!(config, HostConfig::default());
        assert_eq!(report.warnings.len(), 2, "{:?}", report.warnings);
        assert!(report.applied.is_empty());
    }

    #[test]
    fn every_bad_variable_is_reported_at_once() {
        let (_, result) = apply(&[
            ("PORT", "x"),
            ("LLM_MAX_ITERATIONS", "0"),
            ("STORE_IDS", "!!"),
        ]);
        assert_eq!(result.unwrap_err().len(), 3);
    }
}
