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
        (
            "POST",
            o("/keys/k1/rotate"),
            Some(json!({"grace_seconds": 60})),
        ),
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
        ("GET", o("/usage"), None),
        ("DELETE", o("/holds/r1"), None),
        ("POST", o("/webhook/deliveries/1/redeliver"), None),
        ("POST", o("/webhook/test"), None),
    ]
}

/// Every operation of the OpenAPI document: (method, path with the test's
/// ids, the roles its `security` names; `None`: no token needed).
async fn documented_operations(
    op: &Client,
    org: &str,
) -> Vec<(String, String, Option<Vec<String>>)> {
    let doc = op.get("/openapi.json").await.expect(200);
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let token = if path.starts_with("/v1/gateway-tokens") {
            "gw-x"
        } else {
            "t1"
        };
        let concrete = path
            .replace("{org}", org)
            .replace("{user}", "u1")
            .replace("{group}", "g1")
            .replace("{key}", "k1")
            .replace("{id}", "1")
            .replace("{request_id}", "r1")
            .replace("{token}", token);
        for (method, operation) in ops.as_object().unwrap() {
            let security = operation["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} documents no security"));
            // `[]`: no token needed; `[{"bearer": [roles]}]` otherwise.
            let roles = security.first().and_then(|s| s.get("bearer")).map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect()
            });
            out.push((method.to_uppercase(), concrete.clone(), roles));
        }
    }
    out.sort();
    out
}

/// A body for each endpoint outside an org that takes one.
fn body_of(method: &str, path: &str, acme_key: &str) -> Option<Value> {
    match (method, path) {
        ("POST", "/v1/orgs") => Some(json!({"name": "Mine"})),
        ("POST", "/v1/gateway-tokens") => Some(json!({"name": "another gateway"})),
        ("POST", "/v1/authorize") => Some(json!({"api_key": acme_key})),
        ("POST", "/v1/usage") => Some(json!({"events": [{
            "request_id": "matrix-1", "org_id": "acme", "api_key_id": "k1",
            "user_id": "u1", "model": "m", "provider": "p", "input_tokens": 1,
            "output_tokens": 1, "cost_micros": 1, "occurred_at": now_rfc3339(),
        }]})),
        _ => None,
    }
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

/// Who calls: the role it has and the org it is bound to (`None`: every
/// org); no role for a caller that is no one (no token, a forged or a
/// revoked token).
struct Who {
    name: &'static str,
    client: Client,
    role: Option<(&'static str, Option<&'static str>)>,
}

impl Who {
    fn new(
        name: &'static str,
        client: Client,
        role: Option<(&'static str, Option<&'static str>)>,
    ) -> Who {
        Who { name, client, role }
    }

    /// Whether the documented `roles` admit it to `path`.
    fn admitted(&self, path: &str, roles: &Option<Vec<String>>) -> bool {
        match (roles, self.role) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(roles), Some((role, bound))) => {
                roles.iter().any(|r| r == role)
                    && bound.is_none_or(|org| {
                        !path.starts_with("/v1/orgs/") || path.split('/').nth(3) == Some(org)
                    })
            }
        }
    }
}

async fn mint(op: &Client, org: &str, id: &str, role: &str) -> String {
    op.post(
        &format!("/v1/orgs/{org}/tokens"),
        json!({"id": id, "role": role, "name": format!("{role} {id}")}),
    )
    .await
    .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The role matrix: every documented operation, called by every kind of
/// caller. Exactly the roles the OpenAPI document lists get past
/// authentication and authorization (an org's token on its own org only);
/// everyone else gets 401 or 403 with nothing but an error, and changes
/// nothing.
#[tokio::test]
async fn every_endpoint_admits_exactly_its_documented_roles() {
    let backend = Backend::sqlite("security");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let (_, acme_key) = seed(&op, "acme").await;
    let _ = seed(&op, "other").await;
    // t1 is the token the matrix deletes, gw-x the gateway token.
    let _ = mint(&op, "acme", "t1", "admin").await;
    let admin = mint(&op, "acme", "adm", "admin").await;
    let viewer = mint(&op, "acme", "view", "viewer").await;
    let gateway = mint(&op, "acme", "gw", "gateway").await;
    let other_admin = mint(&op, "other", "adm", "admin").await;
    let other_gateway = mint(&op, "other", "gw", "gateway").await;
    let revoked = mint(&op, "acme", "old", "admin").await;
    assert_eq!(op.delete("/v1/orgs/acme/tokens/old").await.status, 204);
    let gateway_all = op
        .post(
            "/v1/gateway-tokens",
            json!({"id": "gw-all", "name": "edge"}),
        )
        .await
        .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let _ = op
        .post("/v1/gateway-tokens", json!({"id": "gw-x", "name": "spare"}))
        .await
        .expect(201);
    let forged = "tly_at_0000000000000000000000000000000000000000000000000000000000000000";
    let callers = [
        Who::new("the operator", op.clone(), Some(("operator", None))),
        Who::new(
            "acme's admin",
            tally.client(&admin),
            Some(("admin", Some("acme"))),
        ),
        Who::new(
            "acme's viewer",
            tally.client(&viewer),
            Some(("viewer", Some("acme"))),
        ),
        Who::new(
            "acme's gateway",
            tally.client(&gateway),
            Some(("gateway", Some("acme"))),
        ),
        Who::new(
            "a gateway of every org",
            tally.client(&gateway_all),
            Some(("gateway", None)),
        ),
        Who::new(
            "other's admin",
            tally.client(&other_admin),
            Some(("admin", Some("other"))),
        ),
        Who::new(
            "other's gateway",
            tally.client(&other_gateway),
            Some(("gateway", Some("other"))),
        ),
        Who::new("a revoked token", tally.client(&revoked), None),
        Who::new("a forged token", tally.client(forged), None),
        Who::new("no token", tally.anonymous(), None),
    ];
    let operations = documented_operations(&op, "acme").await;
    // The org-scoped ones are exactly the ones `endpoints` has bodies for.
    let mut org_scoped: Vec<(String, String)> = operations
        .iter()
        .filter(|(_, p, _)| p.starts_with("/v1/orgs/acme"))
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    let mut known: Vec<(String, String)> = endpoints("acme")
        .into_iter()
        .map(|(m, p, _)| (m.to_owned(), p))
        .collect();
    org_scoped.sort();
    known.sort();
    assert_eq!(org_scoped, known);
    let bodies: std::collections::HashMap<(String, String), Option<Value>> = endpoints("acme")
        .into_iter()
        .map(|(m, p, b)| ((m.to_owned(), p), b))
        .collect();
    let body = |m: &str, p: &str| {
        bodies
            .get(&(m.to_owned(), p.to_owned()))
            .cloned()
            .unwrap_or_else(|| body_of(m, p, &acme_key))
    };
    let audit = || async {
        (
            op.get("/v1/orgs/acme/events?limit=1000").await.expect(200),
            op.get("/v1/orgs/other/events?limit=1000").await.expect(200),
            op.get("/v1/audit?limit=1000").await.expect(200),
            op.get("/v1/orgs/acme/holds").await.expect(200),
            op.get("/v1/orgs/acme/users/u1").await.expect(200)["spend_micros"].clone(),
        )
    };
    // First every refusal: together they change nothing.
    let before = audit().await;
    let (mut refused, mut admitted) = (0, 0);
    for (method, path, roles) in &operations {
        for who in callers.iter().filter(|w| !w.admitted(path, roles)) {
            let r = who
                .client
                .send(method, path, send_body(&body(method, path)))
                .await
                .unwrap();
            let want = if who.role.is_none() { 401 } else { 403 };
            assert_eq!(
                r.status, want,
                "{method} {path} by {}: {}",
                who.name, r.body
            );
            let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["error"], "{method} {path} by {}", who.name);
            refused += 1;
        }
    }
    assert_eq!(audit().await, before, "a refused call changed something");
    // Then every admitted one: it gets past authentication and
    // authorization (what it then finds is the endpoint's business).
    for (method, path, roles) in &operations {
        if roles.is_none() {
            // Ops endpoints: anyone, token or not (some answer text).
            let url = format!("{}{path}", op.url);
            let status = tally_tests::http_client()
                .get(url)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 200, "{method} {path}");
            admitted += callers.len();
            continue;
        }
        for who in callers.iter().filter(|w| w.admitted(path, roles)) {
            let r = who
                .client
                .send(method, path, send_body(&body(method, path)))
                .await
                .unwrap();
            assert!(
                !matches!(r.status, 401 | 403),
                "{method} {path} by {}: {} {}",
                who.name,
                r.status,
                r.body
            );
            admitted += 1;
        }
    }
    assert_eq!(operations.len(), 48);
    assert_eq!(refused + admitted, operations.len() * callers.len());
    println!("{refused} calls refused, {admitted} admitted");
    // A gateway token of every org, or bound to acme, reads and changes
    // no admin endpoint: checked above; and the operator's audit log has
    // the gateway tokens made and revoked.
    let log = op.get("/v1/audit?limit=1000").await.expect(200);
    let kinds: Vec<&str> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "gateway_token_created",
            "gateway_token_created",
            "gateway_token_revoked",
            "gateway_token_created"
        ],
        "{log}"
    );
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

/// A key of `org` for an active user `user`; its secret.
async fn active_key(op: &Client, org: &str, user: &str) -> String {
    let _ = op.add_active_user(org, user).await;
    op.post(
        &format!("/v1/orgs/{org}/keys"),
        json!({"id": format!("{user}-key"), "name": "laptop", "user_id": user}),
    )
    .await
    .expect(201)["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Gateway tokens: one of every org serves any org's keys; one bound to
/// acme knows acme's keys only (another org's key is unknown to it and
/// nothing is held). Listings show role, name and last use; a revoked
/// gateway token is refused from its next call on, also after a restart.
#[tokio::test]
async fn gateway_tokens_authorize_hold_and_report_usage_for_their_orgs() {
    let tally = Tally::start(&Backend::sqlite("gateway-tokens")).unwrap();
    let op = tally.operator();
    for org in ["acme", "other"] {
        let _ = op
            .post("/v1/orgs", json!({"id": org, "name": org}))
            .await
            .expect(201);
    }
    let acme_key = active_key(&op, "acme", "alice").await;
    let other_key = active_key(&op, "other", "olga").await;
    let admin = tally.client(&mint(&op, "acme", "adm", "admin").await);
    let _unused = mint(&op, "acme", "idle", "viewer").await;
    let bound = tally.client(&mint(&op, "acme", "gw", "gateway").await);
    let edge_token = op
        .post(
            "/v1/gateway-tokens",
            json!({"id": "edge", "name": "edge proxies"}),
        )
        .await
        .expect(201);
    assert_eq!(edge_token["role"], "gateway");
    assert!(edge_token["org_id"].is_null());
    let edge_secret = edge_token["token"].as_str().unwrap().to_owned();
    assert!(edge_secret.starts_with("tly_gt_"), "{edge_token}");
    let edge = tally.client(&edge_secret);
    // An org admin mints admin and viewer tokens, never gateway ones.
    assert_eq!(
        admin
            .post("/v1/orgs/acme/tokens", json!({"role": "gateway"}))
            .await
            .error(403),
        "forbidden"
    );
    let reserve =
        |key: &str, id: &str| json!({"api_key": key, "request_id": id, "reserve_micros": 1_000});
    // Every org's: both orgs' keys, holds listed and released, usage.
    for (org, key) in [("acme", &acme_key), ("other", &other_key)] {
        let d = edge
            .post("/v1/authorize", reserve(key, &format!("{org}-r1")))
            .await
            .expect(200);
        assert_eq!(d["allowed"], true, "{d}");
        assert_eq!(d["hold"]["held_micros"], 1_000, "{d}");
        let holds = edge.get(&format!("/v1/orgs/{org}/holds")).await.expect(200);
        assert_eq!(holds["items"].as_array().unwrap().len(), 1, "{holds}");
        let released = edge
            .delete(&format!("/v1/orgs/{org}/holds/{org}-r1"))
            .await
            .expect(200);
        assert_eq!(released["found"], "released", "{released}");
    }
    let event = |org: &str, user: &str, id: &str| {
        json!({
            "request_id": id, "org_id": org, "user_id": user,
            "api_key_id": format!("{user}-key"), "model": "gpt-4o", "provider": "openai",
            "input_tokens": 10, "output_tokens": 5, "cost_micros": 700,
            "occurred_at": now_rfc3339(),
        })
    };
    let r = edge
        .post(
            "/v1/usage",
            json!({"events": [event("acme", "alice", "u-1"), event("other", "olga", "u-2")]}),
        )
        .await
        .expect(200);
    assert_eq!(r["accepted"], 2, "{r}");
    // Bound to acme: other's key is unknown to it, and nothing is held.
    let d = bound
        .post("/v1/authorize", reserve(&other_key, "other-r2"))
        .await
        .expect(200);
    assert_eq!(
        (d["allowed"].clone(), d["reason"].clone()),
        (json!(false), json!("unknown_key")),
        "{d}"
    );
    assert!(d["hold"].is_null() && d["org_id"].is_null(), "{d}");
    let holds = op.get("/v1/orgs/other/holds").await.expect(200);
    assert!(holds["items"].as_array().unwrap().is_empty(), "{holds}");
    let r = bound
        .post(
            "/v1/usage",
            json!({"events": [event("other", "olga", "u-3"), event("acme", "alice", "u-4")]}),
        )
        .await
        .expect(200);
    assert_eq!(r["accepted"], 1, "{r}");
    assert_eq!(r["rejected"][0]["code"], "forbidden_org", "{r}");
    let d = bound
        .post("/v1/authorize", reserve(&acme_key, "acme-r2"))
        .await
        .expect(200);
    assert_eq!(d["allowed"], true, "{d}");
    // Listed with role, name and last use; never a secret.
    let listed = admin.get("/v1/orgs/acme/tokens").await.expect(200);
    let row = |id: &str| {
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("gw")["role"], "gateway", "{listed}");
    assert_eq!(row("gw")["name"], "gateway gw", "{listed}");
    assert!(row("gw")["last_used_at"].is_string(), "{listed}");
    assert_eq!(row("idle")["role"], "viewer", "{listed}");
    assert!(row("idle")["last_used_at"].is_null(), "{listed}");
    let gateways = op.get("/v1/gateway-tokens").await.expect(200);
    assert_eq!(gateways["items"][0]["id"], "edge", "{gateways}");
    assert_eq!(gateways["items"][0]["name"], "edge proxies", "{gateways}");
    assert!(
        gateways["items"][0]["last_used_at"].is_string(),
        "{gateways}"
    );
    assert!(!gateways.to_string().contains(&edge_secret));
    // The org's audit log names the role and the name, not the hash.
    let events = admin
        .get("/v1/orgs/acme/events?limit=1000")
        .await
        .expect(200);
    let made = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "token_created" && e["token_id"] == "gw")
        .cloned()
        .unwrap();
    assert_eq!(
        (made["role"].clone(), made["actor"].clone()),
        (json!("gateway"), json!("operator")),
        "{made}"
    );
    assert!(made.get("token_hash").is_none(), "{made}");
    // Revoked: refused from the next call, twice is fine, unknown is 404.
    assert_eq!(op.delete("/v1/gateway-tokens/edge").await.status, 204);
    assert_eq!(
        edge.post("/v1/authorize", json!({"api_key": acme_key}))
            .await
            .error(401),
        "unauthorized"
    );
    assert_eq!(op.delete("/v1/gateway-tokens/edge").await.status, 204);
    assert_eq!(
        op.delete("/v1/gateway-tokens/nope").await.error(404),
        "not_found"
    );
    let tally = tally.restart().unwrap();
    let edge = tally.client(&edge_secret);
    assert_eq!(
        edge.post("/v1/authorize", json!({"api_key": acme_key}))
            .await
            .error(401),
        "unauthorized"
    );
    let gateways = tally.operator().get("/v1/gateway-tokens").await.expect(200);
    assert!(gateways["items"][0]["revoked_at"].is_string(), "{gateways}");
    // Its last use survived the restart (noted in the database).
    assert!(
        gateways["items"][0]["last_used_at"].is_string(),
        "{gateways}"
    );
    tally.stop().unwrap();
}

/// Authentication, then authorization (role, and the org in the path),
/// then the body: a caller who may not call an endpoint learns nothing
/// from a malformed body (issue 15 saw 400s here for another org's token).
#[tokio::test]
async fn a_malformed_body_is_judged_after_the_caller() {
    let tally = Tally::start(&Backend::sqlite("authz-first")).unwrap();
    let op = tally.operator();
    let _ = seed(&op, "acme").await;
    let _ = seed(&op, "other").await;
    let other_admin = tally.client(&mint(&op, "other", "adm", "admin").await);
    let viewer = tally.client(&mint(&op, "acme", "view", "viewer").await);
    let garbage = Some(b"{not json".to_vec());
    let mut checked = 0;
    for (method, path, body) in endpoints("acme") {
        if body.is_none() {
            continue;
        }
        let r = other_admin
            .send(method, &path, garbage.clone())
            .await
            .unwrap();
        assert_eq!(
            r.status, 403,
            "{method} {path} by another org's admin: {}",
            r.body
        );
        let r = viewer.send(method, &path, garbage.clone()).await.unwrap();
        assert_eq!(r.status, 403, "{method} {path} by a viewer: {}", r.body);
        let r = tally
            .anonymous()
            .send(method, &path, garbage.clone())
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{method} {path} without a token: {}", r.body);
        // The caller who may: now the body is read, and refused.
        let r = op.send(method, &path, garbage.clone()).await.unwrap();
        assert_eq!(r.status, 400, "{method} {path} by the operator: {}", r.body);
        checked += 1;
    }
    for (method, path) in [("POST", "/v1/orgs"), ("POST", "/v1/gateway-tokens")] {
        let r = other_admin
            .send(method, path, garbage.clone())
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
    }
    assert_eq!(checked, 11);
    tally.stop().unwrap();
}
