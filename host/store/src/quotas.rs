//! Per-store quotas: the limits one tenant runs under.

use serde::{Deserialize, Serialize};

/// The limits one store runs under. Every field has a default; config files and the API
/// override them per store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Maximum guest linear memory, in bytes.
    pub memory: u64,
    /// Fuel (roughly, wasm instructions) per invocation; `None` = unmetered.
    pub fuel_per_call: Option<u64>,
    /// CPU time per invocation, in milliseconds (epoch ticks).
    pub cpu_ms_per_call: u64,
    /// Wall time per invocation, in milliseconds, including time awaiting host calls.
    pub wall_ms_per_call: u64,
    /// CPU time budget per minute, in milliseconds, refilled continuously.
    pub cpu_ms_per_minute: u64,
    /// Maximum size of the store's database, in bytes.
    pub disk: u64,
    /// Page cache the store's database may keep in the host's memory while the store is
    /// awake, in bytes (SQLite's own default, 2000 KiB, unless set). Hibernating hands it back.
    pub db_cache: u64,
    /// Sustained ingress rate, in events per second.
    pub events_per_second: u32,
    /// Ingress burst above the sustained rate, in events.
    pub burst: u32,
    /// Maximum events accepted but not yet processed.
    pub max_pending_events: u64,
    /// LLM calls per minute.
    pub llm_calls_per_minute: u32,
}

/// The `db_cache` quota unless set: SQLite's own default page cache (`cache_size = -2000`,
/// i.e. 2000 KiB), so a store costs what it did before the quota existed.
pub const DEFAULT_DB_CACHE: u64 = 2000 << 10;

impl Default for Quotas {
    fn default() -> Self {
        Self {
            memory: 64 << 20,
            fuel_per_call: None,
            cpu_ms_per_call: 1_000,
            wall_ms_per_call: 10_000,
            cpu_ms_per_minute: 30_000,
            disk: 1 << 30,
            db_cache: DEFAULT_DB_CACHE,
            events_per_second: 1_000,
            burst: 2_000,
            max_pending_events: 100_000,
            llm_calls_per_minute: 60,
        }
    }
}
