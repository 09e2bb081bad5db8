//! Signal 3's judge: when a run with a judge completes, its judge agent
//! receives a `JudgeRequest` (the pinned ask and the final result) as an
//! ordinary delivery (handed over by [`runs`](super::runs) when it
//! announces the end), and answers with a final handoff that consumes it
//! and carries a `JudgeVerdict`; this module records the verdict. The score is recorded on the run (`GetRun`),
//! published as `intent_scored`, and as `intent_drift` under the threshold.
//!
//! The request is the one handoff a completed run still delivers; the
//! verdict is the one handoff a completed run still accepts, and only from
//! the delivery of its request.

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{deliveries, now, Broker},
    error::BrokerError,
    rules::{contracts::type_of_url, handoff::pipeline_of},
};

/// The message type of a judge's answer.
const VERDICT: &str = "handoff.v1.JudgeVerdict";

/// Records a judge's verdict: `req` is a final handoff consuming the
/// delivery of `parent`, a judge request of `run`.
pub async fn record(
    broker: &Broker,
    run: &pb::Run,
    req: &pb::HandoffRequest,
    token: &pb::DeliveryToken,
    id: String,
) -> Result<pb::HandoffResponse, BrokerError> {
    let payload = req.payload.as_ref();
    let verdict = payload
        .filter(|p| type_of_url(&p.type_url) == VERDICT)
        .and_then(|p| pb::JudgeVerdict::decode(p.value.as_slice()).ok())
        .ok_or_else(|| {
            BrokerError::malformed(
                "payload",
                format!("a judge answers its request with a final handoff carrying a {VERDICT}"),
            )
        })?;
    if !req.r#final {
        return Err(BrokerError::malformed(
            "final",
            "a judge answers its request with a final handoff",
        ));
    }
    if !(0.0..=1.0).contains(&verdict.score) {
        return Err(BrokerError::malformed(
            "payload",
            format!("the judge's score {} is outside [0, 1]", verdict.score),
        ));
    }
    // Only the run's judge answers (not a fallback its request went to).
    let judge = run
        .judge
        .as_ref()
        .map(|j| j.agent.as_str())
        .unwrap_or_default();
    if token.agent != judge {
        return Err(BrokerError::malformed(
            "consumes",
            format!(
                "only run {:?}'s judge {judge:?} scores it; this delivery went to {:?}",
                run.id, token.agent
            ),
        ));
    }
    let threshold = run.judge.as_ref().map_or(0.0, |j| j.threshold);
    let mut duplicate = false;
    let recorded = loop {
        let (mut current, revision) = broker.run(&run.id).await?;
        if let Some(first) = current.intent {
            duplicate = true;
            break first;
        }
        let score = pb::IntentScore {
            score: verdict.score,
            reason: verdict.reason.clone(),
            judge_agent: token.agent.clone(),
            at: Some(now()),
            drift: verdict.score < threshold,
        };
        current.intent = Some(score.clone());
        if broker.store().update_run(&current, revision).await? {
            broker.forget_run(&current.id);
            broker.metrics().intent_score(pipeline_of(run), score.score);
            if score.drift {
                broker.metrics().intent_drift(pipeline_of(run));
            }
            break score;
        }
    };
    // The events tell what was recorded: a repeated verdict changes
    // nothing, whatever its score.
    let event = |kind: pb::EventKind| pb::Event {
        kind: kind as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: recorded.judge_agent.clone(),
        handoff_id: id.clone(),
        reason: recorded.reason.clone(),
        intent_score: recorded.score,
        pipeline: run.pipeline.clone(),
        ..Default::default()
    };
    broker
        .emit(
            event(pb::EventKind::IntentScored),
            &format!("scored-{}", run.id),
        )
        .await?;
    if recorded.drift {
        broker
            .emit(
                event(pb::EventKind::IntentDrift),
                &format!("drift-{}", run.id),
            )
            .await?;
    }
    deliveries::ack_consumed(broker, run, token).await;
    Ok(pb::HandoffResponse {
        handoff_id: id,
        sequence: 0,
        duplicate,
        depth: 0,
        ..Default::default()
    })
}
