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
    /// Most the store's files directory (`/data` to the guest) may hold, in bytes: the bytes
    /// of its files, plus [`FILE_ENTRY_BYTES`] for each file, directory and link. 0 lets the
    /// guest read files put there but write none.
    pub files: u64,
    /// Page cache the store's database may keep in the host's memory while the store is
    /// awake, in bytes (SQLite's own default, 2000 KiB, unless set). Hibernating hands it back.
    pub db_cache: u64,
    /// Most the store's event log (`events.db` and its write-ahead log) may hold on disk, in
    /// bytes. The log keeps every event, so without it a tenant's appends (or its plugin's
    /// emits) would fill the disk every store shares.
    pub event_log: u64,
    /// Sustained ingress rate, in events per second.
    pub events_per_second: u32,
    /// Ingress burst above the sustained rate, in events.
    pub burst: u32,
    /// Sustained ingress rate in bytes of events (types, payloads and idempotency keys) per
    /// second; a burst of twice that, and at least [`MIN_INGRESS_BURST`], may arrive at once.
    /// Without it a store's 1 MiB events at `events_per_second` would keep the host parsing
    /// and writing a gigabyte a second for one tenant.
    pub ingress_bytes_per_second: u64,
    /// Maximum events accepted but not yet processed.
    pub max_pending_events: u64,
    /// LLM calls per minute.
    pub llm_calls_per_minute: u32,
}

/// The `db_cache` quota unless set: SQLite's own default page cache (`cache_size = -2000`,
/// i.e. 2000 KiB), so a store costs what it did before the quota existed.
pub const DEFAULT_DB_CACHE: u64 = 2000 << 10;

/// The `event_log` quota unless set: 4 GiB, four times the default `disk`.
pub const DEFAULT_EVENT_LOG: u64 = 4 << 30;

impl Default for Quotas {
    fn default() -> Self {
        Self {
            memory: 64 << 20,
            fuel_per_call: None,
            cpu_ms_per_call: 1_000,
            wall_ms_per_call: 10_000,
            cpu_ms_per_minute: 30_000,
            disk: 1 << 30,
            files: 64 << 20,
            db_cache: DEFAULT_DB_CACHE,
            event_log: DEFAULT_EVENT_LOG,
            events_per_second: 1_000,
            burst: 2_000,
            ingress_bytes_per_second: DEFAULT_INGRESS_BYTES_PER_SECOND,
            max_pending_events: 100_000,
            llm_calls_per_minute: 60,
        }
    }
}

/// The `ingress_bytes_per_second` quota unless set: 16 MiB a second.
pub const DEFAULT_INGRESS_BYTES_PER_SECOND: u64 = 16 << 20;

/// The least byte burst a store's ingress allows whatever its `ingress_bytes_per_second`: one
/// request of the default `[http] max_body_bytes` always fits.
pub const MIN_INGRESS_BURST: u64 = 1 << 20;

/// What each file, directory and link in a store's files directory counts against its
/// `files` quota besides its bytes (a filesystem block): empty files are not free, so a guest
/// cannot use up the filesystem's inodes.
pub const FILE_ENTRY_BYTES: u64 = storehost_runtime::files::ENTRY_BYTES;

/// The smallest `memory`, `disk` and `db_cache` quota: one WebAssembly page (64 KiB).
pub const MIN_SIZE_QUOTA: u64 = 64 << 10;

/// One quota value that is out of its accepted range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {value} is out of range: {rule}")]
pub struct QuotaProblem {
    /// The quota's key, as written in a config file or the API.
    pub key: &'static str,
    /// The value given.
    pub value: u64,
    /// What is accepted.
    pub rule: &'static str,
}

impl Quotas {
    /// Every value no store could run under: a zero limit (a call with no CPU time, a store
    /// that takes no event), or memory, disk, page cache, event log or byte rate below 64 KiB.
    /// Config files and the API refuse such quotas alike.
    pub fn problems(&self) -> Vec<QuotaProblem> {
        const AT_LEAST_ONE: &str = "it must be at least 1 (zero would stop the store from working)";
        const AT_LEAST_PAGE: &str = "it must be at least 64KiB (65536 bytes, one page)";
        let sizes = [
            ("memory", self.memory),
            ("disk", self.disk),
            ("db_cache", self.db_cache),
            ("event_log", self.event_log),
            ("ingress_bytes_per_second", self.ingress_bytes_per_second),
        ]
        .map(|(key, value)| (key, value, MIN_SIZE_QUOTA, AT_LEAST_PAGE));
        let counts = [
            ("fuel_per_call", self.fuel_per_call.unwrap_or(1)),
            ("cpu_ms_per_call", self.cpu_ms_per_call),
            ("wall_ms_per_call", self.wall_ms_per_call),
            ("cpu_ms_per_minute", self.cpu_ms_per_minute),
            ("events_per_second", u64::from(self.events_per_second)),
            ("burst", u64::from(self.burst)),
            ("max_pending_events", self.max_pending_events),
            ("llm_calls_per_minute", u64::from(self.llm_calls_per_minute)),
        ]
        .map(|(key, value)| (key, value, 1, AT_LEAST_ONE));
        sizes
            .into_iter()
            .chain(counts)
            .filter(|(_, value, min, _)| value < min)
            .map(|(key, value, _, rule)| QuotaProblem { key, value, rule })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_have_no_problem() {
        assert_eq!(Quotas::default().problems(), []);
    }

    #[test]
    fn zero_limits_and_tiny_sizes_are_problems_in_order() {
        let quotas = Quotas {
            memory: 1024,
            db_cache: 4096,
            event_log: 60 << 10,
            ingress_bytes_per_second: 1024,
            fuel_per_call: Some(0),
            burst: 0,
            ..Quotas::default()
        };
        let keys: Vec<_> = quotas.problems().iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "memory",
                "db_cache",
                "event_log",
                "ingress_bytes_per_second",
                "fuel_per_call",
                "burst"
            ]
        );
        let unmetered = Quotas {
            fuel_per_call: None,
            ..Quotas::default()
        };
        assert_eq!(
            unmetered.problems(),
            [],
            "unmetered fuel is not a zero limit"
        );
    }
}
