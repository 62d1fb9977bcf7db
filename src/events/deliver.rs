//! The delivery task: fans the outbox out to every `[[webhooks]]` endpoint
//! (and `[email]`) whose globs match, and sends each delivery with retries.
//!
//! - The dispatcher reads events past the fan-out cursor (`book` `D`),
//!   writes a pending delivery per (event, endpoint) and the new cursor
//!   in one store write, then hands them to the endpoint's worker. A crash
//!   at any point either redoes the fan-out (same rows) or finds them.
//! - Each endpoint has its own worker task and its own queue, ordered by
//!   when each delivery is next due (on the gateway's clock, so tests can
//!   move it): a slow or dead endpoint only ever delays itself, and the
//!   request path never waits on any of this.
//! - An attempt: 2xx delivered; 410 disables the endpoint (its pending
//!   deliveries stay pending, shown as such); anything else (other status,
//!   redirect, timeout, connect error) is retried after the next wait of
//!   `retry`, until the schedule runs out (failed). Every attempt's state is
//!   written before the next one, so deliveries survive a restart.
//! - Webhook attempts carry `webhook-id` (the event's id: the same on every
//!   try), `webhook-timestamp` (of the attempt) and `webhook-signature`.
//!   At most [`MAX_RESPONSE_BYTES`] of an answer are read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::signature::WebhookSecret;
use crate::app::App;
use crate::config::{Config, Pattern};
use crate::store::{DeliveryWrite, EventQuery, Store};

/// Most bytes of an endpoint's answer read (the rest is dropped with the
/// connection): a receiver answering 10 MiB costs us nothing.
pub const MAX_RESPONSE_BYTES: usize = 4096;

/// How often a worker looks at its queue when nothing wakes it: the
/// resolution of retry times (and of the test clock's jumps).
const TICK: Duration = Duration::from_millis(200);

/// Events read per fan-out step.
const FAN_OUT_CHUNK: usize = 256;

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Due at `next_at_ms` (or waiting for a disabled endpoint).
    Pending,
    /// The endpoint answered 2xx (or the mail was accepted).
    Delivered,
    /// Every try of the schedule failed.
    Failed,
    /// Nothing to send it to (an email event for an account without address).
    Skipped,
}

impl DeliveryStatus {
    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        Some(match s {
            "pending" => DeliveryStatus::Pending,
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            "skipped" => DeliveryStatus::Skipped,
            _ => return None,
        })
    }
}

/// One delivery of one event to one endpoint (`book` `D` 1 seq target).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Where it stands; only `pending` ones are tried.
    pub status: DeliveryStatus,
    /// Tries made so far.
    pub attempts: u32,
    /// When the next try is due (Unix ms, the gateway's clock).
    pub next_at_ms: i64,
    /// HTTP status of the last try, if it got one.
    pub last_status: Option<u16>,
    /// Why the last try failed.
    pub last_error: Option<String>,
    /// Unix ms of the last change.
    pub updated_at_ms: i64,
}

impl DeliveryState {
    /// A delivery due now.
    pub fn pending(now_ms: i64) -> DeliveryState {
        DeliveryState {
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_at_ms: now_ms,
            last_status: None,
            last_error: None,
            updated_at_ms: now_ms,
        }
    }
}

/// An endpoint's own state (`book` `D` 2 target): disabled by a 410.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointState {
    /// Nothing more is sent to it (until the state row is removed).
    pub disabled: bool,
    /// Why, for the operator.
    pub reason: String,
    /// When (Unix ms).
    pub at_ms: i64,
}

/// How an endpoint is reached.
enum Channel {
    Webhook {
        /// Where the POST goes.
        uri: http::Uri,
        /// Signs each try.
        secret: WebhookSecret,
    },
    Email(super::email::Mailer),
}

/// One place deliveries go.
struct Endpoint {
    /// `webhook:<url>` or `email`: the name in delivery rows.
    target: String,
    /// Event types it takes.
    events: Vec<Pattern>,
    /// Waits after each failed try.
    retry: Vec<Duration>,
    /// Longest one try may take.
    timeout: Duration,
    /// How it is reached.
    channel: Channel,
}

/// The delivery target name of a webhook URL.
pub fn webhook_target(url: &str) -> String {
    format!("webhook:{url}")
}

/// The delivery target name of email.
pub const EMAIL_TARGET: &str = "email";

/// The endpoints of `config`, with their secrets read from the
/// environment: a missing or malformed secret is an error naming it.
fn endpoints(config: &Config) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    for (i, w) in config.webhooks.iter().enumerate() {
        let text = std::env::var(&w.secret_env).map_err(|_| {
            format!(
                "webhooks[{i}] ({}): the environment variable {} (secret_env) is not set",
                w.url.text, w.secret_env
            )
        })?;
        let secret = WebhookSecret::parse(&text).map_err(|e| {
            format!(
                "webhooks[{i}] ({}): the secret in {}: {e}",
                w.url.text, w.secret_env
            )
        })?;
        out.push(Endpoint {
            target: webhook_target(&w.url.text),
            events: w.events.clone(),
            retry: w.retry.iter().map(|d| d.0).collect(),
            timeout: w.timeout.0,
            channel: Channel::Webhook {
                uri: w.url.uri.clone(),
                secret,
            },
        });
    }
    if let Some(e) = &config.email {
        let mailer = super::email::Mailer::new(e)?;
        out.push(Endpoint {
            target: EMAIL_TARGET.to_owned(),
            events: e.events.clone(),
            retry: e.retry.iter().map(|d| d.0).collect(),
            timeout: e.timeout.0,
            channel: Channel::Email(mailer),
        });
    }
    Ok(out)
}

/// Checks at start-up that every endpoint's secret (and SMTP URL) is
/// there and well-formed, so a bad one stops the gateway with a message
/// instead of failing every delivery.
pub fn check(config: &Config) -> Result<(), String> {
    endpoints(config).map(|_| ())
}

/// The delivery targets an event of `kind` goes to under `config`.
pub fn targets_for(config: &Config, kind: &str) -> Vec<String> {
    let mut out: Vec<String> = config
        .webhooks
        .iter()
        .filter(|w| super::wanted(&w.events, kind))
        .map(|w| webhook_target(&w.url.text))
        .collect();
    if let Some(e) = &config.email
        && super::wanted(&e.events, kind)
    {
        out.push(EMAIL_TARGET.to_owned());
    }
    out
}

/// A delivery handed to a worker.
struct Job {
    /// The event's outbox sequence.
    seq: u64,
    /// Its delivery's state (when it is due).
    state: DeliveryState,
}

/// Handle kept by the app: wakes the dispatcher for a redelivery.
#[derive(Default)]
pub struct Events {
    /// Events whose deliveries an admin reset: the dispatcher re-reads them.
    redeliver: std::sync::Mutex<Vec<u64>>,
    /// Wakes the dispatcher.
    wake: tokio::sync::Notify,
}

impl Events {
    /// Asks the dispatcher to re-read the (already reset) deliveries of `seq`.
    pub fn redeliver(&self, seq: u64) {
        match self.redeliver.lock() {
            Ok(mut v) => v.push(seq),
            Err(p) => p.into_inner().push(seq),
        }
        self.wake.notify_one();
    }

    fn take_redeliveries(&self) -> Vec<u64> {
        match self.redeliver.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

/// Starts the delivery task on the current runtime (nothing when no
/// endpoint is configured).
pub fn spawn(app: Arc<App>) {
    tokio::spawn(run(app));
}

async fn run(app: Arc<App>) {
    let eps = match endpoints(&app.config) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "event delivery not started");
            return;
        }
    };
    if eps.is_empty() {
        return;
    }
    let client = http_client();
    let disabled: HashSet<String> = match app.store.endpoints() {
        Ok(v) => v
            .into_iter()
            .filter(|(_, s)| s.disabled)
            .map(|(t, _)| t)
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "reading endpoint state");
            HashSet::new()
        }
    };
    if let Some(cluster) = app.cluster.get() {
        // Cluster mode: the database holds the deliveries; this node's
        // workers take due ones from there (any node's events).
        for ep in eps {
            if disabled.contains(&ep.target) {
                tracing::warn!(target = %ep.target, "endpoint disabled (it answered 410); its deliveries wait");
                continue;
            }
            tokio::spawn(cluster_worker(
                app.clone(),
                cluster.clone(),
                Arc::new(ep),
                client.clone(),
            ));
        }
        return;
    }
    let mut queues: HashMap<String, mpsc::UnboundedSender<Job>> = HashMap::new();
    let eps: Vec<Arc<Endpoint>> = eps.into_iter().map(Arc::new).collect();
    for ep in &eps {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.insert(ep.target.clone(), tx);
        if disabled.contains(&ep.target) {
            tracing::warn!(target = %ep.target, "endpoint disabled (it answered 410); its deliveries wait");
            continue;
        }
        tokio::spawn(worker(app.clone(), ep.clone(), client.clone(), rx));
    }
    // Deliveries a previous run left pending.
    match app.store.deliveries() {
        Ok(rows) => {
            for (seq, target, state) in rows {
                if state.status == DeliveryStatus::Pending
                    && let Some(q) = queues.get(&target)
                {
                    let _ = q.send(Job { seq, state });
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "reading pending deliveries"),
    }
    let signal = app.store.events_written();
    loop {
        if let Err(e) = fan_out(&app, &eps, &queues).await {
            tracing::error!(error = %e, "event fan-out failed; retrying");
        }
        for seq in app.events.take_redeliveries() {
            redeliver(&app.store, seq, &queues);
        }
        tokio::select! {
            _ = signal.notified() => {}
            _ = app.events.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Plans the deliveries of the events past the cursor.
async fn fan_out(
    app: &App,
    eps: &[Arc<Endpoint>],
    queues: &HashMap<String, mpsc::UnboundedSender<Job>>,
) -> Result<(), crate::store::StoreError> {
    loop {
        let cursor = app.store.delivery_cursor()?;
        let events = app.store.events(&EventQuery {
            after: cursor.saturating_sub(1),
            kind: None,
            limit: FAN_OUT_CHUNK,
        })?;
        let Some(&(last, _)) = events.last() else {
            return Ok(());
        };
        let now = app.clock.now_ms();
        let mut write = DeliveryWrite {
            cursor: Some(last + 1),
            ..DeliveryWrite::default()
        };
        for (seq, ev) in &events {
            for ep in eps {
                if super::wanted(&ep.events, &ev.kind) {
                    write
                        .deliveries
                        .push((*seq, ep.target.clone(), DeliveryState::pending(now)));
                }
            }
        }
        let jobs: Vec<(String, Job)> = write
            .deliveries
            .iter()
            .map(|(seq, t, s)| {
                (
                    t.clone(),
                    Job {
                        seq: *seq,
                        state: s.clone(),
                    },
                )
            })
            .collect();
        app.store.save_deliveries(write).await?;
        for (target, job) in jobs {
            if let Some(q) = queues.get(&target) {
                let _ = q.send(job);
            }
        }
        if events.len() < FAN_OUT_CHUNK {
            return Ok(());
        }
    }
}

fn redeliver(store: &Store, seq: u64, queues: &HashMap<String, mpsc::UnboundedSender<Job>>) {
    let rows = match store.deliveries_of(seq) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reading deliveries to redeliver");
            return;
        }
    };
    for (target, state) in rows {
        if state.status == DeliveryStatus::Pending
            && let Some(q) = queues.get(&target)
        {
            let _ = q.send(Job { seq, state });
        }
    }
}

type HookClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn http_client() -> HookClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// One endpoint's deliveries, due first first.
async fn worker(
    app: Arc<App>,
    ep: Arc<Endpoint>,
    client: HookClient,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    let mut queue: BTreeMap<(i64, u64), DeliveryState> = BTreeMap::new();
    let mut due_of: HashMap<u64, i64> = HashMap::new();
    let mut add = |queue: &mut BTreeMap<(i64, u64), DeliveryState>, job: Job| {
        if let Some(old) = due_of.insert(job.seq, job.state.next_at_ms) {
            queue.remove(&(old, job.seq));
        }
        queue.insert((job.state.next_at_ms, job.seq), job.state);
    };
    loop {
        while let Ok(job) = rx.try_recv() {
            add(&mut queue, job);
        }
        let now = app.clock.now_ms();
        let due = queue
            .first_key_value()
            .is_some_and(|(&(at, _), _)| at <= now);
        if due && let Some(((_, seq), state)) = queue.pop_first() {
            let Some(next) = attempt(&app, &ep, &client, seq, state).await else {
                // 410: the endpoint is off; what is queued stays pending.
                return;
            };
            if next.status == DeliveryStatus::Pending {
                add(&mut queue, Job { seq, state: next });
            }
            continue;
        }
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => add(&mut queue, job),
                None => return,
            },
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// One endpoint's deliveries in cluster mode: takes the next due one from
/// the database (a claim no other node holds), makes one try with the
/// same signing and client as single-node mode, writes what it came to;
/// when nothing is due, waits for this node's next shipment or a poll.
async fn cluster_worker(
    app: Arc<App>,
    cluster: Arc<crate::cluster::Cluster>,
    ep: Arc<Endpoint>,
    client: HookClient,
) {
    let claim_ms = cluster.claim_ms(ep.timeout);
    loop {
        let now = app.clock.now_ms();
        match cluster.claim_delivery(&ep.target, now, claim_ms).await {
            Ok(Some(claimed)) => {
                if !cluster_try(&app, &cluster, &ep, &client, claimed).await {
                    // 410: this node sends nothing more to it.
                    return;
                }
                continue;
            }
            Ok(None) => {}
            // Logged by the cluster (once per outage); polled again.
            Err(_) => {}
        }
        tokio::select! {
            _ = cluster.outbox_shipped().notified() => {}
            _ = tokio::time::sleep(CLUSTER_POLL) => {}
        }
    }
}

/// How often a cluster worker asks the database for due deliveries when
/// nothing wakes it (other nodes' events are found within this).
const CLUSTER_POLL: Duration = Duration::from_millis(500);

/// One try of a claimed delivery, and its outcome written while the claim
/// is still this node's (again and again while the database is down: the
/// claim keeps another node from trying meanwhile until it expires).
/// `false` when the endpoint answered 410 (disabled on every node).
async fn cluster_try(
    app: &App,
    cluster: &crate::cluster::Cluster,
    ep: &Endpoint,
    client: &HookClient,
    claimed: crate::cluster::outbox::Claimed,
) -> bool {
    let id = claimed.event_id;
    // The body is the event's JSON, with this id (as shipped).
    let outcome = match serde_json::from_slice::<super::Event>(&claimed.body) {
        Ok(ev) => send(app, ep, client, &ev, claimed.body).await,
        Err(e) => Outcome::Skipped(format!("the event does not parse: {e}")),
    };
    let now = app.clock.now_ms();
    let gone = matches!(outcome, Outcome::Gone);
    let mut state = after_try(claimed.state, outcome, &ep.retry, now);
    if gone {
        // Pending, as on one node: no node claims it while the endpoint
        // is disabled (in the database, for every node).
        state.next_at_ms = now;
        tracing::warn!(target = %ep.target, "endpoint answered 410: disabled on every node");
        while let Err(e) = cluster.disable_endpoint(&ep.target, now).await {
            // Until the database has it, this node's claim keeps others off.
            tracing::warn!(target = %ep.target, error = %e, "cluster: the disabled endpoint not recorded yet");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let write = DeliveryWrite {
            endpoints: vec![(ep.target.clone(), gone_state(now))],
            ..DeliveryWrite::default()
        };
        if let Err(e) = app.store.save_deliveries(write).await {
            tracing::error!(error = %e, "saving the endpoint's state");
        }
    }
    loop {
        match cluster.record_delivery(&id, &ep.target, &state).await {
            Ok(true) => break,
            Ok(false) => {
                tracing::warn!(event = %id, target = %ep.target,
                    "cluster: a try outlived its claim; another node has the delivery");
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    !gone
}

/// One try of `ev` (whose stored bytes are `body`) to `ep`.
async fn send(
    app: &App,
    ep: &Endpoint,
    client: &HookClient,
    ev: &super::Event,
    body: Vec<u8>,
) -> Outcome {
    match &ep.channel {
        Channel::Webhook { uri, secret } => {
            post(app, client, uri, secret, &ev.id, body, ep.timeout).await
        }
        Channel::Email(m) => match tokio::time::timeout(ep.timeout, m.send(&app.store, ev)).await {
            Ok(Ok(true)) => Outcome::Delivered(None),
            Ok(Ok(false)) => Outcome::Skipped("no email address for this event".into()),
            Ok(Err(e)) => Outcome::Failed(None, e),
            Err(_) => Outcome::Failed(None, "timed out".into()),
        },
    }
}

/// What one try came to.
enum Outcome {
    Delivered(Option<u16>),
    Gone,
    Skipped(String),
    Failed(Option<u16>, String),
}

/// Makes one try and writes its result; `None` when the endpoint answered
/// 410 and is now disabled.
async fn attempt(
    app: &App,
    ep: &Endpoint,
    client: &HookClient,
    seq: u64,
    mut state: DeliveryState,
) -> Option<DeliveryState> {
    let event = match app.store.event(seq) {
        Ok(Some(e)) => e,
        Ok(None) => {
            state.status = DeliveryStatus::Skipped;
            state.last_error = Some("the event is gone".into());
            save(app, seq, &ep.target, &state).await;
            return Some(state);
        }
        Err(e) => {
            tracing::error!(error = %e, "reading an event to deliver");
            state.next_at_ms = app.clock.now_ms() + 1000;
            return Some(state);
        }
    };
    let (ev, body) = event;
    let outcome = send(app, ep, client, &ev, body).await;
    let now = app.clock.now_ms();
    let gone = matches!(outcome, Outcome::Gone);
    let state = after_try(state, outcome, &ep.retry, now);
    if gone {
        tracing::warn!(target = %ep.target, "endpoint answered 410: disabled");
        let write = DeliveryWrite {
            cursor: None,
            deliveries: vec![(seq, ep.target.clone(), state.clone())],
            endpoints: vec![(ep.target.clone(), gone_state(now))],
        };
        if let Err(e) = app.store.save_deliveries(write).await {
            tracing::error!(error = %e, "saving the endpoint's state");
        }
        return None;
    }
    save(app, seq, &ep.target, &state).await;
    Some(state)
}

/// What one try (made at `now`) makes of a delivery's state: delivered,
/// skipped, or, when it failed, due again after the schedule's next wait
/// (`retry[n - 1]` after the n-th try) and failed when the schedule has run
/// out. A 410 leaves it pending (its endpoint is disabled).
fn after_try(
    mut state: DeliveryState,
    outcome: Outcome,
    retry: &[Duration],
    now: i64,
) -> DeliveryState {
    state.attempts += 1;
    state.updated_at_ms = now;
    match outcome {
        Outcome::Delivered(code) => {
            state.status = DeliveryStatus::Delivered;
            state.last_status = code;
            state.last_error = None;
        }
        Outcome::Skipped(why) => {
            state.status = DeliveryStatus::Skipped;
            state.last_error = Some(why);
        }
        Outcome::Gone => {
            state.last_status = Some(410);
            state.last_error = Some("410 Gone: endpoint disabled".into());
        }
        Outcome::Failed(code, why) => {
            state.last_status = code;
            state.last_error = Some(why);
            match retry.get(state.attempts as usize - 1) {
                Some(wait) => state.next_at_ms = now.saturating_add(wait.as_millis() as i64),
                None => state.status = DeliveryStatus::Failed,
            }
        }
    }
    state
}

/// The state of an endpoint that answered 410 at `now`.
fn gone_state(now: i64) -> EndpointState {
    EndpointState {
        disabled: true,
        reason: "answered 410 Gone".into(),
        at_ms: now,
    }
}

async fn save(app: &App, seq: u64, target: &str, state: &DeliveryState) {
    let write = DeliveryWrite {
        cursor: None,
        deliveries: vec![(seq, target.to_owned(), state.clone())],
        endpoints: Vec::new(),
    };
    if let Err(e) = app.store.save_deliveries(write).await {
        tracing::error!(error = %e, "saving a delivery's state");
    }
}

/// POSTs one event, signed; reads at most [`MAX_RESPONSE_BYTES`] back.
async fn post(
    app: &App,
    client: &HookClient,
    uri: &http::Uri,
    secret: &WebhookSecret,
    id: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Outcome {
    let ts = app.clock.now_secs();
    let signature = secret.sign(id, ts, &body);
    let req = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "tollgate-webhooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(body)));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(None, format!("building the request: {e}")),
    };
    let sent = tokio::time::timeout(timeout, async {
        let res = client.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let mut body = res.into_body();
        let mut read = 0usize;
        // The answer is not used: read a little so a small one completes
        // (and the connection can be reused), never more.
        while read < MAX_RESPONSE_BYTES {
            match body.frame().await {
                Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        Ok::<_, String>(status)
    })
    .await;
    match sent {
        Err(_) => Outcome::Failed(None, format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Outcome::Failed(None, e),
        Ok(Ok(s)) if s.is_success() => Outcome::Delivered(Some(s.as_u16())),
        Ok(Ok(s)) if s == http::StatusCode::GONE => Outcome::Gone,
        Ok(Ok(s)) => Outcome::Failed(Some(s.as_u16()), format!("answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Vec<Duration> {
        vec![Duration::from_secs(5), Duration::from_secs(300)]
    }

    #[test]
    fn a_failed_try_waits_the_schedules_next_step_then_fails() {
        let s = DeliveryState::pending(0);
        let s = after_try(
            s,
            Outcome::Failed(Some(500), "answered 500".into()),
            &schedule(),
            1_000,
        );
        assert_eq!(s.status, DeliveryStatus::Pending);
        assert_eq!(
            (s.attempts, s.next_at_ms, s.updated_at_ms),
            (1, 6_000, 1_000)
        );
        assert_eq!(s.last_status, Some(500));
        let s = after_try(
            s,
            Outcome::Failed(None, "refused".into()),
            &schedule(),
            6_000,
        );
        assert_eq!((s.attempts, s.next_at_ms), (2, 306_000));
        assert_eq!(s.last_status, None);
        // The schedule has two waits: the third failure is the last.
        let s = after_try(
            s,
            Outcome::Failed(Some(502), "answered 502".into()),
            &schedule(),
            306_000,
        );
        assert_eq!((s.status, s.attempts), (DeliveryStatus::Failed, 3));
        assert_eq!(s.last_error.as_deref(), Some("answered 502"));
    }

    #[test]
    fn delivered_skipped_and_gone() {
        let failed = after_try(
            DeliveryState::pending(0),
            Outcome::Failed(Some(500), "answered 500".into()),
            &schedule(),
            10,
        );
        let s = after_try(
            failed.clone(),
            Outcome::Delivered(Some(204)),
            &schedule(),
            20,
        );
        assert_eq!(
            (s.status, s.attempts, s.last_status),
            (DeliveryStatus::Delivered, 2, Some(204))
        );
        assert_eq!(s.last_error, None);
        let s = after_try(
            failed.clone(),
            Outcome::Skipped("no address".into()),
            &schedule(),
            20,
        );
        assert_eq!(s.status, DeliveryStatus::Skipped);
        // 410: still pending (the endpoint is off; its deliveries wait).
        let s = after_try(failed, Outcome::Gone, &schedule(), 20);
        assert_eq!(
            (s.status, s.last_status, s.attempts),
            (DeliveryStatus::Pending, Some(410), 2)
        );
    }

    #[test]
    fn no_schedule_fails_at_the_first_failure() {
        let s = after_try(
            DeliveryState::pending(0),
            Outcome::Failed(None, "timed out".into()),
            &[],
            1,
        );
        assert_eq!((s.status, s.attempts), (DeliveryStatus::Failed, 1));
    }
}
