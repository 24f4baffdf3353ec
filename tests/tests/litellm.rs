//! The LiteLLM proxy integration (`integrations/litellm`) against the real
//! proxy: PyPI `litellm[proxy]` 1.108.7, installed with the integration by
//! `scripts/services.sh`, no database, its models pointed at a stub
//! upstream here that takes 50 ms and reports token usage. Tally keys are
//! the proxy's bearer keys; each call is reserved before it runs and
//! reported after it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, free_port, temp_dir};

const USD: i64 = 1_000_000;
const MASTER_KEY: &str = "sk-tally-suite-master-5b1d0e7c";

/// One proxy test at a time: the load figures must not share the machine
/// with the other test's proxies.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The proxy binary, or `None` (a skip) when the suite runs without it.
fn litellm_bin() -> Option<PathBuf> {
    match std::env::var_os("TALLY_TEST_LITELLM_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() => {
            panic!("TALLY_TEST_LITELLM_BIN is not set: run scripts/test.sh")
        }
        None => {
            eprintln!("skipped: no LiteLLM proxy (TALLY_TEST_LITELLM_BIN); run scripts/test.sh");
            None
        }
    }
}

/// An OpenAI-compatible upstream: `/v1/chat/completions` answers after
/// 50 ms with 5 prompt tokens and `max_tokens` completion tokens;
/// `/fail/v1/chat/completions` answers 500. Returns its base URL and how
/// many calls reached it.
async fn upstream() -> (String, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let (ok_calls, fail_calls) = (Arc::clone(&calls), Arc::clone(&calls));
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| {
                let calls = Arc::clone(&ok_calls);
                async move {
                    let _ = calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let out = body["max_tokens"].as_u64().unwrap_or(16);
                    Json(json!({
                        "id": "chatcmpl-stub", "object": "chat.completion", "created": 1_700_000_000,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "ok"}}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": out, "total_tokens": 5 + out},
                    }))
                }
            }),
        )
        .route(
            "/fail/v1/chat/completions",
            post(move || {
                let calls = Arc::clone(&fail_calls);
                async move {
                    let _ = calls.fetch_add(1, Ordering::Relaxed);
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Json(json!({"error": {"message": "upstream broke", "type": "server_error"}})),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }));
    (format!("http://{addr}"), calls)
}

/// A running proxy; killed when dropped.
struct Proxy {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Starts the proxy on `upstream`; with Tally (`tally`: its URL and a
    /// gateway token) or without (the master key authenticates).
    async fn start(bin: &PathBuf, upstream: &str, tally: Option<(&str, &str)>) -> Proxy {
        let dir = temp_dir("litellm");
        let hooks = if tally.is_some() {
            "  custom_auth: tally_litellm.auth\nlitellm_settings:\n  num_retries: 0\n  callbacks: tally_litellm.handler\n"
        } else {
            "litellm_settings:\n  num_retries: 0\n"
        };
        let config = format!(
            "model_list:\n\
             \x20 - model_name: gpt-4o\n\
             \x20   litellm_params: {{model: openai/gpt-4o, api_base: \"{upstream}/v1\", api_key: stub}}\n\
             \x20 - model_name: flaky\n\
             \x20   litellm_params: {{model: openai/gpt-4o, api_base: \"{upstream}/fail/v1\", api_key: stub}}\n\
             router_settings:\n  num_retries: 0\n\
             general_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n{hooks}"
        );
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        let port = free_port();
        let log = dir.join("proxy.log");
        let mut cmd = Command::new(bin);
        let _ = cmd
            .args(["--config", "config.yaml", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .current_dir(&dir)
            .env("LITELLM_MASTER_KEY", MASTER_KEY)
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("proxy.err")).unwrap())
            .stdin(Stdio::null());
        if let Some((url, token)) = tally {
            let _ = cmd
                .env("TALLY_URL", url)
                .env("TALLY_GATEWAY_TOKEN", token)
                .env("TALLY_USAGE_FLUSH_MS", "50");
        }
        let child = cmd.spawn().expect("starting the LiteLLM proxy");
        let mut proxy = Proxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let http = tally_tests::http_client();
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Ok(r) = http
                .get(format!("{}/health/liveliness", proxy.url))
                .send()
                .await
                && r.status() == 200
            {
                break;
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("the proxy exited ({status}):\n{}", proxy.logs());
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not start:\n{}",
                proxy.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        proxy
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("proxy.err");
        format!(
            "{}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// Stops it as an orchestrator does (SIGTERM) and waits for the exit.
    fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "the proxy did not stop:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One chat call: (status, body, the response cost header in dollars).
async fn chat(
    http: &reqwest::Client,
    proxy: &str,
    key: &str,
    model: &str,
    max_tokens: u64,
) -> (u16, Value, Option<f64>) {
    let r = http
        .post(format!("{proxy}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cost = r
        .headers()
        .get("x-litellm-response-cost")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok());
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, cost)
}

/// Dollars to micro-USD as the integration converts them (half up, in
/// float arithmetic like the integration's, so both round alike).
#[allow(
    clippy::float_arithmetic,
    clippy::cast_possible_truncation,
    reason = "LiteLLM's cost header is float dollars"
)]
fn micros(dollars: f64) -> i64 {
    (dollars * 1_000_000.0 + 0.5).floor() as i64
}

async fn key(op: &Client, id: &str, user: &str, features: &[&str]) -> String {
    op.post(
        "/v1/orgs/acme/keys",
        json!({"id": id, "name": id, "user_id": user, "features": features}),
    )
    .await
    .expect(201)["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn spend(op: &Client, user: &str) -> i64 {
    op.get(&format!("/v1/orgs/acme/users/{user}"))
        .await
        .expect(200)["spend_micros"]
        .as_i64()
        .unwrap()
}

async fn live_holds(op: &Client) -> usize {
    op.get("/v1/orgs/acme/holds").await.expect(200)["items"]
        .as_array()
        .unwrap()
        .len()
}

/// Waits until `user`'s spend is `want` (usage is reported after the
/// response, in batches).
async fn wait_for_spend(op: &Client, user: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = spend(op, user).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user}'s spend is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The acme org of the tests: alice ($1.00), bob and dora (no limit),
/// carol (suspended); the gateway token of every org.
async fn acme(op: &Client) -> String {
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    for user in ["alice", "bob", "carol", "dora"] {
        let _ = op.add_active_user("acme", user).await;
    }
    let _ = op
        .patch(
            "/v1/orgs/acme/users/alice",
            json!({"monthly_limit_micros": USD}),
        )
        .await
        .expect(200);
    op.post("/v1/gateway-tokens", json!({"name": "litellm"}))
        .await
        .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// 64 clients spend alice's $1.00 through the proxy: Tally's spend is the
/// sum of LiteLLM's own response costs and stays within the limit; the
/// calls past it get 429 with Tally's reason. Then: a revoked key 401, a
/// key without the model's feature 403, an upstream 500 releases its hold
/// at once, a suspended user is refused, Tally down refuses calls (503),
/// and what is buffered at SIGTERM is reported.
#[tokio::test]
async fn the_litellm_proxy_reserves_reports_and_refuses_through_tally() {
    let Some(bin) = litellm_bin() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let backend = Backend::sqlite("litellm");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let gateway = acme(&op).await;
    let alice = key(&op, "alice-key", "alice", &["model:*"]).await;
    let bob = key(&op, "bob-key", "bob", &["model:gpt-4o"]).await;
    let bob_flaky = key(&op, "bob-flaky", "bob", &["model:flaky", "model:gpt-4o"]).await;
    let carol = key(&op, "carol-key", "carol", &["model:*"]).await;
    let (up, upstream_calls) = upstream().await;
    let proxy = Proxy::start(&bin, &up, Some((&tally.url, &gateway))).await;
    let http = tally_tests::http_client();

    // 64 clients, each calling until refused: every call costs about
    // $0.02 (5 prompt tokens and 2 000 completion tokens of gpt-4o).
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (http, url, alice) = (http.clone(), proxy.url.clone(), alice.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let (status, body, cost) = chat(&http, &url, &alice, "gpt-4o", 2_000).await;
                    let refused = status == 429;
                    out.push((status, body, cost));
                    if refused || out.len() >= 10 {
                        return out;
                    }
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    let (mut charged, mut ok, mut refused) = (0i64, 0, 0);
    for (status, body, cost) in &results {
        match status {
            200 => {
                ok += 1;
                charged += micros(cost.expect("a 200 names its cost"));
            }
            429 => {
                refused += 1;
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.starts_with("tally: ") && message.contains("limit"),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}\n{}", proxy.logs()),
        }
    }
    eprintln!(
        "FIGURE 64 clients on a $1.00 limit: {ok} calls served, {refused} refused (429), \
         {charged} micro-USD charged, in {} ms",
        started.elapsed().as_millis()
    );
    assert!(ok > 0 && refused >= 64, "{ok} served, {refused} refused");
    assert!(charged <= USD, "charged {charged}");
    wait_for_spend(&op, "alice", charged).await;
    assert_eq!(live_holds(&op).await, 0, "every hold settled");

    // A revoked key: 401 with Tally's word, before and after it was used.
    let _ = op.delete("/v1/orgs/acme/keys/alice-key").await.expect(200);
    let (status, body, _) = chat(&http, &proxy.url, &alice, "gpt-4o", 10).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.to_string().contains("revoked"), "{body}");
    let (status, body, _) = chat(&http, &proxy.url, "tly_sk_not-a-key", "gpt-4o", 10).await;
    assert_eq!(status, 401, "{body}");
    // A model the key has no feature for: 403 naming the feature.
    let (status, body, _) = chat(&http, &proxy.url, &bob, "flaky", 10).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("model:flaky"), "{body}");
    // An upstream 500: the hold is released by the time the error comes.
    let calls = upstream_calls.load(Ordering::Relaxed);
    let (status, body, _) = chat(&http, &proxy.url, &bob_flaky, "flaky", 1_000).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        upstream_calls.load(Ordering::Relaxed),
        calls + 1,
        "the call reached the upstream"
    );
    assert_eq!(
        live_holds(&op).await,
        0,
        "the failed call's hold is released"
    );
    // A suspended user: refused.
    let _ = op
        .patch("/v1/orgs/acme/users/carol", json!({"status": "suspended"}))
        .await
        .expect(200);
    let (status, body, _) = chat(&http, &proxy.url, &carol, "gpt-4o", 10).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("tally: "), "{body}");

    // A route whose calls the integration does not meter: refused.
    let r = http
        .post(format!("{}/v1/embeddings", proxy.url))
        .bearer_auth(&bob)
        .json(&json!({"model": "gpt-4o", "input": "hi"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not metered by Tally"), "{body}");

    // Bob's calls, then SIGTERM at once: the usage still arrives. One of
    // them names another user and a made-up request in its metadata: the
    // integration reads neither.
    let before = (spend(&op, "bob").await, spend(&op, "alice").await);
    let forged = http
        .post(format!("{}/chat/completions", proxy.url))
        .bearer_auth(&bob)
        .json(&json!({"model": "gpt-4o", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}],
                      "metadata": {"tally_request_id": "forged-1", "tally_org_id": "acme",
                                   "tally_user_id": "alice", "tally_key_id": "alice-key"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    let mut sent = micros(
        forged.headers()["x-litellm-response-cost"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap(),
    );
    for _ in 0..4 {
        let (status, body, cost) = chat(&http, &proxy.url, &bob, "gpt-4o", 100).await;
        assert_eq!(status, 200, "{body}");
        sent += micros(cost.unwrap());
    }
    // No secret reaches the proxy's logs.
    let logs = proxy.logs();
    assert!(
        !logs.contains(&bob) && !logs.contains(&gateway),
        "a secret in the logs"
    );
    proxy.terminate();
    wait_for_spend(&op, "bob", before.0 + sent).await;
    assert_eq!(
        spend(&op, "alice").await,
        before.1,
        "nothing charged to alice"
    );

    // Tally down: calls are refused (fail closed, the default).
    let proxy = Proxy::start(&bin, &up, Some((&tally.url, &gateway))).await;
    tally.stop().unwrap();
    let (status, body, _) = chat(&http, &proxy.url, &bob, "gpt-4o", 10).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.to_string().contains("Tally cannot be reached"),
        "{body}"
    );
}

/// `n` calls by `clients` concurrent clients: (calls per second, each
/// call's latency in microseconds, sorted).
async fn load(proxy: &str, key: &str, clients: usize, n: usize) -> (u128, Vec<u128>) {
    let http = tally_tests::http_client();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, proxy, key, next) = (
                http.clone(),
                proxy.to_owned(),
                key.to_owned(),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                let mut took = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                    let t = Instant::now();
                    let (status, body, _) = chat(&http, &proxy, &key, "gpt-4o", 20).await;
                    assert_eq!(status, 200, "{body}");
                    took.push(t.elapsed().as_micros());
                }
                took
            })
        })
        .collect();
    let mut took = Vec::new();
    for t in tasks {
        took.extend(t.await.unwrap());
    }
    let rate = n as u128 * 1_000_000 / started.elapsed().as_micros().max(1);
    took.sort_unstable();
    (rate, took)
}

/// The `pct`th percentile of `sorted` microseconds, in milliseconds.
fn pct(sorted: &[u128], pct: usize) -> String {
    let us = sorted[(sorted.len() - 1) * pct / 100];
    format!("{}.{} ms", us / 1000, us % 1000 / 100)
}

/// `b - a` microseconds, in milliseconds, signed.
fn added(a: u128, b: u128) -> String {
    let (sign, d) = if b >= a { ("", b - a) } else { ("-", a - b) };
    format!("{sign}{}.{} ms", d / 1000, d % 1000 / 100)
}

/// What the integration costs the proxy: the same calls with and without
/// it, at 16 and 64 clients. Figures only (no thresholds).
#[tokio::test]
async fn the_integration_costs_the_proxy_this_much() {
    let Some(bin) = litellm_bin() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let backend = Backend::sqlite("litellm-load");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let gateway = acme(&op).await;
    let dora = key(&op, "dora-key", "dora", &["model:*"]).await;
    let (up, _) = upstream().await;
    let plain = Proxy::start(&bin, &up, None).await;
    let with = Proxy::start(&bin, &up, Some((&tally.url, &gateway))).await;
    // Warm both (first calls load tokenizers, open connections).
    let _ = load(&plain.url, MASTER_KEY, 8, 40).await;
    let _ = load(&with.url, &dora, 8, 40).await;
    for clients in [16, 64] {
        let n = 600;
        let (rate0, took0) = load(&plain.url, MASTER_KEY, clients, n).await;
        let (rate1, took1) = load(&with.url, &dora, clients, n).await;
        eprintln!(
            "FIGURE litellm proxy, {clients} clients, {n} calls (50 ms upstream): without tally \
             {rate0} calls/s (p50 {}, p99 {}); with tally {rate1} calls/s (p50 {}, p99 {}); \
             added p50 {}, p99 {}",
            pct(&took0, 50),
            pct(&took0, 99),
            pct(&took1, 50),
            pct(&took1, 99),
            added(took0[(took0.len() - 1) / 2], took1[(took1.len() - 1) / 2]),
            added(
                took0[(took0.len() - 1) * 99 / 100],
                took1[(took1.len() - 1) * 99 / 100]
            ),
        );
    }
    // Every call was counted: 2 × 40 warm-up… only the proxy with Tally
    // reports: 40 + 2 × 600 calls of dora.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = op.get("/v1/orgs/acme/users/dora").await.expect(200);
        if r["requests"] == 1_240 {
            break;
        }
        assert!(Instant::now() < deadline, "dora's requests: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(live_holds(&op).await, 0);
    drop(with);
    drop(plain);
    tally.stop().unwrap();
}
