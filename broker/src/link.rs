//! The state of the broker's link to NATS, as the NATS client reports it.
//!
//! The client's connection events set it; gRPC health follows it (NOT_SERVING
//! while NATS is unreachable), and every call races its work against
//! [`Link::outage`], so a call that needs NATS while it is down answers
//! UNAVAILABLE within `nats_timeout` instead of hanging. The client
//! reconnects by itself; nothing here restarts anything.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

/// Whether NATS is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected.
    Up,
    /// Disconnected.
    Down,
}

/// A cheap, cloneable handle on the link state.
#[derive(Clone)]
pub struct Link {
    tx: Arc<watch::Sender<State>>,
    /// Connections made so far (each reconnection counts).
    connections: Arc<watch::Sender<u64>>,
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

impl Link {
    /// A link that is up (the broker only serves once connected).
    pub fn new() -> Link {
        Link {
            tx: Arc::new(watch::Sender::new(State::Up)),
            connections: Arc::new(watch::Sender::new(0)),
        }
    }

    /// The client connected (or reconnected).
    pub fn up(&self) {
        self.connections.send_modify(|n| *n += 1);
        self.tx.send_if_modified(|s| {
            let changed = *s != State::Up;
            *s = State::Up;
            changed
        });
    }

    /// Connections made so far: compare with [`Link::reconnected_since`].
    pub fn connections(&self) -> u64 {
        *self.connections.borrow()
    }

    /// Resolves once the client has connected again after `connections`
    /// were counted: whatever it had asked of the server before (a pull
    /// waiting for messages) may be gone with the old connection.
    pub async fn reconnected_since(&self, connections: u64) {
        let mut rx = self.connections.subscribe();
        if rx.wait_for(|n| *n > connections).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The client lost its connection.
    pub fn down(&self) {
        self.tx.send_if_modified(|s| {
            let changed = *s != State::Down;
            *s = State::Down;
            changed
        });
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.tx.borrow()
    }

    /// Changes of the state, from the current one.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    /// Resolves once NATS has been unreachable for `bound` without a break,
    /// counted from when the caller first saw it down (now, if it is down
    /// already). Never resolves while NATS stays up.
    pub async fn outage(&self, bound: Duration) {
        let mut rx = self.tx.subscribe();
        loop {
            let down = rx.wait_for(|s| *s != State::Up).await.is_ok();
            if !down {
                return std::future::pending().await;
            }
            let deadline = tokio::time::Instant::now() + bound;
            let back = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                back = rx.wait_for(|s| *s == State::Up) => back.is_ok(),
            };
            if !back {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_outage_resolves_after_the_bound_and_not_while_up() {
        let link = Link::new();
        let bound = Duration::from_secs(5);
        let waiting = tokio::spawn({
            let link = link.clone();
            async move { link.outage(bound).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished(), "up: no outage");

        // Down for less than the bound, then back: still no outage.
        link.down();
        tokio::time::sleep(Duration::from_secs(3)).await;
        link.up();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished(), "a short break is ridden out");

        link.down();
        tokio::time::sleep(Duration::from_millis(4900)).await;
        assert!(!waiting.is_finished());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(waiting.is_finished(), "answered within the bound");
        assert_eq!(link.state(), State::Down);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnection_is_told_to_whoever_waits_for_it() {
        let link = Link::new();
        link.up();
        let seen = link.connections();
        let waiting = tokio::spawn({
            let link = link.clone();
            async move { link.reconnected_since(seen).await }
        });
        link.down();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "down is not yet reconnected");
        link.up();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(waiting.is_finished());
    }
}
