//! The console in a real browser: headless chromium, driven through
//! chromedriver, on a real `tally serve`. An admin signs in, filters the
//! members by a group and a minimum use of their limit, selects every
//! member matching, adds them to a new group and sets their limit, sees
//! the badges and limits change, opens a member's page and its chart,
//! creates a key and reads its secret once, revokes it, signs out and
//! finds the pages closed. Screenshots: `target/console/*.png`.

use std::path::PathBuf;

use serde_json::json;
use tally_tests::webdriver::{Browser, binaries};
use tally_tests::{Backend, Client, Tally, now_rfc3339, wait_for_spend};

const USD: i64 = 1_000_000;

fn shots() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
            PathBuf::from,
        )
        .join("console")
}

/// Acme ($50 default limit) with alice ($30 spent), bob ($45), carol ($5)
/// in eng, dave ($40) outside it, erin (nothing).
async fn seed(op: &Client) {
    let _ = op
        .post(
            "/v1/orgs",
            json!({"id": "acme", "name": "Acme", "default_monthly_limit_micros": 50 * USD,
                   "monthly_limit_micros": 500 * USD, "alert_thresholds": [0.5, 0.8, 1]}),
        )
        .await
        .expect(201);
    for u in ["alice", "bob", "carol", "dave", "erin"] {
        let _ = op.add_active_user("acme", u).await;
    }
    op.add_group(
        "acme",
        "eng",
        "Engineering",
        None,
        &["alice", "bob", "carol"],
    )
    .await;
    for (i, (u, usd)) in [("alice", 30), ("bob", 45), ("carol", 5), ("dave", 40)]
        .into_iter()
        .enumerate()
    {
        let _ = op
            .post(
                "/v1/usage",
                json!({"events": [{
                    "request_id": format!("seed-{i}"), "org_id": "acme", "user_id": u,
                    "model": "m", "provider": "p", "input_tokens": 1, "output_tokens": 1,
                    "cost_micros": usd * USD, "occurred_at": now_rfc3339(),
                }]}),
            )
            .await
            .expect(200);
        let _ = wait_for_spend(op, u, usd * USD).await;
    }
}

#[tokio::test]
async fn an_admin_works_in_the_console_in_a_real_browser() {
    let Some((driver, chromium)) = binaries() else {
        return;
    };
    let tally = Tally::start(&Backend::sqlite("browser")).unwrap();
    let op = tally.operator();
    seed(&op).await;
    let admin_token = op
        .post("/v1/orgs/acme/tokens", json!({"role": "admin"}))
        .await
        .expect(201)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = Browser::start(&driver, &chromium).await.unwrap();
    let url = |p: &str| format!("{}{p}", tally.url);

    // Sign in: the console sends an unknown browser to the sign-in page.
    b.goto(&url("/console")).await.unwrap();
    assert!(b.url().await.unwrap().contains("/console/sign-in"));
    b.fill("#token", &admin_token).await.unwrap();
    b.click("form[action='/console/sign-in'] button")
        .await
        .unwrap();
    let text = b.wait_text("Projected month-end").await.unwrap();
    assert!(text.contains("$120.00"), "the org's spend: {text}");
    assert!(!b.url().await.unwrap().contains(&admin_token));
    // The session cookie is out of the page's reach.
    let cookies = b.script("return document.cookie;").await.unwrap();
    assert_eq!(cookies, "", "HttpOnly");
    b.screenshot(&shots().join("overview.png")).await.unwrap();

    // Users: filter by eng and at least 50 % of the limit.
    b.click("nav a[href='/console/orgs/acme/users']")
        .await
        .unwrap();
    let _ = b.wait_text("Used at least").await.unwrap();
    b.select("#group", "eng").await.unwrap();
    b.select("#min_utilization", "0.5").await.unwrap();
    b.click("form.filters button[type=submit]").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.url().await.unwrap().contains("group=eng") {
        assert!(
            std::time::Instant::now() < deadline,
            "the filter never reached the URL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let table = b.text("#users-table").await.unwrap();
    assert!(table.contains("alice") && table.contains("bob"), "{table}");
    assert!(
        !table.contains("carol") && !table.contains("dave"),
        "{table}"
    );

    // Every member matching the filter: into a new group.
    b.click("#scope-all").await.unwrap();
    b.select("#change", "add_group").await.unwrap();
    b.fill("#bulk-group", "reviewers").await.unwrap();
    b.click("#bulk-review").await.unwrap();
    let text = b.wait_text("Review the change").await.unwrap();
    assert!(text.contains("2 members now"), "{text}");
    assert!(text.contains("Group reviewers does not exist"), "{text}");
    b.click("form button[type=submit]:not(.link)")
        .await
        .unwrap();
    let text = b.wait_text("Done:").await.unwrap();
    assert!(text.contains("2 of 2 members changed"), "{text}");
    // …and their limit, the same way.
    b.click("main a[href*='/console/orgs/acme/users']")
        .await
        .unwrap();
    let _ = b.wait_text("Used at least").await.unwrap();
    b.click("#scope-all").await.unwrap();
    b.select("#change", "set_limit").await.unwrap();
    b.fill("#bulk-limit", "75").await.unwrap();
    b.click("#bulk-review").await.unwrap();
    let _ = b
        .wait_text("set the monthly limit to $75.00")
        .await
        .unwrap();
    b.click("form button[type=submit]:not(.link)")
        .await
        .unwrap();
    let _ = b.wait_text("2 of 2 members changed").await.unwrap();

    // The badges and limits changed.
    b.goto(&url("/console/orgs/acme/users?group=reviewers"))
        .await
        .unwrap();
    let table = b.text("#users-table").await.unwrap();
    assert!(
        table.contains("alice") && table.contains("bob") && !table.contains("dave"),
        "{table}"
    );
    assert_eq!(
        b.count("#users-table a.badge[href$='group=reviewers']")
            .await
            .unwrap(),
        2
    );
    let limit = b
        .script("return document.getElementById('limit-alice').value;")
        .await
        .unwrap();
    assert_eq!(limit, "75.00");
    let alice = op.get("/v1/orgs/acme/users/alice").await.expect(200);
    assert_eq!(alice["monthly_limit_micros"], 75 * USD);
    assert_eq!(alice["groups"], json!(["eng", "reviewers"]));
    b.goto(&url("/console/orgs/acme/users")).await.unwrap();
    b.screenshot(&shots().join("users.png")).await.unwrap();

    // A member's page: the daily chart with the limit line.
    b.click("#users-table a[href='/console/orgs/acme/users/alice']")
        .await
        .unwrap();
    let text = b.wait_text("The last 13 months").await.unwrap();
    assert!(text.contains("of $75.00"), "{text}");
    assert!(b.count("svg.chart rect.bar").await.unwrap() >= 1);
    assert_eq!(b.count("svg.chart line.limit").await.unwrap(), 1);
    b.screenshot(&shots().join("user.png")).await.unwrap();

    // A key: its secret once, then revoked.
    b.click("nav a[href='/console/orgs/acme/keys']")
        .await
        .unwrap();
    b.fill("#k-name", "ci runner").await.unwrap();
    b.fill("#k-user", "alice").await.unwrap();
    b.click("form[action='/console/orgs/acme/keys'] button")
        .await
        .unwrap();
    let secret = b.text("#new-secret").await.unwrap();
    assert!(!secret.is_empty());
    let ok = op
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    assert_eq!(ok["allowed"], true, "{ok}");
    b.goto(&url("/console/orgs/acme/keys")).await.unwrap();
    assert!(
        !b.page_text().await.unwrap().contains(&secret),
        "shown once"
    );
    b.click("form[data-confirm] button[value=revoke]")
        .await
        .unwrap();
    // The script asks first.
    b.accept_alert().await.unwrap();
    let _ = b.wait_text("The key was revoked").await.unwrap();
    let refused = op
        .post("/v1/authorize", json!({"api_key": secret}))
        .await
        .expect(200);
    assert_eq!(refused["allowed"], false, "{refused}");

    // Signed out, the pages are closed.
    b.click("form[action='/console/sign-out'] button")
        .await
        .unwrap();
    let _ = b.wait_text("You are signed out").await.unwrap();
    b.goto(&url("/console/orgs/acme/users")).await.unwrap();
    assert!(b.url().await.unwrap().contains("/console/sign-in"));
    assert!(!b.page_text().await.unwrap().contains("alice"));
}
