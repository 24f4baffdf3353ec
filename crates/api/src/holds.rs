//! Holds: the live ones of an org, and release for a call that failed or
//! was cancelled (authorize places them, usage settles them).

use axum::Json;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::json;
use tally_core::ids::{UserId, check_request_id};

use crate::cursor;
use crate::dto::{ListJson, time};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, Params};
use crate::{AppState, org_access, page_len};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct HoldRowJson {
    /// The call's request id.
    request_id: String,
    /// The member the call is for.
    user_id: String,
    /// The key the call was authorized for.
    api_key_id: String,
    /// The groups it is held on (the user's and the key's when placed).
    group_ids: Vec<String>,
    /// Held on the user, the key, each group and the org alike.
    held_micros: i64,
    /// When authorize placed it.
    placed_at: String,
    /// When it lapses if no usage settles it.
    expires_at: String,
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoldListParams {
    /// One member's holds only.
    pub(crate) user: Option<String>,
    /// `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

/// The org's live holds, by request id.
#[utoipa::path(get, path = "/v1/orgs/{org}/holds", operation_id = "holds_list", tag = "holds", params(("org" = String, Path, description = "org id"), HoldListParams), security(("bearer" = ["operator", "admin", "viewer", "gateway"])), responses((status = 200, description = "ok", body = ListJson<HoldRowJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org", body = crate::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    Path(org): Path<String>,
    Params(p): Params<HoldListParams>,
) -> ApiResult<axum::response::Response> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)? as usize;
    let after = cursor::after_id("holds", p.cursor.as_deref())?;
    let user = p
        .user
        .as_deref()
        .map(|u| UserId::new(u).map_err(|e| ApiError::invalid(e.to_string())))
        .transpose()?;
    let rows = match state.engine.live_holds(
        &org_id,
        user.as_ref().map(UserId::as_str),
        after.as_deref(),
        limit + 1,
    ) {
        Err(e @ tally_engine::Error::NotOwner { partition, .. }) => {
            let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
            return crate::forward::to_owner(&state, &headers, "GET", path, None, partition, e)
                .await;
        }
        r => r?,
    };
    let items = rows
        .into_iter()
        .map(|h| HoldRowJson {
            request_id: h.request_id,
            user_id: h.user_id,
            api_key_id: h.key_id,
            group_ids: h.group_ids,
            held_micros: h.amount_micros,
            placed_at: time(h.placed_at_ms),
            expires_at: time(h.expires_at_ms),
        })
        .collect();
    Ok(Json(cursor::page(items, limit, "holds", |h: &HoldRowJson| {
        json!(h.request_id)
    }))
    .into_response())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ReleasedJson {
    /// The call's request id.
    request_id: String,
    /// What the release found: `released` (a live hold, freed now),
    /// `settled` (its usage was counted), `expired`, or `unknown`.
    found: &'static str,
    /// What was freed (0 unless `released`).
    released_micros: i64,
}

/// Frees a hold at once, for a call that failed or was cancelled.
/// Idempotent: a hold that is not live answers 200 with what was found.
#[utoipa::path(delete, path = "/v1/orgs/{org}/holds/{request_id}", operation_id = "holds_release", tag = "holds", params(("org" = String, Path, description = "org id"), ("request_id" = String, Path, description = "the call's request id")), security(("bearer" = ["operator", "admin", "gateway"])), responses((status = 200, description = "ok", body = ReleasedJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org", body = crate::error::ErrorBody), (status = 503, description = "holds are unavailable (distributed mode) or the journal cannot be written", body = crate::error::ErrorBody)))]
pub(crate) async fn release(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    Path((org, request_id)): Path<(String, String)>,
) -> ApiResult<axum::response::Response> {
    let org_id = org_access(&state, &caller, &org)?;
    check_request_id(&request_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let found = match state.engine.release(&org_id, &request_id).await {
        Err(e @ tally_engine::Error::NotOwner { partition, .. }) => {
            let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
            return crate::forward::to_owner(&state, &headers, "DELETE", path, None, partition, e)
                .await;
        }
        r => r?,
    };
    let released_micros = match found {
        tally_engine::holds::ReleaseFound::Released { held_micros } => held_micros,
        _ => 0,
    };
    Ok(Json(ReleasedJson {
        request_id,
        found: found.as_str(),
        released_micros,
    })
    .into_response())
}
