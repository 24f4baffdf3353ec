//! `tally rebuild-projections` drops every read model and projects the
//! entity log again: the admin's view afterwards is the same.

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

#[tokio::test]
async fn rebuilt_read_models_equal_the_live_ones() {
    let backend = Backend::sqlite("rebuild");
    let tally = Tally::start(&backend).unwrap();
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
    let usage = json!({"events": [
        {"request_id": "a", "org_id": "acme", "user_id": "ann", "cost_micros": 700, "occurred_at": now_rfc3339()},
        {"request_id": "b", "org_id": "acme", "user_id": "cid", "api_key_id": "k1", "cost_micros": 1_300, "occurred_at": now_rfc3339()},
    ]});
    assert_eq!(op.post("/v1/usage", usage).await.expect(200)["accepted"], 2);
    let before = view(&op).await;
    let Backend::Sqlite(dir) = &backend else {
        unreachable!()
    };
    let args = ["--data-dir".to_owned(), dir.display().to_string()];
    // Not under the running service: refused, and it serves on unharmed.
    refused_while_served(&args);
    refused_while_served_to("reset-usage-positions", &args);
    assert_eq!(view(&op).await, before);
    tally.stop().unwrap();

    let stdout = rebuilt(&args);
    assert!(
        stdout.contains("rebuilt read models from 24 events"),
        "{stdout}"
    );

    let tally = Tally::start(&backend).unwrap();
    assert_eq!(view(&tally.operator()).await, before);
    tally.stop().unwrap();
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
    let _ = rebuilt(&args);
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
