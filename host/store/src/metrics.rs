//! Counters of one store that its status does not already carry, read by `GET /metrics` at
//! scrape time. Lock-free: bumped from the append path and the actor without contention.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the invocation latency buckets: 100 µs to 30 s.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// Counters of one store since the host started.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    events_accepted: AtomicU64,
    event_commits: AtomicU64,
    tasks_executed: AtomicU64,
    llm_calls: AtomicU64,
    invocation_latency: Mutex<LatencyHistogram>,
}

/// A snapshot of the invocation latency histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Observations per bucket of [`LATENCY_BUCKETS_SECONDS`] (not cumulative); the last entry
    /// counts those above the largest bound.
    pub buckets: [u64; LATENCY_BUCKETS_SECONDS.len() + 1],
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
    /// How many invocations were observed.
    pub count: u64,
}

impl StoreMetrics {
    /// Counts `count` events accepted by `append`.
    pub fn add_events_accepted(&self, count: u64) {
        self.events_accepted.fetch_add(count, Ordering::Relaxed);
    }

    /// Events accepted through `append` since the host started.
    pub fn events_accepted(&self) -> u64 {
        self.events_accepted.load(Ordering::Relaxed)
    }

    /// Counts one transaction that committed processed events (one or several: group commit).
    pub fn add_event_commit(&self) {
        self.event_commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Transactions that committed processed events since the host started; events processed
    /// divided by this is how many events commit together.
    pub fn event_commits(&self) -> u64 {
        self.event_commits.load(Ordering::Relaxed)
    }

    /// Counts one scheduled task execution (bumped by the task scheduler).
    pub fn add_task_executed(&self) {
        self.tasks_executed.fetch_add(1, Ordering::Relaxed);
    }

    /// Scheduled task executions since the host started.
    pub fn tasks_executed(&self) -> u64 {
        self.tasks_executed.load(Ordering::Relaxed)
    }

    /// Counts one call of the `llm` capability (bumped by the capability).
    pub fn add_llm_call(&self) {
        self.llm_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls of the `llm` capability since the host started.
    pub fn llm_calls(&self) -> u64 {
        self.llm_calls.load(Ordering::Relaxed)
    }

    /// Records how long one invocation of the plugin (event, task or query) took.
    pub fn observe_invocation(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        let mut histogram = self
            .invocation_latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        histogram.buckets[bucket] += 1;
        histogram.sum_seconds += seconds;
        histogram.count += 1;
    }

    /// The invocation latency histogram so far.
    pub fn invocation_latency(&self) -> LatencyHistogram {
        self.invocation_latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        let metrics = StoreMetrics::default();
        metrics.observe_invocation(Duration::from_micros(50));
        metrics.observe_invocation(Duration::from_millis(3));
        metrics.observe_invocation(Duration::from_secs(60));
        let histogram = metrics.invocation_latency();
        assert_eq!(histogram.count, 3);
        assert_eq!(histogram.buckets[0], 1, "50 µs <= 100 µs");
        assert_eq!(histogram.buckets[5], 1, "3 ms <= 5 ms");
        assert_eq!(
            histogram.buckets[LATENCY_BUCKETS_SECONDS.len()],
            1,
            "60 s above 30 s"
        );
        assert!((histogram.sum_seconds - 60.00305).abs() < 1e-9);
    }
}
