//! Log lines that land in the host log, tagged with the store id.
//!
//! Each function takes anything that displays, so both `log::info("saved")` and
//! `log::info(format_args!("saved {id}"))` work.

use std::fmt::Display;

use crate::__bindings::storehost::plugin::log as wit;

pub use crate::__bindings::storehost::plugin::log::Level;

/// Logs `message` at `level`.
pub fn log(level: Level, message: impl Display) {
    wit::log(level, &message.to_string());
}

/// Logs at trace level.
pub fn trace(message: impl Display) {
    log(Level::Trace, message);
}

/// Logs at debug level.
pub fn debug(message: impl Display) {
    log(Level::Debug, message);
}

/// Logs at info level.
pub fn info(message: impl Display) {
    log(Level::Info, message);
}

/// Logs at warn level.
pub fn warn(message: impl Display) {
    log(Level::Warn, message);
}

/// Logs at error level.
pub fn error(message: impl Display) {
    log(Level::Error, message);
}
