//! Tokens: an org's own (admin, viewer, a gateway bound to it), gateway
//! tokens of every org, and the operator's audit log of the latter.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::entity::{Command, Role};
use tally_core::ids::TokenId;
use tally_core::secret::{
    GATEWAY_TOKEN_PREFIX, ORG_TOKEN_PREFIX, VIEWER_TOKEN_PREFIX, hash_secret,
};
use tally_engine::{random_id, random_secret};
use tally_proto::format_rfc3339_ms;

use crate::cursor::{self, PageParams};
use crate::dto::ListJson;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, OptionalJson, Params};
use crate::{AppState, org_access, page_len};

#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    /// Default: a generated `tok_…`.
    pub(crate) id: Option<String>,
    /// `admin` (default), `viewer`, or `gateway` (the operator's only).
    #[schema(value_type = Option<String>)]
    pub(crate) role: Option<Role>,
    /// What it is for (default: its role).
    pub(crate) name: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TokenJson {
    /// The token's id (for revoking it).
    pub(crate) id: String,
    /// Null for a gateway token of every org.
    pub(crate) org_id: Option<String>,
    /// `admin`, `viewer` or `gateway`.
    pub(crate) role: &'static str,
    /// What it is for.
    pub(crate) name: String,
    /// Shown once; only its hash is stored.
    pub(crate) token: String,
}

/// The secret's prefix tells a reader (and a secret scanner) its role.
fn prefix(role: Role) -> &'static str {
    match role {
        Role::Admin => ORG_TOKEN_PREFIX,
        Role::Viewer => VIEWER_TOKEN_PREFIX,
        Role::Gateway => GATEWAY_TOKEN_PREFIX,
    }
}

/// Mints a token of the org. An org admin mints admin and viewer tokens;
/// gateway tokens bound to the org are the operator's to create.
#[utoipa::path(post, path = "/v1/orgs/{org}/tokens", operation_id = "tokens_create", tag = "tokens", params(("org" = String, Path, description = "org id")), request_body(content = Option<CreateToken>, description = "optional"), security(("bearer" = ["operator", "admin"])), responses((status = 201, description = "created", body = TokenJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org, or of a role that may not", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    OptionalJson(body): OptionalJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<TokenJson>)> {
    let org_id = org_access(&state, &caller, &org)?;
    let req = body.unwrap_or_default();
    let role = req.role.unwrap_or_default();
    if role == Role::Gateway {
        caller.require_operator()?;
    }
    let id = match req.id {
        Some(id) => id,
        None => random_id("tok_")?,
    };
    let token_id = TokenId::new(&id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let name = req.name.unwrap_or_else(|| role.as_str().to_owned());
    let token = random_secret(prefix(role))?;
    let cmd = Command::CreateToken {
        token_id: token_id.clone(),
        token_hash: hash_secret(&token),
        role,
        name: name.clone(),
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenJson {
            id: token_id.to_string(),
            org_id: Some(org_id.to_string()),
            role: role.as_str(),
            name,
            token,
        }),
    ))
}

/// A token as listed: never its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TokenInfoJson {
    /// The token's id.
    pub(crate) id: String,
    /// Null for a gateway token of every org.
    pub(crate) org_id: Option<String>,
    /// `admin`, `viewer` or `gateway`.
    pub(crate) role: &'static str,
    /// What it is for.
    pub(crate) name: String,
    /// When it was minted.
    pub(crate) created_at: String,
    /// When it last authenticated a request: exact for the process
    /// answering, to the minute for the others. Null: never.
    pub(crate) last_used_at: Option<String>,
    /// When it was revoked (null: it works).
    pub(crate) revoked_at: Option<String>,
}

/// The org's tokens, revoked ones too, by id.
#[utoipa::path(get, path = "/v1/orgs/{org}/tokens", operation_id = "tokens_list", tag = "tokens", params(("org" = String, Path, description = "org id"), PageParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<TokenInfoJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<TokenInfoJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)? as usize;
    let after = cursor::after_id("tokens", p.cursor.as_deref())?;
    let used: HashMap<String, i64> = state.engine.token_last_used(org_id.as_str()).await?;
    let cell = state
        .engine
        .registry
        .org(&org_id)
        .ok_or_else(|| ApiError::not_found(format!("org {org:?} does not exist")))?;
    let rows: Vec<TokenInfoJson> = {
        let org = cell.read();
        let mut ids: Vec<&TokenId> = org
            .dir
            .tokens
            .keys()
            .filter(|id| after.as_deref().is_none_or(|a| id.as_str() > a))
            .collect();
        ids.sort_unstable();
        ids.into_iter()
            .take(limit + 1)
            .map(|id| {
                let t = &org.dir.tokens[id];
                TokenInfoJson {
                    id: id.to_string(),
                    org_id: Some(org_id.to_string()),
                    role: t.role.as_str(),
                    name: t.name.clone(),
                    created_at: format_rfc3339_ms(t.created_at_ms),
                    last_used_at: used.get(id.as_str()).copied().map(format_rfc3339_ms),
                    revoked_at: t.revoked_at_ms.map(format_rfc3339_ms),
                }
            })
            .collect()
    };
    Ok(Json(cursor::page(rows, limit, "tokens", |t| json!(t.id))))
}

/// Revokes one of the org's tokens: it authenticates nothing from the next
/// request on, on every process. Idempotent.
#[utoipa::path(delete, path = "/v1/orgs/{org}/tokens/{token}", operation_id = "tokens_revoke", tag = "tokens", params(("org" = String, Path, description = "org id"), ("token" = String, Path, description = "token id")), security(("bearer" = ["operator", "admin"])), responses((status = 204, description = "revoked"), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, token)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let org_id = org_access(&state, &caller, &org)?;
    let cmd = Command::RevokeToken {
        token_id: TokenId::new(&token).map_err(|e| ApiError::invalid(e.to_string()))?,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateGatewayToken {
    /// Default: a generated `gw_…`.
    id: Option<String>,
    /// Which gateway holds it.
    name: String,
}

/// Mints a gateway token of every org: authorize, usage and holds for any
/// org, nothing else. (A gateway token bound to one org:
/// `POST /v1/orgs/{org}/tokens` with role `gateway`.)
#[utoipa::path(post, path = "/v1/gateway-tokens", operation_id = "tokens_create_gateway", tag = "tokens", request_body = CreateGatewayToken, security(("bearer" = ["operator"])), responses((status = 201, description = "created", body = TokenJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "not the operator", body = crate::error::ErrorBody), (status = 409, description = "the id is taken", body = crate::error::ErrorBody), (status = 422, description = "as many live gateway tokens as allowed exist", body = crate::error::ErrorBody)))]
pub(crate) async fn create_gateway(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateGatewayToken>,
) -> ApiResult<(StatusCode, Json<TokenJson>)> {
    caller.require_operator()?;
    let id = match req.id {
        Some(id) => id,
        None => random_id("gw_")?,
    };
    tally_core::ids::check_id("id", &id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let name = tally_core::entity::check_name("a token's name", &req.name)?;
    let token = random_secret(GATEWAY_TOKEN_PREFIX)?;
    state
        .engine
        .create_gateway_token(&id, &name, hash_secret(&token))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenJson {
            id,
            org_id: None,
            role: Role::Gateway.as_str(),
            name,
            token,
        }),
    ))
}

/// Gateway tokens of every org, revoked ones too, by id.
#[utoipa::path(get, path = "/v1/gateway-tokens", operation_id = "tokens_list_gateway", tag = "tokens", params(PageParams), security(("bearer" = ["operator"])), responses((status = 200, description = "ok", body = ListJson<TokenInfoJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "not the operator", body = crate::error::ErrorBody)))]
pub(crate) async fn list_gateway(
    State(state): State<AppState>,
    caller: Caller,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<TokenInfoJson>>> {
    caller.require_operator()?;
    let limit = page_len(p.limit)?;
    let after = cursor::after_id("gateway-tokens", p.cursor.as_deref())?;
    let used = state.engine.token_last_used("").await?;
    let rows = state
        .engine
        .db
        .gateway_tokens_page(after.as_deref(), limit + 1)
        .await?
        .into_iter()
        .map(|t| TokenInfoJson {
            last_used_at: used.get(&t.id).copied().map(format_rfc3339_ms),
            id: t.id,
            org_id: None,
            role: Role::Gateway.as_str(),
            name: t.name,
            created_at: format_rfc3339_ms(t.created_at_ms),
            revoked_at: t.revoked_at_ms.map(format_rfc3339_ms),
        })
        .collect();
    Ok(Json(cursor::page(
        rows,
        limit as usize,
        "gateway-tokens",
        |t| json!(t.id),
    )))
}

/// Revokes a gateway token of every org: it authenticates nothing from the
/// next request on, on every process. Idempotent.
#[utoipa::path(delete, path = "/v1/gateway-tokens/{token}", operation_id = "tokens_revoke_gateway", tag = "tokens", params(("token" = String, Path, description = "token id")), security(("bearer" = ["operator"])), responses((status = 204, description = "revoked"), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "not the operator", body = crate::error::ErrorBody), (status = 404, description = "no such gateway token", body = crate::error::ErrorBody)))]
pub(crate) async fn revoke_gateway(
    State(state): State<AppState>,
    caller: Caller,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_operator()?;
    state.engine.revoke_gateway_token(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One entry of the operator's audit log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OperatorAuditJson {
    /// Its position in the operator's log.
    seq: i64,
    /// When.
    at: String,
    /// Who: `operator`.
    actor: String,
    /// `gateway_token_created` or `gateway_token_revoked`.
    kind: String,
    /// What changed (the token's id, name and org).
    #[schema(value_type = Object)]
    detail: serde_json::Value,
}

/// What the operator's audit log takes.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditParams {
    /// `oldest` first (the default) or `newest` first.
    order: Option<String>,
    /// `next_cursor` of the previous page (same order).
    cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    limit: Option<u32>,
}

/// The operator's audit log, oldest or newest first: changes that belong
/// to no org (gateway tokens of every org). Each org's changes are in its
/// own (`GET /v1/orgs/{org}/events`).
#[utoipa::path(get, path = "/v1/audit", operation_id = "tokens_audit", tag = "tokens", params(AuditParams), security(("bearer" = ["operator"])), responses((status = 200, description = "ok", body = ListJson<OperatorAuditJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "not the operator", body = crate::error::ErrorBody)))]
pub(crate) async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    Params(p): Params<AuditParams>,
) -> ApiResult<Json<ListJson<OperatorAuditJson>>> {
    caller.require_operator()?;
    let limit = page_len(p.limit)?;
    let newest_first = cursor::newest_first(p.order.as_deref())?;
    let list = if newest_first {
        "audit_newest"
    } else {
        "audit"
    };
    let after = p
        .cursor
        .as_deref()
        .map(|c| {
            cursor::decode_after(list, c)?
                .as_i64()
                .ok_or_else(|| ApiError::invalid("cursor is malformed"))
        })
        .transpose()?;
    let rows = state
        .engine
        .db
        .operator_audit(newest_first, after, limit + 1)
        .await?;
    let items = rows
        .into_iter()
        .map(|r| OperatorAuditJson {
            seq: r.pos,
            at: format_rfc3339_ms(r.at_ms),
            actor: r.actor,
            kind: r.kind,
            detail: serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null),
        })
        .collect();
    Ok(Json(cursor::page(items, limit as usize, list, |e| {
        json!(e.seq)
    })))
}
