//! The users table's bulk bar: one change to the members ticked, or to
//! every member the filter matches (up to the API's bulk limit). Two
//! steps, both plain forms: *review* runs the change as a dry run and says
//! what it would do; *apply* does it and says what it did.

use std::collections::BTreeMap;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tally_core::ids::{GroupId, OrgId};
use tally_core::time::Month;

use super::{Fail, Fields, Layout, Session, href, render, seg};
use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Caller, JsonBody};
use crate::{groups, users};

/// The list filters the bulk bar carries (as the users page's URL does).
const FILTERS: [&str; 5] = ["status", "group", "q", "min_utilization", "cut_off"];

#[derive(Template)]
#[template(path = "console/bulk.html")]
struct BulkPage {
    layout: Layout,
    /// Whether this is the review (nothing written yet).
    review: bool,
    /// What the change is, in words.
    what: String,
    /// Whom it touches, in words.
    whom: String,
    users: usize,
    users_changed: usize,
    changes: Vec<(String, usize)>,
    /// A group the change creates first.
    creates: Option<String>,
    /// Whether it names every member matching the filter.
    every_match: bool,
    /// The form's fields, sent again by the confirm button.
    fields: Vec<(String, String)>,
    action: String,
    back: String,
}

/// The change the bar asks for.
struct Change {
    what: String,
    add_group: Option<String>,
    remove_group: Option<String>,
    limit: Option<Option<i64>>,
    reset_limit: bool,
    status: Option<&'static str>,
}

fn change_of(form: &Fields) -> Result<Change, Fail> {
    let bad = |m: String| Fail::new(StatusCode::BAD_REQUEST, m);
    let mut c = Change {
        what: String::new(),
        add_group: None,
        remove_group: None,
        limit: None,
        reset_limit: false,
        status: None,
    };
    let group = || {
        let g = form.get("group_id").unwrap_or("");
        GroupId::new(g)
            .map(|g| g.to_string())
            .map_err(|e| bad(format!("group: {e}")))
    };
    match form.get("change") {
        Some("add_group") => {
            let g = group()?;
            c.what = format!("add to group {g}");
            c.add_group = Some(g);
        }
        Some("remove_group") => {
            let g = group()?;
            c.what = format!("remove from group {g}");
            c.remove_group = Some(g);
        }
        Some("set_limit") => {
            let micros = super::typed_dollars(form.get("limit").unwrap_or(""))?;
            c.what = format!("set the monthly limit to {}", super::view::usd(micros));
            c.limit = Some(Some(micros));
        }
        Some("unlimited") => {
            c.what = "make the monthly limit unlimited".into();
            c.limit = Some(None);
        }
        Some("reset_limit") => {
            c.what = "reset the monthly limit to the org's default".into();
            c.reset_limit = true;
        }
        Some("suspend") => {
            c.what = "suspend".into();
            c.status = Some("suspended");
        }
        Some("reactivate") => {
            c.what = "reactivate".into();
            c.status = Some("active");
        }
        other => {
            return Err(bad(format!(
                "choose a change: add to or remove from a group, set, clear or reset the limit, \
                 suspend or reactivate (got {:?})",
                other.unwrap_or("")
            )));
        }
    }
    Ok(c)
}

/// The filter in words: `group eng, used at least 0.5`.
fn filter_words(form: &Fields) -> String {
    let parts: Vec<String> = FILTERS
        .iter()
        .filter_map(|k| form.get(k).map(|v| format!("{} {v}", k.replace('_', " "))))
        .collect();
    if parts.is_empty() {
        "no filter".into()
    } else {
        parts.join(", ")
    }
}

fn request(
    form: &Fields,
    c: &Change,
    add_groups: Vec<String>,
    dry_run: bool,
) -> Result<users::Bulk, Fail> {
    let every = form.get("scope") == Some("all");
    let ids = form.all("user_ids");
    if !every && ids.is_empty() {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "select at least one member, or choose every member matching the filter",
        ));
    }
    let opt = |k: &str| form.get(k).map(str::to_owned);
    let filter = every
        .then(|| -> Result<users::FilterJson, Fail> {
            Ok(users::FilterJson {
                status: opt("status"),
                group: opt("group"),
                q: opt("q"),
                min_utilization: opt("min_utilization"),
                cut_off: match form.get("cut_off") {
                    None => None,
                    Some("yes" | "true") => Some(true),
                    Some("no" | "false") => Some(false),
                    Some(other) => {
                        return Err(Fail::new(
                            StatusCode::BAD_REQUEST,
                            format!("cut_off must be yes or no, got {other:?}"),
                        ));
                    }
                },
            })
        })
        .transpose()?;
    Ok(users::Bulk {
        user_ids: (!every).then_some(ids),
        filter,
        add_groups,
        remove_groups: c.remove_group.iter().cloned().collect(),
        monthly_limit_micros: c.limit,
        reset_limit: c.reset_limit,
        status: c.status.map(str::to_owned),
        dry_run,
    })
}

/// Whether group `group` exists; a deleted one is refused (its id stays
/// taken).
fn group_exists(state: &AppState, org: &OrgId, group: &str) -> Result<bool, Fail> {
    let Some(cell) = state.engine.registry.org(org) else {
        return Ok(false);
    };
    let o = cell.read();
    match o.dir.groups.values().find(|g| g.id.as_str() == group) {
        Some(g) if g.deleted => Err(Fail::new(
            StatusCode::CONFLICT,
            format!(
                "group {group:?} was deleted, and a deleted group keeps its id: choose another"
            ),
        )),
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

/// How many members the form names: every one of its ids must exist (and
/// at most the bulk limit), or what its filter matches now. What joining a
/// new group would add, checked before the group is made.
async fn members_named(state: &AppState, org: &OrgId, req: &users::Bulk) -> Result<usize, Fail> {
    match (&req.user_ids, &req.filter) {
        (Some(ids), _) => {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() > tally_core::entity::BULK_USERS_MAX {
                return Err(Fail::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "at most {} members in one bulk change",
                        tally_core::entity::BULK_USERS_MAX
                    ),
                ));
            }
            let month = Month::from_unix_ms(state.engine.now_ms());
            let found = state
                .engine
                .db
                .users_by_ids(org, &ids, month)
                .await
                .map_err(|e| Fail::from(ApiError::from(e)))?;
            if let Some(missing) = ids.iter().find(|id| !found.iter().any(|u| &u.id == *id)) {
                return Err(Fail::new(
                    StatusCode::NOT_FOUND,
                    format!("user {missing:?} does not exist; nothing was changed"),
                ));
            }
            Ok(ids.len())
        }
        (None, Some(_)) => {
            let filter = users::user_filter(req.filter.clone().unwrap_or_default())?;
            Ok(users::matching(state, org, filter).await?.len())
        }
        (None, None) => Ok(0),
    }
}

/// `POST /console/orgs/{org}/bulk`.
pub(crate) async fn bulk(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let layout = Layout::new(&session, "Change many members", Some(&org_id), "users");
    let form = Fields::parse(&body).map_err(|f| f.on(&layout))?;
    let users_path = format!("/console/orgs/{}/users", seg(&org_id));
    let back = href(
        &users_path,
        &FILTERS.map(|k| (k, form.get(k).unwrap_or(""))),
    );
    let fail = |f: Fail| f.on(&layout);
    session.check_form(&headers, &form).map_err(fail)?;
    let org = crate::org_access(&state, &Caller(session.principal.clone()), &org_id)
        .map_err(|e| fail(e.into()))?;
    let change = change_of(&form).map_err(fail)?;
    let apply = form.get("step") == Some("apply");
    let creates = match &change.add_group {
        Some(g) if !group_exists(&state, &org, g).map_err(fail)? => Some(g.clone()),
        _ => None,
    };
    let caller = || Caller(session.principal.clone());
    // With a new group, whom it adds is checked before the group is made:
    // a refusal leaves no empty group behind.
    let named = match &creates {
        Some(_) => Some(
            members_named(
                &state,
                &org,
                &request(&form, &change, Vec::new(), true).map_err(fail)?,
            )
            .await
            .map_err(fail)?,
        ),
        None => None,
    };
    if apply && let Some(g) = &creates {
        let _ = groups::create(
            State(state.clone()),
            caller(),
            Path(org_id.clone()),
            JsonBody(groups::CreateGroup {
                id: Some(g.clone()),
                name: g.clone(),
                monthly_limit_micros: None,
            }),
        )
        .await
        .map_err(|e| fail(e.into()))?;
    }
    // A group that does not exist yet cannot be previewed: the rest of
    // the change is, and every member it touches would join the new group.
    let add_groups = match (&change.add_group, &creates, apply) {
        (Some(_), Some(_), false) => Vec::new(),
        (Some(g), _, _) => vec![g.clone()],
        (None, _, _) => Vec::new(),
    };
    let only_the_new_group = creates.is_some() && !apply;
    let result = if only_the_new_group {
        None
    } else {
        Some(
            users::bulk(
                State(state.clone()),
                caller(),
                Path(org_id.clone()),
                JsonBody(request(&form, &change, add_groups, !apply).map_err(fail)?),
            )
            .await
            .map_err(|e| fail(e.into()))?
            .0,
        )
    };
    let (users_n, changed, changes) = match result {
        Some(r) => (r.users, r.users_changed, r.changes),
        None => {
            // Each member named joins the new group.
            let n = named.unwrap_or(0);
            let mut changes = BTreeMap::new();
            if n > 0 {
                let _ = changes.insert("member_added".to_owned(), n);
            }
            (n, n, changes)
        }
    };
    let whom = if form.get("scope") == Some("all") {
        format!("every member matching the filter ({})", filter_words(&form))
    } else {
        let n = form.all("user_ids").len();
        format!("the {n} selected member{}", if n == 1 { "" } else { "s" })
    };
    let mut fields: Vec<(String, String)> = Vec::new();
    for k in ["scope", "change", "group_id", "limit"]
        .iter()
        .chain(FILTERS.iter())
    {
        if let Some(v) = form.get(k) {
            fields.push(((*k).to_owned(), v.to_owned()));
        }
    }
    for id in form.all("user_ids") {
        fields.push(("user_ids".into(), id));
    }
    Ok(render(&BulkPage {
        layout: Layout {
            title: if apply {
                "Changed".into()
            } else {
                "Review the change".into()
            },
            ..layout.clone()
        },
        review: !apply,
        what: change.what,
        whom,
        users: users_n,
        users_changed: changed,
        changes: changes
            .into_iter()
            .map(|(k, n)| (k.replace('_', " "), n))
            .collect(),
        creates,
        every_match: form.get("scope") == Some("all"),
        fields,
        action: format!("/console/orgs/{}/bulk", seg(&org_id)),
        back,
    }))
}
