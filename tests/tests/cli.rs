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

/// The cell of table `out`'s row `row` (0: the first under the header)
/// under `column`, trimmed: from where the column's name starts to where
/// the next column's does.
fn cell(out: &str, row: usize, column: &str) -> String {
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    let start = header
        .find(column)
        .unwrap_or_else(|| panic!("no {column} in {header}"));
    let rest = &header[start + column.len()..];
    let end = rest
        .find(|c: char| c != ' ')
        .map_or(usize::MAX, |i| start + column.len() + i);
    let line = lines
        .nth(row)
        .unwrap_or_else(|| panic!("no row {row}:\n{out}"));
    line.get(start..end.min(line.len()))
        .unwrap_or_default()
        .trim()
        .to_owned()
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
            "eng",
            "--name",
            "Engineering",
            "--limit",
            "100",
        ],
    );
    let out = ok(
        &url,
        &["groups", "add-members", "eng", "alice,bob", "carol"],
    );
    assert!(out.contains("3 of 3 users changed"), "{out}");
    let out = ok(
        &url,
        &[
            "keys",
            "create",
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
            && cell(&out, 1, "CUT OFF") == "yes",
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
    assert!(
        out.contains("$30.00") && cell(&out, 0, "CUT OFF").is_empty(),
        "{out}"
    );
    assert_eq!(cell(&out, 0, "GROUPS"), "eng", "{out}");
    assert!(cell(&out, 0, "LAST ACTIVE").starts_with("20"), "{out}");
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

/// The exit status and stderr of `tally args` with `env` (and nothing
/// inherited that names a server).
fn status(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(tally_bin());
    let _ = cmd
        .args(args)
        .env_remove("TALLY_URL")
        .env_remove("TALLY_TOKEN")
        .env_remove("TALLY_ORG")
        .env_remove("TALLY_CONFIG")
        .env("RUST_BACKTRACE", "1")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        let _ = cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn every_admin_endpoint_has_a_command_and_errors_have_exit_codes() {
    let server = Tally::start(&Backend::sqlite("cli-more")).unwrap();
    let url = server.url.clone();
    let _ = ok(&url, &["orgs", "create", "acme", "--name", "Acme"]);
    let _ = ok(
        &url,
        &[
            "users",
            "add",
            "alice",
            "--email",
            "a@acme.test",
            "--name",
            "Alice",
            "--active",
        ],
    );
    let _ = ok(
        &url,
        &[
            "users",
            "add",
            "bob",
            "--email",
            "b@acme.test",
            "--name",
            "Bob",
        ],
    );

    // Money flags are dollars; an amount past $100 000 needs --yes.
    let (success, _, err) = tally(&url, &["users", "update", "alice", "--limit", "75000000"]);
    assert!(!success, "{err}");
    assert!(
        err.contains("$75,000,000.00") && err.contains("--yes") && err.lines().count() == 1,
        "{err}"
    );
    let alice = server
        .operator()
        .get("/v1/orgs/acme/users/alice")
        .await
        .expect(200);
    assert_eq!(
        alice["monthly_limit_micros"],
        json!(null),
        "nothing changed"
    );
    let out = ok(
        &url,
        &["users", "update", "alice", "--limit", "150000", "--yes"],
    );
    assert!(out.contains("$150,000.00"), "{out}");
    let out = ok(&url, &["users", "update", "alice", "--limit", "25"]);
    assert!(out.contains("$25.00"), "{out}");

    let out = ok(&url, &["orgs", "list", "--q", "acm"]);
    assert!(out.starts_with("ID") && out.contains("acme"), "{out}");
    assert_eq!(cell(&out, 0, "MEMBERS"), "2", "{out}");

    // Org and group updates.
    let out = ok(
        &url,
        &[
            "orgs",
            "update",
            "--name",
            "Acme Inc",
            "--default-limit",
            "40",
            "--thresholds",
            "0.5,0.9",
        ],
    );
    assert!(
        out.contains("Acme Inc") && out.contains("$40.00") && out.contains("0.5,0.9"),
        "{out}"
    );
    let _ = ok(&url, &["groups", "create", "ops", "--name", "Ops"]);
    let out = ok(
        &url,
        &[
            "groups",
            "update",
            "ops",
            "--name",
            "Operations",
            "--limit",
            "300",
        ],
    );
    assert!(
        out.contains("Operations") && out.contains("$300.00"),
        "{out}"
    );
    let out = ok(&url, &["groups", "add-members", "ops", "alice,bob"]);
    assert!(out.contains("2 of 2 users changed"), "{out}");
    let out = ok(&url, &["groups", "list", "--rows", "1"]);
    assert_eq!(out.lines().count(), 2, "{out}");

    // Tokens: mint a viewer, list, revoke.
    let out = ok(
        &url,
        &[
            "tokens",
            "create",
            "--role",
            "viewer",
            "--name",
            "dashboards",
        ],
    );
    let id = out
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert!(out.starts_with("viewer token tok_"), "{out}");
    let out = ok(&url, &["tokens", "list"]);
    assert!(out.contains(&id) && out.contains("dashboards"), "{out}");
    let out = ok(&url, &["tokens", "revoke", &id]);
    assert_eq!(out, format!("revoked token {id}\n"));
    let out = ok(&url, &["tokens", "list", "--rows", "1000"]);
    let row = out
        .lines()
        .skip(1)
        .position(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(cell(&out, row, "REVOKED").starts_with("20"), "{out}");
    let out = ok(&url, &["gateway-tokens", "create", "--name", "edge"]);
    assert!(out.contains("gw_"), "{out}");
    let out = ok(&url, &["gateway-tokens", "list"]);
    assert!(out.contains("edge"), "{out}");

    // The webhook (to a name that does not resolve here: set, never sent).
    let out = ok(&url, &["webhook", "set", "https://hooks.acme.test/tally"]);
    assert!(
        out.contains("https://hooks.acme.test/tally") && out.contains("signing secret (shown once"),
        "{out}"
    );
    let out = ok(&url, &["webhook", "show"]);
    assert!(!out.contains("secret"), "{out}");
    let out = ok(&url, &["webhook", "deliveries"]);
    assert!(out.starts_with("ID"), "{out}");
    // A test send to a name that does not resolve: not delivered, exit 1.
    let (success, _, err) = tally(&url, &["webhook", "test"]);
    assert!(!success && err.contains("not delivered"), "{err}");
    let out = ok(&url, &["webhook", "remove"]);
    assert!(out.contains("webhook: -"), "{out}");
    let (success, _, err) = tally(&url, &["webhook", "test"]);
    assert!(!success && err.contains("no webhook"), "{err}");

    // The audit trail, filtered; enforcement; holds; dead letters.
    let out = ok(
        &url,
        &["audit", "--subject", "user:alice", "--order", "newest"],
    );
    let kinds: Vec<String> = (0..out.lines().count() - 1)
        .map(|row| cell(&out, row, "KIND"))
        .collect();
    assert_eq!(
        kinds,
        [
            "member_added",
            "user_limit_set",
            "user_limit_set",
            "user_activated",
            "user_added"
        ],
        "{out}"
    );
    assert!(out.contains("monthly_limit_micros=$25.00"), "{out}");
    let out = ok(
        &url,
        &[
            "audit",
            "--kind",
            "group_created,group_renamed",
            "--rows",
            "1",
        ],
    );
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(cell(&out, 0, "KIND"), "group_created", "{out}");
    let out = ok(&url, &["audit", "--operator"]);
    assert!(out.contains("gateway_token_created"), "{out}");
    let out = ok(&url, &["enforcement"]);
    assert!(out.starts_with("AT"), "{out}");
    let out = ok(
        &url,
        &[
            "enforcement",
            "--event",
            "cut_off",
            "--subject",
            "user:alice",
        ],
    );
    assert!(out.starts_with("AT"), "{out}");
    let (success, _, err) = tally(&url, &["enforcement", "--event", "boom"]);
    assert!(
        !success && err.contains("is not one of threshold_crossed"),
        "{err}"
    );
    let out = ok(&url, &["keys", "list", "--user", "alice"]);
    assert!(!out.contains("bob"), "{out}");
    let out = ok(&url, &["holds", "list"]);
    assert!(out.starts_with("REQUEST"), "{out}");
    let out = ok(&url, &["holds", "list", "--user", "alice"]);
    assert!(out.starts_with("REQUEST"), "{out}");
    let (success, _, err) = tally(&url, &["holds", "list", "--user", "a b"]);
    assert!(!success && err.contains("user"), "{err}");
    let out = ok(&url, &["holds", "release", "req-none"]);
    assert!(out.contains("req-none: unknown"), "{out}");
    let out = ok(&url, &["dead-letters", "--all-orgs"]);
    assert!(out.starts_with("LOGGED"), "{out}");

    // A bulk change by filter: previewed, then made.
    let out = ok(
        &url,
        &[
            "users",
            "bulk",
            "--where-group",
            "ops",
            "--reset-limit",
            "--dry-run",
        ],
    );
    assert!(
        out.starts_with("2 of 2 users would change (dry run: nothing changed)"),
        "{out}"
    );
    let alice = server
        .operator()
        .get("/v1/orgs/acme/users/alice")
        .await
        .expect(200);
    assert_eq!(alice["monthly_limit_micros"], 25_000_000, "{alice}");
    let out = ok(
        &url,
        &["users", "bulk", "--where-group", "ops", "--reset-limit"],
    );
    assert!(out.starts_with("2 of 2 users changed"), "{out}");
    let alice = server
        .operator()
        .get("/v1/orgs/acme/users/alice")
        .await
        .expect(200);
    assert_eq!(
        alice["monthly_limit_micros"], 40_000_000,
        "the org default: {alice}"
    );
    let (success, _, err) = tally(&url, &["users", "bulk", "--status", "suspended"]);
    assert!(!success && err.contains("--users"), "{err}");

    // Exit codes: 1 refused, 2 usage, 3 unreachable.
    let env = [
        ("TALLY_URL", url.as_str()),
        ("TALLY_TOKEN", OPERATOR_TOKEN),
        ("TALLY_ORG", "acme"),
    ];
    let (code, _, err) = status(&["users", "show", "ghost"], &env);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("error: ")
            && err.contains("ghost")
            && err.trim_end().ends_with("(404, not_found)"),
        "{err}"
    );
    let (code, _, err) = status(&["users", "list", "--limit", "5"], &env);
    assert_eq!(code, 2, "--limit is not a row count: {err}");
    let (code, _, err) = status(&["users", "list", "--sort"], &env);
    assert_eq!(code, 2, "{err}");
    let closed = format!("http://127.0.0.1:{}", tally_tests::free_port());
    let (code, _, err) = status(
        &["orgs", "show"],
        &[("TALLY_URL", &closed), ("TALLY_ORG", "acme")],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.starts_with(&format!("error: cannot reach {closed}")) && err.lines().count() == 1,
        "{err}"
    );

    // --config: the server's listen address and operator token, when no
    // flag or variable says otherwise.
    let dir = tally_tests::temp_dir("cli-config");
    let file = dir.join("tally.toml");
    let listen = url.trim_start_matches("http://");
    std::fs::write(
        &file,
        format!("listen = \"{listen}\"\noperator_token = \"{OPERATOR_TOKEN}\"\n"),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let (code, out, err) = status(&["--config", file, "orgs", "show", "--org", "acme"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("Acme Inc (acme)"), "{out}");
    let (code, _, err) = status(
        &["users", "list", "--org", "acme"],
        &[("TALLY_CONFIG", file), ("TALLY_TOKEN", "not-the-token")],
    );
    assert_eq!(code, 1, "the variable beats the file: {err}");
    assert!(err.contains("401"), "{err}");

    // `.` and `..` are no ids: a URL would resolve them to another route
    // (`groups update ..` would patch the org).
    let (code, _, err) = status(&["groups", "update", "..", "--limit", "5"], &env);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"..\" is not an id"), "{err}");
    let org = server.operator().get("/v1/orgs/acme").await.expect(200);
    assert_eq!(org["monthly_limit_micros"], json!(null), "{org}");
    let r = server
        .operator()
        .post("/v1/orgs/acme/groups", json!({"id": "..", "name": "Dots"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // produce and bench read their Kafka and database from --config too
    // (tests/tests/kafka.rs produces through one); without any, a clear
    // error.
    let (code, _, err) = status(&["produce", "--org", "acme", "--users", "alice"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--kafka-brokers") && err.contains("--config"),
        "{err}"
    );

    // Help on every command; completions for the shells.
    for cmd in [
        "orgs",
        "users",
        "groups",
        "keys",
        "tokens",
        "gateway-tokens",
        "webhook",
        "holds",
        "audit",
        "enforcement",
        "dead-letters",
        "completions",
    ] {
        let (code, out, err) = status(&[cmd, "--help"], &[]);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(out.contains("Usage: tally"), "{cmd}: {out}");
    }
    let (code, out, err) = status(&["completions", "bash"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("_tally()") && out.contains("add-members"),
        "{out}"
    );
    let (code, out, _) = status(&["completions", "zsh"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("#compdef tally"), "{out}");
    server.stop().unwrap();
}
