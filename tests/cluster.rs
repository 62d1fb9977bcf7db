//! `[cluster]` mode: three gateway processes (the debug binary) over one
//! throwaway PostgreSQL (initdb in a temp dir, loopback port, run as the
//! unprivileged `postgres` user when the tests run as root).
//!
//! Without PostgreSQL installed these tests print why and pass, unless
//! `TOLLGATE_REQUIRE_POSTGRES=1` (CI), where they fail.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::hook::{Got, HOOK_SECRET, Hook, expected_signature};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tollgate::money::Pico;
use tollgate_mock::{MockOptions, MockUpstream};

const ADMIN: &str = "test-admin-token-cluster-0123456789abcdef";
/// The Stripe webhook secret the nodes' `[payments.stripe]` names.
const WHSEC: &str = "whsec_tollgate_cluster_secret_0123456789";
/// The epay merchant key the nodes' `[payments.epay]` names.
const EPAY_KEY: &str = "KEY123";
/// `[payments.epay]` for [`Node::start_with`].
const EPAY: &str = r#"
[payments.epay]
pid = "1001"
key_env = "TOLLGATE_TEST_EPAY_KEY"
submit_url = "https://pay.example/submit.php"
notify_url = "https://gw.example/api/v1/payments/epay/notify"
accept_external_orders = true
"#;
/// `[payments.stripe]` for [`Node::start_with`].
const STRIPE: &str = r#"
[payments.stripe]
secret_key_env = "TOLLGATE_TEST_STRIPE_SK"
webhook_secret_env = "TOLLGATE_TEST_STRIPE_WHSEC"
"#;

/// A throwaway PostgreSQL cluster, stopped (immediate) when dropped.
struct Pg {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Commands run as `postgres` (we are root) or as ourselves.
    as_postgres: bool,
}

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Pg {
    /// Starts PostgreSQL, or says why it cannot (`None`: skip the test).
    fn start() -> Option<Pg> {
        let required = std::env::var("TOLLGATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Some(bin) = pg_bin() else {
            assert!(
                !required,
                "TOLLGATE_REQUIRE_POSTGRES=1 but no /usr/lib/postgresql/*/bin/initdb: install postgresql"
            );
            eprintln!("skipped: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)");
            return None;
        };
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = common::temp_dir("pg");
        let port = free_port();
        let pg = Pg {
            bin,
            dir,
            port,
            as_postgres,
        };
        if as_postgres {
            // initdb refuses root: the data dir belongs to `postgres` (the
            // temp dir above it, /tmp, is reachable by everyone).
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the PostgreSQL data dir to postgres");
        }
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
            ],
        );
        let opts = format!(
            "-p {} -k {} -h 127.0.0.1 -c fsync=off",
            pg.port,
            path(&pg.dir)
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&pg.dir.join("log")),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        pg.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "tollgate",
            ],
        );
        Some(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).output().expect("runs a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/tollgate", self.port)
    }

    /// Stops the server at once (no shutdown checkpoint): an outage.
    fn stop(&self) {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &["-D", path(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Starts it again after [`Pg::stop`].
    fn restart(&self) {
        let data = self.dir.join("data");
        let opts = format!(
            "-p {} -k {} -h 127.0.0.1 -c fsync=off",
            self.port,
            path(&self.dir)
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&self.dir.join("log")),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .args(["-D", path(&data), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// One gateway process of the cluster.
struct Node {
    child: Child,
    port: u16,
    data: PathBuf,
}

impl Node {
    fn start(pg: &Pg, mock: &MockUpstream, id: &str) -> Node {
        Node::start_with(pg, mock, id, "")
    }

    /// One node per id, each started and listening.
    fn start_all(pg: &Pg, mock: &MockUpstream, ids: &[&str]) -> Vec<Node> {
        ids.iter().map(|id| Node::start(pg, mock, id)).collect()
    }

    /// With more `[cluster]` settings.
    fn start_with(pg: &Pg, mock: &MockUpstream, id: &str, cluster: &str) -> Node {
        Node::start_later(pg, mock, id, cluster, 0)
    }

    /// With its clock `offset_ms` ahead (`TOLLGATE_CLOCK_OFFSET_MS`).
    fn start_later(pg: &Pg, mock: &MockUpstream, id: &str, cluster: &str, offset_ms: i64) -> Node {
        let mut node = Node::spawn_later(&pg.url(), mock, id, cluster, offset_ms);
        if let Err(log) = node.ready() {
            panic!("node {id} did not start: {log}");
        }
        node
    }

    /// Starts the process; [`Node::ready`] waits for it to listen.
    fn spawn(url: &str, mock: &MockUpstream, id: &str, cluster: &str) -> Node {
        Node::spawn_in(common::temp_dir(id), url, mock, id, cluster, 0)
    }

    /// Starts a node whose clock runs `offset_ms` ahead, on a new store.
    fn spawn_later(
        url: &str,
        mock: &MockUpstream,
        id: &str,
        cluster: &str,
        offset_ms: i64,
    ) -> Node {
        Node::spawn_in(common::temp_dir(id), url, mock, id, cluster, offset_ms)
    }

    /// Starts this node's process again on its own store (after
    /// [`Node::terminate`] or [`Node::kill9`]).
    fn restart(&mut self, pg: &Pg, mock: &MockUpstream, id: &str, cluster: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data = std::mem::take(&mut self.data);
        let fresh = Node::spawn_in(data, &pg.url(), mock, id, cluster, 0);
        // The old one's `data` is empty now: dropping it removes nothing.
        drop(std::mem::replace(self, fresh));
        if let Err(log) = self.ready() {
            panic!("node {id} did not start again: {log}");
        }
    }

    fn spawn_in(
        data: PathBuf,
        url: &str,
        mock: &MockUpstream,
        id: &str,
        cluster: &str,
        offset_ms: i64,
    ) -> Node {
        let port = free_port();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"
[runtime]
mode = "per-core"
workers = 2
[storage]
path = "{data}"
flush_ms = 10
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"
[[upstreams]]
name = "mock"
base_url = "{mock}"
api_key_env = "TOLLGATE_TEST_UPSTREAM_KEY"
models = ["demo-*"]
[models."demo-chat"]
input = "2.50"
output = "10.00"
[cluster]
postgres_url_env = "TOLLGATE_POSTGRES_URL"
node_id = "{id}"
lease_ttl = "5s"
sync_interval = "1s"
{cluster}
"#,
            data = path(&data.join("store")),
            mock = mock.base_url(),
        );
        let file = data.join("config.toml");
        std::fs::write(&file, config).expect("config written");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&file)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
            .env("TOLLGATE_TEST_UPSTREAM_KEY", common::UPSTREAM_KEY)
            .env("TOLLGATE_POSTGRES_URL", url)
            .env("TOLLGATE_TEST_STRIPE_WHSEC", WHSEC)
            .env("TOLLGATE_TEST_STRIPE_SK", "sk_test_tollgate")
            .env("TOLLGATE_TEST_EPAY_KEY", EPAY_KEY)
            .env("TOLLGATE_CLOCK_OFFSET_MS", offset_ms.to_string())
            .env("TOLLGATE_TEST_HOOK_SECRET", HOOK_SECRET)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("the gateway binary starts");
        Node { child, port, data }
    }

    /// Waits until the node listens; its log when it exits or takes too long.
    fn ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if self.child.try_wait().ok().flatten().is_some()
                || start.elapsed() > Duration::from_secs(20)
            {
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("log")).unwrap_or_default()
    }

    fn url(&self, p: &str) -> String {
        format!("http://127.0.0.1:{}{p}", self.port)
    }

    /// SIGTERM, and waits for the node to exit (it drains and returns its
    /// leases first).
    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "node did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL: nothing is settled or returned
        let _ = self.child.wait();
    }

    async fn admin(&self, method: &str, p: &str, body: Option<Value>) -> (u16, Value) {
        let auth = format!("Bearer {ADMIN}");
        let (s, b) = send(method, &self.url(p), &auth, body).await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// One chat completion with `key`; status 0 when the node is gone.
    async fn chat(&self, key: &str, stream: bool) -> u16 {
        let body = json!({"model": "demo-chat", "stream": stream, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello."}]});
        send(
            "POST",
            &self.url("/v1/chat/completions"),
            &format!("Bearer {key}"),
            Some(body),
        )
        .await
        .0
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A request over its own connection; (0, empty) when it cannot be sent
/// or its answer is cut (the node was killed).
async fn send(method: &str, url: &str, auth: &str, body: Option<Value>) -> (u16, Bytes) {
    let (status, _, body) = send_full(method, url, auth, body).await;
    (status, body)
}

/// [`send`] with the answer's headers.
async fn send_full(
    method: &str,
    url: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, http::HeaderMap, Bytes) {
    let bytes = body
        .map(|b| Bytes::from(serde_json::to_vec(&b).expect("json")))
        .unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(bytes))
        .expect("request builds");
    let Ok(res) = common::client().request(req).await else {
        return (0, http::HeaderMap::new(), Bytes::new());
    };
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    match res.into_body().collect().await {
        Ok(b) => (status, headers, b.to_bytes()),
        Err(_) => (0, headers, Bytes::new()),
    }
}

fn usd(v: &Value) -> Pico {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Pico::parse_usd(&text).unwrap_or_else(|e| panic!("not an amount: {v}: {e}"))
}

async fn create_key(node: &Node, name: &str, owner: &str) -> (String, String) {
    let (s, v) = node
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": name, "owner": owner})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    (
        v["key"].as_str().expect("key").to_owned(),
        v["data"]["hash"].as_str().expect("hash").to_owned(),
    )
}

fn mock() -> MockUpstream {
    MockUpstream::start(MockOptions {
        chunks: 16,
        chunk_delay: Duration::from_millis(5),
        ..MockOptions::default()
    })
    .expect("mock upstream")
}

/// The outside check's scenario: one account that pays for about 20
/// requests raced from three nodes by 600 streams while one node is
/// SIGKILLed; then a disable made on node 1 is refused by node 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_over_three_nodes_with_one_killed() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["node-1", "node-2", "node-3"]);
    let mut nodes = nodes;
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "acct-c", "email": "c@example.com"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let topup =
        json!({"amount": "0.004", "kind": "topup", "reason": "test", "idempotency_key": "c1"});
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-c/credits",
            Some(topup.clone()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // The same top-up sent to another node applies once cluster-wide.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, v) = nodes[2]
        .admin("POST", "/api/v1/accounts/acct-c/credits", Some(topup))
        .await;
    assert_eq!(s, 200, "{v}");
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(create_key(&nodes[0], &format!("c{i}"), "acct-c").await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Every node knows the account and the keys (made on node 1).
    for n in &nodes {
        let (s, v) = n.admin("GET", "/api/v1/accounts/acct-c", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            usd(&v["data"]["balance"]),
            Pico::parse_usd("0.004").unwrap(),
            "{v}"
        );
    }

    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(120));
    let mut tasks = Vec::new();
    for i in 0..600usize {
        let node = if i > 300 && i % 3 == 1 {
            (i + 1) % 3
        } else {
            i % 3
        };
        let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[node]);
        let key = keys[i % 3].0.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.expect("semaphore");
            let body = json!({"model": "demo-chat", "stream": true, "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hello."}]});
            send("POST", &url, &format!("Bearer {key}"), Some(body))
                .await
                .0
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes[1].kill9();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.expect("task"));
    }
    let admitted = codes.iter().filter(|c| **c == 200).count();
    let mut kinds: Vec<u16> = codes.clone();
    kinds.sort();
    kinds.dedup();
    // After lease_ttl (5 s) node 2's lease is back; the others returned
    // theirs when idle.
    tokio::time::sleep(Duration::from_secs(7)).await;

    let (s, a) = nodes[2].admin("GET", "/api/v1/accounts/acct-c", None).await;
    assert_eq!(s, 200, "{a}");
    let balance = usd(&a["data"]["balance"]);
    let mut usage = Pico::ZERO;
    for (_, hash) in &keys {
        let (s, k) = nodes[2]
            .admin("GET", &format!("/api/v1/keys/{hash}"), None)
            .await;
        assert_eq!(s, 200, "{k}");
        usage = usage.saturating_add(usd(&k["data"]["usage"]));
    }
    let total = Pico::parse_usd("0.004").unwrap();
    eprintln!(
        "{admitted} of 600 admitted over 3 nodes (one killed), balance {balance}, keys charged {usage}, answers {kinds:?}"
    );
    assert!(
        balance >= Pico::ZERO,
        "overspent: balance {balance} (codes {kinds:?})"
    );
    assert_eq!(
        Pico(total.0 - balance.0),
        usage,
        "topped up {total}, balance {balance}, keys charged {usage}"
    );
    assert!(
        admitted >= 10,
        "only {admitted} of 600 admitted (codes {kinds:?})"
    );
    assert!(
        codes.iter().all(|c| [0, 200, 402, 503].contains(c)),
        "unexpected answers: {kinds:?}"
    );

    // The database agrees with itself: spent = Σ entries, no lease left,
    // remaining = what was topped up − what was settled.
    let db = pg.client().await;
    let row = db
        .query_one(
            "SELECT balance, spent, leased FROM tollgate_accounts WHERE id = 'acct-c'",
            &[],
        )
        .await
        .expect("account row");
    let (db_balance, db_spent, db_leased): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let entries: i64 = db
        .query_one(
            "SELECT COALESCE(SUM(spent), 0)::bigint FROM tollgate_entries WHERE account_id = 'acct-c'",
            &[],
        )
        .await
        .expect("entries")
        .get(0);
    let topups: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_entries WHERE account_id = 'acct-c' AND kind = 'topup'",
            &[],
        )
        .await
        .expect("top-ups")
        .get(0);
    assert_eq!(topups, 1, "one top-up, whichever node it reached");
    assert_eq!(db_balance, balance.0);
    assert_eq!(db_spent, entries, "spent = Σ usage records + ledger");
    assert_eq!(db_spent, total.0 - db_balance);
    assert_eq!(db_leased, 0, "every lease returned or reclaimed");
    let leases: i64 = db
        .query_one(
            "SELECT COALESCE(SUM(amount), 0)::bigint FROM tollgate_leases",
            &[],
        )
        .await
        .expect("leases")
        .get(0);
    assert_eq!(leases, 0);

    // A disable on node 1 is refused by node 3 within the sync interval
    // (and at once by node 1).
    let (s, v) = nodes[0]
        .admin(
            "PATCH",
            &format!("/api/v1/keys/{}", keys[0].1),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(nodes[0].chat(&keys[0].0, false).await, 403);
    let start = Instant::now();
    loop {
        let s = nodes[2].chat(&keys[0].0, false).await;
        if s == 403 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "node 3 still answers {s} for a key disabled on node 1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Within sync_interval (1 s), with room for a loaded 2-core CI machine.
    assert!(start.elapsed() < Duration::from_secs(2));

    // The key events were emitted by the node that made the changes, not
    // once more by each node that applied them; every node lists them
    // (the outbox is the database's).
    let count = |v: &Value| v["data"].as_array().map(|a| a.len()).unwrap_or(0);
    let (s, v) = nodes[0]
        .admin("GET", "/api/v1/events?type=key.*", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        count(&v),
        4,
        "3 key.created and 1 key.disabled on node 1: {v}"
    );
    let made_on_1 = v["data"].as_array().is_some_and(|a| {
        a.iter().all(|e| {
            e["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("evt_node-1_"))
        })
    });
    assert!(made_on_1, "all made by node 1: {v}");
    let (s, v3) = nodes[2]
        .admin("GET", "/api/v1/events?type=key.*", None)
        .await;
    assert_eq!(s, 200, "{v3}");
    assert_eq!(v3, v, "node 3 lists the same events, none of its own");

    // A payment notified to two nodes (the same provider reference) moves
    // the account's money once. On an account of its own: the disable
    // above let node 3 serve (and charge) acct-c until it saw the change.
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "acct-pay", "email": "pay@example.com"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let start = Instant::now();
    while nodes[2]
        .admin("GET", "/api/v1/accounts/acct-pay", None)
        .await
        .0
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "node 3 never saw the account"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pay =
        json!({"account": "acct-pay", "amount": "0.001", "reference": "bank-7", "kind": "topup"});
    for n in [&nodes[0], &nodes[2]] {
        let (s, v) = n.admin("POST", "/api/v1/payments", Some(pay.clone())).await;
        assert!(s == 201 || s == 200, "{s} {v}");
    }
    for n in [&nodes[0], &nodes[2]] {
        let (s, a) = n.admin("GET", "/api/v1/accounts/acct-pay", None).await;
        assert_eq!(s, 200, "{a}");
        assert_eq!(
            usd(&a["data"]["balance"]),
            Pico::parse_usd("0.001").unwrap(),
            "one payment, once: {a}"
        );
    }
}

/// The database stopped under load: the node serves from its lease until
/// it runs out, then refuses with 503 (never more than the lease); when the
/// database is back every charge made meanwhile is written, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_serves_from_the_lease_then_503_then_catches_up() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    // Slices of 0.002 USD: about ten requests each.
    let node = Node::start_with(
        &pg,
        &mock,
        "node-a",
        "lease = \"0.002\"\nlease_floor = \"0.0001\"",
    );
    let (s, v) = node
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-o"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = node
        .admin(
            "POST",
            "/api/v1/accounts/acct-o/credits",
            Some(json!({"amount": "1", "kind": "topup", "reason": "test"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (key, hash) = create_key(&node, "o", "acct-o").await;
    let mut served = 0;
    for _ in 0..3 {
        assert_eq!(node.chat(&key, false).await, 200);
        served += 1;
    }

    pg.stop();
    let mut during = Vec::new();
    for _ in 0..25 {
        during.push(node.chat(&key, false).await);
    }
    let ok_during = during.iter().filter(|c| **c == 200).count();
    assert!(
        ok_during >= 1,
        "the lease serves while the database is down: {during:?}"
    );
    assert!(
        during.iter().all(|c| *c == 200 || *c == 503),
        "only served or 503: {during:?}"
    );
    let first_503 = during
        .iter()
        .position(|c| *c == 503)
        .expect("the lease runs out: 503");
    assert!(
        during[first_503..].iter().all(|c| *c == 503),
        "once the lease is spent, refused until the database is back: {during:?}"
    );
    // The refusal is in the API's error shape.
    let body = json!({"model": "demo-chat", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let (s, b) = send(
        "POST",
        &node.url("/v1/chat/completions"),
        &format!("Bearer {key}"),
        Some(body),
    )
    .await;
    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
    common::assert_error(s, &v, 503, "database_unavailable");
    served += ok_during;

    pg.restart();
    // Served again once the pool reconnects; the queued charges land.
    let start = Instant::now();
    loop {
        if node.chat(&key, false).await == 200 {
            served += 1;
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not served after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let db = pg.client().await;
    let row = db
        .query_one(
            "SELECT balance, spent, \
             (SELECT COUNT(*) FROM tollgate_entries WHERE account_id = 'acct-o' AND kind = 'usage'), \
             (SELECT COALESCE(SUM(spent), 0)::bigint FROM tollgate_entries WHERE account_id = 'acct-o') \
             FROM tollgate_accounts WHERE id = 'acct-o'",
            &[],
        )
        .await
        .expect("account row");
    let (balance, spent, records, entries): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        records as usize, served,
        "every served request's record, once"
    );
    assert_eq!(spent, entries, "spent = Σ records");
    assert_eq!(balance, Pico::usd(1).0 - spent);
    let (s, k) = node
        .admin("GET", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert_eq!(s, 200, "{k}");
    assert_eq!(usd(&k["data"]["usage"]).0, spent);

    // A node stopped normally (SIGTERM) settles and returns its lease at
    // once: the others need not wait for lease_ttl.
    assert_eq!(node.chat(&key, false).await, 200);
    let held: i64 = db
        .query_one(
            "SELECT COALESCE(SUM(leased), 0)::bigint FROM tollgate_accounts",
            &[],
        )
        .await
        .expect("leased")
        .get(0);
    assert!(held > 0, "the node holds a lease while in use");
    let mut node = node;
    node.terminate();
    let row = db
        .query_one(
            "SELECT leased, spent, (SELECT COUNT(*) FROM tollgate_leases) FROM tollgate_accounts WHERE id = 'acct-o'",
            &[],
        )
        .await
        .expect("account row");
    let (leased, spent_after, rows): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(leased, 0, "the lease came back on shutdown");
    assert_eq!(rows, 0);
    assert!(
        spent_after > spent,
        "the last request was settled on shutdown"
    );
}

/// An account's balance as `node` reports it.
async fn balance_of(node: &Node, account: &str) -> Pico {
    let (s, v) = node
        .admin("GET", &format!("/api/v1/accounts/{account}"), None)
        .await;
    assert_eq!(s, 200, "the node knows the account: {v}");
    usd(&v["data"]["balance"])
}

/// Issue 18: admin writes answered while the database was down are kept
/// in the node's store, not only in memory: node 1 makes an account, tops
/// it up and makes a key for it, is SIGKILLed before the database is back,
/// and once it runs again node 2 knows the key and the money, which is
/// counted once however often node 1 restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_made_while_the_database_is_down_survive_a_kill() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let mut nodes = Node::start_all(&pg, &mock, &["q-1", "q-2"]);
    pg.stop();
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-q"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-q/credits",
            Some(json!({"amount": "3", "kind": "topup", "reason": "offline"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (key, hash) = create_key(&nodes[0], "q", "acct-q").await;
    // Killed before the database is back: nothing is written on the way out.
    nodes[0].kill9();
    pg.restart();
    nodes[0].restart(&pg, &mock, "q-1", "");

    known_everywhere(&nodes[1..], &hash).await;
    let three = Pico::usd(3);
    let start = Instant::now();
    while balance_of(&nodes[1], "acct-q").await != three {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node 2 never saw the top-up: {}",
            nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Killed and started again (the rows of the changes written may still
    // be on its disk): written again at most, never counted twice.
    nodes[0].kill9();
    nodes[0].restart(&pg, &mock, "q-1", "");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        balance_of(&nodes[1], "acct-q").await,
        three,
        "credited once"
    );
    let db = pg.client().await;
    let topups: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_entries WHERE account_id = 'acct-q' AND kind = 'topup'",
            &[],
        )
        .await
        .expect("entries")
        .get(0);
    assert_eq!(topups, 1);
    // The key authenticates on node 2 and spends the money node 1 took.
    assert_eq!(nodes[1].chat(&key, false).await, 200);
    let (s, v) = nodes[1].admin("GET", "/api/v1/keys", None).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.to_string().contains(&hash), "listed on node 2: {v}");
}

/// `n` streamed chats with `key`, spread over `nodes`, at most 40 at once
/// (like the clients of the outside check): each answer's status.
async fn streams(nodes: &[Node], key: &str, n: usize) -> Vec<u16> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(40));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = nodes[i % nodes.len()].url("/v1/chat/completions");
        let auth = format!("Bearer {key}");
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            let body = json!({"model": "demo-chat", "stream": true, "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hello."}]});
            send("POST", &url, &auth, Some(body)).await.0
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// A key with its own limit and no account: the limit holds across the
/// nodes (each takes slices of it), not once per node; a top-up on one node
/// raises it for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_own_limit_is_global() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["k-1", "k-2", "k-3"]);
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "own", "limit": "0.004"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    let hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let codes = streams(&nodes, &key, 240).await;
    let admitted = codes.iter().filter(|c| **c == 200).count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let limit = Pico::parse_usd("0.004").unwrap();
    let (s, k) = nodes[1]
        .admin("GET", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert_eq!(s, 200, "{k}");
    let usage = usd(&k["data"]["usage"]);
    eprintln!("{admitted} of 240 admitted on a key limited to {limit}: usage {usage}");
    assert!(
        usage <= limit,
        "a key limit of {limit} spent {usage} over three nodes"
    );
    assert!(
        admitted >= 8,
        "only {admitted} admitted (a limit that pays for about 20)"
    );
    assert!(
        admitted <= 25,
        "{admitted} admitted: the limit was not global"
    );
    assert_eq!(usd(&k["data"]["limit"]), limit, "{k}");

    let db = pg.client().await;
    let h = hex::decode(&hash).expect("hex");
    let row = db
        .query_one(
            "SELECT usage, leased, (SELECT COALESCE(SUM(spent), 0)::bigint FROM tollgate_entries \
             WHERE key_hash = $1) FROM tollgate_keys WHERE hash = $1",
            &[&h],
        )
        .await
        .expect("key row");
    let (db_usage, _leased, entries): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(db_usage, usage.0);
    assert_eq!(db_usage, entries, "usage = Σ records");

    // A top-up through node 3 raises the limit everywhere.
    let (s, v) = nodes[2]
        .admin(
            "POST",
            &format!("/api/v1/keys/{hash}/credits"),
            Some(json!({"amount": "0.002", "kind": "topup", "reason": "more"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let more = streams(&nodes, &key, 120).await;
    let admitted_more = more.iter().filter(|c| **c == 200).count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s, k) = nodes[0]
        .admin("GET", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert_eq!(s, 200, "{k}");
    let usage = usd(&k["data"]["usage"]);
    let limit = Pico::parse_usd("0.006").unwrap();
    eprintln!("after the top-up: {admitted_more} more admitted, usage {usage} of {limit}");
    assert!(
        admitted_more >= 3,
        "the top-up made on node 3 was usable: {admitted_more}"
    );
    assert!(usage <= limit, "spent {usage} of a limit of {limit}");
    assert_eq!(usd(&k["data"]["limit"]), limit, "{k}");
}

/// A key with its own limit whose account pays: the account has far more
/// than the key may spend, and the key's limit still holds across the
/// nodes (each node holds a slice of the key's limit besides the
/// account's), with the account charged exactly what the key spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_own_limit_holds_when_its_account_pays() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["q-1", "q-2", "q-3"]);
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-q"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let topup = json!({"amount": "5", "kind": "topup", "reason": "test"});
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts/acct-q/credits", Some(topup))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "capped", "owner": "acct-q", "limit": "0.004"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    let hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    known_everywhere(&nodes, &hash).await;

    let codes = streams(&nodes, &key, 240).await;
    let admitted = codes.iter().filter(|c| **c == 200).count();
    assert!(
        codes.iter().all(|c| *c == 200 || *c == 402),
        "served or 402: {codes:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let limit = Pico::parse_usd("0.004").unwrap();
    let (s, k) = nodes[1]
        .admin("GET", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert_eq!(s, 200, "{k}");
    let usage = usd(&k["data"]["usage"]);
    eprintln!(
        "{admitted} of 240 admitted on a key limited to {limit} (its account pays): usage {usage}"
    );
    assert!(
        usage <= limit,
        "a key limit of {limit} spent {usage} over three nodes"
    );
    assert!(admitted >= 8, "only {admitted} admitted");
    assert!(
        admitted <= 25,
        "{admitted} admitted: the key's limit was not global"
    );
    // The account paid exactly what the key spent, and the key's slices
    // are all back once it is idle.
    let db = pg.client().await;
    let h = hex::decode(&hash).expect("hex");
    let row = db
        .query_one(
            "SELECT k.usage, (SELECT COALESCE(SUM(spent), 0)::bigint FROM tollgate_entries \
             WHERE key_hash = $1), a.spent, a.balance FROM tollgate_keys k, tollgate_accounts a \
             WHERE k.hash = $1 AND a.id = 'acct-q'",
            &[&h],
        )
        .await
        .expect("rows");
    let (db_usage, entries, spent, balance): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(db_usage, usage.0);
    assert_eq!(db_usage, entries, "usage = Σ records");
    assert_eq!(spent, db_usage, "the account paid what the key spent");
    assert_eq!(
        balance,
        Pico::parse_usd("5").unwrap().0 - spent,
        "balance = top-up − spent"
    );
}

/// Streams of 16 chunks 10 ms apart: long enough to overlap.
fn slow_mock() -> MockUpstream {
    MockUpstream::start(MockOptions {
        chunks: 16,
        chunk_delay: Duration::from_millis(10),
        ..MockOptions::default()
    })
    .expect("mock upstream")
}

/// Races `key` with 3 rounds of 45 streams spread over `nodes` and checks
/// that never more than `allowed` are in flight at the upstream, that
/// some are served and the rest refused 429, and that every slot comes
/// back once the key is idle.
async fn in_flight_holds(pg: &Pg, nodes: &[Node], mock: MockUpstream, key: &str, allowed: u64) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let done = done.clone();
        let mock_open = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let peak = mock_open.clone();
        let mock = std::sync::Arc::new(mock);
        let m = mock.clone();
        let h = tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                peak.fetch_max(m.open_streams(), std::sync::atomic::Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        (h, mock_open, mock)
    };
    let mut codes = Vec::new();
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..45 {
            let url = nodes[(i + round) % 3].url("/v1/chat/completions");
            let key = key.to_owned();
            tasks.push(tokio::spawn(async move {
                let body = json!({"model": "demo-chat", "stream": true, "max_tokens": 16,
                    "messages": [{"role": "user", "content": "Say hello."}]});
                send("POST", &url, &format!("Bearer {key}"), Some(body))
                    .await
                    .0
            }));
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        for t in tasks {
            codes.push(t.await.expect("task"));
        }
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let (h, peak, mock) = watch;
    h.await.expect("watcher");
    let peak = peak.load(std::sync::atomic::Ordering::Acquire);
    let ok = codes.iter().filter(|c| **c == 200).count();
    eprintln!(
        "{ok} of {} served, peak {peak} streams in flight at the upstream",
        codes.len()
    );
    assert!(
        peak <= allowed,
        "{peak} in flight for a key allowed {allowed}, over three nodes"
    );
    assert!(ok >= 4, "only {ok} served");
    assert!(
        codes.iter().all(|c| *c == 200 || *c == 429),
        "served or 429: {codes:?}"
    );
    assert!(mock.streams_completed() >= ok as u64);
    // Every slot comes back when the key is idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let db = pg.client().await;
    let slots: i64 = db
        .query_one(
            "SELECT COALESCE(SUM(slots_leased), 0)::bigint FROM tollgate_keys",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "idle slots are returned");
}

/// A key's concurrency holds across the nodes: never more of its requests
/// in flight at the upstream than it allows, whichever nodes they reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_global() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = slow_mock();
    let nodes = Node::start_all(&pg, &mock, &["c-1", "c-2", "c-3"]);
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "two", "concurrency": 2})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    in_flight_holds(&pg, &nodes, mock, &key, 2).await;
}

/// A concurrency that comes only from the subscription plan's template
/// (the key has none of its own) holds across the nodes too: each node
/// counts its slots against the plan's, taken from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plans_concurrency_is_global() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = slow_mock();
    let plan = "[plans.pair]\ninterval = \"day\"\ngrant = \"100\"\nconcurrency = 2\n";
    let nodes: Vec<Node> = ["t-1", "t-2", "t-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, plan))
        .collect();
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-pair"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-pair/subscriptions",
            Some(json!({"plan": "pair"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let sid = v["data"]["id"].as_str().expect("id").to_owned();
    let (key, hash) = create_key(&nodes[0], "pair-key", "acct-pair").await;
    for n in &nodes {
        subscription_where(n, &sid, |_| true).await;
        known_everywhere(std::slice::from_ref(n), &hash).await;
    }
    let (_, v) = nodes[1]
        .admin("GET", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert!(
        v["data"]["concurrency"].is_null(),
        "the key has no concurrency of its own: {v}"
    );
    in_flight_holds(&pg, &nodes, mock, &key, 2).await;
}

/// TLS to the database: with `sslmode=require` the node speaks TLS and
/// checks the server's certificate (here against `cluster.ca_file`); one
/// that cannot verify it refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_to_the_database() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tollgate test database CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf certificate");
    let (ca_file, cert_file, key_file) = (
        pg.dir.join("ca.pem"),
        pg.dir.join("server.crt"),
        pg.dir.join("server.key"),
    );
    std::fs::write(&ca_file, ca.pem()).expect("ca.pem");
    std::fs::write(&cert_file, leaf.pem()).expect("server.crt");
    std::fs::write(&key_file, leaf_key.serialize_pem()).expect("server.key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    if pg.as_postgres {
        for f in [&cert_file, &key_file] {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(f)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {}", f.display());
        }
    }
    let db = pg.client().await;
    for stmt in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", path(&cert_file)),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", path(&key_file)),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        db.batch_execute(&stmt).await.expect("enable ssl");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mock = mock();
    let url = format!("{}?sslmode=require", pg.url());

    // The test CA is not a public root: without ca_file the node refuses.
    let mut untrusting = Node::spawn(&url, &mock, "tls-0", "");
    let log = untrusting
        .ready()
        .expect_err("a certificate it cannot verify");
    assert!(log.contains("cluster: ") && log.contains("TLS"), "{log}");

    let mut node = Node::spawn(
        &url,
        &mock,
        "tls-1",
        &format!("ca_file = \"{}\"", path(&ca_file)),
    );
    if let Err(log) = node.ready() {
        panic!("node over TLS did not start: {log}");
    }
    let (s, v) = node
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-t"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = node
        .admin(
            "POST",
            "/api/v1/accounts/acct-t/credits",
            Some(json!({"amount": "1", "kind": "topup", "reason": "tls"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (key, _) = create_key(&node, "t", "acct-t").await;
    assert_eq!(node.chat(&key, false).await, 200);
    let row = db
        .query_one(
            "SELECT COUNT(*) FILTER (WHERE s.ssl), COUNT(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'tollgate tls-1'",
            &[],
        )
        .await
        .expect("connections");
    let (ssl, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 1, "the node is connected");
    assert_eq!(ssl, all, "every connection of the node is TLS");
}

/// Waits until every node knows the key (its change pulled), with room
/// for a loaded machine.
async fn known_everywhere(nodes: &[Node], hash: &str) {
    let start = Instant::now();
    for node in nodes {
        while node
            .admin("GET", &format!("/api/v1/keys/{hash}"), None)
            .await
            .0
            != 200
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "a node never saw the key"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The UTC minute now (the window rpm and tpm count in, cluster-wide).
fn minute_now() -> i64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    ms.div_euclid(60_000)
}

/// Waits for the next minute when less than 30 s are left of this one,
/// so a short burst usually falls in one window (the assertions still
/// allow for every window it spans).
async fn early_in_a_minute() {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let into = ms % 60_000;
    if into > 30_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into + 200)).await;
    }
}

/// `n` non-streamed chats with `key`, spread over `nodes`, at most 20 at
/// once: each answer's status, headers and body.
async fn burst(nodes: &[Node], key: &str, n: usize) -> Vec<(u16, http::HeaderMap, Bytes)> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(20));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = nodes[i % nodes.len()].url("/v1/chat/completions");
        let auth = format!("Bearer {key}");
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            let body = json!({"model": "demo-chat", "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hello."}]});
            send_full("POST", &url, &auth, Some(body)).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// A key's rpm holds across the nodes: in a UTC minute at most rpm of its
/// requests reach the upstream, whichever nodes they are sent to (not
/// rpm × nodes); the rest are 429 in the OpenAI shape with the headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_is_global() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["r-1", "r-2", "r-3"]);
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "rpm", "rpm": 30})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    known_everywhere(&nodes, v["data"]["hash"].as_str().expect("hash")).await;

    early_in_a_minute().await;
    let first = minute_now();
    let answers = burst(&nodes, &key, 120).await;
    let windows = (minute_now() - first + 1) as u64;
    let served = mock.served().received_on("/v1/chat/completions");
    let ok = answers.iter().filter(|a| a.0 == 200).count() as u64;
    eprintln!(
        "{ok} of 120 served over 3 nodes for rpm 30 ({windows} window(s)); the mock saw {served}"
    );
    assert!(
        served <= 30 * windows,
        "{served} requests reached the upstream for rpm 30 in {windows} minute(s)"
    );
    assert_eq!(ok, served, "every served request reached the upstream once");
    assert!(ok >= 15, "only {ok} served of a window of 30");
    assert!(
        answers.iter().all(|a| a.0 == 200 || a.0 == 429),
        "served or 429: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    let (status, headers, body) = answers
        .iter()
        .find(|a| a.0 == 429)
        .expect("requests past the window are refused");
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    common::assert_error(*status, &v, 429, "rate_limit_exceeded");
    assert_eq!(headers["x-ratelimit-limit-requests"], "30");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert!(headers.contains_key("x-ratelimit-reset-requests"));
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    // A served answer says what is left (of 30).
    let (_, headers, _) = answers.iter().find(|a| a.0 == 200).expect("served");
    assert_eq!(headers["x-ratelimit-limit-requests"], "30");
    let left: u32 = headers["x-ratelimit-remaining-requests"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a count");
    assert!(left < 30);

    // The round trips are counted by kind in /metrics: shares were taken.
    let mut rate_trips = 0u64;
    for node in &nodes {
        let (s, b) = send("GET", &node.url("/metrics"), "", None).await;
        assert_eq!(s, 200);
        let text = String::from_utf8_lossy(&b);
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_cluster_db_roundtrips_total{kind=\"rate\"} "))
            .expect("the rate round trips are counted")
            .parse()
            .expect("a count");
        assert!(text.contains("tollgate_cluster_db_roundtrips_total{kind=\"settle\"} "));
        rate_trips += n;
    }
    eprintln!("{rate_trips} round trips for rate shares over 3 nodes");
    assert!(rate_trips > 0);

    // The database never handed out more than the limit.
    let db = pg.client().await;
    let over: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_rate_windows WHERE unit = 'requests' AND taken > 30",
            &[],
        )
        .await
        .expect("windows")
        .get(0);
    assert_eq!(over, 0);
}

/// A key's tpm holds across the nodes the same way: the tokens the upstream
/// served in a minute stay within the key's tpm, whichever nodes the
/// requests are sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm_is_global() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["t-1", "t-2", "t-3"]);
    let tpm = 600u64;
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "tpm", "tpm": tpm})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    known_everywhere(&nodes, v["data"]["hash"].as_str().expect("hash")).await;

    early_in_a_minute().await;
    let first = minute_now();
    let answers = burst(&nodes, &key, 120).await;
    let windows = (minute_now() - first + 1) as u64;
    let served = mock.served();
    let tokens = served.tokens_of("demo-chat");
    let used = tokens.input + tokens.output;
    let ok = answers.iter().filter(|a| a.0 == 200).count() as u64;
    eprintln!(
        "{ok} of 120 served over 3 nodes for tpm {tpm} ({windows} window(s)): {used} tokens at the upstream"
    );
    assert!(
        used <= tpm * windows,
        "{used} tokens served for tpm {tpm} in {windows} minute(s)"
    );
    assert_eq!(ok, served.received_on("/v1/chat/completions"));
    assert!(ok >= 3, "only {ok} served");
    assert!(
        answers.iter().all(|a| a.0 == 200 || a.0 == 429),
        "served or 429: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    let (status, headers, body) = answers
        .iter()
        .find(|a| a.0 == 429)
        .expect("requests past the window are refused");
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    common::assert_error(*status, &v, 429, "rate_limit_exceeded");
    assert_eq!(
        headers["x-ratelimit-limit-tokens"],
        tpm.to_string().as_str()
    );
    assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
    assert!(headers.contains_key("retry-after"));

    let db = pg.client().await;
    let over: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_rate_windows WHERE unit = 'tokens' AND taken > $1",
            &[&(tpm as i64)],
        )
        .await
        .expect("windows")
        .get(0);
    assert_eq!(over, 0);

    // Idle, the nodes give back what their shares did not use (a request
    // held its bound, and used fewer): the window then counts exactly the
    // tokens served. Only checked when all of it happened in one minute.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if windows == 1 && minute_now() == first {
        let taken: i64 = db
            .query_one(
                "SELECT taken FROM tollgate_rate_windows WHERE unit = 'tokens' AND minute = $1",
                &[&first],
            )
            .await
            .expect("the window's row")
            .get(0);
        assert_eq!(taken as u64, used, "unused shares are returned");
    }
}

/// In cluster mode the usage and report APIs answer from the database:
/// requests served by three nodes are listed, and summed the same, by
/// every node, the key's own `/api/usage/` endpoints included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_reports_are_the_same_on_every_node() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["u-1", "u-2", "u-3"]);
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "reports", "owner": "team-u"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    let hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    known_everywhere(&nodes, &hash).await;

    let n = 30;
    let answers = burst(&nodes, &key, n).await;
    assert!(answers.iter().all(|a| a.0 == 200), "every request served");
    // Settled charges are written every sync_interval / 4: wait (with room
    // for a loaded machine) until the database has every record.
    let db = pg.client().await;
    let start = Instant::now();
    loop {
        let records: i64 = db
            .query_one(
                "SELECT COUNT(*) FROM tollgate_entries WHERE kind = 'usage'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if records as usize >= n {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {records} of {n} records reached the database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut totals = Vec::new();
    let mut ids = Vec::new();
    for node in &nodes {
        let (s, d) = node
            .admin("GET", &format!("/api/v1/keys/{hash}/usage"), None)
            .await;
        assert_eq!(s, 200, "{d}");
        let summary = &d["data"]["summary"];
        assert_eq!(summary["total_requests"], n, "{d}");
        let cost = usd(&summary["total_cost"]);
        assert!(cost > Pico::ZERO, "{d}");
        assert_eq!(
            d["data"]["by_model"][0]["model"], "demo-chat",
            "by model: {d}"
        );
        let (s, l) = node
            .admin(
                "GET",
                &format!("/api/v1/keys/{hash}/usage/logs?page_size=100"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{l}");
        assert_eq!(l["data"]["total"], n, "{l}");
        let items = l["data"]["items"].as_array().expect("items");
        assert_eq!(items.len(), n);
        let sum = items
            .iter()
            .fold(Pico::ZERO, |acc, i| acc.saturating_add(usd(&i["cost"])));
        assert_eq!(sum, cost, "Σ records = the summary's cost");
        let mut these: Vec<String> = items
            .iter()
            .map(|i| i["request_id"].as_str().expect("id").to_owned())
            .collect();
        these.sort();
        these.dedup();
        assert_eq!(these.len(), n, "each record once");
        ids.push(these);

        let (s, g) = node.admin("GET", "/api/v1/usage", None).await;
        assert_eq!(s, 200, "{g}");
        assert_eq!(g["data"]["summary"]["total_requests"], n, "{g}");
        assert_eq!(usd(&g["data"]["summary"]["total_cost"]), cost, "{g}");
        assert_eq!(g["data"]["by_key"][0]["hash"], hash.as_str(), "{g}");
        assert_eq!(g["data"]["by_key"][0]["requests"], n, "{g}");

        let (s, o) = node.admin("GET", "/api/v1/owners/team-u/usage", None).await;
        assert_eq!(s, 200, "{o}");
        assert_eq!(o["data"]["summary"]["total_requests"], n, "{o}");
        assert_eq!(usd(&o["data"]["summary"]["total_cost"]), cost, "{o}");
        let (s, c) = node
            .admin(
                "GET",
                &format!("/api/v1/keys/{hash}/usage/chart?granularity=hour"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{c}");
        let points = c["data"]["data"].as_array().expect("points");
        let requests: u64 = points.iter().filter_map(|p| p["requests"].as_u64()).sum();
        assert_eq!(requests, n as u64, "{c}");
        let (s, b) = node
            .admin("GET", "/api/v1/admin/billing/status", None)
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["all_time"]["requests"], n, "{b}");
        assert_eq!(usd(&b["all_time"]["cost"]), cost, "{b}");

        // The key's own view, new-api's envelope.
        let (s, b) = send(
            "GET",
            &node.url("/api/usage/token/logs?page_size=100"),
            &format!("Bearer {key}"),
            None,
        )
        .await;
        let own: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(s, 200, "{own}");
        assert_eq!(own["data"]["total"], n, "{own}");
        totals.push(cost);
    }
    assert!(totals.windows(2).all(|w| w[0] == w[1]), "{totals:?}");
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "the same records");

    // The records' sum is what the database charged the key.
    let h = hex::decode(&hash).expect("hex");
    let usage: i64 = db
        .query_one("SELECT usage FROM tollgate_keys WHERE hash = $1", &[&h])
        .await
        .expect("key row")
        .get(0);
    assert_eq!(usage, totals[0].0);
}

/// Polls `GET path` on `node` with `token` until it answers `want`.
async fn answers_within(node: &Node, token: &str, path: &str, want: u16, within: Duration) {
    let start = Instant::now();
    let auth = format!("Bearer {token}");
    loop {
        let (s, _) = send("GET", &node.url(path), &auth, None).await;
        if s == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "node on port {} still answers {s} to {path}, not {want}",
            node.port
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_are_known_to_every_node() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["t-1", "t-2", "t-3"]);
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/admin/tokens",
            Some(json!({"name": "billing-app", "scopes": ["keys:read"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().expect("token shown once").to_owned();
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    // sync_interval is 1 s; the bound leaves room for a loaded CI machine.
    let within = Duration::from_secs(15);
    for node in &nodes {
        answers_within(node, &token, "/api/v1/keys", 200, within).await;
        // Its scopes came with it: a write it may not make is refused.
        let (s, b) = send(
            "POST",
            &node.url("/api/v1/keys"),
            &format!("Bearer {token}"),
            Some(json!({"name": "no"})),
        )
        .await;
        assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
        let (s, list) = node.admin("GET", "/api/v1/admin/tokens", None).await;
        assert_eq!(s, 200);
        assert!(list.to_string().contains(&id), "{list}");
    }
    // The database has its hash, never the token.
    let db = pg.client().await;
    let row = db
        .query_one(
            "SELECT record FROM tollgate_admin_tokens WHERE id = $1",
            &[&id],
        )
        .await
        .expect("token row");
    let record: Vec<u8> = row.get(0);
    assert!(
        !String::from_utf8_lossy(&record).contains(&token),
        "the token itself reached the database"
    );

    // Deleted on another node: refused everywhere.
    let (s, v) = nodes[1]
        .admin("DELETE", &format!("/api/v1/admin/tokens/{id}"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    for node in &nodes {
        answers_within(node, &token, "/api/v1/keys", 401, within).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_the_same_on_every_node() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["a-1", "a-2", "a-3"]);
    // One admin write on each node.
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/keys", Some(json!({"name": "audited"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    let (s, v) = nodes[1]
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "acct-audit", "name": "Audit Ltd"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[2]
        .admin(
            "POST",
            "/api/v1/admin/tokens",
            Some(json!({"name": "auditor", "scopes": ["audit:read"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let token_id = v["data"]["id"].as_str().expect("id").to_owned();

    // Every node lists all three, in one order, with the same seqs.
    let start = Instant::now();
    let mut lists = Vec::new();
    for node in &nodes {
        loop {
            let (s, v) = node.admin("GET", "/api/v1/audit", None).await;
            assert_eq!(s, 200, "{v}");
            let rows = v["data"].as_array().cloned().unwrap_or_default();
            if rows.len() >= 3 {
                lists.push(rows);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "a node lists {} entries: {v}",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[1], lists[2]);
    let targets: Vec<&str> = lists[0]
        .iter()
        .map(|e| e["target"].as_str().unwrap_or(""))
        .collect();
    for t in [hash.as_str(), "acct-audit", token_id.as_str()] {
        assert_eq!(
            targets.iter().filter(|x| **x == t).count(),
            1,
            "{t} audited once: {targets:?}"
        );
    }
    // Paging and filters as in single-node mode.
    let first = lists[0][0]["seq"].as_u64().expect("seq");
    let (_, v) = nodes[1]
        .admin("GET", &format!("/api/v1/audit?after={first}&limit=1"), None)
        .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["data"][0], lists[0][1]);
    let (_, v) = nodes[0]
        .admin("GET", "/api/v1/audit?target=acct-audit", None)
        .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["data"][0]["actor"], "root");

    // A restarted node (on its own store) ships nothing twice.
    let mut nodes = nodes;
    nodes[0].terminate();
    nodes[0].restart(&pg, &mock, "a-1", "");
    let (_, v) = nodes[0].admin("GET", "/api/v1/audit", None).await;
    assert_eq!(
        v["data"].as_array().map(Vec::len),
        Some(lists[0].len()),
        "{v}"
    );
}

/// A Stripe event as Stripe signs it (`t=…,v1=HMAC-SHA256(t.body)`), now.
fn stripe_signature(body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(WHSEC.as_bytes()).expect("any key size");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers a Stripe event to a node's webhook.
async fn deliver(node: &Node, body: &[u8]) -> (u16, Value) {
    let req = http::Request::builder()
        .method("POST")
        .uri(node.url("/api/v1/payments/stripe/webhook"))
        .header("stripe-signature", stripe_signature(body))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request builds");
    let res = common::client()
        .request(req)
        .await
        .expect("the node answers");
    let status = res.status().as_u16();
    let b = res.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn stripe_event(id: &str, kind: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "object": "event", "type": kind, "created": 1_700_000_000,
        "data": {"object": object}
    }))
    .expect("json")
}

/// One paid checkout session `cs` of `cents` for `account`, told by event `id`.
fn paid_session(id: &str, kind: &str, cs: &str, account: &str, cents: i64) -> Vec<u8> {
    stripe_event(
        id,
        kind,
        json!({"id": cs, "object": "checkout.session", "mode": "payment",
               "payment_status": "paid", "status": "complete", "amount_total": cents,
               "currency": "usd", "client_reference_id": account,
               "payment_intent": format!("pi_{cs}"),
               "metadata": {"account": account, "kind": "topup"}}),
    )
}

/// A Stripe event POSTed to two nodes at once, and another event of the
/// same checkout session to the third: the account is credited once, the
/// database has one payment record (and its references once), and every
/// node lists it with the same id; a retry later, and a refund through
/// another node than the one that applied it, apply once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_applies_once_over_three_nodes() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes: Vec<Node> = ["p-1", "p-2", "p-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, STRIPE))
        .collect();
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "acct-pay", "email": "pay@example.com"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let completed = paid_session(
        "evt_done",
        "checkout.session.completed",
        "cs_once",
        "acct-pay",
        1000,
    );
    let async_paid = paid_session(
        "evt_async",
        "checkout.session.async_payment_succeeded",
        "cs_once",
        "acct-pay",
        1000,
    );
    let (a, b, c) = tokio::join!(
        deliver(&nodes[0], &completed),
        deliver(&nodes[1], &completed),
        deliver(&nodes[2], &async_paid),
    );
    let answers = [a, b, c];
    for (s, v) in &answers {
        assert_eq!(*s, 200, "{v}");
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    let applied = answers
        .iter()
        .filter(|(_, v)| v["replayed"] == false)
        .count();
    assert_eq!(applied, 1, "one node applied it, two replayed: {answers:?}");
    let id = answers[0].1["payment"]
        .as_str()
        .expect("payment id")
        .to_owned();
    for (_, v) in &answers {
        assert_eq!(v["payment"], id.as_str(), "every answer names one payment");
    }

    let ten = Pico::parse_usd("10").unwrap();
    for n in &nodes {
        let (s, v) = n.admin("GET", "/api/v1/accounts/acct-pay", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(usd(&v["data"]["balance"]), ten, "credited once: {v}");
    }
    let db = pg.client().await;
    let one = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.expect(sql).get::<_, i64>(0) }
    };
    assert_eq!(one("SELECT COUNT(*) FROM tollgate_payments").await, 1);
    // The winner's three references (its event, the session, the intent).
    assert_eq!(one("SELECT COUNT(*) FROM tollgate_payment_refs").await, 3);
    assert_eq!(
        one("SELECT COUNT(*) FROM tollgate_payment_refs WHERE reference = 'cs:cs_once'").await,
        1
    );
    assert_eq!(
        one("SELECT COALESCE(SUM(amount), 0)::int8 FROM tollgate_entries WHERE kind = 'payment'")
            .await,
        ten.0
    );
    assert_eq!(
        one("SELECT balance FROM tollgate_accounts WHERE id = 'acct-pay'").await,
        ten.0
    );

    // Every node lists it, once, with the same id and record.
    let mut lists = Vec::new();
    for n in &nodes {
        let (s, v) = n.admin("GET", "/api/v1/payments", None).await;
        assert_eq!(s, 200, "{v}");
        let rows = v["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 1, "{v}");
        assert_eq!(rows[0]["id"], id.as_str());
        assert_eq!(rows[0]["amount"].to_string(), "10");
        lists.push(rows);
        let (s, v) = n
            .admin(
                "GET",
                "/api/v1/payments?account=acct-pay&status=succeeded",
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
        let (s, v) = n.admin("GET", "/api/v1/payments?provider=epay", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["data"].as_array().map(Vec::len), Some(0), "{v}");
        let (s, v) = n
            .admin("GET", &format!("/api/v1/payments/{id}"), None)
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["data"]["id"], id.as_str());
    }
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[1], lists[2]);

    // Stripe retries, later, on another node: a replay.
    let (s, v) = deliver(&nodes[2], &completed).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["replayed"], true, "{v}");
    assert_eq!(v["payment"], id.as_str());

    // A partial refund through each node at once (one event): taken back once.
    let refund = stripe_event(
        "evt_refund",
        "charge.refunded",
        json!({"id": "ch_once", "object": "charge", "amount": 1000,
               "amount_refunded": 400, "currency": "usd", "payment_intent": "pi_cs_once",
               "refunded": false}),
    );
    let (a, b, c) = tokio::join!(
        deliver(&nodes[0], &refund),
        deliver(&nodes[1], &refund),
        deliver(&nodes[2], &refund),
    );
    let answers = [a, b, c];
    for (s, v) in &answers {
        assert_eq!(*s, 200, "{v}");
        assert_eq!(v["payment"], id.as_str(), "{v}");
    }
    assert_eq!(
        answers
            .iter()
            .filter(|(_, v)| v["replayed"] == false)
            .count(),
        1,
        "{answers:?}"
    );
    let six = Pico::parse_usd("6").unwrap();
    for n in &nodes {
        let (_, v) = n.admin("GET", "/api/v1/accounts/acct-pay", None).await;
        assert_eq!(usd(&v["data"]["balance"]), six, "refunded once: {v}");
        let (_, v) = n.admin("GET", "/api/v1/payments", None).await;
        assert_eq!(v["data"][0]["status"], "partially_refunded", "{v}");
        assert_eq!(v["data"][0]["refunded"].to_string(), "4", "{v}");
    }
    assert_eq!(one("SELECT COUNT(*) FROM tollgate_payments").await, 1);
}

/// A daily plan, and a sweeper that looks often.
const DAILY: &str = r#"
[limits]
sweep_interval = "50ms"
[plans.daily]
interval = "day"
grant = "1"
grace = "1d"
"#;

const DAY_MS: i64 = 86_400_000;

/// A subscription as `node` answers it, once it satisfies `want`.
async fn subscription_where(node: &Node, sid: &str, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = node
            .admin("GET", &format!("/api/v1/subscriptions/{sid}"), None)
            .await;
        if s == 200 && want(&v["data"]) {
            return v["data"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "node {}: {s} {v}",
            node.port
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The grants of `period` in the account's ledger as each of `nodes`
/// lists it (ledgers are cluster-wide: each lists every node's entries).
async fn grants_of_period(nodes: &[Node], account: &str, period: u64) -> Vec<usize> {
    let mut counts = Vec::new();
    for node in nodes {
        let (s, v) = node
            .admin("GET", &format!("/api/v1/accounts/{account}/ledger"), None)
            .await;
        assert_eq!(s, 200, "{v}");
        counts.push(
            v["data"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|e| {
                    e["kind"] == "grant"
                        && e["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains(&format!("period {period} grant")))
                })
                .count(),
        );
    }
    counts
}

/// A subscription made through node 1 is known to every node; a renewal
/// key applies once whichever node it reaches; when the period ends with
/// three nodes running (their clocks a day on), one node rolls it and the
/// period's grant is made once; with node 1 down the others renew it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_renews_once_over_three_nodes() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let ids = ["s-1", "s-2", "s-3"];
    let mut nodes: Vec<Node> = ids
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, DAILY))
        .collect();
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-sub"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-sub/subscriptions",
            Some(json!({"plan": "daily"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let sid = v["data"]["id"].as_str().expect("id").to_owned();
    let (s, v) = nodes[0]
        .admin(
            "POST",
            &format!("/api/v1/subscriptions/{sid}/renew"),
            Some(json!({"idempotency_key": "day1"})),
        )
        .await;
    assert_eq!((s, &v["replayed"]), (200, &json!(false)), "{v}");
    // Every node knows it, as node 1 wrote it.
    let mine = subscription_where(&nodes[0], &sid, |_| true).await;
    for n in &nodes[1..] {
        let theirs = subscription_where(n, &sid, |d| d["paid_through"] == 1).await;
        assert_eq!(theirs, mine);
    }
    // The same renewal key through another node: a replay, nothing paid twice.
    let (s, v) = nodes[2]
        .admin(
            "POST",
            &format!("/api/v1/subscriptions/{sid}/renew"),
            Some(json!({"idempotency_key": "day1"})),
        )
        .await;
    assert_eq!((s, &v["replayed"]), (200, &json!(true)), "{v}");
    assert_eq!(v["data"]["paid_through"], 1, "{v}");
    let db = pg.client().await;
    let claims = |id: String| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT COUNT(*) FROM tollgate_entries WHERE id = $1",
                &[&id],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    assert_eq!(claims(format!("grant:{sid}:g:0:")).await, 1);
    assert_eq!(claims(format!("renewal:{sid}:day1")).await, 1);

    // A day later, three nodes running: period 1 starts once.
    for n in &mut nodes {
        n.terminate();
    }
    nodes = ids
        .iter()
        .map(|id| Node::start_later(&pg, &mock, id, DAILY, DAY_MS + 60_000))
        .collect();
    let rolled = subscription_where(&nodes[0], &sid, |d| d["period"] == 1).await;
    assert_eq!(rolled["status"], "active", "{rolled}");
    for n in &nodes[1..] {
        let theirs = subscription_where(n, &sid, |d| d["period"] == 1).await;
        assert_eq!(theirs, rolled, "every node lists it the same");
    }
    // Some passes later it is still granted once, and listed the same.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut lists = Vec::new();
    for n in &nodes {
        let (s, v) = n
            .admin("GET", "/api/v1/accounts/acct-sub/subscriptions", None)
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
        lists.push(v["data"].clone());
    }
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[1], lists[2]);
    assert_eq!(claims(format!("grant:{sid}:g:1:")).await, 1);
    assert_eq!(grants_of_period(&nodes, "acct-sub", 1).await, [1, 1, 1]);
    // The database's allowance is period 1's grant: period 0's lapsed
    // once, period 1's was granted once.
    let one_usd = Pico::parse_usd("1").unwrap().0;
    let allowance = || {
        let db = &db;
        async move {
            db.query_one(
                "SELECT allowance FROM tollgate_accounts WHERE id = 'acct-sub'",
                &[],
            )
            .await
            .expect("account row")
            .get::<_, i64>(0)
        }
    };
    assert_eq!(allowance().await, one_usd);
    assert_eq!(claims(format!("lapse:{sid}:0")).await, 1);

    // Node 1 down: renewed through node 2, the next period rolls elsewhere.
    nodes[0].terminate();
    let (s, v) = nodes[1]
        .admin(
            "POST",
            &format!("/api/v1/subscriptions/{sid}/renew"),
            Some(json!({"idempotency_key": "day2"})),
        )
        .await;
    assert_eq!((s, &v["replayed"]), (200, &json!(false)), "{v}");
    subscription_where(&nodes[2], &sid, |d| d["paid_through"] == 2).await;
    for n in &mut nodes[1..] {
        n.terminate();
    }
    let mut later: Vec<Node> = ids[1..]
        .iter()
        .map(|id| Node::start_later(&pg, &mock, id, DAILY, 2 * DAY_MS + 120_000))
        .collect();
    for n in &later {
        subscription_where(n, &sid, |d| d["period"] == 2).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(claims(format!("grant:{sid}:g:2:")).await, 1);
    assert_eq!(grants_of_period(&later, "acct-sub", 2).await, [1, 1]);
    assert_eq!(allowance().await, one_usd);
    assert_eq!(claims(format!("lapse:{sid}:1")).await, 1);
    for n in &mut later {
        n.terminate();
    }
}

/// An epay notification, signed as the provider signs it, POSTed to `node`.
async fn epay_notify(node: &Node, params: &[(&str, &str)]) -> (u16, String) {
    let mut all: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let sign = tollgate::payments::epay::sign(&all, EPAY_KEY);
    all.push(("sign".into(), sign));
    all.push(("sign_type".into(), "MD5".into()));
    let req = http::Request::builder()
        .method("POST")
        .uri(node.url("/api/v1/payments/epay/notify"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(tollgate::payments::stripe::form(
            &all,
        ))))
        .expect("request builds");
    let res = common::client()
        .request(req)
        .await
        .expect("the node answers");
    let status = res.status().as_u16();
    let b = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

/// An epay order made through node 1 is paid by a notification reaching
/// nodes 2 and 3 at once: credited once. An activation reaching two nodes
/// at once credits once and issues one key, whose secret one read on any
/// node shows, and no read after. A manual payment's reference sent to two
/// nodes at once applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn epay_and_manual_payments_apply_once_over_three_nodes() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes: Vec<Node> = ["e-1", "e-2", "e-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, EPAY))
        .collect();
    for (id, email) in [("acct-e", "e@example.com"), ("acct-f", "f@example.com")] {
        let (s, v) = nodes[0]
            .admin(
                "POST",
                "/api/v1/accounts",
                Some(json!({"id": id, "email": email})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-e/checkout",
            Some(json!({"provider": "epay", "kind": "topup", "amount": "10", "type": "alipay"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let order = v["data"]["out_trade_no"]
        .as_str()
        .expect("order")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The order's notification, to the two nodes that did not make it.
    let paid = [
        ("pid", "1001"),
        ("trade_no", "T-ORDER-1"),
        ("out_trade_no", order.as_str()),
        ("money", "10.00"),
        ("trade_status", "TRADE_SUCCESS"),
        ("type", "alipay"),
    ];
    let (a, b) = tokio::join!(epay_notify(&nodes[1], &paid), epay_notify(&nodes[2], &paid));
    assert_eq!(a, (200, "success".to_owned()));
    assert_eq!(b, (200, "success".to_owned()));
    let ten = Pico::parse_usd("10").unwrap();
    for n in &nodes {
        let (_, v) = n.admin("GET", "/api/v1/accounts/acct-e", None).await;
        assert_eq!(usd(&v["data"]["balance"]), ten, "credited once: {v}");
    }

    // An activation (an order the shop made) reaching two nodes at once.
    let param = json!({"email": "f@example.com", "type": "activation", "credits": "5",
        "original_amount": "10.00"})
    .to_string();
    let activation = [
        ("pid", "1001"),
        ("trade_no", "X-ACT-1"),
        ("out_trade_no", "SHOP-ORDER-1"),
        ("money", "10.00"),
        ("trade_status", "TRADE_SUCCESS"),
        ("type", "wxpay"),
        ("param", param.as_str()),
    ];
    let (a, b) = tokio::join!(
        epay_notify(&nodes[1], &activation),
        epay_notify(&nodes[2], &activation)
    );
    assert_eq!(a, (200, "success".to_owned()));
    assert_eq!(b, (200, "success".to_owned()));
    let five = Pico::parse_usd("5").unwrap();
    let (_, v) = nodes[0].admin("GET", "/api/v1/accounts/acct-f", None).await;
    assert_eq!(usd(&v["data"]["balance"]), five, "credited once: {v}");
    let (_, v) = nodes[0]
        .admin("GET", "/api/v1/payments?account=acct-f", None)
        .await;
    let list = v["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{v}");
    let pid = list[0]["id"].as_str().expect("id").to_owned();
    let hash = list[0]["issued_key"]["hash"]
        .as_str()
        .expect("a key was issued")
        .to_owned();
    assert!(
        list[0]["issued_key"].get("key").is_none(),
        "lists never show it"
    );
    // One key, known to every node.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in &nodes {
        let (_, v) = n.admin("GET", "/api/v1/keys?owner=acct-f", None).await;
        let keys = v["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(keys.len(), 1, "one activation key: {v}");
        assert_eq!(keys[0]["hash"], hash.as_str());
    }
    // Read on all three nodes at once: the secret is shown once.
    let path = format!("/api/v1/payments/{pid}");
    let (a, b, c) = tokio::join!(
        nodes[0].admin("GET", &path, None),
        nodes[1].admin("GET", &path, None),
        nodes[2].admin("GET", &path, None),
    );
    let reads = [a, b, c];
    let shown: Vec<&str> = reads
        .iter()
        .filter_map(|(s, v)| {
            assert_eq!(*s, 200, "{v}");
            v["data"]["issued_key"]["key"].as_str()
        })
        .collect();
    assert_eq!(shown.len(), 1, "shown once: {reads:?}");
    assert_eq!(
        hex::encode(tollgate::gate::hash_key(shown[0])),
        hash,
        "the secret shown is the issued key's"
    );
    let (_, v) = nodes[1].admin("GET", &path, None).await;
    assert!(v["data"]["issued_key"].get("key").is_none(), "{v}");
    let db = pg.client().await;
    let records: Vec<String> = db
        .query("SELECT record FROM tollgate_payments", &[])
        .await
        .expect("records")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(records.len(), 2);
    assert!(
        records.iter().all(|r| !r.contains(shown[0])),
        "the database no longer holds the secret"
    );

    // A manual payment's reference, to two nodes at once.
    let manual =
        json!({"account": "acct-e", "amount": "2", "reference": "wire-7", "kind": "topup"});
    let (a, b) = tokio::join!(
        nodes[0].admin("POST", "/api/v1/payments", Some(manual.clone())),
        nodes[2].admin("POST", "/api/v1/payments", Some(manual.clone())),
    );
    let mut codes = [a.0, b.0];
    codes.sort();
    assert_eq!(codes, [200, 201], "{a:?} {b:?}");
    assert_eq!(a.1["data"]["id"], b.1["data"]["id"]);
    let twelve = Pico::parse_usd("12").unwrap();
    for n in &nodes {
        let (_, v) = n.admin("GET", "/api/v1/accounts/acct-e", None).await;
        assert_eq!(usd(&v["data"]["balance"]), twelve, "{v}");
        let (_, v) = n.admin("GET", "/api/v1/payments", None).await;
        assert_eq!(v["data"].as_array().map(Vec::len), Some(3), "{v}");
    }
    // Reconcile on any node sees every node's payments.
    let (s, v) = nodes[1]
        .admin("GET", "/api/v1/payments/reconcile", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["totals"]["epay"]["payments"], 2, "{v}");
    assert_eq!(v["data"]["totals"]["manual"]["payments"], 1, "{v}");
}

/// What a receiver of [`receiver`] answers the next try with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HookMode {
    /// 500 at once.
    Refuse,
    /// Holds the try for half a minute, then 503 (a node killed meanwhile
    /// never learns its outcome).
    Hang,
    /// 204.
    Accept,
}

/// The status a try answered in `mode` is recorded with.
fn code_of(mode: HookMode) -> u16 {
    match mode {
        HookMode::Refuse => 500,
        HookMode::Hang => 503,
        HookMode::Accept => 204,
    }
}

/// A webhook receiver answering as the returned mode says (set it to
/// change the answers of the tries after).
async fn receiver(mode: HookMode) -> (Hook, Arc<Mutex<HookMode>>) {
    let m = Arc::new(Mutex::new(mode));
    let now = m.clone();
    let hook = Hook::start_slow(Arc::new(move |_, _| {
        let mode = *now.lock().expect("mode");
        let hold = match mode {
            HookMode::Hang => Duration::from_secs(30),
            _ => Duration::ZERO,
        };
        (code_of(mode), hold)
    }))
    .await;
    (hook, m)
}

/// `[[webhooks]]` for `hook` (after `[cluster]` in a node's config).
fn hook_config(hook: &Hook, retry: &str, timeout: &str) -> String {
    format!(
        "[[webhooks]]\nurl = \"{}\"\nsecret_env = \"TOLLGATE_TEST_HOOK_SECRET\"\n\
         retry = {retry}\ntimeout = \"{timeout}\"\n",
        hook.url()
    )
}

/// Each try is signed, and carries its event's id as `webhook-id`.
fn assert_signed(tries: &[Got]) {
    for t in tries {
        assert_eq!(t.sig, expected_signature(&t.id, &t.ts, &t.body), "{t:?}");
        let ev: Value = serde_json::from_slice(&t.body).expect("a JSON body");
        assert_eq!(ev["id"], t.id.as_str(), "the body's id is the webhook-id");
    }
}

/// Every node runs a deliverer, yet each event (one made on each node,
/// each its node's first, `evt_1` in every local outbox) reaches the
/// receiver once, under an id no other node's event has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_delivered_once_by_one_of_three_nodes() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let (hook, _) = receiver(HookMode::Accept).await;
    let extra = hook_config(&hook, r#"["1s"]"#, "5s");
    let nodes: Vec<Node> = ["e-1", "e-2", "e-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, &extra))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        let (s, v) = n
            .admin(
                "POST",
                "/api/v1/keys",
                Some(json!({"name": format!("hooked-{i}")})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let start = Instant::now();
    while hook.got().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "tries: {:?}",
            hook.got()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a second node to deliver one again, if it would.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = hook.got();
    assert_eq!(tries.len(), 3, "one try per event: {tries:?}");
    let mut ids: Vec<&str> = tries.iter().map(|t| t.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three events, three ids: {ids:?}");
    assert_signed(&tries);
    let names: Vec<Value> = tries
        .iter()
        .map(|t| serde_json::from_slice::<Value>(&t.body).expect("json")["data"]["name"].clone())
        .collect();
    for i in 0..3 {
        assert!(names.contains(&json!(format!("hooked-{i}"))), "{names:?}");
    }
    // The database says delivered, once each, by some node.
    let db = pg.client().await;
    let rows = db
        .query(
            "SELECT d.status, d.attempts, d.claimed_by, e.origin, e.kind \
             FROM tollgate_deliveries d JOIN tollgate_events e ON e.id = d.event_id",
            &[],
        )
        .await
        .expect("deliveries");
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(r.get::<_, String>(0), "delivered");
        assert_eq!(r.get::<_, i32>(1), 1);
        assert!(
            r.get::<_, Option<String>>(2)
                .is_some_and(|n| n.starts_with("e-"))
        );
        assert_eq!(r.get::<_, String>(4), "key.created");
    }
    let mut origins: Vec<String> = rows.iter().map(|r| r.get(3)).collect();
    origins.sort();
    assert_eq!(origins, ["e-1", "e-2", "e-3"]);

    // Every node lists the same events (the ids the receiver got) and
    // deliveries, from the database.
    let mut lists = Vec::new();
    for n in &nodes {
        let (s, v) = n.admin("GET", "/api/v1/events?type=key.*", None).await;
        assert_eq!(s, 200, "{v}");
        lists.push(v["data"].clone());
        let (s, v) = n
            .admin("GET", "/api/v1/webhooks/deliveries?status=delivered", None)
            .await;
        assert_eq!(s, 200, "{v}");
        let d = v["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(d.len(), 3, "{v}");
        assert!(
            d.iter()
                .all(|d| d["attempts"] == 1 && d["last_status"] == 204),
            "{v}"
        );
    }
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[1], lists[2]);
    let listed: Vec<&str> = lists[0]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "the listed ids are the webhook-ids");
    let (_, v) = nodes[2]
        .admin("GET", &format!("/api/v1/events?after={}", listed[0]), None)
        .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
    let (_, v) = nodes[2]
        .admin("GET", "/api/v1/events?type=payment.*", None)
        .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0), "{v}");

    // A redelivery asked of one node is made once, by some node, same id.
    let again = listed[1].to_owned();
    let (s, v) = nodes[1]
        .admin("POST", &format!("/api/v1/events/{again}/redeliver"), None)
        .await;
    assert_eq!(s, 202, "{v}");
    let start = Instant::now();
    while hook.got().len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(10), "no redelivery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = hook.got();
    assert_eq!(tries.len(), 4, "{tries:?}");
    assert_eq!(tries[3].id, again);
    assert_signed(&tries);
}

/// The node holding a delivery is SIGKILLed mid-try (after a refused
/// one): the others, running deliverers all along, leave it alone while
/// the claim lasts, then one of them delivers it, with the same
/// webhook-id, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_pending_delivery_is_made_by_another_after_its_claim() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let (hook, mode) = receiver(HookMode::Refuse).await;
    let set = |m: HookMode| *mode.lock().expect("mode") = m;
    // A claim lasts the timeout (8 s) and a sync interval (1 s).
    let extra = hook_config(&hook, r#"["1s", "1s", "1s", "1s", "1s", "1s"]"#, "8s");
    let mut n1 = Node::start_with(&pg, &mock, "k-1", &extra);
    let (s, v) = n1
        .admin("POST", "/api/v1/keys", Some(json!({"name": "pending"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let start = Instant::now();
    while hook.got().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "no first try");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set(HookMode::Hang);
    while !hook.got().iter().any(|t| t.code == code_of(HookMode::Hang)) {
        assert!(start.elapsed() < Duration::from_secs(15), "no second try");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = pg.client().await;
    let held = db
        .query_one(
            "SELECT claimed_by, attempts, status FROM tollgate_deliveries",
            &[],
        )
        .await
        .expect("the delivery");
    assert_eq!(held.get::<_, Option<String>>(0).as_deref(), Some("k-1"));
    assert_eq!(held.get::<_, i32>(1), 1, "the refused try is recorded");
    assert_eq!(held.get::<_, String>(2), "pending");
    // Two more deliverers while k-1 holds the claim.
    let others: Vec<Node> = ["k-2", "k-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, &extra))
        .collect();
    n1.kill9();
    set(HookMode::Accept);
    let hung_at = hook
        .got()
        .iter()
        .find(|t| t.code == code_of(HookMode::Hang))
        .map(|t| t.at)
        .expect("the hung try");
    while !hook
        .got()
        .iter()
        .any(|t| t.code == code_of(HookMode::Accept))
    {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "not delivered after the claim: {:?}",
            hook.got()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = hook.got();
    let accepted: Vec<&Got> = tries
        .iter()
        .filter(|t| t.code == code_of(HookMode::Accept))
        .collect();
    assert_eq!(accepted.len(), 1, "delivered once: {tries:?}");
    assert_eq!(tries.len(), 3, "refused, hung, delivered: {tries:?}");
    assert!(
        accepted[0].at.duration_since(hung_at) >= Duration::from_secs(8),
        "not before k-1's claim expired: {:?}",
        accepted[0].at.duration_since(hung_at)
    );
    assert!(
        tries.iter().all(|t| t.id == tries[0].id),
        "one webhook-id: {tries:?}"
    );
    assert_signed(&tries);
    let done = db
        .query_one(
            "SELECT claimed_by, attempts, status, last_status FROM tollgate_deliveries",
            &[],
        )
        .await
        .expect("the delivery");
    let by = done.get::<_, Option<String>>(0).unwrap_or_default();
    assert!(by == "k-2" || by == "k-3", "delivered by {by}");
    assert_eq!(done.get::<_, i32>(1), 2, "the cut try left no outcome");
    assert_eq!(done.get::<_, String>(2), "delivered");
    assert_eq!(done.get::<_, Option<i32>>(3), Some(204));
    drop(others);
}

/// The database down: events made meanwhile wait in the node's own
/// outbox (a key made, a node SIGTERMed and started again), and are
/// shipped and delivered, once each, when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_made_while_the_database_is_down_are_delivered_when_it_is_back() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let (hook, _) = receiver(HookMode::Accept).await;
    let extra = hook_config(&hook, r#"["1s"]"#, "5s");
    let mut nodes: Vec<Node> = ["o-1", "o-2"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, &extra))
        .collect();
    pg.stop();
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "made-offline"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        hook.got().is_empty(),
        "nothing delivered without the database"
    );
    // A restart meanwhile loses nothing: the event is in the local store.
    nodes[0].terminate();
    pg.restart();
    nodes[0].restart(&pg, &mock, "o-1", &extra);
    let start = Instant::now();
    while hook.got().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not delivered after the outage: {}",
            nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = hook.got();
    assert_eq!(tries.len(), 1, "{tries:?}");
    assert_signed(&tries);
    let ev: Value = serde_json::from_slice(&tries[0].body).expect("json");
    assert_eq!(ev["type"], "key.created");
    assert_eq!(ev["data"]["name"], "made-offline");
}

/// Retention in the database: an event older than
/// `storage.event_retention_days` whose deliveries finished goes, with
/// its delivery rows; an old one still pending stays, and so does a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_finished_events_are_pruned_from_the_database() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let node = Node::start_with(&pg, &mock, "r-1", "[limits]\nsweep_interval = \"1s\"\n");
    let db = pg.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let old = now - 31 * 86_400_000;
    for (id, at, status) in [
        ("evt_x_1_1", old, "delivered"),
        ("evt_x_2_1", old, "pending"),
        ("evt_x_3_1", now, "delivered"),
    ] {
        db.execute(
            "INSERT INTO tollgate_events (id, kind, body, created_ms, origin) \
             VALUES ($1, 'key.created', '\\x7b7d', $2, 'x')",
            &[&id, &at],
        )
        .await
        .expect("an event");
        // The pending one is due far ahead: no node tries it meanwhile.
        db.execute(
            "INSERT INTO tollgate_deliveries (event_id, endpoint, status, next_attempt_ms, updated_ms) \
             VALUES ($1, 'webhook:http://127.0.0.1:9/none', $2, $3, $3)",
            &[&id, &status, &(now + 86_400_000)],
        )
        .await
        .expect("a delivery");
    }
    let start = Instant::now();
    loop {
        let left: Vec<String> = db
            .query("SELECT id FROM tollgate_events ORDER BY id", &[])
            .await
            .expect("events")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if left.len() == 2 {
            assert_eq!(left, ["evt_x_2_1", "evt_x_3_1"]);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not pruned: {left:?} {}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = db
        .query("SELECT event_id FROM tollgate_deliveries", &[])
        .await
        .expect("deliveries");
    assert_eq!(rows.len(), 2, "the pruned event's delivery went with it");
}

/// A ledger's entries as every node must list them: the whole list (in
/// pages of two, to exercise `offset`), then checks that it is complete.
async fn ledger_of(node: &Node, path: &str, want: usize) -> Vec<Value> {
    let start = Instant::now();
    let mut before: Option<Vec<Value>> = None;
    loop {
        let mut rows = Vec::new();
        loop {
            let (s, v) = node
                .admin(
                    "GET",
                    &format!("{path}?offset={}&limit=2", rows.len()),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{v}");
            let page = v["data"].as_array().cloned().unwrap_or_default();
            let last = page.len() < 2;
            rows.extend(page);
            if last {
                break;
            }
        }
        // An entry another node ships between two pages shifts the pages
        // after it (offset paging): a listing counts once two in a row
        // are the same.
        if rows.len() >= want && before.as_ref() == Some(&rows) {
            return rows;
        }
        before = Some(rows.clone());
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{path} lists {} entries, not {want}: {rows:?}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledgers_are_the_same_on_every_node() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let mut nodes = Node::start_all(&pg, &mock, &["l-1", "l-2", "l-3"]);
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-l"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "own", "limit": "1"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    known_everywhere(&nodes, &hash).await;
    let start = Instant::now();
    while nodes[1]
        .admin("GET", "/api/v1/accounts/acct-l", None)
        .await
        .0
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node 2 never saw the account"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The account: a top-up through node 1, a deduct and a refund through
    // node 2; the key: a top-up through node 3, a deduct through node 2.
    // (A few ms apart: newest first is by time.)
    let credit = |kind: &str, amount: &str| json!({"kind": kind, "amount": amount, "reason": format!("{kind} test")});
    let account = "/api/v1/accounts/acct-l/credits";
    let key = format!("/api/v1/keys/{hash}/credits");
    for (node, path, kind, amount) in [
        (0, account, "topup", "10"),
        (1, account, "deduct", "1.5"),
        (1, account, "refund", "0.25"),
        (2, key.as_str(), "topup", "2"),
        (1, key.as_str(), "deduct", "0.5"),
    ] {
        let (s, v) = nodes[node]
            .admin("POST", path, Some(credit(kind, amount)))
            .await;
        assert_eq!(s, 200, "{kind} via node {}: {v}", node + 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A top-up with an idempotency key through node 1, retried through
    // node 3: its money applies once cluster-wide, and so it is listed.
    let once =
        json!({"kind": "topup", "amount": "3", "reason": "once", "idempotency_key": "once-1"});
    let account_ledger = "/api/v1/accounts/acct-l/ledger";
    let (s, v) = nodes[0].admin("POST", account, Some(once.clone())).await;
    assert_eq!(s, 200, "{v}");
    // (Listed through node 1 first: its entry is the one in the database.)
    let (s, v) = nodes[0].admin("GET", account_ledger, None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = nodes[2].admin("POST", account, Some(once)).await;
    assert_eq!(s, 200, "{v}");

    let key_ledger = format!("/api/v1/keys/{hash}/ledger");
    let mut accounts = Vec::new();
    let mut keys = Vec::new();
    for node in &nodes {
        accounts.push(ledger_of(node, account_ledger, 4).await);
        keys.push(ledger_of(node, &key_ledger, 2).await);
    }
    for i in 1..3 {
        assert_eq!(
            accounts[i],
            accounts[0],
            "node {} lists another account ledger",
            i + 1
        );
        assert_eq!(keys[i], keys[0], "node {} lists another key ledger", i + 1);
    }
    let summary = |rows: &[Value]| -> Vec<(String, String, Pico)> {
        rows.iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap_or("").to_owned(),
                    e["node"].as_str().unwrap_or("").to_owned(),
                    usd(&e["amount"]),
                )
            })
            .collect()
    };
    let p = |s: &str| Pico::parse_usd(s).expect("amount");
    assert_eq!(
        summary(&accounts[0]),
        vec![
            ("topup".into(), "l-1".into(), p("3")),
            ("refund".into(), "l-2".into(), p("0.25")),
            ("deduct".into(), "l-2".into(), p("1.5")),
            ("topup".into(), "l-1".into(), p("10")),
        ],
        "{:?}",
        accounts[0]
    );
    // Its money, once: 10 − 1.5 + 0.25 + 3 (the deduct settles on a tick).
    let start = Instant::now();
    loop {
        let (_, v) = nodes[1].admin("GET", "/api/v1/accounts/acct-l", None).await;
        if usd(&v["data"]["balance"]) == p("11.75") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        summary(&keys[0]),
        vec![
            ("deduct".into(), "l-2".into(), p("0.5")),
            ("topup".into(), "l-3".into(), p("2")),
        ],
        "{:?}",
        keys[0]
    );
    // The shape of a single node's entries, and `node`.
    for field in [
        "seq",
        "at",
        "reason",
        "balance_after",
        "spent_after",
        "allowance_after",
    ] {
        assert!(
            accounts[0][0].get(field).is_some(),
            "{field}: {}",
            accounts[0][0]
        );
    }
    for field in ["seq", "at", "limit_after", "usage_after"] {
        assert!(keys[0][0].get(field).is_some(), "{field}: {}", keys[0][0]);
    }
    // Paging: one entry from the middle is the same on any node.
    let (_, v) = nodes[2]
        .admin("GET", &format!("{account_ledger}?offset=1&limit=1"), None)
        .await;
    assert_eq!(v["data"], json!([accounts[0][1].clone()]), "{v}");
    // Unknown to the cluster: 404 as on one node.
    let (s, v) = nodes[1]
        .admin("GET", "/api/v1/accounts/acct-none/ledger", None)
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = nodes[1]
        .admin(
            "GET",
            &format!("/api/v1/keys/{}/ledger", "0".repeat(64)),
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    // Known but without entries: an empty list.
    let (s, v) = nodes[2]
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "acct-empty"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin("GET", "/api/v1/accounts/acct-empty/ledger", None)
        .await;
    assert_eq!((s, v["data"].clone()), (200, json!([])), "{v}");

    // A restarted node ships nothing twice. The database's copy of node 2's
    // refund is removed first: a node that shipped its whole ledger again
    // at start would put it back.
    let db = pg.client().await;
    let removed = db
        .execute(
            "DELETE FROM tollgate_ledger WHERE node_id = 'l-2' AND kind = 'refund'",
            &[],
        )
        .await
        .expect("delete");
    assert_eq!(removed, 1);
    nodes[1].terminate();
    nodes[1].restart(&pg, &mock, "l-2", "");
    let (s, v) = nodes[1]
        .admin("POST", account, Some(credit("deduct", "0.125")))
        .await;
    assert_eq!(s, 200, "{v}");
    let after = ledger_of(&nodes[0], account_ledger, 4).await;
    assert_eq!(
        summary(&after),
        vec![
            ("deduct".into(), "l-2".into(), p("0.125")),
            ("topup".into(), "l-1".into(), p("3")),
            ("deduct".into(), "l-2".into(), p("1.5")),
            ("topup".into(), "l-1".into(), p("10")),
        ],
        "{after:?}"
    );
    let rows: i64 = db
        .query_one("SELECT COUNT(*) FROM tollgate_ledger", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 6, "each entry once");

    // The database unreachable: 503 in the API's error shape.
    pg.stop();
    let (s, v) = nodes[2].admin("GET", account_ledger, None).await;
    common::assert_error(s, &v, 503, "database_unavailable");
    pg.restart();
}

/// A daily plan granting 0.004 USD (about 20 requests of the mock) per
/// period, no rollover, and a sweeper that looks often.
const ALLOWANCE: &str = r#"
[limits]
sweep_interval = "50ms"
[plans.small]
interval = "day"
grant = "0.004"
grace = "1d"
"#;

/// The database's money of an account: (allowance, balance, spent, leased).
async fn money_of(db: &tokio_postgres::Client, account: &str) -> (i64, i64, i64, i64) {
    let r = db
        .query_one(
            "SELECT allowance, balance, spent, leased FROM tollgate_accounts WHERE id = $1",
            &[&account],
        )
        .await
        .expect("account row");
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Waits until no node holds a lease on `account` (settled and returned:
/// idle leases go back after two sync intervals).
async fn leases_back(db: &tokio_postgres::Client, account: &str) -> (i64, i64, i64, i64) {
    let start = Instant::now();
    loop {
        let m = money_of(db, account).await;
        if m.3 == 0 {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "leases of {account} still out: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Σ the usage of `keys` as the database has it.
async fn keys_usage(db: &tokio_postgres::Client, keys: &[(String, String)]) -> i64 {
    let mut total = 0;
    for (_, hash) in keys {
        let h = hex::decode(hash).expect("hex hash");
        total += db
            .query_one("SELECT usage FROM tollgate_keys WHERE hash = $1", &[&h])
            .await
            .expect("key row")
            .get::<_, i64>(0);
    }
    total
}

/// An account made on node 1 with `balance` (a top-up, when not zero),
/// subscribed to `small`, with three keys; every node knows all of it.
/// Returns the keys and the subscription id.
async fn subscribed_account(
    nodes: &[Node],
    id: &str,
    balance: &str,
) -> (Vec<(String, String)>, String) {
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": id})))
        .await;
    assert_eq!(s, 201, "{v}");
    if Pico::parse_usd(balance).unwrap() != Pico::ZERO {
        let topup = json!({"amount": balance, "kind": "topup", "reason": "test"});
        let (s, v) = nodes[0]
            .admin(
                "POST",
                &format!("/api/v1/accounts/{id}/credits"),
                Some(topup),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = nodes[0]
        .admin(
            "POST",
            &format!("/api/v1/accounts/{id}/subscriptions"),
            Some(json!({"plan": "small"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let sid = v["data"]["id"].as_str().expect("id").to_owned();
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(create_key(&nodes[0], &format!("{id}-{i}"), id).await);
    }
    for n in nodes {
        subscription_where(n, &sid, |_| true).await;
        for (_, hash) in &keys {
            known_everywhere(std::slice::from_ref(n), hash).await;
        }
    }
    (keys, sid)
}

/// Every node answers the account with these allowance and balance (the
/// database's).
async fn account_everywhere(nodes: &[Node], id: &str, allowance: i64, balance: i64) {
    for n in nodes {
        let (s, v) = n
            .admin("GET", &format!("/api/v1/accounts/{id}"), None)
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(usd(&v["data"]["allowance"]), Pico(allowance), "{v}");
        assert_eq!(usd(&v["data"]["balance"]), Pico(balance), "{v}");
    }
}

/// Requests with the account's keys, spread over the nodes and sent
/// concurrently; their statuses.
async fn spread(nodes: &[Node], keys: &[(String, String)], n: usize) -> Vec<u16> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(30));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = nodes[i % nodes.len()].url("/v1/chat/completions");
        let auth = format!("Bearer {}", keys[(i / nodes.len()) % keys.len()].0);
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            let body = json!({"model": "demo-chat", "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hello."}]});
            send("POST", &url, &auth, Some(body)).await.0
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Issue 18: a plan's grant is spendable on every node. An account with
/// no balance is admitted up to its allowance over three nodes, then
/// refused 402 everywhere; the allowance pays, the balance is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_allowance_is_spent_on_every_node_and_not_overspent() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes: Vec<Node> = ["a-1", "a-2", "a-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, ALLOWANCE))
        .collect();
    let grant = Pico::parse_usd("0.004").unwrap().0;
    let (keys, _) = subscribed_account(&nodes, "acct-allow", "0").await;
    let db = pg.client().await;
    assert_eq!(money_of(&db, "acct-allow").await, (grant, 0, 0, 0));
    account_everywhere(&nodes, "acct-allow", grant, 0).await;

    // Every node admits: each serves one request on the allowance.
    for n in &nodes {
        assert_eq!(n.chat(&keys[0].0, false).await, 200, "{}", n.log());
    }
    let codes = spread(&nodes, &keys, 240).await;
    let admitted = codes.iter().filter(|c| **c == 200).count() + nodes.len();
    assert!(
        codes.iter().all(|c| [200, 402].contains(c)),
        "unexpected answers: {codes:?}"
    );
    assert!(codes.contains(&402), "the allowance pays for ~20, not 240");
    let (allowance, balance, spent, _) = leases_back(&db, "acct-allow").await;
    eprintln!("{admitted} admitted on an allowance of {grant}: spent {spent}, {allowance} left");
    assert!(admitted >= 10, "only {admitted} admitted");
    assert_eq!(balance, 0, "the balance is not touched");
    assert!((0..grant).contains(&allowance), "allowance {allowance}");
    assert_eq!(spent, grant - allowance, "the allowance paid every charge");
    assert_eq!(keys_usage(&db, &keys).await, spent);
    account_everywhere(&nodes, "acct-allow", allowance, 0).await;
    // What the burst's reservations left is spent one request at a time,
    // on any node (each once the last one's lease is back), until what is
    // left does not cover one: then every node refuses.
    let mut more = 0;
    loop {
        leases_back(&db, "acct-allow").await;
        let n = &nodes[more % nodes.len()];
        match n.chat(&keys[1].0, false).await {
            200 => more += 1,
            402 => break,
            other => panic!("answered {other}"),
        }
        assert!(more < 30, "admitted past the allowance");
    }
    let (allowance, balance, spent, _) = leases_back(&db, "acct-allow").await;
    eprintln!("{more} more admitted: spent {spent}, {allowance} left");
    assert_eq!((balance, spent), (0, grant - allowance));
    assert!(allowance >= 0);
    for n in &nodes {
        assert_eq!(n.chat(&keys[2].0, false).await, 402);
    }
    // Refused, nothing charged (a slice a refused request took goes back).
    assert_eq!(
        leases_back(&db, "acct-allow").await,
        (allowance, 0, spent, 0)
    );
}

/// With a balance too, the allowance is spent first (on every node), and
/// then the balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_allowance_is_spent_before_the_balance_cluster_wide() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes: Vec<Node> = ["b-1", "b-2", "b-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, ALLOWANCE))
        .collect();
    let grant = Pico::parse_usd("0.004").unwrap().0;
    let topped = Pico::parse_usd("1").unwrap().0;
    let (keys, _) = subscribed_account(&nodes, "acct-both", "1").await;
    let db = pg.client().await;
    assert_eq!(money_of(&db, "acct-both").await, (grant, topped, 0, 0));
    account_everywhere(&nodes, "acct-both", grant, topped).await;

    // A few requests (less than the allowance): all of it from the allowance.
    let codes = spread(&nodes, &keys, 6).await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let (allowance, balance, spent, _) = leases_back(&db, "acct-both").await;
    assert!(spent > 0 && spent < grant, "spent {spent}");
    assert_eq!(balance, topped, "the balance waits for the allowance");
    assert_eq!(allowance, grant - spent);
    account_everywhere(&nodes, "acct-both", allowance, topped).await;

    // Many more: the allowance runs out, then the balance pays the rest.
    let codes = spread(&nodes, &keys, 90).await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let (allowance, balance, spent, _) = leases_back(&db, "acct-both").await;
    assert!(spent > grant, "spent {spent}");
    assert_eq!(allowance, 0, "spent first, all of it");
    assert_eq!(balance, topped + grant - spent);
    assert_eq!(keys_usage(&db, &keys).await, spent);
    account_everywhere(&nodes, "acct-both", 0, balance).await;
}

/// At the period's end the unused allowance lapses (no rollover): the
/// next period's grant replaces it, once, whichever node rolls it, and a
/// subscription that ends takes it away on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unused_allowance_does_not_carry_over_cluster_wide() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let ids = ["l-1", "l-2", "l-3"];
    let mut nodes: Vec<Node> = ids
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, ALLOWANCE))
        .collect();
    let grant = Pico::parse_usd("0.004").unwrap().0;
    let (keys, sid) = subscribed_account(&nodes, "acct-lapse", "0").await;
    let (s, v) = nodes[1]
        .admin(
            "POST",
            &format!("/api/v1/subscriptions/{sid}/renew"),
            Some(json!({"idempotency_key": "paid-1"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let codes = spread(&nodes, &keys, 3).await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let db = pg.client().await;
    let (left, _, spent, _) = leases_back(&db, "acct-lapse").await;
    assert_eq!(left, grant - spent);
    assert!(left > 0);

    // A day later, three nodes running: period 1's grant replaces what
    // was left of period 0's (not added to it), once.
    for n in &mut nodes {
        n.terminate();
    }
    nodes = ids
        .iter()
        .map(|id| Node::start_later(&pg, &mock, id, ALLOWANCE, DAY_MS + 60_000))
        .collect();
    for n in &nodes {
        subscription_where(n, &sid, |d| d["period"] == 1).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(money_of(&db, "acct-lapse").await, (grant, 0, spent, 0));
    account_everywhere(&nodes, "acct-lapse", grant, 0).await;
    let lapsed: Vec<(String, i64)> = db
        .query(
            "SELECT id, amount FROM tollgate_entries WHERE kind = 'lapse' AND account_id = 'acct-lapse'",
            &[],
        )
        .await
        .expect("lapses")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(lapsed, vec![(format!("lapse:{sid}:0"), -left)]);
    // The new period's allowance is spendable.
    assert_eq!(nodes[2].chat(&keys[0].0, false).await, 200);

    // Canceled now (through node 3): the allowance lapses on every node.
    let (s, v) = nodes[2]
        .admin(
            "POST",
            &format!("/api/v1/subscriptions/{sid}/cancel"),
            Some(json!({"at_period_end": false})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (allowance, balance, _, _) = leases_back(&db, "acct-lapse").await;
    assert_eq!((allowance, balance), (0, 0));
    for n in &nodes {
        subscription_where(n, &sid, |d| d["status"] == "canceled").await;
        assert_eq!(n.chat(&keys[1].0, false).await, 402);
    }
    for n in &mut nodes {
        n.terminate();
    }
}

/// The nodes' slices of an allowance that lapses go back to the account at
/// once (each node gives its slice back when it sees the change), not
/// after they are idle: no node spends credit that lapsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapse_takes_back_the_slices_the_nodes_hold() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let mut nodes: Vec<Node> = ["g-1", "g-2", "g-3"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, DAILY))
        .collect();
    let grant = Pico::parse_usd("1").unwrap().0;
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-g"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-g/subscriptions",
            Some(json!({"plan": "daily"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let sid = v["data"]["id"].as_str().expect("id").to_owned();
    let key = create_key(&nodes[0], "g", "acct-g").await;
    known_everywhere(&nodes, &key.1).await;
    let db = pg.client().await;
    // Each node serves some: each holds a slice (5% of 1 USD) of it.
    let codes = spread(&nodes, std::slice::from_ref(&key), 9).await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let (_, _, _, leased) = money_of(&db, "acct-g").await;
    assert!(leased > 0, "the nodes hold slices");
    let (s, v) = nodes[1]
        .admin(
            "POST",
            &format!("/api/v1/subscriptions/{sid}/cancel"),
            Some(json!({"at_period_end": false})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let canceled = Instant::now();
    let (allowance, balance, spent, _) = leases_back(&db, "acct-g").await;
    // Idle slices go back only after two sync intervals (2 s).
    assert!(
        canceled.elapsed() < Duration::from_millis(1500),
        "the slices went back after {:?}",
        canceled.elapsed()
    );
    assert_eq!(
        (allowance, balance),
        (0, 0),
        "nothing charged past the lapse"
    );
    assert!(spent > 0 && spent < grant);
    for n in &mut nodes {
        assert_eq!(n.chat(&key.0, false).await, 402);
        n.terminate();
    }
}

/// A second model, priced apart, so that the rollups have several models.
const MINI: &str = "[models.\"demo-mini\"]\ninput = \"1.00\"\noutput = \"3.00\"\n";

/// The database's hourly rollups and the same sums over its usage
/// records, one line per (key, hour, model): equal when every record was
/// added once.
async fn rollups_and_records(db: &tokio_postgres::Client) -> (Vec<String>, Vec<String>) {
    let line = |r: &tokio_postgres::Row| {
        let h: Vec<u8> = r.get(0);
        let sums: Vec<String> = (3..13).map(|i| r.get::<_, i64>(i).to_string()).collect();
        format!(
            "{} {} {} {}",
            hex::encode(h),
            r.get::<_, i64>(1),
            r.get::<_, String>(2),
            sums.join(" ")
        )
    };
    let rolled = db
        .query(
            "SELECT key_hash, hour, model, requests, prompt_tokens, cached_tokens, completion_tokens, \
             reasoning_tokens, cost, latency_ms, errors, estimated, cache_write_tokens \
             FROM tollgate_usage_rollups ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .expect("rollups");
    let records = db
        .query(
            "SELECT key_hash, div(at_ms, 3600000)::int8, model, COUNT(*)::int8, \
             SUM(prompt_tokens)::int8, SUM(cached_tokens)::int8, SUM(completion_tokens)::int8, \
             SUM(reasoning_tokens)::int8, SUM(cost)::int8, SUM(latency_ms)::int8, \
             COUNT(*) FILTER (WHERE status >= 400)::int8, COUNT(*) FILTER (WHERE estimated)::int8, \
             SUM(cache_write_tokens)::int8 FROM tollgate_entries WHERE model IS NOT NULL \
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .expect("records");
    (
        rolled.iter().map(line).collect(),
        records.iter().map(line).collect(),
    )
}

/// Waits until the database holds `n` usage records.
async fn records_reach(db: &tokio_postgres::Client, n: i64) {
    let start = Instant::now();
    loop {
        let have: i64 = db
            .query_one(
                "SELECT COUNT(*) FROM tollgate_entries WHERE kind = 'usage'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if have >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {have} of {n} records reached the database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` chat completions over `nodes` and `keys` in turn, half of them
/// streamed, the model alternating between demo-chat and demo-mini.
async fn mixed_traffic(nodes: &[Node], keys: &[(String, String)], n: usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(12));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = nodes[i % nodes.len()].url("/v1/chat/completions");
        let auth = format!("Bearer {}", keys[i % keys.len()].0);
        let model = if (i / 2) % 2 == 0 {
            "demo-chat"
        } else {
            "demo-mini"
        };
        let body = json!({"model": model, "stream": i % 3 == 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello."}]});
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            send("POST", &url, &auth, Some(body)).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200, "every request served");
    }
}

/// The report answers that sum over a range, as one node gives them for
/// `[start, end)` (Unix seconds): what must not change with where the
/// sums come from.
async fn reports_of(node: &Node, keys: &[(String, String)], start: i64, end: i64) -> Vec<Value> {
    let range = format!("start={start}&end={end}");
    let mut paths = vec![
        format!("/api/v1/usage?{range}"),
        format!("/api/v1/owners/team-r/usage?{range}"),
    ];
    for (_, hash) in keys {
        paths.push(format!("/api/v1/keys/{hash}/usage?{range}"));
        paths.push(format!(
            "/api/v1/keys/{hash}/usage/chart?granularity=hour&{range}"
        ));
    }
    let mut out = Vec::new();
    for p in paths {
        let (s, mut v) = node.admin("GET", &p, None).await;
        assert_eq!(s, 200, "{p}: {v}");
        // A listing of records, not a sum: it shows what is still stored.
        if let Some(d) = v["data"].as_object_mut() {
            d.remove("recent_logs");
        }
        out.push(v);
    }
    let (s, b) = node
        .admin("GET", "/api/v1/admin/billing/status", None)
        .await;
    assert_eq!(s, 200, "{b}");
    out.push(b["all_time"].clone());
    out
}

/// Issue 18: the database keeps hourly usage rollups, added in the
/// settle transaction for the records it inserted only. Three nodes (an
/// hour apart on their clocks, so the records fall in three hours) settle
/// two keys' traffic on two models at once, a batch is written again
/// (three connections at once, then once more) through the settle path's
/// insert: the rollups are exactly Σ of the records, and every node's
/// reports equal those sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_rollups_are_the_records_sums_on_every_node() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start_later(&pg, &mock, &format!("ro-{i}"), MINI, i * 3_600_000))
        .collect();
    let mut keys = Vec::new();
    for i in 0..2 {
        keys.push(create_key(&nodes[0], &format!("r{i}"), "team-r").await);
    }
    for (_, hash) in &keys {
        known_everywhere(&nodes, hash).await;
    }
    let n = 48;
    mixed_traffic(&nodes, &keys, n).await;
    let db = pg.client().await;
    records_reach(&db, n as i64).await;

    // A batch written again: six records already there (changed, so a
    // second count would show) and three new ones, from three
    // connections at once and then once more.
    let old: Vec<(String, Vec<u8>, i64)> = db
        .query(
            "SELECT id, key_hash, at_ms FROM tollgate_entries WHERE kind = 'usage' ORDER BY id LIMIT 6",
            &[],
        )
        .await
        .expect("records")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let now = old[0].2;
    let mut batch: Vec<(String, Vec<u8>, i64)> = old;
    for i in 0..3 {
        batch.push((
            format!("u:replay:{i}"),
            hex::decode(&keys[0].1).expect("hex"),
            now,
        ));
    }
    let charges: Vec<tollgate::cluster::Charge> = batch
        .iter()
        .map(|(id, hash, at_ms)| {
            let key = tollgate::store::KeyHash::try_from(hash.as_slice()).expect("hash");
            let record = tollgate::store::UsageRecord {
                at_ms: *at_ms,
                key,
                model: "demo-chat".into(),
                upstream: "mock".into(),
                route: "chat".into(),
                stream: false,
                status: 200,
                prompt_tokens: 1000,
                cached_tokens: 0,
                completion_tokens: 1000,
                reasoning_tokens: 0,
                cost: Pico(7_000_000),
                reserved: Pico(7_000_000),
                latency_ms: 5,
                ttfb_ms: 1,
                request_id: id.clone(),
                client_ip: "127.0.0.1".into(),
                estimated: false,
                daily_fee: Pico::ZERO,
                account: None,
                cache_write_tokens: 0,
            };
            tollgate::cluster::Charge {
                id: id.clone(),
                kind: "usage",
                key: Some(key),
                account: None,
                amount: 0,
                spent: 0,
                at_ms: *at_ms,
                record: Some(Box::new(record)),
            }
        })
        .collect();
    let charges = Arc::new(charges);
    let cfg: tokio_postgres::Config = pg.url().parse().expect("url");
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        cfg,
        tokio_postgres::NoTls,
    ))
    .max_size(3)
    .build()
    .expect("pool");
    let mut inserted = Vec::new();
    for round in 0..2 {
        let tasks: Vec<_> = (0..if round == 0 { 3 } else { 1 })
            .map(|_| {
                let (pool, charges) = (pool.clone(), charges.clone());
                tokio::spawn(async move {
                    let mut c = pool.get().await.expect("connection");
                    let tx = c.transaction().await.expect("transaction");
                    let rows = tollgate::cluster::rollups::insert_entries(&tx, "ro-x", &charges)
                        .await
                        .expect("insert");
                    tx.commit().await.expect("commit");
                    rows.len()
                })
            })
            .collect();
        for t in tasks {
            inserted.push(t.await.expect("task"));
        }
    }
    inserted.sort();
    assert_eq!(inserted, [0, 0, 0, 3], "each new record inserted once");

    let (rolled, records) = rollups_and_records(&db).await;
    assert_eq!(rolled, records, "rollups = Σ records");
    assert!(rolled.len() >= 6, "2 keys × 2 models × 3 hours: {rolled:?}");

    // Every node's reports: the same answers, and the records' sums.
    let start = now / 1000 - 2 * 86_400;
    let end = now / 1000 + 86_400;
    let first = reports_of(&nodes[0], &keys, start, end).await;
    for node in &nodes[1..] {
        let these = reports_of(node, &keys, start, end).await;
        // The billing status's all-time sums end at each node's own now
        // (the clocks differ by hours here): all but that one.
        let n = these.len() - 1;
        for (i, (a, b)) in these[..n].iter().zip(&first[..n]).enumerate() {
            assert_eq!(a, b, "report {i}");
        }
    }
    let (count, cost): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT COUNT(*), SUM(cost)::int8 FROM tollgate_entries WHERE model IS NOT NULL",
                &[],
            )
            .await
            .expect("sums");
        (r.get(0), r.get(1))
    };
    assert_eq!(count, n as i64 + 3);
    let gateway = &first[0]["data"]["summary"];
    assert_eq!(gateway["total_requests"], count, "{gateway}");
    assert_eq!(usd(&gateway["total_cost"]), Pico(cost), "{gateway}");
    let models: Vec<&str> = first[0]["data"]["by_model"]
        .as_array()
        .expect("by model")
        .iter()
        .filter_map(|m| m["model"].as_str())
        .collect();
    assert_eq!(models.len(), 2, "{models:?}");
    let hours: usize = first[3]["data"]["data"]
        .as_array()
        .expect("points")
        .iter()
        .filter(|p| p["requests"].as_u64().unwrap_or(0) > 0)
        .count();
    assert_eq!(
        hours, 3,
        "the key's records fall in three hours: {}",
        first[3]
    );
}

/// A node that prunes usage records older than `days`
/// (`storage.usage_retention_days`), its clock `offset_ms` ahead, sweeping
/// every second: started once to write its config, stopped, and started
/// again with the setting added.
fn start_retaining(pg: &Pg, mock: &MockUpstream, id: &str, days: u32, offset_ms: i64) -> Node {
    let sweep = "[limits]\nsweep_interval = \"1s\"\n";
    let mut node = Node::spawn_later(&pg.url(), mock, id, sweep, offset_ms);
    node.kill9();
    let file = node.data.join("config.toml");
    let config = std::fs::read_to_string(&file).expect("config");
    let config = config.replace(
        "flush_ms = 10\n",
        &format!("flush_ms = 10\nusage_retention_days = {days}\n"),
    );
    std::fs::write(&file, config).expect("config written");
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(node.data.join("log"))
        .expect("log file");
    node.child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
        .env("TOLLGATE_TEST_UPSTREAM_KEY", common::UPSTREAM_KEY)
        .env("TOLLGATE_POSTGRES_URL", pg.url())
        .env("TOLLGATE_CLOCK_OFFSET_MS", offset_ms.to_string())
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("the gateway binary starts");
    if let Err(log) = node.ready() {
        panic!("node {id} did not start: {log}");
    }
    node
}

/// Issue 18: retention in the database. Records made three days before
/// a node's clock with `usage_retention_days = 1` are pruned from
/// `tollgate_entries` by it (but each node's last settled batch, which the
/// node could still write again), the ledger's rows stay, and the reports
/// over those days answer as before on every node, from the rollups.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_usage_records_are_pruned_and_their_totals_kept() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes: Vec<Node> = ["rp-1", "rp-2"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, MINI))
        .collect();
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "team-r", "email": "r@example.com"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let topup = json!({"amount": "5", "kind": "topup", "reason": "test", "idempotency_key": "r1"});
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts/team-r/credits", Some(topup))
        .await;
    assert_eq!(s, 200, "{v}");
    let mut keys = Vec::new();
    for i in 0..2 {
        keys.push(create_key(&nodes[0], &format!("p{i}"), "team-r").await);
    }
    for (_, hash) in &keys {
        known_everywhere(&nodes, hash).await;
    }
    let db = pg.client().await;
    // Two rounds, so that each node settles more than one batch.
    for _ in 0..2 {
        mixed_traffic(&nodes, &keys, 16).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    records_reach(&db, 32).await;
    let ledger_rows = "SELECT COUNT(*) FROM tollgate_entries WHERE kind <> 'usage'";
    let others: i64 = db.query_one(ledger_rows, &[]).await.expect("rows").get(0);
    assert!(others >= 1, "the top-up's row");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let (start, end) = (now - 86_400, now + 3_600);
    let before = reports_of(&nodes[0], &keys, start, end).await;
    let (rolled, _) = rollups_and_records(&db).await;

    let pruner = start_retaining(&pg, &mock, "rp-3", 1, 3 * DAY_MS);
    let prunable = "SELECT COUNT(*) FROM tollgate_entries e \
         LEFT JOIN tollgate_usage_settled s ON s.node_id = e.node_id \
         WHERE e.kind = 'usage' AND (s.oldest_ms IS NULL OR e.at_ms < s.oldest_ms)";
    let started = Instant::now();
    loop {
        let left: i64 = db.query_one(prunable, &[]).await.expect("count").get(0);
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{left} old records not pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_entries WHERE kind = 'usage'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(
        kept < 32,
        "pruned but each node's last batch: {kept} of 32 kept"
    );
    let now_others: i64 = db.query_one(ledger_rows, &[]).await.expect("rows").get(0);
    assert_eq!(now_others, others, "ledger and claim rows are never pruned");
    let (rolled_after, _) = rollups_and_records(&db).await;
    assert_eq!(rolled_after, rolled, "the rollups keep the totals");
    for node in nodes.iter().chain([&pruner]) {
        let after = reports_of(node, &keys, start, end).await;
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            assert_eq!(a, b, "report {i} after pruning");
        }
    }
    // The logs list what is still stored.
    let (s, l) = nodes[1]
        .admin(
            "GET",
            &format!("/api/v1/keys/{}/usage/logs?page_size=100", keys[0].1),
            None,
        )
        .await;
    assert_eq!(s, 200, "{l}");
    let h = hex::decode(&keys[0].1).expect("hex");
    let rows: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_entries WHERE kind = 'usage' AND key_hash = $1",
            &[&h],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(l["data"]["total"], rows, "{l}");
}

/// Measures the gateway report's read over 200,000 usage records (20
/// keys, 2 models, 30 days): the sums from the records, as before the
/// rollups, and from the rollups. Not a check: run it by name with
/// `--ignored --nocapture` to see the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_report_reads_over_200k_records() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let node = Node::start(&pg, &mock, "m-1");
    let db = pg.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let from = now - 30 * DAY_MS;
    db.execute(
        "INSERT INTO tollgate_entries (id, kind, key_hash, amount, spent, node_id, at_ms, model, \
         status, prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, \
         reasoning_tokens, cost, latency_ms, estimated) \
         SELECT 'm' || i, 'usage', sha256(('k' || (i % 20))::bytea), 100, 100, 'm-x', \
         $1::int8 + i::int8 * 12960, CASE WHEN i % 2 = 0 THEN 'demo-chat' ELSE 'demo-mini' END, 200, \
         7, 0, 0, 16, 0, 100, 5, false FROM generate_series(1, 200000) AS i",
        &[&from],
    )
    .await
    .expect("records");
    // The rollups of those records, as the migration makes them.
    db.batch_execute(
        "INSERT INTO tollgate_usage_rollups SELECT key_hash, div(at_ms, 3600000)::int8, model, \
         COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), \
         SUM(reasoning_tokens), SUM(cost), SUM(latency_ms), 0, 0, 0 FROM tollgate_entries \
         WHERE model IS NOT NULL GROUP BY 1, 2, 3; ANALYZE",
    )
    .await
    .expect("rollups");
    let (first_hour, end_hour) = (from / 3_600_000, now / 3_600_000 + 1);
    let old = "SELECT div(at_ms, 3600000)::int8, model, COUNT(*)::int8, SUM(cost)::int8 \
         FROM tollgate_entries WHERE model IS NOT NULL AND at_ms >= $1 AND at_ms < $2 GROUP BY 1, 2";
    let new = "SELECT hour, model, SUM(requests)::int8, SUM(cost)::int8 FROM tollgate_usage_rollups \
         WHERE hour >= $1 AND hour < $2 GROUP BY 1, 2";
    let time = |sql: &'static str, a: i64, b: i64| {
        let db = &db;
        async move {
            let mut best = Duration::MAX;
            let mut rows = 0;
            for _ in 0..5 {
                let t = Instant::now();
                rows = db.query(sql, &[&a, &b]).await.expect("read").len();
                best = best.min(t.elapsed());
            }
            (best, rows)
        }
    };
    let (t_old, r_old) = time(old, first_hour * 3_600_000, end_hour * 3_600_000).await;
    let (t_new, r_new) = time(new, first_hour, end_hour).await;
    assert_eq!(r_old, r_new);
    eprintln!(
        "gateway report over 30 days, 200000 records: records {t_old:?}, rollups {t_new:?} ({r_new} hour×model rows)"
    );
    // And through the API, on the node (reads the rollups).
    let t = Instant::now();
    let (s, v) = node.admin("GET", "/api/v1/usage", None).await;
    assert_eq!(s, 200, "{v}");
    eprintln!("GET /api/v1/usage (30 days): {:?}", t.elapsed());
}

/// Races a key limited to 0.004 USD a day (`limit_reset` daily; paid for
/// by `owner`'s account when given) over three nodes, then over three
/// nodes a day later: each day at most the limit is spent cluster-wide,
/// every node shows the same `limit_remaining`, and the key's usage in the
/// database is Σ its records.
async fn a_daily_limit_race(owner: Option<&str>, ids: [&str; 3]) {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let mut nodes = Node::start_all(&pg, &mock, &ids);
    let mut spec = json!({"name": "daily", "limit": "0.004", "limit_reset": "daily"});
    if let Some(owner) = owner {
        let (s, v) = nodes[0]
            .admin("POST", "/api/v1/accounts", Some(json!({"id": owner})))
            .await;
        assert_eq!(s, 201, "{v}");
        let topup = json!({"amount": "5", "kind": "topup", "reason": "test"});
        let (s, v) = nodes[0]
            .admin(
                "POST",
                &format!("/api/v1/accounts/{owner}/credits"),
                Some(topup),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        spec["owner"] = json!(owner);
    }
    let (s, v) = nodes[0].admin("POST", "/api/v1/keys", Some(spec)).await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().expect("key").to_owned();
    let hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    known_everywhere(&nodes, &hash).await;
    let limit = Pico::parse_usd("0.004").unwrap();
    let db = pg.client().await;
    let h = hex::decode(&hash).expect("hex");
    let mut before = Pico::ZERO;
    for day in 0..2 {
        if day == 1 {
            // A day later, three nodes running: the limit starts again.
            for n in &mut nodes {
                n.terminate();
            }
            nodes = ids
                .iter()
                .map(|id| Node::start_later(&pg, &mock, id, "", DAY_MS + 60_000))
                .collect();
            known_everywhere(&nodes, &hash).await;
        }
        let codes = streams(&nodes, &key, 240).await;
        let admitted = codes.iter().filter(|c| **c == 200).count();
        assert!(
            codes.iter().all(|c| *c == 200 || *c == 402),
            "served or 402: {codes:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut views = Vec::new();
        for n in &nodes {
            let (s, k) = n.admin("GET", &format!("/api/v1/keys/{hash}"), None).await;
            assert_eq!(s, 200, "{k}");
            views.push((usd(&k["data"]["usage"]), usd(&k["data"]["limit_remaining"])));
        }
        let (usage, remaining) = views[0];
        let today = Pico(usage.0 - before.0);
        eprintln!(
            "day {day}: {admitted} of 240 admitted on a key limited to {limit} a day: \
             {today} spent today, {remaining} remaining"
        );
        assert!(
            views.iter().all(|v| *v == views[0]),
            "every node shows the same: {views:?}"
        );
        assert!(
            today <= limit,
            "a daily limit of {limit} spent {today} in a day over three nodes"
        );
        assert!(admitted >= 8, "day {day}: only {admitted} admitted");
        assert_eq!(remaining, Pico(limit.0 - today.0), "limit_remaining");
        let row = db
            .query_one(
                "SELECT usage, period_usage, (SELECT COALESCE(SUM(spent), 0)::bigint \
                 FROM tollgate_entries WHERE key_hash = $1) FROM tollgate_keys WHERE hash = $1",
                &[&h],
            )
            .await
            .expect("row");
        let (db_usage, period_usage, entries): (i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!(db_usage, usage.0, "usage is the database's");
        assert_eq!(db_usage, entries, "usage = Σ records");
        assert_eq!(period_usage, today.0, "the period's usage");
        if let Some(owner) = owner {
            let spent: i64 = db
                .query_one(
                    "SELECT spent FROM tollgate_accounts WHERE id = $1",
                    &[&owner],
                )
                .await
                .expect("account")
                .get(0);
            assert_eq!(spent, db_usage, "the account paid what the key spent");
        }
        before = usage;
    }
}

/// A key's own limit that starts again each day holds across the nodes,
/// each day (no account).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daily_key_limit_is_global() {
    a_daily_limit_race(None, ["d-1", "d-2", "d-3"]).await;
}

/// The same when an account pays for the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daily_key_limit_is_global_when_its_account_pays() {
    a_daily_limit_race(Some("acct-d"), ["e-1", "e-2", "e-3"]).await;
}

/// A node without `[cluster]` on `data`'s store (with Stripe), for the
/// import; its config file is `data/single.toml`.
fn single_node(mock: &MockUpstream, data: PathBuf) -> Node {
    let port = free_port();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"
[storage]
path = "{store}"
flush_ms = 10
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"
[[upstreams]]
name = "mock"
base_url = "{mock}"
api_key_env = "TOLLGATE_TEST_UPSTREAM_KEY"
models = ["demo-*"]
[models."demo-chat"]
input = "2.50"
output = "10.00"
{STRIPE}
"#,
        store = path(&data.join("store")),
        mock = mock.base_url(),
    );
    let file = data.join("single.toml");
    std::fs::write(&file, &config).expect("config written");
    // The same store, with the cluster's database: what the import reads.
    let cluster = format!(
        "{config}[cluster]\npostgres_url_env = \"TOLLGATE_POSTGRES_URL\"\nnode_id = \"single\"\n"
    );
    std::fs::write(data.join("import.toml"), cluster).expect("config written");
    let log = std::fs::File::create(data.join("log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
        .env("TOLLGATE_TEST_UPSTREAM_KEY", common::UPSTREAM_KEY)
        .env("TOLLGATE_TEST_STRIPE_WHSEC", WHSEC)
        .env("TOLLGATE_TEST_STRIPE_SK", "sk_test_tollgate")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("the gateway binary starts");
    let mut node = Node { child, port, data };
    if let Err(log) = node.ready() {
        panic!("the single node did not start: {log}");
    }
    node
}

/// `tollgate cluster import --config data/import.toml`: (exit code, output).
fn import(pg: &Pg, data: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["cluster", "import", "--config"])
        .arg(data.join("import.toml"))
        .env("TOLLGATE_POSTGRES_URL", pg.url())
        .output()
        .expect("the import runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every row of the tables the import writes, as text: equal before and
/// after a second import means it changed nothing.
async fn imported_rows(db: &tokio_postgres::Client) -> Vec<String> {
    let mut all = Vec::new();
    for t in [
        "tollgate_accounts",
        "tollgate_keys",
        "tollgate_admin_tokens",
        "tollgate_subscriptions",
        "tollgate_payments",
        "tollgate_payment_refs",
        "tollgate_ledger",
        "tollgate_entries",
        "tollgate_imports",
    ] {
        let rows = db
            .query(&format!("SELECT t::text FROM {t} t ORDER BY 1"), &[])
            .await
            .expect(t);
        all.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    all
}

/// A single node's store moves into a cluster: after `tollgate cluster
/// import`, two nodes on fresh stores serve its keys and show its
/// balances, usage, ledgers and payments; a Stripe event and a manual
/// payment it had applied are replays there; a second import changes
/// nothing; the import refuses while the node runs and when the database
/// holds different data for the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_nodes_store_is_imported_into_the_cluster() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let mut single = single_node(&mock, common::temp_dir("import-single"));
    let (s, v) = single
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-i"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let topup = json!({"kind": "topup", "amount": "5", "reason": "t", "idempotency_key": "i-1"});
    let (s, v) = single
        .admin(
            "POST",
            "/api/v1/accounts/acct-i/credits",
            Some(topup.clone()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (paid_key, paid_hash) = create_key(&single, "paid", "acct-i").await;
    let (s, v) = single
        .admin(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "own", "limit": "2", "rpm": 1000})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let own_key = v["key"].as_str().expect("key").to_owned();
    let own_hash = v["data"]["hash"].as_str().expect("hash").to_owned();
    let (s, v) = single
        .admin(
            "POST",
            "/api/v1/admin/tokens",
            Some(json!({"name": "ops", "scopes": ["keys:read"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let scoped = v["token"].as_str().expect("token").to_owned();
    let event = paid_session(
        "evt_imp",
        "checkout.session.completed",
        "cs_imp",
        "acct-i",
        700,
    );
    let (s, v) = deliver(&single, &event).await;
    assert_eq!((s, v["replayed"].clone()), (200, json!(false)), "{v}");
    let manual =
        json!({"account": "acct-i", "amount": "1", "reference": "wire-imp", "kind": "topup"});
    let (s, v) = single
        .admin("POST", "/api/v1/payments", Some(manual.clone()))
        .await;
    assert_eq!(s, 201, "{v}");
    for key in [&paid_key, &own_key, &paid_key] {
        assert_eq!(single.chat(key, false).await, 200);
    }
    // What the single node shows, to compare with the cluster.
    let path_of = |p: &str| p.to_owned();
    let shown = [
        path_of("/api/v1/accounts/acct-i"),
        format!("/api/v1/keys/{paid_hash}"),
        format!("/api/v1/keys/{own_hash}"),
    ];
    let mut before = Vec::new();
    for p in &shown {
        let (s, v) = single.admin("GET", p, None).await;
        assert_eq!(s, 200, "{v}");
        before.push(v);
    }
    let (_, ledger_before) = single
        .admin("GET", "/api/v1/accounts/acct-i/ledger", None)
        .await;
    let (_, usage_before) = single
        .admin("GET", &format!("/api/v1/keys/{paid_hash}/usage"), None)
        .await;

    // Refused while the node runs on the store: nothing written.
    let (code, out) = import(&pg, &single.data);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stop it first"), "{out}");
    single.terminate();

    let (code, out) = import(&pg, &single.data);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("imported 1 accounts, 2 keys, 1 admin tokens"),
        "{out}"
    );
    let db = pg.client().await;
    let rows = imported_rows(&db).await;
    let (code, out) = import(&pg, &single.data);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already imported"), "{out}");
    assert_eq!(
        imported_rows(&db).await,
        rows,
        "a second import changes nothing"
    );

    let nodes: Vec<Node> = ["imp-1", "imp-2"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, STRIPE))
        .collect();
    for n in &nodes {
        for (p, want) in shown.iter().zip(&before) {
            let (s, v) = n.admin("GET", p, None).await;
            assert_eq!(s, 200, "{p}: {v}");
            for field in ["balance", "allowance", "usage", "limit"] {
                if !want["data"][field].is_null() {
                    assert_eq!(
                        usd(&v["data"][field]),
                        usd(&want["data"][field]),
                        "{p} {field}: {v} vs {want}"
                    );
                }
            }
        }
        let (_, v) = n.admin("GET", "/api/v1/accounts/acct-i/ledger", None).await;
        let kinds = |v: &Value| -> Vec<(Value, Value)> {
            v["data"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|e| (e["kind"].clone(), e["amount"].clone()))
                .collect()
        };
        assert_eq!(kinds(&v), kinds(&ledger_before), "{v}");
        let (_, v) = n
            .admin("GET", &format!("/api/v1/keys/{paid_hash}/usage"), None)
            .await;
        assert_eq!(
            v["data"]["totals"], usage_before["data"]["totals"],
            "{v} vs {usage_before}"
        );
        let (_, v) = n.admin("GET", "/api/v1/payments", None).await;
        assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
        // The scoped admin token authenticates.
        let (s, _) = send(
            "GET",
            &n.url(&format!("/api/v1/keys/{own_hash}")),
            &format!("Bearer {scoped}"),
            None,
        )
        .await;
        assert_eq!(s, 200);
    }
    let balance = usd(&before[0]["data"]["balance"]);
    // Replays stay replays: the Stripe event, the manual reference, the
    // top-up's idempotency key.
    let (s, v) = deliver(&nodes[0], &event).await;
    assert_eq!((s, v["replayed"].clone()), (200, json!(true)), "{v}");
    let (s, v) = nodes[1]
        .admin("POST", "/api/v1/payments", Some(manual))
        .await;
    assert_eq!(s, 200, "a replay: {v}");
    let (s, v) = nodes[1]
        .admin("POST", "/api/v1/accounts/acct-i/credits", Some(topup))
        .await;
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in &nodes {
        assert_eq!(balance_of(n, "acct-i").await, balance, "no money twice");
    }
    // The keys are served.
    assert_eq!(nodes[0].chat(&paid_key, false).await, 200);
    assert_eq!(nodes[1].chat(&own_key, false).await, 200);

    // Another store with a different account of the same id is refused.
    let mut other = single_node(&mock, common::temp_dir("import-other"));
    let (s, v) = other
        .admin(
            "POST",
            "/api/v1/accounts",
            Some(json!({"id": "acct-i", "email": "x@example.com"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    other.terminate();
    let rows = imported_rows(&db).await;
    let (code, out) = import(&pg, &other.data);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("different account \"acct-i\""), "{out}");
    assert_eq!(
        imported_rows(&db).await,
        rows,
        "a refused import writes nothing"
    );
}

/// An endpoint that answers 410 to one node is disabled on every node:
/// after the first try (of whichever node), events made on both nodes
/// reach it no more, their deliveries stay pending, and the database
/// records the endpoint as disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_endpoint_on_every_node() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let hook = Hook::start_slow(Arc::new(|_, _| (410, Duration::ZERO))).await;
    let extra = hook_config(&hook, r#"["1s", "1s", "1s"]"#, "5s");
    let nodes: Vec<Node> = ["g-1", "g-2"]
        .iter()
        .map(|id| Node::start_with(&pg, &mock, id, &extra))
        .collect();
    let key = |i: usize| json!({"name": format!("gone-{i}")});
    let (s, v) = nodes[0].admin("POST", "/api/v1/keys", Some(key(0))).await;
    assert_eq!(s, 201, "{v}");
    let start = Instant::now();
    while hook.got().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(15), "no try");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Events from both nodes after the 410, each node's deliverer polling.
    for i in 1..5 {
        let (s, v) = nodes[i % 2]
            .admin("POST", "/api/v1/keys", Some(key(i)))
            .await;
        assert_eq!(s, 201, "{v}");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tries = hook.got();
    assert_eq!(
        tries.len(),
        1,
        "one try in all, then disabled everywhere: {tries:?}"
    );
    let db = pg.client().await;
    let disabled: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_disabled_endpoints WHERE endpoint LIKE 'webhook:%'",
            &[],
        )
        .await
        .expect("disabled endpoints")
        .get(0);
    assert_eq!(disabled, 1);
    let pending: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM tollgate_deliveries WHERE status = 'pending'",
            &[],
        )
        .await
        .expect("deliveries")
        .get(0);
    assert_eq!(pending, 5, "every delivery waits");
}

/// The payments of `account` in a stopped node's store, and its account
/// ledger's kinds.
fn local_payments(node: &Node, account: &str) -> (usize, Vec<String>) {
    let store =
        tollgate::store::Store::open(&node.data.join("store"), 10).expect("the store opens");
    let payments = store
        .all_payments()
        .filter(|p| {
            p.as_ref()
                .is_ok_and(|p| p.account.as_deref() == Some(account))
        })
        .count();
    let kinds = store
        .account_ledger(account, 0, 100)
        .expect("ledger")
        .iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect();
    (payments, kinds)
}

/// A node killed after a payment's database transaction and before its
/// store copy (here: started again on a fresh store with its node_id)
/// takes the copy on the provider's retry, once, even with the retry sent
/// twice at once; the money moves no second time; another node answering
/// a replay takes no copy (it never had one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_restores_a_payments_missing_store_copy() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let mut first = Node::start_with(&pg, &mock, "c-1", STRIPE);
    let mut other = Node::start_with(&pg, &mock, "c-2", STRIPE);
    let (s, v) = first
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-c"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let event = paid_session(
        "evt_c",
        "checkout.session.completed",
        "cs_c",
        "acct-c",
        1000,
    );
    let (s, v) = deliver(&first, &event).await;
    assert_eq!((s, v["replayed"].clone()), (200, json!(false)), "{v}");
    first.terminate();
    // The same node, without the store copy.
    let mut again = Node::start_with(&pg, &mock, "c-1", STRIPE);
    let (s, v) = again.admin("GET", "/api/v1/accounts/acct-c", None).await;
    assert_eq!(s, 200, "{v}");
    let (a, b) = tokio::join!(deliver(&again, &event), deliver(&again, &event));
    for (s, v) in [a, b] {
        assert_eq!((s, v["replayed"].clone()), (200, json!(true)), "{v}");
    }
    let (s, v) = deliver(&other, &event).await;
    assert_eq!((s, v["replayed"].clone()), (200, json!(true)), "{v}");
    let ten = Pico::parse_usd("10").unwrap();
    for n in [&again, &other] {
        assert_eq!(balance_of(n, "acct-c").await, ten, "credited once");
    }
    again.terminate();
    other.terminate();
    assert_eq!(
        local_payments(&again, "acct-c"),
        (1, vec!["topup".to_owned()]),
        "the copy, once"
    );
    assert_eq!(
        local_payments(&other, "acct-c"),
        (0, vec![]),
        "no copy elsewhere"
    );
}

/// The hashes and usages of a key list's page, as a node lists them.
async fn key_page(node: &Node, query: &str) -> Vec<(String, Value)> {
    let (s, v) = node
        .admin("GET", &format!("/api/v1/keys?{query}"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|k| {
            (
                k["hash"].as_str().expect("hash").to_owned(),
                k["usage"].clone(),
            )
        })
        .collect()
}

/// The key and account lists read the database in cluster mode: what one
/// node made is listed by the others at once, with the database's money
/// (a key spent through node 3 shows its usage in node 2's list, an
/// account its balance), in the same order and pages on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_and_account_lists_read_the_database() {
    let Some(pg) = Pg::start() else {
        return;
    };
    let mock = mock();
    let nodes = Node::start_all(&pg, &mock, &["li-1", "li-2", "li-3"]);
    let (s, v) = nodes[0]
        .admin("POST", "/api/v1/accounts", Some(json!({"id": "acct-li"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nodes[0]
        .admin(
            "POST",
            "/api/v1/accounts/acct-li/credits",
            Some(json!({"kind": "topup", "amount": "5", "reason": "list test"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(create_key(&nodes[0], &format!("li-{i}"), "acct-li").await);
    }
    // Listed by every node the moment node 1 answered.
    for n in &nodes {
        let page = key_page(n, "owner=acct-li&limit=100").await;
        let hashes: Vec<&str> = page.iter().map(|(h, _)| h.as_str()).collect();
        let want: Vec<&str> = made.iter().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hashes, want, "oldest first, every key, on every node");
    }
    // Spend through node 3 only.
    let (key, hash) = &made[0];
    known_everywhere(&nodes, hash).await;
    for _ in 0..4 {
        assert_eq!(nodes[2].chat(key, false).await, 200);
    }
    // Once the batch is written, every node's list shows the database's
    // usage and balance, equal to the single reads.
    let start = Instant::now();
    loop {
        let (_, one) = nodes[2]
            .admin("GET", &format!("/api/v1/keys/{hash}"), None)
            .await;
        let usage = one["data"]["usage"].clone();
        let (_, acct) = nodes[2]
            .admin("GET", "/api/v1/accounts/acct-li", None)
            .await;
        let balance = acct["data"]["balance"].clone();
        let mut same = usage != json!("0") && usage != json!(0);
        for n in &nodes {
            let page = key_page(n, "owner=acct-li&limit=100").await;
            same &= page[0].1 == usage;
            let (s, v) = n.admin("GET", "/api/v1/accounts?limit=100", None).await;
            assert_eq!(s, 200, "{v}");
            let listed = v["data"]
                .as_array()
                .expect("data")
                .iter()
                .find(|a| a["id"] == "acct-li")
                .cloned()
                .expect("the account is listed");
            same &= listed["balance"] == balance;
        }
        if same {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the lists never showed the database's usage {usage} and balance {balance}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Pages of two: the same pages on every node, together the whole list.
    let mut pages = Vec::new();
    for n in &nodes {
        let mut all = Vec::new();
        for offset in [0, 2, 4] {
            let page = key_page(n, &format!("owner=acct-li&limit=2&offset={offset}")).await;
            all.extend(page.into_iter().map(|(h, _)| h));
        }
        pages.push(all);
    }
    let want: Vec<String> = made.iter().map(|(_, h)| h.clone()).collect();
    for p in &pages {
        assert_eq!(p, &want);
    }
    // A disabled key leaves the default list everywhere, and is in it with
    // include_disabled.
    let (s, v) = nodes[1]
        .admin(
            "PATCH",
            &format!("/api/v1/keys/{}", made[4].1),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for n in &nodes {
        assert_eq!(key_page(n, "owner=acct-li&limit=100").await.len(), 4);
        assert_eq!(
            key_page(n, "owner=acct-li&limit=100&include_disabled=true")
                .await
                .len(),
            5
        );
    }
}
