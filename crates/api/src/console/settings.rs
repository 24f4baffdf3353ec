//! An org's settings: its name, the default monthly limit new members get,
//! its own limit and alert thresholds; its webhook (set, removed, a test
//! send, the delivery log); its tokens (listed by role, minted with the
//! secret shown once, revoked).

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use tally_core::entity::Role;
use tally_core::ratio::format_bps;

use super::view;
use super::{
    Fail, Fields, Layout, Session, href, render, render_as, see_other, seg, typed_dollars,
};
use crate::AppState;
use crate::cursor::PageParams;
use crate::dto::WebhookFormatJson;
use crate::extract::{Caller, JsonBody, NoParams, OptionalJson, Params};
use crate::{orgs, tokens, webhooks};

#[derive(Debug)]
struct TokenLine {
    id: String,
    role: &'static str,
    name: String,
    created: String,
    last_used: String,
    revoked: bool,
}

#[derive(Debug)]
struct DeliveryLine {
    at: String,
    what: String,
    state: String,
    attempts: i64,
    outcome: String,
}

#[derive(Template)]
#[template(path = "console/settings.html")]
struct SettingsPage {
    layout: Layout,
    action: String,
    name: String,
    default_limit: String,
    org_limit: String,
    thresholds: String,
    webhook_url: String,
    /// `slack` or `tally` (also without a webhook).
    webhook_format: &'static str,
    webhook_since: String,
    webhook_counts: String,
    deliveries: Vec<DeliveryLine>,
    tokens: Vec<TokenLine>,
    tokens_more: bool,
    error: Option<String>,
    done: Option<String>,
    /// A secret shown once: (what, secret).
    secret: Option<(String, String)>,
}

/// Deliveries the log shows.
const DELIVERIES_SHOWN: u32 = 20;
/// Tokens the list shows.
const TOKENS_SHOWN: u32 = 200;

async fn settings_page(
    state: &AppState,
    session: &Session,
    org_id: &str,
) -> Result<SettingsPage, Fail> {
    let layout = Layout::new(session, "Settings", Some(org_id), "settings");
    let caller = || Caller(session.principal.clone());
    let fail = |e: crate::error::ApiError| Fail::from(e).on(&layout);
    let org = orgs::org_json(
        state,
        &crate::org_access(state, &caller(), org_id).map_err(fail)?,
    )
    .await
    .map_err(fail)?
    .0;
    let hook = webhooks::get(
        State(state.clone()),
        caller(),
        Path(org_id.to_owned()),
        Params(NoParams {}),
    )
    .await
    .map_err(fail)?
    .0;
    let deliveries = webhooks::deliveries(
        State(state.clone()),
        caller(),
        Path(org_id.to_owned()),
        Params(webhooks::DeliveryParams {
            state: None,
            cursor: None,
            limit: Some(DELIVERIES_SHOWN),
        }),
    )
    .await
    .map_err(fail)?
    .0;
    let toks = tokens::list(
        State(state.clone()),
        caller(),
        Path(org_id.to_owned()),
        Params(PageParams {
            cursor: None,
            limit: Some(TOKENS_SHOWN),
        }),
    )
    .await
    .map_err(fail)?
    .0;
    let now = state.engine.now_ms();
    let when = |t: &str| view::parse_ms(t).map_or_else(|| t.to_owned(), view::when);
    Ok(SettingsPage {
        action: format!("/console/orgs/{}/settings", seg(org_id)),
        default_limit: view::amount_input(org.default_monthly_limit_micros),
        org_limit: view::amount_input(org.monthly_limit_micros),
        thresholds: org
            .alert_thresholds
            .iter()
            .map(|f| format_bps(f.0 * 100))
            .collect::<Vec<_>>()
            .join(", "),
        name: org.name,
        webhook_url: hook.url.clone().unwrap_or_default(),
        webhook_format: match hook.format {
            Some(WebhookFormatJson::Slack) => "slack",
            _ => "tally",
        },
        webhook_since: hook.set_at.as_deref().map(when).unwrap_or_default(),
        webhook_counts: hook
            .deliveries
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        deliveries: deliveries
            .items
            .into_iter()
            .map(|d| DeliveryLine {
                at: when(&d.created_at),
                what: format!(
                    "{} {}: {}",
                    d.subject_kind,
                    d.subject_id,
                    super::activity::alert_words(&d.event, d.threshold.map(|t| t.0), None)
                ),
                outcome: match (&d.last_status, &d.last_error) {
                    (Some(s), _) => format!("HTTP {s}"),
                    (None, Some(e)) => e.clone(),
                    (None, None) => String::new(),
                },
                state: d.state,
                attempts: d.attempts,
            })
            .collect(),
        tokens_more: toks.next_cursor.is_some(),
        tokens: toks
            .items
            .into_iter()
            .map(|t| TokenLine {
                created: when(&t.created_at),
                last_used: t
                    .last_used_at
                    .as_deref()
                    .and_then(view::parse_ms)
                    .map_or_else(|| "never".to_owned(), |ms| view::ago(ms, now)),
                revoked: t.revoked_at.is_some(),
                id: t.id,
                role: t.role,
                name: t.name,
            })
            .collect(),
        error: None,
        done: None,
        secret: None,
        layout,
    })
}

/// `GET /console/orgs/{org}/settings`.
pub(crate) async fn get(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let mut page = settings_page(&state, &session, &org_id).await?;
    page.done = match Fields::query(&uri)?.get("done") {
        Some("org") => Some("The settings were saved.".into()),
        Some("webhook_removed") => {
            Some("The webhook was removed; pending deliveries are cancelled.".into())
        }
        Some("token_revoked") => {
            Some("The token was revoked: it opens nothing from now on.".into())
        }
        _ => None,
    };
    Ok(render(&page))
}

/// A percentage with at most two decimals (`87.5`) in basis points.
fn percent_bps(s: &str) -> Option<u32> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || int.len() > 3 || frac.len() > 2 || !digits(int) || !digits(frac) {
        return None;
    }
    let frac: u32 = format!("{frac:0<2}").parse().ok()?;
    Some(int.parse::<u32>().ok()? * 100 + frac)
}

/// Percentages as the API's fractions: `50, 80, 100` → `[0.5, 0.8, 1]`.
fn thresholds_of(raw: &str) -> Result<Vec<serde_json::Number>, Fail> {
    raw.split([',', ' '])
        .map(|s| s.trim().trim_end_matches('%').trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_bps(s)
                .and_then(|bps| format_bps(bps).parse::<serde_json::Number>().ok())
                .ok_or_else(|| {
                    Fail::new(
                        StatusCode::BAD_REQUEST,
                        format!("alert thresholds are percentages such as 50, 80, 100; got {s:?}"),
                    )
                })
        })
        .collect()
}

/// What a settings form did: a message, maybe a secret shown once.
enum Done {
    Redirect(&'static str),
    Page(String, Option<(String, String)>),
}

/// `POST /console/orgs/{org}/settings`.
pub(crate) async fn change(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Fail> {
    let form = Fields::parse(&body)?;
    let caller = || Caller(session.principal.clone());
    let path = || Path(org_id.clone());
    let done: Result<Done, Fail> = async {
        session.check_form(&headers, &form)?;
        match form.get("action") {
            Some("org") => {
                let limit = |k: &str| form.get(k).map(typed_dollars).transpose();
                let _ = orgs::patch(
                    State(state.clone()),
                    caller(),
                    path(),
                    JsonBody(orgs::PatchOrg {
                        name: form.get("name").map(str::to_owned),
                        default_monthly_limit_micros: Some(limit("default_limit")?),
                        alert_thresholds: Some(thresholds_of(
                            form.get("thresholds").unwrap_or(""),
                        )?),
                        monthly_limit_micros: Some(limit("org_limit")?),
                    }),
                )
                .await?;
                Ok(Done::Redirect("org"))
            }
            Some("webhook_set") => {
                let hook = webhooks::set(
                    State(state.clone()),
                    caller(),
                    path(),
                    JsonBody(webhooks::SetWebhook {
                        url: form.get("url").unwrap_or("").to_owned(),
                        format: match form.get("format") {
                            None | Some("tally") => WebhookFormatJson::Tally,
                            Some("slack") => WebhookFormatJson::Slack,
                            Some(other) => {
                                return Err(Fail::new(
                                    StatusCode::BAD_REQUEST,
                                    format!("the format is tally or slack, not {other:?}"),
                                ));
                            }
                        },
                    }),
                )
                .await?
                .0;
                Ok(Done::Page(
                    "The webhook was set. Its signing secret, shown this once:".into(),
                    hook.secret.map(|s| ("webhook".to_owned(), s)),
                ))
            }
            Some("webhook_remove") => {
                let _ = webhooks::remove(State(state.clone()), caller(), path()).await?;
                Ok(Done::Redirect("webhook_removed"))
            }
            Some("webhook_test") => {
                let r = webhooks::test(State(state.clone()), caller(), path())
                    .await?
                    .0;
                let message = if r.delivered {
                    format!(
                        "Test sent: the receiver answered HTTP {} in {} ms.",
                        r.status.unwrap_or_default(),
                        r.took_ms
                    )
                } else {
                    format!(
                        "Test not delivered: {} ({} ms).",
                        r.error.unwrap_or_else(|| format!(
                            "the receiver answered HTTP {}",
                            r.status.unwrap_or_default()
                        )),
                        r.took_ms
                    )
                };
                Ok(Done::Page(message, None))
            }
            Some("token_mint") => {
                let role = match form.get("role") {
                    Some("viewer") => Role::Viewer,
                    Some("admin") | None => Role::Admin,
                    Some(other) => {
                        return Err(Fail::new(
                            StatusCode::BAD_REQUEST,
                            format!("a token's role is admin or viewer here, not {other:?}"),
                        ));
                    }
                };
                let t = tokens::create(
                    State(state.clone()),
                    caller(),
                    path(),
                    OptionalJson(Some(tokens::CreateToken {
                        id: None,
                        role: Some(role),
                        name: form.get("name").map(str::to_owned),
                    })),
                )
                .await?
                .1
                .0;
                Ok(Done::Page(
                    format!(
                        "Token {} ({}) minted. Its secret, shown this once:",
                        t.id, t.role
                    ),
                    Some((t.id.clone(), t.token)),
                ))
            }
            Some("token_revoke") => {
                let id = form.get("token_id").unwrap_or("").to_owned();
                let _ = tokens::revoke(State(state.clone()), caller(), Path((org_id.clone(), id)))
                    .await?;
                Ok(Done::Redirect("token_revoked"))
            }
            other => Err(Fail::new(
                StatusCode::BAD_REQUEST,
                format!("unknown action {:?}", other.unwrap_or("")),
            )),
        }
    }
    .await;
    match done {
        Ok(Done::Redirect(what)) => Ok(see_other(&href(
            &format!("/console/orgs/{}/settings", seg(&org_id)),
            &[("done", what)],
        ))),
        Ok(Done::Page(message, secret)) => {
            let mut page = settings_page(&state, &session, &org_id).await?;
            page.done = Some(message);
            page.secret = secret;
            Ok(render(&page))
        }
        Err(f) => {
            let mut page = settings_page(&state, &session, &org_id).await?;
            page.error = Some(f.message);
            if form.get("action") == Some("org") {
                let typed = |k: &str| form.get(k).unwrap_or("").to_owned();
                page.name = typed("name");
                page.default_limit = typed("default_limit");
                page.org_limit = typed("org_limit");
                page.thresholds = typed("thresholds");
            }
            Ok(render_as(f.status, &page))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_typed_as_percentages() {
        let got = thresholds_of("50, 80%, 100").unwrap();
        assert_eq!(
            got.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["0.5", "0.8", "1"]
        );
        let got = thresholds_of("87.5").unwrap();
        assert_eq!(got[0].to_string(), "0.875");
        assert!(thresholds_of("lots").is_err());
        assert!(thresholds_of("").unwrap().is_empty());
    }
}
