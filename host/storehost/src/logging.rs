//! Log setup: `STOREHOST_LOG` filters (default `info`), `STOREHOST_LOG_FORMAT=json|pretty`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; logs go to stderr so stdout stays for the few lines a
/// person or a script reads (the listen address, the admin token). The human format is
/// coloured only on a terminal (and never with `NO_COLOR` set): in a file or a journal the
/// colours' escape sequences would be noise in every line.
/// A filter or a format it cannot use is said in the log's first line, not ignored.
pub fn init() {
    let mut complaints = Vec::new();
    let filter = match std::env::var("STOREHOST_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|err| {
            complaints.push(format!(
                "STOREHOST_LOG={spec:?} is not a log filter ({err}); logging at `info`. \
                 Use a level (`debug`) or directives (`info,storehost_store=debug`)"
            ));
            EnvFilter::new("info")
        }),
        Err(_) => EnvFilter::new("info"),
    };
    let json = match std::env::var("STOREHOST_LOG_FORMAT") {
        Ok(format) if format.eq_ignore_ascii_case("json") => true,
        Ok(format) if format.is_empty() || format.eq_ignore_ascii_case("pretty") => false,
        Ok(format) => {
            complaints.push(format!(
                "STOREHOST_LOG_FORMAT={format:?} is not a log format; logging in the human \
                 format. Use `json` or `pretty`"
            ));
            false
        }
        Err(_) => false,
    };
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(colour).init();
    }
    for complaint in complaints {
        tracing::warn!("{complaint}");
    }
}
