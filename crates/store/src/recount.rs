//! Spend and usage counted again from the embedded usage log, for
//! [`Db::rebuild_projections`].
//!
//! The meter's read models (`spend_monthly`, `spend_daily`, `usage_daily`)
//! are written by checkpoints, not by projecting the entity log. Where the
//! usage log still holds everything ever metered (the embedded log, never
//! purged, the only log this database metered, counted under one set of
//! options: [`countable`] says when), they can be counted again: every
//! org's directory folded from its whole entity log (memberships are
//! judged by log time, so folding them first decides as live counting
//! did), then the log applied in order up to the checkpoint's position by
//! the same code as live counting, with a checkpoint's bookkeeping every
//! page. What the log holds after the position is the tail the next start
//! replays onto these rows.
//!
//! Enforcement is history, not a rollup: the events, and each counter's
//! thresholds fired, cutoff, ordinal and forecast alert, stay as live
//! counting recorded them under the limits of their time (a recount judges
//! under today's). So do the dedupe window and each org's watermark, which
//! the recount reaches again at the same position.

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use tally_core::ids::OrgId;
use tally_core::ledger::{Counter, DayDelta, SubjectKind, UsageDelta};
use tally_core::org::{MeterConfig, OrgState, SavedCounter, SavedDay, SavedUsage, UsageOutcome};
use tally_core::time::{Day, Month};

use crate::checkpoint::{COUNTER_INSERT, DAY_INSERT, USAGE_INSERT, Val, insert_many};
use crate::checkpoint::{counter_row, day_row, usage_row};
use crate::tx::WriteTx;
use crate::{Error, Result};

/// Usage log records read per round trip.
const PAGE_LEN: i64 = 1_000;

/// Usage events between two progress reports.
const REPORT_EVERY: u64 = 1_000_000;

/// The name the embedded mode's checkpoint gives its log.
const EMBEDDED_LOG: &str = "embedded";

/// What became of spend and usage in a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recount {
    /// Counted again from the log.
    Counted {
        /// Log records (ingest batches) read.
        records: u64,
        /// Usage events in them.
        events: u64,
        /// Of those, counted (the rest were duplicates or refused, as they
        /// were live).
        counted: u64,
        /// Counters, day rows and usage rows written.
        counters: u64,
        days: u64,
        usage: u64,
    },
    /// Kept as checkpoints wrote them, and why.
    Kept(String),
}

/// How far a recount is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recounting {
    /// Usage events read so far (every 1 000 000 or so).
    Read(u64),
    /// Read: rows to write.
    Writing(usize),
}

pub(crate) type Progress<'a> = &'a mut dyn FnMut(Recounting);

/// The version of the rules that decide how a usage log counts (in code:
/// the dedupe window's forgetting, the too-late and future rules, how
/// models are indexed under the cap). Bump it with any change that makes
/// the same log count differently: a recount then refuses databases
/// counted under the old rules.
const COUNTING_RULES: u32 = 1;

/// How the service counts, as the claims record it and a recount must
/// count again: the rules' version, what decides whether a call counts
/// (the dedupe window and its bound, the future skew) and under which
/// model it counts.
pub fn options_text(config: &MeterConfig) -> String {
    format!(
        "counting_rules={COUNTING_RULES} dedupe_window_ms={} dedupe_entries_max={} \
         future_skew_ms={} usage_models_max={}",
        config.dedupe.window_ms,
        config.dedupe.entries_max,
        config.future_skew_ms,
        config.models_max
    )
}

/// Whether the usage log can be counted again under `config`: the
/// position to count up to (-1: nothing metered yet), or why not.
pub(crate) async fn countable(
    tx: &mut WriteTx,
    config: &MeterConfig,
) -> Result<std::result::Result<i64, String>> {
    let meta = async |tx: &mut WriteTx, key: &str| -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM tally_meta WHERE key = $1")
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?,
        )
    };
    if meta(tx, "usage_history").await?.as_deref() != Some("recorded") {
        return Ok(Err(
            "this database metered usage before the logs and options it counts with were \
             recorded (schema v19): it cannot tell that its log holds all of its spend"
                .to_owned(),
        ));
    }
    let rows = sqlx::query("SELECT partition_id, position, usage_log FROM checkpoints")
        .fetch_all(&mut **tx)
        .await?;
    let mut position = -1;
    for r in &rows {
        let partition: i64 = r.try_get("partition_id")?;
        let log: Option<String> = r.try_get("usage_log")?;
        match log.as_deref() {
            Some(EMBEDDED_LOG) if partition == 0 => position = r.try_get("position")?,
            Some(EMBEDDED_LOG) => {
                return Ok(Err(format!(
                    "partition {partition} is metered from the embedded log, which has only \
                     partition 0"
                )));
            }
            Some(log) => {
                return Ok(Err(format!(
                    "the usage log is {log} (its retention decides what it keeps), not this \
                     database"
                )));
            }
            None => {
                return Ok(Err(format!(
                    "partition {partition}'s usage log is not recorded (its positions were \
                     reset, or it was checkpointed before logs were named): what was counted \
                     may come from another log"
                )));
            }
        }
    }
    let logs: Vec<String> = sqlx::query_scalar(
        "SELECT key FROM tally_meta WHERE key LIKE 'metered_log:%' ORDER BY key",
    )
    .fetch_all(&mut **tx)
    .await?;
    if let Some(other) = logs
        .iter()
        .filter_map(|k| k.strip_prefix("metered_log:"))
        .find(|l| *l != EMBEDDED_LOG)
    {
        return Ok(Err(format!(
            "this database also metered {other}: what was counted from it is not in this log"
        )));
    }
    if let Some(to) = meta(tx, "usage_log_purged_to").await? {
        return Ok(Err(format!(
            "records of the log up to position {to} were purged after `usage_retention_days`"
        )));
    }
    if let Some(change) = meta(tx, "meter_options_changed").await? {
        return Ok(Err(format!(
            "the service's metering options changed ({change}): a recount would judge the \
             usage before the change under the new ones"
        )));
    }
    let given = options_text(config);
    if let Some(served) = meta(tx, "meter_options").await?
        && served != given
    {
        return Ok(Err(format!(
            "the service counts with {served}, this command was given {given}: give it the \
             service's options (its --config, or the same flags)"
        )));
    }
    let first: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM usage_log")
        .fetch_one(&mut **tx)
        .await?;
    match first {
        // Positions start at 1: a log that starts later lost its start
        // (deleted by hand; on PostgreSQL, also appends that never
        // committed, whose positions the sequence does not give back:
        // kept, to be safe).
        Some(first) if first > 1 => {
            return Ok(Err(format!(
                "the log starts at position {first}: the records before it are gone (on \
                 PostgreSQL, appends that never committed use positions up too)"
            )));
        }
        None if position > 0 => {
            return Ok(Err(format!(
                "the log is empty, but usage up to position {position} was metered: its records \
                 are gone"
            )));
        }
        _ => {}
    }
    if position < 0 {
        let counted: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM spend_monthly WHERE requests > 0")
                .fetch_one(&mut **tx)
                .await?;
        if counted > 0 {
            return Ok(Err(
                "spend is recorded, but no checkpoint of this log says how much of it was \
                 metered"
                    .to_owned(),
            ));
        }
    }
    Ok(Ok(position))
}

type CounterKey = (String, SubjectKind, String, Month);
type DayKey = (String, SubjectKind, String, Day);
type UsageKey = (String, SubjectKind, String, Day, String, String);

/// What the recount found, summed across its pages.
#[derive(Default)]
struct Sums {
    counters: HashMap<CounterKey, Counter>,
    days: HashMap<DayKey, DayDelta>,
    usage: HashMap<UsageKey, UsageDelta>,
}

impl Sums {
    /// Takes an org's changes as a checkpoint would (which also moves its
    /// dedupe window and forgets what is too old to count again).
    fn take(&mut self, org: &str, state: &mut OrgState) {
        let ch = state.take_changes();
        for c in ch.counters {
            let _ = self
                .counters
                .insert((org.to_owned(), c.kind, c.id, c.month), c.counter);
        }
        for d in ch.days {
            let sum = self
                .days
                .entry((org.to_owned(), d.kind, d.id, d.day))
                .or_default();
            sum.spend_micros += d.delta.spend_micros;
            sum.requests += d.delta.requests;
        }
        for u in ch.usage {
            self.usage
                .entry((org.to_owned(), u.kind, u.id, u.day, u.model, u.provider))
                .or_default()
                .add(&u.delta);
        }
    }
}

/// Counts the embedded usage log again up to position `upto` (from
/// [`countable`]) into `orgs` (each folded from its whole entity log) and
/// rewrites spend and usage from it, in `tx`.
pub(crate) async fn recount(
    tx: &mut WriteTx,
    mut orgs: HashMap<OrgId, OrgState>,
    upto: i64,
    progress: Progress<'_>,
) -> Result<Recount> {
    let (mut records, mut events, mut counted) = (0u64, 0u64, 0u64);
    let mut sums = Sums::default();
    let mut after = 0i64;
    let mut next_report = REPORT_EVERY;
    while after < upto {
        let rows = sqlx::query(
            "SELECT seq, logged_at_ms, payload FROM usage_log WHERE seq > $1 AND seq <= $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(after)
        .bind(upto)
        .bind(PAGE_LEN)
        .fetch_all(&mut **tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("seq")?;
        let mut touched: HashSet<OrgId> = HashSet::new();
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let logged_at_ms: i64 = row.try_get("logged_at_ms")?;
            let payload: Vec<u8> = row.try_get("payload")?;
            let batch = tally_proto::decode_usage_batch(&payload)
                .map_err(|e| Error::Corrupt(format!("usage log record {seq}: {e}")))?;
            records += 1;
            for ev in &batch {
                events += 1;
                // Attribution kept unknown orgs out of the log.
                let Some(state) = orgs.get_mut(&ev.org_id) else {
                    continue;
                };
                if state.apply_usage(ev, logged_at_ms) == UsageOutcome::Applied {
                    counted += 1;
                }
                if !touched.contains(&ev.org_id) {
                    let _ = touched.insert(ev.org_id.clone());
                }
            }
        }
        for org in touched {
            let state = orgs.get_mut(&org).expect("touched orgs exist");
            sums.take(org.as_str(), state);
        }
        if events >= next_report {
            progress(Recounting::Read(events));
            next_report = events + REPORT_EVERY;
        }
    }
    progress(Recounting::Writing(
        sums.counters.len() + sums.days.len() + sums.usage.len(),
    ));
    let written = rewrite(tx, sums).await?;
    Ok(Recount::Counted {
        records,
        events,
        counted,
        counters: written.0,
        days: written.1,
        usage: written.2,
    })
}

/// Rows written per round of [`rewrite`]: the rows of a table are built
/// a round at a time, not all beside the sums.
const WRITE_ROUND: usize = 10_000;

/// Replaces spend and usage with `sums`, keeping each counter's
/// enforcement (see the module docs): (counters, days, usage rows).
async fn rewrite(tx: &mut WriteTx, sums: Sums) -> Result<(u64, u64, u64)> {
    for sql in [
        "DELETE FROM spend_daily",
        "DELETE FROM usage_daily",
        "UPDATE spend_monthly SET spend_micros = 0, requests = 0, last_at_ms = 0, first_day = 0",
    ] {
        let _ = sqlx::query(sql).execute(&mut **tx).await?;
    }
    let counters = write(
        tx,
        COUNTER_INSERT,
        "ON CONFLICT (org_id, kind, subject_id, month) DO UPDATE SET \
         spend_micros = excluded.spend_micros, requests = excluded.requests, \
         last_at_ms = excluded.last_at_ms, first_day = excluded.first_day",
        sums.counters,
        |((org, kind, id, month), counter)| {
            counter_row(
                &org,
                &SavedCounter {
                    kind,
                    id,
                    month,
                    counter,
                },
            )
        },
    )
    .await?;
    // A counter the log never counted and nothing was enforced on is no
    // counter (a row left by usage the log does not hold).
    let _ = sqlx::query(
        "DELETE FROM spend_monthly WHERE requests = 0 AND fired_bps = 0 AND cut_off = 0 \
         AND ordinal = 0 AND forecast_fired = 0",
    )
    .execute(&mut **tx)
    .await?;
    let days = write(
        tx,
        DAY_INSERT,
        "",
        sums.days,
        |((org, kind, id, day), delta)| {
            day_row(
                &org,
                &SavedDay {
                    kind,
                    id,
                    day,
                    delta,
                },
            )
        },
    )
    .await?;
    let usage = write(
        tx,
        USAGE_INSERT,
        "",
        sums.usage,
        |((org, kind, id, day, model, provider), delta)| {
            usage_row(
                &org,
                &SavedUsage {
                    kind,
                    id,
                    day,
                    model,
                    provider,
                    delta,
                },
            )
        },
    )
    .await?;
    Ok((counters, days, usage))
}

/// Writes `rows` a round at a time; returns how many.
async fn write<K, V>(
    tx: &mut WriteTx,
    head: &str,
    tail: &str,
    rows: HashMap<K, V>,
    row: impl Fn((K, V)) -> Vec<Val>,
) -> Result<u64> {
    let n = rows.len() as u64;
    let mut rows = rows.into_iter();
    loop {
        let round: Vec<Vec<Val>> = rows.by_ref().take(WRITE_ROUND).map(&row).collect();
        if round.is_empty() {
            return Ok(n);
        }
        let _ = insert_many(tx, head, tail, round).await?;
    }
}
