//! Provisioning webhooks (`POST /webhooks/workspaces`, SPEC §6): authentication by shared
//! secret or Standard Webhooks signature, replay answers, and the store changes they ask for.
//!
//! The HTTP layer hands over the headers and the raw body; everything else — what is valid,
//! what a repeated `webhook-id` gets, which store starts or stops — is decided here.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use storehost_store::{STORE_ID_RULE, StoreId, sqlite::now_ms};
use subtle::ConstantTimeEq;

use crate::config::{Secret, WebhookConfig};
use crate::orchestrator::{ControlError, Orchestrator, StoreSource};
use crate::registry::WebhookAnswer;

/// How webhooks are authenticated and remembered.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `WEBHOOK_SECRET`; without it every webhook is refused (500: not configured).
    pub secret: Option<Secret>,
    /// Only signed webhooks are accepted.
    pub require_signature: bool,
    /// Largest clock difference of a signed webhook's timestamp.
    pub tolerance: Duration,
    /// How long a `webhook-id`'s answer is kept.
    pub replay_retention: Duration,
}

impl WebhookSettings {
    /// Settings from `[webhook]` and the secret from the environment.
    pub fn new(config: &WebhookConfig, secret: Option<Secret>) -> Self {
        Self {
            secret,
            require_signature: config.require_signature,
            tolerance: Duration::from_secs(config.tolerance_secs),
            replay_retention: Duration::from_secs(
                config.replay_retention_hours.saturating_mul(3600),
            ),
        }
    }
}

/// The parts of a webhook request that matter here.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookRequest<'a> {
    /// `X-Webhook-Secret`.
    pub secret: Option<&'a str>,
    /// `webhook-id`.
    pub id: Option<&'a str>,
    /// `webhook-timestamp` (seconds since the Unix epoch).
    pub timestamp: Option<&'a str>,
    /// `webhook-signature` (`v1,<base64>`, several separated by spaces).
    pub signature: Option<&'a str>,
    /// The raw body, exactly as received (signatures cover these bytes).
    pub body: &'a [u8],
}

/// A webhook request whose credentials [`Webhooks::authenticate`] accepted.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated<'a>(WebhookRequest<'a>);

/// What a webhook did to its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    /// `workspace.created` started the store.
    MonitoringStarted,
    /// `workspace.created` for a store that already runs.
    AlreadyMonitored,
    /// `workspace.deleted` stopped the store (its data archived).
    MonitoringStopped,
    /// `workspace.deleted` for a store that does not run.
    AlreadyStopped,
}

/// The 200 answer to a webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAccepted {
    /// What happened.
    pub status: WebhookStatus,
    /// The store (the payload's `instanceId`).
    pub store_id: String,
    /// When the host received the webhook (RFC 3339, UTC).
    pub received_at: String,
}

/// Why a webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum WebhookError {
    /// No `WEBHOOK_SECRET` is configured, so no webhook can be authenticated.
    #[error(
        "webhooks are not configured on this host: set WEBHOOK_SECRET to the secret the provisioning service uses"
    )]
    NotConfigured,
    /// Missing, wrong or expired credentials.
    #[error("Unauthorized: {0}")]
    Unauthorized(String),
    /// The body is not a webhook this host understands.
    #[error("{0}")]
    InvalidPayload(String),
    /// `instanceId` is not a valid store id.
    #[error("{0}")]
    InvalidStoreId(String),
    /// The store is declared in the config file or `STORE_IDS`; a webhook does not remove it.
    #[error("{0}")]
    ConfigOwned(String),
    /// `workspace.created` for a store the config declares whose start failed: 409 like
    /// [`WebhookError::ConfigOwned`], but not remembered (a retry succeeds once it runs).
    #[error("{0}")]
    ConfigStartFailed(String),
    /// The host runs its maximum of stores.
    #[error("{0}")]
    AtCapacity(String),
    /// The filesystem of the data directory is full: the store could not be created.
    #[error("{0}")]
    DiskFull(String),
    /// The host has as many files open as it may: the store could not be opened.
    #[error("{0}")]
    OutOfFiles(String),
    /// The host is shutting down and starts no more stores.
    #[error("{0}")]
    ShuttingDown(String),
    /// The store is placed on another host: this one does not start it.
    #[error("{0}")]
    PlacedElsewhere(String),
    /// The host failed (details in the log).
    #[error("{0}")]
    Internal(String),
}

impl WebhookError {
    /// The HTTP status this refusal answers with.
    pub fn status_code(&self) -> u16 {
        match self {
            WebhookError::NotConfigured | WebhookError::Internal(_) => 500,
            WebhookError::Unauthorized(_) => 401,
            WebhookError::InvalidPayload(_) => 400,
            WebhookError::InvalidStoreId(_) => 422,
            WebhookError::ConfigOwned(_) | WebhookError::ConfigStartFailed(_) => 409,
            WebhookError::AtCapacity(_)
            | WebhookError::OutOfFiles(_)
            | WebhookError::ShuttingDown(_) => 503,
            WebhookError::DiskFull(_) => 507,
            WebhookError::PlacedElsewhere(_) => 421,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            WebhookError::NotConfigured => "webhook_not_configured",
            WebhookError::Unauthorized(_) => "unauthorized",
            WebhookError::InvalidPayload(_) => "invalid_payload",
            WebhookError::InvalidStoreId(_) => "invalid_store_id",
            WebhookError::ConfigOwned(_) | WebhookError::ConfigStartFailed(_) => "config_owned",
            WebhookError::AtCapacity(_) => "at_capacity",
            WebhookError::DiskFull(_) => "disk_full",
            WebhookError::OutOfFiles(_) => "out_of_files",
            WebhookError::ShuttingDown(_) => "shutting_down",
            WebhookError::PlacedElsewhere(_) => "placed_elsewhere",
            WebhookError::Internal(_) => "internal",
        }
    }

    /// Whether a replay of the same `webhook-id` gets this answer again (a refusal that a
    /// retry could turn into success — capacity, host failure — is not remembered).
    fn is_final(&self) -> bool {
        matches!(
            self,
            WebhookError::InvalidPayload(_)
                | WebhookError::InvalidStoreId(_)
                | WebhookError::ConfigOwned(_)
        )
    }
}

/// The outcome of one webhook.
pub type WebhookResult = Result<WebhookAccepted, WebhookError>;

/// Handles provisioning webhooks.
pub struct Webhooks {
    orchestrator: Arc<Orchestrator>,
    settings: WebhookSettings,
    /// Serialises check-replay → apply → record, so two deliveries of one `webhook-id` at once
    /// still apply once.
    deliveries: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Webhooks that change `orchestrator`'s stores.
    pub fn new(orchestrator: Arc<Orchestrator>, settings: WebhookSettings) -> Self {
        Self {
            orchestrator,
            settings,
            deliveries: tokio::sync::Mutex::new(()),
        }
    }

    /// Checks the signature (when sent or required) or the shared secret: what
    /// [`Webhooks::handle`] takes. Done first, so a caller can pace requests that fail it apart
    /// from those that pass (a flood of forgeries must not use up a real sender's budget).
    pub fn authenticate<'a>(
        &self,
        request: WebhookRequest<'a>,
    ) -> Result<Authenticated<'a>, WebhookError> {
        self.check_credentials(&request, now_ms() / 1000)?;
        Ok(Authenticated(request))
    }

    /// Applies one authenticated webhook. A `webhook-id` seen before (within the retention)
    /// gets its first answer again and changes nothing.
    pub async fn handle(&self, request: Authenticated<'_>) -> WebhookResult {
        let Authenticated(request) = request;
        let now = now_ms();
        // A delivery is its id and its body: a sender that gave two messages one id (an id
        // that is not signed with them, beside X-Webhook-Secret) has each applied, where the
        // second got the first's answer and was lost.
        let replay_id = request
            .id
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(|id| format!("{id} {}", hex::encode(Sha256::digest(request.body))));
        let replay_id = replay_id.as_deref();
        let _serial = self.deliveries.lock().await;
        let not_before = now.saturating_sub(
            i64::try_from(self.settings.replay_retention.as_millis()).unwrap_or(i64::MAX),
        );
        if let Some(id) = replay_id {
            let registry = self.orchestrator.registry();
            // An answer kept under the id alone (before ids went with bodies).
            let legacy = request.id.map(str::trim).unwrap_or_default();
            let kept = registry
                .webhook_answer(id, not_before)
                .and_then(|answer| match answer {
                    Some(answer) => Ok(Some(answer)),
                    None => registry.webhook_answer(legacy, not_before),
                });
            match kept {
                Ok(Some(answer)) => {
                    if let Ok(first) = serde_json::from_str::<WebhookResult>(&answer.body) {
                        tracing::info!(
                            webhook_id = id,
                            "repeated webhook-id: first answer sent again"
                        );
                        return first;
                    }
                }
                Ok(None) => {}
                Err(err) => return Err(internal("reading webhook answers", &err)),
            }
        }
        let result = self.apply(request.body, now, not_before).await;
        if let Some(id) = replay_id {
            let remember = match &result {
                Ok(_) => Some(200),
                Err(err) if err.is_final() => Some(err.status_code()),
                Err(_) => None,
            };
            if let Some(status) = remember {
                let body = serde_json::to_string(&result).unwrap_or_default();
                let answer = WebhookAnswer { status, body };
                if let Err(err) = self
                    .orchestrator
                    .registry()
                    .record_webhook_answer(id, &answer, not_before)
                {
                    tracing::error!(
                        webhook_id = id,
                        "could not record the webhook answer: {err}"
                    );
                }
            }
        }
        result
    }

    /// Checks the signature (when sent or required) or the shared secret.
    fn check_credentials(
        &self,
        request: &WebhookRequest<'_>,
        now_secs: i64,
    ) -> Result<(), WebhookError> {
        let secret = self
            .settings
            .secret
            .as_ref()
            .ok_or(WebhookError::NotConfigured)?;
        if request.signature.is_some() || self.settings.require_signature {
            return verify_signature(secret, request, now_secs, self.settings.tolerance);
        }
        let given = request.secret.ok_or_else(|| {
            WebhookError::Unauthorized(
                "send X-Webhook-Secret, or sign the request (webhook-id, webhook-timestamp, webhook-signature)".into(),
            )
        })?;
        if constant_time_eq(given.as_bytes(), secret.expose().as_bytes()) {
            Ok(())
        } else {
            Err(WebhookError::Unauthorized(
                "X-Webhook-Secret does not match WEBHOOK_SECRET".into(),
            ))
        }
    }

    /// Parses the payload and starts or stops its store. A `workspace.created` older (by the
    /// payloads' `timestamp`) than a webhook applied to the store since `not_before` — one
    /// delayed, or retried after a failure, arriving after the `workspace.deleted` that
    /// followed it, which brought the deleted workspace's store back — changes nothing, and
    /// is answered with the store's state. A `workspace.deleted` always applies: stamped by a
    /// sender whose clock is behind the one that stamped the creation (within the tolerance),
    /// it was taken for older and the deleted workspace's store kept running.
    async fn apply(&self, body: &[u8], now: i64, not_before: i64) -> WebhookResult {
        let payload = parse_payload(body)?;
        let id = store_id(&payload.instance_id)?;
        let received_at = rfc3339(now);
        let accepted = |status| WebhookAccepted {
            status,
            store_id: id.to_string(),
            received_at: received_at.clone(),
        };
        let orchestrator = &self.orchestrator;
        let tolerance = i64::try_from(self.settings.tolerance.as_millis()).unwrap_or(i64::MAX);
        let timestamp = payload.timestamp.filter(|&at| {
            // One stamped ahead of the host's clock (a sender's clock skewed, a typo) would
            // hold back every later webhook of the store: it is put in no order.
            let ahead = at > now.saturating_add(tolerance);
            if ahead {
                tracing::warn!(store_id = %id, timestamp = %rfc3339(at), "a webhook's timestamp is ahead of the host's clock by more than the tolerance: it is applied in no order");
            }
            !ahead
        });
        if let Some(at) = timestamp.filter(|_| matches!(payload.event, Event::Created)) {
            match orchestrator.registry().webhook_event_at(&id, not_before) {
                Ok(Some(latest)) if at < latest => {
                    tracing::info!(
                        store_id = %id,
                        timestamp = %rfc3339(at),
                        latest = %rfc3339(latest),
                        "a webhook older than the latest applied to the store: it changes nothing"
                    );
                    return Ok(accepted(if orchestrator.spec(&id).await.is_some() {
                        WebhookStatus::AlreadyMonitored
                    } else {
                        WebhookStatus::AlreadyStopped
                    }));
                }
                Ok(_) => {}
                Err(err) => return Err(internal("reading the order of webhooks", &err)),
            }
        }
        let applied = self.change(&id, &payload, accepted).await;
        if applied.is_ok()
            && let Some(at) = timestamp
            && let Err(err) = orchestrator
                .registry()
                .record_webhook_event_at(&id, at, not_before)
        {
            tracing::error!(store_id = %id, "could not record the webhook's timestamp: {err}");
        }
        applied
    }

    /// Starts or stops store `id` as `payload` asks.
    async fn change(
        &self,
        id: &StoreId,
        payload: &Payload,
        accepted: impl Fn(WebhookStatus) -> WebhookAccepted,
    ) -> WebhookResult {
        let (orchestrator, id) = (&self.orchestrator, id.clone());
        match payload.event {
            Event::Created => {
                // A store whose start failed is tried again, as its owner had it.
                if orchestrator.spec(&id).await.is_some() {
                    return Ok(accepted(WebhookStatus::AlreadyMonitored));
                }
                match orchestrator.start_if_new(&id, StoreSource::Webhook).await {
                    Ok(crate::Provisioned::Created) => {
                        tracing::info!(store_id = %id, user_id = payload.user_id.as_deref().unwrap_or(""), "workspace.created: store started");
                        Ok(accepted(WebhookStatus::MonitoringStarted))
                    }
                    Ok(_) => Ok(accepted(WebhookStatus::AlreadyMonitored)),
                    Err(err @ ControlError::AtCapacity { .. }) => {
                        Err(WebhookError::AtCapacity(err.to_string()))
                    }
                    Err(err @ ControlError::ShuttingDown) => {
                        Err(WebhookError::ShuttingDown(err.to_string()))
                    }
                    // Not kept for replays: the store may be placed here later.
                    Err(err @ ControlError::PlacedElsewhere { .. }) => {
                        Err(WebhookError::PlacedElsewhere(err.to_string()))
                    }
                    // The config declares it and its start failed: the config restarts it.
                    Err(ControlError::ConfigOwned(refusal)) => {
                        Err(WebhookError::ConfigStartFailed(refusal))
                    }
                    Err(err) if err.is_disk_full() => {
                        tracing::error!(store_id = %id, "workspace.created: {err}");
                        Err(WebhookError::DiskFull(format!(
                            "the host's disk is full, so store {id} could not be created ({err}); \
                             free space on the filesystem of its data directory, then send the \
                             webhook again"
                        )))
                    }
                    Err(err) if err.is_out_of_files() => {
                        tracing::error!(store_id = %id, "workspace.created: {err}");
                        Err(WebhookError::OutOfFiles(format!(
                            "the host has as many files open as it may, so store {id} could \
                             not be created ({err}); send the webhook again in a few seconds, \
                             once stores have closed files (the host's open-file limit may \
                             need raising: its log says)"
                        )))
                    }
                    Err(err) => Err(internal("starting the store", &err)),
                }
            }
            Event::Deleted => match orchestrator.remove_unowned(&id, false).await {
                Ok(true) => Ok(accepted(WebhookStatus::MonitoringStopped)),
                Ok(false) => Ok(accepted(WebhookStatus::AlreadyStopped)),
                Err(ControlError::ConfigOwned(refusal)) => Err(WebhookError::ConfigOwned(refusal)),
                Err(err) => Err(internal("removing the store", &err)),
            },
        }
    }
}

fn internal(what: &str, err: &dyn std::fmt::Display) -> WebhookError {
    tracing::error!("webhook failed while {what}: {err}");
    WebhookError::Internal(format!(
        "the host failed while {what}; the host log has the details. Retry later"
    ))
}

enum Event {
    Created,
    Deleted,
}

struct Payload {
    event: Event,
    instance_id: String,
    user_id: Option<String>,
    /// When the event happened (ms since the Unix epoch), from an RFC 3339 `timestamp`;
    /// `None` without one.
    timestamp: Option<i64>,
}

/// Checks a webhook body the way a delivery is checked before it changes anything, and
/// answers the store id it names (the fuzz targets and tools use this).
pub fn check_payload(body: &[u8]) -> Result<String, WebhookError> {
    let payload = parse_payload(body)?;
    store_id(&payload.instance_id).map(|id| id.to_string())
}

/// The store `instanceId` names, taken as it is: one with spaces around it is refused saying
/// so, not trimmed (the reconciler reads the registry's ids as they are, and would take the
/// trimmed id's store for an orphan).
fn store_id(instance_id: &str) -> Result<StoreId, WebhookError> {
    StoreId::new(instance_id).map_err(|err| {
        let trimmed = instance_id.trim();
        let padded = if trimmed.len() == instance_id.len() {
            String::new()
        } else {
            format!(
                " (it has spaces around it: send {trimmed:?} if that is the workspace's id, as the registry lists it)"
            )
        };
        WebhookError::InvalidStoreId(format!(
            "instanceId {:?} is not a valid store id{padded}: {STORE_ID_RULE}",
            err.given
        ))
    })
}

/// `{"event","instanceId","userId","timestamp"}` with the reasons of the service this replaces.
fn parse_payload(body: &[u8]) -> Result<Payload, WebhookError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|err| WebhookError::InvalidPayload(format!("Invalid JSON payload: {err}")))?;
    let object = value.as_object().ok_or_else(|| {
        WebhookError::InvalidPayload(
            "Invalid JSON payload: expected an object like {\"event\":\"workspace.created\",\"instanceId\":\"…\"}".into(),
        )
    })?;
    let event = match object.get("event").and_then(|e| e.as_str()) {
        Some("workspace.created") => Event::Created,
        Some("workspace.deleted") => Event::Deleted,
        other => {
            return Err(WebhookError::InvalidPayload(format!(
                "Unsupported event type {}; expected \"workspace.created\" or \"workspace.deleted\"",
                other.map_or_else(|| "(none)".to_owned(), |e| format!("{e:?}"))
            )));
        }
    };
    let instance_id = match object.get("instanceId") {
        // Not trimmed: `store_id` refuses `" ws-1 "` saying why.
        Some(serde_json::Value::String(id)) if !id.trim().is_empty() => id.as_str(),
        // Given, but not as a string: say what it was (a number is not taken for its digits).
        Some(
            other @ (serde_json::Value::Number(_)
            | serde_json::Value::Bool(_)
            | serde_json::Value::Array(_)
            | serde_json::Value::Object(_)),
        ) => {
            return Err(WebhookError::InvalidPayload(format!(
                "instanceId is required as a string naming the workspace's store; got {}: send \"instanceId\":\"{}\" instead",
                json_kind(other),
                other.to_string().trim_matches('"')
            )));
        }
        _ => {
            return Err(WebhookError::InvalidPayload(
                "instanceId is required: a non-empty string naming the workspace's store".into(),
            ));
        }
    };
    Ok(Payload {
        event,
        instance_id: instance_id.to_owned(),
        user_id: object
            .get("userId")
            .and_then(|u| u.as_str())
            .map(str::to_owned),
        // Not required (the service this replaces did not read it): one that is not RFC 3339
        // puts the webhook in no order.
        timestamp: object
            .get("timestamp")
            .and_then(|t| t.as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok())
            .map(|t| t.timestamp_millis()),
    })
}

/// What kind of JSON value `value` is, for messages.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Standard Webhooks: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, any of several.
pub fn verify_signature(
    secret: &Secret,
    request: &WebhookRequest<'_>,
    now_secs: i64,
    tolerance: Duration,
) -> Result<(), WebhookError> {
    let (Some(id), Some(timestamp), Some(signatures)) =
        (request.id, request.timestamp, request.signature)
    else {
        return Err(WebhookError::Unauthorized(
            "a signed webhook needs webhook-id, webhook-timestamp and webhook-signature headers"
                .into(),
        ));
    };
    let sent_at: i64 = timestamp.trim().parse().map_err(|_| {
        WebhookError::Unauthorized(format!(
            "webhook-timestamp {timestamp:?} is not whole seconds since the Unix epoch"
        ))
    })?;
    let tolerance_secs = tolerance.as_secs();
    // No subtraction that can overflow: any i64 may come in, before the signature is checked.
    let skew = now_secs.abs_diff(sent_at);
    if skew > tolerance_secs {
        return Err(WebhookError::Unauthorized(format!(
            "webhook-timestamp is {skew} s away from the host's clock (tolerance {tolerance_secs} s); send it promptly and check the clocks"
        )));
    }
    let key = signing_key(secret);
    let expected = sign(&key, id, timestamp.trim(), request.body);
    let matches = signatures
        .split_whitespace()
        .filter_map(|sig| sig.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .any(|given| constant_time_eq(&given, &expected));
    if matches {
        Ok(())
    } else {
        Err(WebhookError::Unauthorized(
            "webhook-signature does not match the body signed with WEBHOOK_SECRET".into(),
        ))
    }
}

/// The HMAC key: a `whsec_<base64>` secret is decoded (the Standard Webhooks form); any other
/// secret is used as its bytes.
pub fn signing_key(secret: &Secret) -> Vec<u8> {
    let text = secret.expose();
    text.strip_prefix("whsec_")
        .and_then(|b64| BASE64.decode(b64).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// HMAC-SHA256 of `"{id}.{timestamp}.{body}"` under `key`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// The `webhook-signature` header value for a body (what a sender computes).
pub fn signature_header(secret: &Secret, id: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "v1,{}",
        BASE64.encode(sign(&signing_key(secret), id, timestamp, body))
    )
}

/// Compares in time independent of where the inputs differ (both are hashed first, so the
/// length does not leak either).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let a: [u8; 32] = Sha256::digest(a).into();
    let b: [u8; 32] = Sha256::digest(b).into();
    a.ct_eq(&b).into()
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds (`2026-01-02T03:04:05.678Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
    }

    #[test]
    fn the_standard_webhooks_test_vector_verifies() {
        // From the Standard Webhooks specification's reference libraries.
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let timestamp = "1614265330";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature_header(&secret, id, timestamp, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let request = WebhookRequest {
            id: Some(id),
            timestamp: Some(timestamp),
            signature: Some("v1,bm90IGl0 v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
            body,
            ..WebhookRequest::default()
        };
        let tolerance = Duration::from_secs(300);
        verify_signature(&secret, &request, 1_614_265_330, tolerance).unwrap();
        let late = verify_signature(&secret, &request, 1_614_265_330 + 301, tolerance);
        assert!(matches!(late, Err(WebhookError::Unauthorized(m)) if m.contains("tolerance")));
    }

    /// Any whole number is refused as out of tolerance, also those whose distance from the
    /// clock does not fit an i64: `now - i64::MIN` overflowed, and in a debug build (`cargo
    /// run`) an unauthenticated request panicked its handler.
    #[test]
    fn an_extreme_timestamp_is_refused_without_overflow() {
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        for timestamp in [i64::MIN.to_string(), i64::MAX.to_string()] {
            let request = WebhookRequest {
                id: Some("msg_1"),
                timestamp: Some(&timestamp),
                signature: Some("v1,AAAA"),
                body: b"{}",
                ..WebhookRequest::default()
            };
            for now in [0, 1_614_265_330, -1_000] {
                let refused = verify_signature(&secret, &request, now, Duration::from_secs(300));
                assert!(
                    matches!(&refused, Err(WebhookError::Unauthorized(m)) if m.contains("tolerance")),
                    "{timestamp} at {now}: {refused:?}"
                );
            }
        }
    }

    #[test]
    fn payload_reasons_match_the_replaced_service() {
        let reason = |body: &[u8]| match parse_payload(body) {
            Err(WebhookError::InvalidPayload(m)) => m,
            _ => panic!("expected a refusal"),
        };
        assert!(reason(b"{nope").starts_with("Invalid JSON payload"));
        assert!(reason(b"[]").starts_with("Invalid JSON payload"));
        assert!(
            reason(br#"{"event":"workspace.renamed","instanceId":"abc"}"#)
                .starts_with("Unsupported event type")
        );
        assert!(reason(br#"{"event":"workspace.created"}"#).starts_with("instanceId is required"));
        assert!(
            reason(br#"{"event":"workspace.created","instanceId":"  "}"#)
                .starts_with("instanceId is required")
        );
        let number = reason(br#"{"event":"workspace.created","instanceId":42}"#);
        assert!(
            number.starts_with("instanceId is required as a string")
                && number.contains("got a number")
                && number.contains(r#""instanceId":"42""#),
            "{number}"
        );
    }
}
