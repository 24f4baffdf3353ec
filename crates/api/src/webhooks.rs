//! An org's webhook: set (the signing secret shown once), read with its
//! delivery counts, remove; deliveries listed with their state, and a failed
//! one sent again.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::entity::{Command, EventKind};
use tally_core::ids::OrgId;
use tally_core::time::Month;
use tally_store::webhook::DeliveryRow;

use crate::cursor;
use crate::dto::{Fraction, ListJson, WebhookFormatJson, time};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, NoParams, Params};
use crate::{AppState, org_access, page_len};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"url": "https://hooks.acme.example/tally"}), json!({"url": "https://hooks.slack.com/services/T000/B000/XXXX", "format": "slack"})))]
pub(crate) struct SetWebhook {
    /// `http://` or `https://`; notifications are POSTed here.
    pub(crate) url: String,
    /// What it receives; `tally` when left out.
    #[serde(default)]
    pub(crate) format: WebhookFormatJson,
}

/// The org's webhook and how its deliveries stand.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct WebhookJson {
    /// `null`: no webhook.
    pub(crate) url: Option<String>,
    /// What it receives; `null`: no webhook.
    pub(crate) format: Option<WebhookFormatJson>,
    /// When it was set.
    pub(crate) set_at: Option<String>,
    /// The HMAC-SHA256 signing secret: only in the answer that set it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) secret: Option<String>,
    /// Deliveries by state: pending, delivered, failed, cancelled.
    pub(crate) deliveries: BTreeMap<String, i64>,
}

async fn webhook_json(
    state: &AppState,
    org_id: &OrgId,
    secret: Option<String>,
) -> ApiResult<Json<WebhookJson>> {
    let db = &state.engine.db;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let row = db
        .org(org_id, month)
        .await?
        .ok_or_else(|| ApiError::not_found("no such org"))?;
    let mut deliveries: BTreeMap<String, i64> = ["pending", "delivered", "failed", "cancelled"]
        .into_iter()
        .map(|s| (s.to_owned(), 0))
        .collect();
    deliveries.extend(db.delivery_counts(org_id).await?);
    let (url, format, set_at) = match row.webhook {
        Some(w) => (Some(w.url), Some(w.format.into()), Some(time(w.set_at_ms))),
        None => (None, None, None),
    };
    Ok(Json(WebhookJson {
        url,
        format,
        set_at,
        secret,
        deliveries,
    }))
}

/// Sets the org's webhook (replacing any, with a new secret).
#[utoipa::path(put, path = "/v1/orgs/{org}/webhook", operation_id = "webhooks_set", tag = "webhooks", params(("org" = String, Path, description = "org id")), request_body = SetWebhook, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = WebhookJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 422, description = "the URL's host is not public (loopback, private, link-local, metadata…) and not allowed by the operator", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn set(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<SetWebhook>,
) -> ApiResult<Json<WebhookJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    if let Err(refused) = state.webhook_targets.check_url(&req.url).await {
        return Err(ApiError::rule(format!("webhook URL refused: {refused}")));
    }
    let events = state
        .engine
        .commands
        .execute(
            &org_id,
            caller.actor(),
            &Command::SetWebhook {
                url: req.url,
                format: req.format.into(),
            },
        )
        .await?;
    let seq = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::WebhookSet { .. }))
        .map(|e| e.seq)
        .ok_or_else(ApiError::internal)?;
    let seq = i64::try_from(seq).map_err(|_| ApiError::internal())?;
    let secret = state.webhook_keys.secret(&org_id, seq);
    webhook_json(&state, &org_id, Some(secret)).await
}

#[utoipa::path(get, path = "/v1/orgs/{org}/webhook", operation_id = "webhooks_get", tag = "webhooks", params(("org" = String, Path, description = "org id")), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = WebhookJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(_): Params<NoParams>,
) -> ApiResult<Json<WebhookJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    webhook_json(&state, &org_id, None).await
}

/// Removes the webhook: pending deliveries are cancelled.
#[utoipa::path(delete, path = "/v1/orgs/{org}/webhook", operation_id = "webhooks_remove", tag = "webhooks", params(("org" = String, Path, description = "org id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = WebhookJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> ApiResult<Json<WebhookJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &Command::RemoveWebhook)
        .await?;
    webhook_json(&state, &org_id, None).await
}

/// One notification and how its delivery went.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeliveryJson {
    /// The delivery's id (for redeliver).
    pub(crate) id: i64,
    /// The `Idempotency-Key` header and the body's `id`.
    pub(crate) key: String,
    /// pending, delivered, failed (gave up) or cancelled (webhook removed)
    pub(crate) state: String,
    /// Attempts made so far.
    pub(crate) attempts: i64,
    /// When pending: the next attempt.
    pub(crate) next_attempt_at: Option<String>,
    /// The receiver's last HTTP status, if it answered.
    pub(crate) last_status: Option<i64>,
    /// The last attempt's error, if it failed without an answer or was refused.
    pub(crate) last_error: Option<String>,
    /// When the event was queued.
    pub(crate) created_at: String,
    /// When the receiver took it (2xx).
    pub(crate) delivered_at: Option<String>,
    /// threshold_crossed, cut_off or cutoff_lifted
    pub(crate) event: String,
    /// user, group, key or org.
    pub(crate) subject_kind: String,
    /// The subject's id.
    pub(crate) subject_id: String,
    /// The month the event belongs to.
    pub(crate) month: String,
    /// For threshold_crossed: the fraction of the limit.
    pub(crate) threshold: Option<Fraction>,
    /// The subject's spend then, in micro-USD.
    pub(crate) spend_micros: i64,
    /// The limit then, in micro-USD.
    pub(crate) limit_micros: Option<i64>,
    /// When the event happened.
    pub(crate) occurred_at: String,
}

fn delivery_json(org_id: &str, d: DeliveryRow) -> DeliveryJson {
    let e = &d.event;
    DeliveryJson {
        id: d.id,
        key: tally_webhooks::idempotency_key(org_id, e),
        state: d.state,
        attempts: d.attempts,
        next_attempt_at: d.next_attempt_ms.map(time),
        last_status: d.last_status,
        last_error: d.last_error,
        created_at: time(d.created_ms),
        delivered_at: d.delivered_ms.map(time),
        event: e.event.clone(),
        subject_kind: e.subject_kind.clone(),
        subject_id: e.subject_id.clone(),
        month: u32::try_from(e.month)
            .ok()
            .and_then(Month::from_yyyymm)
            .map_or_else(|| e.month.to_string(), |m| m.to_string()),
        threshold: (e.event == "threshold_crossed")
            .then(|| u32::try_from(e.threshold_bps).ok().map(Fraction))
            .flatten(),
        spend_micros: e.spend_micros,
        limit_micros: e.limit_micros,
        occurred_at: time(e.at_ms),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveryParams {
    /// pending, delivered, failed or cancelled
    pub(crate) state: Option<String>,
    /// `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

/// The org's deliveries, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/webhook/deliveries", operation_id = "webhooks_deliveries", tag = "webhooks", params(("org" = String, Path, description = "org id"), DeliveryParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<DeliveryJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<DeliveryParams>,
) -> ApiResult<Json<ListJson<DeliveryJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    if let Some(s) = &p.state
        && !["pending", "delivered", "failed", "cancelled"].contains(&s.as_str())
    {
        return Err(ApiError::invalid(format!(
            "state {s:?} is not one of pending, delivered, failed, cancelled"
        )));
    }
    let limit = page_len(p.limit)?;
    let before = match &p.cursor {
        Some(c) => Some(
            cursor::decode_after("deliveries", c)?
                .as_i64()
                .ok_or_else(|| ApiError::invalid("cursor is malformed"))?,
        ),
        None => None,
    };
    let rows = state
        .engine
        .db
        .list_deliveries(&org_id, p.state.as_deref(), before, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    let next_cursor = more
        .then(|| rows.get(limit as usize - 1))
        .flatten()
        .map(|d| cursor::encode_after("deliveries", &json!(d.id)));
    let items = rows
        .into_iter()
        .take(limit as usize)
        .map(|d| delivery_json(&org_id, d))
        .collect();
    Ok(Json(ListJson { items, next_cursor }))
}

/// Sends a failed or cancelled delivery again, from its first attempt.
#[utoipa::path(post, path = "/v1/orgs/{org}/webhook/deliveries/{id}/redeliver", operation_id = "webhooks_redeliver", tag = "webhooks", params(("org" = String, Path, description = "org id"), ("id" = i64, Path, description = "delivery id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = WebhookJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "the delivery is pending or delivered", body = crate::error::ErrorBody)))]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<Json<WebhookJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("delivery id {id:?} is not a number")))?;
    let db = &state.engine.db;
    if !db.redeliver(&org_id, id, state.engine.now_ms()).await? {
        let found = db
            .list_deliveries(&org_id, None, id.checked_add(1), 1)
            .await?;
        return Err(if found.first().is_some_and(|d| d.id == id) {
            ApiError::conflict(format!(
                "delivery {id} is pending or delivered: only failed or cancelled ones are sent again"
            ))
        } else {
            ApiError::not_found(format!("delivery {id} does not exist"))
        });
    }
    webhook_json(&state, &org_id, None).await
}

/// What a test send found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct WebhookTestJson {
    /// Whether the receiver took it (answered 2xx).
    pub(crate) delivered: bool,
    /// The receiver's HTTP status, if it answered.
    pub(crate) status: Option<u16>,
    /// Why it was not delivered (refused, no answer, or the status).
    pub(crate) error: Option<String>,
    /// How long the attempt took, in milliseconds.
    pub(crate) took_ms: u64,
}

/// How long a test send waits for the receiver.
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends a `test` notification to the org's webhook now, signed like every
/// delivery, and answers with what the receiver did. Nothing is queued or
/// retried; the delivery log is unchanged.
#[utoipa::path(post, path = "/v1/orgs/{org}/webhook/test", operation_id = "webhooks_test", tag = "webhooks", params(("org" = String, Path, description = "org id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "sent; `delivered` says whether the receiver took it", body = WebhookTestJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 422, description = "no webhook is set", body = crate::error::ErrorBody)))]
pub(crate) async fn test(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> ApiResult<Json<WebhookTestJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let row = state
        .engine
        .db
        .org(&org_id, month)
        .await?
        .ok_or_else(|| ApiError::not_found("no such org"))?;
    let Some(hook) = row.webhook else {
        return Err(ApiError::rule("the org has no webhook: set one first"));
    };
    let r = tally_webhooks::send_test(
        &state.webhook_keys,
        Arc::clone(&state.webhook_targets),
        &org_id,
        &hook,
        state.console_url.as_deref(),
        TEST_TIMEOUT,
    )
    .await;
    Ok(Json(WebhookTestJson {
        delivered: r.error.is_none(),
        status: r.status,
        error: r.error,
        took_ms: u64::try_from(r.took.as_millis()).unwrap_or(u64::MAX),
    }))
}
