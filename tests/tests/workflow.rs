//! The administrator's workflow through HTTP on a real `tally serve`
//! process, on SQLite (embedded) and on PostgreSQL: members, groups, keys,
//! limits, usage crossing 80 % and 100 %, authorize, lists — and every
//! figure identical after a clean restart and after kill -9.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, assert_money_is_integer, now_rfc3339};

const USD: i64 = 1_000_000;

async fn spend(op: &Client, req: &str, user: &str, key: Option<&str>, cost: i64) {
    let mut ev = json!({
        "request_id": req, "org_id": "acme", "user_id": user, "model": "gpt-4o",
        "provider": "openai", "input_tokens": 1200, "output_tokens": 300,
        "cost_micros": cost, "occurred_at": now_rfc3339(),
    });
    if let Some(k) = key {
        ev["api_key_id"] = json!(k);
    }
    let r = op
        .post("/v1/usage", json!({ "events": [ev] }))
        .await
        .expect(200);
    assert_eq!(
        r,
        json!({"accepted": 1, "duplicates": 0, "rejected": []}),
        "{req}"
    );
}

async fn authorize(op: &Client, secret: &str, feature: Option<&str>, user: Option<&str>) -> Value {
    let mut body = json!({ "api_key": secret });
    if let Some(f) = feature {
        body["feature"] = json!(f);
    }
    if let Some(u) = user {
        body["user_id"] = json!(u);
    }
    op.post("/v1/authorize", body).await.expect(200)
}

struct Secrets {
    alice: String,
    bob: String,
    eng: String,
}

/// Everything an admin or a gateway can read, for before/after comparisons.
async fn snapshot(op: &Client, s: &Secrets) -> Value {
    let mut v = json!({
        "org": op.get("/v1/orgs/acme").await.expect(200),
        "users": op.get("/v1/orgs/acme/users?sort=-spend").await.expect(200),
        "alice": op.get("/v1/orgs/acme/users/alice").await.expect(200),
        "groups": op.get("/v1/orgs/acme/groups").await.expect(200),
        "eng": op.get("/v1/orgs/acme/groups/eng").await.expect(200),
        "keys": op.get("/v1/orgs/acme/keys").await.expect(200),
        "enforcement": op.get("/v1/orgs/acme/enforcement").await.expect(200),
        "events": op.get("/v1/orgs/acme/events?limit=1000").await.expect(200),
        "authorize": [
            authorize(op, &s.alice, Some("chat"), None).await,
            authorize(op, &s.bob, None, None).await,
            authorize(op, &s.eng, Some("embeddings"), Some("carol")).await,
        ],
    });
    assert_money_is_integer(&v);
    // The month label and projections come from the clock; everything
    // else must match.
    v["org"]["month"] = Value::Null;
    tally_tests::without_projections(&mut v);
    v
}

fn user<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id)
        .unwrap()
}

async fn workflow(backend: Backend) {
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();

    // An org with a $50 default limit, five members, an Engineering group.
    let org = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme Corp", "default_monthly_limit_micros": 50 * USD}),
        )
        .await
        .expect(201);
    assert_eq!(org["alert_thresholds"], json!([0.5, 0.8, 1]));
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        let u = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": name, "email": format!("{name}@acme.test"), "name": name.to_uppercase()}),
            )
            .await
            .expect(201);
        assert_eq!(
            u["monthly_limit_micros"],
            50 * USD,
            "the org default is copied at join"
        );
        assert_eq!(u["status"], "invited");
    }
    let _ = op
        .post(
            "/v1/orgs/acme/groups",
            json!({"id": "eng", "name": "Engineering"}),
        )
        .await
        .expect(201);
    let bulk = op
        .post(
            "/v1/orgs/acme/users/bulk",
            json!({"user_ids": ["alice", "bob", "carol"], "add_groups": ["eng"]}),
        )
        .await
        .expect(200);
    assert_eq!(bulk["changes"], json!({"member_added": 3}));

    // Keys: two personal ones (which activate their owners) and one for the group.
    let key = async |body: Value| {
        let k = op.post("/v1/orgs/acme/keys", body).await.expect(201);
        k["secret"].as_str().unwrap().to_owned()
    };
    let secrets = Secrets {
        alice: key(json!({"id": "k-alice", "name": "alice laptop", "user_id": "alice", "features": ["chat"]})).await,
        bob: key(json!({"id": "k-bob", "name": "bob laptop", "user_id": "bob", "features": ["chat"]})).await,
        eng: key(json!({"id": "k-eng", "name": "eng shared", "group_ids": ["eng"], "features": ["chat", "embeddings"]}))
            .await,
    };
    let keys = op.get("/v1/orgs/acme/keys").await.expect(200);
    assert!(
        keys["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("secret").is_none()),
        "secrets are shown once"
    );
    let _ = op
        .patch("/v1/orgs/acme/users/carol", json!({"status": "active"}))
        .await
        .expect(200);
    // One individual limit.
    let bob = op
        .patch(
            "/v1/orgs/acme/users/bob",
            json!({"monthly_limit_micros": 100 * USD}),
        )
        .await
        .expect(200);
    assert_eq!(bob["monthly_limit_micros"], 100 * USD);
    assert_eq!(bob["status"], "active");

    // Usage: alice goes past 80 %, the others spend a little.
    spend(&op, "r-1", "alice", Some("k-alice"), 30 * USD).await;
    spend(&op, "r-2", "bob", Some("k-bob"), 20 * USD).await;
    spend(&op, "r-3", "carol", Some("k-eng"), 5 * USD).await;
    spend(&op, "r-4", "dave", None, USD).await;
    spend(&op, "r-5", "alice", Some("k-alice"), 12 * USD).await;
    let a = authorize(&op, &secrets.alice, Some("chat"), None).await;
    assert_eq!(a["allowed"], true, "{a}");
    assert_eq!(a["remaining_micros"], 8 * USD);
    let enforcement = op.get("/v1/orgs/acme/enforcement").await.expect(200);
    let fired: Vec<_> = enforcement["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject_id"] == "alice" && e["event"] == "threshold_crossed")
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["threshold"].clone(),
            )
        })
        .collect();
    assert_eq!(fired.len(), 2, "{fired:?}");
    assert!(fired.contains(&("threshold_crossed".into(), json!(0.8))));
    assert!(fired.contains(&("threshold_crossed".into(), json!(0.5))));

    // ... and past 100 %.
    spend(&op, "r-6", "alice", Some("k-alice"), 10 * USD).await;
    let a = authorize(&op, &secrets.alice, Some("chat"), None).await;
    assert_eq!(a["allowed"], false);
    assert_eq!(a["reason"], "user_monthly_limit");
    assert!(
        a["message"]
            .as_str()
            .unwrap()
            .contains("monthly limit of $50.00"),
        "{a}"
    );
    assert_eq!(a["user_id"], "alice");
    let b = authorize(&op, &secrets.bob, Some("chat"), None).await;
    assert_eq!(
        (b["allowed"].clone(), b["remaining_micros"].clone()),
        (json!(true), json!(80 * USD))
    );
    let e = authorize(&op, &secrets.eng, Some("embeddings"), Some("carol")).await;
    assert_eq!(e["allowed"], true, "{e}");
    assert_eq!(e["group_ids"], json!(["eng"]));
    let e = authorize(&op, &secrets.eng, Some("images"), Some("carol")).await;
    assert_eq!(e["reason"], "feature_not_enabled");
    let e = authorize(&op, &secrets.eng, None, Some("erin")).await;
    assert_eq!(e["reason"], "user_not_in_key_groups");
    assert_eq!(
        e["user_id"], "erin",
        "the decision names the user it judged"
    );
    let e = authorize(&op, "tly_sk_nope", None, None).await;
    assert_eq!(
        (e["allowed"].clone(), e["reason"].clone()),
        (json!(false), json!("unknown_key"))
    );

    // The list sorted by -spend shows exact spend against limits.
    let users = op.get("/v1/orgs/acme/users?sort=-spend").await.expect(200);
    let order: Vec<&str> = users["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["alice", "bob", "carol", "dave", "erin"]);
    let alice = user(&users, "alice");
    assert_eq!(alice["spend_micros"], 52 * USD);
    assert_eq!(alice["monthly_limit_micros"], 50 * USD);
    assert_eq!(alice["utilization"], json!(1.04));
    assert_eq!(alice["cut_off"], true);
    assert_eq!(alice["requests"], 3);
    assert_eq!(alice["groups"], json!(["eng"]));
    assert_eq!(user(&users, "bob")["utilization"], json!(0.2));
    assert_eq!(user(&users, "bob")["cut_off"], false);
    let cut = op.get("/v1/orgs/acme/users?cut_off=true").await.expect(200);
    assert_eq!(cut["items"].as_array().unwrap().len(), 1);
    let near = op
        .get("/v1/orgs/acme/users?min_utilization=0.2&sort=utilization")
        .await
        .expect(200);
    let near: Vec<&str> = near["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(near, ["bob", "alice"]);

    // Group spend is the sum of its members' spend; the org sees everything.
    let eng = op.get("/v1/orgs/acme/groups/eng").await.expect(200);
    let members: i64 = ["alice", "bob", "carol"]
        .iter()
        .map(|u| user(&users, u)["spend_micros"].as_i64().unwrap())
        .sum();
    assert_eq!(eng["spend_micros"], members);
    assert_eq!(eng["member_count"], 3);
    let org = op.get("/v1/orgs/acme").await.expect(200);
    assert_eq!(org["spend_micros"], 78 * USD);

    // Raising the limit lifts the cutoff.
    let alice = op
        .patch(
            "/v1/orgs/acme/users/alice",
            json!({"monthly_limit_micros": 80 * USD}),
        )
        .await
        .expect(200);
    assert_eq!(alice["cut_off"], false);
    let a = authorize(&op, &secrets.alice, Some("chat"), None).await;
    assert_eq!(
        (a["allowed"].clone(), a["remaining_micros"].clone()),
        (json!(true), json!(28 * USD))
    );
    let enforcement = op.get("/v1/orgs/acme/enforcement").await.expect(200);
    let alice_events: Vec<&str> = enforcement["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject_id"] == "alice")
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for expected in ["cut_off", "cutoff_lifted"] {
        assert!(alice_events.contains(&expected), "{alice_events:?}");
    }
    let detail = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(detail["history"]["months"][0]["spend_micros"], 52 * USD);
    assert_eq!(
        detail["history"]["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["spend_micros"].as_i64().unwrap())
            .sum::<i64>(),
        52 * USD
    );

    // A clean restart: every figure identical.
    let before = snapshot(&op, &secrets).await;
    let restarted = tally.restart().unwrap();
    let op = restarted.operator();
    assert_eq!(snapshot(&op, &secrets).await, before);

    // kill -9 right after an answered ingest, before any checkpoint (this
    // process checkpoints only when read or stopped): the usage log replays it.
    restarted.stop().unwrap();
    let lazy = Tally::start_with(&backend, &["--checkpoint-interval-ms", "600000"]).unwrap();
    let op = lazy.operator();
    spend(&op, "r-7", "erin", None, 3 * USD).await;
    let dup = json!({"events": [{"request_id": "r-7", "org_id": "acme", "user_id": "erin",
        "cost_micros": 3 * USD, "occurred_at": now_rfc3339()}]});
    assert_eq!(op.post("/v1/usage", dup).await.expect(200)["duplicates"], 1);
    let recovered = lazy.crash_restart().unwrap();
    // Both batches are in the log (a record keeps every attributable event,
    // duplicates too); replaying decides again that the second is one.
    assert!(
        recovered.log_text().contains("replayed=2"),
        "{}",
        recovered.log_text()
    );
    let op = recovered.operator();
    let after_crash = snapshot(&op, &secrets).await;
    assert_eq!(user(&after_crash["users"], "erin")["spend_micros"], 3 * USD);
    assert_eq!(after_crash["org"]["spend_micros"], 81 * USD);
    let clean = recovered.restart().unwrap();
    assert_eq!(snapshot(&clean.operator(), &secrets).await, after_crash);
    clean.stop().unwrap();
}

#[tokio::test]
async fn admin_workflow_on_sqlite() {
    workflow(Backend::sqlite("workflow")).await;
}

#[tokio::test]
async fn admin_workflow_on_postgres() {
    if let Some(backend) = Backend::postgres("workflow").await.unwrap() {
        workflow(backend).await;
    }
}

/// A group limit caps its members' combined spend whatever key they call
/// with (before: a member kept spending on a personal key past the group's
/// limit, since only keys of the group were gated).
#[tokio::test]
async fn a_group_limit_caps_its_members_on_personal_keys() {
    let tally = Tally::start(&Backend::sqlite("group-limit")).unwrap();
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    for u in ["alice", "bob"] {
        let _ = op.add_active_user("acme", u).await;
    }
    op.add_group(
        "acme",
        "eng",
        "Engineering",
        Some(60 * USD),
        &["alice", "bob"],
    )
    .await;
    let key = op
        .post(
            "/v1/orgs/acme/keys",
            json!({"id": "k-alice", "name": "laptop", "user_id": "alice"}),
        )
        .await
        .expect(201);
    let secret = key["secret"].as_str().unwrap().to_owned();
    spend(&op, "r-1", "alice", Some("k-alice"), 40 * USD).await;
    let a = authorize(&op, &secret, None, None).await;
    assert_eq!(
        (a["allowed"].clone(), a["remaining_micros"].clone()),
        (json!(true), json!(20 * USD)),
        "{a}"
    );
    spend(&op, "r-2", "bob", None, 20 * USD).await;
    let a = authorize(&op, &secret, None, None).await;
    assert_eq!(a["allowed"], false, "{a}");
    assert_eq!(a["reason"], "group_monthly_limit", "{a}");
    assert_eq!(a["user_id"], "alice");
    assert_eq!(a["group_ids"], json!(["eng"]));
    tally.stop().unwrap();
}

/// The daily series of any of the last 13 months (`?month=`) on a user's,
/// group's, key's and the org's detail: this month's spend read back by day
/// after the clock moved into the next month; other months refused.
#[tokio::test]
async fn a_past_months_days_stay_readable() {
    let backend = Backend::sqlite("history-month");
    let clock = tally_tests::temp_dir("history-month-clock").join("offset");
    std::fs::write(&clock, "0").unwrap();
    let env = [("TALLY_TEST_CLOCK_FILE", clock.to_str().unwrap())];
    let tally = Tally::start_env(&backend, &[], &env).unwrap();
    let op = tally.operator();
    let _ = op.acme_with_alice(None).await;
    op.add_group("acme", "eng", "Eng", None, &["alice"]).await;
    spend(&op, "r1", "alice", Some("alice-key"), 3 * USD).await;
    spend(&op, "r2", "alice", Some("alice-key"), 4 * USD).await;
    let this = now_rfc3339()[..7].to_owned();
    let today = now_rfc3339()[..10].to_owned();
    let details = [
        "/v1/orgs/acme/users/alice",
        "/v1/orgs/acme/groups/eng",
        "/v1/orgs/acme/keys/alice-key",
        "/v1/orgs/acme",
    ];
    for d in details {
        let h = op.get(d).await.expect(200)["history"].clone();
        assert_eq!(h["days_month"], this.as_str(), "{d}");
        assert_eq!(
            h["days"],
            json!([{"day": today, "spend_micros": 7 * USD, "requests": 2}]),
            "{d}"
        );
    }
    // 40 days on, this month is the one before.
    std::fs::write(&clock, (40 * 86_400_000_i64).to_string()).unwrap();
    let next = tally_tests::rfc3339(tally_tests::now_ms() + 40 * 86_400_000)[..7].to_owned();
    for d in details {
        let h = op.get(d).await.expect(200)["history"].clone();
        assert_eq!(
            (&h["days_month"], &h["days"]),
            (&json!(next), &json!([])),
            "{d}"
        );
        assert_eq!(h["months"][0]["month"], this.as_str(), "{d}: {h}");
        let past = op.get(&format!("{d}?month={this}")).await.expect(200)["history"].clone();
        assert_eq!(past["days_month"], this.as_str(), "{d}");
        assert_eq!(past["days"][0]["spend_micros"], 7 * USD, "{d}");
        assert_eq!(past["months"], h["months"], "{d}: the months stay");
        for bad in ["2020-01", "2026-13", "last", "2026-1"] {
            let e = op.get(&format!("{d}?month={bad}")).await.expect(400);
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("month: yyyy-mm from "),
                "{d} {bad}: {e}"
            );
        }
        let _ = op.get(&format!("{d}?months=1")).await.error(400);
    }
    tally.stop().unwrap();
}
