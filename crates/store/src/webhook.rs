//! Webhook deliveries: an outbox written by checkpoints (one row per
//! enforcement event of an org with a webhook), worked off by senders.
//!
//! A sender claims due rows with a lease (`next_attempt_ms` moves past the
//! lease and `attempts` grows by one), sends, then records the outcome only
//! if the row still carries its claim: a sender that stalled past its lease
//! cannot overwrite the outcome of the one that took over. Any number of
//! processes may send; each row is claimed by one at a time.

use sqlx::Row;
use sqlx::any::AnyRow;
use tally_core::entity::WebhookFormat;

use crate::{Db, Error, Result};

/// The enforcement event a delivery announces.
pub type DeliveryEvent = crate::query::EnforcementRow;

/// Where an org's webhook points, as its `webhook_set` event said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub url: String,
    pub format: WebhookFormat,
    /// The seq of the event that set it (the secret derives from it).
    pub seq: i64,
    pub set_at_ms: i64,
}

impl WebhookTarget {
    /// From an `orgs` row's `webhook_*` columns; `None`: no webhook.
    pub(crate) fn from_row(r: &AnyRow) -> Result<Option<WebhookTarget>> {
        let Some(url) = r.try_get::<Option<String>, _>("webhook_url")? else {
            return Ok(None);
        };
        let format: String = r.try_get("webhook_format")?;
        Ok(Some(WebhookTarget {
            url,
            format: WebhookFormat::parse(&format)
                .ok_or_else(|| Error::Corrupt(format!("webhook format {format:?}")))?,
            seq: r.try_get("webhook_seq")?,
            set_at_ms: r.try_get("webhook_set_at_ms")?,
        }))
    }
}

/// A claimed delivery, with where its org's webhook points now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub id: i64,
    pub org_id: String,
    /// `None`: the org removed its webhook.
    pub webhook: Option<WebhookTarget>,
    /// Attempts including this one.
    pub attempts: i64,
    pub event: DeliveryEvent,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered {
        status: i64,
    },
    /// Failed; tried again at `next_attempt_ms`.
    Retry {
        status: Option<i64>,
        error: String,
        next_attempt_ms: i64,
    },
    /// Failed for the last time.
    GaveUp {
        status: Option<i64>,
        error: String,
    },
    /// The org has no webhook any more.
    Cancelled,
}

/// A delivery as admins see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    pub id: i64,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_ms: Option<i64>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub delivered_ms: Option<i64>,
    pub event: DeliveryEvent,
}

const EVENT_COLUMNS: &str = "d.subject_kind, d.subject_id, d.month, d.event, d.threshold_bps, \
     d.ordinal, e.reason, e.spend_micros, e.limit_micros, e.at_ms, e.projected_micros, e.limit_day";

const EVENT_JOIN: &str = "JOIN enforcement_events e ON e.org_id = d.org_id \
     AND e.subject_kind = d.subject_kind AND e.subject_id = d.subject_id AND e.month = d.month \
     AND e.event = d.event AND e.threshold_bps = d.threshold_bps AND e.ordinal = d.ordinal";

fn event(r: &AnyRow) -> Result<DeliveryEvent> {
    DeliveryEvent::from_row(r)
}

impl Db {
    /// Claims up to `limit` due deliveries, oldest due first, until
    /// `now_ms + lease_ms`: of each subject (org, kind, id) only the first
    /// delivery still pending, so that one subject's deliveries leave one
    /// at a time in the order their events were recorded. A delivery being
    /// sent or waiting for a retry stays pending and holds the ones behind
    /// it; delivered, failed and cancelled ones hold none.
    pub async fn claim_deliveries(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>> {
        let mut tx = self.begin_write().await?;
        // The outer conditions repeat the inner ones: on PostgreSQL a
        // concurrent claim of the same row is re-checked against them after
        // the row lock is granted, and then skipped. The subject's earlier
        // delivery is pending until its outcome commits, so no snapshot
        // lets a later one pass it.
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE webhook_deliveries SET next_attempt_ms = $1, attempts = attempts + 1 \
             WHERE id IN (SELECT d.id FROM webhook_deliveries d WHERE d.state = 'pending' \
             AND d.next_attempt_ms <= $2 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p \
             WHERE p.state = 'pending' AND p.org_id = d.org_id \
             AND p.subject_kind = d.subject_kind AND p.subject_id = d.subject_id AND p.id < d.id) \
             ORDER BY d.next_attempt_ms, d.id LIMIT $3) \
             AND state = 'pending' AND next_attempt_ms <= $2 RETURNING id",
        )
        .bind(now_ms.saturating_add(lease_ms))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut out = Vec::with_capacity(ids.len());
        // One by one: a claim is a few rows, and a join by id is cheap.
        for id in ids {
            let sql = format!(
                "SELECT d.id, d.org_id, d.attempts, o.webhook_url, o.webhook_seq, \
                 o.webhook_set_at_ms, o.webhook_format, {EVENT_COLUMNS} \
                 FROM webhook_deliveries d {EVENT_JOIN} JOIN orgs o ON o.id = d.org_id \
                 WHERE d.id = $1"
            );
            let Some(r) = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(self.reader())
                .await?
            else {
                return Err(Error::Corrupt(format!(
                    "webhook delivery {id} has no enforcement event"
                )));
            };
            out.push(DueDelivery {
                id,
                org_id: r.try_get("org_id")?,
                webhook: WebhookTarget::from_row(&r)?,
                attempts: r.try_get("attempts")?,
                event: event(&r)?,
            });
        }
        Ok(out)
    }

    /// Records how the attempt of a claim ended; `false` when the claim was
    /// lost (its lease ran out and another sender took the delivery over).
    pub async fn finish_delivery(
        &self,
        d: &DueDelivery,
        outcome: &AttemptOutcome,
        now_ms: i64,
    ) -> Result<bool> {
        let q = match outcome {
            AttemptOutcome::Delivered { status } => sqlx::query(
                "UPDATE webhook_deliveries SET state = 'delivered', last_status = $3, \
                 last_error = NULL, delivered_ms = $4 \
                 WHERE id = $1 AND attempts = $2 AND state = 'pending'",
            )
            .bind(d.id)
            .bind(d.attempts)
            .bind(*status)
            .bind(now_ms),
            AttemptOutcome::Retry {
                status,
                error,
                next_attempt_ms,
            } => sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_ms = $3, last_status = $4, \
                 last_error = $5 WHERE id = $1 AND attempts = $2 AND state = 'pending'",
            )
            .bind(d.id)
            .bind(d.attempts)
            .bind(*next_attempt_ms)
            .bind(*status)
            .bind(error.clone()),
            AttemptOutcome::GaveUp { status, error } => sqlx::query(
                "UPDATE webhook_deliveries SET state = 'failed', last_status = $3, \
                 last_error = $4 WHERE id = $1 AND attempts = $2 AND state = 'pending'",
            )
            .bind(d.id)
            .bind(d.attempts)
            .bind(*status)
            .bind(error.clone()),
            AttemptOutcome::Cancelled => sqlx::query(
                "UPDATE webhook_deliveries SET state = 'cancelled', \
                 last_error = 'the org has no webhook any more' \
                 WHERE id = $1 AND attempts = $2 AND state = 'pending'",
            )
            .bind(d.id)
            .bind(d.attempts),
        };
        Ok(q.execute(&self.write).await?.rows_affected() == 1)
    }

    /// An org's deliveries, newest first, optionally in one state, after
    /// the delivery `before` of the previous page.
    pub async fn list_deliveries(
        &self,
        org_id: &str,
        state: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeliveryRow>> {
        let sql = format!(
            "SELECT d.id, d.state, d.attempts, d.next_attempt_ms, d.last_status, d.last_error, \
             d.created_ms, d.delivered_ms, {EVENT_COLUMNS} FROM webhook_deliveries d {EVENT_JOIN} \
             WHERE d.org_id = $1 AND ($2 IS NULL OR d.state = $2) AND d.id < $3 \
             ORDER BY d.id DESC LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(org_id)
            .bind(state)
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit.clamp(1, crate::query::PAGE_LEN_MAX)))
            .fetch_all(self.reader())
            .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                let next: i64 = r.try_get("next_attempt_ms")?;
                Ok(DeliveryRow {
                    id: r.try_get("id")?,
                    next_attempt_ms: (state == "pending").then_some(next),
                    state,
                    attempts: r.try_get("attempts")?,
                    last_status: r.try_get("last_status")?,
                    last_error: r.try_get("last_error")?,
                    created_ms: r.try_get("created_ms")?,
                    delivered_ms: r.try_get("delivered_ms")?,
                    event: event(r)?,
                })
            })
            .collect()
    }

    /// How many of an org's deliveries are in each state.
    pub async fn delivery_counts(&self, org_id: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM webhook_deliveries WHERE org_id = $1 \
             GROUP BY state ORDER BY state",
        )
        .bind(org_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    /// Deliveries waiting to be sent, in every org.
    pub async fn pending_deliveries(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(self.reader())
                .await?,
        )
    }

    /// Sends a failed or cancelled delivery again, from its first attempt;
    /// `false` when the org has no such delivery in one of those states.
    pub async fn redeliver(&self, org_id: &str, id: i64, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_ms = $3 \
             WHERE org_id = $1 AND id = $2 AND state IN ('failed', 'cancelled')",
        )
        .bind(org_id)
        .bind(id)
        .bind(now_ms)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
