//! The wall clock due times are kept in, and word of its steps.
//!
//! A store's due times are wall-clock milliseconds (what a schedule means, and what survives a
//! restart), waited for with tokio's timers, which count the monotonic clock. The two part
//! when the wall clock steps (NTP correcting it) or when the monotonic clock stands still
//! (a VM paused, the machine suspended): a timer set before a forward step fired late by the
//! step — a daily task due an hour after a 20-minute VM pause ran 20 minutes late, past the
//! catch-up window, and was recorded `missed` though the host was up at its time. One thread
//! compares the two clocks every [`LOOK_EVERY`]; when they have moved apart by more than
//! [`STEP_MS`], every store's actor hears of it ([`steps`]) and sets its timer again.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often the two clocks are compared.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// How far the two clocks may move apart between two looks before it counts as a step (a
/// thread late to its look, or NTP slewing, moves them apart by far less).
const STEP_MS: i64 = 1_000;

/// Added to the system's wall clock: zero but in tests ([`step_for_tests`]).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Counts the steps seen; the first subscription starts the thread that looks.
static STEPS: LazyLock<watch::Sender<u64>> = LazyLock::new(|| {
    if let Err(err) = std::thread::Builder::new()
        .name("clock-steps".into())
        .spawn(look)
    {
        tracing::error!("could not start the thread watching for clock steps: {err}");
    }
    watch::Sender::new(0)
});

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let system = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    system.saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

/// Changes each time the wall clock is seen to step against the monotonic one.
pub(crate) fn steps() -> watch::Receiver<u64> {
    STEPS.subscribe()
}

/// Steps the wall clock this process reads ([`now_ms`]) by `by_ms`, as NTP or a resumed VM
/// would: what tests of due times across a step need. Nothing else calls it.
#[doc(hidden)]
pub fn step_for_tests(by_ms: i64) {
    LazyLock::force(&STEPS);
    OFFSET_MS.fetch_add(by_ms, Ordering::Relaxed);
}

fn look() {
    let mut then = (Instant::now(), now_ms());
    loop {
        std::thread::sleep(LOOK_EVERY);
        let now = (Instant::now(), now_ms());
        let monotonic = i64::try_from(now.0.duration_since(then.0).as_millis()).unwrap_or(i64::MAX);
        let wall = now.1.saturating_sub(then.1);
        let apart = wall.saturating_sub(monotonic);
        if apart.abs() > STEP_MS {
            tracing::warn!(
                step_ms = apart,
                "the wall clock stepped against the monotonic one (NTP, a paused VM, a suspend): every store sets its task timer again"
            );
            STEPS.send_modify(|steps| *steps = steps.wrapping_add(1));
        }
        then = now;
    }
}
