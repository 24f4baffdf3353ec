//! Every org's state in memory, and the indexes that find an org from a
//! secret. Each org sits behind its own lock: authorize takes it for reading,
//! commands and usage for writing, and orgs never wait on each other.

use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::RwLock;
use tally_core::entity::{EntityEvent, EventKind};
use tally_core::ids::{OrgId, TokenId};
use tally_core::org::{MeterConfig, OrgState};
use tally_core::secret::SecretHash;

pub type OrgCell = Arc<RwLock<OrgState>>;

/// What [`Registry::follow`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    Applied,
    /// Folded before.
    Stale,
    /// Events before it are missing: read them from the SQL log first.
    Gap,
}

#[derive(Debug)]
pub struct Registry {
    orgs: DashMap<OrgId, OrgCell>,
    /// API key secret hash → its org.
    keys: DashMap<SecretHash, OrgId>,
    /// Org admin token hash → its org and token id.
    tokens: DashMap<SecretHash, (OrgId, TokenId)>,
    meter: MeterConfig,
}

impl Registry {
    pub fn new(meter: MeterConfig) -> Registry {
        Registry {
            orgs: DashMap::new(),
            keys: DashMap::new(),
            tokens: DashMap::new(),
            meter,
        }
    }

    pub fn org(&self, id: &str) -> Option<OrgCell> {
        self.orgs.get(id).map(|c| Arc::clone(&c))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.orgs.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.orgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.orgs.is_empty()
    }

    /// A snapshot of every org, for work that visits them all.
    pub fn all(&self) -> Vec<(OrgId, OrgCell)> {
        self.orgs
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect()
    }

    pub fn org_of_key(&self, hash: &SecretHash) -> Option<OrgId> {
        self.keys.get(hash).map(|o| o.clone())
    }

    pub fn token(&self, hash: &SecretHash) -> Option<(OrgId, TokenId)> {
        self.tokens.get(hash).map(|t| t.clone())
    }

    /// Folds committed events of one org into memory, creating the org on
    /// its first event, and keeps the secret indexes in step.
    pub fn apply(&self, events: &[EntityEvent]) {
        let Some(first) = events.first() else { return };
        let cell = match &first.kind {
            EventKind::OrgCreated { .. } => {
                let mut state = OrgState::new(first, self.meter);
                // The meter adopts an org when it claims its partition or
                // counts its first usage; until then its counters mirror.
                state.meter.owned = false;
                let cell = Arc::new(RwLock::new(state));
                let _ = self.orgs.insert(first.org_id.clone(), Arc::clone(&cell));
                self.index(first);
                for e in &events[1..] {
                    cell.write().apply_entity(e);
                    self.index(e);
                }
                return;
            }
            _ => self.org(&first.org_id).expect("events of a known org"),
        };
        let mut org = cell.write();
        for e in events {
            org.apply_entity(e);
            self.index(e);
        }
    }

    /// Folds committed events of one org that may have been folded already,
    /// in part or whole (by a follower): those beyond the org's seq, under
    /// one lock, so that no reader sees part of them.
    pub fn fold_next(&self, events: &[EntityEvent]) -> Followed {
        let Some(first) = events.first() else {
            return Followed::Stale;
        };
        let Some(cell) = self.org(&first.org_id) else {
            if first.seq != 1 {
                return Followed::Gap;
            }
            self.apply(events);
            return Followed::Applied;
        };
        let mut org = cell.write();
        let seq = org.dir.seq;
        let fresh = events.iter().filter(|e| e.seq > seq);
        match fresh.clone().next() {
            None => Followed::Stale,
            Some(e) if e.seq != seq + 1 => Followed::Gap,
            Some(_) => {
                for e in fresh {
                    org.apply_entity(e);
                    self.index(e);
                }
                Followed::Applied
            }
        }
    }

    /// Folds one event read from a log that may repeat or skip (another
    /// process's relay): applied when it is the org's next, ignored when
    /// already folded, refused when events before it are missing.
    pub fn follow(&self, e: &EntityEvent) -> Followed {
        match self.org(&e.org_id) {
            None if e.seq == 1 => {
                self.apply(std::slice::from_ref(e));
                Followed::Applied
            }
            None => Followed::Gap,
            Some(cell) => {
                let mut org = cell.write();
                if e.seq <= org.dir.seq {
                    return Followed::Stale;
                }
                if e.seq != org.dir.seq + 1 {
                    return Followed::Gap;
                }
                org.apply_entity(e);
                self.index(e);
                Followed::Applied
            }
        }
    }

    fn index(&self, e: &EntityEvent) {
        match &e.kind {
            EventKind::KeyCreated { secret_hash, .. } => {
                let _ = self.keys.insert(*secret_hash, e.org_id.clone());
            }
            EventKind::TokenCreated {
                token_id,
                token_hash,
            } => {
                let _ = self
                    .tokens
                    .insert(*token_hash, (e.org_id.clone(), token_id.clone()));
            }
            _ => {}
        }
    }
}
