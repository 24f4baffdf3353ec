//! The console's pages: the operator's org picker, an org's overview, its
//! users and a user. Each page is one round of queries through the API's
//! own handlers, with the signed-in principal as the caller.

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use tally_core::ratio::format_bps;
use tally_core::time::Month;

use super::view::{self, Bar};
use super::{Fail, Fields, Layout, Session, href, local_target, render, render_as, see_other, seg};
use crate::AppState;
use crate::dto::{LimitSourceJson, UserJson};
use crate::error::ApiError;
use crate::extract::{Caller, Params};
use crate::{orgs, users};

fn caller(s: &Session) -> Caller {
    Caller(s.principal.clone())
}

/// `GET /console`: the signed-in user's start page.
pub(crate) async fn home(session: Session) -> Response {
    match session.principal.org() {
        Some(org) => see_other(&format!("/console/orgs/{}", seg(org.as_str()))),
        None => see_other("/console/orgs"),
    }
}

#[derive(Debug)]
struct OrgLine {
    href: String,
    id: String,
    name: String,
    members: i64,
    spend: String,
    limit: String,
    percent: String,
}

#[derive(Template)]
#[template(path = "console/orgs.html")]
struct OrgsPage {
    layout: Layout,
    q: String,
    orgs: Vec<OrgLine>,
    next: Option<String>,
    first: Option<String>,
}

/// `GET /console/orgs`: the operator picks an org.
pub(crate) async fn orgs(
    State(state): State<AppState>,
    session: Session,
    uri: Uri,
) -> Result<Response, Fail> {
    if let Some(org) = session.principal.org() {
        return Ok(see_other(&format!("/console/orgs/{}", seg(org.as_str()))));
    }
    let layout = Layout::new(&session, "Orgs", None, "orgs");
    let q = Fields::query(&uri)?;
    let page = orgs::list(
        State(state),
        caller(&session),
        Params(orgs::OrgListParams {
            q: q.get("q").map(str::to_owned),
            cursor: q.get("cursor").map(str::to_owned),
            limit: Some(50),
        }),
    )
    .await
    .map_err(|e| Fail::from(e).on(&layout))?
    .0;
    let search = q.get("q").unwrap_or("").to_owned();
    Ok(render(&OrgsPage {
        orgs: page
            .items
            .into_iter()
            .map(|o| OrgLine {
                href: format!("/console/orgs/{}", seg(&o.id)),
                percent: view::percent(o.spend_micros, o.monthly_limit_micros),
                spend: view::usd(o.spend_micros),
                limit: view::limit(o.monthly_limit_micros),
                members: o.member_count,
                id: o.id,
                name: o.name,
            })
            .collect(),
        next: page
            .next_cursor
            .map(|c| href("/console/orgs", &[("q", &search), ("cursor", &c)])),
        first: q
            .get("cursor")
            .map(|_| href("/console/orgs", &[("q", &search)])),
        q: search,
        layout,
    }))
}

/// What an org's pages need of it besides their own figures: its name,
/// alert thresholds and groups, from the directory in memory (no query),
/// once the caller's access to it is checked.
#[derive(Debug)]
pub(super) struct OrgHead {
    pub(super) name: String,
    pub(super) thresholds: Vec<u32>,
    /// Groups not deleted, by id.
    pub(super) groups: Vec<String>,
}

pub(super) fn org(
    state: &AppState,
    session: &Session,
    org: &str,
    layout: &Layout,
) -> Result<OrgHead, Fail> {
    let org_id =
        crate::org_access(state, &caller(session), org).map_err(|e| Fail::from(e).on(layout))?;
    let cell = state.engine.registry.org(&org_id).ok_or_else(|| {
        Fail::new(StatusCode::NOT_FOUND, format!("org {org:?} does not exist")).on(layout)
    })?;
    let o = cell.read();
    let mut groups: Vec<String> = o
        .dir
        .groups
        .values()
        .filter(|g| !g.deleted)
        .map(|g| g.id.to_string())
        .collect();
    groups.sort_unstable();
    Ok(OrgHead {
        name: o.dir.settings.name.clone(),
        thresholds: o.dir.settings.alert_thresholds_bps.clone(),
        groups,
    })
}

/// A member as a row of the users table.
#[derive(Debug)]
pub(super) struct UserLine {
    pub(super) id: String,
    pub(super) href: String,
    pub(super) name: String,
    pub(super) email: String,
    pub(super) status: String,
    /// Used within the last hour.
    pub(super) active_now: bool,
    pub(super) last_active: String,
    pub(super) groups: Vec<(String, String)>,
    pub(super) limit: String,
    /// Where the limit comes from: `own` or `org default`.
    pub(super) limit_source: &'static str,
    pub(super) limit_input: String,
    pub(super) spend: String,
    pub(super) held: String,
    pub(super) bar: Option<Bar>,
    pub(super) percent: String,
    pub(super) requests: i64,
    pub(super) cut_off: bool,
}

pub(super) fn user_line(org: &str, u: UserJson, thresholds: &[u32], now_ms: i64) -> UserLine {
    let last_ms = u.last_active_at.as_deref().and_then(view::parse_ms);
    UserLine {
        href: format!("/console/orgs/{}/users/{}", seg(org), seg(&u.id)),
        active_now: u.status == "active" && last_ms.is_some_and(|t| now_ms - t < 3_600_000),
        last_active: last_ms.map_or_else(|| "never".to_owned(), |t| view::ago(t, now_ms)),
        groups: u
            .groups
            .iter()
            .map(|g| {
                (
                    g.clone(),
                    href(
                        &format!("/console/orgs/{}/users", seg(org)),
                        &[("group", g)],
                    ),
                )
            })
            .collect(),
        limit: view::limit(u.monthly_limit_micros),
        limit_source: match u.limit_source {
            LimitSourceJson::OrgDefault => "org default",
            LimitSourceJson::Own => "own",
        },
        limit_input: view::amount_input(u.monthly_limit_micros),
        spend: view::usd(u.spend_micros),
        held: if u.held_micros > 0 {
            view::usd(u.held_micros)
        } else {
            String::new()
        },
        bar: view::bar(u.spend_micros, u.monthly_limit_micros, thresholds),
        percent: view::percent(u.spend_micros, u.monthly_limit_micros),
        requests: u.requests,
        cut_off: u.cut_off,
        id: u.id,
        name: u.name,
        email: u.email,
        status: u.status,
    }
}

#[derive(Debug)]
struct TopLine {
    label: String,
    href: String,
    spend: String,
    requests: i64,
}

#[derive(Debug)]
struct AlertLine {
    at: String,
    subject: String,
    href: String,
    event: String,
    spend: String,
    limit: String,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    layout: Layout,
    name: String,
    period: String,
    spend: String,
    held: String,
    limit: String,
    percent: String,
    bar: Option<Bar>,
    projection: view::Projection,
    requests: i64,
    chart: String,
    models: Vec<view::ModelLine>,
    top_users: Vec<UserLine>,
    top_groups: Vec<TopLine>,
    top_keys: Vec<TopLine>,
    /// (threshold, members at or above it now, the users page of them).
    bands: Vec<(String, String, String)>,
    at_risk: Vec<UserLine>,
    at_risk_more: bool,
    alerts: Vec<AlertLine>,
    users_href: String,
}

/// How many of each the overview's top lists show.
const TOP_N: u32 = 5;
/// How many members at or above a threshold the overview lists.
const AT_RISK_N: u32 = 50;

pub(super) fn subject_href(org: &str, kind: &str, id: &str) -> String {
    match kind {
        "user" => format!("/console/orgs/{}/users/{}", seg(org), seg(id)),
        "group" => href(
            &format!("/console/orgs/{}/users", seg(org)),
            &[("group", id)],
        ),
        _ => format!("/console/orgs/{}", seg(org)),
    }
}

fn list_params(sort: &str, min_utilization: Option<String>, limit: u32) -> users::ListParams {
    users::ListParams {
        sort: Some(sort.to_owned()),
        status: None,
        group: None,
        q: None,
        min_utilization,
        cut_off: None,
        cursor: None,
        limit: Some(limit),
    }
}

/// Members by id with this month's figures and held spend, in the order
/// given (the API's rows).
async fn rows_of(
    state: &AppState,
    org: &tally_core::ids::OrgId,
    ids: &[String],
    month: Month,
) -> Result<Vec<UserJson>, ApiError> {
    let rows = state.engine.db.users_by_ids(org, ids, month).await?;
    crate::dto::with_held(
        &state.engine,
        org,
        rows.into_iter().map(UserJson::from).collect(),
    )
    .await
}

/// Members at or above each alert threshold (and 100 %) now, and the
/// [`AT_RISK_N`] using most of their limit. From the meter's memory where
/// this process meters the org (the figures the Prometheus gauges show: no
/// scan of the members); otherwise from the API's list, filtered and
/// sorted by use of the limit.
#[allow(clippy::type_complexity)]
async fn at_risk(
    state: &AppState,
    session: &Session,
    org: &tally_core::ids::OrgId,
    month: Month,
) -> Result<(Vec<(u32, String, String)>, Vec<UserJson>, bool), ApiError> {
    let users_path = format!("/console/orgs/{}/users", seg(org.as_str()));
    let band_href = |t: u32| {
        href(
            &users_path,
            &[
                ("min_utilization", &format_bps(t)),
                ("sort", "-utilization"),
            ],
        )
    };
    let cell = state.engine.registry.org(org);
    if let Some(cell) = cell.as_ref().filter(|_| state.engine.meter.meters(org)) {
        let (over, top) = {
            let o = cell.read();
            let lowest = o
                .dir
                .settings
                .alert_thresholds_bps
                .first()
                .copied()
                .unwrap_or(10_000);
            let top: Vec<_> = o
                .top_users(month, AT_RISK_N as usize + 1)
                .into_iter()
                .filter(|u| tally_core::ratio::reached(u.spend_micros, u.limit_micros, lowest))
                .collect();
            (o.gauges(month).users_over, top)
        };
        let more = top.len() > AT_RISK_N as usize;
        let ids: Vec<String> = top
            .iter()
            .take(AT_RISK_N as usize)
            .map(|u| u.id.to_string())
            .collect();
        let rows = rows_of(state, org, &ids, month).await?;
        let bands = over
            .into_iter()
            .map(|(t, n)| (t, n.to_string(), band_href(t)))
            .collect();
        return Ok((bands, rows, more));
    }
    let thresholds = cell.map_or_else(Vec::new, |c| {
        c.read().dir.settings.alert_thresholds_bps.clone()
    });
    let lowest = thresholds.first().copied().unwrap_or(10_000);
    let page = users::list(
        State(state.clone()),
        caller(session),
        Path(org.to_string()),
        Params(list_params(
            "-utilization",
            Some(format_bps(lowest)),
            AT_RISK_N,
        )),
    )
    .await?
    .0;
    // Counted from one page: where every listed member is over a
    // threshold and more were not listed, the count is a lower bound.
    let more = page.next_cursor.is_some();
    let mut bands: Vec<(u32, String, String)> = Vec::new();
    for t in thresholds.iter().copied().chain([10_000]) {
        if bands.iter().any(|(b, _, _)| *b == t) {
            continue;
        }
        let n = page
            .items
            .iter()
            .filter(|u| {
                u.monthly_limit_micros
                    .is_some_and(|l| tally_core::ratio::reached(u.spend_micros, l, t))
            })
            .count();
        let plus = if more && n == page.items.len() {
            "+"
        } else {
            ""
        };
        bands.push((t, format!("{n}{plus}"), band_href(t)));
    }
    Ok((bands, page.items, more))
}

/// `GET /console/orgs/{org}`: the month at a glance.
pub(crate) async fn overview(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
) -> Result<Response, Fail> {
    let layout = Layout::new(&session, "Overview", Some(&org_id), "overview");
    let fail = |e: ApiError| Fail::from(e).on(&layout);
    let detail = orgs::get(
        State(state.clone()),
        caller(&session),
        Path(org_id.clone()),
        Params(Default::default()),
    )
    .await
    .map_err(fail)?
    .0;
    let org = detail.org;
    let now = state.engine.now_ms();
    let month = Month::from_unix_ms(now);
    let thresholds: Vec<u32> = org.alert_thresholds.iter().map(|f| f.0).collect();
    let org_key =
        tally_core::ids::OrgId::new(&org_id).map_err(|e| fail(ApiError::invalid(e.to_string())))?;
    let (bands, at_risk, at_risk_more) = at_risk(&state, &session, &org_key, month)
        .await
        .map_err(fail)?;
    // The top spenders by the month's spend index, then their rows.
    let top_ids: Vec<String> = state
        .engine
        .db
        .top_spenders(&org_key, "user", month, TOP_N * 4)
        .await
        .map_err(|e| fail(e.into()))?
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    // Removed members keep their spend but leave the lists.
    let top_users: Vec<UserJson> = rows_of(&state, &org_key, &top_ids, month)
        .await
        .map_err(fail)?
        .into_iter()
        .filter(|u| u.status != "removed")
        .take(TOP_N as usize)
        .collect();
    let org_key =
        tally_core::ids::OrgId::new(&org_id).map_err(|e| fail(ApiError::invalid(e.to_string())))?;
    let db = &state.engine.db;
    let tops = |kind: &'static str| db.top_spenders(&org_key, kind, month, TOP_N);
    let top = |rows: Vec<(String, i64, i64)>, kind: &str| -> Vec<TopLine> {
        rows.into_iter()
            .map(|(id, spend, requests)| TopLine {
                href: subject_href(&org_id, kind, &id),
                label: id,
                spend: view::usd(spend),
                requests,
            })
            .collect()
    };
    let top_groups = top(tops("group").await.map_err(|e| fail(e.into()))?, "group");
    let top_keys = top(tops("key").await.map_err(|e| fail(e.into()))?, "key");
    let alerts = orgs::enforcement(
        State(state.clone()),
        caller(&session),
        Path(org_id.clone()),
        Params(orgs::EnforcementParams {
            event: None,
            subject: None,
            cursor: None,
            limit: Some(10),
        }),
    )
    .await
    .map_err(fail)?
    .0;
    let days: Vec<(String, i64)> = detail
        .history
        .days
        .iter()
        .map(|d| (d.day.clone(), d.spend_micros))
        .collect();
    Ok(render(&OverviewPage {
        name: org.name.clone(),
        period: view::period(month),
        spend: view::usd(org.spend_micros),
        held: view::usd(org.held_micros),
        limit: view::limit(org.monthly_limit_micros),
        percent: view::percent(org.spend_micros, org.monthly_limit_micros),
        bar: view::bar(org.spend_micros, org.monthly_limit_micros, &thresholds),
        projection: view::projection(
            org.projected_micros,
            org.monthly_limit_micros,
            org.projected_limit_date.as_deref(),
        ),
        requests: org.requests,
        chart: view::daily_chart(month, &days, org.monthly_limit_micros),
        models: view::model_lines(&detail.history.models),
        top_users: top_users
            .into_iter()
            .map(|u| user_line(&org_id, u, &thresholds, now))
            .collect(),
        top_groups,
        top_keys,
        bands: bands
            .into_iter()
            .map(|(t, n, href_)| (format!("{} %", format_bps(t * 100)), n, href_))
            .collect(),
        at_risk_more,
        at_risk: at_risk
            .into_iter()
            .map(|u| user_line(&org_id, u, &thresholds, now))
            .collect(),
        alerts: alerts
            .items
            .into_iter()
            .map(|a| AlertLine {
                at: view::parse_ms(&a.at).map_or(a.at.clone(), view::when),
                href: subject_href(&org_id, &a.subject_kind, &a.subject_id),
                subject: format!("{} {}", a.subject_kind, a.subject_id),
                event: super::activity::alert_words(
                    &a.event,
                    a.threshold.map(|t| t.0),
                    a.reason.as_deref(),
                ),
                spend: view::usd(a.spend_micros),
                limit: view::limit(a.limit_micros),
            })
            .collect(),
        users_href: format!("/console/orgs/{}/users", seg(&org_id)),
        layout: Layout {
            title: format!("{} · Overview", org.name),
            ..layout
        },
    }))
}

/// A sortable column of the users table.
#[derive(Debug)]
struct Column {
    label: &'static str,
    href: String,
    /// `ascending`, `descending` or `none`, for `aria-sort`.
    aria: &'static str,
    arrow: &'static str,
}

#[derive(Template)]
#[template(path = "console/users.html")]
struct UsersPage {
    layout: Layout,
    org_name: String,
    period: String,
    action: String,
    q: String,
    status: String,
    group: String,
    min_utilization: String,
    cut_off: String,
    groups: Vec<String>,
    utilization_choices: Vec<(String, String)>,
    columns: Vec<Column>,
    users: Vec<UserLine>,
    next: Option<String>,
    first: Option<String>,
    /// This page's URL, where a row's quick edit returns.
    here: String,
    /// The same list as CSV.
    csv: String,
    /// Where the bulk bar posts, the filters it carries, and the most
    /// members it may change at once.
    bulk_action: String,
    filters: Vec<(&'static str, String)>,
    bulk_max: usize,
}

/// The users list's parameters, as the page's URL carries them.
pub(super) struct UsersQuery {
    sort: String,
    status: String,
    group: String,
    q: String,
    min_utilization: String,
    cut_off: String,
    cursor: String,
}

impl UsersQuery {
    pub(super) fn from(f: &Fields) -> UsersQuery {
        let s = |k: &str| f.get(k).unwrap_or("").to_owned();
        UsersQuery {
            sort: s("sort"),
            status: s("status"),
            group: s("group"),
            q: s("q"),
            min_utilization: s("min_utilization"),
            cut_off: s("cut_off"),
            cursor: s("cursor"),
        }
    }

    /// The filters and sort (no cursor): a link to the first page.
    fn pairs(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("sort", &self.sort),
            ("status", &self.status),
            ("group", &self.group),
            ("q", &self.q),
            ("min_utilization", &self.min_utilization),
            ("cut_off", &self.cut_off),
        ]
    }

    pub(super) fn params(&self, rows: u32) -> Result<users::ListParams, Fail> {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let cut_off = match self.cut_off.as_str() {
            "" => None,
            "yes" | "true" => Some(true),
            "no" | "false" => Some(false),
            other => {
                return Err(Fail::new(
                    StatusCode::BAD_REQUEST,
                    format!("cut_off must be yes or no, got {other:?}"),
                ));
            }
        };
        Ok(users::ListParams {
            sort: opt(&self.sort),
            status: opt(&self.status),
            group: opt(&self.group),
            q: opt(&self.q),
            min_utilization: opt(&self.min_utilization),
            cut_off,
            cursor: opt(&self.cursor),
            limit: Some(rows),
        })
    }
}

/// Rows a page of the users table.
const USERS_ROWS: u32 = 50;

const COLUMNS: [(&str, &str, bool); 6] = [
    // (label, sort key, descending first)
    ("Name", "name", false),
    ("Email", "email", false),
    ("Last active", "last_active", true),
    ("Limit", "limit", true),
    ("Spend", "spend", true),
    ("Used", "utilization", true),
];

/// `GET /console/orgs/{org}/users`: the members, sorted and filtered as
/// the API lists them, a keyset page at a time.
pub(crate) async fn users(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let layout = Layout::new(&session, "Users", Some(&org_id), "users");
    let fail = |e: ApiError| Fail::from(e).on(&layout);
    let org = org(&state, &session, &org_id, &layout)?;
    let query = UsersQuery::from(&Fields::query(&uri)?);
    let params = query.params(USERS_ROWS).map_err(|f| f.on(&layout))?;
    let page = users::list(
        State(state.clone()),
        caller(&session),
        Path(org_id.clone()),
        Params(params),
    )
    .await
    .map_err(fail)?
    .0;
    let now = state.engine.now_ms();
    let thresholds = org.thresholds.clone();
    let path = format!("/console/orgs/{}/users", seg(&org_id));
    let pairs = query.pairs();
    let current = if query.sort.is_empty() {
        "name"
    } else {
        &query.sort
    };
    let columns = COLUMNS
        .iter()
        .map(|(label, key, desc_first)| {
            let (next, aria, arrow) = if current == *key {
                (format!("-{key}"), "ascending", "▲")
            } else if current.strip_prefix('-') == Some(key) {
                ((*key).to_owned(), "descending", "▼")
            } else if *desc_first {
                (format!("-{key}"), "none", "")
            } else {
                ((*key).to_owned(), "none", "")
            };
            let mut p: Vec<(&str, &str)> = pairs
                .iter()
                .filter(|(k, _)| *k != "sort")
                .copied()
                .collect();
            p.push(("sort", &next));
            Column {
                label,
                href: href(&path, &p),
                aria,
                arrow,
            }
        })
        .collect();
    let mut choices: Vec<(String, String)> = thresholds
        .iter()
        .map(|t| (format_bps(*t), format!("{} %", format_bps(t * 100))))
        .collect();
    if !choices.iter().any(|(v, _)| *v == query.min_utilization)
        && !query.min_utilization.is_empty()
    {
        choices.push((query.min_utilization.clone(), query.min_utilization.clone()));
    }
    let here = {
        let mut p = pairs.clone();
        p.push(("cursor", &query.cursor));
        href(&path, &p)
    };
    Ok(render(&UsersPage {
        org_name: org.name.clone(),
        period: view::period(Month::from_unix_ms(now)),
        action: path.clone(),
        groups: org.groups.clone(),
        utilization_choices: choices,
        columns,
        users: page
            .items
            .into_iter()
            .map(|u| user_line(&org_id, u, &thresholds, now))
            .collect(),
        next: page.next_cursor.map(|c| {
            let mut p = pairs.clone();
            p.push(("cursor", &c));
            href(&path, &p)
        }),
        first: (!query.cursor.is_empty()).then(|| href(&path, &pairs)),
        here,
        bulk_action: format!("/console/orgs/{}/bulk", seg(&org_id)),
        csv: href(&format!("{path}.csv"), &pairs),
        filters: pairs
            .iter()
            .filter(|(k, v)| *k != "sort" && !v.is_empty())
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect(),
        bulk_max: tally_core::entity::BULK_USERS_MAX,
        q: query.q.clone(),
        status: query.status.clone(),
        group: query.group.clone(),
        min_utilization: query.min_utilization.clone(),
        cut_off: query.cut_off.clone(),
        layout: Layout {
            title: format!("{} · Users", org.name),
            ..layout
        },
    }))
}

#[derive(Debug)]
struct MonthLine {
    month: String,
    spend: String,
    requests: i64,
    change: String,
}

#[derive(Template)]
#[template(path = "console/user.html")]
struct UserPage {
    layout: Layout,
    user: UserLine,
    projection: view::Projection,
    period: String,
    chart: String,
    models: Vec<view::ModelLine>,
    months: Vec<MonthLine>,
    events: Vec<super::activity::EventLine>,
    action: String,
    users_href: String,
    error: Option<String>,
    done: Option<&'static str>,
    /// What the limit field shows after a refused change: what was sent.
    limit_value: String,
    /// Their keys: (name, id, spend, state).
    keys: Vec<(String, String, String, &'static str)>,
    keys_more: bool,
    keys_href: String,
    /// Their live holds: (request id, key id, held, placed, expires).
    holds: Vec<(String, String, String, String, String)>,
    holds_more: bool,
}

/// Audit entries a user's page shows.
const USER_EVENTS: u32 = 20;
/// Keys a user's page shows.
const USER_KEYS: u32 = 50;
/// Live holds a user's page shows.
const USER_HOLDS: u32 = 50;

async fn user_page(
    state: &AppState,
    session: &Session,
    org_id: &str,
    user_id: &str,
) -> Result<UserPage, Fail> {
    let layout = Layout::new(session, "User", Some(org_id), "users");
    let fail = |e: ApiError| Fail::from(e).on(&layout);
    let org = org(state, session, org_id, &layout)?;
    let detail = users::get(
        State(state.clone()),
        caller(session),
        Path((org_id.to_owned(), user_id.to_owned())),
        Params(Default::default()),
    )
    .await
    .map_err(fail)?
    .0;
    let events = orgs::events(
        State(state.clone()),
        caller(session),
        Path(org_id.to_owned()),
        Params(orgs::EventsParams {
            order: Some("newest".into()),
            actor: None,
            kind: None,
            subject: Some(format!("user:{user_id}")),
            from: None,
            to: None,
            cursor: None,
            limit: Some(USER_EVENTS),
        }),
    )
    .await
    .map_err(fail)?
    .0;
    let keys = crate::keys::list(
        State(state.clone()),
        caller(session),
        Path(org_id.to_owned()),
        Params(crate::keys::KeyListParams {
            user: Some(user_id.to_owned()),
            cursor: None,
            limit: Some(USER_KEYS),
        }),
    )
    .await
    .map_err(fail)?
    .0;
    let mut holds = state
        .engine
        .member_holds(org_id, user_id, USER_HOLDS + 1)
        .await
        .map_err(|e| fail(e.into()))?;
    let holds_more = holds.len() > USER_HOLDS as usize;
    holds.truncate(USER_HOLDS as usize);
    let now = state.engine.now_ms();
    let month = Month::from_unix_ms(now);
    let days: Vec<(String, i64)> = detail
        .history
        .days
        .iter()
        .map(|d| (d.day.clone(), d.spend_micros))
        .collect();
    let limit = detail.user.monthly_limit_micros;
    let projection = view::projection(
        detail.user.projected_micros,
        limit,
        detail.user.projected_limit_date.as_deref(),
    );
    let user = user_line(org_id, detail.user, &org.thresholds, now);
    Ok(UserPage {
        projection,
        period: view::period(month),
        chart: view::daily_chart(month, &days, limit),
        models: view::model_lines(&detail.history.models),
        months: detail
            .history
            .months
            .iter()
            .map(|m| MonthLine {
                month: m.month.clone(),
                spend: view::usd(m.spend_micros),
                requests: m.requests,
                change: m.change_micros.map_or_else(String::new, |c| {
                    if c >= 0 {
                        format!("+{}", view::usd(c))
                    } else {
                        view::usd(c)
                    }
                }),
            })
            .collect(),
        events: events
            .items
            .into_iter()
            .map(super::activity::event_line)
            .collect(),
        action: user.href.clone(),
        users_href: format!("/console/orgs/{}/users", seg(org_id)),
        error: None,
        done: None,
        limit_value: user.limit_input.clone(),
        keys_more: keys.next_cursor.is_some(),
        keys: keys
            .items
            .into_iter()
            .map(|k| {
                let state = if k.revoked {
                    "revoked"
                } else if k.cut_off {
                    "cut off"
                } else {
                    "live"
                };
                (k.name, k.id, view::usd(k.spend_micros), state)
            })
            .collect(),
        keys_href: format!("/console/orgs/{}/keys", seg(org_id)),
        holds: holds
            .into_iter()
            .map(|h| {
                (
                    h.request_id,
                    h.key_id,
                    view::usd(h.amount_micros),
                    view::ago(h.placed_at_ms, now),
                    view::when(h.expires_at_ms),
                )
            })
            .collect(),
        holds_more,
        layout: Layout {
            title: format!("{} · {}", user.name, org.name),
            ..layout
        },
        user,
    })
}

/// `GET /console/orgs/{org}/users/{user}`.
pub(crate) async fn user(
    State(state): State<AppState>,
    session: Session,
    Path((org_id, user_id)): Path<(String, String)>,
    uri: Uri,
) -> Result<Response, Fail> {
    let mut page = user_page(&state, &session, &org_id, &user_id).await?;
    page.done = match Fields::query(&uri)?.get("done") {
        Some("limit") => Some("The limit was changed."),
        Some("status") => Some("The status was changed."),
        _ => None,
    };
    Ok(render(&page))
}

/// The change a user form asks for, checked.
fn user_change_of(form: &Fields) -> Result<users::PatchUser, Fail> {
    let bad = |m: String| Fail::new(StatusCode::BAD_REQUEST, m);
    let mut patch = users::PatchUser {
        email: None,
        name: None,
        monthly_limit_micros: None,
        status: None,
    };
    match form.get("action") {
        Some("limit") => {
            let micros = super::typed_dollars(form.get("limit").unwrap_or(""))?;
            patch.monthly_limit_micros = Some(Some(micros));
        }
        Some("unlimited") => patch.monthly_limit_micros = Some(None),
        Some("suspend") => patch.status = Some("suspended".into()),
        Some("reactivate") => patch.status = Some("active".into()),
        other => {
            return Err(bad(format!(
                "unknown action {:?}: limit, unlimited, suspend or reactivate",
                other.unwrap_or("")
            )));
        }
    }
    Ok(patch)
}

/// `POST /console/orgs/{org}/users/{user}`: set or clear the limit, suspend
/// or reactivate. Refused, the page comes back with the reason and nothing
/// changed.
pub(crate) async fn user_change(
    State(state): State<AppState>,
    session: Session,
    Path((org_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    let changed: Result<&str, Fail> = async {
        session.check_form(&headers, &form)?;
        let patch = user_change_of(&form)?;
        let done = if patch.status.is_some() {
            "status"
        } else {
            "limit"
        };
        let _ = users::patch(
            State(state.clone()),
            caller(&session),
            Path((org_id.clone(), user_id.clone())),
            crate::extract::JsonBody(patch),
        )
        .await?;
        Ok(done)
    }
    .await;
    let done = match changed {
        Ok(done) => done,
        Err(f) => {
            let mut page = user_page(&state, &session, &org_id, &user_id).await?;
            page.limit_value = form.get("limit").unwrap_or("").to_owned();
            page.error = Some(f.message);
            return Ok(render_as(f.status, &page));
        }
    };
    let own = format!("/console/orgs/{}/users/{}", seg(&org_id), seg(&user_id));
    let back = local_target(form.get("back"), "");
    Ok(see_other(&if back.is_empty() {
        href(&own, &[("done", done)])
    } else {
        back
    }))
}
