//! Admin reads flush the meter for read-your-writes; reads that arrive
//! together share one checkpoint instead of writing one each, one after the
//! other, under the lock ingest needs.

use std::sync::Arc;

use tally_core::secret::hash_secret;
use tally_core::usage::RawUsage;
use tally_engine::clock::SystemClock;
use tally_engine::embedded::{EmbeddedLog, PARTITION};
use tally_engine::{Engine, EngineOptions};
use tally_store::{Db, DbOptions};

mod support;

#[tokio::test]
async fn concurrent_flushes_share_one_checkpoint_that_holds_what_came_before() {
    let dir = std::env::temp_dir().join(format!("tally-flush-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = Db::open(&DbOptions::new(format!(
        "sqlite://{}?mode=rwc",
        dir.join("tally.db").display()
    )))
    .await
    .unwrap();
    let clock = Arc::new(SystemClock);
    let engine = Engine::start(db, clock, EngineOptions::default(), hash_secret("operator"))
        .await
        .unwrap();
    support::acme_and_alice(&engine, None).await;
    let log = Arc::new(
        EmbeddedLog::recover(Arc::clone(&engine.meter))
            .await
            .unwrap(),
    );
    engine.set_sink(log);
    let usage = |i: u32| {
        RawUsage {
            request_id: &format!("r{i}"),
            org_id: "acme",
            user_id: "alice",
            cost_micros: Some(100),
            occurred_at_ms: Some(engine.now_ms() - 1_000),
            ..RawUsage::default()
        }
        .validate()
        .unwrap()
    };
    let report = engine.ingest(vec![(0, usage(0))]).await.unwrap();
    assert_eq!(report.accepted, 1);
    let meter = Arc::clone(&engine.meter);
    assert_eq!(meter.committed_position(PARTITION), Some(-1));

    // Ten reads arrive while something holds the write lock (as an ingest
    // or a checkpoint would); then the lock is released.
    let guard = meter.write_lock().await;
    let begun = meter.checkpoints_begun();
    let flushes: Vec<_> = (0..10)
        .map(|_| {
            let meter = Arc::clone(&meter);
            tokio::spawn(async move { meter.flush().await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(guard);
    for f in flushes {
        f.await.unwrap().unwrap();
    }
    assert_eq!(
        meter.checkpoints_begun() - begun,
        1,
        "one checkpoint for ten reads"
    );
    assert_eq!(
        meter.committed_position(PARTITION),
        meter.position(PARTITION),
        "the shared checkpoint holds the usage counted before the reads"
    );

    // A read that arrives after that checkpoint gets its own, with what was
    // counted since.
    let report = engine.ingest(vec![(0, usage(1))]).await.unwrap();
    assert_eq!(report.accepted, 1);
    assert_ne!(
        meter.committed_position(PARTITION),
        meter.position(PARTITION)
    );
    meter.flush().await.unwrap();
    assert_eq!(meter.checkpoints_begun() - begun, 2);
    assert_eq!(
        meter.committed_position(PARTITION),
        meter.position(PARTITION)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
