//! Lists page with a cursor, logs read either way and filter: the
//! enforcement history and the audit trail on a real `tally serve`, on
//! SQLite and on PostgreSQL.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_rfc3339, wait_for_spend};

const USD: i64 = 1_000_000;

/// An item's time, in ms.
fn at_ms(item: &Value) -> i64 {
    tally_proto::parse_rfc3339_ms(item["at"].as_str().unwrap()).unwrap()
}

/// Every item of `path` (which has no query yet), `limit` a page: the
/// pages' items in order, and how many pages it took.
async fn every_page(op: &Client, path: &str, limit: u32) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let page = op.get(&url).await.expect(200);
        pages += 1;
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit as usize, "{page}");
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (items, pages),
        }
        assert!(pages < 1_000, "{path} never ends");
    }
}

async fn listings(backend: Backend) {
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme", "alert_thresholds": [0.5, 0.8, 0.9]}),
        )
        .await
        .expect(201);
    let admin = op.post("/v1/orgs/acme/tokens", json!({})).await.expect(201);
    let admin_id = admin["id"].as_str().unwrap().to_owned();
    let admin = tally.client(admin["token"].as_str().unwrap());
    let _ = admin
        .post("/v1/orgs/acme/groups", json!({"id": "eng", "name": "Eng"}))
        .await
        .expect(201);
    // Six users with $1 each, three of them in eng; each spends $1.50 at
    // once: 0.5, 0.8 and 0.9 crossed and cut off, four events a user.
    for i in 0..6 {
        let id = format!("u{i}");
        let _ = op.add_active_user("acme", &id).await;
        let _ = op
            .patch(
                &format!("/v1/orgs/acme/users/{id}"),
                json!({"monthly_limit_micros": USD}),
            )
            .await
            .expect(200);
        if i % 2 == 0 {
            let r = admin
                .put(&format!("/v1/orgs/acme/groups/eng/members/{id}"))
                .await;
            assert!(r.status < 300, "{}", r.body);
        }
    }
    for i in 0..6 {
        let id = format!("u{i}");
        let _ = op
            .post(
                "/v1/usage",
                json!({"events": [{
                    "request_id": format!("r{i}"), "org_id": "acme", "user_id": id,
                    "model": "m", "provider": "p", "input_tokens": 1, "output_tokens": 1,
                    "cost_micros": 3 * USD / 2, "occurred_at": now_rfc3339(),
                }]}),
            )
            .await
            .expect(200);
        let _ = wait_for_spend(&op, &id, 3 * USD / 2).await;
    }

    // Enforcement: newest first, every event once across pages.
    let whole = op
        .get("/v1/orgs/acme/enforcement?limit=1000")
        .await
        .expect(200);
    assert_eq!(whole["next_cursor"], Value::Null);
    let whole = whole["items"].as_array().unwrap().clone();
    // Forecasts depend on the day of the month the test runs: at most one
    // per subject.
    let forecasts = whole
        .iter()
        .filter(|e| e["event"] == "forecast_over_limit")
        .count();
    assert_eq!(whole.len() - forecasts, 24, "{whole:?}");
    let (paged, pages) = every_page(&op, "/v1/orgs/acme/enforcement", 5).await;
    assert_eq!(paged, whole);
    assert_eq!(pages, whole.len().div_ceil(5));
    let at: Vec<i64> = whole.iter().map(at_ms).collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first: {at:?}");
    // A cursor of another listing, or made up, is a clear 400.
    let events = op.get("/v1/orgs/acme/events?limit=1").await.expect(200);
    let other = events["next_cursor"].as_str().unwrap();
    for bad in [other, "zz", "5b5d"] {
        let r = op
            .get(&format!("/v1/orgs/acme/enforcement?cursor={bad}"))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    // The audit trail: oldest first by default, newest first on request,
    // the same events either way, each once across pages.
    let (oldest, _) = every_page(&op, "/v1/orgs/acme/events", 7).await;
    let seqs: Vec<u64> = oldest.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let (newest, _) = every_page(&op, "/v1/orgs/acme/events?order=newest", 7).await;
    let mut reversed = oldest.clone();
    reversed.reverse();
    assert_eq!(newest, reversed);
    // The cursor of one order is refused by the other.
    let first = op.get("/v1/orgs/acme/events?limit=2").await.expect(200);
    let c = first["next_cursor"].as_str().unwrap();
    let r = op
        .get(&format!("/v1/orgs/acme/events?order=newest&cursor={c}"))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Filters, each checked against the whole trail read here.
    let kinds = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    let expect = |filter: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        oldest.iter().filter(|e| filter(e)).cloned().collect()
    };
    let (limits, _) = every_page(&op, "/v1/orgs/acme/events?kind=user_limit_set", 4).await;
    assert_eq!(limits, expect(&|e| e["type"] == "user_limit_set"));
    assert_eq!(limits.len(), 6);
    let many = "user_limit_set,".repeat(500);
    let (again, _) = every_page(&op, &format!("/v1/orgs/acme/events?kind={many}"), 4).await;
    assert_eq!(again, limits, "a kind named twice is one kind");
    let (two, _) = every_page(
        &op,
        "/v1/orgs/acme/events?kind=group_created,member_added&order=newest",
        2,
    )
    .await;
    let mut want = expect(&|e| e["type"] == "group_created" || e["type"] == "member_added");
    want.reverse();
    assert_eq!(two, want);
    assert_eq!(two.len(), 4);
    // A subject: a user's own changes and its memberships.
    let (u2, _) = every_page(&op, "/v1/orgs/acme/events?subject=user:u2", 1).await;
    assert_eq!(
        kinds(&u2),
        [
            "user_added",
            "user_activated",
            "user_limit_set",
            "member_added"
        ],
        "{u2:?}"
    );
    let (eng, _) = every_page(&op, "/v1/orgs/acme/events?subject=group:eng", 2).await;
    assert_eq!(
        kinds(&eng),
        [
            "group_created",
            "member_added",
            "member_added",
            "member_added"
        ]
    );
    let (org, _) = every_page(&op, "/v1/orgs/acme/events?subject=org", 10).await;
    assert_eq!(kinds(&org), ["org_created"]);
    // An actor: the admin token made the group and its memberships.
    let (by_admin, _) = every_page(
        &op,
        &format!("/v1/orgs/acme/events?actor=token:{admin_id}"),
        3,
    )
    .await;
    assert_eq!(by_admin, eng);
    let (by_op, _) = every_page(&op, "/v1/orgs/acme/events?actor=operator", 50).await;
    assert_eq!(by_op.len() + by_admin.len(), oldest.len());
    // Time: from the admin's first change on, and before it.
    let t = eng[0]["at"].as_str().unwrap();
    let (from, _) = every_page(&op, &format!("/v1/orgs/acme/events?from={t}"), 50).await;
    assert_eq!(from, expect(&|e| at_ms(e) >= at_ms(&eng[0])), "from {t}");
    let (before, _) = every_page(&op, &format!("/v1/orgs/acme/events?to={t}"), 50).await;
    assert_eq!(before.len() + from.len(), oldest.len());
    let (none, _) = every_page(&op, "/v1/orgs/acme/events?to=2020-01-01", 50).await;
    assert!(none.is_empty());
    // Filters combine.
    let (both, _) = every_page(
        &op,
        "/v1/orgs/acme/events?subject=user:u4&kind=member_added&actor=operator",
        50,
    )
    .await;
    assert!(both.is_empty(), "{both:?}");

    // Bad filters: a 400 that names the parameter.
    for (query, names) in [
        ("order=sideways", "order"),
        ("kind=user_added,nope", "kind"),
        ("subject=robot:1", "subject"),
        ("subject=user:", "subject"),
        ("actor=bob", "actor"),
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("since=2026-01-01", "since"),
    ] {
        let r = op.get(&format!("/v1/orgs/acme/events?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.body.to_string().contains(names), "{query}: {}", r.body);
    }

    // The operator's audit log reads either way too.
    for i in 0..3 {
        let _ = op
            .post(
                "/v1/gateway-tokens",
                json!({"name": format!("gateway {i}")}),
            )
            .await
            .expect(201);
    }
    let (audit_oldest, _) = every_page(&op, "/v1/audit", 2).await;
    let (mut audit_newest, _) = every_page(&op, "/v1/audit?order=newest", 2).await;
    assert_eq!(audit_oldest.len(), 3);
    audit_newest.reverse();
    assert_eq!(audit_newest, audit_oldest);
    tally.stop().unwrap();
}

#[tokio::test]
async fn lists_page_and_logs_read_either_way_on_sqlite() {
    listings(Backend::sqlite("listings")).await;
}

#[tokio::test]
async fn lists_page_and_logs_read_either_way_on_postgres() {
    if let Some(backend) = Backend::postgres("listings").await.unwrap() {
        listings(backend).await;
    }
}

/// A subject filter reads at most 10 000 rows for a page: past them the
/// page comes back short, with a cursor to go on from, and nothing is
/// skipped.
#[tokio::test]
async fn a_subject_filter_reads_a_bounded_number_of_rows() {
    let tally = Tally::start(&Backend::sqlite("listings-scan")).unwrap();
    let op = tally.operator();
    let _ = op.acme_with_alice(None).await;
    let ids: Vec<String> = (0..2_000).map(|i| format!("m{i}")).collect();
    for id in &ids {
        let user = json!({"id": id, "email": format!("{id}@a.test"), "name": id});
        let _ = op.post("/v1/orgs/acme/users", user).await.expect(201);
    }
    // 12 000 limit changes of others between alice's first events and her
    // last.
    for round in 0..6 {
        let r = op
            .post(
                "/v1/orgs/acme/users/bulk",
                json!({"user_ids": ids, "monthly_limit_micros": (round + 1) * USD}),
            )
            .await
            .expect(200);
        assert_eq!(r["changes"], json!({"user_limit_set": 2_000}), "{r}");
    }
    let _ = op
        .patch(
            "/v1/orgs/acme/users/alice",
            json!({"monthly_limit_micros": USD}),
        )
        .await
        .expect(200);
    let path = "/v1/orgs/acme/events?subject=user:alice";
    let first = op.get(&format!("{path}&limit=50")).await.expect(200);
    let short = first["items"].as_array().unwrap().len();
    assert!(
        short < 50 && first["next_cursor"].is_string(),
        "a short page with a cursor: {first}"
    );
    let (all, pages) = every_page(&op, path, 50).await;
    let kinds: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(pages >= 2, "{pages}");
    assert_eq!(kinds.last(), Some(&"user_limit_set"), "{kinds:?}");
    assert_eq!(
        all.iter().filter(|e| e["type"] == "user_limit_set").count(),
        1
    );
    assert_eq!(&all[..short], first["items"].as_array().unwrap().as_slice());
    tally.stop().unwrap();
}

async fn org_list(backend: Backend) {
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    for (id, name) in [
        ("acme", "Acme"),
        ("beta", "Beta Corp"),
        ("gamma", "Gamma"),
        ("delta", "Delta Corp"),
        ("eps", "Epsilon 100%"),
        ("zeta", "Zeta"),
        ("eta", "Eta"),
    ] {
        let _ = op
            .post("/v1/orgs", json!({"id": id, "name": name}))
            .await
            .expect(201);
    }
    for u in ["u1", "u2", "u3"] {
        let _ = op.add_active_user("acme", u).await;
    }
    let _ = op.delete("/v1/orgs/acme/users/u3").await.expect(200);
    let _ = op
        .post(
            "/v1/usage",
            json!({"events": [{
                "request_id": "r1", "org_id": "acme", "user_id": "u1", "model": "m",
                "provider": "p", "input_tokens": 1, "output_tokens": 1,
                "cost_micros": 2_500_000, "occurred_at": now_rfc3339(),
            }]}),
        )
        .await
        .expect(200);
    // The same figure the org's own detail shows, once it has counted.
    let acme = tally_tests::wait_for_spend(&op, "u1", 2_500_000).await;
    assert_eq!(acme["spend_micros"], 2_500_000);

    let (all, pages) = every_page(&op, "/v1/orgs", 3).await;
    let ids: Vec<&str> = all.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["acme", "beta", "delta", "eps", "eta", "gamma", "zeta"]
    );
    assert_eq!(pages, 3);
    assert_eq!(all[0]["member_count"], 2, "the removed one is not a member");
    assert_eq!(all[0]["spend_micros"], 2_500_000, "{}", all[0]);
    assert_eq!(all[1]["member_count"], 0);
    assert_eq!(all[1]["spend_micros"], 0);
    // Search: id or name, any case; LIKE's wildcards are plain text.
    let names = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (corp, _) = every_page(&op, "/v1/orgs?q=CORP", 50).await;
    assert_eq!(names(&corp), ["beta", "delta"]);
    let (et, _) = every_page(&op, "/v1/orgs?q=et", 50).await;
    assert_eq!(names(&et), ["beta", "eta", "zeta"]);
    let (pct, _) = every_page(&op, "/v1/orgs?q=100%25", 50).await;
    assert_eq!(names(&pct), ["eps"]);
    let (none, _) = every_page(&op, "/v1/orgs?q=%25%25x", 50).await;
    assert!(none.is_empty(), "{none:?}");
    // The operator's only; bad input is a 400.
    let admin = op.post("/v1/orgs/acme/tokens", json!({})).await.expect(201);
    let admin = tally.client(admin["token"].as_str().unwrap());
    let _ = admin.get("/v1/orgs").await.error(403);
    let _ = tally.anonymous().get("/v1/orgs").await.error(401);
    for bad in ["?sort=name", "?limit=0", "?cursor=zz"] {
        let r = op.get(&format!("/v1/orgs{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let r = op.get(&format!("/v1/orgs?q={}", "x".repeat(201))).await;
    assert_eq!(r.status, 400, "{}", r.body);
    tally.stop().unwrap();
}

#[tokio::test]
async fn the_operator_lists_orgs_by_page_and_search_on_sqlite() {
    org_list(Backend::sqlite("org-list")).await;
}

#[tokio::test]
async fn the_operator_lists_orgs_by_page_and_search_on_postgres() {
    if let Some(backend) = Backend::postgres("orglist").await.unwrap() {
        org_list(backend).await;
    }
}
