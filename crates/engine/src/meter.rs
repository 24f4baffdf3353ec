//! The metering engine: applies usage to the orgs' meters, partition by
//! partition, and checkpoints each partition it owns.
//!
//! A partition is a shard of the usage log: the whole embedded log is
//! partition 0; in distributed mode a partition is a partition of the Kafka
//! topic, and an org's usage always arrives on the same one. A process meters
//! the orgs of the partitions it has claimed ([`Meter::claim`]); every other
//! org's counters only mirror what its owner publishes.
//!
//! Two locks: `parts` (sync, short) guards the bookkeeping and is held while
//! events are applied, so a checkpoint takes a consistent cut of state and
//! positions; `write` (async) serializes what must not interleave with a
//! checkpoint — the embedded ingest (apply, then append to the log) and an
//! admin command (stamp, commit, fold). Lock order: `write`, then `parts`,
//! then an org's lock.
//!
//! Work that must not stop halfway (a checkpoint write) runs in a spawned
//! task: a client hanging up drops the handler's future, not the task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tally_core::ids::OrgId;
use tally_core::ledger::{Counter, EnforcementKind, SubjectKind};
use tally_core::org::{MeterChanges, Rejection, UsageOutcome};
use tally_core::time::Month;
use tally_core::usage::UsageEvent;
use tally_store::Db;
use tally_store::checkpoint::{DeadLetter, PartitionCheckpoint};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::health::StoreHealth;
use crate::metrics as m;
use crate::registry::Registry;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct MeterOptions {
    /// How often checkpoints are written when something changed. Default 1 s.
    pub checkpoint_interval: Duration,
    /// A checkpoint is also written once a partition applied this many
    /// events (counted or not) since its last one, so replay after a crash
    /// stays short (about a second at this count). Default 1 000 000.
    pub checkpoint_events_max: u64,
    /// How long checkpointed usage stays in the embedded usage log. Default
    /// 7 days.
    pub usage_retention: Duration,
    /// The dedupe window, for loading checkpoints.
    pub window_ms: i64,
}

impl Default for MeterOptions {
    fn default() -> Self {
        MeterOptions {
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_events_max: 1_000_000,
            usage_retention: Duration::from_secs(7 * 86_400),
            window_ms: 24 * 3_600_000,
        }
    }
}

/// A counter as its owner publishes it after a checkpoint, for the other
/// processes (the compacted `tally.enforcement` topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedState {
    pub org_id: OrgId,
    pub kind: SubjectKind,
    pub id: String,
    pub month: Month,
    pub counter: Counter,
    pub limit_micros: Option<i64>,
}

/// Where published states go (distributed mode).
pub trait StatePublisher: Send + Sync + std::fmt::Debug {
    /// Takes the states of one committed checkpoint. Must not block.
    fn publish(&self, states: Vec<PublishedState>);
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

impl IngestReport {
    pub fn reject(&mut self, index: usize, r: Rejection) {
        self.rejected.push(Rejected {
            index,
            code: r.code(),
            message: r.message().to_owned(),
        });
    }
}

/// Where an owned partition stands in its log, for a reader that must check
/// that the log it reads is the one the checkpoint was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPoint {
    /// The last position applied.
    pub position: i64,
    /// The fingerprint of the message at `position`, if known.
    pub mark: Option<i64>,
    /// Whether the first message read since the claim was checked.
    pub checked: bool,
    /// Whether the partition is refused (not metered).
    pub refused: bool,
}

/// One usage event to apply: where it was read, when it was logged.
#[derive(Debug, Clone)]
pub struct Positioned<'a> {
    pub position: i64,
    pub logged_at_ms: i64,
    pub event: &'a UsageEvent,
}

#[derive(Debug, Default)]
struct Part {
    epoch: i64,
    /// The last position applied in memory.
    position: i64,
    /// The fingerprint of the message at `position`, where the log has them
    /// (see [`PartitionCheckpoint::mark`]).
    mark: Option<i64>,
    /// Whether the first message read since the claim was checked against
    /// the checkpoint (see [`LogPoint`]).
    checked: bool,
    /// Why the partition is not metered (its log is not the one its
    /// checkpoint was taken from): logged, and counted by a gauge.
    refused: Option<String>,
    committed: PartitionCheckpoint,
    counted_since: u64,
    orgs: HashSet<OrgId>,
    /// Orgs of this partition with holds placed here (usage or not yet).
    hold_orgs: HashSet<OrgId>,
    /// The holds stored for the partition are loaded: until then no hold is
    /// placed on it (it would be judged without the previous owner's).
    holds_ready: bool,
    /// Changes taken from the orgs, not yet committed.
    pending: HashMap<OrgId, MeterChanges>,
    dead_letters: Vec<DeadLetter>,
    /// The checkpoints attempted on `committed` whose outcome is unknown
    /// (a commit may still land), oldest first. Each carried every layer
    /// before its own; at most one of them commits (each writes only on
    /// top of `committed`), and the stored number says which.
    uncertain: Vec<Attempt>,
    /// The highest checkpoint number attempted: every attempt has its own.
    last_number: i64,
}

/// One checkpoint attempt of unknown outcome: its number and what it added
/// to the attempts before it.
#[derive(Debug)]
struct Attempt {
    /// The ownership it was made under.
    epoch: i64,
    at: PartitionCheckpoint,
    orgs: HashMap<OrgId, MeterChanges>,
    dead_letters: Vec<DeadLetter>,
}

/// Folds `later` into `into`: counters take the later state, the rest
/// accumulates (see [`MeterChanges::merge`]).
fn merge_orgs(into: &mut HashMap<OrgId, MeterChanges>, later: HashMap<OrgId, MeterChanges>) {
    for (org_id, ch) in later {
        match into.get_mut(&org_id) {
            Some(c) => c.merge(ch),
            None => {
                let _ = into.insert(org_id, ch);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Parts {
    by_id: BTreeMap<i32, Part>,
    /// The partition each metered org belongs to.
    org_part: HashMap<OrgId, i32>,
}

#[derive(Debug)]
pub struct Meter {
    db: Db,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    opts: MeterOptions,
    write: tokio::sync::Mutex<()>,
    /// Checkpoints begun, numbered from 1 (under `write`), and the number
    /// of the last one that ended without an error for any owned partition:
    /// a flush that arrived before such a checkpoint began needs no other
    /// (see `flush`).
    checkpoints_begun: AtomicU64,
    checkpoint_done: AtomicU64,
    parts: parking_lot::Mutex<Parts>,
    ready: AtomicBool,
    poisoned: AtomicBool,
    failed: Notify,
    publisher: OnceLock<Arc<dyn StatePublisher>>,
    /// The embedded mode's hold journal: holds that usage settles are
    /// recorded there as it is applied.
    hold_journal: OnceLock<Arc<crate::holds::HoldJournal>>,
    health: StoreHealth,
    log_tail_unknown: AtomicBool,
    /// Orgs with an entity append whose outcome is unknown (it failed, and
    /// reading the log back failed too).
    appends_unknown: parking_lot::Mutex<HashSet<OrgId>>,
    /// The distributed mode keeps live holds in SQL, per partition: a claim
    /// loads them, a release forgets them here.
    holds_in_sql: AtomicBool,
    /// Where this process answers, for hold requests other processes
    /// forward to the owner of a partition.
    advertised_url: OnceLock<String>,
}

impl Meter {
    pub fn new(
        db: Db,
        registry: Arc<Registry>,
        clock: Arc<dyn Clock>,
        opts: MeterOptions,
    ) -> Meter {
        Meter {
            db,
            registry,
            clock,
            opts,
            write: tokio::sync::Mutex::new(()),
            checkpoints_begun: AtomicU64::new(0),
            checkpoint_done: AtomicU64::new(0),
            parts: parking_lot::Mutex::new(Parts::default()),
            ready: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            failed: Notify::new(),
            publisher: OnceLock::new(),
            hold_journal: OnceLock::new(),
            health: StoreHealth::new(),
            log_tail_unknown: AtomicBool::new(false),
            appends_unknown: parking_lot::Mutex::default(),
            holds_in_sql: AtomicBool::new(false),
            advertised_url: OnceLock::new(),
        }
    }

    /// Whether the store can write; shared by every write path.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    pub fn options(&self) -> &MeterOptions {
        &self.opts
    }

    /// Sends every committed checkpoint's counters to `p` from now on.
    pub fn set_publisher(&self, p: Arc<dyn StatePublisher>) {
        let _ = self.publisher.set(p);
    }

    /// The embedded mode: record the holds usage settles in `journal`.
    pub fn set_hold_journal(&self, journal: Arc<crate::holds::HoldJournal>) {
        let _ = self.hold_journal.set(journal);
    }

    /// Serializes with checkpoints; see the module docs.
    pub async fn write_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.poisoned.load(Ordering::SeqCst)
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Stops the meter for good: memory ran ahead of the log. Nothing is
    /// checkpointed any more; the process must restart and recover.
    pub fn poison(&self, why: &str) {
        tracing::error!(why, "the meter stops; restart to recover from the log");
        self.poisoned.store(true, Ordering::SeqCst);
        self.set_ready(false);
        self.failed.notify_waiters();
    }

    /// Resolves when the meter stopped for good (see [`Meter::poison`]).
    pub async fn failed(&self) {
        loop {
            let notified = self.failed.notified();
            if self.is_poisoned() {
                return;
            }
            notified.await;
        }
    }

    /// The orgs this process meters.
    pub fn metered_orgs(&self) -> Vec<OrgId> {
        self.parts.lock().org_part.keys().cloned().collect()
    }

    /// Whether this process meters `org`.
    pub fn meters(&self, org: &OrgId) -> bool {
        self.parts.lock().org_part.contains_key(org)
    }

    /// The partitions this process meters.
    pub fn owned_partitions(&self) -> Vec<i32> {
        self.parts.lock().by_id.keys().copied().collect()
    }

    /// The position of partition `p`'s last committed checkpoint.
    pub fn committed_position(&self, p: i32) -> Option<i64> {
        self.parts
            .lock()
            .by_id
            .get(&p)
            .map(|part| part.committed.position)
    }

    /// The last position of partition `p` applied in memory.
    pub fn position(&self, p: i32) -> Option<i64> {
        self.parts.lock().by_id.get(&p).map(|part| part.position)
    }

    /// Where owned partition `p` stands in its log.
    pub fn log_point(&self, p: i32) -> Option<LogPoint> {
        self.parts.lock().by_id.get(&p).map(|part| LogPoint {
            position: part.position,
            mark: part.mark,
            checked: part.checked,
            refused: part.refused.is_some(),
        })
    }

    /// The first message read of partition `p` since its claim was checked
    /// against the checkpoint and found to follow it.
    pub fn log_checked(&self, p: i32) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p) {
            part.checked = true;
        }
    }

    /// Records the fingerprint of the message at `position`, the last one
    /// of partition `p` applied (or kept as a dead letter). Under the write
    /// lock, with the batch that moved the position there: a checkpoint
    /// never pairs a position with another message's mark.
    pub fn mark(&self, p: i32, position: i64, mark: i64) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p)
            && part.position == position
        {
            part.mark = Some(mark);
        }
    }

    /// Stops metering partition `p`: its log is not the one its checkpoint
    /// was taken from. Nothing more of it is applied while this process owns
    /// it; a new claim (after a rebalance, or a restart) checks again.
    pub fn refuse(&self, p: i32, why: String) {
        let mut parts = self.parts.lock();
        let Some(part) = parts.by_id.get_mut(&p) else {
            return;
        };
        tracing::error!(
            partition = p,
            why,
            "usage partition refused: none of it is metered"
        );
        part.refused = Some(why);
        let refused = parts.by_id.values().filter(|x| x.refused.is_some()).count();
        metrics::gauge!(m::PARTITIONS_REFUSED).set(refused as f64);
    }

    /// Takes partition `p` of usage log `log` over: fences out its previous
    /// owner, loads its checkpoint into its orgs, and returns the checkpoint
    /// (its position is -1 when none): the log is to be read from the next
    /// one. Refused when the partition's checkpoint belongs to another log
    /// ([`tally_store::Error::OtherLog`]).
    pub async fn claim(&self, p: i32, log: &str) -> Result<PartitionCheckpoint> {
        let started = Instant::now();
        let now = self.clock.now_ms();
        let claim = self.db.claim_partition(i64::from(p), log, now).await?;
        let options = tally_store::recount::options_text(&self.registry.meter_config());
        self.db.note_meter_options(&options, now).await?;
        // Every org the checkpoint names is restored onto its directory as
        // the log has it now: an org or subject created on another process
        // may not have reached this one yet, and a meter restored without
        // it would start the month (and the dedupe window) from zero.
        let mut caught_up = 0usize;
        for (org_id, seq) in self.db.last_seqs_of_partition(i64::from(p)).await? {
            let folded = self.registry.org(&org_id).map_or(0, |c| c.read().dir.seq);
            if folded < seq {
                let Ok(id) = OrgId::new(&org_id) else {
                    tracing::warn!(org = %org_id, "checkpoint names an org id that is not valid");
                    continue;
                };
                match crate::commands::catch_up(&self.db, &self.registry, &id).await {
                    Ok(()) => caught_up += 1,
                    // The claim is retried while the database is away.
                    Err(e) if e.store_unavailable().is_some() => return Err(e),
                    // One org's broken log must not keep the partition's
                    // other orgs from being metered.
                    Err(e) => {
                        tracing::error!(org = %org_id, error = %e, "catching up an org of the claimed partition failed")
                    }
                }
            }
        }
        let saved = self
            .db
            .load_meters(i64::from(p), self.opts.window_ms, Month::from_unix_ms(now))
            .await?;
        let (position, orgs) = self.install(p, claim.epoch, claim.checkpoint, saved);
        debug_assert_eq!(position, claim.checkpoint.position);
        if self.holds_in_sql.load(Ordering::Relaxed) {
            if let Some(url) = self.advertised_url.get() {
                self.db
                    .set_owner_url(i64::from(p), claim.epoch, url)
                    .await?;
            }
            self.load_holds(p, claim.epoch, now).await?;
        }
        tracing::info!(
            partition = p,
            epoch = claim.epoch,
            position,
            orgs,
            caught_up,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition claimed"
        );
        Ok(claim.checkpoint)
    }

    /// Makes `p` an owned partition at `checkpoint` with the `saved` meters
    /// of its orgs. Returns the position and how many orgs the checkpoint
    /// named.
    fn install(
        &self,
        p: i32,
        epoch: i64,
        checkpoint: PartitionCheckpoint,
        saved: HashMap<String, tally_core::org::SavedMeter>,
    ) -> (i64, usize) {
        let mut parts = self.parts.lock();
        release_locked(&mut parts, &self.registry, p);
        let mut part = Part {
            epoch,
            position: checkpoint.position,
            mark: checkpoint.mark,
            committed: checkpoint,
            last_number: checkpoint.number,
            ..Part::default()
        };
        let orgs = saved.len();
        for (org_id, saved) in saved {
            let Some(cell) = self.registry.org(&org_id) else {
                tracing::warn!(org = %org_id, "checkpoint names an org the entity log does not have");
                continue;
            };
            let org_id = cell.read().dir.id.clone();
            let mut org = cell.write();
            org.reset_meter();
            org.meter.owned = true;
            for c in org.restore(saved) {
                tracing::warn!(org = %org_id, kind = c.kind.as_str(), id = %c.id, "checkpoint names an unknown subject");
            }
            // A limit may have changed after the checkpoint.
            org.reconcile();
            drop(org);
            let _ = parts.org_part.insert(org_id.clone(), p);
            let _ = part.orgs.insert(org_id);
        }
        let position = part.position;
        let _ = parts.by_id.insert(p, part);
        metrics::gauge!(m::PARTITIONS_OWNED).set(parts.by_id.len() as f64);
        (position, orgs)
    }

    /// Where this process answers (see `advertised_url`).
    pub fn set_advertised_url(&self, url: String) {
        let _ = self.advertised_url.set(url);
    }

    pub fn advertised_url(&self) -> Option<&str> {
        self.advertised_url.get().map(String::as_str)
    }

    /// Keep live holds in SQL (the distributed mode): see `holds_in_sql`.
    pub fn keep_holds_in_sql(&self) {
        self.holds_in_sql.store(true, Ordering::Relaxed);
    }

    /// The epoch under which this process meters partition `p` and places
    /// its holds, if it does (and has loaded the holds stored for it).
    pub fn hold_epoch(&self, p: i32) -> Option<i64> {
        self.parts
            .lock()
            .by_id
            .get(&p)
            .filter(|part| part.holds_ready)
            .map(|part| part.epoch)
    }

    /// Notes that `org` has holds placed here on partition `p` (forgotten
    /// with the partition). False when `p` is not owned (any more) under
    /// `epoch`.
    pub fn note_hold_org(&self, p: i32, epoch: i64, org: &OrgId) -> bool {
        match self.parts.lock().by_id.get_mut(&p) {
            Some(part) if part.epoch == epoch => {
                if !part.hold_orgs.contains(org) {
                    let _ = part.hold_orgs.insert(org.clone());
                }
                true
            }
            _ => false,
        }
    }

    /// The holds stored for partition `p`, into its orgs: the live holds as
    /// of the checkpoint, less those expired or counted since (their rows
    /// are deleted); the replay after the checkpoint settles the rest. The
    /// orgs the rows name are caught up with their logs first (an org, user
    /// or key created on the previous owner may not have reached this
    /// process); a row that still names something unknown is kept, not
    /// placed, and logged. Holds are placed on `p` only after this.
    async fn load_holds(&self, p: i32, epoch: i64, now: i64) -> Result<()> {
        let stored = self.db.load_holds(i64::from(p)).await?;
        let mut orgs: Vec<&str> = stored.iter().map(|h| h.org_id.as_str()).collect();
        orgs.dedup();
        // Rows come ordered by org id: `dedup` leaves each org once.
        for org in orgs {
            let Ok(id) = OrgId::new(org) else { continue };
            match crate::commands::catch_up(&self.db, &self.registry, &id).await {
                Ok(()) => {}
                // The claim is retried while the database is away.
                Err(e) if e.store_unavailable().is_some() => return Err(e),
                // One org's broken log must not keep the partition's other
                // holds from being loaded; its rows stay, unplaced.
                Err(e) => {
                    tracing::error!(org = %id, error = %e, "catching up an org named by stored holds failed")
                }
            }
        }
        let (mut live, mut unknown) = (0usize, 0usize);
        let mut dropped: Vec<(String, String)> = Vec::new();
        let mut placed: Vec<OrgId> = Vec::new();
        for h in stored {
            let Some(cell) = self.registry.org(&h.org_id) else {
                unknown += 1;
                continue;
            };
            let mut org = cell.write();
            let times = (h.amount_micros, h.placed_at_ms, h.expires_at_ms);
            let groups = h.group_ids.iter().map(String::as_str);
            let Some(hold) = crate::holds::resolve(&org, &h.user_id, &h.key_id, groups, times)
            else {
                unknown += 1;
                continue;
            };
            let counted = org
                .meter
                .dedupe
                .contains(tally_core::dedupe::hash_request_id(&h.request_id));
            if hold.expires_at_ms <= now {
                org.meter
                    .holds
                    .remember_expired(&h.request_id, hold.expires_at_ms);
                dropped.push((h.org_id, h.request_id));
            } else if counted {
                dropped.push((h.org_id, h.request_id));
            } else {
                org.meter.holds.insert(&h.request_id, hold);
                placed.push(org.dir.id.clone());
                live += 1;
            }
        }
        if !dropped.is_empty() {
            self.db.release_holds(i64::from(p), epoch, &dropped).await?;
        }
        if unknown > 0 {
            tracing::warn!(
                partition = p,
                rows = unknown,
                "hold rows name an org, user, key or group this process does not know; kept, not placed"
            );
        }
        let mut parts = self.parts.lock();
        if let Some(part) = parts.by_id.get_mut(&p).filter(|part| part.epoch == epoch) {
            part.hold_orgs.extend(placed);
            part.holds_ready = true;
        }
        tracing::info!(partition = p, live, dropped = dropped.len(), "holds loaded");
        Ok(())
    }

    /// Gives partition `p` up (after a last checkpoint, when the caller could
    /// write one): its orgs turn into mirrors.
    pub fn release(&self, p: i32) {
        let mut parts = self.parts.lock();
        release_locked(&mut parts, &self.registry, p);
    }

    /// Whether each event names an org, user and key that exist (and an org
    /// of partition `p`): the part of applying usage that a later replay
    /// could judge differently, since entities never stop existing but may
    /// start. The embedded log keeps unattributable usage out of its
    /// records. One lookup and read lock per run of an org's events.
    pub fn attribution(&self, p: i32, events: &[&UsageEvent]) -> Vec<Result<(), Rejection>> {
        let mut out = Vec::with_capacity(events.len());
        // Lock order as in `apply`: parts, then an org.
        let parts = self.parts.lock();
        let org_part = &parts.org_part;
        for run in events.chunk_by(|a, b| a.org_id == b.org_id) {
            let org_id = &run[0].org_id;
            if org_part.get(org_id).is_some_and(|q| *q != p) {
                out.extend(run.iter().map(|_| Err(Rejection::WrongPartition)));
                continue;
            }
            let Some(cell) = self.registry.org(org_id) else {
                out.extend(run.iter().map(|_| Err(Rejection::UnknownOrg)));
                continue;
            };
            let org = cell.read();
            out.extend(run.iter().map(|e| {
                if !org.dir.users.contains_key(&e.user_id) {
                    return Err(Rejection::UnknownUser);
                }
                match &e.api_key_id {
                    Some(k) if !org.dir.keys.contains_key(k) => Err(Rejection::UnknownKey),
                    _ => Ok(()),
                }
            }));
        }
        out
    }

    /// Whether the usage log may hold records beyond the position applied in
    /// memory (an append failed, and may have committed all the same).
    pub fn log_tail_unknown(&self) -> bool {
        self.log_tail_unknown.load(Ordering::SeqCst)
    }

    pub fn set_log_tail_unknown(&self, unknown: bool) {
        self.log_tail_unknown.store(unknown, Ordering::SeqCst);
    }

    /// Records that an entity append of `org_id` may have committed without
    /// being folded: the org's log is read before the next command, the
    /// next usage batch, or when the store fault ends.
    pub fn append_unknown(&self, org_id: &OrgId) {
        let _ = self.appends_unknown.lock().insert(org_id.clone());
    }

    /// Folds whatever the logs of orgs with an unknown append hold beyond
    /// memory. Under the write lock: no usage is counted between an event's
    /// timestamp and its fold.
    pub async fn resolve_unknown_appends(&self) -> Result<()> {
        let orgs: Vec<OrgId> = self.appends_unknown.lock().iter().cloned().collect();
        for org_id in orgs {
            crate::commands::catch_up(&self.db, &self.registry, &org_id).await?;
            tracing::info!(org = %org_id, "caught up an org whose append had an unknown outcome");
            let _ = self.appends_unknown.lock().remove(&org_id);
        }
        Ok(())
    }

    /// Applies events read from partition `p`, in order: one outcome per
    /// event, or `None` when this process does not own `p` (any more), and
    /// nothing moved.
    pub fn apply(&self, p: i32, events: &[Positioned<'_>]) -> Option<Vec<UsageOutcome>> {
        let started = Instant::now();
        let mut out = Vec::with_capacity(events.len());
        let mut parts = self.parts.lock();
        let Parts { by_id, org_part } = &mut *parts;
        let part = by_id.get_mut(&p)?;
        let mut seen = 0u64;
        let mut i = 0;
        while i < events.len() {
            // Consecutive events of one org share one lock.
            let org_id = &events[i].event.org_id;
            let run = events[i..]
                .iter()
                .take_while(|e| &e.event.org_id == org_id)
                .count();
            let batch = &events[i..i + run];
            i += run;
            let outcome = match org_part.get(org_id) {
                Some(q) if *q != p => Some(UsageOutcome::Rejected(Rejection::WrongPartition)),
                _ => match self.registry.org(org_id) {
                    None => Some(UsageOutcome::Rejected(Rejection::UnknownOrg)),
                    Some(_) => None,
                },
            };
            if let Some(o) = outcome {
                out.extend(std::iter::repeat_n(o, run));
                part.position = batch[run - 1].position;
                part.mark = None;
                continue;
            }
            let cell = self.registry.org(org_id).expect("checked above");
            let mut org = cell.write();
            if !part.orgs.contains(org_id) {
                // First usage of this org here: it belongs to this partition
                // from now on. Whatever it mirrored before is not ours.
                org.reset_meter();
                org.meter.owned = true;
                let _ = org_part.insert(org_id.clone(), p);
                let _ = part.orgs.insert(org_id.clone());
            }
            let mut spent: u64 = 0;
            seen += run as u64;
            for e in batch {
                let o = org.apply_usage(e.event, e.logged_at_ms);
                if o == UsageOutcome::Applied {
                    spent += e.event.cost_micros.unsigned_abs();
                }
                out.push(o);
                part.position = e.position;
                part.mark = None;
            }
            if let Some(journal) = self.hold_journal.get() {
                let settled = org.meter.holds.take_gone();
                if !settled.is_empty() {
                    journal.settled(org_id.as_str(), &settled);
                }
            }
            drop(org);
            if spent > 0 {
                metrics::counter!(m::ORG_SPEND_TOTAL, "org" => org_id.to_string()).increment(spent);
            }
        }
        // Every event of an owned org, counted or not, is replayed from the
        // log after a crash: they all bring the next checkpoint nearer.
        part.counted_since += seen;
        drop(parts);
        metrics::histogram!(m::APPLY_SECONDS).record(started.elapsed().as_secs_f64());
        Some(out)
    }

    /// Moves partition `p`'s position without applying anything (the
    /// embedded log learns the position of a batch after appending it).
    pub fn set_position(&self, p: i32, position: i64) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p) {
            part.position = position;
            part.mark = None;
        }
    }

    /// Keeps a dead letter for the next checkpoint of partition `p`. The
    /// position moves forward only: a batch's dead letters are kept after
    /// its good messages, which may come later in the log.
    pub fn dead_letter(&self, p: i32, letter: DeadLetter) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p) {
            if letter.position > part.position {
                part.position = letter.position;
                part.mark = None;
            }
            part.dead_letters.push(letter);
        }
    }

    /// Moves partition `p`'s position to `position`: the `n` messages up to
    /// there that were not counted here are handled (forwarded to their
    /// org's partition). Called under the write lock usage takes, as
    /// [`Meter::apply`] is.
    pub fn passed(&self, p: i32, position: i64, n: u64) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p)
            && position > part.position
        {
            part.position = position;
            part.mark = None;
            part.counted_since += n;
        }
    }

    /// Whether partition `p` counted enough since its last checkpoint to
    /// want another now.
    pub fn wants_checkpoint(&self, p: i32) -> bool {
        self.parts
            .lock()
            .by_id
            .get(&p)
            .is_some_and(|part| part.counted_since >= self.opts.checkpoint_events_max)
    }

    /// Mirrors a counter published by another process (ignored for orgs this
    /// process meters).
    pub fn mirror(&self, state: &PublishedState) {
        let parts = self.parts.lock();
        if parts.org_part.contains_key(&state.org_id) {
            return;
        }
        if let Some(cell) = self.registry.org(&state.org_id) {
            cell.write()
                .mirror(state.kind, &state.id, state.month, state.counter);
        }
    }

    /// Records that a new month lifted last month's cutoffs, in every org
    /// this process meters.
    pub fn new_month(&self) {
        let now = self.clock.now_ms();
        let parts = self.parts.lock();
        for org_id in parts.org_part.keys() {
            if let Some(cell) = self.registry.org(org_id) {
                cell.write().new_month(now);
            }
        }
    }

    /// Writes a checkpoint of every owned partition that changed; returns
    /// how many it wrote. The write runs in a spawned task.
    pub async fn checkpoint(self: &Arc<Self>) -> Result<usize> {
        let meter = Arc::clone(self);
        tokio::spawn(async move {
            let _w = meter.write.lock().await;
            meter.checkpoint_locked().await
        })
        .await
        .map_err(|e| Error::Unavailable(format!("checkpoint task failed: {e}")))?
    }

    /// [`Meter::checkpoint`] for callers that hold the write lock already.
    pub async fn checkpoint_locked(&self) -> Result<usize> {
        if self.is_poisoned() {
            return Err(Error::Unavailable(
                "the meter stopped; restart to recover".into(),
            ));
        }
        let number = self.checkpoints_begun.fetch_add(1, Ordering::SeqCst) + 1;
        let written = self.checkpoint_partitions(self.owned_partitions()).await?;
        let _ = self.checkpoint_done.fetch_max(number, Ordering::SeqCst);
        Ok(written)
    }

    /// Checkpoints the partition that meters `org` only (none when this
    /// process does not meter it), for callers that hold the write lock:
    /// what a change of the org's limits needs before it is folded. It
    /// does not count as a checkpoint of everything for
    /// [`Meter::flush`].
    pub async fn checkpoint_org_locked(&self, org: &OrgId) -> Result<usize> {
        if self.is_poisoned() {
            return Err(Error::Unavailable(
                "the meter stopped; restart to recover".into(),
            ));
        }
        let part = self.parts.lock().org_part.get(org).copied();
        match part {
            Some(p) => self.checkpoint_partitions(vec![p]).await,
            None => Ok(0),
        }
    }

    /// Writes a checkpoint of each of `partitions` that changed; the first
    /// failure is returned once all were tried.
    async fn checkpoint_partitions(&self, partitions: Vec<i32>) -> Result<usize> {
        // Embedded: the holds usage settled must be on the journal's disk
        // before that usage leaves the log's tail. A restart settles the
        // holds the journal has live by the tail's usage and the dedupe
        // window, which may have forgotten older ids; a settle line the
        // disk refused is made good by compacting the journal here.
        if let Some(journal) = self.hold_journal.get()
            && let Err(e) = journal.upkeep(&self.registry)
        {
            metrics::counter!(m::CHECKPOINT_FAILURES).increment(1);
            tracing::warn!(error = %e, "the hold journal cannot be written: checkpoint postponed");
            return Err(e);
        }
        let mut written = 0;
        let mut first_error = None;
        for p in partitions {
            match self.checkpoint_partition(p).await {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(e) => {
                    metrics::counter!(m::CHECKPOINT_FAILURES).increment(1);
                    // A storage fault is logged once, by the health.
                    if !self
                        .health
                        .write_failed("checkpoint", &e, self.clock.now_ms())
                    {
                        tracing::warn!(partition = p, error = %e, "checkpoint failed; retrying with the next");
                    }
                    let _ = first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                if written > 0 {
                    self.wrote();
                }
                Ok(written)
            }
        }
    }

    /// Writes the checkpoint of partition `p` if anything changed; whether
    /// it wrote one. An attempt fenced by an earlier one of its ownership
    /// that committed late is written again on top of it: when this answers
    /// success, everything it carried is saved (a limit command relies on
    /// that before it folds its change).
    async fn checkpoint_partition(&self, p: i32) -> Result<bool> {
        // Each fence is an attempt that landed late or a claim by another
        // process (after which nothing is ours to write): a few suffice.
        const ATTEMPTS: usize = 4;
        for _ in 0..ATTEMPTS {
            if let Some(written) = self.try_checkpoint_partition(p).await? {
                return Ok(written);
            }
        }
        Err(Error::Unavailable(format!(
            "partition {p}: the checkpoint was fenced {ATTEMPTS} times in a row"
        )))
    }

    /// One attempt of [`Meter::checkpoint_partition`]; `None` when it was
    /// fenced (and the uncertain attempts resolved): to be made again.
    async fn try_checkpoint_partition(&self, p: i32) -> Result<Option<bool>> {
        self.resolve_uncertain(p).await?;
        let (epoch, base, at, layer, content, letters) = {
            let mut parts = self.parts.lock();
            let Some(part) = parts.by_id.get_mut(&p) else {
                return Ok(Some(false));
            };
            for org_id in &part.orgs {
                let Some(cell) = self.registry.org(org_id) else {
                    continue;
                };
                if !cell.read().has_changes() {
                    continue;
                }
                let changes = cell.write().take_changes();
                match part.pending.get_mut(org_id) {
                    Some(pending) => pending.merge(changes),
                    None => {
                        let _ = part.pending.insert(org_id.clone(), changes);
                    }
                }
            }
            if part.position == part.committed.position
                && part.mark == part.committed.mark
                && part.pending.is_empty()
                && part.dead_letters.is_empty()
                && part.uncertain.is_empty()
            {
                return Ok(Some(false));
            }
            part.last_number = part.last_number.max(part.committed.number) + 1;
            let at = PartitionCheckpoint {
                position: part.position,
                number: part.last_number,
                mark: part.mark,
            };
            let layer = Attempt {
                epoch: part.epoch,
                at,
                orgs: std::mem::take(&mut part.pending),
                dead_letters: std::mem::take(&mut part.dead_letters),
            };
            // An attempt carries what the uncertain ones before it carried:
            // whichever of them commits, if any, this one is fenced.
            let mut content: HashMap<OrgId, MeterChanges> = HashMap::new();
            let mut letters = Vec::new();
            for a in part.uncertain.iter().chain(std::iter::once(&layer)) {
                merge_orgs(&mut content, a.orgs.clone());
                letters.extend(a.dead_letters.iter().cloned());
            }
            let content: Vec<(OrgId, MeterChanges)> = content.into_iter().collect();
            (
                part.epoch,
                part.committed.number,
                at,
                layer,
                content,
                letters,
            )
        };
        let started = Instant::now();
        let result = self
            .db
            .write_checkpoint_after(
                i64::from(p),
                epoch,
                base,
                at,
                &content,
                &letters,
                self.clock.now_ms(),
            )
            .await;
        match result {
            Ok(()) => {
                metrics::histogram!(m::CHECKPOINT_SECONDS).record(started.elapsed().as_secs_f64());
                tracing::debug!(
                    partition = p,
                    position = at.position,
                    number = at.number,
                    orgs = content.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "checkpoint written"
                );
                // The uncertain attempts were on the same base: none of them
                // can commit any more. (Unless the partition was claimed
                // anew meanwhile: then this ownership's state is gone.)
                {
                    let mut parts = self.parts.lock();
                    match parts.by_id.get_mut(&p) {
                        Some(part) if part.epoch == epoch => part.uncertain.clear(),
                        _ => return Ok(Some(true)),
                    }
                }
                self.committed(p, epoch, at, &content);
                Ok(Some(true))
            }
            Err(tally_store::Error::Fenced { .. }) => {
                // Either another process claimed the partition (given up
                // here), or an uncertain attempt committed after all: what
                // this one carried beyond it is pending again.
                self.push_uncertain(p, layer);
                self.resolve_uncertain(p).await?;
                Ok(None)
            }
            Err(e) => {
                self.push_uncertain(p, layer);
                Err(e.into())
            }
        }
    }

    fn push_uncertain(&self, p: i32, attempt: Attempt) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p)
            && part.epoch == attempt.epoch
        {
            part.uncertain.push(attempt);
        }
    }

    /// Learns whether one of the uncertain attempts committed: then it and
    /// the ones before it count as committed, and what later ones added goes
    /// back in front of the pending changes. While none has, they stay
    /// uncertain (one may still land) and the next attempt carries them. If
    /// the partition has a newer owner, it is given up.
    async fn resolve_uncertain(&self, p: i32) -> Result<()> {
        let epoch = {
            let parts = self.parts.lock();
            match parts.by_id.get(&p) {
                Some(part) if !part.uncertain.is_empty() => part.epoch,
                _ => return Ok(()),
            }
        };
        let stored = self.db.load_checkpoint(i64::from(p)).await?;
        let mut parts = self.parts.lock();
        let Some(part) = parts.by_id.get_mut(&p) else {
            return Ok(());
        };
        if part.epoch != epoch {
            // Claimed anew while the checkpoint was read: nothing of the
            // attempts resolved belongs to this ownership.
            return Ok(());
        }
        let Some(s) = stored else {
            return Ok(());
        };
        if s.epoch != epoch {
            tracing::warn!(
                partition = p,
                "partition claimed by another process: giving it up"
            );
            release_locked(&mut parts, &self.registry, p);
            return Ok(());
        }
        let number = s.checkpoint.number;
        if number == part.committed.number {
            return Ok(());
        }
        let Some(j) = part.uncertain.iter().position(|a| a.at.number == number) else {
            return Err(Error::Corrupt(format!(
                "partition {p}: checkpoint {number} is stored, which this process did not attempt"
            )));
        };
        let mut attempts = std::mem::take(&mut part.uncertain).into_iter();
        let mut landed: HashMap<OrgId, MeterChanges> = HashMap::new();
        let mut at = part.committed;
        for a in attempts.by_ref().take(j + 1) {
            merge_orgs(&mut landed, a.orgs);
            at = a.at;
        }
        let mut back: HashMap<OrgId, MeterChanges> = HashMap::new();
        let mut letters = Vec::new();
        for mut a in attempts {
            merge_orgs(&mut back, a.orgs);
            letters.append(&mut a.dead_letters);
        }
        merge_orgs(&mut back, std::mem::take(&mut part.pending));
        part.pending = back;
        letters.append(&mut part.dead_letters);
        part.dead_letters = letters;
        tracing::info!(
            partition = p,
            number,
            "a checkpoint of unknown outcome had committed"
        );
        drop(parts);
        let landed: Vec<(OrgId, MeterChanges)> = landed.into_iter().collect();
        self.committed(p, epoch, at, &landed);
        Ok(())
    }

    /// Checkpoint `at` of partition `p`, made under `epoch`, committed.
    fn committed(
        &self,
        p: i32,
        epoch: i64,
        at: PartitionCheckpoint,
        orgs: &[(OrgId, MeterChanges)],
    ) {
        if let Some(part) = self.parts.lock().by_id.get_mut(&p)
            && part.epoch == epoch
        {
            part.committed = at;
            part.counted_since = 0;
        }
        let mut states = Vec::new();
        for (org_id, ch) in orgs {
            let other: u64 = ch
                .usage
                .iter()
                .filter(|u| {
                    u.kind == tally_core::ledger::SubjectKind::Org
                        && u.model == tally_core::models::OTHER
                        && u.provider == tally_core::models::OTHER
                })
                .map(|u| u.delta.requests)
                .sum();
            if other > 0 {
                metrics::counter!(m::USAGE_OTHER).increment(other);
            }
            for e in &ch.enforcement {
                let ev = &e.event;
                metrics::counter!(m::ENFORCEMENT_EVENTS, "event" => ev.kind.name(), "kind" => e.kind.as_str())
                    .increment(1);
                match ev.kind {
                    EnforcementKind::ThresholdCrossed { threshold_bps } => tracing::info!(
                        org = %org_id, subject = e.kind.as_str(), id = %e.id, month = %ev.month,
                        threshold_bps, spend_micros = ev.spend_micros, "threshold crossed"
                    ),
                    EnforcementKind::ForecastOverLimit {
                        projected_micros,
                        limit_day,
                    } => tracing::info!(
                        org = %org_id, subject = e.kind.as_str(), id = %e.id, month = %ev.month,
                        spend_micros = ev.spend_micros, projected_micros,
                        limit_micros = ev.limit_micros, limit_day = %limit_day,
                        "projected over its limit"
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
            if self.publisher.get().is_none() || ch.counters.is_empty() {
                continue;
            }
            let Some(cell) = self.registry.org(org_id) else {
                continue;
            };
            let org = cell.read();
            for c in &ch.counters {
                let limit_micros = match c.kind {
                    SubjectKind::User => org
                        .dir
                        .users
                        .get(c.id.as_str())
                        .and_then(|u| u.monthly_limit_micros),
                    SubjectKind::Group => org
                        .dir
                        .groups
                        .get(c.id.as_str())
                        .and_then(|g| g.monthly_limit_micros),
                    SubjectKind::Key => org
                        .dir
                        .keys
                        .get(c.id.as_str())
                        .and_then(|k| k.monthly_limit_micros),
                    SubjectKind::Org => org.dir.monthly_limit_micros,
                };
                states.push(PublishedState {
                    org_id: org_id.clone(),
                    kind: c.kind,
                    id: c.id.clone(),
                    month: c.month,
                    counter: c.counter,
                    limit_micros,
                });
            }
        }
        if let Some(p) = self.publisher.get()
            && !states.is_empty()
        {
            p.publish(states);
        }
    }

    /// Makes every event counted before this call visible to SQL readers:
    /// checkpoints when anything is unsaved. Admin reads call it for
    /// read-your-writes. Calls that arrive together share one checkpoint: a
    /// checkpoint that began after a call arrived took everything counted
    /// before it, so once one has succeeded the call has nothing to wait for
    /// (without this, N concurrent reads during ingest wrote N checkpoints
    /// one after the other under the write lock ingest needs).
    pub async fn flush(self: &Arc<Self>) -> Result<()> {
        let arrived = self.checkpoints_begun.load(Ordering::SeqCst);
        let meter = Arc::clone(self);
        tokio::spawn(async move {
            let _w = meter.write.lock().await;
            if meter.checkpoint_done.load(Ordering::SeqCst) > arrived {
                return Ok(());
            }
            meter.checkpoint_locked().await.map(|_| ())
        })
        .await
        .map_err(|e| Error::Unavailable(format!("checkpoint task failed: {e}")))?
    }

    /// [`Meter::flush`] for an admin read, which answers whatever the store
    /// can write: during a storage fault, or while the hold journal cannot
    /// be written (which postpones checkpoints), it skips the checkpoint and
    /// the read shows spend as of the last one that committed.
    pub async fn flush_for_read(self: &Arc<Self>) -> Result<()> {
        if self.health.fault().is_some() {
            return Ok(());
        }
        match self.flush().await {
            Err(e) if e.store_unavailable().is_some() => Ok(()),
            Err(Error::HoldJournal(_)) => Ok(()),
            other => other,
        }
    }

    /// Checkpoints begun so far (each call of [`Meter::checkpoint`] or
    /// [`Meter::checkpoint_locked`], whether it wrote anything or not).
    pub fn checkpoints_begun(&self) -> u64 {
        self.checkpoints_begun.load(Ordering::SeqCst)
    }

    /// Periodic work until `stop` resolves: checkpoints, and the new-month
    /// lift.
    pub async fn run(self: &Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let period = self.opts.checkpoint_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            if self.is_poisoned() {
                return;
            }
            // Failures are logged and counted; the next tick retries.
            let _ = self.tick().await;
        }
    }

    /// One round of [`Meter::run`]: begins the month the clock is in,
    /// checkpoints, and during a storage fault probes the store. Answers
    /// the checkpoint's result.
    pub async fn tick(self: &Arc<Self>) -> Result<usize> {
        {
            // Under the lock commands and usage take: a limit command
            // checkpoints, then folds its change, and the month must not
            // begin in between (a restart would judge the change in the
            // month the checkpoint saw, not the one live folding did).
            let _w = self.write.lock().await;
            self.new_month();
        }
        let checkpointed = self.checkpoint().await;
        // A checkpoint that fails for the store's fault keeps it: a probe
        // row may fit where the checkpoint does not.
        let blocked = matches!(&checkpointed, Err(e) if e.store_unavailable().is_some());
        if self.health.fault().is_some() && !blocked {
            self.probe().await;
        }
        checkpointed
    }

    /// During a storage fault: whether a write commits again.
    /// The fault ends only once the orgs whose appends had an unknown
    /// outcome are caught up, so that nothing reads them stale after it.
    async fn probe(&self) {
        let now = self.clock.now_ms();
        let probed = match self.db.probe_write(now).await {
            Ok(()) => {
                let _w = self.write.lock().await;
                self.resolve_unknown_appends().await
            }
            Err(e) => Err(e.into()),
        };
        match probed {
            Ok(()) => self.wrote(),
            Err(e) => {
                if !self.health.write_failed("probe", &e, now) {
                    tracing::warn!(error = %e, "probing the store failed");
                }
            }
        }
    }

    /// A write committed: the storage fault, if any, is over, unless an
    /// org's append still has an unknown outcome (see [`Meter::probe`]).
    pub fn wrote(&self) {
        if self.appends_unknown.lock().is_empty() {
            self.health.write_succeeded(self.clock.now_ms());
        }
    }

    /// The last checkpoint, for shutdown: writes what is unsaved.
    pub async fn shutdown(self: &Arc<Self>) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Unavailable(
                "the meter stopped; not checkpointing".into(),
            ));
        }
        let _ = self.checkpoint().await?;
        Ok(())
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

/// Drops partition `p`: its orgs become mirrors, unsaved changes go (the next
/// owner replays them from the log).
fn release_locked(parts: &mut Parts, registry: &Registry, p: i32) {
    let Some(part) = parts.by_id.remove(&p) else {
        return;
    };
    metrics::gauge!(m::PARTITIONS_OWNED).set(parts.by_id.len() as f64);
    if part.refused.is_some() {
        let refused = parts.by_id.values().filter(|x| x.refused.is_some()).count();
        metrics::gauge!(m::PARTITIONS_REFUSED).set(refused as f64);
    }
    for org_id in &part.orgs {
        let _ = parts.org_part.remove(org_id);
        if let Some(cell) = registry.org(org_id) {
            let mut org = cell.write();
            org.meter.owned = false;
            // Unsaved changes and pending events belong to the next owner now.
            let _ = org.take_changes();
            org.forget_counted();
        }
    }
    // The holds too: the next owner loads them from SQL.
    for org_id in &part.hold_orgs {
        if let Some(cell) = registry.org(org_id) {
            cell.write().meter.holds.clear();
        }
    }
    tracing::info!(partition = p, orgs = part.orgs.len(), "partition released");
}
