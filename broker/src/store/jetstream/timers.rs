//! Timers on JetStream.

use super::*;
use crate::store::Timers;

#[async_trait::async_trait]
impl Timers for JetStream {
    async fn schedule(&self, timer: &pb::Timer, kind: TimerKind) -> Result<(), BrokerError> {
        let (run, barrier) = (&timer.run_id, &timer.barrier_id);
        let (subject, msg_id) = match kind {
            TimerKind::RunDeadline => (
                format!("handoff.v1.timers.run.{run}"),
                format!("deadline-{run}"),
            ),
            TimerKind::BarrierTimeout => (
                format!("handoff.v1.timers.barrier.{run}.{barrier}.timeout"),
                format!("barrier-timeout-{run}-{barrier}"),
            ),
            TimerKind::ReleaseCheck => (
                format!("handoff.v1.timers.barrier.{run}.{barrier}.release"),
                format!("barrier-release-{run}-{barrier}"),
            ),
            TimerKind::RunPurge => (
                format!("handoff.v1.timers.purge.{run}"),
                format!("purge-{run}"),
            ),
            // Under the run's timers, which the timer consumer fires.
            TimerKind::InputTimeout => (
                format!(
                    "handoff.v1.timers.run.{run}.input.{}",
                    timer.input_request_id
                ),
                format!(
                    "input-timeout-{run}-{}-{}",
                    timer.input_request_id, timer.sequence
                ),
            ),
            TimerKind::QueueWait => (
                format!("handoff.v1.timers.queue.{}.{}", timer.agent, timer.sequence),
                format!("queue-{}-{}", timer.agent, timer.sequence),
            ),
        };
        self.publish(subject, &msg_id, timer.encode_to_vec().into())
            .await
            .map(|_| ())
    }
}
