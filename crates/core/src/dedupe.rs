//! The bounded window of request ids already counted, per org.
//!
//! A request id is remembered by its 128-bit hash in buckets of one minute
//! of the event's `occurred_at`. The window follows the org's watermark (the
//! latest `occurred_at` applied): usage older than `watermark - window` is
//! refused as too late instead of being counted, so a duplicate can never
//! slip past a forgotten id. When the window holds more than `entries_max`
//! ids, the oldest minutes are forgotten early and the too-late line moves up
//! with them, but never closer than [`LATE_MIN_MS`] behind the watermark:
//! memory stays bounded by the cap or by two minutes of the org's usage,
//! whichever is more, and nothing is ever counted twice.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::time::{MS_PER_HOUR, MS_PER_MINUTE};

/// How far behind the watermark usage is always accepted, however full the
/// window: forgetting closer would refuse the org's current usage (a
/// gateway's batch, events of a second gateway a little behind) as too late.
pub const LATE_MIN_MS: i64 = MS_PER_MINUTE;

/// The bucket of `ms`: ids are forgotten a minute at a time.
fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_MINUTE)
}

/// The hash of a request id.
pub type RequestHash = u128;

pub fn hash_request_id(request_id: &str) -> RequestHash {
    xxhash_rust::xxh3::xxh3_128(request_id.as_bytes())
}

/// Request hashes are uniformly distributed already: hashing them again
/// would only cost time.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type HashSet128 = HashSet<RequestHash, BuildHasherDefault<IdentityHasher>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeConfig {
    /// How far behind the watermark usage is still accepted (and its ids
    /// remembered). Default 24 h.
    pub window_ms: i64,
    /// The most ids one org remembers (about 60 bytes each): past it, the
    /// oldest minutes are forgotten early, down to [`LATE_MIN_MS`] behind
    /// the watermark, which is kept whatever its size. Default 20 million
    /// (about 1.2 GB).
    pub entries_max: usize,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            window_ms: 24 * MS_PER_HOUR,
            entries_max: 20_000_000,
        }
    }
}

/// What [`DedupeWindow::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Older than the window: it cannot be deduplicated, so it is refused.
    TooLate,
}

#[derive(Debug, Clone)]
pub struct DedupeWindow {
    config: DedupeConfig,
    seen: HashSet128,
    /// Oldest first; minutes strictly ascending.
    buckets: VecDeque<Bucket>,
    /// Minutes below this are forgotten: usage in them is too late.
    floor_minute: i64,
}

/// The ids of one minute; those from `saved` on were added since the last
/// [`DedupeWindow::take_added`].
#[derive(Debug, Clone)]
struct Bucket {
    minute: i64,
    hashes: Vec<RequestHash>,
    saved: usize,
}

impl DedupeWindow {
    pub fn new(config: DedupeConfig) -> DedupeWindow {
        DedupeWindow {
            config,
            seen: HashSet128::default(),
            buckets: VecDeque::new(),
            floor_minute: i64::MIN,
        }
    }

    pub fn config(&self) -> DedupeConfig {
        self.config
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Minutes (since the epoch) below this are forgotten.
    pub fn floor_minute(&self) -> i64 {
        self.floor_minute
    }

    fn too_late(&self, occurred_ms: i64, watermark_ms: i64) -> bool {
        occurred_ms < watermark_ms.saturating_sub(self.config.window_ms)
            || minute_of(occurred_ms) < self.floor_minute
    }

    /// Whether `hash` is remembered (counted within the window).
    pub fn contains(&self, hash: RequestHash) -> bool {
        self.seen.contains(&hash)
    }

    /// Looks without remembering.
    pub fn check(&self, hash: RequestHash, occurred_ms: i64, watermark_ms: i64) -> Seen {
        if self.too_late(occurred_ms, watermark_ms) {
            Seen::TooLate
        } else if self.seen.contains(&hash) {
            Seen::Duplicate
        } else {
            Seen::New
        }
    }

    /// Looks and, when new, remembers.
    pub fn insert(&mut self, hash: RequestHash, occurred_ms: i64, watermark_ms: i64) -> Seen {
        if self.too_late(occurred_ms, watermark_ms) {
            return Seen::TooLate;
        }
        if !self.seen.insert(hash) {
            return Seen::Duplicate;
        }
        self.bucket(minute_of(occurred_ms)).push(hash);
        self.shrink(watermark_ms.max(occurred_ms));
        Seen::New
    }

    /// Over capacity, forgets the oldest minutes wholly older than
    /// [`LATE_MIN_MS`] behind `watermark_ms`.
    fn shrink(&mut self, watermark_ms: i64) {
        if self.seen.len() <= self.config.entries_max {
            return;
        }
        let keep_from = minute_of(watermark_ms.saturating_sub(LATE_MIN_MS));
        while self.seen.len() > self.config.entries_max
            && self.buckets.front().is_some_and(|b| b.minute < keep_from)
        {
            self.forget_oldest_bucket();
        }
    }

    fn bucket(&mut self, minute: i64) -> &mut Vec<RequestHash> {
        // Usage mostly lands in the newest minute.
        let at = match self.buckets.back() {
            Some(b) if b.minute == minute => self.buckets.len() - 1,
            _ => {
                let at = self.buckets.partition_point(|b| b.minute < minute);
                if self.buckets.get(at).is_none_or(|b| b.minute != minute) {
                    self.buckets.insert(
                        at,
                        Bucket {
                            minute,
                            hashes: Vec::new(),
                            saved: 0,
                        },
                    );
                }
                at
            }
        };
        &mut self.buckets[at].hashes
    }

    fn forget_oldest_bucket(&mut self) {
        if let Some(Bucket { minute, hashes, .. }) = self.buckets.pop_front() {
            for h in &hashes {
                let _ = self.seen.remove(h);
            }
            self.floor_minute = self.floor_minute.max(minute + 1);
        }
    }

    /// Forgets the minutes wholly older than `watermark - window`: usage in
    /// them is refused as too late anyway.
    pub fn evict(&mut self, watermark_ms: i64) {
        let cutoff = watermark_ms.saturating_sub(self.config.window_ms);
        // A minute [m, m+1) is wholly older when (m + 1) * minute <= cutoff.
        let keep_from = minute_of(cutoff);
        while self.buckets.front().is_some_and(|b| b.minute < keep_from) {
            self.forget_oldest_bucket();
        }
        self.floor_minute = self.floor_minute.max(keep_from);
    }

    /// The ids remembered since the last call, for the checkpoint.
    pub fn take_added(&mut self) -> Vec<(i64, RequestHash)> {
        let mut out = Vec::new();
        for b in &mut self.buckets {
            out.extend(b.hashes[b.saved..].iter().map(|h| (b.minute, *h)));
            b.saved = b.hashes.len();
        }
        out
    }

    /// Rebuilds a window from a checkpoint of an org whose watermark is
    /// `watermark_ms`, from its (minute, hash) entries. Over capacity, it
    /// forgets what live eviction forgets: the oldest minutes, never the
    /// last [`LATE_MIN_MS`] behind the watermark.
    pub fn restore(
        config: DedupeConfig,
        floor_minute: i64,
        watermark_ms: i64,
        entries: impl IntoIterator<Item = (i64, RequestHash)>,
    ) -> DedupeWindow {
        let mut w = DedupeWindow::new(config);
        w.floor_minute = floor_minute;
        for (minute, hash) in entries {
            if minute >= floor_minute && w.seen.insert(hash) {
                w.bucket(minute).push(hash);
            }
        }
        for b in &mut w.buckets {
            b.saved = b.hashes.len();
        }
        w.shrink(watermark_ms);
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: i64 = MS_PER_HOUR;

    #[test]
    fn a_repeat_inside_the_window_is_a_duplicate() {
        let mut w = DedupeWindow::new(DedupeConfig::default());
        let h = hash_request_id("r1");
        assert_eq!(w.insert(h, 10 * H, 10 * H), Seen::New);
        assert_eq!(w.insert(h, 10 * H, 10 * H), Seen::Duplicate);
        assert_eq!(w.check(hash_request_id("r2"), 10 * H, 10 * H), Seen::New);
    }

    #[test]
    fn usage_older_than_the_window_is_too_late_never_recounted() {
        let cfg = DedupeConfig {
            window_ms: 24 * H,
            entries_max: 1000,
        };
        let mut w = DedupeWindow::new(cfg);
        let h = hash_request_id("r1");
        assert_eq!(w.insert(h, H, H), Seen::New);
        let watermark = 30 * H;
        w.evict(watermark);
        assert!(w.is_empty());
        assert_eq!(w.insert(h, H, watermark), Seen::TooLate);
        assert_eq!(
            w.insert(hash_request_id("r2"), 6 * H + 1, watermark),
            Seen::New
        );
    }

    const M: i64 = MS_PER_MINUTE;

    #[test]
    fn over_capacity_the_oldest_minutes_go_and_the_too_late_line_follows() {
        let cfg = DedupeConfig {
            window_ms: 24 * H,
            entries_max: 2,
        };
        let mut w = DedupeWindow::new(cfg);
        assert_eq!(w.insert(1, H, 3 * H), Seen::New);
        assert_eq!(w.insert(2, 2 * H, 3 * H), Seen::New);
        assert_eq!(w.insert(3, 3 * H, 3 * H), Seen::New);
        assert_eq!(w.len(), 2);
        // Hour 1's minute is forgotten, so its ids are refused, not recounted.
        assert_eq!(w.insert(1, H, 3 * H), Seen::TooLate);
        assert_eq!(w.insert(2, 2 * H, 3 * H), Seen::Duplicate);
        assert_eq!(w.floor_minute(), H / M + 1);
    }

    #[test]
    fn over_capacity_the_last_minute_behind_the_watermark_is_never_forgotten() {
        let cfg = DedupeConfig {
            window_ms: 24 * H,
            entries_max: 2,
        };
        let mut w = DedupeWindow::new(cfg);
        let watermark = 5 * H + 30 * M + 20;
        for id in 0..10u128 {
            let at = watermark - LATE_MIN_MS + id as i64;
            assert_eq!(w.insert(id, at, watermark), Seen::New);
        }
        // Past the bound, but the org's last minute keeps counting once.
        assert_eq!(w.len(), 10);
        assert_eq!(
            w.insert(3, watermark - LATE_MIN_MS + 3, watermark),
            Seen::Duplicate
        );
        assert_eq!(w.insert(11, watermark - LATE_MIN_MS, watermark), Seen::New);
    }

    /// The cap bounds the window within the hour too: at one id a second
    /// (one org, steady usage), a cap of 100 holds at most 100 ids or two
    /// minutes of them, never the hour's 3 600.
    #[test]
    fn over_capacity_an_hour_of_steady_usage_stays_bounded() {
        let cfg = DedupeConfig {
            window_ms: 24 * H,
            entries_max: 100,
        };
        let mut w = DedupeWindow::new(cfg);
        let start = 7 * H;
        let mut most = 0;
        for s in 0..3_600i64 {
            let at = start + s * 1_000;
            assert_eq!(w.insert(s as u128, at, at), Seen::New);
            // A second gateway a little behind is still counted.
            let behind = at - LATE_MIN_MS;
            assert_ne!(w.insert(1_000_000 + s as u128, behind, at), Seen::TooLate);
            w.evict(at);
            most = most.max(w.len());
        }
        assert!(most <= 2 * 120 + 2, "{most} ids remembered");
        assert_eq!(w.insert(0, start, start + H), Seen::TooLate);
    }

    #[test]
    fn restore_gives_back_the_same_answers() {
        let cfg = DedupeConfig::default();
        let mut w = DedupeWindow::new(cfg);
        for i in 0..100u128 {
            let _ = w.insert(i, (i as i64) * 1000, 100_000);
        }
        let r = DedupeWindow::restore(cfg, w.floor_minute(), 100_000, w.take_added());
        for i in 0..200u128 {
            assert_eq!(r.check(i, 0, 100_000), w.check(i, 0, 100_000));
        }
    }

    proptest! {
        /// Whatever the order and repeats, an id is new at most once (a
        /// repeat is the same event, so it carries the same time).
        #[test]
        fn each_id_is_new_at_most_once(ids in proptest::collection::vec(0u128..50, 1..300)) {
            let cfg = DedupeConfig { window_ms: 24 * H, entries_max: 1_000_000 };
            let mut w = DedupeWindow::new(cfg);
            let mut watermark = 0;
            let mut new = std::collections::HashSet::new();
            for id in ids {
                let at = (id as i64 % 48) * H;
                if w.insert(id, at, watermark) == Seen::New {
                    prop_assert!(new.insert(id), "id {} counted twice", id);
                }
                watermark = watermark.max(at);
                w.evict(watermark);
            }
        }
    }
}
