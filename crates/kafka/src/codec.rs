//! What travels on the topics, and how it is checked on the way in.
//!
//! - `tally.usage`: key = org id; value = protobuf `tally.v1.UsageEvent`, or
//!   its JSON form when the message has a `content-type: application/json`
//!   header.
//! - `tally.events`: key = org id; value = protobuf `tally.v1.EntityEvent`.
//! - `tally.enforcement` (compacted): key = `org/kind/id`; value = protobuf
//!   `tally.v1.EnforcementState`, the subject's current month.
//! - the dead-letter topic: the original key and value, with the reason in
//!   headers.

use prost::Message;
use tally_core::ids::OrgId;
use tally_core::ledger::{Counter, SubjectKind};
use tally_core::time::Month;
use tally_core::usage::UsageEvent;
use tally_engine::meter::PublishedState;
use tally_proto::v1;

pub const CONTENT_TYPE: &str = "content-type";
pub const JSON: &str = "application/json";
pub const PROTOBUF: &str = "application/x-protobuf";

/// Why a usage message cannot be counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad {
    pub code: &'static str,
    pub message: String,
    /// The org, when the message names one.
    pub org_id: Option<String>,
}

fn bad(code: &'static str, message: impl Into<String>) -> Bad {
    Bad {
        code,
        message: message.into(),
        org_id: None,
    }
}

/// Decodes and validates a message of `tally.usage`.
pub fn decode_usage(
    key: Option<&[u8]>,
    content_type: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<UsageEvent, Bad> {
    let payload = payload.ok_or_else(|| bad("malformed", "the message has no value"))?;
    let event = match content_type {
        Some(ct) if ct.eq_ignore_ascii_case(JSON.as_bytes()) => {
            let v: serde_json::Value = serde_json::from_slice(payload)
                .map_err(|e| bad("malformed", format!("not JSON: {e}")))?;
            let org_id = v.get("org_id").and_then(|o| o.as_str()).map(str::to_owned);
            tally_proto::usage_from_json(&v).map_err(|e| Bad {
                code: e.code(),
                message: e.to_string(),
                org_id,
            })?
        }
        Some(ct) if !ct.eq_ignore_ascii_case(PROTOBUF.as_bytes()) => {
            return Err(bad(
                "malformed",
                format!(
                    "content-type {:?} is neither {JSON} nor {PROTOBUF}",
                    String::from_utf8_lossy(ct)
                ),
            ));
        }
        _ => {
            let p = v1::UsageEvent::decode(payload).map_err(|e| {
                bad(
                    "malformed",
                    format!("not a protobuf tally.v1.UsageEvent: {e}"),
                )
            })?;
            let org_id = Some(p.org_id.clone()).filter(|o| !o.is_empty());
            tally_proto::usage_from_proto(&p).map_err(|e| Bad {
                code: e.code(),
                message: e.to_string(),
                org_id,
            })?
        }
    };
    if key != Some(event.org_id.as_bytes()) {
        return Err(Bad {
            code: "key_mismatch",
            message: "the message key must be the event's org_id".into(),
            org_id: Some(event.org_id.to_string()),
        });
    }
    Ok(event)
}

pub fn encode_usage(e: &UsageEvent) -> Vec<u8> {
    tally_proto::usage_to_proto(e).encode_to_vec()
}

fn kind_to_proto(k: SubjectKind) -> v1::SubjectKind {
    match k {
        SubjectKind::User => v1::SubjectKind::User,
        SubjectKind::Group => v1::SubjectKind::Group,
        SubjectKind::Key => v1::SubjectKind::Key,
        SubjectKind::Org => v1::SubjectKind::Org,
    }
}

fn kind_from_proto(k: i32) -> Option<SubjectKind> {
    Some(match v1::SubjectKind::try_from(k).ok()? {
        v1::SubjectKind::User => SubjectKind::User,
        v1::SubjectKind::Group => SubjectKind::Group,
        v1::SubjectKind::Key => SubjectKind::Key,
        v1::SubjectKind::Org => SubjectKind::Org,
        v1::SubjectKind::Unspecified => return None,
    })
}

/// The compacted topic's key for a subject.
pub fn state_key(s: &PublishedState) -> String {
    format!("{}/{}/{}", s.org_id, s.kind.as_str(), s.id)
}

pub fn encode_state(s: &PublishedState, now_ms: i64) -> Vec<u8> {
    v1::EnforcementState {
        subject: Some(v1::Subject {
            kind: kind_to_proto(s.kind).into(),
            org_id: s.org_id.to_string(),
            id: s.id.clone(),
        }),
        month: s.month.yyyymm(),
        spend_micros: s.counter.spend_micros,
        limit_micros: s.limit_micros,
        cut_off: s.counter.cut_off,
        fired_threshold_bps: u32::from(s.counter.fired_bps),
        updated_at_ms: now_ms,
        requests: s.counter.requests,
        last_at_ms: s.counter.last_at_ms,
        first_day: u32::from(s.counter.first_day),
        forecast_fired: s.counter.forecast_fired,
        judged_at_ms: tally_core::forecast::at_seconds(s.month, s.counter.judged_s),
    }
    .encode_to_vec()
}

pub fn decode_state(bytes: &[u8]) -> Option<PublishedState> {
    let p = v1::EnforcementState::decode(bytes).ok()?;
    let subject = p.subject?;
    let month = Month::from_yyyymm(p.month)?;
    Some(PublishedState {
        org_id: OrgId::new(&subject.org_id).ok()?,
        kind: kind_from_proto(subject.kind)?,
        id: subject.id,
        month,
        counter: Counter::restored(
            p.spend_micros,
            p.requests,
            p.last_at_ms,
            u16::try_from(p.fired_threshold_bps).ok()?,
            p.cut_off,
            0,
        )
        .with_forecast(
            u8::try_from(p.first_day).ok()?,
            p.forecast_fired,
            tally_core::forecast::seconds_into(month, p.judged_at_ms),
        ),
        limit_micros: p.limit_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::usage::RawUsage;

    fn event() -> UsageEvent {
        RawUsage {
            request_id: "r1",
            org_id: "acme",
            user_id: "alice",
            cost_micros: Some(5),
            occurred_at_ms: Some(1_795_749_598_000),
            ..RawUsage::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn protobuf_and_json_decode_and_the_key_is_checked() {
        let e = event();
        let pb = encode_usage(&e);
        assert_eq!(decode_usage(Some(b"acme"), None, Some(&pb)), Ok(e.clone()));
        assert_eq!(
            decode_usage(Some(b"acme"), Some(PROTOBUF.as_bytes()), Some(&pb)),
            Ok(e.clone())
        );
        let json = br#"{"request_id":"r1","org_id":"acme","user_id":"alice","cost_micros":5,"occurred_at_ms":1795749598000}"#;
        assert_eq!(
            decode_usage(Some(b"acme"), Some(b"application/json"), Some(json)),
            Ok(e.clone())
        );
        assert_eq!(
            decode_usage(Some(b"other"), None, Some(&pb))
                .unwrap_err()
                .code,
            "key_mismatch"
        );
        assert_eq!(
            decode_usage(None, None, Some(&pb)).unwrap_err().code,
            "key_mismatch"
        );
        assert_eq!(
            decode_usage(Some(b"acme"), None, Some(b"\xff\xff\xff"))
                .unwrap_err()
                .code,
            "malformed"
        );
        assert_eq!(
            decode_usage(Some(b"acme"), Some(b"application/json"), Some(b"{"))
                .unwrap_err()
                .code,
            "malformed"
        );
        assert_eq!(
            decode_usage(Some(b"acme"), Some(b"text/csv"), Some(b"x"))
                .unwrap_err()
                .code,
            "malformed"
        );
        let missing = br#"{"request_id":"r1","org_id":"acme","user_id":"alice","occurred_at_ms":1795749598000}"#;
        let err =
            decode_usage(Some(b"acme"), Some(b"application/json"), Some(missing)).unwrap_err();
        assert_eq!(
            (err.code, err.org_id.as_deref()),
            ("missing_field", Some("acme"))
        );
    }

    #[test]
    fn states_round_trip() {
        let s = PublishedState {
            org_id: OrgId::new("acme").unwrap(),
            kind: SubjectKind::Group,
            id: "eng".into(),
            month: Month::from_yyyymm(202611).unwrap(),
            counter: Counter::restored(42, 3, 7, 8000, true, 0).with_forecast(12, true, 86_400),
            limit_micros: Some(40),
        };
        assert_eq!(state_key(&s), "acme/group/eng");
        assert_eq!(decode_state(&encode_state(&s, 1)), Some(s));
        assert_eq!(decode_state(b"\xff"), None);
    }
}
