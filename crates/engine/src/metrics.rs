//! The engine's metric names, described once. No per-user labels: series
//! stay bounded whatever the number of users.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Usage events by `outcome` (accepted, duplicate, rejected) and `reason`.
pub const USAGE_EVENTS: &str = "tally_usage_events_total";
/// Seconds one checkpoint transaction took.
pub const CHECKPOINT_SECONDS: &str = "tally_checkpoint_duration_seconds";
/// Checkpoints that failed (retried with the next).
pub const CHECKPOINT_FAILURES: &str = "tally_checkpoint_failures_total";
/// Enforcement events by `event` (threshold_crossed, cut_off, cutoff_lifted)
/// and subject `kind`.
pub const ENFORCEMENT_EVENTS: &str = "tally_enforcement_events_total";
/// Entity commands by `outcome` (ok, or the error kind).
pub const COMMANDS: &str = "tally_commands_total";
/// Authorize decisions by `reason`.
pub const AUTHORIZE_DECISIONS: &str = "tally_authorize_decisions_total";
/// 1 once the checkpoint is loaded and the usage log replayed.
pub const READY: &str = "tally_ready";
/// Partitions of the usage log this process meters.
pub const PARTITIONS_OWNED: &str = "tally_partitions_owned";
/// Usage events replayed from the log at start.
pub const REPLAYED_EVENTS: &str = "tally_replayed_events_total";

pub fn describe() {
    describe_counter!(
        USAGE_EVENTS,
        Unit::Count,
        "usage events by outcome and reason"
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
