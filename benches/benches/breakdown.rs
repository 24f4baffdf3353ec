//! The breakdown by model's cost on the apply path, measured so that the
//! VM's drift cancels out: rounds that alternate the build with the
//! breakdown (`models_max` 200) and without (0), each on a warm org of
//! 10 000 members (as `apply/org_state_apply_usage` in the core bench),
//! the order swapped every round. Prints the median rate of each and the
//! median of the rounds' ratios (with ÷ without): the target is
//! ≥ 95 %. `cargo test --benches` runs one small round.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tally_benches::{org_with, usage_from};
use tally_core::org::MeterConfig;
use tally_core::usage::UsageEvent;

const USERS: u32 = 10_000;

fn main() {
    let bench =
        std::env::var_os("TALLY_BENCH_QUICK").is_none() && std::env::args().any(|a| a == "--bench");
    let (rounds, warm, events) = if bench {
        (20, 300_000, 500_000)
    } else {
        (1, 3_000, 1_000)
    };
    let warm_events = usage_from(0, warm, USERS);
    let fresh = usage_from(warm, events, USERS);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 { [200, 0] } else { [0, 200] };
        for models_max in order {
            let took = apply(models_max, &warm_events, &fresh);
            if models_max == 0 {
                without.push(took);
            } else {
                with.push(took);
            }
        }
    }
    // Per round: the rate with the breakdown in per mille of the rate
    // without (the time without over the time with).
    let mut ratios: Vec<u128> = with
        .iter()
        .zip(&without)
        .map(|(w, wo)| wo.as_nanos() * 1_000 / w.as_nanos().max(1))
        .collect();
    ratios.sort_unstable();
    let rate = |times: &mut Vec<Duration>| {
        times.sort_unstable();
        let median = times[times.len() / 2];
        u128::from(events) * 1_000_000_000 / median.as_nanos().max(1)
    };
    let pct = |per_mille: u128| format!("{}.{} %", per_mille / 10, per_mille % 10);
    let decile = |d: usize| ratios[(ratios.len() * d / 10).min(ratios.len() - 1)];
    println!(
        "breakdown: {USERS} members, 5 models, {rounds} rounds of {events} calls: with it {} \
         events/s, without {} events/s (medians); with ÷ without per round: median {}, \
         10th–90th percentile {}–{}",
        rate(&mut with),
        rate(&mut without),
        pct(ratios[ratios.len() / 2]),
        pct(decile(1)),
        pct(decile(9)),
    );
}

/// How long a warm org takes to apply `fresh`.
fn apply(models_max: u16, warm: &[UsageEvent], fresh: &[UsageEvent]) -> Duration {
    let logged = |e: &UsageEvent| e.occurred_at_ms + 1_000;
    let config = MeterConfig {
        models_max,
        ..MeterConfig::default()
    };
    let mut state = org_with(USERS, 100, config);
    for e in warm {
        let _ = state.apply_usage(e, logged(e));
    }
    let _ = state.take_changes();
    let started = Instant::now();
    for e in fresh {
        let _ = black_box(state.apply_usage(e, logged(e)));
    }
    started.elapsed()
}
