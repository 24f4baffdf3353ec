//! Tally's SQL state, on SQLite (embedded, the default) or PostgreSQL
//! (distributed), through one code path: sqlx's `Any` driver runs the same
//! statements on both; only the DDL in [`schema`] differs.
//!
//! - [`log`]: the append-only entity log and the read models projected from
//!   it in the same transaction; rebuilding the read models from the log.
//! - [`usage_log`]: the embedded usage log (one row per ingest batch).
//! - [`checkpoint`]: the metering engine's checkpoint — counters, day
//!   rollups, dedupe window, enforcement events and log position — in one
//!   transaction.
//! - [`query`]: the admin read side (lists, details, history).
//! - [`recount`]: spend and usage counted again from the embedded usage
//!   log, when rebuilding the read models.
//!
//! On SQLite all writes go through one connection (SQLite has one writer
//! anyway), so writers queue in the pool instead of failing with `BUSY`.

pub mod checkpoint;
pub mod holds;
pub mod log;
pub mod query;
pub mod recount;
pub mod rollup;
mod schema;
pub mod sessions;
pub mod tokens;
mod tx;
pub mod usage_log;
pub mod webhook;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// Sets a value of the `tally_meta` table: binds the key, then the value.
pub(crate) const META_SET: &str = "INSERT INTO tally_meta (key, value) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// Another writer appended to the org's log first (same seq).
    #[error("the entity log of org {org_id} moved on concurrently")]
    Conflict { org_id: String },
    /// The partition was claimed by another owner (or the checkpoint
    /// before this one is not the one expected).
    #[error("partition {partition} is fenced: another owner claimed it")]
    Fenced { partition: i64 },
    /// The partition's checkpoint was taken from another usage log than
    /// the one being claimed for (see [`Db::claim_partition`]).
    #[error(
        "partition {partition}'s checkpoint belongs to usage log {bound}, not to {log}: this \
         database meters another log. Point the service at {bound}, or, if {log} is meant to \
         replace it, stop every tally serve and run `tally reset-usage-positions`"
    )]
    OtherLog {
        partition: i64,
        bound: String,
        log: String,
    },
    /// A well-formed request that the query cannot answer (e.g. a cursor of
    /// another sort).
    #[error("{0}")]
    Invalid(String),
    /// Publishing the entity log failed (the relay retries).
    #[error("relay: {0}")]
    Relay(String),
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Why the database could not do what was asked, when that is a fault
    /// of the database or its machine rather than of the request: a full
    /// disk, an I/O error, a server that went away or is busy. Such a write
    /// may succeed when tried again later; `None` for every other error.
    pub fn unavailable(&self) -> Option<&'static str> {
        let Error::Sql(e) = self else {
            return None;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => Some("the database is unreachable"),
            sqlx::Error::Database(d) => d.code().and_then(|c| unavailable_code(&c)),
            _ => None,
        }
    }
}

/// Classifies a database error code: PostgreSQL's are five-character
/// SQLSTATEs, SQLite's are (extended) result codes in decimal, below 10 000.
fn unavailable_code(code: &str) -> Option<&'static str> {
    if code.len() == 5 {
        return match &code[..2] {
            "53" if code == "53100" => Some("the disk is full"),
            // 57014 is a statement cancelled (a timeout): that request's
            // failure, not the database's.
            "57" if code == "57014" => None,
            "08" | "57" => Some("the database is unreachable"),
            "53" => Some("the database is out of resources"),
            "58" => Some("an I/O error"),
            "25" if code == "25006" => Some("the database is read-only"),
            // 40003: the server cannot tell whether the statement completed.
            "40" if code == "40003" => Some("the database is unreachable"),
            // The rest of class 40 (a deadlock, a serialization failure)
            // fails one transaction, not the store.
            _ => None,
        };
    }
    // The primary result code is the low byte of an extended one.
    match code.parse::<u32>().ok()? & 0xff {
        13 => Some("the disk is full"),
        10 => Some("an I/O error"),
        5 | 6 => Some("the database is busy"),
        7 => Some("out of memory"),
        8 => Some("the database is read-only"),
        14 => Some("the database file cannot be opened"),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `sqlite:///path/to/tally.db` or `postgres://user@host:port/db`.
    pub url: String,
    /// Readers (and, on PostgreSQL, writers too). Default 8.
    pub max_connections: u32,
    /// How long to wait for a connection. Default 10 s.
    pub acquire_timeout: Duration,
    /// Create or update Tally's schema on open. Default true; false only to
    /// administer a server (e.g. create a database).
    pub migrate: bool,
    /// Date entity events by the database's clock (PostgreSQL only; see
    /// [`Db::append`]): for the distributed mode, where processes read each
    /// other's changes. Default false: the caller's clock stands.
    pub dated_by_database: bool,
}

impl DbOptions {
    pub fn new(url: impl Into<String>) -> DbOptions {
        DbOptions {
            url: url.into(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            migrate: true,
            dated_by_database: false,
        }
    }
}

/// A handle on the database: cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    backend: Backend,
    /// Entity events are dated by PostgreSQL's clock.
    dated_by_database: bool,
    read: AnyPool,
    write: AnyPool,
}

impl Db {
    /// Opens (creating an SQLite file if missing) and migrates.
    pub async fn open(opts: &DbOptions) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if opts.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if opts.url.starts_with("postgres:") || opts.url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::Config(format!(
                "database url must start with sqlite: or postgres:, got {:?}",
                redact(&opts.url)
            )));
        };
        let connect = AnyConnectOptions::from_str(&opts.url)?;
        let pool = |max: u32| {
            AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(opts.acquire_timeout)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            // WAL: readers never block the writer. FULL: a
                            // commit survives power loss, since "accepted"
                            // must mean durable.
                            let _ = conn
                                .execute(
                                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                     PRAGMA busy_timeout = 10000;",
                                )
                                .await?;
                        }
                        Ok(())
                    })
                })
        };
        let write = match backend {
            Backend::Sqlite => pool(1).connect_with(connect.clone()).await?,
            Backend::Postgres => {
                pool(opts.max_connections)
                    .connect_with(connect.clone())
                    .await?
            }
        };
        let read = match backend {
            Backend::Sqlite => pool(opts.max_connections).connect_with(connect).await?,
            Backend::Postgres => write.clone(),
        };
        let db = Db {
            backend,
            dated_by_database: opts.dated_by_database && backend == Backend::Postgres,
            read,
            write,
        };
        if opts.migrate {
            db.migrate().await?;
        }
        Ok(db)
    }

    /// Whether entity events are dated by the database's clock
    /// ([`DbOptions::dated_by_database`]).
    pub fn dated_by_database(&self) -> bool {
        self.dated_by_database
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn reader(&self) -> &AnyPool {
        &self.read
    }

    pub(crate) fn writer(&self) -> &AnyPool {
        &self.write
    }

    /// `MIN(a, b)` of two integers in this backend's dialect.
    pub(crate) fn least(&self, a: &str, b: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("MIN({a}, {b})"),
            Backend::Postgres => format!("LEAST({a}, {b})"),
        }
    }

    /// Brings the schema to this version (what [`Db::open`] does unless
    /// [`DbOptions::migrate`] is off).
    pub async fn migrate(&self) -> Result<()> {
        self.migrate_to(i64::MAX).await
    }

    /// Brings the schema to `version` at most: how a test makes a database
    /// of an older release.
    #[doc(hidden)]
    pub async fn migrate_to(&self, version_max: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            // Two processes starting together must not both migrate.
            let _ = sqlx::query("SELECT pg_advisory_xact_lock(7243917)")
                .execute(&mut *tx)
                .await?;
        }
        let _ = sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tally_schema (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM tally_schema")
            .fetch_one(&mut *tx)
            .await?;
        let migrations = schema::migrations(self.backend);
        let newest = migrations.last().map_or(0, |(v, _)| *v);
        if let Some(current) = current.filter(|c| *c > newest) {
            return Err(Error::Config(format!(
                "the database's schema is version {current}, newer than this tally's \
                 ({newest}): run the release that upgraded it, or a newer one"
            )));
        }
        for (version, ddl) in migrations {
            if current.is_some_and(|c| c >= version) || version > version_max {
                continue;
            }
            tracing::info!(version, "migrating database schema");
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
                .execute(&mut *tx)
                .await?;
            let _ =
                sqlx::query("INSERT INTO tally_schema (version, applied_at_ms) VALUES ($1, $2)")
                    .bind(version)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Reads a value of the `tally_meta` table.
    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM tally_meta WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    /// Sets a value of the `tally_meta` table unless it is set already;
    /// returns the value that holds afterwards.
    pub async fn meta_init(&self, key: &str, value: &str) -> Result<String> {
        let _ = sqlx::query(
            "INSERT INTO tally_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.write)
        .await?;
        self.meta(key)
            .await?
            .ok_or_else(|| Error::Corrupt(format!("meta {key} vanished")))
    }

    /// Sets a value of the `tally_meta` table.
    pub async fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        let _ = sqlx::query(META_SET)
            .bind(key)
            .bind(value)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Writes one small row: whether the store can commit a write at all,
    /// asked while it could not.
    pub async fn probe_write(&self, now_ms: i64) -> Result<()> {
        self.meta_set("store_probe", &now_ms.to_string()).await
    }

    /// Marks this process as serving from this database for as long as
    /// the returned guard lives: a shared PostgreSQL session lock that
    /// every `tally serve` holds, so that a maintenance command rewriting
    /// what they serve ([`Db::lock_maintenance`]) refuses while one runs.
    /// `exclusive` (the embedded mode, which meters every org in one
    /// process, so a second one would overwrite its counters) also makes
    /// it the only process serving. On a connection of its own, outside
    /// the pools. (SQLite is guarded by a file lock beside the database.)
    pub async fn lock_serving(&self, exclusive: bool) -> Result<Option<SessionLock>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let mut conn = self.lock_connection(SERVE_LOCK_NAME).await?;
        let serving: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock_shared($1)")
            .bind(MAINTENANCE_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if !serving {
            return Err(Error::Config(format!(
                "a maintenance command (tally rebuild-projections or reset-usage-positions) is \
                 running on this database: serve once it has finished{}",
                lock_holders(&mut conn).await
            )));
        }
        if exclusive {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(EMBEDDED_LOCK)
                .fetch_one(&mut conn)
                .await?;
            if !locked {
                return Err(Error::Config(format!(
                    "another tally serve without Kafka uses this database; run one, or give \
                     every process --kafka-brokers{}",
                    lock_holders(&mut conn).await
                )));
            }
        }
        Ok(Some(SessionLock::new(conn, 1 + i64::from(exclusive)).await))
    }

    /// A connection of its own, outside the pools, for a session lock:
    /// named `name` in `pg_stat_activity`, so that an operator can tell
    /// who holds it.
    async fn lock_connection(&self, name: &str) -> Result<sqlx::AnyConnection> {
        let mut conn = self.write.acquire().await?.detach();
        let _ = sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(name)
            .execute(&mut conn)
            .await?;
        Ok(conn)
    }

    /// Makes this process the only one using this database, for a
    /// maintenance command: refused while any `tally serve` uses it (see
    /// [`Db::lock_serving`]). SQLite is guarded by the file lock instead.
    pub async fn lock_maintenance(&self) -> Result<Option<SessionLock>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let mut conn = self.lock_connection(MAINTENANCE_LOCK_NAME).await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1) AND pg_try_advisory_lock($2)")
                .bind(MAINTENANCE_LOCK)
                // An embedded serve holds this one alone (one of before the shared
                // lock only this one).
                .bind(EMBEDDED_LOCK)
                .fetch_one(&mut conn)
                .await?;
        if !locked {
            return Err(Error::Config(format!(
                "a tally serve (or another maintenance command) is using this database: stop \
                 every tally serve on it first (this command rewrites what they serve){}",
                lock_holders(&mut conn).await
            )));
        }
        Ok(Some(SessionLock::new(conn, 2).await))
    }

    /// Ends the server process of a lock [`SessionLock::held`] found lost,
    /// should it still run (a half-open connection keeps its locks until
    /// the server notices): only that process, by its pid and start time.
    pub async fn end_lost_lock(&self, lock: SessionLock) -> Result<()> {
        let Some((pid, started)) = lock.backend else {
            return Ok(());
        };
        drop(lock.conn);
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = $1 AND backend_start::text = $2",
        )
        .bind(pid)
        .bind(started)
        .fetch_all(&self.write)
        .await?;
        Ok(())
    }

    /// Refreshes the query planner's statistics (after a bulk load; on
    /// PostgreSQL autovacuum does it within a minute or so anyway).
    pub async fn analyze(&self) -> Result<()> {
        let sql = match self.backend {
            Backend::Sqlite => "PRAGMA optimize",
            Backend::Postgres => "ANALYZE",
        };
        let _ = sqlx::raw_sql(sql).execute(&self.write).await?;
        Ok(())
    }

    /// Runs one statement as written, for tools and tests (creating a
    /// database, checking that the log refuses edits). Never called with
    /// request data.
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    /// Runs one query of a single BIGINT column, as written, for tools and
    /// tests (never with request data).
    #[doc(hidden)]
    pub async fn query_i64(&self, sql: &str) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_all(&self.read)
            .await?)
    }

    /// Runs one query of a single text column, as written, for tools and
    /// tests (never with request data).
    #[doc(hidden)]
    pub async fn query_text(&self, sql: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_all(&self.read)
            .await?)
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// Holds a session lock of [`Db::lock_serving`] or [`Db::lock_maintenance`]
/// on a connection outside the pools: dropping it closes the connection,
/// which ends the lock.
#[derive(Debug)]
pub struct SessionLock {
    conn: sqlx::AnyConnection,
    /// How many advisory locks it holds.
    locks: i64,
    /// Its server process: (pid, start time as text), to end it by.
    backend: Option<(i64, String)>,
}

impl SessionLock {
    async fn new(mut conn: sqlx::AnyConnection, locks: i64) -> SessionLock {
        let backend = sqlx::query_as::<_, (i64, String)>(
            "SELECT pid::bigint, backend_start::text FROM pg_stat_activity \
             WHERE pid = pg_backend_pid()",
        )
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten();
        SessionLock {
            conn,
            locks,
            backend,
        }
    }

    /// Whether its connection still holds its locks: false once the
    /// connection went away (a database restart, a dropped connection, an
    /// operator's `pg_terminate_backend`), which ended them.
    pub async fn held(&mut self) -> bool {
        let held: std::result::Result<i64, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND pid = pg_backend_pid() AND classid = 0 AND objsubid = 1 \
             AND objid IN ({EMBEDDED_LOCK}, {MAINTENANCE_LOCK})"
        )))
        .fetch_one(&mut self.conn)
        .await;
        held.is_ok_and(|n| n >= self.locks)
    }

    /// Ends the lock before it returns (a dropped one ends when the server
    /// notices its connection closed, a moment later).
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.conn)
            .await;
        let _ = sqlx::Connection::close(self.conn).await;
    }
}

/// What a serve's and a maintenance command's lock connections are named
/// in `pg_stat_activity.application_name` (docs/operations.md).
pub const SERVE_LOCK_NAME: &str = "tally serve (state lock)";
pub const MAINTENANCE_LOCK_NAME: &str = "tally maintenance (state lock)";

/// Who else holds the state locks, for a refusal: "; held by pid 4711
/// (tally serve (state lock), 10.0.0.5, since …)…", and how to end a stale
/// one. Empty when it cannot be read.
async fn lock_holders(conn: &mut sqlx::AnyConnection) -> String {
    let rows = sqlx::query_as::<_, (i64, String, String, String)>(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT a.pid::bigint AS pid, COALESCE(a.application_name, '') AS name, \
         COALESCE(host(a.client_addr), 'unknown address') AS addr, \
         to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS since \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objsubid = 1 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.objid IN ({EMBEDDED_LOCK}, {MAINTENANCE_LOCK}) AND l.pid <> pg_backend_pid() \
         ORDER BY 1 LIMIT 20"
    )))
    .fetch_all(conn)
    .await;
    let Ok(rows) = rows else {
        return String::new();
    };
    let holders: Vec<String> = rows
        .into_iter()
        .map(|(pid, name, addr, since)| format!("pid {pid} ({name}, {addr}, since {since})"))
        .collect();
    if holders.is_empty() {
        return String::new();
    }
    format!(
        "; held by {}. A holder whose process is gone can be ended with SELECT \
         pg_terminate_backend(pid)",
        holders.join(", ")
    )
}

/// The session lock that every embedded `tally serve` on a PostgreSQL
/// database holds alone.
const EMBEDDED_LOCK: i64 = 7_243_919;
/// The session lock that every `tally serve` holds shared and a
/// maintenance command alone.
const MAINTENANCE_LOCK: i64 = 7_243_921;

/// The lock file that keeps maintenance commands and serves of an SQLite
/// database apart: `tally.lock` beside `tally.db` (the file named by the
/// URL, as SQLite opens it, with the extension `lock`). `None` for another
/// backend, an in-memory database, or a URL that names no file.
pub fn sqlite_lock_path(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr as _;
    if !url.starts_with("sqlite:") || url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let file = opts.get_filename();
    if file.as_os_str().is_empty() {
        return None;
    }
    let lock = file.with_extension("lock");
    // A database named `*.lock` is its own lock file: one more extension.
    Some(if lock == file {
        file.with_extension("lock.lock")
    } else {
        lock
    })
}

/// `$first, $first+1, …`: `n` numbered placeholders for a statement's
/// list of bound values.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Wall-clock milliseconds, for bookkeeping columns only (never for domain
/// decisions: those take their time as an input).
pub(crate) fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// SQLite returns integers; booleans are stored as 0/1.
pub(crate) fn flag(v: i64) -> bool {
    v != 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn faults_of_the_database_are_told_from_faults_of_the_request() {
        use super::unavailable_code as c;
        assert_eq!(c("13"), Some("the disk is full")); // SQLITE_FULL
        assert_eq!(c("778"), Some("an I/O error")); // SQLITE_IOERR_WRITE
        assert_eq!(c("5"), Some("the database is busy"));
        assert_eq!(c("2067"), None); // SQLITE_CONSTRAINT_UNIQUE
        assert_eq!(c("53100"), Some("the disk is full"));
        assert_eq!(c("57P01"), Some("the database is unreachable")); // admin_shutdown
        assert_eq!(c("08006"), Some("the database is unreachable"));
        assert_eq!(c("23505"), None); // unique_violation
        assert_eq!(c("40P01"), None); // deadlock_detected
        assert_eq!(c("57014"), None); // query_canceled
        assert_eq!(c("P0001"), None); // raise_exception
        assert_eq!(c("garbage"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(super::redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}

#[cfg(test)]
mod lock_path_tests {
    use super::sqlite_lock_path;
    use std::path::PathBuf;

    #[test]
    fn the_lock_file_is_the_one_sqlite_opens_with_the_extension_lock() {
        let lock = |url: &str| sqlite_lock_path(url);
        assert_eq!(
            lock("sqlite:///srv/tally-data/tally.db?mode=rwc"),
            Some(PathBuf::from("/srv/tally-data/tally.lock"))
        );
        // Escapes are decoded, as SQLite opens the file.
        assert_eq!(
            lock("sqlite:///srv/my%20data/t.db"),
            Some(PathBuf::from("/srv/my data/t.lock"))
        );
        assert_eq!(lock("sqlite://rel/t.db"), Some(PathBuf::from("rel/t.lock")));
        // Never the database itself.
        assert_eq!(
            lock("sqlite:///srv/x.lock"),
            Some(PathBuf::from("/srv/x.lock.lock"))
        );
        assert_eq!(lock("sqlite::memory:"), None);
        assert_eq!(lock("sqlite:///srv/t.db?mode=memory"), None);
        assert_eq!(lock("postgres://tally@db/tally"), None);
    }
}
