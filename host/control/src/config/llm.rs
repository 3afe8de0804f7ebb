//! `[llm]`: which backend the plugins' `llm` capability uses (SPEC §8), and the host-wide
//! limits around it. Without the section: the offline rules provider with the demo rules.
//!
//! Environment overrides: `LLM_PROVIDER`, `LLM_BASE_URL`, `LLM_MODEL`, `LLM_API_KEY_ENV`
//! replace the keys of the same name; `LLM_STUB_RESPONSES` (rules JSON) replaces the stub's
//! rules. [`HostConfig::llm_service`] builds the provider and the service from all that.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use storehost_llm::openai::{DEFAULT_API_KEY_ENV, DEFAULT_BASE_URL, DEFAULT_MODEL};
use storehost_llm::{
    ErrorClass, LlmError, LlmLimits, LlmService, MaxTokensField, OpenAiConfig, OpenAiProvider,
    Provider, StubProvider,
};

use super::HostConfig;
use super::env::Env;

/// Which backend answers the plugins' LLM calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum LlmProviderKind {
    /// Offline deterministic rules (`stub_rules`, `stub_rules_file`, `LLM_STUB_RESPONSES`, or
    /// the built-in demo rules).
    #[default]
    #[serde(rename = "stub")]
    Stub,
    /// An OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp).
    #[serde(rename = "openai")]
    OpenAi,
}

impl LlmProviderKind {
    /// The name used in the config and `LLM_PROVIDER`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stub => "stub",
            Self::OpenAi => "openai",
        }
    }
}

/// `[llm]`: the LLM backend and the host-wide limits of LLM calls. The per-store limit is the
/// `llm_calls_per_minute` quota.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// `"stub"` (offline rules, the default) or `"openai"`.
    pub provider: LlmProviderKind,
    /// `openai`: the API root; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// `openai`: the model name sent with each request.
    pub model: String,
    /// `openai`: name of the environment variable holding the API key; empty = send no key.
    pub api_key_env: String,
    /// `openai`: time one HTTP attempt may take, in milliseconds.
    pub timeout_ms: u64,
    /// `openai`: time a whole call may take, retries included, in milliseconds.
    pub deadline_ms: u64,
    /// `openai`: retries after a 429, 5xx, timeout or connection failure.
    pub max_retries: u32,
    /// `openai`: upper bound of the first retry's random wait, in ms (doubles per retry)...
    pub backoff_base_ms: u64,
    /// ...up to this many milliseconds.
    pub backoff_max_ms: u64,
    /// `openai`: the request field carrying the token limit, `"max_tokens"` (the default) or
    /// `"max_completion_tokens"` (OpenAI's o-series models refuse `max_tokens`).
    pub max_tokens_field: MaxTokensField,
    /// Most LLM calls in flight on the host at once (any provider).
    pub max_concurrent: usize,
    /// How long a call waits for one of those slots before failing `rate_limited`, in ms.
    pub queue_wait_ms: u64,
    /// Most tokens one completion may ask for (a plugin asking for more, or for no limit,
    /// asks for this many).
    pub max_tokens: u32,
    /// `stub`: the rules, as JSON text.
    pub stub_rules: Option<String>,
    /// `stub`: a file holding the rules JSON; after loading, relative paths are already
    /// resolved against the config file's directory.
    pub stub_rules_file: Option<PathBuf>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        let openai = OpenAiConfig::default();
        let limits = LlmLimits::default();
        Self {
            provider: LlmProviderKind::Stub,
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key_env: DEFAULT_API_KEY_ENV.to_owned(),
            timeout_ms: openai.timeout_ms,
            deadline_ms: openai.deadline_ms,
            max_retries: openai.max_retries,
            backoff_base_ms: openai.backoff_base_ms,
            backoff_max_ms: openai.backoff_max_ms,
            max_tokens_field: openai.max_tokens_field,
            max_concurrent: limits.max_concurrent,
            queue_wait_ms: limits.queue_wait_ms,
            max_tokens: limits.max_tokens,
            stub_rules: None,
            stub_rules_file: None,
        }
    }
}

impl LlmConfig {
    /// The HTTP provider's settings.
    pub fn openai_config(&self) -> OpenAiConfig {
        OpenAiConfig {
            base_url: self.base_url.clone(),
            model: self.model.clone(),
            api_key_env: (!self.api_key_env.is_empty()).then(|| self.api_key_env.clone()),
            timeout_ms: self.timeout_ms,
            deadline_ms: self.deadline_ms,
            max_retries: self.max_retries,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_ms: self.backoff_max_ms,
            max_tokens_field: self.max_tokens_field,
        }
    }
}

impl HostConfig {
    /// The LLM provider this config selects. `env` gives the API key variable (read now) —
    /// pass the same [`Env`] given to `apply_env`.
    ///
    /// The stub's rules come from `LLM_STUB_RESPONSES`, else `stub_rules`, else
    /// `stub_rules_file`, else the built-in demo rules.
    pub fn llm_provider(&self, env: &dyn Env) -> Result<Arc<dyn Provider>, LlmError> {
        let llm = &self.llm;
        match llm.provider {
            LlmProviderKind::OpenAi => {
                let provider = OpenAiProvider::with_env(llm.openai_config(), |name| env.var(name))?;
                Ok(Arc::new(provider))
            }
            LlmProviderKind::Stub => {
                let not_configured = |source: &str, err: storehost_llm::StubRulesError| {
                    LlmError::new(
                        ErrorClass::NotConfigured,
                        format!("{source}: {}", err.message),
                    )
                };
                let stub = if let Some(rules) = &self.env.llm_stub_responses {
                    StubProvider::from_value(&serde_json::Value::Object(rules.clone()))
                        .map_err(|e| not_configured("LLM_STUB_RESPONSES", e))?
                } else if let Some(rules) = &llm.stub_rules {
                    StubProvider::from_json(rules)
                        .map_err(|e| not_configured("[llm] stub_rules", e))?
                } else if let Some(path) = &llm.stub_rules_file {
                    StubProvider::from_file(path)
                        .map_err(|e| not_configured("[llm] stub_rules_file", e))?
                } else {
                    StubProvider::demo()
                };
                Ok(Arc::new(stub))
            }
        }
    }

    /// The provider behind the host's limits: `max_concurrent`/`queue_wait_ms` from `[llm]`,
    /// and `[defaults.quotas]` `llm_calls_per_minute` for stores whose quota is not set
    /// (set each store's with [`LlmService::set_store_limit`]).
    pub fn llm_service(&self, env: &dyn Env) -> Result<LlmService, LlmError> {
        let limits = LlmLimits {
            max_concurrent: self.llm.max_concurrent,
            queue_wait_ms: self.llm.queue_wait_ms,
            default_calls_per_minute: self.default_quotas().llm_calls_per_minute,
            max_tokens: self.llm.max_tokens,
        };
        Ok(LlmService::new(self.llm_provider(env)?, limits))
    }

    /// One line for the startup log: which LLM backend runs, with what.
    pub fn describe_llm(&self) -> String {
        let llm = &self.llm;
        match llm.provider {
            LlmProviderKind::OpenAi => {
                let key = if llm.api_key_env.is_empty() {
                    "no API key".to_owned()
                } else {
                    format!("API key from ${}", llm.api_key_env)
                };
                format!(
                    "openai-compatible server {} (model {}, {key}, deadline {} ms)",
                    llm.base_url, llm.model, llm.deadline_ms
                )
            }
            LlmProviderKind::Stub => {
                let rules = if self.env.llm_stub_responses.is_some() {
                    "rules from LLM_STUB_RESPONSES".to_owned()
                } else if llm.stub_rules.is_some() {
                    "rules from [llm] stub_rules".to_owned()
                } else if let Some(path) = &llm.stub_rules_file {
                    format!("rules from {}", path.display())
                } else {
                    "the built-in demo rules".to_owned()
                };
                format!("offline stub provider ({rules})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use storehost_llm::{ChatRequest, Message};

    use super::super::*;
    use super::*;

    fn parse(text: &str) -> Result<HostConfig, ConfigErrors> {
        parse_str(text, "storehost.toml")
    }

    /// The only error `text` has: `(line, message)`.
    fn only_error(text: &str) -> (usize, String) {
        let errors = parse(text).expect_err("expected an error").into_vec();
        assert_eq!(errors.len(), 1, "expected one error, got: {errors:#?}");
        (errors[0].line().unwrap(), errors[0].message.clone())
    }

    async fn reply(service: &LlmService, text: &str) -> Option<String> {
        let request = ChatRequest {
            messages: vec![Message::user(text)],
            ..ChatRequest::default()
        };
        service
            .complete("demo-alpha", request)
            .await
            .unwrap()
            .content
    }

    #[test]
    fn the_example_config_shows_the_llm_defaults() {
        let example = include_str!("../../../../config/storehost.example.toml");
        let config = parse_str(example, "config/storehost.example.toml").unwrap();
        assert_eq!(config.llm, LlmConfig::default());
    }

    #[tokio::test]
    async fn no_section_is_the_stub_with_the_demo_rules() {
        let config = HostConfig::embedded_default();
        assert_eq!(config.llm, LlmConfig::default());
        assert_eq!(config.llm.provider, LlmProviderKind::Stub);
        let service = config.llm_service(&MapEnv::default()).unwrap();
        let answer = service
            .complete(
                "demo-alpha",
                ChatRequest {
                    messages: vec![Message::user("create a task to water the plants")],
                    ..ChatRequest::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(answer.tool_calls[0].name, "create_task");
        assert_eq!(service.store_limit("demo-alpha"), 60);
        assert!(config.describe_llm().contains("demo rules"));
    }

    #[test]
    fn every_llm_key_can_be_set() {
        let config = parse(
            r#"
[llm]
provider = "openai"
base_url = "http://127.0.0.1:11434/v1"
model = "llama3.1"
api_key_env = ""
timeout_ms = 5000
deadline_ms = 9000
max_retries = 1
backoff_base_ms = 10
backoff_max_ms = 100
max_tokens_field = "max_completion_tokens"
max_concurrent = 4
queue_wait_ms = 0
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let llm = &config.llm;
        assert_eq!(llm.provider, LlmProviderKind::OpenAi);
        let openai = llm.openai_config();
        assert_eq!(openai.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(openai.model, "llama3.1");
        assert_eq!(
            openai.api_key_env, None,
            "an empty api_key_env sends no key"
        );
        assert_eq!((openai.timeout_ms, openai.deadline_ms), (5000, 9000));
        assert_eq!(openai.max_retries, 1);
        assert_eq!((openai.backoff_base_ms, openai.backoff_max_ms), (10, 100));
        assert_eq!(openai.max_tokens_field, MaxTokensField::MaxCompletionTokens);
        assert_eq!((llm.max_concurrent, llm.queue_wait_ms), (4, 0));
        assert!(config.describe_llm().contains("llama3.1"));
        config.llm_provider(&MapEnv::default()).unwrap();
    }

    #[test]
    fn llm_mistakes_are_reported_at_their_line() {
        let (line, message) = only_error("[llm]\nprovider = \"anthropic\"\n");
        assert_eq!(line, 2);
        assert!(
            message.contains("stub") && message.contains("openai"),
            "{message}"
        );

        let (line, message) = only_error("[llm]\nmodel = \"m\"\nbase_url = \"localhost:8080\"\n");
        assert_eq!(line, 3);
        assert!(message.contains("http://"), "{message}");

        let (line, message) =
            only_error("[llm]\nbase_url = \"https://user:s3cret@api.example.com/v1\"\n");
        assert_eq!(line, 2);
        assert!(
            message.contains("user name or password") && message.contains("api_key_env"),
            "says what is wrong and where the key goes: {message}"
        );
        assert!(
            !message.contains("s3cret"),
            "the secret is not repeated: {message}"
        );

        let (line, message) = only_error("[llm]\napi_key_env = \"sk-abc123-not-a-name\"\n");
        assert_eq!(line, 2);
        assert!(message.contains("not the key itself"), "{message}");

        let (line, message) = only_error("[llm]\n\nmax_concurrent = 0\n");
        assert_eq!(line, 3);
        assert!(message.contains("at least 1"), "{message}");
        let (line, message) = only_error("[llm]\nmax_tokens = 0\n");
        assert_eq!(line, 2);
        assert!(message.contains("max_tokens = 0"), "{message}");

        let (_, message) = only_error("[llm]\nbackoff_base_ms = 500\nbackoff_max_ms = 100\n");
        assert!(message.contains("at least backoff_base_ms"), "{message}");

        let (line, message) = only_error("[llm]\nmax_tokens_field = \"tokens\"\n");
        assert_eq!(line, 2);
        assert!(
            message.contains("max_tokens") && message.contains("max_completion_tokens"),
            "{message}"
        );

        let (line, message) = only_error("[llm]\nmodle = \"x\"\n");
        assert_eq!(line, 2);
        assert!(message.contains("did you mean \"model\""), "{message}");
    }

    #[test]
    fn inline_stub_rules_are_checked_where_they_are_written() {
        let config = parse(
            "[llm]\nstub_rules = '{\"rules\":[{\"match\":\"hi\",\"matchType\":\"exact\",\"response\":\"hello\"}]}'\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(config.describe_llm().contains("stub_rules"));

        let (line, message) = only_error(
            "[llm]\nprovider = \"stub\"\nstub_rules = '''\n{\"rules\": [{\"match\": \"hi\", \"matchType\": \"fuzzy\", \"response\": \"x\"}]}\n'''\n",
        );
        assert_eq!(line, 3);
        assert!(message.contains("rules[0].matchType"), "{message}");
        assert!(
            message.contains("\"exact\", \"includes\" or \"regex\""),
            "{message}"
        );

        let (line, message) =
            only_error("[llm]\nstub_rules = '{}'\nstub_rules_file = \"rules.json\"\n");
        assert_eq!(line, 3);
        assert!(message.contains("one of"), "{message}");
    }

    #[tokio::test]
    async fn a_stub_rules_file_is_read_relative_to_the_config_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("rules.json"),
            r#"{"rules":[{"match":"ping","matchType":"exact","response":"pong"}],"defaultResponse":"?"}"#,
        )
        .unwrap();
        let path = dir.path().join("storehost.toml");
        std::fs::write(&path, "[llm]\nstub_rules_file = \"rules.json\"\n").unwrap();
        let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.llm.stub_rules_file.as_deref(),
            Some(dir.path().join("rules.json").as_path())
        );
        let service = config.llm_service(&MapEnv::default()).unwrap();
        assert_eq!(reply(&service, "ping").await.as_deref(), Some("pong"));

        std::fs::write(&path, "[llm]\nstub_rules_file = \"missing.json\"\n").unwrap();
        let errors = load_file(&path).unwrap_err();
        assert_eq!(errors.len(), 1);
        let error = &errors.errors()[0];
        assert_eq!(error.line(), Some(2));
        assert!(error.message.contains("missing.json"), "{}", error.message);

        std::fs::write(dir.path().join("rules.json"), "{\"rules\": [{}]}").unwrap();
        std::fs::write(&path, "[llm]\nstub_rules_file = \"rules.json\"\n").unwrap();
        let message = load_file(&path).unwrap_err().to_string();
        assert!(message.contains("rules[0].match: is missing"), "{message}");
        assert!(
            message.starts_with(&format!("{}:2:", path.display())),
            "{message}"
        );
    }

    #[tokio::test]
    async fn the_environment_overrides_the_llm_section() {
        let mut config = parse("[llm]\nprovider = \"stub\"\nmodel = \"from-file\"\n").unwrap();
        let env = MapEnv::new([
            ("LLM_PROVIDER", "openai"),
            ("LLM_BASE_URL", "http://127.0.0.1:8000/v1/"),
            ("LLM_MODEL", "qwen2.5"),
            ("LLM_API_KEY_ENV", "VLLM_KEY"),
            ("VLLM_KEY", "secret"),
        ]);
        let report = apply_env(&mut config, &env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            report.applied,
            [
                "LLM_PROVIDER",
                "LLM_BASE_URL",
                "LLM_MODEL",
                "LLM_API_KEY_ENV"
            ]
        );
        assert_eq!(config.llm.provider, LlmProviderKind::OpenAi);
        assert_eq!(config.llm.base_url, "http://127.0.0.1:8000/v1");
        assert_eq!(config.llm.model, "qwen2.5");
        assert_eq!(config.llm.api_key_env, "VLLM_KEY");
        config.llm_provider(&env).unwrap();
    }

    #[tokio::test]
    async fn stub_responses_from_the_environment_replace_the_rules() {
        let mut config =
            parse("[llm]\nstub_rules = '{\"rules\":[],\"defaultResponse\":\"from the file\"}'\n")
                .unwrap();
        let env = MapEnv::new([(
            "LLM_STUB_RESPONSES",
            r#"{"rules":[{"match":"hello","matchType":"includes","response":"from the environment"}]}"#,
        )]);
        apply_env(&mut config, &env).unwrap();
        let service = config.llm_service(&env).unwrap();
        assert_eq!(
            reply(&service, "well hello").await.as_deref(),
            Some("from the environment")
        );
        assert!(config.describe_llm().contains("LLM_STUB_RESPONSES"));
    }

    #[test]
    fn bad_llm_environment_values_are_refused_naming_the_variable() {
        let cases = [
            ("LLM_PROVIDER", "gpt", "expected \"stub\""),
            ("LLM_BASE_URL", "api.openai.com/v1", "http:// or https://"),
            ("LLM_API_KEY_ENV", "sk-123", "not the key itself"),
            (
                "LLM_BASE_URL",
                "https://user:s3cret@api.example.com/v1",
                "put the API key in the environment variable",
            ),
            (
                "LLM_STUB_RESPONSES",
                r#"{"rules":[{"match":"a","matchType":"exact"}]}"#,
                "rules[0].response: is missing",
            ),
        ];
        for (variable, value, expected) in cases {
            let mut config = HostConfig::default();
            let errors = apply_env(&mut config, &MapEnv::new([(variable, value)])).unwrap_err();
            assert_eq!(errors.len(), 1, "{errors}");
            assert_eq!(
                errors.errors()[0].location,
                Location::Env {
                    variable: variable.to_owned()
                }
            );
            let message = errors.to_string();
            assert!(message.contains(expected), "{variable}: {message}");
            assert!(!message.contains("s3cret"), "{variable}: {message}");
            assert_eq!(config, HostConfig::default(), "nothing applied");
        }
    }

    #[test]
    fn stub_responses_with_the_openai_provider_are_warned_about() {
        let mut config = parse("[llm]\nprovider = \"openai\"\n").unwrap();
        let env = MapEnv::new([("LLM_STUB_RESPONSES", r#"{"rules":[]}"#)]);
        let report = apply_env(&mut config, &env).unwrap();
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("LLM_STUB_RESPONSES")),
            "{:?}",
            report.warnings
        );
    }

    #[tokio::test]
    async fn an_unset_api_key_variable_fails_calls_not_startup() {
        let config = parse("[llm]\nprovider = \"openai\"\n").unwrap();
        let provider = config.llm_provider(&MapEnv::default()).unwrap();
        let err = provider
            .complete(ChatRequest {
                messages: vec![Message::user("hi")],
                ..ChatRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::NotConfigured);
        assert!(err.message.contains("OPENAI_API_KEY"), "{}", err.message);
    }
}
