//! `tally bench`: end-to-end figures on this machine. Each scenario runs real
//! `tally serve` processes (this very binary) and prints its configuration
//! and its figures; none asserts a time. `--quick` shrinks every scenario to
//! a smoke run (the test suite runs it so the command cannot rot).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tally_core::usage::RawUsage;
use tally_store::{Db, DbOptions};

const TOKEN: &str = "bench-operator-token-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Every scenario (kafka only with --kafka-brokers and --database-url;
    /// soak only with --quick).
    All,
    /// Usage over HTTP in batches, applied and checkpointed (embedded).
    Embedded,
    /// `POST /v1/authorize` over loopback with 64 connections.
    Authorize,
    /// Time to ready with millions of events behind the last checkpoint.
    Restart,
    /// Consume-apply-checkpoint from Kafka against a bare consumer.
    Kafka,
    /// The console's users page of an org with 100 000 members, rendered
    /// on SQLite and (with --database-url) on PostgreSQL.
    Console,
    /// `GET /v1/orgs/{org}/usage` of an org with 100 000 members using 50
    /// models over a month, on SQLite and (with --database-url) on
    /// PostgreSQL.
    Usage,
    /// Mixed load (authorize with holds, admin reads and bulk changes, and
    /// ingest at half the maximum measured under them) with a kill -9 and
    /// restart every minute: memory, and totals exact at the end
    /// (embedded).
    Soak,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Which scenario to run.
    #[arg(value_enum, default_value_t = Scenario::All)]
    pub(crate) scenario: Scenario,
    /// A smoke run: every scenario, small.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Kafka brokers for the kafka scenario [default: `kafka_brokers` of
    /// --config].
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    pub(crate) kafka_brokers: Option<String>,
    /// PostgreSQL for the kafka scenario: a fresh database (its orgs and
    /// topics are named after the run; partition checkpoints are not)
    /// [default: `database_url` of --config].
    #[arg(long, env = "TALLY_DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// Where the scenarios keep their data [default: a temp dir, removed].
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// How long the soak scenario runs, in seconds [default: 600; 60 with
    /// --quick].
    #[arg(long)]
    pub(crate) soak_secs: Option<u64>,
}

/// A `tally serve` child process.
struct Server {
    child: Child,
    url: String,
    http: reqwest::Client,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Server> {
        Server::start_on(dir, name, "127.0.0.1:0", args)
    }

    fn start_on(dir: &Path, name: &str, listen: &str, args: &[&str]) -> anyhow::Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .args(["--listen", listen, "--operator-token", TOKEN])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TALLY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting tally serve")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("tally listening on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let Ok(url) = rx.recv_timeout(Duration::from_secs(600)) else {
            let _ = child.kill();
            bail!(
                "tally serve did not start; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Server {
            child,
            url,
            http: reqwest::Client::new(),
            log,
        })
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.parse()?, format!("{}{path}", self.url))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let r = self.http.get(format!("{}/readyz", self.url)).send().await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready after 10 minutes: see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGTERM, and wait: the final checkpoint is written.
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait()?;
        if !status.success() {
            bail!(
                "tally serve exited with {status}; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn rate(n: u64, d: Duration) -> String {
    let per_s = (u128::from(n) * 1_000_000) / d.as_micros().max(1);
    format!("{per_s} events/s ({n} in {} ms)", d.as_millis())
}

/// An org `org` with `users` active members u0…, each with a key k0….
async fn seed_org(s: &Server, org: &str, users: u32) -> anyhow::Result<Vec<String>> {
    let _ = s
        .call("POST", "/v1/orgs", Some(json!({"id": org, "name": org})))
        .await?;
    let mut secrets = Vec::new();
    for u in 0..users {
        let _ = s
            .call(
                "POST",
                &format!("/v1/orgs/{org}/users"),
                Some(
                    json!({"id": format!("u{u}"), "email": format!("u{u}@{org}.test"),
                            "name": format!("user {u}"), "status": "active"}),
                ),
            )
            .await?;
        let k = s
            .call(
                "POST",
                &format!("/v1/orgs/{org}/keys"),
                Some(json!({"id": format!("k{u}"), "name": format!("key {u}"),
                            "user_id": format!("u{u}"), "features": ["chat"]})),
            )
            .await?;
        secrets.push(k["secret"].as_str().unwrap_or_default().to_owned());
    }
    Ok(secrets)
}

fn cost(i: u64) -> i64 {
    1_000 + i64::try_from(i % 1_000).unwrap_or(0)
}

fn expected_spend(first: u64, n: u64) -> i64 {
    (first..first + n).map(cost).sum()
}

async fn spend(s: &Server, org: &str) -> anyhow::Result<i64> {
    let v = s.call("GET", &format!("/v1/orgs/{org}"), None).await?;
    v["spend_micros"].as_i64().context("spend_micros")
}

/// Usage events counted so far (`tally_usage_events_total`, accepted).
async fn accepted(s: &Server) -> anyhow::Result<u64> {
    let text = s
        .http
        .get(format!("{}/metrics", s.url))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("tally_usage_events_total{") && l.contains("outcome=\"accepted\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum())
}

fn header(args: &BenchArgs) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                Some(
                    l.strip_prefix("model name")?
                        .split_once(':')?
                        .1
                        .trim()
                        .to_owned(),
                )
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "tally {} bench: {}, {cpus} CPUs ({model}), {}{}",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug build (figures are not representative: cargo run --release -- bench)"
        } else {
            "release build"
        },
        std::env::consts::OS,
        if args.quick {
            ", quick (smoke) mode"
        } else {
            ""
        },
    );
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    header(&args);
    let temp = args.dir.is_none();
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tally-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let run = |s: Scenario| args.scenario == Scenario::All || args.scenario == s;
    let result = async {
        if run(Scenario::Embedded) {
            embedded(&args, &dir.join("embedded")).await?;
        }
        if run(Scenario::Authorize) {
            authorize(&args, &dir.join("authorize")).await?;
        }
        if run(Scenario::Restart) {
            restart(&args, &dir.join("restart")).await?;
        }
        // Ten minutes: on its own only, but in every quick run.
        if args.scenario == Scenario::Soak || (args.quick && run(Scenario::Soak)) {
            soak(&args, &dir.join("soak")).await?;
        } else if run(Scenario::Soak) {
            println!("soak: skipped (ten minutes: run `tally bench soak`)");
        }
        if run(Scenario::Console) {
            console(&args, &dir.join("console")).await?;
        }
        if run(Scenario::Usage) {
            usage_report(&args, &dir.join("usage")).await?;
        }
        if run(Scenario::Kafka) {
            match (&args.kafka_brokers, &args.database_url) {
                (Some(b), Some(d)) => kafka(&args, &dir.join("kafka"), b, d).await?,
                _ if args.scenario == Scenario::Kafka => {
                    bail!("the kafka scenario needs --kafka-brokers and --database-url")
                }
                _ => println!("kafka: skipped (give --kafka-brokers and --database-url)"),
            }
        }
        anyhow::Ok(())
    }
    .await;
    if temp && result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// (a) Usage over HTTP into the embedded mode: batches posted by a few
/// concurrent clients, then a read that waits for the checkpoint. Then the
/// same again while admins read the org's spend in a loop (each read
/// checkpoints first, for read-your-writes).
async fn embedded(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (users, events, batch, clients, readers) = if args.quick {
        (10, 20_000u64, 1_000u64, 4usize, 2usize)
    } else {
        (1_000, 1_000_000, 1_000, 4, 8)
    };
    let data = dir.display().to_string();
    let s = Server::start(dir, "serve", &["--data-dir", &data])?;
    s.ready().await?;
    let _ = seed_org(&s, "bench", users).await?;
    println!(
        "embedded: {events} events, {users} users, batches of {batch}, {clients} concurrent clients, SQLite"
    );
    let (ingested, checkpointed) = ingest_pass(&s, 0, events, batch, users, clients).await?;
    println!(
        "embedded: ingested (applied, logged, answered): {}",
        rate(events, ingested)
    );
    println!(
        "embedded: ingested and checkpointed: {}",
        rate(events, checkpointed)
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut polling = tokio::task::JoinSet::new();
    for _ in 0..readers {
        let (stop, http, url) = (Arc::clone(&stop), s.http.clone(), s.url.clone());
        let _ = polling.spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .get(format!("{url}/v1/orgs/bench"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("reading the org: {}", r.status());
                }
                reads += 1;
            }
            anyhow::Ok(reads)
        });
    }
    let (ingested, _) = ingest_pass(&s, events, events, batch, users, clients).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    while let Some(r) = polling.join_next().await {
        reads += r??;
    }
    println!(
        "embedded: ingested while {readers} admins read the org's spend in a loop: {}; {} reads/s",
        rate(events, ingested),
        (u128::from(reads) * 1_000) / ingested.as_millis().max(1)
    );
    s.stop()
}

/// Posts events `first..first + n` (JSON, in batches, from `clients`
/// concurrent clients), then reads the org's spend (which checkpoints) and
/// checks it. Returns the time to the last answer and to the read.
async fn ingest_pass(
    s: &Server,
    first: u64,
    n: u64,
    batch: u64,
    users: u32,
    clients: usize,
) -> anyhow::Result<(Duration, Duration)> {
    ingest_pass_org(s, "bench", first, n, batch, users, clients).await
}

/// [`ingest_pass`] for the org `org`.
async fn ingest_pass_org(
    s: &Server,
    org: &str,
    first: u64,
    n: u64,
    batch: u64,
    users: u32,
    clients: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    post_closed_loop(s, org, first, n, batch, users, clients).await?;
    let ingested = started.elapsed();
    let got = spend(s, org).await?;
    let checkpointed = started.elapsed();
    if got != expected_spend(0, first + n) {
        bail!("spend {got} != {}", expected_spend(0, first + n));
    }
    Ok((ingested, checkpointed))
}

/// The ingest request of events `first..first + batch` of `org` (event `i`
/// is user `u{i % users}`'s, with key `k{…}`, costing [`cost`]`(i)`),
/// occurred at `at_ms`.
fn usage_body(org: &str, first: u64, batch: u64, users: u32, at_ms: i64) -> String {
    let at = tally_proto::format_rfc3339_ms(at_ms);
    let evs: Vec<Value> = (first..first + batch)
        .map(|i| {
            let u = i % u64::from(users);
            json!({"request_id": format!("e-{i}"), "org_id": org,
                   "user_id": format!("u{u}"), "api_key_id": format!("k{u}"),
                   "model": "gpt-4o", "provider": "openai", "input_tokens": 1200,
                   "output_tokens": 300, "cost_micros": cost(i), "occurred_at": at})
        })
        .collect();
    json!({ "events": evs }).to_string()
}

/// Posts events `first..first + n` of `org` (JSON, in batches, from
/// `clients` concurrent clients, each waiting for its answer), every one
/// accepted.
async fn post_closed_loop(
    s: &Server,
    org: &str,
    first: u64,
    n: u64,
    batch: u64,
    users: u32,
    clients: usize,
) -> anyhow::Result<()> {
    let now = now_ms();
    let bodies: Vec<String> = (0..n / batch)
        .map(|b| usage_body(org, first + b * batch, batch, users, now - 1_000))
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (bodies, next) = (Arc::clone(&bodies), Arc::clone(&next));
        let (http, url) = (s.http.clone(), s.url.clone());
        let _ = tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return anyhow::Ok(());
                };
                let r = http
                    .post(format!("{url}/v1/usage"))
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let v: Value = r.json().await?;
                if v["accepted"] != json!(batch) {
                    bail!("batch {i} not accepted: {v}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// The TTL of the holds the authorize scenario places.
const HOLD_TTL_MS: u64 = 10_000;

/// (c) Authorize over loopback HTTP with 64 connections: closed loop (each
/// asks again as soon as it has its answer: the machine's saturation), then
/// paced at a fixed total rate, latency counted from each call's scheduled
/// time so a stall is not hidden.
async fn authorize(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (conns, warmup, measure, paced_rates): (usize, _, _, &[u64]) = if args.quick {
        (
            8,
            Duration::from_millis(200),
            Duration::from_millis(500),
            &[1_000],
        )
    } else {
        (
            64,
            Duration::from_secs(2),
            Duration::from_secs(10),
            &[5_000, 10_000, 20_000],
        )
    };
    let data = dir.display().to_string();
    let s = Server::start(dir, "serve", &["--data-dir", &data])?;
    s.ready().await?;
    let secrets = seed_org(&s, "bench", 64).await?;
    println!(
        "authorize: {conns} connections over loopback, client and server on the same machine, \
         {} s measured after {} ms warm-up",
        measure.as_secs_f64(),
        warmup.as_millis()
    );
    // Plain authorize, then authorize with a reserve (each call places a
    // hold of its own: decided against spent + held, journaled). Each
    // reserving run has an org of its own and its holds a TTL of 10 s, so
    // that the live holds (at most 10 s of calls) stay below an org's cap
    // however fast the machine.
    let runs = [false, true].into_iter().flat_map(|reserve| {
        std::iter::once(None)
            .chain(paced_rates.iter().copied().map(Some))
            .map(move |rate| (reserve, rate))
    });
    for (run, (reserve, rate)) in runs.enumerate() {
        let secrets = if reserve {
            seed_org(&s, &format!("bench-{run}"), 64).await?
        } else {
            secrets.clone()
        };
        let start_at = Instant::now() + warmup;
        let end_at = start_at + measure;
        let before = {
            let (http, url) = (s.http.clone(), s.url.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(start_at.into()).await;
                authorize_buckets(&http, &url).await
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..conns {
            // One client each: one connection each.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()?;
            let url = format!("{}/v1/authorize", s.url);
            let secret = secrets[c % secrets.len()].clone();
            let body = move |n: u64| {
                let mut b = json!({"api_key": secret, "feature": "chat"});
                if reserve {
                    b["request_id"] = json!(format!("{}-c{c}-{n}", rate.unwrap_or(0)));
                    b["reserve_micros"] = json!(1_000);
                    b["hold_ttl_ms"] = json!(HOLD_TTL_MS);
                }
                b.to_string()
            };
            // Paced: this connection's calls are `every` apart, staggered.
            let every = rate.map(|r| Duration::from_nanos(1_000_000_000 * conns as u64 / r));
            let _ = tasks.spawn(async move {
                let mut lat_us: Vec<u32> = Vec::new();
                let mut due =
                    Instant::now() + every.map_or(Duration::ZERO, |e| e * c as u32 / conns as u32);
                let mut done = Instant::now();
                for n in 0.. {
                    // A call counts from when it was sent, unless this
                    // connection's previous answer came after its slot: then
                    // from the slot (the wait is latency the caller saw).
                    // The timer's own lateness (about 1 ms) is the client's,
                    // not Tally's, and is not counted.
                    let start = if every.is_some() {
                        tokio::time::sleep_until(due.into()).await;
                        if done > due { due } else { Instant::now() }
                    } else {
                        due = Instant::now();
                        due
                    };
                    if due >= end_at {
                        return anyhow::Ok(lat_us);
                    }
                    let r = http
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(body(n))
                        .send()
                        .await?;
                    let ok = r.status().is_success();
                    let v: Value = r.json().await?;
                    if !ok || v["allowed"] != json!(true) {
                        bail!("authorize answered {v}");
                    }
                    done = Instant::now();
                    if due >= start_at {
                        lat_us.push(u32::try_from((done - start).as_micros()).unwrap_or(u32::MAX));
                    }
                    if let Some(e) = every {
                        due += e;
                    }
                }
                anyhow::Ok(lat_us)
            });
        }
        let mut all: Vec<u32> = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        all.sort_unstable();
        let pct = |p: usize| {
            all.get((all.len() * p / 1000).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let load = match rate {
            None => "closed loop (saturation)".to_owned(),
            Some(r) => format!("paced at {r}/s"),
        };
        let load = if reserve {
            format!("with a reserve, {load}")
        } else {
            load
        };
        println!(
            "authorize: {load}: {} decisions/s; latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            (all.len() as u128 * 1_000_000) / measure.as_micros().max(1),
            pct(500),
            pct(990),
            pct(999),
            all.last().copied().unwrap_or(0)
        );
        // The same calls as the server timed them (its histogram, from the
        // request's first byte to its answer): what the client adds is
        // queueing on the machine's shared cores.
        let before = before.await??;
        let after = authorize_buckets(&s.http, &s.url).await?;
        let server = Histogram::delta(&before.http, &after.http);
        let engine = if reserve {
            Histogram::delta(&before.reserve, &after.reserve)
        } else {
            Histogram::delta(&before.plain, &after.plain)
        };
        println!(
            "authorize: {load}: in the server: p99 ≤ {} µs (in the engine ≤ {} µs); {} within 1 ms ({} calls)",
            server.p99_le(),
            engine.p99_le(),
            server.within_ms(),
            server.total()
        );
    }
    s.stop()
}

/// The server's latency histograms of `POST /v1/authorize`: the HTTP
/// request's (from its first byte to its answer) and the engine's decision
/// alone, plain and with a reserve.
#[derive(Default)]
struct AuthorizeBuckets {
    http: Histogram,
    plain: Histogram,
    reserve: Histogram,
}

/// (bucket bound in µs, calls within it), ascending, `+Inf` as `u64::MAX`.
#[derive(Default)]
struct Histogram(Vec<(u64, u64)>);

impl Histogram {
    fn add(&mut self, le: u64, n: u64) {
        match self.0.iter_mut().find(|(l, _)| *l == le) {
            Some((_, sum)) => *sum += n,
            None => self.0.push((le, n)),
        }
    }

    /// The calls counted in `after` and not in `before`.
    fn delta(before: &Histogram, after: &Histogram) -> Histogram {
        let was = |le: u64| {
            before
                .0
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0, |(_, n)| *n)
        };
        Histogram(after.0.iter().map(|&(le, n)| (le, n - was(le))).collect())
    }

    fn total(&self) -> u64 {
        self.0.last().map_or(0, |(_, n)| *n)
    }

    /// The least bucket bound that 99 % of the calls are within.
    fn p99_le(&self) -> String {
        let total = self.total().max(1);
        match self.0.iter().find(|(_, n)| n * 100 >= total * 99) {
            Some(&(le, _)) if le != u64::MAX => le.to_string(),
            _ => "∞".to_owned(),
        }
    }

    /// The share of calls within 1 ms, as a percentage to a tenth.
    fn within_ms(&self) -> String {
        let total = self.total().max(1);
        let n = self
            .0
            .iter()
            .find(|(le, _)| *le == 1_000)
            .map_or(0, |(_, n)| *n);
        format!("{}.{}%", n * 100 / total, n * 1_000 / total % 10)
    }
}

async fn authorize_buckets(http: &reqwest::Client, url: &str) -> anyhow::Result<AuthorizeBuckets> {
    let text = http
        .get(format!("{url}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .text()
        .await?;
    let mut buckets = AuthorizeBuckets::default();
    for line in text.lines() {
        let histogram = if line.starts_with("tally_http_request_duration_seconds_bucket{")
            && line.contains("route=\"/v1/authorize\"")
        {
            &mut buckets.http
        } else if line.starts_with("tally_authorize_duration_seconds_bucket{") {
            if line.contains("kind=\"reserve\"") {
                &mut buckets.reserve
            } else {
                &mut buckets.plain
            }
        } else {
            continue;
        };
        let Some((labels, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(le) = labels
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            u64::MAX
        } else {
            // Seconds, as a decimal, to µs.
            let (whole, frac) = le.split_once('.').unwrap_or((le, ""));
            let frac: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
            whole.parse::<u64>()? * 1_000_000 + frac.parse::<u64>()?
        };
        histogram.add(le, n.parse()?);
    }
    for h in [&mut buckets.http, &mut buckets.plain, &mut buckets.reserve] {
        h.0.sort_unstable();
    }
    Ok(buckets)
}

/// (d) Restart with millions of events in the usage log after the last
/// checkpoint (as a crash would leave them): time until ready.
async fn restart(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (users, events, batch) = if args.quick {
        (10u32, 100_000u64, 1_000u64)
    } else {
        (1_000, 10_000_000, 1_000)
    };
    let data = dir.display().to_string();
    let s = Server::start(dir, "seed", &["--data-dir", &data])?;
    s.ready().await?;
    let _ = seed_org(&s, "bench", users).await?;
    s.stop()?;
    // Append straight to the usage log, behind the last checkpoint.
    let db = Db::open(&DbOptions::new(format!(
        "sqlite://{}?mode=rwc",
        dir.join("tally.db").display()
    )))
    .await?;
    let now = now_ms();
    let written = Instant::now();
    for b in 0..events / batch {
        let evs: Vec<_> = (b * batch..(b + 1) * batch)
            .map(|i| {
                let u = i % u64::from(users);
                RawUsage {
                    request_id: &format!("r-{i}"),
                    org_id: "bench",
                    user_id: &format!("u{u}"),
                    api_key_id: &format!("k{u}"),
                    model: "gpt-4o",
                    provider: "openai",
                    input_tokens: 1200,
                    output_tokens: 300,
                    cost_micros: Some(cost(i)),
                    occurred_at_ms: Some(now - 60_000),
                }
                .validate()
            })
            .collect::<Result<_, _>>()?;
        let _ = db
            .append_usage(
                now - 1_000,
                evs.len(),
                &tally_proto::encode_usage_batch(&evs),
            )
            .await?;
    }
    db.close().await;
    let written = written.elapsed();
    let started = Instant::now();
    let s = Server::start(dir, "restart", &["--data-dir", &data])?;
    s.ready().await?;
    let ready = started.elapsed();
    let got = spend(&s, "bench").await?;
    if got != expected_spend(0, events) {
        bail!("after replay spend {got} != {}", expected_spend(0, events));
    }
    println!(
        "restart: {events} events ({} log records of {batch}) behind the last checkpoint, {users} users with keys, SQLite (written in {} ms)",
        events / batch,
        written.as_millis()
    );
    println!(
        "restart: start to ready {} ms ({} replayed)",
        ready.as_millis(),
        rate(events, ready)
    );
    s.stop()
}

/// (b) Kafka: events published before Tally starts; Tally's metering
/// (consume, decode, apply, checkpoint to PostgreSQL) against a bare
/// consumer that only counts the same messages, in the same run.
async fn kafka(
    args: &BenchArgs,
    dir: &Path,
    brokers: &str,
    database_url: &str,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    std::fs::create_dir_all(dir)?;
    let (users, events, partitions) = if args.quick {
        (10u32, 20_000u64, 4)
    } else {
        (1_000, 1_000_000, 8)
    };
    // Checkpoints are per partition number, whatever the topic: a database
    // that metered another run's topic would make this one skip offsets.
    let db = Db::open(&DbOptions::new(database_url.to_owned())).await?;
    for p in 0..partitions {
        if db
            .load_checkpoint(i64::from(p))
            .await?
            .is_some_and(|c| c.checkpoint.position >= 0)
        {
            bail!(
                "the kafka scenario needs a database no Tally has metered in \
                 (partition {p} has a checkpoint): give it a fresh one"
            );
        }
    }
    db.close().await;
    let run = format!("b{}x{}", std::process::id(), now_ms() % 1_000_000);
    let prefix = format!("{run}.");
    let org = format!("bench-{run}");
    let mut opts = tally_kafka::KafkaOptions::new(brokers);
    opts.topic_prefix = prefix.clone();
    opts.group = format!("{run}-meter");
    opts.usage_partitions = partitions;
    let parts = partitions.to_string();
    let serve_args = [
        "--kafka-brokers",
        brokers,
        "--database-url",
        database_url,
        "--kafka-topic-prefix",
        &prefix,
        "--kafka-group",
        &opts.group,
        "--kafka-usage-partitions",
        &parts,
    ];
    let s = Server::start(dir, "seed", &serve_args)?;
    s.ready().await?;
    let _ = seed_org(&s, &org, users).await?;
    s.stop()?;
    let produce_args = tally_kafka::produce::ProduceArgs {
        org: org.clone(),
        users: (0..users).map(|u| format!("u{u}")).collect(),
        keys: (0..users).map(|u| format!("k{u}")).collect(),
        events,
        rate: None,
        json: false,
        duplicate_percent: 0,
        seed: 7,
    };
    let published = Instant::now();
    let summary = tally_kafka::produce::produce(&opts, &produce_args, |_| {}).await?;
    let published = published.elapsed();

    // The bare consumer: same settings as Tally's, counts messages.
    let bare = Instant::now();
    let consumer: BaseConsumer = opts.consumer_config(&format!("{run}-bare")).create()?;
    consumer.subscribe(&[&opts.usage_topic()])?;
    let mut counted = 0u64;
    let mut bare_first = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counted < summary.published {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let _ = m?;
            counted += 1;
            let _ = bare_first.get_or_insert_with(|| bare.elapsed());
        }
        if Instant::now() > deadline {
            bail!(
                "the bare consumer counted {counted} of {}",
                summary.published
            );
        }
    }
    let bare = bare.elapsed();
    drop(consumer);

    let started = Instant::now();
    let s = Server::start(dir, "meter", &serve_args)?;
    s.ready().await?;
    let ready = started.elapsed();
    // Progress from the metrics (an admin read would checkpoint each time,
    // for read-your-writes, and slow the meter down): every event counted,
    // then one read, which checkpoints and checks the total.
    let mut tally_first = None;
    loop {
        let counted = accepted(&s).await?;
        if counted > 0 {
            let _ = tally_first.get_or_insert_with(|| started.elapsed());
        }
        if counted >= summary.published {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "tally counted {counted} of {} in 10 minutes",
                summary.published
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = spend(&s, &org).await?;
    if got != summary.cost_micros {
        bail!("spend {got} != {}", summary.cost_micros);
    }
    let metered = started.elapsed();
    println!(
        "kafka: {} messages (protobuf) on {partitions} partitions, {users} users with keys, one Tally process, PostgreSQL checkpoints (published in {} ms)",
        summary.published,
        published.as_millis()
    );
    let bare_first = bare_first.unwrap_or_default();
    let tally_first = tally_first.unwrap_or_default();
    println!(
        "kafka: bare consumer counting: {} (first message after {} ms: joining the group)",
        rate(summary.published, bare),
        bare_first.as_millis()
    );
    println!(
        "kafka: tally consume, apply, checkpoint: {} (process start to every event visible; \
         ready after {} ms, first event visible after {} ms)",
        rate(summary.published, metered),
        ready.as_millis(),
        tally_first.as_millis()
    );
    println!(
        "kafka: tally at {}% of the bare consumer from start to end, {}% from first message to last",
        (bare.as_micros() * 100) / metered.as_micros().max(1),
        ((bare - bare_first).as_micros() * 100) / (metered - tally_first).as_micros().max(1)
    );
    s.stop()
}

/// Shared by the soak's workers: what was acknowledged, and when to stop.
#[derive(Default)]
struct SoakBook {
    stop: std::sync::atomic::AtomicBool,
    /// Spend of the usage Tally acknowledged (accepted or duplicate).
    spend: std::sync::atomic::AtomicI64,
    events: std::sync::atomic::AtomicU64,
    reserves: std::sync::atomic::AtomicU64,
    admitted: std::sync::atomic::AtomicU64,
    reads: std::sync::atomic::AtomicU64,
    bulk: std::sync::atomic::AtomicU64,
    /// Calls that found the server away (killed, restarting): retried.
    retries: std::sync::atomic::AtomicU64,
    /// Events of the paced ingest acknowledged, and its batches that left
    /// late (every batch in flight still unanswered at their time).
    ingested: std::sync::atomic::AtomicU64,
    late: std::sync::atomic::AtomicU64,
}

impl SoakBook {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add(n: &std::sync::atomic::AtomicU64, by: u64) {
        let _ = n.fetch_add(by, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One call of a soak worker, asked again until the server answers (it may
/// be dead or restarting): the answer's status and body. None once stopped,
/// but usage is asked on after the stop, for up to a minute (the server is
/// up then): a batch it may have counted is never left out of the book.
async fn soak_call(
    http: &reqwest::Client,
    book: &SoakBook,
    url: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    let usage = path == "/v1/usage";
    let mut stopped_at: Option<Instant> = None;
    loop {
        let req = match body {
            Some(b) => http
                .post(format!("{url}{path}"))
                .header("content-type", "application/json")
                .body(b.to_owned()),
            None => http.get(format!("{url}{path}")),
        };
        let sent = req
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().as_u16() != 503 => {
                let status = r.status().as_u16();
                if let Ok(v) = r.json::<Value>().await {
                    return Some((status, v));
                }
            }
            _ => {}
        }
        // A body with a lost answer is sent again as is: usage is
        // deduplicated by request id, a hold by its request id.
        SoakBook::add(&book.retries, 1);
        if book.stopped() {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if !usage || since.elapsed() > Duration::from_secs(60) {
                return None;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The soak server's dedupe window, in request ids.
const DEDUPE_IDS: u64 = 500_000;
/// How long the soak's dedupe window takes to fill: over its cap it keeps
/// one to two minutes of the org's ids.
const SOAK_WINDOW_FULL_SECS: u64 = 120;
/// Usage batches of the soak's paced ingest that may wait for an answer at
/// once.
const INGEST_IN_FLIGHT_MAX: usize = 16;

/// Resident memory of process `pid`, in KiB (Linux; 0 elsewhere).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (e) Soak, embedded: authorize with holds (each admitted call's usage
/// settles its hold), admin reads and bulk limit changes, and ingest paced
/// open loop at half the maximum measured under them, all at once, with a
/// kill -9 and restart of the server every `kill_every`. Every call is
/// asked again until answered (usage by its request id, counted once). At
/// the end: the org's spend is exactly the acknowledged usage's; printed
/// are the ingest rate reached and the resident memory of each incarnation
/// begun past the run's warm-up (the dedupe window filling), after its own
/// first seconds, with whether the highest median is within 10 % of the
/// lowest.
async fn soak(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    std::fs::create_dir_all(dir)?;
    let (secs, kill_every, users, warmup) = if args.quick {
        (args.soak_secs.unwrap_or(60), 25, 20u32, 10)
    } else {
        (args.soak_secs.unwrap_or(600), 60, 1_000, 10)
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let data = dir.display().to_string();
    // A dedupe window that fills within the warm-up: past it, memory
    // should stay flat (the default window, 20 million ids an org, would
    // take many minutes to fill at this rate).
    let serve = [
        "--data-dir",
        data.as_str(),
        "--dedupe-entries-max",
        &DEDUPE_IDS.to_string(),
    ];
    let mut server = Server::start_on(dir, "soak-0", &listen, &serve)?;
    server.ready().await?;
    let secrets = seed_org(&server, "soak", users).await?;
    // A closed-loop pass to warm up (its totals checked), then the mixed
    // load without ingest, then ingest's maximum under it, closed loop: a
    // few seconds of the steady rate. Ingest is paced at half that.
    let (batch, clients) = (500u64, 4usize);
    let warm = 20 * batch * clients as u64;
    let measured = if args.quick { 5 } else { 10 } * warm;
    let _ = ingest_pass_org(&server, "soak", 0, warm, batch, users, clients).await?;
    let book = Arc::new(SoakBook::default());
    book.spend.store(expected_spend(0, warm), Relaxed);
    book.events.store(warm, Relaxed);
    let http = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Authorize with a hold, then the call's usage (which settles it).
    for w in 0..8u64 {
        let (book, http, url) = (Arc::clone(&book), http.clone(), url.clone());
        let secrets = secrets.clone();
        let _ = tasks.spawn(async move {
            let mut i = 0u64;
            while !book.stopped() {
                let u = (w * 7 + i) % u64::from(users);
                let id = format!("h-{w}-{i}");
                let c = 2_000 + i64::try_from(i % 500).unwrap_or(0);
                let body = json!({"api_key": secrets[usize::try_from(u).unwrap_or(0)],
                                  "request_id": id, "reserve_micros": c, "hold_ttl_ms": 60_000})
                .to_string();
                let Some((_, a)) =
                    soak_call(&http, &book, &url, "/v1/authorize", Some(&body)).await
                else {
                    break;
                };
                SoakBook::add(&book.reserves, 1);
                i += 1;
                if a["allowed"] != json!(true) {
                    continue;
                }
                SoakBook::add(&book.admitted, 1);
                let ev = json!({"events": [{"request_id": id, "org_id": "soak",
                    "user_id": format!("u{u}"), "api_key_id": format!("k{u}"),
                    "model": "gpt-4o", "provider": "openai", "cost_micros": c,
                    "occurred_at": tally_proto::format_rfc3339_ms(now_ms())}]})
                .to_string();
                let Some((status, v)) = soak_call(&http, &book, &url, "/v1/usage", Some(&ev)).await
                else {
                    bail!("usage of {id}: no answer a minute after the run ended");
                };
                let counted =
                    v["accepted"].as_u64().unwrap_or(0) + v["duplicates"].as_u64().unwrap_or(0);
                if status != 200 || counted != 1 {
                    bail!("usage of {id}: {status} {v}");
                }
                let _ = book.spend.fetch_add(c, Relaxed);
                SoakBook::add(&book.events, 1);
            }
            anyhow::Ok(())
        });
    }
    // Admins: the users list by spend, and a bulk limit change a second.
    for r in 0..3u64 {
        let (book, http, url) = (Arc::clone(&book), http.clone(), url.clone());
        let _ = tasks.spawn(async move {
            let mut i = 0u64;
            while !book.stopped() {
                i += 1;
                if r < 2 {
                    let Some((status, v)) = soak_call(
                        &http,
                        &book,
                        &url,
                        "/v1/orgs/soak/users?sort=-spend&limit=50",
                        None,
                    )
                    .await
                    else {
                        break;
                    };
                    if status != 200 {
                        bail!("listing users: {status} {v}");
                    }
                    SoakBook::add(&book.reads, 1);
                    continue;
                }
                let ids: Vec<String> = (0..10)
                    .map(|k| format!("u{}", (i * 10 + k) % u64::from(users)))
                    .collect();
                let limit = 50_000_000 * (1 + i64::try_from(i % 20).unwrap_or(0));
                let body = json!({"user_ids": ids, "monthly_limit_micros": limit}).to_string();
                let Some((status, v)) =
                    soak_call(&http, &book, &url, "/v1/orgs/soak/users/bulk", Some(&body)).await
                else {
                    break;
                };
                if status != 200 {
                    bail!("bulk change: {status} {v}");
                }
                SoakBook::add(&book.bulk, 1);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            anyhow::Ok(())
        });
    }
    let probing = Instant::now();
    post_closed_loop(&server, "soak", warm, measured, batch, users, clients).await?;
    let probed = probing.elapsed();
    let probe = warm + measured;
    let _ = book
        .spend
        .fetch_add(expected_spend(warm, measured), Relaxed);
    SoakBook::add(&book.events, measured);
    let max_per_s = u128::from(measured) * 1_000 / probed.as_millis().max(1);
    let target_per_s = u64::try_from(max_per_s / 2).unwrap_or(u64::MAX).max(batch);
    println!(
        "soak: {secs} s embedded, {users} users; ingest paced at {target_per_s} events/s (half of \
         {max_per_s} measured under the rest of the load; open loop), 8 authorize workers with \
         holds, 2 admin readers, a bulk limit change a second; kill -9 and restart every \
         {kill_every} s; dedupe window {DEDUPE_IDS} ids"
    );
    // Ingest, open loop: a batch leaves every `every` whether or not the
    // earlier ones were answered (at most `INGEST_IN_FLIGHT_MAX` batches in
    // flight; a batch that finds them all busy leaves late, and the pace
    // starts again from then rather than bursting to catch up).
    let every = Duration::from_micros(1_000_000 * batch / target_per_s.max(1));
    {
        let (book, http, url) = (Arc::clone(&book), http.clone(), url.clone());
        let _ = tasks.spawn(async move {
            let in_flight = Arc::new(tokio::sync::Semaphore::new(INGEST_IN_FLIGHT_MAX));
            let mut batches = tokio::task::JoinSet::new();
            let mut next = tokio::time::Instant::now();
            let mut b = 0u64;
            while !book.stopped() {
                tokio::time::sleep_until(next).await;
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                    break;
                };
                let now = tokio::time::Instant::now();
                if now > next + every {
                    SoakBook::add(&book.late, 1);
                    next = now;
                }
                next += every;
                let first = probe + b * batch;
                b += 1;
                let (book, http, url) = (Arc::clone(&book), http.clone(), url.clone());
                let _ = batches.spawn(async move {
                    let _permit = permit;
                    let body = usage_body("soak", first, batch, users, now_ms() - 1_000);
                    let Some((status, v)) =
                        soak_call(&http, &book, &url, "/v1/usage", Some(&body)).await
                    else {
                        bail!("usage batch at {first}: no answer a minute after the run ended");
                    };
                    let counted =
                        v["accepted"].as_u64().unwrap_or(0) + v["duplicates"].as_u64().unwrap_or(0);
                    if status != 200 || counted != batch {
                        bail!("usage batch at {first}: {status} {v}");
                    }
                    let _ = book.spend.fetch_add(expected_spend(first, batch), Relaxed);
                    SoakBook::add(&book.ingested, batch);
                    SoakBook::add(&book.events, batch);
                    anyhow::Ok(())
                });
                while let Some(done) = batches.try_join_next() {
                    done??;
                }
            }
            while let Some(done) = batches.join_next().await {
                done??;
            }
            anyhow::Ok(())
        });
    }
    // The clock: kills, restarts, memory. Memory is judged in the
    // incarnations that began past the run's warm-up (the dedupe window,
    // over its cap, keeps one to two minutes of ids: it is full after two),
    // after their own first seconds, by each one's median sample (its
    // peak is one sample, of a transient such as a checkpoint's batch).
    let run_warmup = Duration::from_secs(SOAK_WINDOW_FULL_SECS);
    let started = Instant::now();
    let mut incarnation = 0u32;
    let mut born = Instant::now();
    let mut born_warm = false;
    // Per incarnation: the resident KiB of each sample judged.
    let mut lives: Vec<Vec<u64>> = vec![Vec::new()];
    let mut recoveries: Vec<u128> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(server.child.id());
        if born_warm && born.elapsed() >= Duration::from_secs(warmup) {
            lives.last_mut().expect("one per incarnation").push(rss);
        }
        if born.elapsed() >= Duration::from_secs(kill_every)
            && started.elapsed() + Duration::from_secs(5) < Duration::from_secs(secs)
        {
            server.child.kill()?;
            let _ = server.child.wait()?;
            incarnation += 1;
            lives.push(Vec::new());
            let down = Instant::now();
            server = Server::start_on(dir, &format!("soak-{incarnation}"), &listen, &serve)?;
            server.ready().await?;
            recoveries.push(down.elapsed().as_millis());
            born = Instant::now();
            born_warm = started.elapsed() >= run_warmup;
        }
    }
    book.stop.store(true, Relaxed);
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let ingest_secs = started.elapsed().as_secs().max(1);
    // Every acknowledged call counted once, after a clean restart too.
    server.stop()?;
    let server = Server::start_on(dir, "soak-end", &listen, &serve)?;
    server.ready().await?;
    let got = spend(&server, "soak").await?;
    let want = book.spend.load(Relaxed);
    if got != want {
        bail!("soak: spend {got} != {want}, the acknowledged usage's");
    }
    let elapsed = started.elapsed();
    println!(
        "soak: totals exact: spend {got} µ$ = the {} acknowledged events' ({} reserves, {} \
         admitted; {} user list reads, {} bulk changes; {} calls asked again while the server \
         was away) in {} s",
        book.events.load(Relaxed),
        book.reserves.load(Relaxed),
        book.admitted.load(Relaxed),
        book.reads.load(Relaxed),
        book.bulk.load(Relaxed),
        book.retries.load(Relaxed),
        elapsed.as_secs()
    );
    println!(
        "soak: {} kills -9, restart to ready {} ms (each)",
        recoveries.len(),
        recoveries
            .iter()
            .map(u128::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "soak: ingest reached {} events/s of the {target_per_s} paced ({} batches left late, every \
         one of {INGEST_IN_FLIGHT_MAX} in flight unanswered)",
        book.ingested.load(Relaxed) / ingest_secs,
        book.late.load(Relaxed)
    );
    // (run, median, peak) of each run judged.
    let judged: Vec<(usize, u64, u64)> = lives
        .iter_mut()
        .enumerate()
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(i, samples)| {
            samples.sort_unstable();
            (i, samples[samples.len() / 2], samples[samples.len() - 1])
        })
        .collect();
    for (i, median, peak) in &judged {
        println!(
            "soak: memory of run {i}: median {} MiB, peak {} MiB",
            median / 1024,
            peak / 1024
        );
    }
    // Per mille, in integers: how far the highest is above the lowest.
    let spread = |of: &dyn Fn(&(usize, u64, u64)) -> u64| {
        let (low, high) = judged
            .iter()
            .map(of)
            .fold((u64::MAX, 0), |(l, h), v| (l.min(v), h.max(v)));
        (low, high, high * 1_000 / low.max(1) - 1_000)
    };
    match judged.len() {
        2.. => {
            let (low, high, pm) = spread(&|r| r.1);
            let (_, _, peaks_pm) = spread(&|r| r.2);
            println!(
                "soak: memory of the runs begun after {} s of warm-up: medians of {} runs {}–{} \
                 MiB, within {}.{} % ({}); peaks within {}.{} %",
                run_warmup.as_secs(),
                judged.len(),
                low / 1024,
                high / 1024,
                pm / 10,
                pm % 10,
                if pm <= 100 {
                    "flat"
                } else {
                    "NOT flat: over 10 %"
                },
                peaks_pm / 10,
                peaks_pm % 10
            );
        }
        _ => println!(
            "soak: memory not judged: fewer than two runs began after the warm-up ({} s, the \
             dedupe window filling)",
            run_warmup.as_secs()
        ),
    }
    server.stop()
}

/// (f) The console at scale: an org of `users` members in `groups` groups,
/// each with spend this month (usage over HTTP, the real path), and its
/// pages rendered by a real `tally serve`: p50 and p99 of a whole page
/// (session check, every query, the HTML) over loopback, on SQLite and,
/// with --database-url, on PostgreSQL (a database of its own, dropped
/// after).
async fn console(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let scale = if args.quick {
        (2_000u32, 20u32, 20usize)
    } else {
        (100_000, 1_000, 200)
    };
    let data = dir.display().to_string();
    let sqlite = format!("sqlite://{}?mode=rwc", dir.join("tally.db").display());
    console_on(dir, "sqlite", &sqlite, &["--data-dir", &data], scale).await?;
    let Some(url) = &args.database_url else {
        println!("console: postgres skipped (give --database-url)");
        return Ok(());
    };
    on_fresh_postgres(url, "console", async |pg| {
        console_on(dir, "postgres", pg, &["--database-url", pg], scale).await
    })
    .await
}

/// Runs `f` on a database of its own on the server of `url`, dropped after.
async fn on_fresh_postgres(
    url: &str,
    what: &str,
    f: impl AsyncFnOnce(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (base, name) = url
        .rsplit_once('/')
        .context("--database-url ends in /<database>")?;
    let fresh = format!(
        "{}_{what}_{}",
        name.split('?').next().unwrap_or(name),
        std::process::id()
    );
    let server = Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(url.to_owned())
    })
    .await?;
    let _ = server
        .execute_raw(&format!("CREATE DATABASE \"{fresh}\""))
        .await?;
    let pg = format!("{base}/{fresh}");
    let result = f(&pg).await;
    let _ = server
        .execute_raw(&format!("DROP DATABASE IF EXISTS \"{fresh}\""))
        .await;
    server.close().await;
    result
}

/// The usage report of an org of `users` members in `groups` groups whose
/// members used `models` models over the whole of last month (rows seeded
/// as checkpoints write them) and today (real usage over HTTP).
async fn usage_report(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let scale = if args.quick {
        (2_000u32, 20u32, 10u32, 20usize)
    } else {
        (100_000, 1_000, 50, 200)
    };
    let data = dir.display().to_string();
    let sqlite = format!("sqlite://{}?mode=rwc", dir.join("tally.db").display());
    usage_on(dir, "sqlite", &sqlite, &["--data-dir", &data], scale).await?;
    let Some(url) = &args.database_url else {
        println!("usage: postgres skipped (give --database-url)");
        return Ok(());
    };
    on_fresh_postgres(url, "usage", async |pg| {
        usage_on(dir, "postgres", pg, &["--database-url", pg], scale).await
    })
    .await
}

/// Writes `usage_daily` rows for every day of `month`: member u uses two
/// of the `models` on one day in three (as a checkpoint would have written
/// them: the member's rows, their group's and the org's, summed).
async fn seed_usage_month(
    db_url: &str,
    org: &str,
    (users, groups, models): (u32, u32, u32),
    month: tally_core::time::Month,
) -> anyhow::Result<u64> {
    use std::collections::HashMap;
    let db = Db::open(&DbOptions::new(db_url.to_owned())).await?;
    let mut rows: Vec<String> = Vec::new();
    let mut written = 0u64;
    let flush = async |rows: &mut Vec<String>| -> anyhow::Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len() as u64;
        let _ = db
            .execute_raw(&format!(
                "INSERT INTO usage_daily (org_id, kind, subject_id, day, model, provider, \
                 spend_micros, requests, input_tokens, output_tokens) VALUES {}",
                rows.join(",")
            ))
            .await?;
        rows.clear();
        Ok(n)
    };
    let row = |kind: &str, id: &str, day: u32, model: u32, s: (i64, i64)| {
        format!(
            "('{org}','{kind}','{id}',{day},'model-{model:02}','provider-{}',{},{},{},{})",
            model % 7,
            s.0,
            s.1,
            s.1 * 1_200,
            s.1 * 300
        )
    };
    let mut d = month.first_day();
    while d.month() == month {
        let day = d.yyyymmdd();
        let mut by_group: HashMap<(u32, u32), (i64, i64)> = HashMap::new();
        let mut by_org: HashMap<u32, (i64, i64)> = HashMap::new();
        for u in (0..users).filter(|u| (u + day).is_multiple_of(3)) {
            let (a, b) = (u % models, (u * 7 + day) % models);
            for model in if a == b { vec![a] } else { vec![a, b] } {
                let s = (member_cost(u) / 90, 3);
                rows.push(row("user", &format!("u{u:06}"), day, model, s));
                let g = by_group.entry((u % groups, model)).or_default();
                g.0 += s.0;
                g.1 += s.1;
                let o = by_org.entry(model).or_default();
                o.0 += s.0;
                o.1 += s.1;
                if rows.len() >= 500 {
                    written += flush(&mut rows).await?;
                }
            }
        }
        for ((g, m), s) in by_group {
            rows.push(row("group", &format!("g{g}"), day, m, s));
            if rows.len() >= 500 {
                written += flush(&mut rows).await?;
            }
        }
        for (m, s) in by_org {
            rows.push(row("org", org, day, m, s));
        }
        written += flush(&mut rows).await?;
        d = d.next();
    }
    db.close().await;
    Ok(written)
}

async fn usage_on(
    dir: &Path,
    name: &str,
    db_url: &str,
    serve: &[&str],
    (users, groups, models, reads): (u32, u32, u32, usize),
) -> anyhow::Result<()> {
    let org = "big";
    let seeded = Instant::now();
    seed_members(db_url, org, users, groups).await?;
    let last = tally_core::time::Month::from_unix_ms(now_ms()).prev();
    let rows = seed_usage_month(db_url, org, (users, groups, models), last).await?;
    let s = Server::start(dir, &format!("usage-{name}"), serve)?;
    s.ready().await?;
    // Today's usage, over HTTP: one call per member, the models in turn.
    spend_once_each(&s, db_url, org, users, "t", |u| {
        (
            format!("model-{:02}", u % models),
            format!("provider-{}", u % models % 7),
        )
    })
    .await?;
    println!(
        "usage: {name}, {users} users in {groups} groups, {models} models, {rows} rows for {last} \
         (seeded in {} ms)",
        seeded.elapsed().as_millis()
    );
    let base = format!("/v1/orgs/{org}/usage");
    // The top members read every member's rows of the month (seconds at
    // 100 000 members): a tenth of the reads.
    let queries: [(&str, String, usize); 5] = [
        (
            "last month by model",
            format!("{base}?from={last}&to={last}&group_by=model"),
            reads,
        ),
        (
            "last month by day",
            format!("{base}?from={last}&to={last}"),
            reads,
        ),
        (
            "this month by model",
            format!("{base}?group_by=model"),
            reads,
        ),
        (
            "one member last month by model",
            format!("{base}?from={last}&to={last}&user=u000042&group_by=model"),
            reads,
        ),
        (
            "last month, the top 10 members",
            format!("{base}?from={last}&to={last}&group_by=user"),
            (reads / 10).max(2),
        ),
    ];
    for (label, path, reads) in queries {
        let mut took = Vec::with_capacity(reads);
        for _ in 0..reads {
            let t = Instant::now();
            let v = s.call("GET", &path, None).await?;
            took.push(t.elapsed());
            if v["totals"]["requests"].as_i64().unwrap_or(0) == 0 {
                bail!("{label}: no usage in {v}");
            }
        }
        took.sort();
        let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
        let ms = |d: Duration| format!("{}.{:02}", d.as_millis(), d.as_micros() % 1000 / 10);
        println!(
            "usage {name}: {label}: p50 {} ms, p99 {} ms ({reads} reads)",
            ms(pct(50)),
            ms(pct(99)),
        );
    }
    s.stop()
}

/// Appends an org of `users` members in `groups` groups (member u in group
/// u % groups) straight to the entity log, as commands would.
async fn seed_members(db_url: &str, org: &str, users: u32, groups: u32) -> anyhow::Result<()> {
    use tally_core::entity::{Actor, Command, EntityEvent, EventKind, OrgDirectory, handle_create};
    use tally_core::ids::{GroupId, OrgId, UserId};
    let db = Db::open(&DbOptions::new(db_url.to_owned())).await?;
    let org_id = OrgId::new(org)?;
    let at_ms = now_ms();
    let wrap = |after: u64, kinds: Vec<EventKind>| -> Vec<EntityEvent> {
        kinds
            .into_iter()
            .zip(after + 1..)
            .map(|(kind, seq)| EntityEvent {
                org_id: org_id.clone(),
                seq,
                at_ms,
                actor: Actor::Operator,
                kind,
            })
            .collect()
    };
    let created = wrap(
        0,
        handle_create(
            false,
            &org_id,
            &Command::CreateOrg {
                name: "Console bench".into(),
                default_monthly_limit_micros: Some(100_000_000),
                alert_thresholds_bps: Some(vec![5_000, 8_000, 10_000]),
                monthly_limit_micros: None,
            },
        )?,
    );
    let mut dir = OrgDirectory::from_created(&created[0]);
    for e in &created[1..] {
        dir.apply(e);
    }
    let mut pending = created;
    let stage = async |dir: &mut OrgDirectory, cmd: Command, pending: &mut Vec<EntityEvent>| {
        let events = wrap(dir.seq, dir.handle(&cmd)?);
        for e in &events {
            dir.apply(e);
        }
        pending.extend(events);
        if pending.len() >= 20_000 {
            db.append(&mut std::mem::take(pending)).await?;
        }
        anyhow::Ok(())
    };
    for g in 0..groups {
        stage(
            &mut dir,
            Command::CreateGroup {
                group_id: GroupId::new(&format!("g{g}"))?,
                name: format!("Group {g}"),
                monthly_limit_micros: None,
            },
            &mut pending,
        )
        .await?;
    }
    for u in 0..users {
        stage(
            &mut dir,
            Command::AddUser {
                user_id: UserId::new(&format!("u{u:06}"))?,
                email: format!("u{u}@{org}.test"),
                name: format!("User {}", (u64::from(u) * 7_919) % u64::from(users)),
                monthly_limit_micros: None,
                activate: true,
            },
            &mut pending,
        )
        .await?;
    }
    for g in 0..groups {
        let members: Vec<UserId> = (g..users)
            .step_by(groups as usize)
            .map(|u| UserId::new(&format!("u{u:06}")))
            .collect::<Result<_, _>>()?;
        for chunk in members.chunks(tally_core::entity::BULK_USERS_MAX) {
            stage(
                &mut dir,
                Command::BulkUpdateUsers {
                    user_ids: chunk.to_vec(),
                    add_groups: vec![GroupId::new(&format!("g{g}"))?],
                    remove_groups: vec![],
                    monthly_limit_micros: None,
                    reset_limit: false,
                    status: None,
                },
                &mut pending,
            )
            .await?;
        }
    }
    db.append(&mut pending).await?;
    db.close().await;
    Ok(())
}

/// Sends one call per member of `org` over HTTP (member u's costs
/// [`member_cost`] and names the model and provider `model(u)`), waits
/// until the org's spend holds them all, then analyzes the tables as
/// autovacuum (PostgreSQL) or `PRAGMA optimize` would keep them: what is
/// measured next is the steady state, not the minute after a bulk load.
async fn spend_once_each(
    s: &Server,
    db_url: &str,
    org: &str,
    users: u32,
    prefix: &str,
    model: impl Fn(u32) -> (String, String),
) -> anyhow::Result<()> {
    let batch = 1_000u32;
    let at = now_ms();
    for first in (0..users).step_by(batch as usize) {
        let events: Vec<Value> = (first..(first + batch).min(users))
            .map(|u| {
                let (model, provider) = model(u);
                json!({"request_id": format!("{prefix}{u}"), "org_id": org,
                       "user_id": format!("u{u:06}"), "model": model, "provider": provider,
                       "input_tokens": 1200, "output_tokens": 300,
                       "cost_micros": member_cost(u), "occurred_at_ms": at})
            })
            .collect();
        let _ = s
            .call("POST", "/v1/usage", Some(json!({"events": events})))
            .await?;
    }
    let want: i64 = (0..users).map(member_cost).sum();
    let deadline = Instant::now() + Duration::from_secs(600);
    while spend(s, org).await? != want {
        if Instant::now() > deadline {
            bail!("the org's spend never reached {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(db_url.to_owned())
    })
    .await?;
    db.analyze().await?;
    db.close().await;
    Ok(())
}

/// Member u's spend this month: $0 to $149.99, so some are past their
/// $100 limit and most past a threshold.
fn member_cost(u: u32) -> i64 {
    i64::from(u) * 104_729 % 150_000_000
}

async fn console_on(
    dir: &Path,
    name: &str,
    db_url: &str,
    serve: &[&str],
    (users, groups, renders): (u32, u32, usize),
) -> anyhow::Result<()> {
    let org = "big";
    let seeded = Instant::now();
    seed_members(db_url, org, users, groups).await?;
    let s = Server::start(dir, &format!("console-{name}"), serve)?;
    s.ready().await?;
    spend_once_each(&s, db_url, org, users, "c", |_| {
        ("gpt-4o".to_owned(), "openai".to_owned())
    })
    .await?;
    println!(
        "console: {name}, {users} users in {groups} groups, each with spend (seeded in {} ms)",
        seeded.elapsed().as_millis()
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let signed = http
        .post(format!("{}/console/sign-in", s.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await?;
    let cookie = signed
        .headers()
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .context("no session cookie from sign-in")?
        .to_owned();
    let base = format!("{}/console/orgs/{org}", s.url);
    let pages: [(&str, &dyn Fn(usize) -> String); 6] = [
        ("users page, by name", &|_| format!("{base}/users")),
        ("users page, by spend", &|_| {
            format!("{base}/users?sort=-spend")
        }),
        ("users page, one group by spend", &|i| {
            format!(
                "{base}/users?group=g{}&sort=-spend",
                i * 37 % groups as usize
            )
        }),
        ("users page, used at least 80 % by use", &|_| {
            format!("{base}/users?min_utilization=0.8&sort=-utilization")
        }),
        ("users page, a search", &|i| {
            format!("{base}/users?q=User+{}", i % 100)
        }),
        ("overview", &|_| base.clone()),
    ];
    for (label, url) in pages {
        let mut took = Vec::with_capacity(renders);
        for i in 0..renders {
            let t = Instant::now();
            let r = http.get(url(i)).header("cookie", &cookie).send().await?;
            let status = r.status();
            let body = r.text().await?;
            took.push(t.elapsed());
            if !status.is_success() || !body.contains("<table") {
                bail!(
                    "{label}: {status}: {}",
                    body.chars().take(500).collect::<String>()
                );
            }
        }
        // The slowest renders by their turn: a tail at the start is the
        // page's first reads, one spread out is something else running.
        let mut slowest: Vec<(Duration, usize)> = took.iter().copied().zip(0..).collect();
        slowest.sort_by(|a, b| b.cmp(a));
        let ms = |d: Duration| format!("{}.{:02}", d.as_millis(), d.as_micros() % 1000 / 10);
        let slowest = slowest
            .iter()
            .take(3)
            .map(|(d, i)| format!("#{i} {} ms", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ");
        took.sort();
        let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
        println!(
            "console {name}: {label}: p50 {} ms, p99 {} ms ({renders} renders, 50 rows; slowest {slowest})",
            ms(pct(50)),
            ms(pct(99)),
        );
    }
    s.stop()
}
