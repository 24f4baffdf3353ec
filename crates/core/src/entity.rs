//! Users, groups, API keys and org settings, event-sourced.
//!
//! An admin [`Command`] is validated against the org's current
//! [`OrgDirectory`] by [`OrgDirectory::handle`] (or [`handle_create`] for a new
//! org) and produces [`EventKind`]s; nothing changes until the caller has
//! appended them to the log and folds them back in with
//! [`OrgDirectory::apply`]. The directory is exactly the fold of its log.

use crate::fast::{Map as HashMap, Set as HashSet};

use crate::ids::{GroupId, IdError, KeyId, OrgId, TokenId, UserId};
use crate::money::{Limit, MoneyError, check_limit};
use crate::ratio::{DEFAULT_THRESHOLDS_BPS, RatioError, check_thresholds};
use crate::secret::SecretHash;

/// The longest name (org, user, group, key), in characters.
pub const NAME_LEN_MAX: usize = 200;
/// The longest email, in bytes.
pub const EMAIL_LEN_MAX: usize = 254;
/// The longest feature flag, in bytes.
pub const FEATURE_LEN_MAX: usize = 64;
/// Feature flags per key.
pub const FEATURES_PER_KEY_MAX: usize = 64;
/// Groups a user may be in at once, and groups a key may be associated with.
pub const GROUPS_PER_SUBJECT_MAX: usize = 100;
/// Members of an org (all statuses, removed included).
pub const USERS_PER_ORG_MAX: usize = 1_000_000;
/// Groups per org (deleted ones included: their ids stay taken).
pub const GROUPS_PER_ORG_MAX: usize = 10_000;
/// API keys per org (revoked ones included).
pub const KEYS_PER_ORG_MAX: usize = 1_000_000;
/// Live tokens per org (admin, viewer and gateway alike).
pub const TOKENS_PER_ORG_MAX: usize = 1_000;
/// The longest grace period a rotated key's old secret may keep working.
pub const KEY_ROTATION_GRACE_MAX_MS: i64 = 7 * 24 * 3_600_000;
/// Users one bulk command may change.
pub const BULK_USERS_MAX: usize = 10_000;
/// Events one command may produce (a bulk change of 10 000 users in several
/// groups stays below it).
pub const EVENTS_PER_COMMAND_MAX: usize = 200_000;

/// Who caused an event: the operator token, or one org admin token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Actor {
    Operator,
    Token(TokenId),
}

impl Actor {
    pub fn parse(s: &str) -> Option<Actor> {
        match s {
            "operator" => Some(Actor::Operator),
            _ => TokenId::new(s.strip_prefix("token:")?)
                .ok()
                .map(Actor::Token),
        }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Operator => f.write_str("operator"),
            Actor::Token(t) => write!(f, "token:{t}"),
        }
    }
}

impl serde::Serialize for Actor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What an org's token may do.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in its org (the org token before roles existed).
    #[default]
    Admin,
    /// Every read of its org, nothing else.
    Viewer,
    /// A gateway's calls for its org only: authorize, holds and usage.
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Gateway => "gateway",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "viewer" => Role::Viewer,
            "gateway" => Role::Gateway,
            _ => return None,
        })
    }
}

/// Where a member's monthly limit comes from.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    /// Set for the member (on joining or later); also every limit set
    /// before sources were recorded.
    #[default]
    Own,
    /// The org's default for new members, copied when they joined or when
    /// an admin reset their limit to it; later changes of the default do
    /// not move it.
    OrgDefault,
}

impl LimitSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitSource::Own => "own",
            LimitSource::OrgDefault => "org_default",
        }
    }

    pub fn parse(s: &str) -> Option<LimitSource> {
        match s {
            "own" => Some(LimitSource::Own),
            "org_default" => Some(LimitSource::OrgDefault),
            _ => None,
        }
    }
}

/// What an org's webhook receives.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// Tally's JSON event, signed (docs/webhooks.md); also every webhook
    /// set before formats were recorded.
    #[default]
    Tally,
    /// A Slack incoming-webhook message: `{"text": …}`.
    Slack,
}

impl WebhookFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Tally => "tally",
            WebhookFormat::Slack => "slack",
        }
    }

    pub fn parse(s: &str) -> Option<WebhookFormat> {
        match s {
            "tally" => Some(WebhookFormat::Tally),
            "slack" => Some(WebhookFormat::Slack),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    /// No private context yet; cannot call the API.
    Invited,
    /// Can make API calls.
    Active,
    Suspended,
    /// Final: the id stays taken, the history stays.
    Removed,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Invited => "invited",
            UserStatus::Active => "active",
            UserStatus::Suspended => "suspended",
            UserStatus::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<UserStatus> {
        Some(match s {
            "invited" => UserStatus::Invited,
            "active" => UserStatus::Active,
            "suspended" => UserStatus::Suspended,
            "removed" => UserStatus::Removed,
            _ => return None,
        })
    }
}

/// One entry of an org's entity log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntityEvent {
    pub org_id: OrgId,
    /// 1, 2, 3, … within the org, without gaps.
    pub seq: u64,
    pub at_ms: i64,
    pub actor: Actor,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Limits are `None` for unlimited. Secret and token hashes
/// never appear in JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    OrgCreated {
        name: String,
        default_monthly_limit_micros: Limit,
        alert_thresholds_bps: Vec<u32>,
    },
    /// The settings after the change.
    OrgSettingsChanged {
        name: String,
        default_monthly_limit_micros: Limit,
        alert_thresholds_bps: Vec<u32>,
    },
    /// The org's own monthly limit: its total spend across everyone.
    OrgLimitSet {
        monthly_limit_micros: Limit,
    },
    /// Where threshold and cutoff notifications go. The signing secret is
    /// derived from the server's key and this event's seq, never logged.
    WebhookSet {
        url: String,
        /// Older events carry none: Tally's JSON.
        #[serde(default)]
        format: WebhookFormat,
    },
    WebhookRemoved,
    TokenCreated {
        token_id: TokenId,
        #[serde(skip)]
        token_hash: SecretHash,
        role: Role,
        name: String,
    },
    TokenRevoked {
        token_id: TokenId,
    },
    UserAdded {
        user_id: UserId,
        email: String,
        name: String,
        monthly_limit_micros: Limit,
        limit_source: LimitSource,
    },
    UserActivated {
        user_id: UserId,
    },
    UserSuspended {
        user_id: UserId,
    },
    UserRemoved {
        user_id: UserId,
    },
    UserLimitSet {
        user_id: UserId,
        monthly_limit_micros: Limit,
        limit_source: LimitSource,
    },
    UserProfileChanged {
        user_id: UserId,
        email: String,
        name: String,
    },
    GroupCreated {
        group_id: GroupId,
        name: String,
        monthly_limit_micros: Limit,
    },
    GroupRenamed {
        group_id: GroupId,
        name: String,
    },
    /// Ends every membership and key association of the group.
    GroupDeleted {
        group_id: GroupId,
    },
    GroupLimitSet {
        group_id: GroupId,
        monthly_limit_micros: Limit,
    },
    MemberAdded {
        group_id: GroupId,
        user_id: UserId,
    },
    MemberRemoved {
        group_id: GroupId,
        user_id: UserId,
    },
    KeyCreated {
        key_id: KeyId,
        name: String,
        user_id: Option<UserId>,
        group_ids: Vec<GroupId>,
        features: Vec<String>,
        monthly_limit_micros: Limit,
        #[serde(skip)]
        secret_hash: SecretHash,
        /// Authorize refuses it from then on (`key_expired`).
        expires_at_ms: Option<i64>,
    },
    KeyFeaturesChanged {
        key_id: KeyId,
        features: Vec<String>,
    },
    KeyLimitSet {
        key_id: KeyId,
        monthly_limit_micros: Limit,
    },
    KeyRevoked {
        key_id: KeyId,
    },
    KeyExpirySet {
        key_id: KeyId,
        expires_at_ms: Option<i64>,
    },
    /// A new secret; the one it replaces keeps working for `grace_ms` from
    /// the event's time (a secret replaced before stops at once).
    KeyRotated {
        key_id: KeyId,
        #[serde(skip)]
        secret_hash: SecretHash,
        grace_ms: i64,
    },
    KeyRenamed {
        key_id: KeyId,
        name: String,
    },
    KeyOwnerChanged {
        key_id: KeyId,
        user_id: Option<UserId>,
    },
    KeyGroupsChanged {
        key_id: KeyId,
        group_ids: Vec<GroupId>,
    },
}

impl EventKind {
    /// The user an event is about, if any.
    pub fn user_id(&self) -> Option<&UserId> {
        match self {
            EventKind::UserAdded { user_id, .. }
            | EventKind::UserActivated { user_id }
            | EventKind::UserSuspended { user_id }
            | EventKind::UserRemoved { user_id }
            | EventKind::UserLimitSet { user_id, .. }
            | EventKind::UserProfileChanged { user_id, .. }
            | EventKind::MemberAdded { user_id, .. }
            | EventKind::MemberRemoved { user_id, .. } => Some(user_id),
            _ => None,
        }
    }

    /// Whether the event is about the entity `kind` (`user`, `group`, `key`,
    /// `token`, or `org` for the org's own settings and webhook) with `id`:
    /// a membership change is about its user and its group, a key's
    /// creation about the key, its owner and its groups.
    pub fn concerns(&self, kind: &str, id: &str) -> bool {
        let is = |k: &str, i: &str| k == kind && i == id;
        let groups = |g: &[GroupId]| kind == "group" && g.iter().any(|g| g.as_str() == id);
        match self {
            EventKind::OrgCreated { .. }
            | EventKind::OrgSettingsChanged { .. }
            | EventKind::OrgLimitSet { .. }
            | EventKind::WebhookSet { .. }
            | EventKind::WebhookRemoved => kind == "org",
            EventKind::TokenCreated { token_id, .. } | EventKind::TokenRevoked { token_id } => {
                is("token", token_id.as_str())
            }
            EventKind::UserAdded { user_id, .. }
            | EventKind::UserActivated { user_id }
            | EventKind::UserSuspended { user_id }
            | EventKind::UserRemoved { user_id }
            | EventKind::UserLimitSet { user_id, .. }
            | EventKind::UserProfileChanged { user_id, .. } => is("user", user_id.as_str()),
            EventKind::GroupCreated { group_id, .. }
            | EventKind::GroupRenamed { group_id, .. }
            | EventKind::GroupDeleted { group_id }
            | EventKind::GroupLimitSet { group_id, .. } => is("group", group_id.as_str()),
            EventKind::MemberAdded { group_id, user_id }
            | EventKind::MemberRemoved { group_id, user_id } => {
                is("group", group_id.as_str()) || is("user", user_id.as_str())
            }
            EventKind::KeyCreated {
                key_id,
                user_id,
                group_ids,
                ..
            } => {
                is("key", key_id.as_str())
                    || user_id.as_ref().is_some_and(|u| is("user", u.as_str()))
                    || groups(group_ids)
            }
            EventKind::KeyOwnerChanged { key_id, user_id } => {
                is("key", key_id.as_str())
                    || user_id.as_ref().is_some_and(|u| is("user", u.as_str()))
            }
            EventKind::KeyGroupsChanged { key_id, group_ids } => {
                is("key", key_id.as_str()) || groups(group_ids)
            }
            EventKind::KeyFeaturesChanged { key_id, .. }
            | EventKind::KeyLimitSet { key_id, .. }
            | EventKind::KeyRevoked { key_id }
            | EventKind::KeyExpirySet { key_id, .. }
            | EventKind::KeyRotated { key_id, .. }
            | EventKind::KeyRenamed { key_id, .. } => is("key", key_id.as_str()),
        }
    }

    /// Every name [`EventKind::name`] gives.
    pub const NAMES: &'static [&'static str] = &[
        "org_created",
        "org_settings_changed",
        "org_limit_set",
        "webhook_set",
        "webhook_removed",
        "token_created",
        "token_revoked",
        "user_added",
        "user_activated",
        "user_suspended",
        "user_removed",
        "user_limit_set",
        "user_profile_changed",
        "group_created",
        "group_renamed",
        "group_deleted",
        "group_limit_set",
        "member_added",
        "member_removed",
        "key_created",
        "key_features_changed",
        "key_limit_set",
        "key_revoked",
        "key_expiry_set",
        "key_rotated",
        "key_renamed",
        "key_owner_changed",
        "key_groups_changed",
    ];

    /// The snake_case name used in JSON (`type`) and in SQL (`events.kind`).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::OrgCreated { .. } => "org_created",
            EventKind::OrgSettingsChanged { .. } => "org_settings_changed",
            EventKind::OrgLimitSet { .. } => "org_limit_set",
            EventKind::WebhookSet { .. } => "webhook_set",
            EventKind::WebhookRemoved => "webhook_removed",
            EventKind::TokenCreated { .. } => "token_created",
            EventKind::TokenRevoked { .. } => "token_revoked",
            EventKind::UserAdded { .. } => "user_added",
            EventKind::UserActivated { .. } => "user_activated",
            EventKind::UserSuspended { .. } => "user_suspended",
            EventKind::UserRemoved { .. } => "user_removed",
            EventKind::UserLimitSet { .. } => "user_limit_set",
            EventKind::UserProfileChanged { .. } => "user_profile_changed",
            EventKind::GroupCreated { .. } => "group_created",
            EventKind::GroupRenamed { .. } => "group_renamed",
            EventKind::GroupDeleted { .. } => "group_deleted",
            EventKind::GroupLimitSet { .. } => "group_limit_set",
            EventKind::MemberAdded { .. } => "member_added",
            EventKind::MemberRemoved { .. } => "member_removed",
            EventKind::KeyCreated { .. } => "key_created",
            EventKind::KeyFeaturesChanged { .. } => "key_features_changed",
            EventKind::KeyLimitSet { .. } => "key_limit_set",
            EventKind::KeyRevoked { .. } => "key_revoked",
            EventKind::KeyExpirySet { .. } => "key_expiry_set",
            EventKind::KeyRotated { .. } => "key_rotated",
            EventKind::KeyRenamed { .. } => "key_renamed",
            EventKind::KeyOwnerChanged { .. } => "key_owner_changed",
            EventKind::KeyGroupsChanged { .. } => "key_groups_changed",
        }
    }
}

/// What an admin asks for. Each command is all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    CreateOrg {
        name: String,
        default_monthly_limit_micros: Limit,
        /// `None`: the defaults (50 %, 80 %, 100 %).
        alert_thresholds_bps: Option<Vec<u32>>,
        /// The org's own limit on its total spend.
        monthly_limit_micros: Limit,
    },
    /// Fields left `None` stay as they are.
    ChangeSettings {
        name: Option<String>,
        default_monthly_limit_micros: Option<Limit>,
        alert_thresholds_bps: Option<Vec<u32>>,
        monthly_limit_micros: Option<Limit>,
    },
    /// Sets (or replaces, with a new secret) the org's webhook.
    SetWebhook {
        url: String,
        format: WebhookFormat,
    },
    RemoveWebhook,
    CreateToken {
        token_id: TokenId,
        token_hash: SecretHash,
        role: Role,
        name: String,
    },
    RevokeToken {
        token_id: TokenId,
    },
    AddUser {
        user_id: UserId,
        email: String,
        name: String,
        /// `None`: copy the org's default limit; `Some(None)`: unlimited.
        monthly_limit_micros: Option<Limit>,
        /// Activate at once instead of joining `invited`.
        activate: bool,
    },
    /// Fields left `None` stay as they are.
    UpdateUser {
        user_id: UserId,
        email: Option<String>,
        name: Option<String>,
        monthly_limit_micros: Option<Limit>,
        status: Option<UserStatus>,
    },
    /// One change to many users, all or nothing.
    BulkUpdateUsers {
        user_ids: Vec<UserId>,
        add_groups: Vec<GroupId>,
        remove_groups: Vec<GroupId>,
        monthly_limit_micros: Option<Limit>,
        /// Each member's limit back to the org's default (instead of
        /// `monthly_limit_micros`).
        reset_limit: bool,
        status: Option<UserStatus>,
    },
    CreateGroup {
        group_id: GroupId,
        name: String,
        monthly_limit_micros: Limit,
    },
    UpdateGroup {
        group_id: GroupId,
        name: Option<String>,
        monthly_limit_micros: Option<Limit>,
    },
    DeleteGroup {
        group_id: GroupId,
    },
    AddMember {
        group_id: GroupId,
        user_id: UserId,
    },
    RemoveMember {
        group_id: GroupId,
        user_id: UserId,
    },
    CreateKey {
        key_id: KeyId,
        name: String,
        user_id: Option<UserId>,
        group_ids: Vec<GroupId>,
        features: Vec<String>,
        monthly_limit_micros: Limit,
        secret_hash: SecretHash,
        expires_at_ms: Option<i64>,
    },
    UpdateKey {
        key_id: KeyId,
        features: Option<Vec<String>>,
        monthly_limit_micros: Option<Limit>,
        name: Option<String>,
        /// `Some(None)`: no owner (then the key needs groups).
        user_id: Option<Option<UserId>>,
        group_ids: Option<Vec<GroupId>>,
        expires_at_ms: Option<Option<i64>>,
        /// Revoke after the other changes (final).
        revoke: bool,
    },
    RotateKey {
        key_id: KeyId,
        secret_hash: SecretHash,
        /// How long the old secret keeps working, at most
        /// [`KEY_ROTATION_GRACE_MAX_MS`].
        grace_ms: i64,
    },
    RevokeKey {
        key_id: KeyId,
    },
}

/// Why a command was refused. The API maps each variant to one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// 400: a value is malformed or out of its bounds.
    #[error("{0}")]
    Invalid(String),
    /// 404.
    #[error("{what} {id:?} does not exist")]
    NotFound { what: &'static str, id: String },
    /// 409: the id (or email) is taken.
    #[error("{0}")]
    Conflict(String),
    /// 422: well-formed, but a rule forbids it.
    #[error("{0}")]
    Rule(String),
}

impl From<IdError> for CommandError {
    fn from(e: IdError) -> Self {
        CommandError::Invalid(e.to_string())
    }
}

impl From<MoneyError> for CommandError {
    fn from(e: MoneyError) -> Self {
        CommandError::Invalid(e.to_string())
    }
}

impl From<RatioError> for CommandError {
    fn from(e: RatioError) -> Self {
        CommandError::Invalid(e.to_string())
    }
}

type CmdResult<T> = Result<T, CommandError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgSettings {
    pub name: String,
    pub default_monthly_limit_micros: Limit,
    /// Ascending basis points.
    pub alert_thresholds_bps: Vec<u32>,
}

/// A stretch of time during which a user was in a group: `(from_ms,
/// until_ms]` on the server's clock. Group spend counts a member's usage
/// logged (received by Tally) inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub group_idx: u32,
    pub from_ms: i64,
    pub until_ms: i64,
}

impl Membership {
    /// Whether usage logged at `logged_at_ms` counts for the group. Open at
    /// its start and closed at its end: usage logged in the very
    /// millisecond of a join or a leave is judged as if logged just before
    /// the change, which is what a process applying that usage before
    /// folding the change decides too (a replay agrees with it).
    pub fn covers(&self, logged_at_ms: i64) -> bool {
        self.from_ms < logged_at_ms && logged_at_ms <= self.until_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Dense index in creation order: the ledger's counter slot.
    pub idx: u32,
    pub id: UserId,
    pub email: String,
    pub name: String,
    pub status: UserStatus,
    pub monthly_limit_micros: Limit,
    pub limit_source: LimitSource,
    /// Current groups, in the order joined.
    pub groups: Vec<GroupId>,
    /// Membership history still relevant to metering (see
    /// [`OrgDirectory::prune_memberships`]).
    pub memberships: Vec<Membership>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub idx: u32,
    pub id: GroupId,
    pub name: String,
    pub monthly_limit_micros: Limit,
    pub members: HashSet<UserId>,
    pub deleted: bool,
    pub created_at_ms: i64,
}

/// An org's token: only its hash is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub hash: SecretHash,
    pub role: Role,
    pub name: String,
    pub created_at_ms: i64,
    /// When it was revoked: it authenticates nothing since.
    pub revoked_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub idx: u32,
    pub id: KeyId,
    pub name: String,
    pub user_id: Option<UserId>,
    pub group_ids: Vec<GroupId>,
    pub features: Vec<String>,
    pub monthly_limit_micros: Limit,
    pub revoked: bool,
    pub secret_hash: SecretHash,
    pub created_at_ms: i64,
    /// Authorize refuses it from then on.
    pub expires_at_ms: Option<i64>,
    /// The secret the last rotation replaced, and until when it works.
    pub previous_secret: Option<(SecretHash, i64)>,
}

/// An org's webhook: where notifications go, and the seq of the event that
/// set it (which, with the server's key, gives its signing secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub format: WebhookFormat,
    pub seq: u64,
    pub set_at_ms: i64,
}

/// One org's entities: the fold of its entity log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgDirectory {
    pub id: OrgId,
    pub settings: OrgSettings,
    /// The org's limit on its total spend.
    pub monthly_limit_micros: Limit,
    pub webhook: Option<Webhook>,
    pub created_at_ms: i64,
    /// The seq of the last event folded in.
    pub seq: u64,
    /// When a limit or the alert thresholds last changed (see
    /// [`OrgDirectory::rejudges`]): the date a restart re-judges the
    /// checkpoint's counters by.
    pub rejudged_at_ms: i64,
    /// Users and keys are boxed so these maps' entries stay small (an id
    /// and a pointer): finding the user and key of each usage event then
    /// probes a compact table (apply at 10 000 users: +12–20 %).
    pub users: HashMap<UserId, Box<User>>,
    pub groups: HashMap<GroupId, Group>,
    pub keys: HashMap<KeyId, Box<Key>>,
    /// Admin tokens, revoked ones too (an id is never given twice).
    pub tokens: HashMap<TokenId, Token>,
    /// Index → id, for the ledger's dense counter slots.
    pub user_ids: Vec<UserId>,
    pub group_ids: Vec<GroupId>,
    pub key_ids: Vec<KeyId>,
    /// Each group's limit by index: the hot path's view of `groups`.
    group_limits: Vec<Limit>,
    key_by_hash: HashMap<SecretHash, KeyId>,
    /// Lowercased email → user, for users not removed.
    user_by_email: HashMap<String, UserId>,
}

/// Checks a key's expiry: a Unix time in milliseconds, after 1970 and
/// before the year 10 000 (RFC 3339's range).
fn check_expiry(at_ms: Option<i64>) -> CmdResult<Option<i64>> {
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    match at_ms {
        Some(ms) if !(0..YEAR_10000_MS).contains(&ms) => Err(CommandError::Invalid(
            "expires_at must be between 1970 and 9999".into(),
        )),
        _ => Ok(at_ms),
    }
}

/// Checks a name: 1 to [`NAME_LEN_MAX`] characters, not blank, no control
/// characters.
pub fn check_name(what: &str, s: &str) -> CmdResult<String> {
    let len = s.chars().count();
    if len == 0 || len > NAME_LEN_MAX || s.trim().is_empty() {
        return Err(CommandError::Invalid(format!(
            "{what} must have 1 to {NAME_LEN_MAX} characters and not be blank"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(CommandError::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(s.to_owned())
}

fn check_email(s: &str) -> CmdResult<String> {
    let ok = s.len() <= EMAIL_LEN_MAX
        && s.split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(CommandError::Invalid(format!(
            "email {s:?} is not an address of the form name@domain (at most {EMAIL_LEN_MAX} bytes)"
        )));
    }
    Ok(s.to_owned())
}

/// Checks and normalises a key's feature flags: `[A-Za-z0-9._:/-]{1,64}`,
/// at most 64, returned sorted without repeats.
pub fn check_features(features: &[String]) -> CmdResult<Vec<String>> {
    if features.len() > FEATURES_PER_KEY_MAX {
        return Err(CommandError::Invalid(format!(
            "a key takes at most {FEATURES_PER_KEY_MAX} features"
        )));
    }
    for f in features {
        // A trailing `*` grants every feature that starts with the rest.
        let name = f.strip_suffix('*').unwrap_or(f);
        let ok = !f.is_empty()
            && f.len() <= FEATURE_LEN_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
        if !ok {
            return Err(CommandError::Invalid(format!(
                "feature {f:?} must match [A-Za-z0-9._:/-]{{1,{FEATURE_LEN_MAX}}}, \
                 with at most a trailing *"
            )));
        }
    }
    let mut out = features.to_vec();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn not_found(what: &'static str, id: &str) -> CommandError {
    CommandError::NotFound {
        what,
        id: id.to_owned(),
    }
}

/// Validates `CreateOrg` for an org id that has no directory yet.
pub fn handle_create(exists: bool, org_id: &OrgId, cmd: &Command) -> CmdResult<Vec<EventKind>> {
    let Command::CreateOrg {
        name,
        default_monthly_limit_micros,
        alert_thresholds_bps,
        monthly_limit_micros,
    } = cmd
    else {
        return Err(not_found("org", org_id.as_str()));
    };
    if exists {
        return Err(CommandError::Conflict(format!(
            "org {org_id:?} already exists"
        )));
    }
    let mut events = vec![EventKind::OrgCreated {
        name: check_name("name", name)?,
        default_monthly_limit_micros: check_limit(
            "default_monthly_limit_micros",
            *default_monthly_limit_micros,
        )?,
        alert_thresholds_bps: match alert_thresholds_bps {
            Some(t) => check_thresholds(t.clone())?,
            None => DEFAULT_THRESHOLDS_BPS.to_vec(),
        },
    }];
    let limit = check_limit("monthly_limit_micros", *monthly_limit_micros)?;
    if limit.is_some() {
        events.push(EventKind::OrgLimitSet {
            monthly_limit_micros: limit,
        });
    }
    Ok(events)
}

/// Longest webhook URL accepted.
pub const WEBHOOK_URL_LEN_MAX: usize = 2_048;

/// An absolute `http://` or `https://` URL with a host, printable ASCII
/// only. (Whether it answers is the delivery's business.)
fn check_webhook_url(url: &str) -> CmdResult<String> {
    let invalid = |why: &str| CommandError::Invalid(format!("webhook url {why}"));
    if url.len() > WEBHOOK_URL_LEN_MAX {
        return Err(invalid(&format!(
            "is longer than {WEBHOOK_URL_LEN_MAX} bytes"
        )));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "must be printable ASCII without spaces (percent-encode the rest)",
        ));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| invalid("must start with http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid("must name a host"));
    }
    Ok(url.to_owned())
}

impl OrgDirectory {
    /// The directory of a new org, from its first event.
    ///
    /// # Panics
    /// If `event` is not `OrgCreated` with seq 1: the log would be corrupt.
    pub fn from_created(event: &EntityEvent) -> OrgDirectory {
        let EventKind::OrgCreated {
            name,
            default_monthly_limit_micros,
            alert_thresholds_bps,
        } = &event.kind
        else {
            panic!(
                "the log of org {} does not start with org_created",
                event.org_id
            );
        };
        assert_eq!(
            event.seq, 1,
            "org {} starts at seq {}",
            event.org_id, event.seq
        );
        OrgDirectory {
            id: event.org_id.clone(),
            settings: OrgSettings {
                name: name.clone(),
                default_monthly_limit_micros: *default_monthly_limit_micros,
                alert_thresholds_bps: alert_thresholds_bps.clone(),
            },
            monthly_limit_micros: None,
            webhook: None,
            created_at_ms: event.at_ms,
            seq: 1,
            rejudged_at_ms: event.at_ms,
            users: HashMap::default(),
            groups: HashMap::default(),
            keys: HashMap::default(),
            tokens: HashMap::default(),
            user_ids: Vec::new(),
            group_ids: Vec::new(),
            key_ids: Vec::new(),
            group_limits: Vec::new(),
            key_by_hash: HashMap::default(),
            user_by_email: HashMap::default(),
        }
    }

    /// Whether folding `kind` changes how counted spend is judged: a limit
    /// set, or other alert thresholds. The meter re-evaluates the subjects
    /// such an event touches at once, and a command that writes one first
    /// checkpoints the org's meter (`tally-engine`'s command path), so a
    /// replay never applies usage logged before the change under it.
    pub fn rejudges(&self, kind: &EventKind) -> bool {
        match kind {
            EventKind::OrgLimitSet { .. }
            | EventKind::UserLimitSet { .. }
            | EventKind::GroupLimitSet { .. }
            | EventKind::KeyLimitSet { .. } => true,
            EventKind::OrgSettingsChanged {
                alert_thresholds_bps,
                ..
            } => *alert_thresholds_bps != self.settings.alert_thresholds_bps,
            _ => false,
        }
    }

    /// The limit of the group with index `idx`.
    pub fn group_limit(&self, idx: u32) -> Limit {
        self.group_limits.get(idx as usize).copied().flatten()
    }

    pub fn key_by_hash(&self, hash: &SecretHash) -> Option<&Key> {
        self.keys.get(self.key_by_hash.get(hash)?).map(|k| &**k)
    }

    /// The key whose secret is `hash` at `now_ms`: its current secret, or
    /// the one its last rotation replaced, within the grace period.
    pub fn key_for_secret(&self, hash: &SecretHash, now_ms: i64) -> Option<&Key> {
        let key = self.key_by_hash(hash)?;
        if key.secret_hash == *hash {
            return Some(key);
        }
        key.previous_secret
            .filter(|(old, until)| old == hash && now_ms < *until)
            .map(|_| key)
    }

    /// A key's groups, checked (each exists, not too many) and in order;
    /// with `owner`, for the rule that a key has an owner, groups, or both.
    fn key_groups(&self, owner: Option<&UserId>, group_ids: &[GroupId]) -> CmdResult<Vec<GroupId>> {
        if owner.is_none() && group_ids.is_empty() {
            return Err(CommandError::Invalid(
                "a key needs an owner (user_id), groups (group_ids), or both".into(),
            ));
        }
        if group_ids.len() > GROUPS_PER_SUBJECT_MAX {
            return Err(CommandError::Invalid(format!(
                "a key takes at most {GROUPS_PER_SUBJECT_MAX} groups"
            )));
        }
        let mut groups = group_ids.to_vec();
        groups.sort_unstable();
        groups.dedup();
        for g in &groups {
            let _ = self.group(g)?;
        }
        Ok(groups)
    }

    pub fn user(&self, id: &str) -> CmdResult<&User> {
        self.users
            .get(id)
            .map(|u| &**u)
            .ok_or_else(|| not_found("user", id))
    }

    /// A group that exists and is not deleted.
    pub fn group(&self, id: &str) -> CmdResult<&Group> {
        self.groups
            .get(id)
            .filter(|g| !g.deleted)
            .ok_or_else(|| not_found("group", id))
    }

    pub fn key(&self, id: &str) -> CmdResult<&Key> {
        self.keys
            .get(id)
            .map(|k| &**k)
            .ok_or_else(|| not_found("key", id))
    }

    fn live_user(&self, id: &str) -> CmdResult<&User> {
        let user = self.user(id)?;
        if user.status == UserStatus::Removed {
            return Err(CommandError::Rule(format!("user {id:?} was removed")));
        }
        Ok(user)
    }

    fn check_email_free(&self, email: &str, except: Option<&UserId>) -> CmdResult<()> {
        match self.user_by_email.get(&email.to_lowercase()) {
            Some(owner) if Some(owner) != except => Err(CommandError::Conflict(format!(
                "email {email:?} belongs to user {owner:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// Validates a command against the current state and returns the events
    /// it produces: empty when it changes nothing (e.g. adding a member who is
    /// already in the group).
    pub fn handle(&self, cmd: &Command) -> CmdResult<Vec<EventKind>> {
        let events = match cmd {
            Command::CreateOrg { .. } => {
                return Err(CommandError::Conflict(format!(
                    "org {:?} already exists",
                    self.id
                )));
            }
            Command::ChangeSettings {
                name,
                default_monthly_limit_micros,
                alert_thresholds_bps,
                monthly_limit_micros,
            } => {
                let s = &self.settings;
                let next = OrgSettings {
                    name: match name {
                        Some(n) => check_name("name", n)?,
                        None => s.name.clone(),
                    },
                    default_monthly_limit_micros: match default_monthly_limit_micros {
                        Some(l) => check_limit("default_monthly_limit_micros", *l)?,
                        None => s.default_monthly_limit_micros,
                    },
                    alert_thresholds_bps: match alert_thresholds_bps {
                        Some(t) => check_thresholds(t.clone())?,
                        None => s.alert_thresholds_bps.clone(),
                    },
                };
                let mut events = Vec::new();
                if &next != s {
                    events.push(EventKind::OrgSettingsChanged {
                        name: next.name,
                        default_monthly_limit_micros: next.default_monthly_limit_micros,
                        alert_thresholds_bps: next.alert_thresholds_bps,
                    });
                }
                if let Some(limit) = monthly_limit_micros {
                    let limit = check_limit("monthly_limit_micros", *limit)?;
                    if limit != self.monthly_limit_micros {
                        events.push(EventKind::OrgLimitSet {
                            monthly_limit_micros: limit,
                        });
                    }
                }
                events
            }
            Command::SetWebhook { url, format } => vec![EventKind::WebhookSet {
                url: check_webhook_url(url)?,
                format: *format,
            }],
            Command::RemoveWebhook => match self.webhook {
                Some(_) => vec![EventKind::WebhookRemoved],
                None => vec![],
            },
            Command::CreateToken {
                token_id,
                token_hash,
                role,
                name,
            } => {
                let name = check_name("a token's name", name)?;
                if self.tokens.contains_key(token_id) {
                    return Err(CommandError::Conflict(format!("token {token_id:?} exists")));
                }
                let live = self.tokens.values().filter(|t| t.revoked_at_ms.is_none());
                if live.count() >= TOKENS_PER_ORG_MAX {
                    return Err(CommandError::Rule(format!(
                        "an org has at most {TOKENS_PER_ORG_MAX} live tokens"
                    )));
                }
                vec![EventKind::TokenCreated {
                    token_id: token_id.clone(),
                    token_hash: *token_hash,
                    role: *role,
                    name,
                }]
            }
            Command::RevokeToken { token_id } => match self.tokens.get(token_id) {
                None => {
                    return Err(CommandError::NotFound {
                        what: "token",
                        id: token_id.to_string(),
                    });
                }
                // Idempotent: revoked already.
                Some(t) if t.revoked_at_ms.is_some() => vec![],
                Some(_) => vec![EventKind::TokenRevoked {
                    token_id: token_id.clone(),
                }],
            },
            Command::AddUser {
                user_id,
                email,
                name,
                monthly_limit_micros,
                activate,
            } => {
                if self.users.contains_key(user_id) {
                    return Err(CommandError::Conflict(format!("user {user_id:?} exists")));
                }
                if self.users.len() >= USERS_PER_ORG_MAX {
                    return Err(CommandError::Rule(format!(
                        "an org has at most {USERS_PER_ORG_MAX} users"
                    )));
                }
                let email = check_email(email)?;
                self.check_email_free(&email, None)?;
                let (limit, limit_source) = match monthly_limit_micros {
                    Some(l) => (check_limit("monthly_limit_micros", *l)?, LimitSource::Own),
                    None => (
                        self.settings.default_monthly_limit_micros,
                        LimitSource::OrgDefault,
                    ),
                };
                let mut events = vec![EventKind::UserAdded {
                    user_id: user_id.clone(),
                    email,
                    name: check_name("name", name)?,
                    monthly_limit_micros: limit,
                    limit_source,
                }];
                if *activate {
                    events.push(EventKind::UserActivated {
                        user_id: user_id.clone(),
                    });
                }
                events
            }
            Command::UpdateUser {
                user_id,
                email,
                name,
                monthly_limit_micros,
                status,
            } => {
                let user = self.user(user_id)?;
                let mut events = Vec::new();
                if user.status == UserStatus::Removed {
                    return Err(CommandError::Rule(format!(
                        "user {user_id:?} was removed and cannot change"
                    )));
                }
                if email.is_some() || name.is_some() {
                    let email = match email {
                        Some(e) => check_email(e)?,
                        None => user.email.clone(),
                    };
                    self.check_email_free(&email, Some(user_id))?;
                    let name = match name {
                        Some(n) => check_name("name", n)?,
                        None => user.name.clone(),
                    };
                    if email != user.email || name != user.name {
                        events.push(EventKind::UserProfileChanged {
                            user_id: user_id.clone(),
                            email,
                            name,
                        });
                    }
                }
                if let Some(limit) = monthly_limit_micros {
                    let limit = check_limit("monthly_limit_micros", *limit)?;
                    // The default's amount set as their own makes it theirs.
                    if (limit, LimitSource::Own) != (user.monthly_limit_micros, user.limit_source) {
                        events.push(EventKind::UserLimitSet {
                            user_id: user_id.clone(),
                            monthly_limit_micros: limit,
                            limit_source: LimitSource::Own,
                        });
                    }
                }
                if let Some(status) = status {
                    events.extend(status_events(user, *status)?);
                }
                events
            }
            Command::BulkUpdateUsers {
                user_ids,
                add_groups,
                remove_groups,
                monthly_limit_micros,
                reset_limit,
                status,
            } => {
                let limit = match (monthly_limit_micros, reset_limit) {
                    (Some(_), true) => {
                        return Err(CommandError::Invalid(
                            "give monthly_limit_micros or reset_limit, not both".into(),
                        ));
                    }
                    (Some(l), false) => Some((*l, LimitSource::Own)),
                    (None, true) => Some((
                        self.settings.default_monthly_limit_micros,
                        LimitSource::OrgDefault,
                    )),
                    (None, false) => None,
                };
                self.handle_bulk(user_ids, add_groups, remove_groups, limit, *status)?
            }
            Command::CreateGroup {
                group_id,
                name,
                monthly_limit_micros,
            } => {
                if let Some(g) = self.groups.get(group_id) {
                    let why = if g.deleted {
                        " (a deleted group keeps its id)"
                    } else {
                        ""
                    };
                    return Err(CommandError::Conflict(format!(
                        "group {group_id:?} exists{why}"
                    )));
                }
                if self.groups.len() >= GROUPS_PER_ORG_MAX {
                    return Err(CommandError::Rule(format!(
                        "an org has at most {GROUPS_PER_ORG_MAX} groups"
                    )));
                }
                vec![EventKind::GroupCreated {
                    group_id: group_id.clone(),
                    name: check_name("name", name)?,
                    monthly_limit_micros: check_limit(
                        "monthly_limit_micros",
                        *monthly_limit_micros,
                    )?,
                }]
            }
            Command::UpdateGroup {
                group_id,
                name,
                monthly_limit_micros,
            } => {
                let group = self.group(group_id)?;
                let mut events = Vec::new();
                if let Some(name) = name {
                    let name = check_name("name", name)?;
                    if name != group.name {
                        events.push(EventKind::GroupRenamed {
                            group_id: group_id.clone(),
                            name,
                        });
                    }
                }
                if let Some(limit) = monthly_limit_micros {
                    let limit = check_limit("monthly_limit_micros", *limit)?;
                    if limit != group.monthly_limit_micros {
                        events.push(EventKind::GroupLimitSet {
                            group_id: group_id.clone(),
                            monthly_limit_micros: limit,
                        });
                    }
                }
                events
            }
            Command::DeleteGroup { group_id } => {
                let _ = self.group(group_id)?;
                vec![EventKind::GroupDeleted {
                    group_id: group_id.clone(),
                }]
            }
            Command::AddMember { group_id, user_id } => {
                let group = self.group(group_id)?;
                let user = self.live_user(user_id)?;
                if group.members.contains(user_id) {
                    vec![]
                } else {
                    check_group_room(user)?;
                    vec![EventKind::MemberAdded {
                        group_id: group_id.clone(),
                        user_id: user_id.clone(),
                    }]
                }
            }
            Command::RemoveMember { group_id, user_id } => {
                let group = self.group(group_id)?;
                let _ = self.user(user_id)?;
                if group.members.contains(user_id) {
                    vec![EventKind::MemberRemoved {
                        group_id: group_id.clone(),
                        user_id: user_id.clone(),
                    }]
                } else {
                    vec![]
                }
            }
            Command::CreateKey {
                key_id,
                name,
                user_id,
                group_ids,
                features,
                monthly_limit_micros,
                secret_hash,
                expires_at_ms,
            } => {
                if self.keys.contains_key(key_id) {
                    return Err(CommandError::Conflict(format!("key {key_id:?} exists")));
                }
                if self.keys.len() >= KEYS_PER_ORG_MAX {
                    return Err(CommandError::Rule(format!(
                        "an org has at most {KEYS_PER_ORG_MAX} keys"
                    )));
                }
                let groups = self.key_groups(user_id.as_ref(), group_ids)?;
                let mut events = Vec::with_capacity(2);
                let owner = match user_id {
                    Some(u) => Some(self.live_user(u)?),
                    None => None,
                };
                events.push(EventKind::KeyCreated {
                    key_id: key_id.clone(),
                    name: check_name("name", name)?,
                    user_id: user_id.clone(),
                    group_ids: groups,
                    features: check_features(features)?,
                    monthly_limit_micros: check_limit(
                        "monthly_limit_micros",
                        *monthly_limit_micros,
                    )?,
                    secret_hash: *secret_hash,
                    expires_at_ms: check_expiry(*expires_at_ms)?,
                });
                // A user's first own key is their private context: it makes
                // an invited user active.
                if let Some(owner) = owner
                    && owner.status == UserStatus::Invited
                {
                    events.push(EventKind::UserActivated {
                        user_id: owner.id.clone(),
                    });
                }
                events
            }
            Command::UpdateKey {
                key_id,
                features,
                monthly_limit_micros,
                name,
                user_id,
                group_ids,
                expires_at_ms,
                revoke,
            } => {
                let key = self.key(key_id)?;
                if key.revoked {
                    let nothing_else = features.is_none()
                        && monthly_limit_micros.is_none()
                        && name.is_none()
                        && user_id.is_none()
                        && group_ids.is_none()
                        && expires_at_ms.is_none();
                    if nothing_else && *revoke {
                        return Ok(vec![]);
                    }
                    return Err(CommandError::Rule(format!("key {key_id:?} is revoked")));
                }
                let mut events = Vec::new();
                if let Some(name) = name {
                    let name = check_name("name", name)?;
                    if name != key.name {
                        events.push(EventKind::KeyRenamed {
                            key_id: key_id.clone(),
                            name,
                        });
                    }
                }
                // Owner and groups are checked together: the key keeps an
                // owner, groups, or both.
                if user_id.is_some() || group_ids.is_some() {
                    let owner = user_id.clone().unwrap_or_else(|| key.user_id.clone());
                    let groups = group_ids.as_ref().unwrap_or(&key.group_ids);
                    let groups = self.key_groups(owner.as_ref(), groups)?;
                    if owner != key.user_id {
                        if let Some(u) = &owner {
                            let _ = self.live_user(u)?;
                        }
                        events.push(EventKind::KeyOwnerChanged {
                            key_id: key_id.clone(),
                            user_id: owner,
                        });
                    }
                    if groups != key.group_ids {
                        events.push(EventKind::KeyGroupsChanged {
                            key_id: key_id.clone(),
                            group_ids: groups,
                        });
                    }
                }
                if let Some(expiry) = expires_at_ms {
                    let expiry = check_expiry(*expiry)?;
                    if expiry != key.expires_at_ms {
                        events.push(EventKind::KeyExpirySet {
                            key_id: key_id.clone(),
                            expires_at_ms: expiry,
                        });
                    }
                }
                if let Some(features) = features {
                    let features = check_features(features)?;
                    if features != key.features {
                        events.push(EventKind::KeyFeaturesChanged {
                            key_id: key_id.clone(),
                            features,
                        });
                    }
                }
                if let Some(limit) = monthly_limit_micros {
                    let limit = check_limit("monthly_limit_micros", *limit)?;
                    if limit != key.monthly_limit_micros {
                        events.push(EventKind::KeyLimitSet {
                            key_id: key_id.clone(),
                            monthly_limit_micros: limit,
                        });
                    }
                }
                if *revoke {
                    events.push(EventKind::KeyRevoked {
                        key_id: key_id.clone(),
                    });
                }
                events
            }
            Command::RotateKey {
                key_id,
                secret_hash,
                grace_ms,
            } => {
                if self.key(key_id)?.revoked {
                    return Err(CommandError::Rule(format!("key {key_id:?} is revoked")));
                }
                if !(0..=KEY_ROTATION_GRACE_MAX_MS).contains(grace_ms) {
                    return Err(CommandError::Invalid(format!(
                        "the grace period must be between 0 and {} seconds",
                        KEY_ROTATION_GRACE_MAX_MS / 1000
                    )));
                }
                vec![EventKind::KeyRotated {
                    key_id: key_id.clone(),
                    secret_hash: *secret_hash,
                    grace_ms: *grace_ms,
                }]
            }
            Command::RevokeKey { key_id } => {
                if self.key(key_id)?.revoked {
                    vec![]
                } else {
                    vec![EventKind::KeyRevoked {
                        key_id: key_id.clone(),
                    }]
                }
            }
        };
        if events.len() > EVENTS_PER_COMMAND_MAX {
            return Err(CommandError::Rule(format!(
                "the change would write {} events; split it (at most {EVENTS_PER_COMMAND_MAX})",
                events.len()
            )));
        }
        Ok(events)
    }

    fn handle_bulk(
        &self,
        user_ids: &[UserId],
        add_groups: &[GroupId],
        remove_groups: &[GroupId],
        limit: Option<(Limit, LimitSource)>,
        status: Option<UserStatus>,
    ) -> CmdResult<Vec<EventKind>> {
        if user_ids.is_empty() || user_ids.len() > BULK_USERS_MAX {
            return Err(CommandError::Invalid(format!(
                "user_ids takes 1 to {BULK_USERS_MAX} users"
            )));
        }
        if add_groups.is_empty() && remove_groups.is_empty() && limit.is_none() && status.is_none()
        {
            return Err(CommandError::Invalid(
                "a bulk change needs add_groups, remove_groups, monthly_limit_micros, \
                 reset_limit or status"
                    .into(),
            ));
        }
        if add_groups.len() + remove_groups.len() > GROUPS_PER_SUBJECT_MAX {
            return Err(CommandError::Invalid(format!(
                "a bulk change names at most {GROUPS_PER_SUBJECT_MAX} groups"
            )));
        }
        if let Some(g) = add_groups.iter().find(|g| remove_groups.contains(g)) {
            return Err(CommandError::Invalid(format!(
                "group {g:?} is in both add_groups and remove_groups"
            )));
        }
        for g in add_groups.iter().chain(remove_groups) {
            let _ = self.group(g)?;
        }
        let limit = limit
            .map(|(l, source)| CmdResult::Ok((check_limit("monthly_limit_micros", l)?, source)))
            .transpose()?;
        let mut seen = HashSet::with_capacity_and_hasher(user_ids.len(), Default::default());
        let mut events = Vec::new();
        for user_id in user_ids {
            if !seen.insert(user_id) {
                return Err(CommandError::Invalid(format!(
                    "user {user_id:?} is named twice"
                )));
            }
            let user = self.user(user_id)?;
            if user.status == UserStatus::Removed {
                return Err(CommandError::Rule(format!(
                    "user {user_id:?} was removed and cannot change"
                )));
            }
            let mut groups_after = user.groups.len();
            for g in remove_groups {
                if user.groups.contains(g) {
                    groups_after -= 1;
                    events.push(EventKind::MemberRemoved {
                        group_id: g.clone(),
                        user_id: user_id.clone(),
                    });
                }
            }
            for g in add_groups {
                if !user.groups.contains(g) {
                    groups_after += 1;
                    events.push(EventKind::MemberAdded {
                        group_id: g.clone(),
                        user_id: user_id.clone(),
                    });
                }
            }
            if groups_after > GROUPS_PER_SUBJECT_MAX {
                return Err(CommandError::Rule(format!(
                    "user {user_id:?} would be in more than {GROUPS_PER_SUBJECT_MAX} groups"
                )));
            }
            if let Some((limit, limit_source)) = limit
                && (limit, limit_source) != (user.monthly_limit_micros, user.limit_source)
            {
                events.push(EventKind::UserLimitSet {
                    user_id: user_id.clone(),
                    monthly_limit_micros: limit,
                    limit_source,
                });
            }
            if let Some(status) = status {
                events.extend(status_events(user, status)?);
            }
        }
        Ok(events)
    }

    /// Folds one event in.
    ///
    /// # Panics
    /// When the event does not follow the state (wrong org, seq gap, unknown
    /// entity): the log is corrupt and continuing would corrupt spend figures.
    /// This check stays on in release builds for that reason.
    pub fn apply(&mut self, event: &EntityEvent) {
        assert_eq!(
            event.org_id, self.id,
            "event of org {} applied to {}",
            event.org_id, self.id
        );
        assert_eq!(
            event.seq,
            self.seq + 1,
            "entity log of org {} has a gap: seq {} after {}",
            self.id,
            event.seq,
            self.seq
        );
        self.seq = event.seq;
        let at = event.at_ms;
        if self.rejudges(&event.kind) {
            self.rejudged_at_ms = at;
        }
        match &event.kind {
            EventKind::OrgCreated { .. } => panic!("org {} created twice", self.id),
            EventKind::OrgSettingsChanged {
                name,
                default_monthly_limit_micros,
                alert_thresholds_bps,
            } => {
                self.settings = OrgSettings {
                    name: name.clone(),
                    default_monthly_limit_micros: *default_monthly_limit_micros,
                    alert_thresholds_bps: alert_thresholds_bps.clone(),
                };
            }
            EventKind::OrgLimitSet {
                monthly_limit_micros,
            } => self.monthly_limit_micros = *monthly_limit_micros,
            EventKind::WebhookSet { url, format } => {
                self.webhook = Some(Webhook {
                    url: url.clone(),
                    format: *format,
                    seq: event.seq,
                    set_at_ms: at,
                });
            }
            EventKind::WebhookRemoved => self.webhook = None,
            EventKind::TokenCreated {
                token_id,
                token_hash,
                role,
                name,
            } => {
                let token = Token {
                    hash: *token_hash,
                    role: *role,
                    name: name.clone(),
                    created_at_ms: at,
                    revoked_at_ms: None,
                };
                let _ = self.tokens.insert(token_id.clone(), token);
            }
            EventKind::TokenRevoked { token_id } => {
                if let Some(t) = self.tokens.get_mut(token_id) {
                    t.revoked_at_ms = Some(at);
                }
            }
            EventKind::UserAdded {
                user_id,
                email,
                name,
                monthly_limit_micros,
                limit_source,
            } => {
                let idx = dense_idx(self.user_ids.len());
                self.user_ids.push(user_id.clone());
                let _ = self
                    .user_by_email
                    .insert(email.to_lowercase(), user_id.clone());
                let _ = self.users.insert(
                    user_id.clone(),
                    Box::new(User {
                        idx,
                        id: user_id.clone(),
                        email: email.clone(),
                        name: name.clone(),
                        status: UserStatus::Invited,
                        monthly_limit_micros: *monthly_limit_micros,
                        limit_source: *limit_source,
                        groups: Vec::new(),
                        memberships: Vec::new(),
                        created_at_ms: at,
                    }),
                );
            }
            EventKind::UserActivated { user_id } => {
                self.user_mut(user_id).status = UserStatus::Active
            }
            EventKind::UserSuspended { user_id } => {
                self.user_mut(user_id).status = UserStatus::Suspended;
            }
            EventKind::UserRemoved { user_id } => {
                let user = self.users.get_mut(user_id).expect("removed user exists");
                user.status = UserStatus::Removed;
                let email = user.email.to_lowercase();
                for g in std::mem::take(&mut user.groups) {
                    let group = self.groups.get_mut(&g).expect("member's group exists");
                    let _ = group.members.remove(user_id);
                }
                close_memberships(&mut user.memberships, at, |_| true);
                if self.user_by_email.get(&email) == Some(user_id) {
                    let _ = self.user_by_email.remove(&email);
                }
            }
            EventKind::UserLimitSet {
                user_id,
                monthly_limit_micros,
                limit_source,
            } => {
                let user = self.user_mut(user_id);
                user.monthly_limit_micros = *monthly_limit_micros;
                user.limit_source = *limit_source;
            }
            EventKind::UserProfileChanged {
                user_id,
                email,
                name,
            } => {
                let user = self.users.get_mut(user_id).expect("user exists");
                let old = user.email.to_lowercase();
                user.email = email.clone();
                user.name = name.clone();
                if self.user_by_email.get(&old) == Some(user_id) {
                    let _ = self.user_by_email.remove(&old);
                }
                let _ = self
                    .user_by_email
                    .insert(email.to_lowercase(), user_id.clone());
            }
            EventKind::GroupCreated {
                group_id,
                name,
                monthly_limit_micros,
            } => {
                let idx = dense_idx(self.group_ids.len());
                self.group_ids.push(group_id.clone());
                self.group_limits.push(*monthly_limit_micros);
                let _ = self.groups.insert(
                    group_id.clone(),
                    Group {
                        idx,
                        id: group_id.clone(),
                        name: name.clone(),
                        monthly_limit_micros: *monthly_limit_micros,
                        members: HashSet::default(),
                        deleted: false,
                        created_at_ms: at,
                    },
                );
            }
            EventKind::GroupRenamed { group_id, name } => {
                self.group_mut(group_id).name = name.clone();
            }
            EventKind::GroupDeleted { group_id } => {
                let group = self.groups.get_mut(group_id).expect("deleted group exists");
                group.deleted = true;
                let idx = group.idx;
                for u in std::mem::take(&mut group.members) {
                    let user = self.users.get_mut(&u).expect("group member exists");
                    user.groups.retain(|g| g != group_id);
                    close_memberships(&mut user.memberships, at, |m| m.group_idx == idx);
                }
                for key in self.keys.values_mut() {
                    key.group_ids.retain(|g| g != group_id);
                }
            }
            EventKind::GroupLimitSet {
                group_id,
                monthly_limit_micros,
            } => {
                let group = self.group_mut(group_id);
                group.monthly_limit_micros = *monthly_limit_micros;
                let idx = group.idx as usize;
                self.group_limits[idx] = *monthly_limit_micros;
            }
            EventKind::MemberAdded { group_id, user_id } => {
                let group = self.groups.get_mut(group_id).expect("group exists");
                assert!(
                    group.members.insert(user_id.clone()),
                    "{user_id} joined {group_id} twice"
                );
                let idx = group.idx;
                let user = self.user_mut(user_id);
                user.groups.push(group_id.clone());
                user.memberships.push(Membership {
                    group_idx: idx,
                    from_ms: at,
                    until_ms: i64::MAX,
                });
            }
            EventKind::MemberRemoved { group_id, user_id } => {
                let group = self.groups.get_mut(group_id).expect("group exists");
                assert!(
                    group.members.remove(user_id),
                    "{user_id} left {group_id} twice"
                );
                let idx = group.idx;
                let user = self.user_mut(user_id);
                user.groups.retain(|g| g != group_id);
                close_memberships(&mut user.memberships, at, |m| m.group_idx == idx);
            }
            EventKind::KeyCreated {
                key_id,
                name,
                user_id,
                group_ids,
                features,
                monthly_limit_micros,
                secret_hash,
                expires_at_ms,
            } => {
                let idx = dense_idx(self.key_ids.len());
                self.key_ids.push(key_id.clone());
                let _ = self.key_by_hash.insert(*secret_hash, key_id.clone());
                let _ = self.keys.insert(
                    key_id.clone(),
                    Box::new(Key {
                        idx,
                        id: key_id.clone(),
                        name: name.clone(),
                        user_id: user_id.clone(),
                        group_ids: group_ids.clone(),
                        features: features.clone(),
                        monthly_limit_micros: *monthly_limit_micros,
                        revoked: false,
                        secret_hash: *secret_hash,
                        created_at_ms: at,
                        expires_at_ms: *expires_at_ms,
                        previous_secret: None,
                    }),
                );
            }
            EventKind::KeyExpirySet {
                key_id,
                expires_at_ms,
            } => self.key_mut(key_id).expires_at_ms = *expires_at_ms,
            EventKind::KeyRotated {
                key_id,
                secret_hash,
                grace_ms,
            } => {
                let key = self.keys.get_mut(key_id).expect("key exists");
                let replaced = key.secret_hash;
                let dropped = key
                    .previous_secret
                    .replace((replaced, at.saturating_add(*grace_ms)));
                key.secret_hash = *secret_hash;
                if let Some((hash, _)) = dropped {
                    let _ = self.key_by_hash.remove(&hash);
                }
                let _ = self.key_by_hash.insert(*secret_hash, key_id.clone());
            }
            EventKind::KeyRenamed { key_id, name } => self.key_mut(key_id).name = name.clone(),
            EventKind::KeyOwnerChanged { key_id, user_id } => {
                self.key_mut(key_id).user_id = user_id.clone();
            }
            EventKind::KeyGroupsChanged { key_id, group_ids } => {
                self.key_mut(key_id).group_ids = group_ids.clone();
            }
            EventKind::KeyFeaturesChanged { key_id, features } => {
                self.key_mut(key_id).features = features.clone();
            }
            EventKind::KeyLimitSet {
                key_id,
                monthly_limit_micros,
            } => {
                self.key_mut(key_id).monthly_limit_micros = *monthly_limit_micros;
            }
            EventKind::KeyRevoked { key_id } => self.key_mut(key_id).revoked = true,
        }
    }

    fn user_mut(&mut self, id: &UserId) -> &mut User {
        self.users
            .get_mut(id)
            .unwrap_or_else(|| panic!("user {id} is not in org {}", self.id))
    }

    fn group_mut(&mut self, id: &GroupId) -> &mut Group {
        self.groups
            .get_mut(id)
            .unwrap_or_else(|| panic!("group {id} is not in org {}", self.id))
    }

    fn key_mut(&mut self, id: &KeyId) -> &mut Key {
        self.keys
            .get_mut(id)
            .unwrap_or_else(|| panic!("key {id} is not in org {}", self.id))
    }

    /// Forgets memberships that ended before `before_ms`: no usage that old
    /// can still be applied (it is older than the dedupe window).
    pub fn prune_memberships(&mut self, before_ms: i64) {
        for user in self.users.values_mut() {
            user.memberships.retain(|m| m.until_ms >= before_ms);
        }
    }
}

fn dense_idx(len: usize) -> u32 {
    u32::try_from(len).expect("entity counts are bounded far below u32::MAX")
}

fn close_memberships(ms: &mut [Membership], at: i64, which: impl Fn(&Membership) -> bool) {
    for m in ms.iter_mut().filter(|m| m.until_ms == i64::MAX && which(m)) {
        m.until_ms = at;
    }
}

fn check_group_room(user: &User) -> CmdResult<()> {
    if user.groups.len() >= GROUPS_PER_SUBJECT_MAX {
        return Err(CommandError::Rule(format!(
            "user {:?} is already in {GROUPS_PER_SUBJECT_MAX} groups",
            user.id
        )));
    }
    Ok(())
}

/// The events that move `user` to `to`: none when it is there already.
fn status_events(user: &User, to: UserStatus) -> CmdResult<Vec<EventKind>> {
    let user_id = user.id.clone();
    Ok(match (user.status, to) {
        (from, to) if from == to => vec![],
        (UserStatus::Removed, _) => {
            return Err(CommandError::Rule(format!("user {user_id:?} was removed")));
        }
        (_, UserStatus::Invited) => {
            return Err(CommandError::Rule(format!(
                "user {user_id:?} cannot go back to invited"
            )));
        }
        (_, UserStatus::Active) => vec![EventKind::UserActivated { user_id }],
        (_, UserStatus::Suspended) => vec![EventKind::UserSuspended { user_id }],
        (_, UserStatus::Removed) => vec![EventKind::UserRemoved { user_id }],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Domain rules in given/when/then form.

    use super::*;

    pub(crate) fn org() -> OrgId {
        OrgId::new("acme").unwrap()
    }
    pub(crate) fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }
    pub(crate) fn group(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }
    pub(crate) fn key(s: &str) -> KeyId {
        KeyId::new(s).unwrap()
    }

    /// Wraps kinds into events with consecutive seqs, one second apart.
    pub(crate) fn events(kinds: Vec<EventKind>) -> Vec<EntityEvent> {
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| EntityEvent {
                org_id: org(),
                seq: i as u64 + 1,
                at_ms: 1_000 * (i as i64 + 1),
                actor: Actor::Operator,
                kind,
            })
            .collect()
    }

    pub(crate) fn created(limit: Limit) -> EventKind {
        EventKind::OrgCreated {
            name: "Acme".into(),
            default_monthly_limit_micros: limit,
            alert_thresholds_bps: vec![5000, 8000, 10000],
        }
    }

    /// A member added with a limit of their own.
    pub(crate) fn added(id: &str, limit: Limit) -> EventKind {
        EventKind::UserAdded {
            user_id: user(id),
            email: format!("{id}@acme.test"),
            name: id.to_uppercase(),
            monthly_limit_micros: limit,
            limit_source: LimitSource::Own,
        }
    }

    fn limit_set(id: &str, limit: Limit, limit_source: LimitSource) -> EventKind {
        EventKind::UserLimitSet {
            user_id: user(id),
            monthly_limit_micros: limit,
            limit_source,
        }
    }

    pub(crate) fn fold(given: &[EntityEvent]) -> OrgDirectory {
        let mut dir = OrgDirectory::from_created(&given[0]);
        for e in &given[1..] {
            dir.apply(e);
        }
        dir
    }

    pub(crate) struct Given(Vec<EventKind>);

    pub(crate) fn given(kinds: Vec<EventKind>) -> Given {
        Given(kinds)
    }

    impl Given {
        pub(crate) fn when(self, cmd: Command) -> Then {
            let dir = fold(&events(self.0));
            Then(dir.handle(&cmd), dir)
        }
    }

    pub(crate) struct Then(CmdResult<Vec<EventKind>>, OrgDirectory);

    impl Then {
        pub(crate) fn then_expect_events(self, expected: Vec<EventKind>) -> OrgDirectory {
            assert_eq!(self.0, Ok(expected));
            let mut dir = self.1;
            for (seq, kind) in (dir.seq + 1..).zip(self.0.unwrap()) {
                dir.apply(&EntityEvent {
                    org_id: org(),
                    seq,
                    at_ms: 1_000_000,
                    actor: Actor::Operator,
                    kind,
                });
            }
            dir
        }

        pub(crate) fn then_expect_error(self, f: impl Fn(&CommandError) -> bool) {
            match self.0 {
                Err(e) if f(&e) => {}
                other => panic!("unexpected outcome: {other:?}"),
            }
        }
    }

    const USD: i64 = 1_000_000;

    #[test]
    fn creating_an_org_uses_default_thresholds_and_refuses_a_second_time() {
        let cmd = Command::CreateOrg {
            name: "Acme".into(),
            default_monthly_limit_micros: Some(50 * USD),
            alert_thresholds_bps: None,
            monthly_limit_micros: None,
        };
        assert_eq!(
            handle_create(false, &org(), &cmd),
            Ok(vec![created(Some(50 * USD))])
        );
        assert!(matches!(
            handle_create(true, &org(), &cmd),
            Err(CommandError::Conflict(_))
        ));
        let bad = Command::CreateOrg {
            name: " ".into(),
            default_monthly_limit_micros: None,
            alert_thresholds_bps: None,
            monthly_limit_micros: None,
        };
        assert!(matches!(
            handle_create(false, &org(), &bad),
            Err(CommandError::Invalid(_))
        ));
    }

    #[test]
    fn an_org_limit_is_set_at_creation_or_later_and_only_when_it_changes() {
        let cmd = Command::CreateOrg {
            name: "Acme".into(),
            default_monthly_limit_micros: None,
            alert_thresholds_bps: None,
            monthly_limit_micros: Some(1_000 * USD),
        };
        let limit_set = |l| EventKind::OrgLimitSet {
            monthly_limit_micros: l,
        };
        assert_eq!(
            handle_create(false, &org(), &cmd),
            Ok(vec![created(None), limit_set(Some(1_000 * USD))])
        );
        let change = |limit| Command::ChangeSettings {
            name: None,
            default_monthly_limit_micros: None,
            alert_thresholds_bps: None,
            monthly_limit_micros: Some(limit),
        };
        let dir = given(vec![created(None), limit_set(Some(1_000 * USD))])
            .when(change(Some(2_000 * USD)))
            .then_expect_events(vec![limit_set(Some(2_000 * USD))]);
        assert_eq!(dir.monthly_limit_micros, Some(2_000 * USD));
        let _ = given(vec![created(None), limit_set(Some(1_000 * USD))])
            .when(change(Some(1_000 * USD)))
            .then_expect_events(vec![]);
        given(vec![created(None)])
            .when(change(Some(0)))
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
    }

    #[test]
    fn a_webhook_needs_an_http_url_and_each_set_is_a_new_secret_version() {
        let tally = |url: String| Command::SetWebhook {
            url,
            format: WebhookFormat::Tally,
        };
        for bad in [
            "ftp://x.test/",
            "https://",
            "https:///path",
            "http://:80/",
            "https://x.test/a b",
            "https://x.test/\u{e9}",
            "x.test",
        ] {
            given(vec![created(None)])
                .when(tally(bad.into()))
                .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        }
        let long = format!("https://x.test/{}", "a".repeat(WEBHOOK_URL_LEN_MAX));
        given(vec![created(None)])
            .when(tally(long))
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        let set = |url: &str, format| EventKind::WebhookSet {
            url: url.into(),
            format,
        };
        let dir = given(vec![
            created(None),
            set("https://a.test/hook", WebhookFormat::Slack),
        ])
        .when(tally("http://127.0.0.1:9/hook?x=1".into()))
        .then_expect_events(vec![set(
            "http://127.0.0.1:9/hook?x=1",
            WebhookFormat::Tally,
        )]);
        let hook = dir.webhook.clone().unwrap();
        assert_eq!(
            (hook.url.as_str(), hook.format, hook.seq),
            ("http://127.0.0.1:9/hook?x=1", WebhookFormat::Tally, 3)
        );
        // The same URL in another format is set again (a new secret).
        let dir = given(vec![
            created(None),
            set("https://a.test/hook", WebhookFormat::Tally),
        ])
        .when(Command::SetWebhook {
            url: "https://a.test/hook".into(),
            format: WebhookFormat::Slack,
        })
        .then_expect_events(vec![set("https://a.test/hook", WebhookFormat::Slack)]);
        assert_eq!(dir.webhook.unwrap().format, WebhookFormat::Slack);
        let dir = given(vec![
            created(None),
            set("https://a.test/hook", WebhookFormat::Tally),
        ])
        .when(Command::RemoveWebhook)
        .then_expect_events(vec![EventKind::WebhookRemoved]);
        assert_eq!(dir.webhook, None);
        let _ = given(vec![created(None)])
            .when(Command::RemoveWebhook)
            .then_expect_events(vec![]);
        for f in [WebhookFormat::Tally, WebhookFormat::Slack] {
            assert_eq!(WebhookFormat::parse(f.as_str()), Some(f));
        }
        assert_eq!(WebhookFormat::parse("json"), None);
    }

    #[test]
    fn a_new_member_copies_the_org_default_limit() {
        let _ = given(vec![created(Some(50 * USD))])
            .when(Command::AddUser {
                user_id: user("alice"),
                email: "alice@acme.test".into(),
                name: "ALICE".into(),
                monthly_limit_micros: None,
                activate: false,
            })
            .then_expect_events(vec![EventKind::UserAdded {
                user_id: user("alice"),
                email: "alice@acme.test".into(),
                name: "ALICE".into(),
                monthly_limit_micros: Some(50 * USD),
                limit_source: LimitSource::OrgDefault,
            }]);
    }

    #[test]
    fn a_limit_remembers_whether_it_is_the_members_own_or_the_org_default() {
        let joined = EventKind::UserAdded {
            user_id: user("a"),
            email: "a@acme.test".into(),
            name: "A".into(),
            monthly_limit_micros: Some(50 * USD),
            limit_source: LimitSource::OrgDefault,
        };
        let base = vec![created(Some(50 * USD)), joined];
        let set = |limit| Command::UpdateUser {
            user_id: user("a"),
            email: None,
            name: None,
            monthly_limit_micros: Some(limit),
            status: None,
        };
        // The default's own amount, set for them, becomes theirs.
        let mut own = base.clone();
        own.push(limit_set("a", Some(50 * USD), LimitSource::Own));
        let dir = given(base.clone())
            .when(set(Some(50 * USD)))
            .then_expect_events(vec![own[2].clone()]);
        assert_eq!(dir.users["a"].limit_source, LimitSource::Own);
        // Set again: nothing changes.
        let _ = given(own.clone())
            .when(set(Some(50 * USD)))
            .then_expect_events(vec![]);
        // A reset puts the org's default back, as the default.
        let reset = |user_ids| Command::BulkUpdateUsers {
            user_ids,
            add_groups: vec![],
            remove_groups: vec![],
            monthly_limit_micros: None,
            reset_limit: true,
            status: None,
        };
        let dir = given(own)
            .when(reset(vec![user("a")]))
            .then_expect_events(vec![limit_set(
                "a",
                Some(50 * USD),
                LimitSource::OrgDefault,
            )]);
        assert_eq!(dir.users["a"].limit_source, LimitSource::OrgDefault);
        let _ = given(base.clone())
            .when(reset(vec![user("a")]))
            .then_expect_events(vec![]);
        // Reset after the default moved: the new default.
        let mut moved = base.clone();
        moved.push(EventKind::OrgSettingsChanged {
            name: "Acme".into(),
            default_monthly_limit_micros: None,
            alert_thresholds_bps: vec![5000, 8000, 10000],
        });
        let _ = given(moved)
            .when(reset(vec![user("a")]))
            .then_expect_events(vec![limit_set("a", None, LimitSource::OrgDefault)]);
        // Both a limit and a reset: refused.
        given(base)
            .when(Command::BulkUpdateUsers {
                user_ids: vec![user("a")],
                add_groups: vec![],
                remove_groups: vec![],
                monthly_limit_micros: Some(None),
                reset_limit: true,
                status: None,
            })
            .then_expect_error(|e| matches!(e, CommandError::Invalid(m) if m.contains("not both")));
    }

    #[test]
    fn an_individual_or_unlimited_limit_overrides_the_default() {
        let dir = given(vec![created(Some(50 * USD))])
            .when(Command::AddUser {
                user_id: user("bob"),
                email: "bob@acme.test".into(),
                name: "BOB".into(),
                monthly_limit_micros: Some(None),
                activate: true,
            })
            .then_expect_events(vec![
                added("bob", None),
                EventKind::UserActivated {
                    user_id: user("bob"),
                },
            ]);
        assert_eq!(dir.users["bob"].status, UserStatus::Active);
        assert_eq!(dir.users["bob"].monthly_limit_micros, None);
    }

    #[test]
    fn changing_the_default_does_not_touch_existing_members() {
        let dir = given(vec![
            created(Some(50 * USD)),
            added("alice", Some(50 * USD)),
        ])
        .when(Command::ChangeSettings {
            name: None,
            default_monthly_limit_micros: Some(Some(80 * USD)),
            alert_thresholds_bps: None,
            monthly_limit_micros: None,
        })
        .then_expect_events(vec![EventKind::OrgSettingsChanged {
            name: "Acme".into(),
            default_monthly_limit_micros: Some(80 * USD),
            alert_thresholds_bps: vec![5000, 8000, 10000],
        }]);
        assert_eq!(dir.users["alice"].monthly_limit_micros, Some(50 * USD));
    }

    #[test]
    fn ids_and_emails_are_unique() {
        given(vec![created(None), added("alice", None)])
            .when(Command::AddUser {
                user_id: user("alice"),
                email: "x@acme.test".into(),
                name: "X".into(),
                monthly_limit_micros: None,
                activate: false,
            })
            .then_expect_error(|e| matches!(e, CommandError::Conflict(_)));
        given(vec![created(None), added("alice", None)])
            .when(Command::AddUser {
                user_id: user("alice2"),
                email: "ALICE@acme.test".into(),
                name: "X".into(),
                monthly_limit_micros: None,
                activate: false,
            })
            .then_expect_error(|e| matches!(e, CommandError::Conflict(_)));
    }

    #[test]
    fn bad_values_are_invalid() {
        for (email, name, limit) in [
            ("nope", "N", None),
            ("a@b", "", None),
            ("a@b", "bell\u{7}", None),
            ("a@b", "N", Some(Some(0))),
            ("a@b", "N", Some(Some(-5))),
        ] {
            given(vec![created(None)])
                .when(Command::AddUser {
                    user_id: user("u"),
                    email: email.into(),
                    name: name.into(),
                    monthly_limit_micros: limit,
                    activate: false,
                })
                .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        }
    }

    #[test]
    fn a_first_own_key_activates_an_invited_user() {
        let dir = given(vec![created(None), added("alice", None)])
            .when(Command::CreateKey {
                key_id: key("k1"),
                name: "laptop".into(),
                user_id: Some(user("alice")),
                group_ids: vec![],
                features: vec!["chat".into(), "chat".into(), "embeddings".into()],
                monthly_limit_micros: None,
                secret_hash: [7; 32],
                expires_at_ms: None,
            })
            .then_expect_events(vec![
                EventKind::KeyCreated {
                    key_id: key("k1"),
                    name: "laptop".into(),
                    user_id: Some(user("alice")),
                    group_ids: vec![],
                    features: vec!["chat".into(), "embeddings".into()],
                    monthly_limit_micros: None,
                    secret_hash: [7; 32],
                    expires_at_ms: None,
                },
                EventKind::UserActivated {
                    user_id: user("alice"),
                },
            ]);
        assert_eq!(dir.key_by_hash(&[7; 32]).map(|k| k.id.as_str()), Some("k1"));
    }

    /// An org with alice, bob, group eng and alice's key k1 (secret [1; 32]).
    fn with_key() -> Vec<EventKind> {
        vec![
            created(None),
            added("alice", None),
            added("bob", None),
            EventKind::UserActivated {
                user_id: user("bob"),
            },
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "Eng".into(),
                monthly_limit_micros: None,
            },
            EventKind::KeyCreated {
                key_id: key("k1"),
                name: "laptop".into(),
                user_id: Some(user("alice")),
                group_ids: vec![],
                features: vec![],
                monthly_limit_micros: None,
                secret_hash: [1; 32],
                expires_at_ms: None,
            },
        ]
    }

    fn update(f: impl FnOnce(&mut KeyUpdate)) -> Command {
        let mut u = KeyUpdate::default();
        f(&mut u);
        Command::UpdateKey {
            key_id: key("k1"),
            features: None,
            monthly_limit_micros: None,
            name: u.name,
            user_id: u.user_id,
            group_ids: u.group_ids,
            expires_at_ms: u.expires_at_ms,
            revoke: false,
        }
    }

    #[derive(Default)]
    struct KeyUpdate {
        name: Option<String>,
        user_id: Option<Option<UserId>>,
        group_ids: Option<Vec<GroupId>>,
        expires_at_ms: Option<Option<i64>>,
    }

    /// A rotation's new secret works at once; the old one until the grace
    /// period ends (applied at 1 000 000 ms); a second rotation stops the
    /// first one's old secret at once.
    #[test]
    fn a_rotated_key_takes_both_secrets_for_the_grace_period_only() {
        let rotate = |hash: u8, grace_ms: i64| Command::RotateKey {
            key_id: key("k1"),
            secret_hash: [hash; 32],
            grace_ms,
        };
        let dir = given(with_key())
            .when(rotate(2, 5_000))
            .then_expect_events(vec![EventKind::KeyRotated {
                key_id: key("k1"),
                secret_hash: [2; 32],
                grace_ms: 5_000,
            }]);
        let at = 1_000_000;
        let id = |hash: u8, now: i64| dir.key_for_secret(&[hash; 32], now).map(|k| k.id.as_str());
        assert_eq!(id(2, at), Some("k1"));
        assert_eq!(id(1, at + 4_999), Some("k1"), "old secret within the grace");
        assert_eq!(id(1, at + 5_000), None, "old secret after the grace");
        assert_eq!(id(2, at + 50_000), Some("k1"));
        let mut kinds = with_key();
        kinds.push(EventKind::KeyRotated {
            key_id: key("k1"),
            secret_hash: [2; 32],
            grace_ms: 5_000,
        });
        // Again within the grace: [1] stops at once, [2] gets its own.
        let dir = given(kinds.clone())
            .when(rotate(3, 60_000))
            .then_expect_events(vec![EventKind::KeyRotated {
                key_id: key("k1"),
                secret_hash: [3; 32],
                grace_ms: 60_000,
            }]);
        let id = |hash: u8, now: i64| dir.key_for_secret(&[hash; 32], now).map(|k| k.id.as_str());
        assert_eq!(id(1, at), None);
        assert_eq!(id(2, at + 59_999), Some("k1"));
        assert_eq!(id(3, at), Some("k1"));
        // Bounds; a revoked key keeps no secret.
        given(kinds.clone())
            .when(rotate(4, KEY_ROTATION_GRACE_MAX_MS + 1))
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        given(kinds.clone())
            .when(rotate(4, -1))
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        kinds.push(EventKind::KeyRevoked { key_id: key("k1") });
        given(kinds)
            .when(rotate(4, 0))
            .then_expect_error(|e| matches!(e, CommandError::Rule(_)));
    }

    /// Name, owner, groups and expiry change by PATCH; the key keeps an
    /// owner, groups or both; unchanged values write nothing.
    #[test]
    fn a_key_is_renamed_moved_regrouped_and_given_an_expiry() {
        let dir = given(with_key())
            .when(update(|u| {
                u.name = Some("ci".into());
                u.user_id = Some(Some(user("bob")));
                u.group_ids = Some(vec![group("eng"), group("eng")]);
                u.expires_at_ms = Some(Some(2_000_000));
            }))
            .then_expect_events(vec![
                EventKind::KeyRenamed {
                    key_id: key("k1"),
                    name: "ci".into(),
                },
                EventKind::KeyOwnerChanged {
                    key_id: key("k1"),
                    user_id: Some(user("bob")),
                },
                EventKind::KeyGroupsChanged {
                    key_id: key("k1"),
                    group_ids: vec![group("eng")],
                },
                EventKind::KeyExpirySet {
                    key_id: key("k1"),
                    expires_at_ms: Some(2_000_000),
                },
            ]);
        let k = &dir.keys[&key("k1")];
        assert_eq!(
            (
                k.name.as_str(),
                k.user_id.clone(),
                k.group_ids.clone(),
                k.expires_at_ms
            ),
            ("ci", Some(user("bob")), vec![group("eng")], Some(2_000_000))
        );
        // The same values again: nothing.
        let _ = given(with_key())
            .when(update(|u| {
                u.name = Some("laptop".into());
                u.user_id = Some(Some(user("alice")));
                u.group_ids = Some(vec![]);
                u.expires_at_ms = Some(None);
            }))
            .then_expect_events(vec![]);
        // No owner and no groups; an unknown owner or group; a bad expiry.
        given(with_key())
            .when(update(|u| u.user_id = Some(None)))
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        given(with_key())
            .when(update(|u| u.user_id = Some(Some(user("zed")))))
            .then_expect_error(|e| matches!(e, CommandError::NotFound { .. }));
        given(with_key())
            .when(update(|u| u.group_ids = Some(vec![group("ops")])))
            .then_expect_error(|e| matches!(e, CommandError::NotFound { .. }));
        given(with_key())
            .when(update(|u| u.expires_at_ms = Some(Some(-1))))
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        // A group key without an owner.
        let _ = given(with_key())
            .when(update(|u| {
                u.user_id = Some(None);
                u.group_ids = Some(vec![group("eng")]);
            }))
            .then_expect_events(vec![
                EventKind::KeyOwnerChanged {
                    key_id: key("k1"),
                    user_id: None,
                },
                EventKind::KeyGroupsChanged {
                    key_id: key("k1"),
                    group_ids: vec![group("eng")],
                },
            ]);
    }

    #[test]
    fn a_key_needs_an_owner_or_groups_that_exist() {
        given(vec![created(None)])
            .when(Command::CreateKey {
                key_id: key("k1"),
                name: "k".into(),
                user_id: None,
                group_ids: vec![],
                features: vec![],
                monthly_limit_micros: None,
                secret_hash: [1; 32],
                expires_at_ms: None,
            })
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
        given(vec![created(None)])
            .when(Command::CreateKey {
                key_id: key("k1"),
                name: "k".into(),
                user_id: None,
                group_ids: vec![group("eng")],
                features: vec![],
                monthly_limit_micros: None,
                secret_hash: [1; 32],
                expires_at_ms: None,
            })
            .then_expect_error(|e| matches!(e, CommandError::NotFound { what: "group", .. }));
    }

    #[test]
    fn bulk_changes_are_all_or_nothing_and_skip_what_is_already_so() {
        let base = vec![
            created(None),
            added("a", None),
            added("b", None),
            added("c", None),
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "Engineering".into(),
                monthly_limit_micros: None,
            },
            EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("a"),
            },
        ];
        let dir = given(base.clone())
            .when(Command::BulkUpdateUsers {
                user_ids: vec![user("a"), user("b"), user("c")],
                add_groups: vec![group("eng")],
                remove_groups: vec![],
                monthly_limit_micros: Some(Some(USD)),
                reset_limit: false,
                status: None,
            })
            .then_expect_events(vec![
                limit_set("a", Some(USD), LimitSource::Own),
                EventKind::MemberAdded {
                    group_id: group("eng"),
                    user_id: user("b"),
                },
                limit_set("b", Some(USD), LimitSource::Own),
                EventKind::MemberAdded {
                    group_id: group("eng"),
                    user_id: user("c"),
                },
                limit_set("c", Some(USD), LimitSource::Own),
            ]);
        assert_eq!(dir.groups["eng"].members.len(), 3);
        // One unknown user refuses the whole change.
        given(base)
            .when(Command::BulkUpdateUsers {
                user_ids: vec![user("a"), user("ghost")],
                add_groups: vec![],
                remove_groups: vec![],
                monthly_limit_micros: None,
                reset_limit: false,
                status: Some(UserStatus::Suspended),
            })
            .then_expect_error(|e| matches!(e, CommandError::NotFound { what: "user", .. }));
    }

    #[test]
    fn removed_is_final_and_ends_memberships() {
        let dir = given(vec![
            created(None),
            added("a", None),
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "E".into(),
                monthly_limit_micros: None,
            },
            EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("a"),
            },
        ])
        .when(Command::UpdateUser {
            user_id: user("a"),
            email: None,
            name: None,
            monthly_limit_micros: None,
            status: Some(UserStatus::Removed),
        })
        .then_expect_events(vec![EventKind::UserRemoved { user_id: user("a") }]);
        assert!(dir.groups["eng"].members.is_empty());
        assert_eq!(dir.users["a"].memberships[0].until_ms, 1_000_000);
        let then = Then(
            dir.handle(&Command::UpdateUser {
                user_id: user("a"),
                email: None,
                name: None,
                monthly_limit_micros: None,
                status: Some(UserStatus::Active),
            }),
            dir.clone(),
        );
        then.then_expect_error(|e| matches!(e, CommandError::Rule(_)));
    }

    #[test]
    fn deleting_a_group_ends_memberships_and_key_associations_and_keeps_the_id() {
        let dir = given(vec![
            created(None),
            added("a", None),
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "E".into(),
                monthly_limit_micros: None,
            },
            EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("a"),
            },
            EventKind::KeyCreated {
                key_id: key("k"),
                name: "k".into(),
                user_id: None,
                group_ids: vec![group("eng")],
                features: vec![],
                monthly_limit_micros: None,
                secret_hash: [3; 32],
                expires_at_ms: None,
            },
        ])
        .when(Command::DeleteGroup {
            group_id: group("eng"),
        })
        .then_expect_events(vec![EventKind::GroupDeleted {
            group_id: group("eng"),
        }]);
        assert!(dir.users["a"].groups.is_empty());
        assert!(dir.keys["k"].group_ids.is_empty());
        assert!(matches!(
            dir.handle(&Command::CreateGroup {
                group_id: group("eng"),
                name: "E".into(),
                monthly_limit_micros: None
            }),
            Err(CommandError::Conflict(_))
        ));
    }

    #[test]
    fn a_revoked_token_keeps_its_id_and_frees_its_place_under_the_cap() {
        let t = |s: &str| TokenId::new(s).unwrap();
        let made = |id: &str, hash: u8, role: Role| EventKind::TokenCreated {
            token_id: t(id),
            token_hash: [hash; 32],
            role,
            name: format!("{id} token"),
        };
        let create = |id: &str, hash: u8, role: Role| Command::CreateToken {
            token_id: t(id),
            token_hash: [hash; 32],
            role,
            name: format!("{id} token"),
        };
        let roles = [Role::Admin, Role::Viewer, Role::Gateway];
        let mut kinds = vec![created(None)];
        kinds
            .extend((0..TOKENS_PER_ORG_MAX).map(|i| made(&format!("t{i}"), i as u8, roles[i % 3])));
        // Every role counts under the cap.
        given(kinds.clone())
            .when(create("new", 7, Role::Viewer))
            .then_expect_error(|e| matches!(e, CommandError::Rule(_)));
        given(vec![created(None)])
            .when(Command::RevokeToken { token_id: t("t0") })
            .then_expect_error(|e| matches!(e, CommandError::NotFound { .. }));
        let revoke = Command::RevokeToken { token_id: t("t0") };
        let dir = given(kinds.clone())
            .when(revoke.clone())
            .then_expect_events(vec![EventKind::TokenRevoked { token_id: t("t0") }]);
        assert!(dir.tokens[&t("t0")].revoked_at_ms.is_some());
        assert_eq!(dir.tokens[&t("t1")].role, Role::Viewer);
        assert_eq!(dir.tokens[&t("t2")].name, "t2 token");
        kinds.push(EventKind::TokenRevoked { token_id: t("t0") });
        // Revoked again: nothing happens; its id is not given again; its
        // place is.
        let _ = given(kinds.clone()).when(revoke).then_expect_events(vec![]);
        given(kinds.clone())
            .when(create("t0", 9, Role::Admin))
            .then_expect_error(|e| matches!(e, CommandError::Conflict(_)));
        let _ = given(kinds.clone())
            .when(create("new", 7, Role::Gateway))
            .then_expect_events(vec![made("new", 7, Role::Gateway)]);
        // A name is checked as every other name.
        given(kinds)
            .when(Command::CreateToken {
                token_id: t("new"),
                token_hash: [7; 32],
                role: Role::Admin,
                name: " ".into(),
            })
            .then_expect_error(|e| matches!(e, CommandError::Invalid(_)));
    }

    #[test]
    fn no_op_commands_produce_no_events() {
        let _ = given(vec![created(None), added("a", Some(5))])
            .when(Command::UpdateUser {
                user_id: user("a"),
                email: None,
                name: None,
                monthly_limit_micros: Some(Some(5)),
                status: Some(UserStatus::Invited),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    #[should_panic(expected = "gap")]
    fn a_sequence_gap_is_corruption() {
        let mut dir = fold(&events(vec![created(None)]));
        dir.apply(&EntityEvent {
            org_id: org(),
            seq: 3,
            at_ms: 0,
            actor: Actor::Operator,
            kind: added("a", None),
        });
    }

    #[test]
    fn actors_round_trip() {
        for a in [Actor::Operator, Actor::Token(TokenId::new("t1").unwrap())] {
            assert_eq!(Actor::parse(&a.to_string()), Some(a));
        }
        assert_eq!(Actor::parse("token:a b"), None);
    }
}
