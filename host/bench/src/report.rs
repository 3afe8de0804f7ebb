//! The table and the machine facts printed above it.

use std::time::Duration;

/// One row of the results table.
pub struct Row {
    /// What was measured.
    pub figure: String,
    /// Its unit.
    pub unit: &'static str,
    /// Median (or the rate, for throughput rows).
    pub p50: String,
    /// 99th percentile (or `-`).
    pub p99: String,
    /// The reference measured in the same run.
    pub reference: String,
    /// Measured / reference.
    pub ratio: String,
    /// The target the issue sets.
    pub target: &'static str,
}

/// The results table.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// Adds a row and shows progress on stderr.
    pub fn push(&mut self, row: Row) {
        eprintln!("measured: {} p50 {} p99 {}", row.figure, row.p50, row.p99);
        self.rows.push(row);
    }

    /// The table as markdown.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "| figure | unit | p50 / rate | p99 | reference (same run) | ratio | target |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for row in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.figure, row.unit, row.p50, row.p99, row.reference, row.ratio, row.target
            ));
        }
        out
    }
}

/// The value at percentile `p` (0..=100) of `samples`.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// Milliseconds with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1_000.0)
}

/// Cores and CPU model of this machine.
pub fn machine_facts() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!(
        "machine: {cores} cores, {model}; build: {}",
        if cfg!(debug_assertions) {
            "debug (use --release for real figures)"
        } else {
            "release"
        }
    )
}
