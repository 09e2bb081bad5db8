//! [`Client`]: a cloneable handle to one broker.

use std::{fmt, time::Duration};

use futures::{Stream, StreamExt};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    barrier::FanOut,
    contract::{ContractSpec, RegisteredContract},
    error::{Error, ErrorKind, Result},
    handoff::{Handoff, Receipt},
    otel::SdkSpan,
    pb::{self, handoff_broker_client::HandoffBrokerClient},
    subscription::{Subscription, TypedSubscription},
};

/// The generated gRPC client over the SDK's channel: every call it makes
/// carries the [`BearerToken`] of the [`ConnectOptions`] it came from.
pub type RawClient = HandoffBrokerClient<InterceptedService<Channel, BearerToken>>;

/// Options for connecting; finish with [`ConnectOptions::connect`].
///
/// Plaintext by default. [`tls`](ConnectOptions::tls) trusts a CA and
/// speaks TLS (the address may then be written `https://host:port` or bare
/// `host:port`); [`identity`](ConnectOptions::identity) adds a client
/// certificate (mTLS); [`token`](ConnectOptions::token) sends
/// `authorization: Bearer <token>` on every call, streams included.
///
/// ```no_run
/// # async fn demo() -> handoff_client::Result<()> {
/// # let (ca, cert, key) = (Vec::<u8>::new(), Vec::<u8>::new(), Vec::<u8>::new());
/// use handoff_client::ConnectOptions;
/// let client = ConnectOptions::new()
///     .tls(ca)
///     .identity(cert, key)
///     .token("hot_...")
///     .connect("https://broker.example:7233")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ConnectOptions {
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    lazy: bool,
    tls_ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
    token: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(30)),
            lazy: false,
            tls_ca: None,
            identity: None,
            domain_name: None,
            token: None,
        }
    }
}

impl fmt::Debug for ConnectOptions {
    // The client key and the token stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("lazy", &self.lazy)
            .field("tls_ca", &self.tls_ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ConnectOptions {
    /// Defaults: 5 s to connect, 30 s per unary request, plaintext, no token.
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

    /// Speak TLS and trust the broker's certificate if this CA (PEM) issued
    /// it. A bare `host:port` address then means `https://host:port`. An
    /// `https://` address without this option trusts the system's roots.
    pub fn tls(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(ca_pem.into());
        self
    }

    /// Present this client certificate chain and key (PEM) in the TLS
    /// handshake (mTLS); the broker names the caller from it. Implies TLS.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// The name to verify the broker's certificate against, when it is not
    /// the address's host (e.g. connecting by IP to a certificate for
    /// `broker.internal`). Implies TLS.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Send `authorization: Bearer <token>` on every call, including the
    /// `Subscribe` and `Watch` streams.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Connects to a broker at `addr` (`http://127.0.0.1:7233`,
    /// `https://broker:7233` or `host:port`).
    ///
    /// An address written `http://` with TLS options is refused with
    /// [`ErrorKind::InvalidArgument`] rather than sent in plaintext.
    pub async fn connect(self, addr: impl AsRef<str>) -> Result<Client> {
        let addr = addr.as_ref();
        let wants_tls =
            self.tls_ca.is_some() || self.identity.is_some() || self.domain_name.is_some();
        let uri = if addr.contains("://") {
            addr.to_string()
        } else if wants_tls {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let https = uri.starts_with("https://");
        if wants_tls && !https {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{addr:?} is a plaintext address but TLS options are set: write https://"),
            ));
        }
        let token = BearerToken::new(self.token.as_deref())?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
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
        if https {
            let mut tls = ClientTlsConfig::new().timeout(self.connect_timeout);
            tls = match self.tls_ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = self.domain_name {
                tls = tls.domain_name(name);
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("TLS options: {}", error_chain(&e)),
                )
            })?;
        }
        let channel = if self.lazy {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.map_err(|e| {
                Error::new(
                    ErrorKind::Connect,
                    format!("cannot reach the broker at {uri}: {}", error_chain(&e)),
                )
            })?
        };
        Ok(Client {
            inner: HandoffBrokerClient::new(InterceptedService::new(channel, token))
                .max_decoding_message_size(crate::payload::MAX_MESSAGE)
                .max_encoding_message_size(crate::payload::MAX_MESSAGE),
            request_timeout: self.request_timeout,
        })
    }
}

/// An error with its sources, on one line (tonic's transport errors say
/// little on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The interceptor that puts `authorization: Bearer <token>` on every
/// request of a [`Client`] (none if no token was given). Its `Debug`
/// does not show the token.
#[derive(Clone, Default)]
pub struct BearerToken {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    fn new(token: Option<&str>) -> Result<BearerToken> {
        let header = match token {
            None => None,
            Some(token) => {
                let mut value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        Error::new(
                            ErrorKind::InvalidArgument,
                            "the token holds characters a gRPC header cannot carry",
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(BearerToken { header })
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("set", &self.header.is_some())
            .finish()
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// A handle to a broker. Cheap to clone; clones share one connection (and
/// its TLS session and token).
#[derive(Clone, Debug)]
pub struct Client {
    inner: RawClient,
    request_timeout: Option<Duration>,
}

impl Client {
    /// Connects with default [`ConnectOptions`].
    pub async fn connect(addr: impl AsRef<str>) -> Result<Client> {
        ConnectOptions::new().connect(addr).await
    }

    /// The generated gRPC client, for anything the SDK does not wrap (its
    /// calls carry the token too).
    pub fn raw(&self) -> RawClient {
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

    /// Changes the compatibility mode a contract's next versions are
    /// checked under (`mode`: NONE, BACKWARD, FORWARD or FULL), giving the
    /// `reason` recorded with the change. The mode is set by version 1 and
    /// fixed otherwise: registering a later version under another mode is
    /// refused with `COMPATIBILITY_MODE_FIXED`. Needs the `admin` grant;
    /// the change is published as a `contract_mode_changed` event on run
    /// `_`. Setting the mode the contract already has changes nothing
    /// (`changed` is then false). The answer's contract is the latest
    /// version (without descriptors), its `compatibility` the new mode.
    pub async fn set_compatibility(
        &self,
        message_type: &str,
        mode: pb::Compatibility,
        reason: &str,
    ) -> Result<pb::SetCompatibilityResponse> {
        Ok(self
            .raw()
            .set_compatibility(self.request(pb::SetCompatibilityRequest {
                message_type: message_type.to_string(),
                compatibility: mode as i32,
                reason: reason.to_string(),
            }))
            .await?
            .into_inner())
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

    /// What every registered agent is doing now: its live instances on
    /// every replica, its handoffs pending and in flight, how long the
    /// oldest pending one has waited, and whether work waits with no live
    /// instance to take it (`unattended`). Needs the `read` grant.
    pub async fn agent_status(&self) -> Result<Vec<pb::AgentStatus>> {
        Ok(self
            .raw()
            .list_agents(self.request(pb::ListAgentsRequest {}))
            .await?
            .into_inner()
            .status)
    }

    /// The live instances (Subscribe sessions) of `agent`, or of every
    /// agent with `None`, on every replica of the broker: by agent, then by
    /// when they subscribed. A replica that died leaves its instances
    /// listed until `instance_expiry` after their last refresh. Needs the
    /// `read` grant.
    pub async fn list_instances(&self, agent: Option<&str>) -> Result<Vec<pb::Instance>> {
        let req = pb::ListInstancesRequest {
            agent: agent.unwrap_or_default().to_string(),
        };
        Ok(self
            .raw()
            .list_instances(self.request(req))
            .await?
            .into_inner()
            .instances)
    }

    /// Starts a run. Retrying with the same `RunConfig` (or a clone) after
    /// UNAVAILABLE answers the same run: its id is fixed when it is built.
    pub async fn start_run(&self, run: RunConfig) -> Result<pb::Run> {
        let resp = self.raw().start_run(self.request(run.req)).await?;
        resp.into_inner()
            .run
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the run"))
    }

    /// Hands off; accepted means durably stored. With the `otel` feature,
    /// the call is a CLIENT span (`handoff <target>`) the handoff's trace
    /// continues.
    pub async fn handoff(&self, handoff: Handoff) -> Result<Receipt> {
        let mut req = handoff.req;
        let name = if req.r#final {
            "handoff (final)".to_string()
        } else if req.to_barrier {
            format!("handoff barrier {}", req.barrier_id)
        } else {
            format!("handoff {}", req.target_agent)
        };
        let span = SdkSpan::call(name, &req.run_id.clone(), &mut req.trace_context);
        let answered = match self.raw().handoff(self.request(req)).await {
            Ok(r) => Ok(r.into_inner().into()),
            Err(status) => Err(status.into()),
        };
        span.end(&answered);
        answered
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

    pub(crate) async fn send_fan_out(
        &self,
        mut req: pb::FanOutRequest,
    ) -> Result<pb::FanOutResponse> {
        // With the `otel` feature, a span of the call: every branch, and
        // the barrier's release, continue it.
        let (run_id, barrier_id) = req
            .barrier
            .as_ref()
            .map(|b| (b.run_id.clone(), b.barrier_id.clone()))
            .unwrap_or_default();
        let mut fields = req
            .branches
            .first()
            .map(|b| b.trace_context.clone())
            .unwrap_or_default();
        let before = fields.clone();
        let span = SdkSpan::call(format!("fan-out {barrier_id}"), &run_id, &mut fields);
        if fields != before {
            // The span's W3C fields, each branch's other fields kept.
            let w3c: Vec<(String, String)> =
                fields.into_iter().filter(|(k, _)| is_w3c(k)).collect();
            let targets = req
                .branches
                .iter_mut()
                .map(|b| &mut b.trace_context)
                .chain(req.barrier.as_mut().map(|s| &mut s.trace_context));
            for map in targets {
                map.retain(|k, _| !is_w3c(k));
                map.extend(w3c.iter().cloned());
            }
        }
        let answered = match self.raw().fan_out(self.request(req)).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(status.into()),
        };
        span.end(&answered);
        answered
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
        Subscription::open(
            self.clone(),
            agent,
            instance,
            crate::SubscribeOptions::new(max_in_flight),
        )
        .await
    }

    /// Subscribes as `instance` of `agent` with `options` (for example
    /// [`crate::SubscribeOptions::trust_intent`]).
    ///
    /// # Errors
    ///
    /// As [`Client::subscribe`].
    pub async fn subscribe_with(
        &self,
        agent: &str,
        instance: &str,
        options: crate::SubscribeOptions,
    ) -> Result<Subscription> {
        Subscription::open(self.clone(), agent, instance, options).await
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

    /// A run's state at `revision` (0: the latest), with the handoff that
    /// made that revision (callers with `read`, or the run's owner).
    pub async fn get_state(&self, run_id: &str, revision: u64) -> Result<pb::GetStateResponse> {
        let req = pb::GetStateRequest {
            run_id: run_id.to_string(),
            revision,
            delivery_id: String::new(),
        };
        Ok(self.raw().get_state(self.request(req)).await?.into_inner())
    }

    /// The latest state of the run `delivery` belongs to, read as the agent
    /// that holds it (no `read` grant needed): after a `STATE_CONFLICT`,
    /// say.
    pub async fn get_state_for(&self, delivery: &crate::Delivery) -> Result<pb::GetStateResponse> {
        let req = pb::GetStateRequest {
            run_id: delivery.run_id().to_string(),
            revision: 0,
            delivery_id: delivery.id().to_string(),
        };
        Ok(self.raw().get_state(self.request(req)).await?.into_inner())
    }

    /// One page of runs matching `req`'s filters, newest first: the
    /// runs the caller may read (every run with `read`, else those of the
    /// owners it has `own` on). Pass the answer's `next_page_token` back
    /// as `page_token` for the next page; it is empty on the last.
    pub async fn list_runs(&self, req: pb::ListRunsRequest) -> Result<pb::ListRunsResponse> {
        Ok(self.raw().list_runs(self.request(req)).await?.into_inner())
    }

    /// A handoff by id: its envelope (while the inbox keeps it), its run,
    /// where its delivery stands and every event about it. `run_id` may
    /// be empty: the broker finds the run. Needs what reading the run
    /// needs.
    pub async fn get_handoff(
        &self,
        handoff_id: &str,
        run_id: &str,
    ) -> Result<pb::GetHandoffResponse> {
        let req = pb::GetHandoffRequest {
            handoff_id: handoff_id.to_string(),
            run_id: run_id.to_string(),
        };
        Ok(self
            .raw()
            .get_handoff(self.request(req))
            .await?
            .into_inner())
    }

    /// Hands dead letter `sequence` (from [`Client::dead_letters`]) again,
    /// to its agent or to `to_agent`, once: a failed run whose failure was
    /// that letter goes back to running. A second redrive is
    /// `ALREADY_SETTLED`. Needs `own` on the run's owner.
    pub async fn redrive_dead_letter(
        &self,
        sequence: u64,
        to_agent: Option<&str>,
    ) -> Result<pb::RedriveDeadLetterResponse> {
        let req = pb::RedriveDeadLetterRequest {
            sequence,
            to_agent: to_agent.unwrap_or_default().to_string(),
        };
        Ok(self
            .raw()
            .redrive_dead_letter(self.request(req))
            .await?
            .into_inner())
    }

    /// Starts a new run from revision `at_revision` of run `run_id`'s
    /// state (0: without state), with `first` as its first handoff (its
    /// run id is filled in). The new run has the parent's owner, pinned
    /// context, pipeline, depth cap and judge, and names its parent; the
    /// parent is left as it is. Needs `own` on the parent's owner.
    ///
    /// `new_run_id` names the new run (default: generated); forking again
    /// with the same one answers the run made the first time, so a fork
    /// may be retried.
    pub async fn fork_run(
        &self,
        run_id: &str,
        at_revision: u64,
        new_run_id: Option<&str>,
        first: Handoff,
    ) -> Result<pb::ForkRunResponse> {
        let req = pb::ForkRunRequest {
            run_id: run_id.to_string(),
            at_revision,
            new_run_id: new_run_id.unwrap_or_default().to_string(),
            handoff: Some(first.req),
            ..Default::default()
        };
        Ok(self.raw().fork_run(self.request(req)).await?.into_inner())
    }

    /// Answers input request `request_id` of run `run_id` (asked with
    /// [`crate::Delivery::await_input`]): the answer, checked against the
    /// request's contract, goes to the agent that asked. Needs `own` on
    /// the run's owner.
    pub async fn provide_input<M: prost::Message + prost::Name>(
        &self,
        run_id: &str,
        request_id: &str,
        answer: &M,
    ) -> Result<pb::ProvideInputResponse> {
        let answer = prost_types::Any::from_msg(answer)
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let req = pb::ProvideInputRequest {
            run_id: run_id.to_string(),
            request_id: request_id.to_string(),
            answer: Some(answer),
        };
        Ok(self
            .raw()
            .provide_input(self.request(req))
            .await?
            .into_inner())
    }

    /// Cancels a running run (needs `own` on its owner): it ends
    /// CANCELLED with `reason` as its failure, its pending handoffs are
    /// never delivered, and the instances holding its deliveries are told
    /// (see [`crate::Delivery::cancelled`]). A run that already ended is
    /// `RUN_CLOSED`.
    pub async fn cancel_run(&self, run_id: &str, reason: &str) -> Result<pb::Run> {
        let resp = self
            .raw()
            .cancel_run(self.request(pb::CancelRunRequest {
                run_id: run_id.to_string(),
                reason: reason.to_string(),
            }))
            .await?;
        resp.into_inner()
            .run
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the run"))
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

    /// How long a handoff may wait for an instance to take it: past that
    /// it goes to the fallback agent, else to the dead letter (and its run
    /// fails, its owner told), even if no instance ever connects.
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.spec.max_queue_wait = prost_types::Duration::try_from(wait).ok();
        self
    }

    /// Agent that receives handoffs this one could not finish.
    pub fn fallback(mut self, agent: impl Into<String>) -> Self {
        self.spec.fallback_agent = agent.into();
        self
    }

    /// Run-state keys this agent reads: its deliveries carry only these
    /// (and the pinned ones). Default: the whole state.
    pub fn reads(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.spec.reads.extend(keys.into_iter().map(Into::into));
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

    /// Time budget of the whole run (default: the broker's
    /// `default_run_timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.req.timeout = prost_types::Duration::try_from(timeout).ok();
        self.req.no_timeout = false;
        self
    }

    /// No deadline at all. Without it (or [`RunConfig::timeout`]) the run
    /// ends timed out at the broker's `default_run_timeout`.
    pub fn no_timeout(mut self) -> Self {
        self.req.timeout = None;
        self.req.no_timeout = true;
        self
    }

    /// Sequential hops allowed (default: the broker's, 5).
    pub fn max_depth(mut self, depth: u32) -> Self {
        self.req.max_depth = depth;
        self
    }

    /// The pipeline the run belongs to (a label for its metrics).
    pub fn pipeline(mut self, pipeline: impl Into<String>) -> Self {
        self.req.pipeline = pipeline.into();
        self
    }

    /// An initial value of the run state.
    pub fn state(mut self, key: impl Into<String>, value: impl Into<crate::state::Value>) -> Self {
        self.req
            .state
            .get_or_insert_with(Default::default)
            .values
            .insert(key.into(), value.into());
        self
    }

    /// An initial value of the run state that no delta may change or
    /// remove.
    pub fn pin_state(self, key: impl Into<String>, value: impl Into<crate::state::Value>) -> Self {
        let key = key.into();
        let mut this = self.state(key.clone(), value);
        this.req
            .state
            .get_or_insert_with(Default::default)
            .pinned_keys
            .push(key);
        this
    }

    /// How a run-state key combines with what deltas write to it (default:
    /// replace).
    pub fn policy(mut self, key: impl Into<String>, policy: pb::MergePolicy) -> Self {
        self.req
            .state
            .get_or_insert_with(Default::default)
            .policies
            .insert(key.into(), policy as i32);
        self
    }

    /// A judge agent asked, when the run completes, to score the result
    /// against the pinned ask; a score under `threshold` emits
    /// `intent_drift`.
    pub fn judge(mut self, agent: impl Into<String>, threshold: f64) -> Self {
        self.req.judge = Some(pb::JudgeSpec {
            agent: agent.into(),
            threshold,
        });
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

#[cfg(test)]
mod transport_tests {
    use super::*;

    fn authorization(token: &BearerToken) -> Option<String> {
        let mut token = token.clone();
        let request = match token.call(tonic::Request::new(())) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    #[test]
    fn the_token_goes_with_every_request_as_a_bearer() {
        let token = BearerToken::new(Some("hot_abc\n")).expect("valid token");
        assert_eq!(authorization(&token).as_deref(), Some("Bearer hot_abc"));
        assert_eq!(authorization(&BearerToken::default()), None);
        assert!(!format!("{token:?}").contains("hot_abc"));
        let err = BearerToken::new(Some("bad\u{7}token")).expect_err("control character");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let opts = ConnectOptions::new()
            .token("hot_secret")
            .identity("CERT", "PRIVATE KEY");
        let text = format!("{opts:?}");
        assert!(
            !text.contains("hot_secret") && !text.contains("PRIVATE KEY"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn tls_options_refuse_a_plaintext_address() {
        let err = ConnectOptions::new()
            .tls("CA")
            .lazy(true)
            .connect("http://127.0.0.1:1")
            .await
            .expect_err("plaintext with TLS options");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
}

/// Whether `key` names a W3C trace-context field.
fn is_w3c(key: &str) -> bool {
    key.eq_ignore_ascii_case(crate::handoff::TRACEPARENT)
        || key.eq_ignore_ascii_case(crate::handoff::TRACESTATE)
}
