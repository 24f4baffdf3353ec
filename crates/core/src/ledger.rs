//! Monthly spend per subject (user, group, key, org) and what it triggers:
//! alert thresholds, the forecast alert and cutoffs.
//!
//! Counters live in dense vectors indexed by the directory's entity indices,
//! one [`MonthLedger`] per UTC month still open to late usage. Every change
//! marks its counter dirty so a checkpoint writes only what moved.

use crate::forecast::{Forecast, MonthSpan, forecast};
use crate::models::Models;
use crate::money::Limit;
use crate::ratio::reached;
use crate::time::{Day, Month};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKind {
    User,
    Group,
    Key,
    Org,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::User => "user",
            SubjectKind::Group => "group",
            SubjectKind::Key => "key",
            SubjectKind::Org => "org",
        }
    }

    pub fn parse(s: &str) -> Option<SubjectKind> {
        Some(match s {
            "user" => SubjectKind::User,
            "group" => SubjectKind::Group,
            "key" => SubjectKind::Key,
            "org" => SubjectKind::Org,
            _ => return None,
        })
    }
}

/// A subject within one org, by the directory's dense index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    User(u32),
    Group(u32),
    Key(u32),
    Org,
}

impl Subject {
    pub fn kind(self) -> SubjectKind {
        match self {
            Subject::User(_) => SubjectKind::User,
            Subject::Group(_) => SubjectKind::Group,
            Subject::Key(_) => SubjectKind::Key,
            Subject::Org => SubjectKind::Org,
        }
    }
}

/// One subject's spend in one month. 40 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub spend_micros: i64,
    pub requests: u64,
    /// The latest `occurred_at` counted (0: none).
    pub last_at_ms: i64,
    /// The highest alert threshold fired this month, in basis points.
    pub fired_bps: u16,
    /// The day of the month of the earliest usage counted (1 ..= 31; 0:
    /// none): where the subject's run-rate starts (see [`crate::forecast`]).
    pub first_day: u8,
    /// Whether the forecast alert fired this month (the projection reached
    /// the limit).
    pub forecast_fired: bool,
    /// When the forecast was last judged (a call's logged time, a limit
    /// change), in seconds into the month: it is never judged as of an
    /// earlier time, which would project the same spend over fewer days.
    pub judged_s: u32,
    /// Whether the subject is cut off (spend reached its limit).
    pub cut_off: bool,
    /// How many cutoffs and lifts happened this month: numbers them, so a
    /// replay writes the same enforcement events again instead of new ones
    /// (a u32: a u16 could run out within a busy month, and past it every
    /// event had the same number).
    pub ordinal: u32,
    dirty: bool,
}

const _: () = assert!(size_of::<Counter>() == 40);

impl Counter {
    pub fn restored(
        spend_micros: i64,
        requests: u64,
        last_at_ms: i64,
        fired_bps: u16,
        cut_off: bool,
        ordinal: u32,
    ) -> Counter {
        Counter {
            spend_micros,
            requests,
            last_at_ms,
            fired_bps,
            cut_off,
            ordinal,
            first_day: 0,
            forecast_fired: false,
            judged_s: 0,
            dirty: false,
        }
    }

    /// With the forecast's state: the first day with usage (0: none),
    /// whether its alert fired, and when it was last judged (seconds into
    /// the month).
    pub fn with_forecast(self, first_day: u8, forecast_fired: bool, judged_s: u32) -> Counter {
        Counter {
            first_day,
            forecast_fired,
            judged_s,
            ..self
        }
    }

    /// The first day with usage in `month`, if any.
    pub fn first_day_in(&self, month: Month) -> Option<Day> {
        crate::forecast::first_day(month, self.first_day)
    }

    /// The month-end projection at `now_ms` (see [`crate::forecast`]).
    pub fn forecast(&self, month: Month, limit: Limit, now_ms: i64) -> Forecast {
        forecast(
            month,
            self.spend_micros,
            self.first_day_in(month),
            limit,
            now_ms,
        )
    }

    /// Whether this state of a subject's month comes before `other`, as
    /// its metering process went: requests, fired thresholds, the forecast
    /// alert and the cutoff/lift ordinal never go down, and every change moves one of
    /// them up. How a mirror tells a late or repeated published state from
    /// a newer one, whichever owner published it (a new owner resumes from
    /// the last committed checkpoint, at or past every state published).
    /// States that are not ordered this way (histories that diverged, as
    /// when a new owner re-judged the log after a handover) are not behind:
    /// the one published last wins.
    pub fn is_behind(&self, other: &Counter) -> bool {
        let progress = |c: &Counter| {
            (
                c.requests,
                u64::from(c.ordinal),
                u64::from(c.fired_bps),
                u64::from(c.forecast_fired),
            )
        };
        let (a, b) = (progress(self), progress(other));
        a.0 <= b.0 && a.1 <= b.1 && a.2 <= b.2 && a.3 <= b.3 && a != b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiftReason {
    LimitRaised,
    LimitRemoved,
    NewMonth,
}

impl LiftReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LiftReason::LimitRaised => "limit_raised",
            LiftReason::LimitRemoved => "limit_removed",
            LiftReason::NewMonth => "new_month",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnforcementKind {
    ThresholdCrossed {
        threshold_bps: u32,
    },
    /// The month-end projection reached the limit: what it was, and the
    /// day spend would reach the limit at the run-rate.
    ForecastOverLimit {
        projected_micros: i64,
        limit_day: Day,
    },
    CutOff,
    CutoffLifted {
        reason: LiftReason,
    },
}

impl EnforcementKind {
    pub fn name(self) -> &'static str {
        match self {
            EnforcementKind::ThresholdCrossed { .. } => "threshold_crossed",
            EnforcementKind::ForecastOverLimit { .. } => "forecast_over_limit",
            EnforcementKind::CutOff => "cut_off",
            EnforcementKind::CutoffLifted { .. } => "cutoff_lifted",
        }
    }
}

/// Something that happened to a subject's budget. Unique by (subject, month,
/// kind, threshold or ordinal): a replay produces the same one again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enforcement {
    pub subject: Subject,
    pub month: Month,
    pub at_ms: i64,
    pub spend_micros: i64,
    pub limit_micros: Limit,
    /// The counter's ordinal after this event (cutoffs and lifts); 0 for
    /// thresholds and the lift of a cutoff a month ended with; for the lift
    /// of a closed month's late cutoff, that cutoff's ordinal (see
    /// [`Ledger::count`]).
    pub ordinal: u32,
    pub kind: EnforcementKind,
}

/// The counters of one month, and the models its usage is broken down by.
#[derive(Debug, Clone)]
pub struct MonthLedger {
    pub month: Month,
    /// Its bounds, for forecasts.
    pub span: MonthSpan,
    pub org: Counter,
    pub users: Vec<Counter>,
    pub groups: Vec<Counter>,
    pub keys: Vec<Counter>,
    pub models: Models,
}

impl MonthLedger {
    fn new(month: Month) -> MonthLedger {
        MonthLedger {
            month,
            span: MonthSpan::of(month),
            org: Counter::default(),
            users: Vec::new(),
            groups: Vec::new(),
            keys: Vec::new(),
            models: Models::default(),
        }
    }

    pub fn get(&self, s: Subject) -> Option<&Counter> {
        match s {
            Subject::User(i) => self.users.get(i as usize),
            Subject::Group(i) => self.groups.get(i as usize),
            Subject::Key(i) => self.keys.get(i as usize),
            Subject::Org => Some(&self.org),
        }
    }

    #[inline]
    fn get_mut(&mut self, s: Subject) -> &mut Counter {
        let (users, groups, keys) = (&mut self.users, &mut self.groups, &mut self.keys);
        subject_slot(&mut self.org, users, groups, keys, s)
    }
}

/// Spend of one subject on one day, added since the last checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayDelta {
    pub spend_micros: i64,
    pub requests: u64,
}

/// Spend, calls and tokens of one subject, day and model, added since the
/// last checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageDelta {
    pub spend_micros: i64,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl UsageDelta {
    pub fn add(&mut self, o: &UsageDelta) {
        self.spend_micros += o.spend_micros;
        self.requests += o.requests;
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
    }
}

/// A call's model (the index its month gave the pair, see [`Models`]) and
/// tokens.
#[derive(Debug, Clone, Copy)]
struct CallModel {
    model: u16,
    input_tokens: u64,
    output_tokens: u64,
}

/// One subject's deltas of one day: in all, and by model. A member's or a
/// key's calls mostly name one model: its delta lives in the slot itself
/// (no pointer to chase on the hot path); further models in a short list,
/// scanned (a scan beats a map at these sizes).
#[derive(Debug, Clone)]
struct DaySlot {
    delta: DayDelta,
    /// The model of `first`; [`NO_MODEL`] while there is none.
    first_model: u16,
    first: UsageDelta,
    more: Vec<(u16, UsageDelta)>,
}

/// No model index ([`crate::models::MODELS_MAX`] is far below it).
const NO_MODEL: u16 = u16::MAX - 1;

impl Default for DaySlot {
    fn default() -> Self {
        DaySlot {
            delta: DayDelta::default(),
            first_model: NO_MODEL,
            first: UsageDelta::default(),
            more: Vec::new(),
        }
    }
}

/// One org's spend: the months still open to late usage, the day deltas and
/// enforcement events not yet checkpointed.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Ascending by month; usually one or two.
    months: Vec<MonthLedger>,
    dirty: Vec<(Month, Subject)>,
    /// Ascending by day; usually one (today).
    days: Vec<DayLedger>,
    pending: Vec<Enforcement>,
}

/// One call being counted: its month and day, and where they were in the
/// ledger when it began (checked at each use: a slot that moved since, by a
/// newer call for an earlier day or a checkpoint, is looked up again).
#[derive(Debug, Clone, Copy)]
pub struct Call {
    month: Month,
    day: Day,
    month_at: usize,
    day_at: usize,
    occurred_at_ms: i64,
    /// Whether the call's month was over when the call was counted.
    closed: bool,
    /// Its model and tokens, for the breakdown; `None`: not broken down.
    model: Option<CallModel>,
}

impl Call {
    /// Marks the call as counted after its month ended, when the org's new
    /// month lift already ran for `rolled` (see [`Ledger::count`]).
    pub fn after_rollover(self, rolled: Option<Month>) -> Call {
        Call {
            closed: rolled.is_some_and(|r| r > self.month),
            ..self
        }
    }

    /// Breaks the call down under model index `model` (from
    /// [`Ledger::model_index`]) with its tokens.
    pub fn with_model(self, model: u16, input_tokens: u64, output_tokens: u64) -> Call {
        Call {
            model: Some(CallModel {
                model,
                input_tokens,
                output_tokens,
            }),
            ..self
        }
    }
}

/// One day's spend deltas since the last checkpoint, by subject index.
#[derive(Debug, Clone)]
struct DayLedger {
    day: Day,
    org: DaySlot,
    users: Vec<DaySlot>,
    groups: Vec<DaySlot>,
    keys: Vec<DaySlot>,
    /// Subjects with a delta, each once (its delta went from empty).
    touched: Vec<Subject>,
}

impl DayLedger {
    fn new(day: Day) -> DayLedger {
        DayLedger {
            day,
            org: DaySlot::default(),
            users: Vec::new(),
            groups: Vec::new(),
            keys: Vec::new(),
            touched: Vec::new(),
        }
    }

    #[inline]
    fn get_mut(&mut self, s: Subject) -> &mut DaySlot {
        let (users, groups, keys) = (&mut self.users, &mut self.groups, &mut self.keys);
        subject_slot(&mut self.org, users, groups, keys, s)
    }

    #[inline]
    fn add(&mut self, s: Subject, cost_micros: i64, model: Option<CallModel>) {
        let slot = self.get_mut(s);
        let first = slot.delta.requests == 0;
        slot.delta.spend_micros += cost_micros;
        slot.delta.requests += 1;
        if let Some(m) = model {
            let add = UsageDelta {
                spend_micros: cost_micros,
                requests: 1,
                input_tokens: m.input_tokens,
                output_tokens: m.output_tokens,
            };
            if slot.first_model == m.model {
                slot.first.add(&add);
            } else if slot.first_model == NO_MODEL {
                (slot.first_model, slot.first) = (m.model, add);
            } else {
                match slot.more.iter_mut().find(|(i, _)| *i == m.model) {
                    Some((_, u)) => u.add(&add),
                    None => slot.more.push((m.model, add)),
                }
            }
        }
        if first {
            self.touched.push(s);
        }
    }
}

/// A budget rule for one subject: its limit and the org's thresholds.
#[derive(Debug, Clone, Copy)]
pub struct Budget<'a> {
    pub limit_micros: Limit,
    pub thresholds_bps: &'a [u32],
}

impl Ledger {
    pub fn months(&self) -> &[MonthLedger] {
        &self.months
    }

    pub fn month(&self, month: Month) -> Option<&MonthLedger> {
        self.months.iter().rev().find(|m| m.month == month)
    }

    pub fn counter(&self, month: Month, s: Subject) -> Option<&Counter> {
        self.month(month)?.get(s)
    }

    fn month_mut(&mut self, month: Month) -> &mut MonthLedger {
        month_slot(&mut self.months, month)
    }

    /// Would adding `cost` to the org's month overflow? The org counter is
    /// the largest sum of all, so if it fits, every subject's does.
    pub fn would_overflow(&self, month: Month, cost_micros: i64) -> bool {
        let spend = self.month(month).map_or(0, |m| m.org.spend_micros);
        spend.checked_add(cost_micros).is_none()
    }

    /// Counts one call's cost for one subject and fires what it crosses.
    pub fn add(
        &mut self,
        s: Subject,
        occurred_at_ms: i64,
        cost_micros: i64,
        budget: Budget<'_>,
        logged_at_ms: i64,
    ) {
        self.add_call(
            Day::from_unix_ms(occurred_at_ms),
            occurred_at_ms,
            cost_micros,
            [(s, budget)].into_iter(),
            logged_at_ms,
        );
    }

    /// Counts one call's cost for each of its subjects (the org, the user,
    /// the key, the groups) and fires what each crosses. The month and day
    /// are worked out once for all of them: `day` is `occurred_at_ms`'s.
    pub fn add_call<'a>(
        &mut self,
        day: Day,
        occurred_at_ms: i64,
        cost_micros: i64,
        subjects: impl Iterator<Item = (Subject, Budget<'a>)>,
        logged_at_ms: i64,
    ) {
        let call = self.begin_call(day, occurred_at_ms);
        for (s, budget) in subjects {
            self.count(call, s, cost_micros, budget, logged_at_ms);
        }
    }

    /// Where one call's subjects are counted: see [`Ledger::count`].
    pub fn begin_call(&mut self, day: Day, occurred_at_ms: i64) -> Call {
        debug_assert_eq!(day, Day::from_unix_ms(occurred_at_ms));
        let month = day.month();
        Call {
            month,
            day,
            month_at: month_index(&mut self.months, month),
            day_at: day_index(&mut self.days, day),
            occurred_at_ms,
            closed: false,
            model: None,
        }
    }

    /// The index of (`model`, `provider`) in the breakdown of `call`'s
    /// month: see [`Models::index`].
    #[inline]
    pub fn model_index(&mut self, call: Call, model: &str, provider: &str, cap: u16) -> u16 {
        let month_at = match self.months.get(call.month_at) {
            Some(m) if m.month == call.month => call.month_at,
            _ => month_index(&mut self.months, call.month),
        };
        self.months[month_at].models.index(model, provider, cap)
    }

    /// The (model, provider) of index `i` in `month`'s breakdown.
    pub fn model_pair(&self, month: Month, i: u16) -> (&str, &str) {
        match self.months.iter().find(|m| m.month == month) {
            Some(m) => m.models.pair(i),
            None => (crate::models::OTHER, crate::models::OTHER),
        }
    }

    /// Indexes the pairs a checkpoint wrote for `month`'s breakdown.
    pub fn restore_models<'a>(
        &mut self,
        month: Month,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        self.month_mut(month).models.restore(pairs);
    }

    /// Counts a call (begun with [`Ledger::begin_call`]) for one subject and
    /// fires what it crosses. A cutoff of a month that is over (late usage
    /// counted after the new month's lift) is lifted at once, as the new
    /// month lifted the others — unless the subject is cut off in the new
    /// month too: a receiver is never left with a block that no longer
    /// applies, nor told of a lift while one does.
    pub fn count(
        &mut self,
        call: Call,
        s: Subject,
        cost_micros: i64,
        budget: Budget<'_>,
        logged_at_ms: i64,
    ) {
        let month_at = match self.months.get(call.month_at) {
            Some(m) if m.month == call.month => call.month_at,
            _ => month_index(&mut self.months, call.month),
        };
        let m = &mut self.months[month_at];
        let span = m.span;
        let c = m.get_mut(s);
        if !c.dirty {
            c.dirty = true;
            self.dirty.push((call.month, s));
        }
        // A counter with requests but no first day was written before
        // first days were kept: its spend may go back to the month's start.
        let day = call.day.day_of_month();
        if c.first_day == 0 {
            c.first_day = if c.requests == 0 { day } else { 1 };
        } else if day < c.first_day {
            c.first_day = day;
        }
        // Callers check `would_overflow` first; spend only grows.
        c.spend_micros += cost_micros;
        c.requests += 1;
        c.last_at_ms = c.last_at_ms.max(call.occurred_at_ms);
        if budget.limit_micros.is_some() || c.cut_off {
            let was_cut = c.cut_off;
            evaluate(
                c,
                s,
                span,
                budget,
                logged_at_ms,
                LiftReason::LimitRaised,
                &mut self.pending,
            );
            if call.closed && c.cut_off && !was_cut {
                let (next, cut) = (call.month.next(), c.ordinal);
                if !self.counter(next, s).is_some_and(|n| n.cut_off) {
                    self.lift_for_new_month(s, next, logged_at_ms.max(next.start_ms()), cut);
                }
            }
        }
        let day_at = match self.days.get(call.day_at) {
            Some(d) if d.day == call.day => call.day_at,
            _ => day_index(&mut self.days, call.day),
        };
        self.days[day_at].add(s, cost_micros, call.model);
    }

    /// Re-evaluates a subject after its limit changed, in the month of the
    /// change and later ones (a month that has ended keeps its verdicts),
    /// and none before `rolled`, the month the meter has begun.
    pub fn limit_changed(
        &mut self,
        s: Subject,
        budget: Budget<'_>,
        at_ms: i64,
        rolled: Option<Month>,
    ) {
        let reason = if budget.limit_micros.is_some() {
            LiftReason::LimitRaised
        } else {
            LiftReason::LimitRemoved
        };
        // Months before the one the meter has begun are closed: a cutoff
        // there would block nothing and never be lifted.
        let month = Month::from_unix_ms(at_ms);
        let from = rolled.map_or(month, |r| month.max(r));
        let months: Vec<Month> = self
            .months
            .iter()
            .map(|m| m.month)
            .filter(|m| *m >= from)
            .collect();
        for month in months {
            let Some(before) = self.counter(month, s).copied() else {
                continue;
            };
            let mut c = before;
            let span = MonthSpan::of(month);
            evaluate(&mut c, s, span, budget, at_ms, reason, &mut self.pending);
            if c != before {
                let slot = counter_slot(&mut self.months, &mut self.dirty, month, s);
                *slot = Counter { dirty: true, ..c };
            }
        }
    }

    /// A new month lifts every cutoff of the month before: records that for
    /// each subject cut off at the end of `month.prev()` and not in `month`.
    pub fn new_month(&mut self, month: Month, at_ms: i64) {
        let Some(prev) = self.month(month.prev()) else {
            return;
        };
        let mut lifted = Vec::new();
        let cut = |c: &Counter| c.cut_off;
        if cut(&prev.org) {
            lifted.push((Subject::Org, prev.org));
        }
        for (i, c) in prev.users.iter().enumerate().filter(|(_, c)| cut(c)) {
            lifted.push((Subject::User(i as u32), *c));
        }
        for (i, c) in prev.groups.iter().enumerate().filter(|(_, c)| cut(c)) {
            lifted.push((Subject::Group(i as u32), *c));
        }
        for (i, c) in prev.keys.iter().enumerate().filter(|(_, c)| cut(c)) {
            lifted.push((Subject::Key(i as u32), *c));
        }
        // Usage of `month` counted before it began may have cut a subject
        // off in it already: no lift would apply.
        for (subject, _) in lifted {
            if !self.counter(month, subject).is_some_and(|c| c.cut_off) {
                self.lift_for_new_month(subject, month, at_ms, 0);
            }
        }
    }

    /// `month`'s lift of a cutoff `s` had in the month before: the one it
    /// had when that month ended (`cut_ordinal` 0), or one that late usage
    /// decided after it ended, named by that cutoff's ordinal. A closed
    /// month can be cut off late more than once (late usage under a raised
    /// limit lifts it, later late usage cuts it again), and each such lift
    /// needs a key of its own: a cutoff's ordinal is odd, and `month`'s own
    /// lifts have even ones, so none is shared.
    fn lift_for_new_month(&mut self, s: Subject, month: Month, at_ms: i64, cut_ordinal: u32) {
        let spend_micros = self.counter(month, s).map_or(0, |c| c.spend_micros);
        self.pending.push(Enforcement {
            subject: s,
            month,
            at_ms,
            spend_micros,
            limit_micros: None,
            ordinal: cut_ordinal,
            kind: EnforcementKind::CutoffLifted {
                reason: LiftReason::NewMonth,
            },
        });
    }

    /// Forgets everything: counters, unsaved changes, pending events.
    pub fn clear(&mut self) {
        *self = Ledger::default();
    }

    /// Brings a counter back from a checkpoint (or mirrors one published by
    /// the process that meters the org).
    pub fn restore(&mut self, month: Month, s: Subject, c: Counter) {
        *self.month_mut(month).get_mut(s) = Counter { dirty: false, ..c };
    }

    /// The counters changed since the last call (each once), the day deltas
    /// and the enforcement events, for a checkpoint.
    pub fn take_changes(&mut self) -> LedgerChanges {
        let mut counters = Vec::with_capacity(self.dirty.len());
        for (month, s) in std::mem::take(&mut self.dirty) {
            let c = self.month_mut(month).get_mut(s);
            c.dirty = false;
            counters.push((month, s, *c));
        }
        let mut days = Vec::new();
        let mut usage = Vec::new();
        for l in &mut self.days {
            for s in std::mem::take(&mut l.touched) {
                // The model list keeps its memory for the subject's next
                // call, as the day's slots do.
                let day = l.day;
                let slot = l.get_mut(s);
                days.push(((s, day), std::mem::take(&mut slot.delta)));
                if slot.first_model != NO_MODEL {
                    let first = std::mem::replace(&mut slot.first_model, NO_MODEL);
                    usage.push(((s, day), first, std::mem::take(&mut slot.first)));
                }
                usage.extend(slot.more.drain(..).map(|(m, u)| ((s, day), m, u)));
            }
        }
        // Today's deltas keep their memory for the next interval.
        if self.days.len() > 1 {
            let newest = self.days.len() - 1;
            let _ = self.days.drain(..newest);
        }
        LedgerChanges {
            counters,
            days,
            usage,
            enforcement: std::mem::take(&mut self.pending),
        }
    }

    pub fn pending_enforcement(&self) -> &[Enforcement] {
        &self.pending
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.pending.is_empty()
    }

    /// Drops months before `month` that hold nothing unsaved.
    pub fn forget_before(&mut self, month: Month) {
        let dirty = &self.dirty;
        self.months
            .retain(|m| m.month >= month || dirty.iter().any(|(d, _)| *d == m.month));
    }
}

fn month_slot(months: &mut Vec<MonthLedger>, month: Month) -> &mut MonthLedger {
    let at = month_index(months, month);
    &mut months[at]
}

/// The index of `month` in `months`, inserted when missing. The newest is
/// checked first: that is where usage goes.
/// Subject `s`'s slot among values kept per kind, by index: the vector of
/// its kind grows to hold it.
#[inline]
fn subject_slot<'a, T: Clone + Default>(
    org: &'a mut T,
    users: &'a mut Vec<T>,
    groups: &'a mut Vec<T>,
    keys: &'a mut Vec<T>,
    s: Subject,
) -> &'a mut T {
    let (v, i) = match s {
        Subject::Org => return org,
        Subject::User(i) => (users, i),
        Subject::Group(i) => (groups, i),
        Subject::Key(i) => (keys, i),
    };
    let i = i as usize;
    if v.len() <= i {
        v.resize(i + 1, T::default());
    }
    &mut v[i]
}

fn month_index(months: &mut Vec<MonthLedger>, month: Month) -> usize {
    if let Some(last) = months.last()
        && last.month == month
    {
        return months.len() - 1;
    }
    let at = months.partition_point(|m| m.month < month);
    if months.get(at).is_none_or(|m| m.month != month) {
        months.insert(at, MonthLedger::new(month));
    }
    at
}

fn day_index(days: &mut Vec<DayLedger>, day: Day) -> usize {
    if let Some(last) = days.last()
        && last.day == day
    {
        return days.len() - 1;
    }
    let at = days.partition_point(|d| d.day < day);
    if days.get(at).is_none_or(|d| d.day != day) {
        days.insert(at, DayLedger::new(day));
    }
    at
}

/// The counter of `s` in `month`, created when missing and marked dirty.
fn counter_slot<'a>(
    months: &'a mut Vec<MonthLedger>,
    dirty: &mut Vec<(Month, Subject)>,
    month: Month,
    s: Subject,
) -> &'a mut Counter {
    let c = month_slot(months, month).get_mut(s);
    if !c.dirty {
        c.dirty = true;
        dirty.push((month, s));
    }
    c
}

#[derive(Debug, Clone, Default)]
pub struct LedgerChanges {
    pub counters: Vec<(Month, Subject, Counter)>,
    pub days: Vec<((Subject, Day), DayDelta)>,
    /// By model: the index its day's month gave the pair.
    pub usage: Vec<((Subject, Day), u16, UsageDelta)>,
    pub enforcement: Vec<Enforcement>,
}

/// Fires the forecast alert when the projection first reaches the limit,
/// fires the thresholds the counter has reached, and flips its cutoff when
/// spend crossed the limit (either way), as of `at_ms` (a call's logged
/// time, a limit change's).
///
/// The projection is judged as of `at_ms`, or of the counter's last
/// judgement when that is later: never as of an earlier time, which would
/// project the same spend over fewer days (a restart re-judges as of the
/// org's last limit change, which may be weeks old; a change may be folded
/// late). A late call is judged when it was logged, not when it happened.
fn evaluate(
    c: &mut Counter,
    subject: Subject,
    span: MonthSpan,
    budget: Budget<'_>,
    at_ms: i64,
    lift_reason: LiftReason,
    out: &mut Vec<Enforcement>,
) {
    let month = span.month;
    let event = |c: &Counter, ordinal, kind| Enforcement {
        subject,
        month,
        at_ms,
        spend_micros: c.spend_micros,
        limit_micros: budget.limit_micros,
        ordinal,
        kind,
    };
    if let Some(limit) = budget.limit_micros {
        // The same inputs on every replay. Between two calls the projection
        // only falls (time passes, spend stays), so judging at each call
        // and limit change finds the first time it reaches the limit.
        // Only spend is projected: a subject without usage stays as it is
        // (its slot may exist for a neighbour's sake, and is not written).
        if c.requests > 0 {
            c.judged_s = c.judged_s.max(span.seconds_into(at_ms));
        }
        let now = span.at_seconds(c.judged_s);
        if !c.forecast_fired && span.reaches(c.spend_micros, c.first_day, limit, now) {
            let f = c.forecast(month, budget.limit_micros, now);
            if let Some(limit_day) = f.limit_day {
                c.forecast_fired = true;
                out.push(event(
                    c,
                    0,
                    EnforcementKind::ForecastOverLimit {
                        projected_micros: f.projected_micros,
                        limit_day,
                    },
                ));
            }
        }
        for &t in budget.thresholds_bps {
            if t > u32::from(c.fired_bps) && reached(c.spend_micros, limit, t) {
                c.fired_bps = u16::try_from(t).expect("thresholds are at most 10 000 bps");
                out.push(event(
                    c,
                    0,
                    EnforcementKind::ThresholdCrossed { threshold_bps: t },
                ));
            }
        }
    }
    let cut = budget.limit_micros.is_some_and(|l| c.spend_micros >= l);
    if cut != c.cut_off {
        c.cut_off = cut;
        c.ordinal = c.ordinal.saturating_add(1);
        let kind = if cut {
            EnforcementKind::CutOff
        } else {
            EnforcementKind::CutoffLifted {
                reason: lift_reason,
            }
        };
        out.push(event(c, c.ordinal, kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EnforcementKind::ForecastOverLimit;

    const T: [u32; 3] = [5000, 8000, 10000];
    const NOV: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z

    fn budget(limit: i64) -> Budget<'static> {
        Budget {
            limit_micros: Some(limit),
            thresholds_bps: &T,
        }
    }

    /// The thresholds, cutoffs and lifts fired since the last call (the
    /// forecast alert has tests of its own).
    fn kinds(l: &mut Ledger) -> Vec<EnforcementKind> {
        l.take_changes()
            .enforcement
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| !matches!(k, EnforcementKind::ForecastOverLimit { .. }))
            .collect()
    }

    #[test]
    fn thresholds_fire_once_in_order_then_the_cutoff() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        l.add(u, NOV, 49, budget(100), NOV);
        assert_eq!(kinds(&mut l), vec![]);
        l.add(u, NOV, 40, budget(100), NOV);
        assert_eq!(
            kinds(&mut l),
            vec![
                EnforcementKind::ThresholdCrossed {
                    threshold_bps: 5000
                },
                EnforcementKind::ThresholdCrossed {
                    threshold_bps: 8000
                },
            ]
        );
        l.add(u, NOV, 5, budget(100), NOV);
        assert_eq!(kinds(&mut l), vec![]);
        l.add(u, NOV, 6, budget(100), NOV);
        assert_eq!(
            kinds(&mut l),
            vec![
                EnforcementKind::ThresholdCrossed {
                    threshold_bps: 10000
                },
                EnforcementKind::CutOff,
            ]
        );
        l.add(u, NOV, 6, budget(100), NOV);
        assert_eq!(kinds(&mut l), vec![]);
        assert!(l.counter(Month::from_unix_ms(NOV), u).unwrap().cut_off);
    }

    /// Each cutoff and lift of a subject's month has a key of its own, the
    /// 65 536th too (a u16 ordinal saturated: later cutoffs all had 65 535,
    /// so the store and receivers dropped them; review of issue 13).
    #[test]
    fn ordinals_never_run_out_within_a_month() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        l.restore(
            Month::from_unix_ms(NOV),
            u,
            Counter::restored(0, 0, NOV, 0, false, 65_534),
        );
        let mut ordinals = Vec::new();
        // Cut off, lifted by a raised limit, cut off again.
        for (cost, limit) in [(20, 10), (1, 1_000), (1_000, 1_000)] {
            l.add(u, NOV, cost, budget(limit), NOV);
            let ch = l.take_changes();
            ordinals.extend(
                ch.enforcement
                    .iter()
                    .filter(|e| {
                        matches!(
                            e.kind,
                            EnforcementKind::CutOff | EnforcementKind::CutoffLifted { .. }
                        )
                    })
                    .map(|e| u64::from(e.ordinal)),
            );
        }
        assert_eq!(ordinals, [65_535, 65_536, 65_537]);
    }

    fn forecasts(l: &mut Ledger) -> Vec<(Subject, i64, EnforcementKind)> {
        l.take_changes()
            .enforcement
            .into_iter()
            .filter(|e| matches!(e.kind, EnforcementKind::ForecastOverLimit { .. }))
            .map(|e| (e.subject, e.at_ms, e.kind))
            .collect()
    }

    const DAY: i64 = 86_400_000;
    const USD: i64 = 1_000_000;

    /// $2 a day projects $60 of a $100 limit; a $30 spike at noon of the
    /// 11th projects $142.86 and fires the alert, once; later spend fires
    /// nothing more, nor does a replay from a checkpoint taken after it.
    #[test]
    fn the_forecast_alert_fires_once_when_the_projection_first_reaches_the_limit() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        let nov = Month::from_unix_ms(NOV);
        for d in 0..10 {
            let at = NOV + d * DAY + DAY / 2;
            l.add(u, at, 2 * USD, budget(100 * USD), at);
        }
        assert_eq!(forecasts(&mut l), vec![]);
        let c = *l.counter(nov, u).unwrap();
        assert_eq!((c.first_day, c.forecast_fired), (1, false));
        let eleventh = NOV + 10 * DAY + DAY / 2;
        assert_eq!(
            c.forecast(nov, Some(100 * USD), eleventh).projected_micros,
            20 * USD + 20 * USD * 39 / 21
        );
        l.add(u, eleventh, 30 * USD, budget(100 * USD), eleventh);
        let spiked = ForecastOverLimit {
            projected_micros: 50 * USD + 50 * USD * 39 / 21,
            // The $50 left take 10.5 days at $4.76 a day.
            limit_day: Day::from_yyyymmdd(20261122).unwrap(),
        };
        assert_eq!(forecasts(&mut l), vec![(u, eleventh, spiked)]);
        let c = *l.counter(nov, u).unwrap();
        assert!(c.forecast_fired);
        l.add(u, eleventh + 1, 40 * USD, budget(100 * USD), eleventh + 1);
        assert_eq!(forecasts(&mut l), vec![], "once a month");
        // A replay from a checkpoint taken after it fires nothing.
        let mut r = Ledger::default();
        r.restore(nov, u, c);
        r.add(u, eleventh + 1, 40 * USD, budget(100 * USD), eleventh + 1);
        assert_eq!(forecasts(&mut r), vec![]);
        // One from before it fires the same event again (the store keeps
        // one: same subject, month and kind).
        let mut r = Ledger::default();
        r.restore(
            nov,
            u,
            Counter::restored(20 * USD, 10, NOV, 0, false, 0).with_forecast(1, false, 0),
        );
        r.add(u, eleventh, 30 * USD, budget(100 * USD), eleventh);
        assert_eq!(forecasts(&mut r), vec![(u, eleventh, spiked)]);
        // December starts over.
        let dec = nov.next().start_ms();
        l.add(u, dec, 90 * USD, budget(100 * USD), dec);
        assert_eq!(forecasts(&mut l).len(), 1);
    }

    /// A backlog a gateway flushes weeks late, into a quiet counter, is
    /// judged when it is logged, not as of when its calls happened (which
    /// would project its spend over a day or two); late usage of a month
    /// that has ended projects no time left (review of the forecast).
    #[test]
    fn late_usage_is_judged_when_it_is_logged() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        let (nov2, nov25) = (NOV + DAY + DAY / 2, NOV + 24 * DAY);
        l.add(u, nov2, USD, budget(100 * USD), nov2);
        // $20 of Nov 2 logged on the 25th: $21 since the 2nd, $26.48 by
        // month-end.
        l.add(u, nov2 + 3_600_000, 20 * USD, budget(100 * USD), nov25);
        assert_eq!(forecasts(&mut l), vec![]);
        // November's last hour, logged in December: $99.99 of $100 projects
        // $99.99 (an hour left would have projected $100.13).
        let mut l = Ledger::default();
        let nov = Month::from_unix_ms(NOV);
        let nov30 = NOV + 29 * DAY;
        l.restore(
            nov,
            u,
            Counter::restored(95 * USD, 29, nov30, 0, false, 0).with_forecast(1, false, 0),
        );
        let dec = nov.next().start_ms();
        l.add(
            u,
            dec - 3_600_000,
            4_990_000,
            budget(100 * USD),
            dec + 1_800_000,
        );
        assert_eq!(forecasts(&mut l), vec![]);
    }

    /// A limit change leaves a subject without usage untouched: its slot
    /// (there for a later index's sake) is not written, nor shown active.
    #[test]
    fn a_limit_change_leaves_a_subject_without_usage_untouched() {
        let mut l = Ledger::default();
        l.add(Subject::User(1), NOV, USD, budget(100 * USD), NOV);
        let _ = l.take_changes();
        l.limit_changed(Subject::User(0), budget(50 * USD), NOV + DAY, None);
        let ch = l.take_changes();
        assert!(
            ch.counters.is_empty() && ch.enforcement.is_empty(),
            "{ch:?}"
        );
    }

    /// A counter written before first days were kept (requests, no first
    /// day) starts its run-rate at the month's start, not at its next call.
    #[test]
    fn a_counter_without_a_first_day_counts_from_the_months_start() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        let nov = Month::from_unix_ms(NOV);
        l.restore(nov, u, Counter::restored(60 * USD, 19, NOV, 0, false, 0));
        let twentieth = NOV + 19 * DAY;
        l.add(u, twentieth, USD, budget(100 * USD), twentieth);
        assert_eq!(l.counter(nov, u).unwrap().first_day, 1);
        // $61 over 19 days: $96.31 by month-end, under $100.
        assert_eq!(forecasts(&mut l), vec![]);
    }

    /// The run-rate starts at the first day with usage, the earliest even
    /// when it is counted late; a lowered limit is judged at the change.
    #[test]
    fn the_forecast_starts_at_the_first_day_and_a_lowered_limit_fires_it() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        let nov = Month::from_unix_ms(NOV);
        let (d20, d21) = (NOV + 19 * DAY, NOV + 20 * DAY);
        l.add(u, d21, 10 * USD, budget(1_000 * USD), d21);
        assert_eq!(l.counter(nov, u).unwrap().first_day, 21);
        l.add(u, d20, 10 * USD, budget(1_000 * USD), d21 + 1);
        assert_eq!(l.counter(nov, u).unwrap().first_day, 20);
        assert_eq!(forecasts(&mut l), vec![]);
        // $20 since the 20th, at the start of the 22nd: $10 a day, $110.
        let d22 = NOV + 21 * DAY;
        l.limit_changed(u, budget(110 * USD), d22, None);
        let at_limit = ForecastOverLimit {
            projected_micros: 110 * USD,
            limit_day: Day::from_yyyymmdd(20261130).unwrap(),
        };
        assert_eq!(forecasts(&mut l), vec![(u, d22, at_limit)]);
        l.limit_changed(u, budget(50 * USD), d22 + 1, None);
        assert_eq!(forecasts(&mut l), vec![], "once a month");
    }

    #[test]
    fn raising_the_limit_lifts_the_cutoff_and_lowering_it_cuts_again() {
        let mut l = Ledger::default();
        let u = Subject::User(3);
        l.add(u, NOV, 100, budget(100), NOV);
        let _ = l.take_changes();
        l.limit_changed(u, budget(200), NOV + 1, None);
        let ch = l.take_changes();
        assert_eq!(ch.enforcement.len(), 1);
        assert_eq!(
            ch.enforcement[0].kind,
            EnforcementKind::CutoffLifted {
                reason: LiftReason::LimitRaised
            }
        );
        assert_eq!(ch.enforcement[0].ordinal, 2);
        assert_eq!(ch.counters.len(), 1);
        l.limit_changed(u, budget(50), NOV + 2, None);
        assert_eq!(kinds(&mut l), vec![EnforcementKind::CutOff]);
        l.limit_changed(
            u,
            Budget {
                limit_micros: None,
                thresholds_bps: &T,
            },
            NOV + 3,
            None,
        );
        assert_eq!(
            kinds(&mut l),
            vec![EnforcementKind::CutoffLifted {
                reason: LiftReason::LimitRemoved
            }]
        );
    }

    #[test]
    fn each_month_counts_alone_and_a_new_month_lifts_cutoffs() {
        let mut l = Ledger::default();
        let u = Subject::User(0);
        let dec = Month::from_unix_ms(NOV).next().start_ms();
        l.add(u, NOV, 100, budget(100), NOV);
        l.add(u, dec, 30, budget(100), dec);
        // A late November event still counts in November.
        l.add(u, dec - 1, 7, budget(100), dec + 5);
        let nov = Month::from_unix_ms(NOV);
        assert_eq!(l.counter(nov, u).unwrap().spend_micros, 107);
        assert_eq!(l.counter(nov.next(), u).unwrap().spend_micros, 30);
        assert!(!l.counter(nov.next(), u).unwrap().cut_off);
        let _ = l.take_changes();
        l.new_month(nov.next(), dec + 10);
        let e = l.take_changes().enforcement;
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].kind,
            EnforcementKind::CutoffLifted {
                reason: LiftReason::NewMonth
            }
        );
        assert_eq!(e[0].month, nov.next());
    }

    #[test]
    fn checkpoint_changes_list_each_dirty_counter_once_with_day_deltas() {
        let mut l = Ledger::default();
        for _ in 0..3 {
            l.add(
                Subject::Org,
                NOV,
                10,
                Budget {
                    limit_micros: None,
                    thresholds_bps: &T,
                },
                NOV,
            );
        }
        l.add(Subject::Key(1), NOV + 86_400_000, 5, budget(1000), NOV);
        let ch = l.take_changes();
        assert_eq!(ch.counters.len(), 2);
        assert_eq!(ch.days.len(), 2);
        let org_day = ch
            .days
            .iter()
            .find(|((s, _), _)| *s == Subject::Org)
            .unwrap();
        assert_eq!(
            org_day.1,
            DayDelta {
                spend_micros: 30,
                requests: 3
            }
        );
        assert!(!l.has_changes());
        assert!(l.take_changes().counters.is_empty());
    }

    #[test]
    fn a_call_counts_on_its_own_day_and_month_after_earlier_ones_were_inserted() {
        let mut l = Ledger::default();
        let dec = NOV + 30 * 86_400_000;
        let late = l.begin_call(Day::from_unix_ms(dec), dec);
        // A call for an earlier day and month moves the first one's slots.
        let early = l.begin_call(Day::from_unix_ms(NOV), NOV);
        l.count(early, Subject::Org, 1, budget(1_000), NOV);
        l.count(late, Subject::Org, 10, budget(1_000), dec);
        let dec_month = Month::from_unix_ms(dec);
        assert_eq!(l.counter(dec_month, Subject::Org).unwrap().spend_micros, 10);
        assert_eq!(
            l.counter(Month::from_unix_ms(NOV), Subject::Org)
                .unwrap()
                .spend_micros,
            1
        );
        let mut days = l.take_changes().days;
        days.sort_by_key(|((_, d), _)| *d);
        let spend: Vec<(Day, i64)> = days
            .iter()
            .map(|((_, d), x)| (*d, x.spend_micros))
            .collect();
        assert_eq!(
            spend,
            vec![(Day::from_unix_ms(NOV), 1), (Day::from_unix_ms(dec), 10)]
        );
    }
}
