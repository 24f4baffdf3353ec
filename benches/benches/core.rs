#![allow(unused_results)] // criterion's builders return &mut Self for chaining

//! The metering core's apply path (decode excluded), against a bare
//! `DashMap<u64, u64>` increment loop over the same user keys: the ratio of
//! the two is the figure to watch.

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

criterion_group!(benches, apply);
criterion_main!(benches);
