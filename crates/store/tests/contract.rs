//! The store's contract, written once and run against both backends: an
//! SQLite file and a real PostgreSQL server (started by scripts/test.sh,
//! found through TALLY_TEST_POSTGRES_ADMIN_URL).

use std::sync::atomic::{AtomicU32, Ordering};

use tally_core::entity::{
    Actor, Command, EntityEvent, OrgDirectory, UserStatus, WebhookFormat, handle_create,
};
use tally_core::ids::{GroupId, KeyId, OrgId, UserId};
use tally_core::ledger::{Counter, EnforcementKind, LiftReason, Subject, SubjectKind};
use tally_core::org::{
    MeterChanges, MeterConfig, SavedCounter, SavedDay, SavedEnforcement, SavedUsage,
};
use tally_core::time::{Day, Month};
use tally_store::checkpoint::{DeadLetter, PartitionCheckpoint};
use tally_store::query::{Cursor, SortValue, UserFilter, UserListQuery, UserSort};
use tally_store::recount::Recount;
use tally_store::webhook::{AttemptOutcome, DueDelivery, WebhookTarget};
use tally_store::{Db, DbOptions, Error};

const NOV: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn sqlite() -> Option<Db> {
    sqlite_with(true).await
}

async fn sqlite_with(migrate: bool) -> Option<Db> {
    let dir = std::env::temp_dir().join(unique("tally-store-test"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/tally.db?mode=rwc", dir.display());
    let opts = DbOptions {
        migrate,
        ..DbOptions::new(url)
    };
    Some(Db::open(&opts).await.unwrap())
}

async fn postgres() -> Option<Db> {
    postgres_with_url().await.map(|(db, _)| db)
}

async fn postgres_with_url() -> Option<(Db, String)> {
    postgres_with(true).await
}

async fn postgres_with(migrate: bool) -> Option<(Db, String)> {
    let Ok(admin) = std::env::var("TALLY_TEST_POSTGRES_ADMIN_URL") else {
        assert!(
            std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
            "TALLY_TEST_POSTGRES_ADMIN_URL is not set: run scripts/test.sh"
        );
        eprintln!("PostgreSQL contract skipped: no server (scripts/test.sh starts one)");
        return None;
    };
    // A fresh database per test.
    let name = unique("t");
    let admin_db = Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(admin.clone())
    })
    .await
    .unwrap();
    let _ = admin_db
        .execute_raw(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    admin_db.close().await;
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    // As the distributed mode opens it.
    let opts = DbOptions {
        dated_by_database: true,
        migrate,
        ..DbOptions::new(url.clone())
    };
    Some((Db::open(&opts).await.unwrap(), url))
}

/// Runs commands the way the engine does: validate, append, fold.
struct Org {
    dir: OrgDirectory,
}

impl Org {
    async fn create(db: &Db, id: &str) -> Org {
        let org_id = OrgId::new(id).unwrap();
        let cmd = Command::CreateOrg {
            name: format!("Org {id}"),
            default_monthly_limit_micros: Some(50_000_000),
            alert_thresholds_bps: None,
            monthly_limit_micros: None,
        };
        let kinds = handle_create(false, &org_id, &cmd).unwrap();
        let mut events: Vec<EntityEvent> = kinds
            .into_iter()
            .map(|kind| EntityEvent {
                org_id: org_id.clone(),
                seq: 1,
                at_ms: NOV,
                actor: Actor::Operator,
                kind,
            })
            .collect();
        db.append(&mut events).await.unwrap();
        Org {
            dir: OrgDirectory::from_created(&events[0]),
        }
    }

    async fn run(&mut self, db: &Db, cmd: Command) {
        let kinds = self.dir.handle(&cmd).unwrap();
        let mut events: Vec<EntityEvent> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| EntityEvent {
                org_id: self.dir.id.clone(),
                seq: self.dir.seq + 1 + i as u64,
                at_ms: NOV + 1_000,
                actor: Actor::Operator,
                kind,
            })
            .collect();
        db.append(&mut events).await.unwrap();
        for e in &events {
            self.dir.apply(e);
        }
    }

    async fn create_group(&mut self, db: &Db, id: &str, name: &str, limit: Option<i64>) {
        self.run(
            db,
            Command::CreateGroup {
                group_id: GroupId::new(id).unwrap(),
                name: name.into(),
                monthly_limit_micros: limit,
            },
        )
        .await;
    }

    async fn add_user(&mut self, db: &Db, id: &str, name: &str, limit: Option<i64>) {
        self.run(
            db,
            Command::AddUser {
                user_id: UserId::new(id).unwrap(),
                email: format!("{id}@example.test"),
                name: name.into(),
                monthly_limit_micros: Some(limit),
                activate: true,
            },
        )
        .await;
    }
}

fn month() -> Month {
    Month::from_unix_ms(NOV)
}

fn counter(kind: SubjectKind, id: &str, spend: i64) -> SavedCounter {
    SavedCounter {
        kind,
        id: id.into(),
        month: month(),
        counter: Counter::restored(spend, 1, NOV + spend, 0, false, 0),
    }
}

/// Claims partition 0 and writes checkpoints 1..=n of it, one per call.
async fn checkpoint(db: &Db, org: &str, number: i64, changes: MeterChanges) {
    if number == 1 {
        let _ = db.claim_partition(0, "test", NOV).await.unwrap();
    }
    let epoch = db.load_checkpoint(0).await.unwrap().unwrap().epoch;
    let at = PartitionCheckpoint {
        position: number * 10,
        number,
        mark: None,
    };
    db.write_checkpoint(
        0,
        epoch,
        at,
        &[(OrgId::new(org).unwrap(), changes)],
        &[],
        NOV,
    )
    .await
    .unwrap();
}

fn query(sort: UserSort, descending: bool) -> UserListQuery {
    UserListQuery {
        sort,
        descending,
        filter: UserFilter::default(),
        after: None,
        limit: 100,
        month: month(),
    }
}

async fn all_pages(db: &Db, org: &OrgId, mut q: UserListQuery, page: u32) -> Vec<String> {
    q.limit = page;
    let mut ids = Vec::new();
    loop {
        let (rows, next) = db.list_users(org, &q).await.unwrap();
        ids.extend(rows.into_iter().map(|r| r.id));
        match next {
            Some(c) => q.after = Some(c),
            None => return ids,
        }
    }
}

async fn appends_project_and_conflict(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    org.add_user(&db, "alice", "Alice", Some(10)).await;
    org.create_group(&db, "eng", "Engineering", None).await;
    org.run(
        &db,
        Command::AddMember {
            group_id: GroupId::new("eng").unwrap(),
            user_id: UserId::new("alice").unwrap(),
        },
    )
    .await;
    let row = db.org("acme", month()).await.unwrap().unwrap();
    assert_eq!(row.seq, 5, "created, added, activated, group, member");
    assert_eq!(row.alert_thresholds_bps, vec![5000, 8000, 10000]);
    assert_eq!(row.default_monthly_limit_micros, Some(50_000_000));
    let user = db
        .user(&org.dir.id, "alice", month())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.status, "active");
    assert_eq!(user.groups, vec!["eng".to_string()]);
    assert_eq!(user.monthly_limit_micros, Some(10));
    // A second writer with the same seq conflicts and changes nothing.
    let stale = EntityEvent {
        org_id: org.dir.id.clone(),
        seq: 5,
        at_ms: NOV,
        actor: Actor::Operator,
        kind: tally_core::entity::EventKind::UserSuspended {
            user_id: UserId::new("alice").unwrap(),
        },
    };
    assert!(matches!(
        db.append(&mut [stale]).await,
        Err(Error::Conflict { .. })
    ));
    let user = db
        .user(&org.dir.id, "alice", month())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.status, "active");
    // The log refuses edits.
    assert!(
        db.execute_raw("UPDATE events SET actor = 'x'")
            .await
            .is_err()
    );
    assert!(db.execute_raw("DELETE FROM events").await.is_err());
}

/// `log_heads` names the last seq of each org that has a log, and a time
/// every later append is dated after: where the database dates entity
/// events (PostgreSQL, as the distributed mode opens it) appends are dated
/// by its clock under the log's lock, so a meter that read the heads at T
/// has every change dated up to T; elsewhere the caller's date stands.
async fn log_heads_date_every_later_append(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    org.add_user(&db, "alice", "Alice", None).await;
    let seq = org.dir.seq;
    let (read_at, heads) = db.log_heads(&["acme", "nobody"]).await.unwrap();
    assert_eq!(heads, vec![("acme".to_string(), seq)]);
    org.create_group(&db, "eng", "Engineering", None).await;
    let later = db.org_events(&org.dir.id, seq, 10).await.unwrap();
    assert_eq!(later.len(), 1);
    if db.dated_by_database() {
        assert!(
            later[0].at_ms >= read_at,
            "dated {} before the heads read at {read_at}",
            later[0].at_ms
        );
    } else {
        assert_eq!(later[0].at_ms, NOV + 1_000, "the caller's date");
    }
    assert_eq!(org.dir.groups.len(), 1, "folded as stored");
    let (_, heads) = db.log_heads(&["acme"]).await.unwrap();
    assert_eq!(heads, vec![("acme".to_string(), seq + 1)]);
}

/// Where the database dates entity events, `log_heads` waits for an append
/// under way (it holds the log's lock): another connection holds that lock
/// for 1 s, and the heads read after it began is answered only once it is
/// released, with a time after it.
async fn log_heads_wait_for_an_append_under_way(db: Db) {
    if !db.dated_by_database() {
        return;
    }
    let _ = Org::create(&db, "acme").await;
    let holder = db.clone();
    let started_ms = ms_now();
    let hold = tokio::spawn(async move {
        holder
            .execute_raw(
                "BEGIN; SELECT pg_advisory_xact_lock(7243918); SELECT pg_sleep(1); COMMIT;",
            )
            .await
            .unwrap()
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (read_at, heads) = db.log_heads(&["acme"]).await.unwrap();
    assert_eq!(heads, vec![("acme".to_string(), 1)]);
    assert!(
        read_at >= started_ms + 900,
        "read at {read_at}, {} ms after the lock was taken: it did not wait",
        read_at - started_ms
    );
    let _ = hold.await.unwrap();
}

fn ms_now() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(d.as_millis()).unwrap()
}

async fn rebuild_gives_the_same_read_models(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    for i in 0..30 {
        org.add_user(
            &db,
            &format!("u{i:02}"),
            &format!("User {}", 30 - i),
            Some(1_000 + i),
        )
        .await;
    }
    org.create_group(&db, "g", "G", Some(5)).await;
    org.run(
        &db,
        Command::BulkUpdateUsers {
            user_ids: (0..10)
                .map(|i| UserId::new(&format!("u{i:02}")).unwrap())
                .collect(),
            add_groups: vec![GroupId::new("g").unwrap()],
            remove_groups: vec![],
            monthly_limit_micros: None,
            reset_limit: false,
            status: Some(UserStatus::Suspended),
        },
    )
    .await;
    // Their limits back to the org's default, projected set-wise too.
    org.run(
        &db,
        Command::BulkUpdateUsers {
            user_ids: (0..10)
                .map(|i| UserId::new(&format!("u{i:02}")).unwrap())
                .collect(),
            add_groups: vec![],
            remove_groups: vec![],
            monthly_limit_micros: None,
            reset_limit: true,
            status: None,
        },
    )
    .await;
    // A second bulk change that moves users between groups, sets a limit and
    // removes them: projected set-wise, then checked against the one-by-one
    // rebuild below.
    org.create_group(&db, "h", "H", None).await;
    org.run(
        &db,
        Command::BulkUpdateUsers {
            user_ids: (5..15)
                .map(|i| UserId::new(&format!("u{i:02}")).unwrap())
                .collect(),
            add_groups: vec![GroupId::new("h").unwrap()],
            remove_groups: vec![GroupId::new("g").unwrap()],
            monthly_limit_micros: Some(Some(77)),
            reset_limit: false,
            status: Some(UserStatus::Removed),
        },
    )
    .await;
    org.run(
        &db,
        Command::CreateKey {
            key_id: KeyId::new("k").unwrap(),
            name: "K".into(),
            user_id: Some(UserId::new("u20").unwrap()),
            group_ids: vec![GroupId::new("g").unwrap()],
            features: vec!["chat".into()],
            monthly_limit_micros: None,
            secret_hash: [5; 32],
            expires_at_ms: None,
        },
    )
    .await;
    org.run(
        &db,
        Command::UpdateUser {
            user_id: UserId::new("u29").unwrap(),
            email: None,
            name: None,
            monthly_limit_micros: None,
            status: Some(UserStatus::Removed),
        },
    )
    .await;
    let snapshot = async |db: &Db| {
        let mut q = query(UserSort::Name, false);
        q.filter.status = None;
        let users = db.list_users(&org.dir.id, &q).await.unwrap().0;
        let groups = db
            .list_groups(&org.dir.id, month(), None, None, 100)
            .await
            .unwrap();
        let keys = db
            .list_keys(&org.dir.id, month(), None, None, 100)
            .await
            .unwrap();
        (
            users,
            groups,
            keys,
            db.org("acme", month()).await.unwrap().unwrap().seq,
        )
    };
    let before = snapshot(&db).await;
    assert_eq!(before.1[0].member_count, 5, "u05..u09 left g");
    assert_eq!(before.1[1].member_count, 0, "removed users leave h too");
    assert_eq!(before.2[0].group_ids, vec!["g".to_string()]);
    let default = org.dir.settings.default_monthly_limit_micros;
    for (id, want) in [
        ("u00", ("org_default", default)),
        ("u05", ("own", Some(77))),
        ("u20", ("own", Some(1_020))),
    ] {
        let u = db.user(&org.dir.id, id, month()).await.unwrap().unwrap();
        let got = (u.limit_source.as_str(), u.monthly_limit_micros);
        assert_eq!(got, want, "{id}: reset, reset then set, given on joining");
    }
    let mut calls = 0;
    let rebuilt = db
        .rebuild_projections(MeterConfig::default(), |_| calls += 1)
        .await
        .unwrap();
    assert_eq!(rebuilt.events, org.dir.seq);
    assert!(calls >= 1);
    assert_eq!(snapshot(&db).await, before);
    let mut seen = 0;
    let scanned = db
        .scan_events(|e| {
            seen += 1;
            assert_eq!(e.seq, seen);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(scanned, org.dir.seq);
}

async fn users_sort_filter_and_paginate(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    // Names collide on purpose: ties are broken by id.
    let people = [
        ("a1", "Zed", Some(100)),
        ("a2", "amy", Some(200)),
        ("a3", "Bob", None),
        ("a4", "bob", Some(50)),
        ("a5", "Zed", Some(1_000)),
        ("a6", "Ève", Some(10)),
    ];
    for (id, name, limit) in people {
        org.add_user(&db, id, name, limit).await;
    }
    org.create_group(&db, "eng", "E", None).await;
    org.run(
        &db,
        Command::BulkUpdateUsers {
            user_ids: ["a1", "a3", "a5"]
                .iter()
                .map(|u| UserId::new(u).unwrap())
                .collect(),
            add_groups: vec![GroupId::new("eng").unwrap()],
            remove_groups: vec![],
            monthly_limit_micros: None,
            reset_limit: false,
            status: None,
        },
    )
    .await;
    let spend = [("a1", 80), ("a2", 10), ("a3", 500), ("a4", 50), ("a6", 9)];
    checkpoint(
        &db,
        "acme",
        1,
        MeterChanges {
            counters: spend
                .iter()
                .map(|(u, s)| counter(SubjectKind::User, u, *s))
                .collect(),
            ..MeterChanges::default()
        },
    )
    .await;
    let ids = async |q: UserListQuery| {
        db.list_users(&org.dir.id, &q)
            .await
            .unwrap()
            .0
            .into_iter()
            .map(|u| u.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(query(UserSort::Spend, true)).await,
        ["a3", "a1", "a4", "a2", "a6", "a5"]
    );
    // Utilization: a4 100 %, a6 90 %, a1 80 %, a2 5 %, a5 0 %, a3 unlimited.
    assert_eq!(
        ids(query(UserSort::Utilization, true)).await,
        ["a4", "a6", "a1", "a2", "a5", "a3"]
    );
    assert_eq!(
        ids(query(UserSort::Limit, false)).await,
        ["a6", "a4", "a1", "a2", "a5", "a3"]
    );
    assert_eq!(
        ids(query(UserSort::Name, false)).await,
        ["a3", "a1", "a5", "a2", "a4", "a6"]
    );
    assert_eq!(
        ids(query(UserSort::LastActive, true)).await,
        ["a3", "a1", "a4", "a2", "a6", "a5"]
    );
    let mut q = query(UserSort::Spend, true);
    q.filter.group = Some("eng".into());
    assert_eq!(ids(q).await, ["a3", "a1", "a5"]);
    let mut q = query(UserSort::Spend, true);
    q.filter.min_utilization_bps = Some(8_000);
    assert_eq!(ids(q).await, ["a1", "a4", "a6"]);
    let mut q = query(UserSort::Email, false);
    q.filter.cut_off = Some(true);
    assert_eq!(ids(q).await, ["a4"]);
    let mut q = query(UserSort::Email, false);
    q.filter.q = Some("BOB".into());
    assert_eq!(ids(q).await, ["a3", "a4"]);
    // LIKE wildcards in q are literal.
    let mut q = query(UserSort::Email, false);
    q.filter.q = Some("%".into());
    assert!(ids(q).await.is_empty());
    // Every page size gives the same order as one page.
    for sort in [
        UserSort::Name,
        UserSort::Email,
        UserSort::Spend,
        UserSort::Limit,
        UserSort::Utilization,
        UserSort::LastActive,
    ] {
        for desc in [false, true] {
            let whole = ids(query(sort, desc)).await;
            for page in 1..=4 {
                assert_eq!(
                    all_pages(&db, &org.dir.id, query(sort, desc), page).await,
                    whole,
                    "{sort:?} {desc} {page}"
                );
            }
            // A search's pages too (on SQLite it sorts its matches instead
            // of walking the name index).
            let mut searched = query(sort, desc);
            searched.filter.q = Some("ED".into());
            let whole_search = ids(searched.clone()).await;
            assert_eq!(whole_search.len(), 2, "the two Zeds: {whole_search:?}");
            let want: Vec<&String> = whole
                .iter()
                .filter(|id| whole_search.contains(id))
                .collect();
            assert_eq!(
                whole_search.iter().collect::<Vec<_>>(),
                want,
                "a search keeps the order: {sort:?} {desc}"
            );
            for page in 1..=3 {
                assert_eq!(
                    all_pages(&db, &org.dir.id, searched.clone(), page).await,
                    whole_search,
                    "search {sort:?} {desc} {page}"
                );
            }
            // Every id holds an `a`: the whole list, in the same order (byte
            // order, case and accents included).
            let mut everyone = query(sort, desc);
            everyone.filter.q = Some("A".into());
            assert_eq!(ids(everyone).await, whole, "{sort:?} {desc}");
            // A snapshot's keys come in the same order, cut at `max`.
            let keys = db
                .list_user_keys(&org.dir.id, &query(sort, desc), 4)
                .await
                .unwrap();
            let keys: Vec<String> = keys.into_iter().map(|k| k.id).collect();
            assert_eq!(keys, whole[..4], "{sort:?} {desc}");
        }
    }
    // Users by id come in the order asked, unknown ids skipped, with the
    // figures the list shows.
    let asked: Vec<String> = ["a6", "nobody", "a1", "a3"].map(String::from).into();
    let rows = db.users_by_ids(&org.dir.id, &asked, month()).await.unwrap();
    let got: Vec<&str> = rows.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(got, ["a6", "a1", "a3"]);
    let listed = db
        .list_users(&org.dir.id, &query(UserSort::Spend, true))
        .await
        .unwrap()
        .0;
    for u in &rows {
        assert_eq!(Some(u), listed.iter().find(|l| l.id == u.id));
    }
    // A cursor of the wrong kind is refused.
    let mut q = query(UserSort::Spend, false);
    q.after = Some(Cursor {
        value: SortValue::Text("x".into()),
        id: "a1".into(),
    });
    assert!(db.list_users(&org.dir.id, &q).await.is_err());
    // A search folds ASCII letters only (as SQL LOWER), matches id, name or
    // email but never across two of them, and follows a change of name.
    let acme = org.dir.id.clone();
    let search = async |text: &str| {
        let mut q = query(UserSort::Name, false);
        q.filter.q = Some(text.into());
        let rows = db.list_users(&acme, &q).await.unwrap().0;
        rows.into_iter().map(|u| u.id).collect::<Vec<_>>()
    };
    assert_eq!(search("ÈVE").await, ["a6"]);
    assert!(search("ève").await.is_empty());
    assert_eq!(search("A6@EXAMPLE").await, ["a6"]);
    assert!(search("a6\nève").await.is_empty());
    assert!(search("amelia").await.is_empty());
    org.run(
        &db,
        Command::UpdateUser {
            user_id: UserId::new("a2").unwrap(),
            email: None,
            name: Some("Amelia".into()),
            monthly_limit_micros: None,
            status: None,
        },
    )
    .await;
    assert_eq!(search("AMELIA").await, ["a2"]);
    assert!(search("amy").await.is_empty());
}

async fn checkpoints_round_trip(db: Db) {
    let _org = Org::create(&db, "acme").await;
    assert_eq!(db.load_checkpoint(0).await.unwrap(), None);
    let day = Day::from_unix_ms(NOV);
    let enforcement = SavedEnforcement {
        kind: SubjectKind::User,
        id: "alice".into(),
        event: tally_core::ledger::Enforcement {
            subject: Subject::User(0),
            month: month(),
            at_ms: NOV,
            spend_micros: 100,
            limit_micros: Some(100),
            ordinal: 1,
            kind: EnforcementKind::CutOff,
        },
    };
    let changes = |spend: i64| MeterChanges {
        counters: vec![
            counter(SubjectKind::User, "alice", spend),
            counter(SubjectKind::Org, "acme", spend),
        ],
        days: vec![SavedDay {
            kind: SubjectKind::User,
            id: "alice".into(),
            day,
            delta: tally_core::ledger::DayDelta {
                spend_micros: 7,
                requests: 1,
            },
        }],
        usage: [
            (SubjectKind::Org, "acme", "gpt-4o", "openai"),
            (SubjectKind::Org, "acme", "other", "other"),
            (SubjectKind::Org, "acme", "claude", "anthropic"),
            (SubjectKind::User, "alice", "gpt-4o", "openai"),
        ]
        .into_iter()
        .map(|(kind, id, model, provider)| SavedUsage {
            kind,
            id: id.into(),
            day,
            model: model.into(),
            provider: provider.into(),
            delta: tally_core::ledger::UsageDelta {
                spend_micros: 7,
                requests: 1,
                input_tokens: 100,
                output_tokens: 9,
            },
        })
        .collect(),
        dedupe_added: vec![(10, 1), (10, 2), (11, u128::MAX)],
        dedupe_floor_minute: 9,
        watermark_ms: NOV + spend,
        rolled_month: Some(month()),
        enforcement: vec![enforcement.clone()],
        holds_gone: Vec::new(),
    };
    checkpoint(&db, "acme", 1, changes(100)).await;
    checkpoint(&db, "acme", 2, changes(150)).await;
    assert_eq!(
        db.load_checkpoint(0).await.unwrap().map(|c| c.checkpoint),
        Some(PartitionCheckpoint {
            position: 20,
            number: 2,
            mark: None
        })
    );
    let meters = db.load_meters(0, 86_400_000, month()).await.unwrap();
    let m = &meters["acme"];
    // The pairs the org's rows name, `other` excepted.
    assert_eq!(
        m.models,
        vec![(
            month(),
            vec![
                ("claude".to_owned(), "anthropic".to_owned()),
                ("gpt-4o".to_owned(), "openai".to_owned())
            ]
        )]
    );
    assert_eq!(m.watermark_ms, NOV + 150);
    assert_eq!(m.dedupe_floor_minute, 9);
    assert_eq!(m.dedupe.len(), 6, "both checkpoints' chunks");
    let mut counters = m.counters.clone();
    counters.sort_by_key(|a| a.kind);
    assert_eq!(counters[0], counter(SubjectKind::User, "alice", 150));
    // Day deltas add up; enforcement events are written once.
    let org = OrgId::new("acme").unwrap();
    let (months, days) = db
        .history(&org, "user", "alice", month(), month())
        .await
        .unwrap();
    assert_eq!(months[0].spend_micros, 150);
    assert_eq!(days.len(), 1);
    assert_eq!((days[0].spend_micros, days[0].requests), (14, 2));
    // Usage by model: both checkpoints' deltas added up, grouped and
    // filtered as asked.
    let q = |kind, subject: Option<&str>, group_by| tally_store::rollup::UsageQuery {
        kind,
        subject: subject.map(str::to_owned),
        model: None,
        from: day,
        to: day,
        group_by,
        top: 2,
        days: true,
    };
    use tally_store::rollup::{UsageDim, UsageSums};
    let two = UsageSums {
        spend_micros: 14,
        requests: 2,
        input_tokens: 200,
        output_tokens: 18,
    };
    let org_usage = db
        .usage(
            &org,
            &q(SubjectKind::Org, Some("acme"), Some(UsageDim::Model)),
        )
        .await
        .unwrap();
    let mut all = two;
    all.add(&two);
    all.add(&two);
    assert_eq!(org_usage.totals, all);
    assert_eq!(org_usage.series, vec![(i64::from(day.yyyymmdd()), all)]);
    assert_eq!(org_usage.groups, 3);
    // Ties by key: claude, gpt-4o (other is third, past top 2).
    assert_eq!(
        org_usage.top,
        vec![("claude".to_owned(), two), ("gpt-4o".to_owned(), two)]
    );
    assert_eq!(org_usage.top_days.len(), 2);
    let no_days = db
        .usage(
            &org,
            &tally_store::rollup::UsageQuery {
                days: false,
                ..q(SubjectKind::Org, Some("acme"), Some(UsageDim::Model))
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            no_days.totals,
            &no_days.top,
            no_days.series.len(),
            no_days.top_days.len()
        ),
        (all, &org_usage.top, 0, 0)
    );
    let by_user = db
        .usage(&org, &q(SubjectKind::User, None, Some(UsageDim::Subject)))
        .await
        .unwrap();
    assert_eq!(by_user.top, vec![("alice".to_owned(), two)]);
    let by_provider = db
        .usage(
            &org,
            &q(SubjectKind::Org, Some("acme"), Some(UsageDim::Provider)),
        )
        .await
        .unwrap();
    assert_eq!(by_provider.groups, 3);
    let nothing = db
        .usage(
            &org,
            &tally_store::rollup::UsageQuery {
                model: Some("nope".into()),
                ..q(SubjectKind::Org, Some("acme"), None)
            },
        )
        .await
        .unwrap();
    assert_eq!(nothing, tally_store::rollup::UsageAnswer::default());
    // Another month's days: none here; the months stay up to `month`.
    let (same, before) = db
        .history(&org, "user", "alice", month(), month().prev())
        .await
        .unwrap();
    assert_eq!((same, before), (months, vec![]));
    assert!(
        db.history(&org, "user", "alice", month().prev(), month())
            .await
            .unwrap()
            .0
            .is_empty(),
        "no month after the one asked for"
    );
    assert_eq!(db.list_enforcement(&org, None, 100).await.unwrap().len(), 1);
    // A lift with another ordinal is a new event; the floor evicts old minutes.
    let mut lift = enforcement.clone();
    lift.event.kind = EnforcementKind::CutoffLifted {
        reason: LiftReason::LimitRaised,
    };
    lift.event.ordinal = 2;
    checkpoint(
        &db,
        "acme",
        3,
        MeterChanges {
            enforcement: vec![lift],
            dedupe_floor_minute: 11,
            watermark_ms: NOV,
            ..MeterChanges::default()
        },
    )
    .await;
    let both = db.list_enforcement(&org, None, 100).await.unwrap();
    assert_eq!(both.len(), 2);
    // A page at a time: each row once, in the same order.
    let first = db.list_enforcement(&org, None, 1).await.unwrap();
    let second = db
        .list_enforcement(&org, Some(&first[0].key()), 1)
        .await
        .unwrap();
    assert_eq!(
        [first[0].clone(), second[0].clone()],
        [both[0].clone(), both[1].clone()]
    );
    assert!(
        db.list_enforcement(&org, Some(&second[0].key()), 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        db.load_meters(0, 86_400_000, month()).await.unwrap()["acme"].dedupe,
        vec![(11, u128::MAX), (11, u128::MAX)]
    );
}

async fn usage_log_positions_only_grow(db: Db) {
    assert_eq!(db.usage_head().await.unwrap(), 0);
    let a = db.append_usage(NOV, 1, b"one").await.unwrap();
    let b = db.append_usage(NOV + 1, 2, b"two").await.unwrap();
    assert!(b > a);
    let read = db.read_usage(0, 10).await.unwrap();
    assert_eq!(
        read.iter()
            .map(|r| r.payload.as_slice())
            .collect::<Vec<_>>(),
        [b"one".as_slice(), b"two"]
    );
    assert_eq!(db.read_usage(a, 10).await.unwrap().len(), 1);
    assert_eq!(db.purge_usage(b, NOV + 10).await.unwrap(), 2);
    let c = db.append_usage(NOV + 2, 1, b"three").await.unwrap();
    assert!(c > b, "a purged position is never handed out again");
}

async fn text_is_stored_verbatim(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    let nasty = "Robert'); DROP TABLE users;-- \"x\" \\ % _ 😀";
    org.add_user(&db, "bobby", nasty, None).await;
    let user = db
        .user(&org.dir.id, "bobby", month())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.name, nasty);
    let mut q = query(UserSort::Name, false);
    q.filter.q = Some("drop table".into());
    assert_eq!(db.list_users(&org.dir.id, &q).await.unwrap().0.len(), 1);
}

async fn a_deposed_owner_is_fenced_out(db: Db) {
    let _org = Org::create(&db, "acme").await;
    let acme = || OrgId::new("acme").unwrap();
    let one = |spend| MeterChanges {
        counters: vec![counter(SubjectKind::User, "alice", spend)],
        ..MeterChanges::default()
    };
    let first = db.claim_partition(3, "test", NOV).await.unwrap();
    assert_eq!(
        first.checkpoint,
        PartitionCheckpoint {
            position: -1,
            number: 0,
            mark: None
        }
    );
    let at = |position, number| PartitionCheckpoint {
        position,
        number,
        mark: None,
    };
    db.write_checkpoint(3, first.epoch, at(10, 1), &[(acme(), one(5))], &[], NOV)
        .await
        .unwrap();
    // A new owner takes over from checkpoint 1.
    let second = db.claim_partition(3, "test", NOV).await.unwrap();
    assert_eq!(second.checkpoint, at(10, 1));
    assert!(second.epoch > first.epoch);
    // The old owner can no longer write.
    let stale = db
        .write_checkpoint(3, first.epoch, at(20, 2), &[(acme(), one(99))], &[], NOV)
        .await;
    assert!(
        matches!(stale, Err(Error::Fenced { partition: 3 })),
        "{stale:?}"
    );
    db.write_checkpoint(3, second.epoch, at(15, 2), &[(acme(), one(7))], &[], NOV)
        .await
        .unwrap();
    // A retry of a checkpoint that already committed is refused too; the
    // caller learns from load_checkpoint that it landed.
    let again = db
        .write_checkpoint(3, second.epoch, at(15, 2), &[(acme(), one(7))], &[], NOV)
        .await;
    assert!(matches!(again, Err(Error::Fenced { .. })));
    assert_eq!(
        db.load_checkpoint(3).await.unwrap().unwrap().checkpoint,
        at(15, 2)
    );
    let meters = db.load_meters(3, 86_400_000, month()).await.unwrap();
    assert_eq!(
        meters["acme"].counters,
        vec![counter(SubjectKind::User, "alice", 7)]
    );
    assert!(
        db.load_meters(4, 86_400_000, month())
            .await
            .unwrap()
            .is_empty(),
        "by partition"
    );
}

/// `rebuild-projections` counts spend again only from a whole embedded
/// usage log, under the options the service counted it with; otherwise it
/// says why and keeps spend as it was. Each step adds one more reason, each
/// one taking precedence over those before it.
async fn a_recount_needs_the_whole_embedded_log_and_its_options(db: Db) {
    let _org = Org::create(&db, "acme").await;
    let options = MeterConfig::default();
    let fewer_models = MeterConfig {
        models_max: 5,
        ..MeterConfig::default()
    };
    let recount =
        async |config: MeterConfig| db.rebuild_projections(config, |_| {}).await.unwrap().usage;
    assert!(
        matches!(recount(options).await, Recount::Counted { records: 0, .. }),
        "nothing metered yet: nothing to count"
    );
    let spend = "SELECT spend_micros FROM spend_monthly";
    let _ = db
        .execute_raw(
            "INSERT INTO spend_monthly (org_id, kind, subject_id, month, spend_micros, requests, \
             last_at_ms, fired_bps, cut_off, ordinal) VALUES ('acme', 'org', 'acme', 202611, 70, \
             1, 1, 0, 0, 0)",
        )
        .await
        .unwrap();
    let mut reasons = Vec::new();
    let mut kept = async |config: MeterConfig, why: &str| {
        let Recount::Kept(said) = recount(config).await else {
            panic!("{why}: counted")
        };
        assert!(said.contains(why), "{why}: {said}");
        assert_eq!(
            db.query_i64(spend).await.unwrap(),
            [70],
            "{why}: spend kept"
        );
        reasons.push(said);
    };
    kept(options, "no checkpoint of this log").await;
    for _ in 0..2 {
        let _ = db.append_usage(NOV, 1, b"").await.unwrap();
    }
    let _ = db
        .execute_raw("DELETE FROM usage_log WHERE seq = 1")
        .await
        .unwrap();
    kept(options, "the log starts at position 2").await;
    let served = tally_store::recount::options_text(&options);
    db.note_meter_options(&served, NOV).await.unwrap();
    kept(fewer_models, "this command was given").await;
    db.note_meter_options(&tally_store::recount::options_text(&fewer_models), NOV)
        .await
        .unwrap();
    kept(
        fewer_models,
        "options changed (from counting_rules=1 dedupe_window_ms=",
    )
    .await;
    let _ = db.append_usage(NOV, 1, b"").await.unwrap();
    assert_eq!(db.purge_usage(3, NOV + 1).await.unwrap(), 2);
    kept(options, "up to position 3 were purged").await;
    // Partition 0 metered from a topic, reset, then from the embedded log:
    // its checkpoint names only the embedded log, the claims recorded both.
    let _ = db.claim_partition(0, "kafka:x", NOV).await.unwrap();
    assert_eq!(db.reset_usage_positions(NOV).await.unwrap(), 1);
    let _ = db.claim_partition(0, "embedded", NOV).await.unwrap();
    kept(options, "this database also metered kafka:x").await;
    let _ = db
        .claim_partition(1, "kafka:tally.usage", NOV)
        .await
        .unwrap();
    kept(options, "the usage log is kafka:tally.usage").await;
    // A database that metered before logs and options were recorded.
    let _ = db
        .execute_raw("UPDATE tally_meta SET value = 'before_v19' WHERE key = 'usage_history'")
        .await
        .unwrap();
    kept(
        options,
        "before the logs and options it counts with were recorded",
    )
    .await;
    assert_eq!(reasons.len(), 8);
}

/// A partition is bound to the usage log of its first claim: a claim for
/// another log is refused and fences no one; the mark of the position comes
/// back with the claim; resetting the positions keeps what was counted.
async fn a_checkpoint_is_bound_to_its_usage_log(db: Db) {
    let _org = Org::create(&db, "acme").await;
    let acme = || OrgId::new("acme").unwrap();
    let changes = MeterChanges {
        counters: vec![counter(SubjectKind::User, "alice", 5)],
        ..MeterChanges::default()
    };
    let first = db.claim_partition(2, "kafka:a", NOV).await.unwrap();
    let at = PartitionCheckpoint {
        position: 10,
        number: 1,
        mark: Some(-42),
    };
    db.write_checkpoint(2, first.epoch, at, &[(acme(), changes)], &[], NOV)
        .await
        .unwrap();
    let other = db.claim_partition(2, "kafka:b", NOV).await;
    match &other {
        Err(Error::OtherLog {
            partition: 2,
            bound,
            log,
        }) => assert_eq!((bound.as_str(), log.as_str()), ("kafka:a", "kafka:b")),
        other => panic!("{other:?}"),
    }
    let text = other.unwrap_err().to_string();
    assert!(text.contains("tally reset-usage-positions"), "{text}");
    let stored = db.load_checkpoint(2).await.unwrap().unwrap();
    assert_eq!((stored.epoch, stored.checkpoint), (first.epoch, at));
    // Other partitions are bound on their own.
    let _ = db.claim_partition(3, "kafka:b", NOV).await.unwrap();
    let again = db.claim_partition(2, "kafka:a", NOV).await.unwrap();
    assert_eq!(again.checkpoint, at);
    assert!(again.epoch > first.epoch);
    // A process older than marks moves the position on and leaves the mark
    // as it was: it is not the mark of the new position.
    let _ = db
        .execute_raw("UPDATE checkpoints SET position = 25 WHERE partition_id = 2")
        .await
        .unwrap();
    let older = db.claim_partition(2, "kafka:a", NOV).await.unwrap();
    assert_eq!(
        older.checkpoint,
        PartitionCheckpoint {
            position: 25,
            number: 1,
            mark: None
        }
    );
    let again = older;

    assert_eq!(db.reset_usage_positions(NOV).await.unwrap(), 2);
    let stale = db.write_checkpoint(2, again.epoch, at, &[], &[], NOV).await;
    assert!(matches!(stale, Err(Error::Fenced { .. })), "{stale:?}");
    let rebound = db.claim_partition(2, "kafka:b", NOV).await.unwrap();
    assert_eq!(
        rebound.checkpoint,
        PartitionCheckpoint {
            position: -1,
            number: 1,
            mark: None
        }
    );
    let meters = db.load_meters(2, 86_400_000, month()).await.unwrap();
    assert_eq!(
        meters["acme"].counters,
        vec![counter(SubjectKind::User, "alice", 5)],
        "counted spend stays"
    );
    // The embedded log is never created again: nothing to reset.
    let _ = db.claim_partition(7, "embedded", NOV).await.unwrap();
    let refused = db.reset_usage_positions(NOV).await;
    assert!(
        matches!(&refused, Err(Error::Config(m)) if m.contains("embedded usage log")),
        "{refused:?}"
    );
}

async fn holds_are_fenced_and_go_with_checkpoints(db: Db) {
    use tally_store::holds::StoredHold;
    let _org = Org::create(&db, "acme").await;
    let hold = |id: &str, micros| StoredHold {
        org_id: "acme".into(),
        request_id: id.into(),
        user_id: "alice".into(),
        key_id: "ka".into(),
        group_ids: vec!["eng".into(), "ops".into()],
        amount_micros: micros,
        placed_at_ms: NOV,
        expires_at_ms: NOV + 600_000,
    };
    let first = db.claim_partition(5, "test", NOV).await.unwrap();
    db.place_holds(5, first.epoch, &[hold("r1", 10), hold("r2", 20)])
        .await
        .unwrap();
    assert_eq!(
        db.load_holds(5).await.unwrap(),
        vec![hold("r1", 10), hold("r2", 20)]
    );
    assert!(db.load_holds(6).await.unwrap().is_empty(), "by partition");
    // A release deletes; a placement under the same id replaces.
    db.release_holds(5, first.epoch, &[("acme".into(), "r2".into())])
        .await
        .unwrap();
    let expired = StoredHold {
        expires_at_ms: NOV,
        ..hold("r0", 5)
    };
    db.place_holds(5, first.epoch, &[hold("r1", 15), expired.clone()])
        .await
        .unwrap();
    assert_eq!(
        db.load_holds(5).await.unwrap(),
        vec![expired, hold("r1", 15)]
    );
    // A checkpoint deletes the holds settled up to it, and those past
    // their TTL.
    let gone = MeterChanges {
        holds_gone: vec!["r1".into()],
        ..MeterChanges::default()
    };
    let at = PartitionCheckpoint {
        position: 10,
        number: 1,
        mark: None,
    };
    db.write_checkpoint(
        5,
        first.epoch,
        at,
        &[(OrgId::new("acme").unwrap(), gone)],
        &[],
        NOV,
    )
    .await
    .unwrap();
    assert!(db.load_holds(5).await.unwrap().is_empty());
    // A new owner fences the old one out of placing and releasing.
    db.place_holds(5, first.epoch, &[hold("r3", 30)])
        .await
        .unwrap();
    let second = db.claim_partition(5, "test", NOV).await.unwrap();
    let stale = db.place_holds(5, first.epoch, &[hold("r4", 40)]).await;
    assert!(
        matches!(stale, Err(Error::Fenced { partition: 5 })),
        "{stale:?}"
    );
    let stale = db
        .release_holds(5, first.epoch, &[("acme".into(), "r3".into())])
        .await;
    assert!(
        matches!(stale, Err(Error::Fenced { partition: 5 })),
        "{stale:?}"
    );
    assert_eq!(
        db.load_holds(5).await.unwrap(),
        vec![hold("r3", 30)],
        "the new owner finds what the old one placed before the claim"
    );
    db.place_holds(5, second.epoch, &[hold("r4", 40)])
        .await
        .unwrap();
    assert_eq!(db.load_holds(5).await.unwrap().len(), 2);
}

/// What the stored holds hold per scope, as a process that does not meter
/// the org shows it: live rows only, a hold counted on each of its groups.
async fn held_sums_add_up_the_live_rows_per_scope(db: Db) {
    use tally_store::holds::StoredHold;
    let _org = Org::create(&db, "acme").await;
    let hold = |id: &str, user: &str, key: &str, groups: &[&str], micros, expires| StoredHold {
        org_id: "acme".into(),
        request_id: id.into(),
        user_id: user.into(),
        key_id: key.into(),
        group_ids: groups.iter().map(|g| (*g).to_owned()).collect(),
        amount_micros: micros,
        placed_at_ms: NOV,
        expires_at_ms: expires,
    };
    let live = NOV + 600_000;
    let claim = db.claim_partition(3, "test", NOV).await.unwrap();
    db.place_holds(
        3,
        claim.epoch,
        &[
            hold("r1", "alice", "ka", &["eng", "ops"], 10, live),
            hold("r2", "alice", "ka2", &["eng"], 20, live),
            hold("r3", "bob", "kb", &[], 40, live),
            // Past its TTL: holds nothing any more.
            hold("r4", "bob", "kb", &["ops"], 1_000, NOV + 1),
            // Large sums stay exact (PostgreSQL sums bigints as numeric).
            hold("r5", "carol", "kc", &["ops"], 3_000_000_000_000, live),
        ],
    )
    .await
    .unwrap();
    let now = NOV + 1;
    let sums = |kind, ids: &'static [&'static str]| {
        let db = db.clone();
        async move { db.held_sums("acme", kind, ids, now).await.unwrap() }
    };
    assert_eq!(
        sums(SubjectKind::User, &["alice", "bob", "carol", "dave"]).await,
        vec![30, 40, 3_000_000_000_000, 0]
    );
    assert_eq!(
        sums(SubjectKind::Key, &["kb", "ka", "ka2"]).await,
        vec![40, 10, 20]
    );
    assert_eq!(
        sums(SubjectKind::Group, &["eng", "ops", "none"]).await,
        vec![30, 3_000_000_000_010, 0]
    );
    assert_eq!(
        sums(SubjectKind::Org, &["acme"]).await,
        vec![3_000_000_000_070]
    );
    assert!(sums(SubjectKind::User, &[]).await.is_empty());
    // More ids than a query names: the same answer from all the rows.
    let many: Vec<String> = (0..600).map(|i| format!("u{i}")).collect();
    let mut ids: Vec<&str> = many.iter().map(String::as_str).collect();
    ids.push("bob");
    let all = db
        .held_sums("acme", SubjectKind::User, &ids, now)
        .await
        .unwrap();
    assert_eq!(all.len(), 601);
    assert_eq!(all[600], 40);
    assert!(all[..600].iter().all(|&h| h == 0));
    // Another org's rows are not summed.
    assert_eq!(
        db.held_sums("beta", SubjectKind::User, &["alice"], now)
            .await
            .unwrap(),
        vec![0]
    );
    // One member's live rows, by request id, at most `limit`.
    let of = |user: &'static str, limit| {
        let db = db.clone();
        async move {
            let rows = db.user_holds("acme", user, now, limit).await.unwrap();
            rows.into_iter()
                .map(|h| (h.request_id, h.key_id, h.group_ids, h.amount_micros))
                .collect::<Vec<_>>()
        }
    };
    let groups = |g: &[&str]| g.iter().map(|g| (*g).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        of("alice", 10).await,
        vec![
            ("r1".into(), "ka".into(), groups(&["eng", "ops"]), 10),
            ("r2".into(), "ka2".into(), groups(&["eng"]), 20),
        ]
    );
    assert_eq!(of("alice", 1).await.len(), 1);
    assert_eq!(
        of("bob", 10).await,
        vec![("r3".into(), "kb".into(), groups(&[]), 40)],
        "not the one past its TTL"
    );
    assert!(of("dave", 10).await.is_empty());
    assert!(
        db.user_holds("beta", "alice", now, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A checkpoint deletes any number of settled holds (in batches), of its
/// own org only.
async fn a_checkpoint_deletes_many_settled_holds(db: Db) {
    use tally_store::holds::StoredHold;
    let _acme = Org::create(&db, "acme").await;
    let _beta = Org::create(&db, "beta").await;
    let hold = |org: &str, i: usize| StoredHold {
        org_id: org.into(),
        request_id: format!("r{i}"),
        user_id: "alice".into(),
        key_id: "ka".into(),
        group_ids: vec![],
        amount_micros: 1,
        placed_at_ms: NOV,
        expires_at_ms: NOV + 600_000,
    };
    let claim = db.claim_partition(4, "test", NOV).await.unwrap();
    let mut holds: Vec<StoredHold> = (0..1_200).map(|i| hold("acme", i)).collect();
    holds.push(hold("beta", 7));
    db.place_holds(4, claim.epoch, &holds).await.unwrap();
    let gone = MeterChanges {
        holds_gone: (0..1_100).map(|i| format!("r{i}")).collect(),
        ..MeterChanges::default()
    };
    let at = PartitionCheckpoint {
        position: 1,
        number: 1,
        mark: None,
    };
    db.write_checkpoint(
        4,
        claim.epoch,
        at,
        &[(OrgId::new("acme").unwrap(), gone)],
        &[],
        NOV,
    )
    .await
    .unwrap();
    let mut left: Vec<(String, String)> = db
        .load_holds(4)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.org_id, h.request_id))
        .collect();
    left.sort();
    let mut want: Vec<(String, String)> = (1_100..1_200)
        .map(|i| ("acme".to_owned(), format!("r{i}")))
        .collect();
    want.push(("beta".to_owned(), "r7".to_owned()));
    want.sort();
    assert_eq!(left, want);
}

async fn dead_letters_are_kept_once(db: Db) {
    let claim = db.claim_partition(1, "test", NOV).await.unwrap();
    let letter = |position, org: Option<&str>| DeadLetter {
        position,
        logged_at_ms: NOV + position,
        org_id: org.map(str::to_owned),
        reason: "unknown_user".into(),
        message: "user_id names no user of the org".into(),
        payload: vec![1, 2, 3],
    };
    // 4 and 5 logged at the same time: the position orders them.
    let mut letters = vec![letter(4, Some("acme")), letter(5, None)];
    letters[1].logged_at_ms = letters[0].logged_at_ms;
    let at = PartitionCheckpoint {
        position: 5,
        number: 1,
        mark: None,
    };
    db.write_checkpoint(1, claim.epoch, at, &[], &letters, NOV)
        .await
        .unwrap();
    // Replayed after a crash, the same letters are not kept twice.
    let at = PartitionCheckpoint {
        position: 5,
        number: 2,
        mark: None,
    };
    db.write_checkpoint(1, claim.epoch, at, &[], &letters, NOV)
        .await
        .unwrap();
    let all = db.list_dead_letters(None, None, 100).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].position, 5, "newest first");
    let acme = db.list_dead_letters(Some("acme"), None, 100).await.unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0].reason, "unknown_user");
    // A page at a time: each once, in the same order.
    let after =
        |l: &tally_store::query::DeadLetterRow| Some((l.logged_at_ms, l.partition_id, l.position));
    let first = db.list_dead_letters(None, None, 1).await.unwrap();
    let second = db
        .list_dead_letters(None, after(&first[0]), 1)
        .await
        .unwrap();
    assert_eq!(
        [first[0].clone(), second[0].clone()],
        [all[0].clone(), all[1].clone()]
    );
    assert!(
        db.list_dead_letters(None, after(&second[0]), 1)
            .await
            .unwrap()
            .is_empty()
    );
}

fn cutoff(user: &str, ordinal: u32) -> SavedEnforcement {
    SavedEnforcement {
        kind: SubjectKind::User,
        id: user.into(),
        event: tally_core::ledger::Enforcement {
            subject: Subject::User(0),
            month: month(),
            at_ms: NOV + 5,
            spend_micros: 120,
            limit_micros: Some(100),
            ordinal,
            kind: EnforcementKind::CutOff,
        },
    }
}

async fn webhook_deliveries_are_an_outbox(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    let _quiet = Org::create(&db, "quiet").await;
    org.run(
        &db,
        Command::SetWebhook {
            url: "https://hooks.acme.test/t".into(),
            format: WebhookFormat::Slack,
        },
    )
    .await;
    org.run(
        &db,
        Command::ChangeSettings {
            name: None,
            default_monthly_limit_micros: None,
            alert_thresholds_bps: None,
            monthly_limit_micros: Some(Some(9_000_000)),
        },
    )
    .await;
    let row = db.org("acme", month()).await.unwrap().unwrap();
    assert_eq!(row.monthly_limit_micros, Some(9_000_000));
    // Dated as logged (by PostgreSQL's clock there, see `Db::append`).
    let set_at = db.org_events(&org.dir.id, 1, 1).await.unwrap()[0].at_ms;
    let hook = WebhookTarget {
        url: "https://hooks.acme.test/t".into(),
        format: WebhookFormat::Slack,
        seq: 2,
        set_at_ms: set_at,
    };
    assert_eq!(row.webhook, Some(hook.clone()));
    let changes = |e: Vec<SavedEnforcement>| MeterChanges {
        enforcement: e,
        ..MeterChanges::default()
    };
    checkpoint(
        &db,
        "acme",
        1,
        changes(vec![cutoff("alice", 1), cutoff("bob", 1)]),
    )
    .await;
    // Replayed after a crash: no second delivery for the same event.
    checkpoint(&db, "acme", 2, changes(vec![cutoff("alice", 1)])).await;
    // An org without a webhook gets none.
    checkpoint(&db, "quiet", 3, changes(vec![cutoff("carol", 1)])).await;
    assert_eq!(db.pending_deliveries().await.unwrap(), 2);
    assert_eq!(db.delivery_counts("quiet").await.unwrap(), vec![]);

    // Claims are exclusive while their lease runs.
    let due = db.claim_deliveries(NOV, 60_000, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].webhook, Some(hook));
    assert_eq!(
        (due[0].attempts, due[0].event.event.as_str()),
        (1, "cut_off")
    );
    assert_eq!(due[0].event.spend_micros, 120);
    assert!(
        db.claim_deliveries(NOV + 1, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let (alice, bob) = (&due[0], &due[1]);
    let retry = AttemptOutcome::Retry {
        status: Some(500),
        error: "HTTP 500".into(),
        next_attempt_ms: NOV + 100,
    };
    assert!(db.finish_delivery(alice, &retry, NOV).await.unwrap());
    // bob's sender stalls past its lease; another takes bob over.
    let again = db.claim_deliveries(NOV + 60_001, 60_000, 10).await.unwrap();
    assert_eq!(again.len(), 2, "alice is due again, bob's lease ran out");
    let delivered = AttemptOutcome::Delivered { status: 204 };
    assert!(
        !db.finish_delivery(bob, &delivered, NOV).await.unwrap(),
        "stale claim"
    );
    for d in &again {
        assert_eq!(d.attempts, 2);
        assert!(
            db.finish_delivery(d, &delivered, NOV + 60_002)
                .await
                .unwrap()
        );
    }
    let list = db.list_deliveries("acme", None, None, 10).await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].id > list[1].id, "newest first");
    assert!(
        list.iter()
            .all(|d| d.state == "delivered" && d.attempts == 2)
    );
    assert_eq!(list[0].next_attempt_ms, None);
    assert_eq!(
        db.delivery_counts("acme").await.unwrap(),
        vec![("delivered".into(), 2)]
    );
    let page = db
        .list_deliveries("acme", Some("delivered"), Some(list[0].id), 10)
        .await
        .unwrap();
    assert_eq!(page, list[1..]);
    assert!(
        db.list_deliveries("acme", Some("failed"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Given up, then sent again on request; removed webhooks cancel.
    checkpoint(&db, "acme", 4, changes(vec![cutoff("alice", 2)])).await;
    let due = db.claim_deliveries(NOV + 70_000, 60_000, 10).await.unwrap();
    let gave_up = AttemptOutcome::GaveUp {
        status: None,
        error: "connection refused".into(),
    };
    assert!(db.finish_delivery(&due[0], &gave_up, NOV).await.unwrap());
    assert!(
        !db.redeliver("quiet", due[0].id, NOV).await.unwrap(),
        "another org's"
    );
    assert!(db.redeliver("acme", due[0].id, NOV + 70_001).await.unwrap());
    assert!(
        !db.redeliver("acme", due[0].id, NOV).await.unwrap(),
        "pending already"
    );
    org.run(&db, Command::RemoveWebhook).await;
    let due = db.claim_deliveries(NOV + 70_001, 60_000, 10).await.unwrap();
    assert_eq!(
        (due.len(), due[0].attempts, due[0].webhook.clone()),
        (1, 1, None)
    );
    assert!(
        db.finish_delivery(&due[0], &AttemptOutcome::Cancelled, NOV)
            .await
            .unwrap()
    );
    assert_eq!(db.pending_deliveries().await.unwrap(), 0);
    let last = &db
        .list_deliveries("acme", Some("cancelled"), None, 1)
        .await
        .unwrap()[0];
    assert_eq!(
        last.last_error.as_deref(),
        Some("the org has no webhook any more")
    );
    assert_eq!(
        db.org("acme", month()).await.unwrap().unwrap().webhook,
        None
    );
}

/// One subject's deliveries leave one at a time, in the order their events
/// were recorded: a delivery being sent or waiting for its retry holds the
/// ones behind it; one delivered or given up holds none; other subjects'
/// are not held.
async fn one_subjects_deliveries_leave_in_order(db: Db) {
    let mut org = Org::create(&db, "acme").await;
    org.run(
        &db,
        Command::SetWebhook {
            url: "https://hooks.acme.test/t".into(),
            format: WebhookFormat::Tally,
        },
    )
    .await;
    let changes = |e: Vec<SavedEnforcement>| MeterChanges {
        enforcement: e,
        ..MeterChanges::default()
    };
    checkpoint(
        &db,
        "acme",
        1,
        changes(vec![
            cutoff("alice", 1),
            cutoff("bob", 1),
            cutoff("alice", 2),
            cutoff("alice", 3),
        ]),
    )
    .await;
    let who = |due: &[DueDelivery]| -> Vec<(String, i64)> {
        due.iter()
            .map(|d| (d.event.subject_id.clone(), d.event.ordinal))
            .collect()
    };
    let pair = |u: &str, n: i64| (u.to_owned(), n);
    let claim = |at: i64| {
        let db = db.clone();
        async move { db.claim_deliveries(at, 60_000, 10).await.unwrap() }
    };
    let delivered = AttemptOutcome::Delivered { status: 200 };
    let due = claim(NOV).await;
    assert_eq!(who(&due), [pair("alice", 1), pair("bob", 1)]);
    let retry = AttemptOutcome::Retry {
        status: Some(500),
        error: "HTTP 500".into(),
        next_attempt_ms: NOV + 100,
    };
    assert!(db.finish_delivery(&due[0], &retry, NOV).await.unwrap());
    assert!(
        claim(NOV + 50).await.is_empty(),
        "alice's first waits for its retry, bob's is being sent"
    );
    assert!(db.finish_delivery(&due[1], &delivered, NOV).await.unwrap());
    let due = claim(NOV + 100).await;
    assert_eq!((who(&due), due[0].attempts), (vec![pair("alice", 1)], 2));
    assert!(db.finish_delivery(&due[0], &delivered, NOV).await.unwrap());
    let due = claim(NOV + 101).await;
    assert_eq!(who(&due), [pair("alice", 2)]);
    let gave_up = AttemptOutcome::GaveUp {
        status: None,
        error: "refused".into(),
    };
    assert!(db.finish_delivery(&due[0], &gave_up, NOV).await.unwrap());
    let third = claim(NOV + 102).await;
    assert_eq!(who(&third), [pair("alice", 3)], "a failed one holds none");
    assert!(
        db.finish_delivery(&third[0], &delivered, NOV)
            .await
            .unwrap()
    );
    // Sent again on request, it goes before what was recorded after it.
    assert!(db.redeliver("acme", due[0].id, NOV + 103).await.unwrap());
    checkpoint(&db, "acme", 2, changes(vec![cutoff("alice", 4)])).await;
    let due = claim(NOV + 104).await;
    assert_eq!(who(&due), [pair("alice", 2)]);
    assert!(db.finish_delivery(&due[0], &delivered, NOV).await.unwrap());
    assert_eq!(who(&claim(NOV + 105).await), [pair("alice", 4)]);
}

/// Makes every commit fail for real, until cleared: on SQLite the database's
/// file system fills up (a tmpfs of its own), on PostgreSQL a deferred
/// constraint trigger raises at COMMIT. Either way the database itself ends
/// the transaction, which is what a full disk, an I/O error or a server going
/// away does; the store must not carry that transaction into the next one.
enum CommitFault {
    DiskFull {
        _mount: Tmpfs,
        filler: std::path::PathBuf,
    },
    Trigger,
}

impl CommitFault {
    async fn arm(&self, db: &Db) {
        match self {
            CommitFault::DiskFull { filler, .. } => fill(filler),
            CommitFault::Trigger => {
                let _ = db
                    .execute_raw("UPDATE tally_test_fault SET armed = TRUE")
                    .await
                    .unwrap();
            }
        }
    }

    async fn clear(&self, db: &Db) {
        match self {
            CommitFault::DiskFull { filler, .. } => std::fs::remove_file(filler).unwrap(),
            CommitFault::Trigger => {
                let _ = db
                    .execute_raw("UPDATE tally_test_fault SET armed = FALSE")
                    .await
                    .unwrap();
            }
        }
    }
}

/// Writes `path` until the file system says it is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match f.write_all(&chunk).and_then(|()| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => return, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// A small tmpfs mounted for one test (the suite runs as root), unmounted
/// on drop.
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(unique("tally-store-full"));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
                "cannot mount a tmpfs at {}: the disk-full tests need root (scripts/test.sh \
                 runs as root in CI)",
                dir.display()
            );
            eprintln!("disk-full contract skipped: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

async fn sqlite_on_a_small_disk() -> Option<(Db, String, CommitFault)> {
    let mount = Tmpfs::mount("4m")?;
    let url = format!("sqlite://{}/tally.db?mode=rwc", mount.dir.display());
    let db = Db::open(&DbOptions::new(url.clone())).await.unwrap();
    let filler = mount.dir.join("filler");
    Some((
        db,
        url,
        CommitFault::DiskFull {
            _mount: mount,
            filler,
        },
    ))
}

async fn postgres_with_a_commit_trigger() -> Option<(Db, String, CommitFault)> {
    let (db, url) = postgres_with_url().await?;
    let _ = db
        .execute_raw(
            "CREATE TABLE tally_test_fault (armed BOOLEAN NOT NULL); \
             INSERT INTO tally_test_fault VALUES (FALSE); \
             CREATE FUNCTION tally_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF (SELECT armed FROM tally_test_fault) THEN \
             RAISE EXCEPTION 'injected fault at commit'; END IF; RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER fault_events AFTER INSERT ON events \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tally_test_fail(); \
             CREATE CONSTRAINT TRIGGER fault_usage AFTER INSERT ON usage_log \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tally_test_fail(); \
             CREATE CONSTRAINT TRIGGER fault_checkpoints AFTER UPDATE ON checkpoints \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tally_test_fail(); \
             CREATE CONSTRAINT TRIGGER fault_deliveries AFTER UPDATE ON webhook_deliveries \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tally_test_fail();",
        )
        .await
        .unwrap();
    Some((db, url, CommitFault::Trigger))
}

/// A failed commit ends its transaction for good: the next writes commit
/// for real (another connection sees them), and the failed ones left
/// nothing. The regression: sqlx kept counting a transaction that SQLite had
/// rolled back by itself, so later transactions became savepoints inside a
/// transaction that never committed again, and every write "succeeded".
async fn a_failed_commit_leaves_the_connection_clean(db: Db, url: String, fault: CommitFault) {
    let acme = OrgId::new("acme").unwrap();
    let mut org = Org::create(&db, "acme").await;
    org.add_user(&db, "alice", "Alice", Some(10)).await;
    let _ = db.claim_partition(0, "test", NOV).await.unwrap();
    let epoch = db.load_checkpoint(0).await.unwrap().unwrap().epoch;
    let first = db.append_usage(NOV, 1, b"before").await.unwrap();
    let add = |id: &str, seq: u64| {
        let kinds = org
            .dir
            .handle(&Command::AddUser {
                user_id: UserId::new(id).unwrap(),
                email: format!("{id}@example.test"),
                name: id.into(),
                monthly_limit_micros: None,
                activate: true,
            })
            .unwrap();
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| EntityEvent {
                org_id: acme.clone(),
                seq: seq + i as u64,
                at_ms: NOV + 2_000,
                actor: Actor::Operator,
                kind,
            })
            .collect::<Vec<_>>()
    };
    let next_seq = org.dir.seq + 1;
    let mut bob = add("bob", next_seq);
    let changes = |spend| MeterChanges {
        counters: vec![counter(SubjectKind::User, "alice", spend)],
        ..MeterChanges::default()
    };
    let at = |number| PartitionCheckpoint {
        position: first,
        number,
        mark: None,
    };

    fault.arm(&db).await;
    assert!(db.append(&mut bob).await.is_err(), "an entity append fails");
    assert!(
        db.write_checkpoint(0, epoch, at(1), &[(acme.clone(), changes(5))], &[], NOV)
            .await
            .is_err(),
        "a checkpoint fails"
    );
    assert!(
        db.append_usage(NOV, 1, b"refused").await.is_err(),
        "a usage append fails"
    );
    fault.clear(&db).await;

    // A transaction that fails halfway (another writer took the seq) must
    // not leave one open either.
    let mut stale = add("carol", 1);
    assert!(matches!(
        db.append(&mut stale).await,
        Err(Error::Conflict { .. })
    ));
    // What comes next commits, for real.
    db.append(&mut bob).await.unwrap();
    db.write_checkpoint(0, epoch, at(1), &[(acme.clone(), changes(7))], &[], NOV)
        .await
        .unwrap();
    let second = db.append_usage(NOV, 1, b"after").await.unwrap();

    // Seen from fresh connections: exactly the writes that succeeded.
    for seen in [
        db.clone(),
        Db::open(&DbOptions::new(url.clone())).await.unwrap(),
    ] {
        let payloads: Vec<Vec<u8>> = seen
            .read_usage(0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(payloads, [b"before".to_vec(), b"after".to_vec()]);
        assert_eq!(seen.usage_head().await.unwrap(), second);
        let seqs: Vec<u64> = seen
            .org_events(&acme, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..next_seq + bob.len() as u64).collect::<Vec<_>>());
        assert!(seen.user(&acme, "bob", month()).await.unwrap().is_some());
        assert!(seen.user(&acme, "carol", month()).await.unwrap().is_none());
        assert_eq!(
            seen.load_checkpoint(0)
                .await
                .unwrap()
                .unwrap()
                .checkpoint
                .number,
            1
        );
        let meters = seen.load_meters(0, 86_400_000, month()).await.unwrap();
        assert_eq!(meters["acme"].counters[0].counter.spend_micros, 7);
    }
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                if let Some(db) = super::sqlite().await {
                    super::$test(db).await;
                }
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $test() {
                if let Some(db) = super::postgres().await {
                    super::$test(db).await;
                }
            })*
        }
    };
}

mod failed_commit {
    #[tokio::test]
    async fn sqlite() {
        if let Some((db, url, fault)) = super::sqlite_on_a_small_disk().await {
            super::a_failed_commit_leaves_the_connection_clean(db, url, fault).await;
        }
    }

    #[tokio::test]
    async fn postgres() {
        if let Some((db, url, fault)) = super::postgres_with_a_commit_trigger().await {
            super::a_failed_commit_leaves_the_connection_clean(db, url, fault).await;
        }
    }
}

contract!(
    appends_project_and_conflict,
    log_heads_date_every_later_append,
    log_heads_wait_for_an_append_under_way,
    rebuild_gives_the_same_read_models,
    users_sort_filter_and_paginate,
    checkpoints_round_trip,
    usage_log_positions_only_grow,
    text_is_stored_verbatim,
    a_deposed_owner_is_fenced_out,
    a_checkpoint_is_bound_to_its_usage_log,
    a_recount_needs_the_whole_embedded_log_and_its_options,
    holds_are_fenced_and_go_with_checkpoints,
    held_sums_add_up_the_live_rows_per_scope,
    a_checkpoint_deletes_many_settled_holds,
    dead_letters_are_kept_once,
    webhook_deliveries_are_an_outbox,
    one_subjects_deliveries_leave_in_order,
    a_newer_schema_is_refused,
);

/// A database of a release whose dedupe window forgot an hour at a time
/// (schema 8) keeps every remembered id through the migration: an hour's
/// ids stay until the whole hour is too late, and the floor stays a floor.
async fn an_hourly_dedupe_window_migrates_to_minutes(db: Db) {
    use tally_core::dedupe::{DedupeConfig, DedupeWindow, Seen};
    use tally_core::time::{MS_PER_HOUR, MS_PER_MINUTE};

    db.migrate_to(8).await.unwrap();
    let hour = NOV / MS_PER_HOUR + 10;
    let watermark = (hour + 1) * MS_PER_HOUR + 5 * MS_PER_MINUTE;
    let blob = match db.backend() {
        tally_store::Backend::Sqlite => format!("X'{:032x}{:032x}'", 7u128, 8u128),
        tally_store::Backend::Postgres => format!("'\\x{:032x}{:032x}'::bytea", 7u128, 8u128),
    };
    let _ = db
        .execute_raw(&format!(
            "INSERT INTO meter_orgs (org_id, partition_id, watermark_ms, dedupe_floor_hour, \
             rolled_month) VALUES ('acme', 0, {watermark}, {floor}, 0), \
             ('idle', 0, 0, {none}, 0); \
             INSERT INTO dedupe_chunks (org_id, hour, chunk, hashes) \
             VALUES ('acme', {hour}, 1, {blob}), ('acme', {below}, 1, {blob})",
            floor = hour - 1,
            below = hour - 2,
            none = i64::MIN,
        ))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let meters = db.load_meters(0, 86_400_000, month()).await.unwrap();
    assert_eq!(
        meters["idle"].dedupe_floor_minute,
        i64::MIN,
        "no floor stays none"
    );
    let saved = meters["acme"].clone();
    assert_eq!(saved.dedupe_floor_minute, (hour - 1) * 60);
    let minute = hour * 60 + 59;
    let below = (hour - 2) * 60 + 59;
    assert_eq!(
        saved.dedupe,
        vec![(below, 7), (below, 8), (minute, 7), (minute, 8)]
    );
    let restore = |entries_max, watermark| {
        let config = DedupeConfig {
            entries_max,
            ..DedupeConfig::default()
        };
        DedupeWindow::restore(
            config,
            saved.dedupe_floor_minute,
            watermark,
            saved.dedupe.clone(),
        )
    };
    let window = restore(1_000, watermark);
    // Below the floor: forgotten, too late.
    assert_eq!(window.len(), 2);
    assert_eq!(
        window.check(9, (hour - 2) * MS_PER_HOUR, watermark),
        Seen::TooLate
    );
    // The hour's ids are still remembered in each of its minutes.
    for m in [0, 5, 59] {
        let at = hour * MS_PER_HOUR + m * MS_PER_MINUTE;
        assert_eq!(
            window.check(8, at, watermark),
            Seen::Duplicate,
            "minute {m}"
        );
    }
    // Past the cap, half an hour on, the hour is forgotten as a whole: its
    // early minutes are too late, never new (had its ids gone to its first
    // minute, they would be new from its second minute on).
    let later = (hour + 1) * MS_PER_HOUR + 30 * MS_PER_MINUTE;
    let window = restore(1, later);
    assert_eq!(window.len(), 0);
    let early = hour * MS_PER_HOUR + 5 * MS_PER_MINUTE;
    assert_eq!(window.check(8, early, later), Seen::TooLate);
}

/// Counters written before forecasts (schema 17) get their month's first
/// day with usage from the daily spend, and subjects already cut off count
/// as alerted: an upgrade mid-month fires no forecast that a month of
/// spend over one day would project.
async fn counters_before_forecasts_get_their_first_day(db: Db) {
    db.migrate_to(17).await.unwrap();
    let _ = db
        .execute_raw(&format!(
            "INSERT INTO meter_orgs (org_id, partition_id, watermark_ms, dedupe_floor_minute, \
             rolled_month) VALUES ('acme', 0, {NOV}, 0, 0); \
             INSERT INTO spend_monthly (org_id, kind, subject_id, month, spend_micros, requests, \
             last_at_ms, fired_bps, cut_off, ordinal) VALUES \
             ('acme', 'user', 'alice', 202611, 120, 2, {alice_at}, 10000, 1, 1), \
             ('acme', 'user', 'bob', 202611, 30, 1, {NOV}, 0, 0, 0), \
             ('acme', 'user', 'carol', 202611, 5, 1, {NOV}, 0, 0, 0); \
             INSERT INTO spend_daily (org_id, kind, subject_id, day, spend_micros, requests) VALUES \
             ('acme', 'user', 'alice', 20261120, 100, 1), ('acme', 'user', 'alice', 20261105, 20, 1), \
             ('acme', 'user', 'bob', 20261028, 7, 1), ('acme', 'user', 'bob', 20261103, 30, 1)",
            alice_at = NOV + 19 * 86_400_000 + 1_500,
        ))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let meters = db.load_meters(0, 86_400_000, month()).await.unwrap();
    let mut got: Vec<(String, u8, bool, u32)> = meters["acme"]
        .counters
        .iter()
        .map(|c| {
            let k = &c.counter;
            (c.id.clone(), k.first_day, k.forecast_fired, k.judged_s)
        })
        .collect();
    got.sort();
    // Judged last as of their latest usage (seconds into the month).
    assert_eq!(
        got,
        [
            ("alice".to_owned(), 5, true, 19 * 86_400 + 1),
            ("bob".to_owned(), 3, false, 0),
            ("carol".to_owned(), 0, false, 0),
        ]
    );
    // Spend from before v19: which logs and options it came from is not
    // recorded, so the usage log is never counted again in its place.
    let history = db.meta("usage_history").await.unwrap();
    assert_eq!(history.as_deref(), Some("before_v19"));
}

/// A binary never writes under a schema newer than its own (a rolled-back
/// release against an upgraded database).
async fn a_newer_schema_is_refused(db: Db) {
    let _ = db
        .execute_raw("INSERT INTO tally_schema (version, applied_at_ms) VALUES (1000000, 0)")
        .await
        .unwrap();
    let refused = db.migrate().await.unwrap_err().to_string();
    assert!(
        refused.contains("schema is version 1000000, newer than this tally's"),
        "{refused}"
    );
}

mod migrations {
    #[tokio::test]
    async fn sqlite() {
        if let Some(db) = super::sqlite_with(false).await {
            super::an_hourly_dedupe_window_migrates_to_minutes(db).await;
        }
        if let Some(db) = super::sqlite_with(false).await {
            super::counters_before_forecasts_get_their_first_day(db).await;
        }
    }

    #[tokio::test]
    async fn postgres() {
        if let Some((db, _)) = super::postgres_with(false).await {
            super::an_hourly_dedupe_window_migrates_to_minutes(db).await;
        }
        if let Some((db, _)) = super::postgres_with(false).await {
            super::counters_before_forecasts_get_their_first_day(db).await;
        }
    }
}

/// On PostgreSQL, serving and maintenance exclude each other through
/// session locks: any number of distributed serves, one embedded serve,
/// and a maintenance command only alone.
#[tokio::test]
async fn serving_and_maintenance_locks_exclude_each_other() {
    let Some((db, url)) = postgres_with_url().await else {
        return;
    };
    let other = Db::open(&DbOptions::new(url)).await.unwrap();
    let maintenance = db.lock_maintenance().await.unwrap();
    assert!(maintenance.is_some());
    let refused = other.lock_serving(false).await.unwrap_err().to_string();
    assert!(
        refused.contains("a maintenance command (tally rebuild-projections")
            && refused.contains("(tally maintenance (state lock), ")
            && refused.contains("pg_terminate_backend(pid)"),
        "{refused}"
    );
    maintenance.unwrap().release().await;
    let first = other.lock_serving(false).await.unwrap();
    let second = db.lock_serving(false).await.unwrap();
    let embedded = db.lock_serving(true).await.unwrap();
    let refused = other.lock_serving(true).await.unwrap_err().to_string();
    assert!(refused.contains("another tally serve"), "{refused}");
    let refused = other.lock_maintenance().await.unwrap_err().to_string();
    assert!(
        refused.contains("a tally serve (or another maintenance command) is using"),
        "{refused}"
    );
    for lock in [first, second, embedded] {
        lock.unwrap().release().await;
    }
    assert!(other.lock_maintenance().await.unwrap().is_some());
}

/// A state lock knows when its connection went away (which ended it), so
/// that a serve can take it again.
#[tokio::test]
async fn a_state_lock_knows_when_its_connection_went_away() {
    let Some((db, url)) = postgres_with_url().await else {
        return;
    };
    let other = Db::open(&DbOptions::new(url)).await.unwrap();
    let mut lock = db.lock_serving(true).await.unwrap().unwrap();
    assert!(lock.held().await);
    let _ = other
        .execute_raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = \
             current_database() AND application_name = 'tally serve (state lock)'",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lock.held().await {
        assert!(
            std::time::Instant::now() < deadline,
            "still held after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The server frees the locks as its process exits, a moment after the
    // connection closed.
    let maintenance = loop {
        match other.lock_maintenance().await {
            Ok(Some(m)) => break m,
            Ok(None) => unreachable!("PostgreSQL"),
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let refused = db.lock_serving(false).await.unwrap_err().to_string();
    assert!(refused.contains("a maintenance command"), "{refused}");
    maintenance.release().await;
}
