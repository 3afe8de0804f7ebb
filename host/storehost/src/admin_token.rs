//! The admin token: from the environment variable the config names, or generated once and kept
//! in `DATA_DIR/admin.token`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Where the token came from, so the caller can tell the operator.
pub enum TokenOrigin {
    /// The environment variable named in the config.
    Env(String),
    /// An existing `admin.token` file.
    File,
    /// Generated now and written to `admin.token` (print it once).
    Generated,
}

/// Finds or creates the admin token.
pub fn resolve(env_var: &str, data_dir: &Path) -> anyhow::Result<(String, TokenOrigin)> {
    if let Ok(token) = std::env::var(env_var)
        && !token.trim().is_empty()
    {
        return Ok((
            token.trim().to_owned(),
            TokenOrigin::Env(env_var.to_owned()),
        ));
    }
    let path = data_dir.join("admin.token");
    if let Ok(token) = std::fs::read_to_string(&path)
        && !token.trim().is_empty()
    {
        return Ok((token.trim().to_owned(), TokenOrigin::File));
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("could not create the data directory {}", data_dir.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("could not write the admin token to {}", path.display()))?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok((token, TokenOrigin::Generated))
}
