//! Live holds in SQL, for the distributed mode: the process metering a
//! partition places and releases holds of its orgs here, fenced by the
//! partition's epoch, and the next owner loads them when it claims the
//! partition. A checkpoint deletes the holds settled or expired up to its
//! log position in the same transaction (see [`crate::checkpoint`]), so the
//! rows are the live holds as of the checkpoint, and the usage replayed after
//! it settles the rest.
//!
//! Fencing: every write first updates the partition's checkpoint row where
//! the epoch is the writer's. On PostgreSQL that takes the row's lock, so a
//! claim (which bumps the epoch) waits for a write under way and the writer
//! of an older epoch finds no row: a process that lost the partition never
//! places a hold on it again, and a claim sees every hold placed before it.

use sqlx::Row;
use tally_core::ledger::SubjectKind;

use crate::tx::WriteTx;
use crate::{Db, Error, Result};

/// A hold as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHold {
    pub org_id: String,
    pub request_id: String,
    pub user_id: String,
    pub key_id: String,
    pub group_ids: Vec<String>,
    pub amount_micros: i64,
    pub placed_at_ms: i64,
    pub expires_at_ms: i64,
}

/// Fails with [`Error::Fenced`] unless `epoch` is `partition`'s, and holds
/// the partition's row until the transaction ends.
async fn fence(tx: &mut WriteTx, partition: i64, epoch: i64) -> Result<()> {
    let fenced =
        sqlx::query("UPDATE checkpoints SET epoch = epoch WHERE partition_id = $1 AND epoch = $2")
            .bind(partition)
            .bind(epoch)
            .execute(&mut **tx)
            .await?;
    if fenced.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Error::Fenced { partition })
    }
}

/// The most ids [`Db::held_sums`] names in its query.
const HELD_SUMS_NAMED_MAX: usize = 500;

impl Db {
    /// Records holds placed on orgs of `partition` (replacing any under the
    /// same org and request id), if `epoch` is still the partition's.
    pub async fn place_holds(
        &self,
        partition: i64,
        epoch: i64,
        holds: &[StoredHold],
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        fence(&mut tx, partition, epoch).await?;
        for h in holds {
            let _ = sqlx::query(
                "INSERT INTO holds (org_id, request_id, partition_id, user_id, key_id, \
                 group_ids, amount_micros, placed_at_ms, expires_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (org_id, request_id) DO UPDATE SET \
                 partition_id = excluded.partition_id, user_id = excluded.user_id, \
                 key_id = excluded.key_id, group_ids = excluded.group_ids, \
                 amount_micros = excluded.amount_micros, placed_at_ms = excluded.placed_at_ms, \
                 expires_at_ms = excluded.expires_at_ms",
            )
            .bind(&h.org_id)
            .bind(&h.request_id)
            .bind(partition)
            .bind(&h.user_id)
            .bind(&h.key_id)
            .bind(h.group_ids.join(" "))
            .bind(h.amount_micros)
            .bind(h.placed_at_ms)
            .bind(h.expires_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Deletes holds (org id, request id) of `partition`, if `epoch` is
    /// still the partition's.
    pub async fn release_holds(
        &self,
        partition: i64,
        epoch: i64,
        holds: &[(String, String)],
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        fence(&mut tx, partition, epoch).await?;
        delete_holds(&mut tx, holds).await?;
        tx.commit().await
    }

    /// Records where the owner of `partition` under `epoch` answers.
    pub async fn set_owner_url(&self, partition: i64, epoch: i64, url: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let _ = sqlx::query(
            "UPDATE checkpoints SET owner_url = $3 WHERE partition_id = $1 AND epoch = $2",
        )
        .bind(partition)
        .bind(epoch)
        .bind(url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Where the owner of `partition` answers, if it said.
    pub async fn owner_url(&self, partition: i64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT owner_url FROM checkpoints WHERE partition_id = $1")
            .bind(partition)
            .fetch_optional(self.reader())
            .await?;
        Ok(row.and_then(|r| r.try_get::<Option<String>, _>(0).ok().flatten()))
    }

    /// What the stored holds of `org_id` that expire after `now_ms` hold
    /// on each of `ids` (of one kind): what a process that does not meter
    /// the org shows. Rows settled since the owner's last checkpoint still
    /// count, until it deletes them. Users and keys read their own rows;
    /// groups and the org read all the org's rows, summed by group set.
    pub async fn held_sums(
        &self,
        org_id: &str,
        kind: SubjectKind,
        ids: &[&str],
        now_ms: i64,
    ) -> Result<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (by, own_rows) = match kind {
            SubjectKind::Org => ("org_id", false),
            SubjectKind::User => ("user_id", true),
            SubjectKind::Key => ("key_id", true),
            // Summed by group set, then split below.
            SubjectKind::Group => ("group_ids", false),
        };
        // A page of ids is named in the query; more read all the rows.
        let only = if own_rows && ids.len() <= HELD_SUMS_NAMED_MAX {
            format!(" AND {by} IN ({})", crate::placeholders(3, ids.len()))
        } else {
            String::new()
        };
        // `by` is one of the four column names above, `only` placeholders.
        let sql = format!(
            "SELECT {by}, CAST(SUM(amount_micros) AS BIGINT) FROM holds \
             WHERE org_id = $1 AND expires_at_ms > $2{only} GROUP BY {by}"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(org_id)
            .bind(now_ms);
        if !only.is_empty() {
            for id in ids {
                query = query.bind(*id);
            }
        }
        let rows = query.fetch_all(self.reader()).await?;
        let mut sums: std::collections::HashMap<String, i64> = Default::default();
        for r in &rows {
            let of: String = r.try_get(0)?;
            let micros: i64 = r.try_get(1)?;
            if kind == SubjectKind::Group {
                for g in of.split_whitespace() {
                    *sums.entry(g.to_owned()).or_default() += micros;
                }
            } else {
                let _ = sums.insert(of, micros);
            }
        }
        Ok(ids
            .iter()
            .map(|id| sums.get(*id).copied().unwrap_or(0))
            .collect())
    }

    /// The holds stored for `partition`'s orgs.
    pub async fn load_holds(&self, partition: i64) -> Result<Vec<StoredHold>> {
        let rows = sqlx::query(
            "SELECT org_id, request_id, user_id, key_id, group_ids, amount_micros, \
             placed_at_ms, expires_at_ms FROM holds WHERE partition_id = $1 \
             ORDER BY org_id, request_id",
        )
        .bind(partition)
        .fetch_all(self.writer())
        .await?;
        stored_holds(&rows)
    }

    /// Up to `limit` stored holds of one member that expire after `now_ms`,
    /// by request id: what a process that does not meter the org shows of
    /// them (as [`Db::held_sums`], rows settled since the owner's last
    /// checkpoint are still there).
    pub async fn user_holds(
        &self,
        org_id: &str,
        user_id: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<StoredHold>> {
        let rows = sqlx::query(
            "SELECT org_id, request_id, user_id, key_id, group_ids, amount_micros, \
             placed_at_ms, expires_at_ms FROM holds \
             WHERE org_id = $1 AND user_id = $2 AND expires_at_ms > $3 \
             ORDER BY request_id LIMIT $4",
        )
        .bind(org_id)
        .bind(user_id)
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(self.reader())
        .await?;
        stored_holds(&rows)
    }
}

/// Holds as their rows read.
fn stored_holds(rows: &[sqlx::any::AnyRow]) -> Result<Vec<StoredHold>> {
    rows.iter()
        .map(|r| {
            let groups: String = r.try_get("group_ids")?;
            Ok(StoredHold {
                org_id: r.try_get("org_id")?,
                request_id: r.try_get("request_id")?,
                user_id: r.try_get("user_id")?,
                key_id: r.try_get("key_id")?,
                group_ids: groups.split_whitespace().map(str::to_owned).collect(),
                amount_micros: r.try_get("amount_micros")?,
                placed_at_ms: r.try_get("placed_at_ms")?,
                expires_at_ms: r.try_get("expires_at_ms")?,
            })
        })
        .collect()
}

/// The most request ids one statement of [`delete_holds`] names.
const DELETE_BATCH: usize = 500;

/// Deletes holds by (org id, request id) inside `tx`: one statement per
/// org and [`DELETE_BATCH`] ids.
pub(crate) async fn delete_holds(tx: &mut WriteTx, holds: &[(String, String)]) -> Result<()> {
    let mut by_org: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (org, request_id) in holds {
        by_org.entry(org).or_default().push(request_id);
    }
    for (org, ids) in by_org {
        for batch in ids.chunks(DELETE_BATCH) {
            // Only placeholders are formatted into the statement.
            let sql = format!(
                "DELETE FROM holds WHERE org_id = $1 AND request_id IN ({})",
                crate::placeholders(2, batch.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(org);
            for id in batch {
                q = q.bind(*id);
            }
            let _ = q.execute(&mut **tx).await?;
        }
    }
    Ok(())
}
