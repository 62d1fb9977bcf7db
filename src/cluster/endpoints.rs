//! Webhook endpoints disabled cluster-wide: an endpoint that answers 410
//! Gone to any node is recorded in `tollgate_disabled_endpoints` (by its
//! delivery target name), and no node claims a delivery to it again
//! (the claim statement, `outbox::CLAIM`, skips it), so its deliveries
//! wait as on one node. The row is written once; a second 410 (two nodes
//! trying at once) changes nothing.

use super::Cluster;
use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};

impl Cluster {
    /// Records that `endpoint` answered 410 on this node at `at_ms`.
    pub async fn disable_endpoint(&self, endpoint: &str, at_ms: i64) -> Result<(), String> {
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        let endpoint = endpoint.to_owned();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            c.execute(
                "INSERT INTO tollgate_disabled_endpoints (endpoint, node_id, at_ms, reason) \
                 VALUES ($1, $2, $3, 'answered 410 Gone') ON CONFLICT (endpoint) DO NOTHING",
                &[&endpoint, &node, &at_ms],
            )
            .await
            .map_err(db)
            .map(count(Kind::Outbox, 2))
            .map(|_| ())
        })
        .await
    }
}
