//! The review's exactly-once defects, each shown on real processes: the
//! embedded service restarted, or two distributed processes on the real
//! broker and PostgreSQL.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

use tally_tests::{
    Backend, Client, Cluster, Tally, month_start_ms, now_ms, rfc3339, wait_for_spend,
};

const USD: i64 = 1_000_000;

fn event(request_id: &str, cost_micros: i64, at_ms: i64) -> Value {
    json!({
        "request_id": request_id, "org_id": "acme", "user_id": "alice",
        "model": "gpt-4o", "provider": "openai", "input_tokens": 10, "output_tokens": 5,
        "cost_micros": cost_micros, "occurred_at": rfc3339(at_ms),
    })
}

async fn post(op: &Client, events: Vec<Value>) -> Value {
    op.post("/v1/usage", json!({ "events": events }))
        .await
        .expect(200)
}

/// Restoring the dedupe window after a restart keeps what live eviction
/// keeps: the last minute behind the org's latest usage, however far past
/// the bound.
#[tokio::test]
async fn a_restart_past_the_dedupe_bound_keeps_counting_the_last_minute() -> anyhow::Result<()> {
    let backend = Backend::sqlite("exactly-once-dedupe");
    let tally = Tally::start_with(&backend, &["--dedupe-entries-max", "2"])?;
    let op = tally.operator();
    let _ = op.acme_with_alice(Some(1_000 * USD)).await;
    let at = now_ms() - 1_000;
    let three = (0..3).map(|i| event(&format!("r{i}"), 1, at)).collect();
    assert_eq!(post(&op, three).await["accepted"], 3);
    let _ = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(post(&op, vec![event("r3", 1, at)]).await["accepted"], 1);

    let tally = tally.restart()?;
    let op = tally.operator();
    let two = (4..6).map(|i| event(&format!("r{i}"), 1, at)).collect();
    let r = post(&op, two).await;
    assert_eq!(r["accepted"], 2, "{r}");
    let r = post(&op, vec![event("r1", 1, at)]).await;
    assert_eq!(r["duplicates"], 1, "{r}");
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(alice["spend_micros"], 6, "{alice}");
    tally.stop()
}

/// Late usage that cuts a subject off in the month before is followed by
/// the lift: nobody is left believing a block that no longer applies.
#[tokio::test]
async fn a_late_cutoff_of_the_month_before_is_lifted() -> anyhow::Result<()> {
    let backend = Backend::sqlite("exactly-once-late-cutoff");
    let tally = Tally::start(&backend)?;
    let op = tally.operator();
    let secret = op.acme_with_alice(Some(USD)).await;
    let start = month_start_ms(now_ms());
    let r = post(&op, vec![event("this-month", 10_000, start + 60_000)]).await;
    assert_eq!(r["accepted"], 1, "{r}");
    // The meter has begun this month (it checks every second) before the
    // late usage arrives.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let r = post(&op, vec![event("last-month", 2 * USD, start - 1_800_000)]).await;
    assert_eq!(r["accepted"], 1, "{r}");

    let this_month = &rfc3339(start)[..7];
    let last_month = &rfc3339(start - 1)[..7];
    let want = vec![
        ("cut_off".to_owned(), last_month.to_owned(), Value::Null),
        (
            "cutoff_lifted".to_owned(),
            this_month.to_owned(),
            json!("new_month"),
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = op.get("/v1/orgs/acme/enforcement").await.expect(200);
        let mut alice: Vec<(String, String, Value)> = listed["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|e| e["subject_id"] == "alice" && is_cut_or_lift(e))
            .map(|e| {
                (
                    e["event"].as_str().unwrap_or_default().to_owned(),
                    e["month"].as_str().unwrap_or_default().to_owned(),
                    e["reason"].clone(),
                )
            })
            .collect();
        alice.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        if alice == want {
            break;
        }
        assert!(Instant::now() < deadline, "{alice:?}: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still allowed: this month's spend is $0.01 of $1.
    let a = op
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    assert_eq!(a["allowed"], true, "{a}");
    tally.stop()
}

/// Distributed mode: the owner of the partition reads a member it has not
/// seen from SQL, and that read fails for a moment (here: the log's table
/// is renamed away for 3 s, an error that is not "the database is
/// unreachable"). The usage waits and counts; it is never dead-lettered
/// as `unknown_user`.
#[tokio::test]
async fn a_failed_catch_up_read_never_dead_letters_usage() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::new("1", &["--kafka-relay-interval-ms", "60000"])? else {
        return Ok(());
    };
    let (owner, other) = cluster.owner_and_other().await?;
    let op = other.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let _ = op.add_active_user("acme", "alice").await;
    cluster
        .pg
        .sql("postgres", "ALTER TABLE events RENAME TO events_away")?;
    let r = post(&op, vec![event("while-away", 7_000, now_ms() - 1_000)]).await;
    assert_eq!(r["accepted"], 1, "{r}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster
        .pg
        .sql("postgres", "ALTER TABLE events_away RENAME TO events")?;
    let op = owner.operator();
    let _ = wait_for_spend(&op, "alice", 7_000).await;
    let dead = op.get("/v1/orgs/acme/dead-letters").await.expect(200);
    assert_eq!(dead["items"], json!([]), "{dead}");
    Ok(())
}

/// Distributed mode: the owner of the partition counts an org created on
/// itself, checkpoints, and dies (-9) before the relay could tell the other
/// process about the org. The other claims the partition: it brings the
/// org up to date from SQL before restoring the checkpoint, so the month's
/// spend and the dedupe window carry over (before: the checkpoint's org was
/// skipped, its spend restarted at zero and a retry counted twice).
#[tokio::test]
async fn a_new_owner_restores_orgs_it_has_not_folded_yet() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::new("1", &["--kafka-relay-interval-ms", "60000"])? else {
        return Ok(());
    };
    let (owner, other) = cluster.owner_and_other().await?;
    let op = owner.operator();
    let _ = op.acme_with_alice(Some(1_000 * USD)).await;
    let at = now_ms() - 1_000;
    assert_eq!(
        post(&op, vec![event("first", 5_000, at)]).await["accepted"],
        1
    );
    let _ = wait_for_spend(&op, "alice", 5_000).await;
    let op = other.operator();
    assert_eq!(
        op.get("/v1/orgs/acme").await.status,
        404,
        "the other process has not seen the org yet"
    );
    owner.kill9()?;

    // A new call through the survivor adds to the month's spend; then the
    // retry of the first call is a duplicate.
    let r = post(&op, vec![event("second", 7_000, at)]).await;
    assert_eq!(r["accepted"], 1, "{r}");
    let _ = wait_for_spend(&op, "alice", 12_000).await;
    let r = post(
        &op,
        vec![event("first", 5_000, at), event("third", 1_000, at)],
    )
    .await;
    assert_eq!(r["accepted"], 2, "{r}");
    let alice = wait_for_spend(&op, "alice", 13_000).await;
    assert_eq!(alice["requests"], 3, "{alice}");
    let dead = op.get("/v1/orgs/acme/dead-letters").await.expect(200);
    assert_eq!(dead["items"], json!([]), "{dead}");
    Ok(())
}

/// Distributed mode: a gateway whose clock is 25 h ahead publishes straight
/// to the usage topic (the message's timestamp and `occurred_at` are its
/// own clock). Its event is refused as `from_the_future` against a server
/// clock, and an on-time event after it counts (before: the gateway's
/// clock was the log time, its event passed and moved the org's watermark
/// a day ahead, and every on-time event was refused as `too_late`).
#[tokio::test]
async fn a_gateway_clock_ahead_never_makes_on_time_usage_too_late() -> anyhow::Result<()> {
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(cluster) = Cluster::new("1", &[])? else {
        return Ok(());
    };
    let tally = cluster.start()?;
    let op = tally.operator();
    tally_tests::wait_ready(&op, Duration::from_secs(60)).await;
    let _ = op.acme_with_alice(Some(1_000 * USD)).await;

    let ahead = now_ms() + 25 * 3_600_000;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.broker.brokers())
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .create()?;
    let value = event("ahead", 3_000, ahead).to_string();
    let record = FutureRecord::<str, str>::to("tally.usage")
        .key("acme")
        .payload(&value)
        .timestamp(ahead)
        .headers(OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/json"),
        }));
    let _ = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = op.get("/v1/orgs/acme/dead-letters").await.expect(200);
        let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
        if dead["items"].as_array().is_some_and(|d| !d.is_empty()) || alice["requests"] != 0 {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "the ahead event was never judged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead["items"][0]["reason"], "from_the_future", "{dead}");

    let r = post(&op, vec![event("on-time", 2_000, now_ms() - 1_000)]).await;
    assert_eq!(r["accepted"], 1, "{r}");
    let alice = wait_for_spend(&op, "alice", 2_000).await;
    assert_eq!(alice["requests"], 1, "{alice}");
    // The gateway's clock was never the log time: the broker's was, or
    // (Tansu keeps the producer's timestamp) this process's stood in.
    let metrics = op.metrics().await;
    assert!(
        metrics.contains(r#"tally_usage_log_time_total{source="clamped"} 1"#)
            || metrics.contains(r#"tally_usage_log_time_total{source="broker"}"#),
        "{metrics}"
    );
    tally.stop()
}

/// Distributed mode: alice joins `eng` on the process that does not meter
/// acme, and the relay is slow (nothing relayed for 10 minutes), so the
/// owner has not followed the membership when her next call arrives. The
/// owner still counts that call for `eng`, as a replay would: usage is
/// judged with every membership change logged before it (before: the
/// owner looked the log up only for a user it did not know, and `eng`
/// stayed at 0).
#[tokio::test]
async fn a_membership_not_relayed_yet_counts_usage_logged_after_it() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::new("1", &["--kafka-relay-interval-ms", "600000"])? else {
        return Ok(());
    };
    let (owner, other) = cluster.owner_and_other().await?;
    let op = other.operator();
    let _ = op.acme_with_alice(Some(1_000 * USD)).await;
    op.add_group("acme", "eng", "Engineering", None, &[]).await;
    let r = post(&op, vec![event("before", 1_000, now_ms() - 1_000)]).await;
    assert_eq!(r["accepted"], 1, "{r}");
    let metered = owner.operator();
    let _ = wait_for_spend(&metered, "alice", 1_000).await;

    let _ = op
        .put("/v1/orgs/acme/groups/eng/members/alice")
        .await
        .expect(200);
    let r = post(&op, vec![event("after", 2_000, now_ms() - 1_000)]).await;
    assert_eq!(r["accepted"], 1, "{r}");
    let _ = wait_for_spend(&metered, "alice", 3_000).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let eng = metered.get("/v1/orgs/acme/groups/eng").await.expect(200);
        if eng["spend_micros"] == 2_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "eng counts the call alice made as a member: {eng}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Cutoffs and lifts: not thresholds nor forecasts, which depend on the
/// day of the month the test runs.
fn is_cut_or_lift(e: &Value) -> bool {
    e["event"] == "cut_off" || e["event"] == "cutoff_lifted"
}
