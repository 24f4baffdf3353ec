//! Write transactions that end for certain.
//!
//! Every write transaction of the store is a [`WriteTx`]: `BEGIN` on a
//! connection of the write pool, `COMMIT` on success, and on anything else —
//! an error on the way, a failed `COMMIT`, a future dropped halfway — the
//! connection is closed rather than handed back to the pool. Closing ends
//! whatever transaction the connection was in (the database rolls it back),
//! so the next write starts on a connection in a known state.
//!
//! Why not sqlx's `Transaction`: it keeps its own count of how deep a
//! connection is in transactions and lowers it only when its `ROLLBACK`
//! succeeds. SQLite rolls a transaction back by itself when its `COMMIT`
//! fails with a full disk or an I/O error; sqlx's `ROLLBACK` then fails ("no
//! transaction is active"), the count stays at one, every later `begin()`
//! became a `SAVEPOINT`, and the first one rolled back (`ROLLBACK TO`) left
//! the connection inside a transaction that never committed again, while
//! every write on it reported success. A connection whose transaction state
//! is in doubt is worth less than opening a new one.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};

use crate::{Backend, Db, Result};

/// An open write transaction; see the module docs.
#[derive(Debug)]
pub(crate) struct WriteTx {
    /// `None` once ended (committed or rolled back).
    conn: Option<PoolConnection<Any>>,
}

impl Db {
    /// Begins a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so it never fails halfway for want of it.
    pub(crate) async fn begin_write(&self) -> Result<WriteTx> {
        // In the WriteTx before BEGIN: if this future is dropped while BEGIN
        // runs, the connection is closed, not pooled inside a transaction.
        let mut tx = WriteTx {
            conn: Some(self.writer().acquire().await?),
        };
        let begin = match self.backend() {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        let _ = sqlx::raw_sql(begin).execute(&mut *tx).await?;
        Ok(tx)
    }
}

impl WriteTx {
    /// Commits. Returns only once the database said the commit succeeded; on
    /// any error the connection is closed, taking the transaction with it.
    pub(crate) async fn commit(self) -> Result<()> {
        self.end("COMMIT").await
    }

    /// Rolls back, for a transaction that ends early without an error (it
    /// found nothing to do): the connection goes back to the pool once the
    /// database confirmed the rollback, and is closed otherwise.
    pub(crate) async fn rollback(self) -> Result<()> {
        self.end("ROLLBACK").await
    }

    async fn end(mut self, statement: &'static str) -> Result<()> {
        // The connection stays in `self` until the database answered: a drop
        // in between closes it (see Drop).
        match sqlx::raw_sql(statement).execute(&mut *self).await {
            Ok(_) => {
                // Ended: the connection may be used again.
                drop(self.conn.take());
                Ok(())
            }
            Err(e) => {
                // Whatever state the transaction is in now (rolled back by
                // the database, or still open), closing ends it.
                if let Some(conn) = self.conn.take() {
                    let _ = conn.close().await;
                }
                Err(e.into())
            }
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.conn {
            // Not ended: an error on the way, or the future was dropped.
            conn.close_on_drop();
        }
    }
}

impl Deref for WriteTx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        self.conn
            .as_deref()
            .expect("a WriteTx is open until it ends")
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn
            .as_deref_mut()
            .expect("a WriteTx is open until it ends")
    }
}
