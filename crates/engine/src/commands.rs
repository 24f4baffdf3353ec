//! The command path: validate against memory, append to the log with the
//! read models in one transaction, then fold into memory.
//!
//! Nothing is applied in memory before it is committed, so a failed append
//! leaves no trace. Commit and fold run in one spawned task, under the
//! meter's write lock: a client hanging up cannot leave a committed event
//! unfolded, and no usage is counted between the event's timestamp and its
//! fold (which would make a replay judge group membership differently). When
//! another process appended to the org first (distributed mode), the log is
//! read back into memory and the command is validated again.
//!
//! During a storage fault ([`crate::health`]) commands are refused before
//! they are validated. An append that failed for a fault of the store may
//! still have committed (PostgreSQL went away between COMMIT and its
//! answer): the org's log is read back, and if it holds this very command's
//! events, the command succeeded after all.

use std::sync::Arc;

use dashmap::DashMap;
use tally_core::entity::{Actor, Command, CommandError, EntityEvent, EventKind, handle_create};
use tally_core::ids::OrgId;
use tally_store::Db;

use crate::clock::Clock;
use crate::meter::Meter;
use crate::metrics as m;
use crate::registry::{Followed, Registry};
use crate::{Error, Result};

/// How often a command is retried after losing a race for the org's log.
const CONFLICT_RETRIES: usize = 3;
/// Events read per round trip when catching up.
const CATCH_UP_PAGE_LEN: u32 = 10_000;

#[derive(Debug)]
pub struct Commands {
    db: Db,
    registry: Arc<Registry>,
    meter: Arc<Meter>,
    clock: Arc<dyn Clock>,
    /// One writer per org at a time; orgs do not wait on each other.
    locks: DashMap<OrgId, Arc<tokio::sync::Mutex<()>>>,
}

impl Commands {
    pub fn new(
        db: Db,
        registry: Arc<Registry>,
        meter: Arc<Meter>,
        clock: Arc<dyn Clock>,
    ) -> Commands {
        Commands {
            db,
            registry,
            meter,
            clock,
            locks: DashMap::new(),
        }
    }

    /// Runs one command for `org_id`; returns the events it wrote (none when
    /// it changed nothing).
    pub async fn execute(
        self: &Arc<Self>,
        org_id: &OrgId,
        actor: Actor,
        cmd: &Command,
    ) -> Result<Vec<EntityEvent>> {
        let this = Arc::clone(self);
        let (org_id, cmd) = (org_id.clone(), cmd.clone());
        let result = tokio::spawn(async move { this.run(&org_id, actor, &cmd).await })
            .await
            .map_err(|e| Error::Unavailable(format!("command task failed: {e}")))?;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Error::Command(CommandError::Invalid(_))) => "invalid",
            Err(Error::Command(CommandError::NotFound { .. }) | Error::UnknownOrg) => "not_found",
            Err(Error::Command(CommandError::Conflict(_))) => "conflict",
            Err(Error::Command(CommandError::Rule(_))) => "rule",
            Err(_) => "error",
        };
        metrics::counter!(m::COMMANDS, "outcome" => outcome).increment(1);
        result
    }

    async fn run(&self, org_id: &OrgId, actor: Actor, cmd: &Command) -> Result<Vec<EntityEvent>> {
        // Refused at once during a storage fault, not after waiting for the
        // locks behind a checkpoint that waits for the database.
        if let Some(fault) = self.meter.health().fault() {
            return Err(Error::StoreFault(fault));
        }
        let lock = Arc::clone(&self.locks.entry(org_id.clone()).or_default());
        let _org = lock.lock().await;
        let mut attempt = 0;
        let mut judged_on_the_log = false;
        loop {
            let _w = self.meter.write_lock().await;
            if let Some(fault) = self.meter.health().fault() {
                return Err(Error::StoreFault(fault));
            }
            self.meter.resolve_unknown_appends().await?;
            match self.try_once(org_id, &actor, cmd).await {
                Err(Error::Store(tally_store::Error::Conflict { .. }))
                    if attempt < CONFLICT_RETRIES =>
                {
                    attempt += 1;
                    drop(_w);
                    self.catch_up(org_id).await?;
                }
                // Refused on what memory holds, which may be behind the log
                // (distributed: another process appended, and the relay has
                // not brought it here yet). Judged again once, on the log,
                // if it holds more.
                Err(e @ (Error::UnknownOrg | Error::Command(_))) if !judged_on_the_log => {
                    if matches!(e, Error::Command(CommandError::Invalid(_))) {
                        return Err(e);
                    }
                    judged_on_the_log = true;
                    drop(_w);
                    let seq = |r: &Registry| r.org(org_id).map_or(0, |c| c.read().dir.seq);
                    let before = seq(&self.registry);
                    // A log that cannot be read leaves the answer memory gave.
                    if let Err(read) = self.catch_up(org_id).await {
                        tracing::debug!(org = %org_id, error = %read, "reading the log of a refused command failed");
                        return Err(e);
                    }
                    if seq(&self.registry) == before {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    async fn try_once(
        &self,
        org_id: &OrgId,
        actor: &Actor,
        cmd: &Command,
    ) -> Result<Vec<EntityEvent>> {
        let at_ms = self.clock.now_ms();
        let (kinds, next_seq) = match self.registry.org(org_id) {
            None => {
                let kinds = handle_create(false, org_id, cmd).map_err(|e| match e {
                    CommandError::NotFound { .. } => Error::UnknownOrg,
                    e => Error::Command(e),
                })?;
                (kinds, 1)
            }
            Some(cell) => {
                let (kinds, next_seq, rejudges) = {
                    let org = cell.read();
                    let kinds = org.dir.handle(cmd)?;
                    let rejudges = kinds.iter().any(|k| org.dir.rejudges(k));
                    (kinds, org.dir.seq + 1, rejudges)
                };
                if rejudges && self.meter.meters(org_id) {
                    // Everything counted so far is judged under the limits
                    // it was counted under: checkpointed before the change,
                    // so a replay applies only usage counted after it. (The
                    // seq stays the one validated against: an event folded
                    // meanwhile makes the append a conflict, and a retry.)
                    let _ = self.meter.checkpoint_org_locked(org_id).await?;
                }
                (kinds, next_seq)
            }
        };
        let mut events: Vec<EntityEvent> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| EntityEvent {
                org_id: org_id.clone(),
                seq: next_seq + i as u64,
                at_ms,
                actor: actor.clone(),
                kind,
            })
            .collect();
        // The log may date them anew (PostgreSQL's clock, see `Db::append`).
        match self.db.append(&mut events).await {
            Ok(()) => {}
            Err(e) => {
                let e = Error::from(e);
                if !self
                    .meter
                    .health()
                    .write_failed("entity_log", &e, self.clock.now_ms())
                {
                    return Err(e);
                }
                return match self.landed(org_id, &events).await {
                    Ok(true) => Ok(events),
                    Ok(false) => Err(e),
                    Err(resolving) => {
                        tracing::warn!(org = %org_id, error = %resolving, "whether a failed append committed is unknown until the log can be read");
                        self.meter.append_unknown(org_id);
                        Err(e)
                    }
                };
            }
        }
        self.registry.apply(&events);
        self.meter.wrote();
        Ok(events)
    }

    /// Whether `events`, whose append failed, are in the org's log after all
    /// (then they are folded, as a successful append's would be). Another
    /// process may have taken their seqs; then they are not.
    async fn landed(&self, org_id: &OrgId, events: &[EntityEvent]) -> Result<bool> {
        let Some(first) = events.first() else {
            return Ok(false);
        };
        let stored = self
            .db
            .org_events(
                org_id,
                first.seq - 1,
                u32::try_from(events.len()).unwrap_or(u32::MAX),
            )
            .await?;
        if stored != events {
            return Ok(false);
        }
        tracing::info!(org = %org_id, seq = first.seq, "a failed append had committed: folding it");
        // The relay may have brought some or all of them already.
        if self.registry.fold_next(events) == Followed::Gap {
            return Err(Error::Corrupt(format!(
                "the entity log of org {org_id} has a gap before seq {}",
                first.seq
            )));
        }
        Ok(true)
    }

    /// What `cmd` would write for `org_id` now, judged on what this process
    /// holds; nothing is written (a dry run).
    pub fn preview(&self, org_id: &OrgId, cmd: &Command) -> Result<Vec<EventKind>> {
        let cell = self.registry.org(org_id).ok_or(Error::UnknownOrg)?;
        let kinds = cell.read().dir.handle(cmd)?;
        Ok(kinds)
    }

    /// Folds into memory whatever the org's log holds beyond it (written by
    /// another process).
    pub async fn catch_up(&self, org_id: &OrgId) -> Result<()> {
        catch_up_with(&self.db, &self.registry, org_id, Some(self)).await
    }

    /// Folds events another process committed (read from the events topic
    /// or the SQL log). When this process meters the org and they change
    /// how spend is judged (a limit, other thresholds), the meter is
    /// checkpointed first, under the write lock usage takes, as for a
    /// command made here: a replay then applies only usage counted after
    /// the change under it. A failed checkpoint does not hold the change
    /// back (it is committed); it is logged, and a crash before the next
    /// checkpoint may then judge the usage since the last one under it.
    pub async fn fold_foreign(&self, events: &[EntityEvent]) -> Followed {
        let Some(first) = events.first() else {
            return Followed::Stale;
        };
        // Whether the events that follow the org's state change a limit or
        // the thresholds. Then whether this process meters the org is asked
        // under the lock: its first usage may adopt it until then.
        let rejudges = || {
            self.registry.org(&first.org_id).is_some_and(|cell| {
                let org = cell.read();
                let fresh = &events[events.partition_point(|e| e.seq <= org.dir.seq)..];
                fresh.first().is_some_and(|e| e.seq == org.dir.seq + 1)
                    && fresh.iter().any(|e| org.dir.rejudges(&e.kind))
            })
        };
        // Not during a storage fault: the checkpoint would wait for the
        // database under the lock all usage takes.
        if self.meter.health().fault().is_some() || !rejudges() {
            return self.registry.fold_next(events);
        }
        let _w = self.meter.write_lock().await;
        if self.meter.meters(&first.org_id)
            && rejudges()
            && let Err(e) = self.meter.checkpoint_org_locked(&first.org_id).await
        {
            tracing::warn!(org = %first.org_id, error = %e, "the checkpoint before another process's limit change failed; folding the change anyway");
        }
        self.registry.fold_next(events)
    }

    /// Brings `orgs` up to date with their logs: reads their heads in one
    /// query and catches up each one this process is behind on. Returns the
    /// log's clock at the read ([`Db::log_heads`]): every change to these
    /// orgs dated up to it is folded now.
    pub async fn sync(&self, orgs: &[&OrgId]) -> Result<i64> {
        let ids: Vec<&str> = orgs.iter().map(|o| o.as_str()).collect();
        let (now_ms, heads) = self.db.log_heads(&ids).await?;
        let by_id: std::collections::HashMap<&str, &OrgId> =
            orgs.iter().map(|o| (o.as_str(), *o)).collect();
        for (id, seq) in heads {
            let Some(org) = by_id.get(id.as_str()) else {
                continue;
            };
            if self
                .registry
                .org(org)
                .is_none_or(|c| c.read().dir.seq < seq)
            {
                self.catch_up(org).await?;
            }
        }
        Ok(now_ms)
    }
}

/// Folds into memory whatever `org_id`'s log holds beyond it.
pub(crate) async fn catch_up(db: &Db, registry: &Registry, org_id: &OrgId) -> Result<()> {
    catch_up_with(db, registry, org_id, None).await
}

/// [`catch_up`], each page folded by `foreign`'s
/// [`Commands::fold_foreign`] when given.
async fn catch_up_with(
    db: &Db,
    registry: &Registry,
    org_id: &OrgId,
    foreign: Option<&Commands>,
) -> Result<()> {
    loop {
        let seq = registry.org(org_id).map_or(0, |c| c.read().dir.seq);
        let events = db.org_events(org_id, seq, CATCH_UP_PAGE_LEN).await?;
        if events.is_empty() {
            return Ok(());
        }
        // A page at once: a command's events are judged together (see
        // `OrgState::apply_entities`), as a restart judges them.
        let followed = match foreign {
            Some(commands) => commands.fold_foreign(&events).await,
            None => registry.fold_next(&events),
        };
        if followed == Followed::Gap {
            return Err(Error::Corrupt(format!(
                "the entity log of org {org_id} has a gap before seq {}",
                events[0].seq
            )));
        }
    }
}
