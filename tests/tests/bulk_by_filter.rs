//! A bulk change by the member list's filters instead of ids, previewed
//! first (`dry_run`), and limits reset to the org's default: on a real
//! `tally serve`, SQLite and PostgreSQL.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_rfc3339, wait_for_spend};

const USD: i64 = 1_000_000;

async fn audit_len(op: &Client) -> usize {
    op.get("/v1/orgs/acme/events?limit=1000").await.expect(200)["items"]
        .as_array()
        .unwrap()
        .len()
}

async fn bulk_by_filter(backend: Backend) {
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme", "default_monthly_limit_micros": 50 * USD}),
        )
        .await
        .expect(201);
    for g in ["eng", "hot"] {
        let _ = op
            .post("/v1/orgs/acme/groups", json!({"id": g, "name": g}))
            .await
            .expect(201);
    }
    // Six members with $10 each; u0, u1, u2 in eng. u0 spends $9 (90 %),
    // u1 $8.50 (85 %), u2 $1, u3 $9.50 (but not in eng).
    for i in 0..6 {
        let id = format!("u{i}");
        let _ = op.add_active_user("acme", &id).await;
        let joined = op
            .get(&format!("/v1/orgs/acme/users/{id}"))
            .await
            .expect(200);
        assert_eq!(
            (&joined["monthly_limit_micros"], &joined["limit_source"]),
            (&json!(50 * USD), &json!("org_default")),
            "{joined}"
        );
        let own = op
            .patch(
                &format!("/v1/orgs/acme/users/{id}"),
                json!({"monthly_limit_micros": 10 * USD}),
            )
            .await
            .expect(200);
        assert_eq!(own["limit_source"], "own", "{own}");
    }
    let _ = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"user_ids": ["u0", "u1", "u2"], "add_groups": ["eng"]}),
        )
        .await
        .expect(200);
    for (user, cost) in [
        ("u0", 9 * USD),
        ("u1", 8_500_000),
        ("u2", USD),
        ("u3", 9_500_000),
    ] {
        let _ = op
            .post(
                "/v1/usage",
                json!({"events": [{
                    "request_id": format!("r-{user}"), "org_id": "acme", "user_id": user,
                    "model": "m", "provider": "p", "input_tokens": 1, "output_tokens": 1,
                    "cost_micros": cost, "occurred_at": now_rfc3339(),
                }]}),
            )
            .await
            .expect(200);
        let _ = wait_for_spend(&op, user, cost).await;
    }
    let filter = json!({"group": "eng", "min_utilization": "0.8"});

    // The preview: what would change, and nothing written.
    let before = audit_len(&op).await;
    let preview = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"filter": filter, "add_groups": ["hot"], "dry_run": true}),
        )
        .await
        .expect(200);
    assert_eq!(
        preview,
        json!({"users": 2, "users_changed": 2, "changes": {"member_added": 2}, "dry_run": true})
    );
    assert_eq!(audit_len(&op).await, before, "a dry run writes nothing");
    let hot = op.get("/v1/orgs/acme/groups/hot").await.expect(200);
    assert_eq!(hot["member_count"], 0, "{hot}");

    // The change itself answers what the preview said.
    let done = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"filter": filter, "add_groups": ["hot"]}),
        )
        .await
        .expect(200);
    assert_eq!(
        done,
        json!({"users": 2, "users_changed": 2, "changes": {"member_added": 2}, "dry_run": false})
    );
    let members = op
        .get("/v1/orgs/acme/users?group=hot&sort=name")
        .await
        .expect(200);
    let ids: Vec<&str> = members["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["u0", "u1"]);

    // Limits back to the org's default ($50) for everyone in hot.
    let reset = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"filter": {"group": "hot"}, "reset_limit": true}),
        )
        .await
        .expect(200);
    assert_eq!(reset["changes"], json!({"user_limit_set": 2}), "{reset}");
    for (user, limit, source) in [
        ("u0", 50 * USD, "org_default"),
        ("u1", 50 * USD, "org_default"),
        ("u2", 10 * USD, "own"),
    ] {
        let u = op
            .get(&format!("/v1/orgs/acme/users/{user}"))
            .await
            .expect(200);
        assert_eq!(u["monthly_limit_micros"], limit, "{u}");
        assert_eq!(u["limit_source"], source, "{u}");
    }
    // The default's amount set as u0's own makes it theirs; a reset again
    // changes nothing more.
    let own = op
        .patch(
            "/v1/orgs/acme/users/u0",
            json!({"monthly_limit_micros": 50 * USD}),
        )
        .await
        .expect(200);
    assert_eq!(own["limit_source"], "own", "{own}");
    let again = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"filter": {"group": "hot"}, "reset_limit": true}),
        )
        .await
        .expect(200);
    assert_eq!(again["users_changed"], 1, "u0 only: {again}");
    // A filter that matches nobody changes nothing.
    let none = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"filter": {"q": "nobody"}, "status": "suspended"}),
        )
        .await
        .expect(200);
    assert_eq!(
        none,
        json!({"users": 0, "users_changed": 0, "changes": {}, "dry_run": false})
    );

    // Bad requests: a clear 400, nothing changed.
    let before = audit_len(&op).await;
    for (body, says) in [
        (
            json!({"user_ids": ["u0"], "filter": {"group": "eng"}, "status": "suspended"}),
            "exactly one",
        ),
        (json!({"status": "suspended"}), "exactly one"),
        (
            json!({"user_ids": ["u0"], "reset_limit": true, "monthly_limit_micros": 1}),
            "not both",
        ),
        (
            json!({"filter": {"status": "sleepy"}, "status": "suspended"}),
            "sleepy",
        ),
        (
            json!({"filter": {"min_utilization": "lots"}, "status": "suspended"}),
            "min_utilization",
        ),
        (
            json!({"filter": {"colour": "red"}, "status": "suspended"}),
            "colour",
        ),
    ] {
        let r = op.post("/v1/orgs/acme/users/bulk", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.body.to_string().contains(says), "{body}: {}", r.body);
    }
    assert_eq!(audit_len(&op).await, before);
    // A viewer may preview nothing: the route is the admins'.
    let viewer = op
        .post("/v1/orgs/acme/tokens", json!({"role": "viewer"}))
        .await
        .expect(201);
    let viewer = tally.client(viewer["token"].as_str().unwrap());
    let before = audit_len(&op).await;
    let _ = viewer
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"filter": {}, "status": "suspended", "dry_run": true}),
        )
        .await
        .error(403);
    assert_eq!(audit_len(&op).await, before);
    let all: Value = op.get("/v1/orgs/acme/users").await.expect(200);
    assert!(
        all["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["status"] == "active"),
        "{all}"
    );
    tally.stop().unwrap();
}

#[tokio::test]
async fn a_bulk_change_by_filter_is_previewed_then_made_on_sqlite() {
    bulk_by_filter(Backend::sqlite("bulk-filter")).await;
}

#[tokio::test]
async fn a_bulk_change_by_filter_is_previewed_then_made_on_postgres() {
    if let Some(backend) = Backend::postgres("bulkfilter").await.unwrap() {
        bulk_by_filter(backend).await;
    }
}
