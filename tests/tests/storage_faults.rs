//! Storage faults never lose acknowledged usage: the embedded service with
//! its data directory on a small tmpfs of its own, filled for real, while a
//! gateway posts batches. Every batch answered `accepted` is counted exactly
//! once, whatever happens next (a kill -9 while the disk is still full, or
//! space coming back); every refused batch and command is absent.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::{
    Backend, Client, Cluster, Tally, Tmpfs, now_rfc3339, owned, wait_for_spend, wait_ready,
};

const BATCH_LEN: usize = 200;
const COST_MICROS: i64 = 1_000;
/// How long a test posts before the disk must have filled.
const BATCHES_MAX: usize = 3_000;

fn batch(n: usize) -> Value {
    batch_of(n, BATCH_LEN)
}

fn batch_of(n: usize, len: usize) -> Value {
    let at = now_rfc3339();
    let events: Vec<Value> = (0..len)
        .map(|i| {
            json!({
                "request_id": format!("b{n}-{i}"), "org_id": "acme", "user_id": "alice",
                "api_key_id": "alice-key", "model": "gpt-4o", "provider": "openai",
                "input_tokens": 1000, "output_tokens": 250,
                "cost_micros": COST_MICROS, "occurred_at": at,
            })
        })
        .collect();
    json!({ "events": events })
}

struct Run {
    disk: Tmpfs,
    filler: std::path::PathBuf,
    secret: String,
    accepted: Vec<usize>,
    refused: Vec<usize>,
}

/// An org with alice and her key on a 16 MiB disk, filled to its last
/// 2 MiB; then batches until the store refuses them.
async fn until_the_disk_is_full(name: &str) -> anyhow::Result<(Tally, Run)> {
    let disk = Tmpfs::mount(name, "16m")?;
    let backend = Backend::Sqlite(disk.dir.clone());
    let tally = Tally::start(&backend)?;
    let op = tally.operator();
    let secret = op.acme_with_alice(None).await;
    let filler = disk.fill("filler", 2 << 20)?;

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for n in 0..BATCHES_MAX {
        let r = op.post("/v1/usage", batch(n)).await;
        match r.status {
            200 => {
                assert_eq!(
                    r.body,
                    json!({"accepted": BATCH_LEN, "duplicates": 0, "rejected": []}),
                    "batch {n}"
                );
                accepted.push(n);
            }
            503 => {
                assert_eq!(r.body["error"]["code"], "unavailable", "{}", r.body);
                let message = r.body["error"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("disk is full"), "{message}");
                assert!(
                    r.retry_after
                        .as_deref()
                        .is_some_and(|s| s.parse::<u32>().is_ok()),
                    "a 503 says when to retry: {:?}",
                    r.retry_after
                );
                refused.push(n);
                if refused.len() == 5 {
                    break;
                }
            }
            other => panic!("batch {n}: unexpected {other}: {}", r.body),
        }
    }
    assert!(
        refused.len() == 5,
        "the disk never filled: {} batches accepted",
        accepted.len()
    );
    assert!(
        !accepted.is_empty(),
        "the disk was full before the first batch"
    );
    eprintln!(
        "{} batches accepted, then refused from batch {}",
        accepted.len(),
        refused[0]
    );
    Ok((
        tally,
        Run {
            disk,
            filler,
            secret,
            accepted,
            refused,
        },
    ))
}

/// While the store cannot write: readiness says why, the gauge is 0,
/// authorize and admin reads answer, a command is refused and leaves no
/// trace.
async fn while_full(tally: &Tally, run: &Run) {
    let op = tally.operator();
    let ready = op.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let message = ready.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the store cannot write (the disk is full)"),
        "{message}"
    );
    let metrics = op.metrics().await;
    assert!(
        metrics.lines().any(|l| l == "tally_store_writable 0"),
        "the gauge shows the fault"
    );
    let auth = op
        .post("/v1/authorize", json!({"api_key": run.secret}))
        .await
        .expect(200);
    assert_eq!(auth["allowed"], true, "{auth}");
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(alice["id"], "alice");
    let refused = op
        .post(
            "/v1/orgs/acme/users",
            json!({"id": "mallory", "email": "m@a.test", "name": "Mallory"}),
        )
        .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.retry_after.is_some());
    // The fault is logged once, not per request.
    let log = tally.log_text();
    assert_eq!(
        log.matches("the store cannot write: refusing usage and commands")
            .count(),
        1,
        "{log}"
    );
}

/// Exactly the accepted batches count; the refused ones are not even known
/// as duplicates; the refused command left nothing.
async fn exactly_what_was_accepted(op: &Client, run: &Run) {
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    let accepted = run.accepted.len() as i64;
    assert_eq!(
        alice["spend_micros"],
        json!(accepted * BATCH_LEN as i64 * COST_MICROS),
        "{alice}"
    );
    assert_eq!(alice["requests"], json!(accepted * BATCH_LEN as i64));
    assert_eq!(op.get("/v1/orgs/acme/users/mallory").await.status, 404);
    let events = op.get("/v1/orgs/acme/events?limit=1000").await.expect(200);
    assert!(
        !events.to_string().contains("mallory"),
        "a refused command left an event: {events}"
    );
    let again = op
        .post("/v1/usage", batch(run.accepted[0]))
        .await
        .expect(200);
    assert_eq!(again["duplicates"], json!(BATCH_LEN), "{again}");
    let refused = op
        .post("/v1/usage", batch(run.refused[0]))
        .await
        .expect(200);
    assert_eq!(
        refused["accepted"],
        json!(BATCH_LEN),
        "a refused batch counts nowhere, not even as seen: {refused}"
    );
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(
        alice["spend_micros"],
        json!((accepted + 1) * BATCH_LEN as i64 * COST_MICROS)
    );
}

#[tokio::test]
async fn killed_while_the_disk_is_full_it_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let (tally, run) = until_the_disk_is_full("full-kill").await?;
    while_full(&tally, &run).await;
    // kill -9 with the disk still full; then the same files on a bigger one.
    tally.kill9()?;
    run.disk.resize("64m")?;
    let tally = Tally::start(&Backend::Sqlite(run.disk.dir.clone()))?;
    exactly_what_was_accepted(&tally.operator(), &run).await;
    Ok(())
}

#[tokio::test]
async fn when_space_comes_back_it_resumes_by_itself() -> anyhow::Result<()> {
    let (tally, run) = until_the_disk_is_full("full-free").await?;
    while_full(&tally, &run).await;
    std::fs::remove_file(&run.filler)?;
    let op = tally.operator();
    wait_ready(&op, Duration::from_secs(30)).await;
    assert!(
        op.metrics()
            .await
            .lines()
            .any(|l| l == "tally_store_writable 1")
    );
    exactly_what_was_accepted(&op, &run).await;
    // Commands work again too, and after a clean restart every figure holds.
    let _ = op
        .post(
            "/v1/orgs/acme/users",
            json!({"id": "mallory", "email": "m@a.test", "name": "Mallory"}),
        )
        .await
        .expect(201);
    let before = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    let tally = tally.restart()?;
    let after = tally
        .operator()
        .get("/v1/orgs/acme/users/alice")
        .await
        .expect(200);
    assert_eq!(before["spend_micros"], after["spend_micros"]);
    assert_eq!(before["requests"], after["requests"]);
    Ok(())
}

/// A PostgreSQL server and a broker of the test's own, and the `serve` flags
/// of distributed mode on them.
/// Distributed mode: PostgreSQL is killed (-9, every backend with it) and
/// restarted while usage streams in and admins add members. Every
/// acknowledged event counts exactly once, every acknowledged command is
/// there, a refused one is either absent or (its commit landed after all)
/// present once; the process is ready again without a restart.
#[tokio::test]
async fn postgres_killed_under_ingest_and_commands_loses_nothing() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::new("2", &[])? else {
        return Ok(());
    };
    let (pg, tally) = (&cluster.pg, cluster.start()?);
    let op = tally.operator();
    wait_ready(&op, Duration::from_secs(60)).await;
    let _ = op.acme_with_alice(None).await;

    // Usage and commands stream until a second after PostgreSQL is back; it
    // stays away longer than a connection is waited for (10 s), so that
    // requests are refused, not only delayed.
    const LEN: usize = 50;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = {
        let stop = std::sync::Arc::clone(&stop);
        move || stop.load(std::sync::atomic::Ordering::SeqCst)
    };
    let ingest = tokio::spawn({
        let (op, stopped) = (op.clone(), stopped.clone());
        async move {
            let (mut batches, mut accepted) = (0usize, 0i64);
            while !stopped() {
                let r = op.post("/v1/usage", batch_of(batches, LEN)).await;
                assert_eq!(
                    r.status, 200,
                    "usage goes to Kafka, not to PostgreSQL: {}",
                    r.body
                );
                accepted += r.body["accepted"].as_i64().unwrap_or_default();
                batches += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (batches, accepted)
        }
    });
    let commands = tokio::spawn({
        let op = op.clone();
        async move {
            let mut statuses = Vec::new();
            while !stopped() {
                let i = statuses.len();
                let r = op
                    .post(
                        "/v1/orgs/acme/users",
                        json!({"id": format!("m{i}"), "email": format!("m{i}@a.test"), "name": "M"}),
                    )
                    .await;
                if r.status == 503 {
                    assert!(r.retry_after.is_some(), "{}", r.body);
                }
                statuses.push(r.status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            statuses
        }
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    pg.kill9()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let down = loop {
        let r = op.get("/readyz").await;
        if r.status == 503 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "still ready 30 s into the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let auth = op.post("/v1/authorize", json!({"api_key": "nope"})).await;
    assert_eq!(
        auth.status, 200,
        "authorize answers from memory: {}",
        auth.body
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restart()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (batches, accepted) = ingest.await?;
    let statuses = commands.await?;
    assert_eq!(
        accepted,
        (batches * LEN) as i64,
        "the broker took every event"
    );
    let refused = statuses.iter().filter(|s| **s == 503).count();
    eprintln!(
        "{batches} batches; commands: {} created, {refused} refused while PostgreSQL was away; \
         readyz then: {}",
        statuses.iter().filter(|s| **s == 201).count(),
        down.body
    );
    assert!(refused > 0, "the outage refused no command: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 503),
        "{statuses:?}"
    );
    let members = statuses.len();
    wait_ready(&op, Duration::from_secs(60)).await;

    // A refused command, retried, is created now or was created once.
    for (i, status) in statuses.iter().enumerate() {
        if *status == 201 {
            continue;
        }
        let r = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": format!("m{i}"), "email": format!("m{i}@a.test"), "name": "M"}),
            )
            .await;
        assert!(
            r.status == 201 || r.status == 409,
            "m{i}: {} {}",
            r.status,
            r.body
        );
    }
    let log = op.get("/v1/orgs/acme/events?limit=1000").await.expect(200);
    let items = log["items"].as_array().expect("items");
    for i in 0..members {
        let id = format!("m{i}");
        let added = items
            .iter()
            .filter(|e| e["type"] == "user_added" && e["user_id"] == id.as_str())
            .count();
        assert_eq!(added, 1, "{id} added once: {log}");
    }
    // Every event the broker took counts, once.
    let want = accepted * COST_MICROS;
    let alice = wait_for_spend(&op, "alice", want).await;
    assert_eq!(alice["requests"], json!(accepted));
    // And stays there after a clean restart.
    let tally = tally.restart()?;
    let op = tally.operator();
    wait_ready(&op, Duration::from_secs(60)).await;
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(alice["spend_micros"], json!(want));
    Ok(())
}

/// How many partitions a process meters (from its metrics).
/// Distributed mode: an org and a member added on one process just before
/// PostgreSQL dies, whose usage reaches the owner of the org's partition
/// before the entity log's relay could tell it about them. The owner cannot read
/// the member from SQL while the database is away; the usage waits for it
/// instead of being dead-lettered as unattributable, and counts once the
/// database is back. The relay polls once a minute here, so that it cannot
/// bring the member first.
#[tokio::test]
async fn usage_of_a_member_the_owner_has_not_seen_waits_for_the_database() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::new("1", &["--kafka-relay-interval-ms", "60000"])? else {
        return Ok(());
    };
    let pg = &cluster.pg;
    let (owner, other) = cluster.owner_and_other().await?;
    // The org and its member are created on the other process: the owner
    // has seen neither when the usage arrives.
    let op = other.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let _ = op.add_active_user("acme", "late").await;
    pg.kill9()?;
    let ev = json!({"events": [{
        "request_id": "late-1", "org_id": "acme", "user_id": "late",
        "cost_micros": 7_000, "occurred_at": now_rfc3339(),
    }]});
    let r = op.post("/v1/usage", ev).await.expect(200);
    assert_eq!(r["accepted"], 1, "{r}");
    // Longer than a connection is waited for (10 s): reading the log fails.
    tokio::time::sleep(Duration::from_secs(13)).await;
    pg.restart()?;
    let op = owner.operator();
    wait_ready(&op, Duration::from_secs(60)).await;
    let _ = wait_for_spend(&op, "late", 7_000).await;
    let dead = op.get("/v1/orgs/acme/dead-letters").await.expect(200);
    assert_eq!(dead["items"], json!([]), "{dead}");
    Ok(())
}

/// A command that meets the full disk itself (the first write to fail):
/// refused with 503, and neither its event nor its read-model row exists
/// once there is room again; then it succeeds.
#[tokio::test]
async fn a_command_refused_by_a_full_disk_leaves_no_trace() -> anyhow::Result<()> {
    let disk = Tmpfs::mount("full-command", "16m")?;
    let tally = Tally::start(&Backend::Sqlite(disk.dir.clone()))?;
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let filler = disk.fill("filler", 0)?;
    // Users with long names until one is refused (the WAL may have room for
    // a few pages after the file system is full).
    let name = "n".repeat(200);
    let mut refused = None;
    for i in 0..200 {
        let r = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": format!("u{i}"), "email": format!("u{i}@a.test"), "name": name}),
            )
            .await;
        match r.status {
            201 => {}
            503 => {
                assert!(r.retry_after.is_some(), "{}", r.body);
                refused = Some(i);
                break;
            }
            other => panic!("u{i}: {other} {}", r.body),
        }
    }
    let refused = refused.expect("no command was refused on a full disk");
    let log = tally.log_text();
    assert!(
        log.contains(r#"path="entity_log" reason="the disk is full""#),
        "the command found the fault: {log}"
    );
    std::fs::remove_file(&filler)?;
    wait_ready(&op, Duration::from_secs(30)).await;
    let id = format!("u{refused}");
    assert_eq!(
        op.get(&format!("/v1/orgs/acme/users/{id}")).await.status,
        404
    );
    let events = op.get("/v1/orgs/acme/events?limit=1000").await.expect(200);
    assert!(
        !events.to_string().contains(&format!("\"{id}\"")),
        "{events}"
    );
    let users = op.get("/v1/orgs/acme/users?limit=1000").await.expect(200);
    assert_eq!(users["items"].as_array().map(Vec::len), Some(refused));
    let _ = op
        .post(
            "/v1/orgs/acme/users",
            json!({"id": id, "email": "again@a.test", "name": "again"}),
        )
        .await
        .expect(201);
    // And after a restart, the same.
    let tally = tally.restart()?;
    let users = tally
        .operator()
        .get("/v1/orgs/acme/users?limit=1000")
        .await
        .expect(200);
    assert_eq!(users["items"].as_array().map(Vec::len), Some(refused + 1));
    Ok(())
}

/// Distributed mode: a rebalance while PostgreSQL is away (the other
/// process died) cannot claim partitions until the database is back. The
/// process waits for it instead of giving up and exiting into the same
/// outage, and meters every partition once it is back.
#[tokio::test]
async fn a_rebalance_during_a_postgres_outage_waits_for_the_database() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::new("2", &[])? else {
        return Ok(());
    };
    let pg = &cluster.pg;
    let mut a = cluster.start()?;
    let b = cluster.start()?;
    let op = a.operator();
    wait_ready(&op, Duration::from_secs(60)).await;
    wait_ready(&b.operator(), Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (owned(&a).await, owned(&b).await) != (1, 1) {
        assert!(Instant::now() < deadline, "the partitions were not shared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = op.acme_with_alice(None).await;
    let r = op.post("/v1/usage", batch_of(0, 10)).await.expect(200);
    assert_eq!(r["accepted"], 10);

    pg.kill9()?;
    b.kill9()?;
    // The group notices b is gone after its session (6 s) and gives both
    // partitions to a, whose claims wait: its revocation's checkpoint waits
    // 10 s for a connection, then the claims outlast the 30 s a claim that
    // fails for other reasons is retried.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        a.try_wait()?.is_none(),
        "tally exited during the outage; log:\n{}",
        a.log_text()
    );
    pg.restart()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while owned(&a).await != 2 {
        assert!(
            Instant::now() < deadline,
            "a never claimed both partitions; log:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_ready(&op, Duration::from_secs(60)).await;
    let r = op.post("/v1/usage", batch_of(1, 10)).await.expect(200);
    assert_eq!(r["accepted"], 10);
    let _ = wait_for_spend(&op, "alice", 20 * COST_MICROS).await;
    Ok(())
}
