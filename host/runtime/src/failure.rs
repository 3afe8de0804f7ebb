//! Why an invocation failed: one classified reason, never a guess from a string.

use std::fmt;

/// The classified reason an invocation failed (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    /// The call used up its fuel.
    OutOfFuel,
    /// The call ran longer than its CPU time (or the store's per-minute budget).
    CpuTime,
    /// The call took longer than its wall-clock limit, host calls included.
    WallTime,
    /// The guest needed more linear memory than its quota.
    Memory,
    /// The store reached its disk quota: its database, a statement's temporary files or its
    /// files directory.
    DiskFull,
    /// A rate limit refused the work.
    RateLimited,
    /// The guest panicked.
    Panic,
    /// The guest trapped (unreachable, stack overflow, bad memory access, ...).
    Trap,
    /// The host failed while serving the guest (I/O error, internal bug).
    HostError,
    /// The plugin returned an error on purpose.
    PluginError,
}

impl FailureReason {
    /// Every reason, for metrics and docs.
    pub const ALL: [FailureReason; 10] = [
        Self::OutOfFuel,
        Self::CpuTime,
        Self::WallTime,
        Self::Memory,
        Self::DiskFull,
        Self::RateLimited,
        Self::Panic,
        Self::Trap,
        Self::HostError,
        Self::PluginError,
    ];

    /// The stable snake_case name used in the API, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfFuel => "out_of_fuel",
            Self::CpuTime => "cpu_time",
            Self::WallTime => "wall_time",
            Self::Memory => "memory",
            Self::DiskFull => "disk_full",
            Self::RateLimited => "rate_limited",
            Self::Panic => "panic",
            Self::Trap => "trap",
            Self::HostError => "host_error",
            Self::PluginError => "plugin_error",
        }
    }

    /// Parses a name produced by [`FailureSelf::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed invocation: its reason and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct InvocationError {
    /// The classified reason.
    pub reason: FailureReason,
    /// What happened, in words (the guest's panic message, the trap, the limit hit).
    pub message: String,
}

impl InvocationError {
    /// An error with `reason` and `message`.
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}
