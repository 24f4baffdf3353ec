//! The HTTP server: an accept loop with a cap on open connections, and per
//! connection the timeouts that keep a slow or idle client from holding a
//! socket forever.
//!
//! A connection is in one of three states, each with its own clock:
//! - waiting for a request, nothing of it received yet: closed after
//!   `idle_timeout` (counted from the accept, or from the previous answer);
//! - part of a request head received: closed if the whole head has not
//!   arrived `header_read_timeout` after its first byte;
//! - a request being answered (its body read, the handler run): answered
//!   `408 request_timeout` after `request_timeout`, and the connection closed.
//!
//! Past `connections_max` open connections a new one is closed at once
//! (counted, and logged at most once per ten seconds); the others keep being
//! served. After `requests_per_connection_max` requests a connection's last
//! answer says `Connection: close`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

use crate::ApiError;

/// Connections open now.
pub const CONNECTIONS_OPEN: &str = "tally_http_connections_open";
/// Connections closed at once because `connections_max` were open.
pub const CONNECTIONS_REFUSED: &str = "tally_http_connections_refused_total";
/// Connections the server closed, by `reason`: `header_timeout`,
/// `idle_timeout`.
pub const CONNECTIONS_DROPPED: &str = "tally_http_connections_dropped_total";
/// Requests answered 408 after `request_timeout`.
pub const REQUEST_TIMEOUTS: &str = "tally_http_request_timeouts_total";

pub fn describe_metrics() {
    metrics::describe_gauge!(CONNECTIONS_OPEN, "HTTP connections open");
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "HTTP connections closed at once because the connection cap was reached"
    );
    metrics::describe_counter!(
        CONNECTIONS_DROPPED,
        "HTTP connections closed by the server for a slow request head or idleness, by reason"
    );
    metrics::describe_counter!(
        REQUEST_TIMEOUTS,
        "HTTP requests answered 408 because they were not answered within the request timeout"
    );
}

/// What one client may take of the server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// From a request head's first byte to its last. Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress. Default 60 s.
    pub idle_timeout: Duration,
    /// From a request's head to its answer (its body read, the handler
    /// run). Default 60 s.
    pub request_timeout: Duration,
    /// Connections open at once; past it new ones are closed at once.
    /// Default 4096.
    pub connections_max: usize,
    /// Requests on one connection before it is closed. Default 10 000.
    pub requests_per_connection_max: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            connections_max: 4096,
            requests_per_connection_max: 10_000,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting, lets every request in progress finish, closes idle
/// connections and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Arc::new(limits);
    let permits = u32::try_from(limits.connections_max.max(1)).unwrap_or(u32::MAX);
    let open = Arc::new(Semaphore::new(permits as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut refused = RateLimitedLog::new("connections refused: the connection cap is reached");
    let mut accept_failed = RateLimitedLog::new("accepting a connection failed");
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    accept_failed.note(&e.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED).increment(1);
            refused.note(&format!("{} open", limits.connections_max));
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let limits = Arc::clone(&limits);
        let stop = stop_rx.clone();
        drop(tokio::spawn(async move {
            metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
            serve_connection(stream, svc, &limits, stop).await;
            metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
            drop(permit);
        }));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it is closed.
    let _ = open.acquire_many(permits).await;
}

async fn serve_connection(
    stream: TcpStream,
    router: TowerToHyperService<Router>,
    limits: &ServerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let svc = Timed {
        inner: router,
        activity: Arc::clone(&activity),
        request_timeout: limits.request_timeout,
        requests_max: limits.requests_per_connection_max,
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let (deadline, _) = activity.deadline(limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                // The state may have moved on since the deadline was set.
                let (deadline, reason) = activity.deadline(limits);
                if let Some(reason) = reason
                    && deadline <= Instant::now()
                {
                    metrics::counter!(CONNECTIONS_DROPPED, "reason" => reason).increment(1);
                    tracing::debug!(reason, "closing a slow or idle http connection");
                    return;
                }
            }
            // A request head began: its own clock starts.
            () = activity.head_started.notified() => {}
            _ = stop.wait_for(|s| *s), if !stopping => {
                // Idle connections close now, busy ones after their answer.
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}

/// What a connection is doing, shared by its socket (bytes read) and its
/// service (requests started and answered). All of them run in the
/// connection's task: relaxed atomics suffice.
#[derive(Debug)]
struct Activity {
    base: Instant,
    /// Bytes read from the socket.
    read: AtomicU64,
    /// `read` when the connection last became idle.
    read_when_idle: AtomicU64,
    /// When it last became idle (ms since `base`).
    idle_since_ms: AtomicU64,
    /// When the first byte after that arrived.
    head_started_ms: AtomicU64,
    /// Requests being answered (0 or 1: HTTP/1 answers one at a time).
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// Wakes the connection's watch when a request head begins.
    head_started: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            read: AtomicU64::new(0),
            read_when_idle: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            head_started: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn on_read(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.read.fetch_add(n as u64, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && before == self.read_when_idle.load(Ordering::Relaxed)
        {
            self.head_started_ms.store(self.now_ms(), Ordering::Relaxed);
            self.head_started.notify_one();
        }
    }

    fn on_request(&self) -> u64 {
        let _ = self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn on_answer(&self) {
        self.read_when_idle
            .store(self.read.load(Ordering::Relaxed), Ordering::Relaxed);
        self.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
        let _ = self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the connection is next due to be closed, and why; no reason
    /// while a request is answered (the service's timeout applies then):
    /// look again a little later.
    fn deadline(&self, limits: &ServerLimits) -> (Instant, Option<&'static str>) {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return (
                Instant::now() + limits.header_read_timeout.min(limits.idle_timeout),
                None,
            );
        }
        if self.read.load(Ordering::Relaxed) == self.read_when_idle.load(Ordering::Relaxed) {
            let since = self.at(self.idle_since_ms.load(Ordering::Relaxed));
            (since + limits.idle_timeout, Some("idle_timeout"))
        } else {
            let since = self.at(self.head_started_ms.load(Ordering::Relaxed));
            (since + limits.header_read_timeout, Some("header_timeout"))
        }
    }
}

/// A socket that tells its connection's [`Activity`] what it read.
#[derive(Debug)]
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.activity.on_read(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, answering within the request timeout and closing the
/// connection after its last allowed request.
#[derive(Debug, Clone)]
struct Timed {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    request_timeout: Duration,
    requests_max: u64,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Timed {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let nth = self.activity.on_request();
        let last = nth >= self.requests_max;
        let answer = hyper::service::Service::call(&self.inner, req);
        let activity = Arc::clone(&self.activity);
        let timeout = self.request_timeout;
        Box::pin(async move {
            let mut resp = match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    metrics::counter!(REQUEST_TIMEOUTS).increment(1);
                    let mut resp = ApiError::timeout(format!(
                        "the request was not answered within {} s (its body was sent too \
                         slowly, or the server is overloaded)",
                        timeout.as_secs_f32()
                    ))
                    .into_response();
                    close(&mut resp);
                    resp
                }
            };
            if last {
                close(&mut resp);
            }
            activity.on_answer();
            Ok(resp)
        })
    }
}

fn close(resp: &mut Response<Body>) {
    let _ = resp
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// A warning at most once per ten seconds, with how many times it happened
/// since the last one.
#[derive(Debug)]
struct RateLimitedLog {
    what: &'static str,
    last: Option<Instant>,
    since: u64,
}

impl RateLimitedLog {
    fn new(what: &'static str) -> RateLimitedLog {
        RateLimitedLog {
            what,
            last: None,
            since: 0,
        }
    }

    fn note(&mut self, detail: &str) {
        self.since += 1;
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            tracing::warn!(times = self.since, detail, "{}", self.what);
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}
