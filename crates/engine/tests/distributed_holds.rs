//! Holds kept in PostgreSQL (the distributed mode's store), on one engine
//! that meters the only partition, with a clock the test moves and a real
//! PostgreSQL server (started by scripts/test.sh).

use std::sync::Arc;

use sqlx::Connection as _;
use tally_core::authorize::HoldRequest;
use tally_core::usage::RawUsage;
use tally_engine::Engine;
use tally_engine::clock::ManualClock;
use tally_engine::holds::PartitionOf;
use tally_engine::meter::Positioned;
use tally_store::{Db, DbOptions};

const SECRET: &str = "tly_sk_distributed_holds_test";
const T0: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z

mod support;

/// An engine keeping holds in SQL, metering the only partition, with acme,
/// alice and her key.
async fn engine(url: &str, clock: &ManualClock) -> Arc<Engine> {
    let db = Db::open(&DbOptions {
        dated_by_database: true,
        ..DbOptions::new(url.to_owned())
    })
    .await
    .unwrap();
    let engine = support::engine_on(db, Arc::new(clock.clone())).await;
    engine.meter.keep_holds_in_sql();
    engine.set_hold_partitions(PartitionOf {
        partitions: 1,
        partitioner: |_, _| 0,
    });
    support::acme_with_alice(&engine, SECRET).await;
    let _ = engine.meter.claim(0, "kafka:test").await.unwrap();
    engine
}

fn hold(request_id: &str, micros: i64, ttl_ms: i64) -> HoldRequest<'_> {
    HoldRequest {
        request_id,
        reserve_micros: micros,
        ttl_ms,
    }
}

/// A hold that expired in memory while its row was being written is not
/// settled: the checkpoint must not delete the row of a hold placed again
/// under its request id (the next owner would not know that one).
#[tokio::test]
async fn a_hold_that_expired_while_its_row_was_written_is_not_taken_for_settled() {
    let Some(url) = support::fresh_postgres("expired_while_written").await else {
        return;
    };
    let clock = ManualClock::new(T0);
    let engine = engine(&url, &clock).await;
    // Another connection holds the partition's checkpoint row, so the
    // hold's write (which fences on that row) waits.
    let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
    let _ = sqlx::raw_sql("BEGIN; SELECT 1 FROM checkpoints WHERE partition_id = 0 FOR UPDATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let placing = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            engine
                .reserve(SECRET, None, None, hold("r1", 100_000, 1_000))
                .await
                .map(|(_, d, h)| (d.allowed, h))
        })
    };
    // The hold is in memory, its row waits: its TTL passes meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!placing.is_finished(), "the write waits for the row lock");
    clock.set(T0 + 2_000);
    engine.hold_upkeep();
    let _ = sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
    let (allowed, _) = placing.await.unwrap().unwrap();
    assert!(allowed);
    // The gateway asks again (its answer was late): a new hold, a new row.
    let (_, d, h) = engine
        .reserve(SECRET, None, None, hold("r1", 100_000, 60_000))
        .await
        .unwrap();
    assert!(d.allowed && h.unwrap().new, "{d:?}");
    // Usage of another call, and a checkpoint.
    let event = RawUsage {
        request_id: "other",
        org_id: "acme",
        user_id: "alice",
        cost_micros: Some(1_000),
        occurred_at_ms: Some(T0 + 1_000),
        ..RawUsage::default()
    }
    .validate()
    .unwrap();
    let _ = engine
        .meter
        .apply(
            0,
            &[Positioned {
                position: 0,
                logged_at_ms: T0 + 2_000,
                event: &event,
            }],
        )
        .unwrap();
    let _ = engine.meter.checkpoint().await.unwrap();
    let rows: Vec<_> = engine
        .db
        .load_holds(0)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.request_id, h.expires_at_ms))
        .collect();
    assert_eq!(
        rows,
        vec![("r1".to_owned(), T0 + 2_000 + 60_000)],
        "the live hold's row is kept"
    );
}

/// A limit change checkpoints the partition that meters its org, not every
/// partition the process owns: the others' usage is judged under limits
/// the change does not touch (and their checkpoint failing must not refuse
/// the change).
#[tokio::test]
async fn a_limit_change_checkpoints_its_orgs_partition_only() {
    use tally_core::entity::Command;
    use tally_core::ids::UserId;
    let Some(url) = support::fresh_postgres("limit_checkpoint_partition").await else {
        return;
    };
    let clock = ManualClock::new(T0 + 10_000);
    let engine = engine(&url, &clock).await;
    support::run(
        &engine,
        "beta",
        [
            Command::CreateOrg {
                name: "Beta".into(),
                default_monthly_limit_micros: None,
                alert_thresholds_bps: None,
                monthly_limit_micros: None,
            },
            Command::AddUser {
                user_id: UserId::new("bob").unwrap(),
                email: "bob@beta.test".into(),
                name: "Bob".into(),
                monthly_limit_micros: None,
                activate: true,
            },
        ],
    )
    .await;
    let _ = engine.meter.claim(1, "kafka:test").await.unwrap();
    let usage = |request_id: &'static str, org_id: &'static str, user_id: &'static str| {
        RawUsage {
            request_id,
            org_id,
            user_id,
            cost_micros: Some(1_000),
            occurred_at_ms: Some(T0 + 1_000),
            ..RawUsage::default()
        }
        .validate()
        .unwrap()
    };
    let apply = |p: i32, position: i64, event: &tally_core::usage::UsageEvent| {
        let _ = engine
            .meter
            .apply(
                p,
                &[Positioned {
                    position,
                    logged_at_ms: T0 + 2_000,
                    event,
                }],
            )
            .unwrap();
    };
    apply(0, 0, &usage("a1", "acme", "alice"));
    apply(1, 0, &usage("b1", "beta", "bob"));
    let _ = engine.meter.checkpoint().await.unwrap();
    apply(0, 1, &usage("a2", "acme", "alice"));
    apply(1, 1, &usage("b2", "beta", "bob"));
    let number = async |p: i64| {
        engine
            .db
            .load_checkpoint(p)
            .await
            .unwrap()
            .unwrap()
            .checkpoint
            .number
    };
    let before = (number(0).await, number(1).await);
    support::run(
        &engine,
        "acme",
        [Command::UpdateUser {
            user_id: UserId::new("alice").unwrap(),
            email: None,
            name: None,
            monthly_limit_micros: Some(Some(5_000_000)),
            status: None,
        }],
    )
    .await;
    assert_eq!(
        (number(0).await, number(1).await),
        (before.0 + 1, before.1),
        "acme's partition checkpointed, beta's left for its next"
    );
}

/// A process that claims a partition again keeps nothing of what it counted
/// in its earlier ownership beyond the checkpoint: a hold whose usage it
/// counted then (never checkpointed) is live again, its row kept, until the
/// replay counts the usage. Found by the distributed simulator (seed 5,
/// step 32): the memory of the earlier ownership took the hold for settled
/// and deleted its row, and its budget was free to spend again.
#[tokio::test]
async fn a_claim_again_judges_holds_by_the_checkpoint_not_an_earlier_ownership() {
    let Some(url) = support::fresh_postgres("claim_again_holds").await else {
        return;
    };
    let clock = ManualClock::new(T0);
    let engine = engine(&url, &clock).await;
    let (_, d, _) = engine
        .reserve(SECRET, None, None, hold("r1", 100_000, 600_000))
        .await
        .unwrap();
    assert!(d.allowed, "{d:?}");
    let event = RawUsage {
        request_id: "r1",
        org_id: "acme",
        user_id: "alice",
        cost_micros: Some(90_000),
        occurred_at_ms: Some(T0 + 1_000),
        ..RawUsage::default()
    }
    .validate()
    .unwrap();
    let applied = || {
        engine.meter.apply(
            0,
            &[Positioned {
                position: 0,
                logged_at_ms: T0 + 2_000,
                event: &event,
            }],
        )
    };
    let _ = applied().unwrap();
    // The partition is lost before any checkpoint, and claimed again.
    engine.meter.release(0);
    let _ = engine.meter.claim(0, "kafka:test").await.unwrap();
    let rows: Vec<String> = engine
        .db
        .load_holds(0)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.request_id)
        .collect();
    assert_eq!(rows, vec!["r1".to_owned()], "the hold's row is kept");
    let held = engine
        .held("acme", tally_core::ledger::SubjectKind::User, &["alice"])
        .await
        .unwrap();
    assert_eq!(held, vec![100_000], "the hold holds again");
    // The replay counts the usage once, and settles the hold.
    assert_eq!(
        applied().unwrap(),
        vec![tally_core::org::UsageOutcome::Applied]
    );
    let held = engine
        .held("acme", tally_core::ledger::SubjectKind::User, &["alice"])
        .await
        .unwrap();
    assert_eq!(held, vec![0]);
}
