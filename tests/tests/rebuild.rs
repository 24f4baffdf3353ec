//! `tally rebuild-projections` drops every read model and projects the
//! entity log again, and counts spend and usage again from the embedded
//! usage log where it holds everything metered: the admin's view
//! afterwards is the same.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Cluster, Tally, now_rfc3339, tally_bin};

/// What the read models answer; projections aside (they move with the
/// clock).
async fn view(op: &Client) -> Value {
    let mut v = json!({
        "org": op.get("/v1/orgs/acme").await.expect(200),
        "users": op.get("/v1/orgs/acme/users?status=removed").await.expect(200),
        "active": op.get("/v1/orgs/acme/users?sort=-spend").await.expect(200),
        "groups": op.get("/v1/orgs/acme/groups").await.expect(200),
        "keys": op.get("/v1/orgs/acme/keys").await.expect(200),
        "events": op.get("/v1/orgs/acme/events?limit=1000").await.expect(200),
    });
    tally_tests::without_projections(&mut v);
    v
}

/// [`view`], and the group `ops`, the member `ben` and usage by model,
/// member, group and key.
async fn view_with_usage(op: &Client) -> Value {
    let mut v = json!({
        "view": view(op).await,
        "ops": op.get("/v1/orgs/acme/groups/ops").await.expect(200),
        "ben": op.get("/v1/orgs/acme/users/ben").await.expect(200),
        "by_model": op.get("/v1/orgs/acme/usage?group_by=model").await.expect(200),
        "by_user": op.get("/v1/orgs/acme/usage?group_by=user").await.expect(200),
        "by_group": op.get("/v1/orgs/acme/usage?group_by=group").await.expect(200),
        "by_key": op.get("/v1/orgs/acme/usage?group_by=key").await.expect(200),
    });
    tally_tests::without_projections(&mut v);
    v
}

#[tokio::test]
async fn rebuilt_read_models_equal_the_live_ones() {
    rebuilt_equal_live(&Backend::sqlite("rebuild")).await;
}

#[tokio::test]
async fn rebuilt_read_models_equal_the_live_ones_on_postgresql() {
    if let Some(backend) = Backend::postgres("rebuild_equal").await.unwrap() {
        rebuilt_equal_live(&backend).await;
    }
}

/// One call's usage as a gateway sends it.
fn call(id: &str, user: &str, model: &str, provider: &str, cost_micros: i64) -> Value {
    json!({"request_id": id, "org_id": "acme", "user_id": user, "cost_micros": cost_micros,
        "model": model, "provider": provider, "input_tokens": cost_micros / 10,
        "output_tokens": cost_micros / 100, "occurred_at": now_rfc3339()})
}

async fn rebuilt_equal_live(backend: &Backend) {
    let tally = Tally::start(backend).unwrap();
    let op = tally.operator();
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme", "default_monthly_limit_micros": 9_000_000}),
        )
        .await
        .expect(201);
    for u in ["ann", "ben", "cid", "dot"] {
        let _ = op.add_active_user("acme", u).await;
    }
    let _ = op
        .post(
            "/v1/orgs/acme/groups",
            json!({"id": "ops", "name": "Ops", "monthly_limit_micros": 20_000_000}),
        )
        .await
        .expect(201);
    let _ = op
        .put("/v1/orgs/acme/groups/ops/members/ann")
        .await
        .expect(200);
    let _ = op
        .put("/v1/orgs/acme/groups/ops/members/ben")
        .await
        .expect(200);
    // Ben's usage while a member counts to the group, after it not: a
    // recount judges membership by log time, as live counting did.
    let usage = json!({"events": [
        call("ben-1", "ben", "gpt-4o", "openai", 900),
        call("ben-1", "ben", "gpt-4o", "openai", 900),
        call("ben-2", "ben", "claude-sonnet", "anthropic", 400),
    ]});
    let answer = op.post("/v1/usage", usage).await.expect(200);
    assert_eq!(
        (answer["accepted"].as_i64(), answer["duplicates"].as_i64()),
        (Some(2), Some(1)),
        "{answer}"
    );
    let _ = op
        .delete("/v1/orgs/acme/groups/ops/members/ben")
        .await
        .expect(200);
    let _ = op.post("/v1/orgs/acme/keys", json!({"id": "k1", "name": "k", "user_id": "cid", "group_ids": ["ops"], "features": ["chat"]})).await.expect(201);
    let _ = op
        .patch(
            "/v1/orgs/acme/keys/k1",
            json!({"features": ["chat", "embeddings"], "monthly_limit_micros": 3_000_000}),
        )
        .await
        .expect(200);
    // The key's life: its projection is rebuilt too.
    let _ = op.post("/v1/orgs/acme/keys", json!({"id": "k2", "name": "k2", "user_id": "cid", "expires_at": "2099-01-01T00:00:00Z"})).await.expect(201);
    let _ = op
        .patch(
            "/v1/orgs/acme/keys/k2",
            json!({"name": "k2 renamed", "user_id": null, "group_ids": ["ops"], "expires_at": "2098-01-01T00:00:00Z"}),
        )
        .await
        .expect(200);
    let _ = op
        .post(
            "/v1/orgs/acme/keys/k2/rotate",
            json!({"grace_seconds": 3600}),
        )
        .await
        .expect(200);
    let _ = op.delete("/v1/orgs/acme/users/dot").await.expect(200);
    let _ = op
        .patch(
            "/v1/orgs/acme",
            json!({"name": "Acme Inc", "alert_thresholds": [0.9]}),
        )
        .await
        .expect(200);
    let mut on_key = call("b", "cid", "gpt-4o", "openai", 1_300);
    on_key["api_key_id"] = json!("k1");
    let usage = json!({"events": [
        call("a", "ann", "gpt-4o", "openai", 700),
        on_key,
        call("ben-3", "ben", "gpt-4o", "openai", 50),
    ]});
    assert_eq!(op.post("/v1/usage", usage).await.expect(200)["accepted"], 3);
    let before = view_with_usage(&op).await;
    assert_eq!(before["ops"]["spend_micros"], 2_000, "{before}");
    assert_eq!(before["ben"]["spend_micros"], 1_350, "{before}");
    let args = backend.args();
    // Not under the running service: refused, and it serves on unharmed.
    refused_while_served(&args);
    refused_while_served_to("reset-usage-positions", &args);
    assert_eq!(view_with_usage(&op).await, before);
    tally.stop().unwrap();

    // Spend and usage lost or wrong in every rollup: the recount puts
    // back what the log says, and leaves enforcement as it was.
    let sql = tally_store::Db::open(&tally_store::DbOptions::new(backend.url()))
        .await
        .unwrap();
    for damage in [
        "DELETE FROM usage_daily WHERE kind = 'group'",
        "UPDATE usage_daily SET requests = requests + 5",
        "DELETE FROM spend_daily WHERE kind = 'user'",
        "UPDATE spend_monthly SET spend_micros = spend_micros * 2",
        "INSERT INTO spend_monthly (org_id, kind, subject_id, month, spend_micros, requests, \
         last_at_ms, fired_bps, cut_off, ordinal) VALUES ('acme', 'user', 'dot', 202001, 5, 1, 1, \
         0, 0, 0)",
    ] {
        assert!(sql.execute_raw(damage).await.unwrap() > 0, "{damage}");
    }
    let enforced = "SELECT COUNT(*) FROM enforcement_events";
    let events_before = sql.query_i64(enforced).await.unwrap();
    sql.close().await;

    // Under other options than the service counted with: refused, as a
    // recount would break usage down by 5 pairs where the service did by
    // 200.
    let mut fewer_models = args.clone();
    fewer_models.extend(["--usage-models-max".to_owned(), "5".to_owned()]);
    let stdout = rebuilt(&fewer_models);
    assert!(
        stdout.contains(
            "kept spend and usage by model as checkpoints wrote them: the service counts with \
             counting_rules=1 dedupe_window_ms=86400000 dedupe_entries_max=20000000 \
             future_skew_ms=300000 usage_models_max=200, this command was given \
             counting_rules=1 dedupe_window_ms=86400000 dedupe_entries_max=20000000 \
             future_skew_ms=300000 usage_models_max=5"
        ),
        "{stdout}"
    );
    let stdout = rebuilt(&args);
    assert!(
        stdout.contains("rebuilt read models from 24 events"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "counted spend and usage again from the usage log: 2 records, 6 events, 5 counted"
        ),
        "{stdout}"
    );
    let sql = tally_store::Db::open(&tally_store::DbOptions::new(backend.url()))
        .await
        .unwrap();
    assert_eq!(sql.query_i64(enforced).await.unwrap(), events_before);
    let old = "SELECT COUNT(*) FROM spend_monthly WHERE month = 202001";
    assert_eq!(
        sql.query_i64(old).await.unwrap(),
        [0],
        "a row the log never counted"
    );
    sql.close().await;

    let tally = Tally::start(backend).unwrap();
    assert_eq!(view_with_usage(&tally.operator()).await, before);
    tally.stop().unwrap();
}

/// A log purged after its retention no longer holds everything metered:
/// the rebuild says so and keeps spend and usage as checkpoints wrote them.
#[tokio::test]
async fn a_purged_usage_log_keeps_spend_as_checkpointed() {
    purged_keeps_spend(&Backend::sqlite("rebuild_purged")).await;
}

#[tokio::test]
async fn a_purged_usage_log_keeps_spend_as_checkpointed_on_postgresql() {
    if let Some(backend) = Backend::postgres("rebuild_purged").await.unwrap() {
        purged_keeps_spend(&backend).await;
    }
}

async fn purged_keeps_spend(backend: &Backend) {
    let no_retention = ["--usage-retention-days", "0"];
    let tally = Tally::start_with(backend, &no_retention).unwrap();
    let op = tally.operator();
    org_with_a_user(&op).await;
    let usage = json!({"events": [call("a", "ann", "gpt-4o", "openai", 700)]});
    assert_eq!(op.post("/v1/usage", usage).await.expect(200)["accepted"], 1);
    tally.stop().unwrap();
    // The first housekeeping after a start purges what was checkpointed.
    let tally = Tally::start_with(backend, &no_retention).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !tally
        .log_text()
        .contains("purged checkpointed usage past retention")
    {
        assert!(std::time::Instant::now() < deadline, "{}", tally.log_text());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = op_view(&tally).await;
    assert_eq!(before["ann"]["spend_micros"], 700, "{before}");
    tally.stop().unwrap();

    let stdout = rebuilt(&backend.args());
    assert!(
        stdout.contains(
            "kept spend and usage by model as checkpoints wrote them: records of the log up to \
             position 1 were purged after `usage_retention_days`"
        ),
        "{stdout}"
    );
    let tally = Tally::start(backend).unwrap();
    assert_eq!(op_view(&tally).await, before);
    tally.stop().unwrap();
}

/// The purged test's org: its member and its usage by model.
async fn op_view(tally: &Tally) -> Value {
    let op = tally.operator();
    let mut v = json!({
        "ann": op.get("/v1/orgs/acme/users/ann").await.expect(200),
        "by_model": op.get("/v1/orgs/acme/usage?group_by=model").await.expect(200),
    });
    tally_tests::without_projections(&mut v);
    v
}

fn rebuild(args: &[String]) -> std::process::Output {
    maintenance("rebuild-projections", args)
}

fn maintenance(command: &str, args: &[String]) -> std::process::Output {
    std::process::Command::new(tally_bin())
        .arg(command)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `rebuild-projections`, which must succeed: what it printed.
fn rebuilt(args: &[String]) -> String {
    tally_tests::succeeded(&rebuild(args))
}

/// `rebuild-projections` on the state of a running `tally serve` is refused
/// with a message that says why.
fn refused_while_served(args: &[String]) {
    refused_while_served_to("rebuild-projections", args);
}

/// A maintenance command on the state of a running `tally serve` is refused
/// with a message that says why.
fn refused_while_served_to(command: &str, args: &[String]) {
    let out = maintenance(command, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("a tally serve (or another maintenance command) is using")
            && stderr.contains("stop"),
        "{stderr}"
    );
}

async fn org_with_a_user(op: &Client) {
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let _ = op.add_active_user("acme", "ann").await;
}

#[tokio::test]
async fn rebuild_is_refused_while_an_embedded_serve_uses_the_postgresql_database() {
    let Some(backend) = Backend::postgres("rebuild_refused").await.unwrap() else {
        return;
    };
    let Backend::Postgres(url) = &backend else {
        unreachable!()
    };
    let args = ["--database-url".to_owned(), url.clone()];
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    org_with_a_user(&op).await;
    let before = view(&op).await;
    refused_while_served(&args);
    assert_eq!(view(&op).await, before);
    tally.stop().unwrap();
    let _ = rebuilt(&args);
}

#[tokio::test]
async fn rebuild_is_refused_while_a_distributed_serve_uses_the_database() {
    let Some(cluster) = Cluster::new("1", &[]).unwrap() else {
        return;
    };
    let Backend::Postgres(url) = &cluster.backend else {
        unreachable!()
    };
    let args = ["--database-url".to_owned(), url.clone()];
    let tally = cluster.start().unwrap();
    tally_tests::wait_ready(&tally.operator(), std::time::Duration::from_secs(60)).await;
    refused_while_served(&args);
    refused_while_served_to("reset-usage-positions", &args);
    tally.stop().unwrap();
    // Its usage log is a Kafka topic: spend is not counted again; nor
    // once its positions are reset (the log is named again at the next
    // claim, and the embedded log of this database is not the one counted).
    let stdout = rebuilt(&args);
    assert!(
        stdout.contains(
            "kept spend and usage by model as checkpoints wrote them: the usage log is kafka:"
        ),
        "{stdout}"
    );
    let _ = tally_tests::succeeded(&maintenance("reset-usage-positions", &args));
    let stdout = rebuilt(&args);
    assert!(
        stdout.contains(
            "kept spend and usage by model as checkpoints wrote them: partition 0's usage log \
             is not recorded"
        ),
        "{stdout}"
    );
}

/// The pid of the serve's state-lock connection on the database `url`
/// names, once there is one other than `not`.
async fn lock_pid(db: &tally_store::Db, not: Option<i64>) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let pids = db
            .query_i64(
                "SELECT pid::bigint FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'tally serve (state lock)'",
            )
            .await
            .unwrap();
        if let Some(pid) = pids.into_iter().find(|p| Some(*p) != not) {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no state lock other than {not:?} within 15 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A serve whose PostgreSQL state lock lost its connection (here an
/// operator's pg_terminate_backend; a restart or a dropped connection ends
/// it the same way) takes it again and keeps maintenance out; if a
/// maintenance command got it first, the serve stops instead of writing
/// under it.
#[tokio::test]
async fn a_lost_state_lock_is_taken_again_or_the_serve_stops() {
    let Some(backend) = Backend::postgres("state_lock_lost").await.unwrap() else {
        return;
    };
    let Backend::Postgres(url) = &backend else {
        unreachable!()
    };
    let args = ["--database-url".to_owned(), url.clone()];
    let sql = tally_store::Db::open(&tally_store::DbOptions::new(url.clone()))
        .await
        .unwrap();
    let mut tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    org_with_a_user(&op).await;
    let first = lock_pid(&sql, None).await;
    let _ = sql
        .execute_raw(&format!("SELECT pg_terminate_backend({first})"))
        .await
        .unwrap();
    let second = lock_pid(&sql, Some(first)).await;
    let out = rebuild(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("held by pid {second} (tally serve (state lock)"))
            && stderr.contains("pg_terminate_backend(pid)"),
        "{stderr}"
    );
    let _ = view(&op).await;
    assert!(
        tally
            .log_text()
            .contains("the state lock was lost and taken again")
    );

    // A maintenance command waits for the lock; when the serve's
    // connection goes, the command has it before the serve can take it
    // again (PostgreSQL grants a waiting request before later ones).
    let maintenance = tally_store::Db::open(&tally_store::DbOptions::new(url.clone()))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let _ = maintenance
            .execute_raw("SELECT pg_advisory_lock(7243921)")
            .await
            .unwrap();
        maintenance
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = sql
        .execute_raw(&format!("SELECT pg_terminate_backend({second})"))
        .await
        .unwrap();
    let maintenance = waiting.await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = tally.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the serve still runs 20 s after a maintenance command took its lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = tally.log_text();
    assert!(
        log.contains("the state lock was lost and another process took it"),
        "{log}"
    );
    maintenance.close().await;
    sql.close().await;
}
