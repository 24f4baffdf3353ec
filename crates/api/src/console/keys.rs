//! The org's API keys: the list (owner, groups, features, limit, spend,
//! last use, revoked), creating one (its secret shown once, on the answer
//! to the form, never again) and revoking one.

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;

use super::view;
use super::{Fail, Fields, Layout, Session, href, render, render_as, see_other, seg};
use crate::AppState;
use crate::dto::KeyJson;
use crate::extract::{Caller, JsonBody, Params};
use crate::keys;

#[derive(Debug)]
struct KeyLine {
    id: String,
    name: String,
    owner: Option<(String, String)>,
    groups: Vec<String>,
    features: String,
    limit: String,
    spend: String,
    /// The month-end projection, and the day it reaches the limit.
    projected: String,
    reaches: Option<String>,
    requests: i64,
    last_used: String,
    revoked: bool,
    cut_off: bool,
    action: String,
}

fn key_line(org: &str, k: KeyJson, now_ms: i64) -> KeyLine {
    KeyLine {
        owner: k.user_id.as_ref().map(|u| {
            (
                u.clone(),
                format!("/console/orgs/{}/users/{}", seg(org), seg(u)),
            )
        }),
        action: format!("/console/orgs/{}/keys/{}", seg(org), seg(&k.id)),
        features: if k.features.is_empty() {
            "all".into()
        } else {
            k.features.join(", ")
        },
        limit: view::limit(k.monthly_limit_micros),
        spend: view::usd(k.spend_micros),
        projected: view::usd(k.projected_micros),
        reaches: k.projected_limit_date.clone(),
        requests: k.requests,
        last_used: k
            .last_used_at
            .as_deref()
            .and_then(view::parse_ms)
            .map_or_else(|| "never".to_owned(), |t| view::ago(t, now_ms)),
        revoked: k.revoked,
        cut_off: k.cut_off,
        groups: k.group_ids,
        id: k.id,
        name: k.name,
    }
}

#[derive(Template)]
#[template(path = "console/keys.html")]
struct KeysPage {
    layout: Layout,
    keys: Vec<KeyLine>,
    next: Option<String>,
    first: Option<String>,
    action: String,
    error: Option<String>,
    done: Option<&'static str>,
    /// A key just created: (id, secret), shown this once.
    created: Option<(String, String)>,
    /// What the create form shows again after a refusal.
    form: NewKey,
}

/// The create form's fields, as typed.
#[derive(Debug, Default)]
struct NewKey {
    name: String,
    user_id: String,
    group_ids: String,
    features: String,
    limit: String,
}

/// Keys a page.
const KEYS_ROWS: u32 = 50;

async fn keys_page(
    state: &AppState,
    session: &Session,
    org_id: &str,
    cursor: Option<String>,
) -> Result<KeysPage, Fail> {
    let layout = Layout::new(session, "API keys", Some(org_id), "keys");
    let page = keys::list(
        State(state.clone()),
        Caller(session.principal.clone()),
        Path(org_id.to_owned()),
        Params(keys::KeyListParams {
            user: None,
            cursor: cursor.clone(),
            limit: Some(KEYS_ROWS),
        }),
    )
    .await
    .map_err(|e| Fail::from(e).on(&layout))?
    .0;
    let now = state.engine.now_ms();
    let path = format!("/console/orgs/{}/keys", seg(org_id));
    Ok(KeysPage {
        keys: page
            .items
            .into_iter()
            .map(|k| key_line(org_id, k, now))
            .collect(),
        next: page.next_cursor.map(|c| href(&path, &[("cursor", &c)])),
        first: cursor.map(|_| path.clone()),
        action: path,
        error: None,
        done: None,
        created: None,
        form: NewKey::default(),
        layout,
    })
}

/// `GET /console/orgs/{org}/keys`.
pub(crate) async fn list(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let q = Fields::query(&uri)?;
    let mut page = keys_page(
        &state,
        &session,
        &org_id,
        q.get("cursor").map(str::to_owned),
    )
    .await?;
    page.done = match q.get("done") {
        Some("revoked") => Some("The key was revoked: authorize refuses it from now on."),
        _ => None,
    };
    Ok(render(&page))
}

/// A comma- or space-separated list.
fn list_of(s: &str) -> Vec<String> {
    s.split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn create_of(form: &Fields) -> Result<keys::CreateKey, Fail> {
    let limit = form.get("limit").map(super::typed_dollars).transpose()?;
    Ok(keys::CreateKey {
        id: None,
        name: form.get("name").unwrap_or("").to_owned(),
        user_id: form.get("user_id").map(str::to_owned),
        group_ids: list_of(form.get("group_ids").unwrap_or("")),
        features: list_of(form.get("features").unwrap_or("")),
        monthly_limit_micros: limit,
        expires_at: None,
    })
}

/// `POST /console/orgs/{org}/keys`: a new key. The answer shows its
/// secret, once; reloading it does not create another (the browser asks
/// before posting again, and the page is never cached).
pub(crate) async fn create(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    let created: Result<KeyJson, Fail> = async {
        session.check_form(&headers, &form)?;
        let req = create_of(&form)?;
        Ok(keys::create(
            State(state.clone()),
            Caller(session.principal.clone()),
            Path(org_id.clone()),
            JsonBody(req),
        )
        .await
        .map_err(Fail::from)?
        .1
        .0)
    }
    .await;
    let mut page = keys_page(&state, &session, &org_id, None).await?;
    match created {
        Ok(key) => {
            page.created = key.secret.map(|s| (key.id, s));
            Ok(render(&page))
        }
        Err(f) => {
            page.error = Some(f.message);
            page.form = NewKey {
                name: form.get("name").unwrap_or("").to_owned(),
                user_id: form.get("user_id").unwrap_or("").to_owned(),
                group_ids: form.get("group_ids").unwrap_or("").to_owned(),
                features: form.get("features").unwrap_or("").to_owned(),
                limit: form.get("limit").unwrap_or("").to_owned(),
            };
            Ok(render_as(f.status, &page))
        }
    }
}

/// `POST /console/orgs/{org}/keys/{key}`: revoke it.
pub(crate) async fn change(
    State(state): State<AppState>,
    session: Session,
    Path((org_id, key_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    let done: Result<(), Fail> = async {
        session.check_form(&headers, &form)?;
        match form.get("action") {
            Some("revoke") => {}
            other => {
                return Err(Fail::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown action {:?}: revoke", other.unwrap_or("")),
                ));
            }
        }
        let _ = keys::revoke(
            State(state.clone()),
            Caller(session.principal.clone()),
            Path((org_id.clone(), key_id.clone())),
        )
        .await
        .map_err(Fail::from)?;
        Ok(())
    }
    .await;
    match done {
        Ok(()) => Ok(see_other(&format!(
            "/console/orgs/{}/keys?done=revoked",
            seg(&org_id)
        ))),
        Err(f) => {
            let mut page = keys_page(&state, &session, &org_id, None).await?;
            page.error = Some(f.message);
            Ok(render_as(f.status, &page))
        }
    }
}
