//! Workloads shared by the benchmarks: a realistic org and a stream of usage
//! events over it, built without I/O so the benches measure the core alone.

use tally_core::entity::{Actor, EntityEvent, EventKind};
use tally_core::ids::{GroupId, KeyId, OrgId, UserId};
use tally_core::org::{MeterConfig, OrgState};
use tally_core::usage::{RawUsage, UsageEvent};

/// 2026-11-01T00:00:00Z.
pub const NOV_MS: i64 = 1_793_491_200_000;

/// An org with `users` active members in `groups` groups (each user in one),
/// each with a personal API key `k<n>`.
pub fn org(users: u32, groups: u32) -> OrgState {
    org_with(users, groups, MeterConfig::default())
}

/// [`org`] with a meter configuration of its own.
pub fn org_with(users: u32, groups: u32, config: MeterConfig) -> OrgState {
    let org_id = OrgId::new("bench").expect("id");
    let mut seq = 0;
    let mut ev = |kind| {
        seq += 1;
        EntityEvent {
            org_id: org_id.clone(),
            seq,
            at_ms: 0,
            actor: Actor::Operator,
            kind,
        }
    };
    let created = ev(EventKind::OrgCreated {
        name: "Bench".into(),
        default_monthly_limit_micros: None,
        alert_thresholds_bps: vec![5_000, 8_000, 10_000],
    });
    let mut state = OrgState::new(&created, config);
    for g in 0..groups {
        state.apply_entity(&ev(EventKind::GroupCreated {
            group_id: GroupId::new(&format!("g{g}")).expect("id"),
            name: format!("group {g}"),
            monthly_limit_micros: Some(1_000_000_000_000),
        }));
    }
    for u in 0..users {
        let user_id = UserId::new(&format!("u{u}")).expect("id");
        state.apply_entity(&ev(EventKind::UserAdded {
            user_id: user_id.clone(),
            email: format!("u{u}@bench.test"),
            name: format!("user {u}"),
            monthly_limit_micros: Some(1_000_000_000_000),
            limit_source: tally_core::entity::LimitSource::Own,
        }));
        state.apply_entity(&ev(EventKind::UserActivated {
            user_id: user_id.clone(),
        }));
        if groups > 0 {
            state.apply_entity(&ev(EventKind::MemberAdded {
                group_id: GroupId::new(&format!("g{}", u % groups)).expect("id"),
                user_id: user_id.clone(),
            }));
        }
        let mut secret_hash = [0u8; 32];
        secret_hash[..4].copy_from_slice(&u.to_le_bytes());
        state.apply_entity(&ev(EventKind::KeyCreated {
            key_id: KeyId::new(&format!("k{u}")).expect("id"),
            name: format!("key {u}"),
            user_id: Some(user_id),
            group_ids: vec![],
            features: vec!["chat".into()],
            monthly_limit_micros: Some(1_000_000_000_000),
            secret_hash,
            expires_at_ms: None,
        }));
    }
    state
}

/// `n` distinct usage events spread over the org's users (each with the
/// user's key), 10 ms apart in event time, all in November 2026.
pub fn usage(n: u32, users: u32) -> Vec<UsageEvent> {
    usage_from(0, n, users)
}

/// As [`usage`], numbered from `first` (request ids and times go on).
/// The models the bench's calls use, in turn.
pub const MODELS: [(&str, &str); 5] = [
    ("gpt-4o", "openai"),
    ("claude-sonnet-4", "anthropic"),
    ("gemini-2.5-pro", "google"),
    ("mistral-large", "mistral"),
    ("llama-3.3-70b", "groq"),
];

pub fn usage_from(first: u32, n: u32, users: u32) -> Vec<UsageEvent> {
    (first..first + n)
        .map(|i| {
            let user = i % users;
            RawUsage {
                request_id: &format!("req-{i}"),
                org_id: "bench",
                user_id: &format!("u{user}"),
                api_key_id: &format!("k{user}"),
                model: MODELS[(i % 5) as usize].0,
                provider: MODELS[(i % 5) as usize].1,
                input_tokens: u64::from(i % 4_000),
                output_tokens: u64::from(i % 700),
                cost_micros: Some(1_000 + i64::from(i % 1000)),
                occurred_at_ms: Some(NOV_MS + i64::from(i) * 10),
            }
            .validate()
            .expect("valid usage")
        })
        .collect()
}
