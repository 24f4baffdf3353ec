//! The metering consumer: one thread per process, one consumer in the
//! metering group on `tally.usage`.
//!
//! - **Assignment**: each assigned partition is claimed ([`Meter::claim`]:
//!   its epoch is bumped, fencing out the previous owner, and its checkpoint
//!   is loaded into its orgs) and the consumer starts at the checkpoint's
//!   position + 1. Kafka offsets are never committed: the checkpoint, written
//!   in the same SQL transaction as the state it belongs to, is the only
//!   record of how far a partition was applied.
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tally_core::org::{Rejection, UsageOutcome};
use tally_core::usage::UsageEvent;
use tally_engine::Engine;
use tally_engine::meter::{Meter, Positioned};
use tally_store::checkpoint::DeadLetter;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::codec::{self, Bad, CONTENT_TYPE};
use crate::metrics::{CONSUMER_LAG, DEAD_LETTERS, REBALANCES};
use crate::murmur2::partition_for;
use crate::{KafkaOptions, Result};

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
    fn claim(&self, p: i32) -> Option<i64> {
        let started = Instant::now();
        let mut warned = false;
        loop {
            match self.rt.block_on(self.meter.claim(p)) {
                Ok(position) => return Some(position),
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
                    let Some(position) = self.claim(*p) else {
                        return;
                    };
                    let offset = if position < 0 {
                        Offset::Beginning
                    } else {
                        Offset::Offset(position + 1)
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *p, offset) {
                        tracing::error!(partition = p, error = %e, "setting a start offset failed");
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assigning partitions failed");
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
    logged_at_ms: i64,
    key: Option<Vec<u8>>,
    content_type: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

impl Incoming {
    fn from<M: Message>(m: &M, now_ms: i64) -> Incoming {
        let content_type = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key.eq_ignore_ascii_case(CONTENT_TYPE))
                .and_then(|h| h.value.map(<[u8]>::to_vec))
        });
        Incoming {
            partition: m.partition(),
            offset: m.offset(),
            logged_at_ms: m.timestamp().to_millis().unwrap_or(now_ms),
            key: m.key().map(<[u8]>::to_vec),
            content_type,
            payload: m.payload().map(<[u8]>::to_vec),
        }
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
                engine,
                meter,
                producer,
                dead_topic,
                usage_partitions,
                rt,
                stop: stop.clone(),
            };
            while !*stop.borrow() && !run.meter.is_poisoned() {
                let batch = poll_batch(&consumer, run.meter.now_ms());
                run.process(batch);
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

fn poll_batch(consumer: &BaseConsumer<MeterContext>, now_ms: i64) -> Vec<Incoming> {
    let mut batch = Vec::new();
    let mut first_at: Option<Instant> = None;
    loop {
        let wait = match first_at {
            None => Duration::from_millis(100),
            Some(t) => BATCH_WAIT.saturating_sub(t.elapsed()),
        };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                batch.push(Incoming::from(&m, now_ms));
                let _ = first_at.get_or_insert_with(Instant::now);
                if batch.len() >= BATCH_LEN_MAX {
                    return batch;
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer error (retried by librdkafka)");
                return batch;
            }
            None => return batch,
        }
    }
}

struct Run {
    engine: Arc<Engine>,
    meter: Arc<Meter>,
    producer: FutureProducer,
    dead_topic: String,
    usage_partitions: i32,
    rt: Handle,
    stop: watch::Receiver<bool>,
}

impl Run {
    fn process(&mut self, batch: Vec<Incoming>) {
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
            self.process_partition(p, messages, deadline);
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

    fn process_partition(&mut self, p: i32, messages: Vec<Incoming>, deadline: Instant) {
        let mut good: Vec<(usize, UsageEvent)> = Vec::with_capacity(messages.len());
        let mut bad: Vec<(usize, Bad)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match codec::decode_usage(
                m.key.as_deref(),
                m.content_type.as_deref(),
                m.payload.as_deref(),
            ) {
                Ok(ev) if partition_for(ev.org_id.as_bytes(), self.usage_partitions) != p => {
                    let r = Rejection::WrongPartition;
                    let org_id = Some(ev.org_id.to_string());
                    bad.push((
                        i,
                        Bad {
                            code: r.code(),
                            message: r.message().into(),
                            org_id,
                        },
                    ));
                }
                Ok(ev) => good.push((i, ev)),
                Err(b) => bad.push((i, b)),
            }
        }
        if !self.catch_up(&good, deadline) {
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
    }

    /// Usage can outrun the entity log's relay: an org, user or key created
    /// a moment ago on another process may not have reached this one. Before
    /// calling such usage unattributable, read the org's log from SQL.
    /// Returns false when the process is stopping and the batch must not
    /// be applied (see [`Run::catch_up_org`]).
    fn catch_up(&self, events: &[(usize, UsageEvent)], deadline: Instant) -> bool {
        let registry = &self.engine.registry;
        let mut orgs: Vec<&tally_core::ids::OrgId> = Vec::new();
        // One lookup and one read lock per run of the same org (a batch is
        // one partition's: its orgs come in runs), not per event.
        for run in events.chunk_by(|(_, a), (_, b)| a.org_id == b.org_id) {
            let org_id = &run[0].1.org_id;
            if orgs.contains(&org_id) {
                continue;
            }
            let known = registry.org(org_id).is_some_and(|cell| {
                let org = cell.read();
                run.iter().all(|(_, e)| {
                    org.dir.users.contains_key(&e.user_id)
                        && e.api_key_id
                            .as_ref()
                            .is_none_or(|k| org.dir.keys.contains_key(k))
                })
            });
            if !known {
                orgs.push(org_id);
            }
        }
        orgs.into_iter().all(|org| self.catch_up_org(org, deadline))
    }

    /// Reads `org`'s log from SQL. While the read fails (the database cannot
    /// be reached, or any other error) the usage waits, until `deadline`:
    /// the member it names may be in the log already, and calling the usage
    /// unattributable would dead-letter acknowledged usage. Past the
    /// deadline the meter stops (the process restarts and replays from its
    /// checkpoint); nothing is dead-lettered for a read that failed.
    /// Returns false when the batch must not be applied: the process is
    /// stopping, or the meter stopped.
    fn catch_up_org(&self, org: &tally_core::ids::OrgId, deadline: Instant) -> bool {
        let started = Instant::now();
        let mut waiting = false;
        loop {
            match self.rt.block_on(self.engine.commands.catch_up(org)) {
                Ok(()) => {
                    if waiting {
                        tracing::info!(org = %org, waited_ms = started.elapsed().as_millis() as u64, "the org's log is readable again: usage goes on");
                    }
                    return true;
                }
                Err(_) if *self.stop.borrow() => return false,
                Err(e)
                    if Instant::now() < deadline
                        && !matches!(e, tally_engine::Error::Corrupt(_)) =>
                {
                    if !waiting {
                        tracing::warn!(org = %org, error = %e, "usage of a subject not seen yet waits until the org's log can be read from SQL");
                        waiting = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    self.meter.poison(&format!(
                        "the entity log of org {org} could not be read for {} s: {e}",
                        started.elapsed().as_secs()
                    ));
                    return false;
                }
            }
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
