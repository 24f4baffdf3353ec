//! The admin console: pages rendered by the server at `/console`, for
//! everything an org admin does.
//!
//! Pages are compile-time checked templates (askama) filled from the API's
//! own handlers, called with the signed-in principal: what a page shows and
//! what a form changes is exactly what the API would answer, by the same
//! access rules. Every page is plain links and forms; the small script
//! (`assets/console.js`) only makes them smoother. Sessions and CSRF:
//! [`session`].

mod activity;
mod assets;
mod bulk;
pub(crate) mod export;
mod groups;
mod keys;
mod pages;
mod session;
mod settings;
mod view;

use askama::Template;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tally_engine::Principal;

use crate::AppState;
use crate::error::ApiError;

pub(crate) use session::Session;

/// The console's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(pages::home))
        .route("/console/", get(pages::home))
        .route(
            "/console/sign-in",
            get(session::sign_in_page).post(session::sign_in),
        )
        .route("/console/sign-out", post(session::sign_out))
        .route("/console/assets/{file}", get(assets::serve))
        .route("/console/orgs", get(pages::orgs))
        .route("/console/orgs/{org}", get(pages::overview))
        .route("/console/orgs/{org}/users", get(pages::users))
        .route(
            "/console/orgs/{org}/users/{user}",
            get(pages::user).post(pages::user_change),
        )
        .route("/console/orgs/{org}/users.csv", get(export::users_csv))
        .route("/console/orgs/{org}/audit", get(activity::audit))
        .route("/console/orgs/{org}/alerts", get(activity::alerts))
        .route("/console/orgs/{org}/bulk", post(bulk::bulk))
        .route(
            "/console/orgs/{org}/settings",
            get(settings::get).post(settings::change),
        )
        .route(
            "/console/orgs/{org}/groups",
            get(groups::list).post(groups::create),
        )
        .route(
            "/console/orgs/{org}/groups/{group}",
            get(groups::get).post(groups::change),
        )
        .route(
            "/console/orgs/{org}/keys",
            get(keys::list).post(keys::create),
        )
        .route("/console/orgs/{org}/keys/{key}", post(keys::change))
        .layer(axum::extract::DefaultBodyLimit::max(FORM_BYTES_MAX))
}

/// What every page's frame shows: title, the org, who is signed in, the
/// CSRF token its forms carry.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub title: String,
    pub css: String,
    pub js: String,
    pub signed_in: bool,
    pub role: &'static str,
    pub operator: bool,
    /// Whether forms that change things are shown (not to a viewer).
    pub can_edit: bool,
    pub csrf: String,
    /// The org whose pages these are, for the navigation.
    pub org: Option<String>,
    /// Its overview's path.
    pub org_home: Option<String>,
    /// The section the navigation marks: overview, users, …
    pub nav: &'static str,
}

impl Layout {
    pub(crate) fn anonymous(title: impl Into<String>) -> Layout {
        Layout {
            title: title.into(),
            css: assets::CSS.url(),
            js: assets::JS.url(),
            signed_in: false,
            role: "",
            operator: false,
            can_edit: false,
            csrf: String::new(),
            org: None,
            org_home: None,
            nav: "",
        }
    }

    pub(crate) fn new(
        s: &Session,
        title: impl Into<String>,
        org: Option<&str>,
        nav: &'static str,
    ) -> Layout {
        Layout {
            signed_in: true,
            role: s.principal.role(),
            operator: matches!(s.principal, Principal::Operator),
            can_edit: s.can_edit(),
            csrf: s.csrf.clone(),
            org: org.map(str::to_owned),
            org_home: org.map(|o| format!("/console/orgs/{}", seg(o))),
            nav,
            ..Layout::anonymous(title)
        }
    }
}

/// A page that could not be shown, or a change refused: the message on a
/// page of its own, with the status the API would answer.
#[derive(Debug)]
pub(crate) struct Fail {
    pub status: StatusCode,
    pub message: String,
    /// The page's frame (boxed: a `Fail` travels in every `Result`).
    pub layout: Option<Box<Layout>>,
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    layout: Layout,
    status: u16,
    reason: &'a str,
    message: &'a str,
}

impl Fail {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Fail {
        Fail {
            status,
            message: message.into(),
            layout: None,
        }
    }

    pub(crate) fn on(mut self, layout: &Layout) -> Fail {
        self.layout = Some(Box::new(layout.clone()));
        self
    }
}

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Fail {
        Fail::new(e.status, e.message)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let layout = self
            .layout
            .map_or_else(|| Layout::anonymous("Error"), |l| *l);
        let page = ErrorPage {
            layout: Layout {
                title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
                ..layout
            },
            status: self.status.as_u16(),
            reason: self.status.canonical_reason().unwrap_or("Error"),
            message: &self.message,
        };
        (self.status, render(&page)).into_response()
    }
}

/// What a console page may load and where its forms may go: only the
/// console's own files, no inline script, never framed.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A page's HTML, never cached (it shows live figures and a CSRF token).
pub(crate) fn render<T: Template>(page: &T) -> Response {
    match page.render() {
        Ok(html) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::REFERRER_POLICY, "same-origin"),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

/// A page answering a refused form: the page again, with the refusal's
/// status.
pub(crate) fn render_as<T: Template>(status: StatusCode, page: &T) -> Response {
    let mut resp = render(page);
    *resp.status_mut() = status;
    resp
}

/// After a change: back to a page (303, so a reload does not repeat it).
pub(crate) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// A form's fields or a query string's parameters, in order; a name may
/// repeat (checkboxes).
#[derive(Default)]
pub(crate) struct Fields(Vec<(String, String)>);

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the sign-in form carries a token.
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

/// The largest form a console page posts (a page's bulk bar with every
/// row ticked is a few kilobytes).
const FORM_BYTES_MAX: usize = 256 << 10;

/// The most fields one form or query string may carry.
const FIELDS_MAX: usize = 20_000;

impl Fields {
    pub(crate) fn parse(raw: &[u8]) -> Result<Fields, Fail> {
        let mut out = Vec::new();
        for (k, v) in form_urlencoded::parse(raw) {
            if out.len() == FIELDS_MAX {
                return Err(Fail::new(
                    StatusCode::BAD_REQUEST,
                    format!("a form may carry at most {FIELDS_MAX} fields"),
                ));
            }
            out.push((k.into_owned(), v.into_owned()));
        }
        Ok(Fields(out))
    }

    pub(crate) fn query(uri: &axum::http::Uri) -> Result<Fields, Fail> {
        Fields::parse(uri.query().unwrap_or("").as_bytes())
    }

    /// The field's value; empty (or only spaces) counts as absent.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Every non-empty value of a repeated field (checkboxes).
    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// A form post must come from the console's own pages: a browser sends
/// `Origin` with every POST, and it must name this host, as the request
/// reached us (`Host`) or as a proxy in front says it reached the proxy
/// (`X-Forwarded-Host`: a page of another site cannot set that header on a
/// form's post).
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), Fail> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://").map(|(_, rest)| rest));
    let ours = |name: &str| {
        headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split(',').next())
            .map(str::trim)
    };
    let matches = |o: &str| {
        [ours("host"), ours("x-forwarded-host")]
            .into_iter()
            .flatten()
            .any(|h| o.eq_ignore_ascii_case(h))
    };
    match origin_host {
        Some(o) if matches(o) => Ok(()),
        _ => Err(Fail::new(
            StatusCode::FORBIDDEN,
            "this form was sent from another site; nothing was changed",
        )),
    }
}

/// A URL under `/console/` that a form may send its user back to; anything
/// else (another site, `//host`, a path elsewhere) gives `fallback`.
pub(crate) fn local_target(to: Option<&str>, fallback: &str) -> String {
    match to {
        Some(t)
            if t.starts_with("/console/")
                && !t.starts_with("//")
                && !t.contains("://")
                && !t.contains('\\')
                && !t.chars().any(char::is_control) =>
        {
            t.to_owned()
        }
        _ => fallback.to_owned(),
    }
}

/// A path with a query string, empty values left out.
pub(crate) fn href(path: &str, params: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        if !v.is_empty() {
            let _ = q.append_pair(k, v);
        }
    }
    let q = q.finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

/// A dollar amount typed in a form (`250`, `$1,200.50`) in micro-USD;
/// otherwise a 400 naming what was typed.
pub(crate) fn typed_dollars(raw: &str) -> Result<i64, Fail> {
    tally_core::money::parse_usd(&raw.trim_start_matches('$').replace(',', "")).ok_or_else(|| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("the limit must be an amount in dollars, such as 250 or 99.50; got {raw:?}"),
        )
    })
}

/// An id as a path segment.
pub(crate) fn seg(id: &str) -> String {
    form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_send_people_back_only_within_the_console() {
        let f = "/console";
        assert_eq!(
            local_target(Some("/console/orgs/a/users?q=x"), f),
            "/console/orgs/a/users?q=x"
        );
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/v1/orgs",
            "/console/\\evil",
            "/console/\nx",
        ] {
            assert_eq!(local_target(Some(bad), f), f, "{bad:?}");
        }
        assert_eq!(local_target(None, f), f);
    }

    #[test]
    fn fields_keep_repeats_and_drop_empties() {
        let f = Fields::parse(b"user_ids=a&user_ids=b&q=&status=+active+").unwrap();
        assert_eq!(f.all("user_ids"), ["a", "b"]);
        assert_eq!(f.get("q"), None);
        assert_eq!(f.get("status"), Some("active"));
        assert_eq!(href("/p", &[("a", "x y"), ("b", "")]), "/p?a=x+y");
    }

    #[test]
    fn a_post_from_another_site_is_refused() {
        let mut h = HeaderMap::new();
        let _ = h.insert(header::HOST, "tally.example:8080".parse().unwrap());
        assert!(same_origin(&h).is_ok());
        let _ = h.insert(header::ORIGIN, "http://tally.example:8080".parse().unwrap());
        assert!(same_origin(&h).is_ok());
        let _ = h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(same_origin(&h).is_err());
        let _ = h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(same_origin(&h).is_err());
        // Behind a proxy that rewrites Host and says where it was reached.
        let _ = h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        let _ = h.insert(header::ORIGIN, "https://tally.example".parse().unwrap());
        assert!(same_origin(&h).is_err());
        let _ = h.insert("x-forwarded-host", "tally.example".parse().unwrap());
        assert!(same_origin(&h).is_ok());
    }
}
