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

use crate::{Db, Result};

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
    /// have no entry.
    pub series: Vec<(i64, UsageSums)>,
    /// How many groups there are in all.
    pub groups: i64,
    /// The top groups with their sums, largest spend first.
    pub top: Vec<(String, UsageSums)>,
    /// The top groups by day, in order of key and day.
    pub top_days: Vec<UsageDay>,
}

const SUMS: &str = "CAST(SUM(spend_micros) AS BIGINT) AS spend_micros, \
     CAST(SUM(requests) AS BIGINT) AS requests, \
     CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
     CAST(SUM(output_tokens) AS BIGINT) AS output_tokens";

impl Db {
    /// Usage of `org_id` as `q` asks: the totals and their days, and when
    /// grouped, the count of groups, the top ones and their days; each read
    /// bounded by the org, the kind and the range.
    pub async fn usage(&self, org_id: &OrgId, q: &UsageQuery) -> Result<UsageAnswer> {
        // $1 org, $2 kind, $3 subject, $4 model, $5 from, $6 to.
        let filter = "org_id = $1 AND kind = $2 AND ($3 IS NULL OR subject_id = $3) \
                      AND ($4 IS NULL OR model = $4) AND day >= $5 AND day <= $6";
        let kind = q.kind.as_str();
        let (from, to) = (i64::from(q.from.yyyymmdd()), i64::from(q.to.yyyymmdd()));
        let bind = |sql: String| {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(org_id.as_str())
                .bind(kind)
                .bind(q.subject.clone())
                .bind(q.model.clone())
                .bind(from)
                .bind(to)
        };
        let totals = bind(format!("SELECT {SUMS} FROM usage_daily WHERE {filter}"))
            .fetch_one(self.reader())
            .await?;
        let mut out = UsageAnswer {
            totals: UsageSums::read(&totals)?,
            ..UsageAnswer::default()
        };
        out.series = bind(format!(
            "SELECT day, {SUMS} FROM usage_daily WHERE {filter} GROUP BY day ORDER BY day"
        ))
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(|r| Ok((r.try_get("day")?, UsageSums::read(r)?)))
        .collect::<Result<_>>()?;
        let Some(dim) = q.group_by else {
            return Ok(out);
        };
        let col = dim.column();
        out.groups = bind(format!(
            "SELECT COUNT(DISTINCT {col}) AS n FROM usage_daily WHERE {filter}"
        ))
        .fetch_one(self.reader())
        .await?
        .try_get("n")?;
        let top = bind(format!(
            "SELECT {col} AS k, {SUMS} FROM usage_daily WHERE {filter} GROUP BY {col} \
             ORDER BY 2 DESC, 1 LIMIT {}",
            q.top.clamp(1, 1_000)
        ))
        .fetch_all(self.reader())
        .await?;
        out.top = top
            .iter()
            .map(|r| Ok((r.try_get("k")?, UsageSums::read(r)?)))
            .collect::<Result<_>>()?;
        if out.top.is_empty() {
            return Ok(out);
        }
        // The days of the top groups only: $7.. are their keys.
        let keys: Vec<String> = (0..out.top.len()).map(|i| format!("${}", i + 7)).collect();
        let mut days = bind(format!(
            "SELECT {col} AS k, day, {SUMS} FROM usage_daily WHERE {filter} \
             AND {col} IN ({}) GROUP BY {col}, day ORDER BY 1, 2",
            keys.join(", ")
        ));
        for (k, _) in &out.top {
            days = days.bind(k.clone());
        }
        out.top_days = days
            .fetch_all(self.reader())
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
        Ok(out)
    }
}
