//! Health, readiness, metrics, and JSON answers for unknown routes.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// `ok` (alive) or `ready`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct StatusJson {
    status: &'static str,
}
use crate::error::ApiError;

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

#[utoipa::path(get, path = "/metrics", operation_id = "ops_metrics", tag = "ops", security(), responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
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
