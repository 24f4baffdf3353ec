//! Tally's domain, free of I/O: everything here takes its inputs (events, the
//! time) as arguments and returns what must happen, so it can be tested in
//! microseconds and replayed deterministically.
//!
//! - [`ids`], [`money`], [`time`]: the vocabulary.
//! - [`entity`]: users, groups, keys and org settings, event-sourced: commands
//!   are validated against [`entity::OrgDirectory`] and produce
//!   [`entity::EntityEvent`]s; the directory is a fold of those events.
//! - [`usage`]: a validated usage event.
//! - [`ledger`]: monthly spend per user, group, key and org, thresholds,
//!   forecast alerts and cutoffs; [`forecast`]: the month-end projection;
//!   [`dedupe`]: the bounded request-id window.
//! - [`org`]: one org's whole state (directory + meter), the unit of locking.
//! - [`authorize`]: may this key make this call, and why not; with a
//!   reserve, the [`holds`] that make admission exact under concurrency.

pub mod authorize;
pub mod dedupe;
pub mod entity;
pub mod fast;
pub mod forecast;
pub mod gauges;
pub mod holds;
pub mod ids;
pub mod ledger;
pub mod models;
pub mod money;
pub mod org;
pub mod ratio;
pub mod secret;
pub mod time;
pub mod usage;

pub use ids::{GroupId, KeyId, OrgId, TokenId, UserId};
