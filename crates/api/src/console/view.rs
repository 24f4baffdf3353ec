//! What pages show, computed from exact integers: dollars, percentages,
//! usage bars, period labels, relative times and the SVG charts.

use std::fmt::Write as _;

use tally_core::money::format_usd;
use tally_core::time::{Month, civil_from_days};

const MS_PER_DAY: i64 = 86_400_000;
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

pub(crate) fn usd(micros: i64) -> String {
    format_usd(micros)
}

/// An amount as a form's field shows it (`1200.50`; empty: none).
pub(crate) fn amount_input(micros: Option<i64>) -> String {
    micros.map_or_else(String::new, |l| usd(l).replace(['$', ','], ""))
}

/// A limit for people: dollars, or "unlimited".
pub(crate) fn limit(micros: Option<i64>) -> String {
    micros.map_or_else(|| "unlimited".to_owned(), usd)
}

/// Spend over limit as a percentage to one decimal (`82.5 %`), rounded
/// down; empty when unlimited.
pub(crate) fn percent(spend: i64, limit: Option<i64>) -> String {
    match limit {
        None => String::new(),
        Some(l) if l <= 0 => {
            if spend > 0 {
                "over".to_owned()
            } else {
                "0 %".to_owned()
            }
        }
        Some(l) => {
            let tenths = i128::from(spend.max(0)) * 1000 / i128::from(l);
            format!("{}.{} %", tenths / 10, tenths % 10)
        }
    }
}

/// A usage bar: its width (0–100, % of the limit) and its colour class at
/// the org's thresholds (`ok` below the first, `warn` from it, `over` at
/// the limit).
#[derive(Debug, Clone)]
pub(crate) struct Bar {
    pub width: u32,
    pub class: &'static str,
}

pub(crate) fn bar(spend: i64, limit: Option<i64>, thresholds_bps: &[u32]) -> Option<Bar> {
    let l = limit?;
    let bps = if l <= 0 {
        if spend > 0 { 10_000 } else { 0 }
    } else {
        i128::from(spend.max(0)) * 10_000 / i128::from(l)
    };
    let first = thresholds_bps.iter().copied().min().unwrap_or(8_000);
    let class = if bps >= 10_000 {
        "over"
    } else if bps >= i128::from(first) {
        "warn"
    } else {
        "ok"
    };
    Some(Bar {
        width: u32::try_from(bps.clamp(0, 10_000) / 100).unwrap_or(100),
        class,
    })
}

/// A month's span as people read it: `1–31 Dec 2026 UTC, resets 1 Jan`.
pub(crate) fn period(month: Month) -> String {
    let days = days_in(month);
    let name = |m: Month| MONTHS[(m.month() as usize).saturating_sub(1) % 12];
    format!(
        "1–{days} {} {} UTC, resets 1 {}",
        name(month),
        month.year(),
        name(month.next())
    )
}

pub(crate) fn days_in(month: Month) -> i64 {
    (month.next().start_ms() - month.start_ms()) / MS_PER_DAY
}

/// A month-end forecast as a page shows it (docs/usage.md, Forecasts).
#[derive(Debug)]
pub(crate) struct Projection {
    pub amount: String,
    /// At or over the limit.
    pub over: bool,
    pub note: String,
}

/// The forecast of a subject's JSON: its projection, limit, and the day
/// the projection reaches the limit.
pub(crate) fn projection(projected: i64, limit: Option<i64>, reaches: Option<&str>) -> Projection {
    let over = limit.is_some_and(|l| projected >= l);
    let rate = "at the daily run-rate since the first day with usage";
    let note = match reaches {
        Some(day) => format!("{rate}; reaches the limit on {day}"),
        None if limit.is_some() => format!("{rate}; stays under the limit"),
        None => rate.to_owned(),
    };
    Projection {
        amount: usd(projected),
        over,
        note,
    }
}

/// An RFC 3339 time as `5 Dec 2026 14:03 UTC`; `ms` since the epoch.
pub(crate) fn when(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let s = ms.rem_euclid(MS_PER_DAY) / 1000;
    format!(
        "{d} {} {y} {:02}:{:02} UTC",
        MONTHS[(m as usize).saturating_sub(1) % 12],
        s / 3600,
        s / 60 % 60
    )
}

/// Milliseconds of an RFC 3339 time the API wrote.
pub(crate) fn parse_ms(rfc3339: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// How long ago, for people: `just now`, `5 min ago`, `3 h ago`, `2 d ago`.
pub(crate) fn ago(ms: i64, now_ms: i64) -> String {
    let s = (now_ms - ms).max(0) / 1000;
    match s {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// Escapes text for HTML (the charts are built here, not in a template).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The month's spend by day as an SVG: a bar per day of the running total,
/// the day's own spend in each bar's tooltip, and the monthly limit as a
/// dashed line. `days` are (`YYYY-MM-DD`, spend) in order; days without
/// spend may be missing. Integer arithmetic throughout.
pub(crate) fn daily_chart(month: Month, days: &[(String, i64)], limit: Option<i64>) -> String {
    const W: i64 = 720;
    const H: i64 = 220;
    const LEFT: i64 = 8;
    const TOP: i64 = 16;
    const BOTTOM: i64 = 22;
    let n = days_in(month);
    let mut by_day = vec![0i64; usize::try_from(n).unwrap_or(31)];
    for (day, spend) in days {
        let d: usize = day
            .rsplit('-')
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        if let Some(slot) = d.checked_sub(1).and_then(|i| by_day.get_mut(i)) {
            *slot += spend;
        }
    }
    let last = by_day.iter().rposition(|s| *s != 0).map_or(0, |i| i + 1);
    let mut running = Vec::with_capacity(by_day.len());
    let mut total = 0i64;
    for s in &by_day {
        total += s;
        running.push(total);
    }
    let top = total.max(limit.unwrap_or(0)).max(1);
    // Headroom above the highest of total and limit: a tenth.
    let scale = i128::from(top) + i128::from(top) / 10;
    let plot_h = H - TOP - BOTTOM;
    let y = |v: i64| -> i64 {
        TOP + plot_h - i64::try_from(i128::from(v.max(0)) * i128::from(plot_h) / scale).unwrap_or(0)
    };
    let slot = (W - LEFT * 2) / n.max(1);
    let label = format!(
        "Spend by day, running total: {} by day {}{}",
        usd(total),
        last,
        limit.map_or(String::new(), |l| format!(", limit {}", usd(l)))
    );
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        esc(&label)
    );
    let _ = write!(
        svg,
        r#"<line class="axis" x1="{LEFT}" y1="{}" x2="{}" y2="{}"/>"#,
        TOP + plot_h,
        W - LEFT,
        TOP + plot_h
    );
    for (i, (cum, own)) in running.iter().zip(&by_day).enumerate().take(last) {
        let i = i64::try_from(i).unwrap_or(0);
        let x = LEFT + i * slot + 1;
        let top_y = y(*cum);
        let _ = write!(
            svg,
            r#"<rect class="bar" x="{x}" y="{top_y}" width="{}" height="{}"><title>{} {}: {} (month so far {})</title></rect>"#,
            (slot - 2).max(1),
            TOP + plot_h - top_y,
            i + 1,
            MONTHS[(month.month() as usize).saturating_sub(1) % 12],
            esc(&usd(*own)),
            esc(&usd(*cum)),
        );
    }
    // Each day's label under the middle of its bar.
    for d in [1, 8, 15, 22, 29] {
        if d <= n {
            let _ = write!(
                svg,
                r#"<text class="tick" x="{}" y="{}" text-anchor="middle">{d}</text>"#,
                LEFT + (d - 1) * slot + slot / 2,
                H - 6
            );
        }
    }
    if let Some(l) = limit {
        let ly = y(l);
        let _ = write!(
            svg,
            r#"<line class="limit" x1="{LEFT}" y1="{ly}" x2="{}" y2="{ly}"/><text class="limit-label" x="{}" y="{}" text-anchor="end">limit {}</text>"#,
            W - LEFT,
            W - LEFT,
            (ly - 4).max(10),
            esc(&usd(l))
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One model's line of a page's "by model" table.
#[derive(Debug, Clone)]
pub(crate) struct ModelLine {
    pub model: String,
    pub spend: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// The lines of a detail's `history.models`.
pub(crate) fn model_lines(models: &[crate::dto::ModelUsage]) -> Vec<ModelLine> {
    models
        .iter()
        .map(|m| ModelLine {
            model: m.model.clone(),
            spend: usd(m.sums.spend_micros),
            requests: m.sums.requests,
            input_tokens: m.sums.input_tokens,
            output_tokens: m.sums.output_tokens,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_for_people() {
        assert_eq!(percent(82_500_000, Some(100_000_000)), "82.5 %");
        assert_eq!(percent(1, Some(3)), "33.3 %");
        assert_eq!(percent(5, None), "");
        assert_eq!(percent(5, Some(0)), "over");
        let dec = Month::from_yyyymm(202_612).unwrap();
        assert_eq!(period(dec), "1–31 Dec 2026 UTC, resets 1 Jan");
        let feb = Month::from_yyyymm(202_802).unwrap();
        assert_eq!(period(feb), "1–29 Feb 2028 UTC, resets 1 Mar");
        assert_eq!(ago(0, 90_000), "1 min ago");
        assert_eq!(ago(0, 3 * 86_400_000), "3 d ago");
    }

    #[test]
    fn bars_colour_at_the_thresholds() {
        let t = [5_000, 8_000, 10_000];
        assert_eq!(bar(49, Some(100), &t).unwrap().class, "ok");
        assert_eq!(bar(50, Some(100), &t).unwrap().class, "warn");
        let over = bar(250, Some(100), &t).unwrap();
        assert_eq!((over.class, over.width), ("over", 100));
        assert!(bar(1, None, &t).is_none());
    }

    #[test]
    fn a_projection_says_where_it_leads() {
        let p = projection(31_000_000, Some(30_000_000), Some("2026-12-30"));
        assert_eq!((p.amount.as_str(), p.over), ("$31.00", true));
        assert!(
            p.note.ends_with("reaches the limit on 2026-12-30"),
            "{}",
            p.note
        );
        let p = projection(20_000_000, Some(30_000_000), None);
        assert!(!p.over && p.note.ends_with("stays under the limit"));
        assert!(!projection(20_000_000, None, None).note.contains("limit"));
    }

    #[test]
    fn the_chart_runs_the_total_and_draws_the_limit() {
        let dec = Month::from_yyyymm(202_612).unwrap();
        let svg = daily_chart(
            dec,
            &[
                ("2026-12-01".into(), 5_000_000),
                ("2026-12-03".into(), 2_000_000),
            ],
            Some(10_000_000),
        );
        assert_eq!(svg.matches("<rect").count(), 3, "{svg}");
        assert!(svg.contains("3 Dec: $2.00 (month so far $7.00)"), "{svg}");
        assert!(svg.contains("limit $10.00"), "{svg}");
        assert!(!daily_chart(dec, &[], None).contains("<rect"));
    }
}
