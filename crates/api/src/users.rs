//! Members: add, list (sort, filter, paginate), detail with history,
//! change, remove, and one change to many at once.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tally_core::entity::{BULK_USERS_MAX, Command, UserStatus};
use tally_core::ids::{GroupId, OrgId, UserId};
use tally_core::ratio::parse_fraction_bps;
use tally_core::time::Month;
use tally_engine::random_id;
use tally_store::query::{UserFilter, UserListQuery, UserRow, UserSort};

use crate::cursor::{self, UserCursor};
use crate::dto::{
    History, HistoryParams, ListJson, UserJson, history, one_with_held, present, with_held,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, Params};
use crate::snapshot::{Next, SNAPSHOT_LEN_MAX, SNAPSHOT_PAGES};
use crate::{AppState, org_access, page_len};

fn user_id(s: &str) -> ApiResult<UserId> {
    UserId::new(s).map_err(|e| ApiError::invalid(e.to_string()))
}

fn group_ids(v: &[String]) -> ApiResult<Vec<GroupId>> {
    v.iter()
        .map(|g| GroupId::new(g).map_err(|e| ApiError::invalid(e.to_string())))
        .collect()
}

fn status(s: &str) -> ApiResult<UserStatus> {
    UserStatus::parse(s).ok_or_else(|| {
        ApiError::invalid(format!(
            "status {s:?} is not one of invited, active, suspended, removed"
        ))
    })
}

async fn user_json(state: &AppState, org_id: &OrgId, user: &UserId) -> ApiResult<UserJson> {
    let month = Month::from_unix_ms(state.engine.now_ms());
    let row = state
        .engine
        .db
        .user(org_id, user, month)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {:?} does not exist", user.as_str())))?;
    one_with_held(&state.engine, org_id, row.into()).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"id": "alice", "email": "alice@acme.example", "name": "Alice", "status": "active"})))]
pub(crate) struct AddUser {
    /// The member's id (letters, digits, `.`, `_`, `-`); default: generated.
    id: Option<String>,
    /// Their email address.
    email: String,
    /// Their display name.
    name: String,
    /// Absent: the org's default; `null`: unlimited.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    monthly_limit_micros: Option<Option<i64>>,
    /// `invited` (default) or `active`.
    status: Option<String>,
}

#[utoipa::path(post, path = "/v1/orgs/{org}/users", operation_id = "users_add", tag = "users", params(("org" = String, Path, description = "org id")), request_body = AddUser, security(("bearer" = ["operator", "admin"])), responses((status = 201, description = "created", body = UserJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn add(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<AddUser>,
) -> ApiResult<(StatusCode, Json<UserJson>)> {
    let org_id = org_access(&state, &caller, &org)?;
    let id = match req.id {
        Some(id) => user_id(&id)?,
        None => user_id(&random_id("u_")?)?,
    };
    let activate = match req.status.as_deref().map(status).transpose()? {
        None | Some(UserStatus::Invited) => false,
        Some(UserStatus::Active) => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "a new user's status is invited or active",
            ));
        }
    };
    let cmd = Command::AddUser {
        user_id: id.clone(),
        email: req.email,
        name: req.name,
        monthly_limit_micros: req.monthly_limit_micros,
        activate,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(user_json(&state, &org_id, &id).await?),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// name (default), email, spend, limit, utilization or last_active;
    /// prefix `-` for descending.
    pub(crate) sort: Option<String>,
    /// invited, active, suspended or removed; absent: all but removed.
    pub(crate) status: Option<String>,
    /// Members of this group only.
    pub(crate) group: Option<String>,
    /// Case-insensitive substring of id, name or email.
    pub(crate) q: Option<String>,
    /// Users at or above this fraction of their limit, e.g. `0.8`.
    pub(crate) min_utilization: Option<String>,
    /// Only users cut off (`true`) or only those not cut off (`false`).
    pub(crate) cut_off: Option<bool>,
    /// `next_cursor` of the previous page. Sorted by spend, utilization or
    /// last_active, pages keep the first page's order (figures current).
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

/// The filters of the member list, as a bulk change takes them.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterJson {
    /// invited, active, suspended or removed; absent: all but removed.
    pub(crate) status: Option<String>,
    /// Members of this group only.
    pub(crate) group: Option<String>,
    /// Case-insensitive substring of id, name or email.
    pub(crate) q: Option<String>,
    /// Members at or above this fraction of their limit, e.g. `"0.8"`.
    pub(crate) min_utilization: Option<String>,
    /// Only members cut off (`true`) or only those not cut off (`false`).
    pub(crate) cut_off: Option<bool>,
}

/// A member filter, checked.
pub(crate) fn user_filter(f: FilterJson) -> ApiResult<UserFilter> {
    if f.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
        return Err(ApiError::invalid("q is longer than 200 characters"));
    }
    Ok(UserFilter {
        status: f.status.as_deref().map(status).transpose()?,
        group: f
            .group
            .map(|g| {
                GroupId::new(&g)
                    .map(|g| g.to_string())
                    .map_err(|e| ApiError::invalid(e.to_string()))
            })
            .transpose()?,
        q: f.q.filter(|q| !q.is_empty()),
        min_utilization_bps: f
            .min_utilization
            .as_deref()
            .map(|s| {
                parse_fraction_bps(s)
                    .map_err(|e| ApiError::invalid(format!("min_utilization: {e}")))
            })
            .transpose()?,
        cut_off: f.cut_off,
    })
}

#[utoipa::path(get, path = "/v1/orgs/{org}/users", operation_id = "users_list", tag = "users", params(("org" = String, Path, description = "org id"), ListParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<UserJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<ListParams>,
) -> ApiResult<Json<ListJson<UserJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let sort_param = p.sort.as_deref().unwrap_or("name");
    let (descending, key) = match sort_param.strip_prefix('-') {
        Some(k) => (true, k),
        None => (false, sort_param),
    };
    let sort = UserSort::parse(key).ok_or_else(|| {
        ApiError::invalid(format!(
            "sort {sort_param:?} is not one of name, email, spend, limit, utilization, \
             last_active (prefix - for descending)"
        ))
    })?;
    let filter = user_filter(FilterJson {
        status: p.status,
        group: p.group,
        q: p.q,
        min_utilization: p.min_utilization,
        cut_off: p.cut_off,
    })?;
    let from = p
        .cursor
        .as_deref()
        .map(|c| cursor::decode_user(sort, c))
        .transpose()?;
    state.engine.meter.flush_for_read().await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    // A snapshot serves only the listing it was taken of.
    let listing = format!("{org_id}\u{1f}{sort_param}\u{1f}{month}\u{1f}{filter:?}");
    let mut query = UserListQuery {
        sort,
        descending,
        filter,
        after: None,
        limit: page_len(p.limit)?,
        month,
    };
    let db = &state.engine.db;
    if sort.is_live() {
        let page = match &from {
            None => {
                let depth = query
                    .limit
                    .saturating_mul(SNAPSHOT_PAGES)
                    .min(SNAPSHOT_LEN_MAX);
                // From the meter's memory where this process meters the org.
                let keys = match state.engine.live_user_keys(&org_id, &query, depth).await? {
                    Some(keys) => keys,
                    None => db.list_user_keys(&org_id, &query, depth).await?,
                };
                let cut = keys.len() >= depth as usize;
                let len = query.limit as usize;
                Some(if keys.len() > len {
                    let page = keys[..len].to_vec();
                    let id = state.snapshots.keep(listing, keys, cut);
                    (
                        page,
                        Next::Snapshot {
                            id,
                            offset: len as u64,
                        },
                    )
                } else {
                    (keys, if cut { Next::After } else { Next::End })
                })
            }
            Some(UserCursor {
                snapshot: Some((id, offset)),
                ..
            }) => state
                .snapshots
                .page(*id, &listing, *offset, query.limit as usize),
            // Gone (expired, or taken by another process): keyset paging
            // from the cursor's last row.
            Some(UserCursor { snapshot: None, .. }) => None,
        };
        if let Some((keys, next)) = page {
            let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
            let rows = db.users_by_ids(&org_id, &ids, month).await?;
            let snapshot = match next {
                Next::Snapshot { id, offset } => Some(Some((id, offset))),
                Next::After => Some(None),
                Next::End => None,
            };
            let next_cursor = snapshot.zip(keys.last()).map(|(snapshot, last)| {
                cursor::encode_user(
                    sort,
                    &UserCursor {
                        after: last.clone(),
                        snapshot,
                    },
                )
            });
            // Order and membership are the snapshot's, figures current;
            // a user whose status no longer matches drops out.
            let keep = |u: &UserRow| match query.filter.status {
                Some(s) => u.status == s.as_str(),
                None => u.status != UserStatus::Removed.as_str(),
            };
            return Ok(Json(ListJson {
                items: with_held(
                    &state.engine,
                    &org_id,
                    rows.into_iter().filter(keep).map(UserJson::from).collect(),
                )
                .await?,
                next_cursor,
            }));
        }
    }
    query.after = from.map(|c| c.after);
    let (rows, next) = db.list_users(&org_id, &query).await?;
    Ok(Json(ListJson {
        items: with_held(
            &state.engine,
            &org_id,
            rows.into_iter().map(UserJson::from).collect(),
        )
        .await?,
        next_cursor: next.map(|c| {
            cursor::encode_user(
                sort,
                &UserCursor {
                    after: c,
                    snapshot: None,
                },
            )
        }),
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UserDetail {
    #[serde(flatten)]
    pub(crate) user: UserJson,
    pub(crate) history: History,
}

#[utoipa::path(get, path = "/v1/orgs/{org}/users/{user}", operation_id = "users_get", tag = "users", params(("org" = String, Path, description = "org id"), ("user" = String, Path, description = "user id"), HistoryParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = UserDetail), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, user)): Path<(String, String)>,
    Params(p): Params<HistoryParams>,
) -> ApiResult<Json<UserDetail>> {
    let org_id = org_access(&state, &caller, &org)?;
    let user_id = user_id(&user)?;
    state.engine.meter.flush_for_read().await?;
    let user = user_json(&state, &org_id, &user_id).await?;
    let history = history(&state.engine, &org_id, "user", &user_id, &p).await?;
    Ok(Json(UserDetail { user, history }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"monthly_limit_micros": 100_000_000})))]
pub(crate) struct PatchUser {
    /// A new email address.
    pub(crate) email: Option<String>,
    /// A new display name.
    pub(crate) name: Option<String>,
    /// `null`: unlimited.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub(crate) monthly_limit_micros: Option<Option<i64>>,
    /// `active` or `suspended`.
    pub(crate) status: Option<String>,
}

#[utoipa::path(patch, path = "/v1/orgs/{org}/users/{user}", operation_id = "users_patch", tag = "users", params(("org" = String, Path, description = "org id"), ("user" = String, Path, description = "user id")), request_body = PatchUser, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = UserJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, user)): Path<(String, String)>,
    JsonBody(req): JsonBody<PatchUser>,
) -> ApiResult<Json<UserJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let user_id = user_id(&user)?;
    let cmd = Command::UpdateUser {
        user_id: user_id.clone(),
        email: req.email,
        name: req.name,
        monthly_limit_micros: req.monthly_limit_micros,
        status: req.status.as_deref().map(status).transpose()?,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    state.engine.meter.flush_for_read().await?;
    Ok(Json(user_json(&state, &org_id, &user_id).await?))
}

/// Removes a member: the status becomes `removed`, memberships end, the
/// history stays.
#[utoipa::path(delete, path = "/v1/orgs/{org}/users/{user}", operation_id = "users_remove", tag = "users", params(("org" = String, Path, description = "org id"), ("user" = String, Path, description = "user id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = UserJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, user)): Path<(String, String)>,
) -> ApiResult<Json<UserJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let user_id = user_id(&user)?;
    let cmd = Command::UpdateUser {
        user_id: user_id.clone(),
        email: None,
        name: None,
        monthly_limit_micros: None,
        status: Some(UserStatus::Removed),
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok(Json(user_json(&state, &org_id, &user_id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"user_ids": ["alice"], "add_groups": [], "monthly_limit_micros": 75_000_000})))]
pub(crate) struct Bulk {
    /// The members to change (at most 10 000), all or nothing; or `filter`.
    pub(crate) user_ids: Option<Vec<String>>,
    /// Every member the list's filters match (at most 10 000), instead of
    /// `user_ids`: what `GET …/users` with the same filters lists.
    pub(crate) filter: Option<FilterJson>,
    /// Groups to add them to.
    #[serde(default)]
    pub(crate) add_groups: Vec<String>,
    /// Groups to remove them from.
    #[serde(default)]
    pub(crate) remove_groups: Vec<String>,
    /// A monthly limit for each, in micro-USD; `null`: unlimited; absent: unchanged.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub(crate) monthly_limit_micros: Option<Option<i64>>,
    /// Each member's limit back to the org's default monthly limit (instead
    /// of `monthly_limit_micros`).
    #[serde(default)]
    pub(crate) reset_limit: bool,
    /// `active` or `suspended`; absent: unchanged.
    pub(crate) status: Option<String>,
    /// What would change, and nothing written: the same answer, judged on
    /// the org as it is now.
    #[serde(default)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct BulkResult {
    /// Users named in the request, or matched by its filter.
    pub(crate) users: usize,
    /// Users that actually changed.
    pub(crate) users_changed: usize,
    /// Events written (or, in a dry run, that would be), by kind
    /// (member_added, user_limit_set, …).
    pub(crate) changes: BTreeMap<String, usize>,
    /// Whether this was a dry run: nothing was written.
    pub(crate) dry_run: bool,
}

/// The ids of every member `filter` matches, when they are at most
/// [`BULK_USERS_MAX`].
pub(crate) async fn matching(
    state: &AppState,
    org_id: &OrgId,
    filter: UserFilter,
) -> ApiResult<Vec<UserId>> {
    state.engine.meter.flush_for_read().await?;
    let query = UserListQuery {
        sort: UserSort::Name,
        descending: false,
        filter,
        after: None,
        limit: 1,
        month: Month::from_unix_ms(state.engine.now_ms()),
    };
    let max = u32::try_from(BULK_USERS_MAX + 1).unwrap_or(u32::MAX);
    let keys = state.engine.db.list_user_keys(org_id, &query, max).await?;
    within_bulk_cap(keys.len())?;
    keys.iter().map(|k| user_id(&k.id)).collect()
}

/// A filter's matches are one bulk change only up to [`BULK_USERS_MAX`].
fn within_bulk_cap(matched: usize) -> ApiResult<()> {
    if matched > BULK_USERS_MAX {
        return Err(ApiError::rule(format!(
            "the filter matches more than {BULK_USERS_MAX} members, the most one bulk change \
             takes: narrow it"
        )));
    }
    Ok(())
}

/// One change to many users, all or nothing.
#[utoipa::path(post, path = "/v1/orgs/{org}/users/bulk", operation_id = "users_bulk", tag = "users", params(("org" = String, Path, description = "org id")), request_body = Bulk, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = BulkResult), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn bulk(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<Bulk>,
) -> ApiResult<Json<BulkResult>> {
    let org_id = org_access(&state, &caller, &org)?;
    if req.reset_limit && req.monthly_limit_micros.is_some() {
        return Err(ApiError::invalid(
            "give monthly_limit_micros or reset_limit, not both",
        ));
    }
    let user_ids: Vec<UserId> = match (req.user_ids, req.filter) {
        (Some(ids), None) => ids.iter().map(|u| user_id(u)).collect::<ApiResult<_>>()?,
        (None, Some(filter)) => matching(&state, &org_id, user_filter(filter)?).await?,
        _ => {
            return Err(ApiError::invalid("give user_ids or filter (exactly one)"));
        }
    };
    let users = user_ids.len();
    if users == 0 {
        // A filter that matches nobody: nothing to change (an empty
        // `user_ids` is refused by the command).
        return Ok(Json(BulkResult {
            users,
            users_changed: 0,
            changes: BTreeMap::new(),
            dry_run: req.dry_run,
        }));
    }
    let cmd = Command::BulkUpdateUsers {
        user_ids,
        add_groups: group_ids(&req.add_groups)?,
        remove_groups: group_ids(&req.remove_groups)?,
        monthly_limit_micros: req.monthly_limit_micros,
        reset_limit: req.reset_limit,
        status: req.status.as_deref().map(status).transpose()?,
    };
    let kinds = if req.dry_run {
        state.engine.commands.preview(&org_id, &cmd)?
    } else {
        state
            .engine
            .commands
            .execute(&org_id, caller.actor(), &cmd)
            .await?
            .into_iter()
            .map(|e| e.kind)
            .collect()
    };
    let mut changes = BTreeMap::new();
    let mut changed = std::collections::HashSet::new();
    for kind in &kinds {
        *changes.entry(kind.name().to_owned()).or_default() += 1;
        if let Some(u) = kind.user_id() {
            let _ = changed.insert(u.clone());
        }
    }
    Ok(Json(BulkResult {
        users,
        users_changed: changed.len(),
        changes,
        dry_run: req.dry_run,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_takes_at_most_a_bulk_changes_worth_of_members() {
        assert!(within_bulk_cap(0).is_ok());
        assert!(within_bulk_cap(BULK_USERS_MAX).is_ok());
        let refused = within_bulk_cap(BULK_USERS_MAX + 1).unwrap_err();
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(refused.message.contains("narrow it"), "{refused:?}");
    }
}
