//! Groups: create, list, detail with history and members, change, delete,
//! and membership.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::entity::Command;
use tally_core::ids::{GroupId, OrgId, UserId};
use tally_core::time::Month;
use tally_engine::random_id;

use crate::cursor::{self, PageParams};
use crate::dto::{
    GroupJson, History, HistoryParams, ListJson, UserJson, history, one_with_held, present,
    with_held,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, Params};
use crate::{AppState, org_access, page_len};
use tally_store::query::{UserFilter, UserListQuery, UserSort};

fn group_id(s: &str) -> ApiResult<GroupId> {
    GroupId::new(s).map_err(|e| ApiError::invalid(e.to_string()))
}

async fn group_json(state: &AppState, org_id: &OrgId, group: &GroupId) -> ApiResult<GroupJson> {
    let month = Month::from_unix_ms(state.engine.now_ms());
    let rows = state
        .engine
        .db
        .list_groups(org_id, month, None, Some(group), 1)
        .await?;
    let group = rows
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("group {:?} does not exist", group.as_str())))?;
    one_with_held(&state.engine, org_id, GroupJson::from(group)).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateGroup {
    /// The group's id; default: generated.
    pub(crate) id: Option<String>,
    /// Its display name.
    pub(crate) name: String,
    /// Its monthly limit in micro-USD; absent or `null`: unlimited.
    #[serde(default)]
    pub(crate) monthly_limit_micros: Option<i64>,
}

#[utoipa::path(post, path = "/v1/orgs/{org}/groups", operation_id = "groups_create", tag = "groups", params(("org" = String, Path, description = "org id")), request_body = CreateGroup, security(("bearer" = ["operator", "admin"])), responses((status = 201, description = "created", body = GroupJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<CreateGroup>,
) -> ApiResult<(StatusCode, Json<GroupJson>)> {
    let org_id = org_access(&state, &caller, &org)?;
    let id = match req.id {
        Some(id) => group_id(&id)?,
        None => group_id(&random_id("g_")?)?,
    };
    let cmd = Command::CreateGroup {
        group_id: id.clone(),
        name: req.name,
        monthly_limit_micros: req.monthly_limit_micros,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(group_json(&state, &org_id, &id).await?),
    ))
}

#[utoipa::path(get, path = "/v1/orgs/{org}/groups", operation_id = "groups_list", tag = "groups", params(("org" = String, Path, description = "org id"), PageParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<GroupJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<GroupJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)?;
    let after = cursor::after_id("groups", p.cursor.as_deref())?;
    state.engine.meter.flush_for_read().await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let rows = state
        .engine
        .db
        .list_groups(&org_id, month, after.as_deref(), None, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    let items: Vec<GroupJson> = rows
        .into_iter()
        .take(limit as usize)
        .map(GroupJson::from)
        .collect();
    let items = with_held(&state.engine, &org_id, items).await?;
    let next_cursor = more
        .then(|| {
            items
                .last()
                .map(|g| cursor::encode_after("groups", &json!(g.id)))
        })
        .flatten();
    Ok(Json(ListJson { items, next_cursor }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GroupDetail {
    #[serde(flatten)]
    pub(crate) group: GroupJson,
    pub(crate) history: History,
    /// The members who spent most this month (at most 100), for the
    /// breakdown; the full list is `GET …/users?group=…`.
    pub(crate) members: Vec<UserJson>,
}

/// How many members a group's detail shows.
const MEMBERS_SHOWN: u32 = 100;

#[utoipa::path(get, path = "/v1/orgs/{org}/groups/{group}", operation_id = "groups_get", tag = "groups", params(("org" = String, Path, description = "org id"), ("group" = String, Path, description = "group id"), HistoryParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = GroupDetail), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, group)): Path<(String, String)>,
    Params(p): Params<HistoryParams>,
) -> ApiResult<Json<GroupDetail>> {
    let org_id = org_access(&state, &caller, &org)?;
    let group_id = group_id(&group)?;
    state.engine.meter.flush_for_read().await?;
    let group = group_json(&state, &org_id, &group_id).await?;
    let history = history(&state.engine, &org_id, "group", &group_id, &p).await?;
    let query = UserListQuery {
        sort: UserSort::Spend,
        descending: true,
        filter: UserFilter {
            group: Some(group_id.to_string()),
            ..UserFilter::default()
        },
        after: None,
        limit: MEMBERS_SHOWN,
        month: Month::from_unix_ms(state.engine.now_ms()),
    };
    let (members, _) = state.engine.db.list_users(&org_id, &query).await?;
    Ok(Json(GroupDetail {
        group,
        history,
        members: with_held(
            &state.engine,
            &org_id,
            members.into_iter().map(UserJson::from).collect(),
        )
        .await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchGroup {
    /// A new display name.
    pub(crate) name: Option<String>,
    /// A new monthly limit in micro-USD; `null`: unlimited.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub(crate) monthly_limit_micros: Option<Option<i64>>,
}

#[utoipa::path(patch, path = "/v1/orgs/{org}/groups/{group}", operation_id = "groups_patch", tag = "groups", params(("org" = String, Path, description = "org id"), ("group" = String, Path, description = "group id")), request_body = PatchGroup, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = GroupJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, group)): Path<(String, String)>,
    JsonBody(req): JsonBody<PatchGroup>,
) -> ApiResult<Json<GroupJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let group_id = group_id(&group)?;
    let cmd = Command::UpdateGroup {
        group_id: group_id.clone(),
        name: req.name,
        monthly_limit_micros: req.monthly_limit_micros,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    state.engine.meter.flush_for_read().await?;
    Ok(Json(group_json(&state, &org_id, &group_id).await?))
}

#[utoipa::path(delete, path = "/v1/orgs/{org}/groups/{group}", operation_id = "groups_delete", tag = "groups", params(("org" = String, Path, description = "org id"), ("group" = String, Path, description = "group id")), security(("bearer" = ["operator", "admin"])), responses((status = 204, description = "deleted"), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, group)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let org_id = org_access(&state, &caller, &org)?;
    let cmd = Command::DeleteGroup {
        group_id: group_id(&group)?,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn membership(
    state: AppState,
    caller: Caller,
    (org, group, user): (String, String, String),
    add: bool,
) -> ApiResult<Json<GroupJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let group_id = group_id(&group)?;
    let user_id = UserId::new(&user).map_err(|e| ApiError::invalid(e.to_string()))?;
    let cmd = if add {
        Command::AddMember {
            group_id: group_id.clone(),
            user_id,
        }
    } else {
        Command::RemoveMember {
            group_id: group_id.clone(),
            user_id,
        }
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok(Json(group_json(&state, &org_id, &group_id).await?))
}

/// Idempotent: adding a member twice changes nothing.
#[utoipa::path(put, path = "/v1/orgs/{org}/groups/{group}/members/{user}", operation_id = "groups_add_member", tag = "groups", params(("org" = String, Path, description = "org id"), ("group" = String, Path, description = "group id"), ("user" = String, Path, description = "user id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = GroupJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(path): Path<(String, String, String)>,
) -> ApiResult<Json<GroupJson>> {
    membership(state, caller, path, true).await
}

#[utoipa::path(delete, path = "/v1/orgs/{org}/groups/{group}/members/{user}", operation_id = "groups_remove_member", tag = "groups", params(("org" = String, Path, description = "org id"), ("group" = String, Path, description = "group id"), ("user" = String, Path, description = "user id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = GroupJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(path): Path<(String, String, String)>,
) -> ApiResult<Json<GroupJson>> {
    membership(state, caller, path, false).await
}
