//! Serving the router from our own accept loop: a connection cap, a header read timeout, a
//! write timeout and a graceful shutdown with a deadline (`axum::serve` has none of them).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connection handling settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Most connections open at once; more wait in the accept queue.
    pub max_connections: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// How long a response may wait for the client to read it: a write to the connection
    /// that makes no progress this long closes it.
    pub write_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits up to the grace period for
/// open connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    // HTTP/1.1 only: hyper-util's automatic builder also spoke HTTP/2 (a dependency's feature
    // turned it on), whatever it was told, and one HTTP/2 connection held 200 streams, each a
    // reader of the log with megabytes in flight (helper 27: 1 GB of host memory). It also
    // waited for a connection's first bytes, to tell the versions apart, with no timeout:
    // 1,024 connections that sent nothing shut everyone out. hyper's HTTP/1 server times the
    // headers from the connection's start.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true)
        // Queued writes, never copied into hyper's own buffer: an answer's bytes hold their
        // place among the unread answers until written (see `crate::answers`), which a copy
        // would give back at once.
        .writev(true);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // A client that stops reading holds its response in the host's memory (a query's
        // answer may be 16 MiB; 100 unread ones took 1.6 GB): once a write has waited this
        // long for the client, the connection closes and the response is let go.
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(options.write_timeout));
        // The peer address reaches handlers as `ConnectInfo` (per-source webhook rate limits).
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let service = TowerToHyperService::new(app);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
            if let Err(err) = watcher.watch(connection).await {
                tracing::debug!("connection ended with an error: {err}");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "some connections were still open {} ms after shutdown began; closing them",
            options.shutdown_grace.as_millis()
        );
    }
}
