//! The host registry (`DATA_DIR/host.db`): the stores added at run time, so a restart brings
//! back exactly the same set. It is the single host's [`DesiredState`](crate::seam::DesiredState);
//! its tokens, plugin records, webhook answers and orphan records are this host's own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use storehost_store::{Quotas, StoreId, sqlite::now_ms};

use crate::config::{OwnSettings, StoreSpec};
use crate::orchestrator::StoreSource;

/// The persisted desired state of dynamically added stores.
pub struct Registry {
    conn: Mutex<Connection>,
    /// Store tokens (see `tokens.rs`).
    pub(crate) tokens: crate::tokens::TokenCache,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A store's spec as `host.db` keeps it: whole, as it ran then, and what the store set itself
/// (absent in entries written before stores kept it apart).
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedSpec {
    plugin: String,
    quotas: Quotas,
    config: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    own: Option<OwnSettings>,
}

impl Registry {
    /// Opens (creating if needed) the registry database.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        storehost_store::sqlite::checkpoint_in_background(&mut conn, path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS stores (
                id TEXT PRIMARY KEY,
                source TEXT NOT NULL,
                spec TEXT NOT NULL,
                updated_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS webhook_answers (
                webhook_id TEXT PRIMARY KEY,
                status INTEGER NOT NULL,
                body TEXT NOT NULL,
                received_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS plugins (
                name TEXT PRIMARY KEY,
                sha256 TEXT NOT NULL,
                updated_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS plugin_files (
                name TEXT PRIMARY KEY,
                sha256 TEXT NOT NULL,
                deployed_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS orphans (
                id TEXT PRIMARY KEY,
                missing_since INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS paused (
                id TEXT PRIMARY KEY,
                paused_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS removals (
                id TEXT PRIMARY KEY,
                purge INTEGER NOT NULL,
                asked_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS webhook_order (
                id TEXT PRIMARY KEY,
                event_at INTEGER NOT NULL,
                received_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS config_stores (
                id TEXT PRIMARY KEY,
                started_at INTEGER NOT NULL
            )",
        )?;
        let tokens = crate::tokens::TokenCache::load(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            tokens,
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records (or replaces) a store's desired spec.
    pub fn put(&self, id: &StoreId, source: StoreSource, spec: &StoreSpec) -> rusqlite::Result<()> {
        let persisted = PersistedSpec {
            plugin: spec.plugin.clone(),
            quotas: spec.quotas.clone(),
            config: spec.config.clone(),
            own: spec.own.clone(),
        };
        let json = serde_json::to_string(&persisted)
            .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?;
        self.conn().execute(
            "INSERT INTO stores (id, source, spec, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET source = ?2, spec = ?3, updated_at = ?4",
            params![id.as_str(), source.as_str(), json, now_ms()],
        )?;
        Ok(())
    }

    /// Forgets a store (its pause, its removal under way, whether the config declared it and
    /// since when the registry has been missing it included), in one transaction.
    pub fn delete(&self, id: &StoreId) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["stores", "paused", "removals", "config_stores", "orphans"] {
            tx.execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id.as_str()])?;
        }
        tx.commit()
    }

    /// Records that store `id` is being removed (its files archived, or deleted when
    /// `purge`), before anything of it is stopped or moved: a host that stops before the
    /// removal is done (killed, or host.db refusing to forget it) finishes it at its next
    /// start ([`Registry::removals`]) instead of bringing the store back without its data.
    pub fn begin_removal(&self, id: &StoreId, purge: bool) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO removals (id, purge, asked_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET purge = ?2, asked_at = ?3",
            params![id.as_str(), purge, now_ms()],
        )?;
        Ok(())
    }

    /// Records that store `id`, declared by the config file or `STORE_IDS`, has started (kept
    /// until it is removed): a host that finds it no longer declared at its next start removes
    /// it ([`Registry::config_stores`]).
    pub fn started_by_config(&self, id: &StoreId) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO config_stores (id, started_at) VALUES (?1, ?2)
             ON CONFLICT (id) DO NOTHING",
            params![id.as_str(), now_ms()],
        )?;
        Ok(())
    }

    /// The stores the config file or `STORE_IDS` declared and started, and not removed since.
    pub fn config_stores(&self) -> rusqlite::Result<Vec<StoreId>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM config_stores ORDER BY id")?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let id = row?;
            match StoreId::new(&id) {
                Ok(id) => out.push(id),
                Err(_) => {
                    tracing::error!(store_id = %id, "skipping an unreadable config store entry")
                }
            }
        }
        Ok(out)
    }

    /// Store `id` is not being removed after all (the config declares it again).
    pub fn cancel_removal(&self, id: &StoreId) -> rusqlite::Result<()> {
        self.conn()
            .execute("DELETE FROM removals WHERE id = ?1", [id.as_str()])?;
        Ok(())
    }

    /// The removals asked for and not finished (see [`Registry::begin_removal`]): each store
    /// id with whether its files are to be deleted rather than archived.
    pub fn removals(&self) -> rusqlite::Result<Vec<(StoreId, bool)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, purge FROM removals ORDER BY id")?;
        let rows = stmt.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, purge) = row?;
            match StoreId::new(&id) {
                Ok(id) => out.push((id, purge)),
                Err(_) => tracing::error!(store_id = %id, "skipping an unreadable removal entry"),
            }
        }
        Ok(out)
    }

    /// Forgets store `id`'s persisted spec and source (the config file or `STORE_IDS` now
    /// declares it, and decides both), keeping its pause.
    pub fn forget_spec(&self, id: &StoreId) -> rusqlite::Result<()> {
        let conn = self.conn();
        conn.execute("DELETE FROM stores WHERE id = ?1", [id.as_str()])?;
        conn.execute("DELETE FROM orphans WHERE id = ?1", [id.as_str()])?;
        Ok(())
    }

    /// Remembers that store `id` is paused (or no longer is), whatever its source: a store
    /// paused when the host stops opens paused at the next start.
    pub fn set_paused(&self, id: &StoreId, paused: bool) -> rusqlite::Result<()> {
        let conn = self.conn();
        if paused {
            conn.execute(
                "INSERT OR IGNORE INTO paused (id, paused_at) VALUES (?1, ?2)",
                params![id.as_str(), now_ms()],
            )?;
        } else {
            conn.execute("DELETE FROM paused WHERE id = ?1", [id.as_str()])?;
        }
        Ok(())
    }

    /// Whether store `id` was paused and not resumed since.
    pub fn is_paused(&self, id: &StoreId) -> rusqlite::Result<bool> {
        self.conn()
            .query_row("SELECT 1 FROM paused WHERE id = ?1", [id.as_str()], |_| {
                Ok(())
            })
            .optional()
            .map(|row| row.is_some())
    }

    /// Store `id`'s remembered source and spec, if host.db has a readable row for it.
    pub fn get(&self, id: &StoreId) -> rusqlite::Result<Option<(StoreSource, StoreSpec)>> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT source, spec FROM stores WHERE id = ?1",
                [id.as_str()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        Ok(row.and_then(|(source, spec)| parse_row(id.as_str(), &source, &spec)))
    }

    /// Every remembered store; rows that no longer parse are skipped with an error log.
    pub fn all(&self) -> rusqlite::Result<Vec<(StoreId, StoreSource, StoreSpec)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, source, spec FROM stores ORDER BY id")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, source, spec) = row?;
            if let Some((source, spec)) = parse_row(&id, &source, &spec)
                && let Ok(id) = StoreId::new(&id)
            {
                out.push((id, source, spec));
            }
        }
        Ok(out)
    }
}

/// A `stores` row's source and spec, or `None` (logged) when it does not parse.
fn parse_row(id: &str, source: &str, spec: &str) -> Option<(StoreSource, StoreSpec)> {
    let parsed = StoreId::new(id)
        .ok()
        .and(StoreSource::parse(source))
        .zip(serde_json::from_str::<PersistedSpec>(spec).ok());
    match parsed {
        Some((source, spec)) => Some((
            source,
            StoreSpec {
                plugin: spec.plugin,
                quotas: spec.quotas,
                config: spec.config,
                own: spec.own,
            },
        )),
        None => {
            tracing::error!(store_id = %id, "skipping an unreadable host registry entry");
            None
        }
    }
}

/// The first answer given to a `webhook-id`, kept to answer its replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAnswer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: String,
}

impl Registry {
    /// The answer recorded for `webhook_id` at or after `not_before` (ms since the Unix epoch).
    pub fn webhook_answer(
        &self,
        webhook_id: &str,
        not_before: i64,
    ) -> rusqlite::Result<Option<WebhookAnswer>> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row(
                "SELECT status, body FROM webhook_answers WHERE webhook_id = ?1 AND received_at >= ?2",
                params![webhook_id, not_before],
                |row| {
                    Ok(WebhookAnswer {
                        status: row.get(0)?,
                        body: row.get(1)?,
                    })
                },
            )
            .optional()
    }

    /// Records the first answer to `webhook_id`, and forgets answers older than `not_before`
    /// so the table stays bounded.
    pub fn record_webhook_answer(
        &self,
        webhook_id: &str,
        answer: &WebhookAnswer,
        not_before: i64,
    ) -> rusqlite::Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO webhook_answers (webhook_id, status, body, received_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (webhook_id) DO UPDATE SET status = ?2, body = ?3, received_at = ?4",
            params![webhook_id, answer.status, answer.body, now_ms()],
        )?;
        conn.execute(
            "DELETE FROM webhook_answers WHERE received_at < ?1",
            [not_before],
        )?;
        Ok(())
    }

    /// The `timestamp` of the latest webhook applied to store `id` (ms since the Unix epoch),
    /// if one was received at or after `not_before`.
    pub fn webhook_event_at(&self, id: &StoreId, not_before: i64) -> rusqlite::Result<Option<i64>> {
        self.conn()
            .query_row(
                "SELECT event_at FROM webhook_order WHERE id = ?1 AND received_at >= ?2",
                params![id.as_str(), not_before],
                |row| row.get(0),
            )
            .optional()
    }

    /// Records that a webhook of `timestamp` `event_at` was applied to store `id` (kept if it
    /// is the latest), and forgets records received before `not_before`.
    pub fn record_webhook_event_at(
        &self,
        id: &StoreId,
        event_at: i64,
        not_before: i64,
    ) -> rusqlite::Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO webhook_order (id, event_at, received_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET event_at = MAX(event_at, ?2), received_at = ?3",
            params![id.as_str(), event_at, now_ms()],
        )?;
        conn.execute(
            "DELETE FROM webhook_order WHERE received_at < ?1",
            [not_before],
        )?;
        Ok(())
    }

    /// Records that the stores `ids` are missing from the authoritative registry (keeping the
    /// time each was first seen missing), forgets every other orphan, and returns each
    /// orphan's first-missing time.
    pub fn mark_orphans(
        &self,
        ids: &[StoreId],
        now: i64,
    ) -> rusqlite::Result<BTreeMap<StoreId, i64>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut since = BTreeMap::new();
        {
            let keep: std::collections::BTreeSet<&str> = ids.iter().map(StoreId::as_str).collect();
            let mut existing = Vec::new();
            {
                let mut stmt = tx.prepare("SELECT id, missing_since FROM orphans")?;
                let rows = stmt.query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })?;
                for row in rows {
                    existing.push(row?);
                }
            }
            for (id, missing_since) in existing {
                if keep.contains(id.as_str()) {
                    if let Ok(id) = StoreId::new(&id) {
                        since.insert(id, missing_since);
                    }
                } else {
                    tx.execute("DELETE FROM orphans WHERE id = ?1", [&id])?;
                }
            }
            for id in ids {
                if !since.contains_key(id) {
                    tx.execute(
                        "INSERT OR IGNORE INTO orphans (id, missing_since) VALUES (?1, ?2)",
                        params![id.as_str(), now],
                    )?;
                    since.insert(id.clone(), now);
                }
            }
        }
        tx.commit()?;
        Ok(since)
    }

    /// Forgets that store `id` was missing from the registry.
    pub fn clear_orphan(&self, id: &StoreId) -> rusqlite::Result<()> {
        self.conn()
            .execute("DELETE FROM orphans WHERE id = ?1", [id.as_str()])?;
        Ok(())
    }
}

impl Registry {
    /// Records that plugin `name` is the component with hash `sha256` (uploaded through the API).
    pub fn put_plugin(&self, name: &str, sha256: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO plugins (name, sha256, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET sha256 = ?2, updated_at = ?3",
            params![name, sha256, now_ms()],
        )?;
        Ok(())
    }

    /// The hash of the plugin uploaded through the API under `name`, if one was.
    pub fn uploaded_plugin(&self, name: &str) -> rusqlite::Result<Option<String>> {
        self.conn()
            .query_row(
                "SELECT sha256 FROM plugins WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .optional()
    }

    /// Forgets the upload under `name` (a config file's newer version replaced it), so a
    /// restart does not bring it back.
    pub fn forget_uploaded_plugin(&self, name: &str) -> rusqlite::Result<()> {
        self.conn()
            .execute("DELETE FROM plugins WHERE name = ?1", [name])?;
        Ok(())
    }

    /// The hash config plugin `name`'s file had when it was last deployed from it.
    pub fn plugin_file(&self, name: &str) -> rusqlite::Result<Option<String>> {
        self.conn()
            .query_row(
                "SELECT sha256 FROM plugin_files WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .optional()
    }

    /// Records that config plugin `name`'s file, as deployed, has hash `sha256`.
    pub fn put_plugin_file(&self, name: &str, sha256: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO plugin_files (name, sha256, deployed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET sha256 = ?2, deployed_at = ?3",
            params![name, sha256, now_ms()],
        )?;
        Ok(())
    }

    /// Every uploaded plugin: `(name, sha256)`, oldest upload first.
    pub fn plugins(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, sha256 FROM plugins ORDER BY updated_at, name")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect()
    }
}
