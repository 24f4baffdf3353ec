//! The distributed mode's metric names, described once.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Usage that could not be counted, by `reason`.
pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
/// Usage messages deleted from a `partition` of the usage topic (by
/// retention) before they were metered; at most, as offsets count.
pub const USAGE_LOST: &str = "tally_usage_lost_messages_total";
/// Consumer group rebalances seen, by `kind` (assign, revoke).
pub const REBALANCES: &str = "tally_rebalances_total";
/// Usage messages read from a partition that does not meter their org
/// (a producer's partitioner other than murmur2), published again to the
/// org's partition.
pub const USAGE_FORWARDED: &str = "tally_usage_forwarded_total";
/// Usage published by `POST /v1/usage` to the usage topic, by `outcome`.
pub const USAGE_PUBLISHED: &str = "tally_usage_published_total";
/// Messages of an owned usage `partition` not applied yet, from the
/// consumer's own fetch state.
pub const CONSUMER_LAG: &str = "tally_consumer_lag_messages";
/// Seconds from an entity event being logged to this process applying it
/// from `tally.events`.
pub const PROJECTION_LAG: &str = "tally_projection_lag_seconds";
/// Entity events logged in SQL but not yet relayed to `tally.events`.
pub const RELAY_BACKLOG: &str = "tally_relay_backlog_events";
/// Usage messages read, by the `source` of their log time: `broker`
/// (LogAppendTime), `producer` (CreateTime, trusted as it was not ahead of
/// this process's clock), `clamped` (CreateTime ahead of this process's
/// clock, which was taken instead) or `consumer` (no timestamp).
pub const USAGE_LOG_TIME: &str = "tally_usage_log_time_total";

pub fn describe() {
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "usage kept as dead letters, by reason"
    );
    describe_counter!(
        USAGE_LOST,
        Unit::Count,
        "usage messages deleted from the usage topic before they were metered"
    );
    describe_counter!(
        USAGE_FORWARDED,
        Unit::Count,
        "usage messages forwarded from a partition that does not meter their org to the one that does"
    );
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "consumer group rebalances, by kind"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "usage messages of an owned partition not applied yet"
    );
    describe_histogram!(
        PROJECTION_LAG,
        Unit::Seconds,
        "delay from an entity event logged to this process applying it"
    );
    describe_gauge!(
        RELAY_BACKLOG,
        Unit::Count,
        "entity events not yet relayed to the events topic"
    );
    describe_counter!(
        USAGE_LOG_TIME,
        Unit::Count,
        "usage messages read, by where their log time came from"
    );
    describe_counter!(
        USAGE_PUBLISHED,
        Unit::Count,
        "usage published over HTTP, by outcome"
    );
}
