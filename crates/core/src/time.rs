//! Calendar arithmetic on Unix milliseconds, UTC. Time is always an input in
//! this crate: callers pass the event's own timestamp or their clock's.

use std::fmt;

pub const MS_PER_DAY: i64 = 86_400_000;
pub const MS_PER_HOUR: i64 = 3_600_000;
pub const MS_PER_MINUTE: i64 = 60_000;

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31).
/// Howard Hinnant's `civil_from_days`, exact for the whole `i64` day range
/// that Unix milliseconds can express.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `ms` in RFC 3339, UTC, to the second: `2026-12-07T04:30:00Z`.
pub fn format_utc_ms(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let s = ms.rem_euclid(MS_PER_DAY) / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// (year, month 1..=12, day 1..=31) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTC calendar month, stored as `yyyymm` (202611 = November 2026) so that
/// it sorts and reads naturally in SQL and JSON.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Month(u32);

impl Month {
    pub fn from_unix_ms(ms: i64) -> Month {
        let (y, m, _) = civil_from_days(ms.div_euclid(MS_PER_DAY));
        Month::from_parts(y, m)
    }

    fn from_parts(y: i64, m: u32) -> Month {
        // Years outside 0..=9999 cannot come from validated timestamps.
        let y = y.clamp(0, 9999) as u32;
        Month(y * 100 + m)
    }

    /// Parses `yyyymm`; `None` when the month part is not 1..=12.
    pub fn from_yyyymm(v: u32) -> Option<Month> {
        let m = v % 100;
        ((1..=12).contains(&m) && v <= 999_912).then_some(Month(v))
    }

    /// Parses `yyyy-mm` (as `Display` writes it): four digits, a dash, two.
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        Month::from_yyyymm(y.parse::<u32>().ok()? * 100 + m.parse::<u32>().ok()?)
    }

    /// How many months `self` is after `earlier` (negative: before).
    pub fn since(self, earlier: Month) -> i64 {
        (i64::from(self.year()) * 12 + i64::from(self.month()))
            - (i64::from(earlier.year()) * 12 + i64::from(earlier.month()))
    }

    pub fn yyyymm(self) -> u32 {
        self.0
    }

    pub fn year(self) -> u32 {
        self.0 / 100
    }

    pub fn month(self) -> u32 {
        self.0 % 100
    }

    /// The first millisecond of the month.
    pub fn start_ms(self) -> i64 {
        days_from_civil(i64::from(self.year()), self.month(), 1) * MS_PER_DAY
    }

    pub fn first_day(self) -> Day {
        Day::from_unix_ms(self.start_ms())
    }

    pub fn last_day(self) -> Day {
        Day::from_unix_ms(self.next().start_ms() - 1)
    }

    pub fn next(self) -> Month {
        if self.month() == 12 {
            Month((self.year() + 1) * 100 + 1)
        } else {
            Month(self.0 + 1)
        }
    }

    pub fn prev(self) -> Month {
        if self.month() == 1 {
            Month((self.year() - 1) * 100 + 12)
        } else {
            Month(self.0 - 1)
        }
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month())
    }
}

impl fmt::Debug for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A UTC calendar day, stored as `yyyymmdd`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Day(u32);

impl Day {
    pub fn from_unix_ms(ms: i64) -> Day {
        let (y, m, d) = civil_from_days(ms.div_euclid(MS_PER_DAY));
        Day(y.clamp(0, 9999) as u32 * 10_000 + m * 100 + d)
    }

    pub fn from_yyyymmdd(v: u32) -> Option<Day> {
        let (m, d) = ((v / 100) % 100, v % 100);
        ((1..=12).contains(&m) && (1..=31).contains(&d)).then_some(Day(v))
    }

    /// Parses `yyyy-mm-dd`, a day the calendar has (not 2026-02-30).
    pub fn parse(s: &str) -> Option<Day> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let (y, m, d) = (&s[0..4], &s[5..7], &s[8..10]);
        if ![y, m, d]
            .iter()
            .all(|p| p.bytes().all(|c| c.is_ascii_digit()))
        {
            return None;
        }
        let v = y.parse::<u32>().ok()? * 10_000
            + m.parse::<u32>().ok()? * 100
            + d.parse::<u32>().ok()?;
        let day = Day::from_yyyymmdd(v)?;
        (Day::from_unix_ms(day.start_ms()) == day).then_some(day)
    }

    pub fn yyyymmdd(self) -> u32 {
        self.0
    }

    pub fn month(self) -> Month {
        Month(self.0 / 100)
    }

    /// 1 ..= 31.
    pub fn day_of_month(self) -> u8 {
        (self.0 % 100) as u8
    }

    /// The first millisecond of the day.
    pub fn start_ms(self) -> i64 {
        let (y, m, d) = (self.0 / 10_000, (self.0 / 100) % 100, self.0 % 100);
        days_from_civil(i64::from(y), m, d) * MS_PER_DAY
    }

    pub fn next(self) -> Day {
        Day::from_unix_ms(self.start_ms() + MS_PER_DAY)
    }

    /// Days from `earlier` to `self` (negative: before).
    pub fn since(self, earlier: Day) -> i64 {
        (self.start_ms() - earlier.start_ms()) / MS_PER_DAY
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}",
            self.0 / 10_000,
            (self.0 / 100) % 100,
            self.0 % 100
        )
    }
}

impl fmt::Debug for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The earliest timestamp Tally accepts (2000-01-01T00:00:00Z) and the latest
/// (9999-12-31T23:59:59.999Z): usage outside is malformed.
pub const UNIX_MS_MIN: i64 = 946_684_800_000;
pub const UNIX_MS_MAX: i64 = 253_402_300_799_999;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn months_and_days_of_known_instants() {
        // 2026-11-27T03:19:58Z
        let ms = 1_795_749_598_000;
        assert_eq!(Month::from_unix_ms(ms).yyyymm(), 202611);
        assert_eq!(Day::from_unix_ms(ms).yyyymmdd(), 20261127);
        // The last millisecond of 2026 is December, the next one January 2027.
        let new_year = days_from_civil(2027, 1, 1) * MS_PER_DAY;
        assert_eq!(Month::from_unix_ms(new_year - 1).to_string(), "2026-12");
        assert_eq!(Month::from_unix_ms(new_year).to_string(), "2027-01");
        // Leap day.
        let leap = days_from_civil(2028, 2, 29) * MS_PER_DAY;
        assert_eq!(Day::from_unix_ms(leap).to_string(), "2028-02-29");
        assert_eq!(Month::from_yyyymm(202612).unwrap().next().yyyymm(), 202701);
        assert_eq!(Month::from_yyyymm(202701).unwrap().prev().yyyymm(), 202612);
        assert_eq!(Month::from_yyyymm(202613), None);
    }

    #[test]
    fn months_parse_as_they_print() {
        let nov = Month::from_yyyymm(202611).unwrap();
        assert_eq!(Month::parse("2026-11"), Some(nov));
        assert_eq!(Month::parse(&nov.to_string()), Some(nov));
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-1a",
            "+026-11",
            "",
            "2026-11-01",
        ] {
            assert_eq!(Month::parse(bad), None, "{bad}");
        }
        assert_eq!(nov.since(nov), 0);
        assert_eq!(nov.first_day().to_string(), "2026-11-01");
        assert_eq!(nov.last_day().to_string(), "2026-11-30");
        let feb = Month::from_yyyymm(202802).unwrap();
        assert_eq!(feb.last_day().to_string(), "2028-02-29");
        assert_eq!(Day::parse("2028-02-29"), Some(feb.last_day()));
        assert_eq!(
            Day::parse("2028-02-29").unwrap().next().to_string(),
            "2028-03-01"
        );
        assert_eq!(feb.last_day().since(nov.first_day()), 485);
        for bad in [
            "2027-02-29",
            "2026-11-31",
            "2026-11-00",
            "2026-11-1",
            "2026/11/01",
            "2026-11-01x",
            "",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
        assert_eq!(Month::from_yyyymm(202701).unwrap().since(nov), 2);
        assert_eq!(Month::from_yyyymm(202512).unwrap().since(nov), -11);
    }

    proptest! {
        #[test]
        fn civil_round_trips(days in -1_000_000i64..3_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn a_month_contains_exactly_its_milliseconds(ms in UNIX_MS_MIN..UNIX_MS_MAX) {
            let month = Month::from_unix_ms(ms);
            prop_assert!(month.start_ms() <= ms);
            prop_assert!(ms < month.next().start_ms());
            prop_assert_eq!(Day::from_unix_ms(ms).month(), month);
        }
    }
}
