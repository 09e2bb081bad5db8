//! The gRPC edge: `handoff.v1.HandoffBroker`.
//!
//! Each handler opens a span (with `run_id`, `handoff_id` and `agent` where
//! the request names them), hands the request to its use case in
//! [`crate::app`], and maps a [`BrokerError`] to a status in one place
//! ([`status::to_status`]). The streaming RPCs adapt a use case's stream
//! or channel ([`subscribe`], [`watch`]). No decision is made here.

pub mod credentials;
pub mod payload;
pub mod status;
pub mod subscribe;
pub mod watch;

use std::future::Future;

use futures::stream::BoxStream;
use handoff_proto::{pb, server::handoff_broker_server::HandoffBroker};
use tonic::{metadata::MetadataMap, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    app::{
        self,
        auth::{self, Caller},
        Broker,
    },
    error::BrokerError,
    trace::{self, SendSpan, Traces},
};

/// The gRPC service.
pub struct Service {
    broker: Broker,
    /// Spans of handoffs, when `otlp_endpoint` is set.
    traces: Option<Traces>,
}

impl Service {
    /// A service over a broker.
    pub fn new(broker: Broker) -> Service {
        Service {
            broker,
            traces: None,
        }
    }

    /// A service over a broker that makes a `send` span of every handoff
    /// (see [`crate::trace`]).
    pub fn with_traces(broker: Broker, traces: Option<Traces>) -> Service {
        Service { broker, traces }
    }
}

type Reply<T> = Result<Response<T>, Status>;

impl Service {
    /// Who makes the call, from its bearer token or client certificate
    /// (UNAUTHENTICATED when auth is configured and neither proves it).
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.authenticate(&credentials::of(req)).await
    }

    /// Who presents `creds` (see [`Service::caller`]).
    async fn authenticate(&self, creds: &auth::Credentials) -> Result<Caller, Status> {
        self.broker
            .bounded(auth::authenticate(&self.broker, creds))
            .await
            .map_err(status::to_status)
    }

    /// Runs a unary use case in `span` (abandoned with UNAVAILABLE when
    /// NATS stays unreachable for `nats_timeout`), and answers its result
    /// or its status.
    async fn unary<T>(
        &self,
        span: tracing::Span,
        call: impl Future<Output = Result<T, BrokerError>>,
    ) -> Reply<T> {
        match self.broker.bounded(call).instrument(span.clone()).await {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                span.in_scope(|| tracing::debug!(reason = %e.reason(), error = %e, "refused"));
                Err(status::to_status(e))
            }
        }
    }
}

/// The span of one RPC; fields a request does not name stay empty.
macro_rules! rpc_span {
    ($name:literal $(, $($rest:tt)+)?) => {
        tracing::info_span!(
            $name,
            run_id = tracing::field::Empty,
            handoff_id = tracing::field::Empty,
            agent = tracing::field::Empty,
            $($($rest)+)?
        )
    };
}

#[tonic::async_trait]
impl HandoffBroker for Service {
    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Reply<pb::RegisterAgentResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("RegisterAgent");
        span.record(
            "agent",
            req.agent.as_ref().map(|a| a.name.as_str()).unwrap_or(""),
        );
        self.unary(span, app::agents::register(&self.broker, &caller, req))
            .await
    }

    async fn register_contract(
        &self,
        req: Request<pb::RegisterContractRequest>,
    ) -> Reply<pb::RegisterContractResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!(
            "RegisterContract",
            message_type = %req.message_type,
            version = req.version
        );
        self.unary(span, app::contracts::register(&self.broker, &caller, req))
            .await
    }

    async fn get_contract(
        &self,
        req: Request<pb::GetContractRequest>,
    ) -> Reply<pb::GetContractResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("GetContract", message_type = %req.message_type);
        self.unary(span, app::contracts::get(&self.broker, &caller, req))
            .await
    }

    async fn list_contracts(
        &self,
        req: Request<pb::ListContractsRequest>,
    ) -> Reply<pb::ListContractsResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("ListContracts");
        let call = app::contracts::list(&self.broker, &caller, req.into_inner());
        self.unary(span, call).await
    }

    async fn set_compatibility(
        &self,
        req: Request<pb::SetCompatibilityRequest>,
    ) -> Reply<pb::SetCompatibilityResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("SetCompatibility", message_type = %req.message_type);
        self.unary(
            span,
            app::contracts::set_compatibility(&self.broker, &caller, req),
        )
        .await
    }

    async fn open_barrier(
        &self,
        req: Request<pb::OpenBarrierRequest>,
    ) -> Reply<pb::OpenBarrierResponse> {
        let caller = self.caller(&req).await?;
        let (metadata, _, mut req) = req.into_parts();
        if let Some(spec) = req.barrier.as_mut() {
            // Its release continues this call's trace.
            spec.trace_context = trace::opening_context(&spec.trace_context, &metadata);
        }
        let span = rpc_span!("OpenBarrier");
        if let Some(b) = &req.barrier {
            span.record("run_id", b.run_id.as_str());
            span.record("agent", b.target_agent.as_str());
        }
        self.unary(span, app::barriers::open(&self.broker, &caller, req))
            .await
    }

    async fn fan_out(&self, req: Request<pb::FanOutRequest>) -> Reply<pb::FanOutResponse> {
        let caller = self.caller(&req).await?;
        let (metadata, _, mut req) = req.into_parts();
        // Its release continues the trace of this call: the spec's own
        // context, else the first branch's (what the SDKs copy from the
        // delivery the branches consume), else the call's header.
        let first = req
            .branches
            .first()
            .map(|b| b.trace_context.clone())
            .unwrap_or_default();
        if let Some(spec) = req.barrier.as_mut() {
            let own = trace::opening_context(&spec.trace_context, &MetadataMap::new());
            spec.trace_context = if own.is_empty() {
                trace::opening_context(&first, &metadata)
            } else {
                own
            };
        }
        let span = rpc_span!("FanOut");
        if let Some(b) = &req.barrier {
            span.record("run_id", b.run_id.as_str());
            span.record("agent", b.target_agent.as_str());
        }
        let run_id = req.barrier.as_ref().map(|b| b.run_id.clone());
        let sends: Vec<SendSpan> = match &self.traces {
            Some(traces) => req
                .branches
                .iter_mut()
                .map(|b| {
                    // The branch is tagged with the barrier's run and id
                    // by the use case; name them in the span already.
                    let mut named = b.clone();
                    if let (true, Some(run)) = (named.run_id.is_empty(), &run_id) {
                        named.run_id = run.clone();
                    }
                    if let (true, Some(spec)) = (named.barrier_id.is_empty(), &req.barrier) {
                        named.barrier_id = spec.barrier_id.clone();
                    }
                    let send = traces.send(&mut named, &metadata);
                    b.trace_context = named.trace_context;
                    send
                })
                .collect(),
            None => Vec::new(),
        };
        let answered = self
            .unary(span, app::fan_out::fan_out(&self.broker, &caller, req))
            .await;
        for (i, send) in sends.into_iter().enumerate() {
            match &answered {
                Ok(r) => match r.get_ref().branches.get(i) {
                    Some(b) => send.end(Ok(b)),
                    None => drop(send),
                },
                Err(status) => send.end(Err(status)),
            }
        }
        answered
    }

    async fn get_barrier(
        &self,
        req: Request<pb::GetBarrierRequest>,
    ) -> Reply<pb::GetBarrierResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("GetBarrier");
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::barriers::get(&self.broker, &caller, req))
            .await
    }

    async fn get_state(&self, req: Request<pb::GetStateRequest>) -> Reply<pb::GetStateResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("GetState");
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::state::get(&self.broker, &caller, req))
            .await
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Reply<pb::ListAgentsResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("ListAgents");
        self.unary(span, app::agents::list(&self.broker, &caller))
            .await
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Reply<pb::ListInstancesResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("ListInstances");
        span.record("agent", req.agent.as_str());
        self.unary(span, app::instances::list(&self.broker, &caller, req))
            .await
    }

    async fn start_run(&self, req: Request<pb::StartRunRequest>) -> Reply<pb::StartRunResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("StartRun", owner = %req.owner);
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::runs::start(&self.broker, &caller, req))
            .await
    }

    async fn list_runs(&self, req: Request<pb::ListRunsRequest>) -> Reply<pb::ListRunsResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("ListRuns", owner = %req.owner);
        span.record("agent", req.agent.as_str());
        self.unary(span, app::runs::list(&self.broker, &caller, req))
            .await
    }

    async fn get_handoff(
        &self,
        req: Request<pb::GetHandoffRequest>,
    ) -> Reply<pb::GetHandoffResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("GetHandoff");
        span.record("run_id", req.run_id.as_str());
        span.record("handoff_id", req.handoff_id.as_str());
        self.unary(span, app::inspect::get_handoff(&self.broker, &caller, req))
            .await
    }

    async fn redrive_dead_letter(
        &self,
        req: Request<pb::RedriveDeadLetterRequest>,
    ) -> Reply<pb::RedriveDeadLetterResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("RedriveDeadLetter", sequence = req.sequence);
        span.record("agent", req.to_agent.as_str());
        self.unary(span, app::redrive::redrive(&self.broker, &caller, req))
            .await
    }

    async fn fork_run(&self, req: Request<pb::ForkRunRequest>) -> Reply<pb::ForkRunResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("ForkRun", at_revision = req.at_revision);
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::fork::fork(&self.broker, &caller, req))
            .await
    }

    async fn await_input(
        &self,
        req: Request<pb::AwaitInputRequest>,
    ) -> Reply<pb::AwaitInputResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("AwaitInput");
        self.unary(span, app::input::await_input(&self.broker, &caller, req))
            .await
    }

    async fn provide_input(
        &self,
        req: Request<pb::ProvideInputRequest>,
    ) -> Reply<pb::ProvideInputResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("ProvideInput", request_id = %req.request_id);
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::input::provide_input(&self.broker, &caller, req))
            .await
    }

    async fn cancel_run(&self, req: Request<pb::CancelRunRequest>) -> Reply<pb::CancelRunResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("CancelRun");
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::runs::cancel(&self.broker, &caller, req))
            .await
    }

    async fn handoff(&self, req: Request<pb::HandoffRequest>) -> Reply<pb::HandoffResponse> {
        let started = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        let (metadata, _, mut req) = req.into_parts();
        let span = rpc_span!(
            "Handoff",
            source = %req.source_agent,
            trace_id = tracing::field::Empty
        );
        span.record("run_id", req.run_id.as_str());
        span.record("agent", req.target_agent.as_str());
        // The send span stores its own context in the request's
        // trace_context, so the envelope carries it to the target.
        let send = self.traces.as_ref().map(|t| t.send(&mut req, &metadata));
        if let Some(send) = &send {
            span.record("trace_id", send.trace_id().as_str());
        }
        // Labelled only once accepted: a refused call's target may be any
        // string.
        let target = crate::metrics::target_label(&req.target_agent, req.r#final, req.to_barrier)
            .to_string();
        let accepted = self
            .unary(
                span.clone(),
                app::handoff::accept(&self.broker, &caller, req),
            )
            .await;
        if let Ok(r) = &accepted {
            span.record("handoff_id", r.get_ref().handoff_id.as_str());
            self.broker
                .metrics()
                .handoff_call(&target, started.elapsed());
        }
        if let Some(send) = send {
            send.end(accepted.as_ref().map(Response::get_ref));
        }
        accepted
    }

    type SubscribeStream = BoxStream<'static, Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Reply<Self::SubscribeStream> {
        let creds = credentials::of(&req);
        let caller = self.authenticate(&creds).await?;
        subscribe::subscribe(&self.broker, &caller, creds, req.into_inner()).await
    }

    type GetPayloadStream = BoxStream<'static, Result<pb::PayloadChunk, Status>>;

    async fn get_payload(
        &self,
        req: Request<pb::GetPayloadRequest>,
    ) -> Reply<Self::GetPayloadStream> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("GetPayload", name = %req.name);
        span.record("run_id", req.run_id.as_str());
        payload::get_payload(&self.broker, &caller, req)
            .instrument(span)
            .await
    }

    type WatchStream = BoxStream<'static, Result<pb::Event, Status>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let creds = credentials::of(&req);
        let caller = self.authenticate(&creds).await?;
        watch::watch(&self.broker, &caller, creds, req.into_inner()).await
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Reply<pb::GetRunResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("GetRun");
        span.record("run_id", req.run_id.as_str());
        self.unary(span, app::runs::get(&self.broker, &caller, req))
            .await
    }

    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Reply<pb::ListDeadLettersResponse> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let span = rpc_span!("ListDeadLetters");
        span.record("agent", req.agent.as_str());
        self.unary(span, app::events::dead_letters(&self.broker, &caller, req))
            .await
    }

    async fn put_principal(
        &self,
        req: Request<pb::PutPrincipalRequest>,
    ) -> Reply<pb::PutPrincipalResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("PutPrincipal", principal = %caller.principal);
        self.unary(
            span,
            auth::put_principal(&self.broker, &caller, req.into_inner()),
        )
        .await
    }

    async fn list_principals(
        &self,
        req: Request<pb::ListPrincipalsRequest>,
    ) -> Reply<pb::ListPrincipalsResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("ListPrincipals", principal = %caller.principal);
        self.unary(span, auth::list_principals(&self.broker, &caller))
            .await
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Reply<pb::CreateTokenResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("CreateToken", principal = %caller.principal);
        self.unary(
            span,
            auth::create_token(&self.broker, &caller, req.into_inner()),
        )
        .await
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Reply<pb::ListTokensResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("ListTokens", principal = %caller.principal);
        self.unary(span, auth::list_tokens(&self.broker, &caller))
            .await
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Reply<pb::RevokeTokenResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("RevokeToken", principal = %caller.principal);
        self.unary(
            span,
            auth::revoke_token(&self.broker, &caller, req.into_inner()),
        )
        .await
    }

    async fn rotate_signing_key(
        &self,
        req: Request<pb::RotateSigningKeyRequest>,
    ) -> Reply<pb::RotateSigningKeyResponse> {
        let caller = self.caller(&req).await?;
        let span = rpc_span!("RotateSigningKey", principal = %caller.principal);
        self.unary(span, auth::rotate_signing_key(&self.broker, &caller))
            .await
    }
}
