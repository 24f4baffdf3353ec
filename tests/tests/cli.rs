//! The admin CLI against a real `tally serve`: readable tables, dollars,
//! clear errors.

use serde_json::json;
use tally_tests::{Backend, OPERATOR_TOKEN, Tally, now_rfc3339, tally_bin};

fn tally(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(tally_bin())
        .args(args)
        .env("TALLY_URL", url)
        .env("TALLY_TOKEN", OPERATOR_TOKEN)
        .env("TALLY_ORG", "acme")
        // As in many developers' shells: errors must still read as words.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(url: &str, args: &[&str]) -> String {
    let (success, out, err) = tally(url, args);
    assert!(success, "tally {args:?} failed: {err}");
    out
}

#[tokio::test]
async fn an_admin_manages_the_org_from_the_terminal() {
    let server = Tally::start(&Backend::sqlite("cli")).unwrap();
    let url = server.url.clone();
    let out = ok(
        &url,
        &[
            "orgs",
            "create",
            "--id",
            "acme",
            "--name",
            "Acme",
            "--default-limit",
            "50",
        ],
    );
    assert!(out.contains("default limit $50.00"), "{out}");
    for (id, limit) in [("alice", "20"), ("bob", "unlimited"), ("carol", "12.5")] {
        let _ = ok(
            &url,
            &[
                "users",
                "add",
                "--id",
                id,
                "--email",
                &format!("{id}@acme.test"),
                "--name",
                id,
                "--limit",
                limit,
                "--active",
            ],
        );
    }
    let _ = ok(
        &url,
        &[
            "users",
            "add",
            "--id",
            "dave",
            "--email",
            "dave@acme.test",
            "--name",
            "Dave",
        ],
    );
    let _ = ok(
        &url,
        &[
            "groups",
            "create",
            "--id",
            "eng",
            "--name",
            "Engineering",
            "--limit",
            "100",
        ],
    );
    let out = ok(
        &url,
        &["groups", "add-members", "eng", "alice", "bob", "carol"],
    );
    assert!(out.contains("3 of 3 users changed"), "{out}");
    let out = ok(
        &url,
        &[
            "keys",
            "create",
            "--id",
            "k1",
            "--name",
            "laptop",
            "--user",
            "alice",
            "--features",
            "chat,embeddings",
        ],
    );
    assert!(
        out.contains("secret (shown once, keep it): tly_sk_"),
        "{out}"
    );
    // Some spend, then the list an admin looks at.
    let usage = json!({"events": [
        {"request_id": "r1", "org_id": "acme", "user_id": "alice", "cost_micros": 15_000_000, "occurred_at": now_rfc3339()},
        {"request_id": "r2", "org_id": "acme", "user_id": "carol", "cost_micros": 12_500_000, "occurred_at": now_rfc3339()},
        {"request_id": "r3", "org_id": "acme", "user_id": "bob", "cost_micros": 1_234_567, "occurred_at": now_rfc3339()},
    ]});
    assert_eq!(
        server.operator().post("/v1/usage", usage).await.expect(200)["accepted"],
        3
    );
    let out = ok(
        &url,
        &["users", "list", "--sort", "-spend", "--group", "eng"],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("SPEND") && lines[0].contains("LIMIT"),
        "{out}"
    );
    assert_eq!(
        lines.len(),
        4,
        "header and the three members of eng:\n{out}"
    );
    assert!(
        lines[1].starts_with("alice")
            && lines[1].contains("$15.00")
            && lines[1].contains("$20.00")
            && lines[1].contains("75.0%"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("carol")
            && lines[2].contains("$12.50")
            && lines[2].contains("100.0%")
            && lines[2].contains("CUT OFF"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("bob")
            && lines[3].contains("$1.234567")
            && lines[3].contains("unlimited"),
        "{out}"
    );
    let out = ok(&url, &["groups", "show", "eng"]);
    assert!(
        out.contains("$28.734567") && out.contains("TOP MEMBERS"),
        "{out}"
    );
    let out = ok(&url, &["users", "update", "carol", "--limit", "30"]);
    assert!(out.contains("$30.00") && !out.contains("CUT OFF"), "{out}");
    let out = ok(
        &url,
        &[
            "users",
            "bulk",
            "--users",
            "alice,dave",
            "--status",
            "suspended",
        ],
    );
    assert!(out.contains("2 of 2 users changed"), "{out}");
    // A key renamed, moved to the group, given an expiry; then rotated.
    let out = ok(
        &url,
        &[
            "keys",
            "update",
            "k1",
            "--name",
            "ci",
            "--user",
            "none",
            "--groups",
            "eng",
            "--expires",
            "2099-01-01T00:00:00Z",
        ],
    );
    assert!(out.contains("ci") && out.contains("eng"), "{out}");
    let key = server
        .operator()
        .get("/v1/orgs/acme/keys/k1")
        .await
        .expect(200);
    assert_eq!(
        (key["user_id"].clone(), key["expires_at"].clone()),
        (json!(null), json!("2099-01-01T00:00:00Z")),
        "{key}"
    );
    let out = ok(&url, &["keys", "rotate", "k1", "--grace-seconds", "300"]);
    assert!(
        out.contains("new secret (shown once, keep it): tly_sk_"),
        "{out}"
    );
    assert!(out.contains("the old secret works until 20"), "{out}");
    let out = ok(&url, &["keys", "revoke", "k1"]);
    assert!(out.contains("REVOKED"), "{out}");
    let out = ok(&url, &["orgs", "show"]);
    assert!(out.contains("$28.734567 over 3 requests"), "{out}");
    // Errors are the API's, in words.
    let (success, _, err) = tally(
        &url,
        &[
            "users",
            "add",
            "--email",
            "x@acme.test",
            "--name",
            "X",
            "--limit",
            "lots",
        ],
    );
    assert!(
        !success && err.contains("is not an amount in dollars"),
        "{err}"
    );
    let (success, _, err) = tally(&url, &["groups", "add-members", "eng", "ghost"]);
    assert!(
        !success && err.contains("404") && err.contains("ghost"),
        "{err}"
    );
    // One line, no backtrace, whatever RUST_BACKTRACE says.
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");
    server.stop().unwrap();
}
