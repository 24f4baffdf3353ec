//! Orgs, their audit trail and enforcement history.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_core::entity::{Command, EntityEvent, EventKind};
use tally_core::ids::OrgId;
use tally_core::time::Month;
use tally_engine::random_id;
use tally_proto::format_rfc3339_ms;
use tally_store::log::EventQuery;
use tally_store::query::{DeadLetterRow, EnforcementFilter, EnforcementKey};

use crate::cursor::{self, PageParams};
use crate::dto::{
    EventJson, Fraction, History, HistoryParams, ListJson, OrgJson, OrgListJson, fractions_to_bps,
    history, one_with_held, present,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody, Params};
use crate::{AppState, org_access, page_len};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"id": "acme", "name": "Acme", "default_monthly_limit_micros": 50_000_000, "alert_thresholds": [0.5, 0.8, 1]})))]
pub(crate) struct CreateOrg {
    /// The org's id; default: generated.
    id: Option<String>,
    /// Its display name.
    name: String,
    /// The monthly limit new members get, in micro-USD; absent or `null`: unlimited.
    #[serde(default)]
    default_monthly_limit_micros: Option<i64>,
    /// Fractions of a limit at which a subject's crossing is announced (default 0.8 and 1).
    #[schema(value_type = Option<Vec<crate::dto::Fraction>>)]
    alert_thresholds: Option<Vec<serde_json::Number>>,
    /// The org's own limit on its total monthly spend (absent or null:
    /// none).
    #[serde(default)]
    monthly_limit_micros: Option<i64>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchOrg {
    /// A new display name.
    pub(crate) name: Option<String>,
    /// The monthly limit new members get from now on, in micro-USD; `null`: unlimited.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub(crate) default_monthly_limit_micros: Option<Option<i64>>,
    /// New alert thresholds, fractions of a limit.
    #[schema(value_type = Option<Vec<crate::dto::Fraction>>)]
    pub(crate) alert_thresholds: Option<Vec<serde_json::Number>>,
    /// `null`: no org limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub(crate) monthly_limit_micros: Option<Option<i64>>,
}

/// What the operator's list of orgs takes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrgListParams {
    /// Orgs whose id or name contains this (case-insensitive).
    pub(crate) q: Option<String>,
    /// `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

/// Every org, by id (operator token): searchable by id and name, with each
/// org's spend this month and its members. One query a page.
#[utoipa::path(get, path = "/v1/orgs", operation_id = "orgs_list", tag = "orgs", params(OrgListParams), security(("bearer" = ["operator"])), responses((status = 200, description = "ok", body = ListJson<OrgListJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "not the operator", body = crate::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Params(p): Params<OrgListParams>,
) -> ApiResult<Json<ListJson<OrgListJson>>> {
    caller.require_operator()?;
    let limit = page_len(p.limit)?;
    let after = cursor::after_id("orgs", p.cursor.as_deref())?;
    if let Some(q) = &p.q
        && q.chars().count() > 200
    {
        return Err(ApiError::invalid("q is longer than 200 characters"));
    }
    state.engine.meter.flush_for_read().await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let rows = state
        .engine
        .db
        .list_orgs(month, p.q.as_deref(), after.as_deref(), limit + 1)
        .await?;
    let items: Vec<OrgListJson> = rows
        .into_iter()
        .map(|r| OrgListJson {
            utilization: tally_core::ratio::utilization(r.spend_micros, r.monthly_limit_micros),
            cut_off: crate::dto::cut_off(r.spend_micros, r.monthly_limit_micros),
            id: r.id,
            name: r.name,
            member_count: r.member_count,
            spend_micros: r.spend_micros,
            requests: r.requests,
            monthly_limit_micros: r.monthly_limit_micros,
            default_monthly_limit_micros: r.default_monthly_limit_micros,
            month: month.to_string(),
            created_at: format_rfc3339_ms(r.created_at_ms),
        })
        .collect();
    Ok(Json(cursor::page(items, limit as usize, "orgs", |o| {
        json!(o.id)
    })))
}

pub(crate) async fn org_json(state: &AppState, org_id: &OrgId) -> ApiResult<Json<OrgJson>> {
    state.engine.meter.flush_for_read().await?;
    let month = Month::from_unix_ms(state.engine.now_ms());
    let row = state
        .engine
        .db
        .org(org_id, month)
        .await?
        .ok_or_else(|| ApiError::not_found("no such org"))?;
    Ok(Json(
        one_with_held(&state.engine, org_id, OrgJson::new(row, month)).await?,
    ))
}

#[utoipa::path(post, path = "/v1/orgs", operation_id = "orgs_create", tag = "orgs", request_body = CreateOrg, security(("bearer" = ["operator"])), responses((status = 201, description = "created", body = OrgJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateOrg>,
) -> ApiResult<(StatusCode, Json<OrgJson>)> {
    caller.require_operator()?;
    let id = match req.id {
        Some(id) => id,
        None => random_id("org_")?,
    };
    let org_id = OrgId::new(&id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let cmd = Command::CreateOrg {
        name: req.name,
        default_monthly_limit_micros: req.default_monthly_limit_micros,
        alert_thresholds_bps: req
            .alert_thresholds
            .as_deref()
            .map(fractions_to_bps)
            .transpose()?,
        monthly_limit_micros: req.monthly_limit_micros,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    Ok((StatusCode::CREATED, org_json(&state, &org_id).await?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OrgDetail {
    #[serde(flatten)]
    pub(crate) org: OrgJson,
    pub(crate) history: History,
}

/// The org's settings, this month's spend, and its history.
#[utoipa::path(get, path = "/v1/orgs/{org}", operation_id = "orgs_get", tag = "orgs", params(("org" = String, Path, description = "org id"), HistoryParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = OrgDetail), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<HistoryParams>,
) -> ApiResult<Json<OrgDetail>> {
    let org_id = org_access(&state, &caller, &org)?;
    let Json(org) = org_json(&state, &org_id).await?;
    let history = history(&state.engine, &org_id, "org", &org_id, &p).await?;
    Ok(Json(OrgDetail { org, history }))
}

#[utoipa::path(patch, path = "/v1/orgs/{org}", operation_id = "orgs_patch", tag = "orgs", params(("org" = String, Path, description = "org id")), request_body = PatchOrg, security(("bearer" = ["operator", "admin"])), responses((status = 200, description = "ok", body = OrgJson), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody), (status = 409, description = "conflict", body = crate::error::ErrorBody), (status = 422, description = "a rule forbids it", body = crate::error::ErrorBody)))]
pub(crate) async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(req): JsonBody<PatchOrg>,
) -> ApiResult<Json<OrgJson>> {
    let org_id = org_access(&state, &caller, &org)?;
    let cmd = Command::ChangeSettings {
        name: req.name,
        default_monthly_limit_micros: req.default_monthly_limit_micros,
        alert_thresholds_bps: req
            .alert_thresholds
            .as_deref()
            .map(fractions_to_bps)
            .transpose()?,
        monthly_limit_micros: req.monthly_limit_micros,
    };
    let _ = state
        .engine
        .commands
        .execute(&org_id, caller.actor(), &cmd)
        .await?;
    org_json(&state, &org_id).await
}

fn event_json(e: &EntityEvent) -> EventJson {
    let mut v = serde_json::to_value(e).expect("events serialize");
    if let Some(o) = v.as_object_mut() {
        let _ = o.insert("at".into(), json!(format_rfc3339_ms(e.at_ms)));
        let _ = o.remove("at_ms");
        // Fractions, as everywhere else in the API.
        for field in ["alert_thresholds_bps"] {
            if let Some(bps) = o.remove(field) {
                let fractions: Vec<Fraction> = serde_json::from_value::<Vec<u32>>(bps)
                    .unwrap_or_default()
                    .into_iter()
                    .map(Fraction)
                    .collect();
                let _ = o.insert("alert_thresholds".into(), json!(fractions));
            }
        }
    }
    EventJson(v)
}

/// What the audit trail takes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    /// `oldest` first (the default) or `newest` first.
    pub(crate) order: Option<String>,
    /// Changes by this actor only: `operator` or `token:<token id>`.
    pub(crate) actor: Option<String>,
    /// Of these kinds only, comma-separated (`user_added,user_limit_set`).
    pub(crate) kind: Option<String>,
    /// About this entity only: `user:<id>`, `group:<id>`, `key:<id>`,
    /// `token:<id>`, or `org` (the org's settings, limit and webhook). A
    /// membership is about its user and its group.
    pub(crate) subject: Option<String>,
    /// At or after this time: RFC 3339, or a day (`2026-11-01`, its start, UTC).
    pub(crate) from: Option<String>,
    /// Before this time: RFC 3339, or a day (its start, UTC).
    pub(crate) to: Option<String>,
    /// `next_cursor` of the previous page (same order).
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

/// Rows a subject filter examines for one page at most: a page may come
/// back short, with a cursor to go on from.
const SUBJECT_SCAN_MAX: usize = 10_000;
const SUBJECT_SCAN_CHUNK: u32 = 500;

/// A time bound: RFC 3339, or a day at its start (UTC).
fn time_bound(name: &str, s: &str) -> ApiResult<i64> {
    if let Some(ms) = tally_proto::parse_rfc3339_ms(s) {
        return Ok(ms);
    }
    tally_proto::parse_rfc3339_ms(&format!("{s}T00:00:00Z")).ok_or_else(|| {
        ApiError::invalid(format!(
            "{name} must be an RFC 3339 time or a day (2026-11-01), got {s:?}"
        ))
    })
}

/// The audit trail: every change with its actor and time, oldest or newest
/// first, filtered by actor, kind, subject and time.
#[utoipa::path(get, path = "/v1/orgs/{org}/events", operation_id = "orgs_events", tag = "orgs", params(("org" = String, Path, description = "org id"), EventsParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<crate::dto::EventJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<EventsParams>,
) -> ApiResult<Json<ListJson<EventJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)? as usize;
    let newest_first = cursor::newest_first(p.order.as_deref())?;
    // Cursors of the two orders are not interchangeable.
    let list = if newest_first {
        "events_newest"
    } else {
        "events"
    };
    let after_seq = p
        .cursor
        .as_deref()
        .map(|c| {
            cursor::decode_after(list, c)?
                .as_u64()
                .ok_or_else(|| ApiError::invalid("cursor is malformed"))
        })
        .transpose()?;
    let actor = p
        .actor
        .map(|a| {
            tally_core::entity::Actor::parse(&a)
                .map(|a| a.to_string())
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "actor must be operator or token:<token id>, got {a:?}"
                    ))
                })
        })
        .transpose()?;
    let kinds = p
        .kind
        .as_deref()
        .map(|k| {
            k.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| {
                    EventKind::NAMES
                        .iter()
                        .find(|n| **n == k)
                        .map(|n| (*n).to_owned())
                        .ok_or_else(|| {
                            ApiError::invalid(format!(
                                "kind {k:?} is not one of {}",
                                EventKind::NAMES.join(", ")
                            ))
                        })
                })
                .collect::<ApiResult<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    // Each kind once: at most as many placeholders as there are kinds.
    let kinds: Vec<String> = EventKind::NAMES
        .iter()
        .filter(|n| kinds.iter().any(|k| k == *n))
        .map(|n| (*n).to_owned())
        .collect();
    let subject = p
        .subject
        .as_deref()
        .map(|s| match s.split_once(':') {
            None if s == "org" => Ok(("org", String::new())),
            Some((kind @ ("user" | "group" | "key" | "token"), id)) if !id.is_empty() => {
                Ok((kind, id.to_owned()))
            }
            _ => Err(ApiError::invalid(format!(
                "subject must be user:<id>, group:<id>, key:<id>, token:<id> or org, got {s:?}"
            ))),
        })
        .transpose()?;
    let from_ms = p
        .from
        .as_deref()
        .map(|s| time_bound("from", s))
        .transpose()?;
    let to_ms = p.to.as_deref().map(|s| time_bound("to", s)).transpose()?;
    let mut q = EventQuery {
        newest_first,
        after_seq,
        actor,
        kinds,
        from_ms,
        to_ms,
    };
    // Without a subject every row read is on the page; with one, rows are
    // read a chunk at a time and filtered here, at most SUBJECT_SCAN_MAX.
    let chunk = if subject.is_some() {
        SUBJECT_SCAN_CHUNK
    } else {
        limit as u32 + 1
    };
    let mut items: Vec<EntityEvent> = Vec::new();
    let mut scanned = 0;
    let next_seq = 'scan: loop {
        let rows = state.engine.db.org_events_where(&org_id, &q, chunk).await?;
        let read = rows.len();
        for e in rows {
            let seq = e.seq;
            if subject
                .as_ref()
                .is_none_or(|(kind, id)| e.kind.concerns(kind, id))
            {
                if items.len() == limit {
                    // One more exists: the page ends at its last row.
                    break 'scan items.last().map(|e| e.seq);
                }
                items.push(e);
            }
            scanned += 1;
            q.after_seq = Some(seq);
        }
        if read < chunk as usize {
            break None;
        }
        if scanned >= SUBJECT_SCAN_MAX {
            // A short page: the next goes on from the last row examined.
            break q.after_seq;
        }
    };
    Ok(Json(ListJson {
        items: items.iter().map(event_json).collect(),
        next_cursor: next_seq.map(|seq| cursor::encode_after(list, &json!(seq))),
    }))
}

/// A threshold crossed, a forecast over the limit, a cutoff or a lift.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct EnforcementJson {
    /// user, group, key or org
    pub(crate) subject_kind: String,
    /// The subject's id.
    pub(crate) subject_id: String,
    /// The month it belongs to (`2026-12`).
    pub(crate) month: String,
    /// threshold_crossed, forecast_over_limit, cut_off or cutoff_lifted
    pub(crate) event: String,
    /// For threshold_crossed: the fraction of the limit.
    pub(crate) threshold: Option<Fraction>,
    /// For forecast_over_limit: the month-end projection then, in micro-USD.
    pub(crate) projected_micros: Option<i64>,
    /// For forecast_over_limit: the UTC day spend would reach the limit
    /// at the run-rate then (`2026-12-20`).
    pub(crate) projected_limit_date: Option<String>,
    /// For cutoff_lifted: limit_raised, limit_removed or new_month.
    pub(crate) reason: Option<String>,
    /// The subject's spend then, in micro-USD.
    pub(crate) spend_micros: i64,
    /// The limit then, in micro-USD.
    pub(crate) limit_micros: Option<i64>,
    /// When it happened.
    pub(crate) at: String,
}

/// What the enforcement list takes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnforcementParams {
    /// Of this kind only: `threshold_crossed`, `forecast_over_limit`,
    /// `cut_off` or `cutoff_lifted`.
    pub(crate) event: Option<String>,
    /// About this subject only: `user:<id>`, `group:<id>`, `key:<id>` or
    /// `org`.
    pub(crate) subject: Option<String>,
    /// `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

/// The enforcement list's filter, checked.
fn enforcement_filter(org_id: &OrgId, p: &EnforcementParams) -> ApiResult<EnforcementFilter> {
    let event = match p.event.as_deref() {
        None | Some("") => None,
        Some(e @ ("threshold_crossed" | "forecast_over_limit" | "cut_off" | "cutoff_lifted")) => {
            Some(e.to_owned())
        }
        Some(e) => {
            return Err(ApiError::invalid(format!(
                "event {e:?} is not one of threshold_crossed, forecast_over_limit, cut_off, \
                 cutoff_lifted"
            )));
        }
    };
    let (subject_kind, subject_id) = match p.subject.as_deref() {
        None | Some("") => (None, None),
        Some("org") => (Some("org".to_owned()), Some(org_id.to_string())),
        Some(s) => {
            let (kind, id) = s
                .split_once(':')
                .filter(|(k, id)| matches!(*k, "user" | "group" | "key") && !id.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "subject {s:?} is not user:<id>, group:<id>, key:<id> or org"
                    ))
                })?;
            (Some(kind.to_owned()), Some(id.to_owned()))
        }
    };
    Ok(EnforcementFilter {
        event,
        subject_kind,
        subject_id,
    })
}

/// Thresholds crossed, cutoffs and lifts, newest first; of one kind, or
/// about one subject.
#[utoipa::path(get, path = "/v1/orgs/{org}/enforcement", operation_id = "orgs_enforcement", tag = "orgs", params(("org" = String, Path, description = "org id"), EnforcementParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<EnforcementJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn enforcement(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<EnforcementParams>,
) -> ApiResult<Json<ListJson<EnforcementJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)?;
    let filter = enforcement_filter(&org_id, &p)?;
    let after = p
        .cursor
        .as_deref()
        .map(|c| enforcement_key(&cursor::decode_after("enforcement", c)?))
        .transpose()?;
    state.engine.meter.flush_for_read().await?;
    let rows = state
        .engine
        .db
        .list_enforcement_where(&org_id, &filter, after.as_ref(), limit + 1)
        .await?;
    // The cursor is the row's key (EnforcementRow::key), in order.
    let page = cursor::page(rows, limit as usize, "enforcement", |r| {
        json!([
            r.at_ms,
            r.subject_kind,
            r.subject_id,
            r.month,
            r.event,
            r.threshold_bps,
            r.ordinal
        ])
    });
    let items = page
        .items
        .into_iter()
        .map(|r| EnforcementJson {
            projected_limit_date: r.limit_date().map(|d| d.to_string()),
            subject_kind: r.subject_kind,
            subject_id: r.subject_id,
            month: u32::try_from(r.month)
                .ok()
                .and_then(Month::from_yyyymm)
                .map_or_else(|| r.month.to_string(), |m| m.to_string()),
            event: r.event,
            threshold: u32::try_from(r.threshold_bps)
                .ok()
                .filter(|t| *t > 0)
                .map(Fraction),
            projected_micros: r.projected_micros,
            reason: r.reason,
            spend_micros: r.spend_micros,
            limit_micros: r.limit_micros,
            at: format_rfc3339_ms(r.at_ms),
        })
        .collect();
    Ok(Json(ListJson {
        items,
        next_cursor: page.next_cursor,
    }))
}

/// The row an enforcement cursor names.
fn enforcement_key(v: &Value) -> ApiResult<EnforcementKey> {
    let bad = || ApiError::invalid("cursor is malformed or belongs to another listing");
    let Some(
        [
            Value::Number(at),
            Value::String(kind),
            Value::String(id),
            Value::Number(month),
            Value::String(event),
            Value::Number(bps),
            Value::Number(ordinal),
        ],
    ) = v.as_array().map(Vec::as_slice)
    else {
        return Err(bad());
    };
    let int = |n: &serde_json::Number| n.as_i64().ok_or_else(bad);
    Ok(EnforcementKey {
        at_ms: int(at)?,
        subject_kind: kind.clone(),
        subject_id: id.clone(),
        month: int(month)?,
        event: event.clone(),
        threshold_bps: int(bps)?,
        ordinal: int(ordinal)?,
    })
}

/// Where a page of dead letters starts: after the one a cursor names
/// (logged at, partition, position).
fn dead_letter_after(cursor: Option<&str>) -> ApiResult<Option<(i64, i64, i64)>> {
    cursor
        .map(|c| {
            let v = cursor::decode_after("dead_letters", c)?;
            match v.as_array().map(Vec::as_slice) {
                Some([a, b, c]) => a
                    .as_i64()
                    .zip(b.as_i64())
                    .zip(c.as_i64())
                    .map(|((a, b), c)| (a, b, c)),
                _ => None,
            }
            .ok_or_else(|| ApiError::invalid("cursor is malformed or belongs to another listing"))
        })
        .transpose()
}

/// A page of dead letters read with one row more than `limit`.
fn dead_letter_page(rows: Vec<DeadLetterRow>, limit: u32) -> ListJson<DeadLetterJson> {
    let page = cursor::page(rows, limit as usize, "dead_letters", |r| {
        json!([r.logged_at_ms, r.partition_id, r.position])
    });
    ListJson {
        items: page.items.into_iter().map(dead_letter_json).collect(),
        next_cursor: page.next_cursor,
    }
}

/// Usage that could not be counted.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadLetterJson {
    /// The usage log partition and position it was read from.
    partition: i64,
    /// Its offset in that partition.
    position: i64,
    /// When the usage log took it.
    logged_at: String,
    /// The org it named, if any.
    org_id: Option<String>,
    /// Why it was not counted (`malformed`, `unknown_org`, `unknown_user`, …).
    reason: String,
    /// Why, in words.
    message: String,
}

fn dead_letter_json(r: DeadLetterRow) -> DeadLetterJson {
    DeadLetterJson {
        partition: r.partition_id,
        position: r.position,
        logged_at: format_rfc3339_ms(r.logged_at_ms),
        org_id: r.org_id,
        reason: r.reason,
        message: r.message,
    }
}

/// Usage of this org that could not be counted, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/dead-letters", operation_id = "orgs_dead_letters", tag = "usage", params(("org" = String, Path, description = "org id"), PageParams), security(("bearer" = ["operator", "admin", "viewer"])), responses((status = 200, description = "ok", body = ListJson<DeadLetterJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<DeadLetterJson>>> {
    let org_id = org_access(&state, &caller, &org)?;
    let limit = page_len(p.limit)?;
    let after = dead_letter_after(p.cursor.as_deref())?;
    state.engine.meter.flush_for_read().await?;
    let rows = state
        .engine
        .db
        .list_dead_letters(Some(&org_id), after, limit + 1)
        .await?;
    Ok(Json(dead_letter_page(rows, limit)))
}

/// Every dead letter, also those of no known org (operator token).
#[utoipa::path(get, path = "/v1/dead-letters", operation_id = "orgs_all_dead_letters", tag = "usage", params(PageParams), security(("bearer" = ["operator"])), responses((status = 200, description = "ok", body = ListJson<DeadLetterJson>), (status = 400, description = "invalid input", body = crate::error::ErrorBody), (status = 401, description = "no or unknown token", body = crate::error::ErrorBody), (status = 403, description = "a token of another org", body = crate::error::ErrorBody), (status = 404, description = "no such org or entity", body = crate::error::ErrorBody)))]
pub(crate) async fn all_dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    Params(p): Params<PageParams>,
) -> ApiResult<Json<ListJson<DeadLetterJson>>> {
    caller.require_operator()?;
    let limit = page_len(p.limit)?;
    let after = dead_letter_after(p.cursor.as_deref())?;
    state.engine.meter.flush_for_read().await?;
    let rows = state
        .engine
        .db
        .list_dead_letters(None, after, limit + 1)
        .await?;
    Ok(Json(dead_letter_page(rows, limit)))
}
