//! Reading a config file: parse TOML with spans, then check each section, plugin and store on
//! its own so that one mistake never hides another.
//!
//! Each known key is deserialized alone (into its section's struct, whose fields all have
//! defaults), so every bad value is reported at its own line:column; the section's struct is
//! built only when all its keys are fine. The structs' serde derives stay the one description
//! of what a section accepts: the list of known keys is read from them ([`struct_fields`]).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;

use serde::de::{DeserializeOwned, IntoDeserializer};
use storehost_llm::StubProvider;
use storehost_llm::openai::{CREDENTIALS_IN_BASE_URL, base_url_has_credentials};
use storehost_store::id::{STORE_ID_RULE, StoreId};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, ConfigErrorKind as Kind, ConfigErrors, Location};
use super::quotas::QuotasOverride;
use super::{
    BUILTIN_PLUGIN, DefaultsConfig, HostConfig, HttpConfig, LlmConfig, PluginConfig,
    RegistryConfig, RetryConfig, StoreConfig, WebhookConfig, validate_plugin_name,
};

/// Reads and checks the config file at `path`.
pub fn load_file(path: impl AsRef<Path>) -> Result<HostConfig, ConfigErrors> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors::one(ConfigError {
            kind: Kind::Io,
            location: Location::WholeFile {
                path: path.to_owned(),
            },
            message: format!(
                "cannot read the config file: {err}; check the path and its permissions"
            ),
        })
    })?;
    parse_str(&text, path)
}

/// Checks config `text` read from `origin_path` (used in error locations, and to resolve
/// relative plugin paths against its directory).
pub fn parse_str(text: &str, origin_path: impl AsRef<Path>) -> Result<HostConfig, ConfigErrors> {
    let origin = origin_path.as_ref();
    let mut checker = Checker {
        path: origin,
        text,
        errors: Vec::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(err) => {
            let span = err.span().unwrap_or(0..0);
            checker.error(
                Kind::Syntax,
                span,
                format!(
                    "TOML syntax error: {}; fix the TOML at this position",
                    err.message().trim_end()
                ),
            );
            return Err(checker.finish());
        }
    };
    let config = check_document(&mut checker, &root, origin);
    match (ConfigErrors::from_vec(checker.errors), config) {
        (None, Some(config)) => Ok(config),
        (Some(errors), _) => Err(errors),
        (None, None) => Err(ConfigErrors::one(ConfigError {
            kind: Kind::InvalidValue,
            location: Location::WholeFile {
                path: origin.to_owned(),
            },
            message: "the config could not be read (no further detail); please report this"
                .to_owned(),
        })),
    }
}

/// The sections under the top level, checked apart from the top-level keys.
const SECTIONS: &[&str] = &[
    "http", "retry", "defaults", "plugins", "stores", "webhook", "registry", "llm",
];

/// Checks the whole document; `Some` only when nothing was wrong.
fn check_document(
    c: &mut Checker<'_>,
    root: &Spanned<DeTable<'_>>,
    origin: &Path,
) -> Option<HostConfig> {
    let doc = root.get_ref();
    let top = Section::top();
    let top_level = c.section::<HostConfig>(doc, root.span(), &top, SECTIONS);
    let http = c.optional_section::<HttpConfig>(doc, &top, "http", &[]);
    let retry = c.optional_section::<RetryConfig>(doc, &top, "retry", &[]);
    let webhook = c.optional_section::<WebhookConfig>(doc, &top, "webhook", &[]);
    let registry = c.optional_section::<RegistryConfig>(doc, &top, "registry", &[]);
    let llm = check_llm(c, doc, origin);
    let known_plugins = known_plugin_names(doc);
    let defaults = check_defaults(c, doc, &known_plugins);
    let plugins = check_plugins(c, doc, origin);
    let stores = check_stores(c, doc, &known_plugins);

    let config = HostConfig {
        http: http?,
        retry: retry?,
        defaults: defaults?,
        plugins: plugins?,
        stores: stores?,
        webhook: webhook?,
        registry: registry?,
        llm: llm?,
        ..top_level?
    };
    if config.stores.len() > config.max_stores {
        let span = doc
            .get_key_value("max_stores")
            .or_else(|| doc.get_key_value("stores"))
            .map_or(0..0, |(key, _)| key.span());
        c.error(
            Kind::TooManyStores,
            span,
            format!(
                "the config declares {} stores but max_stores is {}; raise max_stores or remove stores",
                config.stores.len(),
                config.max_stores
            ),
        );
        return None;
    }
    Some(config)
}

/// Checks `[defaults]` (its plugin among `known_plugins`) and `[defaults.quotas]`.
fn check_defaults(
    c: &mut Checker<'_>,
    doc: &DeTable<'_>,
    known_plugins: &BTreeSet<String>,
) -> Option<DefaultsConfig> {
    let top = Section::top();
    let Some(value) = doc.get("defaults") else {
        return Some(DefaultsConfig::default());
    };
    let section = top.child("defaults");
    let table = c.as_table(value, &section)?;
    let defaults = c.section::<DefaultsConfig>(table, value.span(), &section, &["quotas"]);
    let quotas = c.quotas(table, &section);
    // The plugin is checked whatever the quotas hold, as a store's is.
    let defaults = defaults?;
    if let Some(plugin_value) = table.get("plugin")
        && !known_plugins.contains(&defaults.plugin)
    {
        let span = plugin_value.span();
        c.unknown_plugin(span, &defaults.plugin, "[defaults] plugin", known_plugins);
        return None;
    }
    Some(DefaultsConfig {
        quotas: quotas?,
        ..defaults
    })
}

/// Checks `[llm]`, and the stub rules it gives (inline or in a file, resolved against
/// `origin`'s directory) so that bad rules are reported at their key.
fn check_llm(c: &mut Checker<'_>, doc: &DeTable<'_>, origin: &Path) -> Option<LlmConfig> {
    let llm = c.optional_section::<LlmConfig>(doc, &Section::top(), "llm", &[]);
    // The rules are read from the text, not from the section, so that another key's mistake
    // does not hide theirs. Both given is the section's error, and neither is checked then.
    let table = doc.get("llm").and_then(|llm| llm.get_ref().as_table());
    let text_of = |key: &str| {
        let value = table?.get(key)?;
        Some((value.get_ref().as_str()?, value.span()))
    };
    let mut rules_valid = true;
    let mut rules_file = None;
    match (text_of("stub_rules"), text_of("stub_rules_file")) {
        (Some((rules, span)), None) => {
            if let Err(err) = StubProvider::from_json(rules) {
                c.error(
                    Kind::InvalidValue,
                    span,
                    format!("invalid stub_rules in [llm]: {}", err.message),
                );
                rules_valid = false;
            }
        }
        (None, Some((path, span))) => {
            let path = HostConfig::resolve_against(origin, Path::new(path));
            if let Err(err) = StubProvider::from_file(&path) {
                c.error(
                    Kind::InvalidValue,
                    span,
                    format!("invalid stub_rules_file in [llm]: {}", err.message),
                );
                rules_valid = false;
            }
            rules_file = Some(path);
        }
        _ => {}
    }
    let mut llm = llm?;
    if let Some(path) = rules_file {
        llm.stub_rules_file = Some(path);
    }
    rules_valid.then_some(llm)
}

/// The names stores may use: the built-in plugin and every validly named `[plugins.<name>]`.
fn known_plugin_names(doc: &DeTable<'_>) -> BTreeSet<String> {
    let declared = doc
        .get("plugins")
        .and_then(|plugins| plugins.get_ref().as_table())
        .into_iter()
        .flat_map(|table| table.keys())
        .map(|key| key.get_ref().to_string())
        .filter(|name| validate_plugin_name(name).is_ok());
    declared
        .chain(std::iter::once(BUILTIN_PLUGIN.to_owned()))
        .collect()
}

/// Checks every `[plugins.<name>]`, resolving relative paths against `origin`'s directory.
fn check_plugins(
    c: &mut Checker<'_>,
    doc: &DeTable<'_>,
    origin: &Path,
) -> Option<std::collections::BTreeMap<String, PluginConfig>> {
    let Some(value) = doc.get("plugins") else {
        return Some(Default::default());
    };
    let section = Section::top().child("plugins");
    let table = c.as_table(value, &section)?;
    let mut plugins = Some(std::collections::BTreeMap::new());
    for (key, value) in table {
        let name = key.get_ref().as_ref();
        let section = section.child(name);
        let mut valid = true;
        if let Err(err) = validate_plugin_name(name) {
            c.error(
                Kind::InvalidPluginName,
                key.span(),
                format!("{err}; rename [{section}]"),
            );
            valid = false;
        }
        let Some(plugin_table) = c.as_table(value, &section) else {
            plugins = None;
            continue;
        };
        if !plugin_table.contains_key("path") {
            c.error(
                Kind::MissingKey,
                key.span(),
                format!(
                    "[{section}] has no path; add path = \"<file>.wasm\" (relative paths start at the config file's directory)"
                ),
            );
            valid = false;
        }
        let plugin = c.section::<PluginConfig>(plugin_table, value.span(), &section, &[]);
        if let Some(span) = c.value_span(table, name, "path")
            && plugin
                .as_ref()
                .is_some_and(|p| p.path.as_os_str().is_empty())
        {
            c.error(
                Kind::InvalidValue,
                span,
                format!("path in [{section}] is empty; give the plugin's .wasm file"),
            );
            valid = false;
        }
        match (plugin, valid, plugins.as_mut()) {
            (Some(mut plugin), true, Some(plugins)) => {
                plugin.path = HostConfig::resolve_against(origin, &plugin.path);
                plugin.path_at = c
                    .value_span(table, name, "path")
                    .map(|span| Location::in_text(c.path, c.text, span.start));
                plugins.insert(name.to_owned(), plugin);
            }
            _ => plugins = None,
        }
    }
    plugins
}

/// Checks every `[stores.<storeId>]`; one bad store does not stop the others being checked.
fn check_stores(
    c: &mut Checker<'_>,
    doc: &DeTable<'_>,
    known_plugins: &BTreeSet<String>,
) -> Option<std::collections::BTreeMap<StoreId, StoreConfig>> {
    let Some(value) = doc.get("stores") else {
        return Some(Default::default());
    };
    let section = Section::top().child("stores");
    let table = c.as_table(value, &section)?;
    let mut stores = Some(std::collections::BTreeMap::new());
    for (key, value) in table {
        let given = key.get_ref().as_ref();
        let section = section.child(given);
        let id = StoreId::new(given).map_err(|err| {
            c.error(
                Kind::InvalidStoreId,
                key.span(),
                format!(
                    "invalid store id {:?} in [stores]: {STORE_ID_RULE}",
                    err.given
                ),
            );
        });
        let store = check_store(c, value, &section, known_plugins);
        match (id, store, stores.as_mut()) {
            (Ok(id), Some(store), Some(stores)) => {
                stores.insert(id, store);
            }
            _ => stores = None,
        }
    }
    stores
}

/// Checks one `[stores.<storeId>]` table.
fn check_store(
    c: &mut Checker<'_>,
    value: &Spanned<DeValue<'_>>,
    section: &Section,
    known_plugins: &BTreeSet<String>,
) -> Option<StoreConfig> {
    let table = c.as_table(value, section)?;
    let store = c.section::<StoreConfig>(table, value.span(), section, &["quotas", "config"]);
    let quotas = c.quotas(table, section);
    let config = c.string_map(table, section, "config");
    let mut store = store?;
    if let (Some(plugin), Some((_, plugin_value))) = (&store.plugin, table.get_key_value("plugin"))
        && !known_plugins.contains(plugin)
    {
        let what = format!("[{section}] plugin");
        c.unknown_plugin(plugin_value.span(), plugin, &what, known_plugins);
        return None;
    }
    store.quotas = quotas?;
    store.config = config?;
    let problems = super::env::store_config_problems(&store.config);
    if let Some(config_value) = table.get("config") {
        for problem in &problems {
            c.error(Kind::InvalidValue, config_value.span(), problem.clone());
        }
    }
    problems.is_empty().then_some(store)
}

/// A table's name as written in a header (`stores.acme.quotas`); empty for the top level.
#[derive(Debug, Clone)]
struct Section(String);

impl Section {
    /// The top level of the document.
    fn top() -> Self {
        Self(String::new())
    }

    /// The table `key` inside this one, quoting `key` when TOML needs quotes for it.
    fn child(&self, key: &str) -> Self {
        let bare = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let key = if bare {
            key.to_owned()
        } else {
            format!("{key:?}")
        };
        if self.0.is_empty() {
            Self(key)
        } else {
            Self(format!("{}.{key}", self.0))
        }
    }

    /// Whether this is the top level of the document.
    fn is_top(&self) -> bool {
        self.0.is_empty()
    }

    /// "at the top level" or "in [name]", to follow a key in a message.
    fn where_(&self) -> String {
        if self.0.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("in [{}]", self.0)
        }
    }
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Values a section may be refused for after it deserialized: `(key to blame, message)`.
trait Problems {
    /// Every out-of-range value; empty when all are fine.
    fn problems(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

impl Problems for HostConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.max_stores == 0 {
            problems.push((
                "max_stores",
                "max_stores = 0 would refuse every store; it must be at least 1".to_owned(),
            ));
        }
        if self.spare_stores > self.max_stores.max(super::DEFAULT_SPARE_STORES) {
            problems.push((
                "spare_stores",
                format!(
                    "spare_stores = {} is more than max_stores ({}): spares beyond the stores that can ever start would only hold files open; use at most max_stores (the default is {})",
                    self.spare_stores,
                    self.max_stores,
                    super::DEFAULT_SPARE_STORES
                ),
            ));
        }
        if !is_env_var_name(&self.admin_token_env) {
            problems.push((
                "admin_token_env",
                format!(
                    "admin_token_env = {:?} is not an environment variable name; use letters, digits and '_', not starting with a digit (like \"STOREHOST_ADMIN_TOKEN\")",
                    self.admin_token_env
                ),
            ));
        }
        problems
    }
}

impl Problems for HttpConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let zero = |key: &'static str, value: u64| {
            (value == 0).then(|| {
                (
                    key,
                    format!("{key} = 0 would refuse every request; it must be at least 1"),
                )
            })
        };
        [
            zero("max_body_bytes", self.max_body_bytes),
            zero("max_connections", self.max_connections as u64),
            zero("header_read_timeout_ms", self.header_read_timeout_ms),
            zero("write_timeout_ms", self.write_timeout_ms),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl Problems for RetryConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.attempts == 0 {
            problems.push((
                "attempts",
                "attempts = 0 would never run an event; it must be at least 1 (1 = no retries)"
                    .to_owned(),
            ));
        }
        if self.max_delay_ms < self.base_delay_ms {
            problems.push((
                "max_delay_ms",
                format!(
                    "max_delay_ms ({}) is below base_delay_ms ({}); it must be at least base_delay_ms",
                    self.max_delay_ms, self.base_delay_ms
                ),
            ));
        }
        if self.circuit_breaker_failures == 0 {
            problems.push((
                "circuit_breaker_failures",
                "circuit_breaker_failures = 0 would rest a store before its first failure; it must be at least 1"
                    .to_owned(),
            ));
        }
        if self.circuit_breaker_max_ms < self.circuit_breaker_base_ms {
            problems.push((
                "circuit_breaker_max_ms",
                format!(
                    "circuit_breaker_max_ms ({}) is below circuit_breaker_base_ms ({}); it must be at least that",
                    self.circuit_breaker_max_ms, self.circuit_breaker_base_ms
                ),
            ));
        }
        problems
    }
}

impl Problems for QuotasOverride {
    fn problems(&self) -> Vec<(&'static str, String)> {
        QuotasOverride::problems(self)
            .into_iter()
            .map(|p| (p.key, p.to_string()))
            .collect()
    }
}

/// Largest `[webhook] replay_retention_hours`: ten years.
const MAX_REPLAY_RETENTION_HOURS: u64 = 10 * 365 * 24;

impl Problems for WebhookConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.tolerance_secs == 0 {
            problems.push((
                "tolerance_secs",
                "tolerance_secs = 0 would refuse every signed webhook; it must be at least 1 (300 is the Standard Webhooks default)".to_owned(),
            ));
        }
        if self.requests_per_minute == 0 {
            problems.push((
                "requests_per_minute",
                "requests_per_minute = 0 would refuse every webhook; it must be at least 1"
                    .to_owned(),
            ));
        }
        if self.replay_retention_hours > MAX_REPLAY_RETENTION_HOURS {
            problems.push((
                "replay_retention_hours",
                format!(
                    "replay_retention_hours = {} is more than {MAX_REPLAY_RETENTION_HOURS} (ten years); the default is 24",
                    self.replay_retention_hours
                ),
            ));
        } else if self.replay_retention_hours.saturating_mul(3600) < self.tolerance_secs {
            problems.push((
                "replay_retention_hours",
                format!(
                    "replay_retention_hours = {} keeps webhook ids for less than tolerance_secs ({} s): a signed webhook replayed after its id is forgotten but within the tolerance would be applied again; keep ids at least as long as the tolerance",
                    self.replay_retention_hours, self.tolerance_secs
                ),
            ));
        }
        problems
    }
}

impl Problems for RegistryConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Some(url) = &self.url {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(|rest| rest.is_empty() || rest.starts_with('/')) {
                problems.push((
                    "url",
                    format!("url = {url:?} is not an http:// or https:// URL with a host; write it like \"http://auth-worker:8787\""),
                ));
            }
        }
        if self.interval_ms < super::MIN_RECONCILE_INTERVAL_MS {
            problems.push((
                "interval_ms",
                format!(
                    "interval_ms = {} is below the minimum of {} (30 seconds); raise it",
                    self.interval_ms,
                    super::MIN_RECONCILE_INTERVAL_MS
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_removal_share) {
            problems.push((
                "max_removal_share",
                format!(
                    "max_removal_share = {} is not a share; use a number from 0 to 1 (0.5 = at most half of the stores per pass)",
                    self.max_removal_share
                ),
            ));
        }
        if self.request_timeout_ms == 0 {
            problems.push((
                "request_timeout_ms",
                "request_timeout_ms = 0 would fail every registry request; it must be at least 1"
                    .to_owned(),
            ));
        }
        problems
    }
}

impl Problems for LlmConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let rest = self
            .base_url
            .strip_prefix("http://")
            .or_else(|| self.base_url.strip_prefix("https://"));
        if base_url_has_credentials(&self.base_url) {
            // The value is not echoed: it holds a secret.
            problems.push(("base_url", format!("base_url {CREDENTIALS_IN_BASE_URL}")));
        } else if rest.is_none_or(|rest| rest.is_empty() || rest.starts_with('/'))
            || self.base_url.chars().any(char::is_whitespace)
        {
            problems.push((
                "base_url",
                format!(
                    "base_url = {:?} is not an http:// or https:// URL with a host; give the API root, like \"https://api.openai.com/v1\" or \"http://127.0.0.1:11434/v1\" (requests go to <base_url>/chat/completions)",
                    self.base_url
                ),
            ));
        }
        if self.model.trim().is_empty() {
            problems.push((
                "model",
                "model is empty; give the model name the server serves, like \"gpt-4o-mini\" or \"llama3.1\"".to_owned(),
            ));
        }
        if !self.api_key_env.is_empty() && !is_env_var_name(&self.api_key_env) {
            // The value is not echoed: it may be a pasted key.
            problems.push((
                "api_key_env",
                "api_key_env is not an environment variable name; give the name of the variable that holds the key, not the key itself (like \"OPENAI_API_KEY\"), or \"\" to send no key".to_owned(),
            ));
        }
        for (key, value) in [
            ("timeout_ms", self.timeout_ms),
            ("deadline_ms", self.deadline_ms),
            ("max_concurrent", self.max_concurrent as u64),
            ("max_tokens", u64::from(self.max_tokens)),
        ] {
            if value == 0 {
                problems.push((
                    key,
                    format!("{key} = 0 would fail every LLM call; it must be at least 1"),
                ));
            }
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            problems.push((
                "backoff_max_ms",
                format!(
                    "backoff_max_ms ({}) is below backoff_base_ms ({}); it must be at least backoff_base_ms",
                    self.backoff_max_ms, self.backoff_base_ms
                ),
            ));
        }
        if self.stub_rules.is_some() && self.stub_rules_file.is_some() {
            problems.push((
                "stub_rules_file",
                "[llm] has both stub_rules and stub_rules_file; give the rules in one of them"
                    .to_owned(),
            ));
        }
        problems
    }
}

impl Problems for DefaultsConfig {}
impl Problems for PluginConfig {}
impl Problems for StoreConfig {}

/// Whether `name` could be an environment variable's name.
pub(crate) fn is_env_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Collects errors located in one config text.
struct Checker<'t> {
    path: &'t Path,
    text: &'t str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// Records an error at the start of `span`.
    fn error(&mut self, kind: Kind, span: Range<usize>, message: String) {
        self.errors.push(ConfigError::in_text(
            kind, self.path, self.text, span, message,
        ));
    }

    /// The errors so far (at least one is expected).
    fn finish(self) -> ConfigErrors {
        let path = self.path.to_owned();
        ConfigErrors::from_vec(self.errors).unwrap_or_else(|| {
            ConfigErrors::one(ConfigError {
                kind: Kind::Syntax,
                location: Location::WholeFile { path },
                message: "the file could not be parsed".to_owned(),
            })
        })
    }

    /// `value` as a table, or an error saying a table was expected.
    fn as_table<'v, 'i>(
        &mut self,
        value: &'v Spanned<DeValue<'i>>,
        section: &Section,
    ) -> Option<&'v DeTable<'i>> {
        let table = value.get_ref().as_table();
        if table.is_none() {
            self.error(
                Kind::InvalidValue,
                value.span(),
                format!(
                    "{section} must be a table, found {}; write it as a [{section}] section",
                    with_article(value.get_ref().type_str())
                ),
            );
        }
        table
    }

    /// The span of the value of `key` inside table `parent.child`, when present.
    fn value_span(&self, parent: &DeTable<'_>, child: &str, key: &str) -> Option<Range<usize>> {
        parent
            .get(child)?
            .get_ref()
            .as_table()?
            .get(key)
            .map(Spanned::span)
    }

    /// Reports a reference to a plugin that is neither built in nor declared.
    fn unknown_plugin(
        &mut self,
        span: Range<usize>,
        name: &str,
        what: &str,
        known: &BTreeSet<String>,
    ) {
        let known: Vec<_> = known.iter().map(String::as_str).collect();
        self.error(
            Kind::UnknownPlugin,
            span,
            format!(
                "{what} names unknown plugin {name:?}; declare it as [plugins.{name}] with a path, or use one of: {}",
                known.join(", ")
            ),
        );
    }

    /// Checks the section `key` of `parent` (if present) as a `T`; its default when absent.
    fn optional_section<T: DeserializeOwned + Default + Problems>(
        &mut self,
        parent: &DeTable<'_>,
        parent_section: &Section,
        key: &str,
        nested: &[&str],
    ) -> Option<T> {
        let Some(value) = parent.get(key) else {
            return Some(T::default());
        };
        let section = parent_section.child(key);
        let table = self.as_table(value, &section)?;
        self.section(table, value.span(), &section, nested)
    }

    /// Checks `[section.quotas]` inside `table`.
    fn quotas(&mut self, table: &DeTable<'_>, section: &Section) -> Option<QuotasOverride> {
        self.optional_section::<QuotasOverride>(table, section, "quotas", &[])
    }

    /// Checks the table `key` of `table` as string key/values: each non-string is an error.
    fn string_map(
        &mut self,
        table: &DeTable<'_>,
        section: &Section,
        key: &str,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        let Some(value) = table.get(key) else {
            return Some(Default::default());
        };
        let section = section.child(key);
        let map = self.as_table(value, &section)?;
        let mut strings = Some(std::collections::BTreeMap::new());
        for (key, value) in map {
            let key = key.get_ref().as_ref();
            match (value.get_ref().as_str(), strings.as_mut()) {
                (Some(text), Some(strings)) => {
                    strings.insert(key.to_owned(), text.to_owned());
                }
                (Some(_), None) => {}
                (None, _) => {
                    let found = value.get_ref().type_str();
                    let shown = &self.text[value.span()];
                    let hint = if shown.contains('\n') || shown.len() > 40 {
                        String::new()
                    } else {
                        format!(", e.g. {} = {:?}", Section::top().child(key), shown)
                    };
                    self.error(
                        Kind::InvalidValue,
                        value.span(),
                        format!(
                            "{key:?} {} must be a string, found {}; plugin config values are strings: quote it{hint}",
                            section.where_(),
                            with_article(found)
                        ),
                    );
                    strings = None;
                }
            }
        }
        strings
    }

    /// Checks `table` as the section `T`: unknown keys, then each known key alone (except the
    /// `nested` ones, which the caller checks), then the values' ranges. `Some` when all fine.
    fn section<T: DeserializeOwned + Problems>(
        &mut self,
        table: &DeTable<'_>,
        span: Range<usize>,
        section: &Section,
        nested: &[&str],
    ) -> Option<T> {
        let fields = struct_fields::<T>();
        let errors_before = self.errors.len();
        let mut refused: Vec<&str> = Vec::new();
        let mut mistyped: Vec<&str> = Vec::new();
        for (key, value) in table {
            let name = key.get_ref().as_ref();
            if !fields.contains(&name) {
                refused.push(name);
                let mut message = format!(
                    "unknown key {name:?} {}; expected one of: {}",
                    section.where_(),
                    fields.join(", ")
                );
                if let Some(near) = closest(name, fields) {
                    message.push_str(&format!(" (did you mean {near:?}?)"));
                } else if !section.is_top() && struct_fields::<HostConfig>().contains(&name) {
                    message.push_str(&format!(
                        " ({name:?} is a top-level key: keys below a [section] header belong to \
                         that section, so move it above the first header)"
                    ));
                }
                self.error(Kind::UnknownKey, key.span(), message);
                continue;
            }
            if nested.contains(&name) {
                continue;
            }
            let alone: DeTable<'_> = std::iter::once((key.clone(), value.clone())).collect();
            if let Err(err) = deserialize_table::<T>(alone, span.clone()) {
                let message = format!(
                    "invalid value for {name:?} {}: {}",
                    section.where_(),
                    humanize(err.message())
                );
                self.error(Kind::InvalidValue, value.span(), message);
                refused.push(name);
                mistyped.push(name);
            }
        }
        if self.errors.len() > errors_before {
            // The other keys' ranges are checked all the same (the refused ones at their
            // defaults), so one run lists every error of the section.
            let rest: DeTable<'_> = table
                .iter()
                .filter(|(key, _)| {
                    let name = key.get_ref().as_ref();
                    !nested.contains(&name) && !refused.contains(&name)
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            if let Ok(parsed) = deserialize_table::<T>(rest, span.clone()) {
                // A check that names a refused key would compare against its default, not
                // what the file meant: left for the next run.
                for (key, message) in parsed.problems() {
                    let names_a_mistyped_key = message
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .any(|word| mistyped.contains(&word));
                    if names_a_mistyped_key {
                        continue;
                    }
                    let at = table.get(key).map_or_else(|| span.clone(), Spanned::span);
                    self.error(Kind::InvalidValue, at, message);
                }
            }
            return None;
        }
        let without_nested: DeTable<'_> = table
            .iter()
            .filter(|(key, _)| !nested.contains(&key.get_ref().as_ref()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let parsed = match deserialize_table::<T>(without_nested, span.clone()) {
            Ok(parsed) => parsed,
            Err(err) => {
                let message = format!("{} is invalid: {}", section, humanize(err.message()));
                self.error(Kind::InvalidValue, err.span().unwrap_or(span), message);
                return None;
            }
        };
        let problems = parsed.problems();
        for (key, message) in &problems {
            let at = table.get(*key).map_or_else(|| span.clone(), Spanned::span);
            self.error(Kind::InvalidValue, at, message.clone());
        }
        problems.is_empty().then_some(parsed)
    }
}

/// Deserializes `table` (spanning `span` in the text) as a `T`.
fn deserialize_table<T: DeserializeOwned>(
    table: DeTable<'_>,
    span: Range<usize>,
) -> Result<T, toml::de::Error> {
    T::deserialize(Spanned::new(span, DeValue::Table(table)).into_deserializer())
}

/// Rewrites serde's type names into words an operator reads.
pub(super) fn humanize(message: &str) -> String {
    let message = message.trim_end();
    message
        .strip_prefix("invalid value: ")
        .unwrap_or(message)
        .replace(
            "expected u64",
            "expected a whole number from 0 to 18446744073709551615",
        )
        .replace(
            "expected usize",
            "expected a whole number from 0 to 18446744073709551615",
        )
        .replace(
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        )
        .replace("expected a borrowed string", "expected a string")
}

/// `"an integer"`, `"a string"`: a TOML type name with its article.
fn with_article(type_name: &str) -> String {
    if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {type_name}")
    } else {
        format!("a {type_name}")
    }
}

/// The known key closest to a mistyped one, when it is close enough to be a typo.
fn closest<'f>(given: &str, known: &[&'f str]) -> Option<&'f str> {
    known
        .iter()
        .map(|k| (edit_distance(given, k), *k))
        .filter(|(distance, k)| *distance <= 2.max(k.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// Levenshtein distance between `a` and `b`, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// The field names a serde-derived struct `T` accepts, as it reports them to
/// `deserialize_struct` (serde-aux's introspection trick). Empty for non-structs.
pub(crate) fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};

    struct Introspect<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Stop;

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("introspection only")
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for Introspect<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Introspect(&mut fields));
    fields
}
