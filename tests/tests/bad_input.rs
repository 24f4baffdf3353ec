//! Bad input gets a clear 4xx and changes nothing; a batch with bad items
//! applies the good ones and names the bad ones by index; duplicates count
//! once. Against a real `tally serve`.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, assert_money_is_integer, now_rfc3339};

const USD: i64 = 1_000_000;
fn ev(req: &str, org: &str, user: &str, cost: Value) -> Value {
    json!({"request_id": req, "org_id": org, "user_id": user, "cost_micros": cost, "occurred_at": now()})
}

fn now() -> String {
    now_rfc3339()
}

/// The org's audit trail and member list: must not move on refused requests.
async fn state(op: &Client) -> (Value, Value) {
    (
        op.get("/v1/orgs/acme/events?limit=1000").await.expect(200),
        op.get("/v1/orgs/acme/users?status=active")
            .await
            .expect(200),
    )
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let tally = Tally::start_with(
        &Backend::sqlite("bad-input"),
        &["--body-bytes-max", "65536", "--usage-batch-len-max", "20"],
    )
    .unwrap();
    let op = tally.operator();
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme", "default_monthly_limit_micros": 10 * USD}),
        )
        .await
        .expect(201);
    let _ = op
        .post("/v1/orgs", json!({"id": "other", "name": "Other"}))
        .await
        .expect(201);
    let _ = op
        .post(
            "/v1/orgs/acme/users",
            json!({"id": "alice", "email": "alice@acme.test", "name": "Alice", "status": "active"}),
        )
        .await
        .expect(201);
    let token = op.post("/v1/orgs/acme/tokens", json!({})).await.expect(201);
    assert_eq!(token["org_id"], "acme");
    let acme = tally.client(token["token"].as_str().unwrap());
    let before = state(&op).await;

    // Authentication and org isolation.
    let anon = tally.anonymous();
    for (method, path) in [
        ("GET", "/v1/orgs/acme"),
        ("POST", "/v1/usage"),
        ("POST", "/v1/authorize"),
        ("GET", "/v1/orgs/acme/users"),
    ] {
        assert_eq!(
            anon.raw(method, path, b"{}").await.error(401),
            "unauthorized",
            "{method} {path}"
        );
    }
    assert_eq!(
        tally
            .client("not-a-token")
            .get("/v1/orgs/acme")
            .await
            .error(401),
        "unauthorized"
    );
    let forbidden = acme.get("/v1/orgs/other/users").await;
    assert_eq!(forbidden.status, 403);
    assert!(
        forbidden.body.get("items").is_none(),
        "no data for another org"
    );
    assert_eq!(
        acme.post(
            "/v1/orgs/other/users",
            json!({"email": "x@y.z", "name": "X"})
        )
        .await
        .error(403),
        "forbidden"
    );
    assert_eq!(
        acme.post("/v1/orgs", json!({"name": "Mine"}))
            .await
            .error(403),
        "forbidden"
    );
    assert_eq!(
        acme.post("/v1/authorize", json!({"api_key": "x"}))
            .await
            .error(403),
        "forbidden"
    );
    assert_eq!(
        acme.get("/v1/orgs/acme").await.expect(200)["id"],
        "acme",
        "its own org is fine"
    );

    // Malformed bodies, missing and unknown fields, bad values, bad ids.
    let users = "/v1/orgs/acme/users";
    assert_eq!(
        op.raw("POST", users, b"{\"email\": ").await.error(400),
        "invalid_input"
    );
    assert_eq!(
        op.raw("POST", users, b"[1, 2]").await.error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post(users, json!({"name": "No Email"})).await.error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post(
            users,
            json!({"email": "a@b.c", "name": "A", "colour": "red"})
        )
        .await
        .error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post(
            users,
            json!({"id": "bad id!", "email": "a@b.c", "name": "A"})
        )
        .await
        .error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post(
            users,
            json!({"id": "x".repeat(65), "email": "a@b.c", "name": "A"})
        )
        .await
        .error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post(users, json!({"email": "not-an-email", "name": "A"}))
            .await
            .error(400),
        "invalid_input"
    );
    for limit in [json!(0), json!(-5), json!(1.5), json!("10")] {
        let r = op.post(
            users,
            json!({"email": "a@b.c", "name": "A", "monthly_limit_micros": limit}),
        );
        assert_eq!(r.await.error(400), "invalid_input", "limit {limit}");
    }
    assert_eq!(
        op.post(users, json!({"id": "alice", "email": "x@b.c", "name": "A"}))
            .await
            .error(409),
        "conflict"
    );
    assert_eq!(
        op.post(users, json!({"email": "ALICE@acme.test", "name": "A"}))
            .await
            .error(409),
        "conflict"
    );
    assert_eq!(
        op.get("/v1/orgs/bad%20org").await.error(400),
        "invalid_input"
    );
    assert_eq!(op.get("/v1/orgs/nope").await.error(404), "not_found");
    assert_eq!(
        op.get("/v1/orgs/acme/users/ghost").await.error(404),
        "not_found"
    );
    assert_eq!(
        op.get("/v1/orgs/acme/users?sort=salary").await.error(400),
        "invalid_input"
    );
    assert_eq!(
        op.get("/v1/orgs/acme/users?limit=5000").await.error(400),
        "invalid_input"
    );
    assert_eq!(
        op.get("/v1/orgs/acme/users?cursor=zz").await.error(400),
        "invalid_input"
    );
    assert_eq!(
        op.get("/v1/orgs/acme/users?min_utilization=lots")
            .await
            .error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post(
            "/v1/orgs/acme/users/bulk",
            json!({"user_ids": ["alice", "ghost"], "status": "suspended"})
        )
        .await
        .error(404),
        "not_found"
    );
    assert_eq!(
        op.patch("/v1/orgs/acme", json!({"alert_thresholds": [0.5, 1.5]}))
            .await
            .error(400),
        "invalid_input"
    );
    assert_eq!(
        op.patch("/v1/orgs/acme/users/alice", json!({"status": "invited"}))
            .await
            .error(422),
        "rule_violated"
    );
    assert_eq!(
        op.post("/v1/orgs/acme/keys", json!({"name": "orphan"}))
            .await
            .error(400),
        "invalid_input"
    );
    assert_eq!(op.get("/v1/nothing-here").await.error(404), "not_found");
    // Bodies over the limit.
    let big = format!(
        "{{\"name\": \"{}\", \"email\": \"a@b.c\"}}",
        "x".repeat(70_000)
    );
    assert_eq!(
        op.raw("POST", users, big.as_bytes()).await.error(413),
        "too_large"
    );
    let batch: Vec<Value> = (0..21)
        .map(|i| ev(&format!("b{i}"), "acme", "alice", json!(1)))
        .collect();
    assert_eq!(
        op.post("/v1/usage", json!({"events": batch}))
            .await
            .error(413),
        "too_large"
    );
    assert_eq!(
        op.raw("POST", "/v1/usage", b"{\"events\": 5}")
            .await
            .error(400),
        "invalid_input"
    );
    assert_eq!(
        op.post("/v1/authorize", json!({"api_key": ""}))
            .await
            .error(400),
        "invalid_input"
    );

    assert_eq!(state(&op).await, before, "refused requests changed nothing");

    // One batch, good and bad items: the good ones count, the bad are named.
    let batch = json!({"events": [
        ev("r1", "acme", "alice", json!(USD)),
        ev("r2", "acme", "alice", json!(-1)),
        ev("r3", "acme", "alice", json!(1e20)),
        {"org_id": "acme", "user_id": "alice", "cost_micros": 5, "occurred_at": now()},
        ev("r5", "nope", "alice", json!(5)),
        ev("r6", "acme", "ghost", json!(5)),
        ev("r1", "acme", "alice", json!(USD)),
        ev("r7", "acme", "alice", json!(2 * USD)),
        ev("r8", "acme", "alice", json!(18446744073709551615u64)),
        {"request_id": "r9", "org_id": "acme", "user_id": "alice", "cost_micros": 5, "occurred_at": "last tuesday"},
        "not an object",
    ]});
    let r = op.post("/v1/usage", batch).await.expect(200);
    assert_eq!(r["accepted"], 2, "{r}");
    assert_eq!(r["duplicates"], 1, "{r}");
    let rejected: Vec<(i64, &str)> = r["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["index"].as_i64().unwrap(), x["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected,
        [
            (1, "invalid_cost"),
            (2, "invalid_cost"),
            (3, "missing_field"),
            (4, "unknown_org"),
            (5, "unknown_user"),
            (8, "invalid_cost"),
            (9, "malformed"),
            (10, "malformed"),
        ]
    );
    assert!(
        r["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| !x["message"].as_str().unwrap().is_empty())
    );
    // Sent again, the whole batch is duplicates or rejected: nothing counts twice.
    let again = op.post("/v1/usage", json!({"events": [ev("r1", "acme", "alice", json!(USD)), ev("r7", "acme", "alice", json!(2 * USD))]})).await.expect(200);
    assert_eq!(
        (again["accepted"].clone(), again["duplicates"].clone()),
        (json!(0), json!(2))
    );
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(alice["spend_micros"], 3 * USD);
    assert_eq!(alice["requests"], 2);
    assert_money_is_integer(&alice);

    // An org token reports its own org's usage only.
    let mixed = json!({"events": [ev("t1", "acme", "alice", json!(1)), ev("t2", "other", "alice", json!(1))]});
    let r = acme.post("/v1/usage", mixed).await.expect(200);
    assert_eq!(r["accepted"], 1);
    assert_eq!(r["rejected"][0]["code"], "forbidden_org");
    tally.stop().unwrap();
}

/// A read refuses query parameters it does not take, as the lists refuse
/// the ones they do not know (issue 15 saw `?month=2026-11` on a user
/// silently ignored, before details took it): the caller learns the
/// parameter is not read.
#[tokio::test]
async fn a_detail_read_refuses_query_parameters_it_does_not_take() {
    let tally = Tally::start(&Backend::sqlite("detail-params")).unwrap();
    let op = tally.operator();
    let _ = op.acme_with_alice(None).await;
    let _ = op
        .post("/v1/orgs/acme/groups", json!({"id": "eng", "name": "Eng"}))
        .await
        .expect(201);
    for path in [
        "/v1/orgs/acme",
        "/v1/orgs/acme/users/alice",
        "/v1/orgs/acme/groups/eng",
        "/v1/orgs/acme/keys/alice-key",
        "/v1/orgs/acme/webhook",
    ] {
        let r = op.get(&format!("{path}?monht=2026-11")).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(r.body.to_string().contains("monht"), "{path}: {}", r.body);
        // Without: as before.
        assert!(matches!(op.get(path).await.status, 200 | 404), "{path}");
    }
    // The webhook takes no month; the details do (tests/workflow.rs).
    let r = op.get("/v1/orgs/acme/webhook?month=2026-11").await;
    assert_eq!(r.status, 400, "{}", r.body);
    tally.stop().unwrap();
}
