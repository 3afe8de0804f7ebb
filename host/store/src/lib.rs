//! One storehost store: its directory, SQLite databases, event log, and the actor that feeds
//! its sandbox one event at a time.
//!
//! Files of a store (`DATA_DIR/stores/<storeId>/`):
//! - `events.db` — the event log; appends are durable before the API answers 2xx;
//! - `store.db` — the plugin's tables and the host's `_host_*` tables (cursor, outbox, dead
//!   letters), so one transaction covers an invocation's effects and the cursor;
//! - `files/` — the only directory the guest's WASI filesystem sees (at `/data`).
//!
//! A new store's directory is taken ready-made from `stores/.spare/` when the host keeps spares
//! ([`SpareStores`]).

mod actor;
pub mod backup;
pub mod capabilities;
mod checkpoint;
pub mod clock;
mod closing;
pub mod dir;
pub mod event_log;
pub mod guest_db;
pub mod heap;
pub mod id;
pub mod metrics;
pub mod open_files;
pub mod quotas;
pub mod schedules;
pub mod spare;
pub mod sql_memory;
pub mod sqlite;
pub mod store;
mod vfs;

pub use capabilities::{LlmBackend, StoreCapabilities};
pub use event_log::{LoggedEvent, NewEvent};
pub use guest_db::DeadLetter;
pub use id::{InvalidStoreId, STORE_ID_RULE, StoreId};
pub use quotas::Quotas;
pub use spare::SpareStores;
pub use sqlite::{Durability, VFS as SQLITE_VFS};
pub use store::{
    EmitsHeld, Follower, MAX_FOLLOWERS, MAX_UNREAD_ANSWER_KIB, RetryPolicy, Store, StoreError,
    StorePlugin, StoreRuntime, StoreSettings, StoreState, StoreStatus,
    cannot_open_for_want_of_files, is_disk_full, is_out_of_files, is_storage_full,
};
