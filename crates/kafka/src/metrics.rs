//! The distributed mode's metric names, described once.

use metrics::{Unit, describe_counter};

/// Usage that could not be counted, by `reason`.
pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
/// Consumer group rebalances seen, by `kind` (assign, revoke).
pub const REBALANCES: &str = "tally_rebalances_total";
/// Usage published by `POST /v1/usage` to the usage topic, by `outcome`.
pub const USAGE_PUBLISHED: &str = "tally_usage_published_total";

pub fn describe() {
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "usage kept as dead letters, by reason"
    );
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "consumer group rebalances, by kind"
    );
    describe_counter!(
        USAGE_PUBLISHED,
        Unit::Count,
        "usage published over HTTP, by outcome"
    );
}
