//! Who may call what: one table, by method and route template, checked for
//! every request before anything else is read (the body included). The
//! OpenAPI document lists the same roles on each operation (`security`);
//! the suite's role matrix holds the two to each other.
//!
//! | role       | may call                                                    |
//! |------------|-------------------------------------------------------------|
//! | `operator` | everything                                                  |
//! | `admin`    | everything under its org, and usage for it                  |
//! | `viewer`   | every GET under its org                                     |
//! | `gateway`  | authorize, usage, and its org's holds (list, release); one org's, or every org's |
//!
//! An org's token is also held to its org: the `{org}` of the path, each
//! usage event's org, an authorized key's org.

use axum::http::Method;

pub(crate) const OPERATOR: &[&str] = &["operator"];
const ADMINS: &[&str] = &["operator", "admin"];
const READERS: &[&str] = &["operator", "admin", "viewer"];
const GATEWAY_CALLS: &[&str] = &["operator", "gateway"];
const USAGE: &[&str] = &["operator", "admin", "gateway"];
const HOLD_READERS: &[&str] = &["operator", "admin", "viewer", "gateway"];

/// The roles that may call `method` on `route` (a route template, as the
/// router matched it). `None`: the route needs no token.
pub(crate) fn roles(method: &Method, route: &str) -> Option<&'static [&'static str]> {
    Some(match route {
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" => return None,
        "/v1/authorize" => GATEWAY_CALLS,
        "/v1/usage" => USAGE,
        "/v1/orgs/{org}/holds" => HOLD_READERS,
        "/v1/orgs/{org}/holds/{request_id}" => USAGE,
        r if r.starts_with("/v1/orgs/{org}") => {
            if method == Method::GET {
                READERS
            } else {
                ADMINS
            }
        }
        // Creating orgs, every org's dead letters, gateway tokens of every
        // org, the operator's audit log.
        _ => OPERATOR,
    })
}
