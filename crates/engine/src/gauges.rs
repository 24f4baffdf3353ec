//! Gauges of spend, limits and thresholds, computed from the meters in
//! memory when Prometheus scrapes: per org and per group, subjects
//! projected over their limits per org, cutoffs by kind, and (opt-in) the top users by utilization. Each org is reported by the
//! process that meters it, so sums across processes count it once.
//!
//! Series of orgs and groups that went away are not updated any more; the
//! exporter drops gauges idle for a minute (see `tally serve`).

use std::time::Instant;

use tally_core::gauges::{GroupGauges, UserUtilization, top_n};
use tally_core::ids::OrgId;
use tally_core::ratio::{format_bps, utilization};
use tally_core::time::Month;

use crate::Engine;
use crate::metrics as m;

#[derive(Debug, Clone, Default)]
pub struct GaugeOptions {
    /// Report every org (embedded mode: this process meters them all, those
    /// without usage yet included); otherwise only the orgs it meters.
    pub all_orgs: bool,
    /// Users exported by utilization, highest first (0: none).
    pub top_users: usize,
    /// Groups exported, the most spending first.
    pub groups_max: usize,
}

/// Subject kinds, as the `kind` label names them.
const KINDS: [&str; 4] = ["user", "group", "key", "org"];

/// A gauge value: counts and micro-USD are integers, exact as f64 below
/// 2^53 (9 billion dollars).
fn value(v: i64) -> f64 {
    v as f64
}

impl Engine {
    /// Sets the gauges from the current state; returns how long it took.
    pub fn update_gauges(&self, o: &GaugeOptions) -> std::time::Duration {
        let started = Instant::now();
        let now = self.now_ms();
        let month = Month::from_unix_ms(now);
        let orgs: Vec<OrgId> = if o.all_orgs {
            self.registry.all().into_iter().map(|(id, _)| id).collect()
        } else {
            self.meter.metered_orgs()
        };
        let mut cut = [0u32; 4];
        let mut groups: Vec<(OrgId, GroupGauges)> = Vec::new();
        let mut top: Vec<(OrgId, UserUtilization)> = Vec::new();
        for org_id in &orgs {
            let Some(cell) = self.registry.org(org_id) else {
                continue;
            };
            let (g, over, users, held, holds) = {
                let org = cell.read();
                let h = &org.meter.holds;
                (
                    org.gauges(month),
                    org.projected_over(month, now),
                    org.top_users(month, o.top_users),
                    h.held(tally_core::ledger::Subject::Org),
                    h.len(),
                )
            };
            let org = org_id.to_string();
            metrics::gauge!(m::ORG_HELD, "org" => org.clone()).set(value(held));
            metrics::gauge!(m::ORG_HOLDS, "org" => org.clone()).set(holds as f64);
            metrics::gauge!(m::ORG_SPEND, "org" => org.clone()).set(value(g.spend_micros));
            if let Some(l) = g.limit_micros {
                metrics::gauge!(m::ORG_LIMIT, "org" => org.clone()).set(value(l));
            }
            for (bps, n) in &g.users_over {
                metrics::gauge!(m::ORG_USERS_OVER, "org" => org.clone(), "threshold" => format_bps(*bps))
                    .set(f64::from(*n));
            }
            cut[0] += g.cut_off.users;
            cut[1] += g.cut_off.groups;
            cut[2] += g.cut_off.keys;
            cut[3] += g.cut_off.org;
            for (kind, n) in KINDS
                .into_iter()
                .zip([over.users, over.groups, over.keys, over.org])
            {
                metrics::gauge!(m::PROJECTED_OVER_LIMIT, "org" => org.clone(), "kind" => kind)
                    .set(f64::from(n));
            }
            groups.extend(g.groups.into_iter().map(|gg| (org_id.clone(), gg)));
            top.extend(users.into_iter().map(|u| (org_id.clone(), u)));
        }
        if groups.len() > o.groups_max {
            groups.sort_by_key(|g| std::cmp::Reverse(g.1.spend_micros));
            groups.truncate(o.groups_max);
        }
        for (org_id, g) in groups {
            let (org, group) = (org_id.to_string(), g.id.to_string());
            metrics::gauge!(m::GROUP_SPEND, "org" => org.clone(), "group" => group.clone())
                .set(value(g.spend_micros));
            if let Some(l) = g.limit_micros {
                metrics::gauge!(m::GROUP_LIMIT, "org" => org.clone(), "group" => group.clone())
                    .set(value(l));
            }
            for (bps, n) in &g.users_over {
                metrics::gauge!(m::GROUP_USERS_OVER, "org" => org.clone(), "group" => group.clone(), "threshold" => format_bps(*bps))
                    .set(f64::from(*n));
            }
        }
        for (kind, n) in KINDS.into_iter().zip(cut) {
            metrics::gauge!(m::CUTOFFS_ACTIVE, "kind" => kind).set(f64::from(n));
        }
        top_n(&mut top, o.top_users, |(_, u)| u);
        for (org_id, u) in top {
            let ratio = utilization(u.spend_micros, Some(u.limit_micros)).unwrap_or_default();
            metrics::gauge!(m::USER_UTILIZATION, "org" => org_id.to_string(), "user" => u.id.to_string())
                .set(ratio);
        }
        metrics::gauge!(m::ORGS_REPORTED).set(orgs.len() as f64);
        metrics::gauge!(m::READY).set(if self.meter.is_ready() { 1.0 } else { 0.0 });
        self.meter.health().publish();
        metrics::gauge!(m::PARTITIONS_OWNED).set(self.meter.owned_partitions().len() as f64);
        started.elapsed()
    }
}
