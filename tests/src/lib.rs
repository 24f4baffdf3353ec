//! Helpers for the integration suite: real `tally` processes on real
//! databases, driven over HTTP.
//!
//! The binary is `$TALLY_BIN`, or `target/debug/tally` of this workspace
//! (scripts/test.sh builds it first).

pub mod console;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tally-it-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn tally_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TALLY_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tally")
}

/// Where a test's tally keeps its state.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Backend {
    pub fn sqlite(name: &str) -> Backend {
        Backend::Sqlite(temp_dir(name))
    }

    /// A fresh database on the suite's PostgreSQL server, or `None` (with a
    /// note) when there is none and services are not required.
    pub async fn postgres(name: &str) -> anyhow::Result<Option<Backend>> {
        let Ok(admin) = std::env::var("TALLY_TEST_POSTGRES_ADMIN_URL") else {
            if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() {
                bail!("TALLY_TEST_POSTGRES_ADMIN_URL is not set: run scripts/test.sh");
            }
            eprintln!("skipped on PostgreSQL: no server (scripts/test.sh starts one)");
            return Ok(None);
        };
        let db = format!(
            "it_{name}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let server = tally_store::Db::open(&tally_store::DbOptions {
            migrate: false,
            ..tally_store::DbOptions::new(admin.clone())
        })
        .await?;
        let _ = server.execute_raw(&format!("CREATE DATABASE {db}")).await?;
        server.close().await;
        Ok(Some(Backend::Postgres(format!(
            "{}/{db}",
            admin.rsplit_once('/').expect("url").0
        ))))
    }

    /// The database's URL, for a test's own SQL (not while a serve runs).
    pub fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => {
                format!("sqlite://{}?mode=rwc", dir.join("tally.db").display())
            }
            Backend::Postgres(url) => url.clone(),
        }
    }

    /// Where `tally serve` and the maintenance commands find the state.
    pub fn args(&self) -> Vec<String> {
        match self {
            Backend::Sqlite(dir) => vec!["--data-dir".into(), dir.display().to_string()],
            Backend::Postgres(url) => vec!["--database-url".into(), url.clone()],
        }
    }

    fn log_dir(&self) -> PathBuf {
        match self {
            // Beside the data, not in it: a test may fill the data's disk.
            Backend::Sqlite(dir) => {
                let logs = PathBuf::from(format!("{}.logs", dir.display()));
                std::fs::create_dir_all(&logs).expect("log dir");
                logs
            }
            Backend::Postgres(_) => temp_dir("pglogs"),
        }
    }
}

/// A running `tally serve`.
#[derive(Debug)]
pub struct Tally {
    child: Child,
    pub url: String,
    pub log: PathBuf,
    backend: Backend,
    extra: Vec<String>,
}

impl Tally {
    pub fn start(backend: &Backend) -> anyhow::Result<Tally> {
        Tally::start_with(backend, &[])
    }

    /// Starts with extra `serve` flags and waits until it is ready.
    pub fn start_with(backend: &Backend, extra: &[&str]) -> anyhow::Result<Tally> {
        Tally::start_env(backend, extra, &[])
    }

    /// Starts with extra `serve` flags and environment variables.
    pub fn start_env(
        backend: &Backend,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Tally> {
        let log = backend.log_dir().join(format!(
            "tally-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(tally_bin())
            .arg("serve")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--operator-token",
                OPERATOR_TOKEN,
            ])
            .args(if extra.contains(&"--checkpoint-interval-ms") {
                &[][..]
            } else {
                &["--checkpoint-interval-ms", "200"][..]
            })
            .args(backend.args())
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", tally_bin().display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("tally listening on ") {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                bail!(
                    "tally did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let t = Tally {
            child,
            url,
            log,
            backend: backend.clone(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        Ok(t)
    }

    /// Stops cleanly (SIGTERM) and starts a new process on the same backend
    /// and flags.
    pub fn restart(self) -> anyhow::Result<Tally> {
        let (backend, extra) = (self.backend.clone(), self.extra.clone());
        self.stop()?;
        Tally::start_with(
            &backend,
            &extra.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    /// Kills (SIGKILL, no last checkpoint) and starts a new process on the
    /// same backend and flags.
    pub fn crash_restart(self) -> anyhow::Result<Tally> {
        let (backend, extra) = (self.backend.clone(), self.extra.clone());
        self.kill9()?;
        Tally::start_with(
            &backend,
            &extra.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("tally exited with {status}; log:\n{}", self.log_text());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("tally did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL: no chance to checkpoint.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        let _ = self.child.wait()?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self, token: &str) -> Client {
        Client {
            http: http_client(),
            url: self.url.clone(),
            token: Some(token.to_owned()),
        }
    }

    pub fn operator(&self) -> Client {
        self.client(OPERATOR_TOKEN)
    }

    pub fn anonymous(&self) -> Client {
        Client {
            http: http_client(),
            url: self.url.clone(),
            token: None,
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with a bearer token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    pub url: String,
    token: Option<String>,
}

/// Status and JSON body of a response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
}

impl Reply {
    /// The body, after checking the status.
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        self.body
    }

    /// The error code of an error reply, after checking the status.
    pub fn error(self, status: u16) -> String {
        let body = self.expect(status);
        body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {body}"))
            .to_owned()
    }
}

impl Client {
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Reply> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"));
        let bytes = resp.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else if text {
            // The metrics exposition: a string, as served.
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "non-JSON reply {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })?
        };
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None).await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, Some(body.to_string().into_bytes()))
            .await
            .expect("POST")
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.send("PATCH", path, Some(body.to_string().into_bytes()))
            .await
            .expect("PATCH")
    }

    pub async fn put(&self, path: &str) -> Reply {
        self.send("PUT", path, None).await.expect("PUT")
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send("DELETE", path, None).await.expect("DELETE")
    }

    /// The `/metrics` exposition (read with the operator token).
    pub async fn metrics(&self) -> String {
        metrics_text(&self.url).await
    }

    /// Adds `id` to `org` as an active user (email `{id}@a.test`).
    pub async fn add_active_user(&self, org: &str, id: &str) -> Value {
        self.post(
            &format!("/v1/orgs/{org}/users"),
            serde_json::json!({"id": id, "email": format!("{id}@a.test"), "name": id, "status": "active"}),
        )
        .await
        .expect(201)
    }

    /// Org acme with an active alice (whose limit is `limit_micros` when
    /// given) and her key `alice-key`; returns the key's secret.
    pub async fn acme_with_alice(&self, limit_micros: Option<i64>) -> String {
        let _ = self
            .post(
                "/v1/orgs",
                serde_json::json!({"id": "acme", "name": "Acme"}),
            )
            .await
            .expect(201);
        let _ = self.add_active_user("acme", "alice").await;
        if let Some(limit) = limit_micros {
            let _ = self
                .patch(
                    "/v1/orgs/acme/users/alice",
                    serde_json::json!({"monthly_limit_micros": limit}),
                )
                .await
                .expect(200);
        }
        let key = self
            .post(
                "/v1/orgs/acme/keys",
                serde_json::json!({"id": "alice-key", "name": "laptop", "user_id": "alice"}),
            )
            .await
            .expect(201);
        key["secret"].as_str().expect("secret").to_owned()
    }

    /// Creates group `id` of `org` (named `name`, with `limit_micros`) and
    /// adds `members` to it.
    pub async fn add_group(
        &self,
        org: &str,
        id: &str,
        name: &str,
        limit_micros: Option<i64>,
        members: &[&str],
    ) {
        let _ = self
            .post(
                &format!("/v1/orgs/{org}/groups"),
                serde_json::json!({"id": id, "name": name, "monthly_limit_micros": limit_micros}),
            )
            .await
            .expect(201);
        for u in members {
            let _ = self
                .put(&format!("/v1/orgs/{org}/groups/{id}/members/{u}"))
                .await
                .expect(200);
        }
    }

    pub async fn raw(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        self.send(method, path, Some(body.to_vec()))
            .await
            .expect("request")
    }
}

/// The stdout of a command that must have succeeded (else its output is the
/// failure's message).
pub fn succeeded(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `/metrics` exposition of the server at `url` (read with the
/// operator token).
pub async fn metrics_text(url: &str) -> String {
    http_client()
        .get(format!("{url}/metrics"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

/// Walks a JSON value and checks every `*_micros` field is an integer (or
/// null): money never travels as a float.
/// Drops the month-end projections (`projected_micros`,
/// `projected_limit_date`) from a response, for comparisons across time:
/// they move with the clock.
pub fn without_projections(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let _ = m.remove("projected_micros");
            let _ = m.remove("projected_limit_date");
            m.values_mut().for_each(without_projections);
        }
        Value::Array(a) => a.iter_mut().for_each(without_projections),
        _ => {}
    }
}

pub fn assert_money_is_integer(v: &Value) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                if k.ends_with("_micros") {
                    assert!(v.is_null() || v.is_i64(), "{k} is not an integer: {v}");
                }
                assert_money_is_integer(v);
            }
        }
        Value::Array(a) => a.iter().for_each(assert_money_is_integer),
        _ => {}
    }
}

/// The current time as RFC 3339 with milliseconds, UTC. Usage must be
/// recent for the server to take it, so tests stamp it with the real clock.
pub fn now_rfc3339() -> String {
    // The server's clock decides the month; use the same instant, to the ms.
    rfc3339(now_ms())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The start of the UTC month of `ms`, in ms.
pub fn month_start_ms(ms: i64) -> i64 {
    let t = rfc3339(ms);
    let (y, m): (i64, i64) = (t[0..4].parse().unwrap(), t[5..7].parse().unwrap());
    // days_from_civil (Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400_000
}

/// `ms` as an RFC 3339 UTC time, to the millisecond.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil_from_days (Hinnant), to stay independent of the code under test.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A Kafka-protocol broker of this test's own: the pinned Tansu, in memory.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl Broker {
    /// The broker binary, or `None` (with a note) when there is none and
    /// services are not required.
    pub fn bin() -> anyhow::Result<Option<PathBuf>> {
        match std::env::var_os("TALLY_TEST_TANSU_BIN") {
            Some(p) => Ok(Some(PathBuf::from(p))),
            None if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() => {
                bail!("TALLY_TEST_TANSU_BIN is not set: run scripts/test.sh")
            }
            None => {
                eprintln!("skipped: no Kafka broker (scripts/test.sh installs one)");
                Ok(None)
            }
        }
    }

    pub fn start() -> anyhow::Result<Option<Broker>> {
        let Some(_) = Broker::bin()? else {
            return Ok(None);
        };
        let port = free_port();
        let log = temp_dir("broker").join("broker.log");
        let mut b = Broker {
            child: None,
            port,
            log,
        };
        b.spawn()?;
        Ok(Some(b))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = Broker::bin()?.expect("checked at start");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(bin)
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            )
            .spawn()
            .context("starting the broker")?;
        self.child = Some(child);
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("the broker did not listen on {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (its in-memory data goes with it).
    pub fn kill(&mut self) {
        self.resume();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the broker (SIGSTOP): unreachable, its log kept.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} failed");
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client for tests. reqwest is built with rustls but no crypto
/// provider (see tally-webhooks); ring is installed once here.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Prometheus's `promtool`, or `None` (a skip) when it is not installed and
/// the suite does not require services.
pub fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(PathBuf::from("promtool"));
    }
    assert!(
        std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
        "promtool is missing: run scripts/test.sh"
    );
    eprintln!("skipped: no promtool (scripts/test.sh installs it)");
    None
}

/// Runs `promtool check metrics` on an exposition (its lint: help texts,
/// counter suffixes, base units): fails the test on any problem.
pub fn check_metrics(text: &str) {
    use std::io::Write;
    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("promtool reads");
    let out = child.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small tmpfs of a test's own, for filling a disk for real (the suite
/// runs as root; `mount` needs it). Unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `16m`).
    /// Fails clearly when it cannot, since the suite runs as root.
    pub fn mount(name: &str, size: &str) -> anyhow::Result<Tmpfs> {
        let dir = temp_dir(name);
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a tmpfs at {} ({}): the storage-fault tests fill a disk for \
                 real and need root, as scripts/test.sh has in CI",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs { dir })
    }

    /// Gives the file system a new size, keeping its files.
    pub fn resize(&self, size: &str) -> anyhow::Result<()> {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .status()?;
        if !status.success() {
            bail!("remounting {} failed", self.dir.display());
        }
        Ok(())
    }

    /// Fills the file system with `name` until all but `leave` bytes are
    /// taken; returns the file's path.
    pub fn fill(&self, name: &str, leave: u64) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
        f.set_len(written.saturating_sub(leave))?;
        f.sync_all()?;
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A PostgreSQL server of a test's own, so that the test can kill it: a
/// throw-away cluster from the machine's PostgreSQL 15 (`PG_BIN`, default
/// `/usr/lib/postgresql/15/bin`, as scripts/services.sh uses), run as the
/// `postgres` user when the suite runs as root. Stopped and removed on drop.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PgServer {
    /// `None` (with a note) when the binaries are missing and services are
    /// not required.
    pub fn start() -> anyhow::Result<Option<PgServer>> {
        let bin = PathBuf::from(
            std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        if !bin.join("initdb").exists() {
            if std::env::var_os("TALLY_REQUIRE_SERVICES").is_some() {
                bail!("no PostgreSQL binaries in {}", bin.display());
            }
            eprintln!("skipped: no PostgreSQL binaries in {}", bin.display());
            return Ok(None);
        }
        let dir = temp_dir("pgserver");
        let root = is_root();
        if root {
            let _ = Command::new("chown")
                .args(["postgres"])
                .arg(&dir)
                .status()?;
        }
        let pg = PgServer {
            dir,
            bin,
            port: free_port(),
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.dir.join("data"))
            .args([
                "-U",
                "tally",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        pg.pg_ctl_start()?;
        Ok(Some(pg))
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            let _ = c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.dir.display()
            ))
            .arg("start")
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!(
                "PostgreSQL did not start; log:\n{}",
                std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Runs `sql` in database `db` with psql; fails when it does.
    pub fn sql(&self, db: &str, sql: &str) -> anyhow::Result<()> {
        let out = self
            .command("psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-d"])
            .arg(self.url(db))
            .arg("-c")
            .arg(sql)
            .output()?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A URL of database `db` (`postgres` always exists).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://tally@127.0.0.1:{}/{db}", self.port)
    }

    /// SIGKILL to the postmaster and every backend: a crash, as when the
    /// machine or container of the database dies. Nothing is flushed.
    pub fn kill9(&self) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))?;
        let pid = pid.lines().next().unwrap_or_default().trim().to_owned();
        let _ = Command::new("pkill").args(["-9", "-P", &pid]).status()?;
        let _ = Command::new("kill").args(["-9", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                bail!("postmaster {pid} outlived kill -9");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts the server again after [`PgServer::kill9`] (crash recovery).
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl_start()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Distributed mode's services for one test: its own PostgreSQL and
/// broker, and the flags that point processes at them.
#[derive(Debug)]
pub struct Cluster {
    pub pg: PgServer,
    pub broker: Broker,
    pub backend: Backend,
    flags: Vec<String>,
}

impl Cluster {
    /// `None` when the suite runs without the services.
    pub fn new(partitions: &str, extra: &[&str]) -> anyhow::Result<Option<Cluster>> {
        let Some(pg) = PgServer::start()? else {
            return Ok(None);
        };
        let Some(broker) = Broker::start()? else {
            return Ok(None);
        };
        let backend = Backend::Postgres(pg.url("postgres"));
        let mut flags: Vec<String> = [
            "--kafka-brokers",
            &broker.brokers(),
            "--kafka-usage-partitions",
            partitions,
        ]
        .map(str::to_owned)
        .to_vec();
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        Ok(Some(Cluster {
            pg,
            broker,
            backend,
            flags,
        }))
    }

    /// Two processes on a one-partition usage topic, once one of them owns
    /// the partition: (owner, other).
    pub async fn owner_and_other(&self) -> anyhow::Result<(Tally, Tally)> {
        let (a, b) = (self.start()?, self.start()?);
        wait_ready(&a.operator(), Duration::from_secs(60)).await;
        wait_ready(&b.operator(), Duration::from_secs(60)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match (owned(&a).await, owned(&b).await) {
                (1, 0) => return Ok((a, b)),
                (0, 1) => return Ok((b, a)),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no single owner of the partition"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn start(&self) -> anyhow::Result<Tally> {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        Tally::start_with(&self.backend, &flags)
    }
}

/// Waits until `user`'s spend is `want_micros`; returns the user.
pub async fn wait_for_spend(op: &Client, user: &str, want_micros: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = op.get(&format!("/v1/orgs/acme/users/{user}")).await;
        if r.status == 200 && r.body["spend_micros"] == want_micros {
            return r.body;
        }
        let dead = op.get("/v1/orgs/acme/dead-letters").await;
        assert!(
            Instant::now() < deadline,
            "{user}'s spend never reached {want_micros}: {} {}; dead letters: {}",
            r.status,
            r.body,
            dead.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn wait_ready(op: &Client, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let r = op.get("/readyz").await;
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not ready within {within:?}: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `tally_partitions_owned` gauge of `t`.
pub async fn owned(t: &Tally) -> i64 {
    let text = metrics_text(&t.url).await;
    text.lines()
        .find(|l| l.starts_with("tally_partitions_owned "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
        .unwrap_or(0)
}
