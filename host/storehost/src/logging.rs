//! Log setup: `STOREHOST_LOG` filters (default `info`), `STOREHOST_LOG_FORMAT=json|pretty`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; logs go to stderr so stdout stays for the few lines a
/// person or a script reads (the listen address, the admin token).
pub fn init() {
    let filter =
        EnvFilter::try_from_env("STOREHOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("STOREHOST_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
