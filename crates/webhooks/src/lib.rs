//! Webhook notifications of thresholds crossed, cutoffs and lifts.
//!
//! Checkpoints write one delivery per enforcement event of an org with a
//! webhook, in the checkpoint's own transaction (see
//! `tally_store::webhook`). The [`Sender`] here works them off: it claims due
//! deliveries, POSTs each one's JSON, signed, and records the outcome; a
//! failure is retried with exponential backoff until `attempts_max`.
//!
//! What a receiver gets:
//! - the body, the same bytes on every attempt: the event as Tally's JSON,
//!   or a Slack incoming-webhook message (`{"text": …}`) where the org chose
//!   that format;
//! - `Idempotency-Key` and `Webhook-Id`: the event's key (also the JSON
//!   body's `id`): one per crossing, the same on every attempt and from
//!   every process, so a receiver drops what it has seen;
//! - the Standard Webhooks signature (<https://www.standardwebhooks.com>):
//!   `Webhook-Timestamp` (unix seconds of the attempt) and
//!   `Webhook-Signature: v1,<base64>`, the HMAC-SHA256 of
//!   `"<id>.<timestamp>.<body>"` under the base64-decoded part of the
//!   org's `whsec_` secret, so off-the-shelf libraries verify it;
//! - Tally's own signature, kept for receivers written against it:
//!   `Tally-Timestamp` (the same seconds) and `Tally-Signature: v1=<hex>`,
//!   the HMAC-SHA256 of `"<timestamp>.<body>"` under the whole secret.
//!
//! One subject's deliveries leave one at a time, in the order their events
//! were recorded (see `Db::claim_deliveries`).
//!
//! The secret is derived, never stored: HMAC-SHA256 under the server's
//! webhook key (generated once, in the database) of the org id and the seq of
//! the `webhook_set` event. Setting the webhook again gives a new secret.

pub mod target;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tally_core::entity::WebhookFormat;
use tally_core::money::format_usd;
use tally_core::ratio::format_bps;
use tally_core::time::Month;
use tally_store::Db;
use tally_store::webhook::{AttemptOutcome, DeliveryEvent, DueDelivery, WebhookTarget};
use tokio::sync::watch;

pub use crate::target::TargetPolicy;

type HmacSha256 = Hmac<Sha256>;

/// Deliveries by `outcome`: delivered, retried, failed (gave up),
/// cancelled (the webhook was removed).
pub const DELIVERIES: &str = "tally_webhook_deliveries_total";
/// Seconds one delivery attempt took, whatever its outcome.
pub const ATTEMPT_SECONDS: &str = "tally_webhook_attempt_duration_seconds";
/// Deliveries waiting to be sent, in every org (set at scrape).
pub const PENDING: &str = "tally_webhook_deliveries_pending";

pub fn describe() {
    metrics::describe_counter!(
        DELIVERIES,
        metrics::Unit::Count,
        "webhook delivery attempts by outcome"
    );
    metrics::describe_gauge!(
        PENDING,
        metrics::Unit::Count,
        "webhook deliveries waiting to be sent"
    );
    metrics::describe_histogram!(
        ATTEMPT_SECONDS,
        metrics::Unit::Seconds,
        "duration of one webhook delivery attempt"
    );
}

/// Where `tally_meta` keeps the server's webhook key.
pub const KEY_META: &str = "webhook_key";

/// The server's webhook key: org secrets derive from it.
#[derive(Clone)]
pub struct Keyring {
    key: [u8; 32],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Keyring {
    pub fn new(key: [u8; 32]) -> Keyring {
        Keyring { key }
    }

    /// The key stored in `db`, generated (and stored, once for every
    /// process) at first start.
    pub async fn load_or_create(db: &Db) -> Result<Keyring, String> {
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).map_err(|e| format!("no randomness: {e}"))?;
        let stored = db
            .meta_init(KEY_META, &hex(&fresh))
            .await
            .map_err(|e| e.to_string())?;
        let bytes: Vec<u8> = (0..stored.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(stored.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{KEY_META} in tally_meta is not hex"))?;
        let key = bytes
            .try_into()
            .map_err(|_| format!("{KEY_META} in tally_meta is not 32 bytes"))?;
        Ok(Keyring { key })
    }

    /// The signing secret of an org's webhook, as set by the event `seq`.
    pub fn secret(&self, org_id: &str, seq: i64) -> String {
        let mac = hmac(
            &self.key,
            &[
                b"tally webhook secret\0",
                org_id.as_bytes(),
                b"\0",
                &seq.to_be_bytes(),
            ],
        );
        format!("whsec_{}", hex(&mac))
    }
}

/// `v1=<hex HMAC-SHA256 of "<timestamp>.<body>" under secret>`: Tally's
/// own signature (`Tally-Signature`).
pub fn signature(secret: &str, timestamp_s: i64, body: &[u8]) -> String {
    let mac = hmac(
        secret.as_bytes(),
        &[timestamp_s.to_string().as_bytes(), b".", body],
    );
    format!("v1={}", hex(&mac))
}

/// The Standard Webhooks signature (`Webhook-Signature`): `v1,<base64
/// HMAC-SHA256 of "<id>.<timestamp>.<body>">` under the key the secret
/// carries, base64 after `whsec_`. Tally's secrets are 64 hex digits there,
/// which base64 decodes to 48 bytes, as every library does.
pub fn standard_signature(secret: &str, msg_id: &str, timestamp_s: i64, body: &[u8]) -> String {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64
        .decode(encoded)
        .unwrap_or_else(|_| encoded.as_bytes().to_vec());
    let mac = hmac(
        &key,
        &[
            msg_id.as_bytes(),
            b".",
            timestamp_s.to_string().as_bytes(),
            b".",
            body,
        ],
    );
    format!("v1,{}", BASE64.encode(mac))
}

/// The headers of one attempt: both signatures over `body` at `timestamp_s`.
fn signed_headers(
    secret: &str,
    msg_id: &str,
    timestamp_s: i64,
    body: &[u8],
    attempt: i64,
) -> [(&'static str, String); 7] {
    let ts = timestamp_s.to_string();
    [
        ("idempotency-key", msg_id.to_owned()),
        ("webhook-id", msg_id.to_owned()),
        ("webhook-timestamp", ts.clone()),
        (
            "webhook-signature",
            standard_signature(secret, msg_id, timestamp_s, body),
        ),
        ("tally-timestamp", ts),
        ("tally-signature", signature(secret, timestamp_s, body)),
        ("tally-attempt", attempt.to_string()),
    ]
}

/// The event's key: one per crossing, cutoff or lift.
pub fn idempotency_key(org_id: &str, e: &DeliveryEvent) -> String {
    format!(
        "{org_id}:{}:{}:{}:{}:{}:{}",
        e.subject_kind, e.subject_id, e.month, e.event, e.threshold_bps, e.ordinal
    )
}

/// The JSON body: the same bytes for every attempt of a delivery.
pub fn body(org_id: &str, e: &DeliveryEvent) -> Vec<u8> {
    let month = u32::try_from(e.month)
        .ok()
        .and_then(Month::from_yyyymm)
        .map_or_else(|| e.month.to_string(), |m| m.to_string());
    let threshold = (e.event == "threshold_crossed")
        .then(|| u32::try_from(e.threshold_bps).ok())
        .flatten()
        .and_then(|bps| format_bps(bps).parse::<serde_json::Number>().ok());
    serde_json::json!({
        "id": idempotency_key(org_id, e),
        "type": e.event,
        "org_id": org_id,
        "subject": { "kind": e.subject_kind, "id": e.subject_id },
        "month": month,
        "threshold": threshold,
        "spend_micros": e.spend_micros,
        "limit_micros": e.limit_micros,
        "reason": e.reason,
        "projected_micros": e.projected_micros,
        "projected_limit_date": e.limit_date().map(|d| d.to_string()),
        "occurred_at": tally_proto::format_rfc3339_ms(e.at_ms),
    })
    .to_string()
    .into_bytes()
}

/// What a delivery of `e` sends in `format`; `console` is where admins
/// reach the console (`--public-url`), for a Slack message's link.
pub fn payload(
    format: WebhookFormat,
    org_id: &str,
    e: &DeliveryEvent,
    console: Option<&str>,
) -> Vec<u8> {
    match format {
        WebhookFormat::Tally => body(org_id, e),
        WebhookFormat::Slack => slack(&slack_text(org_id, e, console)),
    }
}

/// A Slack incoming-webhook message.
fn slack(text: &str) -> Vec<u8> {
    serde_json::json!({ "text": text }).to_string().into_bytes()
}

/// `80%`, `80.5%`, `100%` of basis points.
fn percent(bps: i64) -> String {
    let (whole, frac) = (bps / 100, bps % 100);
    match frac {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

/// The console page of a subject, under `console` (the public URL).
pub fn console_link(console: &str, org_id: &str, kind: &str, id: &str) -> String {
    let base = format!("{}/console/orgs/{org_id}", console.trim_end_matches('/'));
    match kind {
        "user" => format!("{base}/users/{id}"),
        "group" => format!("{base}/groups/{id}"),
        "key" => format!("{base}/keys"),
        _ => base,
    }
}

/// What a Slack message says of an event: the subject, what happened, the
/// spend and the limit, the month, and a link to its console page. Ids are
/// letters, digits, `.`, `_` and `-`, which Slack shows as they are.
pub fn slack_text(org_id: &str, e: &DeliveryEvent, console: Option<&str>) -> String {
    let subject = match e.subject_kind.as_str() {
        "org" => "the org".to_owned(),
        kind => format!("{kind} `{}`", e.subject_id),
    };
    let month = u32::try_from(e.month)
        .ok()
        .and_then(Month::from_yyyymm)
        .map_or_else(|| e.month.to_string(), |m| m.to_string());
    let spend = format_usd(e.spend_micros);
    let limit = e
        .limit_micros
        .map_or_else(|| "no limit".to_owned(), format_usd);
    let monthly = e.limit_micros.map_or_else(
        || "no monthly limit".to_owned(),
        |l| format!("monthly limit {}", format_usd(l)),
    );
    let what = match e.event.as_str() {
        "threshold_crossed" => format!(
            ":warning: *{org_id}*: {subject} has used {} of its monthly limit: {spend} of {limit} ({month}).",
            percent(e.threshold_bps)
        ),
        "forecast_over_limit" => format!(
            ":crystal_ball: *{org_id}*: {subject} is on course to pass its monthly limit: {spend} \
             spent, {} projected by month-end against {limit}, reaching it around {} ({month}).",
            e.projected_micros
                .map_or_else(|| "more".to_owned(), format_usd),
            e.limit_date()
                .map_or_else(|| "month-end".to_owned(), |d| d.to_string()),
        ),
        "cut_off" => format!(
            ":no_entry: *{org_id}*: {subject} is cut off: {spend} spent, {monthly} ({month})."
        ),
        "cutoff_lifted" => {
            let why = match e.reason.as_deref() {
                Some("limit_raised") => "the limit was raised",
                Some("limit_removed") => "the limit was removed",
                Some("new_month") => "a new month began",
                _ => "lifted",
            };
            format!(
                ":white_check_mark: *{org_id}*: {subject} is no longer cut off ({why}): {spend} spent, {monthly} ({month})."
            )
        }
        other => format!("*{org_id}*: {other} for {subject}: {spend} of {limit} ({month})."),
    };
    match console {
        Some(c) => format!(
            "{what} <{}|Open in Tally>",
            console_link(c, org_id, &e.subject_kind, &e.subject_id)
        ),
        None => what,
    }
}

/// What a test send found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why it was not delivered; `None`: it was (2xx).
    pub error: Option<String>,
    pub took: Duration,
}

/// Sends a `test` notification to `url` now, signed with the org's secret
/// of webhook `seq`, through a client like the deliveries' (no redirect, no
/// proxy, only addresses `targets` allows). Nothing is queued or retried.
pub async fn send_test(
    keys: &Keyring,
    targets: Arc<TargetPolicy>,
    org_id: &str,
    hook: &WebhookTarget,
    console: Option<&str>,
    timeout: Duration,
) -> TestOutcome {
    let url = hook.url.as_str();
    let started = Instant::now();
    let done = |status: Option<u16>, error: Option<String>| TestOutcome {
        status,
        error,
        took: started.elapsed(),
    };
    let literal = reqwest::Url::parse(url)
        .map_err(|e| e.to_string())
        .and_then(|u| targets.check_literal(&u).map_err(|r| r.to_string()));
    if let Err(refused) = literal {
        return done(None, Some(format!("refused: {refused}")));
    }
    let client = match client(timeout, targets) {
        Ok(c) => c,
        Err(e) => return done(None, Some(e)),
    };
    let now = now_ms();
    let id = format!("{org_id}:test:{now}");
    let body = match hook.format {
        WebhookFormat::Tally => serde_json::json!({
            "id": id,
            "type": "test",
            "org_id": org_id,
            "occurred_at": tally_proto::format_rfc3339_ms(now),
        })
        .to_string()
        .into_bytes(),
        WebhookFormat::Slack => {
            let link = console
                .map(|c| {
                    format!(
                        " <{}|Open in Tally>",
                        console_link(c, org_id, "org", org_id)
                    )
                })
                .unwrap_or_default();
            slack(&format!(
                ":wave: *{org_id}*: a test notification from Tally. Threshold and cutoff notifications will arrive here.{link}"
            ))
        }
    };
    let ts = now / 1_000;
    let secret = keys.secret(org_id, hook.seq);
    let mut request = client.post(url).header("content-type", "application/json");
    for (name, value) in signed_headers(&secret, &id, ts, &body, 1) {
        request = request.header(name, value);
    }
    let sent = request.body(body).send().await;
    match sent {
        Ok(r) if r.status().is_success() => done(Some(r.status().as_u16()), None),
        Ok(r) => done(
            Some(r.status().as_u16()),
            Some(format!("the receiver answered HTTP {}", r.status())),
        ),
        Err(e) => match refusal(&e) {
            Some(refused) => done(None, Some(format!("refused: {refused}"))),
            None => done(None, Some(clip(error_chain(&e)))),
        },
    }
}

/// How the sender works.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// One attempt's time limit (connect to last byte).
    pub timeout: Duration,
    /// The delay after a first failure; it doubles with each further one.
    pub retry_base: Duration,
    /// The longest delay between attempts.
    pub retry_max: Duration,
    /// Attempts before a delivery is given up (`failed`).
    pub attempts_max: u32,
    /// How often due deliveries are looked for.
    pub poll: Duration,
    /// Deliveries claimed (and sent concurrently) at once.
    pub batch: u32,
    /// Targets allowed although their address is not public.
    pub targets: Arc<TargetPolicy>,
    /// Where admins reach the console (`--public-url`): Slack messages
    /// link to the subject's page under it.
    pub console_url: Option<Arc<str>>,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            timeout: Duration::from_secs(10),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(3_600),
            attempts_max: 12,
            poll: Duration::from_millis(500),
            batch: 32,
            targets: Arc::default(),
            console_url: None,
        }
    }
}

impl SenderOptions {
    /// The delay before attempt `attempts + 1`: `retry_base` doubled per
    /// failure so far, at most `retry_max`, with the upper half jittered so
    /// that receivers coming back are not met by every retry at once.
    pub fn backoff(&self, attempts: i64, jitter: u64) -> Duration {
        let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        let full = self
            .retry_base
            .saturating_mul(1u32 << doublings)
            .min(self.retry_max);
        let half = full / 2;
        let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_millis(jitter % spread)
    }
}

/// Sends due deliveries until stopped.
pub struct Sender {
    db: Db,
    keys: Arc<Keyring>,
    client: reqwest::Client,
    opts: SenderOptions,
    clock: Clock,
}

/// Milliseconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Error text kept for admins: the first 300 characters.
fn clip(s: String) -> String {
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Makes rustls' ring provider the process's TLS crypto: reqwest is built
/// without a provider of its own (ring builds without cmake). Call before
/// building any HTTP client; calling again is harmless.
pub fn install_tls_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client with TLS (rustls, the platform's roots) that follows no
/// redirect (a webhook is where it says), uses no proxy, and connects only
/// to addresses `targets` allows (see [`target`]).
pub fn client(timeout: Duration, targets: Arc<TargetPolicy>) -> Result<reqwest::Client, String> {
    install_tls_crypto();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(target::GuardedResolver { policy: targets })
        .user_agent(concat!("tally-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the webhook HTTP client: {e}"))
}

impl Sender {
    pub fn new(db: Db, keys: Arc<Keyring>, opts: SenderOptions) -> Result<Sender, String> {
        Ok(Sender {
            db,
            keys,
            client: client(opts.timeout, Arc::clone(&opts.targets))?,
            opts,
            clock: Arc::new(now_ms),
        })
    }

    /// Schedules by `clock`: the one checkpoints date deliveries by (the
    /// process's clock). Signatures carry the system time, which receivers
    /// check against theirs.
    pub fn with_clock(self, clock: Clock) -> Sender {
        Sender { clock, ..self }
    }

    /// Claims and sends what is due until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let sender = Arc::new(self);
        // Claiming fails every poll while the store is away: logged once.
        let mut failing = false;
        loop {
            // Stopping drops attempts in flight: their claims run out and
            // the deliveries are sent again (receivers drop repeats by key).
            let step = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = Arc::clone(&sender).step() => r,
            };
            let sent = match step {
                Ok(n) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("webhook deliveries: claiming works again");
                    }
                    n
                }
                Err(e) if failing => {
                    tracing::debug!(error = %e, "webhook deliveries: claiming still fails");
                    0
                }
                Err(e) => {
                    failing = true;
                    tracing::warn!(error = %e, "webhook deliveries: claiming failed; retrying every poll");
                    0
                }
            };
            // Right away after sending: a subject's next delivery may be
            // due now that the one before it left.
            let pause = if sent > 0 {
                Duration::ZERO
            } else {
                sender.opts.poll
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One round: claims what is due and sends it; returns how many.
    pub async fn step(self: Arc<Self>) -> Result<usize, tally_store::Error> {
        // The lease outlasts an attempt, so a live sender keeps its claim.
        let lease = i64::try_from(self.opts.timeout.as_millis()).unwrap_or(i64::MAX) + 30_000;
        let due = self
            .db
            .claim_deliveries((self.clock)(), lease, self.opts.batch)
            .await?;
        let n = due.len();
        let mut tasks = tokio::task::JoinSet::new();
        for d in due {
            let sender = Arc::clone(&self);
            let _ = tasks.spawn(async move { sender.deliver(d).await });
        }
        while tasks.join_next().await.is_some() {}
        Ok(n)
    }

    async fn deliver(&self, d: DueDelivery) {
        let outcome = match &d.webhook {
            None => AttemptOutcome::Cancelled,
            Some(hook) => self.attempt(&d, hook).await,
        };
        let label = match &outcome {
            AttemptOutcome::Delivered { .. } => "delivered",
            AttemptOutcome::Retry { .. } => "retried",
            AttemptOutcome::GaveUp { .. } => "failed",
            AttemptOutcome::Cancelled => "cancelled",
        };
        metrics::counter!(DELIVERIES, "outcome" => label).increment(1);
        match &outcome {
            AttemptOutcome::Retry { error, .. } | AttemptOutcome::GaveUp { error, .. } => {
                tracing::warn!(org = %d.org_id, delivery = d.id, attempts = d.attempts, error = %error, outcome = label, "webhook delivery failed");
            }
            _ => {
                tracing::info!(org = %d.org_id, delivery = d.id, attempts = d.attempts, outcome = label, "webhook delivery");
            }
        }
        match self.db.finish_delivery(&d, &outcome, (self.clock)()).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                delivery = d.id,
                "webhook delivery outcome not recorded: its claim ran out and another sender took it"
            ),
            // The claim's lease runs out and the delivery is tried again.
            Err(e) => {
                tracing::warn!(delivery = d.id, error = %e, "recording a webhook outcome failed")
            }
        }
    }

    async fn attempt(&self, d: &DueDelivery, hook: &WebhookTarget) -> AttemptOutcome {
        let url = hook.url.as_str();
        let body = payload(
            hook.format,
            &d.org_id,
            &d.event,
            self.opts.console_url.as_deref(),
        );
        let ts = now_ms() / 1_000;
        let secret = self.keys.secret(&d.org_id, hook.seq);
        let started = Instant::now();
        // Names are checked as they resolve; addresses here.
        let literal = reqwest::Url::parse(url)
            .map_err(|e| e.to_string())
            .and_then(|u| {
                self.opts
                    .targets
                    .check_literal(&u)
                    .map_err(|r| r.to_string())
            });
        if let Err(refused) = literal {
            return self.failed(d, None, format!("refused: {refused}"));
        }
        let id = idempotency_key(&d.org_id, &d.event);
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json");
        for (name, value) in signed_headers(&secret, &id, ts, &body, d.attempts) {
            request = request.header(name, value);
        }
        let sent = request.body(body).send().await;
        metrics::histogram!(ATTEMPT_SECONDS).record(started.elapsed().as_secs_f64());
        let (status, error) = match sent {
            Ok(r) if r.status().is_success() => {
                return AttemptOutcome::Delivered {
                    status: i64::from(r.status().as_u16()),
                };
            }
            Ok(r) => (
                Some(i64::from(r.status().as_u16())),
                format!("the receiver answered HTTP {}", r.status()),
            ),
            Err(e) => match refusal(&e) {
                Some(refused) => (None, format!("refused: {refused}")),
                None => (None, clip(error_chain(&e))),
            },
        };
        self.failed(d, status, error)
    }

    /// A failed attempt: retried later, or given up after the last.
    fn failed(&self, d: &DueDelivery, status: Option<i64>, error: String) -> AttemptOutcome {
        if d.attempts >= i64::from(self.opts.attempts_max) {
            return AttemptOutcome::GaveUp { status, error };
        }
        let mut jitter = [0u8; 8];
        let _ = getrandom::fill(&mut jitter);
        let delay = self.opts.backoff(d.attempts, u64::from_le_bytes(jitter));
        AttemptOutcome::Retry {
            status,
            error,
            next_attempt_ms: (self.clock)()
                .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

/// The target refusal among an error's causes, if any.
fn refusal<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e target::Refused> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<target::Refused>() {
            return Some(r);
        }
        cause = c.source();
    }
    None
}

/// An error with its causes: "error sending request: connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> DeliveryEvent {
        DeliveryEvent {
            subject_kind: "user".into(),
            subject_id: "alice".into(),
            month: 202_611,
            event: "threshold_crossed".into(),
            threshold_bps: 8_000,
            ordinal: 0,
            reason: None,
            spend_micros: 40_000_000,
            limit_micros: Some(50_000_000),
            at_ms: 1_795_000_000_000,
            projected_micros: None,
            limit_day: None,
        }
    }

    /// Alice's forecast: $20 spent, $61.50 projected, her $50 reached on
    /// the 25th.
    fn forecast_event() -> DeliveryEvent {
        DeliveryEvent {
            event: "forecast_over_limit".into(),
            threshold_bps: 0,
            spend_micros: 20_000_000,
            projected_micros: Some(61_500_000),
            limit_day: Some(20_261_125),
            ..event()
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_differ_by_org_and_by_each_setting() {
        let k = Keyring::new([7; 32]);
        let a = k.secret("acme", 2);
        assert!(a.starts_with("whsec_") && a.len() == 6 + 64, "{a}");
        assert_eq!(a, k.secret("acme", 2));
        assert_ne!(a, k.secret("acme", 3));
        assert_ne!(a, k.secret("acme2", 2));
        assert_ne!(a, Keyring::new([8; 32]).secret("acme", 2));
    }

    #[test]
    fn the_body_is_stable_and_says_what_happened() {
        let b = body("acme", &event());
        assert_eq!(b, body("acme", &event()));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "acme:user:alice:202611:threshold_crossed:8000:0",
                "type": "threshold_crossed", "org_id": "acme",
                "subject": {"kind": "user", "id": "alice"}, "month": "2026-11",
                "threshold": 0.8, "spend_micros": 40_000_000, "limit_micros": 50_000_000,
                "reason": null, "projected_micros": null, "projected_limit_date": null,
                "occurred_at": tally_proto::format_rfc3339_ms(1_795_000_000_000),
            })
        );
        let forecast = forecast_event();
        let v: serde_json::Value = serde_json::from_slice(&body("acme", &forecast)).unwrap();
        assert_eq!(v["id"], "acme:user:alice:202611:forecast_over_limit:0:0");
        assert_eq!(v["threshold"], serde_json::Value::Null);
        assert_eq!(v["projected_micros"], 61_500_000);
        assert_eq!(v["projected_limit_date"], "2026-11-25");
        let sig = signature("whsec_x", 1_700_000_000, &b);
        assert_eq!(sig, signature("whsec_x", 1_700_000_000, &b));
        assert_ne!(sig, signature("whsec_x", 1_700_000_001, &b));
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
    }

    /// Vectors computed by the `standardwebhooks` PyPI package (1.3.0):
    /// the spec's own example, and a Tally secret (hex after `whsec_`).
    #[test]
    fn the_standard_signature_matches_the_reference_library() {
        assert_eq!(
            standard_signature(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#,
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let secret = format!("whsec_{}", "0123456789abcdef".repeat(4));
        assert_eq!(
            standard_signature(
                &secret,
                "acme:user:alice:202611:cut_off:0:1",
                1_795_000_000,
                b"{}"
            ),
            "v1,yxlnIzyL0f8MnJo7xH12lQIQ4ynwaNfVpkdExl8EJxk="
        );
        let h = signed_headers(&secret, "k", 1_795_000_000, b"{}", 3);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("webhook-id"), Some("k"));
        assert_eq!(get("idempotency-key"), Some("k"));
        assert_eq!(get("webhook-timestamp"), Some("1795000000"));
        assert_eq!(get("tally-timestamp"), Some("1795000000"));
        assert_eq!(get("tally-attempt"), Some("3"));
        assert_eq!(
            get("tally-signature"),
            Some(signature(&secret, 1_795_000_000, b"{}").as_str())
        );
    }

    #[test]
    fn a_slack_message_says_who_what_how_much_and_links_the_console() {
        let text = |e: &DeliveryEvent, console| {
            let v: serde_json::Value =
                serde_json::from_slice(&payload(WebhookFormat::Slack, "acme", e, console)).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
            v["text"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            text(&event(), Some("https://tally.acme.test/")),
            ":warning: *acme*: user `alice` has used 80% of its monthly limit: $40.00 of $50.00 \
             (2026-11). <https://tally.acme.test/console/orgs/acme/users/alice|Open in Tally>"
        );
        let cut = DeliveryEvent {
            subject_kind: "group".into(),
            subject_id: "eng".into(),
            event: "cut_off".into(),
            threshold_bps: 0,
            spend_micros: 50_250_000,
            ..event()
        };
        let forecast = forecast_event();
        assert_eq!(
            text(&forecast, None),
            ":crystal_ball: *acme*: user `alice` is on course to pass its monthly limit: $20.00 \
             spent, $61.50 projected by month-end against $50.00, reaching it around 2026-11-25 \
             (2026-11)."
        );
        assert_eq!(
            text(&cut, None),
            ":no_entry: *acme*: group `eng` is cut off: $50.25 spent, monthly limit $50.00 (2026-11)."
        );
        let lifted = DeliveryEvent {
            subject_kind: "org".into(),
            subject_id: "acme".into(),
            event: "cutoff_lifted".into(),
            threshold_bps: 0,
            reason: Some("limit_removed".into()),
            limit_micros: None,
            ..event()
        };
        assert_eq!(
            text(&lifted, Some("http://t.test")),
            ":white_check_mark: *acme*: the org is no longer cut off (the limit was removed): \
             $40.00 spent, no monthly limit (2026-11). <http://t.test/console/orgs/acme|Open in Tally>"
        );
        assert_eq!(
            payload(WebhookFormat::Tally, "acme", &event(), None),
            body("acme", &event())
        );
        for (bps, s) in [
            (8_000, "80%"),
            (8_050, "80.5%"),
            (10_000, "100%"),
            (1, "0.01%"),
        ] {
            assert_eq!(percent(bps), s);
        }
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        let o = SenderOptions {
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            ..SenderOptions::default()
        };
        for (attempts, full) in [(1, 2), (2, 4), (3, 8), (6, 60), (40, 60)] {
            let full = Duration::from_secs(full);
            for jitter in [0, 1, 999, u64::MAX] {
                let d = o.backoff(attempts, jitter);
                assert!(d >= full / 2 && d <= full, "{attempts} {jitter} {d:?}");
            }
        }
    }
}
