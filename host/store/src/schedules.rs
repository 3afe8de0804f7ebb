//! Scheduled tasks: the plugin's schedules and the record of every execution, kept in the
//! store's own database (`_host_schedules`, `_host_task_runs`).
//!
//! An execution is named by `(task_id, scheduled_for)`. Running one claims that key with an
//! insert that a committed execution's record ignores (`INSERT … ON CONFLICT`; a `failed` or
//! `missed` record, which committed nothing, is taken over) inside the same transaction as the
//! plugin's effects and the schedule's advance, so an execution commits exactly once: a crash
//! before the commit takes the claim with it and the execution runs again after the restart; a
//! completed execution's record means it happened, and it is skipped.

use std::str::FromStr as _;

use chrono::{DateTime, Utc};
use croner::Cron;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use storehost_runtime::{ScheduledTask, Trigger};

/// The shortest interval a plugin may schedule, in milliseconds.
pub const MIN_INTERVAL_MS: u64 = 1_000;
/// The longest task id, in bytes.
pub const MAX_TASK_ID_BYTES: usize = 200;
/// The largest task payload, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;
/// The longest cron expression a plugin may schedule: a stored one is read back and parsed
/// again each time it is due or listed, and croner takes any number of empty list items
/// (`0,,,,… 0 1 1 *`), so without a bound a store kept 256 MiB of one yearly schedule.
pub const MAX_CRON_BYTES: usize = 1024;
/// How many executions `GET …/tasks` shows.
pub const RECENT_RUNS: usize = 50;
/// How many finished executions a store keeps on record (the latest); older ones are
/// dropped every [`PRUNE_EVERY`] executions.
pub const KEPT_RUNS: usize = 1_000;
/// Executions (run, failed or missed) between two prunings of the old records.
pub const PRUNE_EVERY: usize = 100;
/// The most records one pruning drops.
pub const PRUNE_BATCH: usize = 10_000;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _host_schedules (
    task_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('cron', 'every', 'once')),
    spec TEXT NOT NULL,
    payload TEXT NOT NULL,
    next_run_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _host_schedules_due ON _host_schedules (next_run_at)
    WHERE next_run_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS _host_task_runs (
    task_id TEXT NOT NULL,
    scheduled_for INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    reason TEXT,
    error TEXT,
    PRIMARY KEY (task_id, scheduled_for)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _host_task_runs_recent ON _host_task_runs (finished_at);
";

/// When a task runs, validated.
#[derive(Debug, Clone)]
pub enum Spec {
    /// A cron expression (UTC).
    Cron(Box<Cron>, String),
    /// Every this many milliseconds after the previous execution ended.
    Every(u64),
    /// Once, at this time.
    Once(i64),
}

impl Spec {
    /// Validates what the plugin asked for.
    pub fn parse(trigger: &Trigger) -> Result<Self, String> {
        match trigger {
            Trigger::Cron(expression) if expression.len() > MAX_CRON_BYTES => Err(format!(
                "a cron expression is at most {MAX_CRON_BYTES} bytes (got {}); use ranges and \
                 steps (`*/5`, `1-5`) rather than long lists",
                expression.len()
            )),
            Trigger::Cron(expression) => Self::cron(expression),
            Trigger::EveryMs(ms) if *ms < MIN_INTERVAL_MS => Err(format!(
                "an interval of {ms} ms is too short; the shortest is {MIN_INTERVAL_MS} ms"
            )),
            Trigger::EveryMs(ms) if i64::try_from(*ms).is_err() => {
                Err(format!("an interval of {ms} ms is too long"))
            }
            Trigger::EveryMs(ms) => Ok(Self::Every(*ms)),
            Trigger::OnceAtMs(at) => Ok(Self::Once(*at)),
        }
    }

    fn cron(expression: &str) -> Result<Self, String> {
        let cron = Cron::from_str(expression.trim()).map_err(|err| {
            format!(
                "invalid cron expression {expression:?}: {err}; use 5 fields \
                 (`min hour day month weekday`, e.g. `0 9 * * MON-FRI`), or 6 with seconds first"
            )
        })?;
        Ok(Self::Cron(Box::new(cron), expression.trim().to_owned()))
    }

    /// Reads a stored schedule back.
    fn from_row(kind: &str, spec: &str) -> Result<Self, String> {
        match kind {
            "cron" => Self::cron(spec),
            "every" => spec
                .parse()
                .map(Self::Every)
                .map_err(|err| format!("stored interval {spec:?}: {err}")),
            "once" => spec
                .parse()
                .map(Self::Once)
                .map_err(|err| format!("stored time {spec:?}: {err}")),
            other => Err(format!("unknown schedule kind {other:?}")),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Cron(..) => "cron",
            Self::Every(_) => "every",
            Self::Once(_) => "once",
        }
    }

    /// The spec as stored (`spec` column).
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Cron(_, expression) => expression.clone(),
            Self::Every(ms) => ms.to_string(),
            Self::Once(at) => at.to_string(),
        }
    }

    /// The first due time of a schedule made at `now`.
    pub fn first(&self, now: i64) -> Option<i64> {
        match self {
            Self::Cron(cron, _) => cron_after(cron, now),
            Self::Every(ms) => Some(now.saturating_add(*ms as i64)),
            Self::Once(at) => Some(*at),
        }
    }

    /// The due time after an execution that was due at `due` and ended at `ended`.
    fn after_run(&self, due: i64, ended: i64) -> Option<i64> {
        match self {
            Self::Cron(cron, _) => cron_after(cron, due.max(ended)),
            Self::Every(ms) => Some(ended.saturating_add(*ms as i64)),
            Self::Once(_) => None,
        }
    }

    /// The first occurrence after `at` on the schedule's own grid (used to skip missed ones).
    fn occurrence_after(&self, due: i64, at: i64) -> Option<i64> {
        match self {
            Self::Cron(cron, _) => cron_after(cron, at),
            Self::Every(ms) => {
                let ms = *ms as i64;
                let behind = at.saturating_sub(due).max(0);
                Some(due.saturating_add((behind / ms + 1).saturating_mul(ms)))
            }
            Self::Once(_) => None,
        }
    }

    fn trigger(&self) -> Trigger {
        match self {
            Self::Cron(_, expression) => Trigger::Cron(expression.clone()),
            Self::Every(ms) => Trigger::EveryMs(*ms),
            Self::Once(at) => Trigger::OnceAtMs(*at),
        }
    }
}

/// The next cron occurrence strictly after `after_ms`.
fn cron_after(cron: &Cron, after_ms: i64) -> Option<i64> {
    // Occurrences fall on whole seconds: search from the start of `after_ms`'s second.
    let start = DateTime::<Utc>::from_timestamp_millis(after_ms.div_euclid(1000) * 1000)?;
    cron.find_next_occurrence(&start, false)
        .ok()
        .map(|next| next.timestamp_millis())
}

/// One schedule as stored.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The plugin's id for the task.
    pub task_id: String,
    /// When it runs.
    pub spec: Spec,
    /// What `run-task` receives.
    pub payload: String,
    /// When it is due next, if ever.
    pub next_run_at: Option<i64>,
    /// When the plugin scheduled it (last).
    pub scheduled_at: i64,
}

impl Schedule {
    /// What the guest's `scheduler.scheduled` answers.
    pub fn to_wit(&self) -> ScheduledTask {
        ScheduledTask {
            task_id: self.task_id.clone(),
            trigger: self.spec.trigger(),
            payload: self.payload.clone(),
            next_run_ms: self.next_run_at,
        }
    }
}

/// A schedule as `GET /v1/stores/{id}/tasks` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleView {
    pub task_id: String,
    /// `cron`, `every` or `once`.
    pub kind: String,
    /// The cron expression, the interval in ms, or the time in ms.
    pub spec: String,
    pub payload: String,
    pub next_run_at: Option<i64>,
}

/// One execution as `GET /v1/stores/{id}/tasks` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub task_id: String,
    pub scheduled_for: i64,
    /// `completed`, `failed` or `missed`.
    pub status: String,
    pub attempts: u32,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The classified reason of a failure.
    pub reason: Option<String>,
    pub error: Option<String>,
}

/// A store's schedules and its latest executions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TasksView {
    pub schedules: Vec<ScheduleView>,
    pub executions: Vec<RunView>,
    pub next_due_at: Option<i64>,
}

/// Checks the task id and payload a plugin passed.
pub fn validate(task_id: &str, payload: &str) -> Result<(), String> {
    if task_id.is_empty() || task_id.len() > MAX_TASK_ID_BYTES {
        return Err(format!(
            "a task id is 1 to {MAX_TASK_ID_BYTES} bytes (got {})",
            task_id.len()
        ));
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "a task payload is at most {MAX_PAYLOAD_BYTES} bytes (got {})",
            payload.len()
        ));
    }
    Ok(())
}

/// The most tasks one store may have scheduled…
pub const MAX_TASKS: u64 = 10_000;
/// …and the most bytes their payloads and cron expressions may hold together:
/// `scheduler.scheduled()` and `GET /v1/stores/{id}/tasks` read them all into the host's
/// memory (3,000 tasks of 60 KB made one listing take 600 MB).
pub const MAX_PAYLOADS_BYTES: u64 = 16 << 20;

/// Whether task `task_id` (new, or replacing the one of that id) with a payload and a stored
/// spec of `bytes` together fits within [`MAX_TASKS`] and [`MAX_PAYLOADS_BYTES`]: `Err` says
/// why not.
pub fn check_room(
    conn: &Connection,
    task_id: &str,
    bytes: usize,
) -> rusqlite::Result<Result<(), String>> {
    let (others, held): (u64, u64) = conn.query_row(
        "SELECT count(*), coalesce(sum(octet_length(payload) + octet_length(spec)), 0)
         FROM _host_schedules WHERE task_id != ?1",
        [task_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    if others >= MAX_TASKS {
        return Ok(Err(format!(
            "the store has {others} other tasks scheduled, the most it may have is {MAX_TASKS}; cancel some before scheduling `{task_id}`"
        )));
    }
    let total = held.saturating_add(bytes as u64);
    if total > MAX_PAYLOADS_BYTES {
        return Ok(Err(format!(
            "the store's tasks would hold {total} bytes of payloads and cron expressions, more than {MAX_PAYLOADS_BYTES}; keep task payloads small (an id to look up) or cancel tasks"
        )));
    }
    Ok(Ok(()))
}

/// Creates or replaces a schedule; answers its first due time.
pub fn upsert(
    conn: &Connection,
    task_id: &str,
    spec: &Spec,
    payload: &str,
    now: i64,
) -> rusqlite::Result<Option<i64>> {
    let next = spec.first(now);
    conn.prepare_cached(
        "INSERT INTO _host_schedules (task_id, kind, spec, payload, next_run_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (task_id) DO UPDATE SET kind = ?2, spec = ?3, payload = ?4,
             next_run_at = ?5, updated_at = ?6",
    )?
    .execute(params![task_id, spec.kind(), spec.text(), payload, next, now])?;
    Ok(next)
}

/// Removes a schedule; answers whether there was one.
pub fn cancel(conn: &Connection, task_id: &str) -> rusqlite::Result<bool> {
    let removed = conn
        .prepare_cached("DELETE FROM _host_schedules WHERE task_id = ?1")?
        .execute([task_id])?;
    Ok(removed > 0)
}

/// Every schedule, by task id.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<Schedule>> {
    let mut stmt = conn.prepare_cached(
        "SELECT task_id, kind, spec, payload, next_run_at, updated_at FROM _host_schedules
         ORDER BY task_id",
    )?;
    let rows = stmt.query_map([], schedule_from_row)?;
    rows.filter_map(|row| row.transpose()).collect()
}

/// Schedules due at `now`, earliest first.
pub fn due(conn: &Connection, now: i64, limit: usize) -> rusqlite::Result<Vec<Schedule>> {
    let mut stmt = conn.prepare_cached(
        "SELECT task_id, kind, spec, payload, next_run_at, updated_at FROM _host_schedules
         WHERE next_run_at IS NOT NULL AND next_run_at <= ?1
         ORDER BY next_run_at, task_id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, limit as i64], schedule_from_row)?;
    rows.filter_map(|row| row.transpose()).collect()
}

/// The earliest due time of any schedule.
pub fn next_due(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT MIN(next_run_at) FROM _host_schedules")?
        .query_row([], |row| row.get(0))
}

/// A stored row whose spec no longer parses is logged and skipped (it cannot be run).
fn schedule_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Schedule>> {
    let task_id: String = row.get(0)?;
    let kind: String = row.get(1)?;
    let spec: String = row.get(2)?;
    match Spec::from_row(&kind, &spec) {
        Ok(parsed) => Ok(Some(Schedule {
            task_id,
            spec: parsed,
            payload: row.get(3)?,
            next_run_at: row.get(4)?,
            scheduled_at: row.get(5)?,
        })),
        Err(err) => {
            tracing::error!(task_id, "skipping a stored schedule: {err}");
            Ok(None)
        }
    }
}

/// Whether `schedule` is still stored as it was read (the plugin may have cancelled or
/// replaced it since, from another task or event due before it ran).
pub fn still_as_read(conn: &Connection, schedule: &Schedule) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM _host_schedules WHERE task_id = ?1 AND kind = ?2 AND spec = ?3
             AND payload = ?4 AND next_run_at IS ?5",
    )?
    .query_row(
        params![
            schedule.task_id,
            schedule.spec.kind(),
            schedule.spec.text(),
            schedule.payload,
            schedule.next_run_at
        ],
        |_| Ok(()),
    )
    .optional()
    .map(|row| row.is_some())
}

/// Claims the execution `(task_id, due)`; `false` when it was claimed (and committed) before.
/// An execution recorded as `failed` or `missed` never committed its effects: the plugin
/// scheduling the task again for the same time runs it (the record is taken over).
pub fn claim(conn: &Connection, task_id: &str, due: i64, now: i64) -> rusqlite::Result<bool> {
    let claimed = conn
        .prepare_cached(
            "INSERT INTO _host_task_runs (task_id, scheduled_for, status, attempts, started_at)
             VALUES (?1, ?2, 'running', 0, ?3)
             ON CONFLICT (task_id, scheduled_for) DO UPDATE SET status = 'running',
                 attempts = 0, started_at = ?3, finished_at = NULL, reason = NULL, error = NULL
             WHERE _host_task_runs.status IN ('failed', 'missed')",
        )?
        .execute(params![task_id, due, now])?;
    Ok(claimed > 0)
}

/// Records how an execution ended (`completed`, `failed` or `missed`).
#[allow(clippy::too_many_arguments)]
pub fn finish(
    conn: &Connection,
    task_id: &str,
    due: i64,
    status: &str,
    attempts: u32,
    started_at: Option<i64>,
    failure: Option<(&str, &str)>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO _host_task_runs
             (task_id, scheduled_for, status, attempts, started_at, finished_at, reason, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (task_id, scheduled_for) DO UPDATE SET status = ?3, attempts = ?4,
             started_at = COALESCE(_host_task_runs.started_at, ?5), finished_at = ?6,
             reason = ?7, error = ?8",
    )?
    .execute(params![
        task_id,
        due,
        status,
        attempts,
        started_at,
        now,
        failure.map(|f| f.0),
        failure.map(|f| f.1)
    ])?;
    Ok(())
}

/// Moves a schedule past the execution due at `due` that ended at `ended` (a one-shot task is
/// removed). Only applies while the schedule is still as it was read (its stored due time,
/// which a catch-up run's `due` is later than): a plugin that rescheduled the task during the
/// run keeps its new due time.
pub fn advance(
    conn: &Connection,
    schedule: &Schedule,
    due: i64,
    ended: i64,
) -> rusqlite::Result<()> {
    let stored = schedule.next_run_at;
    match schedule.spec.after_run(due, ended) {
        Some(next) => conn
            .prepare_cached(
                "UPDATE _host_schedules SET next_run_at = ?2 WHERE task_id = ?1 AND next_run_at IS ?3",
            )?
            .execute(params![schedule.task_id, next, stored])?,
        None => conn
            .prepare_cached("DELETE FROM _host_schedules WHERE task_id = ?1 AND next_run_at IS ?2")?
            .execute(params![schedule.task_id, stored])?,
    };
    Ok(())
}

/// What to do with a schedule found due at `now`, given the catch-up window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DuePlan {
    /// Run the execution due at this time.
    Run(i64),
    /// The due time is older than the window: record these occurrences as missed (at most a
    /// bounded number are listed) and move the schedule to `next`.
    Missed {
        occurrences: Vec<i64>,
        next: Option<i64>,
        /// Set when the outage held more than [`MAX_MISSED_RECORDED`] occurrences: those after
        /// the last listed and before this time were missed too, and get no row each.
        skipped_before: Option<i64>,
    },
}

/// Most missed occurrences recorded one by one for one schedule and outage; the last of them
/// says until when the rest were skipped. A schedule every second over a week's outage would
/// otherwise write 600,000 rows in one transaction before the store could do anything else.
const MAX_MISSED_RECORDED: usize = 100;

/// How late an occurrence may be found and still run, whatever the catch-up window: one due
/// while the store was busy (a call may take `wall_ms_per_call`, 10 s by default) or while
/// its timer fired late is late, not missed. Without it a window of 0 recorded every
/// occurrence as missed, since a timer never fires at the very millisecond.
pub const LATE_NOT_MISSED_MS: i64 = 10_000;

/// Decides between running a due schedule and recording what was missed.
///
/// Occurrences missed within the window (at least [`LATE_NOT_MISSED_MS`]) run once, as one
/// catch-up execution for the latest of them; occurrences older than it are recorded as
/// `missed`. A one-shot task scheduled for a time already past runs, however late.
pub fn plan(schedule: &Schedule, now: i64, window_ms: i64) -> Option<DuePlan> {
    let due = schedule.next_run_at?;
    if due > now {
        return None;
    }
    if matches!(schedule.spec, Spec::Once(_)) && schedule.scheduled_at >= due {
        // Asked for a time already past: it runs, however late (the plugin world says so),
        // as nothing was missed.
        return Some(DuePlan::Run(due));
    }
    let oldest_allowed = now.saturating_sub(window_ms.max(LATE_NOT_MISSED_MS));
    if due >= oldest_allowed {
        // Later occurrences also missed within the window collapse into this one run.
        let mut latest = due;
        while let Some(next) = schedule.spec.occurrence_after(latest, latest)
            && next <= now
        {
            latest = next;
        }
        return Some(DuePlan::Run(latest));
    }
    let mut occurrences = vec![due];
    let mut cursor = due;
    let mut skipped_before = None;
    loop {
        match schedule.spec.occurrence_after(due, cursor) {
            Some(next) if next < oldest_allowed => {
                if occurrences.len() < MAX_MISSED_RECORDED {
                    occurrences.push(next);
                    cursor = next;
                } else {
                    // Skip the rest of the outage instead of walking every occurrence in it.
                    skipped_before = Some(oldest_allowed);
                    cursor = oldest_allowed.saturating_sub(1).max(next);
                }
            }
            // The first occurrence inside the window runs on the next pass (a catch-up run).
            next => {
                return Some(DuePlan::Missed {
                    occurrences,
                    next,
                    skipped_before,
                });
            }
        }
    }
}

/// Records missed occurrences and moves the schedule on (one transaction, by the caller). The
/// last occurrence's `error` says until when more were skipped, when `skipped_before` is set.
pub fn record_missed(
    conn: &Connection,
    schedule: &Schedule,
    occurrences: &[i64],
    next: Option<i64>,
    skipped_before: Option<i64>,
    now: i64,
) -> rusqlite::Result<()> {
    for (index, due) in occurrences.iter().enumerate() {
        let skipped = skipped_before.filter(|_| index + 1 == occurrences.len());
        let note = skipped.map(|before| {
            format!(
                "the occurrences after this one and before {before} (ms since the Unix epoch, \
                 when the catch-up window began) were missed too; at most \
                 {MAX_MISSED_RECORDED} of an outage are recorded one by one"
            )
        });
        conn.prepare_cached(
            "INSERT OR IGNORE INTO _host_task_runs (task_id, scheduled_for, status, attempts, finished_at, error)
             VALUES (?1, ?2, 'missed', 0, ?3, ?4)",
        )?
        .execute(params![schedule.task_id, due, now, note])?;
    }
    let current = schedule.next_run_at;
    match next {
        Some(next) => conn
            .prepare_cached(
                "UPDATE _host_schedules SET next_run_at = ?2 WHERE task_id = ?1 AND next_run_at IS ?3",
            )?
            .execute(params![schedule.task_id, next, current])?,
        None => conn
            .prepare_cached("DELETE FROM _host_schedules WHERE task_id = ?1 AND next_run_at IS ?2")?
            .execute(params![schedule.task_id, current])?,
    };
    Ok(())
}

/// The store's schedules and recent executions.
pub fn view(conn: &Connection, recent: usize) -> rusqlite::Result<TasksView> {
    // One read transaction: a run's record and its schedule's move commit together, and three
    // separate reads could show one without the other.
    let tx = conn.unchecked_transaction()?;
    let view = view_in(&tx, recent)?;
    tx.commit()?;
    Ok(view)
}

fn view_in(conn: &Connection, recent: usize) -> rusqlite::Result<TasksView> {
    let mut stmt = conn.prepare_cached(
        "SELECT task_id, kind, spec, payload, next_run_at FROM _host_schedules ORDER BY task_id",
    )?;
    let schedules = stmt
        .query_map([], |row| {
            Ok(ScheduleView {
                task_id: row.get(0)?,
                kind: row.get(1)?,
                spec: row.get(2)?,
                payload: row.get(3)?,
                next_run_at: row.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT task_id, scheduled_for, status, attempts, started_at, finished_at, reason, error
         FROM _host_task_runs WHERE status != 'running'
         ORDER BY finished_at DESC, scheduled_for DESC LIMIT ?1",
    )?;
    let executions = stmt
        .query_map([recent as i64], |row| {
            Ok(RunView {
                task_id: row.get(0)?,
                scheduled_for: row.get(1)?,
                status: row.get(2)?,
                attempts: row.get(3)?,
                started_at: row.get(4)?,
                finished_at: row.get(5)?,
                reason: row.get(6)?,
                error: row.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let next_due_at = next_due(conn)?;
    Ok(TasksView {
        schedules,
        executions,
        next_due_at,
    })
}

/// Drops records of finished executions beyond the latest [`KEPT_RUNS`], at most
/// [`PRUNE_BATCH`] at a time (a store upgraded with millions of them is not stalled for
/// seconds); answers how many. A record is what makes an occurrence run once (`claim`), so
/// only those scheduled before the catch-up window (`window_ms`, at least
/// [`LATE_NOT_MISSED_MS`], before `now`) go: the same occurrence due again — a one-shot task
/// scheduled anew at a time it already ran — is then older than the window, recorded as
/// missed, never run. A claim in flight (`running`) stays.
pub fn prune_runs(conn: &Connection, now: i64, window_ms: i64) -> rusqlite::Result<usize> {
    let before = now.saturating_sub(window_ms.max(LATE_NOT_MISSED_MS));
    conn.prepare_cached(
        "DELETE FROM _host_task_runs WHERE (task_id, scheduled_for) IN (
             SELECT task_id, scheduled_for FROM _host_task_runs
             WHERE status != 'running' AND scheduled_for < ?2 AND finished_at < (
                 SELECT finished_at FROM _host_task_runs WHERE status != 'running'
                 ORDER BY finished_at DESC LIMIT 1 OFFSET ?1)
             ORDER BY finished_at LIMIT ?3)",
    )?
    .execute(params![KEPT_RUNS as i64 - 1, before, PRUNE_BATCH as i64])
}

/// Whether an execution of `(task_id, due)` was already recorded.
pub fn run_status(conn: &Connection, task_id: &str, due: i64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT status FROM _host_task_runs WHERE task_id = ?1 AND scheduled_for = ?2",
    )?
    .query_row(params![task_id, due], |row| row.get(0))
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn schedule(spec: Spec, next: i64) -> Schedule {
        Schedule {
            task_id: "t".into(),
            spec,
            payload: "{}".into(),
            next_run_at: Some(next),
            scheduled_at: next - MINUTE,
        }
    }

    #[test]
    fn cron_expressions_with_five_or_six_fields_are_honoured() {
        let every_quarter = Spec::parse(&Trigger::Cron("*/15 * * * *".into())).unwrap();
        // 2026-01-01T00:07:00Z → next quarter hour at 00:15.
        let start = 1_767_225_600_000 + 7 * MINUTE;
        assert_eq!(
            every_quarter.first(start),
            Some(1_767_225_600_000 + 15 * MINUTE)
        );
        let with_seconds = Spec::parse(&Trigger::Cron("30 * * * * *".into())).unwrap();
        assert_eq!(with_seconds.first(start), Some(start + 30_000));
        let err = Spec::parse(&Trigger::Cron("every tuesday".into())).unwrap_err();
        assert!(err.contains("invalid cron expression"), "{err}");
        let err = Spec::parse(&Trigger::EveryMs(10)).unwrap_err();
        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn an_interval_runs_again_after_the_previous_execution_ended() {
        let every = Spec::Every(10 * MINUTE as u64);
        assert_eq!(every.after_run(1_000, 5_000), Some(5_000 + 10 * MINUTE));
        assert_eq!(Spec::Once(7).after_run(7, 9), None);
    }

    #[test]
    fn occurrences_missed_within_the_window_run_once_and_older_ones_are_missed() {
        let window = 10 * MINUTE;
        let now = 1_000 * MINUTE;
        // Due 3 minutes ago, every minute: one catch-up run for the latest occurrence.
        let s = schedule(Spec::Every(MINUTE as u64), now - 3 * MINUTE);
        assert_eq!(plan(&s, now, window), Some(DuePlan::Run(now)));
        // Due an hour ago, every 20 minutes: the two occurrences before the window are missed,
        // and the one inside it (20 minutes later than the second) is the next to run.
        let s = schedule(Spec::Every(20 * MINUTE as u64), now - 60 * MINUTE);
        assert_eq!(
            plan(&s, now, window),
            Some(DuePlan::Missed {
                occurrences: vec![now - 60 * MINUTE, now - 40 * MINUTE, now - 20 * MINUTE],
                next: Some(now),
                skipped_before: None,
            })
        );
        // A one-shot task far in the past is missed and not rescheduled.
        let s = schedule(Spec::Once(now - 60 * MINUTE), now - 60 * MINUTE);
        assert_eq!(
            plan(&s, now, window),
            Some(DuePlan::Missed {
                occurrences: vec![now - 60 * MINUTE],
                next: None,
                skipped_before: None,
            })
        );
        // Unless it was scheduled for a time already past: then it runs, however late.
        let s = Schedule {
            scheduled_at: now - 59 * MINUTE,
            ..schedule(Spec::Once(now - 60 * MINUTE), now - 60 * MINUTE)
        };
        assert_eq!(plan(&s, now, window), Some(DuePlan::Run(now - 60 * MINUTE)));
        // Not due yet: nothing to do.
        let s = schedule(Spec::Every(MINUTE as u64), now + 1);
        assert_eq!(plan(&s, now, window), None);
    }

    #[test]
    fn a_window_of_zero_still_runs_an_occurrence_found_late_and_misses_older_ones() {
        let now = 1_000 * MINUTE;
        // The timer fired 3 ms late: on time, not missed.
        let s = schedule(Spec::Every(MINUTE as u64), now - 3);
        assert_eq!(plan(&s, now, 0), Some(DuePlan::Run(now - 3)));
        let s = schedule(Spec::Every(MINUTE as u64), now - LATE_NOT_MISSED_MS);
        assert_eq!(
            plan(&s, now, 0),
            Some(DuePlan::Run(now - LATE_NOT_MISSED_MS))
        );
        // Older than that (downtime): missed, and the next occurrence is after now.
        let s = schedule(Spec::Every(MINUTE as u64), now - 5 * MINUTE);
        assert_eq!(
            plan(&s, now, 0),
            Some(DuePlan::Missed {
                occurrences: (1..=5).rev().map(|m| now - m * MINUTE).collect(),
                next: Some(now),
                skipped_before: None,
            })
        );
    }

    #[test]
    fn a_long_outage_records_a_bounded_number_of_missed_occurrences() {
        let now = 100_000 * MINUTE;
        let s = schedule(Spec::Every(MINUTE as u64), now - 50_000 * MINUTE);
        let Some(DuePlan::Missed {
            occurrences,
            next,
            skipped_before,
        }) = plan(&s, now, 10 * MINUTE)
        else {
            panic!("expected missed occurrences");
        };
        assert_eq!(occurrences.len(), MAX_MISSED_RECORDED);
        let next_run = next.unwrap();
        assert!(
            next_run >= now - 10 * MINUTE && next_run <= now + MINUTE,
            "{next_run}"
        );
        assert_eq!(skipped_before, Some(now - 10 * MINUTE));

        // The last row recorded says until when the rest were skipped; the others say nothing.
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        record_missed(&conn, &s, &occurrences, next, skipped_before, now).unwrap();
        let notes: Vec<(i64, Option<String>)> = conn
            .prepare("SELECT scheduled_for, error FROM _host_task_runs ORDER BY scheduled_for")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(notes.len(), MAX_MISSED_RECORDED);
        assert!(
            notes[..MAX_MISSED_RECORDED - 1]
                .iter()
                .all(|(_, note)| note.is_none())
        );
        let last = notes.last().unwrap().1.as_deref().unwrap();
        assert!(
            last.contains(&format!("before {}", now - 10 * MINUTE)) && last.contains("missed too"),
            "{last}"
        );
    }

    /// The tasks' room counts their cron expressions with their payloads: 16 tasks of a
    /// 1 KiB expression and a 1 MiB − 1 KiB payload fill it, a 17th is refused.
    #[test]
    fn the_tasks_room_counts_cron_expressions() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let expression = format!("0{} 0 0 1 1 *", ",".repeat(MAX_CRON_BYTES - 11));
        let spec = Spec::parse(&Trigger::Cron(expression)).unwrap();
        let payload = "x".repeat((1 << 20) - MAX_CRON_BYTES);
        let bytes = payload.len() + spec.text().len();
        assert_eq!(bytes, 1 << 20);
        for i in 0..16 {
            let id = format!("t{i}");
            check_room(&conn, &id, bytes).unwrap().unwrap();
            upsert(&conn, &id, &spec, &payload, 0).unwrap();
        }
        let refused = check_room(&conn, "t16", bytes).unwrap().unwrap_err();
        assert!(
            refused.contains("17825792 bytes of payloads and cron expressions"),
            "{refused}"
        );
        // Replacing a task counts it once.
        check_room(&conn, "t3", bytes).unwrap().unwrap();

        let too_long = format!("0{} 0 0 1 1 *", ",".repeat(MAX_CRON_BYTES - 10));
        let err = Spec::parse(&Trigger::Cron(too_long)).unwrap_err();
        assert!(err.contains("at most 1024 bytes (got 1025)"), "{err}");
    }

    /// Only the latest [`KEPT_RUNS`] finished executions stay on record, and of the older ones
    /// those scheduled within the catch-up window stay too (the record keeps them from running
    /// twice); one in flight stays whatever its age.
    #[test]
    fn old_execution_records_are_dropped() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        assert!(claim(&conn, "in-flight", 0, 0).unwrap());
        for i in 0..KEPT_RUNS as i64 + 250 {
            finish(&conn, "t", i, "completed", 1, Some(i), None, 10 + i).unwrap();
        }
        // A window reaching back to occurrence 200: the 50 after it stay.
        let now = 200 + 10 * MINUTE;
        assert_eq!(prune_runs(&conn, now, 10 * MINUTE).unwrap(), 200);
        assert_eq!(
            run_status(&conn, "t", 200).unwrap().as_deref(),
            Some("completed")
        );
        assert_eq!(run_status(&conn, "t", 199).unwrap(), None);
        // Once the window has moved on, all but the latest KEPT_RUNS go, at most PRUNE_BATCH
        // at a time.
        assert_eq!(prune_runs(&conn, 100 * MINUTE, 0).unwrap(), 50);
        let (count, oldest): (usize, i64) = conn
            .query_row(
                "SELECT count(*), min(scheduled_for) FROM _host_task_runs WHERE status != 'running'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!((count, oldest), (KEPT_RUNS, 250));
        assert_eq!(
            run_status(&conn, "in-flight", 0).unwrap().as_deref(),
            Some("running")
        );
        assert_eq!(prune_runs(&conn, 100 * MINUTE, 0).unwrap(), 0);
        let shown = view(&conn, RECENT_RUNS).unwrap().executions;
        assert_eq!(
            shown[0].scheduled_for,
            KEPT_RUNS as i64 + 249,
            "the latest first"
        );
    }

    #[test]
    fn an_execution_is_claimed_once() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        assert!(claim(&conn, "t", 5, 6).unwrap());
        assert!(!claim(&conn, "t", 5, 7).unwrap());
        assert!(claim(&conn, "t", 6, 7).unwrap());
    }
}
