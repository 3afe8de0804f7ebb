//! The references the rows compare against, measured in the same run: bare wasmtime (no
//! storehost around it) and raw SQLite through rusqlite with the settings storehost uses.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use storehost_runtime::{
    Event, FilesUsage, Limits, Plugin, RuntimeOptions, Sandbox, SandboxFiles, SandboxOptions,
};
use storehost_store::guest_db::GuestDb;
use storehost_store::{Quotas, StoreCapabilities, StoreRuntime};
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// The host's cursor table in `store.db` (host/store/src/guest_db.rs), the least a new store's
/// database holds.
const CURSOR_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _host_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO _host_cursor (id, last_seq) VALUES (1, 0);
";

/// Opens a database the way storehost opens a store's files (host/store/src/sqlite.rs): WAL,
/// `synchronous=NORMAL` (the default `process` durability), foreign keys on.
pub fn open_like_storehost(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The runtime options of a `TestHost` with `max_stores` (host/tests/src/lib.rs), so the bare
/// reference runs on the same pooling configuration as the measured host.
pub fn test_host_runtime_options(max_stores: usize) -> RuntimeOptions {
    RuntimeOptions {
        max_live_sandboxes: u32::try_from(max_stores).unwrap_or(u32::MAX),
        max_memory_bytes: 256 << 20,
        fuel: false,
        cache_dir: None,
        max_concurrent_invocations: 2,
        cpu_limits: true,
        guest_open_files: storehost_store::open_files::for_guests(
            max_stores,
            2,
            storehost_api::ServeOptions::default().max_connections,
        ),
    }
}

/// What a bare wasmtime store holds: WASI and nothing else.
struct BareState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// What bare wasmtime took, per sample.
pub struct BareTimes {
    /// `Store::new` + `InstancePre::instantiate_async`.
    pub instantiate: Vec<Duration>,
    /// The same, then the first `handle-event` call returning.
    pub first_call: Vec<Duration>,
}

/// `samples` bare instantiations of the component at `wasm_path`: `Store::new` +
/// `InstancePre::instantiate_async`, then one `handle-event` call, on an engine built by
/// storehost's runtime with `options` (same pooling allocator, epochs, limits). Storehost's own
/// imports are linked as traps: the plugin must call none of them while it is instantiated or
/// while it handles the event (the trivial plugin calls none).
pub async fn bare_instantiations(
    wasm_path: &str,
    options: RuntimeOptions,
    samples: usize,
) -> anyhow::Result<BareTimes> {
    let wasm = std::fs::read(wasm_path)?;
    instantiate_bare(&wasm, options, samples)
        .await
        .map_err(|err| anyhow::anyhow!("bare wasmtime: {err:#}"))
}

async fn instantiate_bare(
    wasm: &[u8],
    options: RuntimeOptions,
    samples: usize,
) -> wasmtime::Result<BareTimes> {
    let runtime = StoreRuntime::new(options)?;
    let engine = runtime.engine().clone();
    let component = Component::new(&engine, wasm)?;
    let mut linker = Linker::<BareState>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    linker.define_unknown_imports_as_traps(&component)?;
    let pre = linker.instantiate_pre(&component)?;
    let event = tick_event();
    timed_rounds(samples, async || {
        let started = Instant::now();
        let mut store = Store::new(
            &engine,
            BareState {
                wasi: WasiCtxBuilder::new().build(),
                table: ResourceTable::new(),
            },
        );
        store.set_epoch_deadline(1 << 40);
        let instance = pre.instantiate_async(&mut store).await?;
        let instantiated = started.elapsed();
        let handle_event = instance
            .get_typed_func::<(&Event,), (Result<(), String>,)>(&mut store, "handle-event")?;
        let (outcome,) = handle_event.call_async(&mut store, (&event,)).await?;
        let called = started.elapsed();
        outcome.map_err(|err| wasmtime::format_err!("handle-event failed: {err}"))?;
        drop(store);
        Ok((instantiated, called))
    })
    .await
}

/// The event every instantiation round delivers.
fn tick_event() -> Event {
    Event {
        seq: 1,
        event_type: "tick".into(),
        payload: "{}".into(),
        at_ms: 0,
        source: "api".into(),
    }
}

/// Runs `round` (answering the time to its instance and to its first call's return) a tenth
/// of `samples` + 10 times to warm up, then `samples` times, keeping the latter's times.
async fn timed_rounds<E>(
    samples: usize,
    mut round: impl AsyncFnMut() -> Result<(Duration, Duration), E>,
) -> Result<BareTimes, E> {
    let mut times = BareTimes {
        instantiate: Vec::with_capacity(samples),
        first_call: Vec::with_capacity(samples),
    };
    for n in 0..samples / 10 + 10 + samples {
        let (instantiated, called) = round().await?;
        if n >= samples / 10 + 10 {
            times.instantiate.push(instantiated);
            times.first_call.push(called);
        }
    }
    Ok(times)
}

/// The same loop as [`bare_instantiations`] through storehost's own sandbox: `Sandbox::new`
/// with a store's capabilities (its `store.db` open), its WASI context with the preopened
/// `files/` directory, its memory and CPU limits and the wall-time bound around instantiation,
/// then one `handle-event` call through the sandbox (which takes a turn from the runtime's
/// scheduler, as a store's call does), then the sandbox dropped.
pub async fn storehost_instantiations(
    wasm_path: &str,
    options: RuntimeOptions,
    samples: usize,
) -> anyhow::Result<BareTimes> {
    let wasm = std::fs::read(wasm_path)?;
    let runtime =
        StoreRuntime::new(options).map_err(|err| anyhow::anyhow!("storehost runtime: {err:#}"))?;
    let plugin = Plugin::load(&runtime, &wasm)?;
    let dir = tempfile::tempdir()?;
    let files = dir.path().join("files");
    std::fs::create_dir(&files)?;
    let db = GuestDb::open(
        &dir.path().join("store.db"),
        storehost_store::Durability::Process,
        1 << 30,
    )?;
    let db = Arc::new(std::sync::Mutex::new(db));
    let id = storehost_store::StoreId::new("bench")?;
    let config = Arc::new(std::collections::BTreeMap::new());
    let event = tick_event();
    let usage = Arc::new(FilesUsage::measure(&files, Quotas::default().files)?);
    timed_rounds(samples, async || {
        let started = Instant::now();
        let host = StoreCapabilities::new(id.clone(), db.clone(), config.clone(), 1_000, None);
        let options = SandboxOptions {
            files: Some(SandboxFiles {
                dir: files.clone(),
                usage: usage.clone(),
            }),
            limits: Limits::default(),
        };
        let mut sandbox = Sandbox::new(&plugin, host, options).await?;
        let instantiated = started.elapsed();
        sandbox.handle_event(&event).await?;
        let called = started.elapsed();
        drop(sandbox);
        anyhow::Ok((instantiated, called))
    })
    .await
}

/// Writes out what earlier phases left dirty in the page cache (as `sync` does), so a measured
/// phase does not pay for the writeback of the one before it (a stopped host checkpoints and
/// closes its stores; a removed temporary directory deletes thousands of files).
pub async fn settle_disk() {
    let synced = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status()).await;
    if !matches!(synced, Ok(Ok(status)) if status.success()) {
        eprintln!("  (could not run `sync`; figures may include earlier phases' writeback)");
    }
}

/// The payload of event `n` in the throughput rows (the same text storehost receives).
pub fn payload(n: usize) -> String {
    format!("{{\"n\":{n}}}")
}

/// Raw rusqlite inserting `events` rows in batches of `batch` (one transaction each) into
/// `databases` event-log files, spread over `threads` threads (each database written by one);
/// batch `j` goes to database `j % databases`, as the throughput rows send them. Returns the
/// time until every batch committed.
pub fn insert_batches(
    databases: usize,
    events: usize,
    batch: usize,
    threads: usize,
) -> anyhow::Result<Duration> {
    let dir = storehost_tests::scratch_dir()?;
    let mut connections = Vec::with_capacity(databases);
    for index in 0..databases {
        let conn = open_like_storehost(&dir.path().join(format!("events-{index}.db")))?;
        execute_all(&conn, storehost_store::event_log::STATEMENTS)?;
        connections.push(conn);
    }
    let threads = threads.clamp(1, databases);
    let mut shares: Vec<Vec<Connection>> = (0..threads).map(|_| Vec::new()).collect();
    for (index, conn) in connections.into_iter().enumerate() {
        shares[index % threads].push(conn);
    }
    let batches = events.div_ceil(batch);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut workers = Vec::with_capacity(threads);
    for (thread, share) in shares.into_iter().enumerate() {
        let barrier = barrier.clone();
        workers.push(std::thread::spawn(move || -> rusqlite::Result<()> {
            // This thread holds databases `thread`, `thread + threads`, … in that order.
            let mut share = share;
            barrier.wait();
            for j in 0..batches {
                let database = j % databases;
                if database % threads != thread {
                    continue;
                }
                let conn = &mut share[database / threads];
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                {
                    let now = storehost_store::sqlite::now_ms();
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO events (type, payload, at, source, idempotency_key) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for n in j * batch..((j + 1) * batch).min(events) {
                        insert.execute(params!["tick", payload(n), now, "api", None::<String>])?;
                    }
                }
                tx.commit()?;
            }
            Ok(())
        }));
    }
    barrier.wait();
    let started = Instant::now();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a raw insert thread panicked"))??;
    }
    Ok(started.elapsed())
}

/// How the databases of a new store are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// As storehost creates them under `durability = "process"` (host/store/src/sqlite.rs):
    /// `synchronous=OFF` until the first tables are written, then `NORMAL`: no fsync while the
    /// empty files are created, through the host's VFS (no `-shm` file), and the switch to
    /// WAL made without a rollback journal (no `-journal` created and deleted).
    LikeStorehost,
    /// SQLite's own way: `journal_mode=WAL` under the default `synchronous=FULL`, which syncs
    /// the new WAL and its directory (what storehost did before, and still does for `power`).
    Synced,
}

/// Files and directories one new store creates: its directory, `files/`, and `events.db` and
/// `store.db` with their `-wal` (the host's VFS keeps no `-shm` file).
pub const INODES_PER_STORE: usize = 6;

/// How many empty files this disk creates per second, one after another (each creation is a
/// metadata update of the filesystem: on some virtual disks it costs near a millisecond, and
/// it bounds how fast any host can create stores).
pub fn file_creations_per_second(samples: usize) -> anyhow::Result<f64> {
    let dir = storehost_tests::scratch_dir()?;
    let started = Instant::now();
    for index in 0..samples {
        std::fs::File::create(dir.path().join(format!("f{index}")))?;
    }
    Ok(samples as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// The least a new store costs on disk: its directory with `files/`, and its two databases
/// created in WAL mode with their first table — `samples` times, each in a fresh directory.
pub fn store_files(samples: usize, creation: Creation) -> anyhow::Result<Vec<Duration>> {
    let dir = storehost_tests::scratch_dir()?;
    let mut times = Vec::with_capacity(samples);
    // Kept open, as a running store keeps them: closing a database checkpoints it, and that
    // work would land on the next sample.
    let mut open = Vec::with_capacity(samples);
    for index in 0..samples {
        let started = Instant::now();
        let root = dir.path().join("stores").join(format!("raw-{index:05}"));
        std::fs::create_dir_all(root.join("files"))?;
        let events = create(
            &root.join("events.db"),
            storehost_store::event_log::STATEMENTS,
            creation,
        )?;
        let store = create(&root.join("store.db"), &[CURSOR_SCHEMA], creation)?;
        times.push(started.elapsed());
        open.push((events, store));
    }
    drop(open);
    Ok(times)
}

/// Runs each of `statements` on `conn`.
fn execute_all(conn: &Connection, statements: &[&str]) -> rusqlite::Result<()> {
    statements
        .iter()
        .try_for_each(|sql| conn.execute_batch(sql))
}

fn create(path: &Path, schema: &[&str], creation: Creation) -> rusqlite::Result<Connection> {
    match creation {
        Creation::Synced => {
            let conn = open_like_storehost(path)?;
            execute_all(&conn, schema)?;
            Ok(conn)
        }
        Creation::LikeStorehost => {
            storehost_store::sqlite::register_vfs()?;
            let conn = Connection::open_with_flags_and_vfs(
                path,
                rusqlite::OpenFlags::default(),
                storehost_store::SQLITE_VFS,
            )?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.pragma_update(None, "synchronous", "OFF")?;
            conn.pragma_update(None, "journal_mode", "OFF")?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            execute_all(&conn, schema)?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            Ok(conn)
        }
    }
}

/// `n` point selects `SELECT v FROM points WHERE k = ?` (keys `i % rows`) on the database at
/// `path`, straight through rusqlite inside one read transaction; returns the time per select.
/// The file is a running store's, so it is opened as the host opens its readers (through the
/// host's VFS, which keeps other openers out).
pub fn point_selects(path: &Path, n: usize, rows: i64) -> anyhow::Result<Duration> {
    let conn = storehost_store::sqlite::open_reader(path)?;
    conn.execute_batch("BEGIN DEFERRED")?;
    let mut found = 0usize;
    let started = Instant::now();
    {
        let mut select = conn.prepare_cached("SELECT v FROM points WHERE k = ?1")?;
        for i in 0..n {
            let key = (i as i64) % rows.max(1);
            let mut answer = select.query([key])?;
            while let Some(row) = answer.next()? {
                let value: String = row.get(0)?;
                found += usize::from(!value.is_empty());
            }
        }
    }
    let elapsed = started.elapsed();
    conn.execute_batch("COMMIT")?;
    anyhow::ensure!(
        found == n,
        "the host's point selects found {found} of {n} rows"
    );
    Ok(elapsed / u32::try_from(n.max(1)).unwrap_or(u32::MAX))
}
