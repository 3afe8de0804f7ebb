//! Correlation ids: every request carries one, from the caller's `X-Request-Id` (when it is a
//! sensible token) or made up here. It is echoed in the answer, kept on the events the request
//! appends, and set on the log lines of everything done for it — down to the plugin's own
//! `log` calls while it processes those events or answers its query.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header that carries the correlation id, both ways.
pub const HEADER: &str = "x-request-id";

/// The longest caller-given id kept; a longer or odd one is replaced by a fresh id.
const MAX_LEN: usize = 128;

/// The request's correlation id (an extension every handler can read).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Middleware: takes or makes the request's id, runs the request in a span carrying it and
/// answers with it in `X-Request-Id`.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_acceptable(value))
        .map_or_else(fresh, str::to_owned);
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

/// A caller's id is kept when it is 1 to 128 characters of `[A-Za-z0-9._:-]` (what tracing
/// systems send), so it can never break a log line or a header.
fn is_acceptable(value: &str) -> bool {
    (1..=MAX_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn fresh() -> String {
    use rand::Rng;
    format!("req-{:016x}", rand::rng().random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_are_taken_from_the_caller() {
        assert!(is_acceptable("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(is_acceptable("trace-1:span.2_x"));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable("two words"));
        assert!(!is_acceptable("line\nbreak"));
        assert!(!is_acceptable(&"a".repeat(MAX_LEN + 1)));
        assert!(fresh().starts_with("req-") && is_acceptable(&fresh()));
    }
}
