//! Webhook targets: a tenant may not point Tally's server at the
//! operator's network. Non-public addresses are refused when the webhook is
//! set and again at each delivery, on the address the delivery would
//! connect to; the operator allows hosts or ranges with `--webhook-allow`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_rfc3339};

const USD: i64 = 1_000_000;

/// Non-public targets, and what the refusal calls each.
const MATRIX: &[(&str, &str)] = &[
    ("http://127.0.0.1:9/hook", "a loopback address"),
    ("http://10.1.2.3/hook", "a private address"),
    ("http://172.16.0.9:8080/hook", "a private address"),
    ("http://172.31.255.1/hook", "a private address"),
    ("http://192.168.1.20/hook", "a private address"),
    (
        "http://169.254.169.254/latest/meta-data/",
        "the cloud metadata address",
    ),
    ("http://[::1]:9/hook", "a loopback address"),
    ("http://[fc00::1]/hook", "a unique-local address"),
    ("http://[fd12:3456::1]/hook", "a unique-local address"),
    ("http://[::ffff:127.0.0.1]/hook", "a loopback address"),
    ("http://2130706433/hook", "a loopback address"),
    ("http://localhost:9/hook", "a loopback address"),
];

const ALLOW_ALL: &str = "127.0.0.1,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,\
                         169.254.169.254,fc00::/7,localhost";

async fn set(op: &Client, org: &str, url: &str) -> tally_tests::Reply {
    op.raw(
        "PUT",
        &format!("/v1/orgs/{org}/webhook"),
        json!({ "url": url }).to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn non_public_targets_are_refused_unless_the_operator_allows_them() {
    let backend = Backend::sqlite("webhook-targets");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let events_before = op.get("/v1/orgs/acme/events").await.expect(200);
    for (url, kind) in MATRIX {
        let r = set(&op, "acme", url).await;
        assert_eq!(r.status, 422, "{url}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "rule_violated", "{url}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("webhook URL refused: ") && message.contains(kind),
            "{url}: {message}"
        );
        assert!(message.contains("--webhook-allow"), "{message}");
    }
    // Nothing was set, nothing logged.
    assert_eq!(
        op.get("/v1/orgs/acme/webhook").await.expect(200)["url"],
        Value::Null
    );
    assert_eq!(
        op.get("/v1/orgs/acme/events").await.expect(200),
        events_before
    );
    // Public targets, and names that do not resolve (yet: each delivery
    // checks again), are taken.
    for url in ["https://93.184.215.14/hook", "https://hooks.acme.test/t"] {
        let _ = set(&op, "acme", url).await.expect(200);
    }
    tally.stop().unwrap();

    let tally = Tally::start_with(&backend, &["--webhook-allow", ALLOW_ALL]).unwrap();
    let op = tally.operator();
    for (url, _) in MATRIX {
        let r = set(&op, "acme", url).await.expect(200);
        assert_eq!(r["url"], *url);
    }
    // Allowing one address is not allowing its neighbours.
    tally.stop().unwrap();
    let tally = Tally::start_with(&backend, &["--webhook-allow", "10.1.2.3"]).unwrap();
    let op = tally.operator();
    let _ = set(&op, "acme", "http://10.1.2.3/hook").await.expect(200);
    assert_eq!(set(&op, "acme", "http://10.1.2.4/hook").await.status, 422);
    tally.stop().unwrap();

    // A bad allow list stops the start with a clear error.
    let out = std::process::Command::new(tally_tests::tally_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(tally_tests::temp_dir("webhook-allow-refused"))
        .args(["--webhook-allow", "10.0.0.0/33"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("webhook allow") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}

/// A receiver on 127.0.0.1 that counts what reaches it and answers 204.
async fn receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let hits: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let hits = Arc::clone(&hits);
            move |headers: axum::http::HeaderMap| async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                hits.lock().unwrap().push(key);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(tokio::spawn(
        async move { axum::serve(listener, app).await },
    ));
    (port, hits)
}

/// A user of `org` with a $10 limit, and a spend that crosses 50 % of it.
async fn cross(op: &Client, org: &str, user: &str) {
    let _ = op
        .post(
            &format!("/v1/orgs/{org}/users"),
            json!({"id": user, "email": format!("{user}@a.test"), "name": user,
                   "monthly_limit_micros": 10 * USD, "status": "active"}),
        )
        .await
        .expect(201);
    let r = op
        .post(
            "/v1/usage",
            json!({"events": [{
                "request_id": format!("{org}-{user}"), "org_id": org, "user_id": user,
                "model": "m", "provider": "p", "input_tokens": 1, "output_tokens": 1,
                "cost_micros": 6 * USD, "occurred_at": now_rfc3339(),
            }]}),
        )
        .await
        .expect(200);
    assert_eq!(r["accepted"], 1, "{r}");
}

/// The org's deliveries once none is pending.
async fn settled(tally: &Tally, op: &Client, org: &str, n: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let list = op
            .get(&format!("/v1/orgs/{org}/webhook/deliveries"))
            .await
            .expect(200);
        let items = list["items"].as_array().unwrap().clone();
        if items.len() >= n && items.iter().all(|d| d["state"] != "pending") {
            return items;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "deliveries of {org} did not settle: {list}\n{}",
            tally.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn each_delivery_is_checked_on_the_address_it_would_connect_to() {
    let (port, hits) = receiver().await;
    let backend = Backend::sqlite("webhook-delivery-targets");
    let flags = [
        "--webhook-retry-base-ms",
        "100",
        "--webhook-attempts-max",
        "2",
    ];
    let allowed: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--webhook-allow", "localhost,127.0.0.1"])
        .collect();
    let tally = Tally::start_with(&backend, &allowed).unwrap();
    let op = tally.operator();
    // acme's webhook by name, beta's by address; both allowed now. A
    // crossing may come with a forecast (the day of the month decides).
    let mut by_org = std::collections::HashMap::new();
    for (org, url) in [
        ("acme", format!("http://localhost:{port}/hook")),
        ("beta", format!("http://127.0.0.1:{port}/hook")),
    ] {
        let _ = op
            .post("/v1/orgs", json!({"id": org, "name": org}))
            .await
            .expect(201);
        let _ = set(&op, org, &url).await.expect(200);
        cross(&op, org, "alice").await;
        let d = settled(&tally, &op, org, 1).await;
        assert!(d.iter().all(|d| d["state"] == "delivered"), "{org}: {d:?}");
        let _ = by_org.insert(org, d.len());
    }
    let sent: usize = by_org.values().sum();
    assert_eq!(hits.lock().unwrap().len(), sent);
    tally.stop().unwrap();

    // The operator withdraws the allowance: the webhooks stay set, but
    // nothing reaches the receiver any more, by name (checked as the name
    // resolves) or by address.
    let tally = Tally::start_with(&backend, &flags).unwrap();
    let op = tally.operator();
    for (org, refusal) in [
        ("acme", "refused: localhost resolves to "),
        ("beta", "refused: 127.0.0.1, a loopback address"),
    ] {
        cross(&op, org, "bob").await;
        // alice's, and bob's (all written by one checkpoint).
        let d = settled(&tally, &op, org, by_org[org] + 1).await;
        let bobs: Vec<&Value> = d.iter().filter(|d| d["subject_id"] == "bob").collect();
        assert!(!bobs.is_empty(), "{org}: {d:?}");
        for bob in bobs {
            assert_eq!(bob["state"], "failed", "{org}: {bob}");
            assert_eq!(bob["attempts"], 2, "{org}: {bob}");
            assert_eq!(bob["last_status"], Value::Null, "{org}: {bob}");
            let error = bob["last_error"].as_str().unwrap();
            assert!(error.starts_with(refusal), "{org}: {error}");
            assert!(error.contains("a loopback address"), "{org}: {error}");
        }
    }
    assert_eq!(
        hits.lock().unwrap().len(),
        sent,
        "a refused target was reached"
    );
    tally.stop().unwrap();
}
