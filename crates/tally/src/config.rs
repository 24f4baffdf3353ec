//! Configuration, layered: defaults, then a TOML file (`--config`), then
//! environment variables, then flags. Every option has all four.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use tally_core::dedupe::DedupeConfig;
use tally_core::org::MeterConfig;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Spend control for LLM API gateways")]
pub(crate) struct Cli {
    /// A TOML file of `tally serve`'s options, snake_case (see
    /// deploy/tally.toml); admin commands take the server's URL and
    /// operator token from it.
    #[arg(long, env = "TALLY_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the service: HTTP API, metering engine, checkpoints.
    Serve(Box<ServeArgs>),
    /// Drop every read model and project the whole entity log again, and
    /// count spend and usage again from the embedded usage log where it
    /// holds everything metered (offline: refused while any tally serve
    /// uses the same data dir or database).
    RebuildProjections(RebuildArgs),
    /// Forget where each partition of the usage log stood, and which log it
    /// was: the next start reads the configured usage topic from its
    /// beginning. For a usage topic deleted and created again on purpose
    /// (the service refuses its partitions until then). Counted spend stays.
    /// Offline: refused while any tally serve uses the same data dir or
    /// database.
    ResetUsagePositions(StoreArgs),
    /// End-to-end figures on this machine: HTTP ingest, authorize latency,
    /// restart time, Kafka metering against a bare consumer.
    Bench(crate::bench::BenchArgs),
    /// Publish realistic usage for an org to the usage topic, as a gateway
    /// would (an example producer).
    Produce(ProduceArgs),
    /// Orgs, over the HTTP API: create, list, show, update.
    Orgs {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Orgs,
    },
    /// Members, over the HTTP API: list (sort, filter), add, show, update,
    /// remove, bulk.
    Users {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Users,
    },
    /// Groups, over the HTTP API: list, create, show, update, add-members,
    /// remove-members, delete.
    Groups {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Groups,
    },
    /// API keys, over the HTTP API: list, create, show, update, rotate,
    /// revoke.
    Keys {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Keys,
    },
    /// The org's tokens, over the HTTP API: list, create, revoke.
    Tokens {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Tokens,
    },
    /// Gateway tokens of every org (operator): list, create, revoke.
    GatewayTokens {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::GatewayTokens,
    },
    /// The org's webhook: show, set, remove, deliveries, redeliver.
    Webhook {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Webhook,
    },
    /// The org's spend, calls and tokens over a month or a range, by
    /// model, provider, user, group or key (a table in dollars).
    Usage {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(flatten)]
        args: crate::cli::UsageArgs,
    },
    /// Live holds of the org: list, release.
    Holds {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(subcommand)]
        cmd: crate::cli::Holds,
    },
    /// The audit trail: every change, who made it and when, filtered.
    Audit {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(flatten)]
        args: crate::cli::AuditArgs,
    },
    /// Thresholds crossed, cutoffs and lifts, newest first.
    Enforcement {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(flatten)]
        args: crate::cli::EnforcementArgs,
    },
    /// Usage that could not be counted, newest first.
    DeadLetters {
        #[command(flatten)]
        conn: crate::cli::Conn,
        #[command(flatten)]
        args: crate::cli::DeadLetterArgs,
    },
    /// Print a shell completion script: `tally completions bash >
    /// /etc/bash_completion.d/tally` (also zsh, fish, elvish, powershell).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Args, Default)]
pub(crate) struct StoreArgs {
    /// Where the embedded mode keeps its SQLite database [default: ./tally-data].
    #[arg(long, env = "TALLY_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// A PostgreSQL URL (postgres://user@host:port/db) instead of the
    /// embedded SQLite database.
    #[arg(long, env = "TALLY_DATABASE_URL")]
    pub(crate) database_url: Option<String>,
}

/// How usage is counted: `tally serve`'s, and `rebuild-projections`'
/// when it counts the usage log again.
#[derive(Debug, Clone, Args, Default)]
pub(crate) struct MeterArgs {
    /// How far behind an org's latest usage events are still accepted and
    /// deduplicated [default: 24].
    #[arg(long, env = "TALLY_DEDUPE_WINDOW_HOURS")]
    pub(crate) dedupe_window_hours: Option<u32>,
    /// Request ids one org's dedupe window holds at most; past it the oldest
    /// minutes are forgotten early, never the last minute behind the org's
    /// latest usage [default: 20000000].
    #[arg(long, env = "TALLY_DEDUPE_ENTRIES_MAX")]
    pub(crate) dedupe_entries_max: Option<usize>,
    /// Distinct (model, provider) pairs one org's usage is broken down by
    /// in a month, 1 to 10000; usage of further pairs counts under `other`
    /// [default: 200].
    #[arg(long, env = "TALLY_USAGE_MODELS_MAX")]
    pub(crate) usage_models_max: Option<u16>,
}

/// `rebuild-projections`: the store, and the metering options the service
/// runs with (the usage log is counted again under them).
#[derive(Debug, Clone, Args)]
pub(crate) struct RebuildArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) meter: MeterArgs,
}

#[derive(Debug, Clone, Args, Default)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, env = "TALLY_LISTEN")]
    pub(crate) listen: Option<String>,
    /// The operator token (admin of every org, and the gateway's credential
    /// for authorize). When absent, one is generated at first start, printed
    /// once, and its hash kept in the database.
    #[arg(long, env = "TALLY_OPERATOR_TOKEN", hide_env_values = true)]
    pub(crate) operator_token: Option<String>,
    /// How often the metering engine checkpoints [default: 1000].
    #[arg(long, env = "TALLY_CHECKPOINT_INTERVAL_MS")]
    pub(crate) checkpoint_interval_ms: Option<u64>,
    /// Events counted between forced checkpoints [default: 1000000].
    #[arg(long, env = "TALLY_CHECKPOINT_EVENTS_MAX")]
    pub(crate) checkpoint_events_max: Option<u64>,
    #[command(flatten)]
    pub(crate) meter: MeterArgs,
    /// Days checkpointed usage stays in the embedded usage log [default: 7].
    #[arg(long, env = "TALLY_USAGE_RETENTION_DAYS")]
    pub(crate) usage_retention_days: Option<u32>,
    /// The largest request body in bytes [default: 8388608].
    #[arg(long, env = "TALLY_BODY_BYTES_MAX")]
    pub(crate) body_bytes_max: Option<usize>,
    /// The most usage events per ingest request [default: 10000].
    #[arg(long, env = "TALLY_USAGE_BATCH_LEN_MAX")]
    pub(crate) usage_batch_len_max: Option<usize>,
    /// Log lines as `text` or `json` [default: text]. Levels come from
    /// RUST_LOG (default info).
    #[arg(long, env = "TALLY_LOG_FORMAT")]
    pub(crate) log_format: Option<String>,
    /// Export the utilization of this many users (the highest) as a metric
    /// labelled by user, 0 to 1000 [default: 0: no per-user series].
    #[arg(long, env = "TALLY_METRICS_TOP_USERS")]
    pub(crate) metrics_top_users: Option<usize>,
    /// Serve /metrics on this address of its own, without a token (and not
    /// on the API port) [default: on the API port, with a token].
    #[arg(long, env = "TALLY_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<String>,
    /// A token that may read /metrics on the API port (besides the
    /// operator token), for Prometheus; at least 16 characters.
    #[arg(long, env = "TALLY_METRICS_TOKEN", hide_env_values = true)]
    pub(crate) metrics_token: Option<String>,
    /// Groups exported with spend, limit and users over thresholds, the
    /// most spending first [default: 1000].
    #[arg(long, env = "TALLY_METRICS_GROUPS_MAX")]
    pub(crate) metrics_groups_max: Option<usize>,
    /// How long a hold lives unsettled when authorize names no
    /// `hold_ttl_ms` [default: 600000].
    #[arg(long, env = "TALLY_HOLD_TTL_DEFAULT_MS")]
    pub(crate) hold_ttl_default_ms: Option<i64>,
    /// The longest `hold_ttl_ms` authorize accepts, 1000 to 3600000
    /// [default: 3600000].
    #[arg(long, env = "TALLY_HOLD_TTL_MAX_MS")]
    pub(crate) hold_ttl_max_ms: Option<i64>,
    /// The URL other processes reach this one at, for hold requests they
    /// forward to the process metering an org (distributed mode)
    /// [default: http://<the bound --listen address>].
    #[arg(long, env = "TALLY_ADVERTISE_URL")]
    pub(crate) advertise_url: Option<String>,
    /// Where the embedded mode journals live holds [default: <data-dir>/holds;
    /// embedded on --database-url, holds need this].
    #[arg(long, env = "TALLY_HOLDS_DIR")]
    pub(crate) holds_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) http: HttpArgs,
    #[command(flatten)]
    pub(crate) webhooks: WebhookArgs,
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
}

/// What one HTTP client may take of the server (docs/operations.md#http-limits).
#[derive(Debug, Clone, Args, Default)]
pub(crate) struct HttpArgs {
    /// Time from a request head's first byte to its last before the
    /// connection is closed [default: 10000].
    #[arg(long, env = "TALLY_HTTP_HEADER_READ_TIMEOUT_MS")]
    pub(crate) http_header_read_timeout_ms: Option<u64>,
    /// Time a connection may wait with no request in progress before it is
    /// closed [default: 60000].
    #[arg(long, env = "TALLY_HTTP_IDLE_TIMEOUT_MS")]
    pub(crate) http_idle_timeout_ms: Option<u64>,
    /// Time from a request's head to its answer (body read, handler run);
    /// past it the answer is 408 and the connection closed [default: 60000].
    #[arg(long, env = "TALLY_HTTP_REQUEST_TIMEOUT_MS")]
    pub(crate) http_request_timeout_ms: Option<u64>,
    /// Connections open at once; past it new ones are closed at once,
    /// counted in tally_http_connections_refused_total [default: 4096].
    #[arg(long, env = "TALLY_HTTP_CONNECTIONS_MAX")]
    pub(crate) http_connections_max: Option<usize>,
    /// Requests one connection may carry; the last answer says
    /// `Connection: close` [default: 10000].
    #[arg(long, env = "TALLY_HTTP_REQUESTS_PER_CONNECTION_MAX")]
    pub(crate) http_requests_per_connection_max: Option<u64>,
}

/// Webhook deliveries (threshold and cutoff notifications).
#[derive(Debug, Clone, Args, Default)]
pub(crate) struct WebhookArgs {
    /// One delivery attempt's time limit [default: 10000].
    #[arg(long, env = "TALLY_WEBHOOK_TIMEOUT_MS")]
    pub(crate) webhook_timeout_ms: Option<u64>,
    /// The wait after a first failed attempt; it doubles per further
    /// failure [default: 5000].
    #[arg(long, env = "TALLY_WEBHOOK_RETRY_BASE_MS")]
    pub(crate) webhook_retry_base_ms: Option<u64>,
    /// The longest wait between attempts [default: 3600000].
    #[arg(long, env = "TALLY_WEBHOOK_RETRY_MAX_MS")]
    pub(crate) webhook_retry_max_ms: Option<u64>,
    /// Attempts before a delivery is given up [default: 12].
    #[arg(long, env = "TALLY_WEBHOOK_ATTEMPTS_MAX")]
    pub(crate) webhook_attempts_max: Option<u32>,
    /// Webhook targets allowed although their address is loopback,
    /// private, link-local or otherwise not public: host names, addresses
    /// and ranges, comma-separated (`hooks.internal,10.20.0.0/16`)
    /// [default: none].
    #[arg(long, env = "TALLY_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub(crate) webhook_allow: Option<Vec<String>>,
    /// Where admins reach this server (`https://tally.acme.example`):
    /// Slack notifications link to the subject's console page under it
    /// [default: none, no links].
    #[arg(long, env = "TALLY_PUBLIC_URL")]
    pub(crate) public_url: Option<String>,
}

/// Distributed mode: usage from Kafka, any number of processes.
#[derive(Debug, Clone, Args, Default)]
pub(crate) struct KafkaArgs {
    /// Kafka brokers (host:port,…): run in distributed mode, metering the
    /// `tally.usage` topic in a consumer group. Needs --database-url.
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    pub(crate) kafka_brokers: Option<String>,
    /// The metering consumer group [default: tally-meter].
    #[arg(long, env = "TALLY_KAFKA_GROUP")]
    pub(crate) kafka_group: Option<String>,
    /// Prefix of the topic names [default: tally.].
    #[arg(long, env = "TALLY_KAFKA_TOPIC_PREFIX")]
    pub(crate) kafka_topic_prefix: Option<String>,
    /// Partitions of the usage topic when Tally creates it [default: 8].
    #[arg(long, env = "TALLY_KAFKA_USAGE_PARTITIONS")]
    pub(crate) kafka_usage_partitions: Option<i32>,
    /// Replication factor of the topics Tally creates [default: 1].
    #[arg(long, env = "TALLY_KAFKA_REPLICATION")]
    pub(crate) kafka_replication: Option<i32>,
    /// How often the entity log relay looks for new events when it has
    /// none, in ms [default: 100].
    #[arg(long, env = "TALLY_KAFKA_RELAY_INTERVAL_MS")]
    pub(crate) kafka_relay_interval_ms: Option<u64>,
}

/// The options after layering, with defaults applied and checked.
#[derive(Debug, Clone)]
pub(crate) struct ServeConfig {
    pub(crate) database_url: String,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) listen: String,
    pub(crate) operator_token: Option<String>,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) checkpoint_events_max: u64,
    /// The dedupe window and the breakdown's cap.
    pub(crate) meter: MeterConfig,
    pub(crate) usage_retention: Duration,
    pub(crate) body_bytes_max: usize,
    pub(crate) usage_batch_len_max: usize,
    pub(crate) json_logs: bool,
    pub(crate) metrics_top_users: usize,
    pub(crate) metrics_groups_max: usize,
    pub(crate) metrics_listen: Option<String>,
    pub(crate) metrics_token: Option<String>,
    pub(crate) http: tally_api::server::ServerLimits,
    pub(crate) webhooks: tally_webhooks::SenderOptions,
    pub(crate) kafka: Option<tally_kafka::KafkaOptions>,
    pub(crate) holds: tally_engine::holds::HoldOptions,
    /// Where live holds are journaled (embedded mode only).
    pub(crate) holds_dir: Option<PathBuf>,
    pub(crate) advertise_url: Option<String>,
}

/// The file layer: the same options, snake_case; unknown keys are errors.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    listen: Option<String>,
    operator_token: Option<String>,
    checkpoint_interval_ms: Option<u64>,
    checkpoint_events_max: Option<u64>,
    dedupe_window_hours: Option<u32>,
    dedupe_entries_max: Option<usize>,
    usage_models_max: Option<u16>,
    usage_retention_days: Option<u32>,
    body_bytes_max: Option<usize>,
    usage_batch_len_max: Option<usize>,
    log_format: Option<String>,
    metrics_top_users: Option<usize>,
    metrics_groups_max: Option<usize>,
    metrics_listen: Option<String>,
    metrics_token: Option<String>,
    hold_ttl_default_ms: Option<i64>,
    hold_ttl_max_ms: Option<i64>,
    holds_dir: Option<PathBuf>,
    advertise_url: Option<String>,
    http_header_read_timeout_ms: Option<u64>,
    http_idle_timeout_ms: Option<u64>,
    http_request_timeout_ms: Option<u64>,
    http_connections_max: Option<usize>,
    http_requests_per_connection_max: Option<u64>,
    webhook_timeout_ms: Option<u64>,
    webhook_retry_base_ms: Option<u64>,
    webhook_retry_max_ms: Option<u64>,
    webhook_attempts_max: Option<u32>,
    webhook_allow: Option<Vec<String>>,
    public_url: Option<String>,
    kafka_brokers: Option<String>,
    kafka_group: Option<String>,
    kafka_topic_prefix: Option<String>,
    kafka_usage_partitions: Option<i32>,
    kafka_replication: Option<i32>,
    kafka_relay_interval_ms: Option<u64>,
}

fn read_file(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// What admin commands take from `--config` when neither a flag nor the
/// environment says: the server's URL (its `advertise_url`, else its
/// `listen` address) and its `operator_token`.
#[derive(Debug, Default)]
pub(crate) struct AdminDefaults {
    pub(crate) url: Option<String>,
    pub(crate) token: Option<String>,
}

pub(crate) fn admin_defaults(cli_config: Option<&Path>) -> anyhow::Result<AdminDefaults> {
    let file = read_file(cli_config)?;
    let url = file.advertise_url.or_else(|| {
        file.listen.map(|listen| {
            // A wildcard address is reached on loopback.
            let listen = listen
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            format!("http://{listen}")
        })
    });
    Ok(AdminDefaults {
        url,
        token: file.operator_token.filter(|t| !t.is_empty()),
    })
}

/// `produce`'s Kafka options, with what the flags and environment leave
/// out taken from `--config`.
pub(crate) fn layered_produce(
    cli_config: Option<&Path>,
    mut args: ProduceArgs,
) -> anyhow::Result<ProduceArgs> {
    let file = read_file(cli_config)?;
    args.kafka_brokers = args.kafka_brokers.or(file.kafka_brokers);
    args.kafka_topic_prefix = args.kafka_topic_prefix.or(file.kafka_topic_prefix);
    Ok(args)
}

/// `bench`'s Kafka brokers and database for its kafka scenario, with what
/// the flags and environment leave out taken from `--config`.
pub(crate) fn layered_bench(
    cli_config: Option<&Path>,
    mut args: crate::bench::BenchArgs,
) -> anyhow::Result<crate::bench::BenchArgs> {
    let file = read_file(cli_config)?;
    args.kafka_brokers = args.kafka_brokers.or(file.kafka_brokers);
    args.database_url = args.database_url.or(file.database_url);
    Ok(args)
}

/// The database URL: PostgreSQL when given, else SQLite in the data dir.
pub(crate) fn database_url(store: &StoreArgs) -> anyhow::Result<(String, Option<PathBuf>)> {
    if let Some(url) = &store.database_url {
        if store.data_dir.is_some() {
            bail!("give --database-url or --data-dir, not both");
        }
        return Ok((url.clone(), None));
    }
    let dir = store
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("./tally-data"));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the data dir {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let url = format!("sqlite://{}?mode=rwc", dir.join("tally.db").display());
    Ok((url, Some(dir)))
}

/// `rebuild-projections`' options after layering: the store's and the
/// metering options.
pub(crate) fn layered_rebuild(
    cli_config: Option<&Path>,
    args: RebuildArgs,
) -> anyhow::Result<(StoreArgs, MeterConfig)> {
    let file = read_file(cli_config)?;
    let meter = meter_config(&args.meter, &file)?;
    Ok((store_over(args.store, &file), meter))
}

/// The metering options, layered over the config file, checked.
fn meter_config(args: &MeterArgs, file: &FileConfig) -> anyhow::Result<MeterConfig> {
    let window_hours = args
        .dedupe_window_hours
        .or(file.dedupe_window_hours)
        .unwrap_or(24);
    if !(1..=24 * 31).contains(&window_hours) {
        bail!("dedupe window must be 1 to 744 hours, got {window_hours}");
    }
    Ok(MeterConfig {
        dedupe: DedupeConfig {
            window_ms: i64::from(window_hours) * 3_600_000,
            entries_max: args
                .dedupe_entries_max
                .or(file.dedupe_entries_max)
                .unwrap_or(20_000_000)
                .max(1),
        },
        models_max: match args.usage_models_max.or(file.usage_models_max) {
            None => 200,
            Some(n @ 1..=tally_core::models::MODELS_MAX) => n,
            Some(n) => bail!(
                "usage models max must be 1 to {}, got {n}",
                tally_core::models::MODELS_MAX
            ),
        },
        ..MeterConfig::default()
    })
}

pub(crate) fn layered_store(
    cli_config: Option<&Path>,
    args: StoreArgs,
) -> anyhow::Result<StoreArgs> {
    Ok(store_over(args, &read_file(cli_config)?))
}

/// The store's options over the config file's.
fn store_over(args: StoreArgs, file: &FileConfig) -> StoreArgs {
    StoreArgs {
        data_dir: args.data_dir.or_else(|| file.data_dir.clone()),
        database_url: args.database_url.or_else(|| file.database_url.clone()),
    }
}

impl ServeConfig {
    pub(crate) fn load(cli_config: Option<&Path>, args: ServeArgs) -> anyhow::Result<ServeConfig> {
        let file = read_file(cli_config)?;
        let meter = meter_config(&args.meter, &file)?;
        let store = store_over(args.store, &file);
        let (database_url, data_dir) = database_url(&store)?;
        let log_format = args
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        let json_logs = match log_format.as_str() {
            "text" => false,
            "json" => true,
            other => bail!("log format {other:?} is not text or json"),
        };
        let kafka = match args.kafka.kafka_brokers.or(file.kafka_brokers) {
            None => None,
            Some(brokers) => {
                if data_dir.is_some() || database_url.starts_with("sqlite:") {
                    bail!(
                        "distributed mode (--kafka-brokers) keeps its state in PostgreSQL: give --database-url postgres://…"
                    );
                }
                let mut k = tally_kafka::KafkaOptions::new(brokers);
                if let Some(g) = args.kafka.kafka_group.or(file.kafka_group) {
                    k.group = g;
                }
                if let Some(p) = args.kafka.kafka_topic_prefix.or(file.kafka_topic_prefix) {
                    k.topic_prefix = p;
                }
                if let Some(n) = args
                    .kafka
                    .kafka_usage_partitions
                    .or(file.kafka_usage_partitions)
                {
                    if !(1..=10_000).contains(&n) {
                        bail!("usage partitions must be 1 to 10000, got {n}");
                    }
                    k.usage_partitions = n;
                }
                if let Some(n) = args.kafka.kafka_replication.or(file.kafka_replication) {
                    if !(1..=32).contains(&n) {
                        bail!("replication factor must be 1 to 32, got {n}");
                    }
                    k.replication = n;
                }
                if let Some(ms) = args
                    .kafka
                    .kafka_relay_interval_ms
                    .or(file.kafka_relay_interval_ms)
                {
                    if !(1..=600_000).contains(&ms) {
                        bail!("relay interval must be 1 to 600000 ms, got {ms}");
                    }
                    k.relay_interval = Duration::from_millis(ms);
                }
                Some(k)
            }
        };
        // Distributed processes publish counters after each checkpoint, so a
        // shorter interval shows a cutoff on every process sooner.
        let checkpoint_ms = args
            .checkpoint_interval_ms
            .or(file.checkpoint_interval_ms)
            .unwrap_or(if kafka.is_some() { 250 } else { 1000 });
        if !(10..=600_000).contains(&checkpoint_ms) {
            bail!("checkpoint interval must be 10 ms to 10 minutes, got {checkpoint_ms} ms");
        }
        let metrics_top_users = args
            .metrics_top_users
            .or(file.metrics_top_users)
            .unwrap_or(0);
        if metrics_top_users > 1_000 {
            bail!("metrics top users must be 0 to 1000, got {metrics_top_users}");
        }
        let metrics_groups_max = args
            .metrics_groups_max
            .or(file.metrics_groups_max)
            .unwrap_or(1_000);
        if metrics_groups_max > 100_000 {
            bail!("metrics groups max must be 0 to 100000, got {metrics_groups_max}");
        }
        let metrics_listen = args.metrics_listen.or(file.metrics_listen);
        let metrics_token = args
            .metrics_token
            .or(file.metrics_token)
            .filter(|t| !t.is_empty());
        if metrics_listen.is_some() && metrics_token.is_some() {
            bail!(
                "give --metrics-listen (metrics on an address of their own, no token) or \
                 --metrics-token (on the API port, with a token), not both"
            );
        }
        if let Some(t) = &metrics_token
            && t.len() < 16
        {
            bail!("the metrics token must have at least 16 characters");
        }
        let ttl_max = args
            .hold_ttl_max_ms
            .or(file.hold_ttl_max_ms)
            .unwrap_or(tally_core::holds::HOLD_TTL_MAX_MS);
        let ttl_range = tally_core::holds::HOLD_TTL_MIN_MS..=tally_core::holds::HOLD_TTL_MAX_MS;
        if !ttl_range.contains(&ttl_max) {
            bail!("hold TTL max must be 1000 to 3600000 ms, got {ttl_max} ms");
        }
        let ttl_default = args
            .hold_ttl_default_ms
            .or(file.hold_ttl_default_ms)
            .unwrap_or(tally_core::holds::HOLD_TTL_DEFAULT_MS.min(ttl_max));
        if !(tally_core::holds::HOLD_TTL_MIN_MS..=ttl_max).contains(&ttl_default) {
            bail!(
                "hold TTL default must be 1000 ms to the TTL max ({ttl_max} ms), got {ttl_default} ms"
            );
        }
        let holds_dir = match (args.holds_dir.or(file.holds_dir), &data_dir, &kafka) {
            (_, _, Some(_)) => None,
            (Some(dir), _, None) => Some(dir),
            (None, Some(data), None) => Some(data.join("holds")),
            (None, None, None) => None,
        };
        let w = args.webhooks;
        let ms = |name: &str, v: Option<u64>, default: u64, max: u64| -> anyhow::Result<Duration> {
            let v = v.unwrap_or(default);
            if !(1..=max).contains(&v) {
                bail!("{name} must be 1 to {max} ms, got {v}");
            }
            Ok(Duration::from_millis(v))
        };
        let h = args.http;
        let http = tally_api::server::ServerLimits {
            header_read_timeout: ms(
                "http header read timeout",
                h.http_header_read_timeout_ms
                    .or(file.http_header_read_timeout_ms),
                10_000,
                600_000,
            )?,
            idle_timeout: ms(
                "http idle timeout",
                h.http_idle_timeout_ms.or(file.http_idle_timeout_ms),
                60_000,
                3_600_000,
            )?,
            request_timeout: ms(
                "http request timeout",
                h.http_request_timeout_ms.or(file.http_request_timeout_ms),
                60_000,
                3_600_000,
            )?,
            connections_max: match h.http_connections_max.or(file.http_connections_max) {
                None => 4096,
                Some(n @ 1..=1_000_000) => n,
                Some(n) => bail!("http connections max must be 1 to 1000000, got {n}"),
            },
            requests_per_connection_max: match h
                .http_requests_per_connection_max
                .or(file.http_requests_per_connection_max)
            {
                None => 10_000,
                Some(n) if n >= 1 => n,
                Some(n) => bail!("http requests per connection max must be at least 1, got {n}"),
            },
        };
        let webhooks = tally_webhooks::SenderOptions {
            timeout: ms(
                "webhook timeout",
                w.webhook_timeout_ms.or(file.webhook_timeout_ms),
                10_000,
                300_000,
            )?,
            retry_base: ms(
                "webhook retry base",
                w.webhook_retry_base_ms.or(file.webhook_retry_base_ms),
                5_000,
                86_400_000,
            )?,
            retry_max: ms(
                "webhook retry max",
                w.webhook_retry_max_ms.or(file.webhook_retry_max_ms),
                3_600_000,
                7 * 86_400_000,
            )?,
            attempts_max: match w.webhook_attempts_max.or(file.webhook_attempts_max) {
                None => 12,
                Some(n @ 1..=100) => n,
                Some(n) => bail!("webhook attempts max must be 1 to 100, got {n}"),
            },
            targets: std::sync::Arc::new(
                tally_webhooks::TargetPolicy::parse(
                    &w.webhook_allow.or(file.webhook_allow).unwrap_or_default(),
                )
                .map_err(|e| anyhow::anyhow!("webhook allow: {e}"))?,
            ),
            console_url: w
                .public_url
                .or(file.public_url)
                .map(|u| public_url(&u))
                .transpose()?
                .map(std::sync::Arc::from),
            ..tally_webhooks::SenderOptions::default()
        };
        Ok(ServeConfig {
            database_url,
            data_dir,
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
            operator_token: args
                .operator_token
                .or(file.operator_token)
                .filter(|t| !t.is_empty()),
            checkpoint_interval: Duration::from_millis(checkpoint_ms),
            checkpoint_events_max: args
                .checkpoint_events_max
                .or(file.checkpoint_events_max)
                .unwrap_or(1_000_000)
                .max(1),
            meter,
            usage_retention: Duration::from_secs(
                u64::from(
                    args.usage_retention_days
                        .or(file.usage_retention_days)
                        .unwrap_or(7),
                ) * 86_400,
            ),
            body_bytes_max: args
                .body_bytes_max
                .or(file.body_bytes_max)
                .unwrap_or(8 << 20)
                .max(1024),
            usage_batch_len_max: args
                .usage_batch_len_max
                .or(file.usage_batch_len_max)
                .unwrap_or(10_000)
                .clamp(1, 100_000),
            json_logs,
            metrics_top_users,
            metrics_groups_max,
            metrics_listen,
            metrics_token,
            http,
            webhooks,
            kafka,
            holds: tally_engine::holds::HoldOptions {
                ttl_default_ms: ttl_default,
                ttl_max_ms: ttl_max,
            },
            holds_dir,
            advertise_url: match args.advertise_url.or(file.advertise_url) {
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    bail!("advertise URL must start with http:// or https://, got {u:?}")
                }
                u => u.map(|u| u.trim_end_matches('/').to_owned()),
            },
        })
    }
}

/// `--public-url`: an `http://` or `https://` URL with a host, no query or
/// fragment, nothing a Slack link cannot carry; without its trailing `/`.
fn public_url(u: &str) -> anyhow::Result<String> {
    let bad = |why: &str| anyhow::anyhow!("public URL {u:?} {why}");
    let parsed = reqwest::Url::parse(u).map_err(|e| bad(&format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(bad("must be http:// or https:// with a host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("may not have a query or a fragment"));
    }
    if !u
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"|<>".contains(&b))
    {
        return Err(bad("must be printable ASCII without spaces, |, < or >"));
    }
    Ok(u.trim_end_matches('/').to_owned())
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ProduceArgs {
    /// Kafka brokers (host:port,…) [default: `kafka_brokers` of --config].
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    pub(crate) kafka_brokers: Option<String>,
    /// Prefix of the topic names [default: `kafka_topic_prefix` of
    /// --config, else tally.].
    #[arg(long, env = "TALLY_KAFKA_TOPIC_PREFIX")]
    pub(crate) kafka_topic_prefix: Option<String>,
    /// The org the usage belongs to.
    #[arg(long)]
    pub(crate) org: String,
    /// Comma-separated user ids the calls are spread over.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) users: Vec<String>,
    /// Comma-separated key ids, one per user (user i calls with key i).
    #[arg(long, value_delimiter = ',')]
    pub(crate) keys: Vec<String>,
    /// How many distinct calls.
    #[arg(long, default_value_t = 1000)]
    pub(crate) events: u64,
    /// Calls per second (default: as fast as the broker takes them).
    #[arg(long)]
    pub(crate) rate: Option<u64>,
    /// Publish JSON (with content-type: application/json) instead of protobuf.
    #[arg(long)]
    pub(crate) json: bool,
    /// Percent of calls published twice, as a retrying gateway would.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub(crate) duplicate_percent: u8,
    /// Seed of the generator (also keeps request ids of runs apart).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}
