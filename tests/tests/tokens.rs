//! Store tokens against every route of the API: a token of store A reaches A's tenant routes
//! (events, stream, queries, tasks, dead letters) exactly as the admin token does, and nothing
//! else: not B's, not an admin route, not the operations or webhook routes. Revoked, forged and
//! missing tokens reach nothing. Tokens are stored hashed and survive a restart.

use reqwest::Method;
use serde_json::{Value, json};
use storehost_control::StoreSource;
use storehost_store::StoreId;
use storehost_tests::control::{ControlHostOptions, with_webhooks};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// A store's tenant route: the admin token or a token of that store.
    Tenant,
    /// The admin token only (the operations and webhook routes have their own credentials,
    /// never a store token).
    Admin,
    /// Anyone (`/health`, `/metrics`, the dashboard).
    Public,
}

/// Every route of the API, written as the router declares it (`{id}` is the store).
/// `every_route_of_the_router_is_in_the_table` keeps this list complete.
const ROUTES: &[(&str, &str, Access)] = &[
    ("POST", "/v1/stores/{id}/events", Access::Tenant),
    ("GET", "/v1/stores/{id}/events", Access::Tenant),
    ("GET", "/v1/stores/{id}/events/stream", Access::Tenant),
    ("GET", "/v1/stores/{id}/query/{name}", Access::Tenant),
    ("GET", "/v1/stores/{id}/tasks", Access::Tenant),
    ("GET", "/v1/stores/{id}/dead-letters", Access::Tenant),
    (
        "POST",
        "/v1/stores/{id}/dead-letters/{seq}/retry",
        Access::Tenant,
    ),
    ("GET", "/v1/stores", Access::Admin),
    ("GET", "/v1/stores/{id}", Access::Admin),
    ("PUT", "/v1/stores/{id}", Access::Admin),
    ("DELETE", "/v1/stores/{id}", Access::Admin),
    ("POST", "/v1/stores/{id}/pause", Access::Admin),
    ("POST", "/v1/stores/{id}/resume", Access::Admin),
    ("POST", "/v1/stores/{id}/tokens", Access::Admin),
    ("GET", "/v1/stores/{id}/tokens", Access::Admin),
    ("DELETE", "/v1/stores/{id}/tokens/{token_id}", Access::Admin),
    ("GET", "/v1/stores/{id}/backup", Access::Admin),
    ("PUT", "/v1/stores/{id}/backup", Access::Admin),
    ("GET", "/v1/plugins", Access::Admin),
    ("PUT", "/v1/plugins/{name}", Access::Admin),
    ("GET", "/stores", Access::Admin),
    ("POST", "/admin/reconcile", Access::Admin),
    ("POST", "/webhooks/workspaces", Access::Admin),
    ("GET", "/health", Access::Public),
    ("GET", "/metrics", Access::Public),
    ("GET", "/", Access::Public),
];

/// `template` with store `store` and fitting values for the other parameters.
fn concrete(template: &str, store: &str) -> String {
    let name = if template.starts_with("/v1/plugins") {
        "writer"
    } else {
        "count"
    };
    template
        .replace("{id}", store)
        .replace("{name}", name)
        .replace("{seq}", "1")
        .replace("{token_id}", "1")
}

/// A request body fitting the route (the body never matters for a refused request).
fn body_for(method: &str, path: &str) -> Vec<u8> {
    match (method, path.rsplit('/').next().unwrap_or_default()) {
        ("POST", "events") => {
            br#"{"type":"kv.put","payload":{"key":"from-token","value":1}}"#.to_vec()
        }
        ("PUT", "writer") => std::fs::read(programs::WRITER).unwrap(),
        ("POST", "workspaces") => {
            br#"{"event":"workspace.created","instanceId":"ws-1","userId":"u","timestamp":"2026-01-01T00:00:00Z"}"#.to_vec()
        }
        ("PUT", _) | ("POST", _) => b"{}".to_vec(),
        _ => Vec::new(),
    }
}

/// `method path` with `token`; answers status and the JSON body (`Null` for a stream, which is
/// not read past its headers). A fresh connection each time: a refused upload is answered
/// before its body is read, after which the server closes that connection.
async fn call(host: &TestHost, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut request = client
        .request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", host.url),
        )
        .header("content-type", "application/json")
        .body(body_for(method, path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if path.ends_with("/stream") && status == 200 {
        return (status, Value::Null);
    }
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_error(status: u16, body: &Value, allowed: &[u16], code: &str, what: &str) {
    assert!(allowed.contains(&status), "{what}: got {status} {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: the standard error JSON: {body}"
    );
    if !code.is_empty() {
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
    }
}

async fn create_token(host: &TestHost, store: &str) -> (u64, String) {
    let (status, body) = host
        .post(&format!("/v1/stores/{store}/tokens"), json!({}))
        .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_u64().unwrap(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

/// A host with the `writer` plugin and webhooks configured (so every route answers as in
/// production: the webhook route refuses a bearer token with 401).
async fn host() -> TestHost {
    TestHost::start_control(ControlHostOptions::default(), |orchestrator, state| {
        with_webhooks(orchestrator, state, "webhook-secret", 10_000)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_token_reaches_its_stores_tenant_routes_and_nothing_else() {
    let host = host().await;
    host.add_store("tok-a", "writer", &[]).await;
    host.add_store("tok-b", "writer", &[]).await;
    host.append("tok-b", "kv.put", json!({"key": "b", "value": 1}))
        .await;
    let (_, token_a) = create_token(&host, "tok-a").await;
    assert!(token_a.starts_with("sht_"), "{token_a}");

    for &(method, template, access) in ROUTES {
        let own = concrete(template, "tok-a");
        let other = concrete(template, "tok-b");
        let what = format!("{method} {own}");
        match access {
            Access::Tenant => {
                let (admin_status, admin_body) = call(&host, method, &own, Some(TOKEN)).await;
                let (status, body) = call(&host, method, &own, Some(&token_a)).await;
                assert_eq!(
                    status, admin_status,
                    "{what}: the store token gets what the admin token gets ({admin_body}); got {body}"
                );
                assert!(status != 401 && status != 403, "{what}: {status} {body}");
                let (status, body) = call(&host, method, &other, Some(&token_a)).await;
                assert_error(
                    status,
                    &body,
                    &[403],
                    "forbidden",
                    &format!("{method} {other}"),
                );
            }
            Access::Admin => {
                let (status, body) = call(&host, method, &own, Some(&token_a)).await;
                assert_error(status, &body, &[401, 403], "", &what);
                if own.starts_with("/v1/") {
                    assert_eq!(body["error"]["code"], "forbidden", "{what}: {body}");
                }
                if own != other {
                    let (status, body) = call(&host, method, &other, Some(&token_a)).await;
                    assert_error(status, &body, &[401, 403], "", &format!("{method} {other}"));
                }
            }
            Access::Public => {
                let (status, body) = call(&host, method, &own, Some(&token_a)).await;
                assert_eq!(status, 200, "{what} is public: {body}");
            }
        }
    }

    // Nothing the refused requests asked for happened.
    let (status, a) = host.get("/v1/stores/tok-a").await;
    assert_eq!(status, 200, "store A still runs: {a}");
    assert_eq!(a["state"], "running", "{a}");
    let (_, b) = host.get("/v1/stores/tok-b/events").await;
    assert_eq!(b["events"].as_array().unwrap().len(), 1, "{b}");
    let (_, tokens) = host.get("/v1/stores/tok-a/tokens").await;
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 1, "{tokens}");
    let (_, tokens_b) = host.get("/v1/stores/tok-b/tokens").await;
    assert_eq!(tokens_b["tokens"], json!([]), "{tokens_b}");
    // And the ones it was allowed did: its event was appended to A.
    host.settle("tok-a").await;
    let (_, events) = host.get("/v1/stores/tok-a/events").await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["payload"]["key"] == "from-token"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_forged_and_missing_tokens_reach_nothing() {
    let host = host().await;
    host.add_store("tok-a", "writer", &[]).await;
    let (id, token) = create_token(&host, "tok-a").await;
    let (status, _) = call(&host, "GET", "/v1/stores/tok-a/events", Some(&token)).await;
    assert_eq!(status, 200);

    let (status, body) = host
        .call(
            Method::DELETE,
            &format!("/v1/stores/tok-a/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = host
        .call(
            Method::DELETE,
            &format!("/v1/stores/tok-a/tokens/{id}"),
            None,
        )
        .await;
    assert_error(status, &body, &[404], "token_not_found", "revoking twice");

    let forged = format!("sht_{}_{}", id + 1, "f".repeat(64));
    for (label, token) in [
        ("revoked", Some(token.as_str())),
        ("forged", Some(forged.as_str())),
        ("none", None),
    ] {
        for &(method, template, access) in ROUTES {
            let path = concrete(template, "tok-a");
            let (status, body) = call(&host, method, &path, token).await;
            if access == Access::Public {
                assert_eq!(status, 200, "{label} token, {method} {path}: {body}");
                continue;
            }
            assert_error(
                status,
                &body,
                &[401],
                "unauthorized",
                &format!("{label} token, {method} {path}"),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_listed_without_their_secret_and_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let options = TestHostOptions {
        data_dir: Some(data.path().join("data")),
        ..TestHostOptions::default()
    };
    let host =
        TestHost::start_configured(options.clone(), &[("writer", programs::WRITER)], |_, s| s)
            .await;
    host.add_store("keep", "writer", &[]).await;
    let (kept_id, kept) = create_token(&host, "keep").await;
    let (revoked_id, revoked) = create_token(&host, "keep").await;
    let (status, _) = host
        .call(
            Method::DELETE,
            &format!("/v1/stores/keep/tokens/{revoked_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (_, listed) = host.get("/v1/stores/keep/tokens").await;
    let listed = listed["tokens"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], kept_id);
    assert!(listed[0]["createdAt"].as_i64().unwrap() > 0);
    assert!(listed[0].get("token").is_none(), "{listed:?}");
    let host_db = std::fs::read(data.path().join("data/host.db")).unwrap();
    let secret = kept.rsplit('_').next().unwrap();
    assert!(
        !String::from_utf8_lossy(&host_db).contains(secret),
        "host.db must not hold the token"
    );
    host.stop().await;

    let host = TestHost::start_configured(options, &[("writer", programs::WRITER)], |_, s| s).await;
    host.orchestrator.restore_persisted().await.unwrap();
    let (status, body) = call(&host, "POST", "/v1/stores/keep/events", Some(&kept)).await;
    assert_eq!(status, 202, "the kept token works after a restart: {body}");
    let (status, body) = call(&host, "GET", "/v1/stores/keep/events", Some(&revoked)).await;
    assert_error(
        status,
        &body,
        &[401],
        "unauthorized",
        "revoked before the restart",
    );
    let (_, listed) = host.get("/v1/stores/keep/tokens").await;
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 1);

    // Removing the store revokes its tokens: a store created again under the id is a new tenant.
    let (status, _) = host.call(Method::DELETE, "/v1/stores/keep", None).await;
    assert_eq!(status, 200);
    host.orchestrator
        .ensure_running(
            &StoreId::new("keep").unwrap(),
            host.orchestrator.settings().defaults.clone(),
            StoreSource::Api,
        )
        .await
        .unwrap();
    let (status, body) = call(&host, "GET", "/v1/stores/keep/events", Some(&kept)).await;
    assert_error(
        status,
        &body,
        &[401],
        "unauthorized",
        "token of a removed store",
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_token_for_an_unknown_store_is_refused() {
    let host = TestHost::start().await;
    let (status, body) = host.post("/v1/stores/nobody/tokens", json!({})).await;
    assert_error(
        status,
        &body,
        &[404],
        "store_not_found",
        "token for a missing store",
    );
    let (status, body) = host.post("/v1/stores/x/tokens", json!({})).await;
    assert_error(
        status,
        &body,
        &[400],
        "invalid_store_id",
        "token for an invalid id",
    );
}

/// The route table above covers the router: every path `host/api/src/lib.rs` declares is in it
/// (so a new route is checked against store tokens as soon as it exists).
#[test]
fn every_route_of_the_router_is_in_the_table() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../host/api/src/lib.rs"
    ))
    .unwrap();
    let declared: std::collections::BTreeSet<&str> = source
        .split(".route(")
        .skip(1)
        .filter_map(|call| {
            let start = call.find('"')? + 1;
            let end = start + call[start..].find('"')?;
            Some(&call[start..end])
        })
        .collect();
    assert!(
        declared.len() >= 20,
        "the router's routes were not found: {declared:?}"
    );
    let tested: std::collections::BTreeSet<&str> = ROUTES.iter().map(|r| r.1).collect();
    let missing: Vec<_> = declared.difference(&tested).collect();
    assert!(
        missing.is_empty(),
        "routes without a row in ROUTES (add them with their access): {missing:?}"
    );
}
