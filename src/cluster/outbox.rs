//! The event outbox cluster-wide: each node ships the events its local
//! outbox records to `tollgate_events` on the settle tick (once per event
//! id), with one `tollgate_deliveries` row per endpoint the event goes to;
//! any node then delivers any of them, one node at a time.
//!
//! - **Shipping**: the local outbox is written in the change's own batch
//!   as in single-node mode; the tick ships what is past the store's
//!   delivery cursor and then moves it (so in cluster mode the cursor
//!   means "in the database"). With the database unreachable the events
//!   wait in the local outbox and go when it is back; a restart ships
//!   from the cursor again, and what is there already is skipped.
//! - **Ids**: a local outbox numbers its events `evt_<seq>` from 1, so two
//!   nodes (or one whose store was wiped) would name different events
//!   alike, and a receiver deduping on `webhook-id` would drop one. In the
//!   database an event is `evt_<node>_<seq>_<ms>` ([`cluster_event_id`]),
//!   the body carries that id, and those bytes are what every try from
//!   every node signs.
//! - **Claims**: a node's worker for an endpoint takes the next due
//!   delivery with one statement ([`CLAIM`]): it sets `claimed_by` and
//!   `claim_until_ms` (the database's clock, so nodes' clocks cannot make
//!   two claims overlap) on a row nobody holds or whose claim has expired,
//!   skipping rows another node is claiming (`FOR UPDATE SKIP LOCKED`).
//!   The claim lasts one try (the endpoint's `timeout`) plus a sync
//!   interval to record it ([`RECORD`], only while the claim is still
//!   this node's). A node killed mid-try leaves its claim to expire; then
//!   another node makes the try again, with the same `webhook-id`.
//! - **Schedule**: `next_attempt_ms` and the retry waits are on the
//!   gateway's clock, as in single-node mode.
//! - **Reads**: in cluster mode the admin API's events and deliveries
//!   lists, and redelivery, work on these tables (same shapes); retention
//!   (`storage.event_retention_days`) prunes them as it prunes the store.

use std::sync::atomic::Ordering;

use super::Cluster;
use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use crate::config::Pattern;
use crate::error::ApiError;
use crate::events::Event;
use crate::events::deliver::{DeliveryState, DeliveryStatus, targets_for};
use crate::store::{DeliveryWrite, EventQuery};

/// Events shipped per transaction.
const SHIP_BATCH: usize = 256;

/// Most events one retention pass removes from the database (the next
/// sweep goes on).
const PRUNE_MAX: i64 = 10_000;

/// Takes the next due delivery of endpoint `$1` (due at `$2` on the
/// gateway's clock) for node `$3`, for `$4` ms: one row nobody holds, or
/// whose holder's claim expired; rows another node is taking are skipped,
/// and none while the endpoint is disabled (`cluster::endpoints`).
pub const CLAIM: &str = "WITH due AS ( \
     SELECT event_id, endpoint FROM tollgate_deliveries \
     WHERE endpoint = $1 AND status = 'pending' AND next_attempt_ms <= $2 \
     AND NOT EXISTS (SELECT 1 FROM tollgate_disabled_endpoints x WHERE x.endpoint = $1) \
     AND (claimed_by IS NULL OR claim_until_ms IS NULL \
          OR claim_until_ms < (extract(epoch FROM clock_timestamp()) * 1000)::bigint) \
     ORDER BY next_attempt_ms, event_id LIMIT 1 \
     FOR UPDATE SKIP LOCKED) \
     UPDATE tollgate_deliveries d SET claimed_by = $3, \
     claim_until_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $4 \
     FROM due, tollgate_events e \
     WHERE d.event_id = due.event_id AND d.endpoint = due.endpoint AND e.id = d.event_id \
     RETURNING d.event_id, e.body, d.attempts, d.next_attempt_ms, d.last_status, d.last_error, d.updated_ms";

/// Writes a try's outcome (`$4`…`$9`) on delivery (`$1`, `$2`) while node
/// `$3` still holds it: a node whose claim expired and was taken by
/// another writes nothing. A retry releases the claim (any node may make
/// the next try); a finished delivery keeps the name of the node that
/// finished it.
pub const RECORD: &str = "UPDATE tollgate_deliveries SET status = $4, attempts = $5, \
     next_attempt_ms = $6, last_status = $7, last_error = $8, updated_ms = $9, \
     claimed_by = CASE WHEN $4 = 'pending' THEN NULL ELSE claimed_by END, claim_until_ms = NULL \
     WHERE event_id = $1 AND endpoint = $2 AND claimed_by = $3 AND status = 'pending'";

/// The id of a node's event in the database: unique across nodes (the
/// node's name), across a wiped store (the time) and stable across
/// restarts (all three are stored with the event).
pub fn cluster_event_id(node: &str, seq: u64, at_ms: i64) -> String {
    format!("evt_{node}_{seq}_{at_ms}")
}

/// One delivery this node holds a claim on.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The event's id: the `webhook-id` of every try.
    pub event_id: String,
    /// The signed body (the event's JSON, as shipped).
    pub body: Vec<u8>,
    /// Where the delivery stood when claimed.
    pub state: DeliveryState,
}

/// The text of a status in the database.
fn status_text(s: DeliveryStatus) -> &'static str {
    match s {
        DeliveryStatus::Pending => "pending",
        DeliveryStatus::Delivered => "delivered",
        DeliveryStatus::Failed => "failed",
        DeliveryStatus::Skipped => "skipped",
    }
}

/// The rows one node ships for some events of its local outbox.
#[derive(Debug, Default, PartialEq)]
struct Shipment {
    ids: Vec<String>,
    kinds: Vec<String>,
    bodies: Vec<Vec<u8>>,
    created: Vec<i64>,
    /// One per (event, endpoint): event id, endpoint.
    delivery_events: Vec<String>,
    delivery_endpoints: Vec<String>,
}

impl Shipment {
    /// The rows for `events` (local seq, event) from node `node`, each
    /// with a delivery to every target `targets` gives its type.
    fn of(
        node: &str,
        events: &[(u64, Event)],
        targets: impl Fn(&str) -> Vec<String>,
        now_ms: i64,
    ) -> Shipment {
        let mut s = Shipment::default();
        for (seq, ev) in events {
            let at = crate::clock::parse_rfc3339(&ev.timestamp).unwrap_or(now_ms);
            let id = cluster_event_id(node, *seq, at);
            let shipped = Event {
                id: id.clone(),
                ..ev.clone()
            };
            for t in targets(&ev.kind) {
                s.delivery_events.push(id.clone());
                s.delivery_endpoints.push(t);
            }
            s.ids.push(id);
            s.kinds.push(ev.kind.clone());
            s.bodies
                .push(serde_json::to_vec(&shipped).unwrap_or_default());
            s.created.push(at);
        }
        s
    }
}

impl Cluster {
    /// Ships the events of the local outbox not yet in the database, with
    /// their deliveries; moves the store's delivery cursor past them.
    pub(super) async fn ship_events(&self) {
        let Some(app) = self.app() else {
            return;
        };
        // One shipment at a time (the tick and an admin list): the cursor
        // only moves forward.
        let _turn = self.shipping.lock().await;
        loop {
            let cursor = match app.store.delivery_cursor() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: the outbox cursor not read");
                    return;
                }
            };
            let q = EventQuery {
                after: cursor.saturating_sub(1),
                kind: None,
                limit: SHIP_BATCH,
            };
            let events = match app.store.events(&q) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: outbox events not read");
                    return;
                }
            };
            let Some(last) = events.last().map(|(seq, _)| *seq) else {
                return;
            };
            let full = events.len() == SHIP_BATCH;
            let now = app.clock.now_ms();
            let s = Shipment::of(
                &self.cfg.node_id,
                &events,
                |kind| targets_for(&app.config, kind),
                now,
            );
            let node = self.cfg.node_id.clone();
            let pool = self.pool.clone();
            let written = self
                .run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    let tx = c
                        .transaction()
                        .await
                        .map_err(db)
                        .map(count(Kind::Outbox, 1))?;
                    tx.execute(
                        "INSERT INTO tollgate_events (id, kind, body, created_ms, origin) \
                         SELECT i, k, b, c, $5 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[]) \
                         AS u(i, k, b, c) ORDER BY c, i ON CONFLICT (id) DO NOTHING",
                        &[&s.ids, &s.kinds, &s.bodies, &s.created, &node],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Outbox, 2))?;
                    tx.execute(
                        "INSERT INTO tollgate_deliveries (event_id, endpoint, next_attempt_ms, updated_ms) \
                         SELECT e, t, $3, $3 FROM unnest($1::text[], $2::text[]) AS u(e, t) \
                         ON CONFLICT (event_id, endpoint) DO NOTHING",
                        &[&s.delivery_events, &s.delivery_endpoints, &now],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Outbox, 2))?;
                    tx.commit().await.map_err(db).map(count(Kind::Outbox, 1))
                })
                .await;
            if let Err(e) = written {
                self.note_down(&e);
                return;
            }
            let moved = DeliveryWrite {
                cursor: Some(last + 1),
                ..DeliveryWrite::default()
            };
            if let Err(e) = app.store.save_deliveries(moved).await {
                // Shipped again next tick: the database skips what it has.
                tracing::warn!(error = %e, "cluster: the outbox cursor not moved");
                return;
            }
            self.outbox_shipped.notify_waiters();
            if !full {
                return;
            }
        }
    }

    /// Wakes this node's delivery workers when it shipped events.
    pub fn outbox_shipped(&self) -> &tokio::sync::Notify {
        &self.outbox_shipped
    }

    /// How long a claim on a delivery to an endpoint with this `timeout`
    /// lasts: the try, and a sync interval to write what it came to.
    pub fn claim_ms(&self, timeout: std::time::Duration) -> i64 {
        (timeout + self.cfg.sync_interval.0).as_millis() as i64
    }

    /// Takes the next delivery to `endpoint` due at `now_ms` (the gateway's
    /// clock) that no node holds, for `claim_ms`.
    pub async fn claim_delivery(
        &self,
        endpoint: &str,
        now_ms: i64,
        claim_ms: i64,
    ) -> Result<Option<Claimed>, String> {
        if self.stopping.load(Ordering::Acquire) {
            return Ok(None);
        }
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        let endpoint = endpoint.to_owned();
        let row = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                c.query_opt(CLAIM, &[&endpoint, &now_ms, &node, &claim_ms])
                    .await
                    .map_err(db)
                    .map(count(Kind::Outbox, 2))
            })
            .await;
        let row = match row {
            Ok(r) => {
                self.note_up();
                r
            }
            Err(e) => {
                self.note_down(&e);
                return Err(e);
            }
        };
        Ok(row.map(|r| Claimed {
            event_id: r.get(0),
            body: r.get(1),
            state: DeliveryState {
                status: DeliveryStatus::Pending,
                attempts: r.get::<_, i32>(2).max(0) as u32,
                next_at_ms: r.get(3),
                last_status: r
                    .get::<_, Option<i32>>(4)
                    .and_then(|s| u16::try_from(s).ok()),
                last_error: r.get(5),
                updated_at_ms: r.get(6),
            },
        }))
    }

    /// Writes what a try of a claimed delivery came to. `Ok(false)`: the
    /// claim had expired and another node took it (nothing written).
    pub async fn record_delivery(
        &self,
        event_id: &str,
        endpoint: &str,
        state: &DeliveryState,
    ) -> Result<bool, String> {
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        let (event_id, endpoint) = (event_id.to_owned(), endpoint.to_owned());
        let status = status_text(state.status);
        let attempts = i32::try_from(state.attempts).unwrap_or(i32::MAX);
        let next = state.next_at_ms;
        let code = state.last_status.map(i32::from);
        let error = state.last_error.clone();
        let updated = state.updated_at_ms;
        let n = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                c.execute(
                    RECORD,
                    &[
                        &event_id, &endpoint, &node, &status, &attempts, &next, &code, &error,
                        &updated,
                    ],
                )
                .await
                .map_err(db)
                .map(count(Kind::Outbox, 2))
            })
            .await;
        match n {
            Ok(n) => {
                self.note_up();
                Ok(n == 1)
            }
            Err(e) => {
                self.note_down(&e);
                Err(e)
            }
        }
    }
}

impl Cluster {
    /// Retention in the database (`storage.event_retention_days`, as the
    /// local outbox): removes events made before `before_ms` whose
    /// deliveries all finished, with their delivery rows. Any node may do
    /// it; one still pending stays, whatever its age.
    pub async fn prune_events_before(&self, before_ms: i64) {
        let pool = self.pool.clone();
        let pruned = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                c.execute(
                    "DELETE FROM tollgate_events WHERE seq IN (SELECT seq FROM tollgate_events e \
                     WHERE e.created_ms < $1 AND NOT EXISTS (SELECT 1 FROM tollgate_deliveries d \
                     WHERE d.event_id = e.id AND d.status = 'pending') ORDER BY seq LIMIT $2)",
                    &[&before_ms, &PRUNE_MAX],
                )
                .await
                .map_err(db)
                .map(count(Kind::Outbox, 2))
            })
            .await;
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "cluster: old finished events pruned"),
            Err(e) => self.note_down(&e),
        }
    }
}

/// What the admin API lists in cluster mode reads from the database.
impl Cluster {
    /// `GET /api/v1/events` in cluster mode: every node's events in the
    /// database's order, oldest first, in the shape of the local outbox.
    /// `after` is an event's id or the database's `seq` (`None`: from the
    /// first). This node's new events are shipped first, so one it just
    /// made is listed. `Ok(None)`: `after` names no event.
    pub async fn events_list(
        &self,
        after: Option<&str>,
        kind: Option<Pattern>,
        limit: usize,
    ) -> Result<Option<Vec<Event>>, ApiError> {
        self.ship_events().await;
        let after = after.map(|a| match a.parse::<i64>() {
            Ok(seq) => Err(seq),
            Err(_) => Ok(a.to_owned()),
        });
        let pool = self.pool.clone();
        let want = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Option<Vec<Vec<u8>>> = self
            .read(async move {
                let c = pool.get().await.map_err(pool_error)?;
                let mut from = match after {
                    None => 0,
                    Some(Err(seq)) => seq,
                    Some(Ok(id)) => {
                        let row = c
                            .query_opt("SELECT seq FROM tollgate_events WHERE id = $1", &[&id])
                            .await
                            .map_err(db)
                            .map(count(Kind::Read, 2))?;
                        match row {
                            Some(r) => r.get(0),
                            None => return Ok(None),
                        }
                    }
                };
                // A type filter is a glob: matched here, page by page.
                let page = if kind.is_some() { want.max(500) } else { want };
                let mut out = Vec::new();
                loop {
                    let rows = c
                        .query(
                            "SELECT seq, kind, body FROM tollgate_events WHERE seq > $1 \
                             ORDER BY seq LIMIT $2",
                            &[&from, &page],
                        )
                        .await
                        .map_err(db)
                        .map(count(Kind::Read, 2))?;
                    let full = rows.len() as i64 == page;
                    for r in &rows {
                        from = r.get(0);
                        let k: String = r.get(1);
                        if kind.as_ref().is_none_or(|p| p.is_match(&k)) {
                            out.push(r.get::<_, Vec<u8>>(2));
                            if out.len() as i64 >= want {
                                return Ok(Some(out));
                            }
                        }
                    }
                    if !full {
                        return Ok(Some(out));
                    }
                }
            })
            .await?;
        Ok(rows.map(|bodies| {
            bodies
                .iter()
                .filter_map(|b| match serde_json::from_slice::<Event>(b) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: an event row does not parse");
                        None
                    }
                })
                .collect()
        }))
    }

    /// `GET /api/v1/webhooks/deliveries` in cluster mode: (event id,
    /// endpoint, state) of every node's deliveries, by event then endpoint.
    pub async fn deliveries_list(
        &self,
        status: Option<DeliveryStatus>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<(String, String, DeliveryState)>, ApiError> {
        self.ship_events().await;
        let status = status.map(status_text);
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    "SELECT d.event_id, d.endpoint, d.status, d.attempts, d.next_attempt_ms, \
                     d.last_status, d.last_error, d.updated_ms \
                     FROM tollgate_deliveries d JOIN tollgate_events e ON e.id = d.event_id \
                     WHERE ($1::text IS NULL OR d.status = $1) \
                     ORDER BY e.seq, d.endpoint OFFSET $2 LIMIT $3",
                    &[&status, &offset, &limit],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let status: String = r.get(2);
                    let state = DeliveryState {
                        status: DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Pending),
                        attempts: r.get::<_, i32>(3).max(0) as u32,
                        next_at_ms: r.get(4),
                        last_status: r
                            .get::<_, Option<i32>>(5)
                            .and_then(|s| u16::try_from(s).ok()),
                        last_error: r.get(6),
                        updated_at_ms: r.get(7),
                    };
                    (r.get(0), r.get(1), state)
                })
                .collect())
        })
        .await
    }

    /// `POST /api/v1/events/{id}/redeliver` in cluster mode: every endpoint
    /// the event goes to (`targets` of its type) gets it again from the
    /// first try, from whichever node claims it; a try under way is
    /// released (its outcome is not written). `Ok(None)`: no such event.
    pub async fn redeliver(
        &self,
        id: &str,
        targets: impl FnOnce(&str) -> Vec<String>,
        now_ms: i64,
    ) -> Result<Option<(Event, Vec<String>)>, ApiError> {
        self.ship_events().await;
        let pool = self.pool.clone();
        let key = id.to_owned();
        let body: Option<Vec<u8>> = self
            .read(async move {
                let c = pool.get().await.map_err(pool_error)?;
                c.query_opt("SELECT body FROM tollgate_events WHERE id = $1", &[&key])
                    .await
                    .map_err(db)
                    .map(count(Kind::Read, 2))
                    .map(|r| r.map(|r| r.get(0)))
            })
            .await?;
        let Some(ev) = body.and_then(|b| serde_json::from_slice::<Event>(&b).ok()) else {
            return Ok(None);
        };
        let targets = targets(&ev.kind);
        let pool = self.pool.clone();
        let (key, ts) = (ev.id.clone(), targets.clone());
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            c.execute(
                "INSERT INTO tollgate_deliveries (event_id, endpoint, next_attempt_ms, updated_ms) \
                 SELECT $1, t, $3, $3 FROM unnest($2::text[]) AS u(t) \
                 ON CONFLICT (event_id, endpoint) DO UPDATE SET status = 'pending', attempts = 0, \
                 next_attempt_ms = $3, claimed_by = NULL, claim_until_ms = NULL, \
                 last_status = NULL, last_error = NULL, updated_ms = $3",
                &[&key, &ts, &now_ms],
            )
            .await
            .map_err(db)
            .map(count(Kind::Outbox, 2))
        })
        .await?;
        self.outbox_shipped.notify_waiters();
        Ok(Some((ev, targets)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(id: &str, kind: &str, ts: &str) -> Event {
        Event {
            id: id.to_owned(),
            kind: kind.to_owned(),
            timestamp: ts.to_owned(),
            data: json!({"hash": "ab"}),
        }
    }

    #[test]
    fn ids_differ_across_nodes_and_wiped_stores_and_are_stable() {
        let a = cluster_event_id("node-1", 1, 1_000);
        assert_eq!(a, "evt_node-1_1_1000");
        assert_ne!(a, cluster_event_id("node-2", 1, 1_000));
        // The same node's seq 1 again after its store was wiped.
        assert_ne!(a, cluster_event_id("node-1", 1, 2_000));
        assert_eq!(a, cluster_event_id("node-1", 1, 1_000));
    }

    #[test]
    fn a_shipment_carries_the_cluster_id_in_the_signed_body() {
        let events = vec![
            (7, ev("evt_7", "key.created", "2026-12-03T10:00:00.000Z")),
            (
                8,
                ev("evt_8", "payment.succeeded", "2026-12-03T10:00:01.500Z"),
            ),
        ];
        let targets = |kind: &str| {
            if kind.starts_with("key.") {
                vec!["webhook:a".to_owned(), "webhook:b".to_owned()]
            } else {
                vec!["webhook:a".to_owned()]
            }
        };
        let s = Shipment::of("n1", &events, targets, 0);
        let at = crate::clock::parse_rfc3339("2026-12-03T10:00:00.000Z").unwrap();
        assert_eq!(s.ids[0], format!("evt_n1_7_{at}"));
        assert_eq!(s.created[0], at);
        assert_eq!(s.created[1], at + 1500);
        let body: Event = serde_json::from_slice(&s.bodies[0]).unwrap();
        assert_eq!(body.id, s.ids[0], "the body's id is the webhook-id");
        assert_eq!(body.kind, "key.created");
        assert_eq!(body.data, json!({"hash": "ab"}));
        assert_eq!(s.kinds, ["key.created", "payment.succeeded"]);
        assert_eq!(
            s.delivery_events,
            [s.ids[0].clone(), s.ids[0].clone(), s.ids[1].clone()]
        );
        assert_eq!(
            s.delivery_endpoints,
            ["webhook:a", "webhook:b", "webhook:a"]
        );
    }

    #[test]
    fn claims_skip_held_rows_and_use_the_databases_clock() {
        // The guards that make one node at a time hold a delivery.
        assert!(CLAIM.contains("FOR UPDATE SKIP LOCKED"));
        assert!(CLAIM.contains("claim_until_ms < (extract(epoch FROM clock_timestamp())"));
        assert!(CLAIM.contains("status = 'pending'"));
        assert!(RECORD.contains("claimed_by = $3 AND status = 'pending'"));
        for s in [
            DeliveryStatus::Pending,
            DeliveryStatus::Delivered,
            DeliveryStatus::Failed,
            DeliveryStatus::Skipped,
        ] {
            assert_eq!(DeliveryStatus::parse(status_text(s)), Some(s));
        }
    }
}
