//! The store thread's handling of another node's change (cluster mode,
//! `crate::cluster::sync`): applied like the local op, without the events
//! the node that made it already emitted (so a webhook is not sent once
//! per node).

use super::{Op, StoreThread};

impl StoreThread {
    /// Handles `op` with the outbox's events held off.
    pub(super) fn handle_replicated(&mut self, op: Op) -> bool {
        self.outbox.replica = true;
        let urgent = self.handle(op);
        self.outbox.replica = false;
        urgent
    }
}
