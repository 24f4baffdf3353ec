//! Health, readiness, metrics, and JSON answers for unknown routes.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tally_core::secret::{ct_eq, hash_secret};
use tally_engine::tokens::Principal;

use crate::error::ApiError;
use crate::{AppState, MetricsAccess};

/// `ok` (alive) or `ready`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct StatusJson {
    /// `ok`, or what is not.
    status: &'static str,
}

#[utoipa::path(get, path = "/healthz", operation_id = "ops_healthz", tag = "ops", security(), responses((status = 200, description = "alive", body = StatusJson)))]
pub(crate) async fn healthz() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
        .into_response()
}

/// Ready once the checkpoint is loaded and the usage log replayed.
#[utoipa::path(get, path = "/readyz", operation_id = "ops_readyz", tag = "ops", security(), responses((status = 200, description = "ready", body = StatusJson), (status = 503, description = "recovering, stopped, or the store cannot write", body = crate::error::ErrorBody)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    if let Some(fault) = state.engine.meter.health().fault() {
        let since = tally_proto::format_rfc3339_ms(fault.since_ms);
        return ApiError::store_unavailable(fault.reason)
            .with_message(format!(
                "not ready: {fault} since {since}, found by the {} path; usage and commands \
                 are refused until a write commits again",
                fault.path
            ))
            .into_response();
    }
    if state.engine.meter.is_ready() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        )
            .into_response()
    } else {
        ApiError::unavailable("not ready: recovering or stopped").into_response()
    }
}

/// The Prometheus exposition: with the operator token or the scrape token
/// (`--metrics-token`), or on a listener of its own (`--metrics-listen`)
/// without a token (docs/operations.md#scraping).
#[utoipa::path(get, path = "/metrics", operation_id = "ops_metrics", tag = "ops", security(("bearer" = ["operator"])), responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"), (status = 401, description = "no, or an unknown, token", body = crate::error::ErrorBody), (status = 403, description = "a token that is neither the operator's nor the scrape token", body = crate::error::ErrorBody), (status = 404, description = "metrics are served on the metrics listener", body = crate::error::ErrorBody)))]
pub(crate) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = may_scrape(&state, &headers).await {
        return e.into_response();
    }
    let Some(handle) = &state.metrics else {
        return ApiError::not_found("metrics are not enabled").into_response();
    };
    // Gauges of the current state, set now, so a scrape sees this moment.
    let took = state.engine.update_gauges(&state.metrics_options);
    if took.as_millis() > 100 {
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            "computing the spend gauges was slow; consider fewer per-group or per-user series"
        );
    }
    match state.engine.db.pending_deliveries().await {
        Ok(n) => metrics::gauge!(tally_webhooks::PENDING).set(n as f64),
        Err(e) => tracing::warn!(error = %e, "counting pending webhook deliveries failed"),
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

async fn may_scrape(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let scrape_token_hash = match &state.metrics_access {
        MetricsAccess::Open => return Ok(()),
        MetricsAccess::Elsewhere => {
            return Err(ApiError::not_found(
                "metrics are served on the metrics listener (--metrics-listen)",
            ));
        }
        MetricsAccess::Token { scrape_token_hash } => scrape_token_hash,
    };
    let token = crate::extract::bearer(headers)?;
    if let Some(hash) = scrape_token_hash
        && ct_eq(&hash_secret(token), hash)
    {
        return Ok(());
    }
    match state.engine.authenticate(token).await? {
        Some(Principal::Operator) => Ok(()),
        Some(_) => Err(ApiError::forbidden(
            "/metrics names every org: only the operator token or the scrape token may read it",
        )),
        None => Err(ApiError::unauthorized("unknown or revoked token")),
    }
}

pub(crate) async fn not_found() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}

pub(crate) async fn method_not_allowed() -> Response {
    let mut e = ApiError::invalid("method not allowed on this endpoint");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.code = "method_not_allowed";
    e.into_response()
}

/// The OpenAPI document of this API.
pub(crate) async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::json(),
    )
        .into_response()
}
