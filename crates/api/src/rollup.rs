//! `GET /v1/orgs/{org}/usage`: an org's spend, calls and tokens over a
//! range of days or months, by model, provider, user, group or key, from
//! the rollups the checkpoints write (`tally_store::rollup`). JSON, or CSV
//! for `Accept: text/csv`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tally_core::ids::{GroupId, KeyId, OrgId, UserId};
use tally_core::ledger::SubjectKind;
use tally_core::time::{Day, Month};
use tally_store::rollup::{UsageDim, UsageQuery, UsageSums};

use crate::console::export::{dollars, field};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, Params};
use crate::{AppState, org_access};

/// The longest range one answer covers, in days.
pub(crate) const RANGE_DAYS_MAX: i64 = 400;
/// The most groups one answer lists.
pub(crate) const TOP_MAX: u32 = 100;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageParams {
    /// The first day (`2026-11-05`), or month (`2026-11`: from its first
    /// day) [default: the first day of this month].
    pub(crate) from: Option<String>,
    /// The last day, or month (to its last day), included; at most 400
    /// days after `from` [default: today].
    pub(crate) to: Option<String>,
    /// `day` or `month`: the periods of the series [default: day].
    pub(crate) granularity: Option<String>,
    /// `model`, `provider`, `user`, `group` or `key` [default: no grouping].
    pub(crate) group_by: Option<String>,
    /// One member's usage only.
    pub(crate) user: Option<String>,
    /// One group's usage only (its members' while they were members).
    pub(crate) group: Option<String>,
    /// One key's usage only.
    pub(crate) key: Option<String>,
    /// One model's usage only.
    pub(crate) model: Option<String>,
    /// How many groups the answer lists, the largest spend first, 1 to 100
    /// [default: 10].
    pub(crate) top: Option<u32>,
}

/// Spend, calls and tokens.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub(crate) struct SumsJson {
    /// Spend in micro-USD.
    pub(crate) spend_micros: i64,
    /// Calls counted.
    pub(crate) requests: i64,
    /// Input (prompt) tokens, as the gateways reported them.
    pub(crate) input_tokens: i64,
    /// Output (completion) tokens, as the gateways reported them.
    pub(crate) output_tokens: i64,
}

impl From<UsageSums> for SumsJson {
    fn from(s: UsageSums) -> Self {
        SumsJson {
            spend_micros: s.spend_micros,
            requests: s.requests,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
        }
    }
}

/// One period of a series.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct PointJson {
    /// The day (`2026-11-05`) or month (`2026-11`).
    pub(crate) period: String,
    #[serde(flatten)]
    pub(crate) sums: SumsJson,
}

/// One group: a model, provider, user, group or key.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct GroupUsageJson {
    /// The model, provider, or the user's, group's or key's id; `other`
    /// holds the usage past the org's monthly cap of models.
    pub(crate) key: String,
    /// The user's, group's or key's name (`null` for models and providers,
    /// and for an id no longer known).
    pub(crate) name: Option<String>,
    /// The group's sums over the range.
    pub(crate) totals: SumsJson,
    /// Every period of the range, zeros included.
    pub(crate) series: Vec<PointJson>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UsageJson {
    /// The first day covered.
    pub(crate) from: String,
    /// The last day covered.
    pub(crate) to: String,
    /// `day` or `month`.
    pub(crate) granularity: String,
    /// What `groups` are: `model`, `provider`, `user`, `group`, `key`, or
    /// `null`.
    pub(crate) group_by: Option<String>,
    /// Everything in range (with the filters).
    pub(crate) totals: SumsJson,
    /// Everything in range by period, zeros included.
    pub(crate) series: Vec<PointJson>,
    /// How many groups had usage in range.
    pub(crate) group_count: i64,
    /// The top groups by spend (ties by key), at most `top`.
    pub(crate) groups: Vec<GroupUsageJson>,
    /// The groups past the top ones, summed.
    pub(crate) rest: SumsJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Day,
    Month,
}

/// `from`/`to`: a day, or a month's first (`from`) or last (`to`) day.
fn bound(name: &str, s: &str, first: bool) -> ApiResult<Day> {
    if let Some(d) = Day::parse(s) {
        return Ok(d);
    }
    match Month::parse(s) {
        Some(m) if first => Ok(m.first_day()),
        Some(m) => Ok(m.last_day()),
        None => Err(ApiError::invalid(format!(
            "{name}: a day (yyyy-mm-dd) or a month (yyyy-mm), got {s:?}"
        ))),
    }
}

/// The label of the period `day` falls in.
fn period(g: Granularity, day: Day) -> String {
    match g {
        Granularity::Day => day.to_string(),
        Granularity::Month => day.month().to_string(),
    }
}

/// Every period from `from` to `to`, with the sums of `days` (yyyymmdd)
/// added into each.
fn series(g: Granularity, from: Day, to: Day, days: &[(i64, UsageSums)]) -> Vec<PointJson> {
    // A day's period, as an index from the first.
    let at = |day: Day| -> i64 {
        match g {
            Granularity::Day => day.since(from),
            Granularity::Month => day.month().since(from.month()),
        }
    };
    let mut out: Vec<(String, UsageSums)> = Vec::new();
    let mut d = from;
    while d <= to {
        if at(d) == out.len() as i64 {
            out.push((period(g, d), UsageSums::default()));
        }
        d = d.next();
    }
    for (day, sums) in days {
        let Some(day) = u32::try_from(*day).ok().and_then(Day::from_yyyymmdd) else {
            continue;
        };
        if let Some((_, s)) = usize::try_from(at(day)).ok().and_then(|i| out.get_mut(i)) {
            s.add(sums);
        }
    }
    out.into_iter()
        .map(|(period, s)| PointJson {
            period,
            sums: s.into(),
        })
        .collect()
}

/// An org's usage over a range, by period, optionally grouped. JSON, or CSV
/// (`Accept: text/csv`: a row per period and group, names beside ids,
/// money in dollars).
#[utoipa::path(get, path = "/v1/orgs/{org}/usage", operation_id = "usage_report", tag = "orgs", params(("org" = String, Path, description = "org id"), UsageParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok (JSON, or CSV for Accept: text/csv)", body = UsageJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org, user, group or key", body = crate::error::ErrorBody)))]
pub(crate) async fn report(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    headers: HeaderMap,
    Params(p): Params<UsageParams>,
) -> ApiResult<Response> {
    let org_id = org_access(&state, &caller, &org)?;
    let usage = usage(&state, &org_id, &p).await?;
    let csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/csv"));
    if !csv {
        return Ok(Json(usage).into_response());
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        to_csv(&usage),
    )
        .into_response())
}

/// The JSON answer of `p` for `org_id`.
pub(crate) async fn usage(
    state: &AppState,
    org_id: &OrgId,
    p: &UsageParams,
) -> ApiResult<UsageJson> {
    let today = Day::from_unix_ms(state.engine.now_ms());
    let from = match &p.from {
        Some(s) => bound("from", s, true)?,
        None => today.month().first_day(),
    };
    let to = match &p.to {
        Some(s) => bound("to", s, false)?,
        None => today,
    };
    if to < from {
        return Err(ApiError::invalid(format!(
            "to ({to}) is before from ({from})"
        )));
    }
    if to.since(from) >= RANGE_DAYS_MAX {
        return Err(ApiError::invalid(format!(
            "from {from} to {to} is more than {RANGE_DAYS_MAX} days: narrow it"
        )));
    }
    let granularity = match p.granularity.as_deref() {
        None | Some("day") => Granularity::Day,
        Some("month") => Granularity::Month,
        Some(g) => {
            return Err(ApiError::invalid(format!(
                "granularity: day or month, got {g:?}"
            )));
        }
    };
    let top = match p.top {
        None => 10,
        Some(n @ 1..=TOP_MAX) => n,
        Some(n) => {
            return Err(ApiError::invalid(format!("top: 1 to {TOP_MAX}, got {n}")));
        }
    };
    // Which rows: one subject's (a filter), or every subject of the kind
    // grouped by, or the org's own.
    let filters: Vec<(SubjectKind, &String)> = [
        (SubjectKind::User, &p.user),
        (SubjectKind::Group, &p.group),
        (SubjectKind::Key, &p.key),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    if filters.len() > 1 {
        return Err(ApiError::invalid(
            "filter by one of user, group and key at a time",
        ));
    }
    let filter = filters.first().copied();
    let (group_by, by_kind) = match p.group_by.as_deref() {
        None => (None, None),
        Some("model") => (Some(UsageDim::Model), None),
        Some("provider") => (Some(UsageDim::Provider), None),
        Some("user") => (Some(UsageDim::Subject), Some(SubjectKind::User)),
        Some("group") => (Some(UsageDim::Subject), Some(SubjectKind::Group)),
        Some("key") => (Some(UsageDim::Subject), Some(SubjectKind::Key)),
        Some(g) => {
            return Err(ApiError::invalid(format!(
                "group_by: model, provider, user, group or key, got {g:?}"
            )));
        }
    };
    if let (Some(by), Some((k, _))) = (by_kind, filter)
        && by != k
    {
        return Err(ApiError::invalid(format!(
            "group_by {} with a {} filter: usage is kept per user, group and key, not across them",
            by.as_str(),
            k.as_str()
        )));
    }
    if let Some((kind, id)) = filter {
        known(state, org_id, kind, id)?;
    }
    if let Some(m) = &p.model
        && (m.is_empty() || m.len() > tally_core::usage::LABEL_LEN_MAX)
    {
        return Err(ApiError::invalid(format!(
            "model: 1 to {} bytes",
            tally_core::usage::LABEL_LEN_MAX
        )));
    }
    let kind = by_kind
        .or(filter.map(|(k, _)| k))
        .unwrap_or(SubjectKind::Org);
    let subject = match (filter, kind) {
        (Some((_, id)), _) => Some(id.clone()),
        (None, SubjectKind::Org) => Some(org_id.to_string()),
        (None, _) => None,
    };
    state.engine.meter.flush_for_read().await?;
    let q = UsageQuery {
        kind,
        subject,
        model: p.model.clone(),
        from,
        to,
        group_by,
        top,
        days: true,
    };
    let a = state.engine.db.usage(org_id, &q).await?;
    let mut top_sum = UsageSums::default();
    let mut days_of: std::collections::HashMap<&str, Vec<(i64, UsageSums)>> =
        std::collections::HashMap::new();
    for d in &a.top_days {
        days_of
            .entry(d.key.as_str())
            .or_default()
            .push((d.day, d.sums));
    }
    let names = names(
        state,
        org_id,
        by_kind,
        a.top.iter().map(|(k, _)| k.as_str()),
    );
    let groups = a
        .top
        .iter()
        .zip(names)
        .map(|((key, sums), name)| {
            top_sum.add(sums);
            let days = days_of.get(key.as_str()).map_or(&[][..], Vec::as_slice);
            GroupUsageJson {
                key: key.clone(),
                name,
                totals: (*sums).into(),
                series: series(granularity, from, to, days),
            }
        })
        .collect();
    Ok(UsageJson {
        from: from.to_string(),
        to: to.to_string(),
        granularity: match granularity {
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
        .to_owned(),
        group_by: p.group_by.clone(),
        totals: a.totals.into(),
        series: series(granularity, from, to, &a.series),
        group_count: a.groups,
        groups,
        rest: a.totals.minus(&top_sum).into(),
    })
}

/// 404 for a user, group or key the org does not have; 400 for a bad id.
fn known(state: &AppState, org_id: &OrgId, kind: SubjectKind, id: &str) -> ApiResult<()> {
    let bad = |e: tally_core::ids::IdError| ApiError::invalid(e.to_string());
    let cell = state
        .engine
        .registry
        .org(org_id)
        .ok_or_else(|| ApiError::not_found("no such org"))?;
    let o = cell.read();
    let found = match kind {
        SubjectKind::User => o.dir.users.contains_key(&UserId::new(id).map_err(bad)?),
        SubjectKind::Group => o.dir.groups.contains_key(&GroupId::new(id).map_err(bad)?),
        SubjectKind::Key => o.dir.keys.contains_key(&KeyId::new(id).map_err(bad)?),
        SubjectKind::Org => true,
    };
    if found {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no such {}", kind.as_str())))
    }
}

/// The names of the users, groups or keys `ids` (`None` for models and
/// providers, and ids the directory does not know).
fn names<'a>(
    state: &AppState,
    org_id: &OrgId,
    kind: Option<SubjectKind>,
    ids: impl Iterator<Item = &'a str>,
) -> Vec<Option<String>> {
    let cell = state.engine.registry.org(org_id);
    let o = cell.as_ref().map(|c| c.read());
    ids.map(|id| {
        let dir = &o.as_ref()?.dir;
        match kind? {
            SubjectKind::User => dir.users.get(id).map(|u| u.name.clone()),
            SubjectKind::Group => dir.groups.get(id).map(|g| g.name.clone()),
            SubjectKind::Key => dir.keys.get(id).map(|k| k.name.clone()),
            SubjectKind::Org => None,
        }
    })
    .collect()
}

/// `period,group,name,spend_usd,requests,input_tokens,output_tokens`: a row
/// per period of each group (or of the whole, ungrouped: `group` empty).
fn to_csv(u: &UsageJson) -> String {
    let mut out = String::from("period,group,name,spend_usd,requests,input_tokens,output_tokens\n");
    let mut row = |p: &PointJson, key: &str, name: &str| {
        let cells = [
            field(&p.period),
            field(key),
            field(name),
            dollars(p.sums.spend_micros),
            p.sums.requests.to_string(),
            p.sums.input_tokens.to_string(),
            p.sums.output_tokens.to_string(),
        ];
        out.push_str(&cells.join(","));
        out.push('\n');
    };
    if u.group_by.is_none() {
        for p in &u.series {
            row(p, "", "");
        }
    }
    for g in &u.groups {
        for p in &g.series {
            row(p, &g.key, g.name.as_deref().unwrap_or(""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_has_every_period_of_the_range() {
        let d = |s| Day::parse(s).unwrap();
        let sums = |n| UsageSums {
            spend_micros: n,
            requests: 1,
            input_tokens: 10,
            output_tokens: 1,
        };
        let days = [
            (20261130, sums(5)),
            (20261201, sums(7)),
            (20261203, sums(1)),
        ];
        let by_day = series(Granularity::Day, d("2026-11-30"), d("2026-12-03"), &days);
        let spend: Vec<(String, i64)> = by_day
            .iter()
            .map(|p| (p.period.clone(), p.sums.spend_micros))
            .collect();
        assert_eq!(
            spend,
            [
                ("2026-11-30".to_owned(), 5),
                ("2026-12-01".to_owned(), 7),
                ("2026-12-02".to_owned(), 0),
                ("2026-12-03".to_owned(), 1)
            ]
        );
        let by_month = series(Granularity::Month, d("2026-11-30"), d("2026-12-03"), &days);
        assert_eq!(by_month.len(), 2);
        assert_eq!(
            (by_month[1].sums.spend_micros, by_month[1].sums.requests),
            (8, 2)
        );
        assert_eq!(bound("from", "2026-11", true).unwrap(), d("2026-11-01"));
        assert_eq!(bound("to", "2026-11", false).unwrap(), d("2026-11-30"));
        assert!(bound("to", "2026-11-31", false).is_err());
    }
}
