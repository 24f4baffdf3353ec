//! The audit log (every change, who made it and when) and the alerts
//! (thresholds crossed, cutoffs, lifts): filterable, a keyset page at a
//! time, as the API lists them.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::Response;
use tally_core::entity::EventKind;
use tally_core::ratio::format_bps;

use super::view;
use super::{Fail, Fields, Layout, Session, href, render, seg};
use crate::AppState;
use crate::dto::EventJson;
use crate::extract::{Caller, Params};
use crate::orgs;

/// Rows a page.
const ROWS: u32 = 50;

#[derive(Debug)]
pub(super) struct EventLine {
    pub(super) at: String,
    pub(super) actor: String,
    pub(super) kind: String,
    pub(super) detail: String,
}

/// An audit entry for people: the fields besides the envelope, as
/// `name: value`.
pub(super) fn event_line(e: EventJson) -> EventLine {
    let v = e.0;
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    let detail = v
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "org_id" | "seq" | "at" | "actor" | "type"))
                .map(|(k, x)| match x.as_str() {
                    Some(s) => format!("{k}: {s}"),
                    None => format!("{k}: {x}"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    EventLine {
        at: view::parse_ms(&text("at")).map_or_else(|| text("at"), view::when),
        actor: text("actor"),
        kind: text("type").replace('_', " "),
        detail,
    }
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    layout: Layout,
    action: String,
    kinds: Vec<&'static str>,
    kind: String,
    actor: String,
    subject: String,
    from: String,
    to: String,
    order: String,
    events: Vec<EventLine>,
    next: Option<String>,
    first: Option<String>,
}

/// `GET /console/orgs/{org}/audit`.
pub(crate) async fn audit(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let layout = Layout::new(&session, "Audit log", Some(&org_id), "audit");
    let q = Fields::query(&uri)?;
    let s = |k: &str| q.get(k).unwrap_or("").to_owned();
    let (kind, actor, subject, from, to) =
        (s("kind"), s("actor"), s("subject"), s("from"), s("to"));
    let order = q.get("order").unwrap_or("newest").to_owned();
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    let page = orgs::events(
        State(state.clone()),
        Caller(session.principal.clone()),
        Path(org_id.clone()),
        Params(orgs::EventsParams {
            order: Some(order.clone()),
            actor: opt(&actor),
            kind: opt(&kind),
            subject: opt(&subject),
            from: opt(&from),
            to: opt(&to),
            cursor: q.get("cursor").map(str::to_owned),
            limit: Some(ROWS),
        }),
    )
    .await
    .map_err(|e| Fail::from(e).on(&layout))?
    .0;
    let path = format!("/console/orgs/{}/audit", seg(&org_id));
    let pairs = [
        ("kind", kind.as_str()),
        ("actor", actor.as_str()),
        ("subject", subject.as_str()),
        ("from", from.as_str()),
        ("to", to.as_str()),
        ("order", order.as_str()),
    ];
    Ok(render(&AuditPage {
        kinds: EventKind::NAMES.to_vec(),
        events: page.items.into_iter().map(event_line).collect(),
        next: page.next_cursor.map(|c| {
            let mut p = pairs.to_vec();
            p.push(("cursor", &c));
            href(&path, &p)
        }),
        first: q.get("cursor").map(|_| href(&path, &pairs)),
        action: path.clone(),
        kind,
        actor,
        subject,
        from,
        to,
        order,
        layout,
    }))
}

#[derive(Debug)]
struct AlertLine {
    at: String,
    subject: String,
    href: String,
    event: String,
    spend: String,
    limit: String,
}

#[derive(Template)]
#[template(path = "console/alerts.html")]
struct AlertsPage {
    layout: Layout,
    action: String,
    event: String,
    subject: String,
    alerts: Vec<AlertLine>,
    next: Option<String>,
    first: Option<String>,
}

/// What an enforcement event says, for people.
pub(super) fn alert_words(event: &str, threshold_bps: Option<u32>, reason: Option<&str>) -> String {
    match (event, threshold_bps) {
        ("threshold_crossed", Some(t)) => format!("crossed {} % of its limit", format_bps(t * 100)),
        ("forecast_over_limit", _) => "projected to pass its limit by month-end".to_owned(),
        ("cut_off", _) => "cut off at its limit".to_owned(),
        ("cutoff_lifted", _) => {
            format!("cutoff lifted ({})", reason.unwrap_or("").replace('_', " "))
        }
        (e, _) => e.replace('_', " "),
    }
}

/// `GET /console/orgs/{org}/alerts`.
pub(crate) async fn alerts(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let layout = Layout::new(&session, "Alerts", Some(&org_id), "alerts");
    let q = Fields::query(&uri)?;
    let event = q.get("event").unwrap_or("").to_owned();
    let subject = q.get("subject").unwrap_or("").to_owned();
    let page = orgs::enforcement(
        State(state.clone()),
        Caller(session.principal.clone()),
        Path(org_id.clone()),
        Params(orgs::EnforcementParams {
            event: (!event.is_empty()).then(|| event.clone()),
            subject: (!subject.is_empty()).then(|| subject.clone()),
            cursor: q.get("cursor").map(str::to_owned),
            limit: Some(ROWS),
        }),
    )
    .await
    .map_err(|e| Fail::from(e).on(&layout))?
    .0;
    let path = format!("/console/orgs/{}/alerts", seg(&org_id));
    let pairs = [("event", event.as_str()), ("subject", subject.as_str())];
    Ok(render(&AlertsPage {
        alerts: page
            .items
            .into_iter()
            .map(|a| AlertLine {
                at: view::parse_ms(&a.at).map_or(a.at.clone(), view::when),
                href: super::pages::subject_href(&org_id, &a.subject_kind, &a.subject_id),
                subject: format!("{} {}", a.subject_kind, a.subject_id),
                event: alert_words(&a.event, a.threshold.map(|t| t.0), a.reason.as_deref()),
                spend: view::usd(a.spend_micros),
                limit: view::limit(a.limit_micros),
            })
            .collect(),
        next: page.next_cursor.map(|c| {
            let mut p = pairs.to_vec();
            p.push(("cursor", &c));
            href(&path, &p)
        }),
        first: q.get("cursor").map(|_| href(&path, &pairs)),
        action: path.clone(),
        event,
        subject,
        layout,
    }))
}
