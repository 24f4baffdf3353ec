//! The entity log and its read models.
//!
//! [`Db::append`] writes an org's new events and projects them into the read
//! models in one transaction: either both happen or neither. `(org_id, seq)`
//! is unique, so two writers racing for the same seq conflict instead of
//! corrupting the log. [`Db::rebuild_projections`] drops the read models and
//! projects the whole log again.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tally_core::entity::{EntityEvent, EventKind};
use tally_core::ids::OrgId;
use tally_proto::{decode_entity_event, encode_entity_event};

use crate::{Db, Error, Result};

/// Rows read per round trip when scanning the log.
const SCAN_PAGE_LEN: i64 = 5_000;

/// Thresholds as stored in `orgs.alert_thresholds_bps`: `5000,8000,10000`.
pub fn thresholds_to_text(bps: &[u32]) -> String {
    bps.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

pub fn thresholds_from_text(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse()
                .map_err(|_| Error::Corrupt(format!("thresholds {s:?}")))
        })
        .collect()
}

/// Features as stored in `api_keys.features`: a JSON array of strings.
pub fn features_to_text(f: &[String]) -> String {
    serde_json::to_string(f).expect("strings serialize")
}

pub fn features_from_text(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("features {s:?}: {e}")))
}

fn decode_row(row: &AnyRow) -> Result<EntityEvent> {
    let payload: Vec<u8> = row.try_get("payload")?;
    decode_entity_event(&payload).map_err(|e| Error::Corrupt(format!("entity event: {e}")))
}

impl Db {
    /// Appends events of one org (consecutive seqs, continuing the log) and
    /// projects them, in one transaction.
    pub async fn append(&self, events: &[EntityEvent]) -> Result<()> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let mut tx = self.writer().begin().await?;
        if self.backend() == crate::Backend::Postgres {
            // One appender at a time: `pos` then follows commit order, so a
            // relay reading `pos > n` never skips a later-committing row.
            let _ = sqlx::query("SELECT pg_advisory_xact_lock(7243918)")
                .execute(&mut *tx)
                .await?;
        }
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.org_id, first.org_id, "one org per append");
            assert_eq!(e.seq, first.seq + i as u64, "consecutive seqs");
            let inserted = sqlx::query(
                "INSERT INTO events (org_id, seq, kind, actor, at_ms, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (org_id, seq) DO NOTHING",
            )
            .bind(e.org_id.as_str())
            .bind(seq_i64(e.seq))
            .bind(e.kind.name())
            .bind(e.actor.to_string())
            .bind(e.at_ms)
            .bind(encode_entity_event(e))
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Err(Error::Conflict {
                    org_id: e.org_id.to_string(),
                });
            }
            project(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Calls `f` with every event of every org, in (org, seq) order.
    pub async fn scan_events(&self, mut f: impl FnMut(EntityEvent) -> Result<()>) -> Result<u64> {
        let mut after: (String, i64) = (String::new(), 0);
        let mut n = 0;
        loop {
            let rows = sqlx::query(
                "SELECT org_id, seq, payload FROM events WHERE (org_id, seq) > ($1, $2) \
                 ORDER BY org_id, seq LIMIT $3",
            )
            .bind(after.0.as_str())
            .bind(after.1)
            .bind(SCAN_PAGE_LEN)
            .fetch_all(self.reader())
            .await?;
            let Some(last) = rows.last() else {
                return Ok(n);
            };
            after = (last.try_get("org_id")?, last.try_get("seq")?);
            for row in &rows {
                f(decode_row(row)?)?;
                n += 1;
            }
        }
    }

    /// The events of one org with seq > `after_seq`, at most `limit`.
    pub async fn org_events(
        &self,
        org_id: &OrgId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<EntityEvent>> {
        let rows = sqlx::query(
            "SELECT payload FROM events WHERE org_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(org_id.as_str())
        .bind(seq_i64(after_seq))
        .bind(i64::from(limit))
        .fetch_all(self.reader())
        .await?;
        rows.iter().map(decode_row).collect()
    }

    /// Events of every org after log position `after_pos`, in append order
    /// (which on PostgreSQL is commit order: appends are serialized), with
    /// their positions: what the relay publishes.
    pub async fn events_after(
        &self,
        after_pos: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EntityEvent)>> {
        let rows =
            sqlx::query("SELECT pos, payload FROM events WHERE pos > $1 ORDER BY pos LIMIT $2")
                .bind(after_pos)
                .bind(i64::from(limit))
                .fetch_all(self.reader())
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("pos")?, decode_row(r)?)))
            .collect()
    }

    /// One step of the outbox relay: the events after the relayed position
    /// (at most `limit`) go to `publish`, and only when it succeeds does the
    /// position move, in one transaction. On PostgreSQL a transaction lock
    /// makes one process the relay at a time; `None` when another holds it.
    /// Publishing is at least once: a crash between publish and commit
    /// publishes again, and followers skip events by seq.
    pub async fn relay_step<F, Fut>(&self, limit: u32, publish: F) -> Result<Option<usize>>
    where
        F: FnOnce(Vec<(i64, EntityEvent)>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), String>>,
    {
        let mut tx = self.writer().begin().await?;
        if self.backend() == crate::Backend::Postgres {
            let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7243920)")
                .fetch_one(&mut *tx)
                .await?;
            if !mine {
                return Ok(None);
            }
        }
        let position: Option<String> =
            sqlx::query_scalar("SELECT value FROM tally_meta WHERE key = 'relay_position'")
                .fetch_optional(&mut *tx)
                .await?;
        let position: i64 = match position {
            Some(p) => p
                .parse()
                .map_err(|_| Error::Corrupt(format!("relay position {p:?}")))?,
            None => 0,
        };
        let rows =
            sqlx::query("SELECT pos, payload FROM events WHERE pos > $1 ORDER BY pos LIMIT $2")
                .bind(position)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
        let events = rows
            .iter()
            .map(|r| Ok((r.try_get("pos")?, decode_row(r)?)))
            .collect::<Result<Vec<(i64, EntityEvent)>>>()?;
        let Some(last) = events.last().map(|(pos, _)| *pos) else {
            return Ok(Some(0));
        };
        let n = events.len();
        publish(events).await.map_err(Error::Relay)?;
        let _ = sqlx::query(
            "INSERT INTO tally_meta (key, value) VALUES ('relay_position', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(last.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(n))
    }

    /// Drops every read model and projects the whole log again, in one
    /// transaction: readers see the old models until it commits.
    /// `progress` is called every few thousand events with the count so far.
    pub async fn rebuild_projections(&self, mut progress: impl FnMut(u64)) -> Result<u64> {
        let mut tx = self.writer().begin().await?;
        for table in [
            "api_key_groups",
            "api_keys",
            "group_members",
            "org_groups",
            "users",
            "orgs",
        ] {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
                .execute(&mut *tx)
                .await?;
        }
        let mut after: (String, i64) = (String::new(), 0);
        let mut n = 0u64;
        loop {
            let rows = sqlx::query(
                "SELECT org_id, seq, payload FROM events WHERE (org_id, seq) > ($1, $2) \
                 ORDER BY org_id, seq LIMIT $3",
            )
            .bind(after.0.as_str())
            .bind(after.1)
            .bind(SCAN_PAGE_LEN)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = (last.try_get("org_id")?, last.try_get("seq")?);
            for row in &rows {
                project(&mut tx, &decode_row(row)?).await?;
                n += 1;
            }
            progress(n);
        }
        tx.commit().await?;
        Ok(n)
    }
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).expect("seq fits i64")
}

/// Applies one event to the read models.
async fn project(tx: &mut Transaction<'static, Any>, e: &EntityEvent) -> Result<()> {
    let org = e.org_id.as_str();
    let at = e.at_ms;
    macro_rules! exec {
        ($sql:expr $(, $bind:expr)* $(,)?) => {{
            let _ = sqlx::query($sql)$(.bind($bind))*.execute(&mut **tx).await?;
        }};
    }
    match &e.kind {
        EventKind::OrgCreated {
            name,
            default_monthly_limit_micros,
            alert_thresholds_bps,
        } => exec!(
            "INSERT INTO orgs (id, name, default_monthly_limit_micros, alert_thresholds_bps, \
             created_at_ms, updated_at_ms, seq) VALUES ($1, $2, $3, $4, $5, $5, 0)",
            org,
            name.as_str(),
            *default_monthly_limit_micros,
            thresholds_to_text(alert_thresholds_bps),
            at,
        ),
        EventKind::OrgSettingsChanged {
            name,
            default_monthly_limit_micros,
            alert_thresholds_bps,
        } => exec!(
            "UPDATE orgs SET name = $2, default_monthly_limit_micros = $3, \
             alert_thresholds_bps = $4 WHERE id = $1",
            org,
            name.as_str(),
            *default_monthly_limit_micros,
            thresholds_to_text(alert_thresholds_bps),
        ),
        // Token hashes live in the log and in memory only.
        EventKind::TokenCreated { .. } => {}
        EventKind::UserAdded {
            user_id,
            email,
            name,
            monthly_limit_micros,
        } => exec!(
            "INSERT INTO users (org_id, id, email, name, status, monthly_limit_micros, \
             created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, 'invited', $5, $6, $6)",
            org,
            user_id.as_str(),
            email.as_str(),
            name.as_str(),
            *monthly_limit_micros,
            at,
        ),
        EventKind::UserActivated { user_id } => exec!(
            "UPDATE users SET status = 'active', updated_at_ms = $3 WHERE org_id = $1 AND id = $2",
            org,
            user_id.as_str(),
            at,
        ),
        EventKind::UserSuspended { user_id } => exec!(
            "UPDATE users SET status = 'suspended', updated_at_ms = $3 \
             WHERE org_id = $1 AND id = $2",
            org,
            user_id.as_str(),
            at,
        ),
        EventKind::UserRemoved { user_id } => {
            exec!(
                "UPDATE users SET status = 'removed', updated_at_ms = $3 \
                 WHERE org_id = $1 AND id = $2",
                org,
                user_id.as_str(),
                at,
            );
            exec!(
                "DELETE FROM group_members WHERE org_id = $1 AND user_id = $2",
                org,
                user_id.as_str()
            );
        }
        EventKind::UserLimitSet {
            user_id,
            monthly_limit_micros,
        } => exec!(
            "UPDATE users SET monthly_limit_micros = $3, updated_at_ms = $4 \
             WHERE org_id = $1 AND id = $2",
            org,
            user_id.as_str(),
            *monthly_limit_micros,
            at,
        ),
        EventKind::UserProfileChanged {
            user_id,
            email,
            name,
        } => exec!(
            "UPDATE users SET email = $3, name = $4, updated_at_ms = $5 \
             WHERE org_id = $1 AND id = $2",
            org,
            user_id.as_str(),
            email.as_str(),
            name.as_str(),
            at,
        ),
        EventKind::GroupCreated {
            group_id,
            name,
            monthly_limit_micros,
        } => exec!(
            "INSERT INTO org_groups (org_id, id, name, monthly_limit_micros, deleted, \
             created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, 0, $5, $5)",
            org,
            group_id.as_str(),
            name.as_str(),
            *monthly_limit_micros,
            at,
        ),
        EventKind::GroupRenamed { group_id, name } => exec!(
            "UPDATE org_groups SET name = $3, updated_at_ms = $4 WHERE org_id = $1 AND id = $2",
            org,
            group_id.as_str(),
            name.as_str(),
            at,
        ),
        EventKind::GroupDeleted { group_id } => {
            exec!(
                "UPDATE org_groups SET deleted = 1, updated_at_ms = $3 \
                 WHERE org_id = $1 AND id = $2",
                org,
                group_id.as_str(),
                at,
            );
            exec!(
                "DELETE FROM group_members WHERE org_id = $1 AND group_id = $2",
                org,
                group_id.as_str()
            );
            exec!(
                "DELETE FROM api_key_groups WHERE org_id = $1 AND group_id = $2",
                org,
                group_id.as_str()
            );
        }
        EventKind::GroupLimitSet {
            group_id,
            monthly_limit_micros,
        } => exec!(
            "UPDATE org_groups SET monthly_limit_micros = $3, updated_at_ms = $4 \
             WHERE org_id = $1 AND id = $2",
            org,
            group_id.as_str(),
            *monthly_limit_micros,
            at,
        ),
        EventKind::MemberAdded { group_id, user_id } => exec!(
            "INSERT INTO group_members (org_id, group_id, user_id, added_at_ms) \
             VALUES ($1, $2, $3, $4)",
            org,
            group_id.as_str(),
            user_id.as_str(),
            at,
        ),
        EventKind::MemberRemoved { group_id, user_id } => exec!(
            "DELETE FROM group_members WHERE org_id = $1 AND group_id = $2 AND user_id = $3",
            org,
            group_id.as_str(),
            user_id.as_str(),
        ),
        EventKind::KeyCreated {
            key_id,
            name,
            user_id,
            group_ids,
            features,
            monthly_limit_micros,
            secret_hash: _,
        } => {
            exec!(
                "INSERT INTO api_keys (org_id, id, name, user_id, features, \
                 monthly_limit_micros, revoked, created_at_ms, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7)",
                org,
                key_id.as_str(),
                name.as_str(),
                user_id.as_ref().map(|u| u.to_string()),
                features_to_text(features),
                *monthly_limit_micros,
                at,
            );
            for g in group_ids {
                exec!(
                    "INSERT INTO api_key_groups (org_id, key_id, group_id) VALUES ($1, $2, $3)",
                    org,
                    key_id.as_str(),
                    g.as_str(),
                );
            }
        }
        EventKind::KeyFeaturesChanged { key_id, features } => exec!(
            "UPDATE api_keys SET features = $3, updated_at_ms = $4 WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            features_to_text(features),
            at,
        ),
        EventKind::KeyLimitSet {
            key_id,
            monthly_limit_micros,
        } => exec!(
            "UPDATE api_keys SET monthly_limit_micros = $3, updated_at_ms = $4 \
             WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            *monthly_limit_micros,
            at,
        ),
        EventKind::KeyRevoked { key_id } => exec!(
            "UPDATE api_keys SET revoked = 1, updated_at_ms = $3 WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            at,
        ),
    }
    exec!(
        "UPDATE orgs SET seq = $2, updated_at_ms = $3 WHERE id = $1",
        org,
        seq_i64(e.seq),
        at
    );
    Ok(())
}
