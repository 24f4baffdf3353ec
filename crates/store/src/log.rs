//! The entity log and its read models.
//!
//! [`Db::append`] writes an org's new events and projects them into the read
//! models in one transaction: either both happen or neither. `(org_id, seq)`
//! is unique, so two writers racing for the same seq conflict instead of
//! corrupting the log. [`Db::rebuild_projections`] drops the read models and
//! projects the whole log again.

use sqlx::Row;
use sqlx::any::AnyRow;
use tally_core::entity::{EntityEvent, EventKind};
use tally_core::ids::OrgId;
use tally_core::org::{MeterConfig, OrgState};
use tally_proto::{decode_entity_event, encode_entity_event};

use std::collections::{BTreeMap, HashMap};

use crate::checkpoint::{Val, insert_many};
use crate::recount::{Recount, Recounting};
use crate::tx::WriteTx;
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

/// Which events of an org's audit trail to read, and in which order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Newest first (seq descending) instead of oldest first.
    pub newest_first: bool,
    /// Past this seq, in that order (none: from the start).
    pub after_seq: Option<u64>,
    /// Changes by this actor only (`operator`, `token:<id>`).
    pub actor: Option<String>,
    /// Of these kinds only (`user_added`, …); empty: every kind.
    pub kinds: Vec<String>,
    /// At or after this time.
    pub from_ms: Option<i64>,
    /// Before this time.
    pub to_ms: Option<i64>,
}

impl Db {
    /// Appends events of one org (consecutive seqs, continuing the log) and
    /// projects them, in one transaction.
    ///
    /// When the database dates entity events (the distributed mode on
    /// PostgreSQL, [`crate::DbOptions::dated_by_database`]) they are dated
    /// here, by its clock, once this append holds the log's lock (their
    /// `at_ms` is rewritten before anything is written): every event is
    /// then dated after every [`Db::log_heads`] that did not see it, which
    /// is what lets a meter know it has every change logged before a time.
    /// Otherwise (one process: embedded, on SQLite or PostgreSQL) the
    /// caller's date stands, on the clock its usage is dated by.
    pub async fn append(&self, events: &mut [EntityEvent]) -> Result<()> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let first_org = first.org_id.clone();
        let first_seq = first.seq;
        let mut tx = self.begin_write().await?;
        if self.backend() == crate::Backend::Postgres {
            // One appender at a time: `pos` then follows commit order, so a
            // relay reading `pos > n` never skips a later-committing row.
            let _ = sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(LOG_LOCK)
                .execute(&mut *tx)
                .await?;
            if self.dated_by_database {
                let at_ms: i64 = sqlx::query_scalar(PG_NOW_MS).fetch_one(&mut *tx).await?;
                for e in events.iter_mut() {
                    e.at_ms = at_ms;
                }
            }
        }
        let events: &[EntityEvent] = events;
        let (first, last) = (&events[0], &events[events.len() - 1]);
        let mut rows = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.org_id, first_org, "one org per append");
            assert_eq!(e.seq, first_seq + i as u64, "consecutive seqs");
            rows.push(vec![
                Val::Text(e.org_id.to_string()),
                Val::Int(seq_i64(e.seq)),
                Val::Text(e.kind.name().to_owned()),
                Val::Text(e.actor.to_string()),
                Val::Int(e.at_ms),
                Val::Blob(encode_entity_event(e)),
            ]);
        }
        let inserted = insert_many(
            &mut tx,
            "INSERT INTO events (org_id, seq, kind, actor, at_ms, payload)",
            "ON CONFLICT (org_id, seq) DO NOTHING",
            rows,
        )
        .await?;
        if inserted != events.len() as u64 {
            return Err(Error::Conflict {
                org_id: first.org_id.to_string(),
            });
        }
        if !project_bulk(&mut tx, events).await? {
            for e in events {
                project(&mut tx, e).await?;
            }
        }
        set_seq(&mut tx, first.org_id.as_str(), last.seq, last.at_ms).await?;
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

    /// The last seq in the log of each of `orgs` that has one, and the
    /// log's clock at the read. When the database dates entity events (see
    /// [`Db::append`]) the heads are read once no append is under way (the
    /// appenders' lock, shared, waited for at most [`LOG_LOCK_WAIT`]), so
    /// an event not counted here is dated later than the time returned.
    /// Otherwise the time is this process's clock and promises nothing
    /// about other processes.
    pub async fn log_heads(&self, orgs: &[&str]) -> Result<(i64, Vec<(String, u64)>)> {
        if !self.dated_by_database {
            let mut conn = self.reader().acquire().await?;
            return Ok((crate::now_ms(), heads_of(&mut conn, orgs).await?));
        }
        // A read-only transaction: the lock lives as long as it does, and
        // a failed end leaves nothing written behind.
        let mut tx = self.reader().begin().await?;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{}ms'",
            LOG_LOCK_WAIT.as_millis()
        )))
        .execute(&mut *tx)
        .await?;
        let _ = sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(LOG_LOCK)
            .execute(&mut *tx)
            .await?;
        let now_ms: i64 = sqlx::query_scalar(PG_NOW_MS).fetch_one(&mut *tx).await?;
        let heads = heads_of(&mut tx, orgs).await?;
        tx.commit().await?;
        Ok((now_ms, heads))
    }

    /// The last seq of `org`'s log (0: none): one indexed read, no lock.
    /// What is committed is seen; an append in flight is not, as it has not
    /// answered yet.
    pub async fn org_head(&self, org: &str) -> Result<u64> {
        let head: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE org_id = $1")
            .bind(org)
            .fetch_one(self.reader())
            .await?;
        Ok(head.map_or(0, |h| u64::try_from(h).unwrap_or(0)))
    }

    /// The last seq in the log of each org metered on `partition` (as the
    /// partition's checkpoints name them): what a new owner must have
    /// folded before it restores their meters.
    pub async fn last_seqs_of_partition(&self, partition: i64) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT m.org_id, (SELECT MAX(e.seq) FROM events e WHERE e.org_id = m.org_id) \
             FROM meter_orgs m WHERE m.partition_id = $1",
        )
        .bind(partition)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                let seq: Option<i64> = r.try_get(1)?;
                let seq = u64::try_from(seq.unwrap_or(0))
                    .map_err(|_| Error::Corrupt(format!("negative seq {seq:?}")))?;
                Ok((r.try_get(0)?, seq))
            })
            .collect()
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

    /// A page of one org's audit trail: the events `q` selects, in its
    /// order, at most `limit`.
    pub async fn org_events_where(
        &self,
        org_id: &OrgId,
        q: &EventQuery,
        limit: u32,
    ) -> Result<Vec<EntityEvent>> {
        let mut sql = String::from("SELECT payload FROM events WHERE org_id = $1");
        let mut n = 1;
        let mut next = |sql: &mut String, clause: &str| {
            n += 1;
            sql.push_str(&clause.replace('?', &format!("${n}")));
        };
        if q.after_seq.is_some() {
            next(
                &mut sql,
                if q.newest_first {
                    " AND seq < ?"
                } else {
                    " AND seq > ?"
                },
            );
        }
        if q.actor.is_some() {
            next(&mut sql, " AND actor = ?");
        }
        if !q.kinds.is_empty() {
            sql.push_str(" AND kind IN (");
            for i in 0..q.kinds.len() {
                next(&mut sql, if i == 0 { "?" } else { ", ?" });
            }
            sql.push(')');
        }
        if q.from_ms.is_some() {
            next(&mut sql, " AND at_ms >= ?");
        }
        if q.to_ms.is_some() {
            next(&mut sql, " AND at_ms < ?");
        }
        sql.push_str(if q.newest_first {
            " ORDER BY seq DESC"
        } else {
            " ORDER BY seq"
        });
        next(&mut sql, " LIMIT ?");
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(org_id.as_str());
        if let Some(after) = q.after_seq {
            query = query.bind(seq_i64(after));
        }
        if let Some(actor) = &q.actor {
            query = query.bind(actor.clone());
        }
        for kind in &q.kinds {
            query = query.bind(kind.clone());
        }
        if let Some(from) = q.from_ms {
            query = query.bind(from);
        }
        if let Some(to) = q.to_ms {
            query = query.bind(to);
        }
        let rows = query
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
    /// Entity events logged but not relayed yet (distributed mode).
    pub async fn relay_backlog(&self) -> Result<i64> {
        let position: Option<String> =
            sqlx::query_scalar("SELECT value FROM tally_meta WHERE key = 'relay_position'")
                .fetch_optional(self.reader())
                .await?;
        let position: i64 = position.and_then(|p| p.parse().ok()).unwrap_or(0);
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(pos) FROM events")
            .fetch_one(self.reader())
            .await?;
        Ok((newest.unwrap_or(0) - position).max(0))
    }

    pub async fn relay_step<F, Fut>(&self, limit: u32, publish: F) -> Result<Option<usize>>
    where
        F: FnOnce(Vec<(i64, EntityEvent)>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), String>>,
    {
        let mut tx = self.begin_write().await?;
        if self.backend() == crate::Backend::Postgres {
            let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7243920)")
                .fetch_one(&mut *tx)
                .await?;
            if !mine {
                tx.rollback().await?;
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
            tx.rollback().await?;
            return Ok(Some(0));
        };
        let n = events.len();
        publish(events).await.map_err(Error::Relay)?;
        let _ = sqlx::query(crate::META_SET)
            .bind("relay_position")
            .bind(last.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(n))
    }

    /// Drops every read model and projects the whole log again, then
    /// counts spend and usage again from the usage log where it holds
    /// everything metered (see [`crate::recount`]; `meter` is the
    /// service's metering options, under which it judges duplicates and
    /// late usage), all in one transaction: readers see the old models
    /// until it commits. `progress` is called every few thousand entity
    /// events and every million usage events with the counts so far, and
    /// before the recounted rows are written.
    pub async fn rebuild_projections(
        &self,
        meter: MeterConfig,
        mut progress: impl FnMut(Rebuilding),
    ) -> Result<Rebuilt> {
        let mut tx = self.begin_write().await?;
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
        // Whether spend and usage are counted again decides whether the
        // orgs' directories are folded while the log is read.
        let countable = crate::recount::countable(&mut tx, &meter).await?;
        let mut after: (String, i64) = (String::new(), 0);
        let mut n = 0u64;
        let mut orgs: HashMap<OrgId, OrgState> = HashMap::new();
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
                let e = decode_row(row)?;
                project(&mut tx, &e).await?;
                set_seq(&mut tx, e.org_id.as_str(), e.seq, e.at_ms).await?;
                if countable.is_ok() {
                    fold(&mut orgs, &e, meter)?;
                }
                n += 1;
            }
            progress(Rebuilding::Entities(n));
        }
        let usage = match countable {
            Ok(upto) => {
                for state in orgs.values_mut() {
                    state.meter.owned = true;
                }
                crate::recount::recount(&mut tx, orgs, upto, &mut |r| {
                    progress(Rebuilding::Usage(r));
                })
                .await?
            }
            Err(why) => Recount::Kept(why),
        };
        tx.commit().await?;
        Ok(Rebuilt { events: n, usage })
    }
}

/// How far a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuilding {
    /// Entity events projected so far.
    Entities(u64),
    /// Counting the usage log again.
    Usage(Recounting),
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// Entity events projected.
    pub events: u64,
    pub usage: Recount,
}

/// Folds `e` into its org's directory, for the recount: from the org's
/// creation, not yet metering (no enforcement is judged while folding).
fn fold(orgs: &mut HashMap<OrgId, OrgState>, e: &EntityEvent, meter: MeterConfig) -> Result<()> {
    match orgs.get_mut(&e.org_id) {
        Some(state) => state.apply_entity(e),
        None if e.seq == 1 && matches!(e.kind, EventKind::OrgCreated { .. }) => {
            let mut state = OrgState::new(e, meter);
            state.meter.owned = false;
            let _ = orgs.insert(e.org_id.clone(), state);
        }
        None => {
            return Err(Error::Corrupt(format!(
                "the log of org {} starts at seq {} without its creation",
                e.org_id, e.seq
            )));
        }
    }
    Ok(())
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).expect("seq fits i64")
}

/// Applies one event to the read models.
async fn project(tx: &mut WriteTx, e: &EntityEvent) -> Result<()> {
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
        EventKind::OrgLimitSet {
            monthly_limit_micros,
        } => exec!(
            "UPDATE orgs SET monthly_limit_micros = $2 WHERE id = $1",
            org,
            *monthly_limit_micros,
        ),
        EventKind::WebhookSet { url, format } => exec!(
            "UPDATE orgs SET webhook_url = $2, webhook_seq = $3, webhook_set_at_ms = $4, \
             webhook_format = $5 WHERE id = $1",
            org,
            url.as_str(),
            i64::try_from(e.seq).map_err(|_| Error::Corrupt(format!("seq {}", e.seq)))?,
            at,
            format.as_str(),
        ),
        EventKind::WebhookRemoved => exec!(
            "UPDATE orgs SET webhook_url = NULL, webhook_seq = NULL, webhook_set_at_ms = NULL \
             WHERE id = $1",
            org,
        ),
        // Token hashes live in the log and in memory only.
        EventKind::TokenCreated { .. } | EventKind::TokenRevoked { .. } => {}
        EventKind::UserAdded {
            user_id,
            email,
            name,
            monthly_limit_micros,
            limit_source,
        } => exec!(
            "INSERT INTO users (org_id, id, email, name, status, monthly_limit_micros, \
             limit_source, search_text, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, 'invited', $5, $6, $7, $8, $8)",
            org,
            user_id.as_str(),
            email.as_str(),
            name.as_str(),
            *monthly_limit_micros,
            limit_source.as_str(),
            crate::query::search_text(user_id.as_str(), name, email),
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
            limit_source,
        } => exec!(
            "UPDATE users SET monthly_limit_micros = $3, limit_source = $4, updated_at_ms = $5 \
             WHERE org_id = $1 AND id = $2",
            org,
            user_id.as_str(),
            *monthly_limit_micros,
            limit_source.as_str(),
            at,
        ),
        EventKind::UserProfileChanged {
            user_id,
            email,
            name,
        } => exec!(
            "UPDATE users SET email = $3, name = $4, search_text = $5, updated_at_ms = $6 \
             WHERE org_id = $1 AND id = $2",
            org,
            user_id.as_str(),
            email.as_str(),
            name.as_str(),
            crate::query::search_text(user_id.as_str(), name, email),
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
            expires_at_ms,
        } => {
            exec!(
                "INSERT INTO api_keys (org_id, id, name, user_id, features, \
                 monthly_limit_micros, revoked, created_at_ms, updated_at_ms, expires_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7, $8)",
                org,
                key_id.as_str(),
                name.as_str(),
                user_id.as_ref().map(|u| u.to_string()),
                features_to_text(features),
                *monthly_limit_micros,
                at,
                *expires_at_ms,
            );
            insert_key_groups(tx, org, key_id.as_str(), group_ids).await?;
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
        EventKind::KeyExpirySet {
            key_id,
            expires_at_ms,
        } => exec!(
            "UPDATE api_keys SET expires_at_ms = $3, updated_at_ms = $4 \
             WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            *expires_at_ms,
            at,
        ),
        EventKind::KeyRotated {
            key_id,
            secret_hash: _,
            grace_ms,
        } => exec!(
            "UPDATE api_keys SET previous_secret_until_ms = $3, updated_at_ms = $4 \
             WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            at.saturating_add(*grace_ms),
            at,
        ),
        EventKind::KeyRenamed { key_id, name } => exec!(
            "UPDATE api_keys SET name = $3, updated_at_ms = $4 WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            name.as_str(),
            at,
        ),
        EventKind::KeyOwnerChanged { key_id, user_id } => exec!(
            "UPDATE api_keys SET user_id = $3, updated_at_ms = $4 WHERE org_id = $1 AND id = $2",
            org,
            key_id.as_str(),
            user_id.as_ref().map(|u| u.to_string()),
            at,
        ),
        EventKind::KeyGroupsChanged { key_id, group_ids } => {
            exec!(
                "DELETE FROM api_key_groups WHERE org_id = $1 AND key_id = $2",
                org,
                key_id.as_str(),
            );
            insert_key_groups(tx, org, key_id.as_str(), group_ids).await?;
            exec!(
                "UPDATE api_keys SET updated_at_ms = $3 WHERE org_id = $1 AND id = $2",
                org,
                key_id.as_str(),
                at,
            );
        }
    }
    Ok(())
}

async fn insert_key_groups(
    tx: &mut WriteTx,
    org: &str,
    key_id: &str,
    group_ids: &[tally_core::ids::GroupId],
) -> Result<()> {
    for g in group_ids {
        let _ = sqlx::query(
            "INSERT INTO api_key_groups (org_id, key_id, group_id) VALUES ($1, $2, $3)",
        )
        .bind(org)
        .bind(key_id)
        .bind(g.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn set_seq(tx: &mut WriteTx, org: &str, seq: u64, at_ms: i64) -> Result<()> {
    let _ = sqlx::query("UPDATE orgs SET seq = $2, updated_at_ms = $3 WHERE id = $1")
        .bind(org)
        .bind(seq_i64(seq))
        .bind(at_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The last seq of each of `orgs` that has a log.
async fn heads_of(conn: &mut sqlx::AnyConnection, orgs: &[&str]) -> Result<Vec<(String, u64)>> {
    let mut heads = Vec::with_capacity(orgs.len());
    for chunk in orgs.chunks(IN_LIST_LEN) {
        let sql = format!(
            "SELECT id, seq FROM orgs WHERE id IN ({})",
            in_list(1, chunk.len())
        );
        // Only placeholders are interpolated; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(*id);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let seq: i64 = r.try_get(1)?;
            let seq =
                u64::try_from(seq).map_err(|_| Error::Corrupt(format!("negative seq {seq}")))?;
            heads.push((r.try_get(0)?, seq));
        }
    }
    Ok(heads)
}

/// How long [`Db::log_heads`] waits for an append under way (then it
/// fails, and the caller retries).
pub const LOG_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The PostgreSQL transaction lock every entity append holds (exclusive)
/// and [`Db::log_heads`] waits for (shared).
const LOG_LOCK: i64 = 7_243_918;

/// PostgreSQL's clock, in Unix milliseconds: the date of entity events.
const PG_NOW_MS: &str = "SELECT FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// Ids bound per `IN (…)` list.
const IN_LIST_LEN: usize = 500;

/// `… IN ($k, $k+1, …)` for `n` values after `k - 1` other parameters.
fn in_list(first: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('$');
        s.push_str(&(first + i).to_string());
    }
    s
}

/// Runs `sql_head … IN (ids)` in chunks; `params` are bound before the ids.
async fn exec_in(tx: &mut WriteTx, sql_head: &str, params: &[Val], ids: &[String]) -> Result<()> {
    for chunk in ids.chunks(IN_LIST_LEN) {
        let sql = format!("{sql_head} IN ({})", in_list(params.len() + 1, chunk.len()));
        // Only placeholders are interpolated; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for v in params {
            q = match v {
                Val::Int(x) => q.bind(*x),
                Val::OptInt(x) => q.bind(*x),
                Val::Text(x) => q.bind(x.clone()),
                Val::OptText(x) => q.bind(x.clone()),
                Val::Blob(x) => q.bind(x.clone()),
            };
        }
        for id in chunk {
            q = q.bind(id.clone());
        }
        let _ = q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Projects a bulk change (memberships, limits, statuses of many users) in a
/// few set-wise statements instead of one per event. Applies when every
/// event is of those kinds and each user's events come in the order
/// removals, additions, limit, status — the order `BulkUpdateUsers`
/// produces — so that grouping them by kind changes nothing. Returns false
/// (projecting nothing) otherwise.
async fn project_bulk(tx: &mut WriteTx, events: &[EntityEvent]) -> Result<bool> {
    if events.len() < 8 {
        return Ok(false);
    }
    let phase = |k: &EventKind| match k {
        EventKind::MemberRemoved { .. } => Some(0),
        EventKind::MemberAdded { .. } => Some(1),
        EventKind::UserLimitSet { .. } => Some(2),
        EventKind::UserActivated { .. }
        | EventKind::UserSuspended { .. }
        | EventKind::UserRemoved { .. } => Some(3),
        _ => None,
    };
    let mut last_phase: HashMap<&str, u8> = HashMap::new();
    for e in events {
        let (Some(p), Some(u)) = (phase(&e.kind), e.kind.user_id()) else {
            return Ok(false);
        };
        let before = last_phase.insert(u.as_str(), p).unwrap_or(0);
        if p < before {
            return Ok(false);
        }
    }
    let org = events[0].org_id.to_string();
    let at = events[0].at_ms;
    let mut removed: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut added = Vec::new();
    let mut limits: BTreeMap<(Option<i64>, &'static str), Vec<String>> = BTreeMap::new();
    let mut statuses: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for e in events {
        match &e.kind {
            EventKind::MemberRemoved { group_id, user_id } => {
                removed
                    .entry(group_id.as_str())
                    .or_default()
                    .push(user_id.to_string());
            }
            EventKind::MemberAdded { group_id, user_id } => added.push(vec![
                Val::Text(org.clone()),
                Val::Text(group_id.to_string()),
                Val::Text(user_id.to_string()),
                Val::Int(e.at_ms),
            ]),
            EventKind::UserLimitSet {
                user_id,
                monthly_limit_micros,
                limit_source,
            } => {
                limits
                    .entry((*monthly_limit_micros, limit_source.as_str()))
                    .or_default()
                    .push(user_id.to_string());
            }
            EventKind::UserActivated { user_id } => {
                statuses
                    .entry("active")
                    .or_default()
                    .push(user_id.to_string());
            }
            EventKind::UserSuspended { user_id } => {
                statuses
                    .entry("suspended")
                    .or_default()
                    .push(user_id.to_string());
            }
            EventKind::UserRemoved { user_id } => {
                statuses
                    .entry("removed")
                    .or_default()
                    .push(user_id.to_string());
            }
            _ => unreachable!("checked above"),
        }
    }
    for (group, users) in removed {
        exec_in(
            tx,
            "DELETE FROM group_members WHERE org_id = $1 AND group_id = $2 AND user_id",
            &[Val::Text(org.clone()), Val::Text(group.to_owned())],
            &users,
        )
        .await?;
    }
    let _ = insert_many(
        tx,
        "INSERT INTO group_members (org_id, group_id, user_id, added_at_ms)",
        "",
        added,
    )
    .await?;
    for ((limit, source), users) in limits {
        exec_in(
            tx,
            "UPDATE users SET monthly_limit_micros = $2, limit_source = $3, updated_at_ms = $4 \
             WHERE org_id = $1 AND id",
            &[
                Val::Text(org.clone()),
                Val::OptInt(limit),
                Val::Text(source.to_owned()),
                Val::Int(at),
            ],
            &users,
        )
        .await?;
    }
    for (status, users) in statuses {
        exec_in(
            tx,
            "UPDATE users SET status = $2, updated_at_ms = $3 WHERE org_id = $1 AND id",
            &[
                Val::Text(org.clone()),
                Val::Text(status.to_owned()),
                Val::Int(at),
            ],
            &users,
        )
        .await?;
        if status == "removed" {
            exec_in(
                tx,
                "DELETE FROM group_members WHERE org_id = $1 AND user_id",
                &[Val::Text(org.clone())],
                &users,
            )
            .await?;
        }
    }
    Ok(true)
}
