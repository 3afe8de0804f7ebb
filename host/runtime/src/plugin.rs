//! Plugins: validated, content-addressed, compiled once, cached on disk.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use crate::bindings::PluginPre;
use crate::host::HostCapabilities;
use crate::runtime::{
    CORE_INSTANCES_PER_SANDBOX, MEMORIES_PER_SANDBOX, Runtime, TABLES_PER_SANDBOX,
};
use crate::sandbox::InstanceState;

/// A plugin that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a WebAssembly component wasmtime can compile.
    #[error(
        "not a valid WebAssembly component: {0}; build plugins with `cargo build --target wasm32-wasip2`"
    )]
    Compile(String),
    /// The component needs more core instances, linear memories or tables than one sandbox
    /// may hold: every sandbox must fit in its share of the host's pool.
    #[error(
        "the component needs more than one plugin may have: {0}; a plugin built with `cargo build --target wasm32-wasip2` has 3 core module instances, 1 linear memory and 2 tables, and a plugin may have at most {CORE_INSTANCES_PER_SANDBOX} core module instances, {MEMORIES_PER_SANDBOX} linear memories and {TABLES_PER_SANDBOX} tables"
    )]
    Limits(String),
    /// The component does not implement the `storehost:plugin/plugin` world.
    #[error("the component does not implement the storehost:plugin@0.1.0 world: {0}")]
    World(String),
}

/// A compiled plugin, ready to instantiate sandboxes from.
pub struct Plugin<H: HostCapabilities> {
    sha256: String,
    size: usize,
    pub(crate) fuel_metered: bool,
    pub(crate) scheduler: Arc<crate::scheduler::SlotScheduler>,
    pub(crate) ticker: Arc<crate::runtime::EpochTicker>,
    pub(crate) open_files: Arc<crate::files::GuestOpenFiles>,
    guests: tokio::runtime::Handle,
    demoted: tokio::runtime::Handle,
    pub(crate) pre: PluginPre<InstanceState<H>>,
}

impl<H: HostCapabilities> std::fmt::Debug for Plugin<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<H: HostCapabilities> Plugin<H> {
    /// Validates and compiles `wasm` (or loads its compiled form from the runtime's cache).
    pub fn load(runtime: &Arc<Runtime<H>>, wasm: &[u8]) -> Result<Arc<Self>, PluginError> {
        let sha256 = hex::encode(Sha256::digest(wasm));
        let component = match &runtime.options.cache_dir {
            Some(dir) => load_cached(runtime, dir, &sha256, wasm)?,
            None => compile(runtime, wasm)?,
        };
        let instance_pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|err| PluginError::World(one_line(&err)))?;
        let pre = PluginPre::new(instance_pre).map_err(|err| PluginError::World(one_line(&err)))?;
        Ok(Arc::new(Self {
            sha256,
            size: wasm.len(),
            fuel_metered: runtime.options.fuel,
            scheduler: runtime.scheduler.clone(),
            ticker: runtime.ticker.clone(),
            open_files: runtime.open_files.clone(),
            guests: runtime.guests.handle().clone(),
            demoted: runtime.guests.demoted().clone(),
            pre,
        }))
    }

    /// The threads stores of this runtime run on (see [`Runtime::guest_executor`]).
    pub fn guest_executor(&self) -> &tokio::runtime::Handle {
        &self.guests
    }

    /// The threads demoted stores' calls run on (see [`Runtime::demoted_executor`]).
    pub fn demoted_executor(&self) -> &tokio::runtime::Handle {
        &self.demoted
    }

    /// The SHA-256 of the component's bytes, hex-encoded.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The size of the component, in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

fn compile<H: HostCapabilities>(
    runtime: &Runtime<H>,
    wasm: &[u8],
) -> Result<Component, PluginError> {
    Component::new(&runtime.engine, wasm).map_err(|err| {
        // wasmtime checks a component against the pool's limits after compiling it, with an
        // error of no type of its own; every such error names the pooling allocator.
        if err
            .chain()
            .any(|cause| cause.to_string().contains("pooling allocator"))
        {
            PluginError::Limits(one_line(&err))
        } else {
            PluginError::Compile(one_line(&err))
        }
    })
}

/// `err` with its causes, on one line: wasmtime's parser writes some of its errors over many
/// lines (a bad magic number as two byte arrays, a byte a line), which the log, `/health` and
/// an API answer show whole.
fn one_line(err: &impl std::fmt::Display) -> String {
    format!("{err:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Looks the compiled artifact up by content and engine; recompiles on any mismatch.
///
/// A cached artifact is trusted only if the SHA-256 stored beside it matches its bytes: a
/// deserialized artifact is executable code, and wasmtime does no integrity check of its own.
fn load_cached<H: HostCapabilities>(
    runtime: &Runtime<H>,
    dir: &Path,
    sha256: &str,
    wasm: &[u8],
) -> Result<Component, PluginError> {
    let mut hasher = DefaultHasher::new();
    runtime
        .engine
        .precompile_compatibility_hash()
        .hash(&mut hasher);
    let key = format!("{sha256}-{:016x}", hasher.finish());
    let artifact = dir.join(format!("{key}.cwasm"));
    let checksum = dir.join(format!("{key}.cwasm.sha256"));

    if let (Ok(bytes), Ok(expected)) = (fs::read(&artifact), fs::read_to_string(&checksum))
        && hex::encode(Sha256::digest(&bytes)) == expected.trim()
    {
        match deserialize_verified(runtime, &bytes) {
            Ok(component) => return Ok(component),
            Err(err) => tracing::warn!(
                artifact = %artifact.display(),
                "cached plugin artifact rejected, recompiling: {err:#}"
            ),
        }
    }

    let component = compile(runtime, wasm)?;
    if let Err(err) = store_artifact(dir, &artifact, &checksum, &component) {
        tracing::warn!(dir = %dir.display(), "could not cache the compiled plugin: {err}");
    }
    Ok(component)
}

#[allow(unsafe_code)]
fn deserialize_verified<H: HostCapabilities>(
    runtime: &Runtime<H>,
    bytes: &[u8],
) -> wasmtime::Result<Component> {
    // SAFETY: `bytes` were produced by `Component::serialize` of an engine with the same
    // compatibility hash (it is part of the file name), written by this host into its own cache
    // directory, and their SHA-256 matched the checksum recorded next to them when written.
    unsafe { Component::deserialize(&runtime.engine, bytes) }
}

fn store_artifact(
    dir: &Path,
    artifact: &Path,
    checksum: &Path,
    component: &Component,
) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let bytes = component
        .serialize()
        .map_err(|err| std::io::Error::other(format!("{err:#}")))?;
    write_atomically(artifact, &bytes)?;
    write_atomically(checksum, hex::encode(Sha256::digest(&bytes)).as_bytes())
}

/// Writes `bytes` to `path` whole or not at all: through a temporary file of this write's own
/// in the same directory (`.<name>.<pid>.<n>.tmp`), synced, then renamed over `path`. Two
/// writes of one path at once each rename a whole file (with one temporary name for both, the
/// second's rename found it gone); a write that fails deletes its temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a directory holds besides `keep`.
    fn others(dir: &Path, keep: &str) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != keep)
            .collect()
    }

    /// Writes of one path at once each land whole (they shared one temporary file, and the
    /// second's rename failed), and a write that fails leaves no temporary file behind.
    #[test]
    fn writes_at_once_each_land_whole_and_a_failed_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin.wasm");
        std::thread::scope(|scope| {
            for n in 0..8u8 {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..50 {
                        write_atomically(path, &[n; 4096]).unwrap();
                    }
                });
            }
        });
        let written = fs::read(&path).unwrap();
        assert!(written.len() == 4096 && written.iter().all(|b| *b == written[0]));
        assert_eq!(others(dir.path(), "plugin.wasm"), Vec::<String>::new());

        // A directory with something in it cannot be renamed over.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("inside"), b"x").unwrap();
        assert!(write_atomically(&blocked, b"bytes").is_err());
        assert_eq!(
            others(dir.path(), "plugin.wasm"),
            vec!["blocked".to_owned()],
            "the failed write's temporary file is gone"
        );
    }
}
