//! Gateway tokens for every org, the operator's audit log, and when each
//! token was last used.
//!
//! An org's own tokens (admin, viewer, a gateway bound to it) live in its
//! entity log like the rest of the org. A gateway token for every org
//! belongs to no org: it is a row of `gateway_tokens`, written by the
//! operator with an `operator_audit` row in the same transaction. These
//! tables are state, not read models: `rebuild-projections` leaves them be.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Db, Result};

/// A gateway token for every org, as stored (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTokenRow {
    pub id: String,
    pub name: String,
    pub hash: [u8; 32],
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// What a revocation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Live until now.
    Now,
    /// Revoked before: nothing changed.
    Already,
    Unknown,
}

/// One entry of the operator's audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAuditRow {
    pub pos: i64,
    pub at_ms: i64,
    pub actor: String,
    pub kind: String,
    /// A JSON object.
    pub detail: String,
}

fn gateway_token(r: &AnyRow) -> Result<GatewayTokenRow> {
    let hash: Vec<u8> = r.try_get("token_hash")?;
    Ok(GatewayTokenRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        hash: hash
            .try_into()
            .map_err(|_| crate::Error::Corrupt("a gateway token hash is not 32 bytes".into()))?,
        created_at_ms: r.try_get("created_at_ms")?,
        revoked_at_ms: r.try_get("revoked_at_ms")?,
    })
}

macro_rules! gateway_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, name, token_hash, created_at_ms, revoked_at_ms FROM gateway_tokens ",
            $rest
        )
    };
}

impl Db {
    /// Stores a new gateway token and its audit entry. `Ok(false)`: the id
    /// is taken (revoked ids too). Refuses past `live_max` live tokens.
    pub async fn create_gateway_token(
        &self,
        row: &GatewayTokenRow,
        live_max: i64,
        detail: &str,
    ) -> Result<CreatedGatewayToken> {
        let mut tx = self.begin_write().await?;
        let taken: Option<i64> =
            sqlx::query_scalar("SELECT created_at_ms FROM gateway_tokens WHERE id = $1")
                .bind(&row.id)
                .fetch_optional(&mut *tx)
                .await?;
        if taken.is_some() {
            tx.rollback().await?;
            return Ok(CreatedGatewayToken::IdTaken);
        }
        let live: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM gateway_tokens WHERE revoked_at_ms IS NULL")
                .fetch_one(&mut *tx)
                .await?;
        if live >= live_max {
            tx.rollback().await?;
            return Ok(CreatedGatewayToken::Full);
        }
        let _ = sqlx::query(
            "INSERT INTO gateway_tokens (id, name, token_hash, created_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(row.hash.as_slice())
        .bind(row.created_at_ms)
        .execute(&mut *tx)
        .await?;
        audit(&mut tx, row.created_at_ms, "gateway_token_created", detail).await?;
        tx.commit().await?;
        Ok(CreatedGatewayToken::Created)
    }

    /// Revokes a gateway token, with its audit entry when it was live.
    pub async fn revoke_gateway_token(
        &self,
        id: &str,
        at_ms: i64,
        detail: &str,
    ) -> Result<Revoked> {
        let mut tx = self.begin_write().await?;
        let found: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at_ms FROM gateway_tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let found = match found {
            None => Revoked::Unknown,
            Some(Some(_)) => Revoked::Already,
            Some(None) => {
                let _ = sqlx::query(
                    "UPDATE gateway_tokens SET revoked_at_ms = $1 \
                     WHERE id = $2 AND revoked_at_ms IS NULL",
                )
                .bind(at_ms)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                audit(&mut tx, at_ms, "gateway_token_revoked", detail).await?;
                Revoked::Now
            }
        };
        if found == Revoked::Now {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(found)
    }

    /// The gateway token whose hash is `hash`, revoked or not.
    pub async fn gateway_token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<GatewayTokenRow>> {
        let row = sqlx::query(gateway_select!("WHERE token_hash = $1"))
            .bind(hash.as_slice())
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(gateway_token).transpose()
    }

    /// Gateway tokens by id, after `after`.
    pub async fn gateway_tokens_page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<GatewayTokenRow>> {
        let rows = sqlx::query(gateway_select!("WHERE id > $1 ORDER BY id LIMIT $2"))
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(gateway_token).collect()
    }

    /// Every gateway token (at most the live cap plus the revoked ones).
    pub async fn all_gateway_tokens(&self) -> Result<Vec<GatewayTokenRow>> {
        let rows = sqlx::query(gateway_select!("ORDER BY id"))
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(gateway_token).collect()
    }

    /// The operator's audit log, oldest or newest first, past position
    /// `after` in that order (none: from the start).
    pub async fn operator_audit(
        &self,
        newest_first: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<OperatorAuditRow>> {
        let sql = if newest_first {
            "SELECT pos, at_ms, actor, kind, detail FROM operator_audit WHERE pos < $1 \
             ORDER BY pos DESC LIMIT $2"
        } else {
            "SELECT pos, at_ms, actor, kind, detail FROM operator_audit WHERE pos > $1 \
             ORDER BY pos LIMIT $2"
        };
        let from = after.unwrap_or(if newest_first { i64::MAX } else { 0 });
        let rows = sqlx::query(sql)
            .bind(from)
            .bind(i64::from(limit))
            .fetch_all(self.reader())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(OperatorAuditRow {
                    pos: r.try_get("pos")?,
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    kind: r.try_get("kind")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Notes that tokens were used: `(org id, or "" for a gateway token of
    /// every org; token id; when)`. A time never moves back.
    pub async fn note_token_use(&self, uses: &[(String, String, i64)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (org, id, at) in uses {
            let _ = sqlx::query(
                "INSERT INTO token_use (org_id, token_id, last_used_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (org_id, token_id) DO UPDATE SET last_used_at_ms = \
                 excluded.last_used_at_ms WHERE token_use.last_used_at_ms < \
                 excluded.last_used_at_ms",
            )
            .bind(org)
            .bind(id)
            .bind(*at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// When each of `org`'s tokens (`""`: the gateway tokens of every org)
    /// was last used, as noted.
    pub async fn token_uses(&self, org: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT token_id, last_used_at_ms FROM token_use WHERE org_id = $1")
            .bind(org)
            .fetch_all(self.reader())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("token_id")?, r.try_get("last_used_at_ms")?)))
            .collect()
    }
}

/// What [`Db::create_gateway_token`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatedGatewayToken {
    Created,
    IdTaken,
    /// As many live gateway tokens as allowed exist.
    Full,
}

async fn audit(tx: &mut crate::tx::WriteTx, at_ms: i64, kind: &str, detail: &str) -> Result<()> {
    let _ = sqlx::query(
        "INSERT INTO operator_audit (at_ms, actor, kind, detail) VALUES ($1, 'operator', $2, $3)",
    )
    .bind(at_ms)
    .bind(kind)
    .bind(detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
