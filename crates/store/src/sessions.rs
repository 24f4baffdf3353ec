//! The console's sessions: a token exchanged for a cookie at sign-in.
//!
//! A row holds the cookie's hash (never the cookie), the token's hash (the
//! session is worth what the token is: revoked, it closes the session), a
//! CSRF token its forms carry, and when it expires. Rows live in the
//! database so every process of a deployment honours a sign-out.

use sqlx::Row;

use crate::{Db, Result};

/// A live session, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub token_hash: [u8; 32],
    pub csrf: String,
    pub expires_at_ms: i64,
}

/// What opening a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Yes,
    /// `live_max` sessions are live: none is opened.
    Full,
}

impl Db {
    /// Opens a session unless `live_max` are live; expired ones are
    /// deleted first, and the token's oldest beyond `per_token_max - 1`
    /// (so no token can fill the table for everyone).
    #[allow(clippy::too_many_arguments)]
    pub async fn open_session(
        &self,
        id_hash: &[u8; 32],
        token_hash: &[u8; 32],
        csrf: &str,
        now_ms: i64,
        expires_at_ms: i64,
        live_max: i64,
        per_token_max: usize,
    ) -> Result<Opened> {
        let mut tx = self.begin_write().await?;
        let _ = sqlx::query("DELETE FROM console_sessions WHERE expires_at_ms <= $1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let own: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT id_hash FROM console_sessions WHERE token_hash = $1 \
             ORDER BY created_at_ms DESC, id_hash",
        )
        .bind(&token_hash[..])
        .fetch_all(&mut *tx)
        .await?;
        for old in own.iter().skip(per_token_max.saturating_sub(1)) {
            let _ = sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
                .bind(old.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM console_sessions")
            .fetch_one(&mut *tx)
            .await?;
        if live >= live_max {
            tx.commit().await?;
            return Ok(Opened::Full);
        }
        let _ = sqlx::query(
            "INSERT INTO console_sessions (id_hash, token_hash, csrf, created_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id_hash[..])
        .bind(&token_hash[..])
        .bind(csrf)
        .bind(now_ms)
        .bind(expires_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Opened::Yes)
    }

    /// The session whose cookie hashes to `id_hash`, unless expired.
    pub async fn session(&self, id_hash: &[u8; 32], now_ms: i64) -> Result<Option<SessionRow>> {
        let row = sqlx::query(
            "SELECT token_hash, csrf, expires_at_ms FROM console_sessions \
             WHERE id_hash = $1 AND expires_at_ms > $2",
        )
        .bind(&id_hash[..])
        .bind(now_ms)
        .fetch_optional(&self.read)
        .await?;
        row.map(|r| {
            let hash: Vec<u8> = r.try_get("token_hash")?;
            Ok(SessionRow {
                token_hash: hash.try_into().map_err(|_| {
                    crate::Error::Corrupt("a session's token hash is not 32 bytes".into())
                })?,
                csrf: r.try_get("csrf")?,
                expires_at_ms: r.try_get("expires_at_ms")?,
            })
        })
        .transpose()
    }

    /// Closes a session (signing out); closing one already gone is no error.
    pub async fn close_session(&self, id_hash: &[u8; 32]) -> Result<()> {
        let _ = sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(&id_hash[..])
            .execute(&self.write)
            .await?;
        Ok(())
    }
}
