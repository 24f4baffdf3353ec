//! Month-end forecasts: where a subject's spend is heading at its run-rate.
//!
//! The run-rate is the month's spend divided by the time since the start
//! of the subject's first UTC day with usage this month (at least one day,
//! so a first hour's spend is not multiplied by the month's hours). The
//! projection is today's spend plus that rate times what is left of the
//! month. A subject that started mid-month is judged by its own days, not
//! by the month's; a spike raises the rate by its size over the days seen
//! so far, and fades as days pass. Integer micro-USD throughout: the same
//! inputs give the same figure on every process and every replay.

use crate::money::Limit;
use crate::time::{Day, MS_PER_DAY, Month};

/// A subject's projection for its month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forecast {
    /// Spend at the month's end if the run-rate holds.
    pub projected_micros: i64,
    /// The UTC day spend reaches the limit at the run-rate (the day of
    /// `now` when it has): `None` without a limit, without spend, or when the projection
    /// stays under the limit.
    pub limit_day: Option<Day>,
}

/// Day `day_of_month` of `month`; `None` for 0 (no usage yet) or a day
/// the month does not have.
pub fn first_day(month: Month, day_of_month: u8) -> Option<Day> {
    let d = u32::from(day_of_month);
    let day = (d != 0).then(|| Day::from_yyyymmdd(month.yyyymm() * 100 + d))??;
    (Day::from_unix_ms(day.start_ms()) == day).then_some(day)
}

/// A month and its bounds in Unix ms, worked out once (the meter judges
/// forecasts on every call; the calendar's arithmetic is not free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthSpan {
    pub month: Month,
    pub start_ms: i64,
    /// The next month's first millisecond.
    pub end_ms: i64,
}

impl MonthSpan {
    pub fn of(month: Month) -> MonthSpan {
        MonthSpan {
            month,
            start_ms: month.start_ms(),
            end_ms: month.next().start_ms(),
        }
    }

    /// `ms` as seconds into the month, clamped into it.
    pub fn seconds_into(self, ms: i64) -> u32 {
        let ms = ms.clamp(self.start_ms, self.end_ms);
        u32::try_from((ms - self.start_ms) / 1_000).unwrap_or(u32::MAX)
    }

    /// The time `seconds` into the month.
    pub fn at_seconds(self, seconds: u32) -> i64 {
        self.start_ms + i64::from(seconds) * 1_000
    }

    /// Whether the projection at `now_ms` of `spend_micros` since the start
    /// of day `first_day` (0, or a day the month lacks: since its start)
    /// reaches `limit`: [`forecast`]'s `limit_day.is_some()`, without a
    /// division or the calendar. projected = spend + ⌊spend × left ÷
    /// elapsed⌋ ≥ limit exactly when spend × (elapsed + left) ≥ limit ×
    /// elapsed.
    pub fn reaches(self, spend_micros: i64, first_day: u8, limit: i64, now_ms: i64) -> bool {
        if spend_micros <= 0 {
            return false;
        }
        let from = self.start_ms + (i64::from(first_day.max(1)) - 1) * MS_PER_DAY;
        let from = if from < self.end_ms {
            from
        } else {
            self.start_ms
        };
        let now = now_ms.clamp(self.start_ms, self.end_ms);
        let elapsed = i128::from((now - from).max(MS_PER_DAY));
        let left = i128::from(self.end_ms - now);
        i128::from(spend_micros) * (elapsed + left) >= i128::from(limit) * elapsed
    }
}

/// `ms` as seconds into `month`, clamped into it.
pub fn seconds_into(month: Month, ms: i64) -> u32 {
    MonthSpan::of(month).seconds_into(ms)
}

/// The time `seconds` into `month`.
pub fn at_seconds(month: Month, seconds: u32) -> i64 {
    MonthSpan::of(month).at_seconds(seconds)
}

/// The projection of `month` at `now_ms` (clamped into the month) for a
/// subject that has spent `spend_micros` since the start of `first_day`
/// (`None`, or a day outside the month: since the month's start).
pub fn forecast(
    month: Month,
    spend_micros: i64,
    first_day: Option<Day>,
    limit: Limit,
    now_ms: i64,
) -> Forecast {
    let (start, end) = (month.start_ms(), month.next().start_ms());
    let from = first_day
        .filter(|d| d.month() == month)
        .map_or(start, Day::start_ms);
    let now = now_ms.clamp(start, end);
    let elapsed = i128::from((now - from).max(MS_PER_DAY));
    let remaining = i128::from(end - now);
    let spend = i128::from(spend_micros.max(0));
    let projected = spend + spend * remaining / elapsed;
    let projected_micros = i64::try_from(projected).unwrap_or(i64::MAX);
    let limit_day = match limit {
        Some(l) if spend > 0 && spend >= i128::from(l) => Some(Day::from_unix_ms(now.min(end - 1))),
        Some(l) if spend > 0 && projected >= i128::from(l) => {
            // The time the rate adds the rest of the limit, rounded up.
            let rest = i128::from(l) - spend;
            let at = i128::from(now) + (rest * elapsed + spend - 1) / spend;
            let at = i64::try_from(at).unwrap_or(i64::MAX).min(end - 1);
            Some(Day::from_unix_ms(at))
        }
        _ => None,
    };
    Forecast {
        projected_micros,
        limit_day,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::MICROS_PER_USD as USD;

    /// December 2026: 31 days.
    fn dec() -> Month {
        Month::parse("2026-12").unwrap()
    }

    fn day(d: u32) -> Day {
        Day::from_yyyymmdd(20261200 + d).unwrap()
    }

    /// The start of December's day `d`, plus `hours`.
    fn at(d: u32, hours: i64) -> i64 {
        day(d).start_ms() + hours * 3_600_000
    }

    #[test]
    fn a_flat_month_projects_its_rate_to_the_end() {
        // $10 a day since the 1st: at the end of the 10th, $100 spent.
        let f = forecast(dec(), 100 * USD, Some(day(1)), Some(500 * USD), at(11, 0));
        assert_eq!(f.projected_micros, 310 * USD);
        assert_eq!(f.limit_day, None);
        // Mid-day, the same rate: $95 by noon of the 10th.
        let f = forecast(dec(), 95 * USD, Some(day(1)), Some(255 * USD), at(10, 12));
        assert_eq!(f.projected_micros, 310 * USD);
        // The $160 left of a $255 limit take 16 days: noon of the 26th.
        assert_eq!(f.limit_day, Some(day(26)));
        // A limit of $310 is reached at the month's very end: its last day.
        let f = forecast(dec(), 100 * USD, Some(day(1)), Some(310 * USD), at(11, 0));
        assert_eq!(f.limit_day, Some(day(31)));
    }

    #[test]
    fn a_spike_raises_the_rate_by_its_size_over_the_days_seen() {
        // $1 a day for 10 days, then $50 on the 11th: $61 over 11 days.
        let f = forecast(dec(), 61 * USD, Some(day(1)), Some(150 * USD), at(12, 0));
        // $61 + 61/11 a day for the 20 days left: $171.90.
        assert_eq!(f.projected_micros, 61 * USD + 61 * USD * 20 / 11);
        // The $89 left of the limit take 16.05 days.
        assert_eq!(f.limit_day, Some(day(28)));
        // Ten quiet days ($1 a day) later the spike weighs less.
        let f = forecast(dec(), 71 * USD, Some(day(1)), Some(150 * USD), at(22, 0));
        assert_eq!(f.projected_micros, 71 * USD + 71 * USD * 10 / 21);
        assert_eq!(f.limit_day, None);
    }

    #[test]
    fn a_new_subject_is_judged_by_its_own_days() {
        // First usage on the 20th, $10 a day: $20 at the end of the 21st,
        // and 10 days left.
        let f = forecast(dec(), 20 * USD, Some(day(20)), Some(100 * USD), at(22, 0));
        assert_eq!(f.projected_micros, 120 * USD);
        assert_eq!(f.limit_day, Some(day(30)));
        // Judged by the month's 21 days, it would have projected $29.52.
        let by_month = forecast(dec(), 20 * USD, None, Some(100 * USD), at(22, 0));
        assert_eq!(by_month.projected_micros, 29_523_809);
        // A first day from another month counts from this month's start.
        let f = forecast(
            dec(),
            20 * USD,
            Some(Day::from_yyyymmdd(20261130).unwrap()),
            None,
            at(22, 0),
        );
        assert_eq!(f, by_month.with_no_limit());
    }

    #[test]
    fn the_first_day_of_a_month_counts_as_a_whole_day() {
        // $5 in the first 6 hours: the rate is $5 a day, not $20.
        let f = forecast(dec(), 5 * USD, Some(day(1)), Some(100 * USD), at(1, 6));
        assert_eq!(f.projected_micros, 5 * USD + 5 * USD * (31 * 24 - 6) / 24);
        assert_eq!(f.limit_day, Some(day(20)));
        // No spend: nothing projected, no day.
        let f = forecast(dec(), 0, None, Some(100 * USD), at(1, 0));
        assert_eq!(
            f,
            Forecast {
                projected_micros: 0,
                limit_day: None
            }
        );
    }

    #[test]
    fn spend_at_the_limit_reaches_it_today_and_a_closed_month_projects_its_spend() {
        let f = forecast(dec(), 100 * USD, Some(day(1)), Some(100 * USD), at(5, 3));
        assert_eq!(f.limit_day, Some(day(5)));
        // Past the month's end nothing is left to project.
        let jan = Month::parse("2027-01").unwrap();
        let f = forecast(
            dec(),
            40 * USD,
            Some(day(1)),
            Some(50 * USD),
            jan.start_ms() + MS_PER_DAY,
        );
        assert_eq!(
            f,
            Forecast {
                projected_micros: 40 * USD,
                limit_day: None
            }
        );
        // A limit reached is reached on the month's last day.
        let over = forecast(
            dec(),
            60 * USD,
            Some(day(1)),
            Some(50 * USD),
            jan.start_ms() + MS_PER_DAY,
        );
        assert_eq!(over.limit_day, Some(day(31)));
        // A first day the month does not have counts from its start.
        let nov = Month::parse("2026-11").unwrap();
        assert_eq!(first_day(nov, 31), None);
        assert_eq!(first_day(nov, 30), Day::from_yyyymmdd(20261130));
        assert_eq!(first_day(nov, 0), None);
        // Before it began (a clock behind), the rate is a day's.
        let f = forecast(jan, 2 * USD, None, None, dec().start_ms());
        assert_eq!(f.projected_micros, 2 * USD * 32);
    }

    /// The meter's cheap test agrees with the projection everywhere:
    /// every first day (and ones the month lacks), through the month and
    /// past it, at and around the limit.
    #[test]
    fn reaches_agrees_with_the_forecast() {
        for month in [dec(), Month::parse("2027-02").unwrap()] {
            let span = MonthSpan::of(month);
            for first in [0u8, 1, 2, 15, 28, 30, 31] {
                for hours in (0..=24 * 32).step_by(7) {
                    let now = span.start_ms + hours * 3_600_000 - 3_600_000;
                    for spend in [0, 1, 999_999, 3_333_333, 50 * USD, 100 * USD] {
                        for limit in [1, 7 * USD, 100 * USD, 101 * USD] {
                            let want =
                                forecast(month, spend, first_day(month, first), Some(limit), now)
                                    .limit_day
                                    .is_some();
                            assert_eq!(
                                span.reaches(spend, first, limit, now),
                                want,
                                "{month} first {first} at {now} spend {spend} limit {limit}"
                            );
                        }
                    }
                }
            }
        }
    }

    impl Forecast {
        fn with_no_limit(self) -> Forecast {
            Forecast {
                limit_day: None,
                ..self
            }
        }
    }
}
