//! A plugin printing to its stdout and stderr works for as long as its sandbox lives: the
//! host keeps only the tail of each call's output. A pipe of 64 KiB kept across a sandbox's
//! calls filled up after some 30 events of 2 KB of output each; from then on the print failed,
//! Rust's `println!` panicked, and one event in every few dozen failed (and was retried, the
//! store demoted and its circuit counting it).

use serde_json::json;
use storehost_tests::{TestHost, programs};

const EVENTS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_printing_for_every_event_never_fails_for_it() {
    let host = TestHost::start().await;
    host.deploy("chatty", programs::CHATTY).await;
    host.add_store("chatty-1", "chatty", &[]).await;
    for n in 0..EVENTS {
        host.append("chatty-1", "note", json!({"n": n})).await;
    }
    host.settle("chatty-1").await;

    let (_, status) = host.get("/v1/stores/chatty-1").await;
    assert_eq!(status["errorsCount"], 0, "{status}");
    assert_eq!(status["lastFailure"], serde_json::Value::Null, "{status}");
    let (_, letters) = host.get("/v1/stores/chatty-1/dead-letters").await;
    assert_eq!(letters["deadLetters"], json!([]), "{letters}");
    assert_eq!(
        host.query("chatty-1", "count", json!({})).await,
        json!({"handled": EVENTS})
    );
}
