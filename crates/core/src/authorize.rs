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
use crate::ids::{GroupId, UserId};
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
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::UnknownKey => "unknown_key",
            Reason::KeyRevoked => "key_revoked",
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// For people: which rule, with figures.
    pub message: String,
    pub user_id: Option<UserId>,
    /// The user's groups (where the call's spend counts) and the key's
    /// groups, sorted: the limits of all of them gate the call.
    pub group_ids: Vec<GroupId>,
    pub features: Vec<String>,
    /// The least budget left among the limits that apply; `None` when none do.
    pub remaining_micros: Option<i64>,
}

impl Decision {
    pub fn unknown_key() -> Decision {
        Decision {
            allowed: false,
            reason: Reason::UnknownKey,
            message: "the api key is unknown".into(),
            user_id: None,
            group_ids: Vec::new(),
            features: Vec::new(),
            remaining_micros: None,
        }
    }
}

/// Decides for `key` of `org` at `now_ms`. `user_hint` is the caller's user
/// when the gateway knows it (needed for group keys without an owner).
pub fn authorize(
    org: &OrgState,
    key: &Key,
    feature: Option<&str>,
    user_hint: Option<&str>,
    now_ms: i64,
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
        group_ids: key.group_ids.clone(),
        features: key.features.clone(),
        remaining_micros: None,
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
    let user_id = match (&key.user_id, user_hint) {
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
    let mut remaining: Option<i64> = None;
    let mut budget = |limit: Limit, spend: i64| {
        if let Some(l) = limit {
            let left = (l - spend).max(0);
            remaining = Some(remaining.map_or(left, |r: i64| r.min(left)));
        }
        limit.is_some_and(|l| spend >= l)
    };
    {
        let uid = user_id;
        let Some(user) = dir.users.get(uid) else {
            return deny(
                &mut d,
                Reason::UnknownUser,
                format!("user {uid} is not in the org"),
            );
        };
        d.group_ids.extend(user.groups.iter().cloned());
        if user.status != UserStatus::Active {
            return deny(
                &mut d,
                Reason::UserNotActive,
                format!("user {uid} is {}, not active", user.status.as_str()),
            );
        }
        let spend = org.spend(month, Subject::User(user.idx)).spend_micros;
        if budget(user.monthly_limit_micros, spend) {
            let limit = user.monthly_limit_micros.unwrap_or_default();
            return deny(
                &mut d,
                Reason::UserMonthlyLimit,
                format!(
                    "user {uid} reached the monthly limit of {} (spent {} in {month})",
                    format_usd(limit),
                    format_usd(spend)
                ),
            );
        }
    }
    let spend = org.spend(month, Subject::Key(key.idx)).spend_micros;
    if budget(key.monthly_limit_micros, spend) {
        let limit = key.monthly_limit_micros.unwrap_or_default();
        return deny(
            &mut d,
            Reason::KeyMonthlyLimit,
            format!(
                "key {} reached its monthly limit of {} (spent {} in {month})",
                key.id,
                format_usd(limit),
                format_usd(spend)
            ),
        );
    }
    d.group_ids.sort_unstable();
    d.group_ids.dedup();
    let full_group = d.group_ids.iter().find_map(|gid| {
        let group = dir.groups.get(gid).filter(|g| !g.deleted)?;
        let spend = org.spend(month, Subject::Group(group.idx)).spend_micros;
        budget(group.monthly_limit_micros, spend).then(|| {
            format!(
                "group {gid} reached its monthly limit of {} (spent {} in {month})",
                format_usd(group.monthly_limit_micros.unwrap_or_default()),
                format_usd(spend)
            )
        })
    });
    if let Some(message) = full_group {
        return deny(&mut d, Reason::GroupMonthlyLimit, message);
    }
    let spend = org.spend(month, Subject::Org).spend_micros;
    if budget(dir.monthly_limit_micros, spend) {
        let limit = dir.monthly_limit_micros.unwrap_or_default();
        return deny(
            &mut d,
            Reason::OrgMonthlyLimit,
            format!(
                "org {} reached its monthly limit of {} (spent {} in {month})",
                dir.id,
                format_usd(limit),
                format_usd(spend)
            ),
        );
    }
    if let Some(f) = feature
        && !key.features.iter().any(|k| k == f)
    {
        return deny(
            &mut d,
            Reason::FeatureNotEnabled,
            format!("feature {f:?} is not enabled on key {}", key.id),
        );
    }
    d.remaining_micros = remaining;
    let mut d = deny(&mut d, Reason::Ok, "allowed".into());
    d.allowed = true;
    d
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
            },
            EventKind::KeyCreated {
                key_id: key("kg"),
                name: "team".into(),
                user_id: None,
                group_ids: vec![group("eng")],
                features: vec!["chat".into(), "embeddings".into()],
                monthly_limit_micros: None,
                secret_hash: [2; 32],
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
        authorize(s, &s.dir.keys[k], feature, hint, NOV + 1)
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

    #[test]
    fn a_new_month_starts_from_zero() {
        let mut s = org();
        spend(&mut s, "r1", "alice", "", 50 * USD);
        assert!(!decide(&s, "ka", None, None).allowed);
        let dec = Month::from_unix_ms(NOV).next().start_ms();
        let d = authorize(&s, &s.dir.keys["ka"], None, None, dec);
        assert!(d.allowed, "{d:?}");
    }
}
