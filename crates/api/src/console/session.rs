//! Signing in to the console: a token (org admin, org viewer, or the
//! operator) is exchanged for a session cookie, `HttpOnly`,
//! `SameSite=Strict`, `Secure` behind TLS, expiring after
//! [`SESSION_TTL_MS`]. The session is stored by the cookie's hash with the
//! token's hash (never the token), so revoking the token closes it at
//! once, and every process of a deployment honours a sign-out. Each session
//! has a CSRF token every form carries; a form without it, or from another
//! origin, changes nothing. The token travels only in the sign-in form's
//! body: never in a URL, never in a log.

use askama::Template;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tally_core::secret::{SecretHash, ct_eq, hash_secret};
use tally_engine::{Principal, random_secret};
use tally_store::sessions::Opened;

use super::{Fail, Fields, Layout, href, local_target, render, render_as, same_origin, see_other};
use crate::AppState;
use crate::error::ApiError;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "tally_session";
/// How long a session lasts: 8 hours from sign-in.
pub(crate) const SESSION_TTL_MS: i64 = 8 * 3_600_000;
/// Sessions live at once, every org together; past it sign-in is refused
/// until some expire.
pub(crate) const SESSIONS_LIVE_MAX: i64 = 100_000;
/// Sessions of one token: a new one closes its oldest past this.
pub(crate) const SESSIONS_PER_TOKEN_MAX: usize = 20;

/// A signed-in console user.
#[derive(Clone)]
pub(crate) struct Session {
    pub principal: Principal,
    pub csrf: String,
    id_hash: SecretHash,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the CSRF token or the cookie's hash.
        f.debug_struct("Session")
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Whether this session may change things: not a viewer's.
    pub(crate) fn can_edit(&self) -> bool {
        matches!(self.principal.role(), "operator" | "admin")
    }

    /// A form's right to change something: the session's CSRF token, from
    /// this origin, by an admin or the operator.
    pub(crate) fn check_form(&self, headers: &HeaderMap, form: &Fields) -> Result<(), Fail> {
        same_origin(headers)?;
        let sent = form.get("csrf").unwrap_or("");
        if !ct_eq(&hash_secret(sent), &hash_secret(&self.csrf)) {
            return Err(Fail::new(
                StatusCode::FORBIDDEN,
                "this form's security token is missing or stale (reload the page and try again); \
                 nothing was changed",
            ));
        }
        if !self.can_edit() {
            return Err(Fail::new(
                StatusCode::FORBIDDEN,
                "a viewer sees everything and changes nothing; nothing was changed",
            ));
        }
        Ok(())
    }
}

/// Whether a principal may use the console: the operator, an org's admin
/// or viewer; never a gateway (of one org or of every org).
fn console_role(p: &Principal) -> bool {
    matches!(p.role(), "operator" | "admin" | "viewer")
}

/// The cookie's value, if the request carries one.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

fn to_sign_in(parts: &Parts) -> Response {
    let next = parts
        .uri
        .path_and_query()
        .map_or("/console", |p| p.as_str());
    see_other(&href("/console/sign-in", &[("next", next)]))
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Session, Response> {
        let Some(id) = cookie(&parts.headers) else {
            return Err(to_sign_in(parts));
        };
        let id_hash = hash_secret(id);
        let engine = &state.engine;
        let row = engine
            .db
            .session(&id_hash, engine.now_ms())
            .await
            .map_err(|e| Fail::from(ApiError::from(e)).into_response())?;
        let Some(row) = row else {
            return Err(to_sign_in(parts));
        };
        let principal = engine
            .authenticate_hash(&row.token_hash)
            .await
            .map_err(|e| Fail::from(ApiError::from(e)).into_response())?;
        match principal {
            Some(p) if console_role(&p) => Ok(Session {
                principal: p,
                csrf: row.csrf,
                id_hash,
            }),
            // The token was revoked since: the session is over.
            _ => Err(to_sign_in(parts)),
        }
    }
}

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    layout: Layout,
    next: String,
    error: Option<String>,
    signed_out: bool,
}

/// `GET /console/sign-in`.
pub(crate) async fn sign_in_page(uri: axum::http::Uri) -> Result<Response, Fail> {
    let q = Fields::query(&uri)?;
    Ok(render(&SignInPage {
        layout: Layout::anonymous("Sign in"),
        next: local_target(q.get("next"), ""),
        error: None,
        signed_out: q.get("signed_out").is_some(),
    }))
}

/// `POST /console/sign-in`: the token for a session cookie.
pub(crate) async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    same_origin(&headers)?;
    let form = Fields::parse(&body)?;
    let next = local_target(form.get("next"), "/console");
    let refuse = |status: StatusCode, message: &str| {
        render_as(
            status,
            &SignInPage {
                layout: Layout::anonymous("Sign in"),
                next: next.clone(),
                error: Some(message.to_owned()),
                signed_out: false,
            },
        )
    };
    let Some(token) = form.get("token") else {
        return Ok(refuse(StatusCode::BAD_REQUEST, "enter a token"));
    };
    let engine = &state.engine;
    match engine.authenticate(token).await.map_err(ApiError::from)? {
        None => {
            return Ok(refuse(
                StatusCode::UNAUTHORIZED,
                "that token is unknown or revoked",
            ));
        }
        Some(p) if !console_role(&p) => {
            return Ok(refuse(
                StatusCode::FORBIDDEN,
                "a gateway token cannot sign in to the console: use an admin or viewer token",
            ));
        }
        Some(_) => {}
    }
    // A browser signing in again leaves its previous session closed.
    if let Some(old) = cookie(&headers) {
        engine
            .db
            .close_session(&hash_secret(old))
            .await
            .map_err(ApiError::from)?;
    }
    let id = random_secret("tcs_").map_err(ApiError::from)?;
    let csrf = random_secret("csrf_").map_err(ApiError::from)?;
    let now = engine.now_ms();
    let opened = engine
        .db
        .open_session(
            &hash_secret(&id),
            &hash_secret(token),
            &csrf,
            now,
            now + SESSION_TTL_MS,
            SESSIONS_LIVE_MAX,
            SESSIONS_PER_TOKEN_MAX,
        )
        .await
        .map_err(ApiError::from)?;
    if opened == Opened::Full {
        return Ok(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many console sessions are open; try again when some have expired",
        ));
    }
    let secure = if behind_tls(&headers) { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL_MS / 1000
    );
    let mut resp = see_other(&next);
    let _ = resp.headers_mut().insert(
        header::SET_COOKIE,
        cookie
            .parse()
            .map_err(|_| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "bad cookie"))?,
    );
    Ok(resp)
}

/// Whether the client reached us over TLS (a proxy in front says so).
fn behind_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// `POST /console/sign-out`: the session closed everywhere, the cookie
/// cleared.
pub(crate) async fn sign_out(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    same_origin(&headers)?;
    let sent = form.get("csrf").unwrap_or("");
    if !ct_eq(&hash_secret(sent), &hash_secret(&session.csrf)) {
        return Err(Fail::new(
            StatusCode::FORBIDDEN,
            "this form's security token is missing or stale; you are still signed in",
        ));
    }
    state
        .engine
        .db
        .close_session(&session.id_hash)
        .await
        .map_err(ApiError::from)?;
    let mut resp = see_other("/console/sign-in?signed_out=1");
    let _ = resp.headers_mut().insert(
        header::SET_COOKIE,
        axum::http::HeaderValue::from_static(
            "tally_session=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        let _ = h.append(
            header::COOKIE,
            "a=1; tally_session=tcs_x; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h), Some("tcs_x"));
        let mut h = HeaderMap::new();
        let _ = h.append(header::COOKIE, "tally_session=".parse().unwrap());
        assert_eq!(cookie(&h), None);
    }
}
