//! The outbox relay: the SQL entity log, published to `tally.events` in log
//! order, keyed by org (so one org's events stay in order on one partition).
//! One process relays at a time (a PostgreSQL transaction lock); the relayed
//! position moves only after the broker acknowledged the batch.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_store::Db;
use tokio::sync::watch;

/// Events published per step.
const STEP_LEN: u32 = 1_000;

/// Relays until stopped.
pub async fn run(
    db: Db,
    producer: FutureProducer,
    topic: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut measured: Option<std::time::Instant> = None;
    loop {
        // Every process reports the backlog (a fact of the shared log).
        if measured.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            measured = Some(std::time::Instant::now());
            match db.relay_backlog().await {
                Ok(n) => metrics::gauge!(crate::metrics::RELAY_BACKLOG).set(n as f64),
                Err(e) => tracing::debug!(error = %e, "measuring the relay backlog failed"),
            }
        }
        let step = db
            .relay_step(STEP_LEN, async |events| {
                let mut waiting = Vec::with_capacity(events.len());
                for (_, e) in &events {
                    let value = tally_proto::encode_entity_event(e);
                    let record = FutureRecord::to(&topic)
                        .key(e.org_id.as_str())
                        .payload(&value);
                    let delivery = producer
                        .send_result(record)
                        .map_err(|(e, _)| e.to_string())?;
                    waiting.push(delivery);
                }
                for d in waiting {
                    match d.await {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => return Err(e.to_string()),
                        Err(_) => return Err("delivery cancelled".into()),
                    }
                }
                Ok(())
            })
            .await;
        let pause = match step {
            Ok(Some(n)) if n as u32 == STEP_LEN => Duration::ZERO,
            Ok(_) => interval,
            Err(e) => {
                tracing::warn!(error = %e, "relaying the entity log failed; retrying");
                interval.max(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
