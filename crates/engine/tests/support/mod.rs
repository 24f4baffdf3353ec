//! What the engine's tests share: an engine wired as `tally serve` wires
//! it, a fresh PostgreSQL database, and commands run as the operator.

#![allow(dead_code)] // Each test file uses a part.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;

use tally_core::entity::{Actor, Command};
use tally_core::ids::OrgId;
use tally_core::secret::hash_secret;
use tally_engine::clock::{Clock, ManualClock};
use tally_engine::embedded::EmbeddedLog;
use tally_engine::holds::{HoldJournal, Restored};
use tally_engine::{Engine, EngineOptions};
use tally_store::{Db, DbOptions};

/// An engine on `db` with `clock`, as `tally serve` starts it (the entity
/// log folded), before its mode is wired.
pub(crate) async fn engine_on(db: Db, clock: Arc<dyn Clock>) -> Arc<Engine> {
    engine_with(db, clock, EngineOptions::default()).await
}

/// [`engine_on`] with `options`.
pub(crate) async fn engine_with(
    db: Db,
    clock: Arc<dyn Clock>,
    options: EngineOptions,
) -> Arc<Engine> {
    Arc::new(
        Engine::start(db, clock, options, hash_secret("operator"))
            .await
            .unwrap(),
    )
}

/// An embedded engine on the SQLite database in `dir`, as `tally serve
/// --data-dir` wires it: the meter recovered from the usage log, then the
/// hold journal read.
pub(crate) async fn embedded(dir: &Path, clock: &ManualClock) -> (Arc<Engine>, Restored) {
    embedded_with(dir, clock, EngineOptions::default()).await
}

/// [`embedded`] with `options`.
pub(crate) async fn embedded_with(
    dir: &Path,
    clock: &ManualClock,
    options: EngineOptions,
) -> (Arc<Engine>, Restored) {
    try_embedded_with(dir, clock, options).await.unwrap()
}

/// [`embedded_with`], answering why it could not start (a full disk, say)
/// as `tally serve` would report it.
pub(crate) async fn try_embedded_with(
    dir: &Path,
    clock: &ManualClock,
    options: EngineOptions,
) -> Result<(Arc<Engine>, Restored), String> {
    let db = Db::open(&DbOptions::new(format!(
        "sqlite://{}?mode=rwc",
        dir.join("tally.db").display()
    )))
    .await
    .map_err(|e| format!("opening the database: {e}"))?;
    let engine = Engine::start(
        db,
        Arc::new(clock.clone()),
        options,
        hash_secret("operator"),
    )
    .await
    .map_err(|e| format!("starting the engine: {e}"))?;
    let engine = Arc::new(engine);
    let watched = HoldJournal::placed_ids(&dir.join("holds"))
        .map_err(|e| format!("reading the hold journal: {e}"))?;
    let log = EmbeddedLog::recover_watching(Arc::clone(&engine.meter), watched)
        .await
        .map_err(|e| format!("recovering the usage log: {e}"))?;
    let replayed = log.take_replayed();
    engine.set_sink(Arc::new(log));
    let (journal, restored) = HoldJournal::open(
        &dir.join("holds"),
        &engine.registry,
        clock.now_ms(),
        &replayed,
    )
    .map_err(|e| format!("opening the hold journal: {e}"))?;
    engine.set_hold_journal(Arc::new(journal));
    Ok((engine, restored))
}

/// A connection of a test's own to the embedded engine's database in `dir`.
pub(crate) async fn second_connection(dir: &Path) -> Db {
    Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(format!(
            "sqlite://{}?mode=rwc",
            dir.join("tally.db").display()
        ))
    })
    .await
    .unwrap()
}

/// A small tmpfs of a test's own, to fill a disk for real (the suite runs
/// as root; `mount` needs it). Unmounted, lazily, on drop.
pub(crate) struct Tmpfs {
    pub(crate) dir: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) at `dir`,
    /// which must exist.
    pub(crate) fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} ({}): the simulator fills a disk for real and needs \
             root, as scripts/test.sh has in CI",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }

    /// Fills the file system with the file `name` until `leave` pages of
    /// 4 KiB are left; answers its path.
    pub(crate) fn fill(&self, name: &str, leave: u64) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut len = chunk.len();
        // Smaller and smaller writes take the last partial chunk.
        while len > 0 {
            match f.write(&chunk[..len]) {
                Ok(0) => len /= 2,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => len /= 2, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let size = f.metadata().unwrap().len();
        f.set_len(size.saturating_sub(leave * 4_096)).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// A fresh database on the suite's PostgreSQL server: its URL, or `None`
/// (with a note) when there is no server and services are not required.
pub(crate) async fn fresh_postgres(name: &str) -> Option<String> {
    let Ok(admin) = std::env::var("TALLY_TEST_POSTGRES_ADMIN_URL") else {
        assert!(
            std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
            "TALLY_TEST_POSTGRES_ADMIN_URL is not set: run scripts/test.sh"
        );
        eprintln!("skipped: no PostgreSQL server (scripts/test.sh starts one)");
        return None;
    };
    let name = format!("{name}_{}", std::process::id());
    let server = Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(admin.clone())
    })
    .await
    .unwrap();
    let _ = server
        .execute_raw(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    server.close().await;
    Some(format!("{}/{name}", admin.rsplit_once('/').unwrap().0))
}

/// Runs `cmds` on `org` as the operator; each must succeed.
pub(crate) async fn run(engine: &Engine, org: &str, cmds: impl IntoIterator<Item = Command>) {
    for cmd in cmds {
        try_run(engine, org, &cmd).await.unwrap();
    }
}

/// Runs `cmd` on `org` as the operator.
pub(crate) async fn try_run(engine: &Engine, org: &str, cmd: &Command) -> tally_engine::Result<()> {
    let org = OrgId::new(org).unwrap();
    engine
        .commands
        .execute(&org, Actor::Operator, cmd)
        .await
        .map(|_| ())
}

/// Org acme and its active member alice, with `limit`.
pub(crate) async fn acme_and_alice(engine: &Engine, limit: Option<i64>) {
    run(
        engine,
        "acme",
        [
            Command::CreateOrg {
                name: "Acme".into(),
                default_monthly_limit_micros: None,
                alert_thresholds_bps: None,
                monthly_limit_micros: None,
            },
            Command::AddUser {
                user_id: tally_core::ids::UserId::new("alice").unwrap(),
                email: "alice@acme.test".into(),
                name: "Alice".into(),
                monthly_limit_micros: Some(limit),
                activate: true,
            },
        ],
    )
    .await;
}

/// Org acme, alice with a $1.00 limit, and her key `ka` with `secret`.
pub(crate) async fn acme_with_alice(engine: &Engine, secret: &str) {
    use tally_core::ids::{KeyId, UserId};
    acme_and_alice(engine, Some(1_000_000)).await;
    run(
        engine,
        "acme",
        [Command::CreateKey {
            key_id: KeyId::new("ka").unwrap(),
            name: "laptop".into(),
            user_id: Some(UserId::new("alice").unwrap()),
            group_ids: vec![],
            features: vec![],
            monthly_limit_micros: None,
            secret_hash: hash_secret(secret),
            expires_at_ms: None,
        }],
    )
    .await;
}

/// splitmix64: small, fast, and the same on every machine.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn between(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
}

/// Store writes that fail on demand, for the simulators: each makes a table
/// `sim_faults` and a trigger per durability point that aborts the write
/// while its point is in the table.
pub(crate) struct Faults {
    pub(crate) db: Db,
    pub(crate) armed: Option<&'static str>,
}

impl Faults {
    pub(crate) async fn arm(&mut self, point: &'static str) {
        let _ = self
            .db
            .execute_raw(&format!(
                "INSERT INTO sim_faults (point) VALUES ('{point}')"
            ))
            .await
            .unwrap();
        self.armed = Some(point);
    }

    pub(crate) async fn disarm(&mut self) {
        let _ = self.db.execute_raw("DELETE FROM sim_faults").await.unwrap();
        self.armed = None;
    }
}

pub(crate) fn from_env(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} is not a number: {v}"))
    })
}

/// The seeds a simulator runs: `TALLY_SIM_SEED` alone, seeds 1 to
/// `TALLY_SIM_SEEDS`, or the suite's.
pub(crate) fn sim_seeds(suite: std::ops::Range<u64>) -> Vec<u64> {
    match (from_env("TALLY_SIM_SEED"), from_env("TALLY_SIM_SEEDS")) {
        (Some(seed), _) => vec![seed],
        (None, Some(n)) => (1..=n).collect(),
        (None, None) => suite.collect(),
    }
}

/// A simple-protocol `COMMIT` as sqlx sends it: 'Q', length 11, the text.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

/// What a [`pg_proxy`] does to the connections it forwards.
#[derive(Debug, Default)]
pub(crate) struct ProxyFaults {
    /// The next COMMIT goes to the server, which commits and answers; the
    /// answer is dropped and the client's connection cut.
    pub(crate) cut_commit: AtomicBool,
    /// Every connection is cut, new ones too (the database is away).
    pub(crate) down: AtomicBool,
    /// `down` turns on with the cut.
    pub(crate) down_after_cut: AtomicBool,
    /// The next COMMIT is held: its client is cut at once (the commit's
    /// outcome is unknown to it), and the COMMIT reaches the server only
    /// when `release` is notified.
    pub(crate) hold_commit: AtomicBool,
    pub(crate) release: tokio::sync::Notify,
}

/// `url` (`postgres://user@host:port/db`) through a [`pg_proxy`] with
/// `faults`.
pub(crate) async fn behind_a_proxy(url: &str, faults: Arc<ProxyFaults>) -> String {
    let (user, rest) = url.split_once("://").unwrap().1.split_once('@').unwrap();
    let (host_port, name) = rest.split_once('/').unwrap();
    let port = pg_proxy(host_port.to_owned(), faults).await;
    format!("postgres://{user}@127.0.0.1:{port}/{name}")
}

/// A TCP proxy to the PostgreSQL server at `upstream` (host:port) that
/// does `faults` to the connections it forwards; answers its port.
pub(crate) async fn pg_proxy(upstream: String, faults: Arc<ProxyFaults>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let faults = Arc::clone(&faults);
            let upstream = upstream.clone();
            drop(tokio::spawn(async move {
                if faults.down.load(SeqCst) {
                    return;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                // Set once a COMMIT's answer is to be dropped; notified when
                // it came.
                let cut = Arc::new(AtomicBool::new(false));
                let answered = Arc::new(tokio::sync::Notify::new());
                let back = {
                    let (cut, answered, faults) =
                        (Arc::clone(&cut), Arc::clone(&answered), Arc::clone(&faults));
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = sr.read(&mut buf).await {
                            if cut.load(SeqCst) {
                                answered.notify_one();
                                return;
                            }
                            if faults.down.load(SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    })
                };
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    if faults.down.load(SeqCst) {
                        back.abort();
                        return;
                    }
                    let chunk = &buf[..n];
                    let commit = chunk.windows(COMMIT.len()).any(|w| w == COMMIT);
                    if commit && faults.hold_commit.swap(false, SeqCst) {
                        back.abort();
                        let held = chunk.to_vec();
                        drop(tokio::spawn(async move {
                            faults.release.notified().await;
                            let _ = sw.write_all(&held).await;
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        }));
                        return;
                    }
                    if commit && faults.cut_commit.swap(false, SeqCst) {
                        cut.store(true, SeqCst);
                        if faults.down_after_cut.load(SeqCst) {
                            faults.down.store(true, SeqCst);
                        }
                        let _ = sw.write_all(chunk).await;
                        // The server committed once it answers: then both
                        // sides are dropped, the client's without the answer.
                        let wait = std::time::Duration::from_secs(10);
                        let _ = tokio::time::timeout(wait, answered.notified()).await;
                        back.abort();
                        return;
                    }
                    if sw.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            }));
        }
    }));
    port
}
