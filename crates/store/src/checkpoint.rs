//! The metering engine's checkpoint, one per partition of the usage log.
//!
//! One transaction writes, for every org of the partition that changed: its
//! counters (states: rewriting them is idempotent), its day rollups (deltas,
//! safe because they commit atomically with the log position they were
//! derived up to), the new request-id hashes of its dedupe window, its
//! watermark and its enforcement events (unique keys: a replay rewrites the
//! same ones, never new ones); the partition's dead letters; and the
//! partition's log position. A crash between checkpoints replays the log from
//! that position onto exactly this state.
//!
//! Ownership is fenced: [`Db::claim_partition`] bumps the partition's epoch,
//! and a checkpoint commits only while its writer's epoch is current, so a
//! process that lost a partition (or was presumed dead) can never overwrite
//! the new owner's state.

use std::collections::HashMap;

use sqlx::Row;
use tally_core::dedupe::RequestHash;
use tally_core::ids::OrgId;
use tally_core::ledger::{Counter, EnforcementKind, SubjectKind};
use tally_core::org::{
    MeterChanges, SavedCounter, SavedDay, SavedEnforcement, SavedMeter, SavedUsage,
};
use tally_core::time::Month;

use crate::tx::WriteTx;
use crate::{Db, Error, Result};

/// Where a partition's metering stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCheckpoint {
    /// The last log position applied; -1 before the first.
    pub position: i64,
    /// Counts checkpoints; also names the dedupe chunks each one wrote.
    pub number: i64,
    /// A fingerprint of the message at `position`, where the log can be
    /// another than the one the checkpoint was taken from (a Kafka topic
    /// deleted and created again under the same name): the meter resumes
    /// by reading that message again and comparing. None before the first
    /// message, for the embedded usage log (in this database) and for
    /// checkpoints written before marks existed.
    pub mark: Option<i64>,
}

impl Default for PartitionCheckpoint {
    fn default() -> Self {
        PartitionCheckpoint {
            position: -1,
            number: 0,
            mark: None,
        }
    }
}

/// A partition taken over: where it stands, and the epoch that fences every
/// earlier owner out (their checkpoints fail from now on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub checkpoint: PartitionCheckpoint,
    pub epoch: i64,
}

/// Usage that could not be counted, as read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub position: i64,
    pub logged_at_ms: i64,
    pub org_id: Option<String>,
    pub reason: String,
    pub message: String,
    pub payload: Vec<u8>,
}

/// A bound value of a multi-row statement.
pub(crate) enum Val {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
    OptText(Option<String>),
    Blob(Vec<u8>),
}

/// Most parameters one statement binds. Binding costs grow faster than
/// linearly with a statement's parameters (measured: 4 020 rows took 1.7 s in
/// 30 000-parameter statements, 16 ms in 200-parameter ones), so statements
/// stay small.
const PARAMS_MAX: usize = 360;

/// `INSERT INTO … VALUES (…), (…) <tail>` in as few statements as the
/// parameter limit allows.
pub(crate) async fn insert_many(
    tx: &mut WriteTx,
    head: &str,
    tail: &str,
    rows: Vec<Vec<Val>>,
) -> Result<u64> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(0);
    };
    let mut affected = 0;
    let per_statement = (PARAMS_MAX / width).max(1);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Val>> = rows.by_ref().take(per_statement).collect();
        let mut sql = String::with_capacity(head.len() + tail.len() + chunk.len() * width * 6);
        sql.push_str(head);
        sql.push_str(" VALUES ");
        let mut n = 0;
        for (i, row) in chunk.iter().enumerate() {
            assert_eq!(row.len(), width, "rows of one statement have one width");
            sql.push_str(if i == 0 { "(" } else { ", (" });
            for j in 0..width {
                n += 1;
                if j > 0 {
                    sql.push_str(", ");
                }
                sql.push('$');
                sql.push_str(&n.to_string());
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        // Only placeholders are interpolated; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for v in chunk.into_iter().flatten() {
            q = match v {
                Val::Int(x) => q.bind(x),
                Val::OptInt(x) => q.bind(x),
                Val::Text(x) => q.bind(x),
                Val::OptText(x) => q.bind(x),
                Val::Blob(x) => q.bind(x),
            };
        }
        affected += q.execute(&mut **tx).await?.rows_affected();
    }
    Ok(affected)
}

fn hashes_to_blob(hashes: &[RequestHash]) -> Vec<u8> {
    let mut b = Vec::with_capacity(hashes.len() * 16);
    for h in hashes {
        b.extend_from_slice(&h.to_be_bytes());
    }
    b
}

fn blob_to_hashes(b: &[u8]) -> Result<Vec<RequestHash>> {
    if !b.len().is_multiple_of(16) {
        return Err(Error::Corrupt(format!("dedupe chunk of {} bytes", b.len())));
    }
    Ok(b.chunks_exact(16)
        .map(|c| u128::from_be_bytes(c.try_into().expect("16 bytes")))
        .collect())
}

/// The columns that name an enforcement event, in both tables keyed by it
/// (`enforcement_events`, `webhook_deliveries`): org, subject kind and id,
/// month, event, threshold, ordinal.
fn enforcement_key(org: &str, e: &SavedEnforcement) -> Vec<Val> {
    let threshold = match e.event.kind {
        EnforcementKind::ThresholdCrossed { threshold_bps } => i64::from(threshold_bps),
        EnforcementKind::ForecastOverLimit { .. }
        | EnforcementKind::CutOff
        | EnforcementKind::CutoffLifted { .. } => 0,
    };
    vec![
        Val::Text(org.to_owned()),
        Val::Text(e.kind.as_str().to_owned()),
        Val::Text(e.id.clone()),
        Val::Int(month_i64(e.event.month)),
        Val::Text(e.event.kind.name().to_owned()),
        Val::Int(threshold),
        Val::Int(i64::from(e.event.ordinal)),
    ]
}

/// The head of a statement that writes counters ([`counter_row`]).
pub(crate) const COUNTER_INSERT: &str = "INSERT INTO spend_monthly (org_id, kind, subject_id, \
     month, spend_micros, requests, last_at_ms, fired_bps, cut_off, ordinal, first_day, \
     forecast_fired, judged_at_ms)";

/// The head of a statement that writes day rollups ([`day_row`]).
pub(crate) const DAY_INSERT: &str =
    "INSERT INTO spend_daily (org_id, kind, subject_id, day, spend_micros, requests)";

/// The head of a statement that writes usage by model ([`usage_row`]).
pub(crate) const USAGE_INSERT: &str = "INSERT INTO usage_daily (org_id, kind, subject_id, day, \
     model, provider, spend_micros, requests, input_tokens, output_tokens)";

pub(crate) fn counter_row(org: &str, c: &SavedCounter) -> Vec<Val> {
    let k = &c.counter;
    vec![
        Val::Text(org.to_owned()),
        Val::Text(c.kind.as_str().to_owned()),
        Val::Text(c.id.clone()),
        Val::Int(month_i64(c.month)),
        Val::Int(k.spend_micros),
        count(k.requests),
        Val::Int(k.last_at_ms),
        Val::Int(i64::from(k.fired_bps)),
        Val::Int(i64::from(k.cut_off)),
        Val::Int(i64::from(k.ordinal)),
        Val::Int(i64::from(k.first_day)),
        Val::Int(i64::from(k.forecast_fired)),
        Val::Int(tally_core::forecast::at_seconds(c.month, k.judged_s)),
    ]
}

pub(crate) fn day_row(org: &str, d: &SavedDay) -> Vec<Val> {
    vec![
        Val::Text(org.to_owned()),
        Val::Text(d.kind.as_str().to_owned()),
        Val::Text(d.id.clone()),
        Val::Int(i64::from(d.day.yyyymmdd())),
        Val::Int(d.delta.spend_micros),
        count(d.delta.requests),
    ]
}

pub(crate) fn usage_row(org: &str, u: &SavedUsage) -> Vec<Val> {
    vec![
        Val::Text(org.to_owned()),
        Val::Text(u.kind.as_str().to_owned()),
        Val::Text(u.id.clone()),
        Val::Int(i64::from(u.day.yyyymmdd())),
        Val::Text(u.model.clone()),
        Val::Text(u.provider.clone()),
        Val::Int(u.delta.spend_micros),
        count(u.delta.requests),
        count(u.delta.input_tokens),
        count(u.delta.output_tokens),
    ]
}

fn count(n: u64) -> Val {
    Val::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn month_i64(m: Month) -> i64 {
    i64::from(m.yyyymm())
}

fn claim_from(r: &sqlx::any::AnyRow) -> Result<Claim> {
    let position: i64 = r.try_get(0)?;
    let mark_position: Option<i64> = r.try_get(4)?;
    Ok(Claim {
        checkpoint: PartitionCheckpoint {
            position,
            number: r.try_get(1)?,
            // Only the mark of the position: a process of a version before
            // marks moves the position on and leaves the mark as it was.
            mark: if mark_position == Some(position) {
                r.try_get(3)?
            } else {
                None
            },
        },
        epoch: r.try_get(2)?,
    })
}

impl Db {
    /// A partition's last checkpoint and epoch, if it has one.
    pub async fn load_checkpoint(&self, partition: i64) -> Result<Option<Claim>> {
        let row = sqlx::query(
            "SELECT position, number, epoch, mark, mark_position FROM checkpoints \
             WHERE partition_id = $1",
        )
        .bind(partition)
        .fetch_optional(self.writer())
        .await?;
        row.as_ref().map(claim_from).transpose()
    }

    /// Takes a partition of usage log `log` over: bumps its epoch (fencing
    /// out the previous owner) and returns where it stands. A partition is
    /// bound to the log its first claim names; a claim for another log
    /// fails with [`Error::OtherLog`] and changes nothing (it fences no
    /// owner of the right one).
    pub async fn claim_partition(&self, partition: i64, log: &str, now_ms: i64) -> Result<Claim> {
        // In a transaction: the row comes back before an implicit commit.
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "INSERT INTO checkpoints (partition_id, position, number, epoch, updated_at_ms, \
             usage_log) VALUES ($1, -1, 0, 1, $2, $3) ON CONFLICT (partition_id) DO UPDATE SET \
             epoch = checkpoints.epoch + 1, \
             usage_log = COALESCE(checkpoints.usage_log, excluded.usage_log) \
             WHERE checkpoints.usage_log IS NULL OR checkpoints.usage_log = excluded.usage_log \
             RETURNING position, number, epoch, mark, mark_position",
        )
        .bind(partition)
        .bind(now_ms)
        .bind(log)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let bound: String =
                sqlx::query_scalar("SELECT usage_log FROM checkpoints WHERE partition_id = $1")
                    .bind(partition)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Err(Error::OtherLog {
                partition,
                bound,
                log: log.to_owned(),
            });
        };
        // Every log this database ever metered: a recount of the embedded
        // log (`rebuild-projections`) must know that it holds all of it.
        let _ = sqlx::query(
            "INSERT INTO tally_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(format!("metered_log:{log}"))
        .bind(now_ms.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        claim_from(&row)
    }

    /// Records the options the service counts usage with
    /// ([`crate::recount::options_text`]), and when they change, that
    /// they did: a recount of the log judges everything under one set.
    pub async fn note_meter_options(&self, options: &str, now_ms: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let served: Option<String> =
            sqlx::query_scalar("SELECT value FROM tally_meta WHERE key = 'meter_options'")
                .fetch_optional(&mut *tx)
                .await?;
        if served.as_deref() == Some(options) {
            tx.rollback().await?;
            return Ok(());
        }
        if let Some(served) = served {
            let _ = sqlx::query(crate::META_SET)
                .bind("meter_options_changed")
                .bind(format!("from {served} to {options}, at {now_ms} ms"))
                .execute(&mut *tx)
                .await?;
        }
        let _ = sqlx::query(crate::META_SET)
            .bind("meter_options")
            .bind(options)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets where every partition of the usage log stood and which log
    /// it was (`tally reset-usage-positions`, with no service running): the
    /// next claim binds the partition to the log it names and reads it from
    /// its beginning. Counted spend, dedupe windows and holds stay. Returns
    /// how many partitions it reset. Refused for a database metered from
    /// the embedded usage log: that log is never created again, and reading
    /// it from its start would only dead-letter what it kept.
    pub async fn reset_usage_positions(&self, now_ms: i64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let embedded: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM checkpoints WHERE usage_log = 'embedded'")
                .fetch_one(&mut *tx)
                .await?;
        if embedded > 0 {
            tx.rollback().await?;
            return Err(Error::Config(
                "this database is metered from the embedded usage log (tally serve without \
                 --kafka-brokers), which is never created again: it has no positions to reset"
                    .into(),
            ));
        }
        let n = sqlx::query(
            "UPDATE checkpoints SET position = -1, mark = NULL, mark_position = NULL, \
             usage_log = NULL, epoch = epoch + 1, updated_at_ms = $1",
        )
        .bind(now_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// Loads the saved meters of the orgs metered on `partition`:
    /// watermarks, dedupe windows and the counters of every month usage can
    /// still reach — from the month of `watermark - window_ms` on, and never
    /// later than `latest_month`'s predecessor, so the months an authorize or
    /// a new-month lift reads are there too.
    pub async fn load_meters(
        &self,
        partition: i64,
        window_ms: i64,
        latest_month: Month,
    ) -> Result<HashMap<String, SavedMeter>> {
        let mut out: HashMap<String, SavedMeter> = HashMap::new();
        let rows = sqlx::query(
            "SELECT org_id, watermark_ms, dedupe_floor_minute, rolled_month FROM meter_orgs \
             WHERE partition_id = $1",
        )
        .bind(partition)
        .fetch_all(self.reader())
        .await?;
        let mut from_month = latest_month.prev();
        for r in rows {
            let m = out.entry(r.try_get("org_id")?).or_default();
            m.watermark_ms = r.try_get("watermark_ms")?;
            m.dedupe_floor_minute = r.try_get("dedupe_floor_minute")?;
            m.rolled_month = u32::try_from(r.try_get::<i64, _>("rolled_month")?)
                .ok()
                .and_then(Month::from_yyyymm);
            from_month = from_month.min(Month::from_unix_ms(
                m.watermark_ms.saturating_sub(window_ms),
            ));
        }
        let rows = sqlx::query(
            "SELECT s.org_id, s.kind, s.subject_id, s.month, s.spend_micros, s.requests, \
             s.last_at_ms, s.fired_bps, s.cut_off, s.ordinal, s.first_day, s.forecast_fired, \
             s.judged_at_ms \
             FROM spend_monthly s \
             JOIN meter_orgs m ON m.org_id = s.org_id \
             WHERE m.partition_id = $1 AND s.month >= $2",
        )
        .bind(partition)
        .bind(month_i64(from_month))
        .fetch_all(self.reader())
        .await?;
        for r in rows {
            let kind: String = r.try_get("kind")?;
            let month: i64 = r.try_get("month")?;
            let bad = || Error::Corrupt(format!("spend row {kind} {month}"));
            let month = u32::try_from(month)
                .ok()
                .and_then(Month::from_yyyymm)
                .ok_or_else(bad)?;
            let counter = Counter::restored(
                r.try_get("spend_micros")?,
                u64::try_from(r.try_get::<i64, _>("requests")?).map_err(|_| bad())?,
                r.try_get("last_at_ms")?,
                u16::try_from(r.try_get::<i64, _>("fired_bps")?).map_err(|_| bad())?,
                crate::flag(r.try_get("cut_off")?),
                u32::try_from(r.try_get::<i64, _>("ordinal")?).map_err(|_| bad())?,
            )
            .with_forecast(
                u8::try_from(r.try_get::<i64, _>("first_day")?).map_err(|_| bad())?,
                crate::flag(r.try_get("forecast_fired")?),
                tally_core::forecast::seconds_into(month, r.try_get("judged_at_ms")?),
            );
            let saved = SavedCounter {
                kind: SubjectKind::parse(&kind).ok_or_else(bad)?,
                id: r.try_get("subject_id")?,
                month,
                counter,
            };
            out.entry(r.try_get("org_id")?)
                .or_default()
                .counters
                .push(saved);
        }
        // The pairs each open month broke usage down by: its org rows.
        let rows = sqlx::query(
            "SELECT DISTINCT u.org_id, u.day / 100 AS month, u.model, u.provider \
             FROM usage_daily u JOIN meter_orgs m ON m.org_id = u.org_id \
             WHERE m.partition_id = $1 AND u.kind = 'org' AND u.subject_id = u.org_id \
             AND u.day >= $2 ORDER BY 1, 2, 3, 4",
        )
        .bind(partition)
        .bind(month_i64(from_month) * 100)
        .fetch_all(self.reader())
        .await?;
        for r in rows {
            let month: i64 = r.try_get("month")?;
            let month = u32::try_from(month)
                .ok()
                .and_then(Month::from_yyyymm)
                .ok_or_else(|| Error::Corrupt(format!("usage row month {month}")))?;
            let pair: (String, String) = (r.try_get("model")?, r.try_get("provider")?);
            if pair.0 == tally_core::models::OTHER && pair.1 == tally_core::models::OTHER {
                continue;
            }
            let models = &mut out.entry(r.try_get("org_id")?).or_default().models;
            match models.last_mut() {
                Some((m, pairs)) if *m == month => pairs.push(pair),
                _ => models.push((month, vec![pair])),
            }
        }
        let rows = sqlx::query(
            "SELECT d.org_id, d.minute, d.hashes FROM dedupe_chunks d \
             JOIN meter_orgs m ON m.org_id = d.org_id WHERE m.partition_id = $1 \
             ORDER BY d.org_id, d.minute",
        )
        .bind(partition)
        .fetch_all(self.reader())
        .await?;
        for r in rows {
            let minute: i64 = r.try_get("minute")?;
            let blob: Vec<u8> = r.try_get("hashes")?;
            let m = out.entry(r.try_get("org_id")?).or_default();
            m.dedupe
                .extend(blob_to_hashes(&blob)?.into_iter().map(|h| (minute, h)));
        }
        Ok(out)
    }

    /// Writes checkpoint `at.number` of `partition` right after checkpoint
    /// `at.number - 1` (see [`Db::write_checkpoint_after`]).
    pub async fn write_checkpoint(
        &self,
        partition: i64,
        epoch: i64,
        at: PartitionCheckpoint,
        orgs: &[(OrgId, MeterChanges)],
        dead_letters: &[DeadLetter],
        now_ms: i64,
    ) -> Result<()> {
        self.write_checkpoint_after(
            partition,
            epoch,
            at.number - 1,
            at,
            orgs,
            dead_letters,
            now_ms,
        )
        .await
    }

    /// Writes checkpoint `at.number` of `partition` on top of the stored
    /// checkpoint `base` (see the module docs). Fails with
    /// [`Error::Fenced`] when `epoch` is no longer the partition's or the
    /// stored checkpoint is not `base` (then the caller reads
    /// [`Db::load_checkpoint`] to learn which). Every attempt has a number
    /// of its own (greater than `base`): of the attempts on one base, at
    /// most one commits, and the stored number tells which.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_checkpoint_after(
        &self,
        partition: i64,
        epoch: i64,
        base: i64,
        at: PartitionCheckpoint,
        orgs: &[(OrgId, MeterChanges)],
        dead_letters: &[DeadLetter],
        now_ms: i64,
    ) -> Result<()> {
        debug_assert!(at.number > base);
        let mut tx = self.begin_write().await?;
        // First, so that it holds the row lock: a claim waits for this
        // transaction, and this one fails if a claim came first.
        let fenced = sqlx::query(
            "UPDATE checkpoints SET position = $1, number = $2, updated_at_ms = $3, mark = $4, \
             mark_position = $1 WHERE partition_id = $5 AND epoch = $6 AND number = $7",
        )
        .bind(at.position)
        .bind(at.number)
        .bind(now_ms)
        .bind(at.mark)
        .bind(partition)
        .bind(epoch)
        .bind(base)
        .execute(&mut *tx)
        .await?;
        if fenced.rows_affected() != 1 {
            return Err(Error::Fenced { partition });
        }
        // Holds past their TTL hold nothing: their rows go, whether or not
        // their org had usage since.
        let _ = sqlx::query("DELETE FROM holds WHERE partition_id = $1 AND expires_at_ms <= $2")
            .bind(partition)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let mut counters = Vec::new();
        let mut days = Vec::new();
        let mut usage = Vec::new();
        let mut chunks = Vec::new();
        let mut meters = Vec::new();
        let mut enforcement = Vec::new();
        for (org, ch) in orgs {
            let org = org.as_str();
            counters.extend(ch.counters.iter().map(|c| counter_row(org, c)));
            days.extend(ch.days.iter().map(|d| day_row(org, d)));
            usage.extend(ch.usage.iter().map(|u| usage_row(org, u)));
            let mut by_minute: HashMap<i64, Vec<RequestHash>> = HashMap::new();
            for (minute, h) in &ch.dedupe_added {
                by_minute.entry(*minute).or_default().push(*h);
            }
            for (minute, hashes) in by_minute {
                chunks.push(vec![
                    Val::Text(org.to_owned()),
                    Val::Int(minute),
                    Val::Int(at.number),
                    Val::Blob(hashes_to_blob(&hashes)),
                ]);
            }
            // Holds settled or expired up to this position: the rows left
            // are the live holds as of it.
            let gone: Vec<(String, String)> = ch
                .holds_gone
                .iter()
                .map(|id| (org.to_owned(), id.clone()))
                .collect();
            crate::holds::delete_holds(&mut tx, &gone).await?;
            let _ = sqlx::query("DELETE FROM dedupe_chunks WHERE org_id = $1 AND minute < $2")
                .bind(org)
                .bind(ch.dedupe_floor_minute)
                .execute(&mut *tx)
                .await?;
            meters.push(vec![
                Val::Text(org.to_owned()),
                Val::Int(partition),
                Val::Int(ch.watermark_ms),
                Val::Int(ch.dedupe_floor_minute),
                Val::Int(ch.rolled_month.map_or(0, month_i64)),
            ]);
            for e in &ch.enforcement {
                let ev = &e.event;
                let reason = match ev.kind {
                    EnforcementKind::CutoffLifted { reason } => Some(reason.as_str().to_owned()),
                    _ => None,
                };
                let (projected, limit_day) = match ev.kind {
                    EnforcementKind::ForecastOverLimit {
                        projected_micros,
                        limit_day,
                    } => (
                        Some(projected_micros),
                        Some(i64::from(limit_day.yyyymmdd())),
                    ),
                    _ => (None, None),
                };
                let mut row = enforcement_key(org, e);
                row.extend([
                    Val::OptText(reason),
                    Val::Int(ev.spend_micros),
                    Val::OptInt(ev.limit_micros),
                    Val::Int(ev.at_ms),
                    Val::OptInt(projected),
                    Val::OptInt(limit_day),
                ]);
                enforcement.push(row);
            }
        }
        let _ = insert_many(
            &mut tx,
            COUNTER_INSERT,
            "ON CONFLICT (org_id, kind, subject_id, month) DO UPDATE SET \
             spend_micros = excluded.spend_micros, requests = excluded.requests, \
             last_at_ms = excluded.last_at_ms, fired_bps = excluded.fired_bps, \
             cut_off = excluded.cut_off, ordinal = excluded.ordinal, \
             first_day = excluded.first_day, forecast_fired = excluded.forecast_fired, \
             judged_at_ms = excluded.judged_at_ms",
            counters,
        )
        .await?;
        let _ = insert_many(
            &mut tx,
            DAY_INSERT,
            "ON CONFLICT (org_id, kind, subject_id, day) DO UPDATE SET \
             spend_micros = spend_daily.spend_micros + excluded.spend_micros, \
             requests = spend_daily.requests + excluded.requests",
            days,
        )
        .await?;
        let _ = insert_many(
            &mut tx,
            USAGE_INSERT,
            "ON CONFLICT (org_id, kind, subject_id, day, model, provider) DO UPDATE SET \
             spend_micros = usage_daily.spend_micros + excluded.spend_micros, \
             requests = usage_daily.requests + excluded.requests, \
             input_tokens = usage_daily.input_tokens + excluded.input_tokens, \
             output_tokens = usage_daily.output_tokens + excluded.output_tokens",
            usage,
        )
        .await?;
        let _ = insert_many(
            &mut tx,
            "INSERT INTO dedupe_chunks (org_id, minute, chunk, hashes)",
            "ON CONFLICT (org_id, minute, chunk) DO NOTHING",
            chunks,
        )
        .await?;
        let _ = insert_many(
            &mut tx,
            "INSERT INTO meter_orgs (org_id, partition_id, watermark_ms, dedupe_floor_minute, \
             rolled_month)",
            "ON CONFLICT (org_id) DO UPDATE SET partition_id = excluded.partition_id, \
             watermark_ms = excluded.watermark_ms, dedupe_floor_minute = excluded.dedupe_floor_minute, \
             rolled_month = excluded.rolled_month",
            meters,
        )
        .await?;
        let _ = insert_many(
            &mut tx,
            "INSERT INTO enforcement_events (org_id, subject_kind, subject_id, month, event, \
             threshold_bps, ordinal, reason, spend_micros, limit_micros, at_ms, projected_micros, \
             limit_day)",
            "ON CONFLICT (org_id, subject_kind, subject_id, month, event, threshold_bps, ordinal) \
             DO NOTHING",
            enforcement,
        )
        .await?;
        // Orgs with a webhook get a delivery per enforcement event, in the
        // same transaction: none is lost, and a replay adds none twice.
        let mut deliveries = Vec::new();
        for (org, ch) in orgs {
            if ch.enforcement.is_empty() {
                continue;
            }
            let hooked: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM orgs WHERE id = $1 AND webhook_url IS NOT NULL")
                    .bind(org.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            if hooked.is_none() {
                continue;
            }
            for e in &ch.enforcement {
                let mut row = enforcement_key(org.as_str(), e);
                row.extend([
                    Val::Text("pending".to_owned()),
                    Val::Int(0),
                    Val::Int(now_ms),
                    Val::Int(now_ms),
                ]);
                deliveries.push(row);
            }
        }
        let _ = insert_many(
            &mut tx,
            "INSERT INTO webhook_deliveries (org_id, subject_kind, subject_id, month, event, \
             threshold_bps, ordinal, state, attempts, next_attempt_ms, created_ms)",
            "ON CONFLICT (org_id, subject_kind, subject_id, month, event, threshold_bps, ordinal) \
             DO NOTHING",
            deliveries,
        )
        .await?;
        let _ = insert_many(
            &mut tx,
            "INSERT INTO dead_letters (partition_id, position, logged_at_ms, org_id, reason, \
             message, payload)",
            "ON CONFLICT (partition_id, position, logged_at_ms) DO NOTHING",
            dead_letters
                .iter()
                .map(|d| {
                    vec![
                        Val::Int(partition),
                        Val::Int(d.position),
                        Val::Int(d.logged_at_ms),
                        Val::OptText(d.org_id.clone()),
                        Val::Text(d.reason.clone()),
                        Val::Text(d.message.clone()),
                        Val::Blob(d.payload.clone()),
                    ]
                })
                .collect(),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
