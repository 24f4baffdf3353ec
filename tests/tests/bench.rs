//! `tally bench --quick`: every end-to-end scenario runs once, small, against
//! the real broker and PostgreSQL, so the command cannot rot. It checks the
//! runs completed and printed their configuration and figures (each scenario
//! checks its own totals); it asserts no timing.

use tally_tests::{Backend, Broker, tally_bin, temp_dir};

#[tokio::test]
async fn every_bench_scenario_runs_in_quick_mode() {
    let broker = Broker::start().unwrap();
    let pg = Backend::postgres("bench").await.unwrap();
    let mut cmd = std::process::Command::new(tally_bin());
    let _ = cmd
        .args(["bench", "all", "--quick", "--dir"])
        .arg(temp_dir("bench"))
        .env_remove("TALLY_KAFKA_BROKERS")
        .env_remove("TALLY_DATABASE_URL");
    let kafka = match (&broker, &pg) {
        (Some(b), Some(Backend::Postgres(url))) => {
            let _ = cmd
                .args(["--kafka-brokers", &b.brokers()])
                .args(["--database-url", url]);
            true
        }
        _ => false,
    };
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tally bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = vec![
        "quick (smoke) mode",
        "embedded: 20000 events, 10 users, batches of 1000",
        "embedded: ingested and checkpointed: ",
        "embedded: ingested while 2 admins read the org's spend in a loop: ",
        "authorize: 8 connections over loopback",
        "authorize: closed loop (saturation): ",
        "authorize: paced at 1000/s: ",
        "authorize: paced at 1000/s: in the server: p99 ≤ ",
        "restart: 100000 events (100 log records of 1000)",
        "restart: start to ready ",
        "soak: 60 s embedded, 20 users; ingest paced at ",
        "soak: totals exact: spend ",
        " kills -9, restart to ready ",
        "soak: ingest reached ",
        // One minute is shorter than the warm-up (the window filling).
        "soak: memory not judged: ",
        "console: sqlite, 2000 users in 20 groups, each with spend",
        "console sqlite: users page, by spend: p50 ",
        "console sqlite: users page, one group by spend: p50 ",
        "console sqlite: overview: p50 ",
        "usage: sqlite, 2000 users in 20 groups, 10 models, ",
        "usage sqlite: last month by model: p50 ",
        "usage sqlite: last month, the top 10 members: p50 ",
    ];
    if kafka {
        expected.extend([
            "kafka: 20000 messages (protobuf) on 4 partitions",
            "kafka: bare consumer counting: ",
            "kafka: tally consume, apply, checkpoint",
            "% of the bare consumer",
            "console: postgres, 2000 users in 20 groups, each with spend",
            "console postgres: users page, by spend: p50 ",
            "usage: postgres, 2000 users in 20 groups, 10 models, ",
            "usage postgres: last month by model: p50 ",
        ]);
    } else {
        expected.extend([
            "kafka: skipped",
            "console: postgres skipped",
            "usage: postgres skipped",
        ]);
    }
    for line in expected {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.lines().filter(|l| l.contains(" events/s (")).count() >= if kafka { 6 } else { 4 },
        "{stdout}"
    );
}
