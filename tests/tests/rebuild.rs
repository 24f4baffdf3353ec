//! `tally rebuild-projections` drops every read model and projects the
//! entity log again: the admin's view afterwards is the same.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_rfc3339, tally_bin};

async fn view(op: &Client) -> Value {
    json!({
        "org": op.get("/v1/orgs/acme").await.expect(200),
        "users": op.get("/v1/orgs/acme/users?status=removed").await.expect(200),
        "active": op.get("/v1/orgs/acme/users?sort=-spend").await.expect(200),
        "groups": op.get("/v1/orgs/acme/groups").await.expect(200),
        "keys": op.get("/v1/orgs/acme/keys").await.expect(200),
        "events": op.get("/v1/orgs/acme/events?limit=1000").await.expect(200),
    })
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
    tally.stop().unwrap();

    let Backend::Sqlite(dir) = &backend else {
        unreachable!()
    };
    let out = std::process::Command::new(tally_bin())
        .args([
            "rebuild-projections",
            "--data-dir",
            &dir.display().to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("rebuilt read models from 18 events"),
        "{stdout}"
    );

    let tally = Tally::start(&backend).unwrap();
    assert_eq!(view(&tally.operator()).await, before);
    tally.stop().unwrap();
}
