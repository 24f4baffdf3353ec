//! The schema, per backend. Statements (DML) are shared by both backends;
//! only the DDL differs (blob type, autoincrement, collation, triggers).
//! Each migration runs once, in order, in its own transaction.

use crate::Backend;

/// (version, statements) for `backend`, ascending.
pub(crate) fn migrations(backend: Backend) -> Vec<(i64, String)> {
    let (blob, serial, text) = match backend {
        // AUTOINCREMENT: a position is never handed out twice, even after the
        // newest rows of the usage log were purged.
        Backend::Sqlite => ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT"),
        // "C" collation: byte order, as SQLite compares, so both backends
        // sort and paginate the same.
        Backend::Postgres => ("BYTEA", "BIGSERIAL PRIMARY KEY", "TEXT COLLATE \"C\""),
    };
    let v1 = format!(
        r#"
CREATE TABLE tally_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The entity log: append-only (triggers below refuse UPDATE and DELETE).
CREATE TABLE events (
    pos {serial},
    org_id {text} NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    payload {blob} NOT NULL,
    UNIQUE (org_id, seq)
);

-- Read models, projected from the log in the same transaction.
CREATE TABLE orgs (
    id {text} PRIMARY KEY,
    name {text} NOT NULL,
    default_monthly_limit_micros BIGINT,
    alert_thresholds_bps TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    seq BIGINT NOT NULL
);

CREATE TABLE users (
    org_id {text} NOT NULL,
    id {text} NOT NULL,
    email {text} NOT NULL,
    name {text} NOT NULL,
    status TEXT NOT NULL,
    monthly_limit_micros BIGINT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX users_by_name ON users (org_id, name, id);
CREATE INDEX users_by_email ON users (org_id, email, id);

CREATE TABLE org_groups (
    org_id {text} NOT NULL,
    id {text} NOT NULL,
    name {text} NOT NULL,
    monthly_limit_micros BIGINT,
    deleted BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, id)
);

CREATE TABLE group_members (
    org_id {text} NOT NULL,
    group_id {text} NOT NULL,
    user_id {text} NOT NULL,
    added_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, group_id, user_id)
);
CREATE INDEX group_members_by_user ON group_members (org_id, user_id, group_id);

CREATE TABLE api_keys (
    org_id {text} NOT NULL,
    id {text} NOT NULL,
    name {text} NOT NULL,
    user_id {text},
    features TEXT NOT NULL,
    monthly_limit_micros BIGINT,
    revoked BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, id)
);

CREATE TABLE api_key_groups (
    org_id {text} NOT NULL,
    key_id {text} NOT NULL,
    group_id {text} NOT NULL,
    PRIMARY KEY (org_id, key_id, group_id)
);

-- Metering: written by checkpoints only.
CREATE TABLE checkpoints (
    partition_id BIGINT PRIMARY KEY,
    position BIGINT NOT NULL,
    number BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE meter_orgs (
    org_id {text} PRIMARY KEY,
    watermark_ms BIGINT NOT NULL,
    dedupe_floor_hour BIGINT NOT NULL
);

-- Request-id hashes of the dedupe window: 16 bytes each, one row per org,
-- hour and checkpoint.
CREATE TABLE dedupe_chunks (
    org_id {text} NOT NULL,
    hour BIGINT NOT NULL,
    chunk BIGINT NOT NULL,
    hashes {blob} NOT NULL,
    PRIMARY KEY (org_id, hour, chunk)
);

CREATE TABLE spend_monthly (
    org_id {text} NOT NULL,
    kind TEXT NOT NULL,
    subject_id {text} NOT NULL,
    month BIGINT NOT NULL,
    spend_micros BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    last_at_ms BIGINT NOT NULL,
    fired_bps BIGINT NOT NULL,
    cut_off BIGINT NOT NULL,
    ordinal BIGINT NOT NULL,
    PRIMARY KEY (org_id, kind, subject_id, month)
);
CREATE INDEX spend_monthly_by_month ON spend_monthly (org_id, kind, month, spend_micros);

CREATE TABLE spend_daily (
    org_id {text} NOT NULL,
    kind TEXT NOT NULL,
    subject_id {text} NOT NULL,
    day BIGINT NOT NULL,
    spend_micros BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    PRIMARY KEY (org_id, kind, subject_id, day)
);

-- Thresholds crossed, cutoffs and lifts: one row each, never rewritten.
CREATE TABLE enforcement_events (
    org_id {text} NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id {text} NOT NULL,
    month BIGINT NOT NULL,
    event TEXT NOT NULL,
    threshold_bps BIGINT NOT NULL,
    ordinal BIGINT NOT NULL,
    reason TEXT,
    spend_micros BIGINT NOT NULL,
    limit_micros BIGINT,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, subject_kind, subject_id, month, event, threshold_bps, ordinal)
);

-- The embedded usage log: one row per ingest batch (protobuf UsageBatch).
CREATE TABLE usage_log (
    seq {serial},
    logged_at_ms BIGINT NOT NULL,
    events BIGINT NOT NULL,
    payload {blob} NOT NULL
);
"#
    );
    let append_only = match backend {
        Backend::Sqlite => r#"
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the entity log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the entity log is append-only'); END;
"#
        .to_owned(),
        Backend::Postgres => r#"
CREATE FUNCTION tally_events_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'the entity log is append-only'; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
FOR EACH ROW EXECUTE FUNCTION tally_events_append_only();
"#
        .to_owned(),
    };
    // v2: partitions. A checkpoint belongs to one partition of the usage
    // stream and is fenced by an epoch that each new owner bumps; an org's
    // meter records its partition; dead letters are kept for admins.
    let v2 = format!(
        r#"
ALTER TABLE checkpoints ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meter_orgs ADD COLUMN partition_id BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meter_orgs ADD COLUMN rolled_month BIGINT NOT NULL DEFAULT 0;
CREATE INDEX meter_orgs_by_partition ON meter_orgs (partition_id, org_id);

-- Usage that could not be counted (malformed, unattributable), by the
-- partition and position it was read from.
CREATE TABLE dead_letters (
    partition_id BIGINT NOT NULL,
    position BIGINT NOT NULL,
    logged_at_ms BIGINT NOT NULL,
    org_id {text},
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    payload {blob} NOT NULL,
    PRIMARY KEY (partition_id, position, logged_at_ms)
);
CREATE INDEX dead_letters_by_org ON dead_letters (org_id, logged_at_ms);
"#
    );
    // v3: no index on spend: no query sorts by it through an index (unset
    // spend counts as zero), and every checkpoint would pay to maintain it.
    let v3 = "DROP INDEX spend_monthly_by_month;".to_owned();
    // v4: the org's own limit and its webhook; webhook deliveries, one per
    // enforcement event of an org that has a webhook (same key), with their
    // state: pending (due at next_attempt_ms), delivered, failed (gave up)
    // or cancelled (the webhook was removed).
    let v4 = format!(
        r#"
ALTER TABLE orgs ADD COLUMN monthly_limit_micros BIGINT;
ALTER TABLE orgs ADD COLUMN webhook_url TEXT;
ALTER TABLE orgs ADD COLUMN webhook_seq BIGINT;
ALTER TABLE orgs ADD COLUMN webhook_set_at_ms BIGINT;

CREATE TABLE webhook_deliveries (
    id {serial},
    org_id {text} NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id {text} NOT NULL,
    month BIGINT NOT NULL,
    event TEXT NOT NULL,
    threshold_bps BIGINT NOT NULL,
    ordinal BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    last_status BIGINT,
    last_error TEXT,
    created_ms BIGINT NOT NULL,
    delivered_ms BIGINT
);
CREATE UNIQUE INDEX webhook_deliveries_by_event ON webhook_deliveries
    (org_id, subject_kind, subject_id, month, event, threshold_bps, ordinal);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_ms);
CREATE INDEX webhook_deliveries_by_org ON webhook_deliveries (org_id, id);
"#
    );
    // v5: live holds of the distributed mode, per partition (see holds.rs).
    let v5 = format!(
        r#"
CREATE TABLE holds (
    org_id {text} NOT NULL,
    request_id {text} NOT NULL,
    partition_id BIGINT NOT NULL,
    user_id {text} NOT NULL,
    key_id {text} NOT NULL,
    group_ids TEXT NOT NULL,
    amount_micros BIGINT NOT NULL,
    placed_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, request_id)
);
CREATE INDEX holds_by_partition ON holds (partition_id);
"#
    );
    // v6: where a partition's owner answers (its hold requests are
    // forwarded there).
    let v6 = "ALTER TABLE checkpoints ADD COLUMN owner_url TEXT;".to_owned();
    // v7: a checkpoint deletes the holds past their TTL by partition and
    // time (it scanned the partition's rows, holding the row that every
    // new hold's write waits for).
    let v7 = "DROP INDEX holds_by_partition;\n\
              CREATE INDEX holds_by_partition_expiry ON holds (partition_id, expires_at_ms);"
        .to_owned();
    // v8: checkpoints bound to their usage log: its name (bound at the
    // first claim) and a fingerprint of the message at a position (the
    // position it was taken at: a binary older than marks moves the
    // position on without it).
    let v8 = "ALTER TABLE checkpoints ADD COLUMN usage_log TEXT;\n\
              ALTER TABLE checkpoints ADD COLUMN mark BIGINT;\n\
              ALTER TABLE checkpoints ADD COLUMN mark_position BIGINT;"
        .to_owned();
    // v9: the dedupe window forgets a minute at a time (it forgot an hour
    // at a time, so its cap could not bound it within an hour). An hour's
    // ids go to its last minute: they are remembered until the whole hour
    // is too late, as before. The floor becomes a minute (the "no floor
    // yet" value, far below any hour of use, stays as it is).
    let v9 = "ALTER TABLE meter_orgs RENAME COLUMN dedupe_floor_hour TO dedupe_floor_minute;\n\
              UPDATE meter_orgs SET dedupe_floor_minute = dedupe_floor_minute * 60 \
              WHERE dedupe_floor_minute BETWEEN -1000000000 AND 1000000000;\n\
              ALTER TABLE dedupe_chunks RENAME COLUMN hour TO minute;\n\
              UPDATE dedupe_chunks SET minute = minute * 60 + 59;"
        .to_owned();
    // v10: gateway tokens for every org (an org's own tokens are in its
    // entity log), the operator's audit log, and when tokens were last
    // used (noted at most once a minute per token and process).
    let v10 = format!(
        r#"
CREATE TABLE gateway_tokens (
    id {text} PRIMARY KEY,
    name {text} NOT NULL,
    token_hash {blob} NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
CREATE TABLE operator_audit (
    pos {serial},
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE token_use (
    org_id {text} NOT NULL,
    token_id {text} NOT NULL,
    last_used_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, token_id)
);
"#
    );
    // v11: keys expire, and a rotated key's old secret works until a time.
    let v11 = "ALTER TABLE api_keys ADD COLUMN expires_at_ms BIGINT;\n\
               ALTER TABLE api_keys ADD COLUMN previous_secret_until_ms BIGINT;"
        .to_owned();
    // v12: enforcement events read newest first, a page at a time.
    let v12 =
        "CREATE INDEX enforcement_events_by_time ON enforcement_events (org_id, at_ms);".to_owned();
    // v13: the console's sessions (a token exchanged for a cookie): the
    // cookie's hash, never the cookie; the token's hash, so a revoked token
    // closes its sessions at once.
    let v13 = format!(
        r#"
CREATE TABLE console_sessions (
    id_hash {blob} PRIMARY KEY,
    token_hash {blob} NOT NULL,
    csrf {text} NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at_ms);
CREATE INDEX console_sessions_by_token ON console_sessions (token_hash, created_at_ms);
"#
    );
    // v14: the enforcement list's whole order in one index (the time alone
    // left every tie of a checkpoint to a sort of all of them), one
    // subject's alerts newest first, and one member's keys.
    let v14 = "CREATE INDEX enforcement_events_by_key ON enforcement_events \
               (org_id, at_ms, subject_kind, subject_id, month, event, threshold_bps, ordinal);\n\
               DROP INDEX enforcement_events_by_time;\n\
               CREATE INDEX enforcement_events_by_subject ON enforcement_events \
               (org_id, subject_kind, subject_id, at_ms);\n\
               CREATE INDEX api_keys_by_owner ON api_keys (org_id, user_id, id);"
        .to_owned();
    // v15: where a member's limit comes from (`own` or `org_default`;
    // members added before are taken as their own), and what a search
    // matches (`query::search_text`: id, name and email lowercased, a line
    // apart), filled here by the database's LOWER, which folds ASCII
    // letters only as `search_text` does (SQLite; PostgreSQL under "C").
    let newline = match backend {
        Backend::Sqlite => "char(10)",
        Backend::Postgres => "chr(10)",
    };
    let v15 = format!(
        "ALTER TABLE users ADD COLUMN limit_source TEXT NOT NULL DEFAULT 'own';\n\
         ALTER TABLE users ADD COLUMN search_text TEXT NOT NULL DEFAULT '';\n\
         UPDATE users SET search_text = LOWER(id || {newline} || name || {newline} || email);"
    );
    // v16: what an org's webhook receives (Tally's JSON or a Slack
    // message; webhooks set before are Tally's JSON), and each subject's
    // pending deliveries in order: a delivery is claimed only when none of
    // its subject's is pending before it.
    let v16 = "ALTER TABLE orgs ADD COLUMN webhook_format TEXT NOT NULL DEFAULT 'tally';\n\
               CREATE INDEX webhook_deliveries_pending_by_subject ON webhook_deliveries \
               (org_id, subject_kind, subject_id, id) WHERE state = 'pending';"
        .to_owned();
    // v17: usage by model and provider per subject and UTC day, written
    // by checkpoints as spend_daily is (deltas added in the checkpoint's
    // transaction); `other` holds usage past an org's monthly cap of pairs.
    // Read by subject (the key) or, across a kind's subjects, by day.
    let v17 = format!(
        r#"
CREATE TABLE usage_daily (
    org_id {text} NOT NULL,
    kind TEXT NOT NULL,
    subject_id {text} NOT NULL,
    day BIGINT NOT NULL,
    model {text} NOT NULL,
    provider {text} NOT NULL,
    spend_micros BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (org_id, kind, subject_id, day, model, provider)
);
CREATE INDEX usage_daily_by_day ON usage_daily (org_id, kind, day);
"#
    );
    // v18: month-end forecasts. A counter's first day with usage (where
    // its run-rate starts: for counters written before, the first day of
    // its month in spend_daily), whether its forecast alert fired (for
    // subjects cut off already, as if it had: it would have fired by
    // then) and when it was last judged (before: its latest usage); the
    // alert's projection and the day it named.
    let v18 = "ALTER TABLE spend_monthly ADD COLUMN first_day BIGINT NOT NULL DEFAULT 0;\n\
               ALTER TABLE spend_monthly ADD COLUMN forecast_fired BIGINT NOT NULL DEFAULT 0;\n\
               ALTER TABLE spend_monthly ADD COLUMN judged_at_ms BIGINT NOT NULL DEFAULT 0;\n\
               UPDATE spend_monthly SET forecast_fired = cut_off, judged_at_ms = last_at_ms, \
               first_day = COALESCE(\
               (SELECT MIN(d.day) % 100 FROM spend_daily d WHERE d.org_id = spend_monthly.org_id \
               AND d.kind = spend_monthly.kind AND d.subject_id = spend_monthly.subject_id \
               AND d.day >= spend_monthly.month * 100 AND d.day < spend_monthly.month * 100 + 100), \
               0);\n\
               ALTER TABLE enforcement_events ADD COLUMN projected_micros BIGINT;\n\
               ALTER TABLE enforcement_events ADD COLUMN limit_day BIGINT;"
        .to_owned();
    // v19: whether this database's metering history is recorded whole for
    // a recount of the usage log (`rebuild-projections`): the logs it
    // metered and the options it counted with are recorded from this
    // version on, so only a database that had metered nothing before it
    // can say which logs and options all of its spend came from.
    let v19 = "INSERT INTO tally_meta (key, value) SELECT 'usage_history', CASE WHEN \
               EXISTS (SELECT 1 FROM checkpoints) OR EXISTS (SELECT 1 FROM spend_monthly) \
               THEN 'before_v19' ELSE 'recorded' END;"
        .to_owned();
    vec![
        (1, v1 + &append_only),
        (2, v2),
        (3, v3),
        (4, v4),
        (5, v5),
        (6, v6),
        (7, v7),
        (8, v8),
        (9, v9),
        (10, v10),
        (11, v11),
        (12, v12),
        (13, v13),
        (14, v14),
        (15, v15),
        (16, v16),
        (17, v17),
        (18, v18),
        (19, v19),
    ]
}
