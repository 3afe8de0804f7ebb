//! Serving the router from our own accept loop: a connection cap (also per client address),
//! a header read timeout, a write timeout and a graceful shutdown with a deadline
//! (`axum::serve` has none of them).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
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
    /// Most connections open at once from one client address (an IPv6 address's /64); more
    /// are answered 503 `too_many_connections` and closed. 0: no cap per address (behind a
    /// reverse proxy, every client has the proxy's address).
    pub max_connections_per_ip: usize,
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
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// `max_connections_per_ip` unless set: a quarter of the default `max_connections`, so one
/// client (holding idle keep-alive connections, say, each asking for `/health` now and then)
/// cannot take every connection the host serves.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;

/// Connections over their address's cap being answered at once; more are closed unanswered.
const MAX_REFUSALS: usize = 64;

/// The longest a refused connection is kept for its answer.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

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
    let per_address = PerAddress::default();
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
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
        let slot = match options.max_connections_per_ip {
            0 => None,
            max => match per_address.take(peer.ip(), max) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!("{peer}: refused, {max} connections from its address are open");
                    // Its refusal holds none of `max_connections`, and only one of a few places
                    // (else the connection is just closed): refusing must not be a way to
                    // take the connections this cap keeps for others.
                    drop(permit);
                    if let Ok(place) = refusals.clone().try_acquire_owned() {
                        refuse(&builder, stream, max, options.header_read_timeout, place);
                    }
                    continue;
                }
            },
        };
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
            drop((permit, slot));
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

/// Answers the one request of a connection over its address's cap with 503
/// `too_many_connections` (through hyper, so the request is read and the client sees the
/// answer rather than a reset), then closes it.
fn refuse(
    builder: &hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    max: usize,
    timeout: Duration,
    place: tokio::sync::OwnedSemaphorePermit,
) {
    let message = format!(
        "{max} connections from this address are open to the host already (its [http] \
         max_connections_per_ip): reuse them (keep-alive) or close some, then retry. Behind a \
         reverse proxy every client has the proxy's address: raise the cap, or set it to 0"
    );
    let app = Router::new().fallback(move || async move {
        let mut response = crate::error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            message,
        )
        .retry_after(1)
        .into_response();
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        response
    });
    let mut builder = builder.clone();
    builder.keep_alive(false);
    tokio::spawn(async move {
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
        // Its whole time is bounded: a client that sends nothing, or reads nothing, goes.
        let _ = tokio::time::timeout(timeout.min(REFUSAL_TIME), connection).await;
        drop(place);
    });
}

/// The connections open from each client address, against `max_connections_per_ip`.
#[derive(Clone, Default)]
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place in its address's count, given back when dropped.
struct AddressSlot {
    table: PerAddress,
    address: IpAddr,
}

impl PerAddress {
    /// A place for one more connection from `ip`, unless `max` are open from its address.
    fn take(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let address = client_address(ip);
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(address).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The address a connection counts against: an IPv4 address (also one mapped into IPv6), or
/// an IPv6 address's /64, which one client is commonly given whole.
fn client_address(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_cap_and_gets_places_back() {
        let table = PerAddress::default();
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let first = table.take(one, 2).unwrap();
        let _second = table.take(one, 2).unwrap();
        assert!(table.take(one, 2).is_none());
        assert!(table.take(other, 2).is_some(), "another address is apart");
        drop(first);
        assert!(table.take(one, 2).is_some());
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64_and_a_mapped_ipv4_as_itself() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_address(a), client_address(b));
        assert_ne!(
            client_address(a),
            client_address("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            client_address("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
