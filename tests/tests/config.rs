//! Configuration layers: defaults, file, environment, flags; and the example
//! file in deploy/ is one `tally serve` accepts.

use std::path::Path;

use serde_json::json;
use tally_tests::{Backend, Tally, now_rfc3339, temp_dir};

fn batch(n: usize) -> serde_json::Value {
    let events: Vec<_> = (0..n)
        .map(|i| {
            json!({"request_id": format!("r{i}"), "org_id": "acme", "user_id": "u",
                        "cost_micros": 1, "occurred_at": now_rfc3339()})
        })
        .collect();
    json!({ "events": events })
}

#[tokio::test]
async fn the_example_config_starts_a_server() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tally.toml");
    let example = example.display().to_string();
    let tally =
        Tally::start_with(&Backend::sqlite("example-config"), &["--config", &example]).unwrap();
    let ready = tally.anonymous().get("/readyz").await.expect(200);
    assert_eq!(ready["status"], "ready");
    tally.stop().unwrap();
}

#[test]
fn the_example_config_names_every_option() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tally.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let help = std::process::Command::new(tally_tests::tally_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<String> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|f| f.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
        .filter(|f| !["help", "config", "version"].contains(f) && !f.is_empty())
        .map(|f| f.replace('-', "_"))
        .collect();
    assert!(flags.len() >= 20, "{flags:?}");
    for f in flags {
        assert!(
            text.lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{f} = "))),
            "deploy/tally.toml does not show {f}"
        );
    }
}

#[tokio::test]
async fn flags_beat_the_environment_which_beats_the_file() {
    let dir = temp_dir("config-layers");
    let file = dir.join("tally.toml");
    std::fs::write(&file, "usage_batch_len_max = 3\n").unwrap();
    let file = file.display().to_string();
    let backend = Backend::sqlite("config-layers-data");

    // File only: 3.
    let t = Tally::start_with(&backend, &["--config", &file]).unwrap();
    assert_eq!(
        t.operator().post("/v1/usage", batch(4)).await.error(413),
        "too_large"
    );
    t.stop().unwrap();
    // Environment over file: 5.
    let t = Tally::start_env(
        &backend,
        &["--config", &file],
        &[("TALLY_USAGE_BATCH_LEN_MAX", "5")],
    )
    .unwrap();
    let r = t.operator().post("/v1/usage", batch(4)).await.expect(200);
    assert_eq!(
        r["rejected"].as_array().unwrap().len(),
        4,
        "unknown org, but not too large"
    );
    assert_eq!(
        t.operator().post("/v1/usage", batch(6)).await.error(413),
        "too_large"
    );
    t.stop().unwrap();
    // Flag over environment: 2.
    let t = Tally::start_env(
        &backend,
        &["--config", &file, "--usage-batch-len-max", "2"],
        &[("TALLY_USAGE_BATCH_LEN_MAX", "5")],
    )
    .unwrap();
    assert_eq!(
        t.operator().post("/v1/usage", batch(3)).await.error(413),
        "too_large"
    );
    t.stop().unwrap();
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = temp_dir("config-bad");
    let file = dir.join("tally.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nlisten_port = 8080\n").unwrap();
    let out = std::process::Command::new(tally_tests::tally_bin())
        .args(["serve", "--config", &file.display().to_string()])
        .args(["--data-dir", &dir.display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_port"), "{err}");
}

/// The distributed mode keeps its state in PostgreSQL: an SQLite database
/// with Kafka is refused at start, not run by processes that would share
/// one file.
#[test]
fn the_distributed_mode_refuses_an_sqlite_database() {
    let dir = temp_dir("config-kafka-sqlite");
    let url = format!("sqlite://{}/tally.db?mode=rwc", dir.display());
    let out = std::process::Command::new(tally_tests::tally_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--kafka-brokers", "127.0.0.1:9", "--database-url", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps its state in PostgreSQL"), "{err}");
}

#[tokio::test]
async fn a_second_process_cannot_take_the_same_data() {
    let backend = Backend::sqlite("exclusive");
    let first = Tally::start(&backend).unwrap();
    let Backend::Sqlite(dir) = &backend else {
        unreachable!()
    };
    let out = std::process::Command::new(tally_tests::tally_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--operator-token",
            tally_tests::OPERATOR_TOKEN,
        ])
        .args(["--data-dir", &dir.display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another tally process is using"), "{err}");
    // The first one is unharmed.
    assert_eq!(
        first.anonymous().get("/readyz").await.expect(200)["status"],
        "ready"
    );
    first.stop().unwrap();
}
