//! The one engine of a host: configuration, pooling allocator, epoch ticker, shared linker.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::Plugin as PluginWorld;
use crate::files::GuestOpenFiles;
use crate::host::HostCapabilities;
use crate::sandbox::InstanceState;
use crate::scheduler::SlotScheduler;

/// How often the epoch advances: the granularity of CPU-time accounting and of yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The core module instances one sandbox may hold: a Rust wasip2 plugin instantiates 3 (its
/// own module and wit-component's two shims), and one more is headroom.
pub const CORE_INSTANCES_PER_SANDBOX: u32 = 4;

/// The linear memories one sandbox may hold: a Rust wasip2 plugin defines 1, and one more is
/// headroom. The `memory` quota bounds them together.
pub const MEMORIES_PER_SANDBOX: u32 = 2;

/// The tables one sandbox may hold: a Rust wasip2 plugin defines 2, and one more is headroom.
pub const TABLES_PER_SANDBOX: u32 = 3;

/// Host-wide settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Sandboxes that may be live at once (pool slots).
    pub max_live_sandboxes: u32,
    /// The largest linear memory any store may be granted, in bytes.
    pub max_memory_bytes: u64,
    /// Meter fuel (enables the `fuel_per_call` quota; costs some speed).
    pub fuel: bool,
    /// Where compiled plugins are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Guest invocations that may run at once, host-wide (about the core count); further
    /// invocations wait their turn, and a running guest yields its slot every 1 ms tick while
    /// others wait (see `scheduler`), so no store starves another.
    pub max_concurrent_invocations: usize,
    /// Enforce CPU time with epoch interruption (on by default). Off only to measure what CPU
    /// limiting costs: `cpu_ms_per_call` is then not enforced and a spinning guest is only
    /// stopped by its wall time.
    pub cpu_limits: bool,
    /// The most files, directories and directory listings all guests together hold open at
    /// once (each is one of the host's open files, see [`GuestOpenFiles`]); past it a guest's
    /// open is refused with WASI's `quota`. No bound by default: the host sets what its
    /// open-file limit leaves beside its own files and its API connections.
    pub guest_open_files: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            max_live_sandboxes: 1_000,
            max_memory_bytes: 256 << 20,
            fuel: false,
            cache_dir: None,
            max_concurrent_invocations: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cpu_limits: true,
            guest_open_files: usize::MAX,
        }
    }
}

/// The host's wasmtime engine and the linker every sandbox is instantiated through.
pub struct Runtime<H: HostCapabilities> {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<InstanceState<H>>,
    pub(crate) options: RuntimeOptions,
    pub(crate) scheduler: Arc<SlotScheduler>,
    pub(crate) ticker: Arc<EpochTicker>,
    pub(crate) guests: GuestExecutor,
    pub(crate) open_files: Arc<GuestOpenFiles>,
    _host: PhantomData<fn() -> H>,
}

impl<H: HostCapabilities> std::fmt::Debug for Runtime<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<H: HostCapabilities> Runtime<H> {
    /// Builds the engine (pooling allocator sized from `options`) and starts its epoch ticker.
    pub fn new(options: RuntimeOptions) -> wasmtime::Result<Arc<Self>> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(options.cpu_limits);
        config.consume_fuel(options.fuel);
        config.concurrency_support(false);
        // Every sandbox fits in its share of the pool: a plugin needing more than one share is
        // refused when it is loaded (see `PluginError::Limits`), so no store can take the
        // memories, instances or tables other stores' sandboxes need.
        let slots = options.max_live_sandboxes.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(CORE_INSTANCES_PER_SANDBOX))
            .total_memories(slots.saturating_mul(MEMORIES_PER_SANDBOX))
            .total_tables(slots.saturating_mul(TABLES_PER_SANDBOX))
            .max_core_instances_per_component(CORE_INSTANCES_PER_SANDBOX)
            .max_memories_per_component(MEMORIES_PER_SANDBOX)
            .max_tables_per_component(TABLES_PER_SANDBOX)
            .total_stacks(slots)
            .max_memory_size(usize::try_from(options.max_memory_bytes).unwrap_or(usize::MAX));
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // The guest's filesystem again, in front of wasmtime-wasi's: the store's files quota
        // and the cap on open files are enforced there (see `files`).
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::filesystem::types::add_to_linker::<_, crate::files::Files>(
            &mut linker,
            InstanceState::files_view,
        )?;
        linker.allow_shadowing(false);
        PluginWorld::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |state| {
            state
        })?;

        let ticker = Arc::new(EpochTicker::start(engine.clone()));
        let scheduler = SlotScheduler::new(options.max_concurrent_invocations);
        let guests = GuestExecutor::start(options.max_concurrent_invocations)?;
        let open_files = Arc::new(GuestOpenFiles::new(options.guest_open_files));
        Ok(Arc::new(Self {
            engine,
            linker,
            scheduler,
            options,
            ticker,
            guests,
            open_files,
            _host: PhantomData,
        }))
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The options this runtime was built with.
    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }

    /// Invocation slots (guests that may run at once) in use now, and in all.
    pub fn invocation_slots(&self) -> (usize, usize) {
        let total = self.options.max_concurrent_invocations.max(1);
        (total.saturating_sub(self.scheduler.free()), total)
    }

    /// Sandboxes live now (each holds a pool slot), and the slots in all.
    pub fn sandbox_slots(&self) -> (usize, usize) {
        let live = self.ticker.shared.sandboxes.load(Ordering::Relaxed);
        let total = usize::try_from(self.options.max_live_sandboxes.max(1)).unwrap_or(usize::MAX);
        (live, total)
    }

    /// The files and listings all guests hold open, and the most they may (see
    /// [`RuntimeOptions::guest_open_files`]).
    pub fn guest_open_files(&self) -> &GuestOpenFiles {
        &self.open_files
    }

    /// Where stores run their work: guest invocations and the synchronous SQLite work around
    /// them run on these threads, never on the threads that serve the API.
    pub fn guest_executor(&self) -> &tokio::runtime::Handle {
        self.guests.handle()
    }

    /// Where the calls of demoted stores run: threads with the least CPU priority (the idle
    /// scheduling policy; [`DEMOTED_NICE`] should the OS refuse it).
    pub fn demoted_executor(&self) -> &tokio::runtime::Handle {
        self.guests.demoted()
    }

    /// How many times the epoch has advanced: every [`EPOCH_TICK`] while a sandbox exists; it
    /// stands still while none does.
    pub fn epoch_ticks(&self) -> u64 {
        self.ticker.ticks()
    }
}

/// The threads stores run on, apart from the API's.
///
/// A guest's SQL statement runs synchronously inside its call (up to its `cpu_ms_per_call`),
/// holding the thread it runs on. On threads of their own, such statements can never stall
/// the API, and there are always threads left for stores that are not in a guest call: one
/// per invocation slot (a slot is held for the whole statement) plus spares.
///
/// Calls of demoted stores (whose last call breached a quota or trapped) run on a second set of
/// threads with the lowest CPU priority (the idle scheduling policy, see `lower_priority`): when
/// a thread of a store in good standing, or of the API, wakes up, the OS gives it the core at
/// once, whatever the demoted guest is doing — spinning between epoch ticks, growing memory, or
/// deep in a SQL statement that cannot be time-sliced. On an idle machine demoted calls still
/// run at full speed.
pub(crate) struct GuestExecutor {
    runtimes: Vec<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    demoted: tokio::runtime::Handle,
}

/// The nice value of the threads demoted stores run on (19: the least CPU share).
pub const DEMOTED_NICE: i32 = 19;

impl GuestExecutor {
    fn start(slots: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(slots.max(1) + 2)
            .thread_name("storehost-store")
            .enable_all()
            .build()?;
        // Demoted calls hold at most all slots but one, each on its thread during a statement.
        let demoted = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(slots.max(1) + 1)
            .thread_name("storehost-demoted")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            demoted: demoted.handle().clone(),
            runtimes: vec![runtime, demoted],
        })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    pub(crate) fn demoted(&self) -> &tokio::runtime::Handle {
        &self.demoted
    }
}

/// Gives the calling thread the least CPU share: the `SCHED_IDLE` policy, under which any
/// ordinary thread that wakes up takes the core at once (a nice value alone only shrinks the
/// thread's share: the scheduler may still let it finish its slice, a few milliseconds, before
/// a woken thread runs), and nice 19 in case the policy is refused. Lowering either needs no
/// privilege; if the OS refuses both, demoted calls run at normal priority (still behind stores
/// in good standing for slots) and the host says so once.
#[allow(unsafe_code)] // one libc call, no safe wrapper in rustix
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let niced = rustix::process::setpriority_process(Some(tid), DEMOTED_NICE);
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param`; pid 0 is the calling thread.
    let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
    if !idle {
        let err = std::io::Error::last_os_error();
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| match niced {
            Ok(()) => tracing::warn!(
                "could not give the threads demoted stores run on the idle scheduling policy \
                 ({err}); they run at nice {DEMOTED_NICE} and may delay stores in good \
                 standing by a scheduler slice"
            ),
            Err(nice_err) => tracing::warn!(
                "could not lower the CPU priority of the threads demoted stores run on \
                 ({err}; {nice_err}); they compete with stores in good standing for the CPU"
            ),
        });
    }
}

impl Drop for GuestExecutor {
    fn drop(&mut self) {
        // Stores still running are cut off at their next await; never block (the runtime may
        // be dropped from async code).
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// An OS thread advancing the engine's epoch every [`EPOCH_TICK`] while a sandbox exists, and
/// parked while none does: a host whose stores all hibernate does not wake up a thousand times
/// a second for nothing (each a VM exit on a virtual machine). Every sandbox holds a
/// [`Ticking`] from before its instantiation runs guest code until after its store is dropped
/// (a sandbox dropped mid-call may still run guest code while it unwinds, and only epochs can
/// interrupt that code). The thread stops when the runtime and every plugin and sandbox made
/// from it are gone.
pub(crate) struct EpochTicker {
    shared: Arc<TickerState>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct TickerState {
    stop: AtomicBool,
    /// Sandboxes that exist now (their [`Ticking`]s).
    sandboxes: AtomicUsize,
    /// How many times the epoch advanced.
    ticks: AtomicU64,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let shared = Arc::new(TickerState::default());
        let state = shared.clone();
        let handle = std::thread::Builder::new()
            .name("storehost-epoch".into())
            .spawn(move || {
                while !state.stop.load(Ordering::Acquire) {
                    if state.sandboxes.load(Ordering::Acquire) == 0 {
                        // Woken by the first sandbox to come (an unpark that comes first
                        // makes this return at once) or by the runtime's drop.
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    state.ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
            .ok();
        Self { shared, handle }
    }

    /// How many times the epoch has advanced.
    pub(crate) fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }

    /// Keeps the epoch advancing until the returned guard is dropped.
    pub(crate) fn keep_ticking(self: &Arc<Self>) -> Ticking {
        if self.shared.sandboxes.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(handle) = &self.handle
        {
            handle.thread().unpark();
        }
        Ticking(self.clone())
    }
}

/// A sandbox's hold on the epoch ticker (see [`EpochTicker`]).
pub(crate) struct Ticking(Arc<EpochTicker>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.shared.sandboxes.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid()))
            .expect("getpriority on the calling thread")
    }

    #[allow(unsafe_code)]
    fn own_policy() -> i32 {
        // SAFETY: no arguments beyond the calling thread (pid 0).
        unsafe { libc::sched_getscheduler(0) }
    }

    #[tokio::test]
    async fn demoted_stores_run_on_threads_with_the_least_cpu_priority() {
        let executor = GuestExecutor::start(2).unwrap();
        let ordinary = executor.handle().spawn(async { own_nice() }).await.unwrap();
        let demoted = executor
            .demoted()
            .spawn(async { own_nice() })
            .await
            .unwrap();
        assert_eq!(demoted, DEMOTED_NICE);
        let policies = (
            executor
                .handle()
                .spawn(async { own_policy() })
                .await
                .unwrap(),
            executor
                .demoted()
                .spawn(async { own_policy() })
                .await
                .unwrap(),
        );
        assert_eq!(
            policies,
            (libc::SCHED_OTHER, libc::SCHED_IDLE),
            "a woken store in good standing preempts a demoted call at once"
        );
        assert!(
            ordinary < demoted,
            "stores in good standing keep the host's priority ({ordinary})"
        );
    }
}
