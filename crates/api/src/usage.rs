//! The gateway-facing endpoints: usage ingest and authorize.

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tally_core::authorize::HoldRequest;
use tally_core::holds::HOLD_TTL_MIN_MS;
use tally_core::ids::check_request_id;
use tally_core::money::COST_MICROS_MAX;
use tally_engine::Principal;
use tally_engine::meter::Rejected;
use tally_proto::usage_from_json;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"events": [{"request_id": "req-1", "org_id": "acme", "user_id": "alice", "api_key_id": "alice-laptop", "model": "gpt-4o", "provider": "openai", "input_tokens": 1200, "output_tokens": 300, "cost_micros": 45_000_000, "occurred_at": "2026-12-07T10:00:00Z"}]})))]
pub(crate) struct IngestRequest {
    /// Usage events, one per API call (at most the configured batch length).
    #[schema(value_type = Vec<Object>)]
    events: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct RejectedJson {
    /// The event's index in the request.
    index: usize,
    /// Why, as a code (`missing_field`, `unknown_org`, …).
    code: &'static str,
    /// Why, in words.
    message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct IngestResponse {
    /// Events counted now.
    accepted: u32,
    /// Events already counted (same org and request id).
    duplicates: u32,
    /// Events refused, by index, with the reason.
    rejected: Vec<RejectedJson>,
}

/// Counts a batch of usage events. Each event stands alone: bad ones are
/// rejected by index with a reason, the good ones are counted, duplicates
/// (same org and request id within the window) are counted once. Answers
/// after the counted events are durable.
#[utoipa::path(post, path = "/v1/usage", operation_id = "usage_ingest", tag = "usage", request_body = IngestRequest, security(("bearer" = ["operator", "admin", "gateway"])), responses((status = 200, description = "ok", body = IngestResponse), (status = 413, description = "too many events or too large", body = crate::error::ErrorBody), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
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
#[schema(examples(json!({"api_key": "tly_sk_…", "feature": "chat", "request_id": "req-1", "reserve_micros": 2_000_000})))]
pub(crate) struct AuthorizeRequest {
    /// The key's secret (`tly_sk_…`), as the caller presented it.
    api_key: String,
    /// The feature the call uses (`chat`, …); refused unless the key has it or `all`.
    feature: Option<String>,
    /// The caller, for keys that belong to groups only.
    user_id: Option<String>,
    /// The id the call's usage event will carry: its hold is settled by it.
    request_id: Option<String>,
    /// The call's estimated cost: with it, the call is admitted only if
    /// committed + held + this fits every limit it counts against, and then
    /// this much is held on all of them until the usage, a release or the
    /// TTL. Needs `request_id`.
    reserve_micros: Option<i64>,
    /// How long the hold lives unsettled (default 10 minutes, at most an
    /// hour, at least a second).
    hold_ttl_ms: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct HoldJson {
    /// The call's request id: its usage settles the hold.
    request_id: String,
    /// What it holds, in micro-USD, on the user, key, groups and org alike.
    held_micros: i64,
    /// When the hold lapses if no usage settles it.
    expires_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AuthorizeResponse {
    /// Whether the call may go ahead.
    allowed: bool,
    /// `ok`, or the refusal: `unknown_key`, `key_revoked`, `key_expired`, `feature_not_allowed`, `user_suspended`, `user_monthly_limit`, …
    reason: &'static str,
    /// Why, in words (names the limit that refused).
    message: String,
    /// The key's org.
    org_id: Option<String>,
    /// The user the decision judged, refusals included (null only when
    /// there is none: a group key called without `user_id`).
    user_id: Option<String>,
    /// The key the secret belongs to (null: unknown secret).
    api_key_id: Option<String>,
    /// The user's groups and the key's groups: every one's limit gates the
    /// call.
    group_ids: Vec<String>,
    /// The key's features.
    features: Vec<String>,
    /// The least budget left among the limits that apply, live holds
    /// counted as spent.
    remaining_micros: Option<i64>,
    /// The largest reserve that would be admitted now: on a refusal for
    /// budget, ask again with at most this much (a smaller `max_tokens`).
    affordable_micros: Option<i64>,
    /// The hold placed (or the live one a repeat names).
    hold: Option<HoldJson>,
}

/// The gateway's question before each call (a gateway token: of every org,
/// or bound to the key's org; or the operator token). With
/// `reserve_micros`, admits the call only if its estimated cost fits every
/// limit it counts against, and holds that much until its usage arrives.
#[utoipa::path(post, path = "/v1/authorize", operation_id = "usage_authorize", tag = "usage", request_body = AuthorizeRequest, security(("bearer" = ["operator", "gateway"])), responses((status = 200, description = "ok", body = AuthorizeResponse), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 409, description = "request_id holds a different reserve, or its usage was counted already", body = crate::error::ErrorBody), (status = 503, description = "holds are unavailable (distributed mode) or the hold journal cannot be written", body = crate::error::ErrorBody)))]
pub(crate) async fn authorize(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    JsonBody(req): JsonBody<AuthorizeRequest>,
) -> ApiResult<axum::response::Response> {
    if req.api_key.is_empty() || req.api_key.len() > 256 {
        return Err(ApiError::invalid("api_key must have 1 to 256 characters"));
    }
    // A gateway token bound to an org knows that org's keys only: any
    // other key is unknown to it (and no hold is placed).
    let bound_elsewhere = caller.0.org().is_some_and(|own| {
        let hash = tally_core::secret::hash_secret(&req.api_key);
        state
            .engine
            .registry
            .org_of_secret(&hash)
            .is_none_or(|(org, _)| org != *own)
    });
    if let Some(id) = &req.request_id {
        check_request_id(id).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let hold = match (req.reserve_micros, &req.request_id) {
        (None, _) => {
            if req.hold_ttl_ms.is_some() {
                return Err(ApiError::invalid("hold_ttl_ms needs reserve_micros"));
            }
            None
        }
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "reserve_micros needs request_id: the id the call's usage event will carry",
            ));
        }
        (Some(micros), Some(id)) => {
            if !(0..=COST_MICROS_MAX).contains(&micros) {
                return Err(ApiError::invalid(format!(
                    "reserve_micros must be between 0 and {COST_MICROS_MAX}, got {micros}"
                )));
            }
            let o = state.engine.hold_options();
            let ttl = req.hold_ttl_ms.unwrap_or(o.ttl_default_ms);
            if !(HOLD_TTL_MIN_MS..=o.ttl_max_ms).contains(&ttl) {
                return Err(ApiError::invalid(format!(
                    "hold_ttl_ms must be between {HOLD_TTL_MIN_MS} and {}, got {ttl}",
                    o.ttl_max_ms
                )));
            }
            Some(HoldRequest {
                request_id: id,
                reserve_micros: micros,
                ttl_ms: ttl,
            })
        }
    };
    let (feature, user) = (req.feature.as_deref(), req.user_id.as_deref());
    let (org_id, d, placed) = match hold {
        _ if bound_elsewhere => (None, tally_core::authorize::Decision::unknown_key(), None),
        None => {
            let (org_id, d) = state.engine.authorize(&req.api_key, feature, user);
            (org_id, d, None)
        }
        Some(h) => match state.engine.reserve(&req.api_key, feature, user, h).await {
            Err(e @ tally_engine::Error::NotOwner { partition, .. }) => {
                let body = serde_json::json!({
                    "api_key": req.api_key, "feature": req.feature, "user_id": req.user_id,
                    "request_id": req.request_id, "reserve_micros": req.reserve_micros,
                    "hold_ttl_ms": req.hold_ttl_ms,
                });
                return crate::forward::to_owner(
                    &state,
                    &headers,
                    "POST",
                    "/v1/authorize",
                    Some(body),
                    partition,
                    e,
                )
                .await;
            }
            r => r?,
        },
    };
    Ok(Json(AuthorizeResponse {
        allowed: d.allowed,
        reason: d.reason.as_str(),
        message: d.message,
        org_id: org_id.map(|o| o.to_string()),
        user_id: d.user_id.map(|u| u.to_string()),
        api_key_id: d.api_key_id.map(|k| k.to_string()),
        group_ids: d.group_ids.iter().map(ToString::to_string).collect(),
        features: d.features,
        remaining_micros: d.remaining_micros,
        affordable_micros: d.affordable_micros,
        hold: placed.zip(req.request_id).map(|(p, request_id)| HoldJson {
            request_id,
            held_micros: p.held_micros,
            expires_at: crate::dto::time(p.expires_at_ms),
        }),
    })
    .into_response())
}
