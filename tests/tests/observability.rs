//! Observability on a real `tally serve`: webhooks delivered to a real
//! local receiver that fails twice (exactly one logical delivery per
//! crossing, signed, idempotent, visible to admins); `/metrics` scraped under
//! load passes `promtool check metrics` and shows the figures the API shows;
//! structured JSON logs with request spans.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tally_tests::{Backend, Client, Tally, check_metrics, now_rfc3339};

const USD: i64 = 1_000_000;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    key: String,
    attempt: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

/// A webhook receiver on a loopback port: answers 500 to the first two
/// attempts of every idempotency key, 204 afterwards.
async fn receiver() -> (String, Arc<Mutex<Vec<Hit>>>) {
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let hits = Arc::clone(&hits);
            move |headers: HeaderMap, body: axum::body::Bytes| async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let mut hits = hits.lock().unwrap();
                let key = h("idempotency-key");
                let seen = hits.iter().filter(|x| x.key == key).count();
                let status = if seen < 2 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                };
                hits.push(Hit {
                    key,
                    attempt: h("tally-attempt"),
                    timestamp: h("tally-timestamp"),
                    signature: h("tally-signature"),
                    body: body.to_vec(),
                    answered: status.as_u16(),
                });
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(tokio::spawn(
        async move { axum::serve(listener, app).await },
    ));
    (url, hits)
}

async fn spend(op: &Client, req: &str, user: &str, cost: i64) {
    let r = op
        .post(
            "/v1/usage",
            json!({"events": [{
                "request_id": req, "org_id": "acme", "user_id": user, "model": "m",
                "provider": "p", "input_tokens": 10, "output_tokens": 5,
                "cost_micros": cost, "occurred_at": now_rfc3339(),
            }]}),
        )
        .await
        .expect(200);
    assert_eq!(r["accepted"], 1, "{r}");
}

async fn seed(op: &Client, hook: &str) -> String {
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme", "monthly_limit_micros": 100 * USD}),
        )
        .await
        .expect(201);
    let set = op
        .raw(
            "PUT",
            "/v1/orgs/acme/webhook",
            json!({ "url": hook }).to_string().as_bytes(),
        )
        .await
        .expect(200);
    assert_eq!(set["url"], hook);
    for (u, limit) in [
        ("alice", Some(10 * USD)),
        ("bob", Some(10 * USD)),
        ("carol", None),
    ] {
        let _ = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": u, "email": format!("{u}@acme.test"), "name": u,
                       "monthly_limit_micros": limit, "status": "active"}),
            )
            .await
            .expect(201);
    }
    op.add_group("acme", "eng", "Eng", Some(15 * USD), &["alice", "bob"])
        .await;
    set["secret"].as_str().unwrap().to_owned()
}

fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(msg);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn every_crossing_is_delivered_once_through_failures() {
    let (hook, hits) = receiver().await;
    let backend = Backend::sqlite("webhooks");
    // The receiver is on loopback, which webhooks may reach only when the
    // operator allows it.
    let tally = Tally::start_with(
        &backend,
        &[
            "--webhook-retry-base-ms",
            "100",
            "--webhook-allow",
            "127.0.0.1",
        ],
    )
    .unwrap();
    let op = tally.operator();
    let secret = seed(&op, &hook).await;
    // alice crosses 50 %, 80 % and 100 % of $10 (cut off); eng reaches its
    // $15; then alice's limit is raised (lifted).
    spend(&op, "r1", "alice", 6 * USD).await;
    spend(&op, "r2", "alice", 3 * USD).await;
    spend(&op, "r3", "alice", 2 * USD).await;
    spend(&op, "r4", "bob", 4 * USD).await;
    let _ = op
        .patch(
            "/v1/orgs/acme/users/alice",
            json!({"monthly_limit_micros": 50 * USD}),
        )
        .await
        .expect(200);
    let enforcement = op.get("/v1/orgs/acme/enforcement").await.expect(200);
    let crossings = enforcement["items"].as_array().unwrap().clone();
    assert!(crossings.len() >= 6, "{enforcement}");

    // Wait for every delivery to land (each needs three attempts).
    let started = Instant::now();
    let view = loop {
        let v = op.get("/v1/orgs/acme/webhook").await.expect(200);
        if v["deliveries"]["delivered"] == crossings.len() && v["deliveries"]["pending"] == 0 {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "deliveries did not finish: {v}\n{}",
            tally.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view["url"], hook);
    assert!(view.get("secret").is_none(), "the secret is shown once");
    let took = started.elapsed();

    let hits = hits.lock().unwrap().clone();
    let mut by_key: BTreeMap<String, Vec<Hit>> = BTreeMap::new();
    for h in hits {
        by_key.entry(h.key.clone()).or_default().push(h);
    }
    assert_eq!(by_key.len(), crossings.len(), "one key per crossing");
    let mut delivered = Vec::new();
    for (key, attempts) in &by_key {
        let answers: Vec<u16> = attempts.iter().map(|h| h.answered).collect();
        assert_eq!(answers, [500, 500, 204], "{key}: one logical delivery");
        let numbers: Vec<&str> = attempts.iter().map(|h| h.attempt.as_str()).collect();
        assert_eq!(numbers, ["1", "2", "3"], "{key}");
        for h in attempts {
            assert_eq!(
                h.body, attempts[0].body,
                "{key}: every attempt sends the same body"
            );
            let mut signed = format!("{}.", h.timestamp).into_bytes();
            signed.extend_from_slice(&h.body);
            assert_eq!(
                h.signature,
                format!("v1={}", hmac_hex(secret.as_bytes(), &signed)),
                "{key}: signed with the org's secret"
            );
        }
        let body: Value = serde_json::from_slice(&attempts[0].body).unwrap();
        assert_eq!(body["id"], key.as_str());
        assert_eq!(body["org_id"], "acme");
        delivered.push((
            body["subject"]["kind"].as_str().unwrap().to_owned(),
            body["subject"]["id"].as_str().unwrap().to_owned(),
            body["type"].as_str().unwrap().to_owned(),
            body["threshold"].to_string(),
        ));
    }
    // The same events as the enforcement history, one for one.
    let mut expected: Vec<(String, String, String, String)> = crossings
        .iter()
        .map(|c| {
            (
                c["subject_kind"].as_str().unwrap().to_owned(),
                c["subject_id"].as_str().unwrap().to_owned(),
                c["event"].as_str().unwrap().to_owned(),
                c["threshold"].to_string(),
            )
        })
        .collect();
    expected.sort();
    delivered.sort();
    assert_eq!(delivered, expected);
    for must in [
        ("user", "alice", "threshold_crossed", "0.5"),
        ("user", "alice", "threshold_crossed", "0.8"),
        ("user", "alice", "cut_off", "null"),
        ("user", "alice", "cutoff_lifted", "null"),
        ("group", "eng", "cut_off", "null"),
    ] {
        let must = (must.0.into(), must.1.into(), must.2.into(), must.3.into());
        assert!(delivered.contains(&must), "{must:?} in {delivered:?}");
    }

    // What admins see of each delivery.
    let list = op
        .get("/v1/orgs/acme/webhook/deliveries?limit=2")
        .await
        .expect(200);
    let first = &list["items"][0];
    assert_eq!(first["state"], "delivered");
    assert_eq!(first["attempts"], 3);
    assert_eq!(first["last_status"], 204);
    assert!(by_key.contains_key(first["key"].as_str().unwrap()));
    let rest = op
        .get(&format!(
            "/v1/orgs/acme/webhook/deliveries?limit=1000&cursor={}",
            list["next_cursor"].as_str().unwrap()
        ))
        .await
        .expect(200);
    assert_eq!(rest["items"].as_array().unwrap().len(), crossings.len() - 2);
    let _ = op
        .get("/v1/orgs/acme/webhook/deliveries?state=sent")
        .await
        .error(400);
    let id = first["id"].as_i64().unwrap();
    let _ = op
        .post(
            &format!("/v1/orgs/acme/webhook/deliveries/{id}/redeliver"),
            json!(null),
        )
        .await
        .error(409);
    let _ = op
        .post(
            "/v1/orgs/acme/webhook/deliveries/999999/redeliver",
            json!(null),
        )
        .await
        .error(404);
    eprintln!(
        "{} deliveries, 3 attempts each, all delivered {} ms after the last crossing",
        crossings.len(),
        took.as_millis()
    );
    tally.stop().unwrap();
}

/// `name{labels} value` lines of an exposition, by full series text.
fn samples(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn metrics_scraped_under_load_pass_promtool_and_match_the_api() {
    let (hook, _hits) = receiver().await;
    let backend = Backend::sqlite("metrics");
    let tally = Tally::start_with(
        &backend,
        &["--metrics-top-users", "2", "--webhook-allow", "127.0.0.1"],
    )
    .unwrap();
    let op = tally.operator();
    let _ = seed(&op, &hook).await;
    let scrape = || op.metrics();
    // Load: batches of usage from another task while scraping.
    let load = tokio::spawn({
        let op = tally.operator();
        async move {
            for b in 0..40 {
                let events: Vec<Value> = (0..250)
                    .map(|i| {
                        let user = ["alice", "bob", "carol"][i % 3];
                        json!({
                            "request_id": format!("load-{b}-{i}"), "org_id": "acme",
                            "user_id": user, "model": "m",
                            "provider": "p", "input_tokens": 1, "output_tokens": 1,
                            "cost_micros": 3_000 + i, "occurred_at": now_rfc3339(),
                        })
                    })
                    .collect();
                let _ = op
                    .post("/v1/usage", json!({ "events": events }))
                    .await
                    .expect(200);
            }
            let _ = op
                .post("/v1/authorize", json!({"api_key": "nope"}))
                .await
                .expect(200);
        }
    });
    let mut scrapes = 0;
    while !load.is_finished() {
        check_metrics(&scrape().await);
        scrapes += 1;
    }
    load.await.unwrap();
    // After the load: the API and the gauges agree.
    let org = op.get("/v1/orgs/acme").await.expect(200);
    let eng = op.get("/v1/orgs/acme/groups/eng").await.expect(200);
    let text = scrape().await;
    check_metrics(&text);
    let s = samples(&text);
    let value = |series: &str| -> &str {
        s.get(series)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    assert_eq!(
        value(r#"tally_org_spend_micros{org="acme"}"#),
        org["spend_micros"].to_string()
    );
    assert_eq!(value(r#"tally_org_limit_micros{org="acme"}"#), "100000000");
    assert_eq!(
        value(r#"tally_group_spend_micros{org="acme",group="eng"}"#),
        eng["spend_micros"].to_string()
    );
    assert_eq!(
        value(r#"tally_group_limit_micros{org="acme",group="eng"}"#),
        "15000000"
    );
    // alice and bob have limits ($10) and spent about $10.40 each; carol
    // has none.
    assert_eq!(
        value(r#"tally_org_users_over_threshold{org="acme",threshold="1"}"#),
        "2"
    );
    assert_eq!(
        value(r#"tally_group_users_over_threshold{org="acme",group="eng",threshold="0.5"}"#),
        "2"
    );
    assert_eq!(value(r#"tally_cutoffs_active{kind="user"}"#), "2");
    assert_eq!(value(r#"tally_cutoffs_active{kind="group"}"#), "1");
    assert_eq!(value(r#"tally_cutoffs_active{kind="org"}"#), "0");
    let top: Vec<&String> = s
        .keys()
        .filter(|k| k.starts_with("tally_user_utilization_ratio{"))
        .collect();
    assert_eq!(top.len(), 2, "the top 2 users only: {top:?}");
    assert_eq!(
        value(r#"tally_usage_events_total{outcome="accepted",reason=""}"#),
        "10000"
    );
    assert_eq!(
        value(r#"tally_authorize_decisions_total{outcome="denied",reason="unknown_key"}"#),
        "1"
    );
    let families = [
        "tally_usage_events_total",
        "tally_apply_duration_seconds_bucket",
        "tally_checkpoint_duration_seconds_bucket",
        "tally_authorize_duration_seconds_bucket",
        "tally_http_request_duration_seconds_bucket",
        "tally_org_spend_micros_total",
        "tally_enforcement_events_total",
        "tally_webhook_deliveries_pending",
        "tally_ready",
        "tally_orgs_reported",
    ];
    for f in families {
        assert!(
            s.keys().any(|k| k.starts_with(f)),
            "{f} missing from:\n{text}"
        );
    }
    assert!(
        s.keys().any(
            |k| k.starts_with("tally_http_request_duration_seconds_bucket{")
                && k.contains(r#"route="/v1/orgs/{org}/users""#)
        ),
        "requests are labelled by route template"
    );
    eprintln!("{scrapes} scrapes under load passed promtool check metrics");
    tally.stop().unwrap();

    // Per-user series are opt-in.
    let plain = Tally::start_with(
        &Backend::sqlite("metrics-default"),
        &["--webhook-allow", "127.0.0.1"],
    )
    .unwrap();
    let op = plain.operator();
    let _ = seed(&op, &hook).await;
    spend(&op, "x", "alice", USD).await;
    let text = op.metrics().await;
    assert!(
        text.contains("tally_org_spend_micros{org=\"acme\"} 1000000"),
        "{text}"
    );
    assert!(!text.contains("tally_user_utilization_ratio{"), "{text}");
    plain.stop().unwrap();
}

#[tokio::test]
async fn json_logs_carry_request_spans() {
    let backend = Backend::sqlite("logs");
    let tally = Tally::start_env(
        &backend,
        &["--log-format", "json"],
        &[("RUST_LOG", "info,tally_api=debug")],
    )
    .unwrap();
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let _ = op.get("/v1/orgs/acme/users").await.expect(200);
    let text = tally.log_text();
    tally.stop().unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    let request = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "request" && l["span"]["route"] == "/v1/orgs/{org}/users"
        })
        .unwrap_or_else(|| panic!("no request line for the users route in:\n{text}"));
    assert_eq!(request["level"], "DEBUG");
    assert_eq!(request["span"]["method"], "GET");
    assert_eq!(request["fields"]["status"], 200);
    assert!(lines.iter().any(|l| l["fields"]["message"] == "serving"));
}

/// GET /metrics on `url` with `token`: status and body.
async fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = tally_tests::http_client().get(format!("{url}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn metrics_need_a_token_or_a_listener_of_their_own() {
    // By default, on the API port: the operator token only.
    let backend = Backend::sqlite("metrics-access");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let admin = op.post("/v1/orgs/acme/tokens", json!({})).await.expect(201);
    let admin = admin["token"].as_str().unwrap().to_owned();
    let (status, body) = scrape(&tally.url, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("tally_"), "{body}");
    let (status, body) = scrape(&tally.url, Some(&admin)).await;
    assert_eq!(status, 403, "an org's admin may not see every org: {body}");
    assert_eq!(scrape(&tally.url, Some("not-a-token")).await.0, 401);
    let (status, body) = scrape(&tally.url, Some(tally_tests::OPERATOR_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("tally_http_request_duration_seconds"),
        "{body}"
    );
    tally.stop().unwrap();

    // A scrape token: reads /metrics, and nothing else.
    let scrape_token = "scrape-token-0123456789";
    let tally = Tally::start_with(&backend, &["--metrics-token", scrape_token]).unwrap();
    assert_eq!(scrape(&tally.url, Some(scrape_token)).await.0, 200);
    assert_eq!(
        scrape(&tally.url, Some(tally_tests::OPERATOR_TOKEN))
            .await
            .0,
        200
    );
    assert_eq!(scrape(&tally.url, None).await.0, 401);
    let _ = tally
        .client(scrape_token)
        .get("/v1/orgs/acme")
        .await
        .error(401);
    tally.stop().unwrap();

    // A listener of its own: no token there, none of it on the API port.
    let port = tally_tests::free_port();
    let at = format!("127.0.0.1:{port}");
    let tally = Tally::start_with(&backend, &["--metrics-listen", &at]).unwrap();
    let (status, body) = scrape(&format!("http://{at}"), None).await;
    assert_eq!(status, 200);
    check_metrics(&body);
    assert!(body.contains("tally_http_connections_open"), "{body}");
    let (status, body) = scrape(&tally.url, Some(tally_tests::OPERATOR_TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("--metrics-listen"), "{body}");
    // Nothing else is served there.
    let other = tally_tests::http_client()
        .get(format!("http://{at}/v1/orgs/acme"))
        .bearer_auth(tally_tests::OPERATOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
    tally.stop().unwrap();

    // Not both, and no short scrape token.
    for args in [
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-token",
            scrape_token,
        ][..],
        &["--metrics-token", "short"][..],
    ] {
        let out = std::process::Command::new(tally_tests::tally_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(tally_tests::temp_dir("metrics-refused"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("metrics"),
            "{err}"
        );
    }
}
