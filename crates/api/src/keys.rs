//! API keys: create (the secret is in this response only), list, detail,
//! change (name, owner, groups, features, limit, expiry), rotate, revoke.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::entity::Command;
use tally_core::ids::{GroupId, KeyId, OrgId, UserId};
use tally_core::secret::{KEY_SECRET_PREFIX, hash_secret};
use tally_core::time::Month;
use tally_engine::{random_id, random_secret};

use crate::cursor;
use crate::dto::{
    History, HistoryParams, KeyJson, ListJson, history, one_with_held, present, with_held,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, OptionalJson, Params};
use crate::{AppState, org_access, page_len};

fn key_id(s: &str) -> ApiResult<KeyId> {
    KeyId::new(s).map_err(|e| ApiError::invalid(e.to_string()))
}

async fn key_json(state: &AppState, org_id: &OrgId, key: &KeyId) -> ApiResult<KeyJson> {
    let month = Month::from_unix_ms(state.engine.now_ms());
    let rows = state
        .engine
        .db
        .list_keys(org_id, month, None, Some(key), 1)
        .await?;
    let key = rows
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("key {:?} does not exist", key.as_str())))?;
    one_with_held(&state.engine, org_id, KeyJson::from(key)).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"id": "alice-laptop", "name": "laptop", "user_id": "alice", "features": ["chat"]})))]
pub(crate) struct CreateKey {
    /// The key's id; default: generated.
    pub(crate) id: Option<String>,
    /// What it is for.
    pub(crate) name: String,
    /// The member who owns it (their first own key activates them).
    pub(crate) user_id: Option<String>,
    /// Groups its spend also counts against.
    #[serde(default)]
    pub(crate) group_ids: Vec<String>,
    /// Features authorize allows it (`chat`, `embeddings`, or `all`).
    #[serde(default)]
    pub(crate) features: Vec<String>,
    /// Its own monthly limit in micro-USD; absent or `null`: unlimited.
    #[serde(default)]
    pub(crate) monthly_limit_micros: Option<i64>,
    /// RFC 3339; from then on authorize refuses the key (`key_expired`).
    pub(crate) expires_at: Option<String>,
}

/// An RFC 3339 time as Unix ms, or a 400 naming the field.
fn time_ms(field: &str, s: &str) -> ApiResult<i64> {
    tally_proto::parse_rfc3339_ms(s).ok_or_else(|| {
        ApiError::invalid(format!(
            "{field} must be an RFC 3339 time (e.g. 2027-01-31T00:00:00Z), got {s:?}"
        ))
    })
}

#[utoipa::path(post, path = "/v1/orgs/{org}/keys", operation_id = "keys_create", tag = "keys", params(("org" = String, Path, description = "org id")), request_body = CreateKey, security(("bearer" = ["operator", "admin"])), responses((status = 201, description = "created", body = KeyJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<CreateKey>,
) -> ApiResult<(StatusCode, Json<KeyJson>)> {
    let org_id = org_access(&state, &caller, &org)?;
    let id = match req.id {
        Some(id) => key_id(&id)?,
        None => key_id(&random_id("k_")?)?,
    };
    let invalid = |e: tally_core::ids::IdError| ApiError::invalid(e.to_string());
    let secret = random_secret(KEY_SECRET_PREFIX)?;
    let cmd = Command::CreateKey {
        key_id: id.clone(),
        name: req.name,
        user_id: req
            .user_id
            .as_deref()
            .map(UserId::new)
            .transpose()
            .map_err(invalid)?,
        group_ids: req
            .group_ids
            .iter()
            .map(|g| GroupId::new(g))
            .collect::<Result<_, _>>()
            .map_err(invalid)?,
        features: req.features,
        monthly_limit_micros: req.monthly_limit_micros,
        secret_hash: hash_secret(&secret),
        expires_at_ms: req
            .expires_at
            .as_deref()
            .map(|s| time_ms("expires_at", s))
            .transpose()?,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    let mut key = key_json(&state, &org_id, &id).await?;
    key.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(key)))
}

/// What the key list takes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyListParams {
    /// The keys this member owns only.
    pub(crate) user: Option<String>,
    /// `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/orgs/{org}/keys", operation_id = "keys_list", tag = "keys", params(("org" = String, Path, description = "org id"), KeyListParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<KeyJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<KeyListParams>,
) -> ApiResult<Json<ListJson<KeyJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)?;
    let after = cursor::after_id("keys", p.cursor.as_deref())?;
    let owner = p
        .user
        .as_deref()
        .map(|u| UserId::new(u).map_err(|e| ApiError::invalid(e.to_string())))
        .transpose()?;
    state.engine.meter.flush_for_read().await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let rows = state
        .engine
        .db
        .keys_where(
            &org_id,
            month,
            after.as_deref(),
            None,
            owner.as_ref().map(UserId::as_str),
            limit + 1,
        )
        .await?;
    let more = rows.len() > limit as usize;
    let items: Vec<KeyJson> = rows
        .into_iter()
        .take(limit as usize)
        .map(KeyJson::from)
        .collect();
    let items = with_held(&state.engine, &org_id, items).await?;
    let next_cursor = more
        .then(|| {
            items
                .last()
                .map(|k| cursor::encode_after("keys", &json!(k.id)))
        })
        .flatten();
    Ok(Json(ListJson { items, next_cursor }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct KeyDetail {
    #[serde(flatten)]
    key: KeyJson,
    history: History,
}

#[utoipa::path(get, path = "/v1/orgs/{org}/keys/{key}", operation_id = "keys_get", tag = "keys", params(("org" = String, Path, description = "org id"), ("key" = String, Path, description = "key id"), HistoryParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = KeyDetail), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, key)): Path<(String, String)>,
    Params(p): Params<HistoryParams>,
) -> ApiResult<Json<KeyDetail>> {
    let org_id = org_access(&state, &caller, &org)?;
    let key_id = key_id(&key)?;
    state.engine.meter.flush_for_read().await?;
    let key = key_json(&state, &org_id, &key_id).await?;
    let history = history(&state.engine, &org_id, "key", &key_id, &p).await?;
    Ok(Json(KeyDetail { key, history }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchKey {
    /// Every feature of the key (replaces them).
    features: Option<Vec<String>>,
    /// A new monthly limit in micro-USD; `null`: unlimited.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    monthly_limit_micros: Option<Option<i64>>,
    /// `true` revokes the key (final); `false` is refused.
    revoked: Option<bool>,
    /// What it is for.
    name: Option<String>,
    /// The owner; `null`: none (the key then needs groups).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    user_id: Option<Option<String>>,
    /// The key's groups, all of them (replaces the list).
    group_ids: Option<Vec<String>>,
    /// RFC 3339; `null`: never expires.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    expires_at: Option<Option<String>>,
}

#[utoipa::path(patch, path = "/v1/orgs/{org}/keys/{key}", operation_id = "keys_patch", tag = "keys", params(("org" = String, Path, description = "org id"), ("key" = String, Path, description = "key id")), request_body = PatchKey, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = KeyJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, key)): Path<(String, String)>,
    JsonBody(req): JsonBody<PatchKey>,
) -> ApiResult<Json<KeyJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let key_id = key_id(&key)?;
    if req.revoked == Some(false) {
        return Err(ApiError::rule(
            "a revoked key cannot be restored; create a new key",
        ));
    }
    let invalid = |e: tally_core::ids::IdError| ApiError::invalid(e.to_string());
    let cmd = Command::UpdateKey {
        key_id: key_id.clone(),
        features: req.features,
        monthly_limit_micros: req.monthly_limit_micros,
        name: req.name,
        user_id: req
            .user_id
            .map(|u| u.as_deref().map(UserId::new).transpose())
            .transpose()
            .map_err(invalid)?,
        group_ids: req
            .group_ids
            .map(|gs| gs.iter().map(|g| GroupId::new(g)).collect::<Result<_, _>>())
            .transpose()
            .map_err(invalid)?,
        expires_at_ms: req
            .expires_at
            .map(|e| e.as_deref().map(|s| time_ms("expires_at", s)).transpose())
            .transpose()?,
        revoke: req.revoked == Some(true),
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    state.engine.meter.flush_for_read().await?;
    Ok(Json(key_json(&state, &org_id, &key_id).await?))
}

#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateKey {
    /// How long the old secret keeps working, in seconds (default 0: it
    /// stops at once; at most 7 days). A secret replaced by an earlier
    /// rotation stops at once either way.
    grace_seconds: Option<i64>,
}

/// Gives the key a new secret (in this response only). The old one keeps
/// working for the grace period, so gateways can switch without a gap.
#[utoipa::path(post, path = "/v1/orgs/{org}/keys/{key}/rotate", operation_id = "keys_rotate", tag = "keys", params(("org" = String, Path, description = "org id"), ("key" = String, Path, description = "key id")), request_body(content = Option<RotateKey>, description = "optional"), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = KeyJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 422, description = "the key is revoked", body = crate::error::ErrorBody)))]
pub(crate) async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, key)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<RotateKey>,
) -> ApiResult<Json<KeyJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let key_id = key_id(&key)?;
    let grace_seconds = body.unwrap_or_default().grace_seconds.unwrap_or(0);
    let max = tally_core::entity::KEY_ROTATION_GRACE_MAX_MS / 1000;
    if !(0..=max).contains(&grace_seconds) {
        return Err(ApiError::invalid(format!(
            "grace_seconds must be between 0 and {max}, got {grace_seconds}"
        )));
    }
    let secret = random_secret(KEY_SECRET_PREFIX)?;
    let cmd = Command::RotateKey {
        key_id: key_id.clone(),
        secret_hash: hash_secret(&secret),
        grace_ms: grace_seconds * 1000,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    state.engine.meter.flush_for_read().await?;
    let mut key = key_json(&state, &org_id, &key_id).await?;
    key.secret = Some(secret);
    Ok(Json(key))
}

#[utoipa::path(delete, path = "/v1/orgs/{org}/keys/{key}", operation_id = "keys_revoke", tag = "keys", params(("org" = String, Path, description = "org id"), ("key" = String, Path, description = "key id")), security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = KeyJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, key)): Path<(String, String)>,
) -> ApiResult<Json<KeyJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let key_id = key_id(&key)?;
    let cmd = Command::RevokeKey {
        key_id: key_id.clone(),
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok(Json(key_json(&state, &org_id, &key_id).await?))
}
