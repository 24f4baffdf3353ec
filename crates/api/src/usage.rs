//! The gateway-facing endpoints: usage ingest and authorize.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use tally_engine::Principal;
use tally_engine::meter::Rejected;
use tally_proto::usage_from_json;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IngestRequest {
    #[schema(value_type = Vec<Object>)]
    events: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct RejectedJson {
    index: usize,
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct IngestResponse {
    accepted: u32,
    duplicates: u32,
    rejected: Vec<RejectedJson>,
}

/// Counts a batch of usage events. Each event stands alone: bad ones are
/// rejected by index with a reason, the good ones are counted, duplicates
/// (same org and request id within the window) are counted once. Answers
/// after the counted events are durable.
#[utoipa::path(post, path = "/v1/usage", tag = "usage", request_body = IngestRequest, responses((status = 200, body = IngestResponse), (status = 413, description = "too many events or too large", body = crate::error::ErrorBody), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn ingest(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<IngestRequest>,
) -> ApiResult<Json<IngestResponse>> {
    let max = state.limits.usage_batch_len_max;
    if req.events.len() > max {
        return Err(ApiError::too_large(format!(
            "a batch holds at most {max} events, got {}; split it",
            req.events.len()
        )));
    }
    let mut rejected = Vec::new();
    let mut valid = Vec::with_capacity(req.events.len());
    for (index, v) in req.events.iter().enumerate() {
        match usage_from_json(v) {
            Ok(ev) => match &caller.0 {
                Principal::Org { org_id, .. } if *org_id != ev.org_id => rejected.push(Rejected {
                    index,
                    code: "forbidden_org",
                    message: "an org token may only report its own org's usage".into(),
                }),
                _ => valid.push((index, ev)),
            },
            Err(e) => rejected.push(Rejected {
                index,
                code: e.code(),
                message: e.to_string(),
            }),
        }
    }
    let report = state.engine.ingest(valid).await?;
    rejected.extend(report.rejected);
    rejected.sort_by_key(|r| r.index);
    Ok(Json(IngestResponse {
        accepted: report.accepted,
        duplicates: report.duplicates,
        rejected: rejected
            .into_iter()
            .map(|r| RejectedJson {
                index: r.index,
                code: r.code,
                message: r.message,
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthorizeRequest {
    api_key: String,
    feature: Option<String>,
    /// The caller, for keys that belong to groups only.
    user_id: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AuthorizeResponse {
    allowed: bool,
    reason: &'static str,
    message: String,
    org_id: Option<String>,
    /// The user the decision judged, refusals included (null only when
    /// there is none: a group key called without `user_id`).
    user_id: Option<String>,
    /// The user's groups and the key's groups: every one's limit gates the
    /// call.
    group_ids: Vec<String>,
    features: Vec<String>,
    /// The least budget left among the limits that apply.
    remaining_micros: Option<i64>,
}

/// The gateway's question before each call (operator token).
#[utoipa::path(post, path = "/v1/authorize", tag = "usage", request_body = AuthorizeRequest, responses((status = 200, body = AuthorizeResponse), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn authorize(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<AuthorizeRequest>,
) -> ApiResult<Json<AuthorizeResponse>> {
    caller.require_operator()?;
    if req.api_key.is_empty() || req.api_key.len() > 256 {
        return Err(ApiError::invalid("api_key must have 1 to 256 characters"));
    }
    let (org_id, d) =
        state
            .engine
            .authorize(&req.api_key, req.feature.as_deref(), req.user_id.as_deref());
    Ok(Json(AuthorizeResponse {
        allowed: d.allowed,
        reason: d.reason.as_str(),
        message: d.message,
        org_id: org_id.map(|o| o.to_string()),
        user_id: d.user_id.map(|u| u.to_string()),
        group_ids: d.group_ids.iter().map(ToString::to_string).collect(),
        features: d.features,
        remaining_micros: d.remaining_micros,
    }))
}
