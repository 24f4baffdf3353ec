#![allow(unused_results)] // criterion's builders return &mut Self for chaining

//! The metering core's apply path (decode excluded), against a bare
//! `DashMap<u64, u64>` increment loop over the same user keys: the ratio of
//! the two is the figure to watch. And what a metrics scrape costs per org.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dashmap::DashMap;
use tally_benches::{NOV_MS, org, org_with, usage, usage_from};

const USERS: u32 = 10_000;
const EVENTS: u32 = 100_000;

fn apply(c: &mut Criterion) {
    let events = usage(EVENTS, USERS);
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(u64::from(EVENTS)));
    g.bench_function("dashmap_baseline", |b| {
        let map: DashMap<u64, u64> = DashMap::new();
        let keys: Vec<u64> = (0..EVENTS).map(|i| u64::from(i % USERS)).collect();
        b.iter(|| {
            for (k, e) in keys.iter().zip(&events) {
                *map.entry(*k).or_insert(0) += e.cost_micros as u64;
            }
        });
    });
    // A warm org: it counted 300 000 calls before (its counters exist, its
    // dedupe window is sized) and checkpointed them, as a running meter's
    // org would have. Each call counts for the org, the user, the key and
    // the user's group; its request id is remembered. With 10 000 users the
    // state (counters, keys, 400 000 remembered ids) is far larger than the
    // CPU caches; with 100 users, all but the ids fit.
    // Each call is broken down by its model (5 in turn); the same without
    // the breakdown beside it (`_no_breakdown`), the ratio to watch.
    for (users, models_max) in [(USERS, 200), (USERS, 0), (100, 200)] {
        let warm = usage_from(EVENTS, 300_000, users);
        let fresh = usage_from(EVENTS + 300_000, EVENTS, users);
        let logged = |e: &tally_core::usage::UsageEvent| e.occurred_at_ms + 1_000;
        let mut name = "org_state_apply_usage".to_owned();
        if users != USERS {
            name.push_str(&format!("_{users}_users"));
        }
        if models_max == 0 {
            name.push_str("_no_breakdown");
        }
        let config = tally_core::org::MeterConfig {
            models_max,
            ..tally_core::org::MeterConfig::default()
        };
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut state = org_with(users, 100.min(users), config);
                    for e in &warm {
                        let _ = state.apply_usage(e, logged(e));
                    }
                    let _ = state.take_changes();
                    state
                },
                |mut state| {
                    for e in &fresh {
                        black_box(state.apply_usage(e, logged(e)));
                    }
                    state
                },
                criterion::BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

/// What a Prometheus scrape costs per org: the spend gauges (per group,
/// users over each threshold) and the top users, of an org of 100 000 users
/// in 1 000 groups, every user with spend.
fn gauges(c: &mut Criterion) {
    let (users, groups) = (100_000, 1_000);
    let mut state = org(users, groups);
    for e in &usage(users, users) {
        black_box(state.apply_usage(e, NOV_MS + 2_000_000));
    }
    let month = tally_core::time::Month::from_unix_ms(NOV_MS);
    let mut g = c.benchmark_group("scrape_100k_users_1k_groups");
    g.sample_size(20);
    g.bench_function("org_gauges", |b| b.iter(|| black_box(state.gauges(month))));
    g.bench_function("top_100_users", |b| {
        b.iter(|| black_box(state.top_users(month, 100)))
    });
    g.finish();
}

/// The bare baseline again, beside each figure below, so a run compares
/// them on the same machine state: `n` increments, the group's element
/// count, over the same 10 000 user keys.
fn baseline(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, n: u32) {
    let keys: Vec<u64> = (0..n).map(|i| u64::from(i % USERS)).collect();
    g.bench_function("dashmap_baseline", |b| {
        let map: DashMap<u64, u64> = DashMap::new();
        b.iter(|| {
            for k in &keys {
                *map.entry(*k).or_insert(0) += 1;
            }
        });
    });
}

/// Usage messages as the Kafka consumer gets them, one event each:
/// protobuf (the default) and JSON, decoded and validated.
fn decode(c: &mut Criterion) {
    use prost::Message;
    let events = usage(EVENTS, USERS);
    let proto: Vec<Vec<u8>> = events
        .iter()
        .map(|e| tally_proto::usage_to_proto(e).encode_to_vec())
        .collect();
    let json: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            serde_json::json!({
                "request_id": e.request_id, "org_id": e.org_id.as_str(),
                "user_id": e.user_id.as_str(),
                "api_key_id": e.api_key_id.as_ref().map(|k| k.as_str()),
                "model": "gpt-4o", "provider": "openai",
                "input_tokens": 1200, "output_tokens": 300, "cost_micros": e.cost_micros,
                "occurred_at": tally_proto::format_rfc3339_ms(e.occurred_at_ms),
            })
            .to_string()
            .into_bytes()
        })
        .collect();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(u64::from(EVENTS)));
    baseline(&mut g, EVENTS);
    g.bench_function("protobuf", |b| {
        b.iter(|| {
            for m in &proto {
                let p = tally_proto::v1::UsageEvent::decode(m.as_slice()).expect("decodes");
                black_box(tally_proto::usage_from_proto(&p).expect("valid"));
            }
        });
    });
    g.bench_function("json", |b| {
        b.iter(|| {
            for m in &json {
                let v: serde_json::Value = serde_json::from_slice(m).expect("JSON");
                black_box(tally_proto::usage_from_json(&v).expect("valid"));
            }
        });
    });
    g.finish();
}

/// The dedupe window alone: 100 000 new request ids into a window that
/// remembers 300 000, then the same ids again (all duplicates).
fn dedupe(c: &mut Criterion) {
    use tally_core::dedupe::{DedupeConfig, DedupeWindow, Seen, hash_request_id};
    let at = |i: u32| NOV_MS + i64::from(i) * 10;
    let ids: Vec<(u128, i64)> = (300_000..300_000 + EVENTS)
        .map(|i| (hash_request_id(&format!("req-{i}")), at(i)))
        .collect();
    let warm = || {
        let mut w = DedupeWindow::new(DedupeConfig::default());
        for i in 0..300_000 {
            let _ = w.insert(hash_request_id(&format!("req-{i}")), at(i), at(i));
        }
        let _ = w.take_added();
        w
    };
    let mut g = c.benchmark_group("dedupe");
    g.throughput(Throughput::Elements(u64::from(EVENTS)));
    baseline(&mut g, EVENTS);
    g.bench_function("insert_new", |b| {
        b.iter_batched(
            warm,
            |mut w| {
                for (h, t) in &ids {
                    black_box(w.insert(*h, *t, *t));
                }
                w
            },
            criterion::BatchSize::LargeInput,
        );
    });
    let mut full = warm();
    for (h, t) in &ids {
        let _ = full.insert(*h, *t, *t);
    }
    g.bench_function("insert_duplicate", |b| {
        b.iter(|| {
            for (h, t) in &ids {
                assert_eq!(full.insert(*h, *t, *t), Seen::Duplicate);
            }
        });
    });
    g.bench_function("hash_request_id", |b| {
        b.iter(|| {
            for i in 0..EVENTS {
                black_box(hash_request_id(black_box("req-0123456789")));
                black_box(i);
            }
        });
    });
    g.finish();
}

/// Authorize in process: hash the presented secret, find the key, decide
/// (user active and under limit, key, groups, feature), for 10 000 keys.
fn authorize(c: &mut Criterion) {
    use tally_core::secret::hash_secret;
    let mut state = org(USERS, 100);
    for e in &usage(EVENTS, USERS) {
        let _ = state.apply_usage(e, e.occurred_at_ms + 1_000);
    }
    let secrets: Vec<String> = (0..USERS).map(|u| format!("tly_k_bench_{u}")).collect();
    // The bench org's keys carry these hashes (see `tally_benches::org`).
    let hashes: Vec<[u8; 32]> = (0..USERS)
        .map(|u| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&u.to_le_bytes());
            h
        })
        .collect();
    let now = NOV_MS + 5_000_000;
    let mut g = c.benchmark_group("authorize");
    g.throughput(Throughput::Elements(u64::from(USERS)));
    baseline(&mut g, USERS);
    g.bench_function("find_key_and_decide", |b| {
        b.iter(|| {
            for h in &hashes {
                let k = state.dir.key_by_hash(h).expect("key");
                let d = tally_core::authorize::authorize(&state, k, Some("chat"), None, now, 0);
                assert!(d.allowed);
                black_box(d);
            }
        });
    });
    // With a reserve: decide against spent + held, place the hold on the
    // user, key, group and org; then release it (both counted per element).
    let keys: Vec<tally_core::KeyId> = (0..USERS)
        .map(|u| tally_core::KeyId::new(&format!("k{u}")).expect("id"))
        .collect();
    let ids: Vec<String> = (0..USERS)
        .map(|u| format!("{u:08x}-0000-4000-8000-000000000000"))
        .collect();
    g.bench_function("reserve_then_release", |b| {
        b.iter(|| {
            for (k, id) in keys.iter().zip(&ids) {
                let req = tally_core::authorize::HoldRequest {
                    request_id: id,
                    reserve_micros: 1_000,
                    ttl_ms: 600_000,
                };
                let (d, h) =
                    tally_core::authorize::reserve(&mut state, k, Some("chat"), None, req, now)
                        .expect("no conflict");
                assert!(d.allowed && h.is_some());
                black_box(d);
            }
            for id in &ids {
                black_box(state.meter.holds.remove(id));
            }
        });
    });
    g.bench_function("hash_secret", |b| {
        b.iter(|| {
            for s in &secrets {
                black_box(hash_secret(s));
            }
        });
    });
    g.finish();
}

criterion_group!(benches, apply, decode, dedupe, authorize, gauges);
criterion_main!(benches);
