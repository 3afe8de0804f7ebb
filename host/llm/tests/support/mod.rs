//! A real local HTTP server speaking the OpenAI chat-completions protocol, scripted per test:
//! the vendor boundary of the LLM provider, on 127.0.0.1.

#![allow(dead_code)] // Each test file uses a different part.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// What the server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A status and a JSON body.
    Json(u16, Value),
    /// A status, one extra header and a JSON body.
    JsonWithHeader(u16, &'static str, &'static str, Value),
    /// A status and a body that is not JSON.
    Text(u16, &'static str),
    /// Never answers (sleeps far beyond any test's deadline).
    Hang,
    /// Answers 200 with this body once the test releases it ([`FakeLlm::release`]).
    Gated(Value),
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

struct ServerState {
    script: Vec<Reply>,
    received: Mutex<Vec<Received>>,
    gate: Semaphore,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The running server; it stops when dropped.
pub struct FakeLlm {
    /// `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    /// Serves `script`: the n-th request gets the n-th reply; the last reply repeats.
    pub async fn start(script: Vec<Reply>) -> Self {
        assert!(!script.is_empty(), "a script needs at least one reply");
        let state = Arc::new(ServerState {
            script,
            received: Mutex::new(Vec::new()),
            gate: Semaphore::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base_url: format!("http://{address}/v1"),
            state,
            task,
        }
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// The most requests the server was answering at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Lets `n` [`Reply::Gated`] answers go.
    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// Waits (up to a generous safety net) until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let wait = async {
            while self.count() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("the server got {} requests, expected {n}", self.count()));
    }
}

/// Counts a request as in flight until dropped (also when the client gives up).
struct InFlight<'s>(&'s ServerState);

impl<'s> InFlight<'s> {
    fn enter(state: &'s ServerState) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&state);
    let index = {
        let mut received = state.received.lock().unwrap();
        received.push(Received {
            path: uri.path().to_owned(),
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        received.len() - 1
    };
    if uri.path() != "/v1/chat/completions" {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"message": format!("no route {}", uri.path())}})),
        )
            .into_response();
    }
    let reply = state.script[index.min(state.script.len() - 1)].clone();
    let status = |code: u16| StatusCode::from_u16(code).unwrap();
    match reply {
        Reply::Json(code, body) => (status(code), axum::Json(body)).into_response(),
        Reply::JsonWithHeader(code, name, value, body) => {
            let mut response = (status(code), axum::Json(body)).into_response();
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static(value));
            response
        }
        Reply::Text(code, text) => (status(code), text).into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Reply::Gated(body) => {
            state.gate.acquire().await.unwrap().forget();
            (StatusCode::OK, axum::Json(body)).into_response()
        }
    }
}

/// A chat-completions answer with `content` and `tool_calls` (OpenAI shape).
pub fn completion(content: Option<&str>, tool_calls: Value) -> Value {
    let has_calls = tool_calls.as_array().is_some_and(|calls| !calls.is_empty());
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "test-model-0613",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "tool_calls": tool_calls},
            "finish_reason": if has_calls { "tool_calls" } else { "stop" },
        }],
        "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49},
    })
}

/// A plain text answer.
pub fn text(content: &str) -> Value {
    completion(Some(content), json!([]))
}
