//! `storehost-bench`: measures storehost on this machine and prints a markdown table of figures,
//! each beside a reference measured in the same run, the ratio and the target.
//!
//! Run: `cargo run --release -p storehost-bench -- all` (`--quick` for a short run). The table is
//! also written to `target/bench/results.md` so runs can be compared between commits.
//! Figures are never asserted anywhere: this machine is shared and noisy.

mod cold_start;
mod config_edit;
mod cpu_limits;
mod hibernation;
mod noisy;
mod provisioning;
mod raw;
mod reconcile;
mod report;
mod round_trip;
mod serve_peer;
mod sql_call;
mod throughput;

use clap::{Parser, ValueEnum};

use crate::report::{Row, Table};

/// Measures storehost and prints a table of figures.
#[derive(Debug, Parser)]
#[command(name = "storehost-bench", about)]
struct Cli {
    /// Which benchmark to run.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// A short run (seconds instead of tens of seconds); figures are noisier.
    #[arg(long)]
    quick: bool,
    /// Where to write the table (default: target/bench/results.md).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Every benchmark.
    All,
    /// 100 well-behaved stores alone, then beside 10 hostile stores.
    NoisyNeighbours,
    /// A compute-heavy guest with CPU limits on vs off.
    CpuLimits,
    /// PUT store → first event processed, vs a bare wasmtime instantiation.
    ColdStart,
    /// Durable events/s (batched) for 1 and for 1,000 stores, vs raw SQLite.
    Throughput,
    /// POST one event → processed (long-poll) at 2,000 events/s offered.
    RoundTrip,
    /// A point select through the guest's `sql` capability vs from the host.
    SqlCall,
    /// Webhook → store running and accepting events, over 1,000 workspaces.
    Provisioning,
    /// A watched config edit adding 1,000 stores → all running.
    ConfigEdit,
    /// A reconcile pass over a 10,000-workspace registry with 1% drift.
    Reconcile,
    /// Cold wake of a hibernated store, and RSS / open files per hibernated store.
    Hibernation,
    /// The query route vs `wasmtime serve` running an equivalent wasi:http component.
    Serve,
}

impl Which {
    fn includes(self, row: Which) -> bool {
        self == Which::All || self == row
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // As the server does, before anything opens a database: the figures include the
    // allocator that bounds guest statements' memory.
    storehost_store::sql_memory::install();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Every row's stores and raw references are deleted together at the end, so no row's
    // deletions slow the file creations of the rows after it (see `defer_scratch_cleanup`).
    let scratch = tempfile::Builder::new()
        .prefix("storehost-bench-")
        .tempdir()?;
    storehost_tests::defer_scratch_cleanup(scratch.path().to_owned());
    let mut table = Table::default();
    let facts = report::machine_facts(scratch.path());
    println!("{facts}");
    let mut failures = 0;
    runtime.block_on(async {
        let quick = cli.quick;
        // Hibernation first: its RSS figures need a process that has not grown yet (freed
        // memory is not handed back to the system, so a later delta would read as zero).
        for (row, name) in [
            (Which::Hibernation, "hibernation"),
            (Which::ColdStart, "cold-start"),
            (Which::Throughput, "throughput"),
            (Which::RoundTrip, "round-trip"),
            (Which::SqlCall, "sql-call"),
            (Which::Provisioning, "provisioning"),
            (Which::ConfigEdit, "config-edit"),
            (Which::Reconcile, "reconcile"),
            (Which::Serve, "serve"),
        ] {
            if !cli.which.includes(row) {
                continue;
            }
            let outcome = match row {
                Which::ColdStart => cold_start::run(quick, &mut table).await,
                Which::Throughput => throughput::run(quick, &mut table).await,
                Which::RoundTrip => round_trip::run(quick, &mut table).await,
                Which::SqlCall => sql_call::run(quick, &mut table).await,
                Which::Provisioning => provisioning::run(quick, &mut table).await,
                Which::ConfigEdit => config_edit::run(quick, &mut table).await,
                Which::Reconcile => reconcile::run(quick, &mut table).await,
                Which::Hibernation => hibernation::run(quick, &mut table).await,
                Which::Serve => serve_peer::run(quick, &mut table).await,
                Which::All | Which::NoisyNeighbours | Which::CpuLimits => continue,
            };
            if let Err(err) = outcome {
                failures += 1;
                eprintln!("{name} failed: {err:#}");
                table.push(Row::failed(name, &format!("{err:#}")));
            }
        }
        if matches!(cli.which, Which::All | Which::NoisyNeighbours) {
            noisy::run(cli.quick, &mut table).await;
        }
        if matches!(cli.which, Which::All | Which::CpuLimits) {
            cpu_limits::run(cli.quick, &mut table).await;
        }
    });
    let text = table.render();
    println!("{text}");
    let out = cli
        .out
        .unwrap_or_else(|| storehost_tests::target_dir().join("bench/results.md"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, format!("{facts}\n\n{text}\n"))?;
    eprintln!("table written to {}", out.display());
    eprintln!(
        "deleting the run's scratch directories ({})",
        scratch.path().display()
    );
    drop(runtime);
    scratch.close()?;
    anyhow::ensure!(failures == 0, "{failures} benchmark(s) failed (see above)");
    Ok(())
}
