//! Time as the host sees it.

use crate::__bindings::storehost::plugin::clock as wit;

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    wit::now_ms()
}
