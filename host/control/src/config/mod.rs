//! The operator's configuration of one storehost: a TOML file (or the embedded default),
//! then environment overrides (SPEC §5a), resolved into one [`StoreSpec`] per store.
//!
//! Read a file with [`load_file`] (or text with [`parse_str`]): every mistake is reported with
//! its file:line:column, all of them at once. Then [`apply_env`] layers the environment
//! variables of the service this replaces on top. Unknown keys are errors, never ignored.

mod env;
pub mod error;
pub mod llm;
mod load;
mod own;
pub mod quotas;
pub mod size;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use storehost_store::RetryPolicy;
use storehost_store::id::StoreId;
use storehost_store::quotas::Quotas;

pub use env::{
    DEFAULT_LLM_MAX_ITERATIONS, DEFAULT_MANUAL_RECONCILE_MIN_INTERVAL_MS,
    DEFAULT_WORKSPACE_RECONCILE_INTERVAL_MS, ENV_VARS, Env, EnvOverrides, EnvReport,
    MIN_RECONCILE_INTERVAL_MS, MapEnv, ProcessEnv, Secret, apply_env, store_config_problems,
};
pub use error::{ConfigError, ConfigErrorKind, ConfigErrors, Location};
pub use llm::{LlmConfig, LlmProviderKind};
pub use load::{load_file, parse_str};
pub use own::OwnSettings;
pub use quotas::QuotasOverride;
/// How far an accepted event's durability goes: `"process"` (default) or `"power"`.
pub use storehost_store::Durability;

/// The plugin compiled into the binary; it exists unless `[plugins.agent]` replaces it.
pub const BUILTIN_PLUGIN: &str = "agent";

/// The rule every plugin name must follow, quoted in error messages.
pub const PLUGIN_NAME_RULE: &str = "a plugin name is 1 to 64 characters: a lowercase letter or digit first, then lowercase letters, digits, '_' or '-' (^[a-z0-9][a-z0-9_-]{0,63}$)";

/// The stores of the embedded default config, all on the built-in plugin.
pub const DEMO_STORES: [&str; 3] = ["demo-alpha", "demo-beta", "demo-gamma"];

/// A string that is not a valid plugin name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plugin name {given:?}: {PLUGIN_NAME_RULE}")]
pub struct InvalidPluginName {
    /// What was given (cut to 80 characters).
    pub given: String,
}

/// Checks `name` against [`PLUGIN_NAME_RULE`].
pub fn validate_plugin_name(name: &str) -> Result<(), InvalidPluginName> {
    let bytes = name.as_bytes();
    let lower_or_digit = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = (1..=64).contains(&bytes.len())
        && bytes.first().is_some_and(lower_or_digit)
        && bytes
            .iter()
            .all(|b| lower_or_digit(b) || *b == b'_' || *b == b'-');
    if valid {
        Ok(())
    } else {
        Err(InvalidPluginName {
            given: name.chars().take(80).collect(),
        })
    }
}

/// `[http]`: the HTTP server's limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes (larger → 413).
    #[serde(deserialize_with = "size::deserialize")]
    pub max_body_bytes: u64,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Most connections served at once from one client address (0: no such cap).
    pub max_connections_per_ip: usize,
    /// Time a client has to send its request headers, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Time a response may wait for the client to read it, in milliseconds: a write that
    /// makes no progress this long closes the connection.
    pub write_timeout_ms: u64,
    /// Time in-flight requests get to finish on shutdown, in milliseconds.
    pub shutdown_grace_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_connections: 1024,
            max_connections_per_ip: 256,
            header_read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl HttpConfig {
    /// `header_read_timeout_ms` as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// `write_timeout_ms` as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `shutdown_grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// `[retry]`: how a failing event is retried before it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per event, the first included (at least 1).
    pub attempts: u32,
    /// Delay before the first retry, in milliseconds; doubles with each further retry.
    pub base_delay_ms: u64,
    /// Longest delay between attempts, in milliseconds (at least `base_delay_ms`).
    pub max_delay_ms: u64,
    /// Consecutive failed invocations of one store that open its circuit (state `backoff`).
    pub circuit_breaker_failures: u32,
    /// How long an open circuit rests the store the first time, in milliseconds; doubles for
    /// each further event or task that fails as its probe before a success.
    pub circuit_breaker_base_ms: u64,
    /// Longest rest of an open circuit, in milliseconds (at least `circuit_breaker_base_ms`).
    pub circuit_breaker_max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay_ms: 100,
            max_delay_ms: 30_000,
            circuit_breaker_failures: 10,
            circuit_breaker_base_ms: 1_000,
            circuit_breaker_max_ms: 300_000,
        }
    }
}

impl RetryConfig {
    /// The store's retry policy with these values.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: self.attempts,
            base_delay: Duration::from_millis(self.base_delay_ms),
            max_delay: Duration::from_millis(self.max_delay_ms),
            breaker_failures: self.circuit_breaker_failures,
            breaker_base_delay: Duration::from_millis(self.circuit_breaker_base_ms),
            breaker_max_delay: Duration::from_millis(self.circuit_breaker_max_ms),
        }
    }
}

/// `[webhook]`: how `POST /webhooks/workspaces` authenticates and paces provisioning calls.
/// The shared secret itself comes from `WEBHOOK_SECRET` only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Refuse `X-Webhook-Secret` alone: only Standard Webhooks signatures are accepted.
    pub require_signature: bool,
    /// Largest difference between a signed webhook's timestamp and the host's clock, in seconds.
    pub tolerance_secs: u64,
    /// Webhook calls accepted per source address per minute (more get 429 with `Retry-After`);
    /// calls failing authentication are counted apart, with a budget of their own.
    pub requests_per_minute: u32,
    /// How long the answer to a `webhook-id` is kept to answer its replays, in hours.
    pub replay_retention_hours: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            require_signature: false,
            tolerance_secs: 300,
            requests_per_minute: 600,
            replay_retention_hours: 24,
        }
    }
}

/// `[registry]`: the authoritative workspace registry the reconciler compares with (SPEC §7).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL; the reconciler GETs `{url}/internal/workspaces`. `AUTH_WORKER_INTERNAL_URL`
    /// replaces it. Neither set: no reconciler.
    pub url: Option<String>,
    /// Time between passes, in milliseconds (at least 30000); `WORKSPACE_RECONCILE_INTERVAL_MS`
    /// replaces it.
    pub interval_ms: u64,
    /// How long a store missing from the registry is kept before it is removed, in ms.
    pub grace_period_ms: u64,
    /// Largest share of the stores (0 to 1) one pass may remove; a pass that would remove more
    /// removes nothing and reports it.
    pub max_removal_share: f64,
    /// Deadline of one registry request, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: None,
            interval_ms: env::DEFAULT_WORKSPACE_RECONCILE_INTERVAL_MS,
            grace_period_ms: 24 * 60 * 60 * 1000,
            max_removal_share: 0.5,
            request_timeout_ms: 10_000,
        }
    }
}

/// `[defaults]`: what a store gets when it does not say otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsConfig {
    /// The plugin a store runs when it names none.
    pub plugin: String,
    /// `[defaults.quotas]`: overrides of the built-in quota defaults, for every store.
    pub quotas: QuotasOverride,
}

impl Default for DefaultsConfig {
    fn default() -> Self {
        Self {
            plugin: BUILTIN_PLUGIN.to_owned(),
            quotas: QuotasOverride::default(),
        }
    }
}

/// `[plugins.<name>]`: a plugin loaded from a file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// The `.wasm` component; after loading, relative paths are already resolved against the
    /// config file's directory.
    pub path: PathBuf,
    /// Where `path` is written in the config file, for errors about the file it names.
    #[serde(skip)]
    pub path_at: Option<Location>,
}

/// `[stores.<storeId>]`: one store declared in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The plugin it runs; `None` = `defaults.plugin`.
    pub plugin: Option<String>,
    /// Quota overrides, merged over `[defaults.quotas]`.
    pub quotas: QuotasOverride,
    /// Key/values handed to the plugin (its `config` capability).
    pub config: BTreeMap<String, String>,
}

/// Where a plugin's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// The `agent` plugin compiled into the binary.
    Builtin,
    /// A component file (absolute, or relative to the working directory).
    File(PathBuf),
}

/// One store as it should run: every default and override resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSpec {
    /// The plugin's name (built in or under `[plugins]`).
    pub plugin: String,
    /// Its quotas, fully merged (built-in defaults, then `[defaults.quotas]`, then its own).
    pub quotas: Quotas,
    /// Key/values handed to the plugin.
    pub config: BTreeMap<String, String>,
    /// For a store added at run time (API, webhook, reconciler): what it set itself, so the
    /// rest follows the defaults when they change (see [`OwnSettings::over`]). `None` for a
    /// store the config or `STORE_IDS` declares (the config file says it all).
    pub own: Option<OwnSettings>,
}

/// The whole operator configuration of one host.
///
/// Build it with [`load_file`], [`parse_str`] or [`HostConfig::embedded_default`], then
/// [`apply_env`]. It derives `Deserialize` (with `deny_unknown_fields`) only so the loader can
/// check each key on its own; deserializing it directly skips the cross-checks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Address the HTTP API listens on.
    #[serde(deserialize_with = "deserialize_socket_addr")]
    pub listen: SocketAddr,
    /// Directory holding `stores/<storeId>/` and the host's own files (relative to the
    /// working directory).
    pub data_dir: PathBuf,
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// Most stores this host runs (`MAX_INSTANCES_PER_SERVER`).
    pub max_stores: usize,
    /// How far an accepted event's durability goes.
    pub durability: Durability,
    /// A store with nothing to do for this many ms hibernates: it drops its sandbox (its pool
    /// slot) and caches until the next event, query or due task wakes it. 0: never.
    pub idle_timeout_ms: u64,
    /// A hibernated store idle this many ms longer also closes its SQLite files: it then costs
    /// about 8 KB and no file descriptor, and its next wake opens them again (about half a
    /// millisecond more). 0: at once when it hibernates.
    pub close_files_after_ms: u64,
    /// How many empty store directories are kept ready in `DATA_DIR/stores/.spare/`, so a new
    /// store starts with a rename instead of creating its files (0: none).
    pub spare_stores: usize,
    /// After downtime, a scheduled task's occurrences missed less than this many ms ago run
    /// once, together (one run, for the latest); older ones are recorded as `missed` (the
    /// first 100 of an outage). 0: no catch-up run (an occurrence found less than 10 s late,
    /// its store busy or its timer late, still runs).
    pub task_catch_up_ms: u64,
    /// `[http]`.
    pub http: HttpConfig,
    /// `[retry]`.
    pub retry: RetryConfig,
    /// `[defaults]`.
    pub defaults: DefaultsConfig,
    /// `[plugins.<name>]`: plugins loaded from files (besides the built-in `agent`).
    pub plugins: BTreeMap<String, PluginConfig>,
    /// `[stores.<storeId>]`: stores declared in the config.
    pub stores: BTreeMap<StoreId, StoreConfig>,
    /// `[webhook]`.
    pub webhook: WebhookConfig,
    /// `[registry]`.
    pub registry: RegistryConfig,
    /// `[llm]`.
    pub llm: LlmConfig,
    /// What the environment set (see [`apply_env`]); defaults when it was not applied.
    #[serde(skip)]
    pub env: EnvOverrides,
    /// Whether this is [`HostConfig::embedded_default`] (no config file): `STORE_IDS` then
    /// replaces its demo stores and `PORT` listens on every interface, as in the service
    /// this replaces.
    #[serde(skip)]
    pub embedded: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            admin_token_env: "STOREHOST_ADMIN_TOKEN".to_owned(),
            max_stores: 1000,
            durability: Durability::default(),
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            close_files_after_ms: DEFAULT_CLOSE_FILES_AFTER_MS,
            spare_stores: DEFAULT_SPARE_STORES,
            task_catch_up_ms: DEFAULT_TASK_CATCH_UP_MS,
            http: HttpConfig::default(),
            retry: RetryConfig::default(),
            defaults: DefaultsConfig::default(),
            plugins: BTreeMap::new(),
            stores: BTreeMap::new(),
            webhook: WebhookConfig::default(),
            registry: RegistryConfig::default(),
            llm: LlmConfig::default(),
            env: EnvOverrides::default(),
            embedded: false,
        }
    }
}

/// How many spare store directories are kept ready, by default.
pub const DEFAULT_SPARE_STORES: usize = 16;

/// How long a store stays idle before it hibernates, by default (5 minutes).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 5 * 60 * 1000;
/// How much longer a hibernated store stays idle before it closes its files, by default
/// (25 minutes: half an hour idle in all).
pub const DEFAULT_CLOSE_FILES_AFTER_MS: u64 = 25 * 60 * 1000;

/// The catch-up window of scheduled tasks after downtime, by default (10 minutes).
pub const DEFAULT_TASK_CATCH_UP_MS: u64 =
    storehost_store::store::DEFAULT_TASK_CATCH_UP.as_millis() as u64;

impl HostConfig {
    /// The catch-up window of scheduled tasks after downtime.
    pub fn task_catch_up(&self) -> Duration {
        Duration::from_millis(self.task_catch_up_ms)
    }

    /// How long a store stays idle before it hibernates (`None`: never).
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }

    /// How much longer a hibernated store stays idle before it closes its files.
    pub fn close_files_after(&self) -> Duration {
        Duration::from_millis(self.close_files_after_ms)
    }

    /// Every default, plus the demo stores [`DEMO_STORES`] on the built-in plugin: what
    /// `storehost serve` runs without a config file.
    pub fn embedded_default() -> Self {
        let stores = DEMO_STORES
            .iter()
            .filter_map(|id| StoreId::new(id).ok())
            .map(|id| (id, StoreConfig::default()))
            .collect();
        Self {
            stores,
            embedded: true,
            ..Self::default()
        }
    }

    /// The quotas a store gets when it overrides nothing.
    pub fn default_quotas(&self) -> Quotas {
        self.defaults.quotas.apply_to(&Quotas::default())
    }

    /// The spec of a store that names nothing: the default plugin and quotas, no config.
    pub fn default_spec(&self) -> StoreSpec {
        // Host-wide plugin settings from the environment reach plugins as store config keys
        // (a store's own config wins).
        let mut config = BTreeMap::new();
        if self.env.llm_max_iterations != env::DEFAULT_LLM_MAX_ITERATIONS {
            config.insert(
                "LLM_MAX_ITERATIONS".to_owned(),
                self.env.llm_max_iterations.to_string(),
            );
        }
        StoreSpec {
            plugin: self.defaults.plugin.clone(),
            quotas: self.default_quotas(),
            config,
            own: None,
        }
    }

    /// Every store that should run (config and `STORE_IDS`), fully resolved.
    pub fn store_specs(&self) -> BTreeMap<StoreId, StoreSpec> {
        let defaults = self.default_spec();
        let from_env = self
            .env
            .store_ids
            .iter()
            .filter(|id| !self.stores.contains_key(*id))
            .map(|id| (id.clone(), defaults.clone()));
        let from_config = self.stores.iter().map(|(id, store)| {
            let spec = StoreSpec {
                plugin: store
                    .plugin
                    .clone()
                    .unwrap_or_else(|| self.defaults.plugin.clone()),
                quotas: store.quotas.apply_to(&defaults.quotas),
                config: defaults
                    .config
                    .iter()
                    .chain(&store.config)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                own: None,
            };
            (id.clone(), spec)
        });
        from_config.chain(from_env).collect()
    }

    /// Whether store `id` is in the desired set only because `STORE_IDS` lists it (the
    /// config does not declare it).
    pub fn is_env_store(&self, id: &StoreId) -> bool {
        !self.stores.contains_key(id) && self.env.store_ids.contains(id)
    }

    /// Where store `id` of the desired set comes from: `STORE_IDS` or the config file.
    pub fn source_of(&self, id: &StoreId) -> crate::StoreSource {
        if self.is_env_store(id) {
            crate::StoreSource::Env
        } else {
            crate::StoreSource::Config
        }
    }

    /// Every store id the config and `STORE_IDS` name.
    pub fn store_ids(&self) -> BTreeSet<StoreId> {
        self.stores
            .keys()
            .chain(&self.env.store_ids)
            .cloned()
            .collect()
    }

    /// Where plugin `name` comes from; `None` when it is neither built in nor declared.
    pub fn plugin_source(&self, name: &str) -> Option<PluginSource> {
        match self.plugins.get(name) {
            Some(plugin) => Some(PluginSource::File(plugin.path.clone())),
            None if name == BUILTIN_PLUGIN => Some(PluginSource::Builtin),
            None => None,
        }
    }

    /// Every plugin this config knows: the built-in one (unless replaced) and `[plugins]`.
    pub fn plugin_sources(&self) -> BTreeMap<String, PluginSource> {
        let mut sources: BTreeMap<String, PluginSource> = self
            .plugins
            .iter()
            .map(|(name, plugin)| (name.clone(), PluginSource::File(plugin.path.clone())))
            .collect();
        sources
            .entry(BUILTIN_PLUGIN.to_owned())
            .or_insert(PluginSource::Builtin);
        sources
    }

    /// Resolves `path` (from a config file at `origin`) against the file's directory.
    fn resolve_against(origin: &Path, path: &Path) -> PathBuf {
        match origin.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }
}

/// Deserializes `listen` with a message that shows the accepted form.
fn deserialize_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP address and port; write it like \"127.0.0.1:8080\" or \"[::]:8080\""
        ))
    })
}

#[cfg(test)]
mod tests;
