//! The OpenAI-compatible HTTP backend: `POST {base_url}/chat/completions`, as spoken by
//! OpenAI, vLLM, Ollama and llama.cpp's server.
//!
//! Each attempt has its own timeout and the whole call a deadline: `deadline_ms`, or the
//! caller's (a plugin's invocation's wall time) when that comes first. 429, 5xx, 408, timeouts
//! and connection failures are retried with full-jitter exponential backoff; 401/403 and other
//! 4xx are not. An attempt that may be retried gets at most half of what is left of the call,
//! so a hung attempt leaves time for its retry; a 429's `Retry-After` is honoured when it takes
//! at most half of what is left, and otherwise the call ends at once as `rate_limited`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rand::Rng;
use serde::Deserialize;

use crate::Provider;
use crate::error::{ErrorClass, LlmError};
use crate::types::{ChatRequest, Completion, ToolCall};

/// Largest answer body read, in bytes; a bigger one is an invalid response.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Settings of an [`OpenAiProvider`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// The API root, like `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`;
    /// requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// The model name sent with each request.
    pub model: String,
    /// Name of the environment variable holding the API key (sent as `Authorization: Bearer`);
    /// `None` sends no key (local servers). Read once, when the provider is built.
    pub api_key_env: Option<String>,
    /// Time one HTTP attempt may take, in milliseconds.
    pub timeout_ms: u64,
    /// Time the whole call may take, retries and backoff included, in milliseconds.
    pub deadline_ms: u64,
    /// Retries after the first attempt (0 = one attempt only).
    pub max_retries: u32,
    /// Upper bound of the first backoff, in milliseconds; it doubles with each retry...
    pub backoff_base_ms: u64,
    /// ...up to this many milliseconds. Each actual wait is random below the bound.
    pub backoff_max_ms: u64,
    /// The request field that carries the most tokens the answer may have.
    pub max_tokens_field: MaxTokensField,
}

/// The request field that carries the most tokens the answer may have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// `max_tokens`: vLLM, Ollama, llama.cpp and OpenAI's older chat models.
    #[default]
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's newer models; its o-series reasoning models refuse
    /// `max_tokens`.
    MaxCompletionTokens,
}

impl MaxTokensField {
    /// The field's name in the request body (`"max_completion_tokens"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// Default `base_url`: OpenAI's API.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// Default `model`.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
/// Default `api_key_env`.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key_env: Some(DEFAULT_API_KEY_ENV.to_owned()),
            timeout_ms: 30_000,
            deadline_ms: 60_000,
            max_retries: 3,
            backoff_base_ms: 250,
            backoff_max_ms: 8_000,
            max_tokens_field: MaxTokensField::MaxTokens,
        }
    }
}

/// The OpenAI-compatible HTTP provider. Cheap to clone; calls run concurrently.
#[derive(Clone)]
pub struct OpenAiProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("endpoint", &self.inner.endpoint)
            .field("model", &self.inner.config.model)
            .field("api_key", &self.inner.api_key.describe())
            .finish()
    }
}

struct Inner {
    config: OpenAiConfig,
    /// `{base_url}/chat/completions`.
    endpoint: String,
    api_key: ApiKey,
    client: reqwest::Client,
}

/// The API key as found when the provider was built.
enum ApiKey {
    /// `api_key_env` is `None`: send no key.
    NotUsed,
    /// The variable's value.
    Present(String),
    /// The variable named here was unset or empty.
    Missing(String),
}

impl ApiKey {
    fn describe(&self) -> String {
        match self {
            Self::NotUsed => "none".to_owned(),
            Self::Present(_) => "<redacted>".to_owned(),
            Self::Missing(var) => format!("missing (${var} unset)"),
        }
    }
}

impl OpenAiProvider {
    /// A provider for `config`, reading the API key from the process environment.
    pub fn new(config: OpenAiConfig) -> Result<Self, LlmError> {
        Self::with_env(config, |name| std::env::var(name).ok())
    }

    /// A provider for `config`, reading the API key variable through `env` (for tests, and
    /// for callers that read the environment through their own abstraction).
    ///
    /// A missing key is not an error here: each call then fails with `not_configured`, so a
    /// host can start and report the problem where the plugin sees it.
    pub fn with_env(
        config: OpenAiConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, LlmError> {
        let base_url = validate_base_url(&config.base_url)?;
        if config.model.trim().is_empty() {
            return Err(LlmError::new(
                ErrorClass::NotConfigured,
                "the LLM model name is empty; set model to the name your server serves (like \"gpt-4o-mini\" or \"llama3.1\")",
            ));
        }
        for (key, value) in [
            ("timeout_ms", config.timeout_ms),
            ("deadline_ms", config.deadline_ms),
        ] {
            if value == 0 {
                return Err(LlmError::new(
                    ErrorClass::NotConfigured,
                    format!("LLM {key} is 0, which would fail every call; set it to at least 1"),
                ));
            }
        }
        let api_key = match config.api_key_env.as_deref() {
            None => ApiKey::NotUsed,
            Some(var) => match env(var).map(|v| v.trim().to_owned()) {
                Some(key) if !key.is_empty() => ApiKey::Present(key),
                _ => ApiKey::Missing(var.to_owned()),
            },
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("storehost/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(10_000)))
            .build()
            .map_err(|err| {
                LlmError::new(
                    ErrorClass::NotConfigured,
                    format!(
                        "cannot build the HTTP client for the LLM provider: {}",
                        error_chain(&err)
                    ),
                )
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint: format!("{base_url}/chat/completions"),
                config,
                api_key,
                client,
            }),
        })
    }

    /// The URL requests are posted to.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The settings it was built with.
    pub fn config(&self) -> &OpenAiConfig {
        &self.inner.config
    }
}

impl Provider for OpenAiProvider {
    fn complete(&self, req: ChatRequest) -> BoxFuture<'static, Result<Completion, LlmError>> {
        self.complete_by(req, None)
    }

    fn complete_by(
        &self,
        req: ChatRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'static, Result<Completion, LlmError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.complete(req, deadline).await })
    }
}

/// When a call must end: its own `deadline_ms`, or its caller's deadline when that comes
/// first.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// `deadline_ms` after the call began.
    Own { at: Instant, ms: u64 },
    /// The caller's, `ms` after the call began.
    Caller { at: Instant, ms: u128 },
}

impl Deadline {
    fn at(self) -> Instant {
        match self {
            Self::Own { at, .. } | Self::Caller { at, .. } => at,
        }
    }

    /// The deadline, as an error message names it.
    fn describe(self) -> String {
        match self {
            Self::Own { ms, .. } => format!("the call's deadline of {ms} ms (deadline_ms)"),
            Self::Caller { ms, .. } => format!(
                "the end of the {ms} ms its caller allowed (for a plugin: what its invocation had left of wall_ms_per_call)"
            ),
        }
    }

    /// What to raise for more time.
    fn advice(self) -> &'static str {
        match self {
            Self::Own { .. } => "raise deadline_ms",
            Self::Caller { .. } => "raise the store's wall_ms_per_call",
        }
    }
}

/// The shortest time an attempt that may be retried gets (unless less is left): halving what
/// is left must not end in a burst of attempts too short to be answered.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// What to do about a `base_url` holding a user name or password; the URL itself is not
/// repeated, since it holds a secret.
pub const CREDENTIALS_IN_BASE_URL: &str = "has a user name or password in it (user:secret@host); credentials do not belong in the URL, which is logged: give the API root without them, and put the API key in the environment variable that api_key_env names (it is sent as Authorization: Bearer)";

/// Whether `base_url` carries credentials (`https://user:secret@host/v1`): an `@` in the part
/// between `//` and the path.
pub fn base_url_has_credentials(base_url: &str) -> bool {
    base_url
        .split_once("//")
        .and_then(|(_, rest)| rest.split(['/', '?', '#']).next())
        .is_some_and(|authority| authority.contains('@'))
}

/// `base_url` without its trailing '/', or why it cannot be used.
fn validate_base_url(base_url: &str) -> Result<String, LlmError> {
    if base_url_has_credentials(base_url) {
        return Err(LlmError::new(
            ErrorClass::NotConfigured,
            format!("LLM base_url {CREDENTIALS_IN_BASE_URL}"),
        ));
    }
    let trimmed = base_url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    let host = rest.and_then(|rest| rest.split(['/', '?', '#']).next());
    let valid = host.is_some_and(|h| !h.is_empty())
        && !trimmed.chars().any(char::is_whitespace)
        && reqwest::Url::parse(trimmed).is_ok();
    if valid {
        Ok(trimmed.to_owned())
    } else {
        Err(LlmError::new(
            ErrorClass::NotConfigured,
            format!(
                "LLM base_url {base_url:?} is not an http:// or https:// URL with a host; give the API root, like \"https://api.openai.com/v1\" or \"http://127.0.0.1:11434/v1\" (requests go to <base_url>/chat/completions)"
            ),
        ))
    }
}

/// What one attempt came to.
enum Attempt {
    /// A final answer or a failure that retrying cannot fix.
    Done(Result<Completion, LlmError>),
    /// A failure worth another attempt, with the server's requested wait if it gave one.
    Retry {
        error: LlmError,
        retry_after: Option<Duration>,
    },
}

impl Inner {
    /// [`Self::call`], with the endpoint kept out of the error: the message goes to the
    /// tenant's plugin, while the endpoint is the operator's business (and a reqwest or TLS
    /// error may still name it). The host log gets the failure with the endpoint.
    async fn complete(
        &self,
        req: ChatRequest,
        caller_deadline: Option<Instant>,
    ) -> Result<Completion, LlmError> {
        self.call(req, caller_deadline).await.map_err(|mut error| {
            tracing::warn!(
                endpoint = %self.endpoint,
                class = error.class.as_str(),
                status = error.status,
                "LLM call failed: {}",
                // The provider's message may echo the plugin's text: kept on one line.
                error.message.escape_debug()
            );
            error.message = self.without_endpoint(&error.message);
            error
        })
    }

    /// `message` with the endpoint, the base URL and the server's host replaced by "the LLM
    /// server".
    fn without_endpoint(&self, message: &str) -> String {
        let mut names = vec![self.endpoint.clone()];
        if let Some(base) = self.endpoint.strip_suffix("/chat/completions") {
            names.push(base.to_owned());
        }
        if let Ok(url) = reqwest::Url::parse(&self.endpoint)
            && let Some(host) = url.host_str()
        {
            if let Some(port) = url.port() {
                names.push(format!("{host}:{port}"));
            }
            // A bare name like "llm" could be part of ordinary words; a dotted name or an
            // address cannot.
            if host.contains(['.', ':']) {
                names.push(host.to_owned());
            }
        }
        names.iter().fold(message.to_owned(), |text, name| {
            text.replace(name.as_str(), "the LLM server")
        })
    }

    async fn call(
        &self,
        req: ChatRequest,
        caller_deadline: Option<Instant>,
    ) -> Result<Completion, LlmError> {
        let key = match &self.api_key {
            ApiKey::NotUsed => None,
            ApiKey::Present(key) => Some(key.as_str()),
            ApiKey::Missing(var) => {
                return Err(LlmError::new(
                    ErrorClass::NotConfigured,
                    format!(
                        "the LLM API key variable {var} was not set when storehost started; set {var} to your API key and restart, or set api_key_env = \"\" in [llm] for a server that needs no key"
                    ),
                ));
            }
        };
        let body = self.request_body(req)?;
        let started = Instant::now();
        let own_deadline = started + Duration::from_millis(self.config.deadline_ms);
        let deadline = match caller_deadline {
            Some(caller) if caller < own_deadline => Deadline::Caller {
                at: caller,
                ms: caller.saturating_duration_since(started).as_millis(),
            },
            _ => Deadline::Own {
                at: own_deadline,
                ms: self.config.deadline_ms,
            },
        };
        let per_attempt = Duration::from_millis(self.config.timeout_ms);
        let mut attempts: u32 = 0;
        loop {
            let remaining = deadline.at().saturating_duration_since(Instant::now());
            // An attempt that may be retried gets at most half of what is left (but at least
            // MIN_ATTEMPT), so a hung attempt leaves time for the retry that may fix it; the
            // last one gets all of it.
            let share = if attempts < self.config.max_retries {
                (remaining / 2).max(MIN_ATTEMPT.min(remaining))
            } else {
                remaining
            };
            let timeout = per_attempt.min(share);
            attempts += 1;
            let outcome = match tokio::time::timeout(timeout, self.attempt(&body, key)).await {
                Ok(outcome) => outcome,
                Err(_) => Attempt::Retry {
                    error: LlmError::new(
                        ErrorClass::Timeout,
                        if timeout == per_attempt {
                            format!(
                                "no answer from the LLM server within {} ms (timeout_ms); the server is slow or overloaded: raise timeout_ms, or use a faster model or server",
                                self.config.timeout_ms
                            )
                        } else if timeout == remaining {
                            format!(
                                "no answer from the LLM server before {}; the server is slow or overloaded: {}, or use a faster model or server",
                                deadline.describe(),
                                deadline.advice()
                            )
                        } else {
                            format!(
                                "no answer from the LLM server within {} ms, half of what was left before {}, so that a retry had time; the server is slow or overloaded: {}, or use a faster model or server",
                                timeout.as_millis(),
                                deadline.describe(),
                                deadline.advice()
                            )
                        },
                    ),
                    retry_after: None,
                },
            };
            let (error, retry_after) = match outcome {
                Attempt::Done(result) => return result,
                Attempt::Retry { error, retry_after } => (error, retry_after),
            };
            let elapsed = started.elapsed().as_millis();
            if attempts > self.config.max_retries {
                return Err(gave_up(
                    error,
                    format!(
                        "gave up after {attempts} attempts in {elapsed} ms (max_retries = {})",
                        self.config.max_retries
                    ),
                ));
            }
            let remaining = deadline.at().saturating_duration_since(Instant::now());
            let delay = match retry_after {
                // Waiting more than half of what is left would leave the attempt after it
                // less time than the wait: the error, with its class and status, is more use
                // to the caller now than a timeout later (the wait would also hold a host-wide
                // LLM slot).
                Some(wait) if wait > remaining / 2 => {
                    return Err(LlmError {
                        class: error.class,
                        message: format!(
                            "{}; the server asks to wait {} ms (Retry-After) but only {} ms are left before {}, so storehost did not wait: try again later",
                            error.message,
                            wait.as_millis(),
                            remaining.as_millis(),
                            deadline.describe()
                        ),
                        status: error.status,
                    });
                }
                Some(wait) => wait,
                None => self.backoff(attempts),
            };
            if remaining.is_zero() || delay >= remaining {
                return Err(gave_up(
                    error,
                    format!(
                        "gave up after {attempts} attempts in {elapsed} ms: {} left no time for another",
                        deadline.describe()
                    ),
                ));
            }
            tracing::warn!(
                endpoint = %self.endpoint,
                attempt = attempts,
                delay_ms = delay.as_millis() as u64,
                class = error.class.as_str(),
                status = error.status,
                "LLM call failed, retrying: {}",
                // The provider's message may echo the plugin's text: kept on one line.
                error.message.escape_debug()
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// The JSON body of `req`, with the model, and its token limit in `max_tokens_field`.
    fn request_body(&self, req: ChatRequest) -> Result<serde_json::Value, LlmError> {
        let mut body = serde_json::to_value(&req).map_err(|err| {
            LlmError::new(
                ErrorClass::InvalidRequest,
                format!("the chat request cannot be sent: {err}"),
            )
        })?;
        if let Some(object) = body.as_object_mut() {
            object.insert(
                "model".to_owned(),
                serde_json::Value::String(self.config.model.clone()),
            );
            let field = self.config.max_tokens_field;
            if field != MaxTokensField::MaxTokens
                && let Some(limit) = object.remove(MaxTokensField::MaxTokens.as_str())
            {
                object.insert(field.as_str().to_owned(), limit);
            }
        }
        Ok(body)
    }

    /// A random wait for retry number `retry` (1-based): full jitter below
    /// `min(backoff_max, backoff_base * 2^(retry-1))`.
    fn backoff(&self, retry: u32) -> Duration {
        let doubling = 1u64
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u64::MAX);
        let bound = self
            .config
            .backoff_base_ms
            .saturating_mul(doubling)
            .min(self.config.backoff_max_ms);
        Duration::from_millis(rand::rng().random_range(0..=bound))
    }

    /// One HTTP request and its classified outcome.
    async fn attempt(&self, body: &serde_json::Value, key: Option<&str>) -> Attempt {
        let mut request = self.client.post(&self.endpoint).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => return self.send_failed(err),
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let bytes = match read_limited(response).await {
            Ok(bytes) => bytes,
            Err(ReadError::TooLarge) => {
                return Attempt::Done(Err(LlmError::new(
                    ErrorClass::InvalidResponse,
                    format!(
                        "the answer from the LLM server is larger than {} MiB; check that base_url points to a chat-completions API",
                        MAX_RESPONSE_BYTES >> 20
                    ),
                )
                .with_status(status)));
            }
            Err(ReadError::Http(err)) => {
                return Attempt::Retry {
                    error: LlmError::new(
                        if err.is_timeout() {
                            ErrorClass::Timeout
                        } else {
                            ErrorClass::Transient
                        },
                        format!(
                            "the answer from the LLM server broke off: {}",
                            error_chain(&err.without_url())
                        ),
                    )
                    .with_status(status),
                    retry_after: None,
                };
            }
        };
        if (200..300).contains(&status) {
            return Attempt::Done(
                parse_completion(&bytes, &self.config.model)
                    .map_err(|problem| {
                        LlmError::new(
                            ErrorClass::InvalidResponse,
                            format!(
                                "the answer from the LLM server is not a chat completion: {problem}; check that base_url is the API root of an OpenAI-compatible server (like http://host:port/v1)"
                            ),
                        )
                    })
                    .map_err(|e| e.with_status(status)),
            );
        }
        let said = server_message(&bytes);
        let error = |class, advice: &str| {
            LlmError::new(
                class,
                format!("the LLM server answered HTTP {status}: {said}; {advice}"),
            )
            .with_status(status)
        };
        match status {
            401 | 403 => Attempt::Done(Err(error(ErrorClass::Auth, &self.auth_advice()))),
            429 => Attempt::Retry {
                error: error(
                    ErrorClass::RateLimited,
                    "the LLM server is rate limiting: wait and try again, or raise your quota with the provider",
                ),
                retry_after,
            },
            408 => Attempt::Retry {
                error: error(
                    ErrorClass::Timeout,
                    "the LLM server timed out: try again, or use a faster model",
                ),
                retry_after: None,
            },
            500..=599 => Attempt::Retry {
                error: error(
                    ErrorClass::Transient,
                    "the LLM server failed: it may be overloaded or down; try again later",
                ),
                retry_after: None,
            },
            _ => Attempt::Done(Err(error(
                ErrorClass::InvalidRequest,
                &format!(
                    "the server refused the request: check the model name ({:?}) and the tool definitions",
                    self.config.model
                ),
            ))),
        }
    }

    fn auth_advice(&self) -> String {
        match &self.config.api_key_env {
            Some(var) => format!(
                "the server refused the API key: check that {var} holds a valid key for this server"
            ),
            None => "the server wants an API key: set api_key_env in [llm] to the name of the variable holding it".to_owned(),
        }
    }

    /// Classifies a request that got no answer.
    fn send_failed(&self, err: reqwest::Error) -> Attempt {
        // reqwest names the URL in its message: the endpoint goes to the host log, not to
        // the plugin (see `complete`).
        let err = err.without_url();
        let detail = error_chain(&err);
        let (class, advice) = if err.is_timeout() {
            (
                ErrorClass::Timeout,
                "the server did not answer in time: check it is not overloaded",
            )
        } else if err.is_connect() {
            (
                ErrorClass::Transient,
                "check base_url and that the LLM server is running and reachable",
            )
        } else if err.is_builder() {
            return Attempt::Done(Err(LlmError::new(
                ErrorClass::NotConfigured,
                format!("cannot build a request to the LLM server: {detail}; check base_url"),
            )));
        } else {
            (
                ErrorClass::Transient,
                "the connection to the LLM server failed: check the network and the server",
            )
        };
        Attempt::Retry {
            error: LlmError::new(
                class,
                format!("request to the LLM server failed: {detail}; {advice}"),
            ),
            retry_after: None,
        }
    }
}

/// The last retryable `error`, with why retrying stopped.
fn gave_up(error: LlmError, why: String) -> LlmError {
    LlmError {
        message: format!("{} ({why})", error.message),
        ..error
    }
}

/// `Retry-After` (seconds, possibly fractional) or `retry-after-ms`, when the server sent one.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let secs = text("retry-after")?.parse::<f64>().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

/// The response body, refusing more than [`MAX_RESPONSE_BYTES`].
async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Http)? {
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ReadError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// What an error body says: `error.message`, `error` as text, or the start of the body.
fn server_message(bytes: &[u8]) -> String {
    let parsed = serde_json::from_slice::<serde_json::Value>(bytes).ok();
    let from_json = parsed.as_ref().and_then(|json| {
        let error = json.get("error")?;
        error
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| error.as_str())
            .map(str::to_owned)
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(bytes).trim().to_owned());
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        cut(&text, 300)
    }
}

/// `text` cut to `max` characters, marked when cut.
fn cut(text: &str, max: usize) -> String {
    let mut shown: String = text.chars().take(max).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

/// `err` and its sources, joined by ": " (reqwest's own message alone says little).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[derive(Deserialize)]
struct WireCompletion {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// Reads a chat-completions answer; `model` stands in when the answer names none.
pub(crate) fn parse_completion(bytes: &[u8], model: &str) -> Result<Completion, String> {
    let wire: WireCompletion = serde_json::from_slice(bytes).map_err(|err| {
        let start = cut(String::from_utf8_lossy(bytes).trim(), 80);
        format!("it is not the expected JSON ({err}); it starts with {start:?}")
    })?;
    if let Some(error) = wire.error {
        let message = error
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| error.to_string());
        return Err(format!("it is an error: {}", cut(&message, 300)));
    }
    let choice = wire
        .choices
        .and_then(|choices| choices.into_iter().next())
        .ok_or("it has no choices")?;
    let message = choice.message.ok_or("its first choice has no message")?;
    let content = match message.content {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(text)) => Some(text),
        // Content parts: keep the text ones.
        Some(serde_json::Value::Array(parts)) => Some(
            parts
                .iter()
                .filter_map(|part| part.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join(""),
        ),
        Some(other) => {
            return Err(format!("its message content is {other}, not text"));
        }
    };
    let tool_calls: Vec<ToolCall> = message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, call)| ToolCall {
            id: call
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| format!("call_{index}")),
            name: call.function.name,
            // Some servers send the arguments as an object rather than JSON text.
            arguments: match call.function.arguments {
                None | Some(serde_json::Value::Null) => "{}".to_owned(),
                Some(serde_json::Value::String(text)) => text,
                Some(other) => other.to_string(),
            },
        })
        .collect();
    let finish_reason = choice.finish_reason.unwrap_or_else(|| {
        if tool_calls.is_empty() {
            "stop".to_owned()
        } else {
            "tool_calls".to_owned()
        }
    });
    let usage = wire.usage.unwrap_or(WireUsage {
        prompt_tokens: None,
        completion_tokens: None,
    });
    let tokens = |n: Option<u64>| u32::try_from(n.unwrap_or(0)).unwrap_or(u32::MAX);
    Ok(Completion {
        content,
        tool_calls,
        finish_reason,
        model: wire.model.unwrap_or_else(|| model.to_owned()),
        prompt_tokens: tokens(usage.prompt_tokens),
        completion_tokens: tokens(usage.completion_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_given_as_an_object_become_json_text_and_missing_ids_are_filled() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":null,
            "tool_calls":[{"function":{"name":"list_tasks","arguments":{"all":true}}}]}}]}"#;
        let completion = parse_completion(body, "m").unwrap();
        assert_eq!(completion.tool_calls[0].id, "call_0");
        assert_eq!(completion.tool_calls[0].arguments, r#"{"all":true}"#);
        assert_eq!(completion.finish_reason, "tool_calls");
        assert_eq!(completion.model, "m");
    }

    /// The server's finish reason is kept, also for an empty answer (a content filter's), so
    /// the plugin can tell a cut or filtered answer from a final one.
    #[test]
    fn the_finish_reason_is_kept() {
        for (body, reason) in [
            (
                br#"{"choices":[{"message":{"content":"half an ans"},"finish_reason":"length"}]}"#
                    .as_slice(),
                "length",
            ),
            (
                br#"{"choices":[{"message":{"content":""},"finish_reason":"content_filter"}]}"#,
                "content_filter",
            ),
        ] {
            assert_eq!(parse_completion(body, "m").unwrap().finish_reason, reason);
        }
    }

    #[test]
    fn a_200_carrying_an_error_object_is_an_invalid_response() {
        let problem =
            parse_completion(br#"{"error":{"message":"model not loaded"}}"#, "m").unwrap_err();
        assert!(problem.contains("model not loaded"), "{problem}");
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
        headers.clear();
        headers.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn base_urls_must_be_http_with_a_host() {
        assert_eq!(
            validate_base_url("http://127.0.0.1:8080/v1/").unwrap(),
            "http://127.0.0.1:8080/v1"
        );
        for bad in ["127.0.0.1:8080/v1", "ftp://x", "http://", "https:///v1"] {
            let err = validate_base_url(bad).unwrap_err();
            assert_eq!(err.class, ErrorClass::NotConfigured);
            assert!(err.message.contains("api.openai.com"), "{}", err.message);
        }
    }

    /// A base URL carrying credentials is refused, saying where the key goes instead and
    /// without repeating the secret (the URL is logged at start and named in errors).
    #[test]
    fn base_urls_with_credentials_are_refused_without_repeating_them() {
        for bad in [
            "https://user:s3cret@api.example.com/v1",
            "http://s3cret@127.0.0.1:8080/v1",
        ] {
            let err = validate_base_url(bad).unwrap_err();
            assert_eq!(err.class, ErrorClass::NotConfigured);
            assert!(!err.message.contains("s3cret"), "{}", err.message);
            assert!(err.message.contains("api_key_env"), "{}", err.message);
        }
        // An '@' in the path is not a credential.
        validate_base_url("http://127.0.0.1:8080/v1/@team").unwrap();
    }

    /// The error of a call to an endpoint that cannot be reached names neither the endpoint
    /// nor its host: the message goes to the tenant's plugin (reqwest's own message names the
    /// URL).
    #[tokio::test]
    async fn an_error_message_does_not_name_the_endpoint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let provider = OpenAiProvider::with_env(
            OpenAiConfig {
                base_url: format!("http://{address}/v1"),
                api_key_env: None,
                max_retries: 0,
                ..OpenAiConfig::default()
            },
            |_| None,
        )
        .unwrap();
        let req = ChatRequest {
            messages: vec![crate::Message::user("hi")],
            ..ChatRequest::default()
        };
        let err = provider.complete(req).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Transient, "{}", err.message);
        for named in ["127.0.0.1", &address.port().to_string(), "/v1"] {
            assert!(!err.message.contains(named), "{named}: {}", err.message);
        }
        assert!(err.message.contains("the LLM server"), "{}", err.message);
    }

    /// Retry `n` waits a random time in `[0, min(backoff_max, backoff_base * 2^(n-1))]`: never
    /// over the doubled bound nor the ceiling (however many retries, without overflow), the
    /// bound does grow with each retry, and the waits of one retry vary (jitter, so stores
    /// failing together do not retry together).
    #[test]
    fn backoff_is_full_jitter_below_a_doubling_bound_capped_at_the_maximum() {
        let provider = OpenAiProvider::with_env(
            OpenAiConfig {
                base_url: "http://127.0.0.1:1/v1".to_owned(),
                api_key_env: None,
                backoff_base_ms: 100,
                backoff_max_ms: 1_000,
                ..OpenAiConfig::default()
            },
            |_| None,
        )
        .unwrap();
        const SAMPLES: usize = 50;
        for (retry, bound_ms) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_000),
            (6, 1_000),
            (40, 1_000),
            (64, 1_000),
            (65, 1_000),
            (u32::MAX, 1_000),
        ] {
            let waits: Vec<Duration> = (0..SAMPLES)
                .map(|_| provider.inner.backoff(retry))
                .collect();
            let bound = Duration::from_millis(bound_ms);
            assert!(
                waits.iter().all(|wait| *wait <= bound),
                "retry {retry}: a wait over {bound:?}: {waits:?}"
            );
            assert!(
                waits.windows(2).any(|pair| pair[0] != pair[1]),
                "retry {retry}: {SAMPLES} equal waits, no jitter: {waits:?}"
            );
            if retry > 1 {
                // Uniform up to the bound: 50 waits all within half of it happen with a chance
                // below 2^-50, so the bound really doubled (or reached the ceiling).
                let half = Duration::from_millis(bound_ms / 2);
                assert!(
                    waits.iter().any(|wait| *wait > half),
                    "retry {retry}: every wait within {half:?}, half the expected bound: {waits:?}"
                );
            }
        }
    }
}
