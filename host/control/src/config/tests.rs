//! Tests of the config file: what parses, and where each mistake is reported.

use std::path::Path;

use storehost_store::id::StoreId;
use storehost_store::quotas::Quotas;

use super::*;

/// The example shipped in `config/`, so this test keeps it correct.
const EXAMPLE: &str = include_str!("../../../../config/storehost.example.toml");

fn parse(text: &str) -> Result<HostConfig, ConfigErrors> {
    parse_str(text, "storehost.toml")
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => errors.into_vec(),
    }
}

/// The only error `text` has: `(kind, line, column, message)`.
fn only_error(text: &str) -> (ConfigErrorKind, usize, usize, String) {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got: {errors:#?}");
    let e = &errors[0];
    (
        e.kind,
        e.line().unwrap(),
        e.column().unwrap(),
        e.message.clone(),
    )
}

fn id(id: &str) -> StoreId {
    StoreId::new(id).unwrap()
}

#[test]
fn the_example_config_parses_and_says_what_it_shows() {
    let config =
        parse_str(EXAMPLE, "config/storehost.example.toml").unwrap_or_else(|e| panic!("{e}"));
    let specs = config.store_specs();
    assert_eq!(specs.len(), 2);
    let plain = &specs[&id("acme-support")];
    assert_eq!(plain.plugin, "agent");
    assert_eq!(plain.quotas, Quotas::default());
    let reports = &specs[&id("globex-reports")];
    assert_eq!(reports.plugin, "counter");
    assert_eq!(reports.quotas.memory, 128 << 20);
    assert_eq!(reports.quotas.disk, 4 << 30);
    assert_eq!(reports.quotas.burst, 100);
    assert_eq!(reports.quotas.cpu_ms_per_call, 1000);
    assert_eq!(reports.config["timezone"], "Europe/Berlin");
    assert_eq!(
        config.plugin_source("counter"),
        Some(PluginSource::File(
            Path::new("config/../target/wasm32-wasip2/release/counter_plugin.wasm").to_owned()
        ))
    );
    // The example documents the defaults: apart from its example parts, it is the default.
    let defaults = HostConfig::default();
    assert_eq!(config.listen, defaults.listen);
    assert_eq!(config.http, defaults.http);
    assert_eq!(config.retry, defaults.retry);
    assert_eq!(config.task_catch_up_ms, defaults.task_catch_up_ms);
    assert_eq!(config.default_quotas(), Quotas::default());
}

#[test]
fn the_embedded_default_runs_three_demo_stores_on_the_builtin_plugin() {
    let config = HostConfig::embedded_default();
    let specs = config.store_specs();
    let ids: Vec<_> = specs.keys().map(StoreId::as_str).collect();
    assert_eq!(ids, ["demo-alpha", "demo-beta", "demo-gamma"]);
    for spec in specs.values() {
        assert_eq!(spec.plugin, BUILTIN_PLUGIN);
        assert_eq!(spec.quotas, Quotas::default());
    }
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.data_dir, Path::new("./data"));
    assert_eq!(config.plugin_source("agent"), Some(PluginSource::Builtin));
    assert!(!config.is_env_store(&id("demo-beta")));
}

#[test]
fn an_empty_file_is_all_defaults() {
    let config = parse("").unwrap();
    assert_eq!(config, HostConfig::default());
    assert_eq!(config.http.max_body_bytes, 1 << 20);
    assert_eq!(config.admin_token_env, "STOREHOST_ADMIN_TOKEN");
    assert_eq!(config.durability, Durability::Process);
    assert!(config.store_specs().is_empty());
}

#[test]
fn every_key_can_be_set() {
    let config = parse(
        r#"
listen = "0.0.0.0:9000"
data_dir = "/var/lib/storehost"
admin_token_env = "MY_TOKEN"
max_stores = 5
durability = "power"
task_catch_up_ms = 5000
[http]
max_body_bytes = "2MiB"
max_connections = 10
header_read_timeout_ms = 500
shutdown_grace_ms = 0
[retry]
attempts = 1
base_delay_ms = 10
max_delay_ms = 10
[defaults]
plugin = "mine"
[plugins.mine]
path = "/opt/mine.wasm"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.durability, Durability::Power);
    assert_eq!(config.task_catch_up(), Duration::from_secs(5));
    assert_eq!(config.http.max_body_bytes, 2 << 20);
    assert_eq!(config.http.shutdown_grace_ms, 0);
    assert_eq!(config.retry.attempts, 1);
    assert_eq!(config.defaults.plugin, "mine");
    assert_eq!(
        config.plugin_source("mine"),
        Some(PluginSource::File("/opt/mine.wasm".into()))
    );
}

#[test]
fn a_syntax_error_is_one_error_at_its_position() {
    let (kind, line, column, message) =
        only_error("listen = \"127.0.0.1:8080\"\nmax_stores = = 3\n");
    assert_eq!(kind, ConfigErrorKind::Syntax);
    assert_eq!((line, column), (2, 14), "{message}");
    assert!(message.starts_with("TOML syntax error"), "{message}");
    let (kind, line, ..) = only_error("[http]\nmax_connections = 1\nmax_connections = 2\n");
    assert_eq!((kind, line), (ConfigErrorKind::Syntax, 3));
}

#[test]
fn unknown_keys_are_reported_with_the_known_ones() {
    let text =
        "lisen = \"127.0.0.1:1\"\n\n[stores.acme]\n[stores.acme.quotas]\nmemroy = \"1MiB\"\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(errors[0].kind, ConfigErrorKind::UnknownKey);
    assert_eq!((errors[0].line(), errors[0].column()), (Some(1), Some(1)));
    assert!(
        errors[0].message.contains("did you mean \"listen\""),
        "{}",
        errors[0]
    );
    assert_eq!(
        errors[1].to_string(),
        "storehost.toml:5:1: unknown key \"memroy\" in [stores.acme.quotas]; expected one of: \
         memory, fuel_per_call, cpu_ms_per_call, wall_ms_per_call, cpu_ms_per_minute, disk, files, db_cache, event_log, \
         events_per_second, burst, ingress_bytes_per_second, max_pending_events, llm_calls_per_minute (did you mean \"memory\"?)"
    );
    let (kind, line, column, message) = only_error("[http]\n  timeout = 5\n");
    assert_eq!((kind, line, column), (ConfigErrorKind::UnknownKey, 2, 3));
    assert!(message.contains("in [http]") && message.contains("header_read_timeout_ms"));
    let (_, line, _, message) = only_error("[http]\nmax_connections = 1\nmax_stores = 3\n");
    assert_eq!(line, 3);
    assert!(
        message.contains("move it above the first header"),
        "{message}"
    );
    let (kind, ..) = only_error("[plugins.x]\npath = \"x.wasm\"\nsha = \"abc\"\n");
    assert_eq!(kind, ConfigErrorKind::UnknownKey);
    let (kind, line, _, message) = only_error("[stores.acme]\nplugn = \"agent\"\n");
    assert_eq!((kind, line), (ConfigErrorKind::UnknownKey, 2));
    assert!(
        message.contains("expected one of: plugin, quotas, config"),
        "{message}"
    );
}

#[test]
fn values_of_the_wrong_type_are_reported_at_the_value() {
    let (kind, line, column, message) = only_error("[http]\nmax_connections = \"many\"\n");
    assert_eq!((kind, line, column), (ConfigErrorKind::InvalidValue, 2, 19));
    assert!(
        message.contains("\"max_connections\" in [http]"),
        "{message}"
    );
    assert!(message.contains("whole number"), "{message}");

    let (_, line, column, message) = only_error("listen = \"localhost\"\n");
    assert_eq!((line, column), (1, 10));
    assert!(message.contains("\"127.0.0.1:8080\""), "{message}");

    let (_, _, _, message) = only_error("durability = \"disk\"\n");
    assert!(
        message.contains("process") && message.contains("power"),
        "{message}"
    );

    let (_, _, _, message) = only_error("[retry]\nattempts = -1\n");
    assert!(message.contains("\"attempts\" in [retry]"), "{message}");
}

#[test]
fn out_of_range_values_say_what_is_accepted() {
    let (kind, line, column, message) = only_error("[retry]\nattempts = 0\n");
    assert_eq!((kind, line, column), (ConfigErrorKind::InvalidValue, 2, 12));
    assert!(message.contains("at least 1"), "{message}");

    let (_, line, _, message) = only_error("[retry]\nbase_delay_ms = 500\nmax_delay_ms = 100\n");
    assert_eq!(line, 3);
    assert!(message.contains("at least base_delay_ms"), "{message}");

    let (_, line, _, message) = only_error("[retry]\nbase_delay_ms = 60000\n");
    assert_eq!(
        line, 1,
        "max_delay_ms is absent: blame the section: {message}"
    );

    let (_, line, _, message) = only_error("max_stores = 0\n");
    assert_eq!(line, 1);
    assert!(message.contains("at least 1"), "{message}");

    let (_, _, _, message) = only_error("[defaults.quotas]\nburst = 0\n");
    assert!(message.contains("burst = 0"), "{message}");

    let (_, _, _, message) = only_error("[defaults.quotas]\nmemory = \"1KiB\"\n");
    assert!(message.contains("at least 64KiB"), "{message}");

    let (_, _, _, message) = only_error("[defaults.quotas]\nevents_per_second = 5000000000\n");
    assert!(message.contains("4294967295"), "{message}");

    let (_, _, _, message) = only_error("admin_token_env = \"my token\"\n");
    assert!(message.contains("environment variable name"), "{message}");
}

#[test]
fn sizes_accept_bytes_and_units_and_refuse_the_rest_naming_the_key() {
    let config = parse(
        "[http]\nmax_body_bytes = 2048\n[defaults.quotas]\nmemory = \"32MiB\"\ndisk = \"10MB\"\n",
    )
    .unwrap();
    assert_eq!(config.http.max_body_bytes, 2048);
    assert_eq!(config.default_quotas().memory, 32 << 20);
    assert_eq!(config.default_quotas().disk, 10_000_000);

    let (kind, line, column, message) = only_error("[stores.acme.quotas]\nmemory = \"64XB\"\n");
    assert_eq!((kind, line, column), (ConfigErrorKind::InvalidValue, 2, 10));
    assert!(
        message.contains("\"memory\" in [stores.acme.quotas]"),
        "{message}"
    );
    assert!(
        message.contains("\"64MiB\"") && message.contains("\"10MB\""),
        "{message}"
    );

    for bad in ["-5", "1.5", "true", "\"1.5GiB\""] {
        let (kind, _, _, message) = only_error(&format!("[defaults.quotas]\ndisk = {bad}\n"));
        assert_eq!(kind, ConfigErrorKind::InvalidValue);
        assert!(
            message.contains("\"disk\"") && message.contains("\"512KiB\""),
            "{message}"
        );
    }
}

#[test]
fn a_store_override_is_merged_over_the_defaults() {
    let config = parse(
        r#"
[defaults.quotas]
memory = "32MiB"
fuel_per_call = 1000000

[stores.small]
[stores.big.quotas]
disk = "8GiB"
fuel_per_call = "unmetered"
"#,
    )
    .unwrap();
    let specs = config.store_specs();
    let small = &specs[&id("small")].quotas;
    assert_eq!(small.memory, 32 << 20);
    assert_eq!(small.fuel_per_call, Some(1_000_000));
    assert_eq!(small.disk, Quotas::default().disk);
    let big = &specs[&id("big")].quotas;
    assert_eq!(big.memory, 32 << 20, "inherited from [defaults.quotas]");
    assert_eq!(big.disk, 8 << 30);
    assert_eq!(big.fuel_per_call, None);
    assert_eq!(big.burst, Quotas::default().burst);
}

#[test]
fn store_ids_follow_the_rule_and_the_error_quotes_it() {
    let (kind, line, column, message) = only_error("[stores.ab]\n");
    assert_eq!(
        (kind, line, column),
        (ConfigErrorKind::InvalidStoreId, 1, 9)
    );
    assert!(
        message.contains(storehost_store::id::STORE_ID_RULE),
        "{message}"
    );
    let (kind, ..) = only_error("[stores.\"../etc\"]\n");
    assert_eq!(kind, ConfigErrorKind::InvalidStoreId);
}

#[test]
fn plugins_need_a_valid_name_a_path_and_must_exist_when_named() {
    let (kind, line, column, message) = only_error("[plugins.My_Plugin]\npath = \"a.wasm\"\n");
    assert_eq!(
        (kind, line, column),
        (ConfigErrorKind::InvalidPluginName, 1, 10)
    );
    assert!(message.contains(PLUGIN_NAME_RULE), "{message}");

    let (kind, line, _, message) = only_error("[plugins.mine]\n");
    assert_eq!((kind, line), (ConfigErrorKind::MissingKey, 1));
    assert!(message.contains("add path ="), "{message}");

    let (kind, line, column, message) = only_error("[stores.acme]\nplugin = \"nope\"\n");
    assert_eq!(
        (kind, line, column),
        (ConfigErrorKind::UnknownPlugin, 2, 10)
    );
    assert!(
        message.contains("[plugins.nope]") && message.contains("agent"),
        "{message}"
    );

    let (kind, line, ..) = only_error("[defaults]\nplugin = \"nope\"\n");
    assert_eq!((kind, line), (ConfigErrorKind::UnknownPlugin, 2));

    let config = parse("[plugins.agent]\npath = \"agent-v2.wasm\"\n").unwrap();
    assert_eq!(
        config.plugin_source("agent"),
        Some(PluginSource::File("agent-v2.wasm".into())),
        "a declared agent replaces the built-in one"
    );
}

#[test]
fn plugin_config_values_must_be_strings() {
    let text = "[stores.acme.config]\nregion = \"eu\"\nretries = 3\nverbose = true\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!((errors[0].line(), errors[0].column()), (Some(3), Some(11)));
    assert!(
        errors[0]
            .message
            .contains("must be a string, found an integer"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].message.contains("retries = \"3\""),
        "{}",
        errors[0]
    );
    assert_eq!(errors[1].line(), Some(4));
}

#[test]
fn sections_must_be_tables() {
    let (kind, line, column, message) = only_error("http = 5\n");
    assert_eq!((kind, line, column), (ConfigErrorKind::InvalidValue, 1, 8));
    assert!(
        message.contains("http must be a table, found an integer"),
        "{message}"
    );
    let (_, _, _, message) = only_error("[[stores]]\nplugin = \"agent\"\n");
    assert!(message.contains("found an array"), "{message}");
}

#[test]
fn more_stores_than_max_stores_is_an_error() {
    let (kind, line, _, message) = only_error("max_stores = 1\n[stores.one]\n[stores.two]\n");
    assert_eq!((kind, line), (ConfigErrorKind::TooManyStores, 1));
    assert!(
        message.contains("2 stores but max_stores is 1"),
        "{message}"
    );
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let text = r#"
listen = "nowhere"
mystery = 1

[http]
max_connections = -3
header_read_timeout_ms = "soon"

[stores.okay]
plugin = "agent"

[stores.x]

[stores.broken.quotas]
memory = "lots"
burst = "many"

[stores.other]
plugin = "missing"
config = { a = 1 }
"#;
    let errors = errors(text);
    let lines: Vec<_> = errors.iter().map(|e| e.line().unwrap()).collect();
    assert_eq!(lines, [2, 3, 6, 7, 12, 15, 16, 19, 20], "{errors:#?}");
    let shown = parse(text).unwrap_err().to_string();
    assert_eq!(shown.lines().count(), 9, "{shown}");
    assert!(
        shown.lines().all(|l| l.starts_with("storehost.toml:")),
        "{shown}"
    );
}

#[test]
fn load_file_reads_a_file_and_resolves_plugin_paths_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    std::fs::write(&path, "[plugins.mine]\npath = \"plugins/mine.wasm\"\n").unwrap();
    let config = load_file(&path).unwrap();
    assert_eq!(
        config.plugin_source("mine"),
        Some(PluginSource::File(dir.path().join("plugins/mine.wasm")))
    );

    std::fs::write(&path, "max_stores = \"x\"\n").unwrap();
    let err = load_file(&path).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:1:14: ", path.display())),
        "{err}"
    );

    let missing = dir.path().join("absent.toml");
    let err = load_file(&missing).unwrap_err();
    assert_eq!(err.errors()[0].kind, ConfigErrorKind::Io);
    assert!(
        err.to_string().contains("cannot read the config file"),
        "{err}"
    );
}

#[test]
fn plugin_names_follow_their_rule() {
    for good in ["a", "agent", "my-plugin_2", &"x".repeat(64)] {
        assert!(validate_plugin_name(good).is_ok(), "{good}");
    }
    for bad in ["", "Agent", "-a", "_a", "a.b", "a/b", &"x".repeat(65)] {
        assert!(validate_plugin_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn retry_settings_become_the_store_retry_policy() {
    let config =
        parse("[retry]\nattempts = 3\nbase_delay_ms = 250\nmax_delay_ms = 1000\n").unwrap();
    let policy = config.retry.policy();
    assert_eq!(policy.attempts, 3);
    assert_eq!(policy.base_delay.as_millis(), 250);
    assert_eq!(policy.max_delay.as_millis(), 1000);
    assert_eq!(
        HostConfig::default().retry.policy(),
        storehost_store::RetryPolicy::default()
    );
}

#[test]
fn webhook_and_registry_sections_parse_and_check_their_values() {
    let example = parse_str(EXAMPLE, "config/storehost.example.toml").unwrap();
    assert_eq!(
        example.webhook,
        WebhookConfig::default(),
        "the example shows the defaults"
    );
    assert_eq!(example.registry, RegistryConfig::default());
    let config = parse(
        "[webhook]\nrequire_signature = true\ntolerance_secs = 60\n[registry]\nurl = \"http://auth-worker:8787\"\ngrace_period_ms = 0\nmax_removal_share = 0.25\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.webhook.require_signature);
    assert_eq!(config.webhook.tolerance_secs, 60);
    assert_eq!(config.webhook.requests_per_minute, 600);
    assert_eq!(
        config.registry.url.as_deref(),
        Some("http://auth-worker:8787")
    );
    assert_eq!(config.registry.grace_period_ms, 0);
    assert_eq!(config.registry.max_removal_share, 0.25);
    assert_eq!(config.registry.interval_ms, 300_000);

    let (kind, line, _, message) = only_error("[registry]\ninterval_ms = 1000\n");
    assert_eq!((kind, line), (ConfigErrorKind::InvalidValue, 2));
    assert!(message.contains("30000"), "{message}");
    let (_, line, _, message) = only_error("[registry]\n\nmax_removal_share = 2.0\n");
    assert_eq!(line, 3);
    assert!(message.contains("from 0 to 1"), "{message}");
    let (_, _, _, message) = only_error("[registry]\nurl = \"auth-worker\"\n");
    assert!(message.contains("http://"), "{message}");
    let (_, line, _, message) = only_error("[webhook]\nrequire_signatures = true\n");
    assert_eq!(line, 2);
    assert!(
        message.contains("did you mean \"require_signature\""),
        "{message}"
    );
    let (_, _, _, message) = only_error("[webhook]\ntolerance_secs = 0\n");
    assert!(message.contains("at least 1"), "{message}");
}

#[test]
fn values_that_would_weaken_replay_protection_or_waste_files_are_refused() {
    // Ids forgotten before the signature stops being accepted: a replay would apply twice.
    let (_, line, _, message) =
        only_error("[webhook]\ntolerance_secs = 7200\nreplay_retention_hours = 1\n");
    assert_eq!(line, 3);
    assert!(
        message.contains("replayed") && message.contains("7200"),
        "{message}"
    );
    let (_, _, _, message) = only_error("[webhook]\nreplay_retention_hours = 0\n");
    assert!(message.contains("less than tolerance_secs"), "{message}");
    let (_, _, _, message) =
        only_error("[webhook]\nreplay_retention_hours = 18446744073709551615\n");
    assert!(message.contains("ten years"), "{message}");
    parse("[webhook]\ntolerance_secs = 7200\nreplay_retention_hours = 2\n").unwrap();

    let (_, line, _, message) = only_error("max_stores = 100\nspare_stores = 5000\n");
    assert_eq!(line, 2);
    assert!(message.contains("at most max_stores"), "{message}");
    // The default number of spares stays valid under a small max_stores.
    parse("max_stores = 2\n").unwrap();
    parse("max_stores = 100\nspare_stores = 100\n").unwrap();
}

#[test]
fn a_store_config_llm_max_iterations_out_of_range_is_refused_like_the_variable() {
    for bad in ["0", "101", "ten"] {
        let text = format!("[stores.alpha-store]\nconfig = {{ LLM_MAX_ITERATIONS = \"{bad}\" }}\n");
        let (_, line, _, message) = only_error(&text);
        assert_eq!(line, 2, "{message}");
        assert!(
            message.contains("LLM_MAX_ITERATIONS") && message.contains("from 1 to 100"),
            "{message}"
        );
    }
    let config = parse(
        "[stores.alpha-store]\nconfig = { LLM_MAX_ITERATIONS = \"100\", other = \"any text\" }\n",
    )
    .unwrap();
    assert_eq!(
        config.stores[&id("alpha-store")].config["LLM_MAX_ITERATIONS"],
        "100"
    );
}

#[test]
fn llm_max_iterations_from_the_environment_reaches_every_store_unless_it_sets_its_own() {
    let mut config = parse(
        "[stores.alpha-store]\n\n[stores.beta-store]\nconfig = { LLM_MAX_ITERATIONS = \"4\" }\n",
    )
    .unwrap();
    let env = MapEnv::from_iter([("LLM_MAX_ITERATIONS", "7"), ("STORE_IDS", "gamma-store")]);
    let report = apply_env(&mut config, &env).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    let specs = config.store_specs();
    let iterations = |store: &str| specs[&id(store)].config.get("LLM_MAX_ITERATIONS").cloned();
    assert_eq!(iterations("alpha-store").as_deref(), Some("7"));
    assert_eq!(
        iterations("beta-store").as_deref(),
        Some("4"),
        "the store's own value wins"
    );
    assert_eq!(iterations("gamma-store").as_deref(), Some("7"));
    assert_eq!(
        config
            .default_spec()
            .config
            .get("LLM_MAX_ITERATIONS")
            .map(String::as_str),
        Some("7"),
        "stores added through the API or webhooks get it too"
    );
}

/// One run lists every error: a value of the wrong type in a section does not hide another
/// key's value out of range in the same section (each used to show only once the first was
/// fixed).
#[test]
fn a_wrong_type_does_not_hide_a_value_out_of_range_beside_it() {
    let errors =
        errors("listen = \"x\"\nmax_stores = 0\n[retry]\nattempts = 0\nmax_delay_ms = \"x\"\n");
    let lines: Vec<(usize, &str)> = errors
        .iter()
        .map(|e| (e.line().unwrap(), e.message.as_str()))
        .collect();
    assert_eq!(errors.len(), 4, "{lines:#?}");
    for (line, word) in [
        (1, "listen"),
        (2, "max_stores"),
        (4, "attempts"),
        (5, "max_delay_ms"),
    ] {
        assert!(
            lines
                .iter()
                .any(|(at, message)| *at == line && message.contains(word)),
            "no error about {word} on line {line}: {lines:#?}"
        );
    }
}

/// A range check comparing with a key whose value was refused is left out: it would compare
/// with that key's default, not with what the file meant.
#[test]
fn a_range_check_against_a_refused_value_is_left_out() {
    let (_, line, _, message) = only_error("[retry]\nbase_delay_ms = \"50\"\nmax_delay_ms = 80\n");
    assert_eq!(line, 2, "{message}");
    assert!(message.contains("base_delay_ms"), "{message}");
}

/// An unknown key hides no range error, even one whose message contains its name (a `store`
/// typo beside `max_stores = 0`).
#[test]
fn an_unknown_key_hides_no_range_error() {
    let errors = errors("max_stores = 0\n[store.x]\n");
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(errors.len(), 2, "{messages:#?}");
    assert!(
        messages.iter().any(|m| m.contains("max_stores = 0")),
        "{messages:#?}"
    );
}

/// One run lists every error: a bad value beside them hides neither `[defaults] plugin`
/// naming an unknown plugin nor `[llm] stub_rules` that do not parse (each used to show only
/// once the other was fixed).
#[test]
fn another_mistake_hides_neither_the_default_plugin_nor_the_stub_rules() {
    for (text, expected) in [
        (
            "[defaults]\nplugin = \"nope\"\n[defaults.quotas]\nmemory = 1\n",
            [(2, "unknown plugin \"nope\""), (4, "memory")],
        ),
        (
            "[llm]\nprovider = \"gpt\"\nstub_rules = \"{\"\n",
            [(2, "provider"), (3, "invalid stub_rules")],
        ),
    ] {
        let errors = errors(text);
        let found: Vec<(usize, &str)> = errors
            .iter()
            .map(|e| (e.line().unwrap(), e.message.as_str()))
            .collect();
        assert_eq!(errors.len(), 2, "{text}: {found:#?}");
        for ((line, message), (expected_line, words)) in found.iter().zip(expected) {
            assert_eq!(*line, expected_line, "{text}: {found:#?}");
            assert!(message.contains(words), "{text}: {found:#?}");
        }
    }
}
