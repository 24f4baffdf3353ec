//! Snapshots for paging through lists sorted by a live value (spend,
//! utilization, last activity). Keyset paging over a value that moves can
//! show a user twice or skip one; instead, the first page of such a list
//! takes the order of every matching user once, and later pages walk that
//! order (with current figures). Snapshots live in memory, bounded in count,
//! size and age; a cursor whose snapshot is gone (expired, or served by
//! another process) falls back to keyset paging from its last row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tally_store::query::Cursor;

/// How long a snapshot serves its pages.
pub(crate) const TTL: Duration = Duration::from_secs(600);
/// Snapshots kept at once.
pub(crate) const SNAPSHOTS_MAX: usize = 256;
/// Users held by all snapshots together (about 70 bytes each).
pub(crate) const ENTRIES_MAX: usize = 1_000_000;
/// Pages one snapshot covers, and the most users it holds: a longer listing
/// is cut there and goes on by keyset after the snapshot's last row. Reading
/// ids costs the first page about 4 µs a user on SQLite (measured by the
/// admin bench), so a snapshot reaches as deep as admins page, not further.
pub(crate) const SNAPSHOT_PAGES: u32 = 100;
pub(crate) const SNAPSHOT_LEN_MAX: u32 = 100_000;

/// What follows a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// More of the snapshot `id`, from `offset`.
    Snapshot {
        id: u64,
        offset: u64,
    },
    /// The snapshot was cut: keyset paging after the page's last row.
    After,
    End,
}

#[derive(Debug)]
struct Snapshot {
    taken: Instant,
    /// The listing it belongs to (org, sort and filters): a cursor of
    /// another listing does not resolve.
    listing: String,
    rows: Vec<Cursor>,
    /// The listing had more rows than the snapshot holds.
    cut: bool,
}

#[derive(Debug, Default)]
pub struct Snapshots {
    inner: Mutex<HashMap<u64, Snapshot>>,
}

impl Snapshots {
    /// Keeps `rows` for `listing`; returns the snapshot's id.
    pub(crate) fn keep(&self, listing: String, rows: Vec<Cursor>, cut: bool) -> u64 {
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        let id = u64::from_le_bytes(id);
        let mut inner = self.inner.lock();
        inner.retain(|_, s| s.taken.elapsed() < TTL);
        let mut total: usize = inner.values().map(|s| s.rows.len()).sum();
        while !inner.is_empty()
            && (inner.len() >= SNAPSHOTS_MAX || total + rows.len() > ENTRIES_MAX)
        {
            let oldest = *inner
                .iter()
                .min_by_key(|(_, s)| s.taken)
                .map(|(k, _)| k)
                .expect("not empty");
            total -= inner.remove(&oldest).map_or(0, |s| s.rows.len());
        }
        let _ = inner.insert(
            id,
            Snapshot {
                taken: Instant::now(),
                listing,
                rows,
                cut,
            },
        );
        id
    }

    /// Rows `offset..offset + len` of the snapshot `id` of `listing`, and
    /// what follows them; `None` when the snapshot is gone.
    pub(crate) fn page(
        &self,
        id: u64,
        listing: &str,
        offset: u64,
        len: usize,
    ) -> Option<(Vec<Cursor>, Next)> {
        let inner = self.inner.lock();
        let s = inner
            .get(&id)
            .filter(|s| s.taken.elapsed() < TTL && s.listing == listing)?;
        let start = usize::try_from(offset).ok()?.min(s.rows.len());
        let end = start.saturating_add(len).min(s.rows.len());
        let next = if end < s.rows.len() {
            Next::Snapshot {
                id,
                offset: end as u64,
            }
        } else if s.cut && end > start {
            Next::After
        } else {
            Next::End
        };
        Some((s.rows[start..end].to_vec(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_store::query::SortValue;

    fn rows(n: usize) -> Vec<Cursor> {
        (0..n)
            .map(|i| Cursor {
                value: SortValue::Int(i as i64),
                id: format!("u{i}"),
            })
            .collect()
    }

    #[test]
    fn pages_walk_the_snapshot_and_stay_within_their_listing() {
        let s = Snapshots::default();
        let id = s.keep("acme/spend".into(), rows(5), false);
        let (p, next) = s.page(id, "acme/spend", 0, 2).unwrap();
        assert_eq!((p.len(), next), (2, Next::Snapshot { id, offset: 2 }));
        let (p, next) = s.page(id, "acme/spend", 4, 2).unwrap();
        assert_eq!((p[0].id.as_str(), next), ("u4", Next::End));
        let (p, next) = s.page(id, "acme/spend", 9, 2).unwrap();
        assert_eq!((p.len(), next), (0, Next::End));
        assert!(s.page(id, "other/spend", 0, 2).is_none());
        assert!(s.page(id ^ 1, "acme/spend", 0, 2).is_none());
    }

    #[test]
    fn a_cut_snapshot_continues_after_its_last_row() {
        let s = Snapshots::default();
        let id = s.keep("l".into(), rows(3), true);
        assert_eq!(s.page(id, "l", 2, 2).unwrap().1, Next::After);
        assert_eq!(s.page(id, "l", 3, 2).unwrap().1, Next::End);
    }

    #[test]
    fn entries_are_bounded() {
        let s = Snapshots::default();
        let first = s.keep("l".into(), rows(ENTRIES_MAX / 2), false);
        let second = s.keep("l".into(), rows(ENTRIES_MAX / 2), false);
        let third = s.keep("l".into(), rows(1), false);
        assert!(s.page(first, "l", 0, 1).is_none(), "the oldest went");
        assert!(s.page(second, "l", 0, 1).is_some());
        assert!(s.page(third, "l", 0, 1).is_some());
    }

    #[test]
    fn the_count_is_bounded() {
        let s = Snapshots::default();
        let first = s.keep("l".into(), rows(1), false);
        for _ in 0..SNAPSHOTS_MAX {
            let _ = s.keep("l".into(), rows(1), false);
        }
        assert!(s.page(first, "l", 0, 1).is_none(), "the oldest went");
        assert!(s.inner.lock().len() <= SNAPSHOTS_MAX);
    }
}
