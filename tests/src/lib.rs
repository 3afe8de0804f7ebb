//! Test support for storehost's integration tests: the guest programs, an in-process host
//! served on a real loopback port, and the real `storehost` binary as a child process.

pub mod control;
pub mod fs;
pub mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use storehost_api::{AppState, ServeOptions};
use storehost_control::config::StoreSpec;
use storehost_control::{HostSettings, Orchestrator, Seams, StoreSource};
use storehost_runtime::RuntimeOptions;
use storehost_store::{Durability, Quotas, RetryPolicy, Store, StoreId, StoreRuntime};

/// Paths of the guest programs, built by `build.rs`.
pub mod programs {
    include!(concat!(env!("OUT_DIR"), "/programs.rs"));
}

/// The admin token every in-process test host uses.
pub const TOKEN: &str = "test-admin-token";

/// The workspace's target directory (where test hosts share a compiled-plugin cache).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Where [`scratch_dir`] makes its directories once cleanup is deferred.
static SCRATCH_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// From now on this process's scratch directories ([`scratch_dir`]: test hosts' data, the
/// benchmark's raw references) are made under `root` and left in place when dropped; the
/// caller deletes `root` once, at the end. `false` if a root was set already.
///
/// The benchmark does this so one row's deletions never slow the next row's file creations:
/// ext4 without a journal (this machine's disk) skips every inode freed in the last minute
/// (six while its block is unwritten) each time it creates a file, and after thousands of
/// deletions that costs milliseconds per file. Measured here: a store's directory and two
/// databases created in /tmp after other runs' deletions p50 1.9–2.3 ms, in a new directory
/// elsewhere 0.3–0.6 ms.
pub fn defer_scratch_cleanup(root: PathBuf) -> bool {
    SCRATCH_ROOT.set(root).is_ok()
}

/// A new scratch directory: deleted when dropped, unless [`defer_scratch_cleanup`] was called.
pub fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    match SCRATCH_ROOT.get() {
        Some(root) => tempfile::Builder::new()
            .disable_cleanup(true)
            .tempdir_in(root),
        None => tempfile::tempdir(),
    }
}

/// A host running in this test process, served on a real port-0 listener.
pub struct TestHost {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The control plane, to reach stores directly.
    pub orchestrator: Arc<Orchestrator>,
    /// An HTTP client.
    pub client: reqwest::Client,
    /// The data directory.
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Options of a test host.
#[derive(Debug, Clone)]
pub struct TestHostOptions {
    /// Retry policy (fast by default so dead-lettering takes milliseconds).
    pub retry: RetryPolicy,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Default quotas.
    pub quotas: Quotas,
    /// Meter fuel (needed for the `fuel_per_call` quota).
    pub fuel: bool,
    /// Most stores the host runs.
    pub max_stores: usize,
    /// Guest invocations at once, host-wide.
    pub max_concurrent_invocations: usize,
    /// Enforce CPU time with epochs (off only to measure what limiting costs).
    pub cpu_limits: bool,
    /// Data directory to use (to restart on the same data); a fresh one when `None`.
    pub data_dir: Option<PathBuf>,
    /// Where plugins' `llm` calls go.
    pub llm: Option<Arc<dyn storehost_store::LlmBackend>>,
    /// Catch-up window of scheduled tasks.
    pub task_catch_up: Duration,
    /// Idle time after which a store hibernates (`None`: never, the default in tests).
    pub idle_timeout: Option<Duration>,
    /// How much longer a hibernated store waits before it closes its files (zero by default:
    /// at once).
    pub close_files_after: Duration,
    /// Sandbox pool slots (`None`: one per store, `max_stores`).
    pub pool_slots: Option<u32>,
    /// Spare store directories kept ready (2 by default, so most tests' stores start from one;
    /// the server's default is `DEFAULT_SPARE_STORES`).
    pub spare_stores: usize,
    /// Where desired state is kept and which stores run here (`host.db`, every store).
    pub seams: Seams,
    /// The config file the host runs, as `--config` names it (`None`: the embedded default).
    pub config_file: Option<PathBuf>,
    /// Files all guests together may hold open (`None`: what the server would allow, from
    /// the open-file limit and `max_stores`).
    pub guest_open_files: Option<usize>,
}

impl Default for TestHostOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy {
                attempts: 3,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
                ..RetryPolicy::default()
            },
            max_body_bytes: 64 << 10,
            quotas: Quotas::default(),
            fuel: false,
            max_stores: 100,
            max_concurrent_invocations: 2,
            cpu_limits: true,
            data_dir: None,
            llm: None,
            task_catch_up: storehost_store::store::DEFAULT_TASK_CATCH_UP,
            idle_timeout: None,
            close_files_after: Duration::ZERO,
            pool_slots: None,
            spare_stores: 2,
            seams: Seams::default(),
            config_file: None,
            guest_open_files: None,
        }
    }
}

impl TestHost {
    /// A host with default test options.
    pub async fn start() -> Self {
        Self::start_with(TestHostOptions::default()).await
    }

    /// A host with `options`.
    pub async fn start_with(options: TestHostOptions) -> Self {
        Self::start_configured(options, &[], |_, state| state).await
    }

    /// A host with `options`, the plugins `preload` (name, path) deployed, and `configure`
    /// adding parts (webhooks, a reconciler…) to its API state before it serves.
    pub async fn start_configured(
        options: TestHostOptions,
        preload: &[(&str, &str)],
        configure: impl FnOnce(&Arc<Orchestrator>, AppState) -> AppState,
    ) -> Self {
        let dir = scratch_dir().expect("temp dir");
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let runtime = StoreRuntime::new(RuntimeOptions {
            max_live_sandboxes: options
                .pool_slots
                .unwrap_or(u32::try_from(options.max_stores).unwrap_or(u32::MAX)),
            max_memory_bytes: 256 << 20,
            fuel: options.fuel,
            cache_dir: Some(target_dir().join("test-plugin-cache")),
            max_concurrent_invocations: options.max_concurrent_invocations,
            cpu_limits: options.cpu_limits,
            guest_open_files: options.guest_open_files.unwrap_or_else(|| {
                storehost_store::open_files::for_guests(
                    options.max_stores,
                    options.spare_stores,
                    ServeOptions::default().max_connections,
                )
            }),
        })
        .expect("runtime");
        let orchestrator = Arc::new(
            Orchestrator::with_seams(
                runtime,
                HostSettings {
                    data_dir: data_dir.clone(),
                    durability: Durability::Process,
                    retry: options.retry,
                    max_stores: options.max_stores,
                    defaults: StoreSpec {
                        plugin: "writer".into(),
                        quotas: options.quotas,
                        config: BTreeMap::new(),
                        own: None,
                    },
                    llm: options.llm.clone(),
                    task_catch_up: options.task_catch_up,
                    idle_timeout: options.idle_timeout,
                    close_files_after: options.close_files_after,
                    spare_stores: options.spare_stores,
                    config_file: options.config_file.clone(),
                },
                options.seams.clone(),
            )
            .expect("orchestrator"),
        );
        for (name, path) in preload {
            let wasm = std::fs::read(path).unwrap_or_else(|err| panic!("read {path}: {err}"));
            orchestrator
                .deploy_plugin(name, wasm)
                .await
                .unwrap_or_else(|err| panic!("deploy {name}: {err}"));
        }
        let state = configure(
            &orchestrator,
            AppState::new(orchestrator.clone(), TOKEN, options.max_body_bytes),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(storehost_api::serve(
            listener,
            storehost_api::app(state),
            ServeOptions::default(),
            async move {
                let _ = stop.await;
            },
        ));
        Self {
            url,
            orchestrator,
            client: reqwest::Client::new(),
            data_dir,
            _dir: dir,
            shutdown: Some(shutdown),
        }
    }

    /// Deploys the guest program at `path` as plugin `name`.
    pub async fn deploy(&self, name: &str, path: &str) {
        let wasm = std::fs::read(path).unwrap_or_else(|err| panic!("read {path}: {err}"));
        self.orchestrator
            .deploy_plugin(name, wasm)
            .await
            .unwrap_or_else(|err| panic!("deploy {name}: {err}"));
    }

    /// Starts store `id` on `plugin` with `config`, default quotas.
    pub async fn add_store(&self, id: &str, plugin: &str, config: &[(&str, &str)]) -> Store {
        self.add_store_with(id, plugin, config, Quotas::default())
            .await
    }

    /// Starts store `id` on `plugin` with `config` and `quotas`.
    pub async fn add_store_with(
        &self,
        id: &str,
        plugin: &str,
        config: &[(&str, &str)],
        quotas: Quotas,
    ) -> Store {
        let id = StoreId::new(id).expect("valid id");
        let spec = StoreSpec {
            plugin: plugin.into(),
            quotas,
            config: config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            // Set whole: what differs from the defaults counts as the store's own.
            own: None,
        };
        self.orchestrator
            .ensure_running(&id, spec, StoreSource::Api)
            .await
            .expect("store starts");
        self.orchestrator.get(&id).await.expect("store runs")
    }

    /// `METHOD path` with the admin token and an optional JSON body; answers status and JSON.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request).await
    }

    /// `PUT /v1/plugins/{name}` with `bytes` as the admin; answers status and JSON.
    pub async fn upload_plugin(&self, name: &str, bytes: Vec<u8>) -> (u16, Value) {
        self.upload_plugin_as(name, bytes, Some(TOKEN)).await
    }

    /// `PUT /v1/plugins/{name}` with `bytes` and the bearer `token`, or none.
    pub async fn upload_plugin_as(
        &self,
        name: &str,
        bytes: Vec<u8>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .put(format!("{}/v1/plugins/{name}", self.url))
            .header("content-type", "application/wasm")
            .body(bytes);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        answer(request).await
    }

    /// A new token of `store` (as the admin issues it): the token and its id.
    pub async fn issue_token(&self, store: &str) -> (String, u64) {
        let (status, issued) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/stores/{store}/tokens"),
                None,
            )
            .await;
        assert_eq!(status, 201, "{issued}");
        (
            issued["token"].as_str().unwrap().to_owned(),
            issued["id"].as_u64().unwrap(),
        )
    }

    /// `GET path` as admin.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST path` as admin with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Appends one event to `store`; panics unless it is accepted. Returns its seq.
    pub async fn append(&self, store: &str, event_type: &str, payload: Value) -> u64 {
        let (status, body) = self
            .post(
                &format!("/v1/stores/{store}/events"),
                serde_json::json!({"type": event_type, "payload": payload}),
            )
            .await;
        assert_eq!(status, 202, "append failed: {body}");
        body["seq"].as_u64().expect("seq")
    }

    /// Runs query `name` on `store` through the API; panics unless it answers 200.
    pub async fn query(&self, store: &str, name: &str, args: Value) -> Value {
        let path = format!(
            "/v1/stores/{store}/query/{name}?args={}",
            urlencode(&args.to_string())
        );
        let (status, body) = self.get(&path).await;
        assert_eq!(status, 200, "query {name} failed: {body}");
        body
    }

    /// Polls `GET /metrics` until the host-wide gauge `name` (one without labels) shows
    /// `value` (at most 30 s).
    pub async fn wait_for_gauge(&self, name: &str, value: u64) {
        let wanted = format!("{name} {value}");
        let mut last = String::new();
        for _ in 0..600 {
            let response = self
                .client
                .get(format!("{}/metrics", self.url))
                .send()
                .await
                .expect("scrape");
            let text = response.text().await.expect("metrics body");
            last = text
                .lines()
                .find(|line| line.starts_with(&format!("{name} ")))
                .unwrap_or("(missing)")
                .to_owned();
            if last == wanted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} never showed {value}; last: {last}");
    }

    /// Polls `GET /v1/stores/{id}` until `check` holds (at most 30 s); returns that status.
    pub async fn wait_for_status(&self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..600 {
            let (_, status) = self.get(&format!("/v1/stores/{id}")).await;
            if check(&status) {
                return status;
            }
            last = status;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("store {id} never reached the expected status; last: {last}");
    }

    /// Waits until store `id` has processed everything appended so far (including events its
    /// plugin emitted meanwhile).
    pub async fn settle(&self, id: &str) {
        let store = self
            .orchestrator
            .get(&StoreId::new(id).expect("valid id"))
            .await
            .expect("store runs");
        for _ in 0..100 {
            let head = store.head();
            assert!(
                store.wait_processed(head, Duration::from_secs(30)).await,
                "store {id} did not process up to {head}: {:?}",
                store.status()
            );
            if store.head() == head {
                return;
            }
        }
        panic!("store {id} keeps emitting events");
    }

    /// What the `escape` program's probes in store `id` recorded, in order, once it has
    /// processed everything appended so far.
    pub async fn probes(&self, id: &str) -> Vec<Value> {
        self.settle(id).await;
        self.query(id, "probes", serde_json::json!({})).await["probes"]
            .as_array()
            .expect("the escape program answers probes")
            .clone()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Sends `request`: its status and JSON body (a body that is not JSON as a string).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// Prints what a reliability test checked where `cargo test` shows it although the test
/// passes: the harness captures `println!` and `eprintln!`, not writes to the process's own
/// stderr. CI's log then says what the crash matrix, the faults and the soak covered, and
/// which checks this machine could not run.
pub fn report(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Percent-encodes a query-string value.
pub fn urlencode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// SHA-256 of `bytes`, hex, computed by the system's `sha256sum` (independent of the host).
pub fn sha256sum(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8(output.stdout).unwrap()[..64].to_owned()
}

/// A config file's text running `stores` on the `writer` plugin at `plugin_path`.
pub fn writer_config(plugin_path: &std::path::Path, stores: &[&str]) -> String {
    let mut text = format!(
        "[defaults]\nplugin = \"writer\"\n[plugins.writer]\npath = {:?}\n",
        plugin_path.display().to_string()
    );
    for id in stores {
        text.push_str(&format!("[stores.{id}]\n"));
    }
    text
}

/// `bytes` (a component) with a custom section appended: the same plugin, other bytes and so
/// another sha256 (a swap the host must carry out).
pub fn with_custom_section(bytes: &[u8], note: &str) -> Vec<u8> {
    let name = b"storehost-test";
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(note.as_bytes());
    assert!(content.len() < 128, "one-byte LEB128 size");
    let mut out = bytes.to_vec();
    out.push(0);
    out.push(content.len() as u8);
    out.extend_from_slice(&content);
    out
}
