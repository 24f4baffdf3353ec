//! Extractors that answer bad input with the API's JSON errors.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use tally_core::entity::Actor;
use tally_core::ids::OrgId;
use tally_engine::Principal;

use crate::error::ApiError;
use crate::{AppState, access};

/// A JSON body, whatever its content type (curl users forget the header),
/// within the router's body limit.
#[derive(Debug)]
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("request body is not valid: {e}")))
    }
}

/// Reads the body within the router's limit.
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the request body is larger than the server's limit")
        } else {
            ApiError::invalid(format!("could not read the request body: {rej}"))
        }
    })
}

/// Like [`JsonBody`], for endpoints whose body may be left out.
#[derive(Debug)]
pub(crate) struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| ApiError::invalid(format!("request body is not valid: {e}")))
    }
}

/// No query parameters: any is refused (400), as unknown ones are on
/// every endpoint that takes some.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

/// Query parameters; unknown or malformed ones are a 400.
#[derive(Debug)]
pub(crate) struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Params(q.0))
            .map_err(|e| ApiError::invalid(format!("query parameters: {}", e.body_text())))
    }
}

/// The authenticated caller, admitted to the route by its role
/// ([`crate::access`]) and, for an org's token, to the org in the path.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Principal);

impl Caller {
    /// Who an entity event names as its cause. A gateway token of every
    /// org causes none (its calls change no entity).
    pub(crate) fn actor(&self) -> Actor {
        match &self.0 {
            Principal::Org { token_id, .. } => Actor::Token(token_id.clone()),
            Principal::Operator | Principal::Gateway { .. } => Actor::Operator,
        }
    }

    pub(crate) fn require_operator(&self) -> Result<(), ApiError> {
        match self.0 {
            Principal::Operator => Ok(()),
            _ => Err(ApiError::forbidden("only the operator token may do this")),
        }
    }

    /// Admits a caller of every org, or a token of exactly this org.
    pub(crate) fn require_org(&self, org: &OrgId) -> Result<(), ApiError> {
        match self.0.org() {
            None => Ok(()),
            Some(own) if own == org => Ok(()),
            Some(_) => Err(ApiError::forbidden("this token belongs to another org")),
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization must be Bearer <token>"))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        let caller = state
            .engine
            .authenticate(token)
            .await?
            .map(Caller)
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or("", MatchedPath::as_str);
        let role = caller.0.role();
        if let Some(roles) = access::roles(&parts.method, route)
            && !roles.contains(&role)
        {
            return Err(ApiError::forbidden(format!(
                "a token with role {role} may not call {} {route} (allowed: {})",
                parts.method,
                roles.join(", ")
            )));
        }
        // The org in the path, before the body is read.
        if route.starts_with("/v1/orgs/{org}")
            && let Some(org) = parts.uri.path().split('/').nth(3)
            && let Some(own) = caller.0.org()
            && own.as_str() != org
        {
            return Err(ApiError::forbidden("this token belongs to another org"));
        }
        Ok(caller)
    }
}
