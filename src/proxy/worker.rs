//! A worker's upstream clients across reloads: the [`Proxy`] built for
//! the routing currently live, rebuilt the first time the worker serves a
//! request after a reload swapped the routing. Requests that started
//! before keep the old one (an `Arc`) until they end; its pooled
//! connections close with it.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Proxy;
use super::spin::Spin;
use crate::reload::Live;

pub struct WorkerProxy {
    /// The clients for the last routing this worker served.
    current: ArcSwap<Proxy>,
    /// This worker's spinner (per-core mode, `runtime.spin_us` > 0).
    pub spin: Option<Arc<Spin>>,
}

impl WorkerProxy {
    pub fn new(live: &Live, spin: Option<Arc<Spin>>) -> WorkerProxy {
        WorkerProxy {
            current: ArcSwap::from_pointee(Proxy::new(live.routing.clone())),
            spin,
        }
    }

    /// The clients for `live`'s routing. In shared mode two threads may
    /// both build one after a swap; the later store wins and the other is
    /// used by its one request only.
    pub fn for_live(&self, live: &Live) -> Arc<Proxy> {
        let cur = self.current.load_full();
        if Arc::ptr_eq(&cur.routing, &live.routing) {
            return cur;
        }
        let fresh = Arc::new(Proxy::new(live.routing.clone()));
        self.current.store(fresh.clone());
        fresh
    }
}
