//! Live permission checks of open streams: a watchdog re-checks the
//! caller's standing while the stream lives.

use super::*;

/// What an open stream must go on being allowed.
#[derive(Debug, Clone)]
pub enum Standing {
    /// Receive as this agent (a Subscribe stream).
    ReceiveAs(String),
    /// Read everything, or own this owner (a Watch stream; `None`: only
    /// `read` allows it).
    Watch(Option<String>),
}

impl Standing {
    /// Whether `caller` holds it, or the refusal.
    pub fn check(&self, caller: &Caller) -> Result<(), BrokerError> {
        match self {
            Standing::ReceiveAs(agent) if caller.may(Action::ReceiveAs, agent) => Ok(()),
            Standing::ReceiveAs(agent) => Err(not_granted(caller, Action::ReceiveAs, agent)),
            Standing::Watch(_) if caller.may(Action::Read, "") => Ok(()),
            Standing::Watch(Some(owner)) if caller.may(Action::Own, owner) => Ok(()),
            Standing::Watch(_) => Err(not_granted(caller, Action::Read, "")),
        }
    }
}

/// Why a live check ended a stream.
#[derive(Debug, Clone)]
pub(super) struct Ended {
    reason: Reason,
    message: String,
}

impl Ended {
    fn error(&self) -> BrokerError {
        BrokerError::denied(self.reason, self.message.clone(), Vec::new())
    }
}

/// The live check of one open stream: a task re-authenticates its
/// credentials and re-checks its standing whenever a token, principal or
/// the bootstrap token changes (on any replica) and every [`RECHECK`];
/// once they no longer hold, [`Live::ended`] resolves with the refusal and
/// [`Live::check`] refuses at once, from memory.
pub struct Live {
    state: LiveCheck,
    rx: Option<oneshot::Receiver<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Live {
    /// Starts the live check of a stream opened with `creds` (none
    /// without auth).
    pub fn start(broker: &Broker, creds: Credentials, standing: Standing) -> Live {
        let state = LiveCheck {
            ended: Arc::new(Mutex::new(None)),
            valid: Arc::new(AtomicBool::new(true)),
        };
        if !broker.auth().enabled {
            return Live {
                state,
                rx: None,
                task: None,
            };
        }
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(watchdog(broker.clone(), creds, standing, state.clone(), tx));
        Live {
            state,
            rx: Some(rx),
            task: Some(task),
        }
    }

    /// Refuses at once if the stream's credentials no longer hold (no
    /// store read: as the live check last found them).
    pub fn check(&self) -> Result<(), BrokerError> {
        self.state.check()
    }

    /// A cheap handle that answers [`Live::check`] from another task.
    pub fn checker(&self) -> LiveCheck {
        self.state.clone()
    }

    /// Resolves with the refusal once the credentials no longer hold
    /// (never, without auth).
    pub async fn ended(&mut self) -> BrokerError {
        match self.rx.as_mut() {
            Some(rx) => {
                let _ = rx.await;
                self.rx = None;
                self.state.refusal()
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// [`Live::check`], from another task.
#[derive(Clone)]
pub struct LiveCheck {
    ended: Arc<Mutex<Option<Ended>>>,
    valid: Arc<AtomicBool>,
}

impl LiveCheck {
    /// See [`Live::check`].
    pub fn check(&self) -> Result<(), BrokerError> {
        if self.valid.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(self.refusal())
    }

    /// Why the credentials no longer hold.
    fn refusal(&self) -> BrokerError {
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match ended {
            Some(e) => e.error(),
            None => BrokerError::denied(
                Reason::NotGranted,
                "the stream's credentials no longer allow it",
                Vec::new(),
            ),
        }
    }

    /// Records that the credentials no longer hold, and why.
    fn end(&self, e: &BrokerError) {
        if let Ok(mut slot) = self.ended.lock() {
            *slot = Some(Ended {
                reason: e.reason(),
                message: e.to_string(),
            });
        }
        self.valid.store(false, Ordering::SeqCst);
    }
}

pub(super) async fn watchdog(
    broker: Broker,
    creds: Credentials,
    standing: Standing,
    state: LiveCheck,
    tx: oneshot::Sender<()>,
) {
    let mut changes = broker.auth().changes.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                // No more change notices (the broker is going away): the
                // periodic check goes on.
                tokio::time::sleep(RECHECK).await;
            },
            _ = tokio::time::sleep(RECHECK) => {}
        }
        let refusal = match who(&broker, &creds).await {
            Ok(caller) => standing.check(&caller).err(),
            // A store that does not answer leaves the stream as it was:
            // the next check decides.
            Err(e) if e.class() == crate::error::Class::Unavailable => None,
            Err(e) => Some(e),
        };
        if let Some(e) = refusal {
            broker.metrics().denied(e.reason().as_str());
            tracing::info!(reason = %e.reason(), error = %e, "stream ended: its credentials no longer allow it");
            state.end(&e);
            let _ = tx.send(());
            return;
        }
    }
}
