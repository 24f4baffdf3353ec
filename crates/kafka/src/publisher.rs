//! Publishes each committed checkpoint's counters to the compacted
//! `tally.enforcement` topic. States coalesce: when the broker is slow or
//! away, only the latest state of each subject waits, so memory is bounded
//! by the number of subjects, and nothing old is sent after something new.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_engine::meter::{PublishedState, StatePublisher};
use tokio::sync::{Notify, watch};

use crate::codec;

pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    pending: Mutex<HashMap<String, PublishedState>>,
    wake: Notify,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(producer: FutureProducer, topic: String) -> Publisher {
        Publisher {
            producer,
            topic,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    /// Sends what is pending whenever something arrives, until stopped.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                () = self.wake.notified() => false,
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            self.flush().await;
            if stopping {
                return;
            }
        }
    }

    async fn flush(&self) {
        let batch: Vec<(String, PublishedState)> = self.pending.lock().drain().collect();
        if batch.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut waiting = Vec::with_capacity(batch.len());
        for (key, state) in batch {
            let value = codec::encode_state(&state, now);
            let record = FutureRecord::to(&self.topic).key(&key).payload(&value);
            match self.producer.send_result(record) {
                Ok(delivery) => waiting.push((key, state, delivery)),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "queueing an enforcement state failed; retrying");
                    self.retry(key, state);
                }
            }
        }
        for (key, state, delivery) in waiting {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    tracing::warn!(error = %e, "publishing an enforcement state failed; retrying");
                    self.retry(key, state);
                }
                Err(_) => self.retry(key, state),
            }
        }
    }

    /// Puts a state back unless a newer one arrived meanwhile.
    fn retry(&self, key: String, state: PublishedState) {
        let _ = self.pending.lock().entry(key).or_insert(state);
    }
}

impl StatePublisher for Publisher {
    fn publish(&self, states: Vec<PublishedState>) {
        let mut pending = self.pending.lock();
        for s in states {
            let _ = pending.insert(codec::state_key(&s), s);
        }
        drop(pending);
        self.wake.notify_one();
    }
}
