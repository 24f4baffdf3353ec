//! Holds: budget reserved for a call in flight. `authorize` with a reserve
//! admits a call only if committed spend + live holds + the reserve fit every
//! limit the call counts against, then holds the reserve on all of those
//! scopes at once. The call's usage event (same request id) settles the hold:
//! the hold goes and the actual cost counts. A release or the TTL frees it.
//!
//! Held sums are kept per scope beside the hold table, so a decision reads
//! them in O(1); they always equal the sum of the live holds on the scope.
//! Holds are not bound to a month: one placed before a month ends keeps its
//! budget held in the new month until it is settled or expires (at most
//! [`HOLD_TTL_MAX_MS`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::dedupe::{RequestHash, hash_request_id};
use crate::fast::{Map, Set};
use crate::ledger::Subject;

/// The TTL of a hold when authorize names none: 10 minutes.
pub const HOLD_TTL_DEFAULT_MS: i64 = 10 * 60_000;
/// The shortest TTL a hold may have: 1 second.
pub const HOLD_TTL_MIN_MS: i64 = 1_000;
/// The longest TTL a hold may have: 1 hour.
pub const HOLD_TTL_MAX_MS: i64 = 60 * 60_000;
/// Live holds per org, at most.
pub const HOLDS_PER_ORG_MAX: usize = 1_000_000;

/// One call's reserved budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub amount_micros: i64,
    pub placed_at_ms: i64,
    pub expires_at_ms: i64,
    /// The user and key the call is for (directory indexes).
    pub user: u32,
    pub key: u32,
    /// The groups it is held on: the user's and the key's at placement,
    /// sorted. Settling removes it from exactly these.
    pub groups: Box<[u32]>,
}

impl Hold {
    /// Every scope the hold is placed on.
    pub fn subjects(&self) -> impl Iterator<Item = Subject> + '_ {
        [
            Subject::Org,
            Subject::User(self.user),
            Subject::Key(self.key),
        ]
        .into_iter()
        .chain(self.groups.iter().map(|&g| Subject::Group(g)))
    }
}

/// A live hold with its request id (the map is keyed by the id's hash).
#[derive(Debug, Clone)]
struct Live {
    request_id: Box<str>,
    hold: Hold,
}

/// What happened to holds since the last [`Holds::take_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldCounts {
    pub settled: u64,
    pub expired: u64,
    /// Usage whose hold had expired before it arrived (counted in full).
    pub usage_after_expiry: u64,
}

/// An org's live holds and the sums they hold per scope.
#[derive(Debug, Clone, Default)]
pub struct Holds {
    live: Map<RequestHash, Live>,
    users: Vec<i64>,
    keys: Vec<i64>,
    groups: Vec<i64>,
    org: i64,
    /// Expiries, earliest first; entries of holds gone since (settled,
    /// released, replaced) are skipped when they come up, and the heap is
    /// rebuilt when they outnumber the live ones.
    expiries: BinaryHeap<Reverse<(i64, RequestHash)>>,
    /// Request ids of holds that expired within the longest TTL, oldest
    /// first, to count usage that arrives after its hold expired.
    expired: VecDeque<(i64, RequestHash)>,
    expired_ids: Set<RequestHash>,
    counts: HoldCounts,
    /// Request ids of holds settled or expired since the last
    /// [`Holds::take_gone`], kept only when [`Holds::track_gone`] is on.
    gone: Option<Vec<Box<str>>>,
}

impl Holds {
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// No live hold and no recent expiry: usage has nothing to settle.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.expired_ids.is_empty()
    }

    /// Whether a hold under `request_id` expired lately (within the
    /// longest TTL).
    pub fn recently_expired(&self, request_id: &str) -> bool {
        !self.expired_ids.is_empty() && self.expired_ids.contains(&hash_request_id(request_id))
    }

    /// Whether [`Holds::take_counts`] has something to report.
    pub fn has_counts(&self) -> bool {
        self.counts != HoldCounts::default()
    }

    /// What the live holds hold on `s`.
    pub fn held(&self, s: Subject) -> i64 {
        let at = |v: &Vec<i64>, i: u32| v.get(i as usize).copied().unwrap_or(0);
        match s {
            Subject::Org => self.org,
            Subject::User(i) => at(&self.users, i),
            Subject::Key(i) => at(&self.keys, i),
            Subject::Group(i) => at(&self.groups, i),
        }
    }

    pub fn get(&self, request_id: &str) -> Option<&Hold> {
        self.live.get(&hash_request_id(request_id)).map(|l| &l.hold)
    }

    /// Live holds, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Hold)> {
        self.live.values().map(|l| (&*l.request_id, &l.hold))
    }

    /// When the earliest hold expires (`i64::MAX` when none does); may be
    /// earlier than any live hold's, never later.
    pub fn next_expiry_ms(&self) -> i64 {
        self.expiries
            .peek()
            .map_or(i64::MAX, |Reverse((at, _))| *at)
    }

    fn add(&mut self, s: Subject, amount: i64) {
        fn slot(v: &mut Vec<i64>, i: u32) -> &mut i64 {
            let i = i as usize;
            if v.len() <= i {
                v.resize(i + 1, 0);
            }
            &mut v[i]
        }
        let sum = match s {
            Subject::Org => &mut self.org,
            Subject::User(i) => slot(&mut self.users, i),
            Subject::Key(i) => slot(&mut self.keys, i),
            Subject::Group(i) => slot(&mut self.groups, i),
        };
        *sum = sum.saturating_add(amount);
    }

    /// Places `hold` under `request_id`, replacing one placed under it.
    pub fn insert(&mut self, request_id: &str, hold: Hold) {
        let h = hash_request_id(request_id);
        let _ = self.take(h);
        for s in hold.subjects() {
            self.add(s, hold.amount_micros);
        }
        self.expiries.push(Reverse((hold.expires_at_ms, h)));
        let live = Live {
            request_id: request_id.into(),
            hold,
        };
        let _ = self.live.insert(h, live);
    }

    fn take(&mut self, h: RequestHash) -> Option<Hold> {
        self.take_live(h).map(|l| l.hold)
    }

    fn take_live(&mut self, h: RequestHash) -> Option<Live> {
        let live = self.live.remove(&h)?;
        let hold = &live.hold;
        for s in hold.subjects() {
            self.add(s, -hold.amount_micros);
        }
        if self.expiries.len() > 2 * self.live.len() + 1_024 {
            let live = self
                .live
                .iter()
                .map(|(h, l)| Reverse((l.hold.expires_at_ms, *h)));
            self.expiries = live.collect();
        }
        Some(live)
    }

    /// Takes the hold off every scope it was placed on.
    pub fn remove(&mut self, request_id: &str) -> Option<Hold> {
        self.take(hash_request_id(request_id))
    }

    /// The call's usage was counted: the hold of the request id hashed to
    /// `h` (if live) goes. Counted once per hold; usage whose hold already
    /// expired is counted as such.
    pub fn settle(&mut self, h: RequestHash) -> Option<Hold> {
        let expired = !self.expired_ids.is_empty() && self.expired_ids.remove(&h);
        match self.take_live(h) {
            Some(Live { request_id, hold }) => {
                self.counts.settled += 1;
                self.went(request_id);
                Some(hold)
            }
            None => {
                if expired {
                    self.counts.usage_after_expiry += 1;
                }
                None
            }
        }
    }

    /// Remembers that a hold under `request_id` expired at `at_ms` (one
    /// read back from a journal after it expired).
    pub fn remember_expired(&mut self, request_id: &str, at_ms: i64) {
        let h = hash_request_id(request_id);
        if self.expired_ids.insert(h) {
            self.expired.push_back((at_ms, h));
        }
    }

    /// Frees every hold whose TTL has passed at `now_ms`; returns how many.
    /// O(log n) per hold freed.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        // Forget expiries older than any hold could live: usage after them
        // is no longer told apart.
        while let Some(&(at, h)) = self.expired.front() {
            if at > now_ms.saturating_sub(HOLD_TTL_MAX_MS) {
                break;
            }
            let _ = self.expired.pop_front();
            let _ = self.expired_ids.remove(&h);
        }
        let mut freed = 0;
        while let Some(&Reverse((at, h))) = self.expiries.peek() {
            if at > now_ms {
                break;
            }
            let _ = self.expiries.pop();
            // A stale entry: the hold went, or was replaced by a later one.
            if self.live.get(&h).is_none_or(|l| l.hold.expires_at_ms != at) {
                continue;
            }
            let _ = self.take(h);
            if self.expired_ids.insert(h) {
                self.expired.push_back((now_ms, h));
            }
            freed += 1;
        }
        self.counts.expired += freed as u64;
        freed
    }

    /// Keep the request ids of holds that settle, for a store that deletes
    /// them at the next checkpoint (the distributed mode's holds table,
    /// whose expired rows the checkpoint deletes by time); off, nothing is
    /// kept.
    pub fn track_gone(&mut self, on: bool) {
        match (on, &self.gone) {
            (true, Some(_)) => {}
            (true, None) => self.gone = Some(Vec::new()),
            (false, _) => self.gone = None,
        }
    }

    /// Forgets every hold (the org is metered elsewhere now).
    pub fn clear(&mut self) {
        *self = Holds::default();
    }

    /// The request ids settled since the last call.
    pub fn take_gone(&mut self) -> Vec<Box<str>> {
        self.gone.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Records `request_id` as settled for the store (its row was written
    /// after its usage settled it in memory).
    pub fn note_settled(&mut self, request_id: &str) {
        self.went(request_id.into());
    }

    fn went(&mut self, request_id: Box<str>) {
        if let Some(gone) = &mut self.gone {
            gone.push(request_id);
        }
    }

    /// Settled, expired and late-usage counts since the last call.
    pub fn take_counts(&mut self) -> HoldCounts {
        std::mem::take(&mut self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(amount: i64, expires: i64, user: u32, key: u32, groups: &[u32]) -> Hold {
        Hold {
            amount_micros: amount,
            placed_at_ms: 0,
            expires_at_ms: expires,
            user,
            key,
            groups: groups.into(),
        }
    }

    #[test]
    fn sums_follow_placement_settlement_and_expiry() {
        let mut h = Holds::default();
        h.insert("a", hold(10, 100, 0, 0, &[1]));
        h.insert("b", hold(5, 50, 1, 0, &[]));
        assert_eq!(h.held(Subject::Org), 15);
        assert_eq!(h.held(Subject::Key(0)), 15);
        assert_eq!(h.held(Subject::User(1)), 5);
        assert_eq!(h.held(Subject::Group(1)), 10);
        assert_eq!(h.held(Subject::Group(7)), 0);
        assert_eq!(h.next_expiry_ms(), 50);
        assert_eq!(h.expire(49), 0);
        assert_eq!(h.expire(50), 1);
        assert_eq!(h.held(Subject::Org), 10);
        assert_eq!(h.next_expiry_ms(), 100);
        assert!(h.settle(hash_request_id("a")).is_some());
        assert_eq!(h.held(Subject::Org), 0);
        assert!(h.settle(hash_request_id("b")).is_none(), "expired");
        assert_eq!(
            h.take_counts(),
            HoldCounts {
                settled: 1,
                expired: 1,
                usage_after_expiry: 1
            }
        );
        // Usage after expiry is told apart for the longest TTL, no longer.
        h.insert("c", hold(1, 60, 0, 0, &[]));
        assert_eq!(h.expire(60), 1);
        let _ = h.expire(60 + HOLD_TTL_MAX_MS);
        assert!(h.settle(hash_request_id("c")).is_none());
        assert_eq!(h.take_counts().usage_after_expiry, 0);
        assert_eq!(h.next_expiry_ms(), i64::MAX);
    }

    #[test]
    fn replacing_a_hold_moves_its_amount() {
        let mut h = Holds::default();
        h.insert("a", hold(10, 100, 0, 0, &[]));
        h.insert("a", hold(3, 100, 2, 0, &[]));
        assert_eq!(h.len(), 1);
        assert_eq!(h.held(Subject::User(0)), 0);
        assert_eq!(h.held(Subject::User(2)), 3);
        assert_eq!(h.held(Subject::Org), 3);
    }
}
