//! Tally's topics, created when missing (and again if a broker lost them).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::{Error, KafkaOptions, Result};

/// Creates every topic Tally uses that does not exist yet.
pub async fn ensure(opts: &KafkaOptions) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = opts.base().create()?;
    let (usage, events, enforcement, dead) = (
        opts.usage_topic(),
        opts.events_topic(),
        opts.enforcement_topic(),
        opts.dead_letter_topic(),
    );
    let replication = || TopicReplication::Fixed(opts.replication);
    let topics = [
        // Dated by the broker: usage's log time is one server clock, not
        // each gateway's (see `consumer::LogTime`).
        NewTopic::new(&usage, opts.usage_partitions, replication())
            .set(TIMESTAMP_TYPE, LOG_APPEND_TIME),
        NewTopic::new(&events, opts.partitions, replication()),
        // Compacted: the latest state of each subject is all that matters.
        NewTopic::new(&enforcement, opts.partitions, replication())
            .set("cleanup.policy", "compact"),
        NewTopic::new(&dead, 1, replication()),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Config(format!("creating topic {topic}: {code}")));
            }
        }
    }
    Ok(())
}

const TIMESTAMP_TYPE: &str = "message.timestamp.type";
const LOG_APPEND_TIME: &str = "LogAppendTime";

/// Says, once at start, whether the usage topic is dated by the broker. A
/// topic made elsewhere with `CreateTime` still meters correctly (a
/// producer's timestamp ahead of this process's clock is clamped to it),
/// but a replay may date such a message later than live counting did: the
/// operator is told how to fix it. Never fatal: the answer only informs.
pub async fn check_log_time(opts: &KafkaOptions) {
    let topic = opts.usage_topic();
    let describe = async {
        let admin: AdminClient<DefaultClientContext> = opts.base().create()?;
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .describe_configs(&[ResourceSpecifier::Topic(&topic)], &options)
            .await?;
        Ok::<_, Error>(
            results
                .into_iter()
                .next()
                .and_then(|r| r.ok()?.get(TIMESTAMP_TYPE).and_then(|e| e.value.clone())),
        )
    };
    match describe.await {
        Ok(Some(t)) if t == LOG_APPEND_TIME => {
            tracing::info!(
                topic,
                "the usage topic is dated by the broker ({TIMESTAMP_TYPE}={t})"
            );
        }
        Ok(Some(t)) => tracing::warn!(
            topic,
            "the usage topic is dated by its producers ({TIMESTAMP_TYPE}={t}): a gateway's clock \
             ahead of this process's is clamped to it, and a replay may judge such a message \
             differently; set {TIMESTAMP_TYPE}={LOG_APPEND_TIME} on the topic"
        ),
        Ok(None) => tracing::warn!(topic, "the broker did not say how the usage topic is dated"),
        Err(e) => tracing::warn!(topic, error = %e, "asking how the usage topic is dated failed"),
    }
}

/// How many partitions `topic` has.
pub async fn partition_count(opts: &KafkaOptions, topic: &str) -> Result<i32> {
    let consumer: BaseConsumer = opts.consumer_config("tally-metadata").create()?;
    let topic = topic.to_owned();
    let count = tokio::task::spawn_blocking(move || -> Result<i32> {
        // A broker that just created the topic (or dropped a connection)
        // may need a moment: errors are retried like a missing topic.
        let mut last = format!("topic {topic} has no partitions");
        for _ in 0..30 {
            match consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                Ok(md) => {
                    if let Some(t) = md.topics().iter().find(|t| t.name() == topic)
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                    {
                        return Ok(i32::try_from(t.partitions().len()).unwrap_or(i32::MAX));
                    }
                }
                Err(e) => last = format!("metadata of topic {topic}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(Error::Config(last))
    })
    .await
    .map_err(|e| Error::Config(format!("metadata task failed: {e}")))??;
    Ok(count)
}

/// Re-creates missing topics every ten seconds, until stopped: a broker that
/// lost its data (or a topic deleted by hand) heals without a restart.
pub async fn keep(opts: KafkaOptions, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        if let Err(e) = ensure(&opts).await {
            tracing::debug!(error = %e, "checking topics failed; retrying");
        }
    }
}
