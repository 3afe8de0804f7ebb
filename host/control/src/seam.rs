//! The seam where several hosts will plug in (SPEC §10): where desired state is kept
//! ([`DesiredState`]) and whether this host runs a store ([`Placement`]).
//!
//! The [`Orchestrator`](crate::Orchestrator) reads and writes desired state only through
//! [`DesiredState`], and asks [`Placement`] before it starts any store. Today's single host
//! keeps desired state in `DATA_DIR/host.db` ([`Registry`]) and runs every store
//! ([`SingleHost`]); a cluster (etcd leases, an owner key per store, rendezvous placement)
//! replaces the two with [`Seams`], and the sources of desired state — config watcher,
//! `STORE_IDS`, webhooks, reconciler, admin API — stay as they are.

use std::sync::Arc;

use storehost_store::StoreId;

use crate::config::StoreSpec;
use crate::orchestrator::{ControlError, StoreSource};
use crate::registry::Registry;

/// Where a store runs, as a [`Placement`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// This host runs it.
    Here,
    /// Another host runs it; this one does not start it.
    Elsewhere {
        /// That host, when the placement knows which.
        host: Option<String>,
    },
}

/// Decides whether this host runs a store. Asked under the orchestrator's change lock before
/// every start (a new store from any source, a restore at start-up, a failed store started
/// again), so it answers from what it already knows, without waiting on the network.
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// Where store `id` runs.
    fn place(&self, id: &StoreId) -> Placed;
}

/// One host runs every store (today's deployment).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleHost;

impl Placement for SingleHost {
    fn place(&self, _id: &StoreId) -> Placed {
        Placed::Here
    }
}

/// The desired state the orchestrator keeps across restarts: each store's spec and owner
/// (for the sources that do not declare it again at every start: API, webhooks, reconciler),
/// whether it is paused, and the removals under way. Only the orchestrator writes it, under
/// its change lock.
pub trait DesiredState: Send + Sync + std::fmt::Debug {
    /// Every kept store with its owner and spec; an entry that no longer reads is skipped
    /// (and logged), not an error.
    fn all(&self) -> Result<Vec<(StoreId, StoreSource, StoreSpec)>, ControlError>;
    /// Store `id`'s owner and spec, if kept.
    fn get(&self, id: &StoreId) -> Result<Option<(StoreSource, StoreSpec)>, ControlError>;
    /// Keeps (or replaces) store `id`'s owner and spec.
    fn put(&self, id: &StoreId, source: StoreSource, spec: &StoreSpec) -> Result<(), ControlError>;
    /// Forgets store `id`'s owner and spec (the config file or `STORE_IDS` now declares it),
    /// keeping its pause.
    fn forget_spec(&self, id: &StoreId) -> Result<(), ControlError>;
    /// Forgets all of store `id` (removed): spec, pause, removal under way and record of the
    /// config's start, as one change.
    fn delete(&self, id: &StoreId) -> Result<(), ControlError>;
    /// Keeps that store `id` is paused, or no longer is, whatever its owner.
    fn set_paused(&self, id: &StoreId, paused: bool) -> Result<(), ControlError>;
    /// Whether store `id` is paused.
    fn is_paused(&self, id: &StoreId) -> Result<bool, ControlError>;
    /// Keeps that store `id` is being removed (its files deleted when `purge`), before any of
    /// it stops: a host stopped halfway finishes the removal instead of starting the store.
    fn begin_removal(&self, id: &StoreId, purge: bool) -> Result<(), ControlError>;
    /// Store `id` is not being removed after all.
    fn cancel_removal(&self, id: &StoreId) -> Result<(), ControlError>;
    /// The removals begun and not finished, each with its `purge`.
    fn removals(&self) -> Result<Vec<(StoreId, bool)>, ControlError>;
    /// Keeps that store `id`, which this host's config file or `STORE_IDS` declares, has
    /// started: the host, when its config no longer declares it at its next start, removes it.
    /// Kept per host (each host has its own config).
    fn started_by_config(&self, id: &StoreId) -> Result<(), ControlError>;
    /// The stores this host's config started and not removed since.
    fn config_stores(&self) -> Result<Vec<StoreId>, ControlError>;
}

/// `host.db` is today's desired state; its tokens, plugin records, webhook answers and
/// orphan records are this host's own and stay on [`Registry`].
impl DesiredState for Registry {
    fn all(&self) -> Result<Vec<(StoreId, StoreSource, StoreSpec)>, ControlError> {
        Ok(Registry::all(self)?)
    }

    fn get(&self, id: &StoreId) -> Result<Option<(StoreSource, StoreSpec)>, ControlError> {
        Ok(Registry::get(self, id)?)
    }

    fn put(&self, id: &StoreId, source: StoreSource, spec: &StoreSpec) -> Result<(), ControlError> {
        Ok(Registry::put(self, id, source, spec)?)
    }

    fn forget_spec(&self, id: &StoreId) -> Result<(), ControlError> {
        Ok(Registry::forget_spec(self, id)?)
    }

    fn delete(&self, id: &StoreId) -> Result<(), ControlError> {
        Ok(Registry::delete(self, id)?)
    }

    fn set_paused(&self, id: &StoreId, paused: bool) -> Result<(), ControlError> {
        Ok(Registry::set_paused(self, id, paused)?)
    }

    fn is_paused(&self, id: &StoreId) -> Result<bool, ControlError> {
        Ok(Registry::is_paused(self, id)?)
    }

    fn begin_removal(&self, id: &StoreId, purge: bool) -> Result<(), ControlError> {
        Ok(Registry::begin_removal(self, id, purge)?)
    }

    fn cancel_removal(&self, id: &StoreId) -> Result<(), ControlError> {
        Ok(Registry::cancel_removal(self, id)?)
    }

    fn removals(&self) -> Result<Vec<(StoreId, bool)>, ControlError> {
        Ok(Registry::removals(self)?)
    }

    fn started_by_config(&self, id: &StoreId) -> Result<(), ControlError> {
        Ok(Registry::started_by_config(self, id)?)
    }

    fn config_stores(&self) -> Result<Vec<StoreId>, ControlError> {
        Ok(Registry::config_stores(self)?)
    }
}

/// What an [`Orchestrator`](crate::Orchestrator) is built with
/// ([`Orchestrator::with_seams`](crate::Orchestrator::with_seams)); the default is today's
/// single host.
#[derive(Debug, Clone)]
pub struct Seams {
    /// Where desired state is kept; `None`: this host's `host.db`.
    pub desired_state: Option<Arc<dyn DesiredState>>,
    /// Which stores this host runs.
    pub placement: Arc<dyn Placement>,
}

impl Default for Seams {
    fn default() -> Self {
        Self {
            desired_state: None,
            placement: Arc::new(SingleHost),
        }
    }
}
