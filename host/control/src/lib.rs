//! storehost's control plane: what should run (config file, environment, API) and the
//! orchestrator that makes it so.
#![forbid(unsafe_code)]

pub mod config;
pub mod orchestrator;
pub mod registry;

pub use orchestrator::{
    ControlError, HostSettings, Orchestrator, Provisioned, StoreSource, StoreView,
};
