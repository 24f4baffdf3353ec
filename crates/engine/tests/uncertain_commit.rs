//! A command whose COMMIT reached PostgreSQL but whose answer never came
//! back (the connection died in between) committed: the command path reads
//! the org's log back and answers success, instead of an error for a change
//! that is there; and when it cannot read the log either, the org is caught
//! up once the database is back. A real PostgreSQL server, behind a TCP
//! proxy that cuts the connection right after forwarding a COMMIT.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tally_core::entity::{Actor, Command, CommandError};
use tally_core::ids::{OrgId, UserId};
use tally_core::secret::hash_secret;
use tally_core::time::Month;
use tally_core::usage::RawUsage;
use tally_engine::clock::SystemClock;
use tally_engine::meter::Positioned;
use tally_engine::{Engine, EngineOptions, Error};
use tally_store::{Db, DbOptions};

mod support;

use support::ProxyFaults;

/// An engine on a fresh PostgreSQL database reached through the proxy, with
/// org acme; `None` when there is no server.
async fn engine_behind_a_proxy(name: &str) -> Option<(Engine, Db, Arc<ProxyFaults>)> {
    let direct = support::fresh_postgres(name).await?;
    let faults = Arc::new(ProxyFaults::default());
    let url = support::behind_a_proxy(&direct, Arc::clone(&faults)).await;
    let db = Db::open(&DbOptions {
        acquire_timeout: Duration::from_secs(1),
        ..DbOptions::new(url)
    })
    .await
    .unwrap();
    let engine = Engine::start(
        db.clone(),
        Arc::new(SystemClock),
        EngineOptions::default(),
        hash_secret("operator"),
    )
    .await
    .unwrap();
    let _ = engine
        .commands
        .execute(
            &OrgId::new("acme").unwrap(),
            Actor::Operator,
            &Command::CreateOrg {
                name: "Acme".into(),
                default_monthly_limit_micros: None,
                alert_thresholds_bps: None,
                monthly_limit_micros: None,
            },
        )
        .await
        .unwrap();
    Some((engine, db, faults))
}

fn add_bob() -> Command {
    Command::AddUser {
        user_id: UserId::new("bob").unwrap(),
        email: "bob@acme.test".into(),
        name: "Bob".into(),
        monthly_limit_micros: None,
        activate: true,
    }
}

/// Runs the meter's periodic task until the storage fault is over.
async fn until_the_fault_ends(engine: &Engine) {
    let stop = tokio::sync::Notify::new();
    let meter = Arc::clone(&engine.meter);
    let ticks = tokio::spawn(async move { meter.run(async { stop.notified().await }).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.meter.health().fault().is_some() {
        assert!(Instant::now() < deadline, "the probe never ended the fault");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ticks.abort();
}

#[tokio::test]
async fn a_command_whose_commit_answer_was_lost_succeeds() {
    let Some((engine, db, faults)) = engine_behind_a_proxy("uncertain").await else {
        return;
    };
    let org = OrgId::new("acme").unwrap();
    let run = |cmd: Command| {
        let (commands, org) = (Arc::clone(&engine.commands), org.clone());
        async move { commands.execute(&org, Actor::Operator, &cmd).await }
    };
    faults.cut_commit.store(true, Ordering::SeqCst);
    let events = run(add_bob()).await.expect("the append committed: success");
    assert!(
        !faults.cut_commit.load(Ordering::SeqCst),
        "the proxy cut a COMMIT"
    );
    let cell = engine.registry.org(&org).unwrap();
    assert!(
        cell.read().dir.users.contains_key("bob"),
        "folded in memory"
    );
    let stored = db.org_events(&org, 0, 100).await.unwrap();
    assert_eq!(stored[1..], events[..], "created once: {stored:?}");

    // The lost answer counted as a storage fault until a write commits.
    let fault = engine.meter.health().fault().expect("a fault");
    assert_eq!(fault.path, "entity_log");
    until_the_fault_ends(&engine).await;
    // Now the same command again is a conflict: it happened, once.
    assert!(matches!(
        run(add_bob()).await,
        Err(Error::Command(CommandError::Conflict(_)))
    ));
}

/// The same, with the database away right after the COMMIT: the command
/// cannot learn its outcome and is refused; when the database is back, the
/// org is caught up from the log by itself, before anything else uses it.
#[tokio::test]
async fn a_commit_of_unknown_outcome_is_folded_when_the_database_is_back() {
    let Some((engine, db, faults)) = engine_behind_a_proxy("unknown").await else {
        return;
    };
    let org = OrgId::new("acme").unwrap();
    faults.down_after_cut.store(true, Ordering::SeqCst);
    faults.cut_commit.store(true, Ordering::SeqCst);
    let refused = engine
        .commands
        .execute(&org, Actor::Operator, &add_bob())
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.store_unavailable().is_some()),
        "{refused:?}"
    );
    let cell = engine.registry.org(&org).unwrap();
    assert!(!cell.read().dir.users.contains_key("bob"), "not folded yet");
    assert!(engine.meter.health().fault().is_some());

    faults.down.store(false, Ordering::SeqCst);
    until_the_fault_ends(&engine).await;
    assert!(
        cell.read().dir.users.contains_key("bob"),
        "caught up from the log when the fault ended"
    );
    assert_eq!(db.org_events(&org, 0, 100).await.unwrap().len(), 3);
    assert!(matches!(
        engine
            .commands
            .execute(&org, Actor::Operator, &add_bob())
            .await,
        Err(Error::Command(CommandError::Conflict(_)))
    ));
}

/// A checkpoint whose COMMIT reaches the server only after the meter gave
/// up on it and began the next one: the next is fenced by the late one,
/// and only what the late one carried counts as committed; the rest is
/// written by the checkpoint after. Nothing is lost, nothing is counted
/// twice.
#[tokio::test]
async fn a_checkpoint_that_commits_late_is_told_from_its_retry() {
    let Some((engine, db, faults)) = engine_behind_a_proxy("late_checkpoint").await else {
        return;
    };
    let org = OrgId::new("acme").unwrap();
    let _ = engine
        .commands
        .execute(&org, Actor::Operator, &add_bob())
        .await
        .unwrap();
    let meter = Arc::clone(&engine.meter);
    assert_eq!(meter.claim(0, "kafka:test").await.unwrap().position, -1);
    let now = engine.now_ms();
    let usage = |i: i64| {
        RawUsage {
            request_id: &format!("r{i}"),
            org_id: "acme",
            user_id: "bob",
            cost_micros: Some(100 * (i + 1)),
            occurred_at_ms: Some(now - 1_000),
            ..RawUsage::default()
        }
        .validate()
        .unwrap()
    };
    let apply = |i: i64| {
        let e = usage(i);
        let applied = meter.apply(
            0,
            &[Positioned {
                position: i,
                logged_at_ms: now,
                event: &e,
            }],
        );
        assert!(applied.is_some());
    };
    // Attempt 1 carries r0; its COMMIT is held and its client cut.
    apply(0);
    faults.hold_commit.store(true, Ordering::SeqCst);
    assert!(meter.checkpoint().await.is_err(), "the client was cut");
    // Attempt 2 carries r0 and r1; it waits for attempt 1's row lock, and
    // attempt 1 commits meanwhile.
    apply(1);
    let second = tokio::spawn({
        let meter = Arc::clone(&meter);
        async move { meter.checkpoint().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    faults.release.notify_one();
    // Fenced by the late one, the second writes what only it carried on
    // top of it before it answers (it answered success with r1 unsaved: a
    // limit command checkpointing so went on as if r1 were saved, and a
    // restart judged r1 under the new limit); nothing is left to write.
    let written = second.await.unwrap();
    assert!(matches!(written, Ok(1)), "{written:?}");
    let saved = db
        .load_meters(0, 86_400_000, Month::from_unix_ms(now))
        .await
        .unwrap();
    let bob = saved["acme"].counters.iter().find(|c| c.id == "bob");
    assert_eq!(
        bob.map(|c| c.counter.spend_micros),
        Some(300),
        "saved when the second answered: {bob:?}"
    );
    assert_eq!(meter.checkpoint().await.unwrap(), 0);
    let saved = db
        .load_meters(0, 86_400_000, Month::from_unix_ms(now))
        .await
        .unwrap();
    let bob = saved["acme"]
        .counters
        .iter()
        .find(|c| c.id == "bob")
        .expect("bob's counter");
    assert_eq!(bob.counter.spend_micros, 300, "{bob:?}");
    assert_eq!(bob.counter.requests, 2, "{bob:?}");
    let hashes = saved["acme"].dedupe.len();
    assert_eq!(hashes, 2, "both request ids are in the saved dedupe window");
    assert_eq!(meter.committed_position(0), Some(1));
    // The day rollup is additive: a layer written twice would show here.
    let (_, days) = db
        .history(
            &org,
            "user",
            "bob",
            Month::from_unix_ms(now),
            Month::from_unix_ms(now),
        )
        .await
        .unwrap();
    let total: (i64, i64) = days
        .iter()
        .fold((0, 0), |t, d| (t.0 + d.spend_micros, t.1 + d.requests));
    assert_eq!(total, (300, 2), "{days:?}");
}
