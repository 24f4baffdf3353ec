//! The embedded metering engine: usage arrives in batches, is counted in
//! memory, written to the usage log, and checkpointed to SQL.
//!
//! One writer at a time (a mutex around [`Writer`]) applies a batch to the
//! orgs' meters, appends the counted events to the usage log, and only then
//! answers. The log position and the in-memory state therefore always agree:
//! a checkpoint saves both together, and after a crash the log is replayed
//! from the checkpoint onto exactly the state it was applied to. If an append
//! fails, memory is ahead of the log: the meter stops taking usage and never
//! checkpoints again, and the process must restart (see [`Meter::failed`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tally_core::ids::OrgId;
use tally_core::ledger::EnforcementKind;
use tally_core::org::{MeterChanges, Rejection, UsageOutcome};
use tally_core::time::Month;
use tally_core::usage::UsageEvent;
use tally_store::Db;
use tally_store::checkpoint::PartitionCheckpoint;
use tokio::sync::{Mutex, Notify};

use crate::clock::Clock;
use crate::metrics as m;
use crate::registry::Registry;
use crate::{Error, Result};

/// The embedded mode has one partition: the whole usage log.
const PARTITION: i64 = 0;
/// Log records read per round trip while replaying.
const REPLAY_PAGE_LEN: i64 = 256;

#[derive(Debug, Clone)]
pub struct MeterOptions {
    /// How often a checkpoint is written when something changed. Default 1 s.
    pub checkpoint_interval: Duration,
    /// A checkpoint is also written once this many events were counted since
    /// the last one, so replay after a crash stays short. Default 100 000.
    pub checkpoint_events_max: u64,
    /// How long checkpointed usage stays in the usage log. Default 7 days.
    pub usage_retention: Duration,
}

impl Default for MeterOptions {
    fn default() -> Self {
        MeterOptions {
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_events_max: 100_000,
            usage_retention: Duration::from_secs(7 * 86_400),
        }
    }
}

/// What happened to one ingested batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    pub accepted: u32,
    pub duplicates: u32,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The event's index in the request.
    pub index: usize,
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Default)]
struct Writer {
    /// The last usage log position applied in memory.
    position: i64,
    /// The last checkpoint committed.
    committed: PartitionCheckpoint,
    counted_since_checkpoint: u64,
    /// Changes taken from memory but not yet committed (a failed checkpoint
    /// keeps them here for the next).
    pending: HashMap<OrgId, MeterChanges>,
}

#[derive(Debug)]
pub struct Meter {
    db: Db,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    opts: MeterOptions,
    writer: Mutex<Writer>,
    ready: AtomicBool,
    poisoned: AtomicBool,
    failed: Notify,
}

impl Meter {
    /// Loads the checkpoint into the orgs of `registry` (which must hold the
    /// whole entity log already) and replays the usage log after it.
    pub async fn recover(
        db: Db,
        registry: Arc<Registry>,
        clock: Arc<dyn Clock>,
        opts: MeterOptions,
        window_ms: i64,
    ) -> Result<Meter> {
        let started = Instant::now();
        let now = clock.now_ms();
        let checkpoint = db.load_checkpoint(PARTITION).await?.unwrap_or_default();
        let meters = db.load_meters(window_ms, Month::from_unix_ms(now)).await?;
        for (org_id, saved) in meters {
            let Some(cell) = registry.org(&org_id) else {
                tracing::warn!(org = %org_id, "checkpoint names an org the entity log does not have");
                continue;
            };
            let unknown = cell.write().restore(saved);
            for c in unknown {
                tracing::warn!(org = %org_id, kind = c.kind.as_str(), id = %c.id, "checkpoint names an unknown subject");
            }
        }
        for (_, cell) in registry.all() {
            cell.write().reconcile(now);
        }
        let meter = Meter {
            db,
            registry,
            clock,
            opts,
            writer: Mutex::new(Writer {
                position: checkpoint.position,
                committed: checkpoint,
                ..Writer::default()
            }),
            ready: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            failed: Notify::new(),
        };
        let replayed = meter.replay().await?;
        meter.ready.store(true, Ordering::SeqCst);
        metrics::gauge!(m::READY).set(1.0);
        tracing::info!(
            orgs = meter.registry.len(),
            position = meter.writer.lock().await.position,
            replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "meter recovered"
        );
        Ok(meter)
    }

    async fn replay(&self) -> Result<u64> {
        let mut w = self.writer.lock().await;
        let mut replayed = 0u64;
        let mut next_report = 1_000_000u64;
        loop {
            let records = self.db.read_usage(w.position, REPLAY_PAGE_LEN).await?;
            let Some(last) = records.last() else { break };
            let last_seq = last.seq;
            let mut page = 0u64;
            for rec in &records {
                let events = tally_proto::decode_usage_batch(&rec.payload)
                    .map_err(|e| Error::Corrupt(format!("usage log record {}: {e}", rec.seq)))?;
                for ev in &events {
                    if let Some(cell) = self.registry.org(&ev.org_id) {
                        let _ = cell.write().apply_usage(ev, rec.logged_at_ms);
                    }
                }
                page += events.len() as u64;
            }
            w.position = last_seq;
            w.counted_since_checkpoint += page;
            replayed += page;
            if replayed >= next_report {
                next_report += 1_000_000;
                tracing::info!(replayed, position = last_seq, "replaying the usage log");
            }
        }
        metrics::counter!(m::REPLAYED_EVENTS).increment(replayed);
        Ok(replayed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.poisoned.load(Ordering::SeqCst)
    }

    /// Resolves when the meter stopped for good (its memory ran ahead of the
    /// usage log): the process must exit and recover on restart.
    pub async fn failed(&self) {
        loop {
            let notified = self.failed.notified();
            if self.poisoned.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Counts a batch of valid events (`index` is each one's place in the
    /// request). Returns after the counted events are durable in the log.
    pub async fn ingest(&self, events: Vec<(usize, UsageEvent)>) -> Result<IngestReport> {
        let mut report = IngestReport::default();
        let mut w = self.writer.lock().await;
        if self.poisoned.load(Ordering::SeqCst) || !self.ready.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "the meter is not accepting usage".into(),
            ));
        }
        let logged_at_ms = self.clock.now_ms();
        let mut counted = Vec::with_capacity(events.len());
        let mut i = 0;
        while i < events.len() {
            // Consecutive events of one org share one lock.
            let org_id = &events[i].1.org_id;
            let run = events[i..]
                .iter()
                .take_while(|(_, e)| &e.org_id == org_id)
                .count();
            let Some(cell) = self.registry.org(org_id) else {
                for (index, _) in &events[i..i + run] {
                    report.reject(*index, Rejection::UnknownOrg);
                }
                i += run;
                continue;
            };
            let mut org = cell.write();
            for (index, ev) in &events[i..i + run] {
                match org.apply_usage(ev, logged_at_ms) {
                    UsageOutcome::Applied => {
                        report.accepted += 1;
                        counted.push(ev.clone());
                    }
                    UsageOutcome::Duplicate => report.duplicates += 1,
                    UsageOutcome::Rejected(r) => report.reject(*index, r),
                }
            }
            drop(org);
            i += run;
        }
        metrics::counter!(m::USAGE_EVENTS, "outcome" => "accepted", "reason" => "")
            .increment(u64::from(report.accepted));
        metrics::counter!(m::USAGE_EVENTS, "outcome" => "duplicate", "reason" => "")
            .increment(u64::from(report.duplicates));
        for r in &report.rejected {
            metrics::counter!(m::USAGE_EVENTS, "outcome" => "rejected", "reason" => r.code)
                .increment(1);
        }
        if counted.is_empty() {
            return Ok(report);
        }
        let payload = tally_proto::encode_usage_batch(&counted);
        match self
            .db
            .append_usage(logged_at_ms, counted.len(), &payload)
            .await
        {
            Ok(seq) => {
                w.position = seq;
                w.counted_since_checkpoint += counted.len() as u64;
            }
            Err(e) => {
                tracing::error!(error = %e, "usage log append failed after counting: the meter stops; restart to recover");
                self.poisoned.store(true, Ordering::SeqCst);
                metrics::gauge!(m::READY).set(0.0);
                self.failed.notify_waiters();
                return Err(e.into());
            }
        }
        if w.counted_since_checkpoint >= self.opts.checkpoint_events_max {
            // Best effort: a failure is retried by the next checkpoint.
            if let Err(e) = self.checkpoint_locked(&mut w).await {
                tracing::warn!(error = %e, "checkpoint failed; retrying with the next");
            }
        }
        Ok(report)
    }

    /// Writes a checkpoint if anything changed; returns whether it wrote.
    pub async fn checkpoint(&self) -> Result<bool> {
        let mut w = self.writer.lock().await;
        self.checkpoint_locked(&mut w).await
    }

    async fn checkpoint_locked(&self, w: &mut Writer) -> Result<bool> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "the meter stopped; restart to recover".into(),
            ));
        }
        for (org_id, cell) in self.registry.all() {
            if !cell.read().has_changes() {
                continue;
            }
            let changes = cell.write().take_changes();
            match w.pending.get_mut(&org_id) {
                Some(p) => p.merge(changes),
                None => {
                    let _ = w.pending.insert(org_id, changes);
                }
            }
        }
        if w.position == w.committed.position && w.pending.is_empty() {
            return Ok(false);
        }
        let started = Instant::now();
        let next = PartitionCheckpoint {
            position: w.position,
            number: w.committed.number + 1,
        };
        let orgs: Vec<(OrgId, MeterChanges)> = w
            .pending
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match self
            .db
            .write_checkpoint(PARTITION, next, &orgs, self.clock.now_ms())
            .await
        {
            Ok(()) => {
                metrics::histogram!(m::CHECKPOINT_SECONDS).record(started.elapsed().as_secs_f64());
                for (org_id, ch) in &orgs {
                    for e in &ch.enforcement {
                        let ev = &e.event;
                        metrics::counter!(m::ENFORCEMENT_EVENTS, "event" => ev.kind.name(), "kind" => e.kind.as_str())
                            .increment(1);
                        match ev.kind {
                            EnforcementKind::ThresholdCrossed { threshold_bps } => tracing::info!(
                                org = %org_id, subject = e.kind.as_str(), id = %e.id, month = %ev.month,
                                threshold_bps, spend_micros = ev.spend_micros, "threshold crossed"
                            ),
                            EnforcementKind::CutOff => tracing::info!(
                                org = %org_id, subject = e.kind.as_str(), id = %e.id, month = %ev.month,
                                spend_micros = ev.spend_micros, limit_micros = ev.limit_micros, "cut off"
                            ),
                            EnforcementKind::CutoffLifted { reason } => tracing::info!(
                                org = %org_id, subject = e.kind.as_str(), id = %e.id, month = %ev.month,
                                reason = reason.as_str(), "cutoff lifted"
                            ),
                        }
                    }
                }
                w.pending.clear();
                w.committed = next;
                w.counted_since_checkpoint = 0;
                Ok(true)
            }
            Err(e) => {
                metrics::counter!(m::CHECKPOINT_FAILURES).increment(1);
                Err(e.into())
            }
        }
    }

    /// Makes every counted event visible to SQL readers: checkpoints when
    /// anything is unsaved. Admin reads call it for read-your-writes.
    pub async fn flush(&self) -> Result<()> {
        let _ = self.checkpoint().await?;
        Ok(())
    }

    /// Periodic work: checkpoint, the new-month lift, log retention. Runs
    /// until `stop` resolves.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        let period = self.opts.checkpoint_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_housekeeping: Option<Instant> = None;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            if self.poisoned.load(Ordering::SeqCst) {
                return;
            }
            let now = self.clock.now_ms();
            for (_, cell) in self.registry.all() {
                cell.write().new_month(now);
            }
            if let Err(e) = self.checkpoint().await {
                tracing::warn!(error = %e, "checkpoint failed; retrying with the next");
            }
            if last_housekeeping.is_none_or(|t| t.elapsed() > Duration::from_secs(600)) {
                last_housekeeping = Some(Instant::now());
                self.purge().await;
            }
        }
    }

    async fn purge(&self) {
        let position = self.writer.lock().await.committed.position;
        let retention_ms = i64::try_from(self.opts.usage_retention.as_millis()).unwrap_or(i64::MAX);
        let before = self.clock.now_ms().saturating_sub(retention_ms);
        match self.db.purge_usage(position, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "purged checkpointed usage past retention"),
            Err(e) => tracing::warn!(error = %e, "usage log purge failed"),
        }
    }

    /// The last checkpoint, for shutdown: writes what is unsaved.
    pub async fn shutdown(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "the meter stopped; not checkpointing".into(),
            ));
        }
        let _ = self.checkpoint().await?;
        Ok(())
    }
}

impl IngestReport {
    fn reject(&mut self, index: usize, r: Rejection) {
        self.rejected.push(Rejected {
            index,
            code: r.code(),
            message: r.message().to_owned(),
        });
    }
}
