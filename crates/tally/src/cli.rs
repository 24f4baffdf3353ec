//! The admin CLI: the HTTP API from a terminal, with readable tables and
//! dollars. `tally users list --sort -spend --group eng`,
//! `tally groups add-members eng alice bob`, `tally keys create …`.
//! docs/cli.md is its manual.
//!
//! Conventions, the same in every command: an entity's id is the first
//! argument (`tally groups create eng --name Engineering`); lists take
//! commas (`--groups eng,ops`) or the flag repeated, and positional lists
//! commas or spaces; money is in dollars (`50`, `12.50`, or `unlimited`),
//! and a limit past [`LIMIT_CONFIRM_MICROS`] asks first; `--rows` is how
//! many rows a listing prints.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tally_core::money::{format_usd, parse_usd};

/// A monthly limit this high is more likely a typo (cents, micro-dollars)
/// than meant: it is set only when confirmed (`--yes`, or `y` at the
/// prompt on a terminal). $100 000.
pub(crate) const LIMIT_CONFIRM_MICROS: i64 = 100_000 * 1_000_000;

/// How long one request may take before the command gives up.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The server could not be reached (exit status 3): where, and why.
#[derive(Debug)]
pub(crate) struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Where and as whom.
#[derive(Debug, Clone, Args)]
pub(crate) struct Conn {
    /// The Tally API [default: the `listen` address of --config, else
    /// http://127.0.0.1:8080].
    #[arg(long, env = "TALLY_URL", global = true)]
    pub(crate) url: Option<String>,
    /// The operator token, or an org's admin or viewer token [default: the
    /// `operator_token` of --config].
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
    /// The org to work on.
    #[arg(long, env = "TALLY_ORG", global = true)]
    pub(crate) org: Option<String>,
    /// Confirm without asking: a monthly limit past $100 000.
    #[arg(long, global = true)]
    pub(crate) yes: bool,
}

/// How many rows a listing prints.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct Rows {
    /// Rows to print (pages are read up to this many).
    #[arg(long, default_value_t = 50)]
    rows: usize,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Orgs {
    /// Create an org (operator token).
    Create {
        /// The org's id (letters, digits, `.`, `_`, `-`); default: generated.
        id: Option<String>,
        /// Its display name.
        #[arg(long)]
        name: String,
        /// The monthly limit new members get, in dollars, or `unlimited`.
        #[arg(long)]
        default_limit: Option<String>,
        /// The org's own monthly limit on everyone's spend together, in
        /// dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
        /// Alert thresholds, fractions of a limit (`0.5,0.8,1`).
        #[arg(long, value_delimiter = ',')]
        thresholds: Vec<String>,
    },
    /// Every org, with members and spend (operator token).
    List {
        /// Orgs whose id or name contains this.
        #[arg(long)]
        q: Option<String>,
        #[command(flatten)]
        rows: Rows,
    },
    /// The org, its spend this month and its history.
    Show,
    /// Change the org: only what is given changes.
    Update {
        /// Its display name.
        #[arg(long)]
        name: Option<String>,
        /// The monthly limit new members get, in dollars, or `unlimited`.
        #[arg(long)]
        default_limit: Option<String>,
        /// The org's own monthly limit, in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
        /// Alert thresholds, fractions of a limit (`0.5,0.8,1`).
        #[arg(long, value_delimiter = ',')]
        thresholds: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Users {
    /// List members: `--sort -spend`, `--group eng`, `--status active`, …
    List {
        /// name, email, spend, limit, utilization or last_active; a `-`
        /// before it for descending.
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        /// Members of this group only.
        #[arg(long)]
        group: Option<String>,
        /// invited, active, suspended or removed [default: all but removed].
        #[arg(long)]
        status: Option<String>,
        /// Part of a name, email or id.
        #[arg(long)]
        q: Option<String>,
        /// Members at or above this fraction of their limit (`0.8`).
        #[arg(long)]
        min_utilization: Option<String>,
        /// Only members cut off for the month.
        #[arg(long)]
        cut_off: bool,
        #[command(flatten)]
        rows: Rows,
    },
    /// Add a member.
    Add {
        /// The member's id; default: generated.
        id: Option<String>,
        /// Their email address.
        #[arg(long)]
        email: String,
        /// Their display name.
        #[arg(long)]
        name: String,
        /// Monthly limit in dollars, or `unlimited`; default: the org's.
        #[arg(long)]
        limit: Option<String>,
        /// Active at once instead of invited.
        #[arg(long)]
        active: bool,
    },
    /// One member, with history.
    Show {
        /// The member's id.
        user: String,
    },
    /// Change a member: only what is given changes.
    Update {
        /// The member's id.
        user: String,
        /// Monthly limit in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
        /// active or suspended.
        #[arg(long)]
        status: Option<String>,
        /// Their display name.
        #[arg(long)]
        name: Option<String>,
        /// Their email address.
        #[arg(long)]
        email: Option<String>,
    },
    /// Remove a member (history stays).
    Remove {
        /// The member's id.
        user: String,
    },
    /// One change to many members, all or nothing: named (`--users`) or
    /// every member the `--where-…` filters match; `--dry-run` first.
    Bulk {
        /// The members' ids (`alice,bob`, or the flag repeated).
        #[arg(long, value_delimiter = ',')]
        users: Vec<String>,
        /// Members with this status (invited, active, suspended, removed).
        #[arg(long)]
        where_status: Option<String>,
        /// Members of this group.
        #[arg(long)]
        where_group: Option<String>,
        /// Members whose id, name or email contains this.
        #[arg(long)]
        where_q: Option<String>,
        /// Members at or above this fraction of their limit (`0.8`).
        #[arg(long)]
        where_min_utilization: Option<String>,
        /// Members cut off for the month.
        #[arg(long)]
        where_cut_off: bool,
        /// Each member's limit back to the org's default.
        #[arg(long, conflicts_with = "limit")]
        reset_limit: bool,
        /// Say what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Groups to add them to.
        #[arg(long, value_delimiter = ',')]
        add_groups: Vec<String>,
        /// Groups to remove them from.
        #[arg(long, value_delimiter = ',')]
        remove_groups: Vec<String>,
        /// Monthly limit in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
        /// active or suspended.
        #[arg(long)]
        status: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Groups {
    /// Every group, with members, spend and limit.
    List {
        #[command(flatten)]
        rows: Rows,
    },
    /// Create a group.
    Create {
        /// The group's id; default: generated.
        id: Option<String>,
        /// Its display name.
        #[arg(long)]
        name: String,
        /// Monthly limit in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
    },
    /// A group, its history and its top members.
    Show {
        /// The group's id.
        group: String,
    },
    /// Change a group: only what is given changes.
    Update {
        /// The group's id.
        group: String,
        /// Its display name.
        #[arg(long)]
        name: Option<String>,
        /// Monthly limit in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
    },
    /// Add members (all or nothing).
    AddMembers {
        /// The group's id.
        group: String,
        /// The members' ids (`alice bob` or `alice,bob`).
        #[arg(required = true, value_delimiter = ',')]
        users: Vec<String>,
    },
    /// Remove members (all or nothing).
    RemoveMembers {
        /// The group's id.
        group: String,
        /// The members' ids (`alice bob` or `alice,bob`).
        #[arg(required = true, value_delimiter = ',')]
        users: Vec<String>,
    },
    /// Delete a group: its memberships and key associations end.
    Delete {
        /// The group's id.
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Keys {
    /// Every key, with owner, groups, features, spend and limit.
    List {
        /// The keys this member owns only.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        rows: Rows,
    },
    /// Create a key; its secret is printed once.
    Create {
        /// The key's id; default: generated.
        id: Option<String>,
        /// What it is for.
        #[arg(long)]
        name: String,
        /// The member who owns it (their first own key activates them).
        #[arg(long)]
        user: Option<String>,
        /// Groups its spend also counts against.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Features authorize allows it (`chat,embeddings`).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// Monthly limit in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
        /// When authorize starts refusing it (RFC 3339, e.g.
        /// 2027-01-31T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
    },
    /// One key.
    Show {
        /// The key's id.
        key: String,
    },
    /// Change a key: only what is given changes.
    Update {
        /// The key's id.
        key: String,
        /// What it is for.
        #[arg(long)]
        name: Option<String>,
        /// The owner; `none` for a key of its groups only.
        #[arg(long)]
        user: Option<String>,
        /// Every group of the key (replaces them); `none` for no group.
        #[arg(long, value_delimiter = ',')]
        groups: Option<Vec<String>>,
        /// Every feature of the key (replaces them).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        /// Monthly limit in dollars, or `unlimited`.
        #[arg(long)]
        limit: Option<String>,
        /// RFC 3339, or `never`.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Give a key a new secret (printed once); the old one keeps working
    /// for the grace period.
    Rotate {
        /// The key's id.
        key: String,
        /// Seconds the old secret keeps working (at most 604800, 7 days).
        #[arg(long, default_value_t = 0)]
        grace_seconds: i64,
    },
    /// Revoke a key: authorize refuses it from now on.
    Revoke {
        /// The key's id.
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Tokens {
    /// The org's tokens (never their secrets).
    List {
        #[command(flatten)]
        rows: Rows,
    },
    /// Mint a token of the org (printed once).
    Create {
        /// admin (everything in the org), viewer (reads only) or gateway
        /// (authorize, usage and holds for this org; the operator's to mint).
        #[arg(long, default_value = "admin")]
        role: String,
        /// What it is for [default: its role].
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a token: refused from now on.
    Revoke {
        /// The token's id (`tok_…`).
        #[arg(value_name = "TOKEN_ID")]
        token_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GatewayTokens {
    /// Gateway tokens of every org (operator token).
    List {
        #[command(flatten)]
        rows: Rows,
    },
    /// Mint a gateway token of every org (printed once).
    Create {
        /// Which gateway holds it.
        #[arg(long)]
        name: String,
    },
    /// Revoke a gateway token.
    Revoke {
        /// The token's id (`gw_…`).
        #[arg(value_name = "TOKEN_ID")]
        token_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Webhook {
    /// The org's webhook and its deliveries by state.
    Show,
    /// Send threshold and cutoff notifications to URL (its signing secret
    /// is printed once).
    Set {
        /// `https://…` (or `http://…`).
        #[arg(value_name = "URL")]
        target: String,
        /// `tally` (Tally's signed JSON) or `slack` (a Slack incoming-webhook
        /// message).
        #[arg(long, default_value = "tally", value_parser = ["tally", "slack"])]
        format: String,
    },
    /// Stop sending; pending deliveries are cancelled.
    Remove,
    /// Send a `test` notification now and print what the receiver answered.
    Test,
    /// Deliveries, newest first.
    Deliveries {
        /// pending, delivered, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        rows: Rows,
    },
    /// Send a failed or cancelled delivery again.
    Redeliver {
        /// The delivery's id (from `webhook deliveries`).
        id: i64,
    },
}

/// `tally usage`: what `GET /v1/orgs/{org}/usage` answers, as a table.
#[derive(Debug, Clone, Args)]
pub(crate) struct UsageArgs {
    /// A month (`2026-11`) [default: this month; see --from and --to].
    #[arg(long, conflicts_with_all = ["from", "to"])]
    month: Option<String>,
    /// The first day (`2026-11-05`) or month of a range.
    #[arg(long)]
    from: Option<String>,
    /// The last day or month of a range, included.
    #[arg(long)]
    to: Option<String>,
    /// model, provider, user, group or key [default: the whole, by day].
    #[arg(long, value_parser = ["model", "provider", "user", "group", "key"])]
    by: Option<String>,
    /// One member's usage only.
    #[arg(long)]
    user: Option<String>,
    /// One group's usage only.
    #[arg(long)]
    group: Option<String>,
    /// One key's usage only.
    #[arg(long)]
    key: Option<String>,
    /// One model's usage only.
    #[arg(long)]
    model: Option<String>,
    /// How many rows of --by, the largest spend first (1 to 100).
    #[arg(long, default_value_t = 20)]
    top: u32,
}

pub(crate) async fn usage(
    conn: Conn,
    file: crate::config::AdminDefaults,
    a: UsageArgs,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    let (from, to) = match a.month {
        Some(m) => (Some(m.clone()), Some(m)),
        None => (a.from, a.to),
    };
    let grouped = a.by.is_some();
    let q = given([
        ("from", from),
        ("to", to),
        ("group_by", a.by.clone()),
        ("user", a.user),
        ("group", a.group),
        ("key", a.key),
        ("model", a.model),
        ("top", Some(a.top.to_string())),
    ]);
    let url = reqwest::Url::parse_with_params(&format!("http://x/v1/orgs/{org}/usage"), &q)?;
    let u = api
        .get(&format!("{}?{}", url.path(), url.query().unwrap_or("")))
        .await?;
    let sums = |v: &Value| {
        vec![
            dollars(&v["spend_micros"]),
            text(&v["requests"]),
            text(&v["input_tokens"]),
            text(&v["output_tokens"]),
        ]
    };
    let mut out = format!("{} to {}\n", text(&u["from"]), text(&u["to"]));
    let mut rows: Vec<Vec<String>> = Vec::new();
    if grouped {
        for g in u["groups"].as_array().into_iter().flatten() {
            let mut r = vec![text(&g["key"]), text(&g["name"])];
            r.extend(sums(&g["totals"]));
            rows.push(r);
        }
        let others = u["group_count"].as_i64().unwrap_or(0) - rows.len() as i64;
        if others > 0 {
            let mut r = vec![format!("({others} more)"), String::new()];
            r.extend(sums(&u["rest"]));
            rows.push(r);
        }
        let mut total = vec!["total".to_owned(), String::new()];
        total.extend(sums(&u["totals"]));
        rows.push(total);
        let by = a.by.as_deref().unwrap_or_default();
        out.push_str(&table(
            &[
                by,
                "name",
                "spend",
                "requests",
                "input tokens",
                "output tokens",
            ],
            &rows,
        ));
    } else {
        for p in u["series"].as_array().into_iter().flatten() {
            let mut r = vec![text(&p["period"])];
            r.extend(sums(p));
            rows.push(r);
        }
        let mut total = vec!["total".to_owned()];
        total.extend(sums(&u["totals"]));
        rows.push(total);
        out.push_str(&table(
            &["day", "spend", "requests", "input tokens", "output tokens"],
            &rows,
        ));
    }
    Ok(out)
}

#[derive(Debug, Subcommand)]
pub(crate) enum Holds {
    /// The org's live holds (calls in flight).
    List {
        /// One member's holds only.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        rows: Rows,
    },
    /// Free a hold at once, for a call that failed or was cancelled.
    Release {
        /// The call's request id.
        request_id: String,
    },
}

/// The org's audit trail, or the operator's.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// The operator's log (gateway tokens of every org) instead of the org's.
    #[arg(long)]
    operator: bool,
    /// `newest` first instead of oldest first.
    #[arg(long)]
    order: Option<String>,
    /// Changes by this actor only: `operator` or `token:<token id>`.
    #[arg(long)]
    actor: Option<String>,
    /// Of these kinds only (`user_added,user_limit_set`).
    #[arg(long, value_delimiter = ',')]
    kind: Vec<String>,
    /// About this entity only: `user:<id>`, `group:<id>`, `key:<id>`,
    /// `token:<id>` or `org`.
    #[arg(long)]
    subject: Option<String>,
    /// At or after this time (RFC 3339, or a day: 2026-11-01).
    #[arg(long)]
    from: Option<String>,
    /// Before this time (RFC 3339, or a day).
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    rows: Rows,
}

/// Usage that could not be counted, newest first.
#[derive(Debug, Args)]
pub(crate) struct DeadLetterArgs {
    /// Of every org, also those of no known org (operator token).
    #[arg(long)]
    all_orgs: bool,
    #[command(flatten)]
    rows: Rows,
}

fn dollars(v: &Value) -> String {
    match v.as_i64() {
        Some(m) => format_usd(m),
        None => "unlimited".into(),
    }
}

/// Spend as a percentage of the limit, to a tenth, in integers.
fn percent(spend: &Value, limit: &Value) -> String {
    match (spend.as_i64(), limit.as_i64()) {
        (Some(s), Some(l)) if l > 0 => {
            let tenths = i128::from(s) * 1000 / i128::from(l);
            format!("{}.{}%", tenths / 10, tenths % 10)
        }
        _ => "-".into(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `yes` when the JSON value is `true`, else an empty cell.
fn yes(v: &Value) -> String {
    if *v == true {
        "yes".to_owned()
    } else {
        String::new()
    }
}

/// Rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(width[i] - c.chars().count()));
            }
        }
        let mut s = s.trim_end().to_owned();
        s.push('\n');
        s
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

struct Api {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    org: Option<String>,
    yes: bool,
}

impl Api {
    /// From the flags and environment, then the `--config` file's `listen`
    /// and `operator_token` (`file`), then the defaults.
    fn new(conn: Conn, file: crate::config::AdminDefaults) -> Api {
        Api {
            // A server that accepts and never answers ends the command too
            // (exit status 3), instead of hanging a script.
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .unwrap_or_default(),
            url: conn
                .url
                .or(file.url)
                .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned()),
            token: conn.token.or(file.token),
            org: conn.org,
            yes: conn.yes,
        }
    }

    fn org(&self) -> anyhow::Result<&str> {
        self.org
            .as_deref()
            .context("which org? pass --org or set TALLY_ORG")
    }

    /// A monthly limit argument: dollars, or `unlimited` (JSON null). Past
    /// [`LIMIT_CONFIRM_MICROS`] it needs a confirmation.
    fn limit(&self, s: &str) -> anyhow::Result<Value> {
        if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
            return Ok(Value::Null);
        }
        let micros = parse_usd(s).with_context(|| {
            format!("{s:?} is not an amount in dollars (e.g. 50 or 12.50, or unlimited)")
        })?;
        if micros > LIMIT_CONFIRM_MICROS && !self.yes {
            let amount = format_usd(micros);
            let asked = std::io::stdin().is_terminal() && {
                eprint!("a monthly limit of {amount} (the amount is in dollars)? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().lock().read_line(&mut answer);
                matches!(answer.trim(), "y" | "Y" | "yes")
            };
            if !asked {
                bail!(
                    "a monthly limit of {amount} is past {}: limits are in dollars; \
                     pass --yes if you mean it",
                    format_usd(LIMIT_CONFIRM_MICROS)
                );
            }
        }
        Ok(json!(micros))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() || e.is_timeout() => {
                // The innermost cause says why ("Connection refused").
                let mut why: &dyn std::error::Error = &e;
                while let Some(inner) = why.source() {
                    why = inner;
                }
                let base = self.url.trim_end_matches('/');
                return Err(Unreachable(format!("cannot reach {base}: {why}")).into());
            }
            Err(e) => return Err(e).with_context(|| format!("calling {url}")),
        };
        let status = resp.status();
        let body: Value = if status == reqwest::StatusCode::NO_CONTENT {
            Value::Null
        } else {
            resp.json()
                .await
                .with_context(|| format!("reading the answer of {url}"))?
        };
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("error");
            let message = body["error"]["message"].as_str().unwrap_or("");
            // The server's words first; the status for scripts and bug reports.
            bail!("{message} ({}, {code})", status.as_u16());
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn patch(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::PATCH, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// The items of a listing at `path` with `query`, page after page, up
    /// to `rows`.
    async fn list(
        &self,
        path: &str,
        query: &[(&str, String)],
        rows: Rows,
    ) -> anyhow::Result<Vec<Value>> {
        let want = rows.rows.max(1);
        let mut items: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("limit", want.min(1000).to_string()));
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let url = reqwest::Url::parse_with_params(&format!("http://x{path}"), &q)?;
            let page = self
                .get(&format!("{}?{}", url.path(), url.query().unwrap_or("")))
                .await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if cursor.is_none() || items.len() >= want {
                break;
            }
        }
        items.truncate(want);
        Ok(items)
    }
}

/// An id as one path segment: anything but letters, digits, `.`, `_` and
/// `-` (which ids are made of) percent-encoded, so a stray `/` or `?` is
/// the server's to refuse, never another route. `.` and `..` are refused
/// here: a URL resolves them away (encoded or not).
fn seg(id: &str) -> anyhow::Result<String> {
    if id == "." || id == ".." {
        bail!("{id:?} is not an id");
    }
    Ok(id
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect())
}

/// Query pairs of the options that are given.
fn given<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<String>)>) -> Vec<(&'a str, String)> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

fn user_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|u| {
            vec![
                text(&u["id"]),
                text(&u["name"]),
                text(&u["email"]),
                text(&u["status"]),
                dollars(&u["spend_micros"]),
                dollars(&u["monthly_limit_micros"]),
                percent(&u["spend_micros"], &u["monthly_limit_micros"]),
                yes(&u["cut_off"]),
                text(&u["groups"]),
                text(&u["last_active_at"]),
            ]
        })
        .collect()
}

const USER_HEADER: [&str; 10] = [
    "ID",
    "NAME",
    "EMAIL",
    "STATUS",
    "SPEND",
    "LIMIT",
    "USED",
    "CUT OFF",
    "GROUPS",
    "LAST ACTIVE",
];

fn history(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["history"]["months"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                text(&m["month"]),
                dollars(&m["spend_micros"]),
                text(&m["requests"]),
                m["change_micros"].as_i64().map_or("-".into(), |c| {
                    if c >= 0 {
                        format!("+{}", format_usd(c))
                    } else {
                        format_usd(c)
                    }
                }),
            ]
        })
        .collect();
    table(&["MONTH", "SPEND", "REQUESTS", "CHANGE"], &rows)
}

/// Alert thresholds as JSON numbers (`0.5` → 0.5).
fn thresholds(list: &[String]) -> anyhow::Result<Value> {
    list.iter()
        .map(|t| {
            serde_json::from_str::<serde_json::Number>(t.trim())
                .ok()
                .map(Value::Number)
                .with_context(|| format!("threshold {t:?} is not a fraction (e.g. 0.8)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Value::Array)
}

fn org_summary(o: &Value) -> String {
    format!(
        "{} ({})\nspend in {}: {} over {} requests, org limit {}\ndefault limit for new members: {}\nalert thresholds: {}\n",
        text(&o["name"]),
        text(&o["id"]),
        text(&o["month"]),
        dollars(&o["spend_micros"]),
        text(&o["requests"]),
        dollars(&o["monthly_limit_micros"]),
        dollars(&o["default_monthly_limit_micros"]),
        text(&o["alert_thresholds"]),
    )
}

pub(crate) async fn orgs(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Orgs,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    Ok(match cmd {
        Orgs::Create {
            id,
            name,
            default_limit,
            limit,
            thresholds: t,
        } => {
            let mut body = json!({"name": name});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(l) = default_limit {
                body["default_monthly_limit_micros"] = api.limit(&l)?;
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            if !t.is_empty() {
                body["alert_thresholds"] = thresholds(&t)?;
            }
            let o = api.post("/v1/orgs", body).await?;
            format!(
                "created org {} ({}), default limit {}, org limit {}\n",
                text(&o["id"]),
                text(&o["name"]),
                dollars(&o["default_monthly_limit_micros"]),
                dollars(&o["monthly_limit_micros"])
            )
        }
        Orgs::List { q, rows } => {
            let items = api.list("/v1/orgs", &given([("q", q)]), rows).await?;
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|o| {
                    vec![
                        text(&o["id"]),
                        text(&o["name"]),
                        text(&o["member_count"]),
                        dollars(&o["spend_micros"]),
                        dollars(&o["monthly_limit_micros"]),
                        percent(&o["spend_micros"], &o["monthly_limit_micros"]),
                        yes(&o["cut_off"]),
                    ]
                })
                .collect();
            table(
                &["ID", "NAME", "MEMBERS", "SPEND", "LIMIT", "USED", "CUT OFF"],
                &rows,
            )
        }
        Orgs::Show => {
            let o = api.get(&format!("/v1/orgs/{}", seg(api.org()?)?)).await?;
            format!("{}\n{}", org_summary(&o), history(&o))
        }
        Orgs::Update {
            name,
            default_limit,
            limit,
            thresholds: t,
        } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(l) = default_limit {
                body["default_monthly_limit_micros"] = api.limit(&l)?;
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            if let Some(t) = t {
                body["alert_thresholds"] = thresholds(&t)?;
            }
            let o = api
                .patch(&format!("/v1/orgs/{}", seg(api.org()?)?), body)
                .await?;
            org_summary(&o)
        }
    })
}

pub(crate) async fn users(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Users,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    Ok(match cmd {
        Users::List {
            sort,
            group,
            status,
            q,
            min_utilization,
            cut_off,
            rows,
        } => {
            let mut query = given([
                ("sort", sort),
                ("group", group),
                ("status", status),
                ("q", q),
                ("min_utilization", min_utilization),
            ]);
            if cut_off {
                query.push(("cut_off", "true".into()));
            }
            let items = api
                .list(&format!("/v1/orgs/{org}/users"), &query, rows)
                .await?;
            table(&USER_HEADER, &user_rows(&items))
        }
        Users::Add {
            id,
            email,
            name,
            limit,
            active,
        } => {
            let mut body = json!({"email": email, "name": name});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            if active {
                body["status"] = json!("active");
            }
            let u = api.post(&format!("/v1/orgs/{org}/users"), body).await?;
            table(&USER_HEADER, &user_rows(&[u]))
        }
        Users::Show { user } => {
            let u = api
                .get(&format!("/v1/orgs/{org}/users/{}", seg(&user)?))
                .await?;
            format!(
                "{}\n{}",
                table(&USER_HEADER, &user_rows(std::slice::from_ref(&u))),
                history(&u)
            )
        }
        Users::Update {
            user,
            limit,
            status,
            name,
            email,
        } => {
            let mut body = json!({});
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            for (k, v) in [("status", status), ("name", name), ("email", email)] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let u = api
                .patch(&format!("/v1/orgs/{org}/users/{}", seg(&user)?), body)
                .await?;
            table(&USER_HEADER, &user_rows(&[u]))
        }
        Users::Remove { user } => {
            let u = api
                .delete(&format!("/v1/orgs/{org}/users/{}", seg(&user)?))
                .await?;
            format!("removed {}\n", text(&u["id"]))
        }
        Users::Bulk {
            users,
            where_status,
            where_group,
            where_q,
            where_min_utilization,
            where_cut_off,
            reset_limit,
            dry_run,
            add_groups,
            remove_groups,
            limit,
            status,
        } => {
            let mut body = json!({
                "add_groups": add_groups,
                "remove_groups": remove_groups,
                "reset_limit": reset_limit,
                "dry_run": dry_run,
            });
            let mut filter = serde_json::Map::new();
            for (k, v) in given([
                ("status", where_status),
                ("group", where_group),
                ("q", where_q),
                ("min_utilization", where_min_utilization),
            ]) {
                let _ = filter.insert(k.to_owned(), json!(v));
            }
            if where_cut_off {
                let _ = filter.insert("cut_off".to_owned(), json!(true));
            }
            match (users.is_empty(), filter.is_empty()) {
                (false, true) => body["user_ids"] = json!(users),
                (true, false) => body["filter"] = Value::Object(filter),
                _ => bail!(
                    "name the members with --users, or match them with --where-… (one of the two)"
                ),
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            if let Some(s) = status {
                body["status"] = json!(s);
            }
            let r = api
                .post(&format!("/v1/orgs/{org}/users/bulk"), body)
                .await?;
            bulk_summary(&r)
        }
    })
}

fn bulk_summary(r: &Value) -> String {
    let changes: Vec<Vec<String>> = r["changes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| vec![k.clone(), text(v)])
        .collect();
    format!(
        "{} of {} users {}\n{}",
        text(&r["users_changed"]),
        text(&r["users"]),
        if r["dry_run"] == true {
            "would change (dry run: nothing changed)"
        } else {
            "changed"
        },
        table(&["CHANGE", "COUNT"], &changes)
    )
}

fn group_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|g| {
            vec![
                text(&g["id"]),
                text(&g["name"]),
                text(&g["member_count"]),
                dollars(&g["spend_micros"]),
                dollars(&g["monthly_limit_micros"]),
                percent(&g["spend_micros"], &g["monthly_limit_micros"]),
                yes(&g["cut_off"]),
            ]
        })
        .collect()
}

const GROUP_HEADER: [&str; 7] = ["ID", "NAME", "MEMBERS", "SPEND", "LIMIT", "USED", "CUT OFF"];

pub(crate) async fn groups(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Groups,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    Ok(match cmd {
        Groups::List { rows } => {
            let items = api
                .list(&format!("/v1/orgs/{org}/groups"), &[], rows)
                .await?;
            table(&GROUP_HEADER, &group_rows(&items))
        }
        Groups::Create { id, name, limit } => {
            let mut body = json!({"name": name});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            let g = api.post(&format!("/v1/orgs/{org}/groups"), body).await?;
            table(&GROUP_HEADER, &group_rows(&[g]))
        }
        Groups::Show { group } => {
            let g = api
                .get(&format!("/v1/orgs/{org}/groups/{}", seg(&group)?))
                .await?;
            let members = g["members"].as_array().cloned().unwrap_or_default();
            format!(
                "{}\n{}\nTOP MEMBERS THIS MONTH\n{}",
                table(&GROUP_HEADER, &group_rows(std::slice::from_ref(&g))),
                history(&g),
                table(&USER_HEADER, &user_rows(&members))
            )
        }
        Groups::Update { group, name, limit } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            let g = api
                .patch(&format!("/v1/orgs/{org}/groups/{}", seg(&group)?), body)
                .await?;
            table(&GROUP_HEADER, &group_rows(&[g]))
        }
        Groups::AddMembers { group, users } => membership(&api, &org, &group, &users, true).await?,
        Groups::RemoveMembers { group, users } => {
            membership(&api, &org, &group, &users, false).await?
        }
        Groups::Delete { group } => {
            let _ = api
                .delete(&format!("/v1/orgs/{org}/groups/{}", seg(&group)?))
                .await?;
            format!("deleted group {group}\n")
        }
    })
}

/// Adds or removes members in one all-or-nothing bulk change.
async fn membership(
    api: &Api,
    org: &str,
    group: &str,
    users: &[String],
    add: bool,
) -> anyhow::Result<String> {
    let users: Vec<&str> = users
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .collect();
    let (add_groups, remove_groups) = if add {
        (vec![group], vec![])
    } else {
        (vec![], vec![group])
    };
    let body = json!({"user_ids": users, "add_groups": add_groups, "remove_groups": remove_groups});
    let r = api
        .post(&format!("/v1/orgs/{org}/users/bulk"), body)
        .await?;
    let g = api
        .get(&format!("/v1/orgs/{org}/groups/{}", seg(group)?))
        .await?;
    Ok(format!(
        "{} of {} users changed\n{}",
        text(&r["users_changed"]),
        text(&r["users"]),
        table(&GROUP_HEADER, &group_rows(std::slice::from_ref(&g)))
    ))
}

fn key_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|k| {
            vec![
                text(&k["id"]),
                text(&k["name"]),
                text(&k["user_id"]),
                text(&k["group_ids"]),
                text(&k["features"]),
                dollars(&k["spend_micros"]),
                dollars(&k["monthly_limit_micros"]),
                text(&k["last_used_at"]),
                yes(&k["revoked"]),
            ]
        })
        .collect()
}

const KEY_HEADER: [&str; 9] = [
    "ID",
    "NAME",
    "OWNER",
    "GROUPS",
    "FEATURES",
    "SPEND",
    "LIMIT",
    "LAST USED",
    "REVOKED",
];

pub(crate) async fn keys(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Keys,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    Ok(match cmd {
        Keys::List { user, rows } => {
            let items = api
                .list(
                    &format!("/v1/orgs/{org}/keys"),
                    &given([("user", user)]),
                    rows,
                )
                .await?;
            table(&KEY_HEADER, &key_rows(&items))
        }
        Keys::Create {
            id,
            name,
            user,
            groups,
            features,
            limit,
            expires,
        } => {
            let mut body = json!({"name": name, "group_ids": groups, "features": features});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(u) = user {
                body["user_id"] = json!(u);
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            if let Some(e) = expires {
                body["expires_at"] = json!(e);
            }
            let k = api.post(&format!("/v1/orgs/{org}/keys"), body).await?;
            format!(
                "{}\nsecret (shown once, keep it): {}\n",
                table(&KEY_HEADER, &key_rows(std::slice::from_ref(&k))),
                text(&k["secret"])
            )
        }
        Keys::Show { key } => {
            let k = api
                .get(&format!("/v1/orgs/{org}/keys/{}", seg(&key)?))
                .await?;
            format!(
                "{}\n{}",
                table(&KEY_HEADER, &key_rows(std::slice::from_ref(&k))),
                history(&k)
            )
        }
        Keys::Update {
            key,
            name,
            user,
            groups,
            features,
            limit,
            expires,
        } => {
            let none = |s: &str| s.eq_ignore_ascii_case("none");
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(u) = user {
                body["user_id"] = if none(&u) { Value::Null } else { json!(u) };
            }
            if let Some(g) = groups {
                let g: Vec<String> = g.into_iter().filter(|g| !none(g)).collect();
                body["group_ids"] = json!(g);
            }
            if let Some(f) = features {
                body["features"] = json!(f);
            }
            if let Some(l) = limit {
                body["monthly_limit_micros"] = api.limit(&l)?;
            }
            if let Some(e) = expires {
                body["expires_at"] = if e.eq_ignore_ascii_case("never") {
                    Value::Null
                } else {
                    json!(e)
                };
            }
            let k = api
                .patch(&format!("/v1/orgs/{org}/keys/{}", seg(&key)?), body)
                .await?;
            table(&KEY_HEADER, &key_rows(&[k]))
        }
        Keys::Rotate { key, grace_seconds } => {
            let k = api
                .post(
                    &format!("/v1/orgs/{org}/keys/{}/rotate", seg(&key)?),
                    json!({"grace_seconds": grace_seconds}),
                )
                .await?;
            format!(
                "{}\nnew secret (shown once, keep it): {}\nthe old secret works until {}\n",
                table(&KEY_HEADER, &key_rows(std::slice::from_ref(&k))),
                text(&k["secret"]),
                text(&k["previous_secret_expires_at"])
            )
        }
        Keys::Revoke { key } => {
            let k = api
                .delete(&format!("/v1/orgs/{org}/keys/{}", seg(&key)?))
                .await?;
            table(&KEY_HEADER, &key_rows(&[k]))
        }
    })
}

fn token_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|t| {
            vec![
                text(&t["id"]),
                text(&t["role"]),
                text(&t["name"]),
                text(&t["created_at"]),
                text(&t["last_used_at"]),
                text(&t["revoked_at"]),
            ]
        })
        .collect()
}

const TOKEN_HEADER: [&str; 6] = ["ID", "ROLE", "NAME", "CREATED", "LAST USED", "REVOKED"];

fn minted(t: &Value) -> String {
    format!(
        "{} token {} ({}), shown once: {}\n",
        text(&t["role"]),
        text(&t["id"]),
        text(&t["org_id"]),
        text(&t["token"])
    )
}

pub(crate) async fn tokens(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Tokens,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    Ok(match cmd {
        Tokens::List { rows } => {
            let items = api
                .list(&format!("/v1/orgs/{org}/tokens"), &[], rows)
                .await?;
            table(&TOKEN_HEADER, &token_rows(&items))
        }
        Tokens::Create { role, name } => minted(
            &api.post(
                &format!("/v1/orgs/{org}/tokens"),
                json!({"role": role, "name": name}),
            )
            .await?,
        ),
        Tokens::Revoke { token_id } => {
            let _ = api
                .delete(&format!("/v1/orgs/{org}/tokens/{}", seg(&token_id)?))
                .await?;
            format!("revoked token {token_id}\n")
        }
    })
}

pub(crate) async fn gateway_tokens(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: GatewayTokens,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    Ok(match cmd {
        GatewayTokens::List { rows } => {
            let items = api.list("/v1/gateway-tokens", &[], rows).await?;
            table(&TOKEN_HEADER, &token_rows(&items))
        }
        GatewayTokens::Create { name } => minted(
            &api.post("/v1/gateway-tokens", json!({"name": name}))
                .await?,
        ),
        GatewayTokens::Revoke { token_id } => {
            let _ = api
                .delete(&format!("/v1/gateway-tokens/{}", seg(&token_id)?))
                .await?;
            format!("revoked gateway token {token_id}\n")
        }
    })
}

fn delivery_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|d| {
            vec![
                text(&d["id"]),
                text(&d["state"]),
                text(&d["attempts"]),
                format!("{} {}", text(&d["subject_kind"]), text(&d["subject_id"])),
                text(&d["event"]),
                text(&d["threshold"]),
                text(&d["last_status"]),
                text(&d["last_error"]),
                text(&d["created_at"]),
            ]
        })
        .collect()
}

const DELIVERY_HEADER: [&str; 9] = [
    "ID",
    "STATE",
    "ATTEMPTS",
    "SUBJECT",
    "EVENT",
    "THRESHOLD",
    "STATUS",
    "ERROR",
    "CREATED",
];

fn webhook_summary(w: &Value) -> String {
    let states: Vec<String> = w["deliveries"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{} {k}", text(v)))
        .collect();
    let mut out = format!(
        "webhook: {}\nformat: {}\nset at: {}\ndeliveries: {}\n",
        text(&w["url"]),
        text(&w["format"]),
        text(&w["set_at"]),
        if states.is_empty() {
            "none".to_owned()
        } else {
            states.join(", ")
        }
    );
    if let Some(secret) = w["secret"].as_str() {
        out.push_str(&format!("signing secret (shown once, keep it): {secret}\n"));
    }
    out
}

pub(crate) async fn webhook(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Webhook,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    let at = format!("/v1/orgs/{org}/webhook");
    Ok(match cmd {
        Webhook::Show => webhook_summary(&api.get(&at).await?),
        Webhook::Set { target, format } => webhook_summary(
            &api.send(
                reqwest::Method::PUT,
                &at,
                Some(json!({"url": target, "format": format})),
            )
            .await?,
        ),
        Webhook::Remove => webhook_summary(&api.delete(&at).await?),
        Webhook::Test => {
            let r = api.post(&format!("{at}/test"), json!({})).await?;
            if r["delivered"] == true {
                format!(
                    "delivered: the receiver answered HTTP {} in {} ms",
                    text(&r["status"]),
                    text(&r["took_ms"])
                )
            } else {
                anyhow::bail!(
                    "not delivered: {} ({} ms)",
                    text(&r["error"]),
                    text(&r["took_ms"])
                )
            }
        }
        Webhook::Deliveries { state, rows } => {
            let items = api
                .list(
                    &format!("{at}/deliveries"),
                    &given([("state", state)]),
                    rows,
                )
                .await?;
            table(&DELIVERY_HEADER, &delivery_rows(&items))
        }
        Webhook::Redeliver { id } => {
            let w = api
                .post(&format!("{at}/deliveries/{id}/redeliver"), json!({}))
                .await?;
            format!("delivery {id} is pending again\n{}", webhook_summary(&w))
        }
    })
}

pub(crate) async fn holds(
    conn: Conn,
    file: crate::config::AdminDefaults,
    cmd: Holds,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    Ok(match cmd {
        Holds::List { user, rows } => {
            let items = api
                .list(
                    &format!("/v1/orgs/{org}/holds"),
                    &given([("user", user)]),
                    rows,
                )
                .await?;
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|h| {
                    vec![
                        text(&h["request_id"]),
                        text(&h["user_id"]),
                        text(&h["api_key_id"]),
                        text(&h["group_ids"]),
                        dollars(&h["held_micros"]),
                        text(&h["placed_at"]),
                        text(&h["expires_at"]),
                    ]
                })
                .collect();
            table(
                &[
                    "REQUEST", "USER", "KEY", "GROUPS", "HELD", "PLACED", "EXPIRES",
                ],
                &rows,
            )
        }
        Holds::Release { request_id } => {
            let r = api
                .delete(&format!("/v1/orgs/{org}/holds/{}", seg(&request_id)?))
                .await?;
            format!(
                "{}: {}, {} freed\n",
                text(&r["request_id"]),
                text(&r["found"]),
                dollars(&r["released_micros"])
            )
        }
    })
}

/// What an audit entry changed, in a few words: its fields beside the
/// ones every entry has.
fn detail(e: &Value) -> String {
    let mut parts = Vec::new();
    for (k, v) in e.as_object().into_iter().flatten() {
        if matches!(
            k.as_str(),
            "seq" | "at" | "actor" | "type" | "kind" | "org_id"
        ) {
            continue;
        }
        let v = if k.ends_with("_micros") {
            dollars(v)
        } else {
            text(v)
        };
        parts.push(format!("{k}={v}"));
    }
    parts.join(" ")
}

pub(crate) async fn audit(
    conn: Conn,
    file: crate::config::AdminDefaults,
    a: AuditArgs,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let items = if a.operator {
        api.list("/v1/audit", &given([("order", a.order)]), a.rows)
            .await?
    } else {
        let org = seg(api.org()?)?;
        let kind = (!a.kind.is_empty()).then(|| a.kind.join(","));
        let query = given([
            ("order", a.order),
            ("actor", a.actor),
            ("kind", kind),
            ("subject", a.subject),
            ("from", a.from),
            ("to", a.to),
        ]);
        api.list(&format!("/v1/orgs/{org}/events"), &query, a.rows)
            .await?
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            let kind = if e["type"].is_null() {
                &e["kind"]
            } else {
                &e["type"]
            };
            let what = if e["detail"].is_null() {
                detail(e)
            } else {
                detail(&e["detail"])
            };
            vec![
                text(&e["seq"]),
                text(&e["at"]),
                text(&e["actor"]),
                text(kind),
                what,
            ]
        })
        .collect();
    Ok(table(&["SEQ", "AT", "ACTOR", "KIND", "DETAIL"], &rows))
}

/// What `tally enforcement` lists.
#[derive(Debug, Clone, Args)]
pub(crate) struct EnforcementArgs {
    /// Of this kind only: threshold_crossed, forecast_over_limit, cut_off or
    /// cutoff_lifted.
    #[arg(long)]
    event: Option<String>,
    /// About this subject only: user:<id>, group:<id>, key:<id> or org.
    #[arg(long)]
    subject: Option<String>,
    #[command(flatten)]
    rows: Rows,
}

pub(crate) async fn enforcement(
    conn: Conn,
    file: crate::config::AdminDefaults,
    args: EnforcementArgs,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let org = seg(api.org()?)?;
    let items = api
        .list(
            &format!("/v1/orgs/{org}/enforcement"),
            &given([("event", args.event), ("subject", args.subject)]),
            args.rows,
        )
        .await?;
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            vec![
                text(&e["at"]),
                format!("{} {}", text(&e["subject_kind"]), text(&e["subject_id"])),
                text(&e["event"]),
                text(if e["threshold"].is_null() {
                    &e["reason"]
                } else {
                    &e["threshold"]
                }),
                dollars(&e["spend_micros"]),
                dollars(&e["limit_micros"]),
            ]
        })
        .collect();
    Ok(table(
        &[
            "AT",
            "SUBJECT",
            "EVENT",
            "THRESHOLD/REASON",
            "SPEND",
            "LIMIT",
        ],
        &rows,
    ))
}

pub(crate) async fn dead_letters(
    conn: Conn,
    file: crate::config::AdminDefaults,
    d: DeadLetterArgs,
) -> anyhow::Result<String> {
    let api = Api::new(conn, file);
    let path = if d.all_orgs {
        "/v1/dead-letters".to_owned()
    } else {
        format!("/v1/orgs/{}/dead-letters", seg(api.org()?)?)
    };
    let items = api.list(&path, &[], d.rows).await?;
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|l| {
            vec![
                text(&l["logged_at"]),
                format!("{}/{}", text(&l["partition"]), text(&l["position"])),
                text(&l["org_id"]),
                text(&l["reason"]),
                text(&l["message"]),
            ]
        })
        .collect();
    Ok(table(
        &["LOGGED", "PARTITION/POSITION", "ORG", "REASON", "MESSAGE"],
        &rows,
    ))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::config::Cli;

    /// Every option and argument of every command says what it is.
    #[test]
    fn every_flag_has_help() {
        // Also: no argument takes the name of a global option above it
        // (a positional `token` would be sent as the bearer token).
        fn walk(cmd: &clap::Command, path: &str, globals: &[String], missing: &mut Vec<String>) {
            let mut globals = globals.to_vec();
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str().to_owned();
                if arg.is_hide_set() || matches!(id.as_str(), "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
                if arg.is_global_set() {
                    globals.push(id);
                } else if globals.contains(&id) {
                    missing.push(format!("{path} {id} (takes a global option's name)"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(
                    sub,
                    &format!("{path} {}", sub.get_name()),
                    &globals,
                    missing,
                );
            }
        }
        // clap's own checks (unique names, groups …), which it otherwise
        // runs only when a command is parsed.
        Cli::command().debug_assert();
        let mut missing = Vec::new();
        walk(&Cli::command(), "tally", &[], &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    #[test]
    fn cells_read_as_words() {
        assert_eq!(super::text(&serde_json::json!([])), "-");
        assert_eq!(super::text(&serde_json::json!(["a", "b"])), "a,b");
        assert_eq!(super::yes(&serde_json::json!(true)), "yes");
        assert_eq!(super::yes(&serde_json::json!(false)), "");
        assert_eq!(
            super::percent(&serde_json::json!(1), &serde_json::json!(3)),
            "33.3%"
        );
    }
}
