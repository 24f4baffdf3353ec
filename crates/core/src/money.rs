//! Money is integer micro-USD (1 USD = 1 000 000) in an `i64`, everywhere.
//! Names carry the unit last: `spend_micros`, `monthly_limit_micros`.

/// One US dollar.
pub const MICROS_PER_USD: i64 = 1_000_000;

/// The most one usage event may cost: 1 000 000 USD. Bounding single costs
/// keeps any realistic monthly sum far from `i64::MAX` (about 9.2e12 USD).
pub const COST_MICROS_MAX: i64 = 1_000_000 * MICROS_PER_USD;

/// The largest monthly limit: 100 000 000 USD. Small enough that
/// `limit * 10_000` (a utilization in basis points) cannot overflow.
pub const LIMIT_MICROS_MAX: i64 = 100_000_000 * MICROS_PER_USD;

/// A monthly limit: `None` is unlimited.
pub type Limit = Option<i64>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error(
        "{what} must be between 1 and {LIMIT_MICROS_MAX} micro-USD, got {got}; suspend the user to block all spend"
    )]
    LimitOutOfRange { what: &'static str, got: i64 },
    #[error("cost_micros must be between 0 and {COST_MICROS_MAX}, got {got}")]
    CostOutOfRange { got: i64 },
}

/// Checks a monthly limit (when set): 1 ..= [`LIMIT_MICROS_MAX`].
pub fn check_limit(what: &'static str, limit: Limit) -> Result<Limit, MoneyError> {
    match limit {
        Some(got) if !(1..=LIMIT_MICROS_MAX).contains(&got) => {
            Err(MoneyError::LimitOutOfRange { what, got })
        }
        _ => Ok(limit),
    }
}

/// Checks the cost of one usage event: 0 ..= [`COST_MICROS_MAX`].
pub fn check_cost(got: i64) -> Result<i64, MoneyError> {
    if (0..=COST_MICROS_MAX).contains(&got) {
        Ok(got)
    } else {
        Err(MoneyError::CostOutOfRange { got })
    }
}

/// Formats micro-USD as dollars for people: `$1,234.50`, `-$0.000001`.
/// Cents always; sub-cent digits only when they are not zero.
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let dollars = abs / 1_000_000;
    let frac = abs % 1_000_000;
    let mut int = dollars.to_string();
    let mut grouped = String::with_capacity(int.len() + int.len() / 3);
    while int.len() > 3 {
        let tail = int.split_off(int.len() - 3);
        grouped.insert_str(0, &tail);
        grouped.insert(0, ',');
    }
    grouped.insert_str(0, &int);
    let frac = format!("{frac:06}");
    let frac = if frac.ends_with("0000") {
        &frac[..2]
    } else {
        frac.trim_end_matches('0')
    };
    format!("{sign}${grouped}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_formatting_is_exact() {
        assert_eq!(format_usd(0), "$0.00");
        assert_eq!(format_usd(50 * MICROS_PER_USD), "$50.00");
        assert_eq!(format_usd(1_234_500_000), "$1,234.50");
        assert_eq!(format_usd(1), "$0.000001");
        assert_eq!(format_usd(1_230_000), "$1.23");
        assert_eq!(format_usd(1_234_560), "$1.23456");
        assert_eq!(format_usd(-1_500_000), "-$1.50");
        assert_eq!(format_usd(1_000_000_000_000_000), "$1,000,000,000.00");
    }

    #[test]
    fn limits_and_costs_are_bounded() {
        assert_eq!(check_limit("l", None), Ok(None));
        assert_eq!(check_limit("l", Some(1)), Ok(Some(1)));
        assert!(check_limit("l", Some(0)).is_err());
        assert!(check_limit("l", Some(LIMIT_MICROS_MAX + 1)).is_err());
        assert_eq!(check_cost(0), Ok(0));
        assert!(check_cost(-1).is_err());
        assert!(check_cost(COST_MICROS_MAX + 1).is_err());
    }
}
