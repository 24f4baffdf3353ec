//! `POST /v1/usage` in distributed mode: valid events are published to
//! `tally.usage` (key = org, protobuf), and the request is answered once the
//! broker acknowledged them. Whichever process owns the org's partition
//! counts them; duplicates and unattributable usage are found there (counted
//! in metrics, kept as dead letters), not in this answer.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_core::usage::UsageEvent;
use tally_engine::meter::{IngestReport, Rejected};
use tally_engine::{BoxFuture, UsageSink};

use crate::codec::{self, CONTENT_TYPE, PROTOBUF};
use crate::metrics::USAGE_PUBLISHED;

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    pub fn new(producer: FutureProducer, topic: String) -> KafkaSink {
        KafkaSink { producer, topic }
    }
}

impl UsageSink for KafkaSink {
    fn ingest(
        &self,
        events: Vec<(usize, UsageEvent)>,
    ) -> BoxFuture<'_, tally_engine::Result<IngestReport>> {
        Box::pin(async move {
            let mut report = IngestReport::default();
            let mut waiting = Vec::with_capacity(events.len());
            for (index, e) in &events {
                let value = codec::encode_usage(e);
                let headers = OwnedHeaders::new().insert(Header {
                    key: CONTENT_TYPE,
                    value: Some(PROTOBUF),
                });
                let record = FutureRecord::to(&self.topic)
                    .key(e.org_id.as_str())
                    .payload(&value)
                    .headers(headers);
                match self.producer.send_result(record) {
                    Ok(d) => waiting.push((*index, Some(d))),
                    Err((err, _)) => {
                        report.rejected.push(unavailable(*index, &err.to_string()));
                        waiting.push((*index, None));
                    }
                }
            }
            for (index, d) in waiting {
                let Some(d) = d else { continue };
                match d.await {
                    Ok(Ok(_)) => report.accepted += 1,
                    Ok(Err((e, _))) => report.rejected.push(unavailable(index, &e.to_string())),
                    Err(_) => report
                        .rejected
                        .push(unavailable(index, "delivery cancelled")),
                }
            }
            metrics::counter!(USAGE_PUBLISHED, "outcome" => "published")
                .increment(u64::from(report.accepted));
            metrics::counter!(USAGE_PUBLISHED, "outcome" => "failed")
                .increment(report.rejected.len() as u64);
            Ok(report)
        })
    }
}

fn unavailable(index: usize, why: &str) -> Rejected {
    Rejected {
        index,
        code: "unavailable",
        message: format!("the usage stream did not take the event ({why}); send it again"),
    }
}
