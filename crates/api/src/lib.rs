//! Tally's HTTP API (axum). Admin endpoints need `Authorization: Bearer
//! <token>`: the operator token, or an org admin token that can touch its own
//! org only. Errors are `{"error": {"code", "message"}}`.

mod access;
mod console;
mod cursor;
mod dto;
mod error;
mod extract;
mod forward;
mod groups;
mod holds;
mod keys;
mod openapi;
mod ops;
mod orgs;
mod rollup;
pub mod server;
mod snapshot;
mod tokens;
mod usage;
mod users;
mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use metrics_exporter_prometheus::PrometheusHandle;
use tally_core::ids::OrgId;
use tally_engine::Engine;

pub use error::ApiError;
pub use snapshot::Snapshots;

use crate::error::ApiResult;
use crate::extract::Caller;

/// Bounds on what one request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest request body. Default 8 MiB.
    pub body_bytes_max: usize,
    /// The most usage events one ingest request may carry. Default 10 000.
    pub usage_batch_len_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes_max: 8 << 20,
            usage_batch_len_max: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub metrics: Option<PrometheusHandle>,
    pub limits: Limits,
    /// Orders of live-sorted user listings being paged through.
    pub snapshots: Arc<Snapshots>,
    /// Derives webhook signing secrets (shown when a webhook is set).
    pub webhook_keys: Arc<tally_webhooks::Keyring>,
    /// What `/metrics` computes at each scrape.
    pub metrics_options: tally_engine::gauges::GaugeOptions,
    /// Who may read `/metrics` here.
    pub metrics_access: MetricsAccess,
    /// Where webhooks may be sent (checked when one is set).
    pub webhook_targets: Arc<tally_webhooks::TargetPolicy>,
    /// Where admins reach the console (`--public-url`), for links in
    /// notifications.
    pub console_url: Option<Arc<str>>,
}

/// Who may read `/metrics` on a listener.
#[derive(Debug, Clone)]
pub enum MetricsAccess {
    /// The operator token, or the scrape token whose hash this is.
    Token {
        scrape_token_hash: Option<tally_core::secret::SecretHash>,
    },
    /// Anyone: the metrics listener of its own (`--metrics-listen`).
    Open,
    /// Nobody: served on the metrics listener instead.
    Elsewhere,
}

/// The metrics listener's routes: `/metrics` (no token) and `/healthz`.
pub fn metrics_router(mut state: AppState) -> Router {
    state.metrics_access = MetricsAccess::Open;
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .fallback(ops::not_found)
        .with_state(state)
}

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    let body_max = state.limits.body_bytes_max;
    Router::new()
        .route("/v1/orgs", post(orgs::create).get(orgs::list))
        .route("/v1/orgs/{org}", get(orgs::get).patch(orgs::patch))
        .route(
            "/v1/orgs/{org}/tokens",
            post(tokens::create).get(tokens::list),
        )
        .route(
            "/v1/orgs/{org}/tokens/{token}",
            axum::routing::delete(tokens::revoke),
        )
        .route(
            "/v1/gateway-tokens",
            post(tokens::create_gateway).get(tokens::list_gateway),
        )
        .route(
            "/v1/gateway-tokens/{token}",
            axum::routing::delete(tokens::revoke_gateway),
        )
        .route("/v1/audit", get(tokens::audit))
        .route("/v1/orgs/{org}/events", get(orgs::events))
        .route("/v1/orgs/{org}/usage", get(rollup::report))
        .route("/v1/orgs/{org}/enforcement", get(orgs::enforcement))
        .route("/v1/orgs/{org}/dead-letters", get(orgs::dead_letters))
        .route("/v1/dead-letters", get(orgs::all_dead_letters))
        .route("/v1/orgs/{org}/users", post(users::add).get(users::list))
        .route("/v1/orgs/{org}/users/bulk", post(users::bulk))
        .route(
            "/v1/orgs/{org}/users/{user}",
            get(users::get).patch(users::patch).delete(users::remove),
        )
        .route(
            "/v1/orgs/{org}/groups",
            post(groups::create).get(groups::list),
        )
        .route(
            "/v1/orgs/{org}/groups/{group}",
            get(groups::get).patch(groups::patch).delete(groups::delete),
        )
        .route(
            "/v1/orgs/{org}/groups/{group}/members/{user}",
            put(groups::add_member).delete(groups::remove_member),
        )
        .route("/v1/orgs/{org}/keys", post(keys::create).get(keys::list))
        .route(
            "/v1/orgs/{org}/keys/{key}",
            get(keys::get).patch(keys::patch).delete(keys::revoke),
        )
        .route("/v1/orgs/{org}/keys/{key}/rotate", post(keys::rotate))
        .route(
            "/v1/orgs/{org}/webhook",
            get(webhooks::get)
                .put(webhooks::set)
                .delete(webhooks::remove),
        )
        .route(
            "/v1/orgs/{org}/webhook/deliveries",
            get(webhooks::deliveries),
        )
        .route("/v1/orgs/{org}/webhook/test", post(webhooks::test))
        .route(
            "/v1/orgs/{org}/webhook/deliveries/{id}/redeliver",
            post(webhooks::redeliver),
        )
        .route("/v1/orgs/{org}/holds", get(holds::list))
        .route(
            "/v1/orgs/{org}/holds/{request_id}",
            axum::routing::delete(holds::release),
        )
        .route("/v1/usage", post(usage::ingest))
        .route("/v1/authorize", post(usage::authorize))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .merge(console::routes())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_max))
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// Seconds to answer a request, by `method`, `route` (the template, e.g.
/// `/v1/orgs/{org}/users`) and `status`.
pub const HTTP_SECONDS: &str = "tally_http_request_duration_seconds";

pub fn describe_metrics() {
    server::describe_metrics();
    metrics::describe_histogram!(
        HTTP_SECONDS,
        metrics::Unit::Seconds,
        "duration of an HTTP request by method, route and status"
    );
}

/// Every request in a span (method and route template), timed; a server
/// error is logged as a warning, the rest at debug level.
async fn observe(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!("request", %method, %route);
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let took = started.elapsed();
    metrics::histogram!(HTTP_SECONDS, "method" => method.to_string(), "route" => route, "status" => status.to_string())
        .record(took.as_secs_f64());
    let _e = span.enter();
    let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    // A 503 with Retry-After is a refusal during a storage fault, which the
    // engine logs once; one line per refused request would flood the log.
    let refused = resp.headers().contains_key(axum::http::header::RETRY_AFTER);
    if status >= 500 && !refused {
        tracing::warn!(status, took_us, "request failed");
    } else {
        tracing::debug!(status, took_us, "request");
    }
    resp
}

/// Checks the caller may touch `org` and that it exists.
fn org_access(state: &AppState, caller: &Caller, org: &str) -> ApiResult<OrgId> {
    let org_id = OrgId::new(org).map_err(|e| ApiError::invalid(e.to_string()))?;
    caller.require_org(&org_id)?;
    if !state.engine.registry.contains(&org_id) {
        return Err(ApiError::not_found(format!("org {org:?} does not exist")));
    }
    Ok(org_id)
}

/// The page size asked for: default 50, at most 1 000.
fn page_len(limit: Option<u32>) -> ApiResult<u32> {
    match limit {
        None => Ok(50),
        Some(n @ 1..=1000) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!(
            "limit must be between 1 and 1000, got {n}"
        ))),
    }
}
