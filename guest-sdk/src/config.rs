//! The store's own configuration: key/values the operator set for this store.

use crate::__bindings::storehost::plugin::config as wit;

/// The value of `key`, if set.
pub fn get(key: &str) -> Option<String> {
    wit::get(key)
}

/// Every key/value pair, sorted by key.
pub fn all() -> Vec<(String, String)> {
    wit::all()
}
