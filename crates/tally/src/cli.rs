//! The admin CLI: the HTTP API from a terminal, with readable tables and
//! dollars. `tally users list --sort -spend --group eng`,
//! `tally groups add-members eng alice bob`, `tally keys create …`.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tally_core::money::{format_usd, parse_usd};

/// Where and as whom.
#[derive(Debug, Clone, Args)]
pub(crate) struct Conn {
    /// The Tally API.
    #[arg(
        long,
        env = "TALLY_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub(crate) url: String,
    /// The operator token or an org admin token.
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
    /// The org to work on.
    #[arg(long, env = "TALLY_ORG", global = true)]
    pub(crate) org: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Orgs {
    /// Create an org (operator token).
    Create {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: String,
        /// The monthly limit new members get, in dollars (or `unlimited`).
        #[arg(long)]
        default_limit: Option<String>,
        /// The org's own monthly limit on everyone's spend together, in
        /// dollars.
        #[arg(long)]
        limit: Option<String>,
    },
    /// The org, its spend this month and its history.
    Show,
    /// Mint a token of the org (shown once).
    Token {
        /// admin (everything in the org), viewer (reads only) or gateway
        /// (authorize, usage and holds for this org; the operator's to mint).
        #[arg(long, default_value = "admin")]
        role: String,
        /// What it is for.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Users {
    /// List members: `--sort -spend`, `--group eng`, `--status active`, …
    List {
        /// name, email, spend, limit, utilization, last_active; `-` for descending.
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        status: Option<String>,
        /// Part of a name, email or id.
        #[arg(long)]
        q: Option<String>,
        /// Only members cut off for the month.
        #[arg(long)]
        cut_off: bool,
        /// Rows to show (all pages are read up to this many). Default 50.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Add a member.
    Add {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        email: String,
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
    Show { user: String },
    /// Change a member's limit, status, name or email.
    Update {
        user: String,
        #[arg(long)]
        limit: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        email: Option<String>,
    },
    /// Remove a member (history stays).
    Remove { user: String },
    /// One change to many members, all or nothing.
    Bulk {
        /// Comma-separated user ids.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        add_groups: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        remove_groups: Vec<String>,
        #[arg(long)]
        limit: Option<String>,
        #[arg(long)]
        status: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Groups {
    List,
    Create {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: String,
        /// Monthly limit in dollars.
        #[arg(long)]
        limit: Option<String>,
    },
    /// A group, its history and its top members.
    Show {
        group: String,
    },
    AddMembers {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    RemoveMembers {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    Delete {
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Keys {
    List,
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: String,
        /// The owner.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// Monthly limit in dollars.
        #[arg(long)]
        limit: Option<String>,
        /// When authorize starts refusing it (RFC 3339, e.g.
        /// 2027-01-31T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Change a key: only what is given changes.
    Update {
        key: String,
        #[arg(long)]
        name: Option<String>,
        /// The owner; `none` for a key of its groups only.
        #[arg(long)]
        user: Option<String>,
        /// Every group of the key (replaces them); `none` for no group.
        #[arg(long, value_delimiter = ',')]
        groups: Option<Vec<String>>,
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
        key: String,
        /// Seconds the old secret keeps working (at most 604800, 7 days).
        #[arg(long, default_value_t = 0)]
        grace_seconds: i64,
    },
    Revoke {
        key: String,
    },
}

/// A limit argument: dollars, or `unlimited` (JSON null).
fn limit(s: &str) -> anyhow::Result<Value> {
    if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
        return Ok(Value::Null);
    }
    let micros = parse_usd(s)
        .with_context(|| format!("{s:?} is not an amount in dollars (e.g. 50 or 12.50)"))?;
    Ok(json!(micros))
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
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Prints rows under a header, columns padded to their widest cell.
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
    conn: Conn,
}

impl Api {
    fn new(conn: Conn) -> Api {
        Api {
            http: reqwest::Client::new(),
            conn,
        }
    }

    fn org(&self) -> anyhow::Result<&str> {
        self.conn
            .org
            .as_deref()
            .context("which org? pass --org or set TALLY_ORG")
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.conn.url.trim_end_matches('/'));
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.conn.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
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
            bail!("{status}: {code}: {message}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
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
                flag(&u["cut_off"], "CUT OFF"),
                text(&u["groups"]),
            ]
        })
        .collect()
}

const USER_HEADER: [&str; 9] = [
    "ID", "NAME", "EMAIL", "STATUS", "SPEND", "LIMIT", "USED", "", "GROUPS",
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

fn path(segment: &str) -> String {
    // Ids are [A-Za-z0-9._-]: nothing to escape; anything else the server
    // refuses with a clear message.
    segment.to_owned()
}

pub(crate) async fn orgs(conn: Conn, cmd: Orgs) -> anyhow::Result<String> {
    let api = Api::new(conn);
    Ok(match cmd {
        Orgs::Create {
            id,
            name,
            default_limit,
            limit: org_limit,
        } => {
            let mut body = json!({"name": name});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(l) = default_limit {
                body["default_monthly_limit_micros"] = limit(&l)?;
            }
            if let Some(l) = org_limit {
                body["monthly_limit_micros"] = limit(&l)?;
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
        Orgs::Show => {
            let o = api.get(&format!("/v1/orgs/{}", path(api.org()?))).await?;
            format!(
                "{} ({})\nspend in {}: {} over {} requests, org limit {}\ndefault limit for new members: {}\nalert thresholds: {}\n\n{}",
                text(&o["name"]),
                text(&o["id"]),
                text(&o["month"]),
                dollars(&o["spend_micros"]),
                text(&o["requests"]),
                dollars(&o["monthly_limit_micros"]),
                dollars(&o["default_monthly_limit_micros"]),
                text(&o["alert_thresholds"]),
                history(&o)
            )
        }
        Orgs::Token { role, name } => {
            let t = api
                .post(
                    &format!("/v1/orgs/{}/tokens", path(api.org()?)),
                    json!({"role": role, "name": name}),
                )
                .await?;
            format!(
                "org {} token {} for {} (shown once): {}\n",
                text(&t["role"]),
                text(&t["id"]),
                text(&t["org_id"]),
                text(&t["token"])
            )
        }
    })
}

pub(crate) async fn users(conn: Conn, cmd: Users) -> anyhow::Result<String> {
    let api = Api::new(conn);
    let org = path(api.org()?);
    Ok(match cmd {
        Users::List {
            sort,
            group,
            status,
            q,
            cut_off,
            limit: want,
        } => {
            let mut query: Vec<(String, String)> = Vec::new();
            for (k, v) in [
                ("sort", sort),
                ("group", group),
                ("status", status),
                ("q", q),
            ] {
                if let Some(v) = v {
                    query.push((k.into(), v));
                }
            }
            if cut_off {
                query.push(("cut_off".into(), "true".into()));
            }
            query.push(("limit".into(), want.clamp(1, 1000).to_string()));
            let mut items: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut q = query.clone();
                if let Some(c) = &cursor {
                    q.push(("cursor".into(), c.clone()));
                }
                let url =
                    reqwest::Url::parse_with_params(&format!("http://x/v1/orgs/{org}/users"), &q)?;
                let page = api
                    .get(&format!("{}?{}", url.path(), url.query().unwrap_or("")))
                    .await?;
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                cursor = page["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() || items.len() >= want {
                    break;
                }
            }
            items.truncate(want);
            table(&USER_HEADER, &user_rows(&items))
        }
        Users::Add {
            id,
            email,
            name,
            limit: l,
            active,
        } => {
            let mut body = json!({"email": email, "name": name});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(l) = l {
                body["monthly_limit_micros"] = limit(&l)?;
            }
            if active {
                body["status"] = json!("active");
            }
            let u = api.post(&format!("/v1/orgs/{org}/users"), body).await?;
            table(&USER_HEADER, &user_rows(&[u]))
        }
        Users::Show { user } => {
            let u = api
                .get(&format!("/v1/orgs/{org}/users/{}", path(&user)))
                .await?;
            format!(
                "{}\n{}",
                table(&USER_HEADER, &user_rows(std::slice::from_ref(&u))),
                history(&u)
            )
        }
        Users::Update {
            user,
            limit: l,
            status,
            name,
            email,
        } => {
            let mut body = json!({});
            if let Some(l) = l {
                body["monthly_limit_micros"] = limit(&l)?;
            }
            for (k, v) in [("status", status), ("name", name), ("email", email)] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let u = api
                .send(
                    reqwest::Method::PATCH,
                    &format!("/v1/orgs/{org}/users/{}", path(&user)),
                    Some(body),
                )
                .await?;
            table(&USER_HEADER, &user_rows(&[u]))
        }
        Users::Remove { user } => {
            let u = api
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/orgs/{org}/users/{}", path(&user)),
                    None,
                )
                .await?;
            format!("removed {}\n", text(&u["id"]))
        }
        Users::Bulk {
            users,
            add_groups,
            remove_groups,
            limit: l,
            status,
        } => {
            let mut body = json!({"user_ids": users, "add_groups": add_groups, "remove_groups": remove_groups});
            if let Some(l) = l {
                body["monthly_limit_micros"] = limit(&l)?;
            }
            if let Some(s) = status {
                body["status"] = json!(s);
            }
            let r = api
                .post(&format!("/v1/orgs/{org}/users/bulk"), body)
                .await?;
            let changes: Vec<Vec<String>> = r["changes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| vec![k.clone(), text(v)])
                .collect();
            format!(
                "{} of {} users changed\n{}",
                text(&r["users_changed"]),
                text(&r["users"]),
                table(&["CHANGE", "COUNT"], &changes)
            )
        }
    })
}

/// `label` when the JSON value is `true`, else an empty cell.
fn flag(v: &Value, label: &str) -> String {
    if *v == true {
        label.to_owned()
    } else {
        String::new()
    }
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
                flag(&g["cut_off"], "CUT OFF"),
            ]
        })
        .collect()
}

const GROUP_HEADER: [&str; 6] = ["ID", "NAME", "MEMBERS", "SPEND", "LIMIT", ""];

pub(crate) async fn groups(conn: Conn, cmd: Groups) -> anyhow::Result<String> {
    let api = Api::new(conn);
    let org = path(api.org()?);
    Ok(match cmd {
        Groups::List => {
            let page = api
                .get(&format!("/v1/orgs/{org}/groups?limit=1000"))
                .await?;
            table(
                &GROUP_HEADER,
                &group_rows(page["items"].as_array().map_or(&[], Vec::as_slice)),
            )
        }
        Groups::Create { id, name, limit: l } => {
            let mut body = json!({"name": name});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(l) = l {
                body["monthly_limit_micros"] = limit(&l)?;
            }
            let g = api.post(&format!("/v1/orgs/{org}/groups"), body).await?;
            table(&GROUP_HEADER, &group_rows(&[g]))
        }
        Groups::Show { group } => {
            let g = api
                .get(&format!("/v1/orgs/{org}/groups/{}", path(&group)))
                .await?;
            let members = g["members"].as_array().cloned().unwrap_or_default();
            format!(
                "{}\n{}\nTOP MEMBERS THIS MONTH\n{}",
                table(&GROUP_HEADER, &group_rows(std::slice::from_ref(&g))),
                history(&g),
                table(&USER_HEADER, &user_rows(&members))
            )
        }
        Groups::AddMembers { group, users } => membership(&api, &org, &group, &users, true).await?,
        Groups::RemoveMembers { group, users } => {
            membership(&api, &org, &group, &users, false).await?
        }
        Groups::Delete { group } => {
            let _ = api
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/orgs/{org}/groups/{}", path(&group)),
                    None,
                )
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
        .get(&format!("/v1/orgs/{org}/groups/{}", path(group)))
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
                flag(&k["revoked"], "REVOKED"),
            ]
        })
        .collect()
}

const KEY_HEADER: [&str; 8] = [
    "ID", "NAME", "OWNER", "GROUPS", "FEATURES", "SPEND", "LIMIT", "",
];

pub(crate) async fn keys(conn: Conn, cmd: Keys) -> anyhow::Result<String> {
    let api = Api::new(conn);
    let org = path(api.org()?);
    Ok(match cmd {
        Keys::List => {
            let page = api.get(&format!("/v1/orgs/{org}/keys?limit=1000")).await?;
            table(
                &KEY_HEADER,
                &key_rows(page["items"].as_array().map_or(&[], Vec::as_slice)),
            )
        }
        Keys::Create {
            id,
            name,
            user,
            groups,
            features,
            limit: l,
            expires,
        } => {
            let mut body = json!({"name": name, "group_ids": groups, "features": features});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(u) = user {
                body["user_id"] = json!(u);
            }
            if let Some(l) = l {
                body["monthly_limit_micros"] = limit(&l)?;
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
        Keys::Update {
            key,
            name,
            user,
            groups,
            features,
            limit: l,
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
            if let Some(l) = l {
                body["monthly_limit_micros"] = limit(&l)?;
            }
            if let Some(e) = expires {
                body["expires_at"] = if e.eq_ignore_ascii_case("never") {
                    Value::Null
                } else {
                    json!(e)
                };
            }
            let k = api
                .send(
                    reqwest::Method::PATCH,
                    &format!("/v1/orgs/{org}/keys/{}", path(&key)),
                    Some(body),
                )
                .await?;
            table(&KEY_HEADER, &key_rows(&[k]))
        }
        Keys::Rotate { key, grace_seconds } => {
            let k = api
                .post(
                    &format!("/v1/orgs/{org}/keys/{}/rotate", path(&key)),
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
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/orgs/{org}/keys/{}", path(&key)),
                    None,
                )
                .await?;
            table(&KEY_HEADER, &key_rows(&[k]))
        }
    })
}
