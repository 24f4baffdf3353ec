//! API errors: a closed set of codes, each with one status, as
//! `{"error": {"code", "message"}}`. Internal details go to the log, never to
//! the client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tally_core::entity::CommandError;

/// What a client is told to wait before retrying a request refused during a
/// storage fault (the meter probes the store every second).
pub(crate) const RETRY_AFTER_S: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (seconds).
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// A request not answered within the server's request timeout.
    pub fn timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn rule(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "rule_violated", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 503 with `Retry-After`: the store cannot write (or be reached) now;
    /// nothing of the request was done.
    pub fn store_unavailable(reason: &str) -> ApiError {
        ApiError {
            retry_after_s: Some(RETRY_AFTER_S),
            ..ApiError::unavailable(format!(
                "the store cannot write ({reason}); nothing was done: retry after {RETRY_AFTER_S} s"
            ))
        }
    }

    /// The same error with another message.
    pub fn with_message(self, message: impl Into<String>) -> ApiError {
        ApiError {
            message: message.into(),
            ..self
        }
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Invalid(m) => ApiError::invalid(m),
            e @ CommandError::NotFound { .. } => ApiError::not_found(e.to_string()),
            CommandError::Conflict(m) => ApiError::conflict(m),
            CommandError::Rule(m) => ApiError::rule(m),
        }
    }
}

impl From<tally_engine::Error> for ApiError {
    fn from(e: tally_engine::Error) -> Self {
        match e {
            tally_engine::Error::Command(c) => c.into(),
            tally_engine::Error::UnknownOrg => ApiError::not_found("no such org"),
            tally_engine::Error::Store(s) => s.into(),
            tally_engine::Error::StoreFault(f) => ApiError::store_unavailable(f.reason),
            tally_engine::Error::Unavailable(m) => ApiError::unavailable(m),
            e @ tally_engine::Error::HoldJournal(_) => ApiError::unavailable(e.to_string()),
            tally_engine::Error::HoldConflict(m) => ApiError::conflict(m),
            e @ tally_engine::Error::NotOwner { .. } => ApiError::unavailable(e.to_string()),
            e @ tally_engine::Error::Corrupt(_) => {
                tracing::error!(error = %e, "request failed");
                ApiError::internal()
            }
        }
    }
}

impl From<tally_store::Error> for ApiError {
    fn from(e: tally_store::Error) -> Self {
        match e {
            tally_store::Error::Conflict { .. } => {
                ApiError::conflict("the org changed concurrently; retry the request")
            }
            tally_store::Error::Invalid(m) => ApiError::invalid(m),
            e if e.unavailable().is_some() => {
                let reason = e.unavailable().unwrap_or_default();
                tracing::debug!(error = %e, "request refused: the store is unavailable");
                ApiError::store_unavailable(reason)
            }
            e => {
                tracing::error!(error = %e, "request failed");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            let _ = response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The body of every error response (for the OpenAPI document).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong.
    error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// invalid_input, unauthorized, forbidden, not_found, conflict,
    /// too_large, rule_violated, unavailable, internal
    code: String,
    /// What went wrong, in words.
    message: String,
}
