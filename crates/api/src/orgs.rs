//! Orgs, their audit trail and enforcement history.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::entity::{Command, EntityEvent};
use tally_core::ids::OrgId;
use tally_core::time::Month;
use tally_engine::random_id;
use tally_proto::format_rfc3339_ms;

use crate::cursor::{self, PageParams};
use crate::dto::{
    EventJson, Fraction, History, ListJson, OrgJson, fractions_to_bps, one_with_held, present,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, NoParams, Params};
use crate::{AppState, org_access, page_len};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateOrg {
    id: Option<String>,
    name: String,
    #[serde(default)]
    default_monthly_limit_micros: Option<i64>,
    #[schema(value_type = Option<Vec<crate::dto::Fraction>>)]
    alert_thresholds: Option<Vec<serde_json::Number>>,
    /// The org's own limit on its total monthly spend (absent or null:
    /// none).
    #[serde(default)]
    monthly_limit_micros: Option<i64>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchOrg {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    default_monthly_limit_micros: Option<Option<i64>>,
    #[schema(value_type = Option<Vec<crate::dto::Fraction>>)]
    alert_thresholds: Option<Vec<serde_json::Number>>,
    /// `null`: no org limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    monthly_limit_micros: Option<Option<i64>>,
}

async fn org_json(state: &AppState, org_id: &OrgId) -> ApiResult<Json<OrgJson>> {
    state.engine.meter.flush_for_read().await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let row = state
        .engine
        .db
        .org(org_id, month)
        .await?
        .ok_or_else(|| ApiError::not_found("no such org"))?;
    Ok(Json(
        one_with_held(&state.engine, org_id, OrgJson::new(row, month)).await?,
    ))
}

#[utoipa::path(post, path = "/v1/orgs", operation_id = "orgs_create", tag = "orgs", request_body = CreateOrg, security(("bearer" = ["operator"])), responses((status = 201, description = "created", body = OrgJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateOrg>,
) -> ApiResult<(StatusCode, Json<OrgJson>)> {
    caller.require_operator()?;
    let id = match req.id {
        Some(id) => id,
        None => random_id("org_")?,
    };
    let org_id = OrgId::new(&id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let cmd = Command::CreateOrg {
        name: req.name,
        default_monthly_limit_micros: req.default_monthly_limit_micros,
        alert_thresholds_bps: req
            .alert_thresholds
            .as_deref()
            .map(fractions_to_bps)
            .transpose()?,
        monthly_limit_micros: req.monthly_limit_micros,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok((StatusCode::CREATED, org_json(&state, &org_id).await?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OrgDetail {
    #[serde(flatten)]
    org: OrgJson,
    history: History,
}

/// The org's settings, this month's spend, and its history.
#[utoipa::path(get, path = "/v1/orgs/{org}", operation_id = "orgs_get", tag = "orgs", params(("org" = String, Path, description = "org id")), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = OrgDetail), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(_): Params<NoParams>,
) -> ApiResult<Json<OrgDetail>> {
    let org_id = org_access(&state, &caller, &org)?;
    let Json(org) = org_json(&state, &org_id).await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let (months, days) = state
        .engine
        .db
        .history(&org_id, "org", &org_id, month)
        .await?;
    Ok(Json(OrgDetail {
        org,
        history: History::new(months, days),
    }))
}

#[utoipa::path(patch, path = "/v1/orgs/{org}", operation_id = "orgs_patch", tag = "orgs", params(("org" = String, Path, description = "org id")), request_body = PatchOrg, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = OrgJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<PatchOrg>,
) -> ApiResult<Json<OrgJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let cmd = Command::ChangeSettings {
        name: req.name,
        default_monthly_limit_micros: req.default_monthly_limit_micros,
        alert_thresholds_bps: req
            .alert_thresholds
            .as_deref()
            .map(fractions_to_bps)
            .transpose()?,
        monthly_limit_micros: req.monthly_limit_micros,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    org_json(&state, &org_id).await
}

fn event_json(e: &EntityEvent) -> EventJson {
    let mut v = serde_json::to_value(e).expect("events serialize");
    if let Some(o) = v.as_object_mut() {
        let _ = o.insert("at".into(), json!(format_rfc3339_ms(e.at_ms)));
        let _ = o.remove("at_ms");
        // Fractions, as everywhere else in the API.
        for field in ["alert_thresholds_bps"] {
            if let Some(bps) = o.remove(field) {
                let fractions: Vec<Fraction> = serde_json::from_value::<Vec<u32>>(bps)
                    .unwrap_or_default()
                    .into_iter()
                    .map(Fraction)
                    .collect();
                let _ = o.insert("alert_thresholds".into(), json!(fractions));
            }
        }
    }
    EventJson(v)
}

/// The audit trail: every change with its actor and time, oldest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/events", operation_id = "orgs_events", tag = "orgs", params(("org" = String, Path, description = "org id"), PageParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<crate::dto::EventJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<EventJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)?;
    let after = match &p.cursor {
        Some(c) => cursor::decode_after("events", c)?
            .as_u64()
            .ok_or_else(|| ApiError::invalid("cursor is malformed"))?,
        None => 0,
    };
    let events = state
        .engine
        .db
        .org_events(&org_id, after, limit + 1)
        .await?;
    let more = events.len() > limit as usize;
    let items: Vec<_> = events.iter().take(limit as usize).map(event_json).collect();
    let next_cursor = more
        .then(|| events.get(limit as usize - 1))
        .flatten()
        .map(|e| cursor::encode_after("events", &json!(e.seq)));
    Ok(Json(ListJson { items, next_cursor }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitParams {
    limit: Option<u32>,
}

/// A threshold crossed, a cutoff or a lift.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct EnforcementJson {
    /// user, group, key or org
    subject_kind: String,
    subject_id: String,
    month: String,
    /// threshold_crossed, cut_off or cutoff_lifted
    event: String,
    /// For threshold_crossed: the fraction of the limit.
    threshold: Option<Fraction>,
    /// For cutoff_lifted: limit_raised, limit_removed or new_month.
    reason: Option<String>,
    spend_micros: i64,
    limit_micros: Option<i64>,
    at: String,
}

/// Thresholds crossed, cutoffs and lifts, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/enforcement", operation_id = "orgs_enforcement", tag = "orgs", params(("org" = String, Path, description = "org id"), LimitParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<EnforcementJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn enforcement(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<LimitParams>,
) -> ApiResult<Json<ListJson<EnforcementJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    state.engine.meter.flush_for_read().await?;
    let rows = state
        .engine
        .db
        .list_enforcement(&org_id, page_len(p.limit)?)
        .await?;
    let items = rows
        .into_iter()
        .map(|r| EnforcementJson {
            subject_kind: r.subject_kind,
            subject_id: r.subject_id,
            month: u32::try_from(r.month)
                .ok()
                .and_then(Month::from_yyyymm)
                .map_or_else(|| r.month.to_string(), |m| m.to_string()),
            event: r.event,
            threshold: u32::try_from(r.threshold_bps)
                .ok()
                .filter(|t| *t > 0)
                .map(Fraction),
            reason: r.reason,
            spend_micros: r.spend_micros,
            limit_micros: r.limit_micros,
            at: format_rfc3339_ms(r.at_ms),
        })
        .collect();
    Ok(Json(ListJson {
        items,
        next_cursor: None,
    }))
}

/// Usage that could not be counted.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadLetterJson {
    /// The usage log partition and position it was read from.
    partition: i64,
    position: i64,
    logged_at: String,
    org_id: Option<String>,
    reason: String,
    message: String,
}

fn dead_letter_json(r: tally_store::query::DeadLetterRow) -> DeadLetterJson {
    DeadLetterJson {
        partition: r.partition_id,
        position: r.position,
        logged_at: format_rfc3339_ms(r.logged_at_ms),
        org_id: r.org_id,
        reason: r.reason,
        message: r.message,
    }
}

/// Usage of this org that could not be counted, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/dead-letters", operation_id = "orgs_dead_letters", tag = "usage", params(("org" = String, Path, description = "org id"), LimitParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<DeadLetterJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<LimitParams>,
) -> ApiResult<Json<ListJson<DeadLetterJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    state.engine.meter.flush_for_read().await?;
    let rows = state
        .engine
        .db
        .list_dead_letters(Some(&org_id), page_len(p.limit)?)
        .await?;
    Ok(Json(ListJson {
        items: rows.into_iter().map(dead_letter_json).collect(),
        next_cursor: None,
    }))
}

/// Every dead letter, also those of no known org (operator token).
#[utoipa::path(get, path = "/v1/dead-letters", operation_id = "orgs_all_dead_letters", tag = "usage", params(LimitParams), security(("bearer" = ["operator"])), responses((status = 200, description = "ok", body = ListJson<DeadLetterJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn all_dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    Params(p): Params<LimitParams>,
) -> ApiResult<Json<ListJson<DeadLetterJson>>> {
    caller.require_operator()?;
    state.engine.meter.flush_for_read().await?;
    let rows = state
        .engine
        .db
        .list_dead_letters(None, page_len(p.limit)?)
        .await?;
    Ok(Json(ListJson {
        items: rows.into_iter().map(dead_letter_json).collect(),
        next_cursor: None,
    }))
}
