//! Bad input gets a clear error with a fitting status, in the `{"error":{"code","message"}}`
//! shape, and writes nothing.

use serde_json::{Value, json};
use storehost_tests::{TOKEN, TestHost, programs};

async fn raw(
    host: &TestHost,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut request = host
        .client
        .request(method, format!("{}{path}", host.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn head(host: &TestHost, store: &str) -> u64 {
    host.get(&format!("/v1/stores/{store}")).await.1["head"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly_and_write_nothing() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("tenant", "writer", &[]).await;
    let post = reqwest::Method::POST;
    let good = r#"{"type":"kv.put","payload":{"key":"a","value":1}}"#;

    let (status, body) = raw(&host, post.clone(), "/v1/stores/tenant/events", None, good).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Bearer"),
        "{body}"
    );

    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/tenant/events",
        Some("wrong"),
        good,
    )
    .await;
    assert_eq!(status, 401, "{body}");

    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/bad.id/events",
        Some(TOKEN),
        good,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_store_id");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 to 64 characters"),
        "{body}"
    );

    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/nobody-here/events",
        Some(TOKEN),
        good,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "store_not_found");

    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/tenant/events",
        Some(TOKEN),
        "{\"type\": ",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_json");

    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/tenant/events",
        Some(TOKEN),
        r#"{"payload":{}}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("type"),
        "{body}"
    );

    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/tenant/events",
        Some(TOKEN),
        r#"{"events":[]}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let huge = format!(r#"{{"type":"big","payload":"{}"}}"#, "x".repeat(200 << 10));
    let (status, body) = raw(
        &host,
        post.clone(),
        "/v1/stores/tenant/events",
        Some(TOKEN),
        &huge,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "body_too_large");

    let (status, body) = host.get("/v1/stores/tenant/events?limit=0").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = host.get("/v1/stores/tenant/events?after=minus-one").await;
    assert_eq!(status, 400, "{body}");
    // A wait over the longest is refused as a limit over the largest is, not cut short.
    for path in [
        "/v1/stores/tenant/events?limit=1001",
        "/v1/stores/tenant/events?waitMs=30001",
    ] {
        let (status, body) = host.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("limit must be 1 to 1000")
                || message.contains("waitMs must be 0 to 30000"),
            "{path}: {message}"
        );
    }
    // A misspelt parameter is refused, not ignored (`wait_ms` answered at once, not waiting).
    for path in [
        "/v1/stores/tenant/events?after=0&wait_ms=3000",
        "/v1/stores/tenant/events/stream?since=0",
    ] {
        let (status, body) = host.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("unknown field"), "{path}: {message}");
    }
    let (status, body) = host
        .get("/v1/stores/tenant/query/count?args=not-json")
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = host.get("/v1/stores/tenant/query/no-such-query").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "plugin_error");

    assert_eq!(
        head(&host, "tenant").await,
        0,
        "no refused request wrote an event"
    );

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/new-one",
            Some(json!({"quotas": {"memroy": 1}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memroy"),
        "{body}"
    );
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/new-one",
            Some(json!({"plugin": "nope"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "unknown_plugin");
    let (status, _) = host.get("/v1/stores/new-one").await;
    assert_eq!(status, 404, "a refused PUT creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_are_created_updated_and_removed_through_the_api() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;

    let put = reqwest::Method::PUT;
    let (status, body) = host
        .call(
            put.clone(),
            "/v1/stores/acme-1",
            Some(json!({"plugin": "writer", "quotas": {"cpu_ms_per_call": 500}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["change"], "created");
    assert_eq!(body["quotas"]["cpu_ms_per_call"], 500);
    assert_eq!(body["plugin"]["name"], "writer");
    assert_eq!(body["plugin"]["sha256"].as_str().unwrap().len(), 64);
    let (status, body) = host
        .call(
            put.clone(),
            "/v1/stores/acme-1",
            Some(json!({"config": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["change"], "updated");
    assert_eq!(
        body["quotas"]["cpu_ms_per_call"], 500,
        "an update keeps what it does not change"
    );
    assert_eq!(body["config"], json!({"k": "v"}));
    // The same PUT again changes nothing, and the answer tells it from an update (both 200).
    let (status, body) = host
        .call(
            put.clone(),
            "/v1/stores/acme-1",
            Some(json!({"config": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["change"], "unchanged", "{body}");

    host.append("acme-1", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("acme-1").await;
    let (_, list) = host.get("/v1/stores").await;
    assert_eq!(list["stores"][0]["id"], "acme-1");
    assert_eq!(list["stores"][0]["eventsProcessed"], 1);

    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/acme-1", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], "archived");
    let (status, _) = host.get("/v1/stores/acme-1").await;
    assert_eq!(status, 404);
    let archive = std::fs::read_dir(host.data_dir.join("archive"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    // Kept closed and compact: every WAL was checkpointed into its database when the store
    // stopped, so the archive holds the databases alone, and they hold the data.
    let mut kept: Vec<String> = std::fs::read_dir(archive.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        ["events.db", "files", "store.db"],
        "removed store's data is kept"
    );
    let events = rusqlite::Connection::open(archive.path().join("events.db")).unwrap();
    let logged: i64 = events
        .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
        .unwrap();
    assert_eq!(logged, 1, "the archived log holds the event");
    let (status, _) = host
        .call(reqwest::Method::DELETE, "/v1/stores/acme-1", None)
        .await;
    assert_eq!(status, 404);
}

/// Reads one HTTP/1.1 answer from `stream`: its status line and headers (lower-cased) and body.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read the answer");
        assert!(n > 0, "the connection closed before an answer");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|value| value.trim().parse().unwrap())
        .expect("answers carry a content-length");
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.expect("read the body");
        assert!(n > 0, "the connection closed inside the body");
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned();
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_before_the_body_was_read_closes_the_connection_and_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("tenant", "writer", &[]).await;
    let address = host.url.trim_start_matches("http://").to_owned();

    // A body read to its end keeps the connection alive for the next request.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let event = r#"{"type":"kv.put","payload":{"key":"a","value":1}}"#;
    let request = format!(
        "POST /v1/stores/tenant/events HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{event}",
        event.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_answer(&mut stream).await;
    assert!(head.starts_with("http/1.1 202"), "{head}{body}");
    assert!(!head.contains("connection: close"), "{head}");
    let health = format!("GET /health HTTP/1.1\r\nhost: {address}\r\n\r\n");
    stream.write_all(health.as_bytes()).await.unwrap();
    let (head, _) = read_answer(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "same connection: {head}");

    // An upload refused for its missing token, with most of its body still unsent: the answer
    // tells the client not to reuse the connection (a keep-alive client would otherwise send its
    // next request into a closing socket), and the server does close it.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "PUT /v1/plugins/sneaky HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/wasm\r\n\
         content-length: 1000000\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&[0u8; 4096]).await.unwrap();
    let (head, body) = read_answer(&mut stream).await;
    assert!(head.starts_with("http/1.1 401"), "{head}{body}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the server closes the connection");

    // The same through a pooling client: every request after a refused upload is answered.
    let writer = std::fs::read(programs::WRITER).unwrap();
    for _ in 0..20 {
        let (status, _) = host.upload_plugin_as("sneaky", writer.clone(), None).await;
        assert_eq!(status, 401);
        let (status, _) = host.get("/v1/plugins").await;
        assert_eq!(status, 200);
    }
}

/// A quota no store could run under — zero CPU per call, a database of 1 KiB, no burst — is
/// refused through the API as it is in a config file: 400 `invalid_quotas` naming each value
/// and what is accepted, and the store keeps the quotas it had (a new store is not created).
/// Values take the forms a config file takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_no_store_could_run_under_are_refused_with_what_is_accepted() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("steady", "writer", &[]).await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/steady",
            Some(json!({"quotas": {"cpu_ms_per_call": 0, "disk": 1024, "burst": 0}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_quotas", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    for expected in [
        "cpu_ms_per_call = 0",
        "at least 1",
        "disk = 1024",
        "at least 64KiB",
        "burst = 0",
    ] {
        assert!(message.contains(expected), "{expected:?} in {message}");
    }
    let (_, store) = host.get("/v1/stores/steady").await;
    assert_eq!(store["quotas"]["cpu_ms_per_call"], 1000, "{store}");
    assert_eq!(store["quotas"]["disk"], 1u64 << 30, "{store}");
    host.append("steady", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("steady").await;
    assert_eq!(host.query("steady", "count", json!({})).await["kv"], 1);

    // The forms a config file takes: sizes with units, fuel as "unmetered".
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/steady",
            Some(json!({"quotas": {"memory": "32MiB", "db_cache": "512KiB", "fuel_per_call": "unmetered"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["quotas"]["memory"], 32 << 20, "{body}");
    assert_eq!(body["quotas"]["db_cache"], 512 << 10, "{body}");
    assert!(body["quotas"]["fuel_per_call"].is_null(), "{body}");
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/steady",
            Some(json!({"quotas": {"disk": "lots"}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("lots") && message.contains("64MiB"),
        "{message}"
    );
    // Every refusal in one answer, each naming its quota and what it accepts, in a config
    // file's words (it was the first only, naming no quota: "invalid value: integer `-5`,
    // expected u32").
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/steady",
            Some(json!({"quotas": {"burst": -5, "memory": "x", "fuel": 1, "cpu_ms_per_call": 0}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_quotas", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    for expected in [
        "quotas.burst: integer `-5`, expected a whole number from 0 to 4294967295",
        "quotas.memory: string \"x\", expected a size",
        "\"64MiB\"",
        "quotas.fuel: unknown field `fuel`, expected one of",
        "cpu_ms_per_call = 0 is out of range",
        "nothing was changed",
    ] {
        assert!(message.contains(expected), "{expected:?} in {message}");
    }
    assert!(!message.contains("u32"), "{message}");

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/never",
            Some(json!({"plugin": "writer", "quotas": {"memory": 4096}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_quotas", "{body}");
    let (status, _) = host.get("/v1/stores/never").await;
    assert_eq!(status, 404, "a refused PUT creates nothing");
}

/// Requests the router itself refuses — a path segment that is not a number, a query string
/// that does not parse, a method a route does not take — answer with the same JSON envelope
/// as every other error, saying what was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_router_refuses_get_the_json_error_envelope() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("plain", "writer", &[]).await;
    let cases = [
        (
            reqwest::Method::POST,
            "/v1/stores/plain/dead-letters/abc/retry",
            400,
            "bad_request",
            "abc",
        ),
        (
            reqwest::Method::DELETE,
            "/v1/stores/plain?purge=yes",
            400,
            "bad_request",
            "purge",
        ),
        // A misspelt parameter archived the data it was meant to purge.
        (
            reqwest::Method::DELETE,
            "/v1/stores/plain?Purge=true",
            400,
            "bad_request",
            "unknown field `Purge`",
        ),
        (
            reqwest::Method::PUT,
            "/v1/stores/plain/backup?allowOtherStore=true",
            400,
            "invalid_query",
            "the only parameter is allowDifferentStore",
        ),
        (
            reqwest::Method::PATCH,
            "/v1/stores/plain",
            405,
            "method_not_allowed",
            "PATCH /v1/stores/plain",
        ),
    ];
    for (method, path, status, code, mentions) in cases {
        let (got, body) = host.call(method.clone(), path, None).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{method} {path}: {message}");
    }
    let (status, _) = host.get("/v1/stores/plain").await;
    assert_eq!(status, 200, "the refused DELETE removed nothing");
}

/// A store's plugin config is refused when a key the host gives a meaning to holds a value
/// the config file would refuse (`LLM_MAX_ITERATIONS` from 1 to 100), and a value of the
/// wrong type is named by its place in the body; either way the store keeps its config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_config_the_host_cannot_use_is_refused_naming_the_field() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("configured", "writer", &[("mode", "calm")])
        .await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/configured",
            Some(json!({"config": {"LLM_MAX_ITERATIONS": "0"}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("LLM_MAX_ITERATIONS") && message.contains("from 1 to 100"),
        "{message}"
    );

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/configured",
            Some(json!({"config": {"mode": 1}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_json", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`config.mode`") && message.contains("expected a string"),
        "{message}"
    );
    let (_, store) = host.get("/v1/stores/configured").await;
    assert_eq!(store["config"], json!({"mode": "calm"}), "{store}");

    // A body of another kind is named as such (serde named the Rust type it expected).
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/configured",
            Some(json!([{"plugin": "writer"}])),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"], "the request body must be a JSON object; it is an array",
        "{body}"
    );

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/configured",
            Some(json!({"config": {"LLM_MAX_ITERATIONS": "20"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["config"],
        json!({"LLM_MAX_ITERATIONS": "20"}),
        "{body}"
    );
}

/// Every field of `PUT /v1/stores/{id}` is optional, so is the body: none makes a store on the
/// defaults. The `Bearer` scheme is matched in any case, as HTTP's auth schemes are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_can_be_put_without_a_body_and_bearer_is_matched_in_any_case() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let response = host
        .client
        .put(format!("{}/v1/stores/bare-1", host.url))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["plugin"]["name"], "writer", "{body}");

    // The operator routes' own check too.
    let response = host
        .client
        .post(format!("{}/admin/reconcile", host.url))
        .header("authorization", format!("BEARER {TOKEN}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_ne!(status, 401, "{body}");
    let (status, _) = raw(
        &host,
        reqwest::Method::GET,
        "/v1/stores/bare-1",
        Some("x"),
        "",
    )
    .await;
    assert_eq!(status, 401, "a wrong token is still refused");
}

/// Serves `app` alone on a loopback port with `options`; answers its address.
async fn serve_alone(
    app: axum::Router,
    options: storehost_api::ServeOptions,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(storehost_api::serve(
        listener,
        app,
        options,
        std::future::pending(),
    ));
    address
}

/// A connection that sends nothing is closed after the header read timeout (before, only a
/// request that had begun was timed: 1,024 silent connections held every connection permit
/// and shut everyone out), and HTTP/2 is not spoken (one connection held 200 streams, each a
/// reader of a log with megabytes in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_and_http2_is_not_spoken() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let address = serve_alone(
        app,
        storehost_api::ServeOptions {
            header_read_timeout: std::time::Duration::from_millis(300),
            ..storehost_api::ServeOptions::default()
        },
    )
    .await;

    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(30), silent.read(&mut byte))
        .await
        .expect("the server closes a connection that sends nothing");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    let mut h2 = tokio::net::TcpStream::connect(address).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        h2.read_to_end(&mut answer),
    )
    .await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "an HTTP/2 preface gets no HTTP/2 answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(40)])
    );

    // A request that comes is answered as ever.
    let mut asking = tokio::net::TcpStream::connect(address).await.unwrap();
    asking
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut asking).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "hello");
}

/// One client address holds at most `max_connections_per_ip` connections: the next is
/// answered 503 `too_many_connections` (with what to do) and closed, and a place comes back
/// when one of its connections closes. Before, one client holding idle keep-alive connections
/// (asking for `/health` now and then, no token needed) could take all `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let address = serve_alone(
        app,
        storehost_api::ServeOptions {
            max_connections_per_ip: 2,
            ..storehost_api::ServeOptions::default()
        },
    )
    .await;
    let ask = |keep_alive: bool| async move {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let connection = if keep_alive { "keep-alive" } else { "close" };
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: {connection}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let answer = read_answer(&mut stream).await;
        (stream, answer)
    };

    let (first, (head, _)) = ask(true).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (_second, (head, _)) = ask(true).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (mut third, (head, body)) = ask(true).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_connections_per_ip"),
        "{body}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        third.read_to_end(&mut rest),
    )
    .await
    .expect("the refused connection is closed");
    assert!(closed.is_ok() && rest.is_empty(), "{closed:?} {rest:?}");

    // A connection that closes gives its place back.
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, (head, body)) = ask(false).await;
        if head.starts_with("http/1.1 200") {
            assert_eq!(body, "hello");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no place came back: {head}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A client that stops reading its answer loses the connection once a write has waited
/// `write_timeout` for it, and the host lets the answer go: before, the answer stayed in the
/// host's memory for as long as the client kept the connection (100 unread 16 MiB query
/// answers held 1.6 GB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_client_does_not_read_is_let_go() {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let app = axum::Router::new().route(
        "/big",
        axum::routing::get(move || {
            // The answer's chunks, 1 MiB each, holding `dropped_tx` until the host drops them.
            let guard = dropped_tx.lock().unwrap().take();
            let chunks = futures::stream::iter(0..64).map(move |_| {
                let _held = &guard;
                Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(vec![b'x'; 1 << 20]))
            });
            async move { axum::body::Body::from_stream(chunks) }
        }),
    );
    let address = serve_alone(
        app,
        storehost_api::ServeOptions {
            write_timeout: std::time::Duration::from_millis(300),
            ..storehost_api::ServeOptions::default()
        },
    )
    .await;

    let mut stalled = tokio::net::TcpStream::connect(address).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // The client reads no more, and keeps the connection open.
    tokio::time::timeout(std::time::Duration::from_secs(30), dropped)
        .await
        .expect("the unread answer is let go once its write times out")
        .unwrap_err();
    drop(stalled);
}

/// A request body that does not arrive in time gets 408 `body_too_slow` and the connection
/// goes: a client trickling a body held one of the host's connections for as long as it
/// liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("tenant", "writer", &[]).await;
    let address = host.url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /v1/stores/tenant/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"type\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (head, body) = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        read_answer(&mut stream),
    )
    .await
    .expect("an answer once the body's time is up");
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(body.contains("body_too_slow"), "{body}");
}

/// Store tokens' event streams across stores take at most half of the host's connections:
/// past that a stream gets 429 `too_many_followers` + `Retry-After`, and `/health`, the admin
/// API and other tenants keep their connections. Before, each store capped its own followers
/// (64) and two stores' streams took all 128 connections here: `/health` waited in the
/// kernel's backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_across_stores_leave_the_host_connections() {
    let mut api = None;
    let host = TestHost::start_configured(
        storehost_tests::TestHostOptions::default(),
        &[],
        |_, state| {
            api = Some(state.clone());
            state
        },
    )
    .await;
    host.deploy("writer", programs::WRITER).await;
    let mut tokens = Vec::new();
    for store in ["crowd-a", "crowd-b"] {
        host.add_store(store, "writer", &[]).await;
        tokens.push((store, host.issue_token(store).await.0));
    }
    let max_connections = 128;
    let address = serve_alone(
        storehost_api::app(api.unwrap().with_connection_limit(max_connections)),
        storehost_api::ServeOptions {
            max_connections,
            max_connections_per_ip: 0,
            ..storehost_api::ServeOptions::default()
        },
    )
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut streams = Vec::new();
    let mut refused = 0;
    for (store, token) in &tokens {
        for _ in 0..64 {
            let response = client
                .get(format!("http://{address}/v1/stores/{store}/events/stream"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                200 => streams.push(response),
                429 => {
                    assert!(response.headers().contains_key("retry-after"));
                    let body = response.text().await.unwrap();
                    assert!(body.contains("too_many_followers"), "{body}");
                    refused += 1;
                }
                other => panic!("stream of {store}: {other}"),
            }
        }
    }
    assert_eq!(streams.len(), max_connections / 2, "{refused} refused");
    let health = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.get(format!("http://{address}/health")).send(),
    )
    .await
    .expect("/health answers while the streams are open")
    .unwrap();
    assert_eq!(health.status(), 200);
    // A stream closed gives its place back.
    streams.pop();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (store, token) = &tokens[1];
    let again = client
        .get(format!("http://{address}/v1/stores/{store}/events/stream"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
}
