//! A partition's position only moves forward: a dead letter kept after the
//! batch it came in was applied never takes it back.

use std::sync::Arc;

use tally_core::usage::RawUsage;
use tally_engine::clock::SystemClock;
use tally_engine::embedded::{EmbeddedLog, PARTITION};
use tally_engine::meter::Positioned;
use tally_store::checkpoint::DeadLetter;
use tally_store::{Db, DbOptions};

mod support;

#[tokio::test]
async fn a_dead_letter_of_an_earlier_message_keeps_the_position_of_the_batch() {
    let dir = std::env::temp_dir().join(format!("tally-positions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("tally.db").display());
    let db = Db::open(&DbOptions::new(url)).await.unwrap();
    let engine = support::engine_on(db, Arc::new(SystemClock)).await;
    support::acme_and_alice(&engine, None).await;
    let log = Arc::new(
        EmbeddedLog::recover(Arc::clone(&engine.meter))
            .await
            .unwrap(),
    );
    engine.set_sink(log);
    let meter = Arc::clone(&engine.meter);
    let now = engine.now_ms();
    let good = RawUsage {
        request_id: "good",
        org_id: "acme",
        user_id: "alice",
        cost_micros: Some(100),
        occurred_at_ms: Some(now - 1_000),
        ..RawUsage::default()
    }
    .validate()
    .unwrap();
    // As the Kafka consumer does: offset 10 failed to decode, offset 11 is
    // applied, then 10 is kept as a dead letter.
    let applied = meter
        .apply(
            PARTITION,
            &[Positioned {
                position: 11,
                logged_at_ms: now,
                event: &good,
            }],
        )
        .unwrap();
    assert_eq!(applied.len(), 1);
    meter.dead_letter(
        PARTITION,
        DeadLetter {
            position: 10,
            logged_at_ms: now,
            org_id: None,
            reason: "bad_payload".into(),
            message: "not a usage event".into(),
            payload: b"junk".to_vec(),
        },
    );
    assert_eq!(meter.position(PARTITION), Some(11));
    let _ = meter.checkpoint().await.unwrap();
    assert_eq!(meter.committed_position(PARTITION), Some(11));
    let _ = std::fs::remove_dir_all(&dir);
}
