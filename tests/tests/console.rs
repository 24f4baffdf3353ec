//! The admin console's pages, rendered by a real `tally serve` and read as
//! a browser reads them: sign-in and sessions, the overview, the users
//! table (filters, sort, pages), a user's page and its changes, and bad
//! input refused with a message and nothing changed.

use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use tally_tests::console::Console;
use tally_tests::{Backend, Client, OPERATOR_TOKEN, Tally, now_rfc3339, wait_for_spend};

const USD: i64 = 1_000_000;

/// A form's fields.
type Form<'a> = &'a [(&'a str, &'a str)];

async fn spend(op: &Client, user: &str, micros: i64, n: &mut u32) {
    *n += 1;
    let _ = op
        .post(
            "/v1/usage",
            json!({"events": [{
                "request_id": format!("r{n}"), "org_id": "acme", "user_id": user,
                "model": "m", "provider": "p", "input_tokens": 1, "output_tokens": 1,
                "cost_micros": micros, "occurred_at": now_rfc3339(),
            }]}),
        )
        .await
        .expect(200);
}

async fn token(op: &Client, org: &str, role: &str) -> String {
    op.post(&format!("/v1/orgs/{org}/tokens"), json!({"role": role}))
        .await
        .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Acme (org limit $1 000, thresholds 50 % and 80 %), Bolt, and Acme's
/// members: alice ($100 limit, $75 spent, in eng), bob ($10 limit, $10
/// spent: cut off, in eng), carol (unlimited, $1, in ops).
async fn seed(op: &Client) -> u32 {
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme & Co", "monthly_limit_micros": 1000 * USD,
                   "alert_thresholds": [0.5, 0.8, 1]}),
        )
        .await
        .expect(201);
    let _ = op
        .post("/v1/orgs", json!({"id": "bolt", "name": "Bolt"}))
        .await
        .expect(201);
    let _ = op.add_active_user("bolt", "zed").await;
    for (id, name, limit) in [
        ("alice", "Alice <Admin>", Some(100 * USD)),
        ("bob", "Bob", Some(10 * USD)),
        ("carol", "Carol", None),
    ] {
        let _ = op
            .post(
                "/v1/orgs/acme/users",
                json!({"id": id, "email": format!("{id}@acme.test"), "name": name,
                       "status": "active", "monthly_limit_micros": limit}),
            )
            .await
            .expect(201);
    }
    op.add_group("acme", "eng", "Engineering", None, &["alice", "bob"])
        .await;
    op.add_group("acme", "ops", "Operations", None, &["carol"])
        .await;
    let mut n = 0;
    spend(op, "alice", 75 * USD, &mut n).await;
    spend(op, "bob", 10 * USD, &mut n).await;
    spend(op, "carol", USD, &mut n).await;
    let _ = wait_for_spend(op, "carol", USD).await;
    let _ = wait_for_spend(op, "bob", 10 * USD).await;
    let _ = wait_for_spend(op, "alice", 75 * USD).await;
    n
}

/// How many entries acme's audit trail holds (fewer than 1 000 here).
async fn audit_len(op: &Client) -> usize {
    op.get("/v1/orgs/acme/events?limit=1000").await.expect(200)["items"]
        .as_array()
        .unwrap()
        .len()
}

fn user(op_user: &Value) -> (i64, String) {
    (
        op_user["monthly_limit_micros"].as_i64().unwrap_or(-1),
        op_user["status"].as_str().unwrap().to_owned(),
    )
}

/// A webhook receiver on loopback: it answers 200 and keeps each request's
/// timestamp and signature headers and body.
async fn receiver() -> (String, Arc<Mutex<Vec<(String, String, String)>>>) {
    let got: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let keep = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let keep = Arc::clone(&keep);
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                keep.lock()
                    .unwrap()
                    .push((h("tally-timestamp"), h("tally-signature"), body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(tokio::spawn(
        async move { axum::serve(listener, app).await },
    ));
    (url, got)
}

const SERVE: &[&str] = &["--webhook-allow", "127.0.0.1"];

#[tokio::test]
async fn console_on_sqlite() {
    let tally = Tally::start_with(&Backend::sqlite("console"), SERVE).unwrap();
    console(&tally).await;
}

#[tokio::test]
async fn console_on_postgres() {
    let Some(backend) = Backend::postgres("console").await.unwrap() else {
        return;
    };
    // Holds need a place to be kept beside PostgreSQL in the embedded mode.
    let holds = tally_tests::temp_dir("console-pg-holds");
    let holds = holds.to_str().unwrap();
    let args = [SERVE, &["--holds-dir", holds]].concat();
    let tally = Tally::start_with(&backend, &args).unwrap();
    console(&tally).await;
}

async fn console(tally: &Tally) {
    let op = tally.operator();
    let _ = seed(&op).await;
    let admin_token = token(&op, "acme", "admin").await;
    let viewer_token = token(&op, "acme", "viewer").await;

    // Signed out, every page sends the browser to sign in, and back after.
    let mut admin = Console::new(&tally.url);
    admin
        .get("/console/orgs/acme/users?group=eng")
        .await
        .redirects_to("/console/sign-in?next=%2Fconsole%2Forgs%2Facme%2Fusers%3Fgroup%3Deng");
    let form = admin
        .get("/console/sign-in?next=/console/orgs/acme/users")
        .await
        .expect(200);
    assert!(form.html.contains(r#"type="password""#), "{}", form.html);
    // A wrong token, a gateway token: refused on the page, no cookie.
    let wrong = admin.sign_in("tly_not_a_token").await.expect(401);
    assert!(wrong.text().contains("that token is unknown or revoked"));
    assert!(wrong.set_cookie.is_none());
    let gateway = token(&op, "acme", "gateway").await;
    let refused = admin.sign_in(&gateway).await.expect(403);
    assert!(refused.text().contains("a gateway token cannot sign in"));
    assert!(admin.cookie.is_none());

    // A form larger than any page posts is refused before it is read.
    let big = "x".repeat(300 << 10);
    let page = admin.post("/console/sign-in", &[("token", &big)]).await;
    assert_eq!(page.status, 413, "{}", page.text());
    // Signed in: a cookie the page's scripts cannot read, sent only to the
    // console's own pages, expiring.
    let signed = admin.sign_in(&admin_token).await;
    signed.redirects_to("/console");
    let cookie = signed.set_cookie.clone().unwrap();
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(cookie.contains(part), "{part} missing in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP here: {cookie}");
    assert!(!cookie.contains(&admin_token));
    admin
        .get("/console")
        .await
        .redirects_to("/console/orgs/acme");

    // The overview: the period, the org's spend against its limit, held
    // spend, the projection, the chart, the top users and groups, users
    // at thresholds and the latest enforcement events.
    let page = admin.get("/console/orgs/acme").await.expect(200);
    let text = page.text();
    for want in [
        "Acme & Co",
        "UTC, resets 1 ",
        "$86.00",
        "of $1,000.00",
        "8.6 %",
        "Held now",
        "Projected month-end",
        "Alice <Admin>",
        "eng",
        "ops",
        "cut off at its limit",
        "crossed 50 % of its limit",
        "2 at or above 50 %",
        "1 at or above 80 %",
        "1 at or above 100 %",
    ] {
        assert!(text.contains(want), "{want:?} not on the overview: {text}");
    }
    // Names are escaped: no markup from data.
    assert!(
        page.html.contains("Alice &#60;Admin&#62;") || page.html.contains("Alice &lt;Admin&gt;")
    );
    assert!(page.html.contains("<svg class=\"chart\""), "no chart");
    assert!(page.html.contains("class=\"limit\""), "no limit line");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.headers["cache-control"], "no-store");

    // The stylesheet and script: content-hashed, cached for a year; an
    // old name is gone.
    let css = page.html.split("href=\"/console/assets/").nth(1).unwrap();
    let css = &css[..css.find('"').unwrap()];
    assert!(
        css.starts_with("console.") && css.ends_with(".css"),
        "{css}"
    );
    let asset = admin
        .get(&format!("/console/assets/{css}"))
        .await
        .expect(200);
    assert_eq!(
        asset.headers["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let _ = admin
        .get("/console/assets/console.000000000000.css")
        .await
        .expect(404);

    // Users: one row each, groups as badges, limits, spend and use of the
    // limit, and filters kept in the URL.
    let page = admin.get("/console/orgs/acme/users").await.expect(200);
    let text = page.text();
    for want in [
        "Alice <Admin>",
        "alice@acme.test",
        "Bob",
        "Carol",
        "75.0 %",
        "100.0 %",
        "$75.00",
        "cut off",
    ] {
        assert!(
            text.contains(want),
            "{want:?} not on the users page: {text}"
        );
    }
    assert!(
        page.html
            .contains("class=\"badge\" href=\"/console/orgs/acme/users?group=eng\"")
    );
    assert!(
        page.html.contains("bar bar-over"),
        "bob's bar is at his limit"
    );
    assert!(page.html.contains("bar bar-warn"), "alice is past 50 %");
    let page = admin
        .get("/console/orgs/acme/users?group=eng&min_utilization=0.5&sort=-spend")
        .await
        .expect(200);
    let text = page.text();
    assert!(
        text.contains("Alice") && text.contains("Bob") && !text.contains("Carol"),
        "{text}"
    );
    assert!(
        text.find("Alice").unwrap() < text.find("Bob").unwrap(),
        "by spend, most first"
    );
    assert!(
        page.html.contains(r#"<option value="eng" selected>"#),
        "the filter stays set"
    );
    let page = admin
        .get("/console/orgs/acme/users?cut_off=yes")
        .await
        .expect(200);
    assert!(page.text().contains("Bob") && !page.text().contains("Alice"));
    let bad = admin
        .get("/console/orgs/acme/users?cut_off=maybe")
        .await
        .expect(400);
    assert!(bad.text().contains("cut_off must be yes or no"));
    let bad = admin
        .get("/console/orgs/acme/users?sort=shoe")
        .await
        .expect(400);
    assert!(bad.text().contains("is not one of name, email"));

    // The list as CSV: the same members, money to the micro-dollar,
    // nothing a spreadsheet would run.
    let csv = admin
        .get("/console/orgs/acme/users.csv?group=eng&sort=-spend")
        .await
        .expect(200);
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let lines: Vec<&str> = csv.html.lines().collect();
    assert!(
        lines[0]
            .starts_with("id,name,email,status,groups,monthly_limit_usd,limit_source,spend_usd"),
        "{}",
        csv.html
    );
    assert_eq!(lines.len(), 3, "{}", csv.html);
    assert!(lines[1].starts_with("alice,Alice <Admin>,alice@acme.test,active,eng,100.000000,own,75.000000,0.000000,75.00,false,1,"), "{}", lines[1]);
    assert!(
        lines[2].starts_with(
            "bob,Bob,bob@acme.test,active,eng,10.000000,own,10.000000,0.000000,100.00,true,1,"
        ),
        "{}",
        lines[2]
    );
    let page = admin
        .get("/console/orgs/acme/users?group=eng&sort=-spend")
        .await
        .expect(200);
    assert!(
        page.html
            .replace("&#38;", "&amp;")
            .contains("href=\"/console/orgs/acme/users.csv?sort=-spend&amp;group=eng\""),
        "the export link keeps the filters"
    );

    // Alerts, filtered by kind and by subject (the API's filters).
    let alerts = admin
        .get("/console/orgs/acme/alerts?event=cut_off")
        .await
        .expect(200);
    let text = alerts.text();
    assert!(
        text.contains("user bob")
            && text.contains("cut off at its limit")
            && !text.contains("crossed 50 %"),
        "{text}"
    );
    let alerts = admin
        .get("/console/orgs/acme/alerts?subject=user:alice")
        .await
        .expect(200);
    let text = alerts.text();
    assert!(
        text.contains("user alice") && !text.contains("user bob"),
        "{text}"
    );
    let bad = admin
        .get("/console/orgs/acme/alerts?event=boom")
        .await
        .expect(400);
    assert!(bad.text().contains("is not one of threshold_crossed"));
    let api = op
        .get("/v1/orgs/acme/enforcement?subject=user:bob&event=threshold_crossed")
        .await
        .expect(200);
    let items = api["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "bob crossed 50, 80 and 100 %: {api}");
    assert!(
        items
            .iter()
            .all(|e| e["subject_id"] == "bob" && e["event"] == "threshold_crossed")
    );
    let _ = op
        .get("/v1/orgs/acme/enforcement?subject=team:x")
        .await
        .expect(400);
    // Paged: two at a time, every one once.
    let mut seen = Vec::new();
    let mut next = String::from("/v1/orgs/acme/enforcement?subject=user:bob&limit=2");
    loop {
        let page = op.get(&next).await.expect(200);
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => {
                next = format!("/v1/orgs/acme/enforcement?subject=user:bob&limit=2&cursor={c}")
            }
            None => break,
        }
    }
    assert_eq!(
        seen.len(),
        5,
        "three thresholds, a forecast (spend at the limit) and a cutoff: {seen:?}"
    );

    // The audit log, filtered.
    let audit = admin
        .get("/console/orgs/acme/audit?kind=group_created")
        .await
        .expect(200);
    let text = audit.text();
    assert!(
        text.contains("group created") && !text.contains("user added"),
        "{text}"
    );
    let audit = admin
        .get("/console/orgs/acme/audit?subject=user:carol&order=oldest")
        .await
        .expect(200);
    let text = audit.text();
    assert!(
        text.contains("user added") && text.contains("member added") && !text.contains("alice@"),
        "{text}"
    );
    let bad = admin
        .get("/console/orgs/acme/audit?from=yesterday")
        .await
        .expect(400);
    assert!(
        bad.text()
            .contains("from must be an RFC 3339 time or a day")
    );

    // A user's page: the month's chart with the limit line, 13 months,
    // groups, the audit entries about them.
    let page = admin
        .get("/console/orgs/acme/users/alice")
        .await
        .expect(200);
    let text = page.text();
    for want in [
        "Alice <Admin>",
        "$75.00",
        "of $100.00",
        "75.0 %",
        "(own limit)",
        "eng",
        "user added",
        "member added",
        "Set limit",
    ] {
        assert!(text.contains(want), "{want:?} not on alice's page: {text}");
    }
    assert!(
        page.html.contains("limit $100.00"),
        "the chart's limit line"
    );

    // Changes: a limit in dollars; bad input refused on the page with
    // nothing changed.
    let csrf = page.csrf();
    let path = "/console/orgs/acme/users/alice";
    admin
        .post(
            path,
            &[("csrf", &csrf), ("action", "limit"), ("limit", "250")],
        )
        .await
        .redirects_to("/console/orgs/acme/users/alice?done=limit");
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(user(&alice), (250 * USD, "active".into()));
    let page = admin.get(&format!("{path}?done=limit")).await.expect(200);
    assert!(page.text().contains("The limit was changed."));
    let events_before = audit_len(&op).await;
    let refusals: [(Form, u16, &str); 5] = [
        (
            &[("csrf", &csrf), ("action", "limit"), ("limit", "abc")],
            400,
            "the limit must be an amount in dollars",
        ),
        (
            &[("csrf", &csrf), ("action", "limit"), ("limit", "-5")],
            400,
            "limit",
        ),
        (
            &[("csrf", "forged"), ("action", "limit"), ("limit", "1")],
            403,
            "security token is missing or stale",
        ),
        (
            &[("action", "suspend")],
            403,
            "security token is missing or stale",
        ),
        (
            &[("csrf", &csrf), ("action", "explode")],
            400,
            "unknown action",
        ),
    ];
    for (fields, status, message) in refusals {
        let page = admin.post(path, fields).await.expect(status);
        assert!(
            page.text().contains(message),
            "{message:?} not in {}",
            page.text()
        );
        assert!(
            page.text().contains("Alice"),
            "the page is shown again with the message"
        );
    }
    // What was typed stays in the field.
    let page = admin
        .post(
            path,
            &[("csrf", &csrf), ("action", "limit"), ("limit", "abc")],
        )
        .await;
    assert!(page.html.contains(r#"name="limit" value="abc""#));
    // A form sent from another site.
    let page = admin
        .post_from(
            path,
            &[("csrf", &csrf), ("action", "suspend")],
            "http://evil.example",
        )
        .await
        .expect(403);
    assert!(page.text().contains("sent from another site"));
    let events_after = audit_len(&op).await;
    assert_eq!(events_before, events_after, "a refused form wrote nothing");
    assert_eq!(
        user(&op.get("/v1/orgs/acme/users/alice").await.expect(200)),
        (250 * USD, "active".into())
    );

    // The quick edit in a users row goes back to the list it came from.
    let back = "/console/orgs/acme/users?group=eng";
    admin
        .post(
            "/console/orgs/acme/users/bob",
            &[
                ("csrf", &csrf),
                ("action", "limit"),
                ("limit", "20.50"),
                ("back", back),
            ],
        )
        .await
        .redirects_to(back);
    assert_eq!(
        user(&op.get("/v1/orgs/acme/users/bob").await.expect(200)).0,
        20_500_000
    );
    // …but never off the console.
    admin
        .post(
            "/console/orgs/acme/users/bob",
            &[
                ("csrf", &csrf),
                ("action", "suspend"),
                ("back", "https://evil.example/"),
            ],
        )
        .await
        .redirects_to("/console/orgs/acme/users/bob?done=status");
    assert_eq!(
        user(&op.get("/v1/orgs/acme/users/bob").await.expect(200)).1,
        "suspended"
    );

    // The bulk bar: review says what would change and writes nothing;
    // confirm does it and says what did.
    let bulk = "/console/orgs/acme/bulk";
    let before = audit_len(&op).await;
    let review = admin
        .post(
            bulk,
            &[
                ("csrf", &csrf),
                ("step", "review"),
                ("scope", "all"),
                ("group", "eng"),
                ("change", "add_group"),
                ("group_id", "oncall"),
            ],
        )
        .await
        .expect(200);
    let text = review.text();
    assert!(
        text.contains("every member matching the filter (group eng)"),
        "{text}"
    );
    assert!(
        text.contains("2 members now, of whom 2 would change"),
        "{text}"
    );
    assert!(
        text.contains("Group oncall does not exist: it will be created first"),
        "{text}"
    );
    assert!(review.html.contains(r#"name="step" value="apply""#));
    assert_eq!(audit_len(&op).await, before, "a review writes nothing");
    let done = admin
        .post(
            bulk,
            &[
                ("csrf", &csrf),
                ("step", "apply"),
                ("scope", "all"),
                ("group", "eng"),
                ("change", "add_group"),
                ("group_id", "oncall"),
            ],
        )
        .await
        .expect(200);
    assert!(
        done.text().contains("2 of 2 members changed"),
        "{}",
        done.text()
    );
    assert!(done.text().contains("Group oncall was created"));
    let oncall = op.get("/v1/orgs/acme/users?group=oncall").await.expect(200);
    assert_eq!(oncall["items"].as_array().unwrap().len(), 2);
    // Ticked members: a limit for carol only.
    let done = admin
        .post(
            bulk,
            &[
                ("csrf", &csrf),
                ("step", "apply"),
                ("scope", "selected"),
                ("user_ids", "carol"),
                ("change", "set_limit"),
                ("limit", "$1,200.50"),
            ],
        )
        .await
        .expect(200);
    assert!(
        done.text()
            .contains("set the monthly limit to $1,200.50 for the 1 selected member"),
        "{}",
        done.text()
    );
    assert_eq!(
        user(&op.get("/v1/orgs/acme/users/carol").await.expect(200)).0,
        1_200_500_000
    );
    // A new group and a member who does not exist: refused, and no group
    // is left behind.
    let page = admin
        .post(
            bulk,
            &[
                ("csrf", &csrf),
                ("step", "apply"),
                ("scope", "selected"),
                ("user_ids", "carol"),
                ("user_ids", "nosuchuser"),
                ("change", "add_group"),
                ("group_id", "ghosts"),
            ],
        )
        .await;
    assert_eq!(page.status, 404, "{}", page.text());
    assert!(page.text().contains("nosuchuser"), "{}", page.text());
    let _ = op.get("/v1/orgs/acme/groups/ghosts").await.expect(404);
    // Refused: nobody ticked, a limit of "abc", no change chosen.
    let bad: [(Form, &str); 3] = [
        (
            &[
                ("csrf", &csrf),
                ("scope", "selected"),
                ("change", "suspend"),
            ],
            "select at least one member",
        ),
        (
            &[
                ("csrf", &csrf),
                ("scope", "all"),
                ("change", "set_limit"),
                ("limit", "abc"),
            ],
            "the limit must be an amount in dollars",
        ),
        (&[("csrf", &csrf), ("scope", "all")], "choose a change"),
    ];
    for (fields, message) in bad {
        let page = admin.post(bulk, fields).await.expect(400);
        assert!(
            page.text().contains(message),
            "{message:?} not in {}",
            page.text()
        );
    }

    // Keys: created with the secret shown once, bad input kept in the form.
    let keys = "/console/orgs/acme/keys";
    let created = admin
        .post(
            keys,
            &[
                ("csrf", &csrf),
                ("name", "ci"),
                ("user_id", "carol"),
                ("features", "chat"),
                ("limit", "5"),
            ],
        )
        .await
        .expect(200);
    let text = created.text();
    assert!(text.contains("shown this once"), "{text}");
    let secret = &created.shown_once();
    let ok = op
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    assert_eq!(ok["allowed"], true, "{ok}");
    let nothing_held = admin
        .get("/console/orgs/acme/users/carol")
        .await
        .expect(200);
    assert!(
        nothing_held
            .text()
            .contains("No call of theirs is in flight")
    );
    // A call in flight on it: a hold of $2.
    let held = op
        .post(
            "/v1/authorize",
            json!({"api_key": secret, "request_id": "carol-call-1", "reserve_micros": 2 * USD}),
        )
        .await
        .expect(200);
    assert_eq!(held["hold"]["held_micros"], 2 * USD, "{held}");
    // The key is on its owner's page with the hold, and the API lists one
    // member's keys.
    let carol = admin
        .get("/console/orgs/acme/users/carol")
        .await
        .expect(200);
    let text = carol.text();
    assert!(text.contains("ci k_") && text.contains("live"), "{text}");
    assert!(text.contains("carol-call-1"), "the live hold: {text}");
    assert!(text.contains("$2.00 held"), "{text}");
    assert!(!text.contains("No call of theirs is in flight"), "{text}");
    let alice = admin
        .get("/console/orgs/acme/users/alice")
        .await
        .expect(200);
    assert!(!alice.text().contains("carol-call-1"), "another's hold");
    // Her month by model: the one model her calls named.
    assert!(
        alice
            .text()
            .contains("By model this month Model Spend Requests Input tokens Output tokens m $"),
        "{}",
        alice.text()
    );
    let overview = admin.get("/console/orgs/acme").await.expect(200);
    assert!(
        overview.text().contains("By model this month"),
        "{}",
        overview.text()
    );
    let owned = op.get("/v1/orgs/acme/keys?user=carol").await.expect(200);
    assert_eq!(owned["items"].as_array().unwrap().len(), 1);
    let none = op.get("/v1/orgs/acme/keys?user=alice").await.expect(200);
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    let _ = op
        .get("/v1/orgs/acme/keys?user=no%20such")
        .await
        .expect(400);
    let list = admin.get(keys).await.expect(200);
    assert!(!list.html.contains(secret), "the secret is shown once");
    assert!(
        list.text().contains("ci") && list.text().contains("$5.00") && list.text().contains("chat")
    );
    let long = "n".repeat(5000);
    let refused: [(Form, u16, &str); 2] = [
        (
            &[("csrf", &csrf), ("name", "x"), ("limit", "abc")],
            400,
            "the limit must be an amount in dollars",
        ),
        (
            &[("csrf", &csrf), ("name", &long), ("user_id", "carol")],
            400,
            "name",
        ),
    ];
    for (fields, status, message) in refused {
        let page = admin.post(keys, fields).await.expect(status);
        assert!(
            page.text().contains(message),
            "{message:?} not in {}",
            page.text()
        );
    }
    let page = admin
        .post(keys, &[("csrf", &csrf), ("name", "x"), ("limit", "abc")])
        .await;
    assert!(
        page.html.contains(r#"name="limit" value="abc""#),
        "what was typed stays"
    );
    let key_id = op.get("/v1/orgs/acme/keys").await.expect(200)["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        op.get("/v1/orgs/acme/keys").await.expect(200)["items"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "refused keys were not made"
    );
    admin
        .post(
            &format!("{keys}/{key_id}"),
            &[("csrf", &csrf), ("action", "revoke")],
        )
        .await
        .redirects_to("/console/orgs/acme/keys?done=revoked");
    let refused = op
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    assert_eq!(refused["allowed"], false);

    // Groups: the list, a new one, its page, its limit and members.
    let groups = admin.get("/console/orgs/acme/groups").await.expect(200);
    let text = groups.text();
    assert!(
        text.contains("Engineering") && text.contains("$85.00"),
        "{text}"
    );
    let gpath = "/console/orgs/acme/groups";
    let page = admin
        .post(
            gpath,
            &[
                ("csrf", &csrf),
                ("id", "qa"),
                ("name", "QA"),
                ("limit", "lots"),
            ],
        )
        .await
        .expect(400);
    assert!(
        page.text()
            .contains("the limit must be an amount in dollars")
    );
    assert!(
        page.html.contains(r#"name="name" value="QA""#),
        "what was typed stays"
    );
    let _ = op.get("/v1/orgs/acme/groups/qa").await.expect(404);
    admin
        .post(
            gpath,
            &[
                ("csrf", &csrf),
                ("id", "qa"),
                ("name", "QA"),
                ("limit", "30"),
            ],
        )
        .await
        .redirects_to("/console/orgs/acme/groups/qa?done=created");
    let qa = format!("{gpath}/qa");
    admin
        .post(
            &qa,
            &[
                ("csrf", &csrf),
                ("action", "add_member"),
                ("user_id", "alice"),
            ],
        )
        .await
        .redirects_to("/console/orgs/acme/groups/qa?done=added");
    let page = admin.get(&qa).await.expect(200);
    let text = page.text();
    for want in [
        "QA",
        "Alice <Admin>",
        "of $30.00",
        "$75.00",
        "Members by spend this month",
    ] {
        assert!(
            text.contains(want),
            "{want:?} not on the group's page: {text}"
        );
    }
    assert!(page.html.contains("<svg class=\"chart\""));
    let bad = admin
        .post(
            &qa,
            &[
                ("csrf", &csrf),
                ("action", "add_member"),
                ("user_id", "nobody"),
            ],
        )
        .await
        .expect(404);
    assert!(bad.text().contains("nobody"), "{}", bad.text());
    admin
        .post(
            &qa,
            &[("csrf", &csrf), ("action", "limit"), ("limit", "45.5")],
        )
        .await
        .redirects_to("/console/orgs/acme/groups/qa?done=changed");
    admin
        .post(
            &qa,
            &[
                ("csrf", &csrf),
                ("action", "remove_member"),
                ("user_id", "alice"),
            ],
        )
        .await
        .redirects_to("/console/orgs/acme/groups/qa?done=removed");
    let qa_json = op.get("/v1/orgs/acme/groups/qa").await.expect(200);
    assert_eq!(qa_json["monthly_limit_micros"], 45_500_000);
    assert_eq!(qa_json["member_count"], 0);

    // Settings: the org's, its webhook with a test send, its tokens.
    let spath = "/console/orgs/acme/settings";
    let page = admin.get(spath).await.expect(200);
    let text = page.text();
    assert!(
        page.html
            .contains(r#"name="thresholds" value="50, 80, 100""#),
        "{text}"
    );
    assert!(text.contains("No webhook"), "{text}");
    let page = admin
        .post(
            spath,
            &[
                ("csrf", &csrf),
                ("action", "org"),
                ("name", "Acme & Co"),
                ("default_limit", "60"),
                ("org_limit", "1000"),
                ("thresholds", "50, lots"),
            ],
        )
        .await
        .expect(400);
    assert!(
        page.text()
            .contains("alert thresholds are percentages such as 50, 80, 100; got \"lots\"")
    );
    assert!(
        page.html.contains(r#"name="thresholds" value="50, lots""#),
        "what was typed stays"
    );
    let page = admin
        .post(
            spath,
            &[
                ("csrf", &csrf),
                ("action", "org"),
                ("name", "Acme & Co"),
                ("default_limit", "60"),
                ("org_limit", "1000"),
                ("thresholds", "50, 120"),
            ],
        )
        .await;
    assert!(page.status == 400 || page.status == 422, "{}", page.text());
    admin
        .post(
            spath,
            &[
                ("csrf", &csrf),
                ("action", "org"),
                ("name", "Acme & Co"),
                ("default_limit", "60"),
                ("org_limit", "1000"),
                ("thresholds", "50, 80, 100"),
            ],
        )
        .await
        .redirects_to("/console/orgs/acme/settings?done=org");
    let acme = op.get("/v1/orgs/acme").await.expect(200);
    assert_eq!(acme["default_monthly_limit_micros"], 60 * USD);
    assert_eq!(acme["alert_thresholds"], json!([0.5, 0.8, 1]));
    // The webhook: set (its secret shown once), refused where not allowed,
    // a test send signed like every delivery.
    let page = admin
        .post(
            spath,
            &[
                ("csrf", &csrf),
                ("action", "webhook_set"),
                ("url", "http://10.1.2.3/hook"),
            ],
        )
        .await;
    assert_eq!(page.status, 422, "{}", page.text());
    assert!(
        page.text().contains("webhook URL refused"),
        "{}",
        page.text()
    );
    let (url, got) = receiver().await;
    let page = admin
        .post(
            spath,
            &[("csrf", &csrf), ("action", "webhook_set"), ("url", &url)],
        )
        .await
        .expect(200);
    let secret = page.shown_once();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(!admin.get(spath).await.html.contains(&secret), "shown once");
    let page = admin
        .post(spath, &[("csrf", &csrf), ("action", "webhook_test")])
        .await
        .expect(200);
    assert!(
        page.text()
            .contains("Test sent: the receiver answered HTTP 200"),
        "{}",
        page.text()
    );
    let (ts, sig, body) = got.lock().unwrap()[0].clone();
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent["type"], "test");
    assert_eq!(sent["org_id"], "acme");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sig, format!("v1={want}"), "signed as deliveries are");
    let api = op
        .post("/v1/orgs/acme/webhook/test", json!({}))
        .await
        .expect(200);
    assert_eq!(api["delivered"], true, "{api}");
    assert_eq!(api["status"], 200);
    assert_eq!(got.lock().unwrap().len(), 2);
    // As Slack messages: the format is kept and shown, a test send is a
    // message; an unknown format is refused and changes nothing.
    let set_as = |format| {
        [
            ("csrf", csrf.as_str()),
            ("action", "webhook_set"),
            ("url", url.as_str()),
            ("format", format),
        ]
    };
    let page = admin.post(spath, &set_as("teams")).await;
    assert_eq!(page.status, 400, "{}", page.text());
    assert!(
        page.text()
            .contains("the format is tally or slack, not \"teams\""),
        "{}",
        page.text()
    );
    assert_eq!(
        op.get("/v1/orgs/acme/webhook").await.expect(200)["format"],
        "tally"
    );
    let _ = admin.post(spath, &set_as("slack")).await.expect(200);
    let settings = admin.get(spath).await.expect(200);
    assert!(
        settings.text().contains("as Slack messages"),
        "{}",
        settings.text()
    );
    assert!(
        settings.html.contains(r#"<option value="slack" selected>"#),
        "{}",
        settings.html
    );
    let _ = admin
        .post(spath, &[("csrf", &csrf), ("action", "webhook_test")])
        .await
        .expect(200);
    let (_, _, body) = got.lock().unwrap()[2].clone();
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert!(
        sent["text"]
            .as_str()
            .unwrap()
            .starts_with(":wave: *acme*: a test notification from Tally."),
        "{sent}"
    );
    let bolt = op.post("/v1/orgs/bolt/webhook/test", json!({})).await;
    assert_eq!(bolt.status, 422, "no webhook: {}", bolt.body);
    // Tokens: a viewer token minted (shown once), signed in with, revoked.
    let page = admin
        .post(
            spath,
            &[
                ("csrf", &csrf),
                ("action", "token_mint"),
                ("role", "viewer"),
                ("name", "auditor"),
            ],
        )
        .await
        .expect(200);
    let minted = page.shown_once();
    let mut auditor = Console::new(&tally.url);
    auditor.sign_in(&minted).await.redirects_to("/console");
    let settings = auditor.get(spath).await.expect(200);
    assert!(
        !settings.text().contains("Mint a token") && settings.html.contains("disabled"),
        "a viewer's settings are read-only"
    );
    let acsrf = settings.csrf();
    let _ = auditor
        .post(
            spath,
            &[("csrf", &acsrf), ("action", "org"), ("name", "Hijacked")],
        )
        .await
        .expect(403);
    let tokens = op.get("/v1/orgs/acme/tokens").await.expect(200);
    let auditor_id = tokens["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "auditor")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin
        .post(
            spath,
            &[
                ("csrf", &csrf),
                ("action", "token_revoke"),
                ("token_id", &auditor_id),
            ],
        )
        .await
        .redirects_to("/console/orgs/acme/settings?done=token_revoked");
    auditor.get(spath).await.redirects_to("/console/sign-in");
    assert_eq!(
        op.get("/v1/orgs/acme").await.expect(200)["name"],
        "Acme & Co"
    );

    // Another org's pages and ids: refused to an org's session.
    let other = admin.get("/console/orgs/bolt").await.expect(403);
    assert!(other.text().contains("another org"));
    let _ = admin.get("/console/orgs/bolt/users/zed").await.expect(403);
    let _ = admin
        .post(
            "/console/orgs/bolt/users/zed",
            &[("csrf", &csrf), ("action", "suspend")],
        )
        .await
        .expect(403);
    assert_eq!(
        user(&op.get("/v1/orgs/bolt/users/zed").await.expect(200)).1,
        "active"
    );
    let _ = admin
        .get("/console/orgs/acme/users/nobody")
        .await
        .expect(404);

    // A viewer sees everything and changes nothing.
    let mut viewer = Console::new(&tally.url);
    viewer.sign_in(&viewer_token).await.redirects_to("/console");
    let page = viewer
        .get("/console/orgs/acme/users/alice")
        .await
        .expect(200);
    assert!(page.text().contains("$75.00") && !page.text().contains("Set limit"));
    let users = viewer.get("/console/orgs/acme/users").await.expect(200);
    assert!(
        !users.html.contains("name=\"limit\""),
        "no quick edit for a viewer"
    );
    let vcsrf = page.csrf();
    let page = viewer
        .post(
            path,
            &[("csrf", &vcsrf), ("action", "limit"), ("limit", "1")],
        )
        .await
        .expect(403);
    assert!(
        page.text()
            .contains("a viewer sees everything and changes nothing")
    );
    assert_eq!(
        user(&op.get("/v1/orgs/acme/users/alice").await.expect(200)).0,
        250 * USD
    );

    // The operator picks an org, and may open any.
    let mut operator = Console::new(&tally.url);
    operator
        .sign_in(OPERATOR_TOKEN)
        .await
        .redirects_to("/console");
    operator.get("/console").await.redirects_to("/console/orgs");
    let orgs = operator.get("/console/orgs?q=acm").await.expect(200);
    assert!(orgs.text().contains("Acme & Co") && !orgs.text().contains("Bolt"));
    let _ = operator.get("/console/orgs/bolt/users").await.expect(200);
    // An org's session has no org picker.
    admin
        .get("/console/orgs")
        .await
        .redirects_to("/console/orgs/acme");

    // Signing out closes the session everywhere, not just in the browser.
    let old = admin.clone();
    admin
        .post("/console/sign-out", &[("csrf", &csrf)])
        .await
        .redirects_to("/console/sign-in?signed_out=1");
    old.get("/console/orgs/acme")
        .await
        .redirects_to("/console/sign-in");
    // A revoked token closes its sessions.
    let viewer_id = op.get("/v1/orgs/acme/tokens").await.expect(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "viewer" && t["revoked_at"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _ = op
        .delete(&format!("/v1/orgs/acme/tokens/{viewer_id}"))
        .await
        .expect(204);
    viewer
        .get("/console/orgs/acme")
        .await
        .redirects_to("/console/sign-in");

    // Where a limit comes from: a member who joined on the org's default,
    // then given one of their own (the admin's token was revoked above).
    let _ = op
        .patch(
            "/v1/orgs/acme",
            json!({"default_monthly_limit_micros": 20 * USD}),
        )
        .await
        .expect(200);
    let _ = op.add_active_user("acme", "dan").await;
    let row = operator
        .get("/console/orgs/acme/users?q=dan")
        .await
        .expect(200);
    assert!(
        row.html
            .contains(r#"<span class="muted source">org default</span>"#),
        "{}",
        row.html
    );
    let dan = operator
        .get("/console/orgs/acme/users/dan")
        .await
        .expect(200);
    assert!(
        dan.text().contains("of $20.00 (org default limit)"),
        "{}",
        dan.text()
    );
    operator
        .post(
            "/console/orgs/acme/users/dan",
            &[("csrf", &dan.csrf()), ("action", "limit"), ("limit", "20")],
        )
        .await
        .redirects_to("/console/orgs/acme/users/dan?done=limit");
    let dan = operator
        .get("/console/orgs/acme/users/dan")
        .await
        .expect(200);
    assert!(
        dan.text().contains("of $20.00 (own limit)"),
        "{}",
        dan.text()
    );

    // One token holds at most 20 sessions: the oldest closes when a 21st
    // opens (no token can fill the table for everyone); signing in again
    // from a signed-in browser closes its previous session.
    let mut first = Console::new(&tally.url);
    first.sign_in(OPERATOR_TOKEN).await.redirects_to("/console");
    let mut again = first.clone();
    again.sign_in(OPERATOR_TOKEN).await.redirects_to("/console");
    first
        .get("/console/orgs")
        .await
        .redirects_to("/console/sign-in");
    let oldest = again.clone();
    for _ in 0..20 {
        let mut c = Console::new(&tally.url);
        c.sign_in(OPERATOR_TOKEN).await.redirects_to("/console");
    }
    oldest
        .get("/console/orgs")
        .await
        .redirects_to("/console/sign-in");
    let _ = operator.get("/console/orgs").await;

    // Tokens never reach the log.
    let log = tally.log_text();
    for t in [admin_token.as_str(), viewer_token.as_str(), OPERATOR_TOKEN] {
        assert!(!log.contains(t), "a token is in the log");
    }
}
