//! The admin's view at scale (issue: "an org with 100 000 users and 1 000
//! groups"): list users sorted by spend with a group filter, p50/p99, and a
//! 10 000-user bulk change, on SQLite and on PostgreSQL.
//!
//! `cargo bench -p tally-benches --bench admin`. PostgreSQL runs when
//! `TALLY_BENCH_POSTGRES_ADMIN_URL` (or `TALLY_TEST_POSTGRES_ADMIN_URL`, set
//! by scripts/test.sh) names a server. `cargo test --benches` (and
//! `TALLY_BENCH_QUICK=1`) shrinks it to a smoke run, so it cannot rot.

use std::time::{Duration, Instant};

use tally_core::entity::{Actor, Command, EntityEvent, OrgDirectory, UserStatus, handle_create};
use tally_core::ids::{GroupId, OrgId, UserId};
use tally_core::ledger::{Counter, SubjectKind};
use tally_core::org::{MeterChanges, SavedCounter};
use tally_core::time::Month;
use tally_store::checkpoint::PartitionCheckpoint;
use tally_store::query::{UserFilter, UserListQuery, UserSort};
use tally_store::{Db, DbOptions};

const NOV: i64 = 1_793_491_200_000;

struct Scale {
    users: usize,
    groups: usize,
    queries: usize,
    bulk: usize,
}

async fn run(db: &Db, name: &str, n: &Scale) {
    let org_id = OrgId::new("big").unwrap();
    let started = Instant::now();
    let events = handle_create(
        false,
        &org_id,
        &Command::CreateOrg {
            name: "Big".into(),
            default_monthly_limit_micros: Some(100_000_000),
            alert_thresholds_bps: None,
            monthly_limit_micros: None,
        },
    )
    .unwrap();
    let mut dir = OrgDirectory::from_created(&wrap(&org_id, 0, events)[0]);
    db.append(&mut wrap(&org_id, 0, vec![dir_created(&dir)]))
        .await
        .unwrap();
    let exec = async |dir: &mut OrgDirectory, cmd: Command| {
        let kinds = dir.handle(&cmd).unwrap();
        let mut events = wrap(&org_id, dir.seq, kinds);
        db.append(&mut events).await.unwrap();
        for e in &events {
            dir.apply(e);
        }
        events.len()
    };
    // Seeding appends many commands' events per transaction.
    let mut pending: Vec<EntityEvent> = Vec::new();
    let stage = |dir: &mut OrgDirectory, pending: &mut Vec<EntityEvent>, cmd: Command| {
        let kinds = dir.handle(&cmd).unwrap();
        for e in wrap(&org_id, dir.seq, kinds) {
            dir.apply(&e);
            pending.push(e);
        }
    };
    for g in 0..n.groups {
        stage(
            &mut dir,
            &mut pending,
            Command::CreateGroup {
                group_id: GroupId::new(&format!("g{g}")).unwrap(),
                name: format!("Group {g}"),
                monthly_limit_micros: None,
            },
        );
    }
    for u in 0..n.users {
        stage(
            &mut dir,
            &mut pending,
            Command::AddUser {
                user_id: UserId::new(&format!("u{u:06}")).unwrap(),
                email: format!("u{u}@big.test"),
                name: format!("User {}", (u * 7919) % n.users),
                monthly_limit_micros: None,
                activate: true,
            },
        );
        if pending.len() >= 20_000 {
            db.append(&mut std::mem::take(&mut pending)).await.unwrap();
        }
    }
    db.append(&mut std::mem::take(&mut pending)).await.unwrap();
    // Each user in one group (the groups hold users/groups members each).
    for g in 0..n.groups {
        let members: Vec<UserId> = (0..n.users)
            .filter(|u| u % n.groups == g)
            .map(|u| UserId::new(&format!("u{u:06}")).unwrap())
            .collect();
        let _ = exec(
            &mut dir,
            Command::BulkUpdateUsers {
                user_ids: members,
                add_groups: vec![GroupId::new(&format!("g{g}")).unwrap()],
                remove_groups: vec![],
                monthly_limit_micros: None,
                reset_limit: false,
                status: None,
            },
        )
        .await;
    }
    // Spend for every user this month, as a checkpoint writes it.
    let claim = db.claim_partition(0, "bench", NOV).await.unwrap();
    let counters = (0..n.users)
        .map(|u| SavedCounter {
            kind: SubjectKind::User,
            id: format!("u{u:06}"),
            month: Month::from_unix_ms(NOV),
            counter: Counter::restored(
                ((u * 104_729) % 100_000_000) as i64,
                3,
                NOV + u as i64,
                0,
                false,
                0,
            ),
        })
        .collect();
    let changes = MeterChanges {
        counters,
        ..MeterChanges::default()
    };
    db.write_checkpoint(
        0,
        claim.epoch,
        PartitionCheckpoint {
            position: 1,
            number: 1,
            mark: None,
        },
        &[(org_id.clone(), changes)],
        &[],
        NOV,
    )
    .await
    .unwrap();
    // As autovacuum (PostgreSQL) or `PRAGMA optimize` (SQLite) would.
    db.analyze().await.unwrap();
    println!(
        "{name}: seeded {} users in {} groups ({} events) in {} ms",
        n.users,
        n.groups,
        dir.seq,
        ms(started.elapsed())
    );

    // The API's first page of a live sort takes a snapshot (every matching
    // user's id, in order) and reads the page's rows by id; later pages read
    // rows by id only. Both are measured, beside one keyset page.
    let list = async |label: &str, filter: &dyn Fn(usize) -> UserFilter| {
        let (mut keyset, mut snapshot, mut matched) = (Vec::new(), Vec::new(), 0);
        for i in 0..n.queries {
            let q = UserListQuery {
                sort: UserSort::Spend,
                descending: true,
                filter: filter(i),
                after: None,
                limit: 50,
                month: Month::from_unix_ms(NOV),
            };
            let t = Instant::now();
            let (rows, _) = db.list_users(&org_id, &q).await.unwrap();
            keyset.push(t.elapsed());
            assert!(!rows.is_empty());
            let t = Instant::now();
            // 100 pages deep, as the API snapshots at 50 a page.
            let keys = db.list_user_keys(&org_id, &q, 5_000).await.unwrap();
            let ids: Vec<String> = keys.iter().take(50).map(|k| k.id.clone()).collect();
            let page = db.users_by_ids(&org_id, &ids, q.month).await.unwrap();
            snapshot.push(t.elapsed());
            assert_eq!(page, rows, "the snapshot's first page is the keyset's");
            matched = matched.max(keys.len());
        }
        for (how, took) in [
            ("keyset page", &mut keyset),
            ("first page with snapshot", &mut snapshot),
        ] {
            took.sort();
            let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
            println!(
                "{name}: list users sorted by -spend, {label} ({matched} in a snapshot), {how}, 50 a page: \
                 p50 {} ms, p99 {} ms ({} queries)",
                ms(pct(50)),
                ms(pct(99)),
                took.len()
            );
        }
    };
    list("group filter", &|i| UserFilter {
        group: Some(format!("g{}", (i * 37) % n.groups)),
        ..UserFilter::default()
    })
    .await;
    list("no filter", &|_| UserFilter::default()).await;

    let target = GroupId::new("g0").unwrap();
    let users: Vec<UserId> = (0..n.bulk)
        .map(|u| UserId::new(&format!("u{u:06}")).unwrap())
        .collect();
    let t = Instant::now();
    let events = exec(
        &mut dir,
        Command::BulkUpdateUsers {
            user_ids: users,
            add_groups: vec![target],
            remove_groups: vec![],
            monthly_limit_micros: Some(Some(42_000_000)),
            reset_limit: false,
            status: Some(UserStatus::Suspended),
        },
    )
    .await;
    println!(
        "{name}: bulk change of {} users ({events} events: join a group, set a limit, suspend) in {} ms",
        n.bulk,
        ms(t.elapsed())
    );
}

/// Milliseconds with two decimals, from integer microseconds.
fn ms(d: Duration) -> String {
    let us = d.as_micros();
    format!("{}.{:02}", us / 1000, (us % 1000) / 10)
}

fn dir_created(dir: &OrgDirectory) -> tally_core::entity::EventKind {
    tally_core::entity::EventKind::OrgCreated {
        name: dir.settings.name.clone(),
        default_monthly_limit_micros: dir.settings.default_monthly_limit_micros,
        alert_thresholds_bps: dir.settings.alert_thresholds_bps.clone(),
    }
}

fn wrap(org: &OrgId, after: u64, kinds: Vec<tally_core::entity::EventKind>) -> Vec<EntityEvent> {
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| EntityEvent {
            org_id: org.clone(),
            seq: after + 1 + i as u64,
            at_ms: NOV,
            actor: Actor::Operator,
            kind,
        })
        .collect()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (the test suite)
    // does not, and gets the quick run.
    let quick = std::env::var_os("TALLY_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let n = if quick {
        Scale {
            users: 2_000,
            groups: 20,
            queries: 20,
            bulk: 500,
        }
    } else {
        Scale {
            users: 100_000,
            groups: 1_000,
            queries: 500,
            bulk: 10_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("tally-bench-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&DbOptions::new(format!(
            "sqlite://{}/bench.db?mode=rwc",
            dir.display()
        )))
        .await
        .unwrap();
        run(&db, "sqlite", &n).await;
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        let admin = std::env::var("TALLY_BENCH_POSTGRES_ADMIN_URL")
            .or_else(|_| std::env::var("TALLY_TEST_POSTGRES_ADMIN_URL"));
        match admin {
            Ok(admin) => {
                let server = Db::open(&DbOptions {
                    migrate: false,
                    ..DbOptions::new(admin.clone())
                })
                .await
                .unwrap();
                let name = format!("bench_admin_{}", std::process::id());
                let _ = server
                    .execute_raw(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let db = Db::open(&DbOptions::new(format!(
                    "{}/{name}",
                    admin.rsplit_once('/').unwrap().0
                )))
                .await
                .unwrap();
                run(&db, "postgres", &n).await;
                db.close().await;
                if std::env::var_os("TALLY_BENCH_KEEP").is_none() {
                    let _ = server.execute_raw(&format!("DROP DATABASE {name}")).await;
                }
                server.close().await;
            }
            Err(_) => println!("postgres: skipped (set TALLY_BENCH_POSTGRES_ADMIN_URL)"),
        }
    });
}
