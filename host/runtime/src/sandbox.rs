//! One store's sandbox: a wasmtime `Store` and plugin instance, with its limits enforced and
//! every failure classified.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::Plugin as PluginInstance;
use crate::bindings::storehost::plugin::{clock, config, events, llm, log, scheduler, sql, types};
use crate::failure::{FailureReason, InvocationError};
use crate::files::{FilesState, FilesUsage, FilesView};
use crate::host::{CapabilityError, HostCapabilities};
use crate::plugin::Plugin;
use crate::scheduler::{Priority, Slot, SlotScheduler};
use crate::{Event, Rows, SqlError, TaskRun, Value};

/// Where a sandbox's guest sees its own files directory.
pub const GUEST_FILES_PATH: &str = "/data";

/// The most component-model handles (WASI streams, pollables, files, …) a guest holds at once.
/// Each costs the host memory the guest's `memory` quota does not count (a table entry and the
/// object behind it, for 4 bytes of guest memory); wasmtime's own default is 100,000.
pub const MAX_HANDLES: usize = 4096;

/// What wasmtime's error says when a guest asks for a handle past [`MAX_HANDLES`].
const HANDLE_LIMIT_ERROR: &str = "store handle limit exceeded";

/// How much of the guest's output in one call is kept: its last bytes, where a panicking
/// guest writes its message (see [`GuestOutput`]).
const OUTPUT_TAIL: usize = 64 << 10;

/// The most one write to the guest's stdout or stderr may carry (what `check-write` permits):
/// each write is a short host call, timed by the epoch ticks like guest code.
const OUTPUT_WRITE_PERMIT: usize = 64 << 10;

/// The per-invocation limits of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Maximum linear memory, in bytes.
    pub memory_bytes: u64,
    /// Fuel per call, when the runtime meters fuel; `None` = unlimited.
    pub fuel_per_call: Option<u64>,
    /// CPU time per call, in milliseconds.
    pub cpu_ms_per_call: u64,
    /// Wall-clock time per call, in milliseconds (covers time awaiting host calls).
    pub wall_ms_per_call: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            fuel_per_call: None,
            cpu_ms_per_call: 1_000,
            wall_ms_per_call: 10_000,
        }
    }
}

/// A store's files directory, as a sandbox is given it.
#[derive(Debug, Clone)]
pub struct SandboxFiles {
    /// The host directory the guest sees at [`GUEST_FILES_PATH`]; nothing else is reachable.
    pub dir: PathBuf,
    /// What the directory holds and may hold (the store's `files` quota), shared by the
    /// store's sandboxes.
    pub usage: Arc<FilesUsage>,
}

/// What a sandbox is created with.
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// The store's files directory; without one the guest has no filesystem.
    pub files: Option<SandboxFiles>,
    /// The limits of each invocation.
    pub limits: Limits,
}

/// What a sandbox has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used by guest code, in milliseconds (epoch ticks).
    pub cpu_ms: u64,
    /// The most linear memory the guest held, all its memories together, in bytes.
    pub memory_peak: u64,
    /// Fuel consumed (0 when the runtime does not meter fuel).
    pub fuel: u64,
}

/// The data wasmtime keeps for one sandbox.
pub struct InstanceState<H> {
    wasi: WasiCtx,
    table: ResourceTable,
    files: FilesState,
    host: H,
    limiter: MemoryLimiter,
    cpu: CpuMeter,
    /// The invocation slot held while guest code runs (given up at ticks when others wait, and
    /// while awaiting an LLM).
    slot: Arc<Mutex<Option<Slot>>>,
    scheduler: Arc<SlotScheduler>,
    /// How this sandbox's calls queue for slots.
    priority: Priority,
}

/// One live plugin instance with its limits.
pub struct Sandbox<H: HostCapabilities> {
    store: Store<InstanceState<H>>,
    instance: PluginInstance,
    scheduler: Arc<SlotScheduler>,
    /// After `store`: fields drop in order, and the epoch must advance until the store is gone.
    _ticking: crate::runtime::Ticking,
    output: GuestOutput,
    limits: Limits,
    fuel_metered: bool,
    fuel_used: u64,
    poisoned: bool,
}

impl<H: HostCapabilities> std::fmt::Debug for Sandbox<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("limits", &self.limits)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// The error the epoch callback raises when a call used up its CPU time.
#[derive(Debug, thiserror::Error)]
#[error("used more than {limit_ms} ms of CPU time in one call")]
struct CpuTimeExceeded {
    limit_ms: u64,
}

/// A host function failed in a way the guest cannot handle; the call traps.
#[derive(Debug, thiserror::Error)]
#[error("host failure: {0}")]
pub struct HostFailure(pub String);

/// The guest called a capability it may not use here (a write from a query); the call traps.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl<H: HostCapabilities> Sandbox<H> {
    /// Instantiates `plugin` with `host` as its capabilities.
    pub async fn new(
        plugin: &Plugin<H>,
        host: H,
        options: SandboxOptions,
    ) -> Result<Self, InvocationError> {
        // Before anything that may run guest code (instantiation runs its start functions).
        let ticking = plugin.ticker.keep_ticking();
        let engine = plugin.pre.engine();
        let fuel_metered = plugin.fuel_metered;
        let output = GuestOutput::default();
        let mut wasi = WasiCtxBuilder::new();
        wasi.stderr(output.clone()).stdout(output.clone());
        // No network: wasmtime-wasi links `wasi:sockets` with the rest, and a socket would be
        // one of the host's open files outside every count. Said here, not left to its
        // defaults (which allow no socket in this version).
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut files_usage = None;
        if let Some(files) = &options.files {
            files_usage = Some(files.usage.clone());
            wasi.preopened_dir(&files.dir, GUEST_FILES_PATH, FsPerms::ReadWrite)
                .map_err(|err| {
                    InvocationError::new(
                        FailureReason::HostError,
                        format!("could not open the store's files directory: {err:#}"),
                    )
                })?;
        }
        let cpu = CpuMeter::new(plugin.ticker.clone());
        let state = InstanceState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            // Without a files directory nothing reaches the quota: there is nothing to write.
            files: FilesState::new(
                files_usage.unwrap_or_else(|| Arc::new(FilesUsage::unlimited())),
                plugin.open_files.clone(),
                cpu.owed.clone(),
            ),
            host,
            limiter: MemoryLimiter::new(options.limits.memory_bytes),
            cpu,
            slot: Arc::default(),
            scheduler: plugin.scheduler.clone(),
            priority: Priority::Normal,
        };
        let scheduler = plugin.scheduler.clone();
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_max_component_handles(MAX_HANDLES);
        let ticks_scheduler = scheduler.clone();
        store.epoch_deadline_callback(move |mut ctx| {
            let slot = ctx.data().slot.clone();
            let priority = ctx.data().priority;
            let cpu = &mut ctx.data_mut().cpu;
            cpu.ticks_this_call += 1;
            cpu.total_ticks += 1;
            cpu.collect_owed();
            if cpu.ticks_this_call > cpu.limit_ticks {
                return Err(CpuTimeExceeded {
                    limit_ms: cpu.limit_ticks,
                }
                .into());
            }
            // Yield every tick so a spinning guest never starves other tasks on this worker; when
            // other guests wait for a slot, give ours up and queue again (round-robin slices).
            if !ticks_scheduler.has_waiters_as(priority) {
                return Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ));
            }
            let scheduler = ticks_scheduler.clone();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    // Only a call that holds a slot queues for the next one: instantiation
                    // runs without a slot, and must never come out of a tick holding one
                    // (two such sandboxes waiting for their call's slot would hold them all).
                    match take_slot(&slot) {
                        Some(held) => {
                            drop(held);
                            let next = scheduler.resume_as(priority).await;
                            put_slot(&slot, next);
                        }
                        None => tokio::task::yield_now().await,
                    }
                }),
            ))
        });
        if fuel_metered {
            store
                .set_fuel(options.limits.fuel_per_call.unwrap_or(u64::MAX))
                .map_err(|err| {
                    InvocationError::new(FailureReason::HostError, format!("{err:#}"))
                })?;
        }
        store.set_epoch_deadline(1);
        store.data_mut().cpu.limit_ticks = options.limits.cpu_ms_per_call;

        let wall = Duration::from_millis(options.limits.wall_ms_per_call);
        let instance =
            match tokio::time::timeout(wall, plugin.pre.instantiate_async(&mut store)).await {
                Ok(Ok(instance)) => instance,
                Ok(Err(err)) => {
                    let limiter = &store.data().limiter;
                    return Err(classify_instantiation(&err, limiter));
                }
                Err(_) => {
                    return Err(InvocationError::new(
                        FailureReason::WallTime,
                        format!(
                            "instantiating the plugin took longer than wall_ms_per_call ({} ms)",
                            options.limits.wall_ms_per_call
                        ),
                    ));
                }
            };
        Ok(Self {
            store,
            instance,
            scheduler,
            _ticking: ticking,
            output,
            limits: options.limits,
            fuel_metered,
            fuel_used: 0,
            poisoned: false,
        })
    }

    /// Delivers one event to the plugin's `handle-event`.
    pub async fn handle_event(&mut self, event: &Event) -> Result<(), InvocationError> {
        self.begin_call()?;
        let slot = self.take_turn().await;
        let wall = self.wall_limit();
        let call = self.instance.call_handle_event(&mut self.store, event);
        let outcome = tokio::time::timeout(wall, call).await;
        drop(take_slot(&slot));
        self.finish_call(outcome)
    }

    /// Runs one scheduled task through the plugin's `run-task`.
    pub async fn run_task(&mut self, task: &TaskRun) -> Result<(), InvocationError> {
        self.begin_call()?;
        let slot = self.take_turn().await;
        let wall = self.wall_limit();
        let call = self.instance.call_run_task(&mut self.store, task);
        let outcome = tokio::time::timeout(wall, call).await;
        drop(take_slot(&slot));
        self.finish_call(outcome)
    }

    /// Answers a named query through the plugin's `query`.
    pub async fn query(&mut self, name: &str, args: &str) -> Result<String, InvocationError> {
        self.begin_call()?;
        let slot = self.take_turn().await;
        let wall = self.wall_limit();
        let call = self.instance.call_query(&mut self.store, name, args);
        let outcome = tokio::time::timeout(wall, call).await;
        drop(take_slot(&slot));
        self.finish_call(outcome)
    }

    /// The capabilities this sandbox was given (for the store to read what a call buffered).
    pub fn host_mut(&mut self) -> &mut H {
        &mut self.store.data_mut().host
    }

    /// Whether a trap or timeout made this sandbox unusable; the store must build a new one.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// How later calls queue for invocation slots: a store whose last call breached a quota
    /// runs at [`Priority::Low`] until it succeeds again.
    pub fn set_priority(&mut self, priority: Priority) {
        self.store.data_mut().priority = priority;
    }

    /// Changes the limits of later calls (memory applies to later growth).
    pub fn set_limits(&mut self, limits: Limits) {
        self.store.data_mut().limiter.limit =
            usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        self.limits = limits;
    }

    /// What this sandbox has used so far.
    pub fn usage(&self) -> Usage {
        let state = self.store.data();
        Usage {
            cpu_ms: state.cpu.total_ticks,
            memory_peak: state.limiter.peak as u64,
            fuel: self.fuel_used,
        }
    }

    /// Waits for an invocation slot and hands it to the guest's state for the call.
    async fn take_turn(&mut self) -> Arc<Mutex<Option<Slot>>> {
        let cell = self.store.data().slot.clone();
        // Never wait for a slot while holding one.
        drop(take_slot(&cell));
        let priority = self.store.data().priority;
        put_slot(&cell, self.scheduler.acquire_as(priority).await);
        cell
    }

    fn wall_limit(&self) -> Duration {
        Duration::from_millis(self.limits.wall_ms_per_call)
    }

    /// Resets per-call meters and the guest's output.
    fn begin_call(&mut self) -> Result<(), InvocationError> {
        if self.poisoned {
            return Err(InvocationError::new(
                FailureReason::HostError,
                "the sandbox is poisoned by an earlier failure; it must be rebuilt",
            ));
        }
        let fuel = self.limits.fuel_per_call.unwrap_or(u64::MAX);
        if self.fuel_metered {
            self.store.set_fuel(fuel).map_err(|err| {
                InvocationError::new(FailureReason::HostError, format!("{err:#}"))
            })?;
        }
        let limit_ticks = self.limits.cpu_ms_per_call;
        let state = self.store.data_mut();
        state.cpu.ticks_this_call = 0;
        state.cpu.limit_ticks = limit_ticks;
        state.limiter.refused = None;
        let _ = state.host.take_breach();
        let _ = state.files.take_refused();
        self.store.set_epoch_deadline(1);
        self.output.clear();
        Ok(())
    }

    fn finish_call<R>(
        &mut self,
        outcome: Result<wasmtime::Result<Result<R, String>>, tokio::time::error::Elapsed>,
    ) -> Result<R, InvocationError> {
        if self.fuel_metered {
            let budget = self.limits.fuel_per_call.unwrap_or(u64::MAX);
            let left = self.store.get_fuel().unwrap_or(0);
            self.fuel_used = self.fuel_used.saturating_add(budget.saturating_sub(left));
        }
        let state = self.store.data_mut();
        // What the call's last host calls moved counts too (no tick came after them).
        state.cpu.collect_owed();
        // Removed files the guest closed in the call count no more once it returns.
        state.files.release_closed();
        let files_full = state.files.take_refused();
        let breach = state.host.take_breach().or_else(|| {
            // A host capability's breach (the database full) says more than a refused file
            // write the guest may have tried after it.
            files_full.map(|detail| (FailureReason::DiskFull, detail))
        });
        match outcome {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(message))) => Err(match breach {
                Some((reason, detail)) => {
                    InvocationError::new(reason, format!("{detail} (the plugin said: {message})"))
                }
                None => InvocationError::new(FailureReason::PluginError, message),
            }),
            Ok(Err(err)) => {
                self.poisoned = true;
                Err(self.classify_trap(&err, breach))
            }
            Err(_elapsed) => {
                // Dropping the in-flight call poisons the store (ENGINEERING.md).
                self.poisoned = true;
                Err(InvocationError::new(
                    FailureReason::WallTime,
                    format!(
                        "the call took longer than wall_ms_per_call ({} ms)",
                        self.limits.wall_ms_per_call
                    ),
                ))
            }
        }
    }

    fn classify_trap(
        &self,
        err: &wasmtime::Error,
        breach: Option<(FailureReason, String)>,
    ) -> InvocationError {
        let state = self.store.data();
        if let Some(limit) = err.downcast_ref::<CpuTimeExceeded>() {
            return InvocationError::new(FailureReason::CpuTime, limit.to_string());
        }
        if let Some(failure) = err.downcast_ref::<HostFailure>() {
            return InvocationError::new(FailureReason::HostError, failure.0.clone());
        }
        if let Some(refused) = state.limiter.refused {
            return InvocationError::new(
                FailureReason::Memory,
                format!(
                    "the guest asked for {refused} bytes of linear memory, all its memories \
                     together; its quota is {} bytes",
                    state.limiter.limit
                ),
            );
        }
        if let Some((reason, detail)) = breach {
            return InvocationError::new(reason, detail);
        }
        // After the breaches: a write refused because an earlier breach rolled the
        // invocation's transaction back is that breach's failure.
        if let Some(refused) = err.downcast_ref::<Refused>() {
            return InvocationError::new(FailureReason::Trap, refused.0.clone());
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => InvocationError::new(
                FailureReason::OutOfFuel,
                format!(
                    "used all of fuel_per_call ({})",
                    self.limits.fuel_per_call.unwrap_or(u64::MAX)
                ),
            ),
            Some(Trap::Interrupt) => InvocationError::new(FailureReason::CpuTime, "interrupted"),
            Some(Trap::UnreachableCodeReached) => {
                match panic_message(&String::from_utf8_lossy(&self.output.contents())) {
                    Some(message) => InvocationError::new(FailureReason::Panic, message),
                    None => InvocationError::new(
                        FailureReason::Trap,
                        "wasm trap: unreachable instruction executed",
                    ),
                }
            }
            Some(trap) => InvocationError::new(FailureReason::Trap, format!("wasm trap: {trap}")),
            None if err
                .chain()
                .any(|cause| cause.to_string().contains(HANDLE_LIMIT_ERROR)) =>
            {
                InvocationError::new(
                    FailureReason::Memory,
                    format!(
                        "the guest held more than {MAX_HANDLES} WASI handles (streams, \
                         pollables, files) at once; each costs the host memory outside the \
                         memory quota"
                    ),
                )
            }
            None => InvocationError::new(FailureReason::Trap, format!("{err:#}")),
        }
    }
}

fn classify_instantiation(err: &wasmtime::Error, limiter: &MemoryLimiter) -> InvocationError {
    if let Some(refused) = limiter.refused {
        return InvocationError::new(
            FailureReason::Memory,
            format!(
                "the plugin needs {refused} bytes of linear memory to start; the quota is {} bytes",
                limiter.limit
            ),
        );
    }
    if err
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return InvocationError::new(
            FailureReason::HostError,
            "no free sandbox slot: the host runs as many live sandboxes as it is sized for",
        );
    }
    InvocationError::new(
        FailureReason::Trap,
        format!("the plugin failed to start: {err:#}"),
    )
}

/// The message of the last Rust panic in a guest's stderr, with its location.
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.rfind("panicked at ")?;
    let rest = &stderr[start + "panicked at ".len()..];
    let (location, message) = rest.split_once('\n').unwrap_or((rest, ""));
    let message = message.split("\nnote:").next().unwrap_or_default().trim();
    let location = location.trim_end_matches(':');
    Some(if message.is_empty() {
        format!("panicked at {location}")
    } else {
        format!("{message} (at {location})")
    })
}

fn take_slot(cell: &Mutex<Option<Slot>>) -> Option<Slot> {
    crate::lock(cell).take()
}

fn put_slot(cell: &Mutex<Option<Slot>>, slot: Slot) {
    *crate::lock(cell) = Some(slot);
}

/// Refuses memory growth past the quota and remembers that it did, so the trap that follows
/// (a Rust guest aborts with `unreachable`) is classified as `memory`, not `panic`.
///
/// The quota bounds all the sandbox's linear memories together: wasmtime asks about each
/// memory alone, and a component may define several (one per core module it instantiates; the
/// pool allows [`crate::runtime::MEMORIES_PER_SANDBOX`]), each of which could otherwise grow to
/// the whole quota.
struct MemoryLimiter {
    limit: usize,
    /// What the refused growth would have brought all memories to, in bytes.
    refused: Option<usize>,
    /// The bytes of all the sandbox's memories (they live as long as its store).
    total: usize,
    /// The most `total` reached.
    peak: usize,
    /// The last growth granted, and `peak` before it: wasmtime may still fail that growth
    /// (past the pool's largest memory), and then says so without saying which.
    last_granted: Option<(usize, usize)>,
}

impl MemoryLimiter {
    fn new(limit: u64) -> Self {
        Self {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            refused: None,
            total: 0,
            peak: 0,
            last_granted: None,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let total = self.total.saturating_add(growth);
        if total > self.limit {
            self.refused = Some(total);
            return Ok(false);
        }
        self.last_granted = Some((growth, self.peak));
        self.total = total;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        if let Some((growth, peak)) = self.last_granted.take() {
            self.total = self.total.saturating_sub(growth);
            self.peak = peak;
        }
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The guest's stdout and stderr: the last [`OUTPUT_TAIL`] bytes written in the current call
/// (cleared as each call begins), read only for a panic's message, which a panicking guest
/// writes last. Writes never fail: a pipe of fixed size kept across a sandbox's calls filled
/// up after a few dozen events of a plugin printing a line each, and from then on every print
/// failed (Rust's `println!` panics when it cannot write) and so did the event.
#[derive(Clone, Default)]
struct GuestOutput(Arc<Mutex<VecDeque<u8>>>);

impl GuestOutput {
    fn clear(&self) {
        crate::lock(&self.0).clear();
    }

    /// What the guest wrote last in the current call.
    fn contents(&self) -> Vec<u8> {
        crate::lock(&self.0).iter().copied().collect()
    }

    fn push(&self, bytes: &[u8]) {
        let kept = &bytes[bytes.len().saturating_sub(OUTPUT_TAIL)..];
        let mut tail = crate::lock(&self.0);
        let excess = (tail.len() + kept.len()).saturating_sub(OUTPUT_TAIL);
        tail.drain(..excess);
        tail.extend(kept);
    }
}

#[async_trait::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_WRITE_PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// What a host call that moves many bytes between the guest and the host (copying and checking
/// an argument or an answer, writing or reading a file) is charged: 1 ms of CPU time per whole
/// MiB, about what that work takes here. The epoch ticks that meter guest code see the time of
/// short host calls (the next tick after one lands in guest code), but count a long one as a
/// single tick: without this a guest handing the host huge arguments in a loop would spend the
/// host's time at the price of one tick per call.
pub const BYTES_PER_CPU_MS: u64 = 1 << 20;

/// Charges a host call that moved `bytes` bytes to the ticks `owed` by its sandbox.
pub(crate) fn charge_moving(owed: &AtomicU64, bytes: usize) {
    let ticks = bytes as u64 / BYTES_PER_CPU_MS;
    if ticks > 0 {
        owed.fetch_add(ticks, Ordering::Relaxed);
    }
}

/// A sandbox's CPU time, in epoch ticks (1 ms each).
struct CpuMeter {
    ticks_this_call: u64,
    limit_ticks: u64,
    total_ticks: u64,
    /// Ticks charged by host calls for the bytes they moved, not yet counted; shared with the
    /// files directory's streams, which move bytes outside the sandbox's own bindings.
    owed: Arc<AtomicU64>,
    /// The engine's epoch clock, to time host calls that run the guest's SQL.
    ticker: Arc<crate::runtime::EpochTicker>,
}

impl CpuMeter {
    fn new(ticker: Arc<crate::runtime::EpochTicker>) -> Self {
        Self {
            ticks_this_call: 0,
            limit_ticks: 0,
            total_ticks: 0,
            owed: Arc::default(),
            ticker,
        }
    }

    /// Counts the ticks host calls were charged since the last count.
    fn collect_owed(&mut self) {
        let ticks = self.owed.swap(0, Ordering::Relaxed);
        self.ticks_this_call += ticks;
        self.total_ticks += ticks;
    }

    /// Charges a host call that moved `bytes` bytes.
    fn moved(&self, bytes: usize) {
        charge_moving(&self.owed, bytes);
    }

    /// What the call has left of its CPU time, in ticks; [`CpuTimeExceeded`] once nothing.
    fn left(&mut self) -> Result<u64, CpuTimeExceeded> {
        self.collect_owed();
        match self.limit_ticks.checked_sub(self.ticks_this_call) {
            Some(left) if left > 0 => Ok(left),
            _ => Err(CpuTimeExceeded {
                limit_ms: self.limit_ticks,
            }),
        }
    }
}

/// The bytes one SQLite value moves.
fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Text(text) => text.len(),
        Value::Blob(blob) => blob.len(),
        Value::Null | Value::Integer(_) | Value::Real(_) => 8,
    }
}

impl<H: HostCapabilities> WasiView for InstanceState<H> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl<H: HostCapabilities> InstanceState<H> {
    /// The guest's filesystem, with the store's files quota in front of it.
    pub(crate) fn files_view(&mut self) -> FilesView<'_> {
        FilesView {
            fs: wasmtime_wasi::filesystem::WasiFilesystemCtxView {
                ctx: self.wasi.filesystem(),
                table: &mut self.table,
            },
            files: &mut self.files,
        }
    }
}

impl<H: HostCapabilities> InstanceState<H> {
    /// Runs a host call that may run SQL for the guest, whose statements stop when the call's
    /// CPU time runs out, and charges the call's time to it. The epoch ticks that meter guest
    /// code count a host call as one tick however long it ran: without this, a call of 40
    /// statements each just under the quota took 40 times the quota.
    fn charged<T>(&mut self, call: impl FnOnce(&mut H) -> T) -> wasmtime::Result<T> {
        let left = self.cpu.left()?;
        self.host.limit_host_time(Duration::from_millis(left));
        let started = self.cpu.ticker.ticks();
        let value = call(&mut self.host);
        // The epoch passed its deadline if it moved at all: the tick that comes when guest code
        // runs again counts one of the epochs that passed.
        let passed = self.cpu.ticker.ticks().saturating_sub(started);
        self.cpu
            .owed
            .fetch_add(passed.saturating_sub(1), Ordering::Relaxed);
        Ok(value)
    }
}

impl<H: HostCapabilities> types::Host for InstanceState<H> {}

impl<H: HostCapabilities> sql::Host for InstanceState<H> {
    fn execute(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, SqlError>> {
        self.cpu
            .moved(statement.len() + params.iter().map(value_bytes).sum::<usize>());
        self.charged(|host| host.sql_execute(&statement, params))
    }

    fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Rows, SqlError>> {
        self.cpu
            .moved(statement.len() + params.iter().map(value_bytes).sum::<usize>());
        let answer = self.charged(|host| host.sql_query(&statement, params))?;
        if let Ok(rows) = &answer {
            let values = rows.rows.iter().flatten().map(value_bytes).sum::<usize>();
            self.cpu.moved(values);
        }
        Ok(answer)
    }
}

impl<H: HostCapabilities> events::Host for InstanceState<H> {
    fn emit(
        &mut self,
        event_type: String,
        payload: String,
    ) -> wasmtime::Result<Result<(), String>> {
        self.cpu.moved(event_type.len() + payload.len());
        Ok(self.host.emit(event_type, payload))
    }
}

impl<H: HostCapabilities> log::Host for InstanceState<H> {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.cpu.moved(message.len());
        self.host.log(level, message);
        Ok(())
    }
}

impl<H: HostCapabilities> config::Host for InstanceState<H> {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.host.config_get(&key))
    }

    fn all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.host.config_all())
    }
}

impl<H: HostCapabilities> scheduler::Host for InstanceState<H> {
    fn schedule(
        &mut self,
        task_id: String,
        trigger: scheduler::Trigger,
        payload: String,
    ) -> wasmtime::Result<Result<Option<i64>, String>> {
        self.cpu.moved(task_id.len() + payload.len());
        self.charged(|host| host.schedule(task_id, trigger, payload))
    }

    fn cancel(&mut self, task_id: String) -> wasmtime::Result<bool> {
        self.charged(|host| host.cancel_task(&task_id))?
            .map_err(|err| match err {
                CapabilityError::Refused(why) => Refused(format!(
                    "scheduler.cancel(`{task_id}`) may not be called here: {why}"
                ))
                .into(),
                CapabilityError::Failed(why) => {
                    HostFailure(format!("could not cancel task `{task_id}`: {why}")).into()
                }
            })
    }

    fn scheduled(&mut self) -> wasmtime::Result<Vec<scheduler::ScheduledTask>> {
        self.charged(HostCapabilities::list_tasks)?
            .map_err(|err| HostFailure(format!("could not list the scheduled tasks: {err}")).into())
    }
}

impl<H: HostCapabilities> llm::Host for InstanceState<H> {
    async fn complete(
        &mut self,
        request: llm::ChatRequest,
    ) -> wasmtime::Result<Result<llm::Completion, llm::LlmError>> {
        let started = std::time::Instant::now();
        let answer = self.host.llm_complete(request);
        let asking = started.elapsed();
        // No guest code runs while the answer is awaited: let another store use the slot.
        let held = take_slot(&self.slot).is_some();
        let (result, answering) = timing_polls(answer).await;
        if held {
            let slot = self.scheduler.resume_as(self.priority).await;
            put_slot(&self.slot, slot);
        }
        // The host's own work for the call (the offline provider's matching, a vendor's answer
        // parsed) is the store's CPU time; the wait for the vendor is not.
        let ticks = u64::try_from((asking + answering).as_millis()).unwrap_or(u64::MAX);
        self.cpu.owed.fetch_add(ticks, Ordering::Relaxed);
        Ok(result)
    }
}

impl<H: HostCapabilities> clock::Host for InstanceState<H> {
    fn now_ms(&mut self) -> wasmtime::Result<i64> {
        Ok(self.host.now_ms())
    }
}

/// Awaits `future`, answering its output and the time its polls took: the work done for it,
/// not the time it waited.
async fn timing_polls<F: Future>(future: F) -> (F::Output, Duration) {
    let mut future = std::pin::pin!(future);
    let mut busy = Duration::ZERO;
    let output = std::future::poll_fn(|cx| {
        let started = std::time::Instant::now();
        let poll = future.as_mut().poll(cx);
        busy += started.elapsed();
        poll
    })
    .await;
    (output, busy)
}

#[cfg(test)]
mod tests {
    use super::{GuestOutput, MemoryLimiter, OUTPUT_TAIL, panic_message};
    use wasmtime::ResourceLimiter as _;

    /// A component may define several memories: each grows within the quota alone, and
    /// together they may not pass it.
    #[test]
    fn all_memories_count_together_against_the_quota() {
        let mut limiter = MemoryLimiter::new(10 << 20);
        assert!(limiter.memory_growing(0, 6 << 20, None).unwrap());
        assert!(!limiter.memory_growing(0, 6 << 20, None).unwrap());
        assert_eq!(limiter.refused, Some(12 << 20));
        assert!(limiter.memory_growing(0, 3 << 20, None).unwrap());
        assert!(limiter.memory_growing(6 << 20, 7 << 20, None).unwrap());
        assert_eq!((limiter.total, limiter.peak), (10 << 20, 10 << 20));
        // Granted, then failed by wasmtime (past the pool's largest memory): not held.
        limiter
            .memory_grow_failed(wasmtime::format_err!("past the pool's memory"))
            .unwrap();
        assert_eq!((limiter.total, limiter.peak), (9 << 20, 9 << 20));
        assert!(!limiter.memory_growing(3 << 20, 5 << 20, None).unwrap());
    }

    /// Output never fills up: each call keeps the tail of what it wrote.
    #[test]
    fn guest_output_keeps_the_tail_of_each_call() {
        let output = GuestOutput::default();
        for n in 0..1_000 {
            output.push(format!("line {n}: {}\n", "x".repeat(1_000)).as_bytes());
        }
        let kept = output.contents();
        assert_eq!(kept.len(), OUTPUT_TAIL);
        assert!(String::from_utf8_lossy(&kept).ends_with(&format!("{}\n", "x".repeat(1_000))));
        assert!(String::from_utf8_lossy(&kept).contains("line 999: "));
        output.push(&vec![b'y'; 3 * OUTPUT_TAIL]);
        assert_eq!(output.contents(), vec![b'y'; OUTPUT_TAIL]);
        output.clear();
        output.push(b"panicked at here");
        assert_eq!(output.contents(), b"panicked at here");
    }

    /// A call's polls are timed and its waits are not: the offline LLM provider matches its
    /// rules inside a poll (up to a fifth of a second of the host's CPU, which the store's
    /// CPU time did not count), a vendor's answer is awaited between polls.
    #[tokio::test]
    async fn the_time_polls_take_is_counted_and_the_waits_are_not() {
        let work_then_wait = async {
            std::thread::sleep(std::time::Duration::from_millis(30));
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
            7
        };
        let (output, busy) = super::timing_polls(work_then_wait).await;
        assert_eq!(output, 7);
        assert!(
            busy >= std::time::Duration::from_millis(30)
                && busy < std::time::Duration::from_millis(500),
            "{busy:?}"
        );
    }

    #[test]
    fn reads_the_panic_message_and_location_from_guest_stderr() {
        let stderr = "noise\nthread '<unnamed>' panicked at src/bin/panicker.rs:7:5:\npanicker: deliberate panic\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("panicker: deliberate panic (at src/bin/panicker.rs:7:5)")
        );
        assert_eq!(panic_message("no panic here"), None);
    }
}
