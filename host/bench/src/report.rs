//! The table, the machine facts printed above it, and progress lines for long rows.

use std::time::{Duration, Instant};

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

impl Row {
    /// The row of a benchmark that could not finish, with why.
    pub fn failed(name: &str, error: &str) -> Self {
        Self {
            figure: format!(
                "{name}: FAILED — {}",
                error.replace('|', "/").replace('\n', " ")
            ),
            unit: "-",
            p50: "-".into(),
            p99: "-".into(),
            reference: "-".into(),
            ratio: "-".into(),
            target: "-",
        }
    }
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

/// Microseconds with one decimal.
pub fn us(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1_000_000.0)
}

/// `a / b` as `2.35×` (`-` when `b` is zero).
pub fn times(a: f64, b: f64) -> String {
    if b <= 0.0 {
        return "-".into();
    }
    format!("{:.2}×", a / b)
}

/// `a / b` of two durations as `2.35×`.
pub fn times_of(a: Duration, b: Duration) -> String {
    times(a.as_secs_f64(), b.as_secs_f64())
}

/// A whole number with thousands separators: `52,310`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Events per second.
pub fn per_second(events: usize, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Progress of a long step on stderr: at most one line a second, and one at the end.
pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    shown: Instant,
}

impl Progress {
    /// Starts reporting `label`, which takes `total` steps.
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        let now = Instant::now();
        Self {
            label: label.into(),
            total,
            done: 0,
            started: now,
            shown: now,
        }
    }

    /// One more step done.
    pub fn step(&mut self) {
        self.advance(1);
    }

    /// `steps` more steps done.
    pub fn advance(&mut self, steps: usize) {
        self.done += steps;
        if self.done >= self.total || self.shown.elapsed() >= Duration::from_secs(1) {
            self.shown = Instant::now();
            eprintln!(
                "  {}: {}/{} ({:.1} s)",
                self.label,
                self.done,
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Cores and CPU model of this machine.
pub fn machine_facts(scratch: &std::path::Path) -> String {
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
    // Other work on the machine skews every figure; the load average tells a reader how much.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| {
            let mut fields = text.split_whitespace();
            Some(format!(
                "{} {} {}",
                fields.next()?,
                fields.next()?,
                fields.next()?
            ))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let disk = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|mounts| {
            let path = scratch.canonicalize().ok()?;
            disk_facts(&mounts, &path, |device| {
                std::fs::read_to_string(format!("/sys/fs/ext4/{device}/journal_task")).ok()
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let idle = idle_facts(
        std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver").ok(),
        std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns").ok(),
    );
    format!(
        "machine: {cores} cores, {model}; load average {load}; idle CPUs: {idle}; scratch disk: {disk}; build: {}",
        if cfg!(debug_assertions) {
            "debug (use --release for real figures)"
        } else {
            "release"
        }
    )
}

/// How this machine's idle CPUs sleep, from its cpuidle driver and, in a virtual machine with
/// the `haltpoll` driver, how long a vCPU polls before it halts. A vCPU that halts at once
/// leaves the virtual machine, and waking it for the next piece of work costs a trip through
/// the hypervisor: a request arriving after a pause pays for it at each thread it wakes
/// (measured here, four quick `provisioning` runs: 10 webhooks a second p50 2.04–2.68 ms,
/// back to back 1.32–2.37 ms; with two `SCHED_IDLE` spinners keeping the vCPUs awake, 1.88
/// against 1.93).
fn idle_facts(driver: Option<String>, halt_poll_ns: Option<String>) -> String {
    let Some(driver) = driver.map(|driver| driver.trim().to_owned()) else {
        return "unknown".to_owned();
    };
    match halt_poll_ns.as_deref().map(str::trim) {
        Some("0") if driver == "haltpoll" => {
            "haltpoll, a vCPU halts at once (guest_halt_poll_ns=0: work after a pause waits for the hypervisor to wake it)".to_owned()
        }
        Some(ns) if driver == "haltpoll" => format!("haltpoll, a vCPU polls {ns} ns before it halts"),
        _ => driver,
    }
}

/// The file system holding `path` (an absolute, canonical path), from the text of
/// `/proc/mounts`: its type, device and, for ext4, whether it keeps a journal (`journal_task`
/// reads the device's `/sys/fs/ext4/<device>/journal_task`). Without a journal, ext4 skips at
/// every file creation each inode freed in the last minute, so the rows that create stores
/// slow down after deletions.
fn disk_facts(
    mounts: &str,
    path: &std::path::Path,
    journal_task: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let (device, fs_type, options) = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.next()?;
            let mount_point = fields.next()?;
            let fs_type = fields.next()?;
            let options = fields.next().unwrap_or("");
            path.starts_with(mount_point)
                .then_some((mount_point.len(), device, fs_type, options))
        })
        .max_by_key(|(length, ..)| *length)
        .map(|(_, device, fs_type, options)| (device, fs_type, options))?;
    let mut facts = format!("{fs_type} on {device}");
    if fs_type == "ext4" {
        let name = device.rsplit('/').next().unwrap_or(device);
        match journal_task(name).as_deref().map(str::trim) {
            Some("<none>") => facts.push_str(
                " without a journal (each file creation skips the inodes freed in the last minute)",
            ),
            Some(_) => facts.push_str(" with a journal"),
            None => {}
        }
    }
    if options.split(',').any(|option| option == "discard") {
        facts.push_str(", online discard");
    }
    Some(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_cpus_say_when_a_vcpu_halts_at_once() {
        let facts = |driver: Option<&str>, ns: Option<&str>| {
            idle_facts(driver.map(str::to_owned), ns.map(str::to_owned))
        };
        assert!(facts(Some("haltpoll\n"), Some("0\n")).contains("halts at once"));
        assert_eq!(
            facts(Some("haltpoll\n"), Some("200000\n")),
            "haltpoll, a vCPU polls 200000 ns before it halts"
        );
        assert_eq!(facts(Some("intel_idle\n"), None), "intel_idle");
        assert_eq!(facts(None, None), "unknown");
    }

    #[test]
    fn the_scratch_disk_is_the_longest_mount_holding_it_and_says_whether_ext4_journals() {
        let mounts = "/dev/vda / ext4 rw,relatime,discard 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n\
                      /dev/vdb /data ext4 rw 0 0\n";
        let journal = |device: &str| match device {
            "vda" => Some("<none>\n".to_owned()),
            "vdb" => Some("jbd2/vdb-8\n".to_owned()),
            _ => None,
        };
        let facts = |path: &str| disk_facts(mounts, std::path::Path::new(path), journal);
        assert_eq!(
            facts("/work/x").as_deref(),
            Some(
                "ext4 on /dev/vda without a journal (each file creation skips the inodes freed in the last minute), online discard"
            )
        );
        assert_eq!(facts("/tmp/x").as_deref(), Some("tmpfs on tmpfs"));
        assert_eq!(
            facts("/data/stores").as_deref(),
            Some("ext4 on /dev/vdb with a journal")
        );
        assert_eq!(
            facts("/database").as_deref(),
            Some(
                "ext4 on /dev/vda without a journal (each file creation skips the inodes freed in the last minute), online discard"
            ),
            "a mount point is a whole path component, not a prefix of the name"
        );
    }

    #[test]
    fn percentiles_pick_ranked_samples() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut samples, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&mut samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&mut samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&mut [], 99.0), Duration::ZERO);
    }

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(thousands(52_310.4), "52,310");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(times(3.0, 2.0), "1.50×");
        assert_eq!(times(3.0, 0.0), "-");
        assert_eq!(us(Duration::from_nanos(1_250)), "1.2");
        assert_eq!(ms(Duration::from_micros(2_500)), "2.50");
    }

    #[test]
    fn a_failed_row_keeps_the_table_well_formed() {
        let mut table = Table::default();
        table.push(Row::failed("reconcile", "registry | down\nretry"));
        let text = table.render();
        let row = text.lines().last().unwrap();
        assert_eq!(row.matches('|').count(), 8, "{row}");
        assert!(
            row.contains("reconcile: FAILED — registry / down retry"),
            "{row}"
        );
    }
}
