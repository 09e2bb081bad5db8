//! The state of the broker's link to NATS, as the NATS client reports it.
//!
//! The client's connection events set it; gRPC health follows it (NOT_SERVING
//! while NATS is unreachable), and every call races its work against
//! [`Link::outage`], so a call that needs NATS while it is down answers
//! UNAVAILABLE within `nats_timeout` instead of hanging. The client
//! reconnects by itself; nothing here restarts anything.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

/// Whether NATS is reachable, and since when it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected.
    Up,
    /// Disconnected since this time.
    Down(SystemTime),
}

/// A cheap, cloneable handle on the link state.
#[derive(Clone)]
pub struct Link {
    tx: Arc<watch::Sender<State>>,
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
        }
    }

    /// The client connected (or reconnected).
    pub fn up(&self) {
        self.tx.send_if_modified(|s| {
            let changed = *s != State::Up;
            *s = State::Up;
            changed
        });
    }

    /// The client lost its connection.
    pub fn down(&self) {
        self.tx.send_if_modified(|s| match s {
            State::Up => {
                *s = State::Down(SystemTime::now());
                true
            }
            State::Down(_) => false,
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
        assert!(matches!(link.state(), State::Down(_)));
    }
}
