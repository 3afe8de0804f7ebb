//! storehost's control plane: what should run (config file, environment, API) and the
//! orchestrator that makes it so.
#![forbid(unsafe_code)]

pub mod config;
pub mod llm_backend;
pub mod orchestrator;
pub mod reconciler;
pub mod registry;
pub mod seam;
pub mod tokens;
pub mod watcher;
pub mod webhook;

pub use orchestrator::{
    ControlError, HostSettings, Orchestrator, Provisioned, ProvisioningActivity, StoreSource,
    StoreView, Transition,
};
pub use seam::{DesiredState, Placed, Placement, Seams, SingleHost};
