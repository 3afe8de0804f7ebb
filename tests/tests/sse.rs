//! `GET /v1/stores/{id}/events/stream` (Server-Sent Events) through the real router on a real
//! port: events arrive in order as they are appended, each as `id:` seq, `event:` type and the
//! event's JSON as `GET /events` shows it; a client that disconnects and resumes with
//! `Last-Event-ID` gets every later event exactly once; the stream ends when its store is
//! removed; bad requests get clear errors.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

/// One parsed SSE message.
#[derive(Debug, Clone, PartialEq)]
struct Message {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// An open event stream, parsed as the SSE spec says (comments skipped).
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(host: &TestHost, store: &str, query: &str, last_event_id: Option<u64>) -> Self {
        Self::open_as(host, store, query, last_event_id, TOKEN).await
    }

    /// [`EventStream::open`] with `token` (a store token, say).
    async fn open_as(
        host: &TestHost,
        store: &str,
        query: &str,
        last_event_id: Option<u64>,
        token: &str,
    ) -> Self {
        let mut request = host
            .client
            .get(format!(
                "{}/v1/stores/{store}/events/stream{query}",
                host.url
            ))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("connect");
        assert_eq!(response.status(), 200, "the stream opens");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "SSE content type, got {content_type}"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next message, or `None` when the server ended the stream. Waits at most a minute (a
    /// safety net only a broken stream reaches).
    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut message = Message {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut has_field = false;
                for line in block.lines() {
                    if line.is_empty() || line.starts_with(':') {
                        continue; // the blank line ending the message, or a comment (keep-alive)
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    has_field = true;
                    match field {
                        "id" => message.id = Some(value.to_owned()),
                        "event" => message.event = Some(value.to_owned()),
                        "data" => {
                            if !message.data.is_empty() {
                                message.data.push('\n');
                            }
                            message.data.push_str(value);
                        }
                        other => panic!("unexpected SSE field {other:?} in {block:?}"),
                    }
                }
                if has_field {
                    return Some(message);
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.response.chunk())
                .await
                .expect("an event within a minute")
                .expect("read the stream");
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => return None,
            }
        }
    }

    /// The next message, which must be an event; answers its seq, type and JSON.
    async fn next_event(&mut self) -> (u64, String, Value) {
        let message = self.next().await.expect("the stream goes on");
        let seq: u64 = message.id.expect("id").parse().expect("id is a seq");
        let data: Value = serde_json::from_str(&message.data).expect("data is JSON");
        assert_eq!(data["seq"], seq, "id: is the event's seq");
        (seq, message.event.expect("event: type"), data)
    }
}

/// Every event of `store`, by seq, as `GET /events` shows it.
async fn logged(host: &TestHost, store: &str) -> BTreeMap<u64, Value> {
    let (status, page) = host
        .get(&format!("/v1/stores/{store}/events?after=0&limit=1000"))
        .await;
    assert_eq!(status, 200, "{page}");
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_delivers_events_in_order_as_they_are_appended() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("live-feed", "writer", &[]).await;
    for i in 0..3 {
        host.append(
            "live-feed",
            "note.added",
            json!({"i": i, "text": "line\nbreak"}),
        )
        .await;
    }

    let mut stream = EventStream::open(&host, "live-feed", "", None).await;
    let mut seen = Vec::new();
    for expected in 1..=3 {
        let (seq, event_type, data) = stream.next_event().await;
        assert_eq!(seq, expected, "the backlog first, in seq order");
        assert_eq!(event_type, "note.added");
        seen.push(data);
    }
    // Now live: each event appended while the stream is open arrives, in order.
    for i in 3..8 {
        let seq = host
            .append("live-feed", "note.added", json!({"i": i}))
            .await;
        let (streamed, _, data) = stream.next_event().await;
        assert_eq!(streamed, seq, "the event appended just now");
        seen.push(data);
    }
    let log = logged(&host, "live-feed").await;
    let expected: Vec<Value> = (1..=8).map(|seq| log[&seq].clone()).collect();
    assert_eq!(
        seen, expected,
        "data is the event's JSON as GET /events shows it"
    );
    assert_eq!(
        seen[0]["payload"]["text"], "line\nbreak",
        "payloads survive intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumed_with_last_event_id_delivers_every_later_event_exactly_once() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("resume-feed", "writer", &[]).await;

    // A writer appends 60 events in batches while the reader connects, drops and resumes.
    let appender = {
        let client = host.client.clone();
        let url = host.url.clone();
        tokio::spawn(async move {
            for batch in 0..12 {
                let events: Vec<Value> = (0..5)
                    .map(|i| json!({"type": "tick", "payload": {"n": batch * 5 + i}}))
                    .collect();
                let response = client
                    .post(format!("{url}/v1/stores/resume-feed/events"))
                    .bearer_auth(TOKEN)
                    .json(&json!({"events": events}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };

    let mut received: Vec<u64> = Vec::new();
    let mut last: Option<u64> = None;
    // Six connections, each read for a few events then dropped mid-stream.
    for round in 0..6 {
        // `after=0` is given too: Last-Event-ID takes precedence over it. One round sends it
        // as the `lastEventId` parameter, as some EventSource polyfills do.
        let (query, header) = match (round, last) {
            (0, _) => (String::new(), last),
            (3, Some(id)) => (format!("?lastEventId={id}"), None),
            _ => ("?after=0".to_owned(), last),
        };
        let mut stream = EventStream::open(&host, "resume-feed", &query, header).await;
        for _ in 0..7 {
            let (seq, event_type, _) = stream.next_event().await;
            assert_eq!(event_type, "tick");
            received.push(seq);
            last = Some(seq);
        }
        drop(stream);
    }
    appender.await.unwrap();
    // The last connection reads to the end of the log.
    let mut stream = EventStream::open(&host, "resume-feed", "?after=0", last).await;
    while last != Some(60) {
        let (seq, _, _) = stream.next_event().await;
        received.push(seq);
        last = Some(seq);
    }
    assert_eq!(
        received,
        (1..=60).collect::<Vec<u64>>(),
        "every event once, none twice, none skipped, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_ends_when_its_store_is_removed() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("short-lived", "writer", &[]).await;
    host.append("short-lived", "hello", json!({})).await;

    let mut stream = EventStream::open(&host, "short-lived", "?after=0", None).await;
    assert_eq!(stream.next_event().await.0, 1);
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/short-lived", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stream.next().await, None, "the server closes the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_when_the_host_starts_shutting_down() {
    let mut api = None;
    let host = TestHost::start_configured(
        TestHostOptions::default(),
        &[("writer", programs::WRITER)],
        |_, state| {
            api = Some(state.clone());
            state
        },
    )
    .await;
    host.add_store("draining-feed", "writer", &[]).await;
    host.append("draining-feed", "hello", json!({})).await;
    let mut stream = EventStream::open(&host, "draining-feed", "", None).await;
    assert_eq!(stream.next_event().await.0, 1);

    api.unwrap().start_draining();
    assert_eq!(
        stream.next().await,
        None,
        "the stream closes so shutdown does not wait for it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_requests_get_clear_errors() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("guarded-feed", "writer", &[]).await;
    let url = format!("{}/v1/stores/guarded-feed/events/stream", host.url);

    let anonymous = host.client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "a tenant route needs a token");

    let bad_id = host
        .client
        .get(&url)
        .bearer_auth(TOKEN)
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_id.status(), 400);
    let body: Value = bad_id.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_last_event_id");

    let bad_after = host
        .client
        .get(format!("{url}?after=-3"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_after.status(), 400);
    let body: Value = bad_after.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("after=<seq>"),
        "{body}"
    );

    let missing = host
        .client
        .get(format!(
            "{}/v1/stores/no-such-store/events/stream",
            host.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// A stream opened with a store token ends once that token is revoked: the event appended
/// after the revocation is not delivered. It used to flow on for as long as the connection
/// lasted, the token being checked only when the stream opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_with_a_store_token_ends_when_the_token_is_revoked() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("watched", "writer", &[]).await;
    let (token, token_id) = host.issue_token("watched").await;

    let mut stream = EventStream::open_as(&host, "watched", "?after=0", None, &token).await;
    let seq = host.append("watched", "note", json!({"n": 1})).await;
    assert_eq!(stream.next_event().await.0, seq);

    let (status, body) = host
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/stores/watched/tokens/{token_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.append("watched", "note", json!({"n": 2})).await;
    assert_eq!(
        stream.next().await,
        None,
        "the stream ends without the event appended after the revocation"
    );
}

/// A store serves at most `MAX_FOLLOWERS` event streams and long-polls of its tenants at
/// once; one more gets 429 `too_many_followers`, and a place comes back when a stream closes.
/// The admin's take no place. Before, one store token could open streams until the host
/// served no other connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_serves_a_bounded_number_of_followers() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("followed", "writer", &[]).await;
    let (token, _) = host.issue_token("followed").await;
    let get_as = |path: &str, token: &str| {
        host.client
            .get(format!("{}/v1/stores/followed/{path}", host.url))
            .bearer_auth(token)
            .send()
    };
    let open = || get_as("events/stream", &token);
    let mut streams = Vec::new();
    for _ in 0..storehost_store::MAX_FOLLOWERS {
        let response = open().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        streams.push(response);
    }
    let refused = open().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_followers", "{body}");
    let status = |response: reqwest::Result<reqwest::Response>| response.unwrap().status().as_u16();
    assert_eq!(
        status(get_as("events?waitMs=100", &token).await),
        429,
        "a long-poll is a follower too"
    );
    assert_eq!(
        status(get_as("events", &token).await),
        200,
        "a plain read is not"
    );
    assert_eq!(
        status(get_as("events/stream", TOKEN).await),
        200,
        "the admin's stream takes no place"
    );

    drop(streams.pop());
    let mut reopened = false;
    for _ in 0..100 {
        if status(open().await) == 200 {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened, "a closed stream gives its place back");
}
