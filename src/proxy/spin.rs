//! Busy polling before a worker sleeps, at low concurrency.
//!
//! A worker that waits for the next event with nothing else to do sleeps
//! in `epoll_wait`, and the event that comes wakes it: on a virtual
//! machine that wake-up (the sender's inter-processor interrupt, the
//! sleeper's return from idle) costs tens of microseconds, and at one
//! connection it is paid two or three times per request: for the
//! upstream's answer, between the frames of a stream, and for the
//! client's next request. So while a worker has at most one request in
//! flight on its only client connection, and for `runtime.spin_us` after
//! its last event, it polls
//! instead of sleeping: a task that yields, so the scheduler asks the
//! I/O driver for events without blocking (`epoll_wait` with a zero
//! timeout) and runs whatever they woke. With more connections or
//! requests the worker is seldom idle and the spinner stays parked: the
//! CPU it would burn belongs to them. The kernel's own `net.core.busy_poll` makes the
//! same trade.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// One worker's spinner: what its requests tell it, and its wake-up.
pub struct Spin {
    window: Duration,
    /// Proxied requests in flight on this worker (head and body).
    in_flight: AtomicU32,
    /// Client connections open on this worker: with more than one, the
    /// worker is seldom idle for long, and what it would burn spinning
    /// is what the other side of a busy machine needs.
    connections: AtomicU32,
    /// An event since the spinner last looked: its window starts again.
    poked: AtomicBool,
    /// The spinner is polling (no need to wake it).
    active: AtomicBool,
    wake: Notify,
}

impl Spin {
    /// `None` when `window` is zero (spinning off).
    pub fn new(window: Duration) -> Option<Arc<Spin>> {
        (!window.is_zero()).then(|| {
            Arc::new(Spin {
                window,
                in_flight: AtomicU32::new(0),
                connections: AtomicU32::new(0),
                poked: AtomicBool::new(false),
                active: AtomicBool::new(false),
                wake: Notify::new(),
            })
        })
    }

    /// Something happened on this worker's requests: poll a while longer
    /// before sleeping.
    pub fn poke(&self) {
        self.poked.store(true, Ordering::Relaxed);
        if self.quiet() && !self.active.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// One connection, at most one request in flight: the worker would
    /// sleep between its events.
    fn quiet(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) <= 1 && self.connections.load(Ordering::Relaxed) <= 1
    }

    /// A client connection opens on this worker; open until the guard drops.
    pub fn connect(self: &Arc<Self>) -> Connected {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Connected(self.clone())
    }

    /// A request starts; in flight until the guard drops (which is an
    /// event too: the client's next request may follow).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.poke();
        InFlight(self.clone())
    }

    /// The spinner: parked until poked, then polls while at most one
    /// request is in flight and the last event is under `window` old.
    pub async fn run(self: Arc<Self>) {
        let mut again = false;
        loop {
            if !again {
                self.wake.notified().await;
            }
            let mut deadline = Instant::now() + self.window;
            loop {
                tokio::task::yield_now().await;
                let now = Instant::now();
                if self.poked.swap(false, Ordering::Relaxed) {
                    deadline = now + self.window;
                }
                if now >= deadline || !self.quiet() {
                    break;
                }
            }
            self.active.store(false, Ordering::Relaxed);
            // A poke between the last look and `active` going false found
            // it still true and did not notify: look once more.
            again = self.poked.load(Ordering::Relaxed)
                && self.quiet()
                && !self.active.swap(true, Ordering::Relaxed);
        }
    }
}

/// A request in flight on a spinning worker.
pub struct InFlight(Arc<Spin>);

impl InFlight {
    /// An event on this request (a frame passed).
    pub fn poke(&self) {
        self.0.poke();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.poke();
    }
}

/// A client connection open on a spinning worker.
pub struct Connected(Arc<Spin>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Duration {
        Duration::from_millis(2)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_request_spins_for_its_window_then_the_spinner_parks() {
        let spin = Spin::new(window()).expect("a window turns it on");
        tokio::spawn(spin.clone().run());
        let _conn = spin.connect();
        let req = spin.enter();
        assert!(
            spin.active.load(Ordering::Relaxed),
            "the request's start wakes it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !spin.active.load(Ordering::Relaxed),
            "parked once the window passed"
        );
        req.poke();
        assert!(
            spin.active.load(Ordering::Relaxed),
            "an event wakes it again"
        );
        drop(req);
        assert_eq!(spin.in_flight.load(Ordering::Relaxed), 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!spin.active.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_connection_or_request_keeps_it_parked() {
        let spin = Spin::new(window()).expect("a window turns it on");
        tokio::spawn(spin.clone().run());
        let a = spin.connect();
        let b = spin.connect();
        let req = spin.enter();
        assert!(
            !spin.active.load(Ordering::Relaxed),
            "two connections: no spinning"
        );
        drop(b);
        let other = spin.enter();
        req.poke();
        assert!(
            !spin.active.load(Ordering::Relaxed),
            "two requests: no spinning"
        );
        drop(other);
        assert!(
            spin.active.load(Ordering::Relaxed),
            "back to one: the end is an event"
        );
        drop((a, req));
        assert_eq!(spin.connections.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_zero_window_turns_it_off() {
        assert!(Spin::new(Duration::ZERO).is_none());
    }
}
