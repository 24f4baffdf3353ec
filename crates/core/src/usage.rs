//! A usage event after validation: one LLM API call, attributed to an org, a
//! user and maybe a key.

use crate::ids::{IdError, KeyId, OrgId, UserId, check_request_id};
use crate::money::{MoneyError, check_cost};
use crate::time::{UNIX_MS_MAX, UNIX_MS_MIN};

/// The longest model or provider name, in bytes.
pub const LABEL_LEN_MAX: usize = 128;

/// The most input or output tokens one call may report: far past any
/// model's context, and small enough that the rollups' 64-bit sums of a
/// subject's day cannot overflow.
pub const TOKENS_MAX: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub request_id: String,
    pub org_id: OrgId,
    pub user_id: UserId,
    pub api_key_id: Option<KeyId>,
    pub model: String,
    pub provider: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: i64,
    pub occurred_at_ms: i64,
}

/// Why a usage event is malformed. `code` is stable (it appears in ingest
/// responses and dead-letter records); the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("occurred_at must be between 2000-01-01 and 9999-12-31, got {0} ms")]
    TimeOutOfRange(i64),
    #[error("{0} is longer than {LABEL_LEN_MAX} bytes")]
    LabelTooLong(&'static str),
    #[error("{0} has a control character")]
    LabelControl(&'static str),
    #[error("{0} must be at most {TOKENS_MAX}, got {1}")]
    TooManyTokens(&'static str, u64),
    #[error("{0}")]
    Malformed(String),
}

impl UsageError {
    pub fn code(&self) -> &'static str {
        match self {
            UsageError::Missing(_) => "missing_field",
            UsageError::Id(_) => "invalid_id",
            UsageError::Money(_) => "invalid_cost",
            UsageError::TimeOutOfRange(_) => "invalid_time",
            UsageError::LabelTooLong(_) | UsageError::LabelControl(_) => "invalid_label",
            UsageError::TooManyTokens(..) => "invalid_tokens",
            UsageError::Malformed(_) => "malformed",
        }
    }
}

/// The fields of a usage event as they arrive, before validation. Both the
/// protobuf and the JSON decoders fill this in, so the rules live once.
#[derive(Debug, Clone, Default)]
pub struct RawUsage<'a> {
    pub request_id: &'a str,
    pub org_id: &'a str,
    pub user_id: &'a str,
    pub api_key_id: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: Option<i64>,
    pub occurred_at_ms: Option<i64>,
}

impl RawUsage<'_> {
    pub fn validate(&self) -> Result<UsageEvent, UsageError> {
        let required = |v: &str, name: &'static str| {
            if v.is_empty() {
                Err(UsageError::Missing(name))
            } else {
                Ok(())
            }
        };
        required(self.request_id, "request_id")?;
        required(self.org_id, "org_id")?;
        required(self.user_id, "user_id")?;
        check_request_id(self.request_id)?;
        let cost = check_cost(self.cost_micros.ok_or(UsageError::Missing("cost_micros"))?)?;
        let at = self
            .occurred_at_ms
            .ok_or(UsageError::Missing("occurred_at"))?;
        if !(UNIX_MS_MIN..=UNIX_MS_MAX).contains(&at) {
            return Err(UsageError::TimeOutOfRange(at));
        }
        for (v, name) in [(self.model, "model"), (self.provider, "provider")] {
            if v.len() > LABEL_LEN_MAX {
                return Err(UsageError::LabelTooLong(name));
            }
            if v.chars().any(char::is_control) {
                return Err(UsageError::LabelControl(name));
            }
        }
        for (n, name) in [
            (self.input_tokens, "input_tokens"),
            (self.output_tokens, "output_tokens"),
        ] {
            if n > TOKENS_MAX {
                return Err(UsageError::TooManyTokens(name, n));
            }
        }
        Ok(UsageEvent {
            request_id: self.request_id.to_owned(),
            org_id: OrgId::new(self.org_id)?,
            user_id: UserId::new(self.user_id)?,
            api_key_id: if self.api_key_id.is_empty() {
                None
            } else {
                Some(KeyId::new(self.api_key_id)?)
            },
            model: self.model.to_owned(),
            provider: self.provider.to_owned(),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cost_micros: cost,
            occurred_at_ms: at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawUsage<'static> {
        RawUsage {
            request_id: "r1",
            org_id: "acme",
            user_id: "alice",
            cost_micros: Some(10),
            occurred_at_ms: Some(1_795_749_598_000),
            ..RawUsage::default()
        }
    }

    #[test]
    fn required_fields_and_bounds() {
        assert!(raw().validate().is_ok());
        let cases: Vec<(RawUsage<'static>, &str)> = vec![
            (
                RawUsage {
                    request_id: "",
                    ..raw()
                },
                "missing_field",
            ),
            (
                RawUsage {
                    org_id: "",
                    ..raw()
                },
                "missing_field",
            ),
            (
                RawUsage {
                    user_id: "",
                    ..raw()
                },
                "missing_field",
            ),
            (
                RawUsage {
                    cost_micros: None,
                    ..raw()
                },
                "missing_field",
            ),
            (
                RawUsage {
                    occurred_at_ms: None,
                    ..raw()
                },
                "missing_field",
            ),
            (
                RawUsage {
                    cost_micros: Some(-1),
                    ..raw()
                },
                "invalid_cost",
            ),
            (
                RawUsage {
                    cost_micros: Some(i64::MAX),
                    ..raw()
                },
                "invalid_cost",
            ),
            (
                RawUsage {
                    occurred_at_ms: Some(0),
                    ..raw()
                },
                "invalid_time",
            ),
            (
                RawUsage {
                    user_id: "a b",
                    ..raw()
                },
                "invalid_id",
            ),
            (
                RawUsage {
                    api_key_id: "k/1",
                    ..raw()
                },
                "invalid_id",
            ),
        ];
        for (r, code) in cases {
            assert_eq!(r.validate().unwrap_err().code(), code, "{r:?}");
        }
    }

    /// Model and provider names become text columns of the rollups (a NUL
    /// is refused by PostgreSQL: one such event stopped every checkpoint of
    /// its partition), and tokens are summed there as 64-bit integers.
    #[test]
    fn labels_are_printable_and_tokens_bounded() {
        for (model, provider) in [
            ("gpt\u{0}", "openai"),
            ("gpt-4o", "open\nai"),
            ("\u{7f}", "x"),
        ] {
            let e = RawUsage {
                model,
                provider,
                ..raw()
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.code(), "invalid_label", "{model:?} {provider:?}");
            assert!(e.to_string().contains("control character"), "{e}");
        }
        let unicode = RawUsage {
            model: "modèle-ünicode",
            ..raw()
        };
        assert!(unicode.validate().is_ok());
        let ok = RawUsage {
            input_tokens: TOKENS_MAX,
            output_tokens: TOKENS_MAX,
            ..raw()
        };
        assert!(ok.validate().is_ok());
        for (input_tokens, output_tokens) in [(TOKENS_MAX + 1, 0), (0, u64::MAX)] {
            let e = RawUsage {
                input_tokens,
                output_tokens,
                ..raw()
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.code(), "invalid_tokens");
            assert!(e.to_string().contains("at most 1000000000"), "{e}");
        }
    }
}
