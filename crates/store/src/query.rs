//! The admin read side: lists with sorting, filters and keyset pagination,
//! details with history. Spend comes from the metering checkpoints; the
//! sort keys and filters are closed enums, so no caller text ever reaches
//! the SQL other than as a bound value.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use tally_core::entity::{LimitSource, UserStatus};
use tally_core::ids::OrgId;
use tally_core::time::{Day, Month};

use crate::log::{features_from_text, thresholds_from_text};
use crate::webhook::WebhookTarget;
use crate::{Backend, Db, Error, Result};

/// The most rows one page may hold.
pub const PAGE_LEN_MAX: u32 = 1_000;
/// Months of history a detail shows.
pub const HISTORY_MONTHS: i64 = 13;

/// Utilization, the listing's sort key: parts per million of the limit,
/// computed exactly in integers. Spend is capped at 9e12 micro-USD (9
/// million USD) first so the product cannot overflow; a user past that
/// sorts as if at the cap.
const PPM: i64 = 1_000_000;
const SPEND_CAP_FOR_RATIO: i64 = 9_000_000_000_000;

/// A member's utilization as the listing sorts by it (see [`PPM`]): -1
/// without a limit.
pub fn utilization_ppm(spend_micros: i64, limit_micros: Option<i64>) -> i64 {
    match limit_micros {
        None => -1,
        // Limits are at least 1 micro-USD (`check_limit`).
        Some(limit) => spend_micros.min(SPEND_CAP_FOR_RATIO) * PPM / limit.max(1),
    }
}

#[derive(Debug, Clone)]
pub struct OrgRow {
    pub id: String,
    pub name: String,
    pub default_monthly_limit_micros: Option<i64>,
    pub monthly_limit_micros: Option<i64>,
    pub webhook: Option<WebhookTarget>,
    pub alert_thresholds_bps: Vec<u32>,
    pub created_at_ms: i64,
    pub seq: i64,
    pub spend_micros: i64,
    pub requests: i64,
    /// The day of the month of its first usage this month (0: none).
    pub first_day: u8,
}

/// An org as the operator's list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgListRow {
    pub id: String,
    pub name: String,
    pub default_monthly_limit_micros: Option<i64>,
    pub monthly_limit_micros: Option<i64>,
    pub created_at_ms: i64,
    pub spend_micros: i64,
    pub requests: i64,
    pub member_count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub status: String,
    pub monthly_limit_micros: Option<i64>,
    pub limit_source: LimitSource,
    pub groups: Vec<String>,
    pub spend_micros: i64,
    pub requests: i64,
    /// The day of the month of their first usage this month (0: none).
    pub first_day: u8,
    pub last_active_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    pub id: String,
    pub name: String,
    pub member_count: i64,
    pub monthly_limit_micros: Option<i64>,
    pub spend_micros: i64,
    pub requests: i64,
    /// The day of the month of its first usage this month (0: none).
    pub first_day: u8,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub user_id: Option<String>,
    pub group_ids: Vec<String>,
    pub features: Vec<String>,
    pub monthly_limit_micros: Option<i64>,
    pub spend_micros: i64,
    pub requests: i64,
    /// The day of the month of its first usage this month (0: none).
    pub first_day: u8,
    pub revoked: bool,
    pub last_used_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    /// Until when the secret its last rotation replaced works.
    pub previous_secret_until_ms: Option<i64>,
}

/// Spend over one period: a month (`yyyymm`) or a day (`yyyymmdd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodSpend {
    pub period: i64,
    pub spend_micros: i64,
    pub requests: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSort {
    Name,
    Email,
    Spend,
    Limit,
    Utilization,
    LastActive,
}

impl UserSort {
    pub fn parse(s: &str) -> Option<UserSort> {
        Some(match s {
            "name" => UserSort::Name,
            "email" => UserSort::Email,
            "spend" => UserSort::Spend,
            "limit" => UserSort::Limit,
            "utilization" => UserSort::Utilization,
            "last_active" => UserSort::LastActive,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UserSort::Name => "name",
            UserSort::Email => "email",
            UserSort::Spend => "spend",
            UserSort::Limit => "limit",
            UserSort::Utilization => "utilization",
            UserSort::LastActive => "last_active",
        }
    }

    /// Sorted by a value that moves as usage comes in.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            UserSort::Spend | UserSort::Utilization | UserSort::LastActive
        )
    }

    pub fn is_text(self) -> bool {
        matches!(self, UserSort::Name | UserSort::Email)
    }
}

/// A sort key value, as a cursor carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortValue {
    Int(i64),
    Text(String),
}

/// Where a page ends: the last row's sort key and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub value: SortValue,
    pub id: String,
}

#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// `None`: every status but `removed`.
    pub status: Option<UserStatus>,
    pub group: Option<String>,
    /// Case-insensitive substring of id, name or email.
    pub q: Option<String>,
    pub min_utilization_bps: Option<u32>,
    pub cut_off: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct UserListQuery {
    pub sort: UserSort,
    pub descending: bool,
    pub filter: UserFilter,
    pub after: Option<Cursor>,
    pub limit: u32,
    pub month: Month,
}

/// Numbers `$n` placeholders while a statement is assembled.
struct Binds {
    values: Vec<SortValue>,
}

impl Binds {
    fn push(&mut self, v: SortValue) -> String {
        self.values.push(v);
        format!("${}", self.values.len())
    }
}

/// A row's `first_day` (`COALESCE(s.first_day, 0)` of its month's spend).
fn first_day(r: &AnyRow) -> Result<u8> {
    let d: i64 = r.try_get("first_day")?;
    u8::try_from(d).map_err(|_| Error::Corrupt(format!("first day {d}")))
}

fn user_row(r: &AnyRow) -> Result<UserRow> {
    Ok(UserRow {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        name: r.try_get("name")?,
        status: r.try_get("status")?,
        monthly_limit_micros: r.try_get("monthly_limit_micros")?,
        limit_source: {
            let source: String = r.try_get("limit_source")?;
            LimitSource::parse(&source)
                .ok_or_else(|| Error::Corrupt(format!("limit source {source:?}")))?
        },
        groups: Vec::new(),
        spend_micros: r.try_get("spend_micros")?,
        requests: r.try_get("requests")?,
        first_day: first_day(r)?,
        last_active_at_ms: r.try_get("last_at_ms")?,
        created_at_ms: r.try_get("created_at_ms")?,
    })
}

/// What a search matches in a member's row: id, name and email with ASCII
/// letters lowercased (as SQL `LOWER` folds them on both backends, so rows
/// the v15 migration filled match alike), a line apart so no match spans
/// two of them. Kept in `users.search_text` so a search reads one column
/// instead of folding three per row.
pub(crate) fn search_text(id: &str, name: &str, email: &str) -> String {
    format!("{id}\n{name}\n{email}").to_ascii_lowercase()
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    // ASCII only: SQL LOWER folds ASCII letters only (SQLite, and
    // PostgreSQL under collation "C"), and both sides must fold alike.
    for c in s.to_ascii_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

fn day_range(month: Month) -> (i64, i64) {
    let first = i64::from(Day::from_unix_ms(month.start_ms()).yyyymmdd());
    let next = i64::from(Day::from_unix_ms(month.next().start_ms()).yyyymmdd());
    (first, next)
}

impl Db {
    fn utilization_sql(&self) -> String {
        format!(
            "(CASE WHEN u.monthly_limit_micros IS NULL THEN -1 ELSE \
             {} * {PPM} / u.monthly_limit_micros END)",
            self.least(
                "COALESCE(s.spend_micros, 0)",
                &SPEND_CAP_FOR_RATIO.to_string()
            )
        )
    }

    fn user_sort_sql(&self, sort: UserSort) -> String {
        match sort {
            UserSort::Name => "u.name".into(),
            UserSort::Email => "u.email".into(),
            UserSort::Spend => "COALESCE(s.spend_micros, 0)".into(),
            // Unlimited sorts above every limit.
            UserSort::Limit => "COALESCE(u.monthly_limit_micros, 9223372036854775807)".into(),
            UserSort::Utilization => self.utilization_sql(),
            UserSort::LastActive => format!("COALESCE({LAST_ACTIVE_SQL}, -1)"),
        }
    }

    pub async fn org(&self, org_id: &str, month: Month) -> Result<Option<OrgRow>> {
        let row = sqlx::query(
            "SELECT o.id, o.name, o.default_monthly_limit_micros, o.alert_thresholds_bps, \
             o.monthly_limit_micros, o.webhook_url, o.webhook_seq, o.webhook_set_at_ms, \
             o.webhook_format, o.created_at_ms, o.seq, COALESCE(s.spend_micros, 0) AS spend_micros, \
             COALESCE(s.requests, 0) AS requests, COALESCE(s.first_day, 0) AS first_day FROM orgs o \
             LEFT JOIN spend_monthly s ON s.org_id = o.id AND s.kind = 'org' \
             AND s.subject_id = o.id AND s.month = $2 WHERE o.id = $1",
        )
        .bind(org_id)
        .bind(i64::from(month.yyyymm()))
        .fetch_optional(self.reader())
        .await?;
        row.map(|r| {
            Ok(OrgRow {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                default_monthly_limit_micros: r.try_get("default_monthly_limit_micros")?,
                monthly_limit_micros: r.try_get("monthly_limit_micros")?,
                webhook: WebhookTarget::from_row(&r)?,
                alert_thresholds_bps: thresholds_from_text(
                    &r.try_get::<String, _>("alert_thresholds_bps")?,
                )?,
                created_at_ms: r.try_get("created_at_ms")?,
                seq: r.try_get("seq")?,
                spend_micros: r.try_get("spend_micros")?,
                requests: r.try_get("requests")?,
                first_day: first_day(&r)?,
            })
        })
        .transpose()
    }

    /// Orgs ordered by id, after `after`, whose id or name contains `q`
    /// (case-insensitive), at most `limit`: with their spend in `month` and
    /// their members (not removed). One query.
    pub async fn list_orgs(
        &self,
        month: Month,
        q: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OrgListRow>> {
        let rows = sqlx::query(
            "SELECT o.id, o.name, o.default_monthly_limit_micros, o.monthly_limit_micros, \
             o.created_at_ms, COALESCE(s.spend_micros, 0) AS spend_micros, \
             COALESCE(s.requests, 0) AS requests, \
             (SELECT COUNT(*) FROM users u WHERE u.org_id = o.id AND u.status <> 'removed') \
             AS member_count FROM orgs o \
             LEFT JOIN spend_monthly s ON s.org_id = o.id AND s.kind = 'org' \
             AND s.subject_id = o.id AND s.month = $1 \
             WHERE o.id > $2 AND ($3 = '' OR LOWER(o.id) LIKE $3 ESCAPE '\\' \
             OR LOWER(o.name) LIKE $3 ESCAPE '\\') ORDER BY o.id LIMIT $4",
        )
        .bind(i64::from(month.yyyymm()))
        .bind(after.unwrap_or(""))
        .bind(q.map(escape_like).unwrap_or_default())
        .bind(i64::from(limit.clamp(1, PAGE_LEN_MAX + 1)))
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OrgListRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    default_monthly_limit_micros: r.try_get("default_monthly_limit_micros")?,
                    monthly_limit_micros: r.try_get("monthly_limit_micros")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    spend_micros: r.try_get("spend_micros")?,
                    requests: r.try_get("requests")?,
                    member_count: r.try_get("member_count")?,
                })
            })
            .collect()
    }

    /// The SQL of a user listing and its bound values. `ids_only` selects
    /// just the ids (for a snapshot); `limit` is the rows to read.
    fn user_list_sql(
        &self,
        org_id: &OrgId,
        q: &UserListQuery,
        ids_only: bool,
        limit: u32,
    ) -> Result<(String, Vec<SortValue>)> {
        let mut b = Binds { values: Vec::new() };
        let org = b.push(SortValue::Text(org_id.to_string()));
        let month = b.push(SortValue::Int(i64::from(q.month.yyyymm())));
        let key = self.user_sort_sql(q.sort);
        let mut filters = vec![format!("u.org_id = {org}")];
        match q.filter.status {
            Some(s) => filters.push(format!(
                "u.status = {}",
                b.push(SortValue::Text(s.as_str().into()))
            )),
            None => filters.push("u.status <> 'removed'".into()),
        }
        // With a group, the group's members drive the query (a group is
        // small next to the org): `CROSS JOIN` makes SQLite keep that order;
        // PostgreSQL plans it on its own.
        let from = match &q.filter.group {
            Some(g) => {
                let g = b.push(SortValue::Text(g.clone()));
                filters.push(format!(
                    "gm.org_id = {org} AND gm.group_id = {g} AND u.id = gm.user_id"
                ));
                "group_members gm CROSS JOIN users u"
            }
            None => "users u",
        };
        if let Some(text) = &q.filter.q {
            // Ids, names and emails hold no line break: a search with one
            // matches nobody (in `search_text` it would span two fields).
            filters.push(if text.contains('\n') {
                "1 = 0".to_owned()
            } else {
                let p = b.push(SortValue::Text(escape_like(text)));
                format!("u.search_text LIKE {p} ESCAPE '\\'")
            });
        }
        if let Some(bps) = q.filter.min_utilization_bps {
            // utilization >= bps / 10 000  ⇔  ppm >= bps * 100
            let p = b.push(SortValue::Int(i64::from(bps) * 100));
            filters.push(format!(
                "u.monthly_limit_micros IS NOT NULL AND {} >= {p}",
                self.utilization_sql()
            ));
        }
        if let Some(cut) = q.filter.cut_off {
            let expr = "(u.monthly_limit_micros IS NOT NULL AND \
                        COALESCE(s.spend_micros, 0) >= u.monthly_limit_micros)";
            filters.push(if cut {
                expr.to_owned()
            } else {
                format!("NOT {expr}")
            });
        }
        if let Some(c) = &q.after {
            match (&c.value, q.sort.is_text()) {
                (SortValue::Text(_), true) | (SortValue::Int(_), false) => {}
                _ => return Err(Error::Invalid("cursor does not match the sort".into())),
            }
            let v = b.push(c.value.clone());
            let id = b.push(SortValue::Text(c.id.clone()));
            // Ties go by id ascending in both directions.
            let op = if q.descending { "<" } else { ">" };
            filters.push(format!("({key} {op} {v} OR ({key} = {v} AND u.id > {id}))"));
        }
        let dir = if q.descending { "DESC" } else { "ASC" };
        let filters = filters.join(" AND ");
        let spend_join = format!(
            "LEFT JOIN spend_monthly s ON s.org_id = u.org_id AND s.kind = 'user' \
             AND s.subject_id = u.id AND s.month = {month}"
        );
        // Sorted and filtered by the member's own columns only: the page is
        // picked from `users` first and joined with its spend after, not
        // every candidate. A search by name or email sorts its matches (the
        // key as an expression keeps the index out) instead of walking the
        // whole index in order, which read every row at random for a rare
        // match late in it (170–350 ms at 100 000 members, 50 ms sorted).
        let own_columns = !q.sort.is_live()
            && q.filter.min_utilization_bps.is_none()
            && q.filter.cut_off.is_none();
        let (from, order_key) = if own_columns {
            let inner_key = match (self.backend, q.filter.q.is_some() && q.sort.is_text()) {
                (Backend::Sqlite, true) => format!("+{key}"),
                // Byte order still, as the column's.
                (Backend::Postgres, true) => format!("({key} || '') COLLATE \"C\""),
                (_, false) => key.clone(),
            };
            let picked = format!(
                "(SELECT u.*, {inner_key} AS sort_key FROM {from} WHERE {filters} \
                 ORDER BY sort_key {dir}, u.id ASC LIMIT {limit}) u"
            );
            (format!("{picked} {spend_join}"), "u.sort_key".to_owned())
        } else {
            (format!("{from} {spend_join} WHERE {filters}"), key)
        };
        let columns = if ids_only {
            format!("u.id, {order_key} AS sort_key")
        } else {
            format!(
                "u.id, u.email, u.name, u.status, u.monthly_limit_micros, u.limit_source, \
                 u.created_at_ms, COALESCE(s.spend_micros, 0) AS spend_micros, \
                 COALESCE(s.requests, 0) AS requests, COALESCE(s.first_day, 0) AS first_day, \
                 {LAST_ACTIVE_SQL} AS last_at_ms, \
                 {order_key} AS sort_key"
            )
        };
        let sql =
            format!("SELECT {columns} FROM {from} ORDER BY sort_key {dir}, u.id ASC LIMIT {limit}");
        Ok((sql, b.values))
    }

    async fn fetch(&self, sql: String, values: Vec<SortValue>) -> Result<Vec<AnyRow>> {
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for v in values {
            query = match v {
                SortValue::Int(i) => query.bind(i),
                SortValue::Text(t) => query.bind(t),
            };
        }
        Ok(query.fetch_all(self.reader()).await?)
    }

    /// One page of users and the cursor of the next page, if any.
    pub async fn list_users(
        &self,
        org_id: &OrgId,
        q: &UserListQuery,
    ) -> Result<(Vec<UserRow>, Option<Cursor>)> {
        let limit = q.limit.clamp(1, PAGE_LEN_MAX);
        let (sql, values) = self.user_list_sql(org_id, q, false, limit + 1)?;
        let rows = self.fetch(sql, values).await?;
        let more = rows.len() > limit as usize;
        let mut out = Vec::with_capacity(limit as usize);
        let mut last_key = None;
        for r in rows.iter().take(limit as usize) {
            out.push(user_row(r)?);
            last_key = Some(self.sort_value(q.sort, r)?);
        }
        self.fill_user_groups(org_id, &mut out).await?;
        let next = match (more, last_key, out.last()) {
            (true, Some(value), Some(u)) => Some(Cursor {
                value,
                id: u.id.clone(),
            }),
            _ => None,
        };
        Ok((out, next))
    }

    fn sort_value(&self, sort: UserSort, r: &AnyRow) -> Result<SortValue> {
        Ok(if sort.is_text() {
            SortValue::Text(r.try_get("sort_key")?)
        } else {
            SortValue::Int(r.try_get("sort_key")?)
        })
    }

    /// Every user the query matches (its cursor and limit aside), in its
    /// order, as (id, sort key), at most `max`: a snapshot to page through
    /// while the sort key moves.
    pub async fn list_user_keys(
        &self,
        org_id: &OrgId,
        q: &UserListQuery,
        max: u32,
    ) -> Result<Vec<Cursor>> {
        let q = UserListQuery {
            after: None,
            ..q.clone()
        };
        let (sql, values) = self.user_list_sql(org_id, &q, true, max)?;
        self.fetch(sql, values)
            .await?
            .iter()
            .map(|r| {
                Ok(Cursor {
                    value: self.sort_value(q.sort, r)?,
                    id: r.try_get("id")?,
                })
            })
            .collect()
    }

    /// Users by id, in the order given (ids that no longer exist skipped).
    pub async fn users_by_ids(
        &self,
        org_id: &OrgId,
        ids: &[String],
        month: Month,
    ) -> Result<Vec<UserRow>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT u.id, u.email, u.name, u.status, u.monthly_limit_micros, u.limit_source, u.created_at_ms, \
             COALESCE(s.spend_micros, 0) AS spend_micros, COALESCE(s.requests, 0) AS requests, \
             COALESCE(s.first_day, 0) AS first_day, {LAST_ACTIVE_SQL} AS last_at_ms \
             FROM users u LEFT JOIN spend_monthly s ON s.org_id = u.org_id AND s.kind = 'user' \
             AND s.subject_id = u.id AND s.month = $2 WHERE u.org_id = $1 AND u.id IN ({})",
            crate::placeholders(3, ids.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(org_id.as_str())
            .bind(i64::from(month.yyyymm()));
        for id in ids {
            query = query.bind(id.clone());
        }
        let mut by_id: HashMap<String, UserRow> = HashMap::new();
        for r in query.fetch_all(self.reader()).await? {
            let u = user_row(&r)?;
            let _ = by_id.insert(u.id.clone(), u);
        }
        let mut out: Vec<UserRow> = ids.iter().filter_map(|id| by_id.remove(id)).collect();
        self.fill_user_groups(org_id, &mut out).await?;
        Ok(out)
    }

    async fn fill_user_groups(&self, org_id: &OrgId, users: &mut [UserRow]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let placeholders: Vec<String> = (2..users.len() + 2).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT user_id, group_id FROM group_members WHERE org_id = $1 AND user_id IN ({}) \
             ORDER BY group_id",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(org_id.as_str());
        for u in users.iter() {
            query = query.bind(u.id.clone());
        }
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for r in query.fetch_all(self.reader()).await? {
            groups
                .entry(r.try_get("user_id")?)
                .or_default()
                .push(r.try_get("group_id")?);
        }
        for u in users {
            u.groups = groups.remove(&u.id).unwrap_or_default();
        }
        Ok(())
    }

    pub async fn user(
        &self,
        org_id: &OrgId,
        user_id: &str,
        month: Month,
    ) -> Result<Option<UserRow>> {
        let sql = format!(
            "SELECT u.id, u.email, u.name, u.status, u.monthly_limit_micros, u.limit_source, u.created_at_ms, \
             COALESCE(s.spend_micros, 0) AS spend_micros, COALESCE(s.requests, 0) AS requests, \
             COALESCE(s.first_day, 0) AS first_day, {LAST_ACTIVE_SQL} AS last_at_ms \
             FROM users u LEFT JOIN spend_monthly s ON s.org_id = u.org_id AND s.kind = 'user' \
             AND s.subject_id = u.id AND s.month = $3 WHERE u.org_id = $1 AND u.id = $2"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(org_id.as_str())
            .bind(user_id)
            .bind(i64::from(month.yyyymm()))
            .fetch_optional(self.reader())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut users = [user_row(&row)?];
        self.fill_user_groups(org_id, &mut users).await?;
        let [user] = users;
        Ok(Some(user))
    }

    /// The `n` subjects of `kind` that spent most in `month`: (id, spend,
    /// requests), most first, ties by id. One read of the month's index.
    pub async fn top_spenders(
        &self,
        org_id: &OrgId,
        kind: &str,
        month: Month,
        n: u32,
    ) -> Result<Vec<(String, i64, i64)>> {
        let rows = sqlx::query(
            "SELECT subject_id, spend_micros, requests FROM spend_monthly \
             WHERE org_id = $1 AND kind = $2 AND month = $3 AND spend_micros > 0 \
             ORDER BY spend_micros DESC, subject_id LIMIT $4",
        )
        .bind(org_id.as_str())
        .bind(kind)
        .bind(i64::from(month.yyyymm()))
        .bind(i64::from(n))
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("subject_id")?,
                    r.try_get("spend_micros")?,
                    r.try_get("requests")?,
                ))
            })
            .collect()
    }

    /// Monthly totals of a subject up to `month`, newest first, at most 13;
    /// and its daily series in `days_of`.
    pub async fn history(
        &self,
        org_id: &OrgId,
        kind: &str,
        subject_id: &str,
        month: Month,
        days_of: Month,
    ) -> Result<(Vec<PeriodSpend>, Vec<PeriodSpend>)> {
        let period = |r: &AnyRow, col: &str| -> Result<PeriodSpend> {
            Ok(PeriodSpend {
                period: r.try_get(col)?,
                spend_micros: r.try_get("spend_micros")?,
                requests: r.try_get("requests")?,
            })
        };
        let months = sqlx::query(
            "SELECT month, spend_micros, requests FROM spend_monthly \
             WHERE org_id = $1 AND kind = $2 AND subject_id = $3 AND month <= $4 \
             ORDER BY month DESC LIMIT $5",
        )
        .bind(org_id.as_str())
        .bind(kind)
        .bind(subject_id)
        .bind(i64::from(month.yyyymm()))
        .bind(HISTORY_MONTHS)
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(|r| period(r, "month"))
        .collect::<Result<Vec<_>>>()?;
        let (from, to) = day_range(days_of);
        let days = sqlx::query(
            "SELECT day, spend_micros, requests FROM spend_daily \
             WHERE org_id = $1 AND kind = $2 AND subject_id = $3 AND day >= $4 AND day < $5 \
             ORDER BY day",
        )
        .bind(org_id.as_str())
        .bind(kind)
        .bind(subject_id)
        .bind(from)
        .bind(to)
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(|r| period(r, "day"))
        .collect::<Result<Vec<_>>>()?;
        Ok((months, days))
    }

    /// Groups (not deleted) ordered by id, after `after`, at most `limit`.
    pub async fn list_groups(
        &self,
        org_id: &OrgId,
        month: Month,
        after: Option<&str>,
        only: Option<&str>,
        limit: u32,
    ) -> Result<Vec<GroupRow>> {
        let rows = sqlx::query(
            "SELECT g.id, g.name, g.monthly_limit_micros, g.created_at_ms, \
             (SELECT COUNT(*) FROM group_members m WHERE m.org_id = g.org_id \
              AND m.group_id = g.id) AS member_count, \
             COALESCE(s.spend_micros, 0) AS spend_micros, COALESCE(s.requests, 0) AS requests, \
             COALESCE(s.first_day, 0) AS first_day FROM org_groups g LEFT JOIN spend_monthly s ON s.org_id = g.org_id \
             AND s.kind = 'group' AND s.subject_id = g.id AND s.month = $2 \
             WHERE g.org_id = $1 AND g.deleted = 0 AND g.id > $3 AND ($4 = '' OR g.id = $4) \
             ORDER BY g.id LIMIT $5",
        )
        .bind(org_id.as_str())
        .bind(i64::from(month.yyyymm()))
        .bind(after.unwrap_or(""))
        .bind(only.unwrap_or(""))
        .bind(i64::from(limit.clamp(1, PAGE_LEN_MAX)))
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(GroupRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    member_count: r.try_get("member_count")?,
                    monthly_limit_micros: r.try_get("monthly_limit_micros")?,
                    spend_micros: r.try_get("spend_micros")?,
                    requests: r.try_get("requests")?,
                    first_day: first_day(r)?,
                    created_at_ms: r.try_get("created_at_ms")?,
                })
            })
            .collect()
    }

    /// Keys ordered by id, after `after`, at most `limit`.
    pub async fn list_keys(
        &self,
        org_id: &OrgId,
        month: Month,
        after: Option<&str>,
        only: Option<&str>,
        limit: u32,
    ) -> Result<Vec<KeyRow>> {
        self.keys_where(org_id, month, after, only, None, limit)
            .await
    }

    /// [`Db::list_keys`] of one member's keys (`owner`), or every key.
    pub async fn keys_where(
        &self,
        org_id: &OrgId,
        month: Month,
        after: Option<&str>,
        only: Option<&str>,
        owner: Option<&str>,
        limit: u32,
    ) -> Result<Vec<KeyRow>> {
        let rows = sqlx::query(
            "SELECT k.id, k.name, k.user_id, k.features, k.monthly_limit_micros, k.revoked, \
             k.created_at_ms, k.expires_at_ms, k.previous_secret_until_ms, COALESCE(s.spend_micros, 0) AS spend_micros, \
             COALESCE(s.requests, 0) AS requests, COALESCE(s.first_day, 0) AS first_day, \
             (SELECT MAX(a.last_at_ms) FROM spend_monthly a WHERE a.org_id = k.org_id \
              AND a.kind = 'key' AND a.subject_id = k.id) AS last_at_ms \
             FROM api_keys k LEFT JOIN spend_monthly s ON s.org_id = k.org_id \
             AND s.kind = 'key' AND s.subject_id = k.id AND s.month = $2 \
             WHERE k.org_id = $1 AND k.id > $3 AND ($4 = '' OR k.id = $4) \
             AND ($6 = '' OR k.user_id = $6) ORDER BY k.id LIMIT $5",
        )
        .bind(org_id.as_str())
        .bind(i64::from(month.yyyymm()))
        .bind(after.unwrap_or(""))
        .bind(only.unwrap_or(""))
        .bind(i64::from(limit.clamp(1, PAGE_LEN_MAX)))
        .bind(owner.unwrap_or(""))
        .fetch_all(self.reader())
        .await?;
        let mut keys = rows
            .iter()
            .map(|r| {
                Ok(KeyRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    user_id: r.try_get("user_id")?,
                    group_ids: Vec::new(),
                    features: features_from_text(&r.try_get::<String, _>("features")?)?,
                    monthly_limit_micros: r.try_get("monthly_limit_micros")?,
                    spend_micros: r.try_get("spend_micros")?,
                    requests: r.try_get("requests")?,
                    first_day: first_day(r)?,
                    revoked: crate::flag(r.try_get("revoked")?),
                    last_used_at_ms: r.try_get("last_at_ms")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    expires_at_ms: r.try_get("expires_at_ms")?,
                    previous_secret_until_ms: r.try_get("previous_secret_until_ms")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let (Some(first), Some(last)) = (keys.first(), keys.last()) {
            let rows = sqlx::query(
                "SELECT key_id, group_id FROM api_key_groups WHERE org_id = $1 \
                 AND key_id >= $2 AND key_id <= $3 ORDER BY group_id",
            )
            .bind(org_id.as_str())
            .bind(first.id.clone())
            .bind(last.id.clone())
            .fetch_all(self.reader())
            .await?;
            let mut groups: HashMap<String, Vec<String>> = HashMap::new();
            for r in rows {
                groups
                    .entry(r.try_get("key_id")?)
                    .or_default()
                    .push(r.try_get("group_id")?);
            }
            for k in &mut keys {
                k.group_ids = groups.remove(&k.id).unwrap_or_default();
            }
        }
        Ok(keys)
    }
}

/// Which enforcement events a listing keeps; `None`: any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnforcementFilter {
    /// `threshold_crossed`, `forecast_over_limit`, `cut_off` or
    /// `cutoff_lifted`.
    pub event: Option<String>,
    /// `user`, `group`, `key` or `org`.
    pub subject_kind: Option<String>,
    pub subject_id: Option<String>,
}

/// A threshold crossed, a forecast over the limit, a cutoff or a lift, as
/// recorded by a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforcementRow {
    pub subject_kind: String,
    pub subject_id: String,
    pub month: i64,
    pub event: String,
    pub threshold_bps: i64,
    /// Tells apart events of the same kind for the same subject and month.
    pub ordinal: i64,
    pub reason: Option<String>,
    pub spend_micros: i64,
    pub limit_micros: Option<i64>,
    pub at_ms: i64,
    /// For `forecast_over_limit`: the month-end projection then, and the
    /// day (yyyymmdd) spend would reach the limit at its run-rate.
    pub projected_micros: Option<i64>,
    pub limit_day: Option<i64>,
}

impl EnforcementRow {
    /// The day a forecast named, if this is one.
    pub fn limit_date(&self) -> Option<tally_core::time::Day> {
        tally_core::time::Day::from_yyyymmdd(u32::try_from(self.limit_day?).ok()?)
    }

    /// A row of `enforcement_events` (deliveries read it joined).
    pub(crate) fn from_row(r: &sqlx::any::AnyRow) -> Result<EnforcementRow> {
        Ok(EnforcementRow {
            subject_kind: r.try_get("subject_kind")?,
            subject_id: r.try_get("subject_id")?,
            month: r.try_get("month")?,
            event: r.try_get("event")?,
            threshold_bps: r.try_get("threshold_bps")?,
            ordinal: r.try_get("ordinal")?,
            reason: r.try_get("reason")?,
            spend_micros: r.try_get("spend_micros")?,
            limit_micros: r.try_get("limit_micros")?,
            at_ms: r.try_get("at_ms")?,
            projected_micros: r.try_get("projected_micros")?,
            limit_day: r.try_get("limit_day")?,
        })
    }

    /// Where the page after this row starts.
    pub fn key(&self) -> EnforcementKey {
        EnforcementKey {
            at_ms: self.at_ms,
            subject_kind: self.subject_kind.clone(),
            subject_id: self.subject_id.clone(),
            month: self.month,
            event: self.event.clone(),
            threshold_bps: self.threshold_bps,
            ordinal: self.ordinal,
        }
    }
}

/// Where a page of enforcement events starts: after this row, newest
/// first (the listing's order is every column of the key, descending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforcementKey {
    pub at_ms: i64,
    pub subject_kind: String,
    pub subject_id: String,
    pub month: i64,
    pub event: String,
    pub threshold_bps: i64,
    pub ordinal: i64,
}

impl Db {
    /// An org's enforcement events, newest first, after `after` (none: from
    /// the newest), at most `limit`.
    pub async fn list_enforcement(
        &self,
        org_id: &OrgId,
        after: Option<&EnforcementKey>,
        limit: u32,
    ) -> Result<Vec<EnforcementRow>> {
        self.list_enforcement_where(org_id, &EnforcementFilter::default(), after, limit)
            .await
    }

    /// [`Db::list_enforcement`] of one kind of event, or one subject, or
    /// both: the same order and keys.
    pub async fn list_enforcement_where(
        &self,
        org_id: &OrgId,
        filter: &EnforcementFilter,
        after: Option<&EnforcementKey>,
        limit: u32,
    ) -> Result<Vec<EnforcementRow>> {
        let first = EnforcementKey {
            at_ms: i64::MAX,
            subject_kind: String::new(),
            subject_id: String::new(),
            month: 0,
            event: String::new(),
            threshold_bps: 0,
            ordinal: 0,
        };
        let from = after.unwrap_or(&first);
        // Row values: a strict order over the whole key, so no row is
        // skipped or repeated between pages.
        let rows = sqlx::query(
            "SELECT subject_kind, subject_id, month, event, threshold_bps, ordinal, reason, \
             spend_micros, limit_micros, at_ms, projected_micros, limit_day \
             FROM enforcement_events WHERE org_id = $1 \
             AND ($2 = 0 OR (at_ms, subject_kind, subject_id, month, event, threshold_bps, \
             ordinal) < ($3, $4, $5, $6, $7, $8, $9)) \
             AND ($11 = '' OR event = $11) AND ($12 = '' OR subject_kind = $12) \
             AND ($13 = '' OR subject_id = $13) \
             ORDER BY at_ms DESC, subject_kind DESC, subject_id DESC, month DESC, event DESC, \
             threshold_bps DESC, ordinal DESC LIMIT $10",
        )
        .bind(org_id.as_str())
        .bind(i64::from(after.is_some()))
        .bind(from.at_ms)
        .bind(from.subject_kind.clone())
        .bind(from.subject_id.clone())
        .bind(from.month)
        .bind(from.event.clone())
        .bind(from.threshold_bps)
        .bind(from.ordinal)
        .bind(i64::from(limit.clamp(1, PAGE_LEN_MAX + 1)))
        .bind(filter.event.clone().unwrap_or_default())
        .bind(filter.subject_kind.clone().unwrap_or_default())
        .bind(filter.subject_id.clone().unwrap_or_default())
        .fetch_all(self.reader())
        .await?;
        rows.iter().map(EnforcementRow::from_row).collect()
    }
}

/// A dead letter as admins see it (without its payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    pub partition_id: i64,
    pub position: i64,
    pub logged_at_ms: i64,
    pub org_id: Option<String>,
    pub reason: String,
    pub message: String,
}

impl Db {
    /// Dead letters, newest first: of one org, or of every org (`None`),
    /// after the one at `after` (logged at, partition, position; none: from
    /// the newest), at most `limit`.
    pub async fn list_dead_letters(
        &self,
        org_id: Option<&str>,
        after: Option<(i64, i64, i64)>,
        limit: u32,
    ) -> Result<Vec<DeadLetterRow>> {
        let (at, partition, position) = after.unwrap_or((i64::MAX, 0, 0));
        let rows = sqlx::query(
            "SELECT partition_id, position, logged_at_ms, org_id, reason, message \
             FROM dead_letters WHERE ($1 = '' OR org_id = $1) \
             AND ($2 = 0 OR (logged_at_ms, partition_id, position) < ($3, $4, $5)) \
             ORDER BY logged_at_ms DESC, partition_id DESC, position DESC LIMIT $6",
        )
        .bind(org_id.unwrap_or(""))
        .bind(i64::from(after.is_some()))
        .bind(at)
        .bind(partition)
        .bind(position)
        .bind(i64::from(limit.clamp(1, PAGE_LEN_MAX + 1)))
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetterRow {
                    partition_id: r.try_get("partition_id")?,
                    position: r.try_get("position")?,
                    logged_at_ms: r.try_get("logged_at_ms")?,
                    org_id: r.try_get("org_id")?,
                    reason: r.try_get("reason")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }
}

/// The latest usage of user `u` in any month.
const LAST_ACTIVE_SQL: &str = "(SELECT MAX(a.last_at_ms) FROM spend_monthly a \
     WHERE a.org_id = u.org_id AND a.kind = 'user' AND a.subject_id = u.id)";
