//! Health, readiness, metrics, and JSON answers for unknown routes.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

pub(crate) async fn healthz() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
        .into_response()
}

/// Ready once the checkpoint is loaded and the usage log replayed.
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
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

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::not_found("metrics are not enabled").into_response(),
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
