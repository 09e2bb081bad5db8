//! The gRPC edge: `handoff.v1.HandoffBroker`, one file per RPC.
//!
//! Each handler opens a span, turns the request into a domain call and maps
//! the `BrokerError` to a `Status` in one place (`From<BrokerError>`).
//! Streaming responses are fed by a spawned task through a channel.

pub mod agents;
pub mod barriers;
pub mod contracts;
pub mod handoff;
pub mod runs;
pub mod subscribe;
pub mod watch;

use handoff_proto::pb::{self, handoff_broker_server::HandoffBroker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::broker::Broker;

/// The gRPC service.
pub struct Service {
    broker: Broker,
}

impl Service {
    /// A service over a broker.
    pub fn new(broker: Broker) -> Service {
        Service { broker }
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl HandoffBroker for Service {
    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Reply<pb::RegisterAgentResponse> {
        let req = req.into_inner();
        let span = tracing::info_span!(
            "RegisterAgent",
            agent = req.agent.as_ref().map(|a| a.name.as_str()).unwrap_or("")
        );
        Ok(Response::new(
            agents::register(&self.broker, req).instrument(span).await?,
        ))
    }

    async fn register_contract(
        &self,
        req: Request<pb::RegisterContractRequest>,
    ) -> Reply<pb::RegisterContractResponse> {
        let req = req.into_inner();
        let span = tracing::info_span!("RegisterContract", message_type = %req.message_type, version = req.version);
        Ok(Response::new(
            contracts::register(&self.broker, req)
                .instrument(span)
                .await?,
        ))
    }

    async fn get_contract(
        &self,
        req: Request<pb::GetContractRequest>,
    ) -> Reply<pb::GetContractResponse> {
        Ok(Response::new(
            contracts::get(&self.broker, req.into_inner()).await?,
        ))
    }

    async fn list_contracts(
        &self,
        req: Request<pb::ListContractsRequest>,
    ) -> Reply<pb::ListContractsResponse> {
        Ok(Response::new(
            contracts::list(&self.broker, req.into_inner()).await?,
        ))
    }

    async fn open_barrier(
        &self,
        req: Request<pb::OpenBarrierRequest>,
    ) -> Reply<pb::OpenBarrierResponse> {
        Ok(Response::new(
            barriers::open(&self.broker, req.into_inner()).await?,
        ))
    }

    async fn fan_out(&self, req: Request<pb::FanOutRequest>) -> Reply<pb::FanOutResponse> {
        Ok(Response::new(
            barriers::fan_out(&self.broker, req.into_inner()).await?,
        ))
    }

    async fn get_barrier(
        &self,
        req: Request<pb::GetBarrierRequest>,
    ) -> Reply<pb::GetBarrierResponse> {
        Ok(Response::new(
            barriers::get(&self.broker, req.into_inner()).await?,
        ))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Reply<pb::ListAgentsResponse> {
        Ok(Response::new(agents::list(&self.broker).await?))
    }

    async fn start_run(&self, req: Request<pb::StartRunRequest>) -> Reply<pb::StartRunResponse> {
        let req = req.into_inner();
        let span = tracing::info_span!("StartRun", run_id = %req.run_id, owner = %req.owner);
        Ok(Response::new(
            runs::start(&self.broker, req).instrument(span).await?,
        ))
    }

    async fn handoff(&self, req: Request<pb::HandoffRequest>) -> Reply<pb::HandoffResponse> {
        let req = req.into_inner();
        let span = tracing::info_span!("Handoff", run_id = %req.run_id, source = %req.source_agent, target = %req.target_agent);
        Ok(Response::new(
            handoff::handoff(&self.broker, req).instrument(span).await?,
        ))
    }

    type SubscribeStream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Reply<Self::SubscribeStream> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let (agent, instance, max_in_flight) = subscribe::open(&self.broker, first).await?;
        let (tx, rx) = mpsc::channel(max_in_flight + 16);
        tokio::spawn(subscribe::run(
            self.broker.clone(),
            agent,
            instance,
            max_in_flight,
            inbound,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let req = req.into_inner();
        let messages = watch::open(&self.broker, &req).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch::run(self.broker.clone(), req, messages, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Reply<pb::GetRunResponse> {
        Ok(Response::new(
            runs::get(&self.broker, req.into_inner()).await?,
        ))
    }

    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Reply<pb::ListDeadLettersResponse> {
        Ok(Response::new(
            watch::dead_letters(&self.broker, req.into_inner()).await?,
        ))
    }
}
