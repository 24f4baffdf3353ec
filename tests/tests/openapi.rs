#![allow(unused_results)] // most calls are made for the response check inside `call`

//! The OpenAPI document served at /openapi.json is generated from the code;
//! this test holds it to the truth: every endpoint of the brief is in it, and
//! every real response of a full session — successes and errors — matches
//! the schema the document gives for that path, method and status.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Reply, Tally, now_rfc3339};

/// A JSON Schema (2020-12, as OpenAPI 3.1 uses) check of the parts utoipa
/// emits: `$ref`, `type` (one or several), `properties`, `required`,
/// `additionalProperties: false`, `items`, `enum`, `allOf`/`anyOf`/`oneOf`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("local refs only");
            let target = &doc["components"]["schemas"][name];
            assert!(!target.is_null(), "dangling $ref {r}");
            resolve(doc, target)
        }
        None => schema,
    }
}

/// The properties a schema documents, through `$ref` and `allOf`.
fn documented(doc: &Value, schema: &Value, out: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(p) = schema.get("properties").and_then(Value::as_object) {
        out.extend(p.keys().cloned());
    }
    for s in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        documented(doc, s, out);
    }
}

fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    check_part(doc, schema, v, at, errs, false);
}

/// `part`: checking one member of an `allOf`, whose siblings document the
/// other fields.
fn check_part(
    doc: &Value,
    schema: &Value,
    v: &Value,
    at: &str,
    errs: &mut Vec<String>,
    part: bool,
) {
    let schema = resolve(doc, schema);
    let sub = |key: &str| schema.get(key).and_then(Value::as_array);
    if let Some(all) = sub("allOf") {
        for s in all {
            check_part(doc, s, v, at, errs, true);
        }
        if let (Value::Object(o), false) = (v, part) {
            let mut known = Vec::new();
            documented(doc, schema, &mut known);
            for k in o.keys().filter(|k| !known.contains(k)) {
                errs.push(format!("{at}: field {k} is not documented"));
            }
        }
    }
    for (key, need_one) in [("anyOf", false), ("oneOf", true)] {
        if let Some(options) = sub(key) {
            let ok = options
                .iter()
                .filter(|s| {
                    let mut e = Vec::new();
                    check(doc, s, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if ok == 0 || (need_one && ok > 1) {
                errs.push(format!(
                    "{at}: {key} matched {ok} of {} for {v}",
                    options.len()
                ));
            }
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let matches = |t: &str| match t {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            _ => false,
        };
        if !types.iter().any(|t| matches(t)) {
            errs.push(format!("{at}: {v} is not of type {types:?}"));
            return;
        }
    }
    if let Some(values) = sub("enum")
        && !values.contains(v)
    {
        errs.push(format!("{at}: {v} is not one of {values:?}"));
    }
    if let Value::Object(o) = v {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in sub("required")
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !o.contains_key(r) {
                errs.push(format!("{at}: required field {r} is missing"));
            }
        }
        for (k, val) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, val, &format!("{at}.{k}"), errs),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{at}: field {k} is not in the schema"));
                }
                None if !part
                    && props.is_some()
                    && schema.get("additionalProperties").is_none()
                    && sub("allOf").is_none() =>
                {
                    // utoipa closes no object; an undocumented field is still
                    // worth knowing about.
                    errs.push(format!("{at}: field {k} is not documented"));
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (v, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(doc, s, item, &format!("{at}[{i}]"), errs);
        }
    }
}

struct Spec {
    doc: Value,
    checked: usize,
}

impl Spec {
    /// Checks a reply against the document's schema for it.
    fn holds(&mut self, method: &str, template: &str, reply: &Reply) {
        let op = &self.doc["paths"][template][method];
        assert!(!op.is_null(), "{method} {template} is not in the document");
        let response = &op["responses"][reply.status.to_string()];
        assert!(
            !response.is_null(),
            "{method} {template}: status {} is not documented; body {}",
            reply.status,
            reply.body
        );
        let schema = &response["content"]["application/json"]["schema"];
        if schema.is_null() {
            assert!(
                reply.body.is_null() || template == "/metrics",
                "{method} {template} {}: undocumented body {}",
                reply.status,
                reply.body
            );
            return;
        }
        let mut errs = Vec::new();
        check(&self.doc, schema, &reply.body, "$", &mut errs);
        assert!(
            errs.is_empty(),
            "{method} {template} {}:\n{}\nbody: {}",
            reply.status,
            errs.join("\n"),
            reply.body
        );
        self.checked += 1;
    }
}

async fn call(
    spec: &mut Spec,
    c: &Client,
    method: &str,
    template: &str,
    path: &str,
    body: Option<Value>,
) -> Value {
    let reply = c
        .send(
            &method.to_uppercase(),
            path,
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
        .unwrap();
    spec.holds(method, template, &reply);
    reply.body
}

#[tokio::test]
async fn the_document_matches_every_real_response() {
    let tally = Tally::start(&Backend::sqlite("openapi")).unwrap();
    let anon = tally.anonymous();
    let raw = anon.get("/openapi.json").await.expect(200);
    assert_eq!(raw["openapi"], "3.1.0");
    let mut spec = Spec {
        doc: raw,
        checked: 0,
    };
    // Every endpoint of the brief is documented.
    for (method, path) in [
        ("post", "/v1/orgs"),
        ("get", "/v1/orgs/{org}"),
        ("patch", "/v1/orgs/{org}"),
        ("post", "/v1/orgs/{org}/tokens"),
        ("get", "/v1/orgs/{org}/tokens"),
        ("delete", "/v1/orgs/{org}/tokens/{token}"),
        ("post", "/v1/gateway-tokens"),
        ("get", "/v1/gateway-tokens"),
        ("delete", "/v1/gateway-tokens/{token}"),
        ("get", "/v1/audit"),
        ("post", "/v1/orgs/{org}/users"),
        ("get", "/v1/orgs/{org}/users"),
        ("get", "/v1/orgs/{org}/users/{user}"),
        ("patch", "/v1/orgs/{org}/users/{user}"),
        ("delete", "/v1/orgs/{org}/users/{user}"),
        ("post", "/v1/orgs/{org}/users/bulk"),
        ("post", "/v1/orgs/{org}/groups"),
        ("get", "/v1/orgs/{org}/groups"),
        ("get", "/v1/orgs/{org}/groups/{group}"),
        ("patch", "/v1/orgs/{org}/groups/{group}"),
        ("delete", "/v1/orgs/{org}/groups/{group}"),
        ("put", "/v1/orgs/{org}/groups/{group}/members/{user}"),
        ("delete", "/v1/orgs/{org}/groups/{group}/members/{user}"),
        ("post", "/v1/orgs/{org}/keys"),
        ("get", "/v1/orgs/{org}/keys"),
        ("get", "/v1/orgs/{org}/keys/{key}"),
        ("patch", "/v1/orgs/{org}/keys/{key}"),
        ("post", "/v1/orgs/{org}/keys/{key}/rotate"),
        ("delete", "/v1/orgs/{org}/keys/{key}"),
        ("get", "/v1/orgs/{org}/events"),
        ("post", "/v1/usage"),
        ("post", "/v1/authorize"),
        ("get", "/v1/orgs/{org}/holds"),
        ("delete", "/v1/orgs/{org}/holds/{request_id}"),
        ("get", "/metrics"),
        ("get", "/healthz"),
        ("get", "/readyz"),
    ] {
        assert!(
            !spec.doc["paths"][path][method].is_null(),
            "{method} {path} is not documented"
        );
    }

    let op = tally.operator();
    let s = &mut spec;
    call(
        s,
        &op,
        "post",
        "/v1/orgs",
        "/v1/orgs",
        Some(json!({"id": "acme", "name": "Acme", "default_monthly_limit_micros": 5_000_000})),
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/orgs",
        "/v1/orgs",
        Some(json!({"id": "acme", "name": "Again"})),
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/orgs",
        "/v1/orgs",
        Some(json!({"name": ""})),
    )
    .await;
    call(
        s,
        &anon,
        "post",
        "/v1/orgs",
        "/v1/orgs",
        Some(json!({"name": "x"})),
    )
    .await;
    call(
        s,
        &op,
        "patch",
        "/v1/orgs/{org}",
        "/v1/orgs/acme",
        Some(json!({"alert_thresholds": [0.5, 0.9, 1]})),
    )
    .await;
    let token = call(
        s,
        &op,
        "post",
        "/v1/orgs/{org}/tokens",
        "/v1/orgs/acme/tokens",
        None,
    )
    .await;
    let admin = tally.client(token["token"].as_str().unwrap());
    let spare = call(
        s,
        &op,
        "post",
        "/v1/orgs/{org}/tokens",
        "/v1/orgs/acme/tokens",
        Some(json!({"id": "spare"})),
    )
    .await;
    assert_eq!(spare["id"], "spare");
    call(
        s,
        &admin,
        "delete",
        "/v1/orgs/{org}/tokens/{token}",
        "/v1/orgs/acme/tokens/spare",
        None,
    )
    .await;
    call(
        s,
        &admin,
        "delete",
        "/v1/orgs/{org}/tokens/{token}",
        "/v1/orgs/acme/tokens/nope",
        None,
    )
    .await;
    call(
        s,
        &admin,
        "get",
        "/v1/orgs/{org}/tokens",
        "/v1/orgs/acme/tokens",
        None,
    )
    .await;
    let viewer = call(
        s,
        &admin,
        "post",
        "/v1/orgs/{org}/tokens",
        "/v1/orgs/acme/tokens",
        Some(json!({"role": "viewer", "name": "finance"})),
    )
    .await;
    assert_eq!(viewer["role"], "viewer");
    call(
        s,
        &admin,
        "post",
        "/v1/orgs/{org}/tokens",
        "/v1/orgs/acme/tokens",
        Some(json!({"role": "gateway"})),
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/gateway-tokens",
        "/v1/gateway-tokens",
        Some(json!({"id": "edge", "name": "edge proxies"})),
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/gateway-tokens",
        "/v1/gateway-tokens",
        Some(json!({"id": "edge", "name": "again"})),
    )
    .await;
    call(
        s,
        &op,
        "delete",
        "/v1/gateway-tokens/{token}",
        "/v1/gateway-tokens/edge",
        None,
    )
    .await;
    call(
        s,
        &op,
        "delete",
        "/v1/gateway-tokens/{token}",
        "/v1/gateway-tokens/nope",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/gateway-tokens",
        "/v1/gateway-tokens",
        None,
    )
    .await;
    call(s, &op, "get", "/v1/audit", "/v1/audit", None).await;
    call(
        s,
        &admin,
        "post",
        "/v1/orgs",
        "/v1/orgs",
        Some(json!({"name": "Mine"})),
    )
    .await;
    for u in ["ann", "bob", "cyd"] {
        call(
            s,
            &admin,
            "post",
            "/v1/orgs/{org}/users",
            "/v1/orgs/acme/users",
            Some(json!({"id": u, "email": format!("{u}@a.test"), "name": u})),
        )
        .await;
    }
    call(
        s,
        &admin,
        "post",
        "/v1/orgs/{org}/users",
        "/v1/orgs/acme/users",
        Some(json!({"id": "ann", "email": "z@a.test", "name": "z"})),
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/orgs/{org}/groups",
        "/v1/orgs/acme/groups",
        Some(json!({"id": "eng", "name": "Engineering", "monthly_limit_micros": 9_000_000})),
    )
    .await;
    call(
        s,
        &op,
        "put",
        "/v1/orgs/{org}/groups/{group}/members/{user}",
        "/v1/orgs/acme/groups/eng/members/ann",
        None,
    )
    .await;
    call(
        s,
        &op,
        "put",
        "/v1/orgs/{org}/groups/{group}/members/{user}",
        "/v1/orgs/acme/groups/eng/members/ghost",
        None,
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/orgs/{org}/users/bulk",
        "/v1/orgs/acme/users/bulk",
        Some(json!({"user_ids": ["bob", "cyd"], "add_groups": ["eng"], "status": "active"})),
    )
    .await;
    call(
        s,
        &op,
        "delete",
        "/v1/orgs/{org}/groups/{group}/members/{user}",
        "/v1/orgs/acme/groups/eng/members/cyd",
        None,
    )
    .await;
    call(
        s,
        &op,
        "patch",
        "/v1/orgs/{org}/groups/{group}",
        "/v1/orgs/acme/groups/eng",
        Some(json!({"name": "Eng"})),
    )
    .await;
    let key = call(s, &op, "post", "/v1/orgs/{org}/keys", "/v1/orgs/acme/keys", Some(json!({"id": "k1", "name": "k", "user_id": "ann", "group_ids": ["eng"], "features": ["chat"]}))).await;
    call(
        s,
        &op,
        "post",
        "/v1/orgs/{org}/keys",
        "/v1/orgs/acme/keys",
        Some(json!({"name": "no owner"})),
    )
    .await;
    call(
        s,
        &op,
        "patch",
        "/v1/orgs/{org}/keys/{key}",
        "/v1/orgs/acme/keys/k1",
        Some(json!({"monthly_limit_micros": 4_000_000})),
    )
    .await;
    call(
        s,
        &op,
        "patch",
        "/v1/orgs/{org}/users/{user}",
        "/v1/orgs/acme/users/bob",
        Some(json!({"status": "invited"})),
    )
    .await;
    let events = json!({"events": [
        {"request_id": "r1", "org_id": "acme", "user_id": "ann", "api_key_id": "k1", "cost_micros": 4_500_000, "occurred_at": now_rfc3339()},
        {"request_id": "r1", "org_id": "acme", "user_id": "ann", "cost_micros": 4_500_000, "occurred_at": now_rfc3339()},
        {"request_id": "r2", "org_id": "acme", "user_id": "ghost", "cost_micros": 1, "occurred_at": now_rfc3339()},
    ]});
    call(s, &op, "post", "/v1/usage", "/v1/usage", Some(events)).await;
    let secret = key["secret"].as_str().unwrap();
    call(
        s,
        &op,
        "post",
        "/v1/authorize",
        "/v1/authorize",
        Some(json!({"api_key": secret, "feature": "chat"})),
    )
    .await;
    call(
        s,
        &op,
        "post",
        "/v1/authorize",
        "/v1/authorize",
        Some(json!({"api_key": "nope"})),
    )
    .await;
    // Holds: placed, refused for budget, repeated with another reserve,
    // listed, released.
    for body in [
        json!({"api_key": secret, "request_id": "h-1", "reserve_micros": 10_000, "hold_ttl_ms": 60_000}),
        json!({"api_key": secret, "request_id": "h-2", "reserve_micros": 900_000_000}),
        json!({"api_key": secret, "request_id": "h-1", "reserve_micros": 20_000}),
        json!({"api_key": secret, "reserve_micros": 1}),
    ] {
        call(s, &op, "post", "/v1/authorize", "/v1/authorize", Some(body)).await;
    }
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/holds",
        "/v1/orgs/acme/holds?limit=1",
        None,
    )
    .await;
    for id in ["h-1", "h-1"] {
        let path = format!("/v1/orgs/acme/holds/{id}");
        call(
            s,
            &op,
            "delete",
            "/v1/orgs/{org}/holds/{request_id}",
            &path,
            None,
        )
        .await;
    }
    call(
        s,
        &admin,
        "post",
        "/v1/authorize",
        "/v1/authorize",
        Some(json!({"api_key": "nope"})),
    )
    .await;
    call(s, &op, "get", "/v1/orgs/{org}", "/v1/orgs/acme", None).await;
    call(s, &op, "get", "/v1/orgs/{org}", "/v1/orgs/none", None).await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/users",
        "/v1/orgs/acme/users?sort=-utilization&limit=2",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/users",
        "/v1/orgs/acme/users?sort=height",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/users/{user}",
        "/v1/orgs/acme/users/ann",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/groups",
        "/v1/orgs/acme/groups",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/groups/{group}",
        "/v1/orgs/acme/groups/eng",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/keys",
        "/v1/orgs/acme/keys",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/keys/{key}",
        "/v1/orgs/acme/keys/k1",
        None,
    )
    .await;
    let patched = call(
        s,
        &op,
        "patch",
        "/v1/orgs/{org}/keys/{key}",
        "/v1/orgs/acme/keys/k1",
        Some(json!({"name": "renamed", "expires_at": "2099-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(patched["expires_at"], "2099-01-01T00:00:00Z");
    let rotated = call(
        s,
        &op,
        "post",
        "/v1/orgs/{org}/keys/{key}/rotate",
        "/v1/orgs/acme/keys/k1/rotate",
        Some(json!({"grace_seconds": 60})),
    )
    .await;
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "{rotated}"
    );
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/events",
        "/v1/orgs/acme/events?limit=3",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/enforcement",
        "/v1/orgs/acme/enforcement",
        None,
    )
    .await;
    call(
        s,
        &op,
        "get",
        "/v1/orgs/{org}/dead-letters",
        "/v1/orgs/acme/dead-letters",
        None,
    )
    .await;
    call(s, &op, "get", "/v1/dead-letters", "/v1/dead-letters", None).await;
    let orgs = call(s, &op, "get", "/v1/orgs", "/v1/orgs?q=acme&limit=5", None).await;
    assert_eq!(orgs["items"][0]["id"], "acme", "{orgs}");
    call(
        s,
        &op,
        "delete",
        "/v1/orgs/{org}/keys/{key}",
        "/v1/orgs/acme/keys/k1",
        None,
    )
    .await;
    call(
        s,
        &op,
        "delete",
        "/v1/orgs/{org}/users/{user}",
        "/v1/orgs/acme/users/cyd",
        None,
    )
    .await;
    call(
        s,
        &op,
        "delete",
        "/v1/orgs/{org}/groups/{group}",
        "/v1/orgs/acme/groups/eng",
        None,
    )
    .await;
    call(s, &anon, "get", "/healthz", "/healthz", None).await;
    call(s, &anon, "get", "/readyz", "/readyz", None).await;
    assert!(spec.checked >= 40, "checked {} bodies", spec.checked);
    tally.stop().unwrap();
}

/// The document passes a validator of the OpenAPI 3.1 specification
/// (`openapi-spec-validator`) and a client generator makes a client of
/// every operation from it without a warning (`openapi-python-client`);
/// both pinned, installed by `scripts/services.sh`.
#[tokio::test]
async fn a_validator_and_a_client_generator_accept_the_document() {
    let tools = match std::env::var("TALLY_TEST_OPENAPI_TOOLS") {
        Ok(t) => std::path::PathBuf::from(t),
        Err(_) if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() => {
            panic!("TALLY_TEST_OPENAPI_TOOLS is not set: run scripts/test.sh")
        }
        Err(_) => {
            eprintln!("skipped: no OpenAPI tools (TALLY_TEST_OPENAPI_TOOLS)");
            return;
        }
    };
    let tally = Tally::start(&Backend::sqlite("openapi-tools")).unwrap();
    let doc = tally.anonymous().get("/openapi.json").await.expect(200);
    tally.stop().unwrap();
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|ops| ops.as_object().unwrap().len())
        .sum();
    let dir = tally_tests::temp_dir("openapi-tools");
    let file = dir.join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let run = |cmd: &str, args: &[&str]| {
        let out = std::process::Command::new(tools.join(cmd))
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd} failed:\n{text}");
        text
    };
    let said = run(
        "openapi-spec-validator",
        &["--errors", "all", "openapi.json"],
    );
    assert!(said.trim_end().ends_with("OK"), "{said}");
    std::fs::write(dir.join("generator.yaml"), "post_hooks: []\n").unwrap();
    let said = run(
        "openapi-python-client",
        &[
            "generate",
            "--path",
            "openapi.json",
            "--config",
            "generator.yaml",
        ],
    );
    assert!(!said.contains("Warning"), "{said}");
    // One module per operation, named by its unique operationId.
    let mut modules = 0;
    for group in std::fs::read_dir(dir.join("tally-client/tally_client/api")).unwrap() {
        let group = group.unwrap().path();
        if group.is_dir() {
            modules += std::fs::read_dir(&group)
                .unwrap()
                .filter(|f| {
                    let name = f.as_ref().unwrap().file_name();
                    let name = name.to_string_lossy();
                    name.ends_with(".py") && name != "__init__.py"
                })
                .count();
        }
    }
    assert_eq!(modules, operations);

    // The generated client runs the administrator's workflow against a
    // real server (tests/python/admin_workflow.py asserts each answer).
    let tally = Tally::start(&Backend::sqlite("openapi-client")).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/admin_workflow.py");
    let out = std::process::Command::new(tools.join("python"))
        .arg(&script)
        .args([tally.url.as_str(), tally_tests::OPERATOR_TOKEN])
        .env("PYTHONPATH", dir.join("tally-client"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the generated client's workflow failed:\n{said}"
    );
    assert!(said.contains("admin workflow: ok"), "{said}");
    tally.stop().unwrap();
}

/// Every field of every schema and every parameter says what it is: what a
/// generated client shows its users as documentation.
#[tokio::test]
async fn every_field_and_parameter_is_described() {
    let tally = Tally::start(&Backend::sqlite("openapi-described")).unwrap();
    let doc = tally.anonymous().get("/openapi.json").await.expect(200);
    tally.stop().unwrap();
    // On the property, or (utoipa's way for an optional reference) on the
    // reference among its `oneOf`.
    let described = |v: &Value| {
        std::iter::once(v)
            .chain(v["oneOf"].as_array().into_iter().flatten())
            .any(|v| v["description"].as_str().is_some_and(|d| !d.is_empty()))
    };
    let mut missing = Vec::new();
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        for (field, v) in schema["properties"].as_object().into_iter().flatten() {
            if !described(v) {
                missing.push(format!("{name}.{field}"));
            }
        }
    }
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(format!("{method} {path} {}", p["name"]));
                }
            }
        }
    }
    assert!(missing.is_empty(), "without a description: {missing:#?}");
}

/// The request examples of the document are real: sent in order to a real
/// server (the usage event dated now, the key's real secret in authorize),
/// each is accepted.
#[tokio::test]
async fn the_request_examples_work_as_written() {
    let tally = Tally::start(&Backend::sqlite("openapi-examples")).unwrap();
    let op = tally.operator();
    let doc = tally.anonymous().get("/openapi.json").await.expect(200);
    let example =
        |schema: &str| -> Value { doc["components"]["schemas"][schema]["examples"][0].clone() };
    let created = |r: Reply, want: u16, what: &str| {
        assert_eq!(r.status, want, "{what}: {}", r.body);
        r.body
    };
    let _ = created(
        op.post("/v1/orgs", example("CreateOrg")).await,
        201,
        "CreateOrg",
    );
    let _ = created(
        op.post("/v1/orgs/acme/users", example("AddUser")).await,
        201,
        "AddUser",
    );
    let _ = created(
        op.patch("/v1/orgs/acme/users/alice", example("PatchUser"))
            .await,
        200,
        "PatchUser",
    );
    let _ = created(
        op.post("/v1/orgs/acme/users/bulk", example("Bulk")).await,
        200,
        "Bulk",
    );
    let key = created(
        op.post("/v1/orgs/acme/keys", example("CreateKey")).await,
        201,
        "CreateKey",
    );
    let hook = example("SetWebhook").to_string();
    let _ = created(
        op.raw("PUT", "/v1/orgs/acme/webhook", hook.as_bytes())
            .await,
        200,
        "SetWebhook",
    );
    let mut usage = example("IngestRequest");
    usage["events"][0]["occurred_at"] = json!(now_rfc3339());
    let r = created(op.post("/v1/usage", usage).await, 200, "IngestRequest");
    assert_eq!(r["accepted"], 1, "{r}");
    let mut ask = example("AuthorizeRequest");
    ask["api_key"] = key["secret"].clone();
    ask["request_id"] = json!("req-2");
    let r = created(op.post("/v1/authorize", ask).await, 200, "AuthorizeRequest");
    assert_eq!(r["allowed"], true, "{r}");
    assert_eq!(r["hold"]["held_micros"], 2_000_000, "{r}");
    tally.stop().unwrap();
}
