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
    let mut text = format!(
        "[plugins.writer]\npath = {:?}\n\n[retry]\nbase_delay_ms = 10\nmax_delay_ms = 100\n\n",
        programs::WRITER
    );
    for store in STORES {
        text.push_str(&format!("[stores.{store}]\nplugin = \"writer\"\n\n"));
    }
    let path = dir.join("storehost.toml");
    std::fs::write(&path, text).unwrap();
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
        // Wait until everything in the log is processed (emitted events included).
        let mut settled = false;
        for _ in 0..600 {
            let status = get(&server.url, &format!("/v1/stores/{store}")).await;
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
                &server.url,
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
        let applied = get(&server.url, &format!("/v1/stores/{store}/query/applied")).await;
        assert_eq!(
            applied["seqs"],
            json!(seqs),
            "{store}: effects not applied exactly once"
        );
        let letters = get(&server.url, &format!("/v1/stores/{store}/dead-letters")).await;
        assert_eq!(
            letters["deadLetters"],
            json!([]),
            "{store}: unexpected dead letters"
        );
    }
    assert!(
        server.terminate().success(),
        "SIGTERM ends the server cleanly"
    );
}
