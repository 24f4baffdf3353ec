//! The users table as CSV: every member the page's filters match, in its
//! order, as the API lists them (page after page), money in dollars to the
//! micro-dollar.

use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::pages::UsersQuery;
use super::{Fail, Fields, Layout, Session};
use crate::AppState;
use crate::dto::UserJson;
use crate::extract::{Caller, Params};
use crate::users;

/// The most rows one export carries; past it the filter must be narrowed.
pub(crate) const CSV_ROWS_MAX: usize = 100_000;
/// Rows read from the API at a time.
const CSV_PAGE: u32 = 1_000;

/// Micro-dollars as dollars, exactly: `-12.345678`.
pub(crate) fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// A CSV field: quoted when it must be, and never read as a formula by a
/// spreadsheet (a leading `=`, `+`, `-`, `@`, tab or CR gets a `'`).
pub(crate) fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

const HEADER: &str = "id,name,email,status,groups,monthly_limit_usd,limit_source,spend_usd,held_usd,\
                      used_percent,cut_off,requests,last_active_at\n";

fn row(out: &mut String, u: &UserJson) {
    let used = u.monthly_limit_micros.map_or_else(String::new, |l| {
        if l <= 0 {
            String::new()
        } else {
            let hundredths = i128::from(u.spend_micros.max(0)) * 10_000 / i128::from(l);
            format!("{}.{:02}", hundredths / 100, hundredths % 100)
        }
    });
    let cells = [
        field(&u.id),
        field(&u.name),
        field(&u.email),
        field(&u.status),
        field(&u.groups.join(";")),
        u.monthly_limit_micros.map_or_else(String::new, dollars),
        u.limit_source.as_str().to_owned(),
        dollars(u.spend_micros),
        dollars(u.held_micros),
        used,
        u.cut_off.to_string(),
        u.requests.to_string(),
        u.last_active_at.clone().unwrap_or_default(),
    ];
    out.push_str(&cells.join(","));
    out.push('\n');
}

/// `GET /console/orgs/{org}/users.csv`: the users page's filters and sort.
pub(crate) async fn users_csv(
    State(state): State<AppState>,
    session: Session,
    Path(org_id): Path<String>,
    uri: Uri,
) -> Result<Response, Fail> {
    let layout = Layout::new(&session, "Export", Some(&org_id), "users");
    let query = UsersQuery::from(&Fields::query(&uri)?);
    let mut out = String::from(HEADER);
    let mut rows = 0usize;
    let mut cursor: Option<String> = None;
    loop {
        let mut params = query.params(CSV_PAGE).map_err(|f| f.on(&layout))?;
        params.cursor = cursor.take();
        let page = users::list(
            State(state.clone()),
            Caller(session.principal.clone()),
            Path(org_id.clone()),
            Params(params),
        )
        .await
        .map_err(|e| Fail::from(e).on(&layout))?
        .0;
        rows += page.items.len();
        if rows > CSV_ROWS_MAX {
            return Err(Fail::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the filter matches more than {CSV_ROWS_MAX} members, the most one export \
                     carries: narrow it"
                ),
            )
            .on(&layout));
        }
        for u in &page.items {
            row(&mut out, u);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"{}-users.csv\"",
                    org_id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
                ),
            ),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        out,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_and_never_formulas() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(field("-1+2"), "'-1+2");
        assert_eq!(dollars(12_345_678), "12.345678");
        assert_eq!(dollars(-5), "-0.000005");
    }
}
