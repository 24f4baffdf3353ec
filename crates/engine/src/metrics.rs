//! The engine's metric names, described once. No per-user labels: series
//! stay bounded whatever the number of users.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Usage events by `outcome` (accepted, duplicate, rejected) and `reason`.
pub const USAGE_EVENTS: &str = "tally_usage_events_total";
/// Seconds one checkpoint transaction took.
pub const CHECKPOINT_SECONDS: &str = "tally_checkpoint_duration_seconds";
/// Calls checkpointed under the model `other`: their org's month had
/// broken usage down by `usage_models_max` pairs already.
pub const USAGE_OTHER: &str = "tally_usage_other_model_total";
/// Checkpoints that failed (retried with the next).
pub const CHECKPOINT_FAILURES: &str = "tally_checkpoint_failures_total";
/// Enforcement events by `event` (threshold_crossed, forecast_over_limit,
/// cut_off, cutoff_lifted)
/// and subject `kind`.
pub const ENFORCEMENT_EVENTS: &str = "tally_enforcement_events_total";
/// Entity commands by `outcome` (ok, or the error kind).
pub const COMMANDS: &str = "tally_commands_total";
/// Authorize decisions by `outcome` (allowed, denied) and `reason`.
pub const AUTHORIZE_DECISIONS: &str = "tally_authorize_decisions_total";
/// Seconds one authorize decision took in process.
pub const AUTHORIZE_SECONDS: &str = "tally_authorize_duration_seconds";
/// Holds by `event`: placed, settled, released, expired.
pub const HOLDS: &str = "tally_holds_total";
/// Usage that arrived after its hold had expired (counted in full).
pub const USAGE_AFTER_HOLD_EXPIRED: &str = "tally_usage_after_hold_expired_total";
/// What an `org`'s live holds hold, in micro-USD.
pub const ORG_HELD: &str = "tally_org_held_micros";
/// An `org`'s live holds.
pub const ORG_HOLDS: &str = "tally_org_holds";
/// Seconds one batch of usage took to apply to the meters.
pub const APPLY_SECONDS: &str = "tally_apply_duration_seconds";
/// Micro-USD counted per `org` by this process (for rates; a partition
/// handed over may count the events since its last checkpoint again).
pub const ORG_SPEND_TOTAL: &str = "tally_org_spend_micros_total";
/// This month's spend of an `org`, in micro-USD.
pub const ORG_SPEND: &str = "tally_org_spend_micros";
/// An `org`'s own monthly limit (absent when it has none).
pub const ORG_LIMIT: &str = "tally_org_limit_micros";
/// Users of an `org` at or over a `threshold` of their limit this month.
pub const ORG_USERS_OVER: &str = "tally_org_users_over_threshold";
/// This month's spend of a `group` of an `org`.
pub const GROUP_SPEND: &str = "tally_group_spend_micros";
/// A group's monthly limit (absent when it has none).
pub const GROUP_LIMIT: &str = "tally_group_limit_micros";
/// Members of a group at or over a `threshold` of their own limit.
pub const GROUP_USERS_OVER: &str = "tally_group_users_over_threshold";
/// Subjects cut off now, by `kind` (user, group, key, org).
pub const CUTOFFS_ACTIVE: &str = "tally_cutoffs_active";
/// An org's subjects whose month-end projection is at or over their limit
/// now, by `org` and `kind` (user, group, key, org).
pub const PROJECTED_OVER_LIMIT: &str = "tally_projected_over_limit";
/// Opt-in: the share of their limit the top users spent, by `org`, `user`.
pub const USER_UTILIZATION: &str = "tally_user_utilization_ratio";
/// Orgs whose gauges this process reports.
pub const ORGS_REPORTED: &str = "tally_orgs_reported";
/// 1 once the checkpoint is loaded and the usage log replayed.
pub const READY: &str = "tally_ready";
/// Partitions of the usage log this process meters.
pub const PARTITIONS_OWNED: &str = "tally_partitions_owned";
/// Partitions of the usage log this process owns but does not meter: the
/// log is not the one their checkpoint was taken from (a topic deleted and
/// created again, or a database of another deployment).
pub const PARTITIONS_REFUSED: &str = "tally_usage_partitions_refused";
/// Usage events replayed from the log at start.
pub const REPLAYED_EVENTS: &str = "tally_replayed_events_total";
/// 1 while the store commits writes, 0 from a write that failed for a fault
/// of the store (disk full, I/O error, database gone) until one succeeds.
pub const STORE_WRITABLE: &str = "tally_store_writable";
/// Writes that failed for a fault of the store, by `path` (usage_log,
/// entity_log, checkpoint, probe).
pub const STORE_WRITE_FAILURES: &str = "tally_store_write_failures_total";

pub fn describe() {
    describe_gauge!(
        STORE_WRITABLE,
        Unit::Count,
        "1 while the store commits writes, 0 during a storage fault"
    );
    describe_counter!(
        STORE_WRITE_FAILURES,
        Unit::Count,
        "writes that failed for a fault of the store, by path"
    );
    describe_counter!(
        USAGE_EVENTS,
        Unit::Count,
        "usage events by outcome and reason"
    );
    describe_counter!(
        USAGE_OTHER,
        Unit::Count,
        "calls counted under the model other: past their org's monthly cap of (model, provider) pairs"
    );
    describe_histogram!(
        CHECKPOINT_SECONDS,
        Unit::Seconds,
        "duration of a metering checkpoint"
    );
    describe_counter!(
        CHECKPOINT_FAILURES,
        Unit::Count,
        "metering checkpoints that failed"
    );
    describe_counter!(
        ENFORCEMENT_EVENTS,
        Unit::Count,
        "thresholds crossed, cutoffs and lifts"
    );
    describe_counter!(COMMANDS, Unit::Count, "admin commands by outcome");
    describe_counter!(
        AUTHORIZE_DECISIONS,
        Unit::Count,
        "authorize decisions by reason"
    );
    describe_histogram!(
        AUTHORIZE_SECONDS,
        Unit::Seconds,
        "duration of an authorize decision in process"
    );
    describe_counter!(
        HOLDS,
        Unit::Count,
        "holds placed, settled, released and expired"
    );
    describe_counter!(
        USAGE_AFTER_HOLD_EXPIRED,
        Unit::Count,
        "usage that arrived after its hold expired (counted in full)"
    );
    describe_gauge!(ORG_HELD, "what an org's live holds hold, micro-USD");
    describe_gauge!(ORG_HOLDS, Unit::Count, "an org's live holds");
    describe_histogram!(
        APPLY_SECONDS,
        Unit::Seconds,
        "duration of applying one batch of usage"
    );
    describe_counter!(
        ORG_SPEND_TOTAL,
        "micro-USD of usage counted per org by this process"
    );
    describe_gauge!(ORG_SPEND, "this month's spend of an org, micro-USD");
    describe_gauge!(ORG_LIMIT, "an org's own monthly limit, micro-USD");
    describe_gauge!(
        ORG_USERS_OVER,
        Unit::Count,
        "users of an org at or over a threshold of their limit"
    );
    describe_gauge!(GROUP_SPEND, "this month's spend of a group, micro-USD");
    describe_gauge!(GROUP_LIMIT, "a group's monthly limit, micro-USD");
    describe_gauge!(
        GROUP_USERS_OVER,
        Unit::Count,
        "members of a group at or over a threshold of their limit"
    );
    describe_gauge!(CUTOFFS_ACTIVE, Unit::Count, "subjects cut off now, by kind");
    describe_gauge!(
        PROJECTED_OVER_LIMIT,
        Unit::Count,
        "an org's subjects projected over their monthly limit by month-end, by kind"
    );
    describe_gauge!(
        USER_UTILIZATION,
        "share of their monthly limit the top users spent (opt-in)"
    );
    describe_gauge!(
        ORGS_REPORTED,
        Unit::Count,
        "orgs whose gauges this process reports"
    );
    describe_gauge!(
        PARTITIONS_OWNED,
        Unit::Count,
        "partitions of the usage log this process meters"
    );
    describe_gauge!(
        PARTITIONS_REFUSED,
        Unit::Count,
        "owned partitions of the usage log not metered: the log is not their checkpoint's"
    );
    describe_gauge!(
        READY,
        Unit::Count,
        "1 when the engine serves with its state recovered"
    );
    describe_counter!(
        REPLAYED_EVENTS,
        Unit::Count,
        "usage events replayed at start"
    );
}

/// Counts an ingest report's outcomes.
pub fn count_outcomes(report: &crate::meter::IngestReport) {
    metrics::counter!(USAGE_EVENTS, "outcome" => "accepted", "reason" => "")
        .increment(u64::from(report.accepted));
    metrics::counter!(USAGE_EVENTS, "outcome" => "duplicate", "reason" => "")
        .increment(u64::from(report.duplicates));
    for r in &report.rejected {
        metrics::counter!(USAGE_EVENTS, "outcome" => "rejected", "reason" => r.code).increment(1);
    }
}
