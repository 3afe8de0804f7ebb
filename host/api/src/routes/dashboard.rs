//! `GET /`: the operator dashboard, one self-contained HTML page (no build step, nothing loaded
//! from elsewhere). The page is public; the data it shows comes from `GET /health` (public) and
//! `GET /v1/stores` (admin token, which the page asks for and keeps in `sessionStorage`).

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page, embedded in the binary.
const PAGE: &str = include_str!("dashboard.html");

/// Only inline script and style of the page itself, fetches to this host, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}
