//! The embedded usage log: an append-only table with one row per ingest
//! batch (a protobuf `UsageBatch`). Its `seq` is the log position a metering
//! checkpoint records: everything at or below it is applied.

use sqlx::Row;

use crate::{Db, Result};

/// One batch as stored.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub seq: i64,
    pub logged_at_ms: i64,
    pub payload: Vec<u8>,
}

impl Db {
    /// Appends one batch; returns its position once its commit succeeded.
    /// (In a transaction of its own: a statement that returns a row has
    /// handed it over before its implicit commit, whose failure the caller
    /// would then never see.)
    pub async fn append_usage(
        &self,
        logged_at_ms: i64,
        events: usize,
        payload: &[u8],
    ) -> Result<i64> {
        let mut tx = self.begin_write().await?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO usage_log (logged_at_ms, events, payload) VALUES ($1, $2, $3) RETURNING seq",
        )
        .bind(logged_at_ms)
        .bind(i64::try_from(events).unwrap_or(i64::MAX))
        .bind(payload)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Batches after position `after`, oldest first, at most `limit`.
    pub async fn read_usage(&self, after: i64, limit: i64) -> Result<Vec<UsageRecord>> {
        let rows = sqlx::query(
            "SELECT seq, logged_at_ms, payload FROM usage_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRecord {
                    seq: r.try_get("seq")?,
                    logged_at_ms: r.try_get("logged_at_ms")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    /// The last position written (0 when empty).
    pub async fn usage_head(&self) -> Result<i64> {
        let head: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM usage_log")
            .fetch_one(self.reader())
            .await?;
        Ok(head.unwrap_or(0))
    }

    /// Deletes batches that are both checkpointed (seq <= `upto`) and older
    /// than `before_ms`; returns how many went. Once any went, the log no
    /// longer holds everything metered, which `tally_meta` records (with
    /// the highest position purged) for `rebuild-projections`.
    pub async fn purge_usage(&self, upto: i64, before_ms: i64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let purged: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(seq) FROM usage_log WHERE seq <= $1 AND logged_at_ms < $2",
        )
        .bind(upto)
        .bind(before_ms)
        .fetch_one(&mut *tx)
        .await?;
        let Some(to) = purged else {
            tx.rollback().await?;
            return Ok(0);
        };
        let done = sqlx::query("DELETE FROM usage_log WHERE seq <= $1 AND logged_at_ms < $2")
            .bind(upto)
            .bind(before_ms)
            .execute(&mut *tx)
            .await?;
        let _ = sqlx::query(crate::META_SET)
            .bind("usage_log_purged_to")
            .bind(to.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}
