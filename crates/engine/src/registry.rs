//! Every org's state in memory, and the indexes that find an org from a
//! secret. Each org sits behind its own lock: authorize takes it for reading,
//! commands and usage for writing, and orgs never wait on each other.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
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

    /// How the orgs here count usage.
    pub fn meter_config(&self) -> MeterConfig {
        self.meter
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

    /// The org of the key with secret hash `hash`, and its state.
    pub fn org_of_secret(&self, hash: &SecretHash) -> Option<(OrgId, OrgCell)> {
        let org = self.org_of_key(hash)?;
        let cell = self.org(&org)?;
        Some((org, cell))
    }

    pub fn token(&self, hash: &SecretHash) -> Option<(OrgId, TokenId)> {
        self.tokens.get(hash).map(|t| t.clone())
    }

    /// Folds committed events of one org into memory, creating the org on
    /// its first event, and keeps the secret indexes in step. Events folded
    /// already (by a follower, racing) are skipped: see
    /// [`Registry::fold_next`].
    pub fn apply(&self, events: &[EntityEvent]) {
        if self.fold_next(events) == Followed::Gap
            && let Some(e) = events.first()
        {
            // Committed events always follow the org's last one.
            tracing::error!(org = %e.org_id, seq = e.seq, "committed entity events do not follow the org's state in memory; not folded");
        }
    }

    /// Folds committed events of one org that may have been folded already,
    /// in part or whole (by a follower): those beyond the org's seq, under
    /// one lock, so that no reader sees part of them. Two callers creating
    /// the same org at once create it once: the second folds into the
    /// first's cell, never replaces it.
    pub fn fold_next(&self, events: &[EntityEvent]) -> Followed {
        let Some(first) = events.first() else {
            return Followed::Stale;
        };
        // A known org is found under its shard's read lock; only a new one
        // takes the write lock, to be created once.
        let cell = match self.org(&first.org_id) {
            Some(cell) => cell,
            None => match self.orgs.entry(first.org_id.clone()) {
                Entry::Occupied(o) => Arc::clone(o.get()),
                Entry::Vacant(v) => {
                    if first.seq != 1 || !matches!(first.kind, EventKind::OrgCreated { .. }) {
                        return Followed::Gap;
                    }
                    let mut state = OrgState::new(first, self.meter);
                    // The meter adopts an org when it claims its partition or
                    // counts its first usage; until then its counters mirror.
                    state.meter.owned = false;
                    let cell = Arc::new(RwLock::new(state));
                    // Locked before it is visible: whoever finds it waits for
                    // the rest of these events.
                    let mut org = cell.write();
                    let _ = v.insert(Arc::clone(&cell));
                    self.index(first);
                    org.apply_entities(&events[1..]);
                    for e in &events[1..] {
                        self.index(e);
                    }
                    return Followed::Applied;
                }
            },
        };
        let mut org = cell.write();
        let seq = org.dir.seq;
        // Events come in seq order: the fresh ones are a suffix, folded as
        // one command's (see `OrgState::apply_entities`).
        let fresh = &events[events.partition_point(|e| e.seq <= seq)..];
        match fresh.first() {
            None => Followed::Stale,
            Some(e) if e.seq != seq + 1 => Followed::Gap,
            Some(_) => {
                org.apply_entities(fresh);
                for e in fresh {
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
        self.fold_next(std::slice::from_ref(e))
    }

    fn index(&self, e: &EntityEvent) {
        match &e.kind {
            EventKind::KeyCreated { secret_hash, .. }
            | EventKind::KeyRotated { secret_hash, .. } => {
                let _ = self.keys.insert(*secret_hash, e.org_id.clone());
            }
            EventKind::TokenCreated {
                token_id,
                token_hash,
                ..
            } => {
                let _ = self
                    .tokens
                    .insert(*token_hash, (e.org_id.clone(), token_id.clone()));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::entity::Actor;

    fn event(org: &OrgId, seq: u64, kind: EventKind) -> EntityEvent {
        EntityEvent {
            org_id: org.clone(),
            seq,
            at_ms: 1_000 + seq as i64,
            actor: Actor::Operator,
            kind,
        }
    }

    /// The events follower and a consumer's catch-up fold the same new org
    /// at once: whichever creates it, the other folds into the same cell,
    /// and nothing folded (or counted) in it is replaced.
    #[test]
    fn two_folders_of_a_new_org_never_replace_each_others_state() {
        let registry = Arc::new(Registry::new(MeterConfig::default()));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let orgs: Vec<OrgId> = (0..10_000)
            .map(|i| OrgId::new(&format!("org-{i}")).unwrap())
            .collect();
        let created = |org: &OrgId| {
            event(
                org,
                1,
                EventKind::OrgCreated {
                    name: "Org".into(),
                    default_monthly_limit_micros: None,
                    alert_thresholds_bps: vec![],
                },
            )
        };
        let renamed = |org: &OrgId| {
            event(
                org,
                2,
                EventKind::OrgSettingsChanged {
                    name: "Renamed".into(),
                    default_monthly_limit_micros: None,
                    alert_thresholds_bps: vec![],
                },
            )
        };
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let (registry, barrier, orgs) =
                    (Arc::clone(&registry), Arc::clone(&barrier), orgs.clone());
                std::thread::spawn(move || {
                    for org in &orgs {
                        let _ = barrier.wait();
                        if t == 0 {
                            let _ = registry.follow(&created(org));
                            let _ = registry.follow(&renamed(org));
                        } else {
                            let _ = registry.fold_next(&[created(org)]);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let behind: Vec<&OrgId> = orgs
            .iter()
            .filter(|o| registry.org(o).unwrap().read().dir.seq != 2)
            .collect();
        assert!(
            behind.is_empty(),
            "{} of {} orgs lost a folded event",
            behind.len(),
            orgs.len()
        );
    }
}
