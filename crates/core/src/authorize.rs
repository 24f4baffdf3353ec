//! May this key make this call? A request with key K by user U is allowed
//! iff U is active and under its monthly limit, K is not revoked and under its
//! limit (if it has one), every group U is a member of and every group K is
//! associated with is under its limit (if it has one: a group limit caps its
//! members' combined spend, whatever key they call with), the org is under
//! its limit, and the requested feature (if asked) is enabled on K.
//! Otherwise the decision names the first rule that failed, and always the
//! user it judged.
//!
//! U is the key's owner. A key without an owner belongs to its groups: the
//! gateway must name U (`user_id`), and U must be a member of one of them.

use crate::entity::{Key, UserStatus};
use crate::holds::{HOLDS_PER_ORG_MAX, Hold};
use crate::ids::{GroupId, KeyId, UserId};
use crate::ledger::Subject;
use crate::money::{Limit, format_usd};
use crate::org::OrgState;
use crate::time::Month;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Ok,
    UnknownKey,
    KeyRevoked,
    /// Past the key's `expires_at`.
    KeyExpired,
    UnknownUser,
    /// A personal key used on behalf of another user.
    KeyUserMismatch,
    /// A group key used without naming the user.
    UserRequired,
    /// A group key used by someone in none of its groups.
    UserNotInKeyGroups,
    UserNotActive,
    UserMonthlyLimit,
    KeyMonthlyLimit,
    GroupMonthlyLimit,
    OrgMonthlyLimit,
    FeatureNotEnabled,
    /// The org holds [`HOLDS_PER_ORG_MAX`] live holds already.
    TooManyHolds,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::UnknownKey => "unknown_key",
            Reason::KeyRevoked => "key_revoked",
            Reason::KeyExpired => "key_expired",
            Reason::UnknownUser => "unknown_user",
            Reason::KeyUserMismatch => "key_user_mismatch",
            Reason::UserRequired => "user_required",
            Reason::UserNotInKeyGroups => "user_not_in_key_groups",
            Reason::UserNotActive => "user_not_active",
            Reason::UserMonthlyLimit => "user_monthly_limit",
            Reason::KeyMonthlyLimit => "key_monthly_limit",
            Reason::GroupMonthlyLimit => "group_monthly_limit",
            Reason::OrgMonthlyLimit => "org_monthly_limit",
            Reason::FeatureNotEnabled => "feature_not_enabled",
            Reason::TooManyHolds => "too_many_holds",
        }
    }

    /// A refusal for budget: a smaller reserve may still be admitted.
    pub fn is_budget(self) -> bool {
        matches!(
            self,
            Reason::UserMonthlyLimit
                | Reason::KeyMonthlyLimit
                | Reason::GroupMonthlyLimit
                | Reason::OrgMonthlyLimit
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// For people: which rule, with figures.
    pub message: String,
    pub user_id: Option<UserId>,
    pub api_key_id: Option<KeyId>,
    /// The user's groups (where the call's spend counts) and the key's
    /// groups, sorted: the limits of all of them gate the call.
    pub group_ids: Vec<GroupId>,
    pub features: Vec<String>,
    /// The least budget left among the limits that apply, live holds
    /// counted as spent; `None` when none do.
    pub remaining_micros: Option<i64>,
    /// The largest reserve that would be admitted now (the least headroom
    /// of every limit the call counts against): set when the call is
    /// allowed or refused for budget, `None` when no limit applies.
    pub affordable_micros: Option<i64>,
}

impl Decision {
    pub fn unknown_key() -> Decision {
        Decision {
            allowed: false,
            reason: Reason::UnknownKey,
            message: "the api key is unknown".into(),
            user_id: None,
            api_key_id: None,
            group_ids: Vec::new(),
            features: Vec::new(),
            remaining_micros: None,
            affordable_micros: None,
        }
    }
}

/// The budgets a call counts against, judged for a reserve: committed
/// spend + live holds + reserve must fit each limit, and a limit already
/// reached refuses even a reserve of zero.
struct Budgets<'a> {
    org: &'a OrgState,
    month: Month,
    reserve: i64,
    /// The least headroom seen so far.
    least: Option<i64>,
    /// The first limit that refused, with its message.
    refused: Option<(Reason, String)>,
}

impl Budgets<'_> {
    /// Judges `subject` against `limit`; `who` names it in a refusal.
    fn judge(&mut self, s: Subject, limit: Limit, reason: Reason, who: impl FnOnce() -> String) {
        let Some(limit) = limit else { return };
        let spend = self.org.spend(self.month, s).spend_micros;
        let held = self.org.meter.holds.held(s);
        let used = spend.saturating_add(held);
        let left = limit.saturating_sub(used).max(0);
        self.least = Some(self.least.map_or(left, |l| l.min(left)));
        if self.refused.is_some() || (used < limit && used.saturating_add(self.reserve) <= limit) {
            return;
        }
        let month = self.month;
        let spent = if held > 0 {
            format!("spent {}, held {}", format_usd(spend), format_usd(held))
        } else {
            format!("spent {}", format_usd(spend))
        };
        let message = if used >= limit {
            format!(
                "{} reached the monthly limit of {} ({spent} in {month})",
                who(),
                format_usd(limit)
            )
        } else {
            format!(
                "{}: a reserve of {} does not fit the monthly limit of {} ({spent} in {month}; {} left)",
                who(),
                format_usd(self.reserve),
                format_usd(limit),
                format_usd(left)
            )
        };
        self.refused = Some((reason, message));
    }
}

/// Decides for `key` of `org` at `now_ms`. `user_hint` is the caller's user
/// when the gateway knows it (needed for group keys without an owner).
/// `reserve` is what the call would hold (0 for a plain authorize): it is
/// admitted only if committed + held + reserve fits every limit.
pub fn authorize(
    org: &OrgState,
    key: &Key,
    feature: Option<&str>,
    user_hint: Option<&str>,
    now_ms: i64,
    reserve: i64,
) -> Decision {
    let month = Month::from_unix_ms(now_ms);
    let dir = &org.dir;
    // The user the call is for: the one the gateway names, else the key's
    // owner. Named in every decision, refusals included.
    let judged = user_hint.or(key.user_id.as_ref().map(UserId::as_str));
    let mut d = Decision {
        allowed: false,
        reason: Reason::Ok,
        message: String::new(),
        user_id: judged.and_then(|u| UserId::new(u).ok()),
        api_key_id: Some(key.id.clone()),
        group_ids: key.group_ids.clone(),
        features: key.features.clone(),
        remaining_micros: None,
        affordable_micros: None,
    };
    let deny = |d: &mut Decision, reason: Reason, message: String| {
        d.reason = reason;
        d.message = message;
        d.group_ids.sort_unstable();
        d.group_ids.dedup();
        d.clone()
    };
    if key.revoked {
        return deny(
            &mut d,
            Reason::KeyRevoked,
            format!("key {} is revoked", key.id),
        );
    }
    if let Some(at) = key.expires_at_ms
        && now_ms >= at
    {
        return deny(
            &mut d,
            Reason::KeyExpired,
            format!(
                "key {} expired at {}",
                key.id,
                crate::time::format_utc_ms(at)
            ),
        );
    }
    let uid = match (&key.user_id, user_hint) {
        (Some(owner), Some(hint)) if owner.as_str() != hint => {
            return deny(
                &mut d,
                Reason::KeyUserMismatch,
                format!("key {} belongs to user {owner}, not {hint}", key.id),
            );
        }
        (Some(owner), _) => owner.as_str(),
        (None, None) => {
            return deny(
                &mut d,
                Reason::UserRequired,
                format!(
                    "key {} belongs to groups, not a user: pass the caller's user_id",
                    key.id
                ),
            );
        }
        (None, Some(hint)) => {
            let member = dir
                .users
                .get(hint)
                .is_some_and(|u| u.groups.iter().any(|g| key.group_ids.contains(g)));
            if !member && dir.users.contains_key(hint) {
                return deny(
                    &mut d,
                    Reason::UserNotInKeyGroups,
                    format!("user {hint} is in none of the groups of key {}", key.id),
                );
            }
            hint
        }
    };
    let Some(user) = dir.users.get(uid) else {
        return deny(
            &mut d,
            Reason::UnknownUser,
            format!("user {uid} is not in the org"),
        );
    };
    d.group_ids.extend(user.groups.iter().cloned());
    d.group_ids.sort_unstable();
    d.group_ids.dedup();
    if user.status != UserStatus::Active {
        return deny(
            &mut d,
            Reason::UserNotActive,
            format!("user {uid} is {}, not active", user.status.as_str()),
        );
    }
    // Every limit is judged (the least headroom is the affordable reserve);
    // the first that refuses names the refusal.
    let mut b = Budgets {
        org,
        month,
        reserve,
        least: None,
        refused: None,
    };
    b.judge(
        Subject::User(user.idx),
        user.monthly_limit_micros,
        Reason::UserMonthlyLimit,
        || format!("user {uid}"),
    );
    b.judge(
        Subject::Key(key.idx),
        key.monthly_limit_micros,
        Reason::KeyMonthlyLimit,
        || format!("key {}", key.id),
    );
    for gid in &d.group_ids {
        if let Some(group) = dir.groups.get(gid).filter(|g| !g.deleted) {
            b.judge(
                Subject::Group(group.idx),
                group.monthly_limit_micros,
                Reason::GroupMonthlyLimit,
                || format!("group {gid}"),
            );
        }
    }
    b.judge(
        Subject::Org,
        dir.monthly_limit_micros,
        Reason::OrgMonthlyLimit,
        || format!("org {}", dir.id),
    );
    d.affordable_micros = b.least;
    if let Some((reason, message)) = b.refused {
        return deny(&mut d, reason, message);
    }
    if let Some(f) = feature
        && !key.features.iter().any(|k| feature_covers(k, f))
    {
        d.affordable_micros = None;
        return deny(
            &mut d,
            Reason::FeatureNotEnabled,
            format!("feature {f:?} is not enabled on key {}", key.id),
        );
    }
    d.remaining_micros = b.least;
    d.allowed = true;
    d.message = "allowed".into();
    d
}

/// Whether a key's feature `granted` covers the feature a call asks for:
/// the same, or `granted` ends in `*` and `asked` starts with what is
/// before it (`model:*` covers every `model:…`, `model:gpt-4*` covers
/// `model:gpt-4o`).
pub fn feature_covers(granted: &str, asked: &str) -> bool {
    match granted.strip_suffix('*') {
        Some(prefix) => asked.starts_with(prefix),
        None => granted == asked,
    }
}

/// What a reserving authorize asks for.
#[derive(Debug, Clone, Copy)]
pub struct HoldRequest<'a> {
    /// The id the call's usage event will carry.
    pub request_id: &'a str,
    pub reserve_micros: i64,
    pub ttl_ms: i64,
}

/// A hold as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedHold {
    pub held_micros: i64,
    pub expires_at_ms: i64,
    /// False when the request repeated a live hold (nothing new placed).
    pub new: bool,
}

/// Why a reserve was not judged at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldConflict {
    #[error(
        "request_id {request_id:?} holds {held} for user {user} on key {key} already; \
         a repeat must name the same reserve, user and key"
    )]
    Differs {
        request_id: String,
        held: String,
        user: String,
        key: String,
    },
    #[error("usage with request_id {0:?} was counted already: a request id names one call")]
    Counted(String),
}

/// Authorize with a reserve: decides as [`authorize`] does with
/// `req.reserve_micros`, and when the call is admitted places the hold on
/// every scope it counts against (the user, the key, the org, the user's
/// groups and the key's groups), all at once. Idempotent: a repeat of a live
/// hold (same reserve, user and key) answers allowed with that hold and
/// places nothing. Expire due holds first ([`crate::holds::Holds::expire`]).
pub fn reserve(
    org: &mut OrgState,
    key_id: &KeyId,
    feature: Option<&str>,
    user_hint: Option<&str>,
    req: HoldRequest<'_>,
    now_ms: i64,
) -> Result<(Decision, Option<PlacedHold>), HoldConflict> {
    let Some(key) = org.dir.keys.get(key_id) else {
        return Ok((Decision::unknown_key(), None));
    };
    if let Some(live) = org.meter.holds.get(req.request_id) {
        let dir = &org.dir;
        let user_ok = user_hint
            .or(key.user_id.as_ref().map(UserId::as_str))
            .and_then(|u| dir.users.get(u))
            .is_some_and(|u| u.idx == live.user);
        if live.amount_micros != req.reserve_micros || live.key != key.idx || !user_ok {
            return Err(HoldConflict::Differs {
                request_id: req.request_id.to_owned(),
                held: format_usd(live.amount_micros),
                user: dir.user_ids[live.user as usize].to_string(),
                key: dir.key_ids[live.key as usize].to_string(),
            });
        }
        let placed = PlacedHold {
            held_micros: live.amount_micros,
            expires_at_ms: live.expires_at_ms,
            new: false,
        };
        // The call stays admitted; the figures are as of now, with its own
        // hold counted once, as when it was placed.
        let key_id = key.id.clone();
        let Some(hold) = org.meter.holds.remove(req.request_id) else {
            return Ok((Decision::unknown_key(), None));
        };
        let mut d = match org.dir.keys.get(&key_id) {
            Some(key) => authorize(org, key, feature, user_hint, now_ms, 0),
            None => Decision::unknown_key(),
        };
        let after = d.affordable_micros.map(|a| (a - hold.amount_micros).max(0));
        org.meter.holds.insert(req.request_id, hold);
        d.allowed = true;
        d.reason = Reason::Ok;
        d.message = format!(
            "allowed: the hold for request_id {:?} is live",
            req.request_id
        );
        d.remaining_micros = after;
        d.affordable_micros = after;
        return Ok((d, Some(placed)));
    }
    if org
        .meter
        .dedupe
        .contains(crate::dedupe::hash_request_id(req.request_id))
    {
        return Err(HoldConflict::Counted(req.request_id.to_owned()));
    }
    let d = authorize(org, key, feature, user_hint, now_ms, req.reserve_micros);
    if !d.allowed {
        return Ok((d, None));
    }
    if org.meter.holds.len() >= HOLDS_PER_ORG_MAX {
        let mut d = d;
        d.allowed = false;
        d.reason = Reason::TooManyHolds;
        d.message =
            format!("the org holds {HOLDS_PER_ORG_MAX} live holds already: settle or release some");
        return Ok((d, None));
    }
    let dir = &org.dir;
    // An admitted call always has its user.
    let Some(user) = d.user_id.as_ref().and_then(|u| dir.users.get(u)) else {
        return Ok((Decision::unknown_key(), None));
    };
    let user = user.idx;
    let mut groups: Vec<u32> = d
        .group_ids
        .iter()
        .filter_map(|g| dir.groups.get(g).filter(|g| !g.deleted).map(|g| g.idx))
        .collect();
    groups.sort_unstable();
    let hold = Hold {
        amount_micros: req.reserve_micros,
        placed_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(req.ttl_ms),
        user,
        key: key.idx,
        groups: groups.into(),
    };
    let placed = PlacedHold {
        held_micros: hold.amount_micros,
        expires_at_ms: hold.expires_at_ms,
        new: true,
    };
    org.meter.holds.insert(req.request_id, hold);
    // The figures after the hold: it is on every scope that was judged.
    let mut d = d;
    d.remaining_micros = d.remaining_micros.map(|r| r - req.reserve_micros);
    d.affordable_micros = d.affordable_micros.map(|r| r - req.reserve_micros);
    Ok((d, Some(placed)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::tests::{added, created, events, group, key, user};
    use crate::entity::{EntityEvent, EventKind};
    use crate::org::MeterConfig;
    use crate::usage::RawUsage;

    const NOV: i64 = 1_793_491_200_000;
    const USD: i64 = 1_000_000;

    fn org() -> OrgState {
        let evs = events(vec![
            created(Some(50 * USD)),
            added("alice", Some(50 * USD)),
            added("bob", None),
            EventKind::UserActivated {
                user_id: user("alice"),
            },
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "E".into(),
                monthly_limit_micros: Some(100 * USD),
            },
            EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("alice"),
            },
            EventKind::KeyCreated {
                key_id: key("ka"),
                name: "alice".into(),
                user_id: Some(user("alice")),
                group_ids: vec![],
                features: vec!["chat".into()],
                monthly_limit_micros: Some(30 * USD),
                secret_hash: [1; 32],
                expires_at_ms: None,
            },
            EventKind::KeyCreated {
                key_id: key("kg"),
                name: "team".into(),
                user_id: None,
                group_ids: vec![group("eng")],
                features: vec!["chat".into(), "embeddings".into()],
                monthly_limit_micros: None,
                secret_hash: [2; 32],
                expires_at_ms: None,
            },
        ]);
        let mut s = OrgState::new(&evs[0], MeterConfig::default());
        for e in &evs[1..] {
            s.apply_entity(e);
        }
        s
    }

    fn spend(s: &mut OrgState, req: &str, user: &str, key: &str, cost: i64) {
        let ev = RawUsage {
            request_id: req,
            org_id: "acme",
            user_id: user,
            api_key_id: key,
            cost_micros: Some(cost),
            occurred_at_ms: Some(NOV),
            ..RawUsage::default()
        }
        .validate()
        .unwrap();
        let _ = s.apply_usage(&ev, NOV);
    }

    fn decide(s: &OrgState, k: &str, feature: Option<&str>, hint: Option<&str>) -> Decision {
        authorize(s, &s.dir.keys[k], feature, hint, NOV + 1, 0)
    }

    #[test]
    fn an_active_user_under_every_limit_is_allowed_with_the_least_budget_left() {
        let mut s = org();
        spend(&mut s, "r1", "alice", "ka", 10 * USD);
        let d = decide(&s, "ka", Some("chat"), None);
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.reason, Reason::Ok);
        // user: 50 - 10 = 40; key: 30 - 10 = 20.
        assert_eq!(d.remaining_micros, Some(20 * USD));
        assert_eq!(d.group_ids, vec![group("eng")]);
    }

    /// A trailing `*` grants a family of features (the LiteLLM integration
    /// asks for `model:<name>`); anything else is matched exactly.
    #[test]
    fn a_wildcard_feature_covers_the_features_it_starts() {
        for (granted, asked, covers) in [
            ("model:*", "model:gpt-4o", true),
            ("model:*", "model:", true),
            ("model:gpt-4*", "model:gpt-4o-mini", true),
            ("model:gpt-4*", "model:gpt-3.5", false),
            ("model:gpt-4o", "model:gpt-4o", true),
            ("model:gpt-4o", "model:gpt-4o-mini", false),
            ("model:*", "chat", false),
            ("*", "anything", true),
        ] {
            assert_eq!(feature_covers(granted, asked), covers, "{granted} {asked}");
        }
        assert!(crate::entity::check_features(&["model:*".into(), "*".into()]).is_ok());
        assert!(crate::entity::check_features(&["model:*x".into()]).is_err());
        assert!(crate::entity::check_features(&["mo*del".into()]).is_err());
    }

    #[test]
    fn each_rule_denies_with_its_reason() {
        let mut s = org();
        assert_eq!(
            decide(&s, "ka", Some("images"), None).reason,
            Reason::FeatureNotEnabled
        );
        assert_eq!(
            decide(&s, "kg", None, Some("bob")).reason,
            Reason::UserNotInKeyGroups
        );
        assert_eq!(
            decide(&s, "kg", None, Some("carol")).reason,
            Reason::UnknownUser
        );
        assert_eq!(
            decide(&s, "ka", None, Some("bob")).reason,
            Reason::KeyUserMismatch
        );
        spend(&mut s, "r1", "alice", "kg", 50 * USD);
        let d = decide(&s, "ka", None, None);
        assert_eq!(d.reason, Reason::UserMonthlyLimit);
        assert!(
            d.message.contains("monthly limit of $50.00"),
            "{}",
            d.message
        );
        assert_eq!(d.remaining_micros, None);
        // The group key: the gateway must name a member of the group.
        assert_eq!(decide(&s, "kg", None, None).reason, Reason::UserRequired);
        assert_eq!(
            decide(&s, "kg", None, Some("alice")).reason,
            Reason::UserMonthlyLimit
        );
        let raise = EntityEvent {
            org_id: s.dir.id.clone(),
            seq: s.dir.seq + 1,
            at_ms: NOV,
            actor: crate::entity::Actor::Operator,
            kind: EventKind::UserLimitSet {
                user_id: user("alice"),
                monthly_limit_micros: Some(500 * USD),
                limit_source: crate::entity::LimitSource::Own,
            },
        };
        s.apply_entity(&raise);
        // alice has 450 left, the group 50 of 100.
        let d = decide(&s, "kg", Some("embeddings"), Some("alice"));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.remaining_micros, Some(50 * USD));
        spend(&mut s, "r2", "alice", "kg", 50 * USD);
        assert_eq!(
            decide(&s, "kg", None, Some("alice")).reason,
            Reason::GroupMonthlyLimit
        );
    }

    /// A group limit caps its members' combined spend, whatever key a
    /// member calls with: alice's personal key (in no group) is refused once
    /// eng, which she is a member of, reached its limit through bob.
    #[test]
    fn a_group_limit_gates_every_member_on_any_key() {
        let mut s = org();
        let join = EntityEvent {
            org_id: s.dir.id.clone(),
            seq: s.dir.seq + 1,
            at_ms: 1,
            actor: crate::entity::Actor::Operator,
            kind: EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("bob"),
            },
        };
        s.apply_entity(&join);
        spend(&mut s, "r1", "bob", "kg", 99 * USD);
        let d = decide(&s, "ka", None, None);
        assert!(d.allowed, "{d:?}");
        // eng has 1 left, less than alice's 50 and her key's 30.
        assert_eq!(d.remaining_micros, Some(USD));
        spend(&mut s, "r2", "bob", "kg", USD);
        let d = decide(&s, "ka", None, None);
        assert_eq!(d.reason, Reason::GroupMonthlyLimit, "{d:?}");
        assert!(d.message.contains("group eng"), "{}", d.message);
        assert_eq!(d.user_id, Some(user("alice")));
        assert_eq!(d.group_ids, vec![group("eng")]);
    }

    /// Every decision names the user it judged, refusals included.
    #[test]
    fn every_decision_names_the_user_it_judged() {
        let s = org();
        let named = |k: &str, hint: Option<&str>| decide(&s, k, None, hint).user_id;
        assert_eq!(
            named("kg", Some("bob")),
            Some(user("bob")),
            "not in kg's groups"
        );
        assert_eq!(
            named("ka", Some("bob")),
            Some(user("bob")),
            "not ka's owner"
        );
        assert_eq!(named("ka", None), Some(user("alice")));
        assert_eq!(named("kg", Some("carol")), Some(user("carol")), "unknown");
        assert_eq!(named("kg", None), None, "no user to judge");
    }

    #[test]
    fn the_org_limit_cuts_everyone_off_and_a_raise_lifts_it() {
        let mut s = org();
        let set = |s: &mut OrgState, limit| {
            let ev = EntityEvent {
                org_id: s.dir.id.clone(),
                seq: s.dir.seq + 1,
                at_ms: NOV,
                actor: crate::entity::Actor::Operator,
                kind: EventKind::OrgLimitSet {
                    monthly_limit_micros: limit,
                },
            };
            s.apply_entity(&ev);
        };
        set(&mut s, Some(60 * USD));
        spend(&mut s, "r1", "alice", "ka", 25 * USD);
        // The org's 35 left is more than the key's 5: the key's counts.
        assert_eq!(decide(&s, "ka", None, None).remaining_micros, Some(5 * USD));
        spend(&mut s, "r2", "bob", "", 35 * USD);
        let d = decide(&s, "kg", None, Some("alice"));
        assert_eq!(d.reason, Reason::OrgMonthlyLimit, "{d:?}");
        assert!(
            d.message.contains("monthly limit of $60.00"),
            "{}",
            d.message
        );
        let cut =
            s.meter.ledger.pending_enforcement().iter().any(|e| {
                e.subject == Subject::Org && e.kind == crate::ledger::EnforcementKind::CutOff
            });
        assert!(cut, "the org's cutoff is an enforcement event");
        set(&mut s, Some(100 * USD));
        let d = decide(&s, "kg", None, Some("alice"));
        assert!(d.allowed, "{d:?}");
        // user 50 - 25, group 100 - 25, org 100 - 60: the user's is least.
        assert_eq!(d.remaining_micros, Some(25 * USD));
    }

    #[test]
    fn key_limit_and_revocation() {
        let mut s = org();
        spend(&mut s, "r1", "alice", "ka", 30 * USD);
        assert_eq!(decide(&s, "ka", None, None).reason, Reason::KeyMonthlyLimit);
        let revoke = EntityEvent {
            org_id: s.dir.id.clone(),
            seq: s.dir.seq + 1,
            at_ms: NOV,
            actor: crate::entity::Actor::Operator,
            kind: EventKind::KeyRevoked { key_id: key("ka") },
        };
        s.apply_entity(&revoke);
        assert_eq!(decide(&s, "ka", None, None).reason, Reason::KeyRevoked);
    }

    /// From its expiry on, a key is refused with `key_expired` (the check
    /// comes before the budget ones: the message names the time).
    #[test]
    fn an_expired_key_is_refused_from_its_expiry_on() {
        let mut s = org();
        let expire_at = NOV + 3_600_000;
        s.apply_entity(&EntityEvent {
            org_id: s.dir.id.clone(),
            seq: s.dir.seq + 1,
            at_ms: NOV,
            actor: crate::entity::Actor::Operator,
            kind: EventKind::KeyExpirySet {
                key_id: key("ka"),
                expires_at_ms: Some(expire_at),
            },
        });
        let at = |now: i64| authorize(&s, &s.dir.keys["ka"], None, None, now, 0);
        assert!(at(expire_at - 1).allowed);
        let d = at(expire_at);
        assert_eq!((d.allowed, d.reason), (false, Reason::KeyExpired), "{d:?}");
        assert!(
            d.message.contains("expired at 2026-11-01T01:00:00Z"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_new_month_starts_from_zero() {
        let mut s = org();
        spend(&mut s, "r1", "alice", "", 50 * USD);
        assert!(!decide(&s, "ka", None, None).allowed);
        let dec = Month::from_unix_ms(NOV).next().start_ms();
        let d = authorize(&s, &s.dir.keys["ka"], None, None, dec, 0);
        assert!(d.allowed, "{d:?}");
    }
}

#[cfg(test)]
mod hold_tests {
    use super::*;
    use crate::entity::EventKind;
    use crate::entity::tests::{added, created, events, group, key, user};
    use crate::holds::HOLD_TTL_DEFAULT_MS;
    use crate::org::MeterConfig;
    use crate::usage::RawUsage;
    use proptest::prelude::*;

    const NOV: i64 = 1_793_491_200_000;
    const USD: i64 = 1_000_000;

    /// alice ($0.60 on her key ka) and bob (kb, no limit) share eng ($1.00)
    /// and the group key kg; the org is capped at $1.50.
    fn org() -> OrgState {
        let personal = |id: &str, owner: &str, limit| EventKind::KeyCreated {
            key_id: key(id),
            name: id.into(),
            user_id: Some(user(owner)),
            group_ids: vec![],
            features: vec![],
            monthly_limit_micros: limit,
            secret_hash: [id.as_bytes()[1]; 32],
            expires_at_ms: None,
        };
        let evs = events(vec![
            created(None),
            added("alice", None),
            added("bob", None),
            EventKind::UserActivated {
                user_id: user("alice"),
            },
            EventKind::UserActivated {
                user_id: user("bob"),
            },
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "E".into(),
                monthly_limit_micros: Some(USD),
            },
            EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("alice"),
            },
            EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user("bob"),
            },
            personal("ka", "alice", Some(600_000)),
            personal("kb", "bob", None),
            EventKind::KeyCreated {
                key_id: key("kg"),
                name: "team".into(),
                user_id: None,
                group_ids: vec![group("eng")],
                features: vec![],
                monthly_limit_micros: None,
                secret_hash: [9; 32],
                expires_at_ms: None,
            },
            EventKind::OrgLimitSet {
                monthly_limit_micros: Some(1_500_000),
            },
        ]);
        let mut s = OrgState::new(&evs[0], MeterConfig::default());
        for e in &evs[1..] {
            s.apply_entity(e);
        }
        s
    }

    fn hold(
        s: &mut OrgState,
        k: &str,
        who: Option<&str>,
        req: &str,
        micros: i64,
        now: i64,
    ) -> Result<(Decision, Option<PlacedHold>), HoldConflict> {
        let req = HoldRequest {
            request_id: req,
            reserve_micros: micros,
            ttl_ms: HOLD_TTL_DEFAULT_MS,
        };
        reserve(s, &key(k), None, who, req, now)
    }

    fn usage(s: &mut OrgState, req: &str, who: &str, k: &str, cost: i64, at: i64) {
        let ev = RawUsage {
            request_id: req,
            org_id: "acme",
            user_id: who,
            api_key_id: k,
            cost_micros: Some(cost),
            occurred_at_ms: Some(at),
            ..RawUsage::default()
        }
        .validate()
        .unwrap();
        let _ = s.apply_usage(&ev, at);
    }

    fn spent(s: &OrgState, subject: Subject) -> i64 {
        s.spend(Month::from_unix_ms(NOV), subject).spend_micros
    }

    #[test]
    fn a_reserve_fits_every_limit_or_is_refused_with_what_would_fit() {
        let mut s = org();
        let eng = Subject::Group(s.dir.groups["eng"].idx);
        let (d, h) = hold(&mut s, "ka", None, "r1", 500_000, NOV).unwrap();
        assert!(d.allowed, "{d:?}");
        assert_eq!(h.unwrap().held_micros, 500_000);
        // Held on every scope: alice, ka, eng and the org.
        for subject in [Subject::User(0), Subject::Key(0), eng, Subject::Org] {
            assert_eq!(s.meter.holds.held(subject), 500_000, "{subject:?}");
        }
        // ka has $0.10 left: a reserve of $0.11 is refused, never clamped.
        let (d, h) = hold(&mut s, "ka", None, "r2", 110_000, NOV).unwrap();
        assert_eq!(d.reason, Reason::KeyMonthlyLimit, "{d:?}");
        assert_eq!(d.affordable_micros, Some(100_000));
        assert!(
            d.message.contains("monthly limit of $0.60"),
            "{}",
            d.message
        );
        assert!(h.is_none());
        assert_eq!(s.meter.holds.held(Subject::Org), 500_000, "all or none");
        // bob on the group key: eng has $0.50 left after alice's hold.
        let (d, _) = hold(&mut s, "kg", Some("bob"), "r3", 600_000, NOV).unwrap();
        assert_eq!(d.reason, Reason::GroupMonthlyLimit, "{d:?}");
        assert_eq!(d.affordable_micros, Some(500_000));
        let (d, _) = hold(&mut s, "kb", None, "r3", 500_000, NOV).unwrap();
        assert!(d.allowed, "{d:?}");
        // eng is fully held: a plain authorize counts holds as spent.
        let d = authorize(&s, &s.dir.keys["kb"], None, None, NOV, 0);
        assert_eq!(d.reason, Reason::GroupMonthlyLimit, "{d:?}");
        assert!(d.message.contains("held $1.00"), "{}", d.message);
        // Settling: alice's call cost $0.20, not $0.50; bob's nothing.
        usage(&mut s, "r1", "alice", "ka", 200_000, NOV + 5);
        assert_eq!(s.meter.holds.held(eng), 500_000);
        assert_eq!(spent(&s, eng), 200_000);
        let d = authorize(&s, &s.dir.keys["kb"], None, None, NOV, 0);
        assert_eq!(d.remaining_micros, Some(300_000), "{d:?}");
        assert_eq!(s.meter.holds.take_counts().settled, 1);
    }

    #[test]
    fn a_repeat_returns_the_same_hold_and_a_different_one_conflicts() {
        let mut s = org();
        let (_, first) = hold(&mut s, "ka", None, "r1", 300_000, NOV).unwrap();
        let (d, again) = hold(&mut s, "ka", None, "r1", 300_000, NOV + 1_000).unwrap();
        assert!(d.allowed, "{d:?}");
        let (first, again) = (first.unwrap(), again.unwrap());
        assert_eq!(first.expires_at_ms, again.expires_at_ms);
        assert!(first.new && !again.new);
        assert_eq!(s.meter.holds.held(Subject::Org), 300_000, "never a second");
        let other = hold(&mut s, "ka", None, "r1", 300_001, NOV).unwrap_err();
        assert!(matches!(other, HoldConflict::Differs { .. }), "{other}");
        let other = hold(&mut s, "kg", Some("alice"), "r1", 300_000, NOV).unwrap_err();
        assert!(matches!(other, HoldConflict::Differs { .. }), "{other}");
        usage(&mut s, "r1", "alice", "ka", 300_000, NOV + 5);
        let counted = hold(&mut s, "ka", None, "r1", 300_000, NOV + 10).unwrap_err();
        assert_eq!(counted, HoldConflict::Counted("r1".into()));
    }

    #[test]
    fn expiry_and_release_free_the_budget() {
        let mut s = org();
        let (_, h) = hold(&mut s, "ka", None, "r1", 600_000, NOV).unwrap();
        let expires = h.unwrap().expires_at_ms;
        assert!(!hold(&mut s, "ka", None, "r2", 1, NOV).unwrap().0.allowed);
        assert_eq!(s.meter.holds.expire(expires - 1), 0);
        assert_eq!(s.meter.holds.expire(expires), 1);
        assert!(
            hold(&mut s, "ka", None, "r2", 600_000, expires)
                .unwrap()
                .0
                .allowed
        );
        assert!(s.meter.holds.remove("r2").is_some());
        assert_eq!(s.meter.holds.held(Subject::Org), 0);
        // The first call's usage arrives after its hold expired: counted in
        // full, and counted as late.
        usage(&mut s, "r1", "alice", "ka", 700_000, NOV + 5);
        assert_eq!(spent(&s, Subject::Key(0)), 700_000);
        assert_eq!(s.meter.holds.take_counts().usage_after_expiry, 1);
    }

    /// An org's first usage on a partition resets its meter; the holds
    /// placed before it stay (they were dropped: 113 calls admitted on a
    /// $1.00 org limit in the suite's group scenario).
    #[test]
    fn holds_outlive_a_meter_reset() {
        let mut s = org();
        let (d, _) = hold(&mut s, "kb", None, "r1", USD, NOV).unwrap();
        assert!(d.allowed, "{d:?}");
        s.reset_meter();
        assert_eq!(s.meter.holds.held(Subject::Org), USD);
        let (d, _) = hold(&mut s, "kb", None, "r2", 1, NOV).unwrap();
        assert_eq!(d.reason, Reason::GroupMonthlyLimit, "{d:?}");
    }

    /// Only counted usage settles: refused usage leaves its hold (so a
    /// restart, which goes by the counted request ids, agrees).
    #[test]
    fn refused_usage_leaves_its_hold() {
        let mut s = org();
        let (d, _) = hold(&mut s, "ka", None, "r1", 100_000, NOV).unwrap();
        assert!(d.allowed, "{d:?}");
        let ahead = NOV + 3_600_000;
        let ev = RawUsage {
            request_id: "r1",
            org_id: "acme",
            user_id: "alice",
            api_key_id: "ka",
            cost_micros: Some(100_000),
            occurred_at_ms: Some(ahead),
            ..RawUsage::default()
        }
        .validate()
        .unwrap();
        assert_eq!(
            s.apply_usage(&ev, NOV),
            crate::org::UsageOutcome::Rejected(crate::org::Rejection::FromTheFuture)
        );
        assert!(s.meter.holds.get("r1").is_some());
        usage(&mut s, "r1", "alice", "ka", 100_000, NOV + 5);
        assert!(s.meter.holds.get("r1").is_none());
        assert_eq!(s.meter.holds.held(Subject::Org), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Who calls (alice on ka, bob on kb, alice or bob on kg), request, reserve, TTL.
        Reserve(u8, u8, i64, i64),
        /// The request's usage with its actual cost (plain usage for a
        /// request that holds nothing).
        Usage(u8, i64),
        Release(u8),
        Wait(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0u8..40, 0i64..400_000, 1_000i64..100_000).prop_map(|(w, r, m, t)| Op::Reserve(w, r, m, t)),
            3 => (0u8..40, 0i64..500_000).prop_map(|(r, c)| Op::Usage(r, c)),
            1 => (0u8..40).prop_map(Op::Release),
            1 => (0i64..60_000).prop_map(Op::Wait),
        ]
    }

    /// held(s) = the sum of the live holds placed on s, for every subject.
    fn sums_match(s: &OrgState) -> Result<(), TestCaseError> {
        let mut subjects = vec![Subject::Org];
        subjects.extend((0..2).map(Subject::User));
        subjects.extend((0..3).map(Subject::Key));
        subjects.push(Subject::Group(0));
        for subject in subjects {
            let sum: i64 = s
                .meter
                .holds
                .iter()
                .filter(|(_, h)| h.subjects().any(|x| x == subject))
                .map(|(_, h)| h.amount_micros)
                .sum();
            prop_assert_eq!(s.meter.holds.held(subject), sum, "{:?}", subject);
        }
        Ok(())
    }

    proptest! {
        /// For any interleaving of reserve, settle, release, expiry and plain
        /// usage, every admitted reserve leaves committed + held within every
        /// limit it counts against, and held equals the live holds' sum.
        #[test]
        fn admitted_reserves_never_pass_a_limit(ops in proptest::collection::vec(op(), 1..300)) {
            let mut s = org();
            let mut now = NOV;
            let callers = [("ka", None, "alice"), ("kb", None, "bob"), ("kg", Some("alice"), "alice"), ("kg", Some("bob"), "bob")];
            let mut who_of: std::collections::HashMap<u8, usize> = Default::default();
            for op in ops {
                let _ = s.meter.holds.expire(now);
                match op {
                    Op::Reserve(w, r, micros, ttl) => {
                        let (k, hint, _) = callers[w as usize];
                        let req = HoldRequest { request_id: &format!("r{r}"), reserve_micros: micros, ttl_ms: ttl };
                        let Ok((d, h)) = reserve(&mut s, &key(k), None, hint, req, now) else { continue };
                        if let Some(h) = h.filter(|h| h.new) {
                            prop_assert!(d.allowed);
                            let _ = who_of.insert(r, w as usize);
                            let placed = s.meter.holds.get(&format!("r{r}")).unwrap().owned();
                            for subject in placed.subjects() {
                                let limit = match subject {
                                    Subject::Org => s.dir.monthly_limit_micros,
                                    Subject::User(_) => None,
                                    Subject::Key(i) => s.dir.keys[s.dir.key_ids[i as usize].as_str()].monthly_limit_micros,
                                    Subject::Group(i) => s.dir.group_limit(i),
                                };
                                if let Some(limit) = limit {
                                    let used = spent(&s, subject) + s.meter.holds.held(subject);
                                    prop_assert!(used <= limit, "{subject:?}: {used} > {limit} after {h:?}");
                                }
                            }
                        }
                    }
                    Op::Usage(r, cost) => {
                        let w = who_of.get(&r).copied().unwrap_or(usize::from(r) % 4);
                        let (k, _, u) = callers[w];
                        usage(&mut s, &format!("r{r}"), u, k, cost, now);
                        prop_assert!(s.meter.holds.get(&format!("r{r}")).is_none(), "settled");
                    }
                    Op::Release(r) => { let _ = s.meter.holds.remove(&format!("r{r}")); }
                    Op::Wait(ms) => now += ms,
                }
                sums_match(&s)?;
            }
        }
    }
}
