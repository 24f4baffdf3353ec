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
use tally_core::entity::EntityEvent;
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

/// The most entity events taken from the topic at once.
const FOLLOW_BATCH_MAX: usize = 1_000;

/// Follows the entity log until stopped. The events ready at once are
/// folded in runs of one org's consecutive seqs ([`runs`]): a bulk change
/// of many users (one command, one event per user) is folded, and on the
/// org's metering process checkpointed before, once rather than per event.
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
        let mut batch = Vec::new();
        decode_into(&mut batch, m);
        // What else is ready now (polled once each, never waited for).
        while batch.len() < FOLLOW_BATCH_MAX {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(m) => decode_into(&mut batch, m),
                Err(_) => break,
            }
        }
        for run in runs(batch) {
            let org = run[0].org_id.clone();
            let followed = engine.commands.fold_foreign(&run).await;
            if followed == Followed::Gap
                && let Err(e) = engine.commands.catch_up(&org).await
            {
                tracing::warn!(org = %org, error = %e, "catching up from the SQL log failed");
            }
            if followed != Followed::Stale {
                for event in &run {
                    let lag_ms = engine.now_ms().saturating_sub(event.at_ms).max(0);
                    metrics::histogram!(crate::metrics::PROJECTION_LAG).record(
                        std::time::Duration::from_millis(lag_ms.unsigned_abs()).as_secs_f64(),
                    );
                }
            }
        }
    }
}

fn decode_into(
    batch: &mut Vec<EntityEvent>,
    m: Result<rdkafka::message::BorrowedMessage<'_>, rdkafka::error::KafkaError>,
) {
    let m = match m {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "events follower error (retried)");
            return;
        }
    };
    let Some(payload) = m.payload() else { return };
    match tally_proto::decode_entity_event(payload) {
        Ok(e) => batch.push(e),
        Err(e) => {
            tracing::warn!(offset = m.offset(), error = %e, "undecodable entity event skipped");
        }
    }
}

/// Splits events as read (at least once, in order per org) into runs of
/// one org's consecutive seqs: a repeat of an event already in the run is
/// dropped, and a jump starts a new run (folding it finds the gap).
fn runs(events: Vec<EntityEvent>) -> Vec<Vec<EntityEvent>> {
    let mut out: Vec<Vec<EntityEvent>> = Vec::new();
    for e in events {
        if let Some(run) = out.last_mut()
            && let Some(last) = run.last()
            && last.org_id == e.org_id
        {
            if e.seq == last.seq + 1 {
                run.push(e);
                continue;
            }
            if e.seq <= last.seq && e.seq >= run[0].seq {
                continue;
            }
        }
        out.push(vec![e]);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::runs;
    use tally_core::entity::{Actor, EntityEvent, EventKind};
    use tally_core::ids::OrgId;

    fn e(org: &str, seq: u64) -> EntityEvent {
        EntityEvent {
            org_id: OrgId::new(org).unwrap(),
            seq,
            at_ms: 0,
            actor: Actor::Operator,
            kind: EventKind::OrgSettingsChanged {
                name: "x".into(),
                default_monthly_limit_micros: None,
                alert_thresholds_bps: vec![],
            },
        }
    }

    fn seqs(events: Vec<EntityEvent>) -> Vec<(String, Vec<u64>)> {
        runs(events)
            .into_iter()
            .map(|r| {
                (
                    r[0].org_id.as_str().to_owned(),
                    r.iter().map(|e| e.seq).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn events_split_into_runs_of_one_orgs_consecutive_seqs() {
        let got = seqs(vec![
            e("a", 1),
            e("a", 2),
            e("a", 2),
            e("a", 3),
            e("b", 7),
            e("b", 9),
            e("a", 4),
            e("a", 1),
        ]);
        let want: Vec<(String, Vec<u64>)> = vec![
            ("a".into(), vec![1, 2, 3]),
            ("b".into(), vec![7]),
            ("b".into(), vec![9]),
            ("a".into(), vec![4]),
            ("a".into(), vec![1]),
        ];
        assert_eq!(got, want);
    }
}
