//! Store tokens: bearer tokens that reach one store's tenant endpoints and nothing else.
//!
//! A token is `sht_<id>_<64 hex digits>`: the id names its row in `host.db`, the hex part is 256
//! random bits. Only the SHA-256 of the whole token is stored; it is shown once, when created.
//! Checking a token looks its id up in an in-memory copy of the table (so tenant requests never
//! wait on the registry database) and compares the hashes in constant time.

use std::collections::HashMap;
use std::sync::RwLock;

use rusqlite::{Connection, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use storehost_store::{StoreId, sqlite::now_ms};
use subtle::ConstantTimeEq;

use crate::registry::Registry;

/// The prefix every store token starts with (so a leaked one is recognisable in logs and scans).
pub const TOKEN_PREFIX: &str = "sht_";

/// The table of store tokens in `host.db`. `AUTOINCREMENT` so a revoked id is never reused.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS store_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS store_tokens_by_store ON store_tokens (store_id);
";

/// A token just created: the only time its secret is known.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedToken {
    /// The token's id (to list or revoke it).
    pub id: u64,
    /// The token itself; not stored, not shown again.
    pub token: String,
    /// The store it reaches.
    pub store_id: StoreId,
    /// When it was created (ms since the Unix epoch).
    pub created_at: i64,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// The token's id.
    pub id: u64,
    /// When it was created (ms since the Unix epoch).
    pub created_at: i64,
}

#[derive(Debug, Clone)]
struct CachedToken {
    store: StoreId,
    sha256: [u8; 32],
    created_at: i64,
}

/// The in-memory copy of `store_tokens`, kept in step with every change.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    by_id: RwLock<HashMap<u64, CachedToken>>,
}

impl TokenCache {
    /// Creates the table if needed and loads every token.
    pub(crate) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        conn.execute_batch(SCHEMA)?;
        let mut stmt = conn.prepare("SELECT id, store_id, sha256, created_at FROM store_tokens")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, u64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, i64>(3)?,
            ))
        })?;
        let mut by_id = HashMap::new();
        for row in rows {
            let (id, store, sha256, created_at) = row?;
            let parsed = StoreId::new(&store)
                .ok()
                .zip(<[u8; 32]>::try_from(sha256.as_slice()).ok());
            match parsed {
                Some((store, sha256)) => {
                    by_id.insert(
                        id,
                        CachedToken {
                            store,
                            sha256,
                            created_at,
                        },
                    );
                }
                None => tracing::error!(
                    token_id = id,
                    "skipping an unreadable store token in host.db (it no longer works; create a new one)"
                ),
            }
        }
        Ok(Self {
            by_id: RwLock::new(by_id),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, CachedToken>> {
        self.by_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, CachedToken>> {
        self.by_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The id part of a well-formed token, without looking anything up.
fn token_id(token: &str) -> Option<u64> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    id.parse().ok()
}

impl Registry {
    /// Creates a token for store `store`; the returned secret is not kept anywhere.
    pub fn create_store_token(&self, store: &StoreId) -> rusqlite::Result<IssuedToken> {
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let created_at = now_ms();
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        // The id is part of the token and the hash covers the whole token, so the row is
        // inserted first (for its id) and its hash written once the token is known.
        tx.execute(
            "INSERT INTO store_tokens (store_id, sha256, created_at) VALUES (?1, x'', ?2)",
            params![store.as_str(), created_at],
        )?;
        let id = u64::try_from(tx.last_insert_rowid()).unwrap_or_default();
        let token = format!("{TOKEN_PREFIX}{id}_{secret}");
        let sha256: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        tx.execute(
            "UPDATE store_tokens SET sha256 = ?1 WHERE id = ?2",
            params![&sha256[..], id],
        )?;
        tx.commit()?;
        self.tokens.write().insert(
            id,
            CachedToken {
                store: store.clone(),
                sha256,
                created_at,
            },
        );
        Ok(IssuedToken {
            id,
            token,
            store_id: store.clone(),
            created_at,
        })
    }

    /// Store `store`'s tokens, oldest first.
    pub fn store_tokens(&self, store: &StoreId) -> Vec<TokenInfo> {
        let mut tokens: Vec<TokenInfo> = self
            .tokens
            .read()
            .iter()
            .filter(|(_, t)| &t.store == store)
            .map(|(&id, t)| TokenInfo {
                id,
                created_at: t.created_at,
            })
            .collect();
        tokens.sort_by_key(|t| t.id);
        tokens
    }

    /// Revokes token `id` of store `store`; returns whether there was such a token.
    pub fn revoke_store_token(&self, store: &StoreId, id: u64) -> rusqlite::Result<bool> {
        let owned = self
            .tokens
            .read()
            .get(&id)
            .is_some_and(|t| &t.store == store);
        if !owned {
            return Ok(false);
        }
        self.conn().execute(
            "DELETE FROM store_tokens WHERE id = ?1 AND store_id = ?2",
            params![id, store.as_str()],
        )?;
        self.tokens.write().remove(&id);
        Ok(true)
    }

    /// Revokes every token of store `store` (when it is removed: a store created again later
    /// under the same id is a new tenant). Returns how many.
    pub fn revoke_all_store_tokens(&self, store: &StoreId) -> rusqlite::Result<usize> {
        let revoked = self.conn().execute(
            "DELETE FROM store_tokens WHERE store_id = ?1",
            [store.as_str()],
        )?;
        self.tokens.write().retain(|_, t| &t.store != store);
        Ok(revoked)
    }

    /// The store `token` reaches, when it is a valid, unrevoked store token.
    pub fn verify_store_token(&self, token: &str) -> Option<StoreId> {
        let id = token_id(token)?;
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let tokens = self.tokens.read();
        let cached = tokens.get(&id)?;
        bool::from(given.ct_eq(&cached.sha256)).then(|| cached.store.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_by_hash_revoked_and_kept_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.db");
        let acme = StoreId::new("acme").unwrap();
        let other = StoreId::new("other").unwrap();
        let registry = Registry::open(&path).unwrap();
        let first = registry.create_store_token(&acme).unwrap();
        let second = registry.create_store_token(&acme).unwrap();
        assert!(first.token.starts_with(TOKEN_PREFIX));
        assert_ne!(first.id, second.id);
        assert_eq!(
            registry.verify_store_token(&first.token),
            Some(acme.clone())
        );

        // A token with a valid id but another secret is refused.
        let forged = format!("{TOKEN_PREFIX}{}_{}", first.id, "0".repeat(64));
        assert_eq!(registry.verify_store_token(&forged), None);
        assert_eq!(registry.verify_store_token("sht_x_y"), None);

        // Only the hash is stored.
        let conn = Connection::open(&path).unwrap();
        let stored: Vec<u8> = conn
            .query_row(
                "SELECT sha256 FROM store_tokens WHERE id = ?1",
                [first.id],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(stored.len(), 32);
        assert!(!String::from_utf8_lossy(&stored).contains(&first.token[10..]));

        assert!(!registry.revoke_store_token(&other, first.id).unwrap());
        assert!(registry.revoke_store_token(&acme, first.id).unwrap());
        assert_eq!(registry.verify_store_token(&first.token), None);
        drop(registry);

        let reopened = Registry::open(&path).unwrap();
        assert_eq!(reopened.verify_store_token(&first.token), None);
        assert_eq!(
            reopened.verify_store_token(&second.token),
            Some(acme.clone())
        );
        assert_eq!(
            reopened.store_tokens(&acme),
            vec![TokenInfo {
                id: second.id,
                created_at: second.created_at
            }]
        );
        let third = reopened.create_store_token(&acme).unwrap();
        assert!(third.id > second.id, "revoked ids are never reused");
        assert_eq!(reopened.revoke_all_store_tokens(&acme).unwrap(), 2);
        assert_eq!(reopened.verify_store_token(&second.token), None);
    }
}
