//! The `tally` command.

mod bench;
mod cli;
mod config;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use tally_api::{AppState, Limits};
use tally_core::org::MeterConfig;
use tally_core::secret::{SecretHash, hash_secret};
use tally_engine::clock::{Clock, OffsetFileClock, SystemClock};
use tally_engine::embedded::EmbeddedLog;
use tally_engine::holds::HoldJournal;
use tally_engine::meter::MeterOptions;
use tally_engine::{Engine, EngineOptions, random_secret};
use tally_store::{Db, DbOptions, redact};
use tokio::sync::watch;

use crate::config::{Cli, Command, ServeConfig};

/// mimalloc rather than the system allocator: the hot paths (decoding usage,
/// replaying the log) allocate and free small strings per event, and glibc's
/// malloc cost a fifth of replay time (docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the hash of a generated operator token is kept.
const OPERATOR_TOKEN_META: &str = "operator_token_sha256";

/// Errors end the process with their causes on one line, never a
/// backtrace (`RUST_BACKTRACE` is for developers' panics, and many shells
/// set it). Exit status (docs/cli.md): 1 refused or failed, 2 a usage
/// error (clap's), 3 the server could not be reached.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<cli::Unreachable>()) {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "tally", &mut std::io::stdout());
        return Ok(());
    }
    let admin = || config::admin_defaults(cli.config.as_deref());
    // For every HTTP client of the process: the CLI's and the webhooks'.
    tally_webhooks::install_tls_crypto();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            let cfg = ServeConfig::load(cli.config.as_deref(), *args)?;
            init_logs(cfg.json_logs);
            runtime.block_on(serve(cfg))
        }
        Command::Orgs { conn, cmd } => print(runtime.block_on(cli::orgs(conn, admin()?, cmd))),
        Command::Users { conn, cmd } => print(runtime.block_on(cli::users(conn, admin()?, cmd))),
        Command::Groups { conn, cmd } => print(runtime.block_on(cli::groups(conn, admin()?, cmd))),
        Command::Keys { conn, cmd } => print(runtime.block_on(cli::keys(conn, admin()?, cmd))),
        Command::Tokens { conn, cmd } => print(runtime.block_on(cli::tokens(conn, admin()?, cmd))),
        Command::GatewayTokens { conn, cmd } => {
            print(runtime.block_on(cli::gateway_tokens(conn, admin()?, cmd)))
        }
        Command::Webhook { conn, cmd } => {
            print(runtime.block_on(cli::webhook(conn, admin()?, cmd)))
        }
        Command::Holds { conn, cmd } => print(runtime.block_on(cli::holds(conn, admin()?, cmd))),
        Command::Usage { conn, args } => print(runtime.block_on(cli::usage(conn, admin()?, args))),
        Command::Audit { conn, args } => print(runtime.block_on(cli::audit(conn, admin()?, args))),
        Command::Enforcement { conn, args } => {
            print(runtime.block_on(cli::enforcement(conn, admin()?, args)))
        }
        Command::DeadLetters { conn, args } => {
            print(runtime.block_on(cli::dead_letters(conn, admin()?, args)))
        }
        Command::Completions { .. } => Ok(()),
        Command::Produce(args) => {
            init_logs(false);
            let args = config::layered_produce(cli.config.as_deref(), args)?;
            runtime.block_on(produce(args))
        }
        Command::Bench(args) => {
            init_logs(false);
            let args = config::layered_bench(cli.config.as_deref(), args)?;
            runtime.block_on(bench::run(args))
        }
        Command::RebuildProjections(args) => {
            init_logs(false);
            let (store, meter) = config::layered_rebuild(cli.config.as_deref(), args)?;
            let (url, _) = config::database_url(&store)?;
            runtime.block_on(rebuild(&url, meter))
        }
        Command::ResetUsagePositions(args) => {
            init_logs(false);
            let store = config::layered_store(cli.config.as_deref(), args)?;
            let (url, _) = config::database_url(&store)?;
            runtime.block_on(reset_usage_positions(&url))
        }
    }
}

fn print(out: anyhow::Result<String>) -> anyhow::Result<()> {
    print!("{}", out?);
    Ok(())
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> anyhow::Result<SecretHash> {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .context("stored operator token hash is not hex")?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("stored operator token hash is not 32 bytes"))
}

/// The configured operator token, or the one generated at first start.
async fn operator_token_hash(db: &Db, configured: Option<&str>) -> anyhow::Result<SecretHash> {
    if let Some(token) = configured {
        if token.len() < 16 {
            bail!("the operator token must have at least 16 characters");
        }
        return Ok(hash_secret(token));
    }
    if let Some(stored) = db.meta(OPERATOR_TOKEN_META).await? {
        tracing::info!(
            "using the operator token generated at first start (only its hash is stored)"
        );
        return unhex32(&stored);
    }
    let token = random_secret("tly_op_")?;
    let mine = hex(&hash_secret(&token));
    let stored = db.meta_init(OPERATOR_TOKEN_META, &mine).await?;
    if stored == mine {
        println!("operator token (shown once, keep it): {token}");
    }
    unhex32(&stored)
}

/// Warns when the process may open fewer files than the connection cap
/// needs (each connection is one; the store, Kafka and logs take some
/// more): past the limit accepts fail instead of being refused cleanly.
fn warn_if_few_descriptors(connections_max: usize) {
    const OTHERS: u64 = 256;
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(soft) = soft
        && soft < connections_max as u64 + OTHERS
    {
        tracing::warn!(
            open_files_max = soft,
            connections_max,
            "the open-file limit is below the connection cap plus {OTHERS}: raise it (ulimit -n) or lower --http-connections-max"
        );
    }
}

/// Bucket bounds of every latency histogram: 50 µs to a minute, finest
/// below 250 µs (where authorize answers).
const LATENCY_BUCKETS_SECONDS: [f64; 21] = [
    0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = PrometheusBuilder::new()
        // Histograms as buckets, which add up across processes.
        .set_buckets(&LATENCY_BUCKETS_SECONDS)
        .context("histogram buckets")?
        // Gauges are set at every scrape; those not set for a minute belong
        // to orgs, groups or partitions that went away.
        .idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(std::time::Duration::from_secs(60)),
        )
        .install_recorder()
        .context("installing metrics")?;
    // The state is locked before anything reads or writes it (the schema's
    // migration included).
    let file_lock = lock_sqlite(
        &cfg.database_url,
        "another tally process is using {} (a serve, or rebuild-projections)",
    )?;
    let db = Db::open(&DbOptions {
        // Processes read each other's changes: one clock dates them all.
        dated_by_database: cfg.kafka.is_some(),
        migrate: false,
        ..DbOptions::new(cfg.database_url.clone())
    })
    .await
    .with_context(|| format!("opening {}", redact(&cfg.database_url)))?;
    let state_lock = match file_lock {
        Some(file) => StateLock::File(file),
        None => StateLock::Session(Arc::new(tokio::sync::Mutex::new(
            db.lock_serving(cfg.kafka.is_none()).await?,
        ))),
    };
    db.migrate()
        .await
        .with_context(|| format!("migrating {}", redact(&cfg.database_url)))?;
    let token_hash = operator_token_hash(&db, cfg.operator_token.as_deref()).await?;
    let opts = EngineOptions {
        meter: MeterOptions {
            checkpoint_interval: cfg.checkpoint_interval,
            checkpoint_events_max: cfg.checkpoint_events_max,
            usage_retention: cfg.usage_retention,
            window_ms: cfg.meter.dedupe.window_ms,
        },
        meter_config: cfg.meter,
        holds: cfg.holds,
    };
    let engine = Arc::new(Engine::start(db.clone(), clock(), opts, token_hash).await?);
    // Bound before the mode starts: a partition's owner says where it
    // answers when it claims the partition.
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    // Bound before "listening" is printed: whoever waits for that line may
    // scrape at once.
    let metrics_listener = match &cfg.metrics_listen {
        None => None,
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("listening for metrics on {at}"))?,
        ),
    };
    if cfg.kafka.is_some() && cfg.advertise_url.is_none() {
        // Every process would advertise the same address, or one the others
        // cannot reach: hold requests would not reach the org's owner.
        if addr.ip().is_unspecified() {
            bail!(
                "listening on {addr}, the other processes cannot tell where this one answers: \
                 give --advertise-url (the URL they reach it at)"
            );
        }
        if addr.ip().is_loopback() {
            tracing::warn!(%addr, "distributed on a loopback address without --advertise-url: only processes on this host can forward hold requests here");
        }
    }
    engine.meter.set_advertised_url(
        cfg.advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
    );
    let mode = match &cfg.kafka {
        // Distributed: partitions of the usage topic, claimed as the
        // consumer group assigns them.
        Some(kafka) => {
            let dist = tally_kafka::Distributed::start(Arc::clone(&engine), kafka.clone())
                .await
                .with_context(|| format!("starting on Kafka at {}", kafka.brokers))?;
            Mode::Distributed(dist)
        }
        // Embedded: this process meters every org, from the SQL usage log.
        None => {
            // The replay notes which of the journal's holds it counts.
            let watched = match &cfg.holds_dir {
                Some(dir) => HoldJournal::placed_ids(dir)
                    .with_context(|| format!("reading the hold journal in {}", dir.display()))?,
                None => Default::default(),
            };
            let log =
                Arc::new(EmbeddedLog::recover_watching(Arc::clone(&engine.meter), watched).await?);
            engine.set_sink(Arc::clone(&log) as Arc<dyn tally_engine::UsageSink>);
            // After the recovery: a hold whose usage was counted is settled.
            let replayed = log.take_replayed();
            if let Some(dir) = &cfg.holds_dir {
                let (journal, restored) =
                    HoldJournal::open(dir, &engine.registry, engine.now_ms(), &replayed)
                        .with_context(|| {
                            format!("opening the hold journal in {}", dir.display())
                        })?;
                tracing::info!(
                    live = restored.live,
                    expired = restored.expired,
                    settled = restored.settled,
                    orphaned = restored.orphaned,
                    unreadable = restored.unreadable,
                    "holds restored"
                );
                if restored.unreadable > 0 {
                    tracing::warn!(
                        lines = restored.unreadable,
                        "the hold journal had unreadable lines; their holds are gone"
                    );
                }
                engine.set_hold_journal(Arc::new(journal));
            }
            Mode::Embedded { log }
        }
    };
    let described = match (&cfg.data_dir, &cfg.kafka) {
        (_, Some(k)) => format!(
            "distributed, Kafka {}, database {}",
            k.brokers,
            redact(&cfg.database_url)
        ),
        (Some(dir), None) => format!("embedded, data in {}", dir.display()),
        (None, None) => format!("embedded, database {}", redact(&cfg.database_url)),
    };
    // Registered before anything can tell the process is up: a SIGTERM
    // right after stops it cleanly (it killed it while the handler waited
    // for the server's first poll).
    let stop_signal = signal();
    println!("tally listening on http://{addr} ({described})");
    tracing::info!(%addr, mode = described, startup_ms = started.elapsed().as_millis() as u64, "serving");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let meter_loop = tokio::spawn({
        let engine = Arc::clone(&engine);
        let stop = stopped(stop_rx.clone());
        async move { engine.meter.run(stop).await }
    });
    let lock_watch = match &state_lock {
        StateLock::Session(lock) => Some(tokio::spawn(watch_state_lock(
            db.clone(),
            Arc::clone(lock),
            cfg.kafka.is_none(),
            Arc::clone(&engine),
            stopped(stop_rx.clone()),
        ))),
        StateLock::File(_) => None,
    };
    let housekeeping = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        let log = match &mode {
            Mode::Embedded { log, .. } => Some(Arc::clone(log)),
            Mode::Distributed(_) => None,
        };
        async move {
            let Some(log) = log else { return };
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    _ = tick.tick() => log.purge().await,
                }
            }
        }
    });
    // Every process sends webhook deliveries; each is claimed by one.
    let webhook_keys = Arc::new(
        tally_webhooks::Keyring::load_or_create(&db)
            .await
            .map_err(|e| anyhow::anyhow!("loading the webhook key: {e}"))?,
    );
    tally_webhooks::describe();
    tally_api::describe_metrics();
    let sender =
        tally_webhooks::Sender::new(db.clone(), Arc::clone(&webhook_keys), cfg.webhooks.clone())
            .map_err(|e| anyhow::anyhow!(e))?
            .with_clock({
                let engine = Arc::clone(&engine);
                Arc::new(move || engine.now_ms())
            });
    let webhooks = tokio::spawn(sender.run(stop_rx.clone()));
    let hold_upkeep = tokio::spawn({
        let engine = Arc::clone(&engine);
        let stop = stopped(stop_rx.clone());
        async move {
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    _ = tick.tick() => {
                        let engine = Arc::clone(&engine);
                        let _ = tokio::task::spawn_blocking(move || engine.hold_upkeep()).await;
                    }
                }
            }
        }
    });
    let upkeep = tokio::spawn({
        let handle = metrics.clone();
        let stop = stopped(stop_rx.clone());
        async move {
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        }
    });

    let state = AppState {
        engine: Arc::clone(&engine),
        metrics: Some(metrics),
        limits: Limits {
            body_bytes_max: cfg.body_bytes_max,
            usage_batch_len_max: cfg.usage_batch_len_max,
        },
        snapshots: Arc::default(),
        webhook_keys,
        metrics_access: if cfg.metrics_listen.is_some() {
            tally_api::MetricsAccess::Elsewhere
        } else {
            tally_api::MetricsAccess::Token {
                scrape_token_hash: cfg.metrics_token.as_deref().map(hash_secret),
            }
        },
        webhook_targets: Arc::clone(&cfg.webhooks.targets),
        console_url: cfg.webhooks.console_url.clone(),
        metrics_options: tally_engine::gauges::GaugeOptions {
            all_orgs: cfg.kafka.is_none(),
            top_users: cfg.metrics_top_users,
            groups_max: cfg.metrics_groups_max,
        },
    };
    let failed = {
        let engine = Arc::clone(&engine);
        async move { engine.meter.failed().await }
    };
    let (why_tx, mut why_rx) = watch::channel("");
    let shutdown = async move {
        let why = tokio::select! {
            () = stop_signal => "signal",
            () = failed => "meter failure",
        };
        let _ = why_tx.send(why);
    };
    let metrics_server = match metrics_listener {
        None => None,
        Some(listener) => {
            println!("tally metrics on http://{}/metrics", listener.local_addr()?);
            Some(tokio::spawn(tally_api::server::serve(
                listener,
                tally_api::metrics_router(state.clone()),
                cfg.http.clone(),
                stopped(stop_rx.clone()),
            )))
        }
    };
    warn_if_few_descriptors(cfg.http.connections_max);
    tally_api::server::serve(
        listener,
        tally_api::router(state),
        cfg.http.clone(),
        shutdown,
    )
    .await;
    let why = *why_rx.borrow_and_update();
    let _ = stop_tx.send(true);
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    let _ = meter_loop.await;
    if let Some(watch) = lock_watch {
        let _ = watch.await;
    }
    let _ = upkeep.await;
    let _ = hold_upkeep.await;
    // The last holds written survive a power loss too.
    engine.hold_upkeep();
    let _ = webhooks.await;
    let _ = housekeeping.await;
    // Leaving the group checkpoints and hands over every partition.
    if let Mode::Distributed(dist) = mode {
        dist.shutdown().await;
    }
    if why == "meter failure" {
        db.close().await;
        state_lock.release().await;
        bail!("the meter stopped after a failure; restart to recover from the log");
    }
    tracing::info!("shutting down: final checkpoint");
    engine.meter.shutdown().await.context("final checkpoint")?;
    db.close().await;
    state_lock.release().await;
    tracing::info!("stopped");
    Ok(())
}

/// How this process meters.
enum Mode {
    Embedded { log: Arc<EmbeddedLog> },
    Distributed(tally_kafka::Distributed),
}

/// Takes the lock file of an SQLite database (see
/// [`tally_store::sqlite_lock_path`]): `None` for another backend; refused
/// with `busy` (naming the database) while another process holds it.
fn lock_sqlite(url: &str, busy: &str) -> anyhow::Result<Option<std::fs::File>> {
    let Some(path) = tally_store::sqlite_lock_path(url) else {
        return Ok(None);
    };
    match lock_file(&path)? {
        Some(file) => Ok(Some(file)),
        None => bail!("{}", busy.replacen("{}", &redact(url), 1)),
    }
}

/// What keeps others off the state this process serves.
enum StateLock {
    File(std::fs::File),
    /// Watched by [`watch_state_lock`].
    Session(Arc<tokio::sync::Mutex<Option<tally_store::SessionLock>>>),
}

impl StateLock {
    /// Lets the others on at once.
    async fn release(self) {
        match self {
            StateLock::File(file) => drop(file),
            StateLock::Session(lock) => {
                if let Some(lock) = lock.lock().await.take() {
                    lock.release().await;
                }
            }
        }
    }
}

/// How often a serve checks that it still holds its PostgreSQL state lock.
const STATE_LOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the PostgreSQL state lock held while the process serves. A lock
/// whose connection went away (a database restart, a dropped connection,
/// `pg_terminate_backend`) ended with it: it is taken again at once. If a
/// maintenance command (or, embedded, another serve) took it meanwhile, this
/// process must not write any more: the meter stops, and with it the serve.
async fn watch_state_lock(
    db: Db,
    lock: Arc<tokio::sync::Mutex<Option<tally_store::SessionLock>>>,
    exclusive: bool,
    engine: Arc<Engine>,
    stop: impl std::future::Future<Output = ()>,
) {
    // Each database call is bounded: a half-open connection must neither
    // hang the watch nor the shutdown waiting for it.
    const CALL_MAX: std::time::Duration = std::time::Duration::from_secs(5);
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(STATE_LOCK_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_since: Option<std::time::Instant> = None;
    let mut refusals = 0u32;
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        let check = async {
            let mut held = lock.lock().await;
            if let Some(l) = held.as_mut()
                && tokio::time::timeout(CALL_MAX, l.held()).await == Ok(true)
            {
                return true;
            }
            if lost_since.is_none() {
                tracing::warn!(
                    "the state lock's connection to PostgreSQL went away: taking it again"
                );
            }
            let since = *lost_since.get_or_insert_with(std::time::Instant::now);
            // Its server process may still run (and hold it): end it first.
            if let Some(old) = held.take()
                && let Ok(Err(e)) = tokio::time::timeout(CALL_MAX, db.end_lost_lock(old)).await
            {
                tracing::debug!(error = %e, "ending the lost lock's connection failed");
            }
            match tokio::time::timeout(CALL_MAX, db.lock_serving(exclusive)).await {
                Ok(Ok(again)) => {
                    *held = again;
                    lost_since = None;
                    refusals = 0;
                    tracing::warn!(
                        lost_ms = since.elapsed().as_millis() as u64,
                        "the state lock was lost and taken again"
                    );
                }
                // Our own lost connection's process may not have exited yet
                // (it frees the lock as it does): refused by the embedded
                // lock alone, try again for a few checks.
                Ok(Err(tally_store::Error::Config(why)))
                    if !why.contains("maintenance command") && refusals < 3 =>
                {
                    refusals += 1;
                    tracing::debug!(why, "the state lock is still held; trying again");
                }
                Ok(Err(e @ tally_store::Error::Config(_))) => {
                    tracing::error!(error = %e, "the state lock was lost and another process took it");
                    engine.meter.poison(&format!(
                        "the state lock was lost and another process took it: {e}"
                    ));
                    return false;
                }
                // The database is unreachable: so are this process's writes.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "taking the state lock again failed; retrying");
                }
                Err(_) => tracing::debug!("taking the state lock again timed out; retrying"),
            }
            true
        };
        let go_on = tokio::select! {
            () = &mut stop => return,
            go_on = check => go_on,
        };
        if !go_on {
            return;
        }
    }
}

/// Takes `path`'s exclusive file lock: `None` when another process has it.
fn lock_file(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    // Never truncated: it may be any file a URL names.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Takes ctrl-c and SIGTERM from now on (they no longer kill the process);
/// the future resolves on either.
fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (term, int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            async fn recv(s: Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(mut s) => {
                        let _ = s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = recv(term) => {}
                () = recv(int) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("signal received: stopping");
    }
}

/// The database at `url`, opened for a maintenance command: never under a
/// running service (it serves what these commands rewrite), locked before
/// the schema's migration too. Hand the locks back to [`close_offline`].
async fn open_offline(
    url: &str,
) -> anyhow::Result<(Db, Option<std::fs::File>, Option<tally_store::SessionLock>)> {
    let file_lock = lock_sqlite(
        url,
        "a tally serve (or another maintenance command) is using {}: stop it first (this \
         command rewrites what it serves)",
    )?;
    let db = Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(url)
    })
    .await
    .with_context(|| format!("opening {}", redact(url)))?;
    let session_lock = db.lock_maintenance().await?;
    db.migrate()
        .await
        .with_context(|| format!("migrating {}", redact(url)))?;
    Ok((db, file_lock, session_lock))
}

async fn close_offline(
    db: Db,
    file_lock: Option<std::fs::File>,
    session_lock: Option<tally_store::SessionLock>,
) {
    if let Some(lock) = session_lock {
        lock.release().await;
    }
    db.close().await;
    drop(file_lock);
}

async fn rebuild(url: &str, meter: MeterConfig) -> anyhow::Result<()> {
    use tally_store::log::Rebuilding;
    use tally_store::recount::{Recount, Recounting};
    let started = Instant::now();
    let (db, file_lock, session_lock) = open_offline(url).await?;
    eprintln!(
        "rebuilding read models from the entity log in {}",
        redact(url)
    );
    let rebuilt = db
        .rebuild_projections(meter, |p| match p {
            Rebuilding::Entities(n) => eprintln!("  {n} events projected"),
            Rebuilding::Usage(Recounting::Read(n)) => {
                eprintln!("  {n} usage events counted again");
            }
            Rebuilding::Usage(Recounting::Writing(n)) => {
                eprintln!("  writing {n} rows of spend and usage");
            }
        })
        .await
        .context("rebuilding projections")?;
    close_offline(db, file_lock, session_lock).await;
    println!(
        "rebuilt read models from {} events in {} ms",
        rebuilt.events,
        started.elapsed().as_millis()
    );
    match rebuilt.usage {
        Recount::Counted {
            records,
            events,
            counted,
            counters,
            days,
            usage,
        } => println!(
            "counted spend and usage again from the usage log: {records} records, {events} \
             events, {counted} counted (the rest duplicates or refused, as live); wrote \
             {counters} monthly counters, {days} daily rows, {usage} rows by model"
        ),
        Recount::Kept(why) => {
            println!("kept spend and usage by model as checkpoints wrote them: {why}")
        }
    }
    Ok(())
}

async fn reset_usage_positions(url: &str) -> anyhow::Result<()> {
    let (db, file_lock, session_lock) = open_offline(url).await?;
    let now_ms = SystemClock.now_ms();
    let n = db
        .reset_usage_positions(now_ms)
        .await
        .context("resetting the usage positions")?;
    close_offline(db, file_lock, session_lock).await;
    println!(
        "reset the positions of {n} usage partitions: the next tally serve reads its usage topic \
         from the beginning (counted spend is kept; usage read again counts once, and usage older \
         than the dedupe window is dead-lettered as too late)"
    );
    Ok(())
}

async fn produce(args: config::ProduceArgs) -> anyhow::Result<()> {
    let brokers = args.kafka_brokers.context(
        "which Kafka? pass --kafka-brokers (or TALLY_KAFKA_BROKERS, or kafka_brokers in --config)",
    )?;
    let mut opts = tally_kafka::KafkaOptions::new(brokers);
    opts.topic_prefix = args
        .kafka_topic_prefix
        .unwrap_or_else(|| "tally.".to_owned());
    let produce_args = tally_kafka::produce::ProduceArgs {
        org: args.org,
        users: args.users,
        keys: args.keys,
        events: args.events,
        rate: args.rate,
        json: args.json,
        duplicate_percent: args.duplicate_percent,
        seed: args.seed,
    };
    let started = Instant::now();
    let summary = tally_kafka::produce::produce(&opts, &produce_args, |s| {
        eprintln!(
            "  {} messages published ({} distinct)",
            s.published, s.distinct
        );
    })
    .await
    .context("publishing usage")?;
    println!(
        "published {} messages ({} distinct calls costing {} micro-USD, {}) to {} in {} ms",
        summary.published,
        summary.distinct,
        summary.cost_micros,
        tally_core::money::format_usd(summary.cost_micros),
        opts.usage_topic(),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The system clock; for the suite's tests of time (key expiry, rotation),
/// `TALLY_TEST_CLOCK_FILE` names a file whose number of milliseconds is
/// added to it.
fn clock() -> Arc<dyn Clock> {
    match std::env::var_os("TALLY_TEST_CLOCK_FILE") {
        Some(path) => {
            tracing::warn!(path = %std::path::Path::new(&path).display(), "TALLY_TEST_CLOCK_FILE: the clock is offset by this file (for tests only)");
            Arc::new(OffsetFileClock::new(path))
        }
        None => Arc::new(SystemClock),
    }
}
