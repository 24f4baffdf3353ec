//! Whether the store can write, as the last writes found it.
//!
//! A write that fails for a fault of the store itself (a full disk, an I/O
//! error, a database that went away; [`tally_store::Error::unavailable`])
//! puts the process into a storage fault: usage and commands are refused
//! with 503 before anything is counted, `/readyz` says why, the gauge
//! `tally_store_writable` is 0 and one log line names the fault. The
//! meter's periodic task probes the store ([`tally_store::Db::probe_write`])
//! and ends the fault when a write commits again; nothing else needs doing.

use std::fmt;

use crate::metrics as m;

/// The fault the store is in, if any; see the module docs.
#[derive(Debug, Default)]
pub struct StoreHealth {
    fault: parking_lot::Mutex<Option<Fault>>,
}

/// A storage fault: what failed first, why, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The write path that found it (usage_log, entity_log, checkpoint).
    pub path: &'static str,
    /// What kind of fault ([`tally_store::Error::unavailable`]).
    pub reason: &'static str,
    pub since_ms: i64,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the store cannot write ({})", self.reason)
    }
}

impl StoreHealth {
    pub fn new() -> StoreHealth {
        metrics::gauge!(m::STORE_WRITABLE).set(1.0);
        StoreHealth::default()
    }

    /// The current fault, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.fault.lock().clone()
    }

    /// Sets `tally_store_writable` again (at a scrape: a gauge not set for a
    /// minute drops out, and the alert on it with it). Under the lock, so a
    /// fault beginning meanwhile is not overwritten.
    pub fn publish(&self) {
        let fault = self.fault.lock();
        metrics::gauge!(m::STORE_WRITABLE).set(if fault.is_none() { 1.0 } else { 0.0 });
    }

    /// Records the failure of a write on `path`; returns whether it was a
    /// fault of the store (and so one the process is in now).
    pub fn write_failed(&self, path: &'static str, error: &crate::Error, now_ms: i64) -> bool {
        let Some(reason) = error.store_unavailable() else {
            return false;
        };
        metrics::counter!(m::STORE_WRITE_FAILURES, "path" => path).increment(1);
        let mut fault = self.fault.lock();
        match &*fault {
            None => {
                tracing::error!(
                    path,
                    reason,
                    %error,
                    "the store cannot write: refusing usage and commands until it can"
                );
                metrics::gauge!(m::STORE_WRITABLE).set(0.0);
                *fault = Some(Fault {
                    path,
                    reason,
                    since_ms: now_ms,
                });
            }
            Some(_) => tracing::debug!(path, %error, "the store still cannot write"),
        }
        true
    }

    /// A write committed: the fault, if any, is over.
    pub fn write_succeeded(&self, now_ms: i64) {
        let mut fault = self.fault.lock();
        if let Some(f) = fault.take() {
            tracing::info!(
                path = f.path,
                reason = f.reason,
                down_ms = now_ms.saturating_sub(f.since_ms),
                "the store writes again: accepting usage and commands"
            );
            metrics::gauge!(m::STORE_WRITABLE).set(1.0);
        }
    }
}
