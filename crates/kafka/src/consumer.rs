//! The metering consumer: one thread per process, one consumer in the
//! metering group on `tally.usage`.
//!
//! - **Assignment**: each assigned partition is claimed ([`Meter::claim`]:
//!   its epoch is bumped, fencing out the previous owner, and its checkpoint
//!   is loaded into its orgs) and the consumer starts at the checkpoint's
//!   position, to read the last message applied again. Kafka offsets are
//!   never committed: the checkpoint, written in the same SQL transaction as
//!   the state it belongs to, is the only record of how far a partition was
//!   applied.
//! - **The log is the checkpoint's**: a checkpoint keeps a fingerprint (its
//!   mark) of the message at its position. The first message read after a
//!   claim must be that message, the same, or a later one; a log that goes
//!   back (a topic deleted and created again, or another deployment's
//!   database) refuses the partition: none of it is metered, the error says
//!   why, and `tally_usage_partitions_refused` counts it. A first message
//!   past the next offset is checked against the log's start: usage deleted
//!   by retention before it was metered is reported, not skipped silently.
//! - **Messages**: decoded and checked (the key is the org, the org belongs on
//!   this partition by murmur2); counted, or kept as dead letters — in the
//!   checkpoint (exactly once, for admins) and on the dead-letter topic (at
//!   least once, for tooling). The partition keeps moving either way.
//! - **Revocation**: every owned partition is checkpointed, then the revoked
//!   ones are released. If the process died instead, the next owner replays
//!   from the last checkpoint: counters are states and dedupe windows are in
//!   the checkpoint, so the replay rewrites the same values.
//!
//! The thread is a plain OS thread: rebalance callbacks run inside `poll`,
//! and block on the runtime for their SQL work.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tally_core::ids::OrgId;
use tally_core::org::{Rejection, UsageOutcome};
use tally_core::usage::UsageEvent;
use tally_engine::Engine;
use tally_engine::meter::{LogPoint, Meter, Positioned};
use tally_store::checkpoint::{DeadLetter, PartitionCheckpoint};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::codec::{self, Bad, CONTENT_TYPE};
use crate::metrics::{
    CONSUMER_LAG, DEAD_LETTERS, REBALANCES, USAGE_FORWARDED, USAGE_LOG_TIME, USAGE_LOST,
};
use crate::murmur2::partition_for;
use crate::{KafkaOptions, Result};

/// How long a batch waits for the log's clock to pass its usage's log time
/// (a database clock behind the broker's or this process's); past it, the
/// batch is applied all the same.
const LOG_CLOCK_WAIT_MAX: Duration = Duration::from_secs(1);
/// Messages applied per lock of the meter.
const BATCH_LEN_MAX: usize = 1_000;
/// How long a batch may wait to fill once it has a message.
const BATCH_WAIT: Duration = Duration::from_millis(20);
/// How long a claim is retried before the meter gives up (and the process
/// exits to be restarted); while the database is unreachable, as long as
/// [`CATCH_UP_WAIT_MAX`].
const CLAIM_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long a batch with usage of subjects this process has not seen waits
/// for their orgs' logs to be readable from SQL, rather than being
/// dead-lettered as unattributable; well inside `max.poll.interval.ms`
/// (300 s). While it waits, this process's partitions stand still.
const CATCH_UP_WAIT_MAX: Duration = Duration::from_secs(240);

struct MeterContext {
    meter: Arc<Meter>,
    rt: Handle,
    topic: String,
    /// The name partitions are bound to in the checkpoints table.
    log: String,
}

impl ClientContext for MeterContext {
    /// Consumer lag per owned partition, from the consumer's own view: the
    /// high watermark its fetches saw, past the last position applied.
    fn stats(&self, s: rdkafka::Statistics) {
        let Some(topic) = s.topics.get(&self.topic) else {
            return;
        };
        for (p, part) in &topic.partitions {
            let Some(position) = self.meter.position(*p) else {
                continue;
            };
            if part.hi_offset < 0 {
                continue;
            }
            let lag = (part.hi_offset - (position + 1)).max(0);
            metrics::gauge!(CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
        }
    }
}

impl MeterContext {
    fn claim(&self, p: i32) -> Option<PartitionCheckpoint> {
        let started = Instant::now();
        let mut warned = false;
        loop {
            match self.rt.block_on(self.meter.claim(p, &self.log)) {
                Ok(checkpoint) => return Some(checkpoint),
                // The database meters another log: no retry changes that.
                Err(e @ tally_engine::Error::Store(tally_store::Error::OtherLog { .. })) => {
                    self.meter.poison(&e.to_string());
                    return None;
                }
                // The database is away: exiting would only restart into the
                // same outage. Waited for as long as the group allows.
                Err(e)
                    if e.store_unavailable().is_some() && started.elapsed() < CATCH_UP_WAIT_MAX =>
                {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(partition = p, error = %e, "claiming a partition waits for the database");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) if started.elapsed() < CLAIM_RETRY_FOR => {
                    tracing::warn!(partition = p, error = %e, "claiming a partition failed; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    self.meter
                        .poison(&format!("cannot claim partition {p}: {e}"));
                    return None;
                }
            }
        }
    }
}

impl ConsumerContext for MeterContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(REBALANCES, "kind" => "assign").increment(1);
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, p) in &assigned {
                    let Some(checkpoint) = self.claim(*p) else {
                        return;
                    };
                    // From the message applied last, to check it is the
                    // same (see `follows`); without its mark (a checkpoint
                    // older than marks), from the next.
                    let offset = match (checkpoint.position, checkpoint.mark) {
                        (p, _) if p < 0 => Offset::Beginning,
                        (p, Some(_)) => Offset::Offset(p),
                        (p, None) => Offset::Offset(p + 1),
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *p, offset) {
                        tracing::error!(partition = p, error = %e, "setting a start offset failed");
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                // A partition refused before (and paused) may come back: it
                // is checked again, so it must be fetched again. A pause
                // outlives an assignment in librdkafka.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::error!(error = %e, "resuming assigned partitions failed");
                }
                tracing::info!(partitions = ?assigned.iter().map(|(_, p)| p).collect::<Vec<_>>(), "partitions assigned");
                self.meter.set_ready(true);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(REBALANCES, "kind" => "revoke").increment(1);
                let started = Instant::now();
                // Best effort: what a failed checkpoint loses, the next owner
                // replays from the log.
                if let Err(e) = self.rt.block_on(self.meter.checkpoint()) {
                    tracing::warn!(error = %e, "checkpoint before revocation failed");
                }
                for e in tpl.elements() {
                    self.meter.release(e.partition());
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "partitions revoked"
                );
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed; giving every partition up");
                for p in self.meter.owned_partitions() {
                    self.meter.release(p);
                }
                let _ = consumer.unassign();
            }
        }
    }
}

/// A message, owned, as much as the meter needs.
struct Incoming {
    partition: i32,
    offset: i64,
    /// Its timestamp as the log keeps it (-1 when none).
    stamp: i64,
    logged_at_ms: i64,
    key: Option<Vec<u8>>,
    content_type: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    /// Forwarded here by a process that read it on another partition.
    forwarded: bool,
}

/// The header a forwarded usage message carries: the partition and offset
/// it was first read at.
const FORWARDED_FROM: &str = "tally-forwarded-from";
/// And its log time there (Unix ms): a copy is judged by the earlier of
/// that and its own (a broker dating the copy dates it when forwarded).
const FORWARDED_LOGGED_AT: &str = "tally-logged-at";

/// Where a message's log time came from (the `source` label of
/// [`USAGE_LOG_TIME`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogTime {
    /// The broker's clock: the topic's `message.timestamp.type` is
    /// `LogAppendTime`.
    Broker,
    /// The producer's clock (`CreateTime`), not ahead of this process's.
    Producer,
    /// The producer's clock was ahead of this process's: clamped to it.
    Clamped,
    /// No timestamp at all: this process's clock.
    Consumer,
}

impl LogTime {
    const ALL: [LogTime; 4] = [
        LogTime::Broker,
        LogTime::Producer,
        LogTime::Clamped,
        LogTime::Consumer,
    ];

    fn label(self) -> &'static str {
        match self {
            LogTime::Broker => "broker",
            LogTime::Producer => "producer",
            LogTime::Clamped => "clamped",
            LogTime::Consumer => "consumer",
        }
    }

    /// A message's log time: the reference of "from the future" and of
    /// group membership. The broker's clock when it stamps messages; a
    /// producer's clock (a gateway's) is never trusted ahead of this
    /// process's, so one gateway's clock cannot pass its own usage off as
    /// on time, move the org's watermark and make everyone else's usage
    /// too late.
    fn of(timestamp: Timestamp, now_ms: i64) -> (i64, LogTime) {
        match timestamp {
            Timestamp::LogAppendTime(t) => (t, LogTime::Broker),
            Timestamp::CreateTime(t) if t <= now_ms => (t, LogTime::Producer),
            Timestamp::CreateTime(_) => (now_ms, LogTime::Clamped),
            Timestamp::NotAvailable => (now_ms, LogTime::Consumer),
        }
    }
}

impl Incoming {
    /// The message's fingerprint, its mark in a checkpoint: FNV-1a (64
    /// bits) of its timestamp, key and payload. Two messages at one offset
    /// of two incarnations of a topic share it by chance only (2^-64): they
    /// were produced at other times, or are other usage.
    fn mark(&self) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&self.stamp.to_be_bytes());
        for part in [&self.key, &self.payload] {
            match part {
                Some(b) => {
                    eat(&[1]);
                    eat(&(b.len() as u64).to_be_bytes());
                    eat(b);
                }
                None => eat(&[0]),
            }
        }
        h as i64
    }

    fn from<M: Message>(m: &M, now_ms: i64) -> (Incoming, LogTime) {
        let content_type = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key.eq_ignore_ascii_case(CONTENT_TYPE))
                .and_then(|h| h.value.map(<[u8]>::to_vec))
        });
        let header = |name: &str| {
            m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key.eq_ignore_ascii_case(name))
                    .map(|h| h.value.unwrap_or_default().to_vec())
            })
        };
        let forwarded = header(FORWARDED_FROM).is_some();
        let first_logged = forwarded
            .then(|| header(FORWARDED_LOGGED_AT))
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
        let (logged_at_ms, source) = LogTime::of(m.timestamp(), now_ms);
        let logged_at_ms = first_logged.map_or(logged_at_ms, |t| t.min(logged_at_ms));
        let incoming = Incoming {
            forwarded,
            partition: m.partition(),
            offset: m.offset(),
            stamp: m.timestamp().to_millis().unwrap_or(-1),
            logged_at_ms,
            key: m.key().map(<[u8]>::to_vec),
            content_type,
            payload: m.payload().map(<[u8]>::to_vec),
        };
        (incoming, source)
    }
}

/// Starts the consumer thread. It runs until `stop` says so, then writes a
/// last checkpoint and leaves the group (handing its partitions over).
pub fn spawn(
    engine: Arc<Engine>,
    opts: KafkaOptions,
    usage_partitions: i32,
    producer: FutureProducer,
    rt: Handle,
    stop: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>> {
    let meter = Arc::clone(&engine.meter);
    let ctx = MeterContext {
        meter: Arc::clone(&meter),
        rt: rt.clone(),
        topic: opts.usage_topic(),
        log: format!("kafka:{}", opts.usage_topic()),
    };
    let mut config = opts.consumer_config(&opts.group);
    // Lag is computed from these (every second; the exporter drops a gauge
    // not set for a minute, as for a partition handed over).
    let _ = config.set("statistics.interval.ms", "1000");
    let consumer: BaseConsumer<MeterContext> = config.create_with_context(ctx)?;
    consumer.subscribe(&[&opts.usage_topic()])?;
    let dead_topic = opts.dead_letter_topic();
    let thread = std::thread::Builder::new()
        .name("tally-meter".into())
        .spawn(move || {
            let mut run = Run {
                synced: HashMap::new(),
                skew_warned: None,
                engine,
                meter,
                producer,
                dead_topic,
                usage_partitions,
                rt,
                stop: stop.clone(),
            };
            while !*stop.borrow() && !run.meter.is_poisoned() {
                let batch = poll_batch(&consumer, &run.meter);
                run.process(&consumer, batch);
            }
            // Leaving the group revokes (and checkpoints) every partition.
            consumer.unsubscribe();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !run.meter.owned_partitions().is_empty() && Instant::now() < deadline {
                let _ = consumer.poll(Duration::from_millis(100));
            }
            tracing::info!("metering consumer stopped");
        })
        .map_err(|e| crate::Error::Config(format!("starting the consumer thread: {e}")))?;
    Ok(thread)
}

fn poll_batch(consumer: &BaseConsumer<MeterContext>, meter: &Meter) -> Vec<Incoming> {
    let mut batch = Vec::new();
    let mut sources = [0u64; LogTime::ALL.len()];
    let mut first_at: Option<Instant> = None;
    loop {
        let wait = match first_at {
            None => Duration::from_millis(100),
            Some(t) => BATCH_WAIT.saturating_sub(t.elapsed()),
        };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                // This process's clock when the message reached it: an
                // honest producer's timestamp is never later.
                let (incoming, source) = Incoming::from(&m, meter.now_ms());
                sources[source as usize] += 1;
                batch.push(incoming);
                let _ = first_at.get_or_insert_with(Instant::now);
                if batch.len() >= BATCH_LEN_MAX {
                    break;
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer error (retried by librdkafka)");
                break;
            }
            None => break,
        }
    }
    for (source, n) in LogTime::ALL.iter().zip(sources) {
        if n > 0 {
            metrics::counter!(USAGE_LOG_TIME, "source" => source.label()).increment(n);
        }
    }
    batch
}

struct Run {
    /// Per org, the log's clock when this process last read its log: every
    /// change dated up to it is folded here.
    synced: HashMap<OrgId, i64>,
    /// When a batch last gave up waiting for the log's clock (reported
    /// then; no batch waits again for a minute).
    skew_warned: Option<Instant>,
    engine: Arc<Engine>,
    meter: Arc<Meter>,
    producer: FutureProducer,
    dead_topic: String,
    usage_partitions: i32,
    rt: Handle,
    stop: watch::Receiver<bool>,
}

/// What the first message read of a partition since its claim (or any
/// batch's first) says about the log, given where the partition stands.
#[derive(Debug, PartialEq, Eq)]
enum Follows {
    /// A later message than the last applied: go on.
    Next,
    /// The message applied last, read again as the claim asked: the log is
    /// the checkpoint's; go on after it.
    Same,
    /// Past the next offset, on the first read since the claim or by more
    /// than [`GAP_CHECKED`] later: what is between may have been deleted
    /// (retention) before it was metered, or be transaction markers and
    /// aborted messages. The log's start tells.
    Gap,
    /// Not the log the checkpoint was taken from: why.
    Other(String),
}

/// A jump of more offsets than this between two batches of a running
/// partition is checked against the log's start (a consumer that fell
/// behind retention is moved to the start by librdkafka without a word);
/// smaller ones are transaction markers and aborted messages.
const GAP_CHECKED: i64 = 64;

fn follows(at: LogPoint, offset: i64, mark: i64) -> Follows {
    let position = at.position;
    match offset.cmp(&position) {
        std::cmp::Ordering::Less => Follows::Other(format!(
            "the log went back: offset {offset} was read after offset {position} was applied (a \
             topic deleted and created again, or a database that meters another deployment's \
             topic)"
        )),
        std::cmp::Ordering::Equal if !at.checked && at.mark == Some(mark) => Follows::Same,
        std::cmp::Ordering::Equal if !at.checked && at.mark.is_some() => Follows::Other(format!(
            "the message at offset {offset} is not the one the checkpoint applied there (a topic \
             deleted and created again, or a database that meters another deployment's topic)"
        )),
        std::cmp::Ordering::Equal => Follows::Other(format!(
            "offset {offset}, applied already, was read again (the log was reset: a topic deleted \
             and created again)"
        )),
        std::cmp::Ordering::Greater
            if position >= 0
                && offset > position + 1
                && (!at.checked || offset > position + 1 + GAP_CHECKED) =>
        {
            Follows::Gap
        }
        std::cmp::Ordering::Greater => Follows::Next,
    }
}

impl Run {
    fn process(&mut self, consumer: &BaseConsumer<MeterContext>, batch: Vec<Incoming>) {
        let mut by_partition: BTreeMap<i32, Vec<Incoming>> = BTreeMap::new();
        for m in batch {
            by_partition.entry(m.partition).or_default().push(m);
        }
        // One deadline for the whole poll: the thread polls again within
        // max.poll.interval.ms however many partitions and orgs wait.
        let deadline = Instant::now() + CATCH_UP_WAIT_MAX;
        for (p, messages) in by_partition {
            if *self.stop.borrow() || self.meter.is_poisoned() {
                return;
            }
            self.process_partition(consumer, p, messages, deadline);
        }
        // During a storage fault the meter's periodic task retries the
        // checkpoint; waiting for it here would only stall consumption.
        if self.meter.health().fault().is_none()
            && self
                .meter
                .owned_partitions()
                .iter()
                .any(|p| self.meter.wants_checkpoint(*p))
        {
            let _ = self.rt.block_on(self.meter.checkpoint());
        }
    }

    /// Checks that `messages` (a batch of partition `p`, in offset order)
    /// follow what the partition applied; drops a first message applied
    /// already. False when none of them may be applied.
    fn check_log(
        &self,
        consumer: &BaseConsumer<MeterContext>,
        p: i32,
        messages: &mut Vec<Incoming>,
    ) -> bool {
        let Some(at) = self.meter.log_point(p) else {
            // Not owned (revoked meanwhile): the owner reads these.
            return false;
        };
        if at.refused {
            return false;
        }
        let Some(first) = messages.first() else {
            return false;
        };
        match follows(at, first.offset, first.mark()) {
            Follows::Next => {}
            Follows::Same => {
                let _ = messages.remove(0);
            }
            Follows::Gap => self.report_lost(consumer, p, at.position, first.offset),
            Follows::Other(why) => {
                let topic = consumer_topic(consumer);
                self.meter.refuse(
                    p,
                    format!(
                        "partition {p} of {topic} is not the log its checkpoint was taken from: \
                         {why}. If this topic is meant to replace the \
                         old one, stop every tally serve and run `tally reset-usage-positions`; \
                         otherwise point the service at the right brokers and topic"
                    ),
                );
                let mut tpl = TopicPartitionList::new();
                let _ = tpl.add_partition(&topic, p);
                if let Err(e) = consumer.pause(&tpl) {
                    tracing::warn!(partition = p, error = %e, "pausing a refused partition failed");
                }
                return false;
            }
        }
        self.meter.log_checked(p);
        !messages.is_empty()
    }

    /// A batch of `p` starts past `position` + 1 (see [`Follows::Gap`]): if
    /// the log's start is past it too, the usage in between was deleted
    /// before this deployment metered it.
    fn report_lost(
        &self,
        consumer: &BaseConsumer<MeterContext>,
        p: i32,
        position: i64,
        first: i64,
    ) {
        let topic = consumer_topic(consumer);
        match consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)) {
            Ok((low, _)) if low > position + 1 => {
                let lost = low - (position + 1);
                metrics::counter!(USAGE_LOST, "partition" => p.to_string())
                    .increment(lost.unsigned_abs());
                tracing::error!(
                    partition = p,
                    from = position + 1,
                    to = low - 1,
                    lost,
                    "usage lost to retention: offsets {}..={} of partition {p} were deleted from \
                     {topic} before they were metered (at most {lost} messages); raise the topic's \
                     retention above the longest time tally may be down",
                    position + 1,
                    low - 1
                );
            }
            Ok(_) => tracing::debug!(
                partition = p,
                position,
                first,
                "offsets skipped are transaction markers or aborted messages"
            ),
            Err(e) => tracing::warn!(
                partition = p,
                position,
                first,
                error = %e,
                "the log resumes past the offset after the checkpoint, and its start could not be \
                 read: usage may have been lost to retention"
            ),
        }
    }

    fn process_partition(
        &mut self,
        consumer: &BaseConsumer<MeterContext>,
        p: i32,
        mut messages: Vec<Incoming>,
        deadline: Instant,
    ) {
        if !self.check_log(consumer, p, &mut messages) {
            return;
        }
        let mut good: Vec<(usize, UsageEvent)> = Vec::with_capacity(messages.len());
        let mut bad: Vec<(usize, Bad)> = Vec::new();
        // Messages of orgs another partition meters: (index, that one).
        let mut misplaced: Vec<(usize, i32)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match codec::decode_usage(
                m.key.as_deref(),
                m.content_type.as_deref(),
                m.payload.as_deref(),
            ) {
                Ok(ev) => match partition_for(ev.org_id.as_bytes(), self.usage_partitions) {
                    q if q == p => good.push((i, ev)),
                    q if !m.forwarded => misplaced.push((i, q)),
                    // Forwarded once and still not on its org's partition:
                    // the processes disagree on the partition count. Kept,
                    // not sent around again.
                    _ => {
                        let r = Rejection::WrongPartition;
                        bad.push((
                            i,
                            Bad {
                                code: r.code(),
                                message: format!(
                                    "{} (forwarded once already: does every process run with \
                                     the same --kafka-usage-partitions, {}?)",
                                    r.message(),
                                    self.usage_partitions
                                ),
                                org_id: Some(ev.org_id.to_string()),
                            },
                        ));
                    }
                },
                Err(b) => bad.push((i, b)),
            }
        }
        // Forwarded (published to the org's partition and acknowledged)
        // before the batch's position can move past them. A crash in
        // between forwards them again: the copies are duplicates there.
        if !misplaced.is_empty() && !self.forward(consumer, &messages, &misplaced) {
            return;
        }
        if !self.sync(&messages, &good, deadline) {
            // Stopping while waiting for the database: the batch is not
            // applied, and whoever owns the partition next reads it again.
            return;
        }
        let positioned: Vec<Positioned<'_>> = good
            .iter()
            .map(|(i, event)| Positioned {
                position: messages[*i].offset,
                logged_at_ms: messages[*i].logged_at_ms,
                event,
            })
            .collect();
        // The batch's outcomes and its dead letters reach the meter under
        // the write lock: no checkpoint sees the position past a message
        // whose dead letter is not kept yet.
        let _w = self.rt.block_on(self.meter.write_lock());
        let Some(outcomes) = self.meter.apply(p, &positioned) else {
            // Revoked meanwhile: the new owner reads these.
            return;
        };
        // The forwarded ones are handled: the position moves past them
        // (and a partition of other orgs' usage only moves at all).
        if let Some(last) = misplaced.iter().map(|(i, _)| messages[*i].offset).max() {
            self.meter.passed(p, last, misplaced.len() as u64);
        }
        let mut accepted = 0u64;
        let mut duplicates = 0u64;
        for ((i, ev), outcome) in good.iter().zip(outcomes) {
            match outcome {
                UsageOutcome::Applied => accepted += 1,
                UsageOutcome::Duplicate => duplicates += 1,
                UsageOutcome::Rejected(r) => bad.push((
                    *i,
                    Bad {
                        code: r.code(),
                        message: r.message().into(),
                        org_id: Some(ev.org_id.to_string()),
                    },
                )),
            }
        }
        let usage = tally_engine::metrics::USAGE_EVENTS;
        metrics::counter!(usage, "outcome" => "accepted", "reason" => "").increment(accepted);
        metrics::counter!(usage, "outcome" => "duplicate", "reason" => "").increment(duplicates);
        bad.sort_by_key(|(i, _)| *i);
        for (i, b) in bad {
            let m = &messages[i];
            metrics::counter!(usage, "outcome" => "rejected", "reason" => b.code).increment(1);
            metrics::counter!(DEAD_LETTERS, "reason" => b.code).increment(1);
            tracing::debug!(
                partition = p,
                offset = m.offset,
                reason = b.code,
                "dead letter"
            );
            self.to_dead_letter_topic(m, &b);
            self.meter.dead_letter(
                p,
                DeadLetter {
                    position: m.offset,
                    logged_at_ms: m.logged_at_ms,
                    org_id: b.org_id,
                    reason: b.code.to_owned(),
                    message: b.message,
                    payload: m.payload.clone().unwrap_or_default(),
                },
            );
        }
        // The position is the batch's last message now, counted or kept
        // as a dead letter: its mark goes with it.
        if let Some(last) = messages.last() {
            self.meter.mark(p, last.offset, last.mark());
        }
    }

    /// Usage can outrun the entity log's relay: an org, user, key or
    /// membership made a moment ago on another process may not have reached
    /// this one. Usage is judged with every change logged before it, live as
    /// on a replay: an org is read from SQL when the batch names a subject
    /// not known here, or usage logged later than this process last read
    /// the org's log ([`tally_engine::commands::Commands::sync`]). Returns
    /// false when the batch must not be applied (see [`Run::read_logs`]).
    fn sync(
        &mut self,
        messages: &[Incoming],
        events: &[(usize, UsageEvent)],
        deadline: Instant,
    ) -> bool {
        let registry = &self.engine.registry;
        // Orgs to read, each with the latest log time of its usage here.
        let mut stale: HashMap<&OrgId, i64> = HashMap::new();
        // One lookup and one read lock per run of the same org (a batch is
        // one partition's: its orgs come in runs), not per event.
        for run in events.chunk_by(|(_, a), (_, b)| a.org_id == b.org_id) {
            let org_id = &run[0].1.org_id;
            let logged = run
                .iter()
                .map(|(i, _)| messages[*i].logged_at_ms)
                .max()
                .unwrap_or(i64::MIN);
            if let Some(at) = stale.get_mut(org_id) {
                *at = (*at).max(logged);
                continue;
            }
            let synced = self.synced.get(org_id).is_some_and(|s| *s >= logged);
            let known = synced
                && registry.org(org_id).is_some_and(|cell| {
                    let org = cell.read();
                    run.iter().all(|(_, e)| {
                        org.dir.users.contains_key(&e.user_id)
                            && e.api_key_id
                                .as_ref()
                                .is_none_or(|k| org.dir.keys.contains_key(k))
                    })
                });
            if !known {
                let _ = stale.insert(org_id, logged);
            }
        }
        let Some(until) = stale.values().copied().max() else {
            return true;
        };
        let orgs: Vec<&OrgId> = stale.into_keys().collect();
        let started = Instant::now();
        loop {
            let Some(log_now) = self.read_logs(&orgs, deadline) else {
                return false;
            };
            // Only orgs that exist: ids of unknown orgs are not kept.
            for org in orgs.iter().filter(|o| registry.org(o).is_some()) {
                let at = self.synced.entry((*org).clone()).or_insert(log_now);
                *at = (*at).max(log_now);
            }
            if log_now >= until {
                return true;
            }
            // The log's clock (the database's) is behind the usage's (the
            // broker's, or this process's): a change may still be dated
            // before this usage. Wait for it, but not for long.
            // After giving up once, batches of the next minute do not wait
            // again: a clock that far behind would stall every batch.
            let gave_up_lately = self
                .skew_warned
                .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
            if gave_up_lately || started.elapsed() >= LOG_CLOCK_WAIT_MAX {
                if !gave_up_lately {
                    self.skew_warned = Some(Instant::now());
                    tracing::warn!(
                        behind_ms = until - log_now,
                        "the database's clock is behind the usage log's: usage is applied without \
                         waiting longer, and a membership change dated in between may be judged \
                         differently by a replay"
                    );
                }
                return true;
            }
            let wait = u64::try_from(until - log_now).unwrap_or(0).min(100);
            std::thread::sleep(Duration::from_millis(wait));
        }
    }

    /// Reads `orgs`' logs from SQL; returns the log's clock at the read.
    /// While the read fails (the database cannot be reached, or any other
    /// error) the usage waits, until `deadline`: the member it names may be
    /// in the log already, and calling the usage unattributable would
    /// dead-letter acknowledged usage. Past the deadline the meter stops
    /// (the process restarts and replays from its checkpoint); nothing is
    /// dead-lettered for a read that failed. `None` when the batch must not
    /// be applied: the process is stopping, or the meter stopped.
    fn read_logs(&self, orgs: &[&OrgId], deadline: Instant) -> Option<i64> {
        let started = Instant::now();
        let mut waiting = false;
        loop {
            match self.rt.block_on(self.engine.commands.sync(orgs)) {
                Ok(log_now) => {
                    if waiting {
                        tracing::info!(
                            orgs = orgs.len(),
                            waited_ms = started.elapsed().as_millis() as u64,
                            "the orgs' logs are readable again: usage goes on"
                        );
                    }
                    return Some(log_now);
                }
                Err(_) if *self.stop.borrow() => return None,
                Err(e)
                    if Instant::now() < deadline
                        && !matches!(e, tally_engine::Error::Corrupt(_)) =>
                {
                    if !waiting {
                        tracing::warn!(org = %orgs[0], orgs = orgs.len(), error = %e, "usage waits until its orgs' logs can be read from SQL");
                        waiting = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    self.meter.poison(&format!(
                        "the entity log of org {} ({} orgs read together) could not be read for {} s: {e}",
                        orgs[0],
                        orgs.len(),
                        started.elapsed().as_secs()
                    ));
                    return None;
                }
            }
        }
    }

    /// Publishes `misplaced` messages to their orgs' partitions and waits
    /// for the broker's acknowledgement, retrying until it comes; `false`
    /// when told to stop first (the batch is then not applied).
    fn forward(
        &self,
        consumer: &BaseConsumer<MeterContext>,
        messages: &[Incoming],
        misplaced: &[(usize, i32)],
    ) -> bool {
        let topic = consumer_topic(consumer);
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut waiting = Vec::with_capacity(misplaced.len());
            for (i, q) in misplaced {
                let m = &messages[*i];
                let from = format!("{}:{}", m.partition, m.offset);
                let logged_at = m.logged_at_ms.to_string();
                let mut headers = OwnedHeaders::new()
                    .insert(Header {
                        key: FORWARDED_FROM,
                        value: Some(from.as_str()),
                    })
                    .insert(Header {
                        key: FORWARDED_LOGGED_AT,
                        value: Some(logged_at.as_str()),
                    });
                if let Some(ct) = &m.content_type {
                    headers = headers.insert(Header {
                        key: CONTENT_TYPE,
                        value: Some(ct.as_slice()),
                    });
                }
                let mut record = FutureRecord::<[u8], [u8]>::to(&topic)
                    .partition(*q)
                    .payload(m.payload.as_deref().unwrap_or_default())
                    .headers(headers);
                if let Some(k) = &m.key {
                    record = record.key(k.as_slice());
                }
                waiting.push(self.producer.send_result(record).map_err(|(e, _)| e));
            }
            let mut stop = self.stop.clone();
            let sent = self.rt.block_on(async {
                let all = async {
                    let mut error = None;
                    for d in waiting {
                        match d {
                            Ok(d) => match d.await {
                                Ok(Ok(_)) => {}
                                Ok(Err((e, _))) => error = Some(e.to_string()),
                                Err(_) => error = Some("delivery cancelled".into()),
                            },
                            Err(e) => error = Some(e.to_string()),
                        }
                    }
                    error.map_or(Ok(()), Err)
                };
                // Told to stop while the broker does not answer: the
                // batch is left to whoever reads it next.
                tokio::select! {
                    r = all => Some(r),
                    _ = stop.wait_for(|s| *s) => None,
                }
            });
            match sent {
                None => return false,
                Some(Ok(())) => {
                    metrics::counter!(USAGE_FORWARDED).increment(misplaced.len() as u64);
                    return true;
                }
                Some(Err(e)) => tracing::warn!(
                    messages = misplaced.len(),
                    error = %e,
                    "forwarding usage to its org's partition failed; retrying"
                ),
            }
            if *self.stop.borrow() {
                return false;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn to_dead_letter_topic(&self, m: &Incoming, b: &Bad) {
        let partition = m.partition.to_string();
        let offset = m.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "tally-reason",
                value: Some(b.code),
            })
            .insert(Header {
                key: "tally-message",
                value: Some(b.message.as_str()),
            })
            .insert(Header {
                key: "tally-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "tally-source-offset",
                value: Some(offset.as_str()),
            });
        if let Some(ct) = &m.content_type {
            headers = headers.insert(Header {
                key: CONTENT_TYPE,
                value: Some(ct.as_slice()),
            });
        }
        let payload = m.payload.as_deref().unwrap_or_default();
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.dead_topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = &m.key {
            record = record.key(k.as_slice());
        }
        // At least once; the exactly-once record is the checkpoint's.
        if let Err((e, _)) = self.producer.send_result(record) {
            tracing::warn!(error = %e, "queueing a dead letter failed");
        }
    }
}

/// The usage topic this consumer reads (it subscribes to one).
fn consumer_topic(consumer: &BaseConsumer<MeterContext>) -> String {
    consumer.context().topic.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(position: i64, mark: Option<i64>, checked: bool) -> LogPoint {
        LogPoint {
            position,
            mark,
            checked,
            refused: false,
        }
    }

    fn refuses(at: LogPoint, offset: i64, mark: i64) -> bool {
        matches!(follows(at, offset, mark), Follows::Other(_))
    }

    #[test]
    fn a_claimed_partition_resumes_only_on_the_log_its_checkpoint_was_taken_from() {
        // The claim reads the message applied last again: the same one.
        assert_eq!(follows(at(41, Some(7), false), 41, 7), Follows::Same);
        // Another message there, or an earlier offset: another log.
        assert!(refuses(at(41, Some(7), false), 41, 8));
        assert!(refuses(at(41, Some(7), false), 0, 7));
        // The message at the position is gone (retention): the next one
        // follows; further on, the log's start decides.
        assert_eq!(follows(at(41, Some(7), false), 42, 1), Follows::Next);
        assert_eq!(follows(at(41, Some(7), false), 50, 1), Follows::Gap);
        // A checkpoint without a mark (older than marks) resumes after it.
        assert_eq!(follows(at(41, None, false), 42, 1), Follows::Next);
        assert!(refuses(at(41, None, false), 41, 1));
        // Before the first message applied, any offset follows.
        assert_eq!(follows(at(-1, None, false), 0, 1), Follows::Next);
        assert_eq!(follows(at(-1, None, false), 900, 1), Follows::Next);
    }

    #[test]
    fn a_running_partition_refuses_a_log_that_goes_back() {
        // Checked since the claim: later offsets follow, small gaps
        // included (transaction markers take offsets); a jump further on
        // (moved to the log's start past retention) is checked.
        assert_eq!(follows(at(41, Some(7), true), 42, 1), Follows::Next);
        assert_eq!(follows(at(41, Some(7), true), 45, 1), Follows::Next);
        assert_eq!(
            follows(at(41, Some(7), true), 42 + GAP_CHECKED, 1),
            Follows::Next
        );
        assert_eq!(
            follows(at(41, Some(7), true), 43 + GAP_CHECKED, 1),
            Follows::Gap
        );
        // An offset applied already (the log was reset) never is.
        assert!(refuses(at(41, Some(7), true), 41, 7));
        assert!(refuses(at(41, Some(7), true), 3, 7));
    }

    #[test]
    fn a_mark_is_the_messages_own() {
        let m = |stamp, key: Option<&[u8]>, payload: Option<&[u8]>| {
            Incoming {
                partition: 0,
                offset: 0,
                stamp,
                logged_at_ms: 0,
                key: key.map(<[u8]>::to_vec),
                content_type: None,
                payload: payload.map(<[u8]>::to_vec),
                forwarded: false,
            }
            .mark()
        };
        let base = m(5, Some(b"acme"), Some(b"usage"));
        assert_eq!(base, m(5, Some(b"acme"), Some(b"usage")));
        assert_ne!(base, m(6, Some(b"acme"), Some(b"usage")));
        assert_ne!(base, m(5, Some(b"acm"), Some(b"eusage")));
        assert_ne!(base, m(5, None, Some(b"usage")));
        assert_ne!(base, m(5, Some(b"acme"), None));
    }

    #[test]
    fn the_log_time_is_the_brokers_or_never_later_than_this_process() {
        let now = 1_000_000;
        let of = |t| LogTime::of(t, now);
        // The broker's clock is trusted, even ahead of this process's.
        assert_eq!(
            of(Timestamp::LogAppendTime(now + 5)),
            (now + 5, LogTime::Broker)
        );
        assert_eq!(
            of(Timestamp::CreateTime(now - 5)),
            (now - 5, LogTime::Producer)
        );
        assert_eq!(of(Timestamp::CreateTime(now)), (now, LogTime::Producer));
        // A producer's clock ahead is not.
        assert_eq!(
            of(Timestamp::CreateTime(now + 90_000_000)),
            (now, LogTime::Clamped)
        );
        assert_eq!(of(Timestamp::NotAvailable), (now, LogTime::Consumer));
        let labels: Vec<&str> = LogTime::ALL.iter().map(|t| t.label()).collect();
        assert_eq!(labels, ["broker", "producer", "clamped", "consumer"]);
        assert!(
            LogTime::ALL
                .iter()
                .enumerate()
                .all(|(i, t)| *t as usize == i)
        );
    }
}
