//! API keys over their life on a real `tally serve` whose clock the test
//! moves (`TALLY_TEST_CLOCK_FILE`): expiry, rotation with a grace period,
//! and changes of name, owner and groups, across a restart.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, rfc3339, temp_dir};

const MINUTE_MS: i64 = 60_000;

/// Moves the process's clock to `offset_ms` ahead of the real one.
fn set_offset(file: &std::path::Path, offset_ms: i64) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, offset_ms.to_string()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

async fn decide(op: &Client, secret: &str) -> Value {
    op.post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200)
}

/// (allowed, reason) of a plain authorize.
async fn verdict(op: &Client, secret: &str) -> (bool, String) {
    let d = decide(op, secret).await;
    (
        d["allowed"].as_bool().unwrap(),
        d["reason"].as_str().unwrap().to_owned(),
    )
}

fn allowed() -> (bool, String) {
    (true, "ok".into())
}

fn refused(reason: &str) -> (bool, String) {
    (false, reason.into())
}

#[tokio::test]
async fn keys_expire_rotate_and_change_on_a_clock_the_test_moves() {
    let backend = Backend::sqlite("key-lifecycle");
    let clock = temp_dir("key-lifecycle-clock").join("offset");
    set_offset(&clock, 0);
    let env = [("TALLY_TEST_CLOCK_FILE", clock.to_str().unwrap())];
    let tally = Tally::start_env(&backend, &[], &env).unwrap();
    let op = tally.operator();
    let s0 = op.acme_with_alice(None).await;
    let _ = op.add_active_user("acme", "bob").await;
    let _ = op
        .post("/v1/orgs/acme/groups", json!({"id": "eng", "name": "Eng"}))
        .await
        .expect(201);
    let _ = op.put("/v1/orgs/acme/groups/eng/members/bob").await;
    let key = "/v1/orgs/acme/keys/alice-key";
    let now = tally_tests::now_ms();

    // Expiry: refused from then on, with the time named; lifted by null.
    // A millisecond that does not end in 0: RFC 3339 drops trailing zeros
    // of a fraction (`.03Z`), which this test's formatter keeps (`.030Z`).
    let expires = now + 10 * MINUTE_MS;
    let expires = expires - expires % 10 + 7;
    let k = op
        .patch(key, json!({"expires_at": rfc3339(expires)}))
        .await
        .expect(200);
    assert_eq!(k["expires_at"], rfc3339(expires), "{k}");
    assert_eq!(verdict(&op, &s0).await, allowed());
    set_offset(&clock, 11 * MINUTE_MS);
    let d = decide(&op, &s0).await;
    assert_eq!(d["reason"], "key_expired", "{d}");
    assert!(d["message"].as_str().unwrap().contains("expired at"), "{d}");
    let k = op.patch(key, json!({"expires_at": null})).await.expect(200);
    assert!(k["expires_at"].is_null(), "{k}");
    assert_eq!(verdict(&op, &s0).await, allowed());

    // Rotation: both secrets during the grace period, the new one after.
    let rotated = op
        .post(&format!("{key}/rotate"), json!({"grace_seconds": 600}))
        .await
        .expect(200);
    let s1 = rotated["secret"].as_str().unwrap().to_owned();
    assert!(s1.starts_with("tly_sk_") && s1 != s0, "{rotated}");
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "{rotated}"
    );
    assert_eq!(verdict(&op, &s0).await, allowed());
    assert_eq!(verdict(&op, &s1).await, allowed());
    set_offset(&clock, 11 * MINUTE_MS + 601_000);
    assert_eq!(verdict(&op, &s0).await, refused("unknown_key"));
    assert_eq!(verdict(&op, &s1).await, allowed());
    // A reserve with the stopped secret holds nothing.
    let r = op
        .post(
            "/v1/authorize",
            json!({"api_key": s0, "request_id": "r-old", "reserve_micros": 5}),
        )
        .await
        .expect(200);
    assert_eq!(
        (r["allowed"].clone(), r["hold"].clone()),
        (json!(false), Value::Null),
        "{r}"
    );

    // Again without grace: the previous secret stops at once.
    let s2 = op
        .post(&format!("{key}/rotate"), json!({}))
        .await
        .expect(200)["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(verdict(&op, &s1).await, refused("unknown_key"));
    assert_eq!(verdict(&op, &s2).await, allowed());

    // Name, owner and groups.
    let k = op
        .patch(
            key,
            json!({"name": "ci runner", "user_id": "bob", "group_ids": ["eng"]}),
        )
        .await
        .expect(200);
    assert_eq!(
        (
            k["name"].clone(),
            k["user_id"].clone(),
            k["group_ids"].clone()
        ),
        (json!("ci runner"), json!("bob"), json!(["eng"])),
        "{k}"
    );
    let d = decide(&op, &s2).await;
    assert_eq!(
        (d["allowed"].clone(), d["user_id"].clone()),
        (json!(true), json!("bob")),
        "{d}"
    );
    let k = op.patch(key, json!({"user_id": null})).await.expect(200);
    assert!(k["user_id"].is_null(), "a group key now: {k}");

    // Bad input is refused and names the field.
    let e = op.patch(key, json!({"expires_at": "tomorrow"})).await;
    assert_eq!(e.status, 400, "{}", e.body);
    assert!(e.body.to_string().contains("expires_at"), "{}", e.body);
    let e = op
        .post(&format!("{key}/rotate"), json!({"grace_seconds": 604_801}))
        .await;
    assert_eq!(e.status, 400, "{}", e.body);
    assert_eq!(op.patch(key, json!({"group_ids": []})).await.status, 400);

    // Each change is in the audit log, without a secret or its hash.
    let events = op.get("/v1/orgs/acme/events?limit=1000").await.expect(200);
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|t| t.starts_with("key_") && *t != "key_created")
        .collect();
    assert_eq!(
        kinds,
        [
            "key_expiry_set",
            "key_expiry_set",
            "key_rotated",
            "key_rotated",
            "key_renamed",
            "key_owner_changed",
            "key_groups_changed",
            "key_owner_changed",
        ],
        "{events}"
    );
    let text = events.to_string();
    assert!(
        !text.contains("secret_hash") && !text.contains(&s2),
        "{text}"
    );

    // After a restart: the same secrets work and stop.
    tally.stop().unwrap();
    let tally = Tally::start_env(&backend, &[], &env).unwrap();
    let op = tally.operator();
    assert_eq!(verdict(&op, &s0).await, refused("unknown_key"));
    assert_eq!(verdict(&op, &s1).await, refused("unknown_key"));
    let d = op
        .post("/v1/authorize", json!({"api_key": s2, "user_id": "bob"}))
        .await
        .expect(200);
    assert_eq!(d["allowed"], true, "{d}");
    // A revoked key is not rotated.
    let _ = op.delete(key).await.expect(200);
    assert_eq!(
        op.post(&format!("{key}/rotate"), json!({}))
            .await
            .error(422),
        "rule_violated"
    );
    tally.stop().unwrap();
}
