//! The admin CLI (issue 12): `tollgate keys|credits|accounts|usage|tokens|
//! reload …` talk to a running gateway's admin API over HTTP. The URL is
//! `--url`, else the one `server.listen` of `--config` names; the token is
//! `TOLLGATE_ADMIN_TOKEN` (else the token the gateway saved under
//! `storage.path`). People get tables, scripts `--json` (the API's answer
//! as sent). Exit codes: 0 done, 1 the gateway is unreachable or refused
//! the call (its error is printed), 2 a usage or config error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value, json};

use crate::config::Config;

/// Where the gateway is and how to print.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// The gateway's base URL (default: from `server.listen` in --config).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// The config file whose `server.listen` gives the default URL.
    #[arg(long, global = true, default_value = "config.toml")]
    pub config: PathBuf,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The admin commands (the top level of `tollgate` flattens these in).
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create, list, show, change, disable and delete keys.
    Keys {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Top up or deduct a key's (or, with --account, an account's) credit.
    Credits {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: CreditsCmd,
    },
    /// List, show and create accounts.
    Accounts {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: AccountsCmd,
    },
    /// Usage reports: the gateway's, a key's (--key) or an owner's (--owner).
    Usage {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        args: UsageArgs,
    },
    /// Scoped admin tokens: list, create, delete.
    Tokens {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// Make the gateway re-read its config file (like SIGHUP).
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
}

/// Fields of a key or account body besides the named flags.
#[derive(Args, Clone, Debug, Default)]
pub struct Sets {
    /// FIELD=VALUE, repeatable; VALUE is read as JSON when it parses
    /// (`rpm=60`, `models=["a"]`), else as a string.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

#[derive(Args, Clone, Debug, Default)]
pub struct KeyFields {
    /// A name for people.
    #[arg(long)]
    pub name: Option<String>,
    /// Spending limit in USD (exact decimal, e.g. 5.00).
    #[arg(long)]
    pub limit: Option<String>,
    /// Expiry (RFC 3339).
    #[arg(long)]
    pub expires_at: Option<String>,
    #[command(flatten)]
    pub sets: Sets,
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key; the key is printed once.
    Create {
        #[command(flatten)]
        fields: KeyFields,
        /// A plan from config.toml.
        #[arg(long)]
        plan: Option<String>,
        /// The user or account the key belongs to.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List keys.
    List {
        /// Only this owner's keys.
        #[arg(long)]
        owner: Option<String>,
        /// Disabled keys too.
        #[arg(long)]
        include_disabled: bool,
        /// Page size (1-1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Keys to skip.
        #[arg(long)]
        offset: Option<usize>,
    },
    /// Show one key.
    Show {
        /// The key's hash (64 hex characters).
        hash: String,
    },
    /// Change a key.
    Patch {
        /// The key's hash.
        hash: String,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Disable a key (PATCH disabled=true).
    Disable {
        /// The key's hash.
        hash: String,
    },
    /// Delete a key.
    Delete {
        /// The key's hash.
        hash: String,
    },
}

#[derive(Args, Clone, Debug)]
pub struct CreditArgs {
    /// The key's hash (or the account id with --account).
    pub target: String,
    /// Amount in USD (exact decimal).
    pub amount: String,
    /// Target an account instead of a key.
    #[arg(long)]
    pub account: bool,
    /// The ledger's reason for the change.
    #[arg(long, default_value = "tollgate CLI")]
    pub reason: String,
    /// Makes a retry of the same change apply once.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum CreditsCmd {
    /// Add credit.
    Topup(CreditArgs),
    /// Take credit away.
    Deduct(CreditArgs),
}

#[derive(Subcommand, Debug)]
pub enum AccountsCmd {
    /// List accounts.
    List {
        /// Page size (1-1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Accounts to skip.
        #[arg(long)]
        offset: Option<usize>,
    },
    /// Show one account.
    Show {
        /// The account id.
        id: String,
    },
    /// Create an account.
    Create {
        /// The account id (generated when absent).
        #[arg(long)]
        id: Option<String>,
        /// Where its mails go.
        #[arg(long)]
        email: Option<String>,
        /// A name for people.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        sets: Sets,
    },
}

#[derive(Args, Clone, Debug)]
pub struct UsageArgs {
    /// A key's usage (its hash).
    #[arg(long, conflicts_with = "owner")]
    pub key: Option<String>,
    /// An owner's usage.
    #[arg(long)]
    pub owner: Option<String>,
    /// The chart view (by period) instead of the detail.
    #[arg(long, conflicts_with = "logs")]
    pub chart: bool,
    /// A key's request log.
    #[arg(long)]
    pub logs: bool,
    /// NAME=VALUE query parameters, repeatable (`from=…`, `group_by=model`).
    #[arg(long = "query", value_name = "NAME=VALUE")]
    pub query: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum TokensCmd {
    /// List tokens (never their secrets).
    List,
    /// Create a token; it is printed once.
    Create {
        /// Who uses it (the audit log's actor).
        name: String,
        /// A scope, repeatable (keys:read, keys:write, credits:write,
        /// accounts:read, accounts:write, payments:read, payments:write,
        /// usage:read, audit:read, admin).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Delete a token: refused from its next call on.
    Delete {
        /// The token's id (`tok_…`).
        id: String,
    },
}

/// Why a command failed, and its exit code.
struct Failure {
    /// The exit code: 1 the gateway (down or refusing), 2 the user.
    code: u8,
    /// Printed after `error: `.
    message: String,
}

fn usage_error(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// Runs one admin command; prints its answer or its error.
pub fn run(cmd: AdminCommand) -> ExitCode {
    match execute(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// One HTTP call to make and how to show its answer.
struct Call {
    method: Method,
    /// Path and query, already percent-encoded.
    path: String,
    /// The JSON body, if the call sends one.
    body: Option<Value>,
    /// The table or field list people get.
    show: Show,
}

/// How an answer is printed for people.
#[derive(Clone, Copy)]
enum Show {
    Keys,
    Key,
    Accounts,
    Account,
    Tokens,
    Token,
    /// Fields of a small object, one per line.
    Object,
}

fn execute(cmd: AdminCommand) -> Result<(), Failure> {
    let (conn, call) = plan(cmd)?;
    let base = base_url(&conn)?;
    let token = admin_token(&conn)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("starting the runtime: {e}")))?;
    let (status, body) = rt.block_on(send(&base, &token, &call))?;
    let value: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    if !(200..300).contains(&status) {
        if conn.json {
            println!("{}", pretty(&value));
        }
        let msg = value["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| pretty(&value));
        let code = value["error"]["code"].as_str().unwrap_or("error");
        return Err(failed(format!(
            "the gateway answered {status} ({code}): {msg}"
        )));
    }
    if conn.json {
        println!("{}", pretty(&value));
    } else {
        print!("{}", render(call.show, &value));
    }
    Ok(())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// The call a command makes.
fn plan(cmd: AdminCommand) -> Result<(Conn, Call), Failure> {
    let call = |method: Method, path: String, body: Option<Value>, show: Show| Call {
        method,
        path,
        body,
        show,
    };
    Ok(match cmd {
        AdminCommand::Keys { conn, cmd } => {
            let c = match cmd {
                KeysCmd::Create {
                    fields,
                    plan,
                    owner,
                } => {
                    let mut body = key_body(&fields)?;
                    put(&mut body, "plan", plan);
                    put(&mut body, "owner", owner);
                    call(
                        Method::POST,
                        "/api/v1/keys".into(),
                        Some(Value::Object(body)),
                        Show::Key,
                    )
                }
                KeysCmd::List {
                    owner,
                    include_disabled,
                    limit,
                    offset,
                } => {
                    let mut q = Vec::new();
                    if let Some(o) = owner {
                        q.push(format!("owner={}", encode(&o)));
                    }
                    if include_disabled {
                        q.push("include_disabled=true".into());
                    }
                    page(&mut q, limit, offset);
                    call(
                        Method::GET,
                        with_query("/api/v1/keys", &q),
                        None,
                        Show::Keys,
                    )
                }
                KeysCmd::Show { hash } => call(
                    Method::GET,
                    format!("/api/v1/keys/{}", segment(&hash)?),
                    None,
                    Show::Key,
                ),
                KeysCmd::Patch { hash, fields } => {
                    let body = key_body(&fields)?;
                    if body.is_empty() {
                        return Err(usage_error(
                            "nothing to change: give --name, --limit, --expires-at or --set",
                        ));
                    }
                    call(
                        Method::PATCH,
                        format!("/api/v1/keys/{}", segment(&hash)?),
                        Some(Value::Object(body)),
                        Show::Key,
                    )
                }
                KeysCmd::Disable { hash } => call(
                    Method::PATCH,
                    format!("/api/v1/keys/{}", segment(&hash)?),
                    Some(json!({"disabled": true})),
                    Show::Key,
                ),
                KeysCmd::Delete { hash } => call(
                    Method::DELETE,
                    format!("/api/v1/keys/{}", segment(&hash)?),
                    None,
                    Show::Object,
                ),
            };
            (conn, c)
        }
        AdminCommand::Credits { conn, cmd } => {
            let (kind, a) = match cmd {
                CreditsCmd::Topup(a) => ("topup", a),
                CreditsCmd::Deduct(a) => ("deduct", a),
            };
            let mut body = Map::new();
            body.insert("kind".into(), kind.into());
            body.insert("amount".into(), Value::String(a.amount.clone()));
            body.insert("reason".into(), Value::String(a.reason.clone()));
            put(&mut body, "idempotency_key", a.idempotency_key.clone());
            let what = if a.account { "accounts" } else { "keys" };
            let path = format!("/api/v1/{what}/{}/credits", segment(&a.target)?);
            (
                conn,
                call(Method::POST, path, Some(Value::Object(body)), Show::Object),
            )
        }
        AdminCommand::Accounts { conn, cmd } => {
            let c = match cmd {
                AccountsCmd::List { limit, offset } => {
                    let mut q = Vec::new();
                    page(&mut q, limit, offset);
                    call(
                        Method::GET,
                        with_query("/api/v1/accounts", &q),
                        None,
                        Show::Accounts,
                    )
                }
                AccountsCmd::Show { id } => call(
                    Method::GET,
                    format!("/api/v1/accounts/{}", segment(&id)?),
                    None,
                    Show::Account,
                ),
                AccountsCmd::Create {
                    id,
                    email,
                    name,
                    sets,
                } => {
                    let mut body = set_fields(&sets)?;
                    put(&mut body, "id", id);
                    put(&mut body, "email", email);
                    put(&mut body, "name", name);
                    call(
                        Method::POST,
                        "/api/v1/accounts".into(),
                        Some(Value::Object(body)),
                        Show::Account,
                    )
                }
            };
            (conn, c)
        }
        AdminCommand::Usage { conn, args } => {
            let view = if args.chart {
                "/chart"
            } else if args.logs {
                "/logs"
            } else {
                ""
            };
            let path = match (&args.key, &args.owner) {
                (Some(h), _) => format!("/api/v1/keys/{}/usage{view}", segment(h)?),
                (None, Some(o)) => format!("/api/v1/owners/{}/usage{view}", encode(o)),
                (None, None) if view.is_empty() => "/api/v1/usage".into(),
                (None, None) => {
                    return Err(usage_error("--chart and --logs need --key or --owner"));
                }
            };
            let mut q = Vec::new();
            for pair in &args.query {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| usage_error(format!("--query {pair:?}: expected NAME=VALUE")))?;
                q.push(format!("{}={}", encode(k), encode(v)));
            }
            (
                conn,
                call(Method::GET, with_query(&path, &q), None, Show::Object),
            )
        }
        AdminCommand::Tokens { conn, cmd } => {
            let c = match cmd {
                TokensCmd::List => call(
                    Method::GET,
                    "/api/v1/admin/tokens".into(),
                    None,
                    Show::Tokens,
                ),
                TokensCmd::Create { name, scopes } => call(
                    Method::POST,
                    "/api/v1/admin/tokens".into(),
                    Some(json!({"name": name, "scopes": scopes})),
                    Show::Token,
                ),
                TokensCmd::Delete { id } => call(
                    Method::DELETE,
                    format!("/api/v1/admin/tokens/{}", segment(&id)?),
                    None,
                    Show::Object,
                ),
            };
            (conn, c)
        }
        AdminCommand::Reload { conn } => (
            conn,
            call(
                Method::POST,
                "/api/v1/admin/reload".into(),
                None,
                Show::Object,
            ),
        ),
    })
}

fn put(body: &mut Map<String, Value>, name: &str, v: Option<String>) {
    if let Some(v) = v {
        body.insert(name.to_owned(), Value::String(v));
    }
}

fn page(q: &mut Vec<String>, limit: Option<usize>, offset: Option<usize>) {
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if let Some(o) = offset {
        q.push(format!("offset={o}"));
    }
}

fn with_query(path: &str, q: &[String]) -> String {
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

/// A path segment the user typed: sent as is when it is plain (hashes,
/// ids), refused when it would change the path.
fn segment(s: &str) -> Result<String, Failure> {
    if s.is_empty() || s.contains(['/', '?', '#', '%']) || s == "." || s == ".." {
        return Err(usage_error(format!("{s:?} is not a valid id or hash")));
    }
    Ok(encode(s))
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn key_body(f: &KeyFields) -> Result<Map<String, Value>, Failure> {
    let mut body = set_fields(&f.sets)?;
    put(&mut body, "name", f.name.clone());
    put(&mut body, "limit", f.limit.clone());
    put(&mut body, "expires_at", f.expires_at.clone());
    Ok(body)
}

fn set_fields(s: &Sets) -> Result<Map<String, Value>, Failure> {
    let mut body = Map::new();
    for pair in &s.set {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| usage_error(format!("--set {pair:?}: expected FIELD=VALUE")))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        body.insert(k.to_owned(), value);
    }
    Ok(body)
}

/// `--url`, else `http(s)://` + `server.listen` of the config (a wildcard
/// address means this host).
fn base_url(conn: &Conn) -> Result<String, Failure> {
    if let Some(u) = &conn.url {
        let u = u.trim_end_matches('/');
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(usage_error(format!(
                "--url {u:?} must start with http:// or https://"
            )));
        }
        return Ok(u.to_owned());
    }
    let config = Config::load(&conn.config).map_err(|e| {
        usage_error(format!(
            "no --url given, and the config for its default could not be read: {e}"
        ))
    })?;
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{addr}"))
}

/// `TOLLGATE_ADMIN_TOKEN` (or the variable `admin.token_env` names), else
/// the token a gateway generated and saved under `storage.path`.
fn admin_token(conn: &Conn) -> Result<String, Failure> {
    let config = Config::load(&conn.config).ok();
    let var = config
        .as_ref()
        .map_or("TOLLGATE_ADMIN_TOKEN", |c| c.admin.token_env.as_str());
    for v in [var, "TOLLGATE_ADMIN_TOKEN"] {
        if let Ok(t) = std::env::var(v)
            && !t.trim().is_empty()
        {
            return Ok(t.trim().to_owned());
        }
    }
    if let Some(c) = &config
        && let Ok(t) = std::fs::read_to_string(c.storage.path.join("admin_token"))
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    Err(usage_error(
        "no admin token: set TOLLGATE_ADMIN_TOKEN (the root token or a scoped one)",
    ))
}

/// Time allowed for the whole call: an admin answer is quick.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn send(base: &str, token: &str, call: &Call) -> Result<(u16, Bytes), Failure> {
    crate::runtime::install_crypto_provider();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let uri = format!("{base}{}", call.path);
    let body = match &call.body {
        Some(v) => Bytes::from(serde_json::to_vec(v).expect("a Value always serializes")),
        None => Bytes::new(),
    };
    let mut req = Request::builder()
        .method(call.method.clone())
        .uri(&uri)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    if call.body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| usage_error(format!("{uri}: {e}")))?;
    let down = |e: &dyn std::fmt::Display| {
        failed(format!(
            "could not reach the gateway at {base}: {e}. Is it running? (--url sets the address)"
        ))
    };
    let res = tokio::time::timeout(CALL_TIMEOUT, client.request(req))
        .await
        .map_err(|_| down(&"no answer in time"))?
        .map_err(|e| down(&error_chain(&e)))?;
    let status = res.status().as_u16();
    let bytes = tokio::time::timeout(CALL_TIMEOUT, res.into_body().collect())
        .await
        .map_err(|_| down(&"the answer stalled"))?
        .map_err(|e| down(&e))?
        .to_bytes();
    Ok((status, bytes))
}

/// An error and its causes (`client error (Connect): connection refused`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

// ---- tables ----

/// A value as one table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Rows under a header, columns padded to their widest cell.
fn table(columns: &[&str], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<String>| {
        let mut s = items
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(columns.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        out.push_str(&line(r));
    }
    out
}

/// Fields of an object, one per line (nested objects as JSON).
fn fields(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{}\n", cell(v));
    };
    let w = obj.keys().map(|k| k.len()).max().unwrap_or(0);
    obj.iter()
        .map(|(k, v)| format!("{k:<w$}  {}\n", cell(v)))
        .collect()
}

const KEY_COLUMNS: &[&str] = &[
    "hash",
    "name",
    "label",
    "owner",
    "plan",
    "disabled",
    "limit",
    "usage",
    "expires_at",
];
const ACCOUNT_COLUMNS: &[&str] = &[
    "id",
    "email",
    "name",
    "status",
    "balance",
    "allowance",
    "keys",
];
const TOKEN_COLUMNS: &[&str] = &["id", "name", "scopes", "created_at"];

fn list_of(v: &Value) -> &[Value] {
    v["data"].as_array().map_or(&[], Vec::as_slice)
}

fn render(show: Show, v: &Value) -> String {
    let data = if v.get("data").is_some() {
        &v["data"]
    } else {
        v
    };
    let mut out = match show {
        Show::Keys => table(KEY_COLUMNS, list_of(v)),
        Show::Accounts => table(ACCOUNT_COLUMNS, list_of(v)),
        Show::Tokens => table(TOKEN_COLUMNS, list_of(v)),
        Show::Key | Show::Account | Show::Token | Show::Object => fields(data),
    };
    // A secret shown once: said so.
    for (name, what) in [("key", "key"), ("token", "token")] {
        if let Some(s) = v.get(name).and_then(Value::as_str) {
            out.push_str(&format!(
                "\n{what}: {s}\n(shown once: store it now; the gateway keeps only its hash)\n"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_show_missing_as_dash() {
        let rows = vec![
            json!({"id": "a", "name": "long name"}),
            json!({"id": "bbb"}),
        ];
        let t = table(&["id", "name"], &rows);
        assert_eq!(t, "ID   NAME\na    long name\nbbb  -\n");
    }

    #[test]
    fn segments_cannot_change_the_path() {
        assert!(segment("../x").is_err());
        assert!(segment("a%2F").is_err());
        assert_eq!(segment("acc_1").ok().unwrap(), "acc_1");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn set_reads_json_or_text() {
        let s = Sets {
            set: vec!["rpm=60".into(), "name=bob".into(), "models=[\"a\"]".into()],
        };
        let m = set_fields(&s).ok().unwrap();
        assert_eq!(m["rpm"], json!(60));
        assert_eq!(m["name"], json!("bob"));
        assert_eq!(m["models"], json!(["a"]));
        assert!(
            set_fields(&Sets {
                set: vec!["=x".into()]
            })
            .is_err()
        );
    }
}
