//! The HTTP side of `storehost ctl`: requests with the admin token, and every failure sorted
//! into the exit code it means.

use std::time::Duration;

use reqwest::Method;
use reqwest::blocking::{RequestBuilder, Response};
use serde_json::Value;

/// How long a plain request may take (backups, restores, uploads and tails have no limit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event stream may stay silent: the server sends a keep-alive every 15 s, so a
/// stream silent for three of them has a server frozen (stopped, deadlocked) or a proxy
/// holding a dead connection open, and is dropped and opened again.
const STREAM_SILENT_FOR: Duration = Duration::from_secs(45);

/// Why a `ctl` command failed, by exit code.
#[derive(Debug)]
pub enum CtlError {
    /// Exit 2: the command line, the token or a local file is wrong.
    Usage(String),
    /// Exit 1: the server answered with an error.
    Refused {
        /// HTTP status.
        status: u16,
        /// The error's code (`store_not_found`, …).
        code: String,
        /// The error's message.
        message: String,
    },
    /// Exit 1: the server answered something that is not storehost's API.
    BadAnswer(String),
    /// Exit 3: the server cannot be reached.
    Unreachable(String),
    /// Exit 1: some items of a command on many (stores added at once) were refused; each
    /// was reported already.
    Partial(String),
}

impl CtlError {
    /// The process exit code of this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused { .. } | CtlError::BadAnswer(_) | CtlError::Partial(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Unreachable(_) => 3,
        }
    }
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlError::Usage(message)
            | CtlError::BadAnswer(message)
            | CtlError::Partial(message) => f.write_str(message),
            CtlError::Refused {
                status,
                code,
                message,
            } => write!(f, "{code}: {message} (HTTP {status})"),
            CtlError::Unreachable(message) => f.write_str(message),
        }
    }
}

/// The admin API of one server.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
    /// For event streams: each read waits at most [`STREAM_SILENT_FOR`].
    streams: reqwest::blocking::Client,
}

impl Client {
    /// A client of the server at `server` (`http://host:port`) using `token`.
    pub fn new(server: &str, token: String) -> Result<Self, CtlError> {
        let base = server.trim().trim_end_matches('/').to_owned();
        let rest = base.strip_prefix("http://").ok_or_else(|| {
            CtlError::Usage(format!(
                "--server {server:?} must be an http:// URL like http://127.0.0.1:8080 (put a TLS-terminating proxy in front for https)"
            ))
        })?;
        if rest.is_empty() || rest.contains(['/', '?', '#']) {
            return Err(CtlError::Usage(format!(
                "--server {server:?} must be the server's base URL, like http://127.0.0.1:8080"
            )));
        }
        // A blocking client's own timeout bounds each wait (for the answer, for each read of
        // its body) rather than the whole request: none for transfers of any length, the
        // silence a stream may keep for streams.
        let client = |timeout: Option<Duration>| {
            reqwest::blocking::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(timeout)
                .build()
                .map_err(|err| CtlError::Usage(format!("cannot set up the HTTP client: {err}")))
        };
        Ok(Self {
            base,
            token,
            http: client(None)?,
            streams: client(Some(STREAM_SILENT_FOR))?,
        })
    }

    /// `method path` with the admin token for an event stream: a read waiting longer than
    /// [`STREAM_SILENT_FOR`] fails, ending the stream.
    pub fn stream_request(&self, method: Method, path: &str) -> RequestBuilder {
        self.streams
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// `method path` with the admin token, no timeout (for long transfers and streams).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends `request`; a non-2xx answer becomes [`CtlError::Refused`].
    pub fn send(&self, request: RequestBuilder) -> Result<Response, CtlError> {
        let response = request.send().map_err(|err| self.transport_error(&err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().unwrap_or_default();
        let parsed: Option<(String, String)> =
            serde_json::from_str::<Value>(&text).ok().and_then(|body| {
                let error = body.get("error")?;
                Some((
                    error.get("code")?.as_str()?.to_owned(),
                    error.get("message")?.as_str()?.to_owned(),
                ))
            });
        let (code, message) = parsed.unwrap_or_else(|| {
            let mut text = text.trim().to_owned();
            text.truncate(300);
            (
                format!("http_{}", status.as_u16()),
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    text
                },
            )
        });
        Err(CtlError::Refused {
            status: status.as_u16(),
            code,
            message: with_ctl_commands(&message),
        })
    }

    /// `method path` with an optional JSON body; answers the JSON the server sent.
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CtlError> {
        let mut request = self.request(method, path).timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request)?;
        let text = response.text().map_err(|err| self.transport_error(&err))?;
        serde_json::from_str(&text).map_err(|err| {
            CtlError::BadAnswer(format!(
                "the server at {} answered something that is not storehost's JSON ({err}); is --server right?",
                self.base
            ))
        })
    }

    /// What a failed request means for the user.
    pub fn transport_error(&self, err: &reqwest::Error) -> CtlError {
        let mut detail = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            detail.push_str(": ");
            detail.push_str(&cause.to_string());
            source = cause.source();
        }
        if err.is_builder() {
            return CtlError::Usage(format!("invalid request: {detail}"));
        }
        if err.is_decode() {
            return CtlError::BadAnswer(format!("the server's answer could not be read: {detail}"));
        }
        CtlError::Unreachable(format!(
            "cannot reach the server at {}: {detail}; is `storehost serve` running there? (set --server or STOREHOST_URL)",
            self.base
        ))
    }
}

/// A server message with its API hints put as the ctl commands that do the same, for a ctl
/// user (it told them to `PUT /v1/stores/ID`): `PUT /v1/stores/ID` becomes `storehost ctl
/// stores add ID` (`… with {"quotas":{"NAME":…}}` adding `--quota NAME=…`), and `DELETE
/// /v1/stores/ID` becomes `storehost ctl stores remove ID`. Other paths stay as they are.
pub(crate) fn with_ctl_commands(message: &str) -> String {
    const HINTS: [(&str, &str); 2] = [
        ("PUT /v1/stores/", "storehost ctl stores add"),
        ("DELETE /v1/stores/", "storehost ctl stores remove"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((at, path, command)) = HINTS
        .iter()
        .filter_map(|(path, command)| rest.find(path).map(|at| (at, *path, *command)))
        .min_by_key(|(at, ..)| *at)
    {
        let after = &rest[at + path.len()..];
        // A store id, or a placeholder such as `<id>`.
        let id_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '<' | '>')))
            .unwrap_or(after.len());
        let (id, tail) = after.split_at(id_len);
        if id.is_empty() || tail.starts_with(['/', '?']) {
            // Another route (`/v1/stores/ID/backup`…): no one command to name.
            out.push_str(&rest[..at + path.len()]);
            rest = after;
            continue;
        }
        out.push_str(&rest[..at]);
        out.push_str(command);
        out.push(' ');
        out.push_str(id);
        rest = tail;
        if command.ends_with("add")
            && let Some((quota, tail)) = rest
                .strip_prefix(" with {\"quotas\":{\"")
                .and_then(|quota| quota.split_once("\":…}}"))
            && !quota.contains(['"', ' '])
        {
            out.push_str(&format!(" --quota {quota}=…"));
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API's hints, as the server words them, reach a ctl user as ctl commands.
    #[test]
    fn api_hints_become_ctl_commands() {
        assert_eq!(
            with_ctl_commands(
                "store \"nope-1\" does not exist on this host; create it with PUT /v1/stores/nope-1"
            ),
            "store \"nope-1\" does not exist on this host; create it with storehost ctl stores add nope-1"
        );
        assert_eq!(
            with_ctl_commands(
                "fix the cause, then PUT /v1/stores/s_1 (or restart the host) to start it again, or DELETE /v1/stores/s_1"
            ),
            "fix the cause, then storehost ctl stores add s_1 (or restart the host) to start it again, or storehost ctl stores remove s_1"
        );
        assert_eq!(
            with_ctl_commands(
                "raise the store's event_log quota (PUT /v1/stores/abc with {\"quotas\":{\"event_log\":…}} or in its config), then send them again"
            ),
            "raise the store's event_log quota (storehost ctl stores add abc --quota event_log=… or in its config), then send them again"
        );
        assert_eq!(
            with_ctl_commands("raise them (through PUT /v1/stores/<id>, or in the config file)"),
            "raise them (through storehost ctl stores add <id>, or in the config file)"
        );
        for untouched in [
            "restore with PUT /v1/stores/abc/backup",
            "GET /v1/stores/abc",
            "PUT /v1/stores/?x",
            "a PUT starts it",
        ] {
            assert_eq!(with_ctl_commands(untouched), untouched);
        }
    }
}
