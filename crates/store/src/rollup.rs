//! Usage by model and provider (`usage_daily`): one row per subject, UTC
//! day, model and provider, written by checkpoints as `spend_daily` is.
//! Read here for `GET /v1/orgs/{org}/usage`: sums over a range of days,
//! optionally grouped by model, provider or subject (the top ones by
//! spend), with a series per day.

use sqlx::Row;
use sqlx::any::AnyRow;
use tally_core::ids::OrgId;
use tally_core::ledger::SubjectKind;
use tally_core::time::Day;

use crate::{Backend, Db, Result};

/// Spend, calls and tokens summed over some rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageSums {
    pub spend_micros: i64,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl UsageSums {
    pub fn add(&mut self, o: &UsageSums) {
        self.spend_micros = self.spend_micros.saturating_add(o.spend_micros);
        self.requests = self.requests.saturating_add(o.requests);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
    }

    pub fn minus(&self, o: &UsageSums) -> UsageSums {
        UsageSums {
            spend_micros: self.spend_micros.saturating_sub(o.spend_micros),
            requests: self.requests.saturating_sub(o.requests),
            input_tokens: self.input_tokens.saturating_sub(o.input_tokens),
            output_tokens: self.output_tokens.saturating_sub(o.output_tokens),
        }
    }

    fn read(r: &AnyRow) -> Result<UsageSums> {
        Ok(UsageSums {
            spend_micros: r.try_get::<Option<i64>, _>("spend_micros")?.unwrap_or(0),
            requests: r.try_get::<Option<i64>, _>("requests")?.unwrap_or(0),
            input_tokens: r.try_get::<Option<i64>, _>("input_tokens")?.unwrap_or(0),
            output_tokens: r.try_get::<Option<i64>, _>("output_tokens")?.unwrap_or(0),
        })
    }
}

/// What the usage is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageDim {
    Model,
    Provider,
    /// The subject of the query's kind (a user, group or key id).
    Subject,
}

impl UsageDim {
    fn column(self) -> &'static str {
        match self {
            UsageDim::Model => "model",
            UsageDim::Provider => "provider",
            UsageDim::Subject => "subject_id",
        }
    }
}

/// Which rows, summed how.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// The rows of which subjects: the org's own (`Org`), or users',
    /// groups' or keys'.
    pub kind: SubjectKind,
    /// One subject of `kind` only.
    pub subject: Option<String>,
    /// One model only.
    pub model: Option<String>,
    /// First and last day, both included.
    pub from: Day,
    pub to: Day,
    pub group_by: Option<UsageDim>,
    /// How many groups, the largest spend first (ties by key).
    pub top: u32,
    /// Whether the days are wanted too (the series and the top groups').
    pub days: bool,
}

/// One day of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDay {
    pub key: String,
    /// yyyymmdd.
    pub day: i64,
    pub sums: UsageSums,
}

/// What a query found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageAnswer {
    /// Every row in range.
    pub totals: UsageSums,
    /// Every row in range by day (yyyymmdd), in order; days without usage
    /// have no entry (when asked for).
    pub series: Vec<(i64, UsageSums)>,
    /// How many groups there are in all.
    pub groups: i64,
    /// The top groups with their sums, largest spend first.
    pub top: Vec<(String, UsageSums)>,
    /// The top groups by day, in order of key and day (when asked for).
    pub top_days: Vec<UsageDay>,
}

const SUMS: &str = "CAST(SUM(spend_micros) AS BIGINT) AS spend_micros, \
     CAST(SUM(requests) AS BIGINT) AS requests, \
     CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
     CAST(SUM(output_tokens) AS BIGINT) AS output_tokens";

impl Db {
    /// Usage of `org_id` as `q` asks: the totals and their days, and when
    /// grouped, the count of groups, the top ones and their days. One read
    /// transaction (a snapshot on both backends), so the parts agree; each
    /// statement bounded by the org, the kind, the subject when given, and
    /// the range.
    pub async fn usage(&self, org_id: &OrgId, q: &UsageQuery) -> Result<UsageAnswer> {
        let mut tx = self.reader().begin().await?;
        if self.backend() == Backend::Postgres {
            let _ = sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        // $1 org, $2 kind, $3 from, $4 to, then the subject and the model
        // when given: a bound that is always there lets the planner use
        // the primary key (org, kind, subject, day) or the day index.
        let mut filter = "org_id = $1 AND kind = $2 AND day >= $3 AND day <= $4".to_owned();
        let mut binds: Vec<String> = Vec::new();
        for (col, v) in [("subject_id", &q.subject), ("model", &q.model)] {
            if let Some(v) = v {
                binds.push(v.clone());
                filter.push_str(&format!(" AND {col} = ${}", 4 + binds.len()));
            }
        }
        let (from, to) = (i64::from(q.from.yyyymmdd()), i64::from(q.to.yyyymmdd()));
        let kind = q.kind.as_str();
        let query = |sql: String, extra: &[String]| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(org_id.as_str())
                .bind(kind)
                .bind(from)
                .bind(to);
            for b in binds.iter().chain(extra) {
                query = query.bind(b.clone());
            }
            query
        };
        let mut out = UsageAnswer::default();
        if q.days {
            out.series = query(
                format!(
                    "SELECT day, {SUMS} FROM usage_daily WHERE {filter} GROUP BY day ORDER BY day"
                ),
                &[],
            )
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("day")?, UsageSums::read(r)?)))
            .collect::<Result<_>>()?;
            for (_, s) in &out.series {
                out.totals.add(s);
            }
        } else {
            let totals = query(
                format!("SELECT {SUMS} FROM usage_daily WHERE {filter}"),
                &[],
            )
            .fetch_one(&mut *tx)
            .await?;
            out.totals = UsageSums::read(&totals)?;
        }
        let Some(dim) = q.group_by else {
            tx.commit().await?;
            return Ok(out);
        };
        let col = dim.column();
        out.groups = query(
            format!("SELECT COUNT(DISTINCT {col}) AS n FROM usage_daily WHERE {filter}"),
            &[],
        )
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        out.top = query(
            format!(
                "SELECT {col} AS k, {SUMS} FROM usage_daily WHERE {filter} GROUP BY {col} \
                 ORDER BY 2 DESC, 1 LIMIT {}",
                q.top.clamp(1, 1_000)
            ),
            &[],
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("k")?, UsageSums::read(r)?)))
        .collect::<Result<_>>()?;
        if q.days && !out.top.is_empty() {
            // The days of the top groups only.
            let first = 5 + binds.len();
            let keys: Vec<String> = (0..out.top.len())
                .map(|i| format!("${}", first + i))
                .collect();
            let top: Vec<String> = out.top.iter().map(|(k, _)| k.clone()).collect();
            out.top_days = query(
                format!(
                    "SELECT {col} AS k, day, {SUMS} FROM usage_daily WHERE {filter} \
                     AND {col} IN ({}) GROUP BY {col}, day ORDER BY 1, 2",
                    keys.join(", ")
                ),
                &top,
            )
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                Ok(UsageDay {
                    key: r.try_get("k")?,
                    day: r.try_get("day")?,
                    sums: UsageSums::read(r)?,
                })
            })
            .collect::<Result<_>>()?;
        }
        tx.commit().await?;
        Ok(out)
    }
}
