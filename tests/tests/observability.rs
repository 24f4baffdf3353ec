//! Observability on a real `tally serve`: webhooks delivered to a real
//! local receiver that fails twice (exactly one logical delivery per
//! crossing, signed both ways and verified by the Standard Webhooks
//! library, idempotent, one subject's in order, visible to admins), and as
//! Slack messages; `/metrics` scraped under
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
    /// The Standard Webhooks headers.
    id: String,
    std_timestamp: String,
    std_signature: String,
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
                    id: h("webhook-id"),
                    std_timestamp: h("webhook-timestamp"),
                    std_signature: h("webhook-signature"),
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
    seed_as(op, hook, "tally").await
}

async fn seed_as(op: &Client, hook: &str, format: &str) -> String {
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
            json!({ "url": hook, "format": format })
                .to_string()
                .as_bytes(),
        )
        .await
        .expect(200);
    assert_eq!(
        (&set["url"], &set["format"]),
        (&json!(hook), &json!(format))
    );
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

/// Verifies every hit with the Standard Webhooks reference library
/// (`standardwebhooks` on PyPI, installed by scripts/test.sh), as a
/// receiver would: `Webhook(secret).verify(body, headers)`. Returns how
/// many it verified; 0 when the library is not installed and services are
/// not required.
fn verify_with_standard_webhooks(secret: &str, hits: &[Hit]) -> usize {
    let python = match std::env::var("TALLY_TEST_STANDARDWEBHOOKS_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() => {
            panic!("TALLY_TEST_STANDARDWEBHOOKS_PYTHON is not set: run scripts/test.sh")
        }
        Err(_) => {
            eprintln!("skipped: no Standard Webhooks library (TALLY_TEST_STANDARDWEBHOOKS_PYTHON)");
            return 0;
        }
    };
    let input: Vec<Value> = hits
        .iter()
        .map(|h| {
            json!({
                "body": String::from_utf8(h.body.clone()).unwrap(),
                "headers": {
                    "webhook-id": h.id,
                    "webhook-timestamp": h.std_timestamp,
                    "webhook-signature": h.std_signature,
                },
            })
        })
        .collect();
    let script = r#"
import json, sys
from standardwebhooks import Webhook
secret, hits = sys.argv[1], json.load(sys.stdin)
wh = Webhook(secret)
for h in hits:
    wh.verify(h["body"].encode(), h["headers"])
    try:
        wh.verify(h["body"].encode() + b" ", h["headers"])
    except Exception:
        pass
    else:
        sys.exit("a changed body verified")
print(len(hits))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        serde_json::to_string(&input).unwrap().as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let verified = tally_tests::succeeded(&out);
    verified.trim().parse().unwrap()
}

/// Waits (a minute at most) until acme's webhook has `n` deliveries
/// delivered and none pending; returns the webhook's view.
async fn all_delivered(tally: &Tally, n: usize) -> Value {
    let op = tally.operator();
    let started = Instant::now();
    loop {
        let v = op.get("/v1/orgs/acme/webhook").await.expect(200);
        if v["deliveries"]["delivered"] == n && v["deliveries"]["pending"] == 0 {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "deliveries did not finish: {v}\n{}",
            tally.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let view = all_delivered(&tally, crossings.len()).await;
    assert_eq!(view["url"], hook);
    assert!(view.get("secret").is_none(), "the secret is shown once");
    let took = started.elapsed();

    let hits = hits.lock().unwrap().clone();
    assert_eq!(
        verify_with_standard_webhooks(&secret, &hits),
        if std::env::var_os("TALLY_TEST_STANDARDWEBHOOKS_PYTHON").is_some() {
            hits.len()
        } else {
            0
        },
        "every attempt verifies with the Standard Webhooks library"
    );
    // One subject's deliveries arrive one after the other: every attempt
    // of one before the first of the next, in the order Tally recorded
    // their events (the deliveries' ids).
    let subject = |key: &str| key.split(':').take(3).collect::<Vec<_>>().join(":");
    let mut arrived: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in &hits {
        let keys = arrived.entry(subject(&h.key)).or_default();
        if keys.last() != Some(&h.key) {
            assert!(
                !keys.contains(&h.key),
                "{} came back after a later one",
                h.key
            );
            keys.push(h.key.clone());
        }
    }
    let mut by_key: BTreeMap<String, Vec<Hit>> = BTreeMap::new();
    for h in hits {
        assert_eq!(h.id, h.key, "webhook-id is the idempotency key");
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

    let log = op
        .get("/v1/orgs/acme/webhook/deliveries?limit=1000")
        .await
        .expect(200);
    let mut recorded: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for d in log["items"].as_array().unwrap() {
        let key = d["key"].as_str().unwrap().to_owned();
        recorded
            .entry(subject(&key))
            .or_default()
            .push((d["id"].as_i64().unwrap(), key));
    }
    for (s, keys) in &mut recorded {
        keys.sort();
        let keys: Vec<&String> = keys.iter().map(|(_, k)| k).collect();
        assert_eq!(keys, arrived[s].iter().collect::<Vec<_>>(), "{s}: in order");
    }
    // alice's: 50 %, 80 %, 100 %, cut off, lifted, as they happened, and
    // one forecast (among them where the day of the month puts it).
    let alice: Vec<(&str, &str)> = arrived["acme:user:alice"]
        .iter()
        .map(|k| {
            let f: Vec<&str> = k.split(':').collect();
            (f[4], f[5])
        })
        .collect();
    let forecasts = alice
        .iter()
        .filter(|(e, _)| *e == "forecast_over_limit")
        .count();
    assert_eq!(forecasts, 1, "{alice:?}");
    let alice: Vec<(&str, &str)> = alice
        .into_iter()
        .filter(|(e, _)| *e != "forecast_over_limit")
        .collect();
    assert_eq!(
        alice,
        [
            ("threshold_crossed", "5000"),
            ("threshold_crossed", "8000"),
            ("threshold_crossed", "10000"),
            ("cut_off", "0"),
            ("cutoff_lifted", "0"),
        ],
        "{:?}",
        arrived["acme:user:alice"]
    );

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

/// An org whose webhook is a Slack incoming webhook gets Slack messages:
/// `{"text": …}` naming the subject, the spend and the limit, linking the
/// subject's console page under `--public-url`; retried like any delivery,
/// the same bytes each time; a test send is a Slack message too.
#[tokio::test]
async fn slack_messages_link_the_console_and_are_retried() {
    let (hook, hits) = receiver().await;
    let backend = Backend::sqlite("webhooks-slack");
    let tally = Tally::start_with(
        &backend,
        &[
            "--webhook-retry-base-ms",
            "100",
            "--webhook-allow",
            "127.0.0.1",
            "--public-url",
            "https://tally.acme.test/",
        ],
    )
    .unwrap();
    let op = tally.operator();
    let _ = seed_as(&op, &hook, "slack").await;
    assert_eq!(
        op.get("/v1/orgs/acme/webhook").await.expect(200)["format"],
        "slack"
    );
    spend(&op, "r1", "alice", 6 * USD).await;
    spend(&op, "r2", "alice", 5 * USD).await;
    // Five thresholds and cutoffs, and the forecasts the day of the month
    // gives (alice's at the latest with her cutoff).
    let events = op.get("/v1/orgs/acme/enforcement").await.expect(200)["items"]
        .as_array()
        .unwrap()
        .len();
    let forecasts = events - 5;
    assert!((1..=3).contains(&forecasts), "{events}");
    let _ = all_delivered(&tally, events).await;
    let test = op
        .post("/v1/orgs/acme/webhook/test", json!({}))
        .await
        .expect(200);
    assert_eq!(
        test["status"], 500,
        "the receiver fails every first attempt"
    );

    let hits = hits.lock().unwrap().clone();
    // Each delivery's text, in the order they first arrived.
    let mut texts: Vec<(String, String)> = Vec::new();
    for h in &hits {
        let v: Value = serde_json::from_slice(&h.body).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1, "only text: {v}");
        let text = v["text"].as_str().unwrap().to_owned();
        match texts.iter().find(|(k, _)| *k == h.key) {
            Some((_, first)) => assert_eq!(*first, text, "every attempt the same bytes"),
            None => texts.push((h.key.clone(), text)),
        }
    }
    let forecast = ":crystal_ball:";
    let of = |who: &str| -> Vec<String> {
        texts
            .iter()
            .filter(|(_, t)| t.contains(who) && !t.starts_with(forecast))
            .map(|(_, t)| t.clone())
            .collect()
    };
    let link = "<https://tally.acme.test/console/orgs/acme/users/alice|Open in Tally>";
    let alice_forecast: Vec<&String> = texts
        .iter()
        .map(|(_, t)| t)
        .filter(|t| t.starts_with(forecast) && t.contains("user `alice`"))
        .collect();
    assert_eq!(alice_forecast.len(), 1, "{texts:?}");
    let t = alice_forecast[0];
    assert!(
        t.starts_with(
            ":crystal_ball: *acme*: user `alice` is on course to pass its monthly limit: $"
        ) && t.contains(" projected by month-end against $10.00, reaching it around ")
            && t.ends_with(link),
        "{t}"
    );
    let month = &now_rfc3339()[..7];
    assert_eq!(
        of("user `alice`"),
        [
            format!(
                ":warning: *acme*: user `alice` has used 50% of its monthly limit: $6.00 of \
                 $10.00 ({month}). {link}"
            ),
            format!(
                ":warning: *acme*: user `alice` has used 80% of its monthly limit: $11.00 of \
                 $10.00 ({month}). {link}"
            ),
            format!(
                ":warning: *acme*: user `alice` has used 100% of its monthly limit: $11.00 of \
                 $10.00 ({month}). {link}"
            ),
            format!(
                ":no_entry: *acme*: user `alice` is cut off: $11.00 spent, monthly limit \
                 $10.00 ({month}). {link}"
            ),
        ],
        "in the order they happened"
    );
    assert_eq!(
        of("group `eng`"),
        [format!(
            ":warning: *acme*: group `eng` has used 50% of its monthly limit: $11.00 of \
             $15.00 ({month}). <https://tally.acme.test/console/orgs/acme/groups/eng|Open in Tally>"
        )]
    );
    assert_eq!(
        of("test notification"),
        [
            ":wave: *acme*: a test notification from Tally. Threshold and cutoff notifications \
          will arrive here. <https://tally.acme.test/console/orgs/acme|Open in Tally>"
        ]
    );
    assert_eq!(texts.len(), events + 1, "{texts:?}");
    // Three attempts each (the receiver fails two), the test send one.
    assert_eq!(hits.len(), events * 3 + 1);
    tally.stop().unwrap();
}

/// A forecast alert fires once per subject and month: when alice's
/// projection first reaches her limit and not before; a crash before the
/// checkpoint replays her usage into the same one event and delivery; later
/// spend and a second crash fire nothing more. The server's clock is at
/// noon of the month's 10th, so the arithmetic is the same in every month
/// the suite runs.
#[tokio::test]
async fn a_forecast_alert_fires_once_across_a_crash_and_a_replay() {
    const DAY: i64 = 86_400_000;
    let (hook, hits) = receiver().await;
    let backend = Backend::sqlite("webhooks-forecast");
    let clock = tally_tests::temp_dir("webhooks-forecast-clock").join("offset");
    let written = tally_tests::now_ms();
    let tenth = tally_tests::month_start_ms(written) + 9 * DAY + DAY / 2;
    std::fs::write(&clock, (tenth - written).to_string()).unwrap();
    let server_now = || tenth + (tally_tests::now_ms() - written);
    let month_end = tally_tests::month_start_ms(tenth + 25 * DAY);
    let env = [("TALLY_TEST_CLOCK_FILE", clock.to_str().unwrap())];
    // Checkpoints only when read or stopped: a crash loses the meter's
    // state since the last read, and the usage log replays it.
    let flags = [
        "--webhook-retry-base-ms",
        "100",
        "--webhook-allow",
        "127.0.0.1",
        "--checkpoint-interval-ms",
        "600000",
    ];
    let tally = Tally::start_env(&backend, &flags, &env).unwrap();
    let op = tally.operator();
    let _ = seed(&op, &hook).await;
    let spend_now = async |op: &Client, req: &str, cost: i64| {
        let at = tally_tests::rfc3339(server_now());
        let r = op
            .post(
                "/v1/usage",
                json!({"events": [{"request_id": req, "org_id": "acme", "user_id": "alice",
                    "model": "m", "provider": "p", "cost_micros": cost, "occurred_at": at}]}),
            )
            .await
            .expect(200);
        assert_eq!(r["accepted"], 1, "{r}");
    };
    let forecasts = async |op: &Client| -> Vec<Value> {
        let list = op
            .get("/v1/orgs/acme/enforcement?subject=user:alice&event=forecast_over_limit")
            .await
            .expect(200);
        list["items"].as_array().unwrap().clone()
    };
    // What $`spend` since today projects at `at`: a first day counts whole.
    let projected = |spend: i64, at: i64| spend + spend * (month_end - at) / DAY;

    // $0.40 of her $10 today projects under $10 (at most $9.00: 22.5 days
    // at $0.40 a day).
    spend_now(&op, "r1", 400_000).await;
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    let p = alice["projected_micros"].as_i64().unwrap();
    assert!(
        p < 10 * USD && p >= projected(400_000, server_now()),
        "{alice}"
    );
    assert_eq!(alice["projected_limit_date"], Value::Null);
    assert_eq!(forecasts(&op).await, Vec::<Value>::new());

    // $0.40 more projects at least $15.60: over. The process dies before
    // any checkpoint; the restart replays the log and fires it then.
    let before = server_now();
    spend_now(&op, "r2", 400_000).await;
    let after = server_now();
    tally.kill9().unwrap();
    let tally = Tally::start_env(&backend, &flags, &env).unwrap();
    assert!(
        tally.log_text().contains("replayed="),
        "{}",
        tally.log_text()
    );
    let op = tally.operator();
    let fired = forecasts(&op).await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    let f = &fired[0];
    let p = f["projected_micros"].as_i64().unwrap();
    assert!(
        // Judged as of the second it was logged.
        (projected(800_000, after)..=projected(800_000, before - 1_000)).contains(&p),
        "{f}"
    );
    assert_eq!(
        (&f["spend_micros"], &f["limit_micros"]),
        (&json!(800_000), &json!(10 * USD))
    );
    // The $9.20 left at $0.80 a day take 11.5 days: the 22nd, just.
    let day = tally_tests::rfc3339(tenth + 12 * DAY)[..10].to_owned();
    assert_eq!(f["projected_limit_date"], day.as_str(), "{f}");
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(alice["projected_limit_date"], day.as_str(), "{alice}");
    assert!(
        alice["projected_micros"].as_i64().unwrap() >= 10 * USD,
        "{alice}"
    );

    // Spend after it, a read (a checkpoint), spend and a crash again: still
    // one.
    spend_now(&op, "r3", USD).await;
    let _ = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    spend_now(&op, "r4", USD).await;
    tally.kill9().unwrap();
    let tally = Tally::start_env(&backend, &flags, &env).unwrap();
    let op = tally.operator();
    assert_eq!(
        op.get("/v1/orgs/acme/users/alice").await.expect(200)["spend_micros"],
        2_800_000
    );
    assert_eq!(forecasts(&op).await.len(), 1);

    // One delivery of it, in Tally's JSON with the projection.
    let all = op.get("/v1/orgs/acme/enforcement").await.expect(200)["items"]
        .as_array()
        .unwrap()
        .len();
    let _ = all_delivered(&tally, all).await;
    let hits = hits.lock().unwrap().clone();
    let keys: std::collections::BTreeSet<&str> = hits
        .iter()
        .filter(|h| {
            h.key.starts_with("acme:user:alice:") && h.key.contains(":forecast_over_limit:")
        })
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let body: Value = serde_json::from_slice(
        &hits
            .iter()
            .find(|h| keys.contains(h.key.as_str()))
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(body["type"], "forecast_over_limit");
    assert_eq!(
        (&body["projected_micros"], &body["projected_limit_date"]),
        (&f["projected_micros"], &f["projected_limit_date"])
    );

    // The gauge: alice and her group ($15) are projected over their
    // limits; the org ($100, at most $63) is not.
    let text = tally_tests::metrics_text(&tally.url).await;
    let s = samples(&text);
    for (kind, n) in [("user", "1"), ("group", "1"), ("key", "0"), ("org", "0")] {
        let series = format!(r#"tally_projected_over_limit{{org="acme",kind="{kind}"}}"#);
        assert_eq!(
            s.get(&series).map(String::as_str),
            Some(n),
            "{series}\n{text}"
        );
    }
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
