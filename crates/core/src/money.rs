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

/// Parses dollars as people write them (`50`, `12.5`, `$1,234.50`,
/// `0.000001`) into micro-USD, exactly: no float on the way.
pub fn parse_usd(s: &str) -> Option<i64> {
    let t: String = s
        .trim()
        .trim_start_matches('$')
        .chars()
        .filter(|c| *c != ',')
        .collect();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest.to_owned()),
        None => (false, t),
    };
    let (int, frac) = t.split_once('.').unwrap_or((&t, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 6 {
        return None;
    }
    let whole: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut micros: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    let v = whole.checked_mul(MICROS_PER_USD)?.checked_add(micros)?;
    Some(if neg { -v } else { v })
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
    fn dollars_parse_exactly() {
        assert_eq!(parse_usd("50"), Some(50 * MICROS_PER_USD));
        assert_eq!(parse_usd("$1,234.50"), Some(1_234_500_000));
        assert_eq!(parse_usd("0.000001"), Some(1));
        assert_eq!(parse_usd(".5"), Some(500_000));
        assert_eq!(parse_usd("-2.25"), Some(-2_250_000));
        for bad in [
            "",
            "$",
            "1.0000001",
            "1e3",
            "abc",
            "1.2.3",
            "99999999999999999999",
        ] {
            assert_eq!(parse_usd(bad), None, "{bad}");
        }
        for m in [0, 1, 999_999, 50_000_000, 1_234_567_891] {
            assert_eq!(parse_usd(&format_usd(m)), Some(m));
        }
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
