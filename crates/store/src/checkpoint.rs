//! The metering engine's checkpoint.
//!
//! One transaction writes, for every org that changed: its counters (states:
//! rewriting them is idempotent), its day rollups (deltas, safe because they
//! commit atomically with the log position they were derived up to), the new
//! request-id hashes of its dedupe window, its watermark and its enforcement
//! events (unique keys: a replay rewrites the same ones, never new ones); and
//! the partition's log position. A crash between checkpoints replays the log
//! from that position onto exactly this state.

use std::collections::HashMap;

use sqlx::{Any, Row, Transaction};
use tally_core::dedupe::RequestHash;
use tally_core::ids::OrgId;
use tally_core::ledger::{Counter, EnforcementKind, SubjectKind};
use tally_core::org::{MeterChanges, SavedCounter, SavedMeter};
use tally_core::time::Month;

use crate::{Db, Error, Result};

/// Where a partition's metering stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionCheckpoint {
    /// The last log position applied.
    pub position: i64,
    /// Counts checkpoints; also names the dedupe chunks each one wrote.
    pub number: i64,
}

/// A bound value of a multi-row statement.
pub(crate) enum Val {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
    OptText(Option<String>),
    Blob(Vec<u8>),
}

/// Most parameters one statement binds (SQLite allows 32 766).
const PARAMS_MAX: usize = 30_000;

/// `INSERT INTO … VALUES (…), (…) <tail>` in as few statements as the
/// parameter limit allows.
pub(crate) async fn insert_many(
    tx: &mut Transaction<'static, Any>,
    head: &str,
    tail: &str,
    rows: Vec<Vec<Val>>,
) -> Result<()> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(());
    };
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
        let _ = q.execute(&mut **tx).await?;
    }
    Ok(())
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

fn month_i64(m: Month) -> i64 {
    i64::from(m.yyyymm())
}

impl Db {
    pub async fn load_checkpoint(&self, partition: i64) -> Result<Option<PartitionCheckpoint>> {
        let row = sqlx::query("SELECT position, number FROM checkpoints WHERE partition_id = $1")
            .bind(partition)
            .fetch_optional(self.reader())
            .await?;
        row.map(|r| {
            Ok(PartitionCheckpoint {
                position: r.try_get(0)?,
                number: r.try_get(1)?,
            })
        })
        .transpose()
    }

    /// Loads the saved meters of every org: watermarks, dedupe windows and
    /// the counters of every month usage can still reach — from the month of
    /// `watermark - window_ms` on, and never later than `latest_month`'s
    /// predecessor, so the months an authorize or a new-month lift reads are
    /// there too.
    pub async fn load_meters(
        &self,
        window_ms: i64,
        latest_month: Month,
    ) -> Result<HashMap<String, SavedMeter>> {
        let mut out: HashMap<String, SavedMeter> = HashMap::new();
        let rows = sqlx::query("SELECT org_id, watermark_ms, dedupe_floor_hour FROM meter_orgs")
            .fetch_all(self.reader())
            .await?;
        let mut from_month = latest_month.prev();
        for r in rows {
            let m = out.entry(r.try_get("org_id")?).or_default();
            m.watermark_ms = r.try_get("watermark_ms")?;
            m.dedupe_floor_hour = r.try_get("dedupe_floor_hour")?;
            from_month = from_month.min(Month::from_unix_ms(
                m.watermark_ms.saturating_sub(window_ms),
            ));
        }
        let rows = sqlx::query(
            "SELECT org_id, kind, subject_id, month, spend_micros, requests, last_at_ms, \
             fired_bps, cut_off, ordinal FROM spend_monthly WHERE month >= $1",
        )
        .bind(month_i64(from_month))
        .fetch_all(self.reader())
        .await?;
        for r in rows {
            let kind: String = r.try_get("kind")?;
            let month: i64 = r.try_get("month")?;
            let bad = || Error::Corrupt(format!("spend row {kind} {month}"));
            let counter = Counter::restored(
                r.try_get("spend_micros")?,
                u64::try_from(r.try_get::<i64, _>("requests")?).map_err(|_| bad())?,
                r.try_get("last_at_ms")?,
                u16::try_from(r.try_get::<i64, _>("fired_bps")?).map_err(|_| bad())?,
                crate::flag(r.try_get("cut_off")?),
                u16::try_from(r.try_get::<i64, _>("ordinal")?).map_err(|_| bad())?,
            );
            let saved = SavedCounter {
                kind: SubjectKind::parse(&kind).ok_or_else(bad)?,
                id: r.try_get("subject_id")?,
                month: u32::try_from(month)
                    .ok()
                    .and_then(Month::from_yyyymm)
                    .ok_or_else(bad)?,
                counter,
            };
            out.entry(r.try_get("org_id")?)
                .or_default()
                .counters
                .push(saved);
        }
        let rows =
            sqlx::query("SELECT org_id, hour, hashes FROM dedupe_chunks ORDER BY org_id, hour")
                .fetch_all(self.reader())
                .await?;
        for r in rows {
            let hour: i64 = r.try_get("hour")?;
            let blob: Vec<u8> = r.try_get("hashes")?;
            let m = out.entry(r.try_get("org_id")?).or_default();
            m.dedupe
                .extend(blob_to_hashes(&blob)?.into_iter().map(|h| (hour, h)));
        }
        Ok(out)
    }

    /// Writes one checkpoint of a partition (see the module docs).
    pub async fn write_checkpoint(
        &self,
        partition: i64,
        at: PartitionCheckpoint,
        orgs: &[(OrgId, MeterChanges)],
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.writer().begin().await?;
        let mut counters = Vec::new();
        let mut days = Vec::new();
        let mut chunks = Vec::new();
        let mut meters = Vec::new();
        let mut enforcement = Vec::new();
        for (org, ch) in orgs {
            let org = org.as_str();
            for c in &ch.counters {
                let k = &c.counter;
                counters.push(vec![
                    Val::Text(org.to_owned()),
                    Val::Text(c.kind.as_str().to_owned()),
                    Val::Text(c.id.clone()),
                    Val::Int(month_i64(c.month)),
                    Val::Int(k.spend_micros),
                    Val::Int(i64::try_from(k.requests).unwrap_or(i64::MAX)),
                    Val::Int(k.last_at_ms),
                    Val::Int(i64::from(k.fired_bps)),
                    Val::Int(i64::from(k.cut_off)),
                    Val::Int(i64::from(k.ordinal)),
                ]);
            }
            for d in &ch.days {
                days.push(vec![
                    Val::Text(org.to_owned()),
                    Val::Text(d.kind.as_str().to_owned()),
                    Val::Text(d.id.clone()),
                    Val::Int(i64::from(d.day.yyyymmdd())),
                    Val::Int(d.delta.spend_micros),
                    Val::Int(i64::try_from(d.delta.requests).unwrap_or(i64::MAX)),
                ]);
            }
            let mut by_hour: HashMap<i64, Vec<RequestHash>> = HashMap::new();
            for (hour, h) in &ch.dedupe_added {
                by_hour.entry(*hour).or_default().push(*h);
            }
            for (hour, hashes) in by_hour {
                chunks.push(vec![
                    Val::Text(org.to_owned()),
                    Val::Int(hour),
                    Val::Int(at.number),
                    Val::Blob(hashes_to_blob(&hashes)),
                ]);
            }
            let _ = sqlx::query("DELETE FROM dedupe_chunks WHERE org_id = $1 AND hour < $2")
                .bind(org)
                .bind(ch.dedupe_floor_hour)
                .execute(&mut *tx)
                .await?;
            meters.push(vec![
                Val::Text(org.to_owned()),
                Val::Int(ch.watermark_ms),
                Val::Int(ch.dedupe_floor_hour),
            ]);
            for e in &ch.enforcement {
                let ev = &e.event;
                let (threshold, reason) = match ev.kind {
                    EnforcementKind::ThresholdCrossed { threshold_bps } => {
                        (i64::from(threshold_bps), None)
                    }
                    EnforcementKind::CutOff => (0, None),
                    EnforcementKind::CutoffLifted { reason } => {
                        (0, Some(reason.as_str().to_owned()))
                    }
                };
                enforcement.push(vec![
                    Val::Text(org.to_owned()),
                    Val::Text(e.kind.as_str().to_owned()),
                    Val::Text(e.id.clone()),
                    Val::Int(month_i64(ev.month)),
                    Val::Text(ev.kind.name().to_owned()),
                    Val::Int(threshold),
                    Val::Int(i64::from(ev.ordinal)),
                    Val::OptText(reason),
                    Val::Int(ev.spend_micros),
                    Val::OptInt(ev.limit_micros),
                    Val::Int(ev.at_ms),
                ]);
            }
        }
        insert_many(
            &mut tx,
            "INSERT INTO spend_monthly (org_id, kind, subject_id, month, spend_micros, requests, \
             last_at_ms, fired_bps, cut_off, ordinal)",
            "ON CONFLICT (org_id, kind, subject_id, month) DO UPDATE SET \
             spend_micros = excluded.spend_micros, requests = excluded.requests, \
             last_at_ms = excluded.last_at_ms, fired_bps = excluded.fired_bps, \
             cut_off = excluded.cut_off, ordinal = excluded.ordinal",
            counters,
        )
        .await?;
        insert_many(
            &mut tx,
            "INSERT INTO spend_daily (org_id, kind, subject_id, day, spend_micros, requests)",
            "ON CONFLICT (org_id, kind, subject_id, day) DO UPDATE SET \
             spend_micros = spend_daily.spend_micros + excluded.spend_micros, \
             requests = spend_daily.requests + excluded.requests",
            days,
        )
        .await?;
        insert_many(
            &mut tx,
            "INSERT INTO dedupe_chunks (org_id, hour, chunk, hashes)",
            "",
            chunks,
        )
        .await?;
        insert_many(
            &mut tx,
            "INSERT INTO meter_orgs (org_id, watermark_ms, dedupe_floor_hour)",
            "ON CONFLICT (org_id) DO UPDATE SET watermark_ms = excluded.watermark_ms, \
             dedupe_floor_hour = excluded.dedupe_floor_hour",
            meters,
        )
        .await?;
        insert_many(
            &mut tx,
            "INSERT INTO enforcement_events (org_id, subject_kind, subject_id, month, event, \
             threshold_bps, ordinal, reason, spend_micros, limit_micros, at_ms)",
            "ON CONFLICT (org_id, subject_kind, subject_id, month, event, threshold_bps, ordinal) \
             DO NOTHING",
            enforcement,
        )
        .await?;
        let _ = sqlx::query(
            "INSERT INTO checkpoints (partition_id, position, number, updated_at_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (partition_id) DO UPDATE SET \
             position = excluded.position, number = excluded.number, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(partition)
        .bind(at.position)
        .bind(at.number)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
