//! One delivery and the ways to settle it.

use super::*;

/// One handoff leased to this instance. Settle it with exactly one of
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack),
/// [`reject`](Delivery::reject), one or more
/// [`handoff`](Delivery::handoff)s (complete-and-handoff), a
/// [`fan_out`](Delivery::fan_out), or on a barrier branch a branch result
/// ([`to_barrier`](Delivery::to_barrier),
/// [`skip_branch`](Delivery::skip_branch),
/// [`fail_branch`](Delivery::fail_branch));
/// [`extend`](Delivery::extend) while working longer than the lease.
/// Clones share their state: a handoff made through one clone is known to
/// the others.
#[derive(Clone)]
pub struct Delivery {
    inner: pb::Delivery,
    shared: Arc<Shared>,
    /// Handoffs already made from this delivery: (target, idempotency key)
    /// and the handoff's id.
    made: Arc<Mutex<Vec<Made>>>,
    /// Why a payload it carries by reference could not be fetched.
    pub(super) unresolved: Option<Arc<Error>>,
    /// Set to the reason when the delivery's run is cancelled.
    cancel: tokio::sync::watch::Receiver<Option<String>>,
    /// Its processing span (feature `otel`), ended with the last clone.
    span: Arc<SdkSpan>,
}

/// A handoff made from a delivery.
struct Made {
    /// The target agent; empty for a final handoff, [`TO_BARRIER`] for a
    /// branch result.
    target: String,
    idempotency_key: String,
    handoff_id: String,
}

/// The target of a branch result in [`Made`] (no agent name holds a NUL).
const TO_BARRIER: &str = "\u{0}barrier";

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("handoff_id", &self.handoff_id())
            .field("run_id", &self.run_id())
            .field("attempt", &self.inner.attempt)
            .finish()
    }
}

impl Delivery {
    pub(super) fn new(
        inner: pb::Delivery,
        shared: Arc<Shared>,
        cancel: tokio::sync::watch::Receiver<Option<String>>,
    ) -> Delivery {
        if !crate::state::intent_intact(&inner) {
            tracing::warn!(
                handoff_id = inner.handoff.as_ref().map_or("", |h| h.id.as_str()),
                "the delivery's pinned context does not match its intent digest"
            );
        }
        let span = Arc::new(SdkSpan::process(&shared.agent, &inner));
        Delivery {
            inner,
            shared,
            made: Arc::default(),
            unresolved: None,
            cancel,
            span,
        }
    }

    /// Why the delivery's run was cancelled (`CancelRun`), once it was;
    /// `None` while it runs.
    pub fn cancel_reason(&self) -> Option<String> {
        self.cancel.borrow().clone()
    }

    /// True once the delivery's run was cancelled: its work is no longer
    /// wanted, and handoffs made from it are refused `RUN_CLOSED`.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.borrow().is_some()
    }

    /// Resolves, with the reason, when the delivery's run is cancelled;
    /// never otherwise. Race the work against it and ack the delivery
    /// when it wins:
    ///
    /// ```no_run
    /// # async fn work() {}
    /// # async fn handle(delivery: handoff_client::Delivery) -> handoff_client::Result<()> {
    /// tokio::select! {
    ///     () = work() => { /* hand off the result */ }
    ///     reason = delivery.cancelled() => {
    ///         tracing::info!(%reason, "run cancelled; work dropped");
    ///         delivery.ack().await?;
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn cancelled(&self) -> String {
        let mut cancel = self.cancel.clone();
        let reason = match cancel.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The subscription ended: no cancel will come.
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// The opaque delivery id (what `consumes` names).
    pub fn id(&self) -> &str {
        &self.inner.delivery_id
    }

    /// The handoff's envelope.
    pub fn envelope(&self) -> &pb::HandoffEnvelope {
        static EMPTY: std::sync::OnceLock<pb::HandoffEnvelope> = std::sync::OnceLock::new();
        self.inner
            .handoff
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(pb::HandoffEnvelope::default))
    }

    /// The handoff's id (the same on every redelivery).
    pub fn handoff_id(&self) -> &str {
        &self.envelope().id
    }

    /// The run it belongs to.
    pub fn run_id(&self) -> &str {
        &self.envelope().run_id
    }

    /// 1 on the first delivery, 2 on the first redelivery...
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The run's pinned context, attached by the broker.
    pub fn pinned(&self) -> &pb::PinnedContext {
        static EMPTY: std::sync::OnceLock<pb::PinnedContext> = std::sync::OnceLock::new();
        self.inner
            .pinned
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(pb::PinnedContext::default))
    }

    /// BPE tokens the broker counted in the payload's string values (0
    /// when the payload was not checked against a contract).
    pub fn token_count(&self) -> u64 {
        self.envelope().token_count
    }

    /// The contract the payload was checked against and its version;
    /// `None` when the agent accepts any payload, unchecked.
    pub fn contract(&self) -> Option<(&str, u32)> {
        let envelope = self.envelope();
        if envelope.contract_type.is_empty() {
            None
        } else {
            Some((envelope.contract_type.as_str(), envelope.contract_version))
        }
    }

    /// The agent that handed this off; empty when it came from outside
    /// any agent (the run's owner).
    pub fn source_agent(&self) -> &str {
        &self.envelope().source_agent
    }

    /// The sender's confidence in [0, 1].
    pub fn confidence(&self) -> f64 {
        self.envelope().confidence
    }

    /// Sequential hops of the run up to this handoff (1 for the first).
    pub fn depth(&self) -> u32 {
        self.envelope().depth
    }

    /// The trace context the handoff was created in (W3C `traceparent`
    /// and `tracestate`, and any other propagation fields the sender set).
    /// With traces on, the broker stores its `send` span's context here;
    /// [`Delivery::handoff`] passes it on, so the next handoff continues
    /// the same trace. Empty when no one traced the handoff.
    pub fn trace_context(&self) -> &HashMap<String, String> {
        &self.envelope().trace_context
    }

    /// The W3C `traceparent` of [`trace_context`](Delivery::trace_context)
    /// (`00-<trace id>-<span id>-<flags>`), if any: the parent to give a
    /// span that processes this delivery.
    pub fn traceparent(&self) -> Option<&str> {
        field(self.trace_context(), TRACEPARENT)
    }

    /// When the lease ends unless extended.
    pub fn lease_deadline(&self) -> Option<SystemTime> {
        self.inner
            .lease_deadline
            .and_then(|t| SystemTime::try_from(t).ok())
    }

    /// The run state this handoff hands over (or only the keys the agent
    /// declared it reads, and the pinned ones); `None` when the run has no
    /// state.
    pub fn state(&self) -> Option<&pb::RunState> {
        self.inner.state.as_ref()
    }

    /// The run-state revision this delivery carries (0: no state).
    pub fn state_revision(&self) -> u64 {
        self.envelope().state_revision
    }

    /// One value of the run state this delivery carries.
    pub fn state_value(&self, key: &str) -> Option<&crate::state::Value> {
        self.inner.state.as_ref().and_then(|s| s.values.get(key))
    }

    /// A string value of the run state this delivery carries.
    pub fn state_str(&self, key: &str) -> Option<&str> {
        self.state_value(key).and_then(crate::state::as_str)
    }

    /// An empty delta based on the revision this delivery carries, for the
    /// handoffs made from it.
    pub fn state_delta(&self) -> crate::StateDelta {
        crate::StateDelta::based_on(self.state_revision())
    }

    /// Whether the pinned context and pinned state keys are what the broker
    /// attached (the intent digest matches). A subscription rejects a delivery
    /// whose digest does not match unless it trusts intent
    /// ([`crate::SubscribeOptions::trust_intent`]); then it logs a warning.
    pub fn intent_intact(&self) -> bool {
        crate::state::intent_intact(&self.inner)
    }

    /// The request this delivery carries when the agent is a run's judge:
    /// the run's pinned ask and its final result, to score.
    pub fn judge_request(&self) -> Option<pb::JudgeRequest> {
        if self.envelope().judge {
            self.payload().ok()
        } else {
            None
        }
    }

    /// The result a judge request asks about: inline, or fetched (and
    /// checked) when the run's result came by reference; `None` when this
    /// delivery is no judge request.
    ///
    /// # Errors
    ///
    /// Those of [`crate::Client::get_payload`].
    pub async fn judge_result(&self) -> Result<Option<prost_types::Any>> {
        let Some(request) = self.judge_request() else {
            return Ok(None);
        };
        match (request.result, request.result_ref) {
            (Some(result), _) => Ok(Some(result)),
            (None, Some(reference)) => self
                .shared
                .client
                .get_payload(self.run_id(), &reference, self.id())
                .await
                .map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Answers a judge request: `score` in [0, 1] (how well the result
    /// still answers the pinned ask) and why. The broker records it on the
    /// run and emits `intent_drift` under the run's threshold.
    pub async fn judge(&self, score: f64, reason: impl Into<String>) -> Result<Receipt> {
        let verdict = pb::JudgeVerdict {
            score,
            reason: reason.into(),
        };
        self.handoff(Handoff::final_result(self.run_id(), &verdict)?)
            .await
    }

    /// The raw delivery message.
    pub fn raw(&self) -> &pb::Delivery {
        &self.inner
    }

    /// The payload decoded as `M` (its type is checked). A payload the
    /// broker stores by reference was fetched and checked against its
    /// size and digest before the delivery was handed out, and decodes
    /// here as an inline one.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] when the payload is not an `M`; the error of
    /// the fetch (kind `NotFound` with reason `PAYLOAD_NOT_FOUND` for an
    /// expired payload, `Decode` for one that does not match its
    /// reference) when a payload by reference could not be fetched.
    pub fn payload<M: prost::Message + prost::Name + Default>(&self) -> Result<M> {
        if let Some(e) = &self.unresolved {
            return Err(e.as_ref().clone());
        }
        let any = self
            .envelope()
            .payload
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Decode, "the delivery has no payload"))?;
        decode(any)
    }

    /// The reference of the payload when the broker stores it by
    /// reference (it is over the broker's `max_inline_payload`); `None`
    /// for an inline payload. Hand it on with [`Handoff::forward`] (or
    /// [`forward_to`](Delivery::forward_to)) to pass the payload to the
    /// next agent without uploading it again.
    pub fn payload_ref(&self) -> Option<&pb::PayloadRef> {
        self.envelope().payload_ref.as_ref()
    }

    /// Complete-and-handoff of this delivery's payload, unchanged, to
    /// `target`: by reference when it came by reference (nothing is
    /// uploaded again), else inline.
    pub async fn forward_to(&self, target: &str) -> Result<Receipt> {
        let next = match (self.payload_ref(), &self.envelope().payload) {
            (Some(r), _) => Handoff::forward(self.run_id(), target, r),
            (None, Some(any)) => Handoff::from_request(pb::HandoffRequest {
                run_id: self.run_id().to_string(),
                target_agent: target.to_string(),
                payload: Some(any.clone()),
                ..Default::default()
            }),
            (None, None) => {
                return Err(Error::new(ErrorKind::Decode, "the delivery has no payload"))
            }
        };
        self.handoff(next).await
    }

    /// Done: the handoff will not be delivered again.
    ///
    /// An error of kind [`ErrorKind::Closed`], [`ErrorKind::Timeout`] or
    /// [`ErrorKind::Unavailable`] (the broker went away or did not answer)
    /// leaves the outcome unknown: the ack may have been applied before
    /// the answer was lost. Repeat it with [`Subscription::ack_id`] on a new
    /// subscription; if it was not applied and is not repeated, the
    /// handoff is delivered again when its lease ends.
    pub async fn ack(&self) -> Result<()> {
        self.shared.mark_finished(self.handoff_id());
        self.shared
            .send(pb::subscribe_request::Command::Ack(pb::Ack {
                delivery_id: self.id().to_string(),
            }))
            .await
            .map(|_| ())
    }

    /// Asks the run's owner a question and parks this delivery: it is
    /// acked (no lease is held while waiting) and the run is
    /// `WAITING_INPUT`. The answer (checked against `answer`'s contract
    /// when given) comes back to this agent as a new delivery whose
    /// envelope names the request (`input_request_id`). On `timeout`, the
    /// handoff's payload goes to `fallback_agent`, or the run fails.
    pub async fn await_input(
        &self,
        prompt: &str,
        answer: Option<pb::ContractRef>,
        timeout: Duration,
        fallback_agent: Option<&str>,
    ) -> Result<pb::InputRequest> {
        let req = pb::AwaitInputRequest {
            delivery_id: self.id().to_string(),
            prompt: prompt.to_string(),
            answer,
            timeout: prost_types::Duration::try_from(timeout).ok(),
            fallback_agent: fallback_agent.unwrap_or_default().to_string(),
        };
        let client = &self.shared.client;
        let resp = client.raw().await_input(client.request(req)).await?;
        self.shared.mark_finished(self.handoff_id());
        resp.into_inner()
            .request
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered without the request"))
    }

    /// Settles this delivery after its work failed with `err`, as its
    /// [`Error::disposition`] says: a terminal refusal rejects it with
    /// [`Error::summary`] (the run fails at once, naming the reason and its
    /// numbers; it is never retried); a retryable failure nacks it with
    /// [`retry_delay`] for this attempt; a conflict nacks it for at once.
    /// A failure that is not the broker's (a plain `Error` of the SDK
    /// without a reason) counts by its kind; a delivery no longer this
    /// instance's (superseded) is left alone; a refusal of this
    /// instance's own credentials is not the run's fault, and nacks.
    ///
    /// ```no_run
    /// # async fn work(d: &handoff_client::Delivery) -> handoff_client::Result<()> { Ok(()) }
    /// # async fn handle(delivery: handoff_client::Delivery) -> handoff_client::Result<()> {
    /// if let Err(err) = work(&delivery).await {
    ///     delivery.fail(&err).await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn fail(&self, err: &Error) -> Result<()> {
        if own_credentials(err) {
            tracing::error!(handoff_id = %self.handoff_id(), error = %err, "refused for this instance's credentials; the delivery goes back");
            return self.nack(Some(retry_delay(self.attempt()))).await;
        }
        match err.disposition() {
            crate::Disposition::Terminal => self.reject(err.summary()).await,
            crate::Disposition::Retryable => self.nack(Some(retry_delay(self.attempt()))).await,
            crate::Disposition::Conflict => self.nack(None).await,
            crate::Disposition::Superseded => Ok(()),
        }
    }

    /// Not now: redeliver after `delay` (or at once), to any instance.
    pub async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.shared
            .send(pb::subscribe_request::Command::Nack(pb::Nack {
                delivery_id: self.id().to_string(),
                delay: delay.and_then(|d| prost_types::Duration::try_from(d).ok()),
            }))
            .await
            .map(|_| ())
    }

    /// Terminal failure: the run fails and its owner is told.
    pub async fn reject(&self, reason: impl Into<String>) -> Result<()> {
        self.shared
            .send(pb::subscribe_request::Command::Reject(pb::Reject {
                delivery_id: self.id().to_string(),
                reason: reason.into(),
            }))
            .await?;
        self.shared.mark_finished(self.handoff_id());
        Ok(())
    }

    /// Still working: the lease restarts; returns the new deadline.
    pub async fn extend(&self) -> Result<Option<SystemTime>> {
        let settled = self
            .shared
            .send(pb::subscribe_request::Command::Extend(pb::Extend {
                delivery_id: self.id().to_string(),
            }))
            .await?;
        Ok(settled
            .lease_deadline
            .and_then(|t| SystemTime::try_from(t).ok()))
    }

    /// Complete-and-handoff: stores `next` (in this delivery's run, from
    /// this agent) and then acks this delivery. Repeating it after a crash
    /// yields the same handoff, recognised as a duplicate.
    ///
    /// One delivery may complete with several handoffs (a planner handing
    /// out subtasks): give each a distinct
    /// [`idempotency_key`](Handoff::idempotency_key), since handoffs from
    /// one delivery to one target with the same key are one handoff, and
    /// mark each [`fan_out`](Handoff::fan_out), then [`ack`](Delivery::ack)
    /// this delivery after the last one: a fan-out handoff does not settle
    /// the delivery, so an instance that stops half-way is redelivered its
    /// input, and the handoffs it repeats are recognised as the same ones.
    /// A second handoff with the same target and key as one already made
    /// from this delivery is refused here ([`ErrorKind::InvalidArgument`])
    /// rather than answered as a silent duplicate.
    ///
    /// The handoff continues this delivery's trace: unless `next` sets a
    /// `traceparent` of its own (through
    /// [`Handoff::trace_context`] or [`Handoff::traceparent`], say the
    /// context of the agent's own processing span), it carries this
    /// delivery's [`trace_context`](Delivery::trace_context).
    pub async fn handoff(&self, next: Handoff) -> Result<Receipt> {
        let mut req = next.req;
        if req.run_id.is_empty() {
            req.run_id = self.run_id().to_string();
        }
        self.continue_trace(&mut req.trace_context);
        if req.source_agent.is_empty() {
            req.source_agent = self.shared.agent.clone();
        }
        req.consumes = self.id().to_string();
        let target = if req.r#final {
            String::new()
        } else if req.to_barrier {
            TO_BARRIER.to_string()
        } else {
            req.target_agent.clone()
        };
        if let Some(made) = lock(&self.made)
            .iter()
            .find(|m| m.target == target && m.idempotency_key == req.idempotency_key)
        {
            let to = if target.is_empty() {
                "the run's final result".to_string()
            } else if target == TO_BARRIER {
                "its barrier".to_string()
            } else {
                format!("agent {target:?}")
            };
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "this delivery already handed off to {to} with idempotency key {:?} (handoff {}); \
                     give each handoff from one delivery a distinct idempotency key",
                    made.idempotency_key, made.handoff_id
                ),
            ));
        }
        let idempotency_key = req.idempotency_key.clone();
        let fan_out = req.fan_out;
        let receipt = self.shared.client.handoff(Handoff { req }).await?;
        if !fan_out {
            // Settled by the broker; a fan-out is settled by `ack`.
            self.shared.mark_finished(self.handoff_id());
        }
        let mut made = lock(&self.made);
        if !made.iter().any(|m| m.handoff_id == receipt.handoff_id) {
            made.push(Made {
                target,
                idempotency_key,
                handoff_id: receipt.handoff_id.clone(),
            });
        }
        Ok(receipt)
    }

    /// Complete-and-handoff of `payload` to `target`, in this delivery's
    /// run, from this agent: shorthand for
    /// `self.handoff(Handoff::to(self.run_id(), target, payload)?)`. Use
    /// [`Delivery::handoff`] with the builder for a confidence, tool
    /// results, an idempotency key or fan-out.
    pub async fn handoff_to<M: prost::Message + prost::Name>(
        &self,
        target: &str,
        payload: &M,
    ) -> Result<Receipt> {
        self.handoff(Handoff::to(self.run_id(), target, payload)?)
            .await
    }

    /// Fills `fields` (a new handoff's trace context) with this
    /// delivery's W3C fields (its processing span's, with the `otel`
    /// feature), unless it names a `traceparent` already.
    pub(crate) fn continue_trace(&self, fields: &mut HashMap<String, String>) {
        if field(fields, TRACEPARENT).is_some() || self.span.inject(fields) {
            return;
        }
        for key in [TRACEPARENT, TRACESTATE] {
            if let Some(value) = field(self.trace_context(), key) {
                fields.insert(key.to_string(), value.to_string());
            }
        }
    }

    // -------------------------------------------------------- barriers

    /// The barrier branch this delivery is on, `(barrier_id, branch_key)`:
    /// set on a branch handoff of a fan-out and carried along the
    /// branch's chain of agents; `None` outside any branch (and on a
    /// barrier's release).
    pub fn barrier_branch(&self) -> Option<(&str, &str)> {
        let e = self.envelope();
        if e.barrier_id.is_empty() || e.branch_key.is_empty() {
            None
        } else {
            Some((e.barrier_id.as_str(), e.branch_key.as_str()))
        }
    }

    /// A fan-out that consumes this delivery (a planner splitting its
    /// input): one branch handoff of each item to `worker_agent`, in this
    /// delivery's run, from this agent, joined at a barrier named by
    /// [`FanOut::join`]. The broker acks this delivery once every branch
    /// is stored, so do not settle it yourself; a planner that stops
    /// half-way is redelivered its input, and its repeated fan-out opens
    /// the same barrier and repeats the same branches (recognised as
    /// duplicates).
    pub fn fan_out<M: prost::Message + prost::Name>(
        &self,
        worker_agent: impl Into<String>,
        items: impl IntoIterator<Item = M>,
    ) -> FanOut {
        FanOut::new(
            self.shared.client.clone(),
            Some(self.clone()),
            self.run_id().to_string(),
            worker_agent.into(),
            self.shared.agent.clone(),
            items,
        )
    }

    /// Records the branch handoffs of a fan-out that consumed this
    /// delivery (the broker settled it): (idempotency key, handoff id).
    pub(crate) fn fanned_out(
        &self,
        worker: &str,
        made: impl IntoIterator<Item = (String, String)>,
    ) {
        self.shared.mark_finished(self.handoff_id());
        let mut list = lock(&self.made);
        for (idempotency_key, handoff_id) in made {
            if !list.iter().any(|m| m.handoff_id == handoff_id) {
                list.push(Made {
                    target: worker.to_string(),
                    idempotency_key,
                    handoff_id,
                });
            }
        }
    }

    /// Complete-and-handoff of this branch's `result` to its barrier
    /// (status ARRIVED): shorthand for
    /// `self.handoff(Handoff::to_barrier(run, barrier, key, result)?)` with
    /// this delivery's run, barrier and branch key. Repeating it after a
    /// crash yields the same branch result, recognised as a duplicate; a
    /// result that reaches the barrier after its release is recorded as
    /// late, never released again.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidArgument`] when this delivery is on no branch
    /// (see [`barrier_branch`](Delivery::barrier_branch)), else those of
    /// [`Delivery::handoff`].
    pub async fn to_barrier<M: prost::Message + prost::Name>(&self, result: &M) -> Result<Receipt> {
        let (barrier_id, key) = self.branch_or_error()?;
        self.handoff(Handoff::to_barrier(self.run_id(), barrier_id, key, result)?)
            .await
    }

    /// Reports this branch SKIPPED (nothing to do), with `reason` as its
    /// warning and payload (a `google.protobuf.StringValue`). A skipped
    /// branch counts toward an ALL barrier but not toward a quorum.
    pub async fn skip_branch(&self, reason: impl Into<String>) -> Result<Receipt> {
        self.branch_outcome(pb::BranchStatus::Skipped, reason.into())
            .await
    }

    /// Reports this branch FAILED, with `reason` as its warning and
    /// payload (a `google.protobuf.StringValue`): the run goes on, and the
    /// release lists the branch as failed with its reason (a fail-fast
    /// barrier releases a failure at once). Use it instead of
    /// [`reject`](Delivery::reject) when the failure is the branch's
    /// answer rather than a broken input.
    pub async fn fail_branch(&self, reason: impl Into<String>) -> Result<Receipt> {
        self.branch_outcome(pb::BranchStatus::Failed, reason.into())
            .await
    }

    async fn branch_outcome(&self, status: pb::BranchStatus, reason: String) -> Result<Receipt> {
        let (barrier_id, key) = self.branch_or_error()?;
        let handoff = Handoff::to_barrier(self.run_id(), barrier_id, key, &reason)?
            .branch_status(status)
            .warning(reason);
        self.handoff(handoff).await
    }

    fn branch_or_error(&self) -> Result<(&str, &str)> {
        self.barrier_branch().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "handoff {} is on no barrier branch; use Handoff::to_barrier with the barrier and key",
                    self.handoff_id()
                ),
            )
        })
    }

    /// The barrier release this delivery carries, if its payload is a
    /// `handoff.v1.BarrierRelease`; `None` for any other delivery (and for
    /// a release that does not decode: [`join`](Delivery::join) says why).
    pub fn release(&self) -> Option<pb::BarrierRelease> {
        let any = self.envelope().payload.as_ref()?;
        if type_name(&any.type_url) != <pb::BarrierRelease as prost::Name>::full_name() {
            return None;
        }
        <pb::BarrierRelease as prost::Message>::decode(any.value.as_slice()).ok()
    }

    /// The barrier release this delivery carries, with every arrived
    /// branch's result decoded as `T`, in branch-key order. Settle the
    /// delivery as any other (a final handoff, a handoff onwards, an ack).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] when the delivery is not a barrier release,
    /// or an arrived branch's result is not a `T` (the error names the
    /// branch key).
    pub fn join<T: prost::Message + prost::Name + Default>(&self) -> Result<Join<T>> {
        let release = self.payload::<pb::BarrierRelease>().map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "handoff {} is not a barrier release: {}",
                    self.handoff_id(),
                    e.message()
                ),
            )
        })?;
        Join::from_release(release)
    }

    /// Rejects this delivery without waiting for the broker's answer.
    /// Marks it finished once the broker confirms.
    pub(super) fn reject_in_background(&self, reason: String) {
        let delivery = self.clone();
        self.shared.runtime.spawn(async move {
            if let Err(e) = delivery.reject(reason).await {
                tracing::warn!(handoff_id = %delivery.handoff_id(), error = %e, "rejecting an undecodable delivery failed");
            }
        });
    }
}

/// Whether `err` refuses the caller's own credentials (not the run's
/// fault).
fn own_credentials(err: &Error) -> bool {
    err.code() == Some(tonic::Code::Unauthenticated) || err.reason() == Some("NOT_GRANTED")
}

/// How long a retryable failure of `attempt` waits before its next
/// attempt: 250 ms doubled per attempt, spread by a random factor in
/// [0.5, 1.5) so that instances failing together do not retry together,
/// and at most 30 s.
pub fn retry_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    base.mul_f64(0.5 + jitter()).min(Duration::from_secs(30))
}

/// A number in [0, 1), different on each call (not for cryptography).
fn jitter() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn retries_back_off_with_jitter() {
        for _ in 0..100 {
            let first = retry_delay(1);
            assert!(first >= Duration::from_millis(125) && first < Duration::from_millis(375));
            let fourth = retry_delay(4);
            assert!(fourth >= Duration::from_secs(1) && fourth < Duration::from_secs(3));
            assert!(retry_delay(40) <= Duration::from_secs(30));
        }
        let spread: std::collections::HashSet<Duration> = (0..20).map(|_| retry_delay(3)).collect();
        assert!(spread.len() > 1, "jittered");
    }
}
