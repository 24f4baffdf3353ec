//! The embedded usage log: usage posted over HTTP is appended to an SQL
//! table (one row per batch), which is partition 0 of the meter, and counted.
//!
//! An ingest runs as one spawned task under the meter's write lock: check
//! attribution, append, count, answer. The log position and the in-memory
//! state therefore agree at every checkpoint, and a client hanging up cannot
//! stop it halfway. A record holds every attributable event of its batch,
//! duplicates and late ones too: applying it decides which count, on first
//! ingest as on replay. If the append fails, nothing was applied, and the
//! batch is answered 503 (should the append have committed all the same —
//! a database gone between COMMIT and its answer — it counts once, from the
//! log, and a retry is a duplicate). While the store is in a fault
//! ([`crate::health`]), batches are refused before anything is done.

use std::sync::Arc;
use std::time::Instant;

use tally_core::org::UsageOutcome;
use tally_core::usage::UsageEvent;
use tally_store::Db;
use tokio::sync::mpsc;

use crate::holds::Replayed;
use crate::meter::{IngestReport, Meter, Positioned};
use crate::metrics as m;
use crate::{BoxFuture, Error, Result, UsageSink};

/// The embedded mode has one partition: the whole usage log.
pub const PARTITION: i32 = 0;
/// Log records read per round trip while replaying (a record is one ingest
/// batch: up to a few thousand events).
const REPLAY_PAGE_LEN: i64 = 64;

/// The name the embedded usage log binds its checkpoint to: a database
/// metered from it is never resumed from a Kafka topic's offsets (see
/// [`tally_store::Db::claim_partition`]).
pub const LOG: &str = "embedded";

#[derive(Debug)]
pub struct EmbeddedLog {
    meter: Arc<Meter>,
    /// What the recovery replayed, until the hold journal takes it.
    replayed: parking_lot::Mutex<Replayed>,
}

impl EmbeddedLog {
    /// Claims the log's partition, replays the log after its checkpoint, and
    /// marks the meter ready.
    pub async fn recover(meter: Arc<Meter>) -> Result<EmbeddedLog> {
        EmbeddedLog::recover_watching(meter, Replayed::default()).await
    }

    /// [`EmbeddedLog::recover`], noting which of the holds `ids` watches
    /// the replay counted ([`EmbeddedLog::take_replayed`]).
    pub async fn recover_watching(meter: Arc<Meter>, mut ids: Replayed) -> Result<EmbeddedLog> {
        let started = Instant::now();
        let _ = meter.claim(PARTITION, LOG).await?;
        let replayed = {
            let _w = meter.write_lock().await;
            replay_locked(&meter, Some(&mut ids)).await?
        };
        let log = EmbeddedLog {
            meter,
            replayed: parking_lot::Mutex::new(ids),
        };
        log.meter.set_ready(true);
        tracing::info!(
            orgs = log.meter.registry().len(),
            position = log.meter.position(PARTITION).unwrap_or(-1),
            replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "usage log recovered"
        );
        Ok(log)
    }

    /// The usage the recovery replayed (the log after its checkpoint), for
    /// [`crate::holds::HoldJournal::open`]; empty after the first call.
    pub fn take_replayed(&self) -> Replayed {
        std::mem::take(&mut *self.replayed.lock())
    }

    /// Deletes checkpointed batches older than the retention.
    pub async fn purge(&self) {
        let Some(position) = self.meter.committed_position(PARTITION) else {
            return;
        };
        let retention_ms =
            i64::try_from(self.meter.options().usage_retention.as_millis()).unwrap_or(i64::MAX);
        let before = self.meter.now_ms().saturating_sub(retention_ms);
        match self.meter.db().purge_usage(position, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "purged checkpointed usage past retention"),
            Err(e) => tracing::warn!(error = %e, "usage log purge failed"),
        }
    }
}

/// Replays the log after the checkpoint, for callers that hold the meter's
/// write lock; notes the request ids replayed in `ids`, if given. Reading
/// and decoding run a page ahead, on other threads, while this one applies:
/// decoding costs about as much as applying, and they overlap.
async fn replay_locked(meter: &Meter, mut ids: Option<&mut Replayed>) -> Result<u64> {
    let (tx, mut rx) = mpsc::channel(1);
    let reader = tokio::spawn(read_ahead(
        meter.db().clone(),
        meter.position(PARTITION).unwrap_or(-1),
        tx,
    ));
    let mut replayed = 0u64;
    let mut next_report = 1_000_000u64;
    while let Some(page) = rx.recv().await {
        let page = page?;
        for rec in &page {
            let positioned: Vec<Positioned<'_>> = rec
                .events
                .iter()
                .map(|event| Positioned {
                    position: rec.seq,
                    logged_at_ms: rec.logged_at_ms,
                    event,
                })
                .collect();
            let outcomes = meter.apply(PARTITION, &positioned).ok_or_else(|| {
                Error::Unavailable("the usage log's partition is not claimed".into())
            })?;
            meter.set_position(PARTITION, rec.seq);
            replayed += rec.events.len() as u64;
            // Counted now or before: a hold of that id is settled. (A record
            // keeps the events applying refused, too late say: not those.)
            if let Some(ids) = ids.as_deref_mut() {
                for (e, o) in rec.events.iter().zip(&outcomes) {
                    if !matches!(o, UsageOutcome::Rejected(_)) {
                        ids.counted(e.org_id.as_str(), &e.request_id);
                    }
                }
            }
        }
        // Freeing a page's events (millions of small strings) is work
        // this thread, the bottleneck, can hand off.
        drop(tokio::task::spawn_blocking(move || drop(page)));
        if replayed >= next_report {
            next_report += 1_000_000;
            tracing::info!(replayed, "replaying the usage log");
        }
    }
    reader
        .await
        .map_err(|e| Error::Unavailable(format!("usage log reader failed: {e}")))?;
    metrics::counter!(m::REPLAYED_EVENTS).increment(replayed);
    Ok(replayed)
}

/// One usage log record, decoded.
struct Decoded {
    seq: i64,
    logged_at_ms: i64,
    events: Vec<UsageEvent>,
}

/// Reads the log after `from` page by page and decodes each page on the
/// blocking pool, one page ahead of the consumer. Stops at the end of the
/// log, at the first error (sent on), or when the consumer is gone.
async fn read_ahead(db: Db, mut from: i64, tx: mpsc::Sender<Result<Vec<Decoded>>>) {
    loop {
        let page = match db.read_usage(from, REPLAY_PAGE_LEN).await {
            Ok(records) => records,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let Some(last) = page.last() else {
            return;
        };
        from = last.seq;
        let decoded = tokio::task::spawn_blocking(move || {
            page.into_iter()
                .map(|rec| {
                    let events = tally_proto::decode_usage_batch(&rec.payload).map_err(|e| {
                        Error::Corrupt(format!("usage log record {}: {e}", rec.seq))
                    })?;
                    Ok(Decoded {
                        seq: rec.seq,
                        logged_at_ms: rec.logged_at_ms,
                        events,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .unwrap_or_else(|e| Err(Error::Unavailable(format!("decoding failed: {e}"))));
        let failed = decoded.is_err();
        if tx.send(decoded).await.is_err() || failed {
            return;
        }
    }
}

async fn ingest(meter: Arc<Meter>, events: Vec<(usize, UsageEvent)>) -> Result<IngestReport> {
    if let Some(fault) = meter.health().fault() {
        return Err(Error::StoreFault(fault));
    }
    let _w = meter.write_lock().await;
    // Again: the fault may have begun while this batch waited.
    if let Some(fault) = meter.health().fault() {
        return Err(Error::StoreFault(fault));
    }
    if !meter.is_ready() {
        return Err(Error::Unavailable(
            "the meter is not accepting usage".into(),
        ));
    }
    if !meter.owned_partitions().contains(&PARTITION) {
        // Never appended to a log this process does not own.
        return Err(Error::Unavailable(
            "the usage log's partition is not claimed".into(),
        ));
    }
    // Entity appends of unknown outcome are resolved first: usage is judged
    // by the directory as the log has it.
    meter.resolve_unknown_appends().await?;
    if meter.log_tail_unknown() {
        // An append failed in a way that may have committed after all: what
        // the log holds beyond memory is applied before anything is added.
        let replayed = replay_locked(&meter, None).await?;
        meter.set_log_tail_unknown(false);
        tracing::info!(
            replayed,
            "applied what the usage log holds beyond memory after a failed append"
        );
    }
    // Attribution is the one decision a replay could make differently (an
    // unknown user may be created later), so it is made before logging and
    // the unattributable events stay out of the log. Everything else is
    // decided by applying, after the append: a replay applies the same
    // records onto the same state and decides the same.
    let mut report = IngestReport::default();
    let mut logged: Vec<(usize, &UsageEvent)> = Vec::with_capacity(events.len());
    let all: Vec<&UsageEvent> = events.iter().map(|(_, e)| e).collect();
    for ((index, event), attributed) in events.iter().zip(meter.attribution(PARTITION, &all)) {
        match attributed {
            Ok(()) => logged.push((*index, event)),
            Err(r) => report.reject(*index, r),
        }
    }
    if logged.is_empty() {
        m::count_outcomes(&report);
        return Ok(report);
    }
    let logged_at_ms = meter.now_ms();
    let payload = tally_proto::encode_usage_batch(logged.iter().map(|(_, e)| *e));
    let seq = match meter
        .db()
        .append_usage(logged_at_ms, logged.len(), &payload)
        .await
    {
        Ok(seq) => seq,
        Err(e) => {
            // Nothing was applied: memory is what the log was before. The
            // append may still have committed (a database that went away
            // between COMMIT and its answer): the next batch first applies
            // whatever the log holds beyond memory.
            meter.set_log_tail_unknown(true);
            let e = Error::from(e);
            if !meter.health().write_failed("usage_log", &e, meter.now_ms()) {
                tracing::error!(error = %e, "usage log append failed");
            }
            return Err(match meter.health().fault() {
                Some(fault) => Error::StoreFault(fault),
                None => e,
            });
        }
    };
    let positioned: Vec<Positioned<'_>> = logged
        .iter()
        .map(|(_, event)| Positioned {
            position: seq,
            logged_at_ms,
            event,
        })
        .collect();
    let outcomes = meter
        .apply(PARTITION, &positioned)
        .ok_or_else(|| Error::Unavailable("the usage log's partition is not claimed".into()))?;
    for ((index, _), outcome) in logged.iter().zip(outcomes) {
        match outcome {
            UsageOutcome::Applied => report.accepted += 1,
            UsageOutcome::Duplicate => report.duplicates += 1,
            UsageOutcome::Rejected(r) => report.reject(*index, r),
        }
    }
    report.rejected.sort_by_key(|r| r.index);
    m::count_outcomes(&report);
    meter.wrote();
    if meter.wants_checkpoint(PARTITION) {
        // Failures are logged and retried by the next checkpoint.
        let _ = meter.checkpoint_locked().await;
    }
    Ok(report)
}

impl UsageSink for EmbeddedLog {
    fn ingest(&self, events: Vec<(usize, UsageEvent)>) -> BoxFuture<'_, Result<IngestReport>> {
        let meter = Arc::clone(&self.meter);
        Box::pin(async move {
            // Spawned: once counting starts, the append must happen.
            tokio::spawn(ingest(meter, events))
                .await
                .map_err(|e| Error::Unavailable(format!("ingest task failed: {e}")))?
        })
    }
}
