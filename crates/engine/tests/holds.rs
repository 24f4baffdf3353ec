//! Holds in the engine, with a clock the test moves: expiry at exactly the
//! TTL, and the journal bringing live holds back after a restart.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use tally_core::authorize::{HoldRequest, Reason};
use tally_core::usage::RawUsage;
use tally_engine::Engine;
use tally_engine::clock::ManualClock;
use tally_engine::holds::{ReleaseFound, Restored};

const SECRET: &str = "tly_sk_holds_test";
const T0: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z
const MINUTE: i64 = 60_000;

mod support;

/// An engine on the SQLite database in `dir`, metering, with its journal.
async fn engine(dir: &Path, clock: &ManualClock) -> (Arc<Engine>, Restored) {
    support::embedded(dir, clock).await
}

/// acme, alice with a $1.00 limit and her key.
async fn acme(engine: &Engine) {
    support::acme_with_alice(engine, SECRET).await;
}

fn hold(request_id: &str, micros: i64, ttl_ms: i64) -> HoldRequest<'_> {
    HoldRequest {
        request_id,
        reserve_micros: micros,
        ttl_ms,
    }
}

/// A call of alice's on her key: `cost` micro-USD at `at`.
fn usage(request_id: &str, cost: i64, at: i64) -> tally_core::usage::UsageEvent {
    RawUsage {
        request_id,
        org_id: "acme",
        user_id: "alice",
        api_key_id: "ka",
        cost_micros: Some(cost),
        occurred_at_ms: Some(at),
        ..RawUsage::default()
    }
    .validate()
    .unwrap()
}

/// Three minutes on, more ids than a window capped at 10 keeps: its first
/// minute is forgotten, as a busy org's is, and `id` with it.
async fn forget_the_first_minute(engine: &Engine, clock: &ManualClock, id: &str) {
    clock.set(T0 + 3 * MINUTE);
    let later: Vec<_> = (0..20)
        .map(|i| (i, usage(&format!("u{i}"), 1_000, T0 + 3 * MINUTE)))
        .collect();
    assert_eq!(engine.ingest(later).await.unwrap().accepted, 20);
    let cell = engine.registry.org("acme").unwrap();
    let forgotten = !cell
        .read()
        .meter
        .dedupe
        .contains(tally_core::dedupe::hash_request_id(id));
    assert!(forgotten, "the window still holds the settled hold's id");
}

/// The hold journal's newest segment in `dir`: where lines go now.
fn last_segment(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir.join("holds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap()
}

/// A hold of alice's, `micros` for half an hour, which must be admitted.
async fn placed(engine: &Engine, id: &str, micros: i64) {
    let (_, d, _) = engine
        .reserve(SECRET, None, None, hold(id, micros, 30 * MINUTE))
        .await
        .unwrap();
    assert!(d.allowed, "{id}: {d:?}");
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-holds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_hold_expires_at_its_ttl_on_the_engines_clock() {
    let dir = temp("expiry");
    let clock = ManualClock::new(T0);
    let (engine, _) = engine(&dir, &clock).await;
    acme(&engine).await;
    let (_, d, h) = engine
        .reserve(SECRET, None, None, hold("r1", 600_000, 10 * MINUTE))
        .await
        .unwrap();
    assert!(d.allowed, "{d:?}");
    assert_eq!(h.unwrap().expires_at_ms, T0 + 10 * MINUTE);
    async fn refused(engine: &Engine) -> tally_core::authorize::Decision {
        let (_, d, _) = engine
            .reserve(SECRET, None, None, hold("r2", 500_000, MINUTE))
            .await
            .unwrap();
        d
    }
    clock.set(T0 + 10 * MINUTE - 1);
    assert_eq!(refused(&engine).await.reason, Reason::UserMonthlyLimit);
    let (_, plain) = engine.authorize(SECRET, None, None);
    assert_eq!(plain.remaining_micros, Some(400_000), "{plain:?}");
    // At the TTL the hold is gone: for a plain authorize (which frees it
    // rather than refusing on it) as for a reserve.
    clock.set(T0 + 10 * MINUTE);
    let (_, plain) = engine.authorize(SECRET, None, None);
    assert_eq!(plain.remaining_micros, Some(1_000_000), "{plain:?}");
    assert!(refused(&engine).await.allowed);
    assert_eq!(
        engine.release("acme", "r1").await.unwrap(),
        ReleaseFound::Expired
    );
    assert_eq!(
        engine.release("acme", "r2").await.unwrap(),
        ReleaseFound::Released {
            held_micros: 500_000
        }
    );
}

#[tokio::test]
async fn the_journal_restores_live_holds_and_drops_settled_and_expired_ones() {
    let dir = temp("journal");
    let clock = ManualClock::new(T0);
    {
        let (engine, restored) = engine(&dir, &clock).await;
        assert_eq!(restored, Restored::default());
        acme(&engine).await;
        for (id, ttl) in [
            ("live", 30 * MINUTE),
            ("expires", MINUTE),
            ("settled", 30 * MINUTE),
            ("released", MINUTE),
        ] {
            let (_, d, _) = engine
                .reserve(SECRET, None, None, hold(id, 100_000, ttl))
                .await
                .unwrap();
            assert!(d.allowed, "{id}: {d:?}");
        }
        let _ = engine.release("acme", "released").await.unwrap();
        let settling = usage("settled", 90_000, T0);
        assert_eq!(
            engine.ingest(vec![(0, settling)]).await.unwrap().accepted,
            1
        );
        // The engine goes without a last word (as after a kill -9, the
        // meter's checkpoint is not written), and a write was torn.
        engine.meter.shutdown().await.unwrap();
    }
    let segment = last_segment(&dir);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    f.write_all(b"nonsense\nP acme torn alice ka 100").unwrap();
    clock.set(T0 + 2 * MINUTE);
    let (engine, restored) = engine(&dir, &clock).await;
    assert_eq!(
        restored,
        Restored {
            live: 1,
            expired: 1,
            settled: 1,
            orphaned: 0,
            unreadable: 1
        }
    );
    let rows = engine.live_holds("acme", None, None, 10).unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, ["live"]);
    let of = |user| {
        let rows = engine.live_holds("acme", Some(user), None, 10).unwrap();
        rows.into_iter().map(|r| r.request_id).collect::<Vec<_>>()
    };
    assert_eq!(of("alice"), ["live"]);
    assert!(of("nobody").is_empty());
    let (_, plain) = engine.authorize(SECRET, None, None);
    assert_eq!(plain.remaining_micros, Some(1_000_000 - 90_000 - 100_000));
    // The restart compacted the journal: the live holds in a new segment,
    // new lines in the one after it, the old ones gone.
    let mut after: Vec<_> = std::fs::read_dir(dir.join("holds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    after.sort();
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.iter().all(|p| *p > segment),
        "{after:?} after {segment:?}"
    );
}

/// A busy org's dedupe window, past its cap, keeps a request id only a
/// minute or two: a hold its usage settled must not come back after a
/// restart once its id is forgotten, holding budget until its TTL (it did:
/// the journal recorded no settle, and the window no longer knew the id).
#[tokio::test]
async fn a_settled_hold_stays_settled_after_the_window_forgot_its_id() {
    let dir = temp("settled-forgotten");
    let clock = ManualClock::new(T0);
    let mut options = tally_engine::EngineOptions::default();
    options.meter_config.dedupe.entries_max = 10;
    {
        let (engine, _) = support::embedded_with(&dir, &clock, options.clone()).await;
        acme(&engine).await;
        placed(&engine, "h", 300_000).await;
        let report = engine
            .ingest(vec![(0, usage("h", 250_000, T0))])
            .await
            .unwrap();
        assert_eq!(report.accepted, 1);
        forget_the_first_minute(&engine, &clock, "h").await;
        engine.meter.shutdown().await.unwrap();
    }
    clock.set(T0 + 4 * MINUTE);
    let (engine, restored) = support::embedded_with(&dir, &clock, options).await;
    assert_eq!((restored.live, restored.settled), (0, 1), "{restored:?}");
    let (_, plain) = engine.authorize(SECRET, None, None);
    assert_eq!(plain.remaining_micros, Some(1_000_000 - 250_000 - 20_000));
}

/// An expired hold's request id is remembered for the longest TTL, also in
/// an org where nothing else happens: then it is forgotten.
#[tokio::test]
async fn an_idle_org_forgets_expired_holds_after_the_longest_ttl() {
    let dir = temp("forget-expired");
    let clock = ManualClock::new(T0);
    let (engine, _) = engine(&dir, &clock).await;
    acme(&engine).await;
    let (_, d, _) = engine
        .reserve(SECRET, None, None, hold("r1", 100_000, MINUTE))
        .await
        .unwrap();
    assert!(d.allowed, "{d:?}");
    clock.set(T0 + 2 * MINUTE);
    engine.hold_upkeep();
    assert_eq!(
        engine.release("acme", "r1").await.unwrap(),
        ReleaseFound::Expired
    );
    clock.set(T0 + 2 * MINUTE + 60 * MINUTE);
    engine.hold_upkeep();
    assert_eq!(
        engine.release("acme", "r1").await.unwrap(),
        ReleaseFound::Unknown
    );
}

/// A full disk takes part of a reserve's journal line (the bytes that fit
/// the segment's last page): that part is cut off, so the next line, once
/// there is room, is not glued to it and lost at the restart. (The
/// simulator's full disks nearly always meet a fresh segment, where a
/// line fails whole.)
#[tokio::test]
async fn a_line_the_full_disk_tore_is_cut_off_before_the_next_one() {
    let dir = temp("full-disk");
    let disk = support::Tmpfs::mount(&dir, "16m");
    let clock = ManualClock::new(T0);
    let ids: Vec<String>;
    {
        let (engine, _) = engine(&dir, &clock).await;
        acme(&engine).await;
        let segment = last_segment(&dir);
        let size = || std::fs::metadata(&segment).unwrap().len();
        // Holds until the next line (over 50 bytes) crosses into a new
        // page.
        let mut placed = Vec::new();
        while size() == 0 || 4_096 - size() % 4_096 > 40 {
            assert!(placed.len() < 1_000, "no line ended near a page's end");
            let id = format!("r{}", placed.len());
            self::placed(&engine, &id, 1).await;
            placed.push(id);
        }
        let before = size();
        let filler = disk.fill("filler", 0);
        let torn = engine
            .reserve(SECRET, None, None, hold("torn", 1, 30 * MINUTE))
            .await;
        let e = torn.expect_err("reserved on a full disk").to_string();
        assert!(e.contains("No space left on device"), "{e}");
        assert_eq!(size(), before, "the torn part stayed");
        std::fs::remove_file(filler).unwrap();
        self::placed(&engine, "after", 1).await;
        placed.push("after".into());
        ids = placed;
    }
    // A kill -9: nothing more written.
    let (engine, restored) = engine(&dir, &clock).await;
    assert_eq!(
        (restored.live, restored.unreadable),
        (ids.len(), 0),
        "{restored:?}"
    );
    let live: Vec<String> = engine
        .live_holds("acme", None, None, 1_000)
        .unwrap()
        .into_iter()
        .map(|h| h.request_id)
        .collect();
    let mut want = ids;
    want.sort();
    assert_eq!(live, want);
    drop(engine);
    drop(disk);
}

/// A hold whose settle line the full disk refused stays settled after a
/// restart, although the small dedupe window forgot its id by then (it came
/// back live, holding budget until its TTL: the journal had its placement
/// and nothing after it). The usage that settled it is in the usage log
/// after the last checkpoint (a checkpoint first makes the journal whole).
#[tokio::test]
async fn a_settle_the_full_disk_refused_stays_settled_after_a_restart() {
    settle_refused_then_restart("settle-refused", false).await;
}

/// The same, with a checkpoint once the disk has room: the usage leaves
/// the log's tail, and the journal, compacted first, no longer has the
/// hold.
#[tokio::test]
async fn a_settle_the_full_disk_refused_stays_settled_past_a_checkpoint() {
    settle_refused_then_restart("settle-refused-checkpoint", true).await;
}

async fn settle_refused_then_restart(name: &str, checkpoint: bool) {
    let dir = temp(name);
    let disk = support::Tmpfs::mount(&dir, "16m");
    let clock = ManualClock::new(T0);
    let mut options = tally_engine::EngineOptions::default();
    options.meter_config.dedupe.entries_max = 10;
    {
        let (engine, _) = support::embedded_with(&dir, &clock, options.clone()).await;
        acme(&engine).await;
        let segment = last_segment(&dir);
        let size = || std::fs::metadata(&segment).unwrap().len();
        // `p`, then holds whose lines end the segment's page exactly: `p`'s
        // settle line will need a new page.
        placed(&engine, "p", 1).await;
        let per_line = size() - 1; // a line but its id
        for n in 0.. {
            let room = 4_096 - size() % 4_096;
            if room > per_line && room - per_line <= 60 {
                let id_len = usize::try_from(room - per_line).unwrap();
                placed(&engine, &format!("e{}", "x".repeat(id_len - 1)), 1).await;
                break;
            }
            placed(&engine, &format!("q{n}"), 1).await;
        }
        assert_eq!(size() % 4_096, 0, "the page is full");
        // The usage log's next write reuses its write-ahead log's pages:
        // let that start over from its beginning, then fill the disk.
        let db = support::second_connection(&dir).await;
        let _ = db
            .execute_raw("PRAGMA wal_checkpoint(RESTART)")
            .await
            .unwrap();
        db.close().await;
        let filler = disk.fill("filler", 0);
        let report = engine
            .ingest(vec![(0, usage("p", 250_000, T0))])
            .await
            .expect("the usage log's append fits the write-ahead log");
        assert_eq!(report.accepted, 1);
        std::fs::remove_file(filler).unwrap();
        if checkpoint {
            assert_eq!(engine.meter.checkpoint().await.unwrap(), 1);
        }
        // Then a kill -9, before any checkpoint.
        forget_the_first_minute(&engine, &clock, "p").await;
    }
    clock.set(T0 + 4 * MINUTE);
    let (engine, restored) = support::embedded_with(&dir, &clock, options).await;
    let live: Vec<String> = engine
        .live_holds("acme", None, None, 1_000)
        .unwrap()
        .into_iter()
        .map(|h| h.request_id)
        .collect();
    assert!(
        !live.iter().any(|id| id == "p"),
        "p is live again: {restored:?}"
    );
    assert_eq!(restored.live, live.len());
    drop(engine);
    drop(disk);
}
