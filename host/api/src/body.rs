//! Request bodies: size-limited, parsed as JSON, with errors that say what was wrong.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON body of at most `http.max_body_bytes`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A JSON body of at most `http.max_body_bytes`, or `T::default()` when the body is empty
/// (a request whose every field is optional).
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

/// The bytes of a non-empty body of at most `http.max_body_bytes`, for a route that parses
/// its JSON itself (borrowing from the bytes rather than building a `Value` first).
#[derive(Debug)]
pub struct JsonBytes(pub bytes::Bytes);

/// A raw body of at most `http.max_body_bytes` (plugin uploads).
#[derive(Debug)]
pub struct RawBody(pub bytes::Bytes);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let JsonBytes(bytes) = JsonBytes::from_request(req, state).await?;
        parse(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_limited(
            req.into_body(),
            state.max_body_bytes,
            "send less per request, or raise [http] max_body_bytes",
        )
        .await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse(&bytes).map(OptionalJsonBody)
    }
}

/// Parses a JSON object body, naming the place of a value of the wrong kind.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|err| {
        let field = err.path().to_string();
        let err = err.into_inner();
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if err.is_data() && first != Some(&b'{') {
            // Serde would name the Rust type it expected, or read an array as the fields in
            // order.
            let given = match first {
                Some(b'[') => "an array",
                Some(b'"') => "a string",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                _ => "a number",
            };
            ApiError::bad_request(
                "invalid_json",
                format!("the request body must be a JSON object; it is {given}"),
            )
        } else if field == "." || err.is_syntax() || err.is_eof() {
            invalid_json(&err)
        } else {
            ApiError::bad_request(
                "invalid_json",
                format!("the request body is not valid at `{field}`: {err}"),
            )
        }
    })?;
    json.end().map_err(|err| invalid_json(&err))?;
    Ok(value)
}

impl FromRequest<AppState> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_limited(
            req.into_body(),
            state.max_body_bytes,
            "send less per request (batch events across requests), or raise [http] max_body_bytes",
        )
        .await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_json",
                "the request body is empty; send a JSON object",
            ));
        }
        Ok(JsonBytes(bytes))
    }
}

/// The answer to a body that is not JSON at all.
pub(crate) fn invalid_json(err: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "invalid_json",
        format!("the request body is not valid: {err}"),
    )
}

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_limited(
            req.into_body(),
            state.max_plugin_bytes,
            "a plugin component must be smaller; strip debug info (e.g. `wasm-tools strip`) or build in release mode",
        )
        .await
        .map(RawBody)
    }
}

/// How long a body of `limit` bytes may take to arrive: 30 s, and a second more per MiB it
/// may hold. A client trickling a body (or sending none after its headers) held its
/// connection, one of `max_connections`, for as long as it liked.
fn body_deadline(limit: usize) -> std::time::Duration {
    std::time::Duration::from_secs(30 + (limit >> 20) as u64)
}

/// The body, up to `limit` bytes, once it has arrived within [`body_deadline`] (else 408
/// `body_too_slow`); the inner error is `Limited`'s: too large, or unreadable.
pub(crate) async fn collect_within(
    body: Body,
    limit: usize,
) -> Result<Result<bytes::Bytes, axum::BoxError>, ApiError> {
    let deadline = body_deadline(limit);
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Ok(collected) => Ok(collected.map(http_body_util::Collected::to_bytes)),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_too_slow",
            format!(
                "the request body did not arrive within {} s; send it at once",
                deadline.as_secs()
            ),
        )),
    }
}

/// The body, up to `limit` bytes; a larger one is refused with `what_to_do`.
async fn read_limited(
    body: Body,
    limit: usize,
    what_to_do: &str,
) -> Result<bytes::Bytes, ApiError> {
    match collect_within(body, limit).await? {
        Ok(bytes) => Ok(bytes),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes; {what_to_do}"),
        )),
        Err(err) => Err(ApiError::bad_request(
            "body_unreadable",
            format!("could not read the request body: {err}"),
        )),
    }
}
