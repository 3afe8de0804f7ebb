//! The real `storehost` binary as a child process: started on a free loopback port, killed with
//! SIGKILL or stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::target_dir;

/// The admin token given to spawned servers.
pub const PROCESS_TOKEN: &str = "process-admin-token";

/// Path of the `storehost` binary, built once per test process (`cargo build -p storehost`,
/// a no-op when it is up to date), so tests always run the binary of the code under test.
pub fn storehost_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = !cfg!(debug_assertions);
        let mut command = Command::new(cargo);
        command
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["build", "--quiet", "-p", "storehost", "--bin", "storehost"]);
        if release {
            command.arg("--release");
        }
        let status = command.status().expect("run cargo build -p storehost");
        assert!(status.success(), "cargo build -p storehost failed");
        target_dir()
            .join(if release { "release" } else { "debug" })
            .join("storehost")
    })
}

/// Runs `storehost` with `args` to completion; returns exit status, stdout and stderr.
pub fn run_storehost(args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(storehost_bin())
        .args(args)
        .output()
        .expect("run storehost");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A running `storehost serve`.
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:PORT` (empty while a server from [`ServerProcess::spawn_starting`]
    /// has not said it listens).
    pub url: String,
    /// Its log file (stderr).
    pub log: PathBuf,
    /// Where this run's lines start in `log` (a restart on the same data appends to it).
    log_start: usize,
    /// The address the server prints once it listens.
    listening: std::sync::mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `storehost serve` on a free port with data in `data_dir`, optional extra args
    /// (e.g. `--config`) and environment; waits until it listens.
    pub fn spawn(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::listening(Self::launch(data_dir, extra_args, env, None))
    }

    /// [`ServerProcess::spawn`] with the server's open-file limit (`ulimit -n`, soft and
    /// hard) set to `open_files`, through util-linux's `prlimit`.
    pub fn spawn_with_open_file_limit(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        open_files: u64,
    ) -> Self {
        Self::spawn_with_open_file_limits(data_dir, extra_args, env, open_files, open_files)
    }

    /// [`ServerProcess::spawn`] with the server's soft and hard open-file limits set.
    pub fn spawn_with_open_file_limits(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        soft: u64,
        hard: u64,
    ) -> Self {
        Self::listening(Self::launch(data_dir, extra_args, env, Some((soft, hard))))
    }

    /// Waits until `server` listens (at most 60 s), and fills in its `url`.
    fn listening(mut server: Self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(60);
        server.url = loop {
            if let Ok(url) = server.listening.recv_timeout(Duration::from_millis(100)) {
                break url;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "storehost exited with {status} before listening; log:\n{}",
                    server.run_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "storehost did not start within 60 s"
            );
        };
        server
    }

    /// [`ServerProcess::spawn`] without waiting for the server to listen (it may be starting
    /// its stores): `url` stays empty.
    pub fn spawn_starting(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(data_dir, extra_args, env, None)
    }

    /// Starts the server, under an open-file limit of `open_files` when given.
    fn launch(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<(u64, u64)>,
    ) -> Self {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let log_start = log_file.metadata().map_or(0, |meta| meta.len() as usize);
        // The limit is set by util-linux's `prlimit` (on every Debian machine): setting it in
        // the child before exec would need `unsafe`, which the project forbids.
        let mut command = match open_files {
            Some((soft, hard)) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(storehost_bin());
                command
            }
            None => Command::new(storehost_bin()),
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .env("STOREHOST_ADMIN_TOKEN", PROCESS_TOKEN)
            // Info lines at least, whatever the test run's own filter: `stop_cleanly` reads
            // one (a caller's `env` may set another).
            .env("STOREHOST_LOG", "info")
            .env_remove("STORE_IDS")
            .env_remove("PORT")
            .env_remove("STORE_DATA_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap_or_else(|err| {
            panic!(
                "could not start {:?}{}: {err}",
                command.get_program(),
                if open_files.is_some() {
                    " (util-linux's prlimit sets the open-file limit)"
                } else {
                    ""
                }
            )
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("storehost listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        Self {
            child,
            url: String::new(),
            log,
            log_start,
            listening,
        }
    }

    /// What this run of the server has logged so far.
    pub fn run_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.get(self.log_start..).unwrap_or(&text).to_owned()
    }

    /// Waits up to `within` for this run's log to contain `needle`; panics with the log if it
    /// does not.
    pub fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.run_log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the server did not log {needle:?} within {within:?}; log:\n{}",
                self.run_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server printed that it listens.
    pub fn said_listening(&self) -> bool {
        !self.url.is_empty() || self.listening.try_recv().is_ok()
    }

    /// SIGKILL, like `kill -9`: no cleanup of any kind.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then asserts the server stopped every store cleanly and exited 0; a failure
    /// prints the server's log.
    pub fn stop_cleanly(mut self) {
        self.send_term();
        let status = self.wait_exit(Duration::from_secs(30));
        let text = self.run_log();
        assert!(
            status.is_some_and(|status| status.success())
                && text.contains("all stores stopped cleanly"),
            "SIGTERM should stop storehost cleanly with exit 0; it ended with {status:?}; log:\n{text}"
        );
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.send_term();
        match self.wait_exit(Duration::from_secs(30)) {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                panic!("storehost did not exit within 30 s of SIGTERM");
            }
        }
    }

    /// Sends SIGTERM, directly (no `kill` process in between), and returns at once.
    pub fn send_term(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }

    /// Waits up to `within` for the process to exit: its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An admin client for tests that drive a [`ServerProcess`] from a plain (not async) test:
/// each call blocks until the server answered.
pub struct BlockingAdmin {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Default for BlockingAdmin {
    fn default() -> Self {
        Self {
            runtime: tokio::runtime::Runtime::new().expect("a runtime for the admin client"),
            client: reqwest::Client::new(),
        }
    }
}

impl BlockingAdmin {
    /// `method` `url``path` with [`PROCESS_TOKEN`] and `body` as JSON: the status and the
    /// answer (as JSON, or as a string when it is not JSON).
    pub fn call(
        &self,
        url: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .client
            .request(method, format!("{url}{path}"))
            .bearer_auth(PROCESS_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.runtime.block_on(async {
            let response = request.send().await.expect("the server answers");
            let status = response.status().as_u16();
            let text = response.text().await.expect("the answer's body");
            (
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            )
        })
    }

    /// `POST /webhooks/workspaces` with `body`, authenticated by `X-Webhook-Secret: secret`:
    /// the status and the answer.
    pub fn webhook(
        &self,
        url: &str,
        secret: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.runtime.block_on(async {
            let response = self
                .client
                .post(format!("{url}/webhooks/workspaces"))
                .header("x-webhook-secret", secret)
                .json(body)
                .send()
                .await
                .expect("the server answers");
            let status = response.status().as_u16();
            (status, response.json().await.expect("a JSON answer"))
        })
    }

    /// The value of the metric `name` (a sample without labels) in `url`'s `GET /metrics`.
    pub fn metric(&self, url: &str, name: &str) -> usize {
        let text = self.runtime.block_on(async {
            let response = self
                .client
                .get(format!("{url}/metrics"))
                .send()
                .await
                .expect("the server answers");
            response.text().await.expect("the metrics")
        });
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}
