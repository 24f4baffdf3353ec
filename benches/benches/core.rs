#![allow(unused_results)] // criterion's builders return &mut Self for chaining

//! The metering core's apply path (decode excluded), against a bare
//! `DashMap<u64, u64>` increment loop over the same user keys: the ratio of
//! the two is the figure to watch. And what a metrics scrape costs per org.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dashmap::DashMap;
use tally_benches::{NOV_MS, org, usage};

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
    g.bench_function("org_state_apply_usage", |b| {
        b.iter_batched(
            || org(USERS, 100),
            |mut state| {
                for e in &events {
                    black_box(state.apply_usage(e, NOV_MS + 2_000_000));
                }
                state
            },
            criterion::BatchSize::LargeInput,
        );
    });
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

criterion_group!(benches, apply, gauges);
criterion_main!(benches);
