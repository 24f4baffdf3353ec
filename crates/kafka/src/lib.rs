//! Tally's distributed mode: the usage stream on Kafka, state in PostgreSQL,
//! any number of `tally serve` processes.
//!
//! - [`consumer`]: the metering engines form one consumer group on
//!   `tally.usage`. On assignment a partition's checkpoint is claimed (which
//!   fences out its previous owner) and the consumer seeks to it; on
//!   revocation the partition is checkpointed first. Offsets are never
//!   committed to Kafka: the checkpoint holds them.
//! - [`sink`]: `POST /v1/usage` publishes to `tally.usage`.
//! - [`relay`]: the SQL entity log, relayed to `tally.events` in log order.
//! - [`follow`]: every process follows `tally.events` (entity state) and
//!   `tally.enforcement` (the counters of orgs metered elsewhere), so that
//!   `authorize` answers right whichever partitions it owns.
//! - [`publisher`]: after each checkpoint, the changed counters go to the
//!   compacted `tally.enforcement` topic.

pub mod codec;
pub mod consumer;
pub mod follow;
pub mod metrics;
pub mod murmur2;
pub mod produce;
pub mod publisher;
pub mod relay;
pub mod sink;
pub mod topics;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use tally_engine::Engine;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] tally_engine::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The distributed mode's options.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port,host:port`.
    pub brokers: String,
    /// The metering engines' consumer group. Default `tally-meter`.
    pub group: String,
    /// Prefix of the topic names. Default `tally.`: `tally.usage`,
    /// `tally.events`, `tally.enforcement`, `tally.usage.dead-letter`.
    pub topic_prefix: String,
    /// Partitions of the usage topic when Tally creates it. Default 8. Fixed
    /// once created: an org's partition follows from it.
    pub usage_partitions: i32,
    /// Partitions of the other topics when Tally creates them. Default 4.
    pub partitions: i32,
    /// Replication factor of the topics Tally creates. Default 1.
    pub replication: i32,
    /// The consumer group session timeout. Default 6 s.
    pub session_timeout: Duration,
    /// How often the entity log relay looks for new events when it found
    /// none. Default 100 ms.
    pub relay_interval: Duration,
}

impl KafkaOptions {
    pub fn new(brokers: impl Into<String>) -> KafkaOptions {
        KafkaOptions {
            brokers: brokers.into(),
            group: "tally-meter".into(),
            topic_prefix: "tally.".into(),
            usage_partitions: 8,
            partitions: 4,
            replication: 1,
            session_timeout: Duration::from_secs(6),
            relay_interval: Duration::from_millis(100),
        }
    }

    pub fn usage_topic(&self) -> String {
        format!("{}usage", self.topic_prefix)
    }

    pub fn events_topic(&self) -> String {
        format!("{}events", self.topic_prefix)
    }

    pub fn enforcement_topic(&self) -> String {
        format!("{}enforcement", self.topic_prefix)
    }

    pub fn dead_letter_topic(&self) -> String {
        format!("{}usage.dead-letter", self.topic_prefix)
    }

    /// Settings every client shares.
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        let _ = c
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "tally")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("log_level", "4");
        c
    }

    /// A producer: every message acknowledged by all in-sync replicas,
    /// partitioned like the Java client (murmur2 of the key), retried for up
    /// to 30 s. Not idempotent: every Tally output is idempotent by design
    /// (states, seq-numbered events, deduplicated usage), and an idempotent
    /// producer turns a broker that lost its state into a fatal error.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.base();
        let _ = c
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .set("queue.buffering.max.messages", "200000");
        c
    }

    /// A consumer that never commits offsets to Kafka.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        let _ = c
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout.as_millis() / 3).to_string(),
            )
            .set("max.poll.interval.ms", "300000")
            .set("partition.assignment.strategy", "range")
            .set("fetch.wait.max.ms", "100")
            // Once its local queue is full (queued.min.messages), librdkafka
            // stops fetching for this long (default 1 s): a consumer slower
            // than the network then idles in 1 s steps. Measured with
            // `tally bench kafka`: see docs/performance.md.
            .set("fetch.queue.backoff.ms", "10")
            .set("allow.auto.create.topics", "false");
        c
    }
}

/// The running distributed mode of one process.
#[derive(Debug)]
pub struct Distributed {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    consumer: Option<std::thread::JoinHandle<()>>,
}

impl Distributed {
    /// Creates missing topics, starts following the entity log and the
    /// enforcement states, starts the relay and the metering consumer, and
    /// sets the engine's usage sink.
    pub async fn start(engine: Arc<Engine>, opts: KafkaOptions) -> Result<Distributed> {
        crate::metrics::describe();
        topics::ensure(&opts).await?;
        topics::check_log_time(&opts).await;
        let usage_partitions = topics::partition_count(&opts, &opts.usage_topic()).await?;
        // Before any claim: a claim loads the partition's holds from SQL.
        engine.meter.keep_holds_in_sql();
        engine.set_hold_partitions(tally_engine::holds::PartitionOf {
            partitions: usage_partitions,
            partitioner: crate::murmur2::partition_for,
        });
        let (stop, stop_rx) = watch::channel(false);
        let producer: rdkafka::producer::FutureProducer = opts.producer_config().create()?;
        let publisher = Arc::new(publisher::Publisher::new(
            producer.clone(),
            opts.enforcement_topic(),
        ));
        engine.meter.set_publisher(publisher.clone());
        engine.set_sink(Arc::new(sink::KafkaSink::new(
            producer.clone(),
            opts.usage_topic(),
        )));
        let mut tasks = vec![
            tokio::spawn(publisher.run(stop_rx.clone())),
            tokio::spawn(relay::run(
                engine.db.clone(),
                producer.clone(),
                opts.events_topic(),
                opts.relay_interval,
                stop_rx.clone(),
            )),
            tokio::spawn(follow::events(
                Arc::clone(&engine),
                opts.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(follow::enforcement(
                Arc::clone(&engine),
                opts.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(topics::keep(opts.clone(), stop_rx.clone())),
        ];
        let consumer = consumer::spawn(
            Arc::clone(&engine),
            opts,
            usage_partitions,
            producer,
            tokio::runtime::Handle::current(),
            stop_rx,
        )?;
        tasks.shrink_to_fit();
        Ok(Distributed {
            stop,
            tasks,
            consumer: Some(consumer),
        })
    }

    /// Stops the consumer (its partitions are checkpointed and released),
    /// then the other tasks.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(c) = self.consumer.take() {
            let _ = tokio::task::spawn_blocking(move || c.join()).await;
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}
