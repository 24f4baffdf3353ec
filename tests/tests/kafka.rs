//! Distributed mode on real servers: a Kafka-protocol broker (the pinned
//! Tansu, one per test, in memory) and PostgreSQL, with real `tally serve`
//! processes. Usage is published by a plain Kafka client, the way a gateway
//! would.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tally_tests::{Backend, Broker, Client, Tally, now_rfc3339};

const USD: i64 = 1_000_000;
const PARTITIONS: &str = "4";

fn ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The broker and database of one test, or `None` when the suite runs
/// without services.
async fn services(name: &str) -> Option<(Broker, Backend)> {
    let broker = Broker::start().unwrap()?;
    let backend = Backend::postgres(name).await.unwrap()?;
    Some((broker, backend))
}

fn start(backend: &Backend, broker: &Broker) -> Tally {
    Tally::start_with(
        backend,
        &[
            "--kafka-brokers",
            &broker.brokers(),
            "--kafka-usage-partitions",
            PARTITIONS,
        ],
    )
    .unwrap()
}

/// Two ready processes on the same database and broker.
async fn two_processes(backend: &Backend, broker: &Broker) -> (Tally, Tally) {
    let a = start(backend, broker);
    ready(&a).await;
    let b = start(backend, broker);
    ready(&b).await;
    (a, b)
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(t: &Tally) {
    let c = t.anonymous();
    wait_for("readiness", Duration::from_secs(60), || async {
        c.get("/readyz").await.status == 200
    })
    .await;
}

/// Whether authorize on `c` allows the key with `secret`.
async fn allowed(c: &Client, secret: &str) -> bool {
    c.post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200)["allowed"]
        .as_bool()
        .unwrap()
}

/// A key for user 0 of `org` (from [`org_fixture`]); returns its secret.
async fn auth_key(op: &Client, org: &str) -> String {
    let key = op
        .post(
            &format!("/v1/orgs/{org}/keys"),
            json!({"id": format!("{org}-auth"), "name": "a", "user_id": format!("{org}-u0")}),
        )
        .await
        .expect(201);
    key["secret"].as_str().unwrap().to_owned()
}

/// An org with `users` active members (`{org}-u{i}`, each with a key
/// `{org}-k{i}`) split over `groups` groups (`{org}-g{j}`).
async fn org_fixture(op: &Client, org: &str, users: usize, groups: usize, limit: Option<i64>) {
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": org, "name": org, "default_monthly_limit_micros": limit}),
        )
        .await
        .expect(201);
    for j in 0..groups {
        let _ = op
            .post(
                &format!("/v1/orgs/{org}/groups"),
                json!({"id": format!("{org}-g{j}"), "name": "G"}),
            )
            .await
            .expect(201);
    }
    for i in 0..users {
        let u = format!("{org}-u{i}");
        let _ = op
            .post(
                &format!("/v1/orgs/{org}/users"),
                json!({"id": u, "email": format!("{u}@x.test"), "name": u}),
            )
            .await
            .expect(201);
        let _ = op
            .post(
                &format!("/v1/orgs/{org}/keys"),
                json!({"id": format!("{org}-k{i}"), "name": "k", "user_id": u}),
            )
            .await
            .expect(201);
        if groups > 0 {
            let g = format!("{org}-g{}", i % groups);
            let _ = op
                .put(&format!("/v1/orgs/{org}/groups/{g}/members/{u}"))
                .await
                .expect(200);
        }
    }
}

/// The plain client a gateway would use: murmur2 partitioning by key.
fn producer(broker: &Broker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap()
}

/// One usage event as a gateway publishes it.
#[derive(Clone, Debug)]
struct Call {
    request_id: String,
    org: String,
    user: String,
    key: String,
    cost: i64,
    json: bool,
}

impl Call {
    fn value(&self, occurred_at_ms: i64) -> (Vec<u8>, &'static str) {
        if self.json {
            let v = json!({"request_id": self.request_id, "org_id": self.org, "user_id": self.user,
                "api_key_id": self.key, "model": "gpt-4o", "provider": "openai", "input_tokens": 900,
                "output_tokens": 120, "cost_micros": self.cost, "occurred_at": now_rfc3339()});
            (v.to_string().into_bytes(), "application/json")
        } else {
            let p = tally_proto::v1::UsageEvent {
                request_id: self.request_id.clone(),
                org_id: self.org.clone(),
                user_id: self.user.clone(),
                api_key_id: self.key.clone(),
                model: "gpt-4o".into(),
                provider: "openai".into(),
                input_tokens: 900,
                output_tokens: 120,
                cost_micros: Some(self.cost),
                occurred_at_ms: Some(occurred_at_ms),
            };
            (p.encode_to_vec(), "application/x-protobuf")
        }
    }
}

/// Publishes calls, each once or twice; returns the messages sent.
async fn publish(
    p: &FutureProducer,
    topic: &str,
    calls: &[Call],
    twice: impl Fn(usize) -> bool,
) -> usize {
    let mut waiting = Vec::new();
    let mut sent = 0;
    for (i, c) in calls.iter().enumerate() {
        let (value, ct) = c.value(ms_now());
        for _ in 0..if twice(i) { 2 } else { 1 } {
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(ct),
            });
            let record = FutureRecord::to(topic)
                .key(&c.org)
                .payload(&value)
                .headers(headers);
            let mut record = record;
            let d = loop {
                match p.send_result(record) {
                    Ok(d) => break d,
                    Err((_, r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            waiting.push(d);
            sent += 1;
        }
        if waiting.len() > 5_000 {
            for d in waiting.drain(..) {
                let _ = d.await.unwrap().unwrap();
            }
        }
    }
    for d in waiting {
        let _ = d.await.unwrap().unwrap();
    }
    sent
}

/// Deterministic pseudo-random calls over the fixture orgs.
fn calls(orgs: &[&str], users: usize, n: usize, seed: u64, json_every: usize) -> Vec<Call> {
    let mut x = seed.max(1);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let org = orgs[(next() % orgs.len() as u64) as usize];
            let u = (next() % users as u64) as usize;
            Call {
                request_id: format!("req-{seed}-{i}"),
                org: org.to_owned(),
                user: format!("{org}-u{u}"),
                key: format!("{org}-k{u}"),
                cost: 1 + (next() % 20_000) as i64,
                json: json_every > 0 && i % json_every == 0,
            }
        })
        .collect()
}

struct Expected {
    org: HashMap<String, i64>,
    user: HashMap<(String, String), i64>,
    group: HashMap<(String, String), i64>,
}

fn expected(calls: &[Call], groups: usize) -> Expected {
    let mut e = Expected {
        org: HashMap::new(),
        user: HashMap::new(),
        group: HashMap::new(),
    };
    for c in calls {
        *e.org.entry(c.org.clone()).or_default() += c.cost;
        *e.user.entry((c.org.clone(), c.user.clone())).or_default() += c.cost;
        let i: usize = c.user.rsplit_once("-u").unwrap().1.parse().unwrap();
        let g = format!("{}-g{}", c.org, i % groups);
        *e.group.entry((c.org.clone(), g)).or_default() += c.cost;
    }
    e
}

/// How many partitions a process meters (from its metrics).
async fn owned(t: &Tally) -> i64 {
    let text = tally_tests::metrics_text(&t.url).await;
    text.lines()
        .find(|l| l.starts_with("tally_partitions_owned "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

async fn org_spend(op: &Client, org: &str) -> i64 {
    op.get(&format!("/v1/orgs/{org}")).await.expect(200)["spend_micros"]
        .as_i64()
        .unwrap()
}

async fn wait_for_totals(op: &Client, e: &Expected, timeout: Duration) {
    for (org, want) in &e.org {
        wait_for(&format!("org {org} to reach {want}"), timeout, || async {
            org_spend(op, org).await == *want
        })
        .await;
    }
}

async fn check_every_figure(op: &Client, e: &Expected) {
    for (org, want) in &e.org {
        assert_eq!(org_spend(op, org).await, *want, "org {org}");
        let users = op
            .get(&format!("/v1/orgs/{org}/users?limit=1000"))
            .await
            .expect(200);
        for u in users["items"].as_array().unwrap() {
            let id = u["id"].as_str().unwrap().to_owned();
            let want = e.user.get(&(org.clone(), id.clone())).copied().unwrap_or(0);
            assert_eq!(u["spend_micros"], want, "user {id}");
        }
        let groups = op
            .get(&format!("/v1/orgs/{org}/groups?limit=1000"))
            .await
            .expect(200);
        for g in groups["items"].as_array().unwrap() {
            let id = g["id"].as_str().unwrap().to_owned();
            let want = e
                .group
                .get(&(org.clone(), id.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(g["spend_micros"], want, "group {id}");
        }
    }
}

#[tokio::test]
async fn every_distinct_event_counts_once() {
    let Some((broker, backend)) = services("kafka_exact").await else {
        return;
    };
    let tally = start(&backend, &broker);
    ready(&tally).await;
    let op = tally.operator();
    let orgs = ["alpha", "bravo", "charlie", "delta"];
    for org in orgs {
        org_fixture(&op, org, 25, 3, None).await;
    }
    let calls = calls(&orgs, 25, 100_000, 7, 5);
    let e = expected(&calls, 3);
    let started = Instant::now();
    // 10 % published twice.
    let sent = publish(&producer(&broker), "tally.usage", &calls, |i| i % 10 == 3).await;
    assert_eq!(sent, 110_000);
    wait_for_totals(&op, &e, Duration::from_secs(240)).await;
    let elapsed = started.elapsed();
    eprintln!(
        "FIGURE kafka path: {sent} messages ({} distinct) published, consumed, applied and checkpointed in {} ms: {} events/s",
        calls.len(),
        elapsed.as_millis(),
        (sent as u128 * 1000) / elapsed.as_millis().max(1)
    );
    check_every_figure(&op, &e).await;
    // Distributed-mode gauges: consumer lag per owned partition (from the
    // consumer's statistics, each second) and the relay backlog.
    let scrape = || tally_tests::metrics_text(&tally.url);
    wait_for("distributed gauges", Duration::from_secs(30), || async {
        let text = scrape().await;
        text.contains("tally_consumer_lag_messages{partition=")
            && text.contains("tally_relay_backlog_events ")
    })
    .await;
    let metrics = scrape().await;
    tally_tests::check_metrics(&metrics);
    let duplicates: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tally_usage_events_total") && l.contains("outcome=\"duplicate\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        duplicates >= 10_000.0,
        "duplicates are counted in a metric: {duplicates}"
    );
    tally.stop().unwrap();
}

#[tokio::test]
async fn a_killed_engine_hands_its_partitions_over_exactly() {
    let Some((broker, backend)) = services("kafka_kill").await else {
        return;
    };
    let (a, b) = two_processes(&backend, &broker).await;
    // Both meter part of the stream before one dies.
    for t in [&a, &b] {
        wait_for("partitions on both", Duration::from_secs(60), || async {
            owned(t).await > 0
        })
        .await;
    }
    let op = b.operator();
    // Two orgs on every partition, so whatever the dead one owned had usage.
    let mut orgs: Vec<String> = Vec::new();
    for p in 0..4 {
        let mine: Vec<String> = (0..)
            .map(|i| format!("org{i}"))
            .filter(|o| tally_kafka::murmur2::partition_for(o.as_bytes(), 4) == p)
            .take(2)
            .collect();
        orgs.extend(mine);
    }
    let orgs: Vec<&str> = orgs.iter().map(String::as_str).collect();
    for org in &orgs {
        org_fixture(&op, org, 10, 2, None).await;
    }
    let calls = calls(&orgs, 10, 40_000, 11, 0);
    let e = expected(&calls, 2);
    let p = producer(&broker);
    let (first, rest) = calls.split_at(20_000);
    let _ = publish(&p, "tally.usage", first, |i| i % 10 == 0).await;
    // Mid-stream: half published; some consumed by each process.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    a.kill9().unwrap();
    let _ = publish(&p, "tally.usage", rest, |i| i % 10 == 0).await;
    wait_for_totals(&op, &e, Duration::from_secs(120)).await;
    wait_for(
        "the survivor to meter every partition",
        Duration::from_secs(30),
        || async { owned(&b).await == 4 },
    )
    .await;
    // The survivor's own account of the rebalance: the checkpoint before its
    // partitions were revoked, and each claim (fence, load, seek).
    for line in b
        .log_text()
        .lines()
        .filter(|l| l.contains("partitions revoked") || l.contains("partition claimed"))
    {
        eprintln!(
            "FIGURE rebalance step: {}",
            line.split_once(" INFO ").map_or(line, |(_, l)| l)
        );
    }
    eprintln!(
        "FIGURE rebalance after kill -9: totals exact {} ms after the kill (session timeout 6 s included)",
        killed_at.elapsed().as_millis()
    );
    check_every_figure(&op, &e).await;
    assert!(b.log_text().contains("partitions assigned"));
    b.stop().unwrap();
}

#[tokio::test]
async fn a_broker_outage_loses_nothing_and_authorize_keeps_answering() {
    let Some((broker, backend)) = services("kafka_outage").await else {
        return;
    };
    let tally = start(&backend, &broker);
    ready(&tally).await;
    let op = tally.operator();
    org_fixture(&op, "kilo", 5, 1, Some(1_000 * USD)).await;
    let secret = auth_key(&op, "kilo").await;
    let all = calls(&["kilo"], 5, 6_000, 13, 4);
    let e = expected(&all, 1);
    let p = producer(&broker);
    let _ = publish(&p, "tally.usage", &all[..2_000], |_| false).await;
    let counted: i64 = all[..2_000].iter().map(|c| c.cost).sum();
    wait_for("the first batch", Duration::from_secs(60), || async {
        org_spend(&op, "kilo").await == counted
    })
    .await;
    let before = op
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);

    // The broker stops (frozen: unreachable, log kept) for longer than the
    // group's session timeout. Publishing goes on into the producer's buffer;
    // authorize answers from memory.
    broker.pause();
    let during = tokio::spawn({
        let p = p.clone();
        let calls = all[2_000..4_000].to_vec();
        async move { publish(&p, "tally.usage", &calls, |i| i % 5 == 0).await }
    });
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        let d = op
            .post("/v1/authorize", json!({"api_key": secret}))
            .await
            .expect(200);
        assert_eq!(d, before, "authorize answers from the last known state");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.resume();
    let _ = during.await.unwrap();
    let _ = publish(&p, "tally.usage", &all[4_000..], |i| i % 5 == 0).await;
    wait_for_totals(&op, &e, Duration::from_secs(120)).await;
    check_every_figure(&op, &e).await;
    tally.stop().unwrap();
}

#[tokio::test]
async fn a_cutoff_on_one_process_is_seen_on_the_other_within_a_second() {
    let Some((broker, backend)) = services("kafka_cutoff").await else {
        return;
    };
    let (a, b) = two_processes(&backend, &broker).await;
    let op = a.operator();
    org_fixture(&op, "lima", 2, 1, Some(10 * USD)).await;
    let secret = auth_key(&op, "lima").await;
    let (ca, cb) = (a.operator(), b.operator());
    let allowed = async |c: &Client| allowed(c, &secret).await;
    // Both know the key (b through the relayed entity log).
    wait_for("the key on both", Duration::from_secs(30), || async {
        allowed(&ca).await && allowed(&cb).await
    })
    .await;
    let call = Call {
        request_id: "over".into(),
        org: "lima".into(),
        user: "lima-u0".into(),
        key: "lima-k0".into(),
        cost: 11 * USD,
        json: false,
    };
    let _ = publish(&producer(&broker), "tally.usage", &[call], |_| false).await;
    let mut denied_at: [Option<Instant>; 2] = [None, None];
    let deadline = Instant::now() + Duration::from_secs(60);
    while denied_at.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "the cutoff never showed: {denied_at:?}"
        );
        for (i, c) in [&ca, &cb].into_iter().enumerate() {
            if denied_at[i].is_none() && !allowed(c).await {
                denied_at[i] = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (x, y) = (denied_at[0].unwrap(), denied_at[1].unwrap());
    let gap = if x > y { x - y } else { y - x };
    eprintln!(
        "FIGURE cutoff seen on the second process {} ms after the first",
        gap.as_millis()
    );
    assert!(gap < Duration::from_secs(1), "{gap:?}");
    let d = cb
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    assert_eq!(d["reason"], "user_monthly_limit");
    // b learnt the entities through the events topic: its projection lag
    // histogram has the observations, and its exposition passes promtool.
    let text = tally_tests::metrics_text(&b.url).await;
    let followed: u64 = text
        .lines()
        .find(|l| l.starts_with("tally_projection_lag_seconds_count "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(followed > 0, "projection lag observed on b:\n{text}");
    tally_tests::check_metrics(&text);
    a.stop().unwrap();
    b.stop().unwrap();
}

#[tokio::test]
async fn bad_messages_are_dead_lettered_and_the_partition_moves_on() {
    let Some((broker, backend)) = services("kafka_dlq").await else {
        return;
    };
    let tally = start(&backend, &broker);
    ready(&tally).await;
    let op = tally.operator();
    org_fixture(&op, "mike", 2, 1, None).await;
    let p = producer(&broker);
    let good = |id: &str, cost: i64| Call {
        request_id: id.into(),
        org: "mike".into(),
        user: "mike-u0".into(),
        key: "mike-k0".into(),
        cost,
        json: false,
    };
    let send = async |key: Option<&str>,
                      ct: &str,
                      value: Vec<u8>,
                      partition: Option<i32>,
                      forwarded: bool| {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(ct),
        });
        if forwarded {
            headers = headers.insert(Header {
                key: "tally-forwarded-from",
                value: Some("0:0"),
            });
        }
        let mut r = FutureRecord::<str, [u8]>::to("tally.usage")
            .payload(&value)
            .headers(headers);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        let _ = p.send(r, Duration::from_secs(30)).await.unwrap();
    };
    let send_raw = async |key: Option<&str>, ct: &str, value: Vec<u8>, partition: Option<i32>| {
        send(key, ct, value, partition, false).await;
    };
    let _ = publish(&p, "tally.usage", &[good("g1", 100)], |_| false).await;
    send_raw(
        Some("mike"),
        "application/x-protobuf",
        vec![0xff, 0xff, 0x01],
        None,
    )
    .await;
    send_raw(
        Some("mike"),
        "application/json",
        br#"{"request_id":"x","org_id":"mike","user_id":"mike-u0","occurred_at_ms":1}"#.to_vec(),
        None,
    )
    .await;
    let (unknown_org, ct) = Call {
        org: "nobody".into(),
        ..good("b3", 5)
    }
    .value(ms_now());
    send_raw(Some("nobody"), ct, unknown_org, None).await;
    let (unknown_user, ct) = Call {
        user: "ghost".into(),
        key: String::new(),
        ..good("b4", 5)
    }
    .value(ms_now());
    send_raw(Some("mike"), ct, unknown_user, None).await;
    let (mismatch, ct) = good("b5", 5).value(ms_now());
    send_raw(Some("november"), ct, mismatch, None).await;
    // The right key on the wrong partition: forwarded to the org's, and
    // counted there. Forwarded once already and still on the wrong one
    // (processes that disagree on the partition count): dead-lettered.
    let home = tally_kafka::murmur2::partition_for(b"mike", 4);
    let (wrong, ct) = good("b6", 5).value(ms_now());
    send_raw(Some("mike"), ct, wrong, Some((home + 1) % 4)).await;
    let (again, ct) = good("b7", 7).value(ms_now());
    send(Some("mike"), ct, again, Some((home + 2) % 4), true).await;
    let _ = publish(&p, "tally.usage", &[good("g2", 200)], |_| false).await;
    wait_for(
        "the good ones and the forwarded one",
        Duration::from_secs(60),
        || async { org_spend(&op, "mike").await == 305 },
    )
    .await;

    // Every bad one is on the dead-letter topic with its reason.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", "dlq-check")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&["tally.usage.dead-letter"]).unwrap();
    let mut reasons = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reasons.len() < 6 && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            let reason = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "tally-reason")
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                })
                .unwrap_or_default();
            reasons.push(reason);
        }
    }
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "key_mismatch",
            "malformed",
            "missing_field",
            "unknown_org",
            "unknown_user",
            "wrong_partition"
        ]
    );
    // And admins see them.
    let listed: Value = op.get("/v1/dead-letters").await.expect(200);
    assert_eq!(listed["items"].as_array().unwrap().len(), 6, "{listed}");
    assert_eq!(listed["next_cursor"], Value::Null, "{listed}");
    // A page at a time: the same letters, each once, in the same order.
    let first = op.get("/v1/dead-letters?limit=4").await.expect(200);
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    let rest = op
        .get(&format!("/v1/dead-letters?limit=4&cursor={cursor}"))
        .await
        .expect(200);
    assert_eq!(rest["next_cursor"], Value::Null, "{rest}");
    let paged: Vec<&Value> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["items"].as_array().unwrap())
        .collect();
    let whole: Vec<&Value> = listed["items"].as_array().unwrap().iter().collect();
    assert_eq!(paged, whole);
    tally.stop().unwrap();
}

#[tokio::test]
async fn the_example_producer_publishes_countable_usage() {
    let Some((broker, backend)) = services("kafka_produce").await else {
        return;
    };
    let tally = start(&backend, &broker);
    ready(&tally).await;
    let op = tally.operator();
    org_fixture(&op, "oscar", 3, 1, None).await;
    // The brokers from a config file, as `tally serve` would read them.
    let config = tally_tests::temp_dir("kafka-produce-config").join("tally.toml");
    std::fs::write(
        &config,
        format!("kafka_brokers = \"{}\"\n", broker.brokers()),
    )
    .unwrap();
    let stdout = tally_ok(&[
        "--config",
        config.to_str().unwrap(),
        "produce",
        "--org",
        "oscar",
        "--users",
        "oscar-u0,oscar-u1,oscar-u2",
        "--keys",
        "oscar-k0,oscar-k1,oscar-k2",
        "--events",
        "3000",
        "--duplicate-percent",
        "10",
        "--json",
    ]);
    let total: i64 = stdout
        .split("costing ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(total > 0);
    wait_for("the produced usage", Duration::from_secs(60), || async {
        org_spend(&op, "oscar").await == total
    })
    .await;
    tally.stop().unwrap();
}

/// Runs the tally binary with `args`, which must succeed: what it printed.
fn tally_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(tally_tests::tally_bin())
        .args(args)
        .output()
        .unwrap();
    tally_tests::succeeded(&out)
}

/// The value of an unlabelled gauge on `t`'s /metrics (0 when absent, or
/// when the process does not answer: it may be dying).
async fn gauge(t: &Tally, name: &str) -> f64 {
    let scraped = tally_tests::http_client()
        .get(format!("{}/metrics", t.url))
        .bearer_auth(tally_tests::OPERATOR_TOKEN)
        .send()
        .await;
    let text = match scraped {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The usage topic deleted and created again under a running deployment,
/// and refilled: the partition the checkpoint had metered is refused, not
/// resumed at its old offsets of a log that no longer exists; a restart
/// refuses it too; `tally reset-usage-positions`
/// (with the service stopped) makes the next start read the new topic from
/// its beginning, keeping what was counted.
#[tokio::test]
async fn a_recreated_usage_topic_is_refused_until_its_positions_are_reset() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let Some((broker, backend)) = services("kafka_recreated").await else {
        return;
    };
    let mut t = start(&backend, &broker);
    ready(&t).await;
    let op = t.operator();
    org_fixture(&op, "oscar", 4, 1, None).await;
    let p = producer(&broker);
    let first = calls(&["oscar"], 4, 300, 21, 0);
    let _ = publish(&p, "tally.usage", &first, |i| i % 10 == 0).await;
    let before = expected(&first, 1);
    wait_for_totals(&op, &before, Duration::from_secs(60)).await;
    // Checkpointed (every second), with the mark of its position.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deleted = admin
        .delete_topics(&["tally.usage"], &options)
        .await
        .unwrap();
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    let topic = NewTopic::new("tally.usage", 4, TopicReplication::Fixed(1));
    // Tally re-creates a missing topic by itself within ten seconds: either
    // may come first.
    let created = admin.create_topics(&[topic], &options).await.unwrap();
    eprintln!("re-created: {created:?}");
    // Refilled past the checkpoint's position: the message there is
    // another. (Refilled less, a Kafka broker answers the fetch at the
    // position with OFFSET_OUT_OF_RANGE, the consumer starts again from the
    // log's start, and the offset going back is refused; the pinned Tansu
    // answers with nothing, and does not say where its log ends.)
    let second = calls(&["oscar"], 4, 400, 22, 0);
    let _ = publish(&p, "tally.usage", &second, |_| false).await;
    // On the pinned Tansu, the deletion kills the process (SIGSEGV in
    // librdkafka 2.12.1: a metadata update whose topic has no name, from the
    // broker's answer about the deleted topic). A supervisor restarts it;
    // so does this test. Either way the partition must be refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    let t = loop {
        if let Some(status) = t.try_wait().unwrap() {
            eprintln!(
                "FIGURE topic deletion under a running tally: it exited ({status}); restarted"
            );
            let t = start(&backend, &broker);
            ready(&t).await;
            break t;
        }
        if gauge(&t, "tally_usage_partitions_refused").await >= 1.0 {
            eprintln!(
                "FIGURE topic deletion under a running tally: refused in the running process"
            );
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the refusal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let op = t.operator();
    wait_for("the partition refused", Duration::from_secs(60), || async {
        gauge(&t, "tally_usage_partitions_refused").await >= 1.0
    })
    .await;
    let refusal = "is not the log its checkpoint was taken from";
    assert!(t.log_text().contains(refusal), "{}", t.log_text());
    assert!(t.log_text().contains("tally reset-usage-positions"));
    // Nothing of the new topic counted, and the service answers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(org_spend(&op, "oscar").await, before.org["oscar"]);

    let t = t.restart().unwrap();
    ready(&t).await;
    wait_for(
        "the partition refused again",
        Duration::from_secs(60),
        || async { gauge(&t, "tally_usage_partitions_refused").await >= 1.0 },
    )
    .await;
    assert_eq!(org_spend(&t.operator(), "oscar").await, before.org["oscar"]);
    t.stop().unwrap();

    let Backend::Postgres(url) = &backend else {
        unreachable!("distributed mode runs on PostgreSQL")
    };
    let stdout = tally_ok(&["reset-usage-positions", "--database-url", url]);
    assert!(
        stdout.contains("reset the positions of 4 usage partitions"),
        "{stdout}"
    );

    let t = start(&backend, &broker);
    ready(&t).await;
    let op = t.operator();
    let all: Vec<Call> = first.iter().chain(&second).cloned().collect();
    let e = expected(&all, 1);
    wait_for_totals(&op, &e, Duration::from_secs(60)).await;
    check_every_figure(&op, &e).await;
    assert_eq!(gauge(&t, "tally_usage_partitions_refused").await, 0.0);
    t.stop().unwrap();
}

/// A database metered from the embedded usage log is never resumed at a
/// Kafka topic's offsets: the distributed process stops at its first claim
/// and says why (and what to do), before it fences anyone.
#[tokio::test]
async fn a_database_of_the_embedded_log_is_refused_under_kafka() {
    let Some((broker, backend)) = services("kafka_other_log").await else {
        return;
    };
    let embedded = Tally::start(&backend).unwrap();
    ready(&embedded).await;
    embedded.stop().unwrap();
    let mut t = start(&backend, &broker);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = t.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            t.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = t.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("belongs to usage log embedded, not to kafka:tally.usage")
            && log.contains("tally reset-usage-positions"),
        "{log}"
    );
}

/// A limit change made on a process that does not meter the org reaches
/// the one that does through the events topic; that one checkpoints before
/// folding it, as for a change made on itself. So a kill -9 right after
/// replays only usage counted after the change under it: the cutoff the old
/// limit caused and the lift the new one caused both survive (replayed
/// from the checkpoint before the cutoff, the usage would be judged under
/// the new limit only, and neither would ever be recorded). No periodic
/// checkpoint runs meanwhile (the interval is ten minutes), and nothing
/// reads the owner's spend (a read checkpoints first): authorize tells.
#[tokio::test]
async fn a_limit_change_from_another_process_survives_the_owners_kill_9() {
    let Some(cluster) =
        tally_tests::Cluster::new("1", &["--checkpoint-interval-ms", "600000"]).unwrap()
    else {
        return;
    };
    let (owner, other) = cluster.owner_and_other().await.unwrap();
    let (op, far) = (owner.operator(), other.operator());
    let secret = op.acme_with_alice(Some(USD)).await;
    let allowed = async |c: &Client| allowed(c, &secret).await;
    wait_for("the key on both", Duration::from_secs(30), || async {
        allowed(&op).await && allowed(&far).await
    })
    .await;
    let call = Call {
        request_id: "over".into(),
        org: "acme".into(),
        user: "alice".into(),
        key: "alice-key".into(),
        cost: USD + USD / 5,
        json: false,
    };
    let _ = publish(&producer(&cluster.broker), "tally.usage", &[call], |_| {
        false
    })
    .await;
    wait_for("alice cut off", Duration::from_secs(30), || async {
        !allowed(&op).await
    })
    .await;
    let _ = far
        .patch(
            "/v1/orgs/acme/users/alice",
            json!({"monthly_limit_micros": 10 * USD}),
        )
        .await
        .expect(200);
    wait_for(
        "the raise on the owner",
        Duration::from_secs(30),
        || async { allowed(&op).await },
    )
    .await;
    owner.kill9().unwrap();
    wait_for(
        "the other owning the partition",
        Duration::from_secs(60),
        || async { owned(&other).await == 1 },
    )
    .await;
    let events = async || -> Vec<String> {
        let listed = far.get("/v1/orgs/acme/enforcement").await.expect(200);
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["subject_id"] == "alice" && is_cut_or_lift(e))
            .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut alice = events().await;
        alice.sort();
        if alice == ["cut_off", "cutoff_lifted"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's cutoff and lift after the owner's kill: {alice:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(allowed(&far).await);
    other.stop().unwrap();
}

/// Revocation holds from the next request on every process: a token known
/// to both processes, revoked through one, is refused by the other at
/// once (an org's tokens: the org's log head is read per request; gateway
/// tokens of every org: their table). A gateway token of every org made
/// on one process works on the other at once.
#[tokio::test]
async fn a_token_revoked_on_one_process_is_refused_by_the_other_at_once() {
    let Some((broker, backend)) = services("kafka_revoke").await else {
        return;
    };
    let (a, b) = two_processes(&backend, &broker).await;
    let op = a.operator();
    org_fixture(&op, "lima", 1, 1, None).await;
    let secret = auth_key(&op, "lima").await;
    let mint = async |id: &str, role: &str| {
        op.post("/v1/orgs/lima/tokens", json!({"id": id, "role": role}))
            .await
            .expect(201)["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let admin = mint("adm", "admin").await;
    let gateway = mint("gw", "gateway").await;
    let edge = op
        .post("/v1/gateway-tokens", json!({"id": "edge", "name": "edge"}))
        .await
        .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Made on a, known on b at once (read from the table).
    let _ = b
        .client(&edge)
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    // The org's tokens reach b with the relayed entity log.
    wait_for("lima's tokens on b", Duration::from_secs(30), || async {
        b.client(&admin).get("/v1/orgs/lima").await.status == 200
            && b.client(&gateway)
                .post("/v1/authorize", json!({"api_key": secret}))
                .await
                .status
                == 200
    })
    .await;
    // Revoked through a, refused by b on its next request; and the other
    // way round.
    assert_eq!(op.delete("/v1/orgs/lima/tokens/adm").await.status, 204);
    assert_eq!(
        b.client(&admin).get("/v1/orgs/lima").await.error(401),
        "unauthorized"
    );
    assert_eq!(
        b.operator().delete("/v1/orgs/lima/tokens/gw").await.status,
        204
    );
    assert_eq!(
        a.client(&gateway)
            .post("/v1/authorize", json!({"api_key": secret}))
            .await
            .error(401),
        "unauthorized"
    );
    assert_eq!(op.delete("/v1/gateway-tokens/edge").await.status, 204);
    assert_eq!(
        b.client(&edge)
            .post("/v1/authorize", json!({"api_key": secret}))
            .await
            .error(401),
        "unauthorized"
    );
    a.stop().unwrap();
    b.stop().unwrap();
}

/// The Python client a gateway would use, or `None` (a skip).
fn kafka_python() -> Option<String> {
    match std::env::var("TALLY_TEST_KAFKA_PYTHON") {
        Ok(p) => Some(p),
        Err(_) if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() => {
            panic!("TALLY_TEST_KAFKA_PYTHON is not set: run scripts/test.sh")
        }
        Err(_) => {
            eprintln!("skipped: no Python Kafka client (TALLY_TEST_KAFKA_PYTHON)");
            None
        }
    }
}

/// A gateway that publishes with confluent-kafka's defaults (librdkafka's
/// `consistent_random` partitioner, a CRC32: most messages land on a
/// partition that does not meter their org) is counted exactly: each such
/// message is forwarded to its org's partition, and one of the two
/// processes killed with kill -9 mid-stream loses nothing and counts
/// nothing twice (a forward repeated after the crash is a duplicate).
#[tokio::test]
async fn any_partitioner_is_counted_exactly_through_a_kill_9() {
    let Some(python) = kafka_python() else {
        return;
    };
    let Some((broker, backend)) = services("kafka_any_partitioner").await else {
        return;
    };
    let (a, b) = two_processes(&backend, &broker).await;
    let op = a.operator();
    let orgs = ["alpha", "bravo", "charlie", "delta", "echo"];
    for org in orgs {
        org_fixture(&op, org, 10, 2, None).await;
    }
    let calls = calls(&orgs, 10, 20_000, 11, 1);
    let e = expected(&calls, 2);
    // 10 % published twice, as a gateway's retries would.
    let file = tally_tests::temp_dir("any-partitioner").join("events.jsonl");
    let mut lines = String::new();
    for (i, c) in calls.iter().enumerate() {
        let (value, _) = c.value(ms_now());
        let times = if i % 10 == 7 { 2 } else { 1 };
        lines.push_str(
            &json!({"key": c.org, "value": String::from_utf8(value).unwrap(), "times": times})
                .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&file, lines).unwrap();
    let mut producer = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/produce_default.py"
        ))
        .args([&broker.brokers(), "tally.usage", file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-stream (6 000 messages out, some counted), b dies without a word.
    let stdout = producer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the producer stalled");
        if line == "sent 6000" {
            break;
        }
    }
    wait_for("usage counted", Duration::from_secs(120), || async {
        let mut counted = 0;
        for org in orgs {
            counted += org_spend(&op, org).await;
        }
        counted > 0
    })
    .await;
    b.kill9().unwrap();
    let status = tokio::task::spawn_blocking(move || producer.wait())
        .await
        .unwrap()
        .unwrap();
    reader.join().unwrap();
    let last: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "the producer failed: {last:?}");
    assert_eq!(
        last.last().map(String::as_str),
        Some("done 22000"),
        "{last:?}"
    );
    // b comes back; a took its partitions meanwhile.
    let b = start(&backend, &broker);
    ready(&b).await;
    wait_for_totals(&op, &e, Duration::from_secs(240)).await;
    check_every_figure(&op, &e).await;
    // Nothing was dead-lettered: forwarded, not refused.
    let dead = op.get("/v1/dead-letters?limit=10").await.expect(200);
    assert!(dead["items"].as_array().unwrap().is_empty(), "{dead}");
    let text = tally_tests::metrics_text(&a.url).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("tally_usage_forwarded_total"))
        .unwrap_or_else(|| panic!("no forwarded counter:\n{text}"));
    eprintln!("FIGURE any partitioner: {line} on the survivor, 22 000 messages published");
    // Forwarded messages moved their partitions' positions: when b stops,
    // a takes b's partitions from b's checkpoints and forwards nothing
    // again.
    let forwarded = || async {
        let text = tally_tests::metrics_text(&a.url).await;
        text.lines()
            .find(|l| l.starts_with("tally_usage_forwarded_total "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = forwarded().await;
    b.stop().unwrap();
    wait_for(
        "a owns every partition",
        Duration::from_secs(120),
        || async { owned(&a).await == 4 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        forwarded().await,
        before,
        "forwarded again after the handover"
    );
    check_every_figure(&op, &e).await;
    a.stop().unwrap();
}

/// Cutoffs and lifts: not thresholds nor forecasts, which depend on the
/// day of the month the test runs.
fn is_cut_or_lift(e: &Value) -> bool {
    e["event"] == "cut_off" || e["event"] == "cutoff_lifted"
}
