//! [`Client`]: a cloneable handle to one broker.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};

use crate::{
    barrier::FanOut,
    contract::{ContractSpec, RegisteredContract},
    error::{Error, ErrorKind, Result},
    handoff::{Handoff, Receipt},
    pb::{self, handoff_broker_client::HandoffBrokerClient},
    subscription::{Subscription, TypedSubscription},
};

/// Options for connecting; finish with [`ConnectOptions::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    lazy: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(30)),
            lazy: false,
        }
    }
}

impl ConnectOptions {
    /// Defaults: 5 s to connect, 30 s per unary request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time allowed to establish the connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for each unary request (`None`: no limit). Streams
    /// (subscribe, watch) are not limited.
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Connect on first use instead of now.
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Connects to a broker at `addr` (`http://127.0.0.1:7233` or `127.0.0.1:7233`).
    pub async fn connect(self, addr: impl AsRef<str>) -> Result<Client> {
        let addr = addr.as_ref();
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{addr:?} is not a broker address: {e}"),
                )
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = if self.lazy {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.map_err(|e| {
                Error::new(
                    ErrorKind::Connect,
                    format!("cannot reach the broker at {uri}: {e}"),
                )
            })?
        };
        Ok(Client {
            inner: HandoffBrokerClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            request_timeout: self.request_timeout,
        })
    }
}

/// A handle to a broker. Cheap to clone; clones share one connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: HandoffBrokerClient<Channel>,
    request_timeout: Option<Duration>,
}

impl Client {
    /// Connects with default [`ConnectOptions`].
    pub async fn connect(addr: impl AsRef<str>) -> Result<Client> {
        ConnectOptions::new().connect(addr).await
    }

    /// The generated gRPC client, for anything the SDK does not wrap.
    pub fn raw(&self) -> HandoffBrokerClient<Channel> {
        self.inner.clone()
    }

    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = self.request_timeout {
            req.set_timeout(t);
        }
        req
    }

    /// Registers a contract version after the broker's compatibility
    /// check. Registering identical content again is a no-op
    /// ([`RegisteredContract::created`] is then false); a version that
    /// breaks the previous one under its compatibility mode is refused
    /// with FAILED_PRECONDITION, listing every problem.
    pub async fn register_contract(&self, spec: ContractSpec) -> Result<RegisteredContract> {
        let resp = self
            .raw()
            .register_contract(self.request(spec.into_request()))
            .await?
            .into_inner();
        let contract = resp.contract.ok_or_else(|| {
            Error::new(ErrorKind::Other, "the broker answered without the contract")
        })?;
        Ok(RegisteredContract {
            contract,
            created: resp.created,
        })
    }

    /// One version of a contract (`version` 0: the latest), with its
    /// descriptor set.
    pub async fn get_contract(&self, message_type: &str, version: u32) -> Result<pb::Contract> {
        self.raw()
            .get_contract(self.request(pb::GetContractRequest {
                message_type: message_type.to_string(),
                version,
            }))
            .await?
            .into_inner()
            .contract
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the contract"))
    }

    /// Every registered version of every contract (or of `message_type`
    /// only), without their descriptor sets.
    pub async fn list_contracts(&self, message_type: Option<&str>) -> Result<Vec<pb::Contract>> {
        Ok(self
            .raw()
            .list_contracts(self.request(pb::ListContractsRequest {
                message_type: message_type.unwrap_or_default().to_string(),
            }))
            .await?
            .into_inner()
            .contracts)
    }

    /// Declares (or updates) an agent; returns it with defaults filled in.
    pub async fn register_agent(&self, agent: AgentConfig) -> Result<pb::AgentSpec> {
        let resp = self
            .raw()
            .register_agent(self.request(pb::RegisterAgentRequest {
                agent: Some(agent.spec),
            }))
            .await?;
        resp.into_inner()
            .agent
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the agent"))
    }

    /// Every registered agent.
    pub async fn list_agents(&self) -> Result<Vec<pb::AgentSpec>> {
        Ok(self
            .raw()
            .list_agents(self.request(pb::ListAgentsRequest {}))
            .await?
            .into_inner()
            .agents)
    }

    /// Starts a run. Retrying with the same `RunConfig` (or a clone) after
    /// UNAVAILABLE answers the same run: its id is fixed when it is built.
    pub async fn start_run(&self, run: RunConfig) -> Result<pb::Run> {
        let resp = self.raw().start_run(self.request(run.req)).await?;
        resp.into_inner()
            .run
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the run"))
    }

    /// Hands off; accepted means durably stored.
    pub async fn handoff(&self, handoff: Handoff) -> Result<Receipt> {
        Ok(self
            .raw()
            .handoff(self.request(handoff.req))
            .await?
            .into_inner()
            .into())
    }

    /// Hands `payload` to `target` within `run_id`, from outside any agent
    /// (the run's owner); shorthand for [`Handoff::to`] and
    /// [`Client::handoff`]. Use the builder for an idempotency key,
    /// confidence or tool results.
    pub async fn handoff_to<M: prost::Message + prost::Name>(
        &self,
        run_id: &str,
        target: &str,
        payload: &M,
    ) -> Result<Receipt> {
        self.handoff(Handoff::to(run_id, target, payload)?).await
    }

    /// A fan-out of `items` to `worker_agent` within `run_id`, from outside
    /// any agent: one branch handoff per item, joined at a barrier. Name
    /// the agent that receives the joined results, and how they join, with
    /// [`FanOut::join`]; an item that does not encode is reported there.
    ///
    /// ```no_run
    /// # async fn demo(client: handoff_client::Client, run_id: &str) -> handoff_client::Result<()> {
    /// use handoff_client::JoinMode;
    /// use handoff_proto::demo::Subtask;
    /// let tasks = (0..3).map(|i| Subtask { index: i, of: 3, instruction: format!("part {i}"), ..Default::default() });
    /// let fanned = client.fan_out(run_id, "worker", tasks).join("aggregator", JoinMode::All).await?;
    /// println!("barrier {} waits for {} branches", fanned.barrier_id, fanned.branches.len());
    /// # Ok(()) }
    /// ```
    pub fn fan_out<M: prost::Message + prost::Name>(
        &self,
        run_id: impl Into<String>,
        worker_agent: impl Into<String>,
        items: impl IntoIterator<Item = M>,
    ) -> FanOut {
        FanOut::new(
            self.clone(),
            None,
            run_id.into(),
            worker_agent.into(),
            String::new(),
            items,
        )
    }

    pub(crate) async fn send_fan_out(&self, req: pb::FanOutRequest) -> Result<pb::FanOutResponse> {
        Ok(self.raw().fan_out(self.request(req)).await?.into_inner())
    }

    /// A barrier: its spec, state, the branches that reached it (without
    /// their payloads), the late ones and its release.
    pub async fn get_barrier(&self, run_id: &str, barrier_id: &str) -> Result<pb::Barrier> {
        self.raw()
            .get_barrier(self.request(pb::GetBarrierRequest {
                run_id: run_id.to_string(),
                barrier_id: barrier_id.to_string(),
            }))
            .await?
            .into_inner()
            .barrier
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the barrier"))
    }

    /// Subscribes as `instance` of `agent`, holding at most `max_in_flight`
    /// unsettled deliveries.
    pub async fn subscribe(
        &self,
        agent: &str,
        instance: &str,
        max_in_flight: u32,
    ) -> Result<Subscription> {
        Subscription::open(self.clone(), agent, instance, max_in_flight).await
    }

    /// Subscribes as `instance` of `agent` and decodes every payload as
    /// `T` (normally the contract the agent accepts). A delivery whose
    /// payload does not decode as `T` can never succeed, on this instance
    /// or another: it is rejected (which fails its run) with a reason
    /// naming `T` and the decode error, and surfaced as an error of kind
    /// [`ErrorKind::Decode`]; the subscription goes on. See
    /// [`TypedSubscription`].
    pub async fn subscribe_typed<T: prost::Message + prost::Name + Default>(
        &self,
        agent: &str,
        instance: &str,
        max_in_flight: u32,
    ) -> Result<TypedSubscription<T>> {
        Ok(self
            .subscribe(agent, instance, max_in_flight)
            .await?
            .typed())
    }

    /// Events matching `filter`, live (and from `from_sequence` if set).
    pub async fn watch(
        &self,
        filter: WatchFilter,
    ) -> Result<impl Stream<Item = Result<pb::Event>> + Send + Unpin + 'static> {
        let stream = self.raw().watch(filter.req).await?.into_inner();
        Ok(stream.map(|r| r.map_err(Error::from)))
    }

    /// A run with its timeline.
    pub async fn get_run(&self, run_id: &str) -> Result<pb::GetRunResponse> {
        Ok(self
            .raw()
            .get_run(self.request(pb::GetRunRequest {
                run_id: run_id.to_string(),
            }))
            .await?
            .into_inner())
    }

    /// Dead letters of `agent` (empty: all), oldest first.
    pub async fn dead_letters(&self, agent: &str, limit: u32) -> Result<Vec<pb::DeadLetter>> {
        Ok(self
            .raw()
            .list_dead_letters(self.request(pb::ListDeadLettersRequest {
                agent: agent.to_string(),
                limit,
            }))
            .await?
            .into_inner()
            .dead_letters)
    }
}

/// An agent to register: [`AgentConfig::new`] then the builder methods.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    spec: pb::AgentSpec,
}

impl AgentConfig {
    /// An agent named `name`, with the broker's default lease and attempts.
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            spec: pb::AgentSpec {
                name: name.into(),
                ..Default::default()
            },
        }
    }

    /// Time an instance has to settle a delivery.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.spec.lease = prost_types::Duration::try_from(lease).ok();
        self
    }

    /// Deliveries before fallback or dead letter.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.spec.max_attempts = attempts;
        self
    }

    /// Agent that receives handoffs this one could not finish.
    pub fn fallback(mut self, agent: impl Into<String>) -> Self {
        self.spec.fallback_agent = agent.into();
        self
    }

    /// Free text for operators.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.spec.description = text.into();
        self
    }

    /// Accepts contract `T`: every handoff to this agent must carry a `T`
    /// that passes the contract's rules. The contract must be registered
    /// first. Without it the agent takes payloads of any type, unchecked.
    pub fn accepts<T: prost::Name>(self) -> Self {
        self.accepts_type(T::full_name())
    }

    /// Accepts the contract with full name `message_type`; see
    /// [`AgentConfig::accepts`]. A version range set with
    /// [`AgentConfig::accepts_versions`] is kept.
    pub fn accepts_type(mut self, message_type: impl Into<String>) -> Self {
        self.spec
            .accepts
            .get_or_insert_with(Default::default)
            .message_type = message_type.into();
        self
    }

    /// Versions of the accepted contract this agent takes, inclusive;
    /// 0 leaves that end unbounded. Handoffs are checked against the
    /// highest registered version in the range. Use it together with
    /// [`AgentConfig::accepts`] (in either order).
    pub fn accepts_versions(mut self, min: u32, max: u32) -> Self {
        let accepts = self.spec.accepts.get_or_insert_with(Default::default);
        accepts.min_version = min;
        accepts.max_version = max;
        self
    }

    /// Declares that this agent may send contract `T`. A handoff whose
    /// payload is a registered contract is refused (PERMISSION_DENIED)
    /// unless its source agent declares it.
    pub fn emits<T: prost::Name>(self) -> Self {
        self.emits_type(T::full_name())
    }

    /// Declares that this agent may send the contract with full name
    /// `message_type`; see [`AgentConfig::emits`].
    pub fn emits_type(mut self, message_type: impl Into<String>) -> Self {
        let message_type = message_type.into();
        if !self.spec.emits.contains(&message_type) {
            self.spec.emits.push(message_type);
        }
        self
    }

    /// The spec as it will be sent.
    pub fn spec(&self) -> &pb::AgentSpec {
        &self.spec
    }
}

/// A run to start: [`RunConfig::new`] then the builder methods.
#[derive(Debug, Clone)]
pub struct RunConfig {
    req: pb::StartRunRequest,
}

impl RunConfig {
    /// A run owned by `owner` (told when it completes, fails or times out),
    /// with a fresh time-ordered id.
    pub fn new(owner: impl Into<String>) -> Self {
        RunConfig {
            req: pb::StartRunRequest {
                run_id: uuid::Uuid::now_v7().to_string(),
                owner: owner.into(),
                ..Default::default()
            },
        }
    }

    /// Fixes the run id (default: a fresh UUIDv7).
    pub fn id(mut self, run_id: impl Into<String>) -> Self {
        self.req.run_id = run_id.into();
        self
    }

    /// Time budget of the whole run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.req.timeout = prost_types::Duration::try_from(timeout).ok();
        self
    }

    /// Sequential hops allowed (default: the broker's, 5).
    pub fn max_depth(mut self, depth: u32) -> Self {
        self.req.max_depth = depth;
        self
    }

    /// The original ask, pinned to every delivery.
    pub fn ask(mut self, ask: impl Into<String>) -> Self {
        self.req.pinned.get_or_insert_with(Default::default).ask = ask.into();
        self
    }

    /// Another pinned field.
    pub fn pin(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.req
            .pinned
            .get_or_insert_with(Default::default)
            .fields
            .insert(key.into(), value.into());
        self
    }
}

/// Which events to watch: every filter set must match.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    req: pb::WatchRequest,
}

impl WatchFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Events of one run.
    pub fn run(mut self, run_id: impl Into<String>) -> Self {
        self.req.run_id = run_id.into();
        self
    }

    /// Events concerning one agent (as target or source).
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.req.agent = agent.into();
        self
    }

    /// Events of runs owned by `owner`.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.req.owner = owner.into();
        self
    }

    /// Only these kinds.
    pub fn kinds(mut self, kinds: impl IntoIterator<Item = pb::EventKind>) -> Self {
        self.req.kinds = kinds.into_iter().map(|k| k as i32).collect();
        self
    }

    /// Start at this stream sequence (resume after `sequence - 1`);
    /// default: only new events.
    pub fn from_sequence(mut self, sequence: u64) -> Self {
        self.req.from_sequence = sequence;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_proto::demo;

    #[test]
    fn agent_contracts() {
        let agent = AgentConfig::new("worker")
            .accepts_versions(2, 0)
            .accepts::<demo::Subtask>()
            .emits::<demo::WorkerResult>()
            .emits_type("handoff.demo.v1.Citation")
            .emits::<demo::WorkerResult>();
        let spec = agent.spec();
        assert_eq!(
            spec.accepts,
            Some(pb::ContractRef {
                message_type: "handoff.demo.v1.Subtask".to_string(),
                min_version: 2,
                max_version: 0,
            })
        );
        assert_eq!(
            spec.emits,
            vec![
                "handoff.demo.v1.WorkerResult".to_string(),
                "handoff.demo.v1.Citation".to_string()
            ]
        );
        assert_eq!(AgentConfig::new("any").spec().accepts, None);
    }
}
