//! Fractions of a limit: alert thresholds and utilization. Both are kept in
//! integer basis points (1/10 000) inside Tally; JSON shows them as fractions
//! (`0.8`). This module is the one place a float appears, and only for
//! display: money itself is never a float.

/// 100 % in basis points.
pub const BPS_FULL: u32 = 10_000;
/// How many alert thresholds an org may have.
pub const THRESHOLDS_MAX: usize = 8;
/// The default alert thresholds: 50 %, 80 %, 100 %.
pub const DEFAULT_THRESHOLDS_BPS: [u32; 3] = [5_000, 8_000, 10_000];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatioError {
    #[error("{0:?} is not a fraction between 0 and 1 with at most 4 decimals (e.g. 0.8)")]
    BadFraction(String),
    #[error(
        "alert_thresholds takes 1 to {THRESHOLDS_MAX} fractions above 0 and at most 1, each once"
    )]
    BadThresholds,
}

/// Parses a decimal fraction (as written in JSON, e.g. `0.8`, `1`, `0.125`)
/// into basis points, exactly: no float on the way.
pub fn parse_fraction_bps(s: &str) -> Result<u32, RatioError> {
    let bad = || RatioError::BadFraction(s.to_owned());
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || (s.contains('.') && frac.is_empty()) {
        return Err(bad());
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 4 || int.len() > 1 {
        return Err(bad());
    }
    let int: u32 = int.parse().map_err(|_| bad())?;
    let mut frac_bps: u32 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    for _ in frac.len()..4 {
        frac_bps *= 10;
    }
    let bps = int * BPS_FULL + frac_bps;
    if bps > BPS_FULL {
        return Err(bad());
    }
    Ok(bps)
}

/// Formats basis points as the shortest decimal fraction: 8000 → `0.8`.
pub fn format_bps(bps: u32) -> String {
    let (int, frac) = (bps / BPS_FULL, bps % BPS_FULL);
    if frac == 0 {
        return format!("{int}");
    }
    let frac = format!("{frac:04}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// Validates a threshold list: 1..=8 values in 1..=10 000 bps, sorted and
/// unique on return.
pub fn check_thresholds(mut bps: Vec<u32>) -> Result<Vec<u32>, RatioError> {
    bps.sort_unstable();
    let len = bps.len();
    bps.dedup();
    if bps.is_empty()
        || bps.len() != len
        || bps.len() > THRESHOLDS_MAX
        || bps.iter().any(|&t| t == 0 || t > BPS_FULL)
    {
        return Err(RatioError::BadThresholds);
    }
    Ok(bps)
}

/// Has `spend_micros` reached `threshold_bps` of `limit_micros`? Exact integer
/// comparison: `spend * 10 000 >= threshold * limit`, in i128 so that no
/// spend can overflow it.
pub fn reached(spend_micros: i64, limit_micros: i64, threshold_bps: u32) -> bool {
    i128::from(spend_micros) * i128::from(BPS_FULL)
        >= i128::from(threshold_bps) * i128::from(limit_micros)
}

/// Spend as a fraction of the limit, for display (`utilization` in JSON).
/// `None` when unlimited.
#[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
pub fn utilization(spend_micros: i64, limit_micros: Option<i64>) -> Option<f64> {
    let limit = limit_micros?;
    if limit <= 0 {
        return Some(if spend_micros > 0 { f64::INFINITY } else { 0.0 });
    }
    Some(spend_micros as f64 / limit as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_parse_exactly() {
        assert_eq!(parse_fraction_bps("0.8"), Ok(8000));
        assert_eq!(parse_fraction_bps("0.5"), Ok(5000));
        assert_eq!(parse_fraction_bps("1"), Ok(10000));
        assert_eq!(parse_fraction_bps("1.0"), Ok(10000));
        assert_eq!(parse_fraction_bps("0.125"), Ok(1250));
        assert_eq!(parse_fraction_bps("0.0001"), Ok(1));
        assert_eq!(parse_fraction_bps("0.90000"), Ok(9000));
        for bad in [
            "", ".5", "1.", "0.00001", "1.5", "2", "-0.5", "0.5e1", "10", "0x1",
        ] {
            assert!(parse_fraction_bps(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fractions_format_shortest() {
        assert_eq!(format_bps(8000), "0.8");
        assert_eq!(format_bps(10000), "1");
        assert_eq!(format_bps(1250), "0.125");
        assert_eq!(format_bps(1), "0.0001");
        for bps in 1..=BPS_FULL {
            assert_eq!(parse_fraction_bps(&format_bps(bps)), Ok(bps));
        }
    }

    #[test]
    fn thresholds_are_sorted_unique_and_bounded() {
        assert_eq!(
            check_thresholds(vec![10000, 5000, 8000]),
            Ok(vec![5000, 8000, 10000])
        );
        assert!(check_thresholds(vec![]).is_err());
        assert!(check_thresholds(vec![5000, 5000]).is_err());
        assert!(check_thresholds(vec![0]).is_err());
        assert!(check_thresholds((1..=9).map(|i| i * 1000).collect()).is_err());
    }

    #[test]
    fn reached_is_exact_at_the_boundary() {
        assert!(reached(80, 100, 8000));
        assert!(!reached(79, 100, 8000));
        assert!(reached(1, 3, 3333));
        assert!(!reached(1, 3, 3334));
        assert!(reached(i64::MAX, i64::MAX, BPS_FULL));
    }
}
