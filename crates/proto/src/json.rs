//! The JSON form of a usage event (HTTP ingest, and Kafka messages with a
//! `content-type: application/json` header): the protobuf fields, with
//! `occurred_at` as RFC 3339 (or `occurred_at_ms` as Unix milliseconds).

use serde_json::Value;
use tally_core::usage::{RawUsage, UsageError, UsageEvent};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn malformed(msg: String) -> UsageError {
    UsageError::Malformed(msg)
}

fn text<'a>(o: &'a serde_json::Map<String, Value>, field: &str) -> Result<&'a str, UsageError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(malformed(format!("{field} must be a string"))),
    }
}

fn count(o: &serde_json::Map<String, Value>, field: &str) -> Result<u64, UsageError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| malformed(format!("{field} must be a whole number >= 0"))),
        Some(_) => Err(malformed(format!("{field} must be a number"))),
    }
}

/// Parses RFC 3339 into Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Formats Unix milliseconds as RFC 3339 in UTC (`2026-11-27T03:19:58.123Z`).
pub fn format_rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Validates one usage event in its JSON form.
pub fn usage_from_json(v: &Value) -> Result<UsageEvent, UsageError> {
    let Value::Object(o) = v else {
        return Err(malformed("a usage event must be a JSON object".into()));
    };
    let cost_micros = match o.get("cost_micros") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().ok_or_else(|| {
            UsageError::Money(tally_core::money::MoneyError::CostOutOfRange {
                got: if n.as_u64().is_some() { i64::MAX } else { -1 },
            })
        })?),
        Some(_) => return Err(malformed("cost_micros must be an integer".into())),
    };
    let occurred_at_ms = match (o.get("occurred_at"), o.get("occurred_at_ms")) {
        (Some(Value::String(s)), _) => Some(parse_rfc3339_ms(s).ok_or_else(|| {
            malformed(format!(
                "occurred_at {s:?} is not an RFC 3339 time (2026-11-27T10:00:00Z)"
            ))
        })?),
        (Some(Value::Null) | None, Some(Value::Number(n))) => Some(
            n.as_i64()
                .ok_or_else(|| malformed("occurred_at_ms must be an integer".into()))?,
        ),
        (Some(Value::Null) | None, None | Some(Value::Null)) => None,
        _ => return Err(malformed("occurred_at must be an RFC 3339 string".into())),
    };
    RawUsage {
        request_id: text(o, "request_id")?,
        org_id: text(o, "org_id")?,
        user_id: text(o, "user_id")?,
        api_key_id: text(o, "api_key_id")?,
        model: text(o, "model")?,
        provider: text(o, "provider")?,
        input_tokens: count(o, "input_tokens")?,
        output_tokens: count(o, "output_tokens")?,
        cost_micros,
        occurred_at_ms,
    }
    .validate()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok() -> Value {
        json!({
            "request_id": "r1", "org_id": "acme", "user_id": "alice", "api_key_id": "k1",
            "model": "gpt-4o", "provider": "openai", "input_tokens": 100, "output_tokens": 20,
            "cost_micros": 1250, "occurred_at": "2026-11-27T10:00:00.5Z"
        })
    }

    #[test]
    fn a_complete_event_parses() {
        let e = usage_from_json(&ok()).unwrap();
        assert_eq!(e.cost_micros, 1250);
        assert_eq!(e.occurred_at_ms, 1_795_773_600_500);
        assert_eq!(
            format_rfc3339_ms(e.occurred_at_ms),
            "2026-11-27T10:00:00.5Z"
        );
    }

    #[test]
    fn each_defect_is_named() {
        let cases = [
            ("cost_micros", json!(-5), "invalid_cost"),
            ("cost_micros", json!(1e30), "invalid_cost"),
            (
                "cost_micros",
                json!(18446744073709551615u64),
                "invalid_cost",
            ),
            ("cost_micros", json!(1.5), "invalid_cost"),
            ("cost_micros", json!("12"), "malformed"),
            ("cost_micros", Value::Null, "missing_field"),
            ("occurred_at", json!("yesterday"), "malformed"),
            ("request_id", json!(7), "malformed"),
            ("user_id", json!("a b"), "invalid_id"),
            ("org_id", json!(""), "missing_field"),
            ("input_tokens", json!(-1), "malformed"),
        ];
        for (field, value, code) in cases {
            let mut v = ok();
            v[field] = value.clone();
            assert_eq!(
                usage_from_json(&v).unwrap_err().code(),
                code,
                "{field} = {value}"
            );
        }
        assert_eq!(
            usage_from_json(&json!([1])).unwrap_err().code(),
            "malformed"
        );
    }
}
