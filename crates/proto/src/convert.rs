//! Conversions between the generated types and the core's.

use prost::Message;
use tally_core::entity::{Actor, EntityEvent, EventKind, LimitSource, Role, WebhookFormat};
use tally_core::ids::{GroupId, IdError, KeyId, OrgId, TokenId, UserId};
use tally_core::usage::{RawUsage, UsageError, UsageEvent};

use crate::v1;
use crate::v1::entity_event::Kind as K;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{0} is missing")]
    MissingField(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Usage(#[from] UsageError),
}

impl From<IdError> for ConvertError {
    fn from(e: IdError) -> Self {
        ConvertError::Invalid(e.to_string())
    }
}

fn missing_field(name: &'static str) -> ConvertError {
    ConvertError::MissingField(name)
}

/// Validates a decoded protobuf usage event.
pub fn usage_from_proto(p: &v1::UsageEvent) -> Result<UsageEvent, UsageError> {
    RawUsage {
        request_id: &p.request_id,
        org_id: &p.org_id,
        user_id: &p.user_id,
        api_key_id: &p.api_key_id,
        model: &p.model,
        provider: &p.provider,
        input_tokens: p.input_tokens,
        output_tokens: p.output_tokens,
        cost_micros: p.cost_micros,
        occurred_at_ms: p.occurred_at_ms,
    }
    .validate()
}

pub fn usage_to_proto(e: &UsageEvent) -> v1::UsageEvent {
    v1::UsageEvent {
        request_id: e.request_id.clone(),
        org_id: e.org_id.to_string(),
        user_id: e.user_id.to_string(),
        api_key_id: e
            .api_key_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        model: e.model.clone(),
        provider: e.provider.clone(),
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        cost_micros: Some(e.cost_micros),
        occurred_at_ms: Some(e.occurred_at_ms),
    }
}

pub fn encode_usage_batch<'a>(events: impl IntoIterator<Item = &'a UsageEvent>) -> Vec<u8> {
    v1::UsageBatch {
        events: events.into_iter().map(usage_to_proto).collect(),
    }
    .encode_to_vec()
}

/// Decodes a batch written by [`encode_usage_batch`]; every event is
/// validated again, so a damaged record cannot slip into the ledger.
pub fn decode_usage_batch(bytes: &[u8]) -> Result<Vec<UsageEvent>, ConvertError> {
    let batch = v1::UsageBatch::decode(bytes)?;
    batch
        .events
        .iter()
        .map(|e| usage_from_proto(e).map_err(ConvertError::from))
        .collect()
}

fn source(from_default: bool) -> LimitSource {
    if from_default {
        LimitSource::OrgDefault
    } else {
        LimitSource::Own
    }
}

fn id<T>(f: fn(&str) -> Result<T, IdError>, s: &str) -> Result<T, ConvertError> {
    Ok(f(s)?)
}

fn opt_user(s: &str) -> Result<Option<UserId>, ConvertError> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(UserId::new(s)?))
    }
}

fn hash32(b: &[u8], what: &'static str) -> Result<[u8; 32], ConvertError> {
    b.try_into()
        .map_err(|_| ConvertError::Invalid(format!("{what} must be 32 bytes")))
}

pub fn encode_entity_event(e: &EntityEvent) -> Vec<u8> {
    let kind = match &e.kind {
        EventKind::OrgCreated {
            name,
            default_monthly_limit_micros,
            alert_thresholds_bps,
        } => K::OrgCreated(v1::OrgCreated {
            name: name.clone(),
            default_monthly_limit_micros: *default_monthly_limit_micros,
            alert_thresholds_bps: alert_thresholds_bps.clone(),
        }),
        EventKind::OrgSettingsChanged {
            name,
            default_monthly_limit_micros,
            alert_thresholds_bps,
        } => K::OrgSettingsChanged(v1::OrgSettingsChanged {
            name: name.clone(),
            default_monthly_limit_micros: *default_monthly_limit_micros,
            alert_thresholds_bps: alert_thresholds_bps.clone(),
        }),
        EventKind::OrgLimitSet {
            monthly_limit_micros,
        } => K::OrgLimitSet(v1::OrgLimitSet {
            monthly_limit_micros: *monthly_limit_micros,
        }),
        EventKind::WebhookSet { url, format } => K::WebhookSet(v1::WebhookSet {
            url: url.clone(),
            format: format.as_str().to_owned(),
        }),
        EventKind::WebhookRemoved => K::WebhookRemoved(v1::WebhookRemoved {}),
        EventKind::TokenCreated {
            token_id,
            token_hash,
            role,
            name,
        } => K::TokenCreated(v1::TokenCreated {
            token_id: token_id.to_string(),
            token_hash: token_hash.to_vec(),
            role: role.as_str().to_owned(),
            name: name.clone(),
        }),
        EventKind::TokenRevoked { token_id } => K::TokenRevoked(v1::TokenRevoked {
            token_id: token_id.to_string(),
        }),
        EventKind::UserAdded {
            user_id,
            email,
            name,
            monthly_limit_micros,
            limit_source,
        } => K::UserAdded(v1::UserAdded {
            user_id: user_id.to_string(),
            email: email.clone(),
            name: name.clone(),
            monthly_limit_micros: *monthly_limit_micros,
            limit_from_default: *limit_source == LimitSource::OrgDefault,
        }),
        EventKind::UserActivated { user_id } => K::UserActivated(v1::UserActivated {
            user_id: user_id.to_string(),
        }),
        EventKind::UserSuspended { user_id } => K::UserSuspended(v1::UserSuspended {
            user_id: user_id.to_string(),
        }),
        EventKind::UserRemoved { user_id } => K::UserRemoved(v1::UserRemoved {
            user_id: user_id.to_string(),
        }),
        EventKind::UserLimitSet {
            user_id,
            monthly_limit_micros,
            limit_source,
        } => K::UserLimitSet(v1::UserLimitSet {
            user_id: user_id.to_string(),
            monthly_limit_micros: *monthly_limit_micros,
            limit_from_default: *limit_source == LimitSource::OrgDefault,
        }),
        EventKind::UserProfileChanged {
            user_id,
            email,
            name,
        } => K::UserProfileChanged(v1::UserProfileChanged {
            user_id: user_id.to_string(),
            email: email.clone(),
            name: name.clone(),
        }),
        EventKind::GroupCreated {
            group_id,
            name,
            monthly_limit_micros,
        } => K::GroupCreated(v1::GroupCreated {
            group_id: group_id.to_string(),
            name: name.clone(),
            monthly_limit_micros: *monthly_limit_micros,
        }),
        EventKind::GroupRenamed { group_id, name } => K::GroupRenamed(v1::GroupRenamed {
            group_id: group_id.to_string(),
            name: name.clone(),
        }),
        EventKind::GroupDeleted { group_id } => K::GroupDeleted(v1::GroupDeleted {
            group_id: group_id.to_string(),
        }),
        EventKind::GroupLimitSet {
            group_id,
            monthly_limit_micros,
        } => K::GroupLimitSet(v1::GroupLimitSet {
            group_id: group_id.to_string(),
            monthly_limit_micros: *monthly_limit_micros,
        }),
        EventKind::MemberAdded { group_id, user_id } => K::MemberAdded(v1::MemberAdded {
            group_id: group_id.to_string(),
            user_id: user_id.to_string(),
        }),
        EventKind::MemberRemoved { group_id, user_id } => K::MemberRemoved(v1::MemberRemoved {
            group_id: group_id.to_string(),
            user_id: user_id.to_string(),
        }),
        EventKind::KeyCreated {
            key_id,
            name,
            user_id,
            group_ids,
            features,
            monthly_limit_micros,
            secret_hash,
            expires_at_ms,
        } => K::KeyCreated(v1::KeyCreated {
            key_id: key_id.to_string(),
            name: name.clone(),
            user_id: user_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            group_ids: group_ids.iter().map(ToString::to_string).collect(),
            features: features.clone(),
            monthly_limit_micros: *monthly_limit_micros,
            secret_hash: secret_hash.to_vec(),
            expires_at_ms: *expires_at_ms,
        }),
        EventKind::KeyFeaturesChanged { key_id, features } => {
            K::KeyFeaturesChanged(v1::KeyFeaturesChanged {
                key_id: key_id.to_string(),
                features: features.clone(),
            })
        }
        EventKind::KeyLimitSet {
            key_id,
            monthly_limit_micros,
        } => K::KeyLimitSet(v1::KeyLimitSet {
            key_id: key_id.to_string(),
            monthly_limit_micros: *monthly_limit_micros,
        }),
        EventKind::KeyRevoked { key_id } => K::KeyRevoked(v1::KeyRevoked {
            key_id: key_id.to_string(),
        }),
        EventKind::KeyExpirySet {
            key_id,
            expires_at_ms,
        } => K::KeyExpirySet(v1::KeyExpirySet {
            key_id: key_id.to_string(),
            expires_at_ms: *expires_at_ms,
        }),
        EventKind::KeyRotated {
            key_id,
            secret_hash,
            grace_ms,
        } => K::KeyRotated(v1::KeyRotated {
            key_id: key_id.to_string(),
            secret_hash: secret_hash.to_vec(),
            grace_ms: *grace_ms,
        }),
        EventKind::KeyRenamed { key_id, name } => K::KeyRenamed(v1::KeyRenamed {
            key_id: key_id.to_string(),
            name: name.clone(),
        }),
        EventKind::KeyOwnerChanged { key_id, user_id } => K::KeyOwnerChanged(v1::KeyOwnerChanged {
            key_id: key_id.to_string(),
            user_id: user_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }),
        EventKind::KeyGroupsChanged { key_id, group_ids } => {
            K::KeyGroupsChanged(v1::KeyGroupsChanged {
                key_id: key_id.to_string(),
                group_ids: group_ids.iter().map(ToString::to_string).collect(),
            })
        }
    };
    v1::EntityEvent {
        org_id: e.org_id.to_string(),
        seq: e.seq,
        at_ms: e.at_ms,
        actor: e.actor.to_string(),
        kind: Some(kind),
    }
    .encode_to_vec()
}

pub fn decode_entity_event(bytes: &[u8]) -> Result<EntityEvent, ConvertError> {
    let p = v1::EntityEvent::decode(bytes)?;
    let kind = match p.kind.ok_or_else(|| missing_field("kind"))? {
        K::OrgCreated(k) => EventKind::OrgCreated {
            name: k.name,
            default_monthly_limit_micros: k.default_monthly_limit_micros,
            alert_thresholds_bps: k.alert_thresholds_bps,
        },
        K::OrgSettingsChanged(k) => EventKind::OrgSettingsChanged {
            name: k.name,
            default_monthly_limit_micros: k.default_monthly_limit_micros,
            alert_thresholds_bps: k.alert_thresholds_bps,
        },
        K::OrgLimitSet(k) => EventKind::OrgLimitSet {
            monthly_limit_micros: k.monthly_limit_micros,
        },
        K::WebhookSet(k) => EventKind::WebhookSet {
            url: k.url,
            format: match k.format.as_str() {
                "" => WebhookFormat::Tally,
                f => WebhookFormat::parse(f).ok_or_else(|| {
                    ConvertError::Invalid(format!("unknown webhook format {f:?}"))
                })?,
            },
        },
        K::WebhookRemoved(_) => EventKind::WebhookRemoved,
        K::TokenCreated(k) => EventKind::TokenCreated {
            token_id: id(TokenId::new, &k.token_id)?,
            token_hash: hash32(&k.token_hash, "token_hash")?,
            role: match k.role.as_str() {
                "" => Role::Admin,
                r => Role::parse(r)
                    .ok_or_else(|| ConvertError::Invalid(format!("unknown token role {r:?}")))?,
            },
            name: k.name,
        },
        K::TokenRevoked(k) => EventKind::TokenRevoked {
            token_id: id(TokenId::new, &k.token_id)?,
        },
        K::UserAdded(k) => EventKind::UserAdded {
            user_id: id(UserId::new, &k.user_id)?,
            email: k.email,
            name: k.name,
            monthly_limit_micros: k.monthly_limit_micros,
            limit_source: source(k.limit_from_default),
        },
        K::UserActivated(k) => EventKind::UserActivated {
            user_id: id(UserId::new, &k.user_id)?,
        },
        K::UserSuspended(k) => EventKind::UserSuspended {
            user_id: id(UserId::new, &k.user_id)?,
        },
        K::UserRemoved(k) => EventKind::UserRemoved {
            user_id: id(UserId::new, &k.user_id)?,
        },
        K::UserLimitSet(k) => EventKind::UserLimitSet {
            user_id: id(UserId::new, &k.user_id)?,
            monthly_limit_micros: k.monthly_limit_micros,
            limit_source: source(k.limit_from_default),
        },
        K::UserProfileChanged(k) => EventKind::UserProfileChanged {
            user_id: id(UserId::new, &k.user_id)?,
            email: k.email,
            name: k.name,
        },
        K::GroupCreated(k) => EventKind::GroupCreated {
            group_id: id(GroupId::new, &k.group_id)?,
            name: k.name,
            monthly_limit_micros: k.monthly_limit_micros,
        },
        K::GroupRenamed(k) => EventKind::GroupRenamed {
            group_id: id(GroupId::new, &k.group_id)?,
            name: k.name,
        },
        K::GroupDeleted(k) => EventKind::GroupDeleted {
            group_id: id(GroupId::new, &k.group_id)?,
        },
        K::GroupLimitSet(k) => EventKind::GroupLimitSet {
            group_id: id(GroupId::new, &k.group_id)?,
            monthly_limit_micros: k.monthly_limit_micros,
        },
        K::MemberAdded(k) => EventKind::MemberAdded {
            group_id: id(GroupId::new, &k.group_id)?,
            user_id: id(UserId::new, &k.user_id)?,
        },
        K::MemberRemoved(k) => EventKind::MemberRemoved {
            group_id: id(GroupId::new, &k.group_id)?,
            user_id: id(UserId::new, &k.user_id)?,
        },
        K::KeyCreated(k) => EventKind::KeyCreated {
            key_id: id(KeyId::new, &k.key_id)?,
            name: k.name,
            user_id: opt_user(&k.user_id)?,
            group_ids: k
                .group_ids
                .iter()
                .map(|g| id(GroupId::new, g))
                .collect::<Result<_, _>>()?,
            features: k.features,
            monthly_limit_micros: k.monthly_limit_micros,
            secret_hash: hash32(&k.secret_hash, "secret_hash")?,
            expires_at_ms: k.expires_at_ms,
        },
        K::KeyFeaturesChanged(k) => EventKind::KeyFeaturesChanged {
            key_id: id(KeyId::new, &k.key_id)?,
            features: k.features,
        },
        K::KeyLimitSet(k) => EventKind::KeyLimitSet {
            key_id: id(KeyId::new, &k.key_id)?,
            monthly_limit_micros: k.monthly_limit_micros,
        },
        K::KeyRevoked(k) => EventKind::KeyRevoked {
            key_id: id(KeyId::new, &k.key_id)?,
        },
        K::KeyExpirySet(k) => EventKind::KeyExpirySet {
            key_id: id(KeyId::new, &k.key_id)?,
            expires_at_ms: k.expires_at_ms,
        },
        K::KeyRotated(k) => EventKind::KeyRotated {
            key_id: id(KeyId::new, &k.key_id)?,
            secret_hash: hash32(&k.secret_hash, "secret_hash")?,
            grace_ms: k.grace_ms,
        },
        K::KeyRenamed(k) => EventKind::KeyRenamed {
            key_id: id(KeyId::new, &k.key_id)?,
            name: k.name,
        },
        K::KeyOwnerChanged(k) => EventKind::KeyOwnerChanged {
            key_id: id(KeyId::new, &k.key_id)?,
            user_id: opt_user(&k.user_id)?,
        },
        K::KeyGroupsChanged(k) => EventKind::KeyGroupsChanged {
            key_id: id(KeyId::new, &k.key_id)?,
            group_ids: k
                .group_ids
                .iter()
                .map(|g| id(GroupId::new, g))
                .collect::<Result<_, _>>()?,
        },
    };
    Ok(EntityEvent {
        org_id: id(OrgId::new, &p.org_id)?,
        seq: p.seq,
        at_ms: p.at_ms,
        actor: Actor::parse(&p.actor)
            .ok_or_else(|| ConvertError::Invalid(format!("actor {:?} is malformed", p.actor)))?,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, kind: EventKind) -> EntityEvent {
        EntityEvent {
            org_id: OrgId::new("acme").unwrap(),
            seq,
            at_ms: 1_795_749_598_000,
            actor: Actor::Token(TokenId::new("t1").unwrap()),
            kind,
        }
    }

    #[test]
    fn every_entity_event_round_trips() {
        let u = || UserId::new("alice").unwrap();
        let g = || GroupId::new("eng").unwrap();
        let k = || KeyId::new("k1").unwrap();
        let kinds = vec![
            EventKind::OrgCreated {
                name: "Acme".into(),
                default_monthly_limit_micros: Some(5),
                alert_thresholds_bps: vec![5000, 10000],
            },
            EventKind::OrgSettingsChanged {
                name: "Acme 2".into(),
                default_monthly_limit_micros: None,
                alert_thresholds_bps: vec![8000],
            },
            EventKind::OrgLimitSet {
                monthly_limit_micros: Some(7),
            },
            EventKind::OrgLimitSet {
                monthly_limit_micros: None,
            },
            EventKind::WebhookSet {
                url: "https://hooks.acme.test/tally?x=1".into(),
                format: WebhookFormat::Tally,
            },
            EventKind::WebhookSet {
                url: "https://hooks.slack.com/services/T0/B0/x".into(),
                format: WebhookFormat::Slack,
            },
            EventKind::WebhookRemoved,
            EventKind::TokenCreated {
                token_id: TokenId::new("t1").unwrap(),
                token_hash: [9; 32],
                role: Role::Admin,
                name: "ci".into(),
            },
            EventKind::TokenCreated {
                token_id: TokenId::new("t2").unwrap(),
                token_hash: [8; 32],
                role: Role::Viewer,
                name: "finance".into(),
            },
            EventKind::TokenCreated {
                token_id: TokenId::new("t3").unwrap(),
                token_hash: [7; 32],
                role: Role::Gateway,
                name: "litellm".into(),
            },
            EventKind::TokenRevoked {
                token_id: TokenId::new("t1").unwrap(),
            },
            EventKind::UserAdded {
                user_id: u(),
                email: "a@b".into(),
                name: "A".into(),
                monthly_limit_micros: None,
                limit_source: LimitSource::OrgDefault,
            },
            EventKind::UserAdded {
                user_id: u(),
                email: "a@b".into(),
                name: "A".into(),
                monthly_limit_micros: Some(3),
                limit_source: LimitSource::Own,
            },
            EventKind::UserActivated { user_id: u() },
            EventKind::UserSuspended { user_id: u() },
            EventKind::UserRemoved { user_id: u() },
            EventKind::UserLimitSet {
                user_id: u(),
                monthly_limit_micros: Some(7),
                limit_source: LimitSource::Own,
            },
            EventKind::UserLimitSet {
                user_id: u(),
                monthly_limit_micros: None,
                limit_source: LimitSource::OrgDefault,
            },
            EventKind::UserProfileChanged {
                user_id: u(),
                email: "x@y".into(),
                name: "X".into(),
            },
            EventKind::GroupCreated {
                group_id: g(),
                name: "E".into(),
                monthly_limit_micros: Some(1),
            },
            EventKind::GroupRenamed {
                group_id: g(),
                name: "F".into(),
            },
            EventKind::GroupDeleted { group_id: g() },
            EventKind::GroupLimitSet {
                group_id: g(),
                monthly_limit_micros: None,
            },
            EventKind::MemberAdded {
                group_id: g(),
                user_id: u(),
            },
            EventKind::MemberRemoved {
                group_id: g(),
                user_id: u(),
            },
            EventKind::KeyCreated {
                key_id: k(),
                name: "K".into(),
                user_id: None,
                group_ids: vec![g()],
                features: vec!["chat".into()],
                monthly_limit_micros: Some(3),
                secret_hash: [4; 32],
                expires_at_ms: None,
            },
            EventKind::KeyFeaturesChanged {
                key_id: k(),
                features: vec![],
            },
            EventKind::KeyLimitSet {
                key_id: k(),
                monthly_limit_micros: Some(2),
            },
            EventKind::KeyRevoked { key_id: k() },
            EventKind::KeyExpirySet {
                key_id: k(),
                expires_at_ms: Some(1_800_000_000_000),
            },
            EventKind::KeyExpirySet {
                key_id: k(),
                expires_at_ms: None,
            },
            EventKind::KeyRotated {
                key_id: k(),
                secret_hash: [5; 32],
                grace_ms: 3_600_000,
            },
            EventKind::KeyRenamed {
                key_id: k(),
                name: "ci".into(),
            },
            EventKind::KeyOwnerChanged {
                key_id: k(),
                user_id: Some(u()),
            },
            EventKind::KeyOwnerChanged {
                key_id: k(),
                user_id: None,
            },
            EventKind::KeyGroupsChanged {
                key_id: k(),
                group_ids: vec![g()],
            },
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            let e = ev(i as u64 + 1, kind);
            assert_eq!(decode_entity_event(&encode_entity_event(&e)).unwrap(), e);
        }
    }

    /// A log written before tokens had roles and names: its tokens are
    /// admin tokens, nameless; an unknown role is refused, not guessed.
    #[test]
    fn a_token_of_an_older_log_is_an_admin_token() {
        let old = |role: &str| {
            v1::EntityEvent {
                org_id: "acme".into(),
                seq: 1,
                at_ms: 5,
                actor: "operator".into(),
                kind: Some(K::TokenCreated(v1::TokenCreated {
                    token_id: "t1".into(),
                    token_hash: vec![3; 32],
                    role: role.into(),
                    name: String::new(),
                })),
            }
            .encode_to_vec()
        };
        let e = decode_entity_event(&old("")).unwrap();
        assert_eq!(
            e.kind,
            EventKind::TokenCreated {
                token_id: TokenId::new("t1").unwrap(),
                token_hash: [3; 32],
                role: Role::Admin,
                name: String::new(),
            }
        );
        assert!(decode_entity_event(&old("root")).is_err());
    }

    /// A webhook set before formats were recorded gets Tally's JSON; an
    /// unknown format is refused, not guessed.
    #[test]
    fn a_webhook_of_an_older_log_gets_tallys_json() {
        let old = |format: &str| {
            v1::EntityEvent {
                org_id: "acme".into(),
                seq: 1,
                at_ms: 5,
                actor: "operator".into(),
                kind: Some(K::WebhookSet(v1::WebhookSet {
                    url: "https://a.test/".into(),
                    format: format.into(),
                })),
            }
            .encode_to_vec()
        };
        assert_eq!(
            decode_entity_event(&old("")).unwrap().kind,
            EventKind::WebhookSet {
                url: "https://a.test/".into(),
                format: WebhookFormat::Tally,
            }
        );
        assert!(decode_entity_event(&old("teams")).is_err());
    }

    #[test]
    fn usage_batches_round_trip_and_missing_fields_are_named() {
        let e = RawUsage {
            request_id: "r1",
            org_id: "acme",
            user_id: "alice",
            api_key_id: "k1",
            model: "gpt-4o",
            provider: "openai",
            input_tokens: 10,
            output_tokens: 20,
            cost_micros: Some(1234),
            occurred_at_ms: Some(1_795_749_598_000),
        }
        .validate()
        .unwrap();
        let bytes = encode_usage_batch(std::slice::from_ref(&e));
        assert_eq!(decode_usage_batch(&bytes).unwrap(), vec![e.clone()]);
        let mut p = usage_to_proto(&e);
        p.cost_micros = None;
        assert_eq!(
            usage_from_proto(&p).unwrap_err(),
            UsageError::Missing("cost_micros")
        );
        assert!(decode_usage_batch(&[0xff, 0xff]).is_err());
    }
}
