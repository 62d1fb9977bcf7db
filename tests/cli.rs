//! The `tollgate` binary as a user runs it: `--help`, `check-config` on the
//! committed example and on broken files, `mock-upstream` and `serve` on
//! port 0, and a graceful exit on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A bound that only turns a hang into a failure.
const HANG: Duration = Duration::from_secs(20);

fn tollgate(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("OPENAI_API_KEY")
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env("TOLLGATE_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn help_for_every_subcommand() {
    let out = run(&mut tollgate(&["--help"]));
    assert!(out.status.success());
    let top = text(&out.stdout);
    for sub in [
        "serve",
        "mock-upstream",
        "check-config",
        "keys",
        "credits",
        "accounts",
        "usage",
        "tokens",
        "reload",
    ] {
        assert!(top.contains(sub), "--help lists {sub}: {top}");
    }
    for (sub, option) in [
        ("serve", "--config"),
        ("mock-upstream", "--listen"),
        ("check-config", "--config"),
    ] {
        let out = run(&mut tollgate(&[sub, "--help"]));
        let help = text(&out.stdout);
        assert!(out.status.success(), "{sub} --help: {}", text(&out.stderr));
        assert!(
            help.contains("Usage:") && help.contains(option),
            "{sub} --help: {help}"
        );
    }
    // An unknown subcommand is a usage error, not a crash.
    let out = run(&mut tollgate(&["frobnicate"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_prints_the_example_with_secrets_masked() {
    let openai = "sk-proj-cli-test-Secret-0123456789abcdefXYZ";
    let admin = "tg-admin-cli-test-Secret-0123456789abcdef";
    let out = run(tollgate(&["check-config", "--config", "config.toml"])
        .env("OPENAI_API_KEY", openai)
        .env("TOLLGATE_ADMIN_TOKEN", admin));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "check-config config.toml: {}",
        text(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).expect("check-config prints JSON");
    assert!(
        v["plans"]["trial"].is_object(),
        "the trial plan is listed: {stdout}"
    );
    assert!(!v["plans"]["trial"]["limit"].is_null(), "{stdout}");
    for secret in [openai, admin] {
        assert!(!stdout.contains(secret), "a secret was printed: {stdout}");
        assert!(!text(&out.stderr).contains(secret));
    }
    let upstream = v["upstreams"][0]["api_key"].as_str().unwrap_or_default();
    assert!(
        upstream.starts_with("set (") && upstream.contains('…'),
        "the upstream key is shown masked: {upstream}"
    );
    assert!(
        v["admin"]["token"]
            .as_str()
            .unwrap_or_default()
            .contains('…'),
        "{stdout}"
    );
    // Unset, it says so instead.
    let out = run(&mut tollgate(&["check-config", "--config", "config.toml"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        v["upstreams"][0]["api_key"]
            .as_str()
            .is_some_and(|s| s.contains("OPENAI_API_KEY is not set")),
        "{v}"
    );
}

/// Writes `body` to a file and runs `check-config` on it; the config is
/// expected to be refused. Returns stderr.
fn refused(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write config");
    let out = run(&mut tollgate(&[
        "check-config",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]));
    assert!(
        !out.status.success(),
        "{name} must be refused; printed {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

const MOCK_UPSTREAM: &str =
    "\n[[upstreams]]\nname = \"mock\"\nmock = true\nmodels = [\"demo-*\"]\n";

#[test]
fn check_config_names_the_bad_key_and_line() {
    let dir = temp_dir("bad-config");
    let e = refused(
        &dir,
        "unknown.toml",
        &format!("[server]\nlisten = \"127.0.0.1:0\"\nlisten_backlog = 5\n{MOCK_UPSTREAM}"),
    );
    assert!(
        e.contains("listen_backlog") && e.contains("line 3"),
        "unknown key: {e}"
    );
    let e = refused(
        &dir,
        "money.toml",
        &format!("{MOCK_UPSTREAM}\n[models.\"demo-chat\"]\ninput = \"0.15\"\noutput = \"1.2.3\"\n"),
    );
    assert!(
        e.contains("output") && e.contains("line 9"),
        "bad money string: {e}"
    );
    let e = refused(
        &dir,
        "float.toml",
        &format!("{MOCK_UPSTREAM}\n[models.\"demo-chat\"]\ninput = 0.15\noutput = \"1\"\n"),
    );
    assert!(
        e.contains("input") && e.contains("line 8"),
        "money as a float: {e}"
    );
    let e = refused(&dir, "missing.toml", "");
    assert!(!e.is_empty());
    let out = run(&mut tollgate(&[
        "check-config",
        "--config",
        "/nonexistent/tollgate.toml",
    ]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/tollgate.toml"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child process whose stdout lines are read on a thread, killed on drop.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// The first stdout line that starts with `prefix`, and the lines
    /// before it.
    fn wait_for_line(&self, prefix: &str) -> (String, Vec<String>) {
        let deadline = Instant::now() + HANG;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return (line, before),
                Ok(line) => before.push(line),
                Err(e) => panic!("no line starting with {prefix:?} ({e}); got {before:?}"),
            }
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = Instant::now() + HANG;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address in `… http://ADDR` or `… http://ADDR/v1`.
fn address_in(line: &str) -> SocketAddr {
    let at = line.find("http://").expect("an http:// URL") + "http://".len();
    let rest = &line[at..];
    let end = rest.find('/').unwrap_or(rest.len());
    rest[..end].trim().parse().expect("a socket address")
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body). A
/// chunked body is returned with its chunk framing, which the callers
/// only search.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(HANG)).expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req += "Content-Type: application/json\r\n";
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    req += body;
    stream.write_all(req.as_bytes()).expect("write");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).expect("read");
    let got = text(&got);
    let status = got
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {got:?}"));
    let body = got
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The string value of `"name":"…"` in a JSON text.
fn json_string(body: &str, name: &str) -> String {
    let needle = format!("\"{name}\":\"");
    let at = body
        .find(&needle)
        .unwrap_or_else(|| panic!("{name} in {body}"))
        + needle.len();
    body[at..]
        .split('"')
        .next()
        .expect("a closing quote")
        .to_owned()
}

const CHAT: &str = r#"{"model":"demo-chat","messages":[{"role":"user","content":"Hello"}]}"#;

#[test]
fn mock_upstream_on_port_zero() {
    let mut mock = Running::spawn(&mut tollgate(&[
        "mock-upstream",
        "--listen",
        "127.0.0.1:0",
        "--chunks",
        "3",
    ]));
    let (line, _) = mock.wait_for_line("mock upstream listening on http://");
    let addr = address_in(&line);
    assert_ne!(addr.port(), 0, "the actual port is printed: {line}");
    let (status, body) = http(addr, "POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    let (status, body) = http(addr, "GET", "/v1/models", &[], "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("demo-chat"), "{body}");
    let status = mock.terminate();
    assert!(
        status.success(),
        "mock-upstream exits 0 on SIGTERM: {status}"
    );
}

#[test]
fn serve_answers_then_exits_cleanly_on_sigterm() {
    let dir = temp_dir("serve");
    let config = dir.join("tollgate.toml");
    let data = dir.join("data");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[runtime]\nworkers = 1\n[storage]\npath = \"{}\"\nflush_ms = 5\n{MOCK_UPSTREAM}\n[models.\"demo-chat\"]\ninput = \"0.15\"\noutput = \"0.60\"\n",
            data.display()
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path").to_owned();

    // First start: no admin token anywhere, so one is generated, printed
    // once and saved.
    let mut gw = Running::spawn(&mut tollgate(&["serve", "--config", &config]));
    let (line, before) = gw.wait_for_line("Tollgate listening on http://");
    let addr = address_in(&line);
    assert_ne!(addr.port(), 0, "{line}");
    let token = before
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("tg-admin-"))
        .unwrap_or_else(|| panic!("the generated admin token is printed: {before:?}"))
        .to_owned();
    assert_eq!(
        std::fs::read_to_string(data.join("admin_token"))
            .expect("the token is saved")
            .trim(),
        token
    );
    let (status, body) = http(addr, "GET", "/healthz", &[], "");
    assert_eq!(status, 200, "{body}");
    let admin = format!("Bearer {token}");
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/keys",
        &[("authorization", &admin)],
        r#"{"name":"cli"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let key = json_string(&body, "key");
    let auth = format!("Bearer {key}");
    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &auth)],
        CHAT,
    );
    assert_eq!(status, 200, "{body}");
    let status = gw.terminate();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status}");

    // Second start on the same storage: the saved token is used (and not
    // printed again), and the key made before the restart still works.
    let gw = Running::spawn(&mut tollgate(&["serve", "--config", &config]));
    let (line, before) = gw.wait_for_line("Tollgate listening on http://");
    assert!(
        !before.iter().any(|l| l.contains(&token)),
        "the token is shown once only"
    );
    let addr = address_in(&line);
    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &auth)],
        CHAT,
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = http(
        addr,
        "GET",
        "/api/v1/keys",
        &[("authorization", &admin)],
        "",
    );
    assert_eq!(status, 200);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the admin CLI against a live gateway (issue 12) ----

const CLI_ADMIN: &str = "tg-admin-cli-live-test-0123456789abcdefghij";

/// A free port on 127.0.0.1 (bound, then released for the gateway).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A gateway from `tollgate serve` on a fixed port, so that the CLI's
/// default URL (from the same config's `server.listen`) is tested too.
fn live_gateway(tag: &str, extra: &str) -> (Running, PathBuf, PathBuf, SocketAddr) {
    let dir = temp_dir(tag);
    let config = dir.join("tollgate.toml");
    let port = free_port();
    write_live_config(&config, &dir.join("data"), port, extra);
    let gw = Running::spawn(
        tollgate(&["serve", "--config", config.to_str().expect("utf-8")])
            .env("TOLLGATE_ADMIN_TOKEN", CLI_ADMIN),
    );
    let (line, _) = gw.wait_for_line("Tollgate listening on http://");
    let addr = address_in(&line);
    assert_eq!(addr.port(), port);
    (gw, dir, config, addr)
}

fn write_live_config(config: &Path, data: &Path, port: u16, extra: &str) {
    std::fs::write(
        config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[runtime]\nworkers = 1\n[storage]\npath = \"{}\"\nflush_ms = 5\n{MOCK_UPSTREAM}\n[models.\"demo-chat\"]\ninput = \"0.15\"\noutput = \"0.60\"\n{extra}",
            data.display()
        ),
    )
    .expect("write config");
}

/// Runs an admin command with `token`; (exit code, stdout, stderr).
fn admin_cli(config: &Path, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    let config = config.to_str().expect("utf-8");
    all.extend(["--config", config]);
    let out = run(tollgate(&all).env("TOLLGATE_ADMIN_TOKEN", token));
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// `--json` output of a command that must succeed.
fn admin_json(config: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = admin_cli(config, CLI_ADMIN, &all);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {out}"))
}

#[test]
fn cli_manages_keys_credits_accounts_and_tokens_on_a_live_gateway() {
    let (gw, dir, config, _) = live_gateway("cli-live", "");

    // Keys: create (shown once), list, show, patch, disable, delete.
    let created = admin_json(
        &config,
        &[
            "keys", "create", "--name", "alice", "--limit", "5.00", "--owner", "o1", "--set",
            "rpm=60",
        ],
    );
    let hash = created["data"]["hash"].as_str().expect("hash").to_owned();
    assert!(created["key"].as_str().unwrap().starts_with("sk-tg-"));
    assert_eq!(created["data"]["rpm"], 60);
    let (code, table, err) = admin_cli(&config, CLI_ADMIN, &["keys", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("HASH"), "a table with a header: {table}");
    assert!(table.contains(&hash) && table.contains("alice"), "{table}");
    let shown = admin_json(&config, &["keys", "show", &hash]);
    assert_eq!(shown["data"]["name"], "alice");
    let patched = admin_json(&config, &["keys", "patch", &hash, "--name", "alice2"]);
    assert_eq!(patched["data"]["name"], "alice2");
    let (code, human, _) = admin_cli(&config, CLI_ADMIN, &["keys", "show", &hash]);
    assert_eq!(code, 0);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("name") && l.ends_with("alice2")),
        "{human}"
    );

    // Credits, in exact decimals.
    let topped = admin_json(
        &config,
        &["credits", "topup", &hash, "2.50", "--reason", "gift"],
    );
    assert!(
        topped.to_string().contains("7.5"),
        "limit 5 + 2.50: {topped}"
    );
    let (code, _, err) = admin_cli(&config, CLI_ADMIN, &["credits", "deduct", &hash, "0.5"]);
    assert_eq!(code, 0, "{err}");
    let shown = admin_json(&config, &["keys", "show", &hash]);
    // A deduct takes from what is left: 5 + 2.50 - 0.5.
    assert_eq!(
        shown["data"]["limit_remaining"]
            .to_string()
            .trim_matches('"'),
        "7"
    );

    // Accounts.
    let acct = admin_json(
        &config,
        &["accounts", "create", "--id", "acc-cli", "--name", "Cli Co"],
    );
    assert_eq!(acct["data"]["id"], "acc-cli");
    let (code, table, _) = admin_cli(&config, CLI_ADMIN, &["accounts", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("acc-cli") && table.contains("Cli Co"),
        "{table}"
    );
    assert_eq!(
        admin_json(&config, &["accounts", "show", "acc-cli"])["data"]["name"],
        "Cli Co"
    );
    let (code, _, err) = admin_cli(
        &config,
        CLI_ADMIN,
        &["credits", "topup", "--account", "acc-cli", "3"],
    );
    assert_eq!(code, 0, "{err}");

    // Usage reports.
    let usage = admin_json(&config, &["usage"]);
    assert!(usage.is_object(), "{usage}");
    admin_json(&config, &["usage", "--key", &hash]);

    // Scoped tokens: made, used, refused outside their scope, deleted.
    let tok = admin_json(
        &config,
        &["tokens", "create", "reader", "--scope", "keys:read"],
    );
    let token = tok["token"].as_str().unwrap().to_owned();
    let id = tok["data"]["id"].as_str().unwrap().to_owned();
    let (code, _, err) = admin_cli(&config, &token, &["keys", "list"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = admin_cli(&config, &token, &["keys", "create", "--name", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("403") && err.contains("keys:write"), "{err}");
    let (code, table, _) = admin_cli(&config, CLI_ADMIN, &["tokens", "list"]);
    assert_eq!(code, 0);
    assert!(table.contains(&id) && table.contains("reader") && !table.contains(&token));
    admin_json(&config, &["tokens", "delete", &id]);
    let (code, _, err) = admin_cli(&config, &token, &["keys", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");

    // Disable and delete the key.
    assert_eq!(
        admin_json(&config, &["keys", "disable", &hash])["data"]["disabled"],
        true
    );
    admin_json(&config, &["keys", "delete", &hash]);
    let (code, _, err) = admin_cli(&config, CLI_ADMIN, &["keys", "show", &hash]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    // A usage mistake is exit 2, not a call.
    let (code, _, _) = admin_cli(&config, CLI_ADMIN, &["keys", "show", "../etc"]);
    assert_eq!(code, 2);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_reload_and_sighup_apply_a_new_config() {
    let (gw, dir, config, addr) = live_gateway("cli-reload", "");
    let plan = ["keys", "create", "--name", "g", "--plan", "gold"];
    let (code, _, err) = admin_cli(&config, CLI_ADMIN, &plan);
    assert_eq!(code, 1, "no such plan yet");
    assert!(err.contains("400"), "{err}");
    let data = dir.join("data");
    write_live_config(&config, &data, addr.port(), "[plans.gold]\nlimit = \"1\"\n");
    let answer = admin_json(&config, &["reload"]);
    assert_eq!(answer["reloaded"], true);
    let (code, _, err) = admin_cli(&config, CLI_ADMIN, &plan);
    assert_eq!(code, 0, "{err}");

    // A broken file: the CLI says why, the gateway keeps serving.
    std::fs::write(&config, "[server\n").unwrap();
    let (code, _, err) = admin_cli(
        &config,
        CLI_ADMIN,
        &["reload", "--url", &format!("http://{addr}")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("invalid_config"), "{err}");
    let (status, _) = http(addr, "GET", "/healthz", &[], "");
    assert_eq!(status, 200);

    // SIGHUP: a plan added to the file becomes usable.
    write_live_config(
        &config,
        &data,
        addr.port(),
        "[plans.gold]\nlimit = \"1\"\n[plans.silver]\nlimit = \"1\"\n",
    );
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + HANG;
    loop {
        let (code, _, _) = admin_cli(
            &config,
            CLI_ADMIN,
            &["keys", "create", "--name", "s", "--plan", "silver"],
        );
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP never reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_against_a_gateway_that_is_down() {
    let port = free_port();
    let (code, out, err) = {
        let o = run(
            tollgate(&["keys", "list", "--url", &format!("http://127.0.0.1:{port}")])
                .env("TOLLGATE_ADMIN_TOKEN", CLI_ADMIN),
        );
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("could not reach the gateway") && err.contains(&port.to_string()),
        "{err}"
    );
    // No URL and no config to take it from: a usage error naming why.
    let o = run(
        tollgate(&["keys", "list", "--config", "/nonexistent/tollgate.toml"])
            .env("TOLLGATE_ADMIN_TOKEN", CLI_ADMIN),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--url"), "{}", text(&o.stderr));
}
