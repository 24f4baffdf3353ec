//! Groups: the list (members, spend against the limit), creating one, and a
//! group's page (its month by day, 13 months, the members who spent most,
//! its limit and name, members added and removed).

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use tally_core::time::Month;

use super::pages::{UserLine, org, user_line};
use super::view::{self, Bar};
use super::{
    Fail, Fields, Layout, Session, href, render, render_as, see_other, seg, typed_dollars,
};
use crate::AppState;
use crate::cursor::PageParams;
use crate::dto::GroupJson;
use crate::extract::{Caller, JsonBody, Params};
use crate::groups;

#[derive(Debug)]
struct GroupLine {
    id: String,
    name: String,
    href: String,
    members: i64,
    spend: String,
    limit: String,
    bar: Option<Bar>,
    percent: String,
    requests: i64,
    cut_off: bool,
}

fn group_line(org: &str, g: &GroupJson, thresholds: &[u32]) -> GroupLine {
    GroupLine {
        id: g.id.clone(),
        name: g.name.clone(),
        href: format!("/console/orgs/{}/groups/{}", seg(org), seg(&g.id)),
        members: g.member_count,
        spend: view::usd(g.spend_micros),
        limit: view::limit(g.monthly_limit_micros),
        bar: view::bar(g.spend_micros, g.monthly_limit_micros, thresholds),
        percent: view::percent(g.spend_micros, g.monthly_limit_micros),
        requests: g.requests,
        cut_off: g.cut_off,
    }
}

#[derive(Template)]
#[template(path = "console/groups.html")]
struct GroupsPage {
    layout: Layout,
    period: String,
    groups: Vec<GroupLine>,
    next: Option<String>,
    first: Option<String>,
    action: String,
    error: Option<String>,
    /// The create form as typed, after a refusal: (id, name, limit).
    typed: (String, String, String),
}

const GROUPS_ROWS: u32 = 50;

async fn groups_page(
    state: &AppState,
    session: &Session,
    org_id: &str,
    cursor: Option<String>,
) -> Result<GroupsPage, Fail> {
    let layout = Layout::new(session, "Groups", Some(org_id), "groups");
    let org = org(state, session, org_id, &layout)?;
    let page = groups::list(
        State(state.clone()),
        Caller(session.principal.clone()),
        Path(org_id.to_owned()),
        Params(PageParams {
            cursor: cursor.clone(),
            limit: Some(GROUPS_ROWS),
        }),
    )
    .await
    .map_err(|e| Fail::from(e).on(&layout))?
    .0;
    let thresholds = org.thresholds.clone();
    let path = format!("/console/orgs/{}/groups", seg(org_id));
    Ok(GroupsPage {
        period: view::period(Month::from_unix_ms(state.engine.now_ms())),
        groups: page
            .items
            .iter()
            .map(|g| group_line(org_id, g, &thresholds))
            .collect(),
        next: page.next_cursor.map(|c| href(&path, &[("cursor", &c)])),
        first: cursor.map(|_| path.clone()),
        action: path,
        error: None,
        typed: Default::default(),
        layout: Layout {
            title: format!("{} · Groups", org.name),
            ..layout
        },
    })
}

/// `GET /console/orgs/{org}/groups`.
pub(crate) async fn list(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let q = Fields::query(&uri)?;
    let page = groups_page(
        &state,
        &session,
        &org_id,
        q.get("cursor").map(str::to_owned),
    )
    .await?;
    Ok(render(&page))
}

/// `POST /console/orgs/{org}/groups`: a new group.
pub(crate) async fn create(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    let created: Result<String, Fail> = async {
        session.check_form(&headers, &form)?;
        let limit = form.get("limit").map(typed_dollars).transpose()?;
        let g = groups::create(
            State(state.clone()),
            Caller(session.principal.clone()),
            Path(org_id.clone()),
            JsonBody(groups::CreateGroup {
                id: form.get("id").map(str::to_owned),
                name: form.get("name").unwrap_or("").to_owned(),
                monthly_limit_micros: limit,
            }),
        )
        .await?
        .1
        .0;
        Ok(g.id)
    }
    .await;
    match created {
        Ok(id) => Ok(see_other(&format!(
            "/console/orgs/{}/groups/{}?done=created",
            seg(&org_id),
            seg(&id)
        ))),
        Err(f) => {
            let mut page = groups_page(&state, &session, &org_id, None).await?;
            page.error = Some(f.message);
            let typed = |k| form.get(k).unwrap_or("").to_owned();
            page.typed = (typed("id"), typed("name"), typed("limit"));
            Ok(render_as(f.status, &page))
        }
    }
}

#[derive(Debug)]
struct MonthLine {
    month: String,
    spend: String,
    requests: i64,
}

#[derive(Template)]
#[template(path = "console/group.html")]
struct GroupPage {
    layout: Layout,
    group: GroupLine,
    projection: view::Projection,
    held: String,
    period: String,
    chart: String,
    models: Vec<view::ModelLine>,
    months: Vec<MonthLine>,
    members: Vec<UserLine>,
    /// Whether more members exist than the breakdown shows.
    more: bool,
    all_members: String,
    action: String,
    groups_href: String,
    error: Option<String>,
    done: Option<&'static str>,
    limit_value: String,
}

async fn group_page(
    state: &AppState,
    session: &Session,
    org_id: &str,
    group_id: &str,
) -> Result<GroupPage, Fail> {
    let layout = Layout::new(session, "Group", Some(org_id), "groups");
    let org = org(state, session, org_id, &layout)?;
    let detail = groups::get(
        State(state.clone()),
        Caller(session.principal.clone()),
        Path((org_id.to_owned(), group_id.to_owned())),
        Params(Default::default()),
    )
    .await
    .map_err(|e| Fail::from(e).on(&layout))?
    .0;
    let now = state.engine.now_ms();
    let month = Month::from_unix_ms(now);
    let thresholds = org.thresholds.clone();
    let g = &detail.group;
    let days: Vec<(String, i64)> = detail
        .history
        .days
        .iter()
        .map(|d| (d.day.clone(), d.spend_micros))
        .collect();
    let line = group_line(org_id, g, &thresholds);
    Ok(GroupPage {
        projection: view::projection(
            g.projected_micros,
            g.monthly_limit_micros,
            g.projected_limit_date.as_deref(),
        ),
        held: view::usd(g.held_micros),
        period: view::period(month),
        chart: view::daily_chart(month, &days, g.monthly_limit_micros),
        models: view::model_lines(&detail.history.models),
        months: detail
            .history
            .months
            .iter()
            .map(|m| MonthLine {
                month: m.month.clone(),
                spend: view::usd(m.spend_micros),
                requests: m.requests,
            })
            .collect(),
        more: usize::try_from(g.member_count).unwrap_or(0) > detail.members.len(),
        members: detail
            .members
            .into_iter()
            .map(|u| user_line(org_id, u, &thresholds, now))
            .collect(),
        all_members: href(
            &format!("/console/orgs/{}/users", seg(org_id)),
            &[("group", &g.id)],
        ),
        action: line.href.clone(),
        groups_href: format!("/console/orgs/{}/groups", seg(org_id)),
        error: None,
        done: None,
        limit_value: view::amount_input(g.monthly_limit_micros),
        layout: Layout {
            title: format!("{} · {}", g.name, org.name),
            ..layout
        },
        group: line,
    })
}

/// `GET /console/orgs/{org}/groups/{group}`.
pub(crate) async fn get(
    State(state): State<AppState>,
    session: Session,
    Path((org_id, group_id)): Path<(String, String)>,
    uri: Uri,
) -> Result<Response, Fail> {
    let mut page = group_page(&state, &session, &org_id, &group_id).await?;
    page.done = match Fields::query(&uri)?.get("done") {
        Some("created") => Some("The group was created."),
        Some("changed") => Some("The group was changed."),
        Some("added") => Some("The member was added."),
        Some("removed") => Some("The member was removed."),
        _ => None,
    };
    Ok(render(&page))
}

/// `POST /console/orgs/{org}/groups/{group}`: its limit or name, a member
/// added or removed.
pub(crate) async fn change(
    State(state): State<AppState>,
    session: Session,
    Path((org_id, group_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    let caller = || Caller(session.principal.clone());
    let done: Result<&str, Fail> = async {
        session.check_form(&headers, &form)?;
        let patch = |name: Option<String>, limit: Option<Option<i64>>| {
            groups::patch(
                State(state.clone()),
                caller(),
                Path((org_id.clone(), group_id.clone())),
                JsonBody(groups::PatchGroup {
                    name,
                    monthly_limit_micros: limit,
                }),
            )
        };
        let member = || {
            form.get("user_id").map(str::to_owned).ok_or_else(|| {
                Fail::new(StatusCode::BAD_REQUEST, "name the member (their user id)")
            })
        };
        match form.get("action") {
            Some("limit") => {
                let micros = typed_dollars(form.get("limit").unwrap_or(""))?;
                let _ = patch(None, Some(Some(micros))).await?;
                Ok("changed")
            }
            Some("unlimited") => {
                let _ = patch(None, Some(None)).await?;
                Ok("changed")
            }
            Some("rename") => {
                let _ = patch(Some(form.get("name").unwrap_or("").to_owned()), None).await?;
                Ok("changed")
            }
            Some("add_member") => {
                let _ = groups::add_member(
                    State(state.clone()),
                    caller(),
                    Path((org_id.clone(), group_id.clone(), member()?)),
                )
                .await?;
                Ok("added")
            }
            Some("remove_member") => {
                let _ = groups::remove_member(
                    State(state.clone()),
                    caller(),
                    Path((org_id.clone(), group_id.clone(), member()?)),
                )
                .await?;
                Ok("removed")
            }
            other => Err(Fail::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown action {:?}: limit, unlimited, rename, add_member or remove_member",
                    other.unwrap_or("")
                ),
            )),
        }
    }
    .await;
    match done {
        Ok(done) => Ok(see_other(&format!(
            "/console/orgs/{}/groups/{}?done={done}",
            seg(&org_id),
            seg(&group_id)
        ))),
        Err(f) => {
            let mut page = group_page(&state, &session, &org_id, &group_id).await?;
            page.error = Some(f.message);
            if let Some(l) = form.get("limit") {
                l.clone_into(&mut page.limit_value);
            }
            Ok(render_as(f.status, &page))
        }
    }
}
