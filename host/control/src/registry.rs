//! The host registry (`DATA_DIR/host.db`): the stores added at run time, so a restart brings
//! back exactly the same set.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};
use storehost_store::{Quotas, StoreId, sqlite::now_ms};

use crate::config::StoreSpec;
use crate::orchestrator::StoreSource;

/// The persisted desired state of dynamically added stores.
pub struct Registry {
    conn: Mutex<Connection>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedSpec {
    plugin: String,
    quotas: Quotas,
    config: BTreeMap<String, String>,
}

impl Registry {
    /// Opens (creating if needed) the registry database.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS stores (
                id TEXT PRIMARY KEY,
                source TEXT NOT NULL,
                spec TEXT NOT NULL,
                updated_at INTEGER NOT NULL
            )",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
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

    /// Forgets a store.
    pub fn delete(&self, id: &StoreId) -> rusqlite::Result<()> {
        self.conn()
            .execute("DELETE FROM stores WHERE id = ?1", [id.as_str()])?;
        Ok(())
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
            let parsed = StoreId::new(&id)
                .ok()
                .zip(StoreSource::parse(&source))
                .zip(serde_json::from_str::<PersistedSpec>(&spec).ok());
            match parsed {
                Some(((id, source), spec)) => out.push((
                    id,
                    source,
                    StoreSpec {
                        plugin: spec.plugin,
                        quotas: spec.quotas,
                        config: spec.config,
                    },
                )),
                None => {
                    tracing::error!(store_id = %id, "skipping an unreadable host registry entry")
                }
            }
        }
        Ok(out)
    }
}
