//! Bearer tokens: who is calling, and with which role.
//!
//! - the operator token (from the configuration): everything;
//! - an org's tokens (its entity log): `admin`, `viewer`, or `gateway`
//!   bound to that org;
//! - gateway tokens for every org (`gateway_tokens`, the operator's).
//!
//! Revocation holds from the next request on every process. One process
//! (embedded) knows every change as it makes it. Several processes
//! (distributed) share the database: before an org token is trusted, the
//! org's log head is read and anything newer folded in; a gateway token of
//! every org is read from its table. One indexed read per request, on the
//! database every request of that mode depends on already.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use tally_core::entity::{CommandError, Role};
use tally_core::ids::{OrgId, TokenId};
use tally_core::secret::{SecretHash, ct_eq, hash_secret};
use tally_store::tokens::{CreatedGatewayToken, GatewayTokenRow, Revoked};

use crate::{Engine, Error, Result};

/// Live gateway tokens of every org at most.
pub const GATEWAY_TOKENS_MAX: i64 = 1_000;
/// How often a token's use is written down, per token and process.
const USE_NOTE_INTERVAL_MS: i64 = 60_000;

/// Who is calling, from a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator token: every org, and creating orgs.
    Operator,
    /// One of an org's tokens: that org only, as far as its role goes.
    Org {
        org_id: OrgId,
        token_id: TokenId,
        role: Role,
    },
    /// A gateway token of every org.
    Gateway { token_id: Arc<str> },
}

impl Principal {
    /// The role's name, as the API documents it.
    pub fn role(&self) -> &'static str {
        match self {
            Principal::Operator => "operator",
            Principal::Org { role, .. } => role.as_str(),
            Principal::Gateway { .. } => "gateway",
        }
    }

    /// The org it is bound to; `None`: every org.
    pub fn org(&self) -> Option<&OrgId> {
        match self {
            Principal::Org { org_id, .. } => Some(org_id),
            Principal::Operator | Principal::Gateway { .. } => None,
        }
    }
}

/// A gateway token of every org, as this process knows it.
#[derive(Debug, Clone)]
struct Gateway {
    id: Arc<str>,
    hash: SecretHash,
    revoked: bool,
}

impl From<&GatewayTokenRow> for Gateway {
    fn from(r: &GatewayTokenRow) -> Gateway {
        Gateway {
            id: Arc::from(r.id.as_str()),
            hash: r.hash,
            revoked: r.revoked_at_ms.is_some(),
        }
    }
}

/// Whose use is noted: an org's token, or a gateway token of every org.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum UseKey {
    Org(OrgId, TokenId),
    Gateway(Arc<str>),
}

/// What this process knows of tokens beyond the orgs' logs.
#[derive(Debug, Default)]
pub(crate) struct TokenState {
    /// Gateway tokens of every org, by hash (revoked ones too).
    gateway: RwLock<HashMap<SecretHash, Gateway>>,
    /// Last use of each token used here: (used, written down). Sharded:
    /// every authenticated request updates one entry.
    uses: dashmap::DashMap<UseKey, (i64, i64)>,
}

impl TokenState {
    pub(crate) async fn load(db: &tally_store::Db) -> Result<TokenState> {
        let rows = db.all_gateway_tokens().await?;
        Ok(TokenState {
            gateway: RwLock::new(rows.iter().map(|r| (r.hash, Gateway::from(r))).collect()),
            uses: dashmap::DashMap::new(),
        })
    }
}

impl Engine {
    /// Resolves a bearer token; `Ok(None)` when it is no valid token. Errs
    /// only when the database must be asked and cannot answer.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>> {
        self.authenticate_hash(&hash_secret(token)).await
    }

    /// [`Engine::authenticate`] by the token's hash: how a console session,
    /// which keeps the hash and never the token, is checked at each request.
    pub async fn authenticate_hash(&self, hash: &SecretHash) -> Result<Option<Principal>> {
        let hash = *hash;
        if ct_eq(&hash, &self.operator_token_hash) {
            return Ok(Some(Principal::Operator));
        }
        let principal = match self.registry.token(&hash) {
            Some((org_id, token_id)) => self.org_token(&hash, org_id, token_id).await?,
            None => self.gateway_token(&hash).await?,
        };
        if let Some(p) = &principal {
            self.note_use(p);
        }
        Ok(principal)
    }

    async fn org_token(
        &self,
        hash: &SecretHash,
        org_id: OrgId,
        token_id: TokenId,
    ) -> Result<Option<Principal>> {
        if self.shared() {
            // Another process may have revoked it a moment ago: what the
            // log holds beyond this process's fold is folded first.
            let head = self.db.org_head(org_id.as_str()).await?;
            let folded = self.registry.org(&org_id).map_or(0, |c| c.read().dir.seq);
            if head > folded {
                self.commands.catch_up(&org_id).await?;
            }
        }
        // The index found it by hash; confirm against the org's own record.
        let Some(cell) = self.registry.org(&org_id) else {
            return Ok(None);
        };
        let org = cell.read();
        let Some(stored) = org.dir.tokens.get(&token_id) else {
            return Ok(None);
        };
        let role = stored.role;
        Ok(
            (stored.revoked_at_ms.is_none() && ct_eq(&stored.hash, hash)).then(|| Principal::Org {
                org_id: org_id.clone(),
                token_id,
                role,
            }),
        )
    }

    async fn gateway_token(&self, hash: &SecretHash) -> Result<Option<Principal>> {
        if self.shared() {
            // Another process may have made or revoked it.
            let row = self.db.gateway_token_by_hash(hash).await?;
            let mut known = self.tokens.gateway.write();
            let _ = match &row {
                Some(r) => known.insert(r.hash, Gateway::from(r)),
                None => known.remove(hash),
            };
        }
        let known = self.tokens.gateway.read();
        Ok(known
            .get(hash)
            .filter(|g| !g.revoked && ct_eq(&g.hash, hash))
            .map(|g| Principal::Gateway {
                token_id: Arc::clone(&g.id),
            }))
    }

    /// Remembers the use; writes it down at most once a minute per token.
    fn note_use(&self, p: &Principal) {
        let key = match p {
            Principal::Operator => return,
            Principal::Org {
                org_id, token_id, ..
            } => UseKey::Org(org_id.clone(), token_id.clone()),
            Principal::Gateway { token_id } => UseKey::Gateway(Arc::clone(token_id)),
        };
        let now = self.now_ms();
        let due = {
            let mut entry = self
                .tokens
                .uses
                .entry(key.clone())
                .or_insert((now, i64::MIN));
            entry.0 = entry.0.max(now);
            let due = now.saturating_sub(entry.1) >= USE_NOTE_INTERVAL_MS;
            if due {
                entry.1 = now;
            }
            due
        };
        if due && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let db = self.db.clone();
            let (org, id) = match key {
                UseKey::Org(org, id) => (org.to_string(), id.to_string()),
                UseKey::Gateway(id) => (String::new(), id.to_string()),
            };
            drop(rt.spawn(async move {
                if let Err(e) = db.note_token_use(&[(org, id, now)]).await {
                    tracing::debug!(error = %e, "noting a token's use failed");
                }
            }));
        }
    }

    /// When each token of `org` (`""`: the gateway tokens of every org) was
    /// last used: the database's note, or this process's if newer.
    pub async fn token_last_used(&self, org: &str) -> Result<HashMap<String, i64>> {
        let mut out: HashMap<String, i64> = self.db.token_uses(org).await?.into_iter().collect();
        for e in &self.tokens.uses {
            let id = match e.key() {
                UseKey::Org(o, id) if o.as_str() == org => id.as_str(),
                UseKey::Gateway(id) if org.is_empty() => id,
                _ => continue,
            };
            let used = e.value().0;
            let at = out.entry(id.to_owned()).or_insert(used);
            *at = (*at).max(used);
        }
        Ok(out)
    }

    /// Creates a gateway token of every org (the operator's); its secret is
    /// known only to the caller.
    pub async fn create_gateway_token(&self, id: &str, name: &str, hash: SecretHash) -> Result<()> {
        let now = self.now_ms();
        let row = GatewayTokenRow {
            id: id.to_owned(),
            name: name.to_owned(),
            hash,
            created_at_ms: now,
            revoked_at_ms: None,
        };
        let detail = serde_json::json!({"token_id": id, "name": name}).to_string();
        match self
            .db
            .create_gateway_token(&row, GATEWAY_TOKENS_MAX, &detail)
            .await?
        {
            CreatedGatewayToken::Created => {
                let _ = self
                    .tokens
                    .gateway
                    .write()
                    .insert(hash, Gateway::from(&row));
                Ok(())
            }
            CreatedGatewayToken::IdTaken => Err(Error::Command(CommandError::Conflict(format!(
                "gateway token {id:?} exists"
            )))),
            CreatedGatewayToken::Full => Err(Error::Command(CommandError::Rule(format!(
                "at most {GATEWAY_TOKENS_MAX} gateway tokens of every org are live at once"
            )))),
        }
    }

    /// Revokes a gateway token of every org; twice changes nothing.
    pub async fn revoke_gateway_token(&self, id: &str) -> Result<()> {
        let now = self.now_ms();
        let detail = serde_json::json!({ "token_id": id }).to_string();
        match self.db.revoke_gateway_token(id, now, &detail).await? {
            Revoked::Unknown => Err(Error::Command(CommandError::NotFound {
                what: "gateway token",
                id: id.to_owned(),
            })),
            Revoked::Now | Revoked::Already => {
                for g in self.tokens.gateway.write().values_mut() {
                    if &*g.id == id {
                        g.revoked = true;
                    }
                }
                Ok(())
            }
        }
    }
}
