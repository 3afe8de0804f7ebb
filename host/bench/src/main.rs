//! `storehost-bench`: measures storehost on this machine and prints a markdown table of figures,
//! each beside a reference measured in the same run, the ratio and the target.
//!
//! Run: `cargo run --release -p storehost-bench -- all` (`--quick` for a short run). The table is
//! also written to `target/bench/results.md` so runs can be compared between commits.
//! Figures are never asserted anywhere: this machine is shared and noisy.

mod cpu_limits;
mod noisy;
mod report;

use clap::{Parser, ValueEnum};

use crate::report::Table;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut table = Table::default();
    println!("{}", report::machine_facts());
    runtime.block_on(async {
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
    std::fs::write(&out, format!("{}\n\n{text}\n", report::machine_facts()))?;
    eprintln!("table written to {}", out.display());
    Ok(())
}
