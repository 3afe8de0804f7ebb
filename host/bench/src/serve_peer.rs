//! HTTP → guest → response against `wasmtime serve`: storehost's `query` route (the real
//! binary, the bench plugin answering `{"found":0}` without touching SQL) against `wasmtime
//! serve` (wasmtime-cli 48.0.8, installed by this row's own setup step) running `http_answer`,
//! a wasi:http component that answers the same JSON. Both are separate processes on loopback,
//! driven by the same closed-loop load generator.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use storehost_tests::process::{PROCESS_TOKEN, ServerProcess};
use storehost_tests::{programs, target_dir};

use crate::report::{Row, Table, ms, percentile, thousands, times};

/// The wasmtime-cli version compared against (the wasmtime storehost embeds).
const WASMTIME_VERSION: &str = "48.0.8";
/// Requests in flight at once (closed loop: each client sends its next request on an answer).
const CLIENTS: usize = 16;
/// Stores the storehost requests are spread over (a store answers its queries one at a time).
const STORES: usize = 8;
/// The query the bench plugin answers without reading anything.
const QUERY: &str = "query/points?args=%7B%22n%22%3A0%2C%22rows%22%3A1%7D";

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let seconds = if quick { 3 } else { 10 };
    let wasmtime = wasmtime_cli()?;

    let peer = WasmtimeServe::start(&wasmtime, Path::new(programs::HTTP_ANSWER)).await?;
    let peer_urls = vec![format!("{}/", peer.url)];
    eprintln!("serve: wasmtime serve, {CLIENTS} clients for {seconds} s");
    let (peer_rps, mut peer_latencies) = load(&peer_urls, None, seconds).await?;
    drop(peer);

    let dir = storehost_tests::scratch_dir()?;
    let config = dir.path().join("storehost.toml");
    let mut text = format!("[plugins.bench]\npath = {:?}\n\n", programs::BENCH);
    for i in 0..STORES {
        text.push_str(&format!("[stores.serve-{i:02}]\nplugin = \"bench\"\n\n"));
    }
    std::fs::write(&config, text)?;
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &["--config", &config.display().to_string()],
        &[("STOREHOST_LOG", "warn")],
    );
    let urls: Vec<String> = (0..STORES)
        .map(|i| format!("{}/v1/stores/serve-{i:02}/{QUERY}", server.url))
        .collect();
    eprintln!(
        "serve: storehost query route over {STORES} stores, {CLIENTS} clients for {seconds} s"
    );
    let (rps, mut latencies) = load(&urls, Some(PROCESS_TOKEN), seconds).await?;
    server.terminate();

    let p99 = percentile(&mut latencies, 99.0);
    let peer_p99 = percentile(&mut peer_latencies, 99.0);
    table.push(Row {
        figure: format!(
            "HTTP → guest → response: GET query route (bench plugin, {STORES} stores, {CLIENTS} clients in a closed loop, {seconds} s; p50 {} ms)",
            ms(percentile(&mut latencies, 50.0))
        ),
        unit: "req/s",
        p50: thousands(rps),
        p99: format!("{} ms", ms(p99)),
        reference: format!(
            "wasmtime serve {WASMTIME_VERSION} with an equivalent wasi:http component: {} req/s, p99 {} ms",
            thousands(peer_rps),
            ms(peer_p99)
        ),
        ratio: times(rps, peer_rps),
        target: "≥ 1× the peer",
    });
    Ok(())
}

/// `wasmtime` from `target/bench-tools`, installed there from crates.io the first time.
fn wasmtime_cli() -> anyhow::Result<PathBuf> {
    let root = target_dir().join("bench-tools");
    let bin = root.join("bin/wasmtime");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(WASMTIME_VERSION));
    if !installed {
        eprintln!(
            "serve: installing wasmtime-cli {WASMTIME_VERSION} into {} (once; a release build of about 15 min on two cores)",
            root.display()
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "install",
                "wasmtime-cli",
                "--locked",
                "--version",
                WASMTIME_VERSION,
            ])
            .arg("--root")
            .arg(&root)
            .status()?;
        anyhow::ensure!(status.success(), "cargo install wasmtime-cli failed");
    }
    Ok(bin)
}

/// A running `wasmtime serve`.
struct WasmtimeServe {
    child: Child,
    url: String,
}

impl WasmtimeServe {
    async fn start(wasmtime: &Path, component: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log_path =
            std::env::temp_dir().join(format!("storehost-bench-wasmtime-serve-{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        // `-Scli`: a Rust std component imports wasi:cli (environment, exit), which `serve`
        // grants only when asked.
        let child = Command::new(wasmtime)
            .args(["serve", "-Scli", "--addr", &addr])
            .arg(component)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        let serve = Self {
            child,
            url: format!("http://{addr}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "wasmtime serve did not listen on {addr} within 30 s: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(serve)
    }
}

impl Drop for WasmtimeServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`CLIENTS`] clients GET `urls` (round robin) in a closed loop for `seconds`, after a
/// one-second warm-up; answers requests per second and every request's latency. Any answer but
/// 200 with the expected body is an error.
async fn load(
    urls: &[String],
    token: Option<&str>,
    seconds: u64,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .timeout(Duration::from_secs(10))
        .build()?;
    let urls: Arc<Vec<String>> = Arc::new(urls.to_vec());
    let token = token.map(str::to_owned);
    round(&http, &urls, &token, Duration::from_secs(1)).await?;
    let started = Instant::now();
    let latencies = round(&http, &urls, &token, Duration::from_secs(seconds)).await?;
    let rps = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rps, latencies))
}

/// One closed-loop round of `length`; answers every request's latency.
async fn round(
    http: &reqwest::Client,
    urls: &Arc<Vec<String>>,
    token: &Option<String>,
    length: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, urls, token, stop) =
                (http.clone(), urls.clone(), token.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut next = client;
                while !stop.load(Ordering::Relaxed) {
                    let url = &urls[next % urls.len()];
                    next += 1;
                    let mut request = http.get(url);
                    if let Some(token) = &token {
                        request = request.bearer_auth(token);
                    }
                    let sent = Instant::now();
                    let response = request.send().await?;
                    let status = response.status().as_u16();
                    let body = response.bytes().await?;
                    anyhow::ensure!(
                        status == 200 && body.as_ref() == br#"{"found":0}"#,
                        "GET {url} answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                    latencies.push(sent.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await??);
    }
    Ok(all)
}
