//! A member listing by spend or by use of the limit answered from the
//! meter's memory is the listing SQL answers: the same members in the same
//! order with the same keys, for every filter, on random members and spend
//! (ties included).

use tally_core::entity::{Command, UserStatus};
use tally_core::ids::{GroupId, OrgId, UserId};
use tally_core::time::Month;
use tally_core::usage::RawUsage;
use tally_engine::clock::{Clock, ManualClock};
use tally_store::query::{UserFilter, UserListQuery, UserSort};

mod support;

const T0: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z
const DAY: i64 = 86_400_000;
const USD: i64 = 1_000_000;

#[tokio::test]
async fn memory_orders_members_as_sql_does() {
    let dir = std::env::temp_dir().join(format!("tally-listing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let clock = ManualClock::new(T0 + 10 * DAY);
    let (engine, _) = support::embedded(&dir, &clock).await;
    let mut rng = support::Rng(7);
    let mut cmds = vec![
        Command::CreateOrg {
            name: "Acme".into(),
            default_monthly_limit_micros: Some(10 * USD),
            alert_thresholds_bps: None,
            monthly_limit_micros: None,
        },
        Command::CreateGroup {
            group_id: GroupId::new("eng").unwrap(),
            name: "Eng".into(),
            monthly_limit_micros: None,
        },
    ];
    let mut usage = Vec::new();
    for i in 0..300 {
        // Ids whose byte order differs from their number's.
        let id = UserId::new(&format!("u{}-{}", i % 7, i)).unwrap();
        let active = !rng.chance(10);
        cmds.push(Command::AddUser {
            user_id: id.clone(),
            email: format!("{id}@acme.test"),
            name: format!("User {i}"),
            // Unlimited, the default ($10), or $1 to $20.
            monthly_limit_micros: match rng.below(3) {
                0 => Some(None),
                1 => None,
                _ => Some(Some(rng.between(1, 20) * USD)),
            },
            activate: active,
        });
        if rng.chance(40) {
            cmds.push(Command::AddMember {
                group_id: GroupId::new("eng").unwrap(),
                user_id: id.clone(),
            });
        }
        if active && rng.chance(10) {
            cmds.push(Command::UpdateUser {
                user_id: id.clone(),
                email: None,
                name: None,
                monthly_limit_micros: None,
                status: Some(if rng.chance(50) {
                    UserStatus::Suspended
                } else {
                    UserStatus::Removed
                }),
            });
        }
        // A third spend nothing; many spend the same round amounts.
        for n in 0..rng.below(4) {
            let cost = if rng.chance(50) {
                rng.between(0, 4) * 5 * USD
            } else {
                rng.between(0, 30_000_000)
            };
            usage.push((format!("r-{i}-{n}"), id.to_string(), cost));
        }
    }
    support::run(&engine, "acme", cmds).await;
    let events: Vec<_> = usage
        .iter()
        .enumerate()
        .map(|(n, (request_id, user, cost))| {
            let e = RawUsage {
                request_id,
                org_id: "acme",
                user_id: user,
                cost_micros: Some(*cost),
                occurred_at_ms: Some(T0 + DAY + n as i64),
                ..RawUsage::default()
            }
            .validate()
            .unwrap();
            (n, e)
        })
        .collect();
    let accepted = engine.ingest(events).await.unwrap().accepted;
    assert_eq!(accepted as usize, usage.len());
    engine.meter.flush_for_read().await.unwrap();

    let org = OrgId::new("acme").unwrap();
    let month = Month::from_unix_ms(clock.now_ms());
    let filters = [
        UserFilter::default(),
        UserFilter {
            status: Some(UserStatus::Suspended),
            ..UserFilter::default()
        },
        UserFilter {
            status: Some(UserStatus::Removed),
            ..UserFilter::default()
        },
        UserFilter {
            group: Some("eng".into()),
            ..UserFilter::default()
        },
        UserFilter {
            group: Some("nobody's".into()),
            ..UserFilter::default()
        },
        UserFilter {
            min_utilization_bps: Some(5_000),
            ..UserFilter::default()
        },
        UserFilter {
            min_utilization_bps: Some(0),
            cut_off: Some(false),
            ..UserFilter::default()
        },
        UserFilter {
            cut_off: Some(true),
            group: Some("eng".into()),
            ..UserFilter::default()
        },
    ];
    let mut compared = 0;
    for sort in [UserSort::Spend, UserSort::Utilization] {
        for descending in [false, true] {
            for filter in &filters {
                for max in [1, 7, 5_000] {
                    let q = UserListQuery {
                        sort,
                        descending,
                        filter: filter.clone(),
                        after: None,
                        limit: 50,
                        month,
                    };
                    let sql = engine.db.list_user_keys(&org, &q, max).await.unwrap();
                    let memory = engine
                        .live_user_keys(&org, &q, max)
                        .await
                        .unwrap()
                        .expect("this process meters acme");
                    assert_eq!(
                        memory, sql,
                        "{sort:?} desc={descending} {filter:?} max={max}"
                    );
                    compared += sql.len();
                }
            }
        }
    }
    assert!(compared > 1_000, "the listings were not empty: {compared}");

    // Memory does not answer what it cannot: a search, a sort by name, last
    // month.
    let q = |sort, filter: UserFilter, month| UserListQuery {
        sort,
        descending: false,
        filter,
        after: None,
        limit: 50,
        month,
    };
    let search = UserFilter {
        q: Some("user 1".into()),
        ..UserFilter::default()
    };
    let none = [
        q(UserSort::Spend, search, month),
        q(UserSort::Name, UserFilter::default(), month),
        q(UserSort::LastActive, UserFilter::default(), month),
        q(UserSort::Spend, UserFilter::default(), month.prev()),
    ];
    for q in none {
        let none = engine.live_user_keys(&org, &q, 10).await.unwrap();
        assert!(none.is_none(), "{q:?}");
    }
}
