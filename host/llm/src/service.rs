//! The host's gate in front of a provider: a host-wide cap on LLM calls in flight and a
//! per-store calls-per-minute quota (`llm_calls_per_minute`).
//!
//! Both refusals are `rate_limited` errors the plugin can turn into a polite reply. A store's
//! quota can change while it runs; a quota of 0 denies the store every call (the config
//! refuses 0, so it only comes from code that means it).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::Provider;
use crate::error::{ErrorClass, LlmError};
use crate::types::{ChatRequest, Completion};

/// Host-wide limits of an [`LlmService`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmLimits {
    /// Most LLM calls in flight on the host at once (at least 1).
    pub max_concurrent: usize,
    /// How long a call waits for a free slot before failing with `rate_limited`, in ms.
    pub queue_wait_ms: u64,
    /// The calls-per-minute quota of a store whose quota was never set.
    pub default_calls_per_minute: u32,
    /// Most tokens one completion may ask for: a plugin asking for more (or for no limit)
    /// asks for this many, since what a completion costs, and how long it takes, grows with
    /// its length.
    pub max_tokens: u32,
}

/// The default of [`LlmLimits::max_tokens`].
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

impl Default for LlmLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            queue_wait_ms: 2_000,
            default_calls_per_minute: 60,
            max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

/// A provider behind the host-wide and per-store limits. Cheap to clone.
#[derive(Clone)]
pub struct LlmService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LlmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmService")
            .field("max_concurrent", &self.inner.max_concurrent)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

struct Inner {
    provider: Arc<dyn Provider>,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    max_tokens: u32,
    queue_wait: Duration,
    stores: Mutex<Stores>,
}

struct Stores {
    default_per_minute: u32,
    by_id: HashMap<String, StoreLimiter>,
}

struct StoreLimiter {
    per_minute: u32,
    /// Set through [`LlmService::set_store_limit`], so a new default does not replace it.
    explicit: bool,
    /// `None` when `per_minute` is 0: every call is denied.
    limiter: Option<DefaultDirectRateLimiter>,
}

/// The one clock every store's LLM limiter reads: making a clock costs tens of microseconds
/// (it probes the CPU), reading one a few nanoseconds.
static RATE_CLOCK: std::sync::LazyLock<DefaultClock> =
    std::sync::LazyLock::new(DefaultClock::default);

impl StoreLimiter {
    fn new(per_minute: u32, explicit: bool) -> Self {
        Self {
            per_minute,
            explicit,
            limiter: NonZeroU32::new(per_minute)
                .map(|n| RateLimiter::direct_with_clock(Quota::per_minute(n), RATE_CLOCK.clone())),
        }
    }
}

impl LlmService {
    /// `provider` behind `limits`.
    pub fn new(provider: Arc<dyn Provider>, limits: LlmLimits) -> Self {
        let max_concurrent = limits.max_concurrent.max(1);
        Self {
            inner: Arc::new(Inner {
                provider,
                slots: Arc::new(Semaphore::new(max_concurrent)),
                max_concurrent,
                queue_wait: Duration::from_millis(limits.queue_wait_ms),
                max_tokens: limits.max_tokens.max(1),
                stores: Mutex::new(Stores {
                    default_per_minute: limits.default_calls_per_minute,
                    by_id: HashMap::new(),
                }),
            }),
        }
    }

    /// The provider behind the limits.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.inner.provider
    }

    /// Sets store `store_id`'s quota to `per_minute` calls per minute (0 = none allowed).
    /// Setting the quota it already has keeps its current usage; a new quota starts full.
    pub fn set_store_limit(&self, store_id: &str, per_minute: u32) {
        let mut stores = self.stores();
        match stores.by_id.get_mut(store_id) {
            Some(entry) if entry.per_minute == per_minute => entry.explicit = true,
            _ => {
                stores
                    .by_id
                    .insert(store_id.to_owned(), StoreLimiter::new(per_minute, true));
            }
        }
    }

    /// Sets the quota of stores whose quota was never set.
    pub fn set_default_limit(&self, per_minute: u32) {
        let mut stores = self.stores();
        stores.default_per_minute = per_minute;
        stores
            .by_id
            .retain(|_, entry| entry.explicit || entry.per_minute == per_minute);
    }

    /// Forgets store `store_id` (when it is removed): its quota and usage.
    pub fn remove_store(&self, store_id: &str) {
        self.stores().by_id.remove(store_id);
    }

    /// Store `store_id`'s calls-per-minute quota.
    pub fn store_limit(&self, store_id: &str) -> u32 {
        let stores = self.stores();
        stores
            .by_id
            .get(store_id)
            .map_or(stores.default_per_minute, |entry| entry.per_minute)
    }

    /// LLM calls in flight now, host-wide.
    pub fn in_flight(&self) -> usize {
        self.inner.max_concurrent - self.inner.slots.available_permits()
    }

    /// A chat completion for store `store_id`, with no deadline but the provider's own.
    pub fn complete(
        &self,
        store_id: &str,
        req: ChatRequest,
    ) -> BoxFuture<'static, Result<Completion, LlmError>> {
        self.complete_by(store_id, req, None)
    }

    /// A chat completion for store `store_id`, answered by `deadline` if there is one. The
    /// store's quota is charged now; the returned future waits for a host-wide slot (up to
    /// `queue_wait_ms`, and not past the deadline) and then calls the provider, holding the
    /// slot until the answer.
    pub fn complete_by(
        &self,
        store_id: &str,
        mut req: ChatRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'static, Result<Completion, LlmError>> {
        let cap = self.inner.max_tokens;
        req.max_tokens = Some(req.max_tokens.map_or(cap, |asked| asked.min(cap)));
        let admitted = self.admit(store_id);
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            admitted?;
            let queue_wait = deadline.map_or(inner.queue_wait, |deadline| {
                inner
                    .queue_wait
                    .min(deadline.saturating_duration_since(Instant::now()))
            });
            let slot = if queue_wait.is_zero() {
                Arc::clone(&inner.slots).try_acquire_owned().ok()
            } else {
                tokio::time::timeout(queue_wait, Arc::clone(&inner.slots).acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            };
            let Some(_slot) = slot else {
                return Err(LlmError::new(
                    ErrorClass::RateLimited,
                    format!(
                        "the host is already running its maximum of {} LLM calls at once (max_concurrent) and none finished within {} ms; try again shortly, or raise max_concurrent in [llm]",
                        inner.max_concurrent,
                        queue_wait.as_millis()
                    ),
                ));
            };
            inner.provider.complete_by(req, deadline).await
        })
    }

    /// Charges one call to `store_id`'s quota, or says why it is refused.
    fn admit(&self, store_id: &str) -> Result<(), LlmError> {
        let mut stores = self.stores();
        let default = stores.default_per_minute;
        let entry = stores
            .by_id
            .entry(store_id.to_owned())
            .or_insert_with(|| StoreLimiter::new(default, false));
        let Some(limiter) = &entry.limiter else {
            return Err(LlmError::new(
                ErrorClass::RateLimited,
                format!(
                    "store {store_id} may make no LLM calls (llm_calls_per_minute = 0); raise its quota to allow them"
                ),
            ));
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            LlmError::new(
                ErrorClass::RateLimited,
                format!(
                    "store {store_id} has used its {} LLM calls per minute (llm_calls_per_minute); the next call is allowed in {} ms: try again then, or raise the store's quota",
                    entry.per_minute,
                    wait.as_millis().max(1)
                ),
            )
        })
    }

    fn stores(&self) -> MutexGuard<'_, Stores> {
        // A panic while holding the lock leaves the map consistent (each update is one
        // insert or remove), so a poisoned lock is still usable.
        self.inner
            .stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
