//! Tally's running state, everything but HTTP: the orgs in memory
//! ([`registry`]), the command path ([`commands`]), the metering engine
//! ([`meter`]) and the embedded usage log ([`embedded`]), authentication and
//! authorize. [`Engine::start`] rebuilds the entity state from the database;
//! the mode's wiring then claims partitions and sets the usage sink.

pub mod clock;
pub mod commands;
pub mod embedded;
pub mod gauges;
pub mod health;
pub mod holds;
pub mod listing;
pub mod meter;
pub mod metrics;
pub mod registry;
pub mod tokens;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tally_core::authorize::{Decision, authorize};
use tally_core::entity::CommandError;
use tally_core::ids::OrgId;
use tally_core::org::MeterConfig;
use tally_core::secret::{SECRET_RANDOM_LEN, SecretHash, encode_secret, hash_secret};
use tally_core::usage::UsageEvent;
use tally_store::Db;

use crate::clock::Clock;
use crate::commands::Commands;
use crate::holds::{HoldJournal, HoldOptions};
use crate::meter::{IngestReport, Meter, MeterOptions};
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("no such org")]
    UnknownOrg,
    #[error(transparent)]
    Store(#[from] tally_store::Error),
    #[error("{0}")]
    Unavailable(String),
    /// The hold journal could not be written (or synced): a reserve or
    /// release is refused, a checkpoint postponed.
    #[error("hold journal: {0}")]
    HoldJournal(String),
    /// Refused without trying: the store is in a fault ([`health`]).
    #[error("{0}")]
    StoreFault(health::Fault),
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// A reserve names a live hold with other terms, or a counted call.
    #[error("{0}")]
    HoldConflict(String),
    /// Another process meters the org's partition (or this one is taking
    /// it over): hold requests are the owner's.
    #[error(
        "org {org} is metered by another process (partition {partition} of the usage \
         topic), which places its holds, or this process is taking the partition over: retry"
    )]
    NotOwner { org: String, partition: i32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// What kind of storage fault this error is, if it is one: the request
    /// may succeed when retried once the store can write again.
    pub fn store_unavailable(&self) -> Option<&'static str> {
        match self {
            Error::Store(e) => e.unavailable(),
            Error::StoreFault(f) => Some(f.reason),
            _ => None,
        }
    }
}

/// A boxed future, for the object-safe [`UsageSink`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where `POST /v1/usage` puts valid events: the embedded log (counted at
/// once) or the Kafka topic (counted by whichever process owns the org).
pub trait UsageSink: Send + Sync + std::fmt::Debug {
    /// Takes valid events with their index in the request; answers once the
    /// ones it accepted are durable.
    fn ingest(&self, events: Vec<(usize, UsageEvent)>) -> BoxFuture<'_, Result<IngestReport>>;
}

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub meter: MeterOptions,
    pub meter_config: MeterConfig,
    pub holds: HoldOptions,
}

pub use tokens::Principal;

#[derive(Debug)]
pub struct Engine {
    pub db: Db,
    pub registry: Arc<Registry>,
    pub commands: Arc<Commands>,
    pub meter: Arc<Meter>,
    sink: OnceLock<Arc<dyn UsageSink>>,
    hold_journal: OnceLock<Arc<HoldJournal>>,
    hold_partition_of: OnceLock<crate::holds::PartitionOf>,
    /// Distributed: one SQL write of an org's holds at a time (see
    /// `Engine::reserve`).
    hold_writes: dashmap::DashMap<OrgId, Arc<tokio::sync::Mutex<()>>>,
    hold_options: HoldOptions,
    clock: Arc<dyn Clock>,
    operator_token_hash: SecretHash,
    tokens: tokens::TokenState,
}

impl Engine {
    /// Rebuilds the entity state from `db`. The meter owns no partition yet:
    /// the mode's wiring claims them and sets the usage sink.
    pub async fn start(
        db: Db,
        clock: Arc<dyn Clock>,
        opts: EngineOptions,
        operator_token_hash: SecretHash,
    ) -> Result<Engine> {
        crate::metrics::describe();
        let started = Instant::now();
        let tokens = tokens::TokenState::load(&db).await?;
        let registry = Arc::new(Registry::new(opts.meter_config));
        let events = db
            .scan_events(|e| {
                registry.apply(std::slice::from_ref(&e));
                Ok(())
            })
            .await?;
        tracing::info!(
            orgs = registry.len(),
            events,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "entity log folded"
        );
        let meter_opts = MeterOptions {
            window_ms: opts.meter_config.dedupe.window_ms,
            ..opts.meter
        };
        let meter = Arc::new(Meter::new(
            db.clone(),
            Arc::clone(&registry),
            Arc::clone(&clock),
            meter_opts,
        ));
        let commands = Arc::new(Commands::new(
            db.clone(),
            Arc::clone(&registry),
            Arc::clone(&meter),
            Arc::clone(&clock),
        ));
        Ok(Engine {
            db,
            registry,
            commands,
            meter,
            sink: OnceLock::new(),
            hold_journal: OnceLock::new(),
            hold_partition_of: OnceLock::new(),
            hold_writes: dashmap::DashMap::new(),
            hold_options: opts.holds,
            clock,
            operator_token_hash,
            tokens,
        })
    }

    /// Where ingested usage goes; set once, after the mode is wired.
    pub fn set_sink(&self, sink: Arc<dyn UsageSink>) {
        let _ = self.sink.set(sink);
    }

    /// Hands valid usage to the sink.
    pub async fn ingest(&self, events: Vec<(usize, UsageEvent)>) -> Result<IngestReport> {
        match self.sink.get() {
            Some(sink) => sink.ingest(events).await,
            None => Err(Error::Unavailable("usage ingest is not ready".into())),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The gateway's question: may the holder of `secret` make this call?
    /// Live holds count as spent.
    pub fn authorize(
        &self,
        secret: &str,
        feature: Option<&str>,
        user_id: Option<&str>,
    ) -> (Option<OrgId>, Decision) {
        let started = Instant::now();
        let hash = hash_secret(secret);
        let decision = match self.registry.org_of_secret(&hash) {
            None => (None, Decision::unknown_key()),
            Some((org_id, cell)) => {
                let now = self.clock.now_ms();
                let decide = |org: &tally_core::org::OrgState| {
                    org.dir
                        .key_for_secret(&hash, now)
                        .map(|key| authorize(org, key, feature, user_id, now, 0))
                };
                let d = {
                    let org = cell.read();
                    (org.meter.holds.next_expiry_ms() > now).then(|| decide(&org))
                };
                // A hold is due to expire: free it first, so an expired
                // hold never counts.
                let d = d.unwrap_or_else(|| {
                    let mut org = cell.write();
                    let _ = org.meter.holds.expire(now);
                    decide(&org)
                });
                match d {
                    Some(d) => (Some(org_id), d),
                    None => (None, Decision::unknown_key()),
                }
            }
        };
        record_decision(&decision.1, "plain", started);
        decision
    }
}

/// Counts and times one authorize decision.
pub(crate) fn record_decision(d: &Decision, kind: &'static str, started: Instant) {
    let outcome = if d.allowed { "allowed" } else { "denied" };
    ::metrics::counter!(crate::metrics::AUTHORIZE_DECISIONS, "outcome" => outcome, "reason" => d.reason.as_str())
        .increment(1);
    ::metrics::histogram!(crate::metrics::AUTHORIZE_SECONDS, "kind" => kind)
        .record(started.elapsed().as_secs_f64());
}

/// A new secret: `prefix` and 256 random bits in hex.
pub fn random_secret(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; SECRET_RANDOM_LEN];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Unavailable(format!("no randomness from the OS: {e}")))?;
    Ok(encode_secret(prefix, &bytes))
}

/// A new id for an entity created without one: `prefix` and 16 random
/// lowercase letters and digits.
pub fn random_id(prefix: &str) -> Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Unavailable(format!("no randomness from the OS: {e}")))?;
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    for b in bytes {
        id.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
    }
    Ok(id)
}
