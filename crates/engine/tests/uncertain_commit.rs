//! A command whose COMMIT reached PostgreSQL but whose answer never came
//! back (the connection died in between) committed: the command path reads
//! the org's log back and answers success, instead of an error for a change
//! that is there. A real PostgreSQL server, behind a TCP proxy that cuts the
//! connection right after forwarding a COMMIT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tally_core::entity::{Actor, Command, CommandError};
use tally_core::ids::{OrgId, UserId};
use tally_core::secret::hash_secret;
use tally_engine::clock::SystemClock;
use tally_engine::{Engine, EngineOptions, Error};
use tally_store::{Db, DbOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A simple-protocol `COMMIT` as sqlx sends it: 'Q', length 11, the text.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

/// Forwards connections to `upstream`; when armed, the next COMMIT goes
/// to the server and the connection is cut before its answer returns.
async fn proxy(upstream: String, armed: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let armed = Arc::clone(&armed);
            let upstream = upstream.clone();
            drop(tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let cut = Arc::new(AtomicBool::new(false));
                let back = {
                    let cut = Arc::clone(&cut);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = sr.read(&mut buf).await {
                            if cut.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    })
                };
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    let chunk = &buf[..n];
                    let commit = chunk.windows(COMMIT.len()).any(|w| w == COMMIT);
                    if commit && armed.swap(false, Ordering::SeqCst) {
                        cut.store(true, Ordering::SeqCst);
                        let _ = sw.write_all(chunk).await;
                        // Let the server commit, then drop both sides.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        back.abort();
                        return;
                    }
                    if sw.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            }));
        }
    }));
    port
}

#[tokio::test]
async fn a_command_whose_commit_answer_was_lost_succeeds() {
    let Ok(admin) = std::env::var("TALLY_TEST_POSTGRES_ADMIN_URL") else {
        assert!(
            std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
            "TALLY_TEST_POSTGRES_ADMIN_URL is not set: run scripts/test.sh"
        );
        eprintln!("skipped: no PostgreSQL server (scripts/test.sh starts one)");
        return;
    };
    let name = format!("uncertain_{}", std::process::id());
    let server = Db::open(&DbOptions {
        migrate: false,
        ..DbOptions::new(admin.clone())
    })
    .await
    .unwrap();
    let _ = server
        .execute_raw(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    server.close().await;
    // postgres://user@host:port/db → host:port
    let host_port = admin
        .split_once('@')
        .unwrap()
        .1
        .split_once('/')
        .unwrap()
        .0
        .to_owned();
    let user = admin
        .split_once("://")
        .unwrap()
        .1
        .split_once('@')
        .unwrap()
        .0;
    let armed = Arc::new(AtomicBool::new(false));
    let port = proxy(host_port, Arc::clone(&armed)).await;
    let url = format!("postgres://{user}@127.0.0.1:{port}/{name}");
    let db = Db::open(&DbOptions::new(url.clone())).await.unwrap();
    let engine = Engine::start(
        db.clone(),
        Arc::new(SystemClock),
        EngineOptions::default(),
        hash_secret("operator"),
    )
    .await
    .unwrap();
    let org = OrgId::new("acme").unwrap();
    let run = |cmd: Command| {
        let (commands, org) = (Arc::clone(&engine.commands), org.clone());
        async move { commands.execute(&org, Actor::Operator, &cmd).await }
    };
    let _ = run(Command::CreateOrg {
        name: "Acme".into(),
        default_monthly_limit_micros: None,
        alert_thresholds_bps: None,
        monthly_limit_micros: None,
    })
    .await
    .unwrap();
    let bob = || Command::AddUser {
        user_id: UserId::new("bob").unwrap(),
        email: "bob@acme.test".into(),
        name: "Bob".into(),
        monthly_limit_micros: None,
        activate: true,
    };

    armed.store(true, Ordering::SeqCst);
    let events = run(bob()).await.expect("the append committed: success");
    assert!(!armed.load(Ordering::SeqCst), "the proxy cut a COMMIT");
    let cell = engine.registry.org(&org).unwrap();
    assert!(
        cell.read().dir.users.contains_key("bob"),
        "folded in memory"
    );
    let stored = db.org_events(&org, 0, 100).await.unwrap();
    assert_eq!(stored[1..], events[..], "created once: {stored:?}");

    // The lost answer counted as a storage fault until a write commits.
    let fault = engine.meter.health().fault().expect("a fault");
    assert_eq!(fault.path, "entity_log");
    let stop = tokio::sync::Notify::new();
    let meter = Arc::clone(&engine.meter);
    let ticks = tokio::spawn(async move { meter.run(async { stop.notified().await }).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.meter.health().fault().is_some() {
        assert!(Instant::now() < deadline, "the probe never ended the fault");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ticks.abort();
    // Now the same command again is a conflict: it happened, once.
    assert!(matches!(
        run(bob()).await,
        Err(Error::Command(CommandError::Conflict(_)))
    ));
}
