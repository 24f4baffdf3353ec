//! A seeded simulator of the embedded engine (the first slice of issue
//! 13): one seed gives one exact run of random work against the real core,
//! meter, hold journal and store (SQLite in a temporary directory), on a
//! clock the simulator moves. After every step it checks the engine against
//! a plain model of what it must hold.
//!
//! Work: users added, suspended and made active again, their keys revoked,
//! and their limits changed (one by one and in bulk),
//! the limits of groups, keys and the org changed, the alert thresholds
//! changed (alone or with the org's limit, in one settings change), usage
//! in batches with
//! duplicates, late events (also across a month's end) and events from
//! gateways whose clocks run ahead (by up to twice the skew allowed), holds reserved,
//! settled by their usage, released and expired, checkpoints, and crashes:
//! the engine dropped without a word at any step and started again from
//! what it wrote. Storage faults: a write of the store fails (an SQLite
//! trigger aborts it, an error the engine does not take for the store
//! being unavailable) at one of its durability points — the usage log's
//! append, the entity log's append, or a checkpoint at its position, its
//! counters, its dedupe ids or its enforcement events — during usage, a
//! command or a checkpoint; then, half the time, a crash right after. And
//! the disk fills up for real: each run's directory is a tmpfs of its own
//! (so the simulator runs as root, as the suite does), which a file fills
//! to its last page or its last few, for a few steps of any work,
//! restarts included, until an operator frees the space. The engine then
//! refuses usage and commands (a storage fault) until its tick finds that
//! a write commits again; the hold journal refuses what it cannot write.
//! Every fourth seed caps the dedupe window at 8 request ids, so that it
//! keeps only its last minute or two, as a busy org's does.
//!
//! Invariants after every step, for every user, its key and the org, in
//! every month the model knows:
//! - spend and requests are the sums over the distinct counted events;
//!   usage is refused from the future exactly when it is dated further
//!   ahead of the clock than the skew allowed;
//! - this month, a user, key, group or the org is cut off exactly when a
//!   limit is set and spend has reached it, and every alert threshold its
//!   spend has reached has fired;
//! - after every checkpoint, the enforcement events stored tell receivers
//!   what the counters hold: each subject's last cutoff or lift (in the
//!   order stored) says blocked exactly when it is cut off this month,
//!   each month's own cutoffs and lifts are stored exactly once (one for
//!   each of its counter's ordinals, a cutoff at each odd one), and the
//!   highest threshold event of each subject and month is the one its
//!   counter fired;
//! - what holds hold is the sum of the live holds the model placed;
//! - after every admitted reserve, spent + held ≤ the limit of every budget
//!   the call is judged against (its user, key, groups and org), and a
//!   reserve refused for one of them would have passed its limit; a reserve
//!   with a revoked key, or of a suspended user, is refused for that;
//! - a write refused by a fault changes nothing: usage it refused is not
//!   counted, a command it refused is not applied, a checkpoint it refused
//!   is written later with everything it carried, a hold the journal
//!   could not record is not placed (nor released);
//! - work is refused only for a fault armed, a full disk, or (without
//!   trying) a storage fault the engine is in; in one, no usage or command
//!   is taken; once the disk has room, the next tick ends it;
//! - a restart reads every line of the hold journal back, and starts on
//!   a full disk or fails for it alone;
//! - a restart recovers exactly the state before the crash: every counter
//!   (spend, requests, latest usage, cut off, the highest threshold fired,
//!   the count of cutoffs and lifts), every live hold (its amount, expiry,
//!   user, key and the groups it is held on) and what holds hold on every
//!   budget, compared right before and after it (nothing is flushed or
//!   compacted before the crash);
//! - at the end of a run, after a last checkpoint, the read models agree
//!   with the model, and rebuilding them from the entity log gives the
//!   same ones.
//!
//! The suite runs `SEEDS` seeds of `STEPS` steps. Replay one seed with
//! `TALLY_SIM_SEED=N TALLY_SIM_STEPS=M cargo test -p tally-engine --test
//! simulate` (a failure prints its seed and step); run seeds 1 to N with
//! `TALLY_SIM_SEEDS=N` (and any `TALLY_SIM_STEPS`) for a longer run.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tally_core::authorize::{HoldRequest, Reason};
use tally_core::entity::Command;
use tally_core::ids::{GroupId, KeyId, UserId};
use tally_core::ledger::{Subject, SubjectKind};
use tally_core::ratio::{DEFAULT_THRESHOLDS_BPS, reached};
use tally_core::secret::hash_secret;
use tally_core::time::Month;
use tally_core::usage::{RawUsage, UsageEvent};
use tally_engine::Engine;
use tally_engine::clock::{Clock as _, ManualClock};

mod support;

use support::{Faults, Rng, Tmpfs, from_env};

/// The seeds the suite runs, and the steps of each.
const SEEDS: std::ops::Range<u64> = 1..17;
const STEPS: u64 = 500;

const ORG: &str = "acme";
const MINUTE: i64 = 60_000;
/// The size of a run's disk: a tmpfs of its own, which the run fills.
const DISK_SIZE: &str = "32m";
/// 2026-11-30T22:00:00Z: two hours before a month's end.
const START_MS: i64 = 1_796_076_000_000;
const USERS_MAX: usize = 6;
/// The skew allowed to gateways' clocks (the meter's default).
const FUTURE_SKEW_MS: i64 = 5 * MINUTE;
/// The meter's default dedupe window.
const DEDUPE_WINDOW_MS: i64 = 24 * 60 * MINUTE;
/// The dedupe window's cap in every fourth seed.
const SMALL_DEDUPE_IDS: usize = 8;
const GROUPS: [&str; 2] = ["g0", "g1"];
/// Group and org limits are a user's times these (several users spend).
const GROUP_LIMIT_SCALE: i64 = 5;
const ORG_LIMIT_SCALE: i64 = 20;

/// Where a store write can fail: (name, the writes a trigger aborts).
const FAULT_POINTS: [(&str, &str); 6] = [
    ("usage log append", "BEFORE INSERT ON usage_log"),
    ("entity log append", "BEFORE INSERT ON events"),
    ("checkpoint position", "BEFORE UPDATE ON checkpoints"),
    ("checkpoint counters", "BEFORE INSERT ON spend_monthly"),
    ("checkpoint dedupe ids", "BEFORE INSERT ON dedupe_chunks"),
    (
        "checkpoint enforcement",
        "BEFORE INSERT ON enforcement_events",
    ),
];

/// The dedupe window's cap in a run of `seed`: every fourth seed a small
/// one, which the run's usage passes again and again, so the window
/// forgets all but its last minute or two (a busy org's window): ids of
/// settled holds are forgotten within their TTL, usage more than a minute
/// late is refused as too late, and restarts restore a window past its cap.
/// The others keep the default, which the runs never reach.
fn dedupe_ids_of(seed: u64) -> usize {
    if seed.is_multiple_of(4) {
        SMALL_DEDUPE_IDS
    } else {
        tally_core::dedupe::DedupeConfig::default().entries_max
    }
}

/// The runs' metering options: the dedupe window capped at `dedupe_ids`
/// request ids, and usage broken down by at most two (model, provider)
/// pairs a month, so that the third counts under `other`.
fn meter_config(dedupe_ids: usize) -> tally_core::org::MeterConfig {
    let mut config = tally_engine::EngineOptions::default().meter_config;
    config.dedupe.entries_max = dedupe_ids;
    config.models_max = 2;
    config
}

/// A call's model, by its request id (a repeat names the same one): one
/// of three, without drawing on the run's random numbers.
fn model_of(request_id: &str) -> (&'static str, &'static str) {
    const MODELS: [(&str, &str); 3] = [("m1", "p1"), ("m2", "p1"), ("m3", "p2")];
    let sum: usize = request_id.bytes().map(usize::from).sum();
    MODELS[sum % MODELS.len()]
}

/// One usage event as the gateway sent it (repeats send it again as is).
#[derive(Debug, Clone)]
struct Sent {
    request_id: String,
    user: String,
    cost_micros: i64,
    occurred_at_ms: i64,
}

#[derive(Debug, Clone)]
struct ModelHold {
    user: String,
    /// The groups the user was in when it was placed: it holds on them.
    groups: Vec<String>,
    amount_micros: i64,
    expires_at_ms: i64,
    /// The call's usage once sent: sent again, it is the same event.
    usage: Option<Sent>,
}

/// A budget a call is judged against: what it is, the refusal it gives,
/// spent and held this month, its limit.
struct ModelBudget {
    what: String,
    refusal: Reason,
    spent: i64,
    held: i64,
    limit: Option<i64>,
}

/// A membership: joined, and left (by the log's clock).
type Span = (i64, Option<i64>);

/// What a restart must keep of a counter (see [`Sim::snapshot`]).
type Kept = (i64, u64, i64, bool, u16, u32);

/// What the engine must hold.
#[derive(Debug)]
struct Model {
    /// Users by id: their limit.
    users: BTreeMap<String, Option<i64>>,
    /// The limits of the org ("org"), groups and keys, by id (none:
    /// unlimited).
    limits: BTreeMap<String, Option<i64>>,
    /// The org's alert thresholds.
    thresholds: Vec<u32>,
    /// Every event sent, by request id (to send again).
    sent: Vec<Sent>,
    /// Request ids counted.
    counted: HashMap<String, Sent>,
    /// (user, month) → (spend, requests).
    spend: HashMap<(String, Month), (i64, u64)>,
    /// (group, user) → the (joined, left] intervals of the log's clock in
    /// which the user was a member.
    memberships: HashMap<(String, String), Vec<Span>>,
    /// (group, month) → (spend, requests): its members' usage counted
    /// while they were members.
    group_spend: HashMap<(String, Month), (i64, u64)>,
    /// Live holds by request id.
    holds: BTreeMap<String, ModelHold>,
    /// Users suspended, and users whose key is revoked (for good): their
    /// usage still counts, their reserves are refused.
    suspended: std::collections::BTreeSet<String>,
    revoked: std::collections::BTreeSet<String>,
    /// The latest `occurred_at` counted.
    watermark: i64,
    next_id: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            users: BTreeMap::new(),
            limits: BTreeMap::new(),
            thresholds: DEFAULT_THRESHOLDS_BPS.to_vec(),
            sent: Vec::new(),
            counted: HashMap::new(),
            spend: HashMap::new(),
            memberships: HashMap::new(),
            group_spend: HashMap::new(),
            holds: BTreeMap::new(),
            suspended: Default::default(),
            revoked: Default::default(),
            watermark: 0,
            next_id: 0,
        }
    }

    fn limit(&self, id: &str) -> Option<i64> {
        self.limits.get(id).copied().flatten()
    }

    /// Whether `user` is in `group` now, as the directory has it.
    fn member(&self, group: &str, user: &str) -> bool {
        self.memberships
            .get(&(group.to_owned(), user.to_owned()))
            .and_then(|spans| spans.last())
            .is_some_and(|s| s.1.is_none())
    }

    fn group_spend(&self, group: &str, month: Month) -> (i64, u64) {
        self.group_spend
            .get(&(group.to_owned(), month))
            .copied()
            .unwrap_or_default()
    }

    fn org_spend(&self, month: Month) -> (i64, u64) {
        self.users.keys().fold((0, 0), |acc, u| {
            let s = self.spend(u, month);
            (acc.0 + s.0, acc.1 + s.1)
        })
    }

    /// The budgets a call of `user`'s is judged against at `now`.
    fn budgets(&self, user: &str, now_ms: i64) -> Vec<ModelBudget> {
        let month = Month::from_unix_ms(now_ms);
        let live = |h: &&ModelHold| h.expires_at_ms > now_ms;
        let held = |of: &dyn Fn(&ModelHold) -> bool| -> i64 {
            self.holds
                .values()
                .filter(live)
                .filter(|h| of(h))
                .map(|h| h.amount_micros)
                .sum()
        };
        let spent = self.spend(user, month).0;
        let by_user = held(&|h| h.user == user);
        let key = format!("k-{user}");
        let mut out = vec![
            ModelBudget {
                what: user.to_owned(),
                refusal: Reason::UserMonthlyLimit,
                spent,
                held: by_user,
                limit: self.users[user],
            },
            ModelBudget {
                limit: self.limit(&key),
                what: key,
                refusal: Reason::KeyMonthlyLimit,
                spent,
                held: by_user,
            },
            ModelBudget {
                what: "org".into(),
                refusal: Reason::OrgMonthlyLimit,
                spent: self.org_spend(month).0,
                held: held(&|_| true),
                limit: self.limit("org"),
            },
        ];
        for g in GROUPS.into_iter().filter(|g| self.member(g, user)) {
            out.push(ModelBudget {
                what: g.to_owned(),
                refusal: Reason::GroupMonthlyLimit,
                spent: self.group_spend(g, month).0,
                held: held(&|h| h.groups.iter().any(|x| x == g)),
                limit: self.limit(g),
            });
        }
        out
    }

    fn spend(&self, user: &str, month: Month) -> (i64, u64) {
        self.spend
            .get(&(user.to_owned(), month))
            .copied()
            .unwrap_or_default()
    }

    fn months(&self) -> Vec<Month> {
        let mut m: Vec<Month> = self.spend.keys().map(|(_, m)| *m).collect();
        m.sort_unstable();
        m.dedup();
        m
    }

    fn held(&self, user: &str, now_ms: i64) -> i64 {
        self.holds
            .values()
            .filter(|h| h.user == user && h.expires_at_ms > now_ms)
            .map(|h| h.amount_micros)
            .sum()
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }
}

fn secret(user: &str) -> String {
    format!("tly_sk_sim_{user}")
}

/// A running engine on the data in `dir`, as `tally serve --data-dir` wires
/// it: the meter recovered from the usage log, the hold journal read after.
struct Running {
    engine: Arc<Engine>,
    /// What the hold journal held at the start.
    restored: tally_engine::holds::Restored,
}

impl Running {
    /// The engine, its dedupe window capped at `dedupe_ids` request ids.
    async fn start(dir: &Path, clock: &ManualClock, dedupe_ids: usize) -> Running {
        Running::try_start(dir, clock, dedupe_ids).await.unwrap()
    }

    /// [`Running::start`], or why it could not.
    async fn try_start(
        dir: &Path,
        clock: &ManualClock,
        dedupe_ids: usize,
    ) -> Result<Running, String> {
        let options = tally_engine::EngineOptions {
            meter_config: meter_config(dedupe_ids),
            ..tally_engine::EngineOptions::default()
        };
        let (engine, restored) = support::try_embedded_with(dir, clock, options).await?;
        Ok(Running { engine, restored })
    }

    async fn run(&self, cmd: Command) {
        support::run(&self.engine, ORG, [cmd]).await;
    }

    async fn try_run(&self, cmd: &Command) -> tally_engine::Result<()> {
        support::try_run(&self.engine, ORG, cmd).await
    }
}

/// A second connection to the engine's database that makes its writes fail
/// on demand: a trigger per point of [`FAULT_POINTS`] aborts the write (and
/// so its transaction) while the point is armed.
async fn install_faults(dir: &Path) -> Faults {
    let db = support::second_connection(dir).await;
    let mut sql = "CREATE TABLE sim_faults (point TEXT PRIMARY KEY);".to_owned();
    for (i, (point, writes)) in FAULT_POINTS.iter().enumerate() {
        sql += &format!(
            "CREATE TRIGGER sim_fault_{i} {writes} WHEN EXISTS (SELECT 1 FROM sim_faults \
                 WHERE point = '{point}') BEGIN SELECT RAISE(ABORT, 'simulated fault: {point}'); \
                 END;"
        );
    }
    let _ = db.execute_raw(&sql).await.unwrap();
    Faults { db, armed: None }
}

struct Sim {
    seed: u64,
    /// The dedupe window's cap (see [`dedupe_ids_of`]).
    dedupe_ids: usize,
    step: u64,
    rng: Rng,
    clock: ManualClock,
    dir: PathBuf,
    model: Model,
    running: Option<Running>,
    faults: Faults,
    /// The file that fills the disk, while it is full.
    full: Option<PathBuf>,
    /// Declared after `running` and `faults`: unmounted once they closed
    /// their files.
    disk: Tmpfs,
    /// The last usage batch a fault refused, for the gateway to resend.
    unsent: Option<Vec<Sent>>,
    /// What happened, for a failure's report.
    trail: Vec<String>,
    /// How often each kind of thing happened, for the run's summary.
    stats: BTreeMap<&'static str, u64>,
}

impl Sim {
    async fn new(seed: u64) -> Sim {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tally-sim-{}-{run}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = Tmpfs::mount(&dir, DISK_SIZE);
        let clock = ManualClock::new(START_MS);
        let dedupe_ids = dedupe_ids_of(seed);
        let running = Running::start(&dir, &clock, dedupe_ids).await;
        running
            .run(Command::CreateOrg {
                name: "Acme".into(),
                default_monthly_limit_micros: None,
                alert_thresholds_bps: None,
                monthly_limit_micros: None,
            })
            .await;
        let model = Model::new();
        for g in GROUPS {
            running
                .run(Command::CreateGroup {
                    group_id: GroupId::new(g).unwrap(),
                    name: g.into(),
                    monthly_limit_micros: None,
                })
                .await;
        }
        let faults = install_faults(&dir).await;
        Sim {
            seed,
            dedupe_ids,
            step: 0,
            rng: Rng(seed),
            clock,
            dir,
            model,
            running: Some(running),
            faults,
            full: None,
            disk,
            unsent: None,
            trail: Vec::new(),
            stats: BTreeMap::new(),
        }
    }

    fn engine(&self) -> &Engine {
        &self.running.as_ref().expect("running").engine
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn note(&mut self, what: String) {
        self.trail.push(format!("step {}: {what}", self.step));
        if self.trail.len() > 24 {
            let _ = self.trail.remove(0);
        }
    }

    /// Fails with the seed, the step and the last steps taken.
    #[track_caller]
    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        assert!(
            ok,
            "seed {} step {}: {}\nreplay: TALLY_SIM_SEED={} TALLY_SIM_STEPS={} cargo test -p \
             tally-engine --test simulate\nlast steps:\n  {}",
            self.seed,
            self.step,
            what(),
            self.seed,
            self.step + 1,
            self.trail.join("\n  ")
        );
    }

    async fn step(&mut self) {
        self.step += 1;
        let users = self.model.users.len();
        // An operator frees space after a while.
        if self.full.is_some() && self.rng.chance(12) {
            self.free_disk();
        }
        match self.rng.below(100) {
            _ if users == 0 => self.add_user().await,
            // (Its two commands are not refused: never while the store
            // cannot write.)
            0..=7 if users < USERS_MAX && self.full.is_none() && !self.in_storage_fault() => {
                self.add_user().await
            }
            0..=8 if users > 0 => self.set_limit().await,
            9..=10 if users > 0 => self.bulk().await,
            11..=12 => self.set_other_limit().await,
            13..=14 => self.change_settings().await,
            15..=18 if users > 0 => self.membership().await,
            19 if users > 0 => self.status_or_revoke().await,
            0..=49 if users > 0 => self.usage().await,
            50..=69 if users > 0 => self.reserve().await,
            70..=79 if !self.model.holds.is_empty() => self.settle_or_release().await,
            70..=79 if users > 0 => self.usage().await,
            80..=89 => self.advance(),
            90..=93 => self.checkpoint().await,
            94..=95 if users > 0 && self.full.is_none() => {
                if self.rng.chance(40) {
                    self.fill_disk();
                } else {
                    self.fault().await;
                }
            }
            _ => self.crash_and_restart().await,
        }
        self.check_invariants();
    }

    /// The meter's tick: begins the month its clock is in, checkpoints,
    /// and during a storage fault probes the store. Once the disk has room
    /// again, the fault is over after it.
    async fn checkpoint(&mut self) {
        match self.engine().meter.tick().await {
            Ok(_) => {
                self.count("checkpoints");
                self.note("checkpoint".into());
                self.check_enforcement().await;
            }
            Err(e) => self.refused("checkpoint", &e),
        }
        if self.full.is_none() {
            let fault = self.engine().meter.health().fault();
            self.check(fault.is_none(), || {
                format!("the disk has room, and a tick left the storage fault: {fault:?}")
            });
        }
    }

    /// The disk fills up: the rest of the tmpfs is taken by a file (the
    /// durability points now fail for real, with SQLite's "database or
    /// disk is full" and ENOSPC, wherever a write needs a new page). The
    /// disk counts as full from here, while its last pages go.
    fn fill_disk(&mut self) {
        // Now and then a few pages are left, taken by the writes that come
        // next: the one that finds the disk full may be any of them.
        let leave = if self.rng.chance(50) {
            self.rng.between(1, 16) as u64
        } else {
            0
        };
        self.full = Some(self.disk.fill("filler", leave));
        self.count("disks filled");
        self.note(format!("the disk is full (but {leave} pages)"));
    }

    fn free_disk(&mut self) {
        let filler = self.full.take().expect("a full disk");
        std::fs::remove_file(filler).unwrap();
        self.note("the disk has room again".into());
    }

    /// A write that fails: work that reaches one durability point meets a
    /// fault there, then (half the time) the process dies right after.
    async fn fault(&mut self) {
        let (point, _) = FAULT_POINTS[self.rng.below(FAULT_POINTS.len() as u64) as usize];
        if point.starts_with("checkpoint") {
            // Something for the checkpoint to write.
            self.usage().await;
        }
        self.faults.arm(point).await;
        self.note(format!("fault armed: {point}"));
        match point {
            "usage log append" => self.usage().await,
            // Every limit command checkpoints the meter first.
            _ if point == "entity log append" || self.rng.chance(40) => match self.rng.below(4) {
                0 => self.set_limit().await,
                1 => self.bulk().await,
                2 => self.set_other_limit().await,
                _ => self.membership().await,
            },
            _ => self.checkpoint().await,
        }
        self.faults.disarm().await;
        self.count("faults");
        // A gateway answered 503 sends the same batch again, half the time
        // before the process dies.
        if let Some(batch) = self.unsent.take()
            && self.rng.chance(50)
        {
            self.note("the refused batch again".into());
            self.send_usage(batch).await;
            self.count("refused batches sent again");
        }
        if self.rng.chance(50) {
            self.check_invariants();
            self.crash_and_restart().await;
        }
    }

    /// Whether the engine is in a storage fault, refusing usage and
    /// commands until a write commits.
    fn in_storage_fault(&self) -> bool {
        self.engine().meter.health().fault().is_some()
    }

    /// Work the store refused: only while a fault is armed, and with its
    /// message; while the disk is full, for that; and while the engine is
    /// in a storage fault, without trying.
    fn refused(&mut self, what: &str, e: &tally_engine::Error) {
        let armed = self.faults.armed;
        let message = e.to_string();
        let explained = if matches!(e, tally_engine::Error::StoreFault(_)) {
            // Refused before trying: the fault an earlier write met.
            e.store_unavailable() == Some("the disk is full")
        } else if let Some(p) = armed {
            message.contains(&format!("simulated fault: {p}"))
        } else if self.full.is_some() {
            // A write of the database, or of the hold journal.
            e.store_unavailable() == Some("the disk is full")
                || message.contains("hold journal") && message.contains("No space left on device")
        } else {
            false
        };
        self.check(explained, || {
            format!(
                "{what} failed (armed: {armed:?}, disk full: {}): {e}",
                self.full.is_some()
            )
        });
        self.count("writes refused by a fault");
        if matches!(e, tally_engine::Error::StoreFault(_)) {
            self.count("refused in a storage fault");
        } else if let Some(point) = armed {
            self.count(point);
        } else {
            self.count("refused by a full disk");
        }
        self.note(format!("{what} refused: {e}"));
    }

    /// Runs one command; whether it was applied (it may be refused only by
    /// an armed fault).
    async fn command(&mut self, cmd: Command) -> bool {
        let in_fault = self.in_storage_fault();
        let result = self.running.as_ref().expect("running").try_run(&cmd).await;
        match result {
            Ok(()) => {
                self.check(!in_fault, || {
                    format!("{cmd:?} was applied during a storage fault")
                });
                true
            }
            Err(e) => {
                self.refused("command", &e);
                false
            }
        }
    }

    async fn add_user(&mut self) {
        let user = format!("u{}", self.model.users.len());
        let limit = self
            .rng
            .chance(70)
            .then(|| self.rng.between(1, 40) * 10_000);
        let running = self.running.as_ref().expect("running");
        running
            .run(Command::AddUser {
                user_id: UserId::new(&user).unwrap(),
                email: format!("{user}@acme.test"),
                name: user.clone(),
                monthly_limit_micros: Some(limit),
                activate: true,
            })
            .await;
        running
            .run(Command::CreateKey {
                key_id: KeyId::new(&format!("k-{user}")).unwrap(),
                name: "key".into(),
                user_id: Some(UserId::new(&user).unwrap()),
                group_ids: vec![],
                features: vec![],
                monthly_limit_micros: None,
                secret_hash: hash_secret(&secret(&user)),
                expires_at_ms: None,
            })
            .await;
        self.note(format!("add {user}, limit {limit:?}"));
        let _ = self.model.users.insert(user, limit);
    }

    fn pick_user(&mut self) -> String {
        let i = self.rng.below(self.model.users.len() as u64) as usize;
        self.model.users.keys().nth(i).expect("a user").clone()
    }

    /// A limit: none now and then, else $0.01 to $0.40.
    fn some_limit(&mut self) -> Option<i64> {
        self.rng
            .chance(80)
            .then(|| self.rng.between(1, 40) * 10_000)
    }

    async fn set_limit(&mut self) {
        let user = self.pick_user();
        let limit = self.some_limit();
        let cmd = Command::UpdateUser {
            user_id: UserId::new(&user).unwrap(),
            email: None,
            name: None,
            monthly_limit_micros: Some(limit),
            status: None,
        };
        if !self.command(cmd).await {
            return;
        }
        self.note(format!("limit of {user}: {limit:?}"));
        let _ = self.model.users.insert(user, limit);
    }

    /// One change of many users: a limit for all of them, and now and then
    /// a group they all join or leave (those already in or out stay).
    async fn bulk(&mut self) {
        let users: Vec<String> = self
            .model
            .users
            .keys()
            .filter(|_| self.rng.chance(50))
            .cloned()
            .collect();
        if users.is_empty() {
            return;
        }
        let limit = self.some_limit();
        let group = self
            .rng
            .chance(40)
            .then(|| GROUPS[self.rng.below(GROUPS.len() as u64) as usize]);
        let join = self.rng.chance(50);
        let now = self.now();
        let mut add_groups = vec![];
        let mut remove_groups = vec![];
        if let Some(g) = group {
            let id = GroupId::new(g).unwrap();
            if join {
                add_groups.push(id)
            } else {
                remove_groups.push(id)
            }
        }
        let cmd = Command::BulkUpdateUsers {
            user_ids: users.iter().map(|u| UserId::new(u).unwrap()).collect(),
            add_groups,
            remove_groups,
            monthly_limit_micros: Some(limit),
            reset_limit: false,
            status: None,
        };
        if !self.command(cmd).await {
            return;
        }
        if let Some(g) = group {
            for u in &users {
                let spans = self
                    .model
                    .memberships
                    .entry((g.to_owned(), u.clone()))
                    .or_default();
                let open = spans.last_mut().filter(|s| s.1.is_none());
                match (open, join) {
                    (Some(open), false) => open.1 = Some(now),
                    (None, true) => spans.push((now, None)),
                    _ => {}
                }
            }
        }
        self.count("bulk changes");
        self.note(format!(
            "bulk: limit {limit:?} for {users:?}, group {group:?} (join: {join})"
        ));
        for u in users {
            let _ = self.model.users.insert(u, limit);
        }
    }

    /// The limit of a group, a user's key or the org.
    async fn set_other_limit(&mut self) {
        let limit = self.some_limit();
        let (id, limit, cmd) = match self.rng.below(3) {
            0 => {
                let g = GROUPS[self.rng.below(GROUPS.len() as u64) as usize];
                let limit = limit.map(|l| l * GROUP_LIMIT_SCALE);
                let cmd = Command::UpdateGroup {
                    group_id: GroupId::new(g).unwrap(),
                    name: None,
                    monthly_limit_micros: Some(limit),
                };
                (g.to_owned(), limit, cmd)
            }
            1 if !self.model.users.is_empty() => {
                let user = self.pick_user();
                if self.model.revoked.contains(&user) {
                    // A revoked key takes no change.
                    return;
                }
                let key = format!("k-{user}");
                let cmd = Command::UpdateKey {
                    key_id: KeyId::new(&key).unwrap(),
                    features: None,
                    monthly_limit_micros: Some(limit),
                    name: None,
                    user_id: None,
                    group_ids: None,
                    expires_at_ms: None,
                    revoke: false,
                };
                (key, limit, cmd)
            }
            _ => {
                let limit = limit.map(|l| l * ORG_LIMIT_SCALE);
                let cmd = Command::ChangeSettings {
                    name: None,
                    default_monthly_limit_micros: None,
                    alert_thresholds_bps: None,
                    monthly_limit_micros: Some(limit),
                };
                ("org".to_owned(), limit, cmd)
            }
        };
        if !self.command(cmd).await {
            return;
        }
        self.count("limits of others");
        self.note(format!("limit of {id}: {limit:?}"));
        let _ = self.model.limits.insert(id, limit);
    }

    /// Other alert thresholds, with the org's limit in the same change now
    /// and then.
    async fn change_settings(&mut self) {
        const CHOICES: [u32; 6] = [2_500, 5_000, 7_500, 8_000, 9_000, 10_000];
        let mut thresholds: Vec<u32> = CHOICES
            .into_iter()
            .filter(|_| self.rng.chance(40))
            .collect();
        if thresholds.is_empty() {
            thresholds.push(CHOICES[self.rng.below(CHOICES.len() as u64) as usize]);
        }
        let org_limit = self
            .rng
            .chance(50)
            .then(|| self.some_limit().map(|l| l * ORG_LIMIT_SCALE));
        let cmd = Command::ChangeSettings {
            name: None,
            default_monthly_limit_micros: None,
            alert_thresholds_bps: Some(thresholds.clone()),
            monthly_limit_micros: org_limit,
        };
        if !self.command(cmd).await {
            return;
        }
        self.count("settings changes");
        self.note(format!(
            "thresholds {thresholds:?}, org limit {org_limit:?}"
        ));
        self.model.thresholds = thresholds;
        if let Some(limit) = org_limit {
            let _ = self.model.limits.insert("org".into(), limit);
        }
    }

    /// A user is suspended or active again, or (rarely: for good) the
    /// user's key is revoked.
    async fn status_or_revoke(&mut self) {
        let user = self.pick_user();
        if self.rng.chance(15) && !self.model.revoked.contains(&user) {
            let cmd = Command::UpdateKey {
                key_id: KeyId::new(&format!("k-{user}")).unwrap(),
                features: None,
                monthly_limit_micros: None,
                name: None,
                user_id: None,
                group_ids: None,
                expires_at_ms: None,
                revoke: true,
            };
            if self.command(cmd).await {
                self.count("keys revoked");
                self.note(format!("k-{user} revoked"));
                let _ = self.model.revoked.insert(user);
            }
            return;
        }
        let suspend = !self.model.suspended.contains(&user);
        let status = if suspend {
            tally_core::entity::UserStatus::Suspended
        } else {
            tally_core::entity::UserStatus::Active
        };
        let cmd = Command::UpdateUser {
            user_id: UserId::new(&user).unwrap(),
            email: None,
            name: None,
            monthly_limit_micros: None,
            status: Some(status),
        };
        if !self.command(cmd).await {
            return;
        }
        self.count("status changes");
        self.note(format!("{user} {status:?}"));
        if suspend {
            let _ = self.model.suspended.insert(user);
        } else {
            let _ = self.model.suspended.remove(&user);
        }
    }

    /// A user joins or leaves a group.
    async fn membership(&mut self) {
        let user = self.pick_user();
        let group = GROUPS[self.rng.below(GROUPS.len() as u64) as usize];
        let (group_id, user_id) = (GroupId::new(group).unwrap(), UserId::new(&user).unwrap());
        let now = self.now();
        let key = (group.to_owned(), user.clone());
        // A member now: the last membership has not ended.
        let member = self
            .model
            .memberships
            .get(&key)
            .and_then(|spans| spans.last())
            .is_some_and(|s| s.1.is_none());
        let cmd = if member {
            Command::RemoveMember { group_id, user_id }
        } else {
            Command::AddMember { group_id, user_id }
        };
        self.note(format!("{cmd:?}"));
        if !self.command(cmd).await {
            return;
        }
        let spans = self.model.memberships.entry(key).or_default();
        match spans.last_mut().filter(|s| s.1.is_none()) {
            Some(open) => open.1 = Some(now),
            None => spans.push((now, None)),
        }
    }

    /// A batch of new events, repeats of sent ones and the usage of live
    /// holds, late by up to half an hour (see [`Sim::lateness`]).
    async fn usage(&mut self) {
        // A gateway answered 503 sends the batch again later.
        if self.unsent.is_some() && self.rng.chance(30) {
            let batch = self.unsent.take().expect("a refused batch");
            self.note("a refused batch again, later".into());
            self.count("refused batches sent again later");
            return self.send_usage(batch).await;
        }
        let now = self.now();
        let n = self.rng.between(1, 12);
        let mut batch: Vec<Sent> = Vec::new();
        for _ in 0..n {
            let sent = if !self.model.sent.is_empty() && self.rng.chance(25) {
                let i = self.rng.below(self.model.sent.len() as u64) as usize;
                self.model.sent[i].clone()
            } else if !self.model.holds.is_empty() && self.rng.chance(20) {
                let i = self.rng.below(self.model.holds.len() as u64) as usize;
                // The actual cost, above or below what was held.
                let cost = self.rng.between(-5_000, 5_000);
                let late = self.lateness();
                let (id, h) = self.model.holds.iter_mut().nth(i).expect("a hold");
                h.usage
                    .get_or_insert_with(|| Sent {
                        request_id: id.clone(),
                        user: h.user.clone(),
                        cost_micros: (h.amount_micros + cost).max(1),
                        occurred_at_ms: now - late,
                    })
                    .clone()
            } else {
                // Now and then from a gateway whose clock runs ahead, by up
                // to twice the skew allowed.
                let at = if self.rng.chance(4) {
                    now + self.rng.between(0, 2 * FUTURE_SKEW_MS)
                } else {
                    now - self.lateness()
                };
                Sent {
                    request_id: self.model.id("e"),
                    user: self.pick_user(),
                    cost_micros: self.rng.between(1, 20_000),
                    occurred_at_ms: at,
                }
            };
            batch.push(sent);
        }
        self.send_usage(batch).await;
    }

    /// How late a new event is: up to half an hour; under a small dedupe
    /// window mostly within a minute and a half, so that its last minute
    /// often holds more ids than its cap (a restart must keep them all, as
    /// the live window does).
    fn lateness(&mut self) -> i64 {
        let within = if self.dedupe_ids == SMALL_DEDUPE_IDS && self.rng.chance(80) {
            90_000
        } else {
            30 * MINUTE
        };
        self.rng.between(0, within)
    }

    /// Sends a batch and checks the answer against the model.
    async fn send_usage(&mut self, batch: Vec<Sent>) {
        let now = self.now();
        let n = batch.len();
        let events: Vec<(usize, UsageEvent)> = batch
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = format!("k-{}", s.user);
                let e = RawUsage {
                    request_id: &s.request_id,
                    org_id: ORG,
                    user_id: &s.user,
                    api_key_id: &key,
                    model: model_of(&s.request_id).0,
                    provider: model_of(&s.request_id).1,
                    cost_micros: Some(s.cost_micros),
                    occurred_at_ms: Some(s.occurred_at_ms),
                    ..RawUsage::default()
                }
                .validate()
                .unwrap();
                (i, e)
            })
            .collect();
        let in_fault = self.in_storage_fault();
        let report = match self.engine().ingest(events).await {
            Ok(report) => {
                self.check(!in_fault, || {
                    "usage was accepted during a storage fault".into()
                });
                report
            }
            Err(e) => {
                self.refused("usage", &e);
                self.unsent = Some(batch);
                return;
            }
        };
        // Which events were counted before this batch.
        let before: Vec<bool> = batch
            .iter()
            .map(|s| self.model.counted.contains_key(&s.request_id))
            .collect();
        self.count("usage batches");
        if batch
            .iter()
            .any(|s| Month::from_unix_ms(s.occurred_at_ms) != Month::from_unix_ms(now))
        {
            self.count("batches with last month's usage");
        }
        // Refused events are not counted (which ones may be is checked
        // below).
        let refused: Vec<usize> = report.rejected.iter().map(|r| r.index).collect();
        // The org's watermark as each event was judged: counted events move
        // it, in the batch's order.
        let mut judged_at: Vec<i64> = Vec::with_capacity(batch.len());
        let mut new = 0;
        for (i, s) in batch.iter().enumerate() {
            judged_at.push(self.model.watermark);
            if self.model.counted.contains_key(&s.request_id) || refused.contains(&i) {
                continue;
            }
            new += 1;
            let _ = self.model.counted.insert(s.request_id.clone(), s.clone());
            self.model.watermark = self.model.watermark.max(s.occurred_at_ms);
            let e = self
                .model
                .spend
                .entry((s.user.clone(), Month::from_unix_ms(s.occurred_at_ms)))
                .or_default();
            e.0 += s.cost_micros;
            e.1 += 1;
            // Membership is judged at the log's time (now), in (joined, left].
            let month = Month::from_unix_ms(s.occurred_at_ms);
            for g in GROUPS {
                let member = self
                    .model
                    .memberships
                    .get(&(g.to_owned(), s.user.clone()))
                    .is_some_and(|spans| {
                        spans
                            .iter()
                            .any(|&(joined, left)| joined < now && left.is_none_or(|l| now <= l))
                    });
                if member {
                    let e = self
                        .model
                        .group_spend
                        .entry((g.to_owned(), month))
                        .or_default();
                    e.0 += s.cost_micros;
                    e.1 += 1;
                }
            }
            // Counting its usage settles a hold.
            if self.model.holds.remove(&s.request_id).is_some() {
                self.count("holds settled");
            }
            if !self.model.sent.iter().any(|x| x.request_id == s.request_id) {
                self.model.sent.push(s.clone());
            }
        }
        self.note(format!(
            "usage: {n} events, {new} new; engine accepted {} duplicates {} rejected {:?}",
            report.accepted, report.duplicates, report.rejected
        ));
        // Only usage about the dedupe window behind the org's latest usage
        // is refused (too late: it may have been counted, and is never
        // counted twice; the window is kept in buckets of a minute, so its
        // line is within a minute of it). A new event is at most half an
        // hour late when first sent, but a batch the store refused may be
        // sent again hours later. Past a small cap the window keeps only the last minute or
        // two: usage older than a minute behind the watermark, new or not,
        // may be refused, never newer usage. Each is judged by the
        // watermark it met (the batch's events before it may have moved it).
        if !report.rejected.is_empty() {
            self.count("batches with too-late usage");
        }
        let small = self.dedupe_ids == SMALL_DEDUPE_IDS;
        // Usage dated further ahead of the clock than the skew allowed is
        // refused (from the future: it may come again), and only that.
        for (i, s) in batch.iter().enumerate() {
            let future = s.occurred_at_ms > now + FUTURE_SKEW_MS;
            let refused = report
                .rejected
                .iter()
                .any(|r| r.index == i && r.code == "from_the_future");
            self.check(future == refused, || {
                format!(
                    "{} occurred at {} (now {now}): refused from the future: {refused}",
                    s.request_id, s.occurred_at_ms
                )
            });
        }
        for r in report
            .rejected
            .iter()
            .filter(|r| r.code != "from_the_future")
        {
            let s = &batch[r.index];
            let watermark = judged_at[r.index];
            let too_late = if small {
                s.occurred_at_ms < watermark - MINUTE
            } else {
                s.occurred_at_ms < watermark - DEDUPE_WINDOW_MS + MINUTE
            };
            self.check(r.code == "too_late" && too_late, || {
                format!(
                    "{} (occurred at {}, counted before: {}) rejected: {r:?}; now {now}, watermark \
                     {watermark}",
                    s.request_id, s.occurred_at_ms, before[r.index]
                )
            });
        }
        self.check(report.accepted == new, || {
            format!("accepted {} of {new} new events", report.accepted)
        });
    }

    async fn reserve(&mut self) {
        let user = self.pick_user();
        let amount = if self.rng.chance(5) {
            0
        } else {
            self.rng.between(1, 60_000)
        };
        let ttl = self.rng.between(1, 20) * MINUTE;
        let request_id = self.model.id("h");
        let now = self.now();
        // Spent and held as the engine decides on them: holds past their
        // TTL are gone.
        let budgets = self.model.budgets(&user, now);
        let reserved = self
            .engine()
            .reserve(
                &secret(&user),
                None,
                None,
                HoldRequest {
                    request_id: &request_id,
                    reserve_micros: amount,
                    ttl_ms: ttl,
                },
            )
            .await;
        // The hold journal may not take its line: then no hold is placed.
        let (_, d, placed) = match reserved {
            Ok(r) => r,
            Err(e) => return self.refused("reserve", &e),
        };
        let shown: Vec<String> = budgets
            .iter()
            .map(|b| format!("{} {}+{}/{:?}", b.what, b.spent, b.held, b.limit))
            .collect();
        self.note(format!(
            "reserve {request_id} {amount} for {user} ({shown:?}): {:?}",
            d.reason
        ));
        self.count(if d.allowed {
            "reserves admitted"
        } else {
            d.reason.as_str()
        });
        // A reached limit refuses even a reserve of 0.
        let passes = |b: &ModelBudget| {
            b.limit
                .is_none_or(|l| b.spent < l && b.spent + b.held + amount <= l)
        };
        // A revoked key is refused first, then a user not active, whatever
        // the budgets; their usage still counts.
        let revoked = self.model.revoked.contains(&user);
        let suspended = self.model.suspended.contains(&user);
        if revoked || suspended {
            let want = if revoked {
                Reason::KeyRevoked
            } else {
                Reason::UserNotActive
            };
            self.check(!d.allowed && d.reason == want, || {
                format!(
                    "a reserve of {user} (key revoked: {revoked}, suspended: {suspended}): {d:?}"
                )
            });
            return;
        }
        if d.allowed {
            self.check(placed.is_some(), || "admitted without a hold".into());
            for b in &budgets {
                self.check(passes(b), || {
                    format!(
                        "admitted: {} + {} + {amount} against {}'s {:?}",
                        b.spent, b.held, b.what, b.limit
                    )
                });
            }
            let groups = GROUPS
                .into_iter()
                .filter(|g| self.model.member(g, &user))
                .map(str::to_owned)
                .collect();
            let _ = self.model.holds.insert(
                request_id,
                ModelHold {
                    user,
                    groups,
                    amount_micros: amount,
                    expires_at_ms: now + ttl,
                    usage: None,
                },
            );
        } else {
            let failing = budgets.iter().any(|b| b.refusal == d.reason && !passes(b));
            self.check(failing, || {
                format!("refused for {:?}, which every budget passes", d.reason)
            });
        }
    }

    async fn settle_or_release(&mut self) {
        let i = self.rng.below(self.model.holds.len() as u64) as usize;
        let id = self.model.holds.keys().nth(i).expect("a hold").clone();
        // The hold journal may not take the release: then the hold stays.
        let found = match self.engine().release(ORG, &id).await {
            Ok(found) => found,
            Err(e) => return self.refused("release", &e),
        };
        let h = self.model.holds.remove(&id).expect("a hold");
        let live = h.expires_at_ms > self.now();
        self.count("releases");
        self.note(format!("release {id} (live: {live}): {found:?}"));
        if live {
            self.check(
                found
                    == tally_engine::holds::ReleaseFound::Released {
                        held_micros: h.amount_micros,
                    },
                || format!("released a live hold: {found:?}"),
            );
        }
    }

    /// The clock moves on, by seconds to an hour; the meter starts a new
    /// month as its run loop would.
    fn advance(&mut self) {
        let by = match self.rng.below(100) {
            0..=79 => self.rng.between(1, 300) * 1_000,
            80..=96 => self.rng.between(5, 60) * MINUTE,
            // Past the dedupe window now and then: old months leave
            // memory, old repeats come too late.
            _ => self.rng.between(6, 30) * 60 * MINUTE,
        };
        self.clock.set(self.now() + by);
        // Most often the meter's tick begins a new month at once; now and
        // then usage of the new month comes first (the tick's next round,
        // a checkpoint step here, begins it).
        let tick = self.rng.chance(70);
        if tick {
            self.engine().meter.new_month();
        }
        // The upkeep frees expired holds every second; until it runs, an
        // expired hold is freed when something needs its budget.
        let upkeep = self.rng.chance(70);
        if upkeep {
            self.engine().hold_upkeep();
            let now = self.now();
            self.model.holds.retain(|_, h| h.expires_at_ms > now);
        }
        self.note(format!("clock +{by} ms (tick: {tick}, upkeep: {upkeep})"));
    }

    async fn crash_and_restart(&mut self) {
        let before = self.snapshot();
        // Dropped as a kill would leave it: nothing flushed, nothing closed.
        drop(self.running.take());
        let running = match Running::try_start(&self.dir, &self.clock, self.dedupe_ids).await {
            Ok(running) => running,
            Err(e) => {
                // Only a full disk keeps it from starting; it starts once an
                // operator freed space.
                self.check(self.full.is_some(), || format!("the restart failed: {e}"));
                self.check(
                    e.contains("No space left on device") || e.contains("disk is full"),
                    || format!("the restart on a full disk failed for another reason: {e}"),
                );
                self.count("restarts refused by a full disk");
                self.note(format!("restart refused: {e}"));
                self.free_disk();
                Running::start(&self.dir, &self.clock, self.dedupe_ids).await
            }
        };
        running.engine.meter.new_month();
        // Every line of the hold journal reads back (a torn last line,
        // never answered, is not counted), and names what is known.
        let restored = running.restored;
        self.running = Some(running);
        self.check(restored.unreadable == 0 && restored.orphaned == 0, || {
            format!("the hold journal read back {restored:?}")
        });
        let after = self.snapshot();
        if before != after {
            let differ: Vec<_> = before
                .iter()
                .filter(|(k, v)| after.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k:?}: {v:?} before, {:?} after", after.get(k)))
                .collect();
            self.check(false, || format!("the restart changed {differ:?}"));
        }
        self.count("crashes");
        self.note("crash and restart".into());
    }

    /// The read models of users, groups and keys this month, as admins
    /// list them.
    async fn views(&self) -> String {
        let db = &self.engine().db;
        let org = tally_core::ids::OrgId::new(ORG).unwrap();
        let month = Month::from_unix_ms(self.now());
        let q = tally_store::query::UserListQuery {
            sort: tally_store::query::UserSort::Name,
            descending: false,
            filter: tally_store::query::UserFilter::default(),
            after: None,
            limit: 100,
            month,
        };
        let (users, _) = db.list_users(&org, &q).await.unwrap();
        for u in &users {
            let want = self.model.spend(&u.id, month);
            self.check((u.spend_micros, u.requests as u64) == want, || {
                format!(
                    "{}'s read model: spend {} requests {}, the model {want:?}",
                    u.id, u.spend_micros, u.requests
                )
            });
        }
        let groups = db.list_groups(&org, month, None, None, 100).await.unwrap();
        let keys = db.list_keys(&org, month, None, None, 100).await.unwrap();
        format!("{users:?}\n{groups:?}\n{keys:?}")
    }

    /// At the end of a run: after a last checkpoint, the read models agree
    /// with the model, and rebuilding them from the entity log (offline,
    /// as `tally rebuild-projections` does) gives the same ones; counting
    /// the whole usage log again (never purged here) gives the same spend
    /// and usage rows, byte for byte, as live counting with its crashes,
    /// faults and restarts wrote.
    async fn rebuild_and_compare(&mut self) {
        self.step += 1;
        if self.full.is_some() {
            self.free_disk();
        }
        let _ = self.engine().meter.tick().await.unwrap();
        self.check_enforcement().await;
        let before = self.views().await;
        drop(self.running.take());
        let db = tally_store::Db::open(&tally_store::DbOptions::new(format!(
            "sqlite://{}?mode=rwc",
            self.dir.join("tally.db").display()
        )))
        .await
        .unwrap();
        let rows_before = metered_rows(&db).await;
        let rebuilt = db
            .rebuild_projections(meter_config(self.dedupe_ids), |_| {})
            .await
            .unwrap();
        self.check(
            matches!(rebuilt.usage, tally_store::recount::Recount::Counted { .. }),
            || format!("the usage log was not counted again: {rebuilt:?}"),
        );
        let rows_after = metered_rows(&db).await;
        self.check(rows_before.iter().all(|t| !t.is_empty()), || {
            format!("nothing to compare in some table: {rows_before:?}")
        });
        if rows_before[2].iter().any(|r| r.contains(" other ")) {
            let _ = OTHER_RECOUNTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        db.close().await;
        for (table, (live, recounted)) in rows_before.iter().zip(&rows_after).enumerate() {
            self.check(live == recounted, || {
                let gone: Vec<_> = live.iter().filter(|r| !recounted.contains(r)).collect();
                let new: Vec<_> = recounted.iter().filter(|r| !live.contains(r)).collect();
                format!("recounted rows of table {table} differ: live only {gone:?}, recount only {new:?}")
            });
        }
        self.running = Some(Running::start(&self.dir, &self.clock, self.dedupe_ids).await);
        let after = self.views().await;
        self.check(before == after, || {
            format!("rebuilt read models differ:\n{before}\n---\n{after}")
        });
    }

    /// Every counter of every subject in the months that can still receive
    /// usage, and what holds hold on every user: (spend, requests, latest
    /// usage, cut off, the highest threshold fired, and the count of cutoffs
    /// and lifts). A restart must keep all of it: what a limit change did
    /// to enforcement too, since a command that changes a limit checkpoints
    /// the meter first and a restart re-judges the checkpoint as of the
    /// change (seed 1 failed at step 102 before: thresholds fired and
    /// cutoffs and lifts counted live were 0 after the restart).
    fn snapshot(&self) -> BTreeMap<(String, Month), Kept> {
        let cell = self.engine().registry.org(ORG).expect("the org");
        let org = cell.read();
        let open = Month::from_unix_ms(self.model.watermark - DEDUPE_WINDOW_MS);
        let mut subjects = vec![("org".to_owned(), Subject::Org)];
        for user in self.model.users.keys() {
            for (kind, id) in [
                (SubjectKind::User, user.clone()),
                (SubjectKind::Key, format!("k-{user}")),
            ] {
                subjects.push((id.clone(), org.subject(kind, &id).expect("a subject")));
            }
        }
        for g in GROUPS {
            subjects.push((
                g.to_owned(),
                org.subject(SubjectKind::Group, g).expect("a group"),
            ));
        }
        let mut out = BTreeMap::new();
        for month in self.model.months().into_iter().filter(|m| *m >= open) {
            for (id, s) in &subjects {
                let c = org.spend(month, *s);
                let _ = out.insert(
                    (id.clone(), month),
                    (
                        c.spend_micros,
                        c.requests,
                        c.last_at_ms,
                        c.cut_off,
                        c.fired_bps,
                        c.ordinal,
                    ),
                );
            }
        }
        // What holds hold on every budget, and every live hold as placed:
        // its amount, expiry, user, key and the groups it is held on.
        // (Expired holds hold nothing, freed yet or not: a restart drops
        // them.)
        let never = Month::from_unix_ms(0);
        let now = self.now();
        let live: Vec<_> = org
            .meter
            .holds
            .iter()
            .filter(|(_, h)| h.expires_at_ms > now)
            .collect();
        for (id, s) in &subjects {
            let held = live
                .iter()
                .filter(|(_, h)| match *s {
                    Subject::Org => true,
                    Subject::User(u) => h.user == u,
                    Subject::Key(k) => h.key == k,
                    Subject::Group(g) => h.groups.contains(&g),
                })
                .map(|(_, h)| h.amount_micros)
                .sum::<i64>();
            let _ = out.insert((format!("held by {id}"), never), (held, 0, 0, false, 0, 0));
        }
        for (id, h) in live {
            let dir = &org.dir;
            let groups: Vec<&str> = h
                .groups
                .iter()
                .map(|&g| dir.group_ids[g as usize].as_str())
                .collect();
            let _ = out.insert(
                (
                    format!(
                        "hold {id} of {} on {} and {groups:?}",
                        dir.user_ids[h.user as usize], dir.key_ids[h.key as usize]
                    ),
                    never,
                ),
                (h.amount_micros, 0, h.expires_at_ms, false, 0, 0),
            );
        }
        // The dedupe window: its ids, its too-late line, the watermark.
        let _ = out.insert(
            ("dedupe window".to_owned(), Month::from_unix_ms(0)),
            (
                org.meter.dedupe.floor_minute(),
                org.meter.dedupe.len() as u64,
                org.meter.watermark_ms,
                false,
                0,
                0,
            ),
        );
        out
    }

    fn check_invariants(&self) {
        let engine = self.engine();
        let now = self.now();
        let this_month = Month::from_unix_ms(now);
        let cell = engine.registry.org(ORG).expect("the org");
        let org = cell.read();
        // Months that can no longer receive usage (before the dedupe
        // window behind the watermark) leave memory at a checkpoint: the
        // store has them.
        let open = Month::from_unix_ms(self.model.watermark - DEDUPE_WINDOW_MS);
        for month in self.model.months().into_iter().filter(|m| *m >= open) {
            let mut org_spend = (0, 0);
            for user in self.model.users.keys() {
                let want = self.model.spend(user, month);
                org_spend.0 += want.0;
                org_spend.1 += want.1;
                for (kind, id) in [
                    (SubjectKind::User, user.clone()),
                    (SubjectKind::Key, format!("k-{user}")),
                ] {
                    let s = org.subject(kind, &id).expect("a subject");
                    let c = org.spend(month, s);
                    self.check((c.spend_micros, c.requests) == want, || {
                        format!(
                            "{kind:?} {id} in {month}: spend {} requests {}, the model {want:?}",
                            c.spend_micros, c.requests
                        )
                    });
                }
            }
            for g in GROUPS {
                let want = self
                    .model
                    .group_spend
                    .get(&(g.to_owned(), month))
                    .copied()
                    .unwrap_or_default();
                let c = org.spend(month, org.subject(SubjectKind::Group, g).expect("a group"));
                self.check((c.spend_micros, c.requests) == want, || {
                    format!(
                        "group {g} in {month}: spend {} requests {}, the model {want:?}",
                        c.spend_micros, c.requests
                    )
                });
            }
            let c = org.spend(month, Subject::Org);
            self.check((c.spend_micros, c.requests) == org_spend, || {
                format!(
                    "the org in {month}: spend {} requests {}, the model {org_spend:?}",
                    c.spend_micros, c.requests
                )
            });
        }
        self.check_budgets(&org, this_month);
        for user in self.model.users.keys() {
            let s = org.subject(SubjectKind::User, user).expect("a user");
            let held = org.meter.holds.held(s);
            let want = self.model.held(user, now);
            // Expired holds are freed lazily: at most those still count.
            let lazily: i64 = self
                .model
                .holds
                .values()
                .filter(|h| &h.user == user && h.expires_at_ms <= now)
                .map(|h| h.amount_micros)
                .sum();
            self.check(held >= want && held <= want + lazily, || {
                format!("{user} holds {held}, the model {want} (+{lazily} expired)")
            });
        }
    }
}

impl Sim {
    /// What receivers of the enforcement events (webhooks, the audit list)
    /// have been told, right after a checkpoint wrote them: for every
    /// subject, its last cutoff or lift (in the order they were stored:
    /// SQLite's rowid) says it is blocked exactly when it is cut off this
    /// month (never a
    /// block that no longer applies, as a late cutoff of a closed month
    /// would leave without its lift), and the highest threshold event of
    /// each subject and month is the threshold its counter has fired (each
    /// one once: the store's key).
    async fn check_enforcement(&self) {
        use sqlx::Connection as _;
        let url = format!("sqlite://{}", self.dir.join("tally.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        type Row = (String, String, i64, String, i64, i64, i64, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT subject_kind, subject_id, month, event, threshold_bps, ordinal, rowid, reason \
             FROM enforcement_events WHERE org_id = ?",
        )
        .bind(ORG)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        // (kind, id) → (rowid, month, ordinal, a cutoff) of its last cutoff
        // or lift; (kind, id, month) → the highest threshold event.
        let mut last: BTreeMap<(String, String), (i64, i64, i64, bool)> = BTreeMap::new();
        let mut fired: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
        // (kind, id, month) → its forecast alerts (at most one).
        let mut forecasts: BTreeMap<(String, String, i64), usize> = BTreeMap::new();
        // (kind, id, month) → the (ordinal, a cutoff) of its month's own
        // cutoffs and lifts (a new month's lifts of the month before aside).
        let mut owned: BTreeMap<(String, String, i64), Vec<(i64, bool)>> = BTreeMap::new();
        for (kind, id, month, event, bps, ordinal, rowid, reason) in rows {
            if event == "threshold_crossed" {
                let top = fired.entry((kind, id, month)).or_default();
                *top = (*top).max(bps);
                continue;
            }
            if event == "forecast_over_limit" {
                *forecasts.entry((kind, id, month)).or_default() += 1;
                continue;
            }
            if reason.as_deref() != Some("new_month") {
                owned
                    .entry((kind.clone(), id.clone(), month))
                    .or_default()
                    .push((ordinal, event == "cut_off"));
            }
            let told = (rowid, month, ordinal, event == "cut_off");
            let at = last.entry((kind, id)).or_insert(told);
            *at = (*at).max(told);
        }
        let cell = self.engine().registry.org(ORG).expect("the org");
        let org = cell.read();
        let this_month = Month::from_unix_ms(self.now());
        let open = Month::from_unix_ms(self.model.watermark - DEDUPE_WINDOW_MS);
        let mut subjects = vec![(SubjectKind::Org, ORG.to_owned())];
        for user in self.model.users.keys() {
            subjects.push((SubjectKind::User, user.clone()));
            subjects.push((SubjectKind::Key, format!("k-{user}")));
        }
        subjects.extend(GROUPS.map(|g| (SubjectKind::Group, g.to_owned())));
        for (kind, id) in subjects {
            let s = org.subject(kind, &id).expect("a subject");
            let key = (kind.as_str().to_owned(), id);
            let told = last.get(&key).copied();
            let cut = org.spend(this_month, s).cut_off;
            self.check(told.is_some_and(|t| t.3) == cut, || {
                format!(
                    "{key:?} is cut off in {this_month}: {cut}, but its last cutoff or lift \
                     stored is {told:?} (rowid, month, ordinal, a cutoff)"
                )
            });
            for month in self.model.months().into_iter().filter(|m| *m >= open) {
                let c = org.spend(month, s);
                // Each cutoff and lift exactly once: one for each of the
                // counter's ordinals 1..=k, a cutoff at each odd one.
                let cell = (key.0.clone(), key.1.clone(), i64::from(month.yyyymm()));
                let mut told = owned.get(&cell).cloned().unwrap_or_default();
                told.sort_unstable();
                let want: Vec<(i64, bool)> = (1..=i64::from(c.ordinal))
                    .map(|k| (k, k % 2 == 1))
                    .collect();
                self.check(told == want, || {
                    format!(
                        "{key:?} in {month} at ordinal {} has stored cutoffs and lifts {told:?} \
                         (ordinal, a cutoff)",
                        c.ordinal
                    )
                });
                let stored = forecasts.get(&cell).copied().unwrap_or(0);
                self.check(stored == usize::from(c.forecast_fired), || {
                    format!(
                        "{key:?} in {month}: forecast fired {}, {stored} forecast events stored",
                        c.forecast_fired
                    )
                });
                let stored = fired.get(&cell).copied().unwrap_or(0);
                self.check(stored == i64::from(c.fired_bps), || {
                    format!(
                        "{key:?} in {month} fired {} bps, the highest stored threshold event is \
                         {stored}",
                        c.fired_bps
                    )
                });
            }
        }
    }

    /// This month, every subject is cut off exactly when it has a limit and
    /// its spend has reached it, and every threshold its spend has reached
    /// has fired.
    fn check_budgets(&self, org: &tally_core::org::OrgState, month: Month) {
        let m = &self.model;
        let mut budgets = vec![(
            Subject::Org,
            "org".to_owned(),
            m.org_spend(month).0,
            m.limit("org"),
        )];
        for (user, limit) in &m.users {
            let spent = m.spend(user, month).0;
            let key = format!("k-{user}");
            budgets.push((
                org.subject(SubjectKind::User, user).unwrap(),
                user.clone(),
                spent,
                *limit,
            ));
            budgets.push((
                org.subject(SubjectKind::Key, &key).unwrap(),
                key.clone(),
                spent,
                m.limit(&key),
            ));
        }
        for g in GROUPS {
            let spent = m.group_spend(g, month).0;
            budgets.push((
                org.subject(SubjectKind::Group, g).unwrap(),
                g.to_owned(),
                spent,
                m.limit(g),
            ));
        }
        for (s, id, spent, limit) in budgets {
            let c = org.spend(month, s);
            let cut = limit.is_some_and(|l| spent >= l);
            self.check(c.cut_off == cut, || {
                format!(
                    "{id} in {month}: cut off {} with spend {spent} and limit {limit:?}",
                    c.cut_off
                )
            });
            let Some(limit) = limit else { continue };
            let due = m
                .thresholds
                .iter()
                .copied()
                .filter(|&t| reached(spent, limit, t))
                .max()
                .unwrap_or(0);
            self.check(u32::from(c.fired_bps) >= due, || {
                format!(
                    "{id} in {month}: spend {spent} of {limit} reached {due} bps of {:?}, fired {}",
                    m.thresholds, c.fired_bps
                )
            });
            // A projection is never under the spend: reaching the limit
            // fired the forecast alert at the latest.
            self.check(!cut || c.forecast_fired, || {
                format!("{id} in {month}: spend {spent} reached {limit}, no forecast alert")
            });
        }
    }
}

/// Runs whose recount met usage counted under `other` (the suite's seeds
/// must reach it).
static OTHER_RECOUNTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Every row of spend_monthly, spend_daily and usage_daily, as text, in
/// key order.
async fn metered_rows(db: &tally_store::Db) -> [Vec<String>; 3] {
    let text = |cols: &str| cols.split(", ").collect::<Vec<_>>().join(" || ' ' || ");
    let monthly = text(
        "org_id, kind, subject_id, month, spend_micros, requests, last_at_ms, fired_bps, \
         cut_off, ordinal, first_day, forecast_fired, judged_at_ms",
    );
    let daily = text("org_id, kind, subject_id, day, spend_micros, requests");
    let usage = text(
        "org_id, kind, subject_id, day, model, provider, spend_micros, requests, \
         input_tokens, output_tokens",
    );
    let mut out: [Vec<String>; 3] = Default::default();
    for (i, (cols, table)) in [
        (monthly, "spend_monthly"),
        (daily, "spend_daily"),
        (usage, "usage_daily"),
    ]
    .into_iter()
    .enumerate()
    {
        out[i] = db
            .query_text(&format!("SELECT {cols} FROM {table} ORDER BY 1"))
            .await
            .unwrap();
    }
    out
}

async fn run_seeds(seeds: Vec<u64>, steps: u64) {
    let mut refused_at: BTreeMap<&'static str, u64> = BTreeMap::new();
    let all = seeds.len() >= SEEDS.count();
    for seed in seeds {
        let mut sim = Sim::new(seed).await;
        for _ in 0..steps {
            sim.step().await;
        }
        sim.rebuild_and_compare().await;
        let counted = sim.model.counted.len();
        let dir = sim.dir.clone();
        let months = sim.model.months().len();
        let stats = std::mem::take(&mut sim.stats);
        for (point, _) in FAULT_POINTS {
            *refused_at.entry(point).or_default() += stats.get(point).copied().unwrap_or(0);
        }
        drop(sim);
        eprintln!(
            "seed {seed}: {steps} steps, {counted} events counted in {months} months; {stats:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    eprintln!("writes refused by a fault, by point: {refused_at:?}");
    // The suite's seeds reach every durability point.
    if all {
        for (point, n) in &refused_at {
            assert!(*n > 0, "no write was refused at {point}");
        }
        let other = OTHER_RECOUNTED.load(std::sync::atomic::Ordering::Relaxed);
        assert!(other > 0, "no run recounted usage under other");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_runs_keep_every_invariant() {
    let seeds = support::sim_seeds(SEEDS);
    run_seeds(seeds, from_env("TALLY_SIM_STEPS").unwrap_or(STEPS)).await;
}
