//! An example producer (`tally produce`): publishes realistic usage for an
//! org to `tally.usage`, the way a gateway should — key = org id, protobuf
//! (or JSON with its content-type header), murmur2 partitioning, acks=all.

use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_core::usage::RawUsage;

use crate::codec::{self, CONTENT_TYPE, JSON, PROTOBUF};
use crate::{Error, KafkaOptions, Result};

/// Prices in micro-USD per million tokens (input, output).
const MODELS: &[(&str, &str, i64, i64)] = &[
    ("gpt-4o", "openai", 2_500_000, 10_000_000),
    ("gpt-4o-mini", "openai", 150_000, 600_000),
    ("claude-sonnet-4", "anthropic", 3_000_000, 15_000_000),
    ("text-embedding-3-small", "openai", 20_000, 0),
];

#[derive(Debug, Clone)]
pub struct ProduceArgs {
    pub org: String,
    /// Users the calls are spread over.
    pub users: Vec<String>,
    /// Keys, parallel to `users` (user i calls with key i); empty for none.
    pub keys: Vec<String>,
    pub events: u64,
    /// Events per second; `None` for as fast as the broker takes them.
    pub rate: Option<u64>,
    pub json: bool,
    /// Percent of events sent a second time (a gateway retry).
    pub duplicate_percent: u8,
    /// Makes runs repeatable; also keeps request ids of runs apart.
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Messages published (duplicates included).
    pub published: u64,
    /// Distinct events.
    pub distinct: u64,
    /// Cost of the distinct events.
    pub cost_micros: i64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Publishes `args.events` events (plus duplicates); `progress` is called
/// every 10 000 messages.
pub async fn produce(
    opts: &KafkaOptions,
    args: &ProduceArgs,
    mut progress: impl FnMut(Summary),
) -> Result<Summary> {
    if args.users.is_empty() {
        return Err(Error::Config("give at least one user".into()));
    }
    if !args.keys.is_empty() && args.keys.len() != args.users.len() {
        return Err(Error::Config("give one key per user, or none".into()));
    }
    let producer: FutureProducer = opts.producer_config().create()?;
    let topic = opts.usage_topic();
    let mut rng = Rng(args.seed.max(1));
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut waiting = Vec::new();
    for i in 0..args.events {
        let u = usize::try_from(rng.below(args.users.len() as u64)).unwrap_or(0);
        let (model, provider, price_in, price_out) =
            MODELS[usize::try_from(rng.below(MODELS.len() as u64)).unwrap_or(0)];
        let input = 200 + rng.below(8_000);
        let output = if price_out == 0 {
            0
        } else {
            50 + rng.below(2_000)
        };
        let cost = (i64::try_from(input).unwrap_or(0) * price_in
            + i64::try_from(output).unwrap_or(0) * price_out)
            / 1_000_000;
        let request_id = format!("{}-{}-{i}", args.org, args.seed);
        let event = RawUsage {
            request_id: &request_id,
            org_id: &args.org,
            user_id: &args.users[u],
            api_key_id: args.keys.get(u).map_or("", String::as_str),
            model,
            provider,
            input_tokens: input,
            output_tokens: output,
            cost_micros: Some(cost),
            occurred_at_ms: Some(now_ms()),
        }
        .validate()
        .map_err(|e| Error::Config(format!("generated usage is invalid: {e}")))?;
        let (value, content_type) = if args.json {
            let v = serde_json::json!({
                "request_id": event.request_id, "org_id": event.org_id, "user_id": event.user_id,
                "api_key_id": event.api_key_id, "model": event.model, "provider": event.provider,
                "input_tokens": event.input_tokens, "output_tokens": event.output_tokens,
                "cost_micros": event.cost_micros, "occurred_at_ms": event.occurred_at_ms,
            });
            (v.to_string().into_bytes(), JSON)
        } else {
            (codec::encode_usage(&event), PROTOBUF)
        };
        let copies = if rng.below(100) < u64::from(args.duplicate_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let headers = OwnedHeaders::new().insert(Header {
                key: CONTENT_TYPE,
                value: Some(content_type),
            });
            let mut record = FutureRecord::to(&topic)
                .key(&args.org)
                .payload(&value)
                .headers(headers);
            let delivery = loop {
                match producer.send_result(record) {
                    Ok(d) => break d,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        r,
                    )) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            };
            waiting.push(delivery);
            summary.published += 1;
            if waiting.len() >= 1_000 {
                for d in waiting.drain(..) {
                    delivered(d.await)?;
                }
            }
            if summary.published.is_multiple_of(10_000) {
                progress(summary);
            }
        }
        summary.distinct += 1;
        summary.cost_micros += cost;
        if let Some(rate) = args.rate.filter(|r| *r > 0) {
            let due = per_rate(summary.distinct, rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    for d in waiting {
        delivered(d.await)?;
    }
    Ok(summary)
}

fn delivered<E>(
    r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.into()),
        Err(_) => Err(Error::Config("delivery cancelled".into())),
    }
}

/// `n / rate` seconds as a duration, in integers.
fn per_rate(n: u64, rate: u64) -> Duration {
    Duration::from_micros(n.saturating_mul(1_000_000) / rate.max(1))
}
