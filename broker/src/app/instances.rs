//! Who is alive: each live subscribe session keeps a record in the store,
//! refreshed by its replica every third of `instance_expiry` and removed
//! when the session ends; a replica that dies leaves its records to
//! expire. `ListInstances` reads them.

use std::time::Duration;

use handoff_proto::pb;
use tokio::task::JoinHandle;

use crate::{
    app::{
        auth::{self, Caller},
        now, Broker,
    },
    error::BrokerError,
    rules::{grants::Action, names},
};

/// What a session tells its record: deliveries it holds, and when it last
/// settled one.
pub type Probe = Box<dyn Fn() -> (u32, Option<prost_types::Timestamp>) + Send + Sync>;

/// The record of one live session, kept until [`Presence::end`].
pub struct Presence {
    broker: Broker,
    agent: String,
    session: String,
    refresh: JoinHandle<()>,
}

impl Presence {
    /// Starts keeping the record of a session of `instance` of `agent`.
    pub fn start(
        broker: &Broker,
        agent: &str,
        instance: &str,
        max_in_flight: usize,
        probe: Probe,
    ) -> Presence {
        let session = uuid::Uuid::now_v7().simple().to_string();
        let record = pb::Instance {
            agent: agent.to_string(),
            instance: instance.to_string(),
            replica: broker.config().replica_name.clone(),
            session: session.clone(),
            connected_since: Some(now()),
            max_in_flight: u32::try_from(max_in_flight).unwrap_or(u32::MAX),
            ..Default::default()
        };
        let expiry = broker.config().instance_expiry;
        let every = (expiry / 3).max(Duration::from_millis(300));
        let keeper = broker.clone();
        let refresh = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (in_flight, last_settled_at) = probe();
                let current = pb::Instance {
                    in_flight,
                    last_settled_at,
                    seen_at: Some(now()),
                    ..record.clone()
                };
                if let Err(e) = keeper.store().put_instance(&current, expiry).await {
                    tracing::debug!(error = %e, "live session's record not refreshed");
                }
            }
        });
        Presence {
            broker: broker.clone(),
            agent: agent.to_string(),
            session,
            refresh,
        }
    }

    /// The session ended: its record goes (a failure leaves it to expire).
    pub async fn end(self) {
        self.refresh.abort();
        let _ = self.refresh.await;
        let store = self.broker.store();
        if let Err(e) = store.remove_instance(&self.agent, &self.session).await {
            tracing::debug!(error = %e, "live session's record left to expire");
        }
    }
}

/// The live sessions of `req.agent` (every agent's when empty), by agent,
/// then by when they subscribed. Needs the `read` grant.
pub async fn list(
    broker: &Broker,
    caller: &Caller,
    req: pb::ListInstancesRequest,
) -> Result<pb::ListInstancesResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "").await?;
    if !req.agent.is_empty() {
        names::validate("agent", &req.agent)?;
    }
    let mut instances = broker.store().instances(&req.agent).await?;
    let since = |i: &pb::Instance| i.connected_since.map(|t| (t.seconds, t.nanos));
    instances.sort_by(|a, b| {
        (a.agent.as_str(), since(a), a.session.as_str()).cmp(&(
            b.agent.as_str(),
            since(b),
            b.session.as_str(),
        ))
    });
    Ok(pb::ListInstancesResponse { instances })
}
