//! What the metrics show of one org this month, in integers: spend and
//! limits, users at or over each alert threshold (overall and per group),
//! subjects cut off or projected over their limits, and the users closest
//! to their limits.

use std::cmp::Ordering;

use crate::entity::UserStatus;
use crate::ids::{GroupId, UserId};
use crate::ledger::Subject;
use crate::money::Limit;
use crate::org::OrgState;
use crate::ratio::{BPS_FULL, reached};
use crate::time::Month;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgGauges {
    pub spend_micros: i64,
    pub limit_micros: Limit,
    /// (threshold in bps, users at or over it): the org's alert thresholds
    /// and 100 %, ascending. Users without a limit are over none.
    pub users_over: Vec<(u32, u32)>,
    /// Groups not deleted.
    pub groups: Vec<GroupGauges>,
    /// Subjects cut off now: users, groups, keys, the org.
    pub cut_off: CutOff,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutOff {
    pub users: u32,
    pub groups: u32,
    pub keys: u32,
    pub org: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGauges {
    pub id: GroupId,
    pub spend_micros: i64,
    pub limit_micros: Limit,
    /// As [`OrgGauges::users_over`], among the group's members.
    pub users_over: Vec<(u32, u32)>,
}

/// A user near their limit: (id, spend, limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserUtilization {
    pub id: UserId,
    pub spend_micros: i64,
    pub limit_micros: i64,
}

/// `a` used a larger share of its limit than `b`.
fn by_utilization_desc(a: &UserUtilization, b: &UserUtilization) -> Ordering {
    let lhs = i128::from(a.spend_micros) * i128::from(b.limit_micros);
    let rhs = i128::from(b.spend_micros) * i128::from(a.limit_micros);
    rhs.cmp(&lhs).then_with(|| a.id.cmp(&b.id))
}

impl OrgState {
    /// The org's gauges for `month`.
    pub fn gauges(&self, month: Month) -> OrgGauges {
        let dir = &self.dir;
        let mut thresholds = dir.settings.alert_thresholds_bps.clone();
        thresholds.push(BPS_FULL);
        thresholds.sort_unstable();
        thresholds.dedup();
        let counters = self.meter.ledger.month(month);
        let spend = |s: Subject| {
            counters
                .and_then(|m| m.get(s))
                .map_or(0, |c| c.spend_micros)
        };
        // Per user: the index of the highest threshold reached, if any.
        let level = |idx: u32, limit: Limit| -> Option<usize> {
            let l = limit?;
            let s = spend(Subject::User(idx));
            thresholds.iter().rposition(|t| reached(s, l, *t))
        };
        // One pass over the users, no hashing: each live user's level counts
        // for the org and for the groups of its open memberships (by index).
        let (mut org_n, mut group_n) = (
            vec![0u32; thresholds.len()],
            vec![vec![0u32; thresholds.len()]; dir.group_ids.len()],
        );
        for u in dir.users.values() {
            if u.status == UserStatus::Removed {
                continue;
            }
            let Some(top) = level(u.idx, u.monthly_limit_micros) else {
                continue;
            };
            for c in &mut org_n[..=top] {
                *c += 1;
            }
            for m in u.memberships.iter().filter(|m| m.until_ms == i64::MAX) {
                if let Some(n) = group_n.get_mut(m.group_idx as usize) {
                    for c in &mut n[..=top] {
                        *c += 1;
                    }
                }
            }
        }
        let pairs = |n: &[u32]| -> Vec<(u32, u32)> {
            thresholds.iter().copied().zip(n.iter().copied()).collect()
        };
        let users_over = pairs(&org_n);
        let mut groups: Vec<GroupGauges> = dir
            .groups
            .values()
            .filter(|g| !g.deleted)
            .map(|g| GroupGauges {
                id: g.id.clone(),
                spend_micros: spend(Subject::Group(g.idx)),
                limit_micros: g.monthly_limit_micros,
                users_over: group_n
                    .get(g.idx as usize)
                    .map_or_else(|| pairs(&vec![0; thresholds.len()]), |n| pairs(n)),
            })
            .collect();
        groups.sort_by(|a, b| a.id.cmp(&b.id));
        let cut = |v: Option<&Vec<crate::ledger::Counter>>| {
            v.map_or(0, |v| {
                u32::try_from(v.iter().filter(|c| c.cut_off).count()).unwrap_or(u32::MAX)
            })
        };
        OrgGauges {
            spend_micros: spend(Subject::Org),
            limit_micros: dir.monthly_limit_micros,
            users_over,
            groups,
            cut_off: CutOff {
                users: cut(counters.map(|m| &m.users)),
                groups: cut(counters.map(|m| &m.groups)),
                keys: cut(counters.map(|m| &m.keys)),
                org: u32::from(counters.is_some_and(|m| m.org.cut_off)),
            },
        }
    }

    /// Subjects with a limit whose month-end projection at `now_ms` is at
    /// or over it, by kind (see [`crate::forecast`]). Removed members,
    /// deleted groups and revoked keys are not counted.
    pub fn projected_over(&self, month: Month, now_ms: i64) -> CutOff {
        let Some(counters) = self.meter.ledger.month(month) else {
            return CutOff::default();
        };
        // The meter's test, without the calendar: one pass over 100 000
        // members per scrape.
        let over = |s: Subject, limit: Limit| -> u32 {
            let (Some(l), Some(c)) = (limit, counters.get(s)) else {
                return 0;
            };
            u32::from(
                counters
                    .span
                    .reaches(c.spend_micros, c.first_day, l, now_ms),
            )
        };
        let dir = &self.dir;
        CutOff {
            users: dir
                .users
                .values()
                .filter(|u| u.status != UserStatus::Removed)
                .map(|u| over(Subject::User(u.idx), u.monthly_limit_micros))
                .sum(),
            groups: dir
                .groups
                .values()
                .filter(|g| !g.deleted)
                .map(|g| over(Subject::Group(g.idx), g.monthly_limit_micros))
                .sum(),
            keys: dir
                .keys
                .values()
                .filter(|k| !k.revoked)
                .map(|k| over(Subject::Key(k.idx), k.monthly_limit_micros))
                .sum(),
            org: over(Subject::Org, dir.monthly_limit_micros),
        }
    }

    /// Users with a limit and some spend in `month`, the highest share of
    /// their limit first, at most `n`.
    pub fn top_users(&self, month: Month, n: usize) -> Vec<UserUtilization> {
        let Some(counters) = self.meter.ledger.month(month).filter(|_| n > 0) else {
            return Vec::new();
        };
        let mut all: Vec<UserUtilization> = self
            .dir
            .users
            .values()
            .filter(|u| u.status != UserStatus::Removed)
            .filter_map(|u| {
                let spend = counters.get(Subject::User(u.idx))?.spend_micros;
                let limit = u.monthly_limit_micros?;
                (spend > 0).then(|| UserUtilization {
                    id: u.id.clone(),
                    spend_micros: spend,
                    limit_micros: limit,
                })
            })
            .collect();
        top_n(&mut all, n, |u| u);
        all
    }
}

/// Keeps the `n` entries of `v` with the highest utilization (as `get`
/// finds it in an entry), highest first.
pub fn top_n<T>(v: &mut Vec<T>, n: usize, get: impl Fn(&T) -> &UserUtilization) {
    if n == 0 {
        v.clear();
        return;
    }
    let cmp = |a: &T, b: &T| by_utilization_desc(get(a), get(b));
    if v.len() > n {
        let _ = v.select_nth_unstable_by(n - 1, cmp);
        v.truncate(n);
    }
    v.sort_by(cmp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::EventKind;
    use crate::entity::tests::{added, created, events, group, user};
    use crate::org::MeterConfig;
    use crate::usage::RawUsage;

    const NOV: i64 = 1_793_491_200_000;
    const USD: i64 = 1_000_000;

    fn org() -> OrgState {
        let mut kinds = vec![
            created(Some(100 * USD)),
            EventKind::OrgLimitSet {
                monthly_limit_micros: Some(1_000 * USD),
            },
            EventKind::GroupCreated {
                group_id: group("eng"),
                name: "Eng".into(),
                monthly_limit_micros: Some(150 * USD),
            },
        ];
        for (u, limit) in [
            ("a", Some(100)),
            ("b", Some(100)),
            ("c", Some(10)),
            ("d", None),
        ] {
            kinds.push(added(u, limit.map(|l| l * USD)));
        }
        for u in ["a", "b", "d"] {
            kinds.push(EventKind::MemberAdded {
                group_id: group("eng"),
                user_id: user(u),
            });
        }
        let evs = events(kinds);
        let mut s = OrgState::new(&evs[0], MeterConfig::default());
        for e in &evs[1..] {
            s.apply_entity(e);
        }
        // a: 85 of 100; b: 50 of 100; c: 12 of 10 (cut off); d: 500, no limit.
        for (i, (u, cost)) in [("a", 85), ("b", 50), ("c", 12), ("d", 500)]
            .iter()
            .enumerate()
        {
            let ev = RawUsage {
                request_id: &format!("r{i}"),
                org_id: "acme",
                user_id: u,
                cost_micros: Some(cost * USD),
                occurred_at_ms: Some(NOV),
                ..RawUsage::default()
            }
            .validate()
            .unwrap();
            let _ = s.apply_usage(&ev, NOV);
        }
        s
    }

    #[test]
    fn users_over_each_threshold_overall_and_per_group() {
        let g = org().gauges(Month::from_unix_ms(NOV));
        assert_eq!(g.spend_micros, 647 * USD);
        assert_eq!(g.limit_micros, Some(1_000 * USD));
        // 50 %: a, b, c; 80 %: a, c; 100 %: c.
        assert_eq!(g.users_over, vec![(5_000, 3), (8_000, 2), (10_000, 1)]);
        assert_eq!(g.groups.len(), 1);
        let eng = &g.groups[0];
        assert_eq!(
            (eng.spend_micros, eng.limit_micros),
            (635 * USD, Some(150 * USD))
        );
        assert_eq!(eng.users_over, vec![(5_000, 2), (8_000, 1), (10_000, 0)]);
        // c is cut off; so is eng (635 of 150); the org is not (647 of 1000).
        assert_eq!(
            g.cut_off,
            CutOff {
                users: 1,
                groups: 1,
                keys: 0,
                org: 0
            }
        );
        let empty = org().gauges(Month::from_unix_ms(NOV).next());
        assert_eq!(empty.spend_micros, 0);
        assert_eq!(empty.users_over, vec![(5_000, 0), (8_000, 0), (10_000, 0)]);
    }

    /// Everyone spent on November's first day; the projection falls as
    /// quiet days pass.
    #[test]
    fn subjects_projected_over_their_limits() {
        let (s, month) = (org(), Month::from_unix_ms(NOV));
        const DAY: i64 = 86_400_000;
        // 10 days in, spend triples by month-end: a (255 of 100), b (150 of
        // 100), c, eng (1 905 of 150), the org (1 941 of 1 000); d has no
        // limit.
        let all = CutOff {
            users: 3,
            groups: 1,
            keys: 0,
            org: 1,
        };
        assert_eq!(s.projected_over(month, NOV + 10 * DAY), all);
        // A day before the end: a projects $87.93, the org $669.31.
        let few = CutOff {
            users: 1,
            groups: 1,
            keys: 0,
            org: 0,
        };
        assert_eq!(s.projected_over(month, NOV + 29 * DAY), few);
        assert_eq!(s.projected_over(month.next(), NOV), CutOff::default());
    }

    #[test]
    fn top_users_by_share_of_their_limit() {
        let s = org();
        let month = Month::from_unix_ms(NOV);
        let ids = |v: Vec<UserUtilization>| -> Vec<String> {
            v.into_iter().map(|u| u.id.to_string()).collect()
        };
        assert_eq!(ids(s.top_users(month, 10)), ["c", "a", "b"]);
        assert_eq!(ids(s.top_users(month, 2)), ["c", "a"]);
        assert!(s.top_users(month, 0).is_empty());
        assert!(s.top_users(month.next(), 5).is_empty());
    }
}
