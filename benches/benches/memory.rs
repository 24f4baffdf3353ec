//! Memory per (user, month) counter at 1 000 000 users, counted by a global
//! allocator that tracks live bytes (exact, unlike RSS).
//!
//! `cargo bench -p tally-benches --bench memory`; `cargo test --benches`
//! runs it with 10 000 users.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tally_benches::{org, usage_from};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the
// counter only observes sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LIVE.fetch_add(new_size, Ordering::Relaxed);
        let _ = LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let users: u32 = if full { 1_000_000 } else { 10_000 };
    let groups = users / 100;
    let before = live();
    let mut state = org(users, groups);
    let directory = live() - before;
    // One call per user: a counter for each user (and key, group, org) this
    // month, then checkpointed, as the meter leaves them.
    let events = usage_from(0, users, users);
    let logged = |e: &tally_core::usage::UsageEvent| e.occurred_at_ms + 1_000;
    let counted_from = live();
    for e in &events {
        let _ = state.apply_usage(e, logged(e));
    }
    let applied = live() - counted_from;
    let _ = state.take_changes();
    let checkpointed = live().saturating_sub(counted_from);
    // Apart from the counters, the dedupe window holds the id of each call:
    // measured alone, on the same ids.
    let from = live();
    let mut window =
        tally_core::dedupe::DedupeWindow::new(tally_core::dedupe::DedupeConfig::default());
    for e in &events {
        let h = tally_core::dedupe::hash_request_id(&e.request_id);
        let _ = window.insert(h, e.occurred_at_ms, e.occurred_at_ms);
    }
    let _ = window.take_added();
    let dedupe = live() - from;
    assert_eq!(window.len(), state.meter.dedupe.len());
    drop(window);
    drop(events);
    // Tenths of a byte per user, in integers.
    let per = |bytes: usize| {
        let tenths = bytes * 10 / users as usize;
        format!("{}.{}", tenths / 10, tenths % 10)
    };
    println!("memory: {users} users with a key each, {groups} groups, one call each this month");
    println!(
        "memory: directory (users, keys, groups, indexes): {} bytes per user",
        per(directory)
    );
    println!(
        "memory: metering after one call per user, checkpointed: {} bytes per user \
         (the user's and the key's counters, a share of the group's and the org's, \
         and {} for the dedupe window's memory of that call's id)",
        per(checkpointed),
        per(dedupe)
    );
    println!(
        "memory: per (user, month) counter: {} bytes (a user's metering without the dedupe id, \
         over its 2 counters: user and key); {} before the checkpoint released the day deltas \
         and change lists",
        per((checkpointed - dedupe) / 2),
        per((applied - dedupe) / 2)
    );
    assert!(state.meter.ledger.months().len() == 1);
    // Live holds: one per user (a call in flight each), request ids as
    // UUIDs (36 bytes), each user in one group.
    let keys: Vec<tally_core::KeyId> = (0..users)
        .map(|u| tally_core::KeyId::new(&format!("k{u}")).expect("id"))
        .collect();
    let ids: Vec<String> = (0..users)
        .map(|u| format!("{u:08x}-0000-4000-8000-000000000000"))
        .collect();
    let now = tally_benches::NOV_MS + 1_000_000;
    let from = live();
    for (k, id) in keys.iter().zip(&ids) {
        let req = tally_core::authorize::HoldRequest {
            request_id: id,
            reserve_micros: 1_000,
            ttl_ms: 600_000,
        };
        let (d, _) = tally_core::authorize::reserve(&mut state, k, None, None, req, now)
            .expect("no conflict");
        assert!(d.allowed, "{d:?}");
    }
    let held = live() - from;
    assert_eq!(state.meter.holds.len(), users as usize);
    println!(
        "memory: per live hold: {} bytes (its slot, index entry and id, its place in \
         the expiry heap, a share of its group set, and the held sums of scopes that had none)",
        per(held)
    );
}
