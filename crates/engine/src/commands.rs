//! The command path: validate against memory, append to the log with the
//! read models in one transaction, then fold into memory. Nothing is applied
//! in memory before it is committed, so a failed append leaves no trace.

use std::sync::Arc;

use dashmap::DashMap;
use tally_core::entity::{Actor, Command, CommandError, EntityEvent, handle_create};
use tally_core::ids::OrgId;
use tally_store::Db;

use crate::clock::Clock;
use crate::metrics as m;
use crate::registry::Registry;
use crate::{Error, Result};

#[derive(Debug)]
pub struct Commands {
    db: Db,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    /// One writer per org at a time; orgs do not wait on each other.
    locks: DashMap<OrgId, Arc<tokio::sync::Mutex<()>>>,
}

impl Commands {
    pub fn new(db: Db, registry: Arc<Registry>, clock: Arc<dyn Clock>) -> Commands {
        Commands {
            db,
            registry,
            clock,
            locks: DashMap::new(),
        }
    }

    /// Runs one command for `org_id`; returns the events it wrote (none when
    /// it changed nothing).
    pub async fn execute(
        &self,
        org_id: &OrgId,
        actor: Actor,
        cmd: &Command,
    ) -> Result<Vec<EntityEvent>> {
        let result = self.run(org_id, actor, cmd).await;
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
        let lock = Arc::clone(&self.locks.entry(org_id.clone()).or_default());
        let _guard = lock.lock().await;
        let at_ms = self.clock.now_ms();
        let (kinds, next_seq) = match self.registry.org(org_id) {
            None => (
                handle_create(false, org_id, cmd).map_err(|e| match e {
                    CommandError::NotFound { .. } => Error::UnknownOrg,
                    e => Error::Command(e),
                })?,
                1,
            ),
            Some(cell) => {
                let org = cell.read();
                (org.dir.handle(cmd)?, org.dir.seq + 1)
            }
        };
        let events: Vec<EntityEvent> = kinds
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
        self.db.append(&events).await?;
        self.registry.apply(&events);
        Ok(events)
    }
}
