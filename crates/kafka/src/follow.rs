//! Every process follows two topics from their beginning, outside any
//! consumer group (it reads every partition) and without committing:
//!
//! - `tally.events`: the entity log, so that commands, memberships, limits
//!   and keys made on another process reach this one's memory. Events come
//!   at least once; each is folded only when it is its org's next (by seq),
//!   and a gap is filled from the SQL log.
//! - `tally.enforcement`: the counters of orgs metered by other processes,
//!   mirrored for authorize.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_engine::Engine;
use tally_engine::registry::Followed;
use tokio::sync::watch;

use crate::{KafkaOptions, codec, topics};

/// A consumer of every partition of `topic`, from the beginning.
async fn follower(opts: &KafkaOptions, topic: &str) -> crate::Result<StreamConsumer> {
    let partitions = topics::partition_count(opts, topic).await?;
    let mut suffix = [0u8; 6];
    let _ = getrandom::fill(&mut suffix);
    let group = format!(
        "tally-follow-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let consumer: StreamConsumer = opts.consumer_config(&group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

async fn start_with_retry(
    opts: &KafkaOptions,
    topic: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<StreamConsumer> {
    loop {
        match follower(opts, topic).await {
            Ok(c) => return Some(c),
            Err(e) => tracing::warn!(topic, error = %e, "following failed to start; retrying"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Follows the entity log until stopped.
pub async fn events(engine: Arc<Engine>, opts: KafkaOptions, mut stop: watch::Receiver<bool>) {
    let topic = opts.events_topic();
    let Some(consumer) = start_with_retry(&opts, &topic, &mut stop).await else {
        return;
    };
    loop {
        let m = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "events follower error (retried)");
                continue;
            }
        };
        let Some(payload) = m.payload() else { continue };
        let event = match tally_proto::decode_entity_event(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(offset = m.offset(), error = %e, "undecodable entity event skipped");
                continue;
            }
        };
        let followed = engine.registry.follow(&event);
        if followed == Followed::Gap
            && let Err(e) = engine.commands.catch_up(&event.org_id).await
        {
            tracing::warn!(org = %event.org_id, error = %e, "catching up from the SQL log failed");
        }
        if followed != Followed::Stale {
            let lag_ms = engine.now_ms().saturating_sub(event.at_ms).max(0);
            metrics::histogram!(crate::metrics::PROJECTION_LAG)
                .record(std::time::Duration::from_millis(lag_ms.unsigned_abs()).as_secs_f64());
        }
    }
}

/// Mirrors published counters until stopped.
pub async fn enforcement(engine: Arc<Engine>, opts: KafkaOptions, mut stop: watch::Receiver<bool>) {
    let topic = opts.enforcement_topic();
    let Some(consumer) = start_with_retry(&opts, &topic, &mut stop).await else {
        return;
    };
    loop {
        let m = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = consumer.recv() => m,
        };
        match m {
            Ok(m) => {
                if let Some(state) = m.payload().and_then(codec::decode_state) {
                    engine.meter.mirror(&state);
                }
            }
            Err(e) => tracing::debug!(error = %e, "enforcement follower error (retried)"),
        }
    }
}
