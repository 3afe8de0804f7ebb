//! Durability under `kill -9`: concurrent clients post events to the real `storehost` binary,
//! which is killed at random moments several times. After a restart every event that got a 2xx
//! is in the log exactly once, `seq` has no gaps, and every effect (including the events the
//! plugin emitted) is applied exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use storehost_tests::process::{PROCESS_TOKEN, ServerProcess};
use storehost_tests::programs;

const STORES: [&str; 3] = ["crash-a", "crash-b", "crash-c"];
const CLIENTS: usize = 4;
const ROUNDS: usize = 4;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    config_with(dir, &STORES)
}

/// Writes `storehost.toml` in `dir` (by atomic rename, as an editor saves) running `stores` on
/// the writer plugin.
fn config_with(dir: &std::path::Path, stores: &[&str]) -> std::path::PathBuf {
    let mut text = format!(
        "[plugins.writer]\npath = {:?}\n\n[retry]\nbase_delay_ms = 10\nmax_delay_ms = 100\n\n",
        programs::WRITER
    );
    for store in stores {
        text.push_str(&format!("[stores.{store}]\nplugin = \"writer\"\n\n"));
    }
    let path = dir.join("storehost.toml");
    let temp = dir.join(".storehost.toml.tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, &path).unwrap();
    path
}

/// One acknowledged append: the store, the seq it got, and the key it carried.
type Ack = (String, u64, String);

async fn client(url: String, id: usize, stop: Arc<AtomicBool>) -> Vec<Ack> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut acks = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (store, batch) = {
            let mut rng = rand::rng();
            (
                STORES[rng.random_range(0..STORES.len())],
                rng.random_range(1..=5usize),
            )
        };
        let mut keys = Vec::new();
        let events: Vec<Value> = (0..batch)
            .map(|_| {
                n += 1;
                let key = format!("r{}-c{id}-{n}", std::process::id());
                keys.push(key.clone());
                if n.is_multiple_of(4) {
                    json!({"type": "kv.emit", "payload": {"type": "kv.put", "payload": {"key": format!("e-{key}"), "value": n}}})
                } else {
                    json!({"type": "kv.put", "payload": {"key": key, "value": n}})
                }
            })
            .collect();
        let sent = http
            .post(format!("{url}/v1/stores/{store}/events"))
            .bearer_auth(PROCESS_TOKEN)
            .json(&json!({"events": events}))
            .send()
            .await;
        let Ok(response) = sent else { break };
        if response.status().as_u16() != 202 {
            break;
        }
        let Ok(body) = response.json::<Value>().await else {
            break;
        };
        for (seq, key) in body["seqs"].as_array().unwrap().iter().zip(keys) {
            acks.push((store.to_owned(), seq.as_u64().unwrap(), key));
        }
    }
    acks
}

async fn get(url: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(PROCESS_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Checks what a user relies on in `store` after crashes: everything in its log is processed,
/// `seq` has no gaps, every acknowledged event is at its seq, no event is in the log twice, each
/// `kv.emit` emitted exactly once, every effect was applied exactly once, nothing dead-lettered.
async fn verify_store(url: &str, store: &str, acked: &[Ack]) {
    // Wait until everything in the log is processed (emitted events included).
    let mut settled = false;
    for _ in 0..600 {
        let status = get(url, &format!("/v1/stores/{store}")).await;
        if status["lag"] == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled, "store {store} did not catch up");

    let mut log = Vec::new();
    let mut after = 0;
    loop {
        let page = get(
            url,
            &format!("/v1/stores/{store}/events?after={after}&limit=1000"),
        )
        .await;
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        after = page["next"].as_u64().unwrap();
        log.extend(events);
    }
    let seqs: Vec<u64> = log.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "{store}: seq has gaps"
    );

    // Every acknowledged event is at its seq, and no key appears twice.
    let mut key_at: BTreeMap<u64, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for event in &log {
        let key = match event["type"].as_str().unwrap() {
            "kv.emit" => event["payload"]["payload"]["key"]
                .as_str()
                .unwrap()
                .trim_start_matches("e-")
                .to_owned(),
            _ => event["payload"]["key"].as_str().unwrap().to_owned(),
        };
        let tag = format!("{}:{key}", event["source"].as_str().unwrap());
        assert!(
            seen.insert(tag.clone()),
            "{store}: {tag} appears twice in the log"
        );
        key_at.insert(event["seq"].as_u64().unwrap(), key);
    }
    for (_, seq, key) in acked.iter().filter(|(s, _, _)| s == store) {
        assert_eq!(
            key_at.get(seq),
            Some(key),
            "{store}: acknowledged seq {seq} lost"
        );
    }

    // Every event emitted its follow-up exactly once (checked above by the seen set) and
    // every event's effect was applied exactly once, in order.
    let emits = log.iter().filter(|e| e["type"] == "kv.emit").count();
    let emitted = log.iter().filter(|e| e["source"] == "plugin").count();
    assert_eq!(
        emits, emitted,
        "{store}: each kv.emit emitted exactly one event"
    );
    let applied = get(url, &format!("/v1/stores/{store}/query/applied")).await;
    assert_eq!(
        applied["seqs"],
        json!(seqs),
        "{store}: effects not applied exactly once"
    );
    let letters = get(url, &format!("/v1/stores/{store}/dead-letters")).await;
    assert_eq!(
        letters["deadLetters"],
        json!([]),
        "{store}: unexpected dead letters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_or_doubled_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let config_arg = config.display().to_string();
    let data = dir.path().join("data");
    let mut acked: Vec<Ack> = Vec::new();

    for round in 0..ROUNDS {
        let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| tokio::spawn(client(server.url.clone(), round * 100 + id, stop.clone())))
            .collect();
        let run_for = rand::rng().random_range(300..900);
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        // Kill while clients are still sending: some requests die mid-flight.
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for handle in clients {
            acked.extend(handle.await.unwrap());
        }
    }
    assert!(
        acked.len() > 50,
        "the clients got too few events in ({})",
        acked.len()
    );

    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    for store in STORES {
        verify_store(&server.url, store, &acked).await;
    }
    server.stop_cleanly();
}

/// A scheduled task whose run is killed between its claim and its commit runs again after the
/// restart — exactly once: its effect and its emitted event are there once, never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_killed_between_claim_and_commit_runs_again_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins.ticker]\npath = {:?}\n\n[stores.clock]\nplugin = \"ticker\"\n",
            programs::TICKER
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let data = dir.path().join("data");
    let started_log = data.join("stores/clock/files/started.log");
    let http = reqwest::Client::new();

    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let due = now + 200;
    let response = http
        .post(format!("{}/v1/stores/clock/events", server.url))
        .bearer_auth(PROCESS_TOKEN)
        .json(&json!({"type": "schedule", "payload": {"taskId": "slow", "onceAtMs": due, "payload": {"sleepMs": 3000}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    // The run has claimed its execution and is sleeping inside its transaction: kill now.
    for _ in 0..300 {
        if std::fs::read_to_string(&started_log).is_ok_and(|log| log.ends_with('\n')) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&started_log)
            .unwrap()
            .lines()
            .count(),
        1,
        "the task started once before the kill"
    );
    server.kill9();

    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let mut tasks = Value::Null;
    for _ in 0..200 {
        tasks = get(&server.url, "/v1/stores/clock/tasks").await;
        if tasks["executions"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let executions = tasks["executions"].as_array().unwrap();
    assert_eq!(executions.len(), 1, "{tasks}");
    assert_eq!(executions[0]["status"], "completed");
    assert_eq!(executions[0]["scheduledFor"], due);
    let starts = std::fs::read_to_string(&started_log).unwrap();
    assert_eq!(
        starts.lines().collect::<Vec<_>>(),
        vec![format!("slow@{due}"); 2],
        "the execution started again after the restart, with the same id"
    );
    let runs = get(&server.url, "/v1/stores/clock/query/runs").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1, "{runs}");
    let log = get(
        &server.url,
        "/v1/stores/clock/events?after=0&limit=100&waitMs=0",
    )
    .await;
    let ran = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "task.ran")
        .count();
    assert_eq!(ran, 1, "{log}");
    server.terminate();
}

/// What the crash matrix is doing when it kills the host.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// A guest handler has made its writes and sleeps before they commit.
    InsideHandler,
    /// A new version of the stores' plugin is being deployed through the API.
    PluginSwap,
    /// A backup of a running store is being taken and streamed.
    Backup,
    /// A config edit adding a store has just been saved.
    ConfigReload,
}

fn scratch_dirs(data: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data.join("stores"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        // `.spare` is the pool of new-store directories (a crash while it builds one leaves a
        // `.building-` inside it, deleted at the next start), not a backup's or restore's.
        .filter(|name| name.starts_with('.') && name != ".spare")
        .collect()
}

/// The crash matrix beyond appends: the real binary is `kill -9`ed inside a guest handler
/// (between its writes and their commit), during a plugin hot swap, during a backup and right
/// after a config edit — each time under concurrent appends. After each restart every
/// acknowledged event is there once, `seq` is gap-free, every effect is applied once, the
/// interrupted handler ran again and committed once, the store runs one of the two plugin
/// versions, no half-written backup is left behind, and the edited config's stores run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_inside_a_handler_a_swap_a_backup_or_a_reload_nothing_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let config_arg = config.display().to_string();
    let data = dir.path().join("data");
    let writer = std::fs::read(programs::WRITER).unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acked: Vec<Ack> = Vec::new();
    let mut slow_seq = None;
    let mut deployed = Vec::new();
    let moments = [
        Moment::InsideHandler,
        Moment::PluginSwap,
        Moment::Backup,
        Moment::ConfigReload,
    ];
    let mut summary = Vec::new();

    for (round, moment) in moments.into_iter().enumerate() {
        let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                tokio::spawn(client(
                    server.url.clone(),
                    1000 + round * 100 + id,
                    stop.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(200..500))).await;
        let kill_after = rand::rng().random_range(0..40u64);
        match moment {
            Moment::InsideHandler => {
                let key = "slow-handler";
                let response = http
                    .post(format!("{}/v1/stores/crash-a/events", server.url))
                    .bearer_auth(PROCESS_TOKEN)
                    .json(&json!({"type": "kv.slow", "payload": {"key": key, "value": 1, "sleepMs": 4000}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 202);
                let seq = response.json::<Value>().await.unwrap()["seq"]
                    .as_u64()
                    .unwrap();
                acked.push(("crash-a".into(), seq, key.into()));
                slow_seq = Some(seq);
                let marker = data.join("stores/crash-a/files/handler.log");
                let mut started = false;
                for _ in 0..500 {
                    if std::fs::read_to_string(&marker).is_ok_and(|m| m.ends_with('\n')) {
                        started = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(started, "the slow handler started");
            }
            Moment::PluginSwap => {
                let bytes =
                    storehost_tests::with_custom_section(&writer, &format!("round {round}"));
                deployed.push(storehost_tests::sha256sum(&bytes));
                let url = format!("{}/v1/plugins/writer", server.url);
                let http = http.clone();
                tokio::spawn(async move {
                    let _ = http
                        .put(url)
                        .bearer_auth(PROCESS_TOKEN)
                        .body(bytes)
                        .send()
                        .await;
                });
                tokio::time::sleep(Duration::from_millis(kill_after)).await;
            }
            Moment::Backup => {
                let url = format!("{}/v1/stores/crash-b/backup", server.url);
                let http = http.clone();
                tokio::spawn(async move {
                    if let Ok(response) = http.get(url).bearer_auth(PROCESS_TOKEN).send().await {
                        let _ = response.bytes().await;
                    }
                });
                tokio::time::sleep(Duration::from_millis(kill_after)).await;
            }
            Moment::ConfigReload => {
                let mut stores = STORES.to_vec();
                stores.push("crash-d");
                config_with(dir.path(), &stores);
                tokio::time::sleep(Duration::from_millis(kill_after * 3)).await;
            }
        }
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for handle in clients {
            acked.extend(handle.await.unwrap());
        }
        summary.push(match moment {
            Moment::InsideHandler => format!("{moment:?} (kill once the handler had written)"),
            _ => format!("{moment:?} (kill after {kill_after} ms)"),
        });
    }
    assert!(
        acked.len() > 50,
        "too few events acknowledged ({})",
        acked.len()
    );

    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    for store in STORES {
        verify_store(&server.url, store, &acked).await;
    }

    // The interrupted handler ran again after the restart and its effect committed once.
    let slow_seq = slow_seq.unwrap();
    let starts = std::fs::read_to_string(data.join("stores/crash-a/files/handler.log")).unwrap();
    assert!(
        starts
            .lines()
            .filter(|l| *l == slow_seq.to_string())
            .count()
            >= 2,
        "the handler killed before its commit ran again: {starts}"
    );
    let value = get(
        &server.url,
        "/v1/stores/crash-a/query/get?args=%7B%22key%22%3A%22slow-handler%22%7D",
    )
    .await;
    assert_eq!(value["value"], "1", "{value}");

    // The stores run the original plugin or the one being deployed, nothing in between.
    let stores = get(&server.url, "/v1/stores").await;
    let original = storehost_tests::sha256sum(&writer);
    for store in stores["stores"].as_array().unwrap() {
        let sha = store["plugin"]["sha256"].as_str().unwrap();
        assert!(
            sha == original || deployed.iter().any(|d| d == sha),
            "{}: runs an unknown plugin {sha}",
            store["id"]
        );
    }

    // The edited config was in force after the restart; the new store takes events.
    let ids: Vec<&str> = stores["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"crash-d"), "{ids:?}");
    let response = http
        .post(format!("{}/v1/stores/crash-d/events", server.url))
        .bearer_auth(PROCESS_TOKEN)
        .json(&json!({"type": "kv.put", "payload": {"key": "after", "value": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);

    // Nothing half-written from the interrupted backup is left, and a new backup is whole.
    assert_eq!(scratch_dirs(&data), Vec::<String>::new());
    let backup = http
        .get(format!("{}/v1/stores/crash-b/backup", server.url))
        .bearer_auth(PROCESS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(backup.status().as_u16(), 200);
    let length = backup.content_length().unwrap();
    assert_eq!(backup.bytes().await.unwrap().len() as u64, length);

    server.stop_cleanly();
    storehost_tests::report(&format!(
        "crash matrix: {} acknowledged events checked after kills at: {}",
        acked.len(),
        summary.join(", ")
    ));
}
