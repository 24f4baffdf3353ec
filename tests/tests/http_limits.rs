//! What one HTTP client may take of a real `tally serve`: slow request
//! heads, idle connections, slow bodies, too many connections, too many
//! requests on one connection. The slow and idle ones are dropped; everyone
//! else keeps being served.

use std::time::{Duration, Instant};

use tally_tests::{Backend, Tally};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(t: &Tally) -> String {
    t.url.trim_start_matches("http://").to_owned()
}

/// Waits until the server closes `s` (end of stream or a reset) and returns
/// what it sent before; panics after `bound` (a liveness bound, far above
/// any timeout under test).
async fn read_until_closed(s: &mut TcpStream, bound: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open for {bound:?}; it sent {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Times `n` sequential GET /healthz on a fresh client: (median, max).
async fn healthz_latency(t: &Tally, n: usize) -> (Duration, Duration) {
    let client = tally_tests::http_client();
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let resp = client
            .get(format!("{}/healthz", t.url))
            .send()
            .await
            .expect("healthz");
        assert_eq!(resp.status().as_u16(), 200);
        took.push(started.elapsed());
    }
    took.sort();
    (took[n / 2], took[n - 1])
}

fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_heads_and_idle_connections_are_dropped_while_others_are_served() {
    const SLOW: usize = 2000;
    const IDLE: usize = 500;
    let header_timeout = Duration::from_secs(2);
    let idle_timeout = Duration::from_secs(4);
    let t = Tally::start_with(
        &Backend::sqlite("http-slow"),
        &[
            "--http-header-read-timeout-ms",
            "2000",
            "--http-idle-timeout-ms",
            "4000",
            "--http-connections-max",
            "5000",
        ],
    )
    .expect("start");
    let (median, max) = healthz_latency(&t, 50).await;
    println!("healthz alone: median {median:?}, max {max:?}");

    // Thousands of clients that send half a request head, then nothing.
    let sent = Instant::now();
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut s = TcpStream::connect(addr(&t)).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Slow: ")
            .await
            .expect("half a head");
        slow.push(s);
    }
    // And some that send nothing at all.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(addr(&t)).await.expect("connect"));
    }
    // One that trickles its head, a byte every 300 ms: a slow head however
    // busy it looks.
    let mut trickle = TcpStream::connect(addr(&t)).await.expect("connect");
    let trickle_started = Instant::now();
    let trickler = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Trickle: 1234567890" {
            if trickle.write_all(&[*b]).await.is_err() {
                return trickle_started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("the whole trickled head was accepted");
    });
    let opened = sent.elapsed();
    println!("{SLOW} half-sent heads and {IDLE} idle connections opened in {opened:?}");

    // Everyone else is served meanwhile.
    let (busy_median, busy_max) = healthz_latency(&t, 50).await;
    println!("healthz with them open: median {busy_median:?}, max {busy_max:?}");

    // The half-sent heads are closed, none before its header timeout.
    let bound = Duration::from_secs(60);
    for s in &mut slow {
        let got = read_until_closed(s, bound).await;
        assert!(got.is_empty(), "a half-sent head was answered: {got:?}");
    }
    let slow_closed = sent.elapsed();
    assert!(
        slow_closed >= header_timeout,
        "closed after {slow_closed:?}, before the header timeout"
    );
    for s in &mut idle {
        let got = read_until_closed(s, bound).await;
        assert!(got.is_empty());
    }
    let idle_closed = sent.elapsed();
    assert!(idle_closed >= idle_timeout);
    let trickled = trickler.await.expect("trickler");
    assert!(
        trickled >= header_timeout,
        "the trickling head was cut after {trickled:?}"
    );
    println!(
        "half-sent heads all closed {slow_closed:?} after the first was sent \
         (header timeout {header_timeout:?}); idle ones after {idle_closed:?} \
         (idle timeout {idle_timeout:?}); the trickling head after {trickled:?}"
    );

    let metrics = t.operator().metrics().await;
    let heads = counter(
        &metrics,
        "tally_http_connections_dropped_total{reason=\"header_timeout\"}",
    );
    let idles = counter(
        &metrics,
        "tally_http_connections_dropped_total{reason=\"idle_timeout\"}",
    );
    assert!(heads > SLOW as u64, "header timeouts counted: {heads}");
    assert!(idles >= IDLE as u64, "idle timeouts counted: {idles}");
    // The scrape's own connection, and the latency probes' idle ones at most.
    let open = counter(&metrics, "tally_http_connections_open");
    assert!(open <= 3, "connections still open: {open}");
    let (after_median, after_max) = healthz_latency(&t, 50).await;
    println!("healthz after: median {after_median:?}, max {after_max:?}");
    t.stop().expect("stop");
}

#[tokio::test]
async fn a_request_being_answered_is_not_cut_by_the_header_timeout() {
    let t = Tally::start_with(
        &Backend::sqlite("http-long-body"),
        &[
            "--http-header-read-timeout-ms",
            "1000",
            "--http-request-timeout-ms",
            "8000",
        ],
    )
    .expect("start");
    // The head at once, the body 2.5 s later: the head was complete, so the
    // request timeout applies, not the header timeout.
    let body = br#"{"id": "acme", "name": "Acme"}"#;
    let mut s = TcpStream::connect(addr(&t)).await.expect("connect");
    let head = format!(
        "POST /v1/orgs HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        tally_tests::OPERATOR_TOKEN,
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(body).await.expect("body");
    let got = read_until_closed(&mut s, Duration::from_secs(30)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 201"), "answer: {got}");
    let _ = t.operator().get("/v1/orgs/acme").await.expect(200);
    t.stop().expect("stop");
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_answered_408_and_the_connection_closed() {
    let t = Tally::start_with(
        &Backend::sqlite("http-slow-body"),
        &["--http-request-timeout-ms", "1500"],
    )
    .expect("start");
    let mut s = TcpStream::connect(addr(&t)).await.expect("connect");
    let head = format!(
        "POST /v1/orgs HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\": ",
        tally_tests::OPERATOR_TOKEN,
    );
    let started = Instant::now();
    s.write_all(head.as_bytes()).await.expect("head");
    let got = read_until_closed(&mut s, Duration::from_secs(30)).await;
    let took = started.elapsed();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "answer: {got}");
    assert!(got.contains("connection: close"), "answer: {got}");
    assert!(got.contains(r#""code":"request_timeout""#), "answer: {got}");
    assert!(
        took >= Duration::from_millis(1500),
        "answered after {took:?}"
    );
    let metrics = t.operator().metrics().await;
    assert_eq!(counter(&metrics, "tally_http_request_timeouts_total"), 1);
    // Nothing of the half-sent body was acted on.
    assert_eq!(t.operator().get("/v1/orgs/acme").await.status, 404);
    t.stop().expect("stop");
}

#[tokio::test]
async fn a_connection_closes_after_its_last_allowed_request() {
    let t = Tally::start_with(
        &Backend::sqlite("http-keep-alive"),
        &["--http-requests-per-connection-max", "3"],
    )
    .expect("start");
    let mut s = TcpStream::connect(addr(&t)).await.expect("connect");
    // Three requests at once (pipelined): three answers, the last saying
    // close, then the end of the stream; the fourth is never answered.
    let req = b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n";
    s.write_all(&req.repeat(4)).await.expect("requests");
    let got = read_until_closed(&mut s, Duration::from_secs(30)).await;
    let got = String::from_utf8_lossy(&got);
    assert_eq!(got.matches("HTTP/1.1 200").count(), 3, "answers: {got}");
    assert_eq!(
        got.matches("connection: close").count(),
        1,
        "answers: {got}"
    );
    let last = got.rfind("HTTP/1.1 200").expect("an answer");
    assert!(got[last..].contains("connection: close"), "answers: {got}");
    t.stop().expect("stop");
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_closed_at_once() {
    const CAP: usize = 64;
    let t = Tally::start_with(
        &Backend::sqlite("http-cap"),
        &[
            "--http-connections-max",
            "64",
            "--http-idle-timeout-ms",
            "3000",
        ],
    )
    .expect("start");
    let mut held = Vec::with_capacity(CAP);
    for _ in 0..CAP {
        held.push(TcpStream::connect(addr(&t)).await.expect("connect"));
    }
    // The server accepts in order: give it a moment to take all of them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Over the cap: closed without an answer, long before any timeout.
    let mut refused = 0;
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr(&t)).await.expect("connect");
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
            .await;
        let got = read_until_closed(&mut s, Duration::from_secs(2)).await;
        assert!(got.is_empty(), "answered over the cap: {got:?}");
        refused += 1;
    }
    // The held ones go idle and are dropped; then new ones are served.
    for s in &mut held {
        let _ = read_until_closed(s, Duration::from_secs(60)).await;
    }
    let metrics = t.operator().metrics().await;
    assert_eq!(
        counter(&metrics, "tally_http_connections_refused_total"),
        refused
    );
    let log = t.log_text();
    assert_eq!(
        log.matches("the connection cap is reached").count(),
        1,
        "logged once per interval, not per connection: {log}"
    );
    t.stop().expect("stop");
}
