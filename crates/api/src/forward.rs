//! Hold requests (a reserving authorize, a release, the holds list) for an
//! org whose partition another process meters go to that process, which
//! alone places the org's holds. Forwarded once: a request that arrives
//! forwarded and finds this process not the owner either (the partition is
//! moving) is answered 503, and the gateway retries.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// Marks a forwarded request.
pub(crate) const FORWARDED: &str = "x-tally-forwarded";

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            // A dead owner fails fast; the gateway retries once the
            // partition has moved.
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Sends the request to the owner of `partition` and answers what it
/// answered; `not_owner` when there is none to send it to.
pub(crate) async fn to_owner(
    state: &AppState,
    headers: &HeaderMap,
    method: &str,
    path_and_query: &str,
    body: Option<Value>,
    partition: i32,
    not_owner: tally_engine::Error,
) -> ApiResult<Response> {
    if headers.contains_key(FORWARDED) {
        return Err(not_owner.into());
    }
    let Some(url) = state.engine.hold_owner_url(partition).await? else {
        return Err(not_owner.into());
    };
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut req = client()
        .request(method, format!("{url}{path_and_query}"))
        .header(FORWARDED, "1");
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        req = req.header(reqwest::header::AUTHORIZATION, auth);
    }
    if let Some(b) = body {
        req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(b.to_string());
    }
    let unavailable = |e: reqwest::Error| {
        ApiError::unavailable(format!(
            "the process metering the org ({url}) did not answer: {e}; retry"
        ))
    };
    let resp = req.send().await.map_err(unavailable)?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = resp.bytes().await.map_err(unavailable)?;
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/json")],
        bytes.to_vec(),
    )
        .into_response())
}
