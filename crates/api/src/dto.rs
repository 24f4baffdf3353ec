//! The JSON shapes of the API (architecture brief, "Contracts"). Money is
//! integer micro-USD (`*_micros`), times are RFC 3339, fractions are JSON
//! numbers computed from exact integers.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tally_core::entity::LimitSource;
use tally_core::ledger::SubjectKind;
use tally_core::ratio::{format_bps, parse_fraction_bps, utilization};
use tally_core::time::{Day, Month};
use tally_engine::Engine;
use tally_proto::format_rfc3339_ms;
use tally_store::query::{GroupRow, KeyRow, OrgRow, PeriodSpend, UserRow};

use crate::error::ApiError;

/// Basis points shown as a fraction: 8000 → `0.8`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fraction(pub u32);

impl utoipa::PartialSchema for Fraction {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Number)
            .description(Some("a fraction of a limit, e.g. 0.8 for 80 %"))
            .into()
    }
}

impl utoipa::ToSchema for Fraction {}

/// One entry of the audit trail: `org_id`, `seq`, `at`, `actor`, `type` and
/// the fields of that type of event.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub(crate) struct EventJson(pub(crate) serde_json::Value);

impl utoipa::PartialSchema for EventJson {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::ObjectBuilder;
        use utoipa::openapi::schema::Type;
        let string = || ObjectBuilder::new().schema_type(Type::String);
        ObjectBuilder::new()
            .property("org_id", string().description(Some("The org.")))
            .property(
                "seq",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some(
                        "Its position in the org's log: 1, 2, 3 … without gaps.",
                    )),
            )
            .property("at", string().description(Some("When (RFC 3339).")))
            .property(
                "actor",
                string().description(Some("operator, or token:<id>")),
            )
            .property(
                "type",
                string().description(Some("org_created, user_added, …")),
            )
            .required("org_id")
            .required("seq")
            .required("at")
            .required("actor")
            .required("type")
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(true),
            ))
            .into()
    }
}

impl utoipa::ToSchema for EventJson {}

impl Serialize for Fraction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n: serde_json::Number = format_bps(self.0)
            .parse()
            .map_err(serde::ser::Error::custom)?;
        n.serialize(s)
    }
}

/// Parses fractions as written in JSON, exactly (`0.8` → 8000 bps).
pub(crate) fn fractions_to_bps(v: &[serde_json::Number]) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|n| parse_fraction_bps(&n.to_string()).map_err(|e| ApiError::invalid(e.to_string())))
        .collect()
}

/// For PATCH fields: absent → `None`, `null` → `Some(None)`, value →
/// `Some(Some(v))`. Use with `#[serde(default)]`.
pub(crate) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

pub(crate) fn time(ms: i64) -> String {
    format_rfc3339_ms(ms)
}

pub(crate) fn cut_off(spend: i64, limit: Option<i64>) -> bool {
    limit.is_some_and(|l| spend >= l)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OrgJson {
    /// The org's id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// The monthly limit new members get, in micro-USD; `null`: unlimited.
    pub default_monthly_limit_micros: Option<i64>,
    /// Fractions of a limit at which crossings are announced.
    pub alert_thresholds: Vec<Fraction>,
    /// The org's own limit on its total spend; `null`: none.
    pub monthly_limit_micros: Option<i64>,
    /// Everyone's spend this month, in micro-USD.
    pub spend_micros: i64,
    /// What live holds (calls in flight) hold on it.
    pub held_micros: i64,
    /// Spend over the org limit; `null` without one.
    pub utilization: Option<f64>,
    /// Whether everyone's spend together reached the org limit this month.
    pub cut_off: bool,
    /// Month-end spend at the run-rate since the first day with usage this
    /// month, in micro-USD (docs/usage.md, Forecasts).
    pub projected_micros: i64,
    /// The UTC day (`2026-12-20`) spend reaches the limit at that rate,
    /// today when it has; `null` without a limit or when the projection
    /// stays under it.
    pub projected_limit_date: Option<String>,
    /// Where the run-rate starts: the day of the month of the first usage.
    #[serde(skip)]
    pub first_day: u8,
    /// Calls counted this month.
    pub requests: i64,
    /// The month the figures are for (`2026-12`, UTC).
    pub month: String,
    /// Where threshold and cutoff notifications go; `null`: nowhere.
    pub webhook_url: Option<String>,
    /// When it was created.
    pub created_at: String,
}

impl OrgJson {
    pub(crate) fn new(r: OrgRow, month: Month) -> OrgJson {
        OrgJson {
            id: r.id,
            name: r.name,
            default_monthly_limit_micros: r.default_monthly_limit_micros,
            alert_thresholds: r.alert_thresholds_bps.into_iter().map(Fraction).collect(),
            monthly_limit_micros: r.monthly_limit_micros,
            spend_micros: r.spend_micros,
            held_micros: 0,
            utilization: utilization(r.spend_micros, r.monthly_limit_micros),
            cut_off: cut_off(r.spend_micros, r.monthly_limit_micros),
            projected_micros: r.spend_micros,
            projected_limit_date: None,
            first_day: r.first_day,
            requests: r.requests,
            month: month.to_string(),
            webhook_url: r.webhook.map(|w| w.url),
            created_at: time(r.created_at_ms),
        }
    }
}

/// An org in the operator's list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OrgListJson {
    /// The org's id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// Its members (not removed).
    pub member_count: i64,
    /// Everyone's spend this month, in micro-USD (held spend: the org's
    /// own detail).
    pub spend_micros: i64,
    /// Calls counted this month.
    pub requests: i64,
    /// The org's own monthly limit in micro-USD; `null`: none.
    pub monthly_limit_micros: Option<i64>,
    /// The monthly limit new members get, in micro-USD; `null`: unlimited.
    pub default_monthly_limit_micros: Option<i64>,
    /// Spend over the org limit; `null` without one.
    pub utilization: Option<f64>,
    /// Whether everyone's spend together reached the org limit this month.
    pub cut_off: bool,
    /// The month the figures are for (`2026-12`, UTC).
    pub month: String,
    /// When it was created.
    pub created_at: String,
}

/// Where a member's monthly limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LimitSourceJson {
    /// Set for them (on joining or later), or set before sources were
    /// recorded.
    Own,
    /// The org's default, copied when they joined or when their limit was
    /// reset to it; a later change of the default does not move it.
    OrgDefault,
}

impl LimitSourceJson {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitSourceJson::Own => "own",
            LimitSourceJson::OrgDefault => "org_default",
        }
    }
}

/// What an org's webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WebhookFormatJson {
    /// Tally's JSON event (docs/webhooks.md).
    #[default]
    Tally,
    /// A Slack incoming-webhook message, `{"text": …}`, linking the
    /// subject's console page where the server knows its public URL.
    Slack,
}

impl From<WebhookFormatJson> for tally_core::entity::WebhookFormat {
    fn from(f: WebhookFormatJson) -> Self {
        match f {
            WebhookFormatJson::Tally => tally_core::entity::WebhookFormat::Tally,
            WebhookFormatJson::Slack => tally_core::entity::WebhookFormat::Slack,
        }
    }
}

impl From<tally_core::entity::WebhookFormat> for WebhookFormatJson {
    fn from(f: tally_core::entity::WebhookFormat) -> Self {
        match f {
            tally_core::entity::WebhookFormat::Tally => WebhookFormatJson::Tally,
            tally_core::entity::WebhookFormat::Slack => WebhookFormatJson::Slack,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UserJson {
    /// The member's id.
    pub id: String,
    /// Their email address.
    pub email: String,
    /// Their display name.
    pub name: String,
    /// `invited`, `active`, `suspended` or `removed`.
    pub status: String,
    /// The groups they belong to.
    pub groups: Vec<String>,
    /// Their monthly limit in micro-USD; `null`: unlimited.
    pub monthly_limit_micros: Option<i64>,
    /// Where the limit comes from.
    pub limit_source: LimitSourceJson,
    /// Their spend this month, in micro-USD.
    pub spend_micros: i64,
    /// What live holds (calls in flight) hold on it.
    pub held_micros: i64,
    /// Spend over limit (1.0 at the limit); `null` without a limit.
    pub utilization: Option<f64>,
    /// Whether their spend reached their limit this month (authorize refuses them).
    pub cut_off: bool,
    /// Month-end spend at the run-rate since the first day with usage this
    /// month, in micro-USD (docs/usage.md, Forecasts).
    pub projected_micros: i64,
    /// The UTC day (`2026-12-20`) spend reaches the limit at that rate,
    /// today when it has; `null` without a limit or when the projection
    /// stays under it.
    pub projected_limit_date: Option<String>,
    /// Where the run-rate starts: the day of the month of the first usage.
    #[serde(skip)]
    pub first_day: u8,
    /// Their latest counted call (null: none).
    pub last_active_at: Option<String>,
    /// Calls counted this month.
    pub requests: i64,
    /// When they were added.
    pub created_at: String,
}

impl From<UserRow> for UserJson {
    fn from(u: UserRow) -> UserJson {
        UserJson {
            utilization: utilization(u.spend_micros, u.monthly_limit_micros),
            cut_off: cut_off(u.spend_micros, u.monthly_limit_micros),
            id: u.id,
            email: u.email,
            name: u.name,
            status: u.status,
            groups: u.groups,
            monthly_limit_micros: u.monthly_limit_micros,
            limit_source: match u.limit_source {
                LimitSource::Own => LimitSourceJson::Own,
                LimitSource::OrgDefault => LimitSourceJson::OrgDefault,
            },
            spend_micros: u.spend_micros,
            held_micros: 0,
            projected_micros: u.spend_micros,
            projected_limit_date: None,
            first_day: u.first_day,
            last_active_at: u.last_active_at_ms.map(time),
            requests: u.requests,
            created_at: time(u.created_at_ms),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GroupJson {
    /// The group's id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// Its members.
    pub member_count: i64,
    /// Its monthly limit in micro-USD; `null`: unlimited.
    pub monthly_limit_micros: Option<i64>,
    /// Its members' spend through it this month, in micro-USD.
    pub spend_micros: i64,
    /// What live holds (calls in flight) hold on it.
    pub held_micros: i64,
    /// Spend over limit (1.0 at the limit); `null` without a limit.
    pub utilization: Option<f64>,
    /// Whether its spend reached its limit this month (its members' calls are refused).
    pub cut_off: bool,
    /// Month-end spend at the run-rate since the first day with usage this
    /// month, in micro-USD (docs/usage.md, Forecasts).
    pub projected_micros: i64,
    /// The UTC day (`2026-12-20`) spend reaches the limit at that rate,
    /// today when it has; `null` without a limit or when the projection
    /// stays under it.
    pub projected_limit_date: Option<String>,
    /// Where the run-rate starts: the day of the month of the first usage.
    #[serde(skip)]
    pub first_day: u8,
    /// Calls counted this month.
    pub requests: i64,
    /// When it was created.
    pub created_at: String,
}

impl From<GroupRow> for GroupJson {
    fn from(g: GroupRow) -> GroupJson {
        GroupJson {
            utilization: utilization(g.spend_micros, g.monthly_limit_micros),
            cut_off: cut_off(g.spend_micros, g.monthly_limit_micros),
            id: g.id,
            name: g.name,
            member_count: g.member_count,
            monthly_limit_micros: g.monthly_limit_micros,
            spend_micros: g.spend_micros,
            held_micros: 0,
            projected_micros: g.spend_micros,
            projected_limit_date: None,
            first_day: g.first_day,
            requests: g.requests,
            created_at: time(g.created_at_ms),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct KeyJson {
    /// The key's id.
    pub id: String,
    /// What it is for.
    pub name: String,
    /// Its owner (null: a key of its groups only).
    pub user_id: Option<String>,
    /// Groups its spend also counts against.
    pub group_ids: Vec<String>,
    /// Features authorize allows it.
    pub features: Vec<String>,
    /// Its own monthly limit in micro-USD; `null`: unlimited.
    pub monthly_limit_micros: Option<i64>,
    /// Its spend this month, in micro-USD.
    pub spend_micros: i64,
    /// What live holds (calls in flight) hold on it.
    pub held_micros: i64,
    /// Whether its spend reached its limit this month.
    pub cut_off: bool,
    /// Month-end spend at the run-rate since the first day with usage this
    /// month, in micro-USD (docs/usage.md, Forecasts).
    pub projected_micros: i64,
    /// The UTC day (`2026-12-20`) spend reaches the limit at that rate,
    /// today when it has; `null` without a limit or when the projection
    /// stays under it.
    pub projected_limit_date: Option<String>,
    /// Where the run-rate starts: the day of the month of the first usage.
    #[serde(skip)]
    pub first_day: u8,
    /// Calls counted this month.
    pub requests: i64,
    /// Whether it was revoked.
    pub revoked: bool,
    /// When authorize last saw it (null: never).
    pub last_used_at: Option<String>,
    /// When it was created.
    pub created_at: String,
    /// From then on authorize refuses it (`key_expired`); null: never.
    pub expires_at: Option<String>,
    /// Until when the secret its last rotation replaced still works (in the
    /// past once it stopped); null: never rotated.
    pub previous_secret_expires_at: Option<String>,
    /// Only in the create response: shown once, stored as a hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl From<KeyRow> for KeyJson {
    fn from(k: KeyRow) -> KeyJson {
        KeyJson {
            cut_off: cut_off(k.spend_micros, k.monthly_limit_micros),
            id: k.id,
            name: k.name,
            user_id: k.user_id,
            group_ids: k.group_ids,
            features: k.features,
            monthly_limit_micros: k.monthly_limit_micros,
            spend_micros: k.spend_micros,
            held_micros: 0,
            projected_micros: k.spend_micros,
            projected_limit_date: None,
            first_day: k.first_day,
            requests: k.requests,
            revoked: k.revoked,
            last_used_at: k.last_used_at_ms.map(time),
            created_at: time(k.created_at_ms),
            expires_at: k.expires_at_ms.map(time),
            previous_secret_expires_at: k.previous_secret_until_ms.map(time),
            secret: None,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct MonthSpend {
    /// The month (`2026-12`).
    pub month: String,
    /// Spend that month, in micro-USD.
    pub spend_micros: i64,
    /// Calls counted that month.
    pub requests: i64,
    /// Against the month before, when that month had spend on record.
    pub change_micros: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DaySpend {
    /// The UTC day (`2026-12-07`).
    pub day: String,
    /// Spend that day, in micro-USD.
    pub spend_micros: i64,
    /// Calls counted that day.
    pub requests: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct History {
    /// The last 13 months, newest first, with the change from the month before.
    pub months: Vec<MonthSpend>,
    /// The month `days` covers (`2026-12`): this one, or `?month=`.
    pub days_month: String,
    /// The days of `days_month` that had spend, in order.
    pub days: Vec<DaySpend>,
    /// `days_month`'s usage by model, the largest spend first (at most
    /// 100; `other`: past the org's monthly cap of models).
    pub models: Vec<ModelUsage>,
}

/// One model's usage in a month.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ModelUsage {
    /// The model (`other`: past the org's monthly cap).
    pub model: String,
    #[serde(flatten)]
    pub sums: crate::rollup::SumsJson,
}

/// `?month=` of a user's, group's, key's or the org's detail.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryParams {
    /// Whose days `history.days` lists: `yyyy-mm`, this month or one of the
    /// 12 before it [default: this month].
    pub(crate) month: Option<String>,
}

/// A subject's history at `now`: its last 13 months and the days of the
/// month `p` asks for.
pub(crate) async fn history(
    engine: &Engine,
    org_id: &tally_core::ids::OrgId,
    kind: &str,
    subject_id: &str,
    p: &HistoryParams,
) -> Result<History, ApiError> {
    let now = Month::from_unix_ms(engine.now_ms());
    let days_of = match p.month.as_deref() {
        None => now,
        Some(s) => {
            let oldest = (1..tally_store::query::HISTORY_MONTHS).fold(now, |m, _| m.prev());
            match Month::parse(s) {
                Some(m) if (oldest..=now).contains(&m) => m,
                _ => {
                    return Err(ApiError::invalid(format!(
                        "month: yyyy-mm from {oldest} to {now}, got {s:?}"
                    )));
                }
            }
        }
    };
    let (months, days) = engine
        .db
        .history(org_id, kind, subject_id, now, days_of)
        .await?;
    let by_model = tally_store::rollup::UsageQuery {
        kind: SubjectKind::parse(kind).ok_or_else(ApiError::internal)?,
        subject: Some(subject_id.to_owned()),
        model: None,
        from: days_of.first_day(),
        to: days_of.last_day(),
        group_by: Some(tally_store::rollup::UsageDim::Model),
        top: 100,
        days: false,
    };
    let models = engine
        .db
        .usage(org_id, &by_model)
        .await?
        .top
        .into_iter()
        .map(|(model, sums)| ModelUsage {
            model,
            sums: sums.into(),
        })
        .collect();
    let mut h = History::new(months, days_of, days);
    h.models = models;
    Ok(h)
}

impl History {
    /// `months` newest first, as the store returns them.
    pub(crate) fn new(months: Vec<PeriodSpend>, days_of: Month, days: Vec<PeriodSpend>) -> History {
        let label = |p: i64| {
            u32::try_from(p)
                .ok()
                .and_then(Month::from_yyyymm)
                .map_or(p.to_string(), |m| m.to_string())
        };
        let mut out = Vec::with_capacity(months.len());
        for (i, m) in months.iter().enumerate() {
            let prev = months.get(i + 1).filter(|p| {
                u32::try_from(m.period)
                    .ok()
                    .and_then(Month::from_yyyymm)
                    .is_some_and(|mm| i64::from(mm.prev().yyyymm()) == p.period)
            });
            out.push(MonthSpend {
                month: label(m.period),
                spend_micros: m.spend_micros,
                requests: m.requests,
                change_micros: prev.map(|p| m.spend_micros - p.spend_micros),
            });
        }
        History {
            months: out,
            days_month: days_of.to_string(),
            models: Vec::new(),
            days: days
                .into_iter()
                .map(|d| DaySpend {
                    day: u32::try_from(d.period)
                        .ok()
                        .and_then(Day::from_yyyymmdd)
                        .map_or(d.period.to_string(), |d| d.to_string()),
                    spend_micros: d.spend_micros,
                    requests: d.requests,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ListJson<T> {
    /// This page's items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null`: this is the last.
    pub next_cursor: Option<String>,
}

/// A spend-bearing object, which also shows what live holds hold on it
/// and where its spend is heading: what depends on the moment it is read.
pub(crate) trait Holding {
    const KIND: SubjectKind;
    fn subject_id(&self) -> &str;
    fn set_held(&mut self, micros: i64);
    /// Fills in the month-end forecast as of `now_ms`.
    fn project(&mut self, month: Month, now_ms: i64);
}

macro_rules! holding {
    ($t:ty, $kind:expr) => {
        impl Holding for $t {
            const KIND: SubjectKind = $kind;
            fn subject_id(&self) -> &str {
                &self.id
            }
            fn set_held(&mut self, micros: i64) {
                self.held_micros = micros;
            }
            fn project(&mut self, month: Month, now_ms: i64) {
                let f = tally_core::forecast::forecast(
                    month,
                    self.spend_micros,
                    tally_core::forecast::first_day(month, self.first_day),
                    self.monthly_limit_micros,
                    now_ms,
                );
                self.projected_micros = f.projected_micros;
                self.projected_limit_date = f.limit_day.map(|d| d.to_string());
            }
        }
    };
}

holding!(OrgJson, SubjectKind::Org);
holding!(UserJson, SubjectKind::User);
holding!(GroupJson, SubjectKind::Group);
holding!(KeyJson, SubjectKind::Key);

/// Fills in `held_micros` (from memory where the org's holds are placed,
/// elsewhere from the stored holds: one read either way) and the forecast,
/// as of the engine's clock.
pub(crate) async fn with_held<T: Holding>(
    engine: &Engine,
    org: &str,
    mut items: Vec<T>,
) -> crate::error::ApiResult<Vec<T>> {
    let held = {
        let ids: Vec<&str> = items.iter().map(Holding::subject_id).collect();
        engine.held(org, T::KIND, &ids).await?
    };
    let now = engine.now_ms();
    let month = Month::from_unix_ms(now);
    for (item, h) in items.iter_mut().zip(held) {
        item.set_held(h);
        item.project(month, now);
    }
    Ok(items)
}

/// [`with_held`] for one object.
pub(crate) async fn one_with_held<T: Holding>(
    engine: &Engine,
    org: &str,
    item: T,
) -> crate::error::ApiResult<T> {
    let mut v = with_held(engine, org, vec![item]).await?;
    Ok(v.pop().expect("one in, one out"))
}
