//! Holds in the running engine: reserving authorize, release, expiry, and
//! the journal that keeps live holds across a restart or a `kill -9`.
//!
//! The journal is a directory of append-only segments, one line per record:
//!
//! ```text
//! P <org> <request_id> <user> <key> <micros> <placed_ms> <expires_ms> [<group> …]
//! R <org> <request_id>
//! S <org> <request_id>
//! ```
//!
//! Ids contain no spaces (entity ids are `[A-Za-z0-9._-]`, request ids
//! printable ASCII without spaces), so the fields need no quoting. A reserve
//! is answered after its line was written to the file (it survives the
//! process being killed at once) and the file is synced every second (a
//! power loss loses at most that second of holds: their budget opens again
//! until their usage arrives, which is counted in full). A hold its usage
//! settled gets an `S` line as that usage is applied: the dedupe window
//! alone cannot tell it apart on restart, since past its cap it forgets a
//! request id after a minute or two, well within a hold's TTL (a hold whose
//! request id the meter counted is dropped too, for a settle whose line was
//! lost). Expiry is a function of the clock. At start, and when a segment
//! passes [`SEGMENT_BYTES_MAX`], the live holds are written to a new segment
//! and the older ones deleted.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tally_core::authorize::{Decision, HoldRequest, PlacedHold, reserve};
use tally_core::dedupe::hash_request_id;
use tally_core::holds::{Hold, HoldRef};
use tally_core::ids::OrgId;
use tally_core::ledger::SubjectKind;
use tally_core::org::OrgState;
use tally_core::secret::hash_secret;
use tally_store::holds::StoredHold;

use crate::registry::Registry;
use crate::{Error, Result};

/// A segment past this size is compacted into a new one.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;

#[derive(Debug)]
struct Segment {
    n: u64,
    file: File,
    bytes: u64,
    /// A write failed part way: its fragment (no newline) ends this
    /// segment, and the next record goes to a new one.
    broken: bool,
}

/// The embedded mode's record of placed and released holds.
#[derive(Debug)]
pub struct HoldJournal {
    dir: PathBuf,
    current: Mutex<Segment>,
    /// A compaction or a sync failed: rewrite every live hold to a new
    /// segment at the next upkeep.
    redo: std::sync::atomic::AtomicBool,
}

/// A journal's last word on a hold: its usage settled it.
#[derive(Debug, Clone, Copy)]
struct Settled;

/// Which holds of the journal a restart's replay of the usage log's tail
/// (the usage counted after the last checkpoint) counted, by org and
/// hashed request id. A hold counted so was settled, whatever the journal
/// says: its settle line may not have been written (a full disk), and a
/// checkpoint makes the journal whole before the usage leaves the tail
/// ([`HoldJournal::upkeep`]). Only the ids the journal placed are watched
/// ([`HoldJournal::placed_ids`]), so it is as large as the journal, however
/// long the tail.
#[derive(Debug, Default)]
pub struct Replayed(std::collections::HashMap<Box<str>, std::collections::HashMap<u128, bool>>);

impl Replayed {
    /// `request_id` of `org_id` was counted (now or before).
    pub fn counted(&mut self, org_id: &str, request_id: &str) {
        if let Some(ids) = self.0.get_mut(org_id)
            && let Some(counted) = ids.get_mut(&hash_request_id(request_id))
        {
            *counted = true;
        }
    }

    pub fn contains(&self, org_id: &str, request_id: &str) -> bool {
        self.0
            .get(org_id)
            .and_then(|ids| ids.get(&hash_request_id(request_id)))
            .copied()
            .unwrap_or(false)
    }
}

/// What [`HoldJournal::open`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub live: usize,
    pub expired: usize,
    /// Their usage was counted before the restart.
    pub settled: usize,
    /// Their org, user, key or group is not known (any more).
    pub orphaned: usize,
    /// Lines that could not be read (a torn last line is not one).
    pub unreadable: usize,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:012}.holds"))
}

fn segments(dir: &Path) -> Result<Vec<u64>> {
    let mut ns = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("reading", dir, &e))? {
        let entry = entry.map_err(|e| io("reading", dir, &e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_suffix(".holds"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        ns.push(n);
    }
    ns.sort_unstable();
    Ok(ns)
}

/// Makes the directory's entries (new and deleted segments) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, &e))
}

fn io(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::HoldJournal(format!("{what} {}: {e}", path.display()))
}

/// One placed hold as a journal line.
fn placed_line(out: &mut String, org: &OrgState, request_id: &str, h: HoldRef<'_>) {
    let dir = &org.dir;
    let _ = write!(
        out,
        "P {} {request_id} {} {} {} {} {}",
        dir.id,
        dir.user_ids[h.user as usize],
        dir.key_ids[h.key as usize],
        h.amount_micros,
        h.placed_at_ms,
        h.expires_at_ms
    );
    for &g in h.groups {
        let _ = write!(out, " {}", dir.group_ids[g as usize]);
    }
    out.push('\n');
}

/// A placed hold as a journal line has it.
struct Placed<'a> {
    org: &'a str,
    request_id: &'a str,
    user: &'a str,
    key: &'a str,
    micros: i64,
    placed_ms: i64,
    expires_ms: i64,
    groups: Vec<&'a str>,
}

enum Record<'a> {
    Placed(Placed<'a>),
    Released { org: &'a str, request_id: &'a str },
    Settled { org: &'a str, request_id: &'a str },
}

fn parse(line: &str) -> Option<Record<'_>> {
    let mut f = line.split(' ');
    match f.next()? {
        "P" => Some(Record::Placed(Placed {
            org: f.next()?,
            request_id: f.next()?,
            user: f.next()?,
            key: f.next()?,
            micros: f.next()?.parse().ok()?,
            placed_ms: f.next()?.parse().ok()?,
            expires_ms: f.next()?.parse().ok()?,
            groups: f.collect(),
        })),
        kind @ ("R" | "S") => {
            let org = f.next()?;
            let request_id = f.next()?;
            f.next().is_none().then_some(if kind == "R" {
                Record::Released { org, request_id }
            } else {
                Record::Settled { org, request_id }
            })
        }
        _ => None,
    }
}

/// A hold read back (from the journal or the SQL store), resolved against
/// the org's directory; `None` when it names something the directory does
/// not know.
pub(crate) fn resolve<'a>(
    org: &OrgState,
    user: &str,
    key: &str,
    groups: impl IntoIterator<Item = &'a str>,
    (amount_micros, placed_at_ms, expires_at_ms): (i64, i64, i64),
) -> Option<Hold> {
    let dir = &org.dir;
    let groups: Option<Vec<u32>> = groups
        .into_iter()
        .map(|g| dir.groups.get(g).map(|g| g.idx))
        .collect();
    Some(Hold {
        amount_micros,
        placed_at_ms,
        expires_at_ms,
        user: dir.users.get(user)?.idx,
        key: dir.keys.get(key)?.idx,
        groups: groups?.into(),
    })
}

impl HoldJournal {
    /// The request ids the journal in `dir` placed holds under (none when
    /// it does not exist), for the usage log's replay to watch.
    pub fn placed_ids(dir: &Path) -> Result<Replayed> {
        let mut watched = Replayed::default();
        if !dir.exists() {
            return Ok(watched);
        }
        for n in segments(dir)? {
            let path = segment_path(dir, n);
            let file = File::open(&path).map_err(|e| io("opening", &path, &e))?;
            for line in BufReader::new(file).lines() {
                let line = line.map_err(|e| io("reading", &path, &e))?;
                if let Some(Record::Placed(p)) = parse(&line) {
                    let _ = watched
                        .0
                        .entry(p.org.into())
                        .or_default()
                        .insert(hash_request_id(p.request_id), false);
                }
            }
        }
        Ok(watched)
    }

    /// Reads the journal in `dir` (created when missing) into the orgs of
    /// `registry`, as of `now_ms`, then compacts it into a new segment.
    /// Call after the meter recovered (so counted request ids are known:
    /// those of its dedupe window, and those `replayed`).
    pub fn open(
        dir: &Path,
        registry: &Registry,
        now_ms: i64,
        replayed: &Replayed,
    ) -> Result<(HoldJournal, Restored)> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, &e))?;
        let ns = segments(dir)?;
        // The last record of each (org, request id) decides: a hold (none
        // when released, or when it names what the directory does not
        // know), or settled.
        let mut latest: std::collections::HashMap<(String, String), Result<Option<Hold>, Settled>> =
            Default::default();
        let mut restored = Restored::default();
        for &n in &ns {
            let path = segment_path(dir, n);
            let file = File::open(&path).map_err(|e| io("opening", &path, &e))?;
            let mut reader = BufReader::new(file);
            let mut buf = String::new();
            loop {
                buf.clear();
                let read = reader
                    .read_line(&mut buf)
                    .map_err(|e| io("reading", &path, &e))?;
                if read == 0 {
                    break;
                }
                // A line without its newline was torn by a crash mid-write:
                // its reserve was never answered.
                let Some(line) = buf.strip_suffix('\n') else {
                    break;
                };
                let Some(record) = parse(line) else {
                    restored.unreadable += 1;
                    continue;
                };
                let (org, request_id, hold) = match record {
                    Record::Placed(p) => {
                        let hold = registry.org(p.org).and_then(|c| {
                            let times = (p.micros, p.placed_ms, p.expires_ms);
                            resolve(&c.read(), p.user, p.key, p.groups, times)
                        });
                        if hold.is_none() {
                            restored.orphaned += 1;
                        }
                        (p.org, p.request_id, Ok(hold))
                    }
                    Record::Released { org, request_id } => (org, request_id, Ok(None)),
                    Record::Settled { org, request_id } => (org, request_id, Err(Settled)),
                };
                let _ = latest.insert((org.to_owned(), request_id.to_owned()), hold);
            }
        }
        for ((org_id, request_id), hold) in latest {
            let hold = match hold {
                Ok(hold) => hold,
                Err(Settled) => {
                    restored.settled += 1;
                    continue;
                }
            };
            let (Some(hold), Some(cell)) = (hold, registry.org(&org_id)) else {
                continue;
            };
            let mut org = cell.write();
            if hold.expires_at_ms <= now_ms {
                // Usage after it is told apart as after any expiry.
                org.meter
                    .holds
                    .remember_expired(&request_id, hold.expires_at_ms);
                restored.expired += 1;
            } else if org.meter.dedupe.contains(hash_request_id(&request_id))
                || replayed.contains(&org_id, &request_id)
            {
                restored.settled += 1;
            } else {
                org.meter.holds.insert(&request_id, hold);
                restored.live += 1;
            }
        }
        let next = ns.last().map_or(1, |n| n + 1);
        let journal = HoldJournal {
            dir: dir.to_owned(),
            current: Mutex::new(HoldJournal::create(dir, next)?),
            redo: std::sync::atomic::AtomicBool::new(false),
        };
        journal.compact(registry)?;
        Ok((journal, restored))
    }

    fn create(dir: &Path, n: u64) -> Result<Segment> {
        let path = segment_path(dir, n);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("creating", &path, &e))?;
        let bytes = file.metadata().map_or(0, |m| m.len());
        // The new file's name survives a power loss too.
        sync_dir(dir)?;
        Ok(Segment {
            n,
            file,
            bytes,
            broken: false,
        })
    }

    fn write(&self, line: &str) -> Result<()> {
        let mut seg = self.current.lock();
        if seg.broken {
            let n = seg.n + 1;
            *seg = HoldJournal::create(&self.dir, n)?;
        }
        if let Err(e) = seg.file.write_all(line.as_bytes()) {
            // A part may have been written: cut it off, or never append
            // after it. The next upkeep writes every live hold again: a
            // segment left behind is never synced on its own.
            let bytes = seg.bytes;
            seg.broken = seg.file.set_len(bytes).is_err();
            self.redo.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(io("writing", &segment_path(&self.dir, seg.n), &e));
        }
        seg.bytes += line.len() as u64;
        Ok(())
    }

    /// Records a placed hold. Call holding the org's lock, so an org's
    /// records are in the order its holds changed.
    pub fn placed(&self, org: &OrgState, request_id: &str, hold: HoldRef<'_>) -> Result<()> {
        let mut line = String::with_capacity(128);
        placed_line(&mut line, org, request_id, hold);
        self.write(&line)
    }

    /// Records a released hold (holding the org's lock).
    pub fn released(&self, org: &str, request_id: &str) -> Result<()> {
        self.write(&format!("R {org} {request_id}\n"))
    }

    /// Records holds their usage settled (holding the org's lock, as that
    /// usage is applied). A failed write is logged and makes the next
    /// upkeep compact the journal, which writes the live holds only.
    pub fn settled(&self, org: &str, request_ids: &[Box<str>]) {
        let mut lines = String::with_capacity(request_ids.len() * 48);
        for id in request_ids {
            let _ = writeln!(lines, "S {org} {id}");
        }
        if let Err(e) = self.write(&lines) {
            // (The write asked for the compaction.)
            tracing::warn!(org, error = %e, "recording settled holds failed; the journal will be compacted");
        }
    }

    /// Makes what was written survive a power loss.
    pub fn sync(&self) -> Result<()> {
        let (file, n) = {
            let seg = self.current.lock();
            (seg.file.try_clone(), seg.n)
        };
        let path = segment_path(&self.dir, n);
        file.and_then(|f| f.sync_data())
            .map_err(|e| io("syncing", &path, &e))
    }

    /// [`HoldJournal::compact`] when the segment grew past
    /// [`SEGMENT_BYTES_MAX`] or a write, sync or compaction failed (the live
    /// holds must be written again), else [`HoldJournal::sync`]; a failure
    /// makes the next call compact.
    pub fn upkeep(&self, registry: &Registry) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        // Taken, not read: a write that fails meanwhile asks again.
        let redo = self.redo.swap(false, Relaxed);
        let done = if redo || self.current.lock().bytes > SEGMENT_BYTES_MAX {
            self.compact(registry)
        } else {
            self.sync()
        };
        // After a failed fsync the kernel may have dropped the pages it
        // could not write: only writing everything again is sure.
        if done.is_err() {
            self.redo.store(true, Relaxed);
        }
        done
    }

    /// Starts a new segment with every live hold and deletes the older ones.
    pub fn compact(&self, registry: &Registry) -> Result<()> {
        // New records go to a new segment from here on; the live holds go
        // to the one before it. Replayed in order, each request id ends as
        // its last record since the swap says, or, without one, as the
        // snapshot found it (unchanged since the swap): so the snapshot
        // needs no lock beyond a clone of each org's holds, and writing it
        // blocks no reserve.
        let snapshot = {
            let mut seg = self.current.lock();
            let snapshot = seg.n + 1;
            *seg = HoldJournal::create(&self.dir, snapshot + 1)?;
            snapshot
        };
        let path = segment_path(&self.dir, snapshot);
        let mut file = HoldJournal::create(&self.dir, snapshot)?.file;
        let mut lines = String::new();
        for (_, cell) in registry.all() {
            let live: Vec<(String, Hold)> = {
                let org = cell.read();
                org.meter
                    .holds
                    .iter()
                    .map(|(id, h)| (id.to_owned(), h.owned()))
                    .collect()
            };
            if live.is_empty() {
                continue;
            }
            // Formatted in chunks, each under a short read lock (indexes
            // name the same entities for ever), so a reserve waits for one
            // chunk at most.
            for chunk in live.chunks(4_096) {
                lines.clear();
                {
                    let org = cell.read();
                    for (id, h) in chunk {
                        placed_line(&mut lines, &org, id, h.as_ref());
                    }
                }
                file.write_all(lines.as_bytes())
                    .map_err(|e| io("writing", &path, &e))?;
            }
        }
        file.sync_data().map_err(|e| io("syncing", &path, &e))?;
        for old in segments(&self.dir)?.into_iter().filter(|&o| o < snapshot) {
            let path = segment_path(&self.dir, old);
            std::fs::remove_file(&path).map_err(|e| io("deleting", &path, &e))?;
        }
        sync_dir(&self.dir)
    }
}

/// Which partition of the usage topic carries an org (the distributed
/// mode): `partitioner(org id, partitions)`.
#[derive(Debug, Clone, Copy)]
pub struct PartitionOf {
    pub partitions: i32,
    pub partitioner: fn(&[u8], i32) -> i32,
}

/// How a new hold becomes durable.
#[derive(Clone, Copy)]
enum Durability<'a> {
    /// Embedded: a line in the journal, under the org's lock.
    Journal(&'a HoldJournal),
    /// Distributed: a row in SQL, fenced by the partition's epoch.
    Sql { partition: i32, epoch: i64 },
}

/// A hold with its entities named, as the SQL store keeps it and admins
/// list it.
fn stored_hold(org: &OrgState, request_id: &str, h: HoldRef<'_>) -> StoredHold {
    let dir = &org.dir;
    StoredHold {
        org_id: dir.id.to_string(),
        request_id: request_id.to_owned(),
        user_id: dir.user_ids[h.user as usize].to_string(),
        key_id: dir.key_ids[h.key as usize].to_string(),
        group_ids: h
            .groups
            .iter()
            .map(|&g| dir.group_ids[g as usize].to_string())
            .collect(),
        amount_micros: h.amount_micros,
        placed_at_ms: h.placed_at_ms,
        expires_at_ms: h.expires_at_ms,
    }
}

/// A hold in memory whose row has not committed: taken back on drop unless
/// disarmed (`cell` set to `None`), unless its usage settled it meanwhile.
struct Tentative<'a> {
    cell: Option<&'a crate::registry::OrgCell>,
    request_id: &'a str,
    placed_at_ms: i64,
}

impl Drop for Tentative<'_> {
    fn drop(&mut self) {
        let Some(cell) = self.cell else { return };
        let mut org = cell.write();
        if org
            .meter
            .holds
            .get(self.request_id)
            .is_some_and(|h| h.placed_at_ms == self.placed_at_ms)
        {
            let _ = org.meter.holds.remove(self.request_id);
        }
    }
}

/// A write the partition's new owner fenced out: the hold is placed there.
fn moved(e: tally_store::Error, partition: i32) -> Error {
    match e {
        tally_store::Error::Fenced { .. } => Error::Unavailable(format!(
            "partition {partition} of the usage topic moved to another process while the \
             hold was placed; retry"
        )),
        e => Error::Store(e),
    }
}

/// How long holds live; see `--hold-ttl-default-ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldOptions {
    pub ttl_default_ms: i64,
    pub ttl_max_ms: i64,
}

impl Default for HoldOptions {
    fn default() -> Self {
        HoldOptions {
            ttl_default_ms: tally_core::holds::HOLD_TTL_DEFAULT_MS,
            ttl_max_ms: tally_core::holds::HOLD_TTL_MAX_MS,
        }
    }
}

/// What a release found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseFound {
    /// A live hold, now released.
    Released {
        held_micros: i64,
    },
    /// The call's usage was counted: its hold was settled.
    Settled,
    Expired,
    /// No hold by that id (never placed, released before, or forgotten).
    Unknown,
}

impl ReleaseFound {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseFound::Released { .. } => "released",
            ReleaseFound::Settled => "settled",
            ReleaseFound::Expired => "expired",
            ReleaseFound::Unknown => "unknown",
        }
    }
}

fn count_hold(event: &'static str, n: u64) {
    if n > 0 {
        ::metrics::counter!(crate::metrics::HOLDS, "event" => event).increment(n);
    }
}

fn flush_counts(org: &mut OrgState) {
    let c = org.meter.holds.take_counts();
    count_hold("settled", c.settled);
    count_hold("expired", c.expired);
    if c.usage_after_expiry > 0 {
        ::metrics::counter!(crate::metrics::USAGE_AFTER_HOLD_EXPIRED)
            .increment(c.usage_after_expiry);
    }
}

impl crate::Engine {
    /// Where holds are journaled; set once by the embedded mode. Without
    /// it, reserving authorize and release answer unavailable. The meter
    /// records there the holds that usage settles.
    pub fn set_hold_journal(&self, journal: Arc<HoldJournal>) {
        self.meter.set_hold_journal(Arc::clone(&journal));
        let _ = self.hold_journal.set(journal);
    }

    pub fn hold_options(&self) -> HoldOptions {
        self.hold_options
    }

    fn hold_write_lock(&self, org: &str) -> Arc<tokio::sync::Mutex<()>> {
        if let Some(m) = self.hold_writes.get(org) {
            return Arc::clone(&m);
        }
        let Ok(id) = OrgId::new(org) else {
            return Arc::default();
        };
        Arc::clone(&self.hold_writes.entry(id).or_default())
    }

    /// The distributed mode: holds are placed by the process metering the
    /// org's partition, in SQL; `partition_of` names an org's partition.
    pub fn set_hold_partitions(&self, partition_of: PartitionOf) {
        let _ = self.hold_partition_of.set(partition_of);
    }

    /// Whether other processes share this one's database and change it
    /// (the distributed mode).
    pub fn shared(&self) -> bool {
        self.hold_partition_of.get().is_some()
    }

    /// Where the process placing `org`'s holds answers (the distributed
    /// mode), when it is not this one.
    pub async fn hold_owner_url(&self, partition: i32) -> Result<Option<String>> {
        let url = self.db.owner_url(i64::from(partition)).await?;
        Ok(url.filter(|u| Some(u.as_str()) != self.meter.advertised_url()))
    }

    /// How a hold of `org` is made durable here, or why it cannot be.
    fn durability(&self, org: &str) -> Result<Durability<'_>> {
        if let Some(j) = self.hold_journal.get() {
            return Ok(Durability::Journal(j));
        }
        let Some(partition_of) = self.hold_partition_of.get() else {
            return Err(Error::Unavailable(
                "holds need a place to be kept: the embedded mode on --database-url \
                 keeps them in --holds-dir"
                    .into(),
            ));
        };
        let partition = (partition_of.partitioner)(org.as_bytes(), partition_of.partitions);
        match self.meter.hold_epoch(partition) {
            Some(epoch) => Ok(Durability::Sql { partition, epoch }),
            None => Err(Error::NotOwner {
                org: org.to_owned(),
                partition,
            }),
        }
    }

    /// Authorize with a reserve: the decision, and the hold when the call
    /// was admitted (or the live one it repeats). Answers once a new hold is
    /// durable: journaled (embedded), or stored in SQL under the epoch of
    /// the org's partition (distributed, on the process metering it).
    pub async fn reserve(
        &self,
        secret: &str,
        feature: Option<&str>,
        user_id: Option<&str>,
        req: HoldRequest<'_>,
    ) -> Result<(Option<OrgId>, Decision, Option<PlacedHold>)> {
        let started = Instant::now();
        let hash = hash_secret(secret);
        let Some((org_id, cell)) = self.registry.org_of_secret(&hash) else {
            let d = Decision::unknown_key();
            crate::record_decision(&d, "reserve", started);
            return Ok((None, d, None));
        };
        let durable = self.durability(&org_id)?;
        // Distributed, a hold is in memory before its row commits: a repeat
        // or a release of it in between must wait for the outcome (or it
        // would answer from a hold that may never be stored).
        let _serial = match durable {
            Durability::Sql { .. } => Some(self.hold_write_lock(&org_id).lock_owned().await),
            Durability::Journal(_) => None,
        };
        let (d, placed, stored) = {
            let mut org = cell.write();
            // Read under the lock: a repeat never answers a hold that
            // expired while it waited.
            let now = self.clock.now_ms();
            let Some(key_id) = org.dir.key_for_secret(&hash, now).map(|k| k.id.clone()) else {
                let d = Decision::unknown_key();
                crate::record_decision(&d, "reserve", started);
                return Ok((None, d, None));
            };
            let _ = org.meter.holds.expire(now);
            let (d, placed) = reserve(&mut org, &key_id, feature, user_id, req, now)
                .map_err(|c| Error::HoldConflict(c.to_string()))?;
            let mut stored = None;
            if placed.as_ref().is_some_and(|p| p.new)
                && let Some(h) = org.meter.holds.get(req.request_id)
            {
                match durable {
                    Durability::Journal(journal) => {
                        if let Err(e) = journal.placed(&org, req.request_id, h) {
                            // Not durable: not placed.
                            let _ = org.meter.holds.remove(req.request_id);
                            return Err(e);
                        }
                    }
                    Durability::Sql { .. } => {
                        stored = Some(stored_hold(&org, req.request_id, h));
                    }
                }
            }
            (d, placed, stored)
        };
        if let (Some(stored), Durability::Sql { partition, epoch }) = (stored, durable) {
            // Until its row commits the hold is tentative: if this future
            // fails or is dropped (the caller went away), it is taken back.
            let mut tentative = Tentative {
                cell: Some(&cell),
                request_id: req.request_id,
                placed_at_ms: stored.placed_at_ms,
            };
            let written = if self.meter.note_hold_org(partition, epoch, &org_id) {
                self.db
                    .place_holds(i64::from(partition), epoch, std::slice::from_ref(&stored))
                    .await
                    .map_err(|e| moved(e, partition))
            } else {
                Err(moved(
                    tally_store::Error::Fenced {
                        partition: i64::from(partition),
                    },
                    partition,
                ))
            };
            written?;
            tentative.cell = None;
            // Its usage may have settled it while the row was written (a
            // checkpoint then deleted nothing): the next one deletes it. A
            // hold that expired meanwhile is not settled: its row goes by
            // time, and deleting it by request id would take the row of a
            // hold placed again under that id.
            let mut org = cell.write();
            if org.meter.holds.get(req.request_id).is_none()
                && org.meter.dedupe.contains(hash_request_id(req.request_id))
            {
                org.meter.holds.note_settled(req.request_id);
            }
        }
        if placed.as_ref().is_some_and(|p| p.new) {
            count_hold("placed", 1);
        }
        crate::record_decision(&d, "reserve", started);
        Ok((Some(org_id), d, placed))
    }

    /// Frees a hold at once (its call failed or was cancelled). Idempotent:
    /// answers what it found.
    pub async fn release(&self, org_id: &str, request_id: &str) -> Result<ReleaseFound> {
        let cell = self.registry.org(org_id).ok_or(Error::UnknownOrg)?;
        let durable = self.durability(org_id)?;
        let not_live = |org: &OrgState| {
            if org.meter.dedupe.contains(hash_request_id(request_id)) {
                ReleaseFound::Settled
            } else if org.meter.holds.recently_expired(request_id) {
                ReleaseFound::Expired
            } else {
                ReleaseFound::Unknown
            }
        };
        match durable {
            Durability::Journal(journal) => {
                let mut org = cell.write();
                let Some(held_micros) = org.meter.holds.get(request_id).map(|h| h.amount_micros)
                else {
                    return Ok(not_live(&org));
                };
                journal.released(org_id, request_id)?;
                let _ = org.meter.holds.remove(request_id);
                count_hold("released", 1);
                Ok(ReleaseFound::Released { held_micros })
            }
            Durability::Sql { partition, epoch } => {
                let _serial = self.hold_write_lock(org_id).lock_owned().await;
                let held = cell
                    .read()
                    .meter
                    .holds
                    .get(request_id)
                    .map(|h| h.amount_micros);
                let Some(held_micros) = held else {
                    return Ok(not_live(&cell.read()));
                };
                let row = (org_id.to_owned(), request_id.to_owned());
                self.db
                    .release_holds(i64::from(partition), epoch, &[row])
                    .await
                    .map_err(|e| moved(e, partition))?;
                let _ = cell.write().meter.holds.remove(request_id);
                count_hold("released", 1);
                Ok(ReleaseFound::Released { held_micros })
            }
        }
    }

    /// Up to `limit` live holds of an org with request ids after `after`,
    /// by request id; only one member's with `user`.
    pub fn live_holds(
        &self,
        org_id: &str,
        user: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredHold>> {
        let cell = self.registry.org(org_id).ok_or(Error::UnknownOrg)?;
        // Only the process that places an org's holds knows them all.
        let _ = self.durability(org_id)?;
        let org = cell.read();
        let user = match user {
            None => None,
            Some(id) => match org.dir.users.get(id) {
                Some(u) => Some(u.idx),
                // Nobody the org has heard of holds anything.
                None => return Ok(Vec::new()),
            },
        };
        let now = self.clock.now_ms();
        // The `limit` smallest ids after the cursor, without sorting them all.
        let mut first: std::collections::BinaryHeap<&str> = Default::default();
        for (id, h) in org.meter.holds.iter() {
            if after.is_some_and(|a| id <= a)
                || h.expires_at_ms <= now
                || user.is_some_and(|u| h.user != u)
            {
                continue;
            }
            first.push(id);
            if first.len() > limit {
                let _ = first.pop();
            }
        }
        let rows = first
            .into_sorted_vec()
            .into_iter()
            .filter_map(|id| Some(stored_hold(&org, id, org.meter.holds.get(id)?)))
            .collect();
        Ok(rows)
    }

    /// Up to `limit` live holds of one member, by request id: from memory
    /// where the org's holds are placed (embedded, or the process metering
    /// it), elsewhere from the stored holds.
    pub async fn member_holds(
        &self,
        org_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredHold>> {
        match self.live_holds(org_id, Some(user_id), None, limit as usize) {
            // Another process places them, or this one has not yet folded
            // the org: what the stored holds say.
            Err(Error::NotOwner { .. } | Error::UnknownOrg) => {
                let now = self.clock.now_ms();
                Ok(self.db.user_holds(org_id, user_id, now, limit).await?)
            }
            // No place to keep holds: none were placed.
            Err(Error::Unavailable(_)) => Ok(Vec::new()),
            r => r,
        }
    }

    /// What live holds hold on each of `ids` (of one kind) in an org.
    /// From memory where the org's holds are placed (embedded, or the
    /// process metering it); elsewhere from the stored holds.
    pub async fn held(&self, org_id: &str, kind: SubjectKind, ids: &[&str]) -> Result<Vec<i64>> {
        if let Err(Error::NotOwner { .. }) = self.durability(org_id) {
            let now = self.clock.now_ms();
            return Ok(self.db.held_sums(org_id, kind, ids, now).await?);
        }
        let Some(cell) = self.registry.org(org_id) else {
            return Ok(vec![0; ids.len()]);
        };
        let org = cell.read();
        Ok(ids
            .iter()
            .map(|id| org.subject(kind, id).map_or(0, |s| org.meter.holds.held(s)))
            .collect())
    }

    /// Every second: frees expired holds, reports what happened to holds,
    /// syncs the journal and compacts it when it grew. Blocking (file I/O).
    pub fn hold_upkeep(&self) {
        let now = self.clock.now_ms();
        for (_, cell) in self.registry.all() {
            {
                let org = cell.read();
                let h = &org.meter.holds;
                if !h.expiry_due(now) && !h.has_counts() {
                    continue;
                }
            }
            let mut org = cell.write();
            let _ = org.meter.holds.expire(now);
            flush_counts(&mut org);
        }
        let Some(journal) = self.hold_journal.get() else {
            return;
        };
        if let Err(e) = journal.upkeep(&self.registry) {
            tracing::warn!(error = %e, "hold journal upkeep failed; retrying in a second");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_back_as_written() {
        let Some(Record::Placed(p)) = parse("P acme r-1 alice ka 10000 5 600005 eng ops") else {
            panic!("not a placement");
        };
        assert_eq!(
            (p.org, p.request_id, p.user, p.key),
            ("acme", "r-1", "alice", "ka")
        );
        assert_eq!((p.micros, p.placed_ms, p.expires_ms), (10_000, 5, 600_005));
        assert_eq!(p.groups, vec!["eng", "ops"]);
        assert!(matches!(
            parse("R acme r-1"),
            Some(Record::Released {
                org: "acme",
                request_id: "r-1"
            })
        ));
        assert!(matches!(
            parse("S acme r-2"),
            Some(Record::Settled {
                org: "acme",
                request_id: "r-2"
            })
        ));
        assert!(parse("R acme").is_none());
        assert!(parse("S acme r-2 x").is_none());
        assert!(parse("P acme r-1 alice ka x 5 6").is_none());
        assert!(parse("X").is_none());
    }
}
