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

use crate::cursor;
use crate::dto::{GroupJson, History, ListJson, present};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, Params};
use crate::{AppState, org_access, page_len};

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
    rows.into_iter()
        .next()
        .map(GroupJson::from)
        .ok_or_else(|| ApiError::not_found(format!("group {:?} does not exist", group.as_str())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateGroup {
    id: Option<String>,
    name: String,
    #[serde(default)]
    monthly_limit_micros: Option<i64>,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageParams {
    cursor: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<GroupJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)?;
    let after = match &p.cursor {
        Some(c) => Some(
            cursor::decode_after("groups", c)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| ApiError::invalid("cursor is malformed"))?,
        ),
        None => None,
    };
    state.engine.meter.flush().await?;
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
    let next_cursor = more
        .then(|| {
            items
                .last()
                .map(|g| cursor::encode_after("groups", &json!(g.id)))
        })
        .flatten();
    Ok(Json(ListJson { items, next_cursor }))
}

#[derive(Debug, Serialize)]
pub(crate) struct GroupDetail {
    #[serde(flatten)]
    group: GroupJson,
    history: History,
}

pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, group)): Path<(String, String)>,
) -> ApiResult<Json<GroupDetail>> {
    let org_id = org_access(&state, &caller, &org)?;
    let group_id = group_id(&group)?;
    state.engine.meter.flush().await?;
    let group = group_json(&state, &org_id, &group_id).await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let (months, days) = state
        .engine
        .db
        .history(&org_id, "group", &group_id, month)
        .await?;
    Ok(Json(GroupDetail {
        group,
        history: History::new(months, days),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchGroup {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    monthly_limit_micros: Option<Option<i64>>,
}

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
    state.engine.meter.flush().await?;
    Ok(Json(group_json(&state, &org_id, &group_id).await?))
}

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
pub(crate) async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(path): Path<(String, String, String)>,
) -> ApiResult<Json<GroupJson>> {
    membership(state, caller, path, true).await
}

pub(crate) async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(path): Path<(String, String, String)>,
) -> ApiResult<Json<GroupJson>> {
    membership(state, caller, path, false).await
}
