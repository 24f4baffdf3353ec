//! The OpenAPI 3.1 document, generated from the handlers and types
//! themselves (utoipa) and served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{groups, holds, keys, ops, orgs, rollup, tokens, usage, users, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally",
        description = "Spend control for LLM API gateways. Money is integer micro-USD (fields \
                       ending in _micros); times are RFC 3339; errors are an object `error` with a \
                       `code` and a `message`. Every endpoint but the ops ones needs \
                       `Authorization: Bearer <token>`. Each operation lists the roles that may \
                       call it as its `security` scopes: `operator` (the operator token), `admin` \
                       and `viewer` (an org's tokens, for that org only), `gateway` (a gateway \
                       token: bound to one org, or of every org).",
    ),
    paths(
        orgs::create, orgs::list, orgs::get, orgs::patch, orgs::events, orgs::enforcement,
        rollup::report,
        tokens::create, tokens::list, tokens::revoke,
        tokens::create_gateway, tokens::list_gateway, tokens::revoke_gateway, tokens::audit,
        orgs::dead_letters, orgs::all_dead_letters,
        users::add, users::list, users::get, users::patch, users::remove, users::bulk,
        groups::create, groups::list, groups::get, groups::patch, groups::delete,
        groups::add_member, groups::remove_member,
        keys::create, keys::list, keys::get, keys::patch, keys::rotate, keys::revoke,
        webhooks::set, webhooks::get, webhooks::remove, webhooks::deliveries, webhooks::redeliver, webhooks::test,
        usage::ingest, usage::authorize,
        holds::list, holds::release,
        ops::healthz, ops::readyz, ops::metrics,
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "orgs", description = "Orgs, the audit trail and enforcement history"),
        (name = "tokens", description = "Org tokens (admin, viewer, gateway), gateway tokens of every org, the operator's audit log"),
        (name = "users", description = "Members: add, list, change, remove, bulk changes"),
        (name = "groups", description = "Groups and their members"),
        (name = "keys", description = "API keys: owners, groups, feature flags, limits"),
        (name = "webhooks", description = "Threshold and cutoff notifications: the org's webhook and its deliveries"),
        (name = "usage", description = "For gateways: usage ingest and authorize; dead letters"),
        (name = "holds", description = "Budget reserved by authorize for calls in flight: list, release"),
        (name = "ops", description = "Health, readiness, metrics"),
    )
)]
pub(crate) struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON, built once.
pub(crate) fn json() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes")
    })
}
