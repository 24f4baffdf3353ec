//! Who may touch what, over every admin endpoint; secrets at rest; hostile
//! text. Against a real `tally serve`.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_rfc3339};

/// Every org-scoped endpoint, for org `org`, with a body where it takes one.
fn endpoints(org: &str) -> Vec<(&'static str, String, Option<Value>)> {
    let o = |p: &str| format!("/v1/orgs/{org}{p}");
    vec![
        ("GET", o(""), None),
        ("PATCH", o(""), Some(json!({"name": "taken over"}))),
        ("POST", o("/tokens"), Some(json!({}))),
        ("GET", o("/tokens"), None),
        ("DELETE", o("/tokens/t1"), None),
        ("GET", o("/events"), None),
        ("GET", o("/enforcement"), None),
        ("GET", o("/dead-letters"), None),
        (
            "POST",
            o("/users"),
            Some(json!({"email": "x@y.test", "name": "X"})),
        ),
        ("GET", o("/users"), None),
        (
            "POST",
            o("/users/bulk"),
            Some(json!({"user_ids": ["u1"], "status": "suspended"})),
        ),
        ("GET", o("/users/u1"), None),
        (
            "PATCH",
            o("/users/u1"),
            Some(json!({"monthly_limit_micros": 1})),
        ),
        ("DELETE", o("/users/u1"), None),
        ("POST", o("/groups"), Some(json!({"name": "G"}))),
        ("GET", o("/groups"), None),
        ("GET", o("/groups/g1"), None),
        ("PATCH", o("/groups/g1"), Some(json!({"name": "H"}))),
        ("DELETE", o("/groups/g1"), None),
        ("PUT", o("/groups/g1/members/u1"), None),
        ("DELETE", o("/groups/g1/members/u1"), None),
        (
            "POST",
            o("/keys"),
            Some(json!({"name": "k", "user_id": "u1"})),
        ),
        ("GET", o("/keys"), None),
        ("GET", o("/keys/k1"), None),
        ("PATCH", o("/keys/k1"), Some(json!({"features": ["all"]}))),
        ("DELETE", o("/keys/k1"), None),
        (
            "PUT",
            o("/webhook"),
            Some(json!({"url": "http://127.0.0.1:9/stolen"})),
        ),
        ("GET", o("/webhook"), None),
        ("DELETE", o("/webhook"), None),
        ("GET", o("/webhook/deliveries"), None),
        ("GET", o("/holds"), None),
        ("DELETE", o("/holds/r1"), None),
        ("POST", o("/webhook/deliveries/1/redeliver"), None),
    ]
}

/// The org-scoped endpoints of the OpenAPI document, as (method, path with
/// the test's ids): the matrix must cover every one.
async fn documented_endpoints(op: &Client, org: &str) -> Vec<(String, String)> {
    let doc = op.get("/openapi.json").await.expect(200);
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/orgs/{org}") {
            continue;
        }
        let concrete = path
            .replace("{org}", org)
            .replace("{user}", "u1")
            .replace("{group}", "g1")
            .replace("{key}", "k1")
            .replace("{id}", "1")
            .replace("{request_id}", "r1")
            .replace("{token}", "t1");
        for method in ops.as_object().unwrap().keys() {
            out.push((method.to_uppercase(), concrete.clone()));
        }
    }
    out.sort();
    out
}

async fn seed(op: &Client, org: &str) -> (String, String) {
    let _ = op
        .post("/v1/orgs", json!({"id": org, "name": org}))
        .await
        .expect(201);
    let _ = op
        .post(
            &format!("/v1/orgs/{org}/users"),
            json!({"id": "u1", "email": "u1@x.test", "name": "U1"}),
        )
        .await
        .expect(201);
    let _ = op
        .post(
            &format!("/v1/orgs/{org}/groups"),
            json!({"id": "g1", "name": "G1"}),
        )
        .await
        .expect(201);
    let key = op
        .post(
            &format!("/v1/orgs/{org}/keys"),
            json!({"id": "k1", "name": "k", "user_id": "u1"}),
        )
        .await
        .expect(201);
    let token = op
        .post(&format!("/v1/orgs/{org}/tokens"), json!({}))
        .await
        .expect(201);
    (
        token["token"].as_str().unwrap().to_owned(),
        key["secret"].as_str().unwrap().to_owned(),
    )
}

fn send_body(body: &Option<Value>) -> Option<Vec<u8>> {
    body.as_ref().map(|b| b.to_string().into_bytes())
}

#[tokio::test]
async fn every_admin_endpoint_refuses_the_wrong_caller() {
    let backend = Backend::sqlite("security");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let (acme_token, _) = seed(&op, "acme").await;
    let (other_token, _) = seed(&op, "other").await;
    let before = op.get("/v1/orgs/other/events?limit=1000").await.expect(200);
    let anon = tally.anonymous();
    let forged =
        tally.client("tly_at_0000000000000000000000000000000000000000000000000000000000000000");
    let acme = tally.client(&acme_token);
    let mut checked = 0;
    for (method, path, body) in endpoints("other") {
        for (who, client, status) in [("no token", &anon, 401), ("a forged token", &forged, 401)] {
            let r = client.send(method, &path, send_body(&body)).await.unwrap();
            assert_eq!(r.status, status, "{method} {path} with {who}: {}", r.body);
            assert_eq!(r.body["error"]["code"], "unauthorized", "{method} {path}");
        }
        let r = acme.send(method, &path, send_body(&body)).await.unwrap();
        assert!(
            matches!(r.status, 403 | 404),
            "{method} {path} with another org's token: {} {}",
            r.status,
            r.body
        );
        let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error"], "{method} {path}: no data for another org");
        checked += 1;
    }
    let mut covered: Vec<(String, String)> = endpoints("other")
        .into_iter()
        .map(|(m, p, _)| (m.to_owned(), p))
        .collect();
    covered.sort();
    assert_eq!(covered, documented_endpoints(&op, "other").await);
    assert_eq!(checked, 33);
    // Operator-only endpoints.
    for (method, path, body) in [
        ("POST", "/v1/orgs", Some(json!({"name": "Mine"}))),
        ("POST", "/v1/authorize", Some(json!({"api_key": "x"}))),
        ("GET", "/v1/dead-letters", None),
    ] {
        let r = acme.send(method, path, send_body(&body)).await.unwrap();
        assert_eq!(r.status, 403, "{method} {path}");
    }
    // Nothing changed in the other org; its own token still works there.
    assert_eq!(
        op.get("/v1/orgs/other/events?limit=1000").await.expect(200),
        before
    );
    let own = tally.client(&other_token);
    let _ = own.get("/v1/orgs/other/users").await.expect(200);
    tally.stop().unwrap();
}

/// An org's admin tokens are listed (never their secrets) and revoked: a
/// revoked token authenticates nothing from its next request on, also
/// after a restart; revoking is in the audit log and idempotent; the
/// other tokens go on working.
#[tokio::test]
async fn an_org_admin_lists_and_revokes_its_tokens() {
    let tally = Tally::start(&Backend::sqlite("token-revoke")).unwrap();
    let op = tally.operator();
    let (first, _) = seed(&op, "acme").await;
    let second = op
        .post("/v1/orgs/acme/tokens", json!({"id": "second"}))
        .await
        .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin = tally.client(&first);
    let listed = admin.get("/v1/orgs/acme/tokens").await.expect(200);
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    assert!(
        items
            .iter()
            .any(|t| t["id"] == "second" && t["revoked_at"].is_null())
    );
    for secret in [&first, &second] {
        assert!(!listed.to_string().contains(secret.as_str()), "{listed}");
    }
    // One at a time, by id.
    let page = admin.get("/v1/orgs/acme/tokens?limit=1").await.expect(200);
    let next = page["next_cursor"].as_str().expect("a second page");
    let rest = admin
        .get(&format!("/v1/orgs/acme/tokens?limit=1&cursor={next}"))
        .await
        .expect(200);
    assert_eq!(rest["items"][0]["id"], items[1]["id"], "{rest}");
    assert!(rest["next_cursor"].is_null(), "{rest}");

    let revoked = admin.delete("/v1/orgs/acme/tokens/second").await;
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let gone = tally.client(&second);
    assert_eq!(
        gone.get("/v1/orgs/acme/users").await.error(401),
        "unauthorized"
    );
    // Again: nothing to do; an unknown token: 404.
    assert_eq!(
        admin.delete("/v1/orgs/acme/tokens/second").await.status,
        204
    );
    assert_eq!(
        admin.delete("/v1/orgs/acme/tokens/nope").await.error(404),
        "not_found"
    );
    let listed = admin.get("/v1/orgs/acme/tokens").await.expect(200);
    let second_row = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "second")
        .cloned()
        .unwrap();
    assert!(second_row["revoked_at"].is_string(), "{listed}");
    let events = admin
        .get("/v1/orgs/acme/events?limit=1000")
        .await
        .expect(200);
    let revocations: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "token_revoked")
        .collect();
    assert_eq!(revocations.len(), 1, "{events}");
    // The log keeps it so.
    let tally = tally.restart().unwrap();
    assert_eq!(
        tally
            .client(&second)
            .get("/v1/orgs/acme/users")
            .await
            .error(401),
        "unauthorized"
    );
    let _ = tally
        .client(&first)
        .get("/v1/orgs/acme/users")
        .await
        .expect(200);
    tally.stop().unwrap();
}

#[tokio::test]
async fn tokens_and_key_secrets_are_stored_only_as_hashes() {
    let backend = Backend::sqlite("secrets");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let (token, secret) = seed(&op, "acme").await;
    let hook = op
        .raw(
            "PUT",
            "/v1/orgs/acme/webhook",
            json!({"url": "https://hooks.acme.test/t"})
                .to_string()
                .as_bytes(),
        )
        .await
        .expect(200);
    let signing = hook["secret"].as_str().unwrap().to_owned();
    assert!(signing.starts_with("whsec_"), "{hook}");
    // Not in any answer after the creating one.
    let keys = op.get("/v1/orgs/acme/keys").await.expect(200);
    let events = op.get("/v1/orgs/acme/events?limit=1000").await.expect(200);
    for body in [
        &keys,
        &events,
        &op.get("/v1/orgs/acme/keys/k1").await.expect(200),
        &op.get("/v1/orgs/acme/webhook").await.expect(200),
        &op.get("/v1/orgs/acme").await.expect(200),
    ] {
        let text = body.to_string();
        for needle in [&secret, &token, &signing] {
            assert!(!text.contains(needle.as_str()), "{text}");
        }
    }
    tally.stop().unwrap();
    // Not on disk either (database, WAL, logs).
    let Backend::Sqlite(dir) = &backend else {
        unreachable!()
    };
    let holds = std::fs::read_dir(dir.join("holds")).unwrap().flatten();
    for entry in std::fs::read_dir(dir).unwrap().flatten().chain(holds) {
        if entry.path().is_dir() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        for needle in [&secret, &token, &signing] {
            let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(!found, "{} holds a secret", entry.path().display());
        }
    }
}

#[tokio::test]
async fn hostile_text_is_stored_verbatim_or_refused_never_executed() {
    let tally = Tally::start(&Backend::sqlite("hostile")).unwrap();
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    let nasty = [
        "Robert'); DROP TABLE users; --",
        "\" OR 1=1 --",
        "%_\\' UNION SELECT * FROM events --",
        "<script>alert(1)</script>",
        "名前 😀 \u{202e}",
    ];
    for (i, text) in nasty.iter().enumerate() {
        let u = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": format!("u{i}"), "email": format!("u{i}+{}@x.test", i), "name": text}),
            )
            .await
            .expect(201);
        assert_eq!(u["name"], *text);
        let g = op
            .post(
                "/v1/orgs/acme/groups",
                json!({"id": format!("g{i}"), "name": text}),
            )
            .await
            .expect(201);
        assert_eq!(g["name"], *text);
        let k = op
            .post(
                "/v1/orgs/acme/keys",
                json!({"id": format!("k{i}"), "name": text, "user_id": format!("u{i}")}),
            )
            .await
            .expect(201);
        assert_eq!(k["name"], *text);
        // Ids and feature flags have an alphabet: refused, not stored.
        let _ = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": text, "email": "z@x.test", "name": "z"}),
            )
            .await
            .error(400);
        let _ = op
            .patch(
                &format!("/v1/orgs/acme/keys/k{i}"),
                json!({"features": [text]}),
            )
            .await
            .error(400);
        // As query parameters: literal text, or a clear 400.
        let q: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
        let found = op
            .get(&format!("/v1/orgs/acme/users?q={q}"))
            .await
            .expect(200);
        assert!(
            found["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["name"] == *text),
            "{text}"
        );
        for param in ["sort", "status", "group", "cursor", "min_utilization"] {
            let r = op.get(&format!("/v1/orgs/acme/users?{param}={q}")).await;
            assert_eq!(r.status, 400, "{param}={text}: {}", r.body);
        }
    }
    // Everything is still there, and the log is intact.
    let users = op.get("/v1/orgs/acme/users?limit=100").await.expect(200);
    assert_eq!(users["items"].as_array().unwrap().len(), nasty.len());
    let events = op.get("/v1/orgs/acme/events?limit=1000").await.expect(200);
    // Per text: user added, group created, key created, user activated (first own key).
    assert_eq!(
        events["items"].as_array().unwrap().len(),
        1 + 4 * nasty.len()
    );
    // Request ids are printable ASCII without spaces: quotes and comments
    // are fine, spaces are refused by index.
    let usage = json!({"events": [
        {"request_id": "r');--DROP/**/TABLE", "org_id": "acme", "user_id": "u0", "model": nasty[1],
         "provider": nasty[3], "cost_micros": 5, "occurred_at": now_rfc3339()},
        {"request_id": nasty[0], "org_id": "acme", "user_id": "u0", "cost_micros": 5, "occurred_at": now_rfc3339()},
    ]});
    let r = op.post("/v1/usage", usage).await.expect(200);
    assert_eq!(r["accepted"], 1, "{r}");
    assert_eq!(r["rejected"][0]["index"], 1);
    assert_eq!(r["rejected"][0]["code"], "invalid_id");
    tally.stop().unwrap();
}
