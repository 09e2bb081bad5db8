//! Runs on JetStream.

use super::*;
use crate::store::Runs;

#[async_trait::async_trait]
impl Runs for JetStream {
    /// Reads a run and its revision.
    async fn run(&self, run_id: &str) -> Result<Option<(pb::Run, u64)>> {
        let entry = self
            .runs
            .entry(run_id)
            .await
            .map_err(|e| BrokerError::nats("reading the run", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let run = pb::Run::decode(e.value).map_err(|err| {
                    BrokerError::Internal(format!("stored run {run_id} does not decode: {err}"))
                })?;
                Ok(Some((run, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Creates a run; `Ok(false)` if one with that id exists.
    async fn create_run(&self, run: &pb::Run) -> Result<bool> {
        match self.runs.create(&run.id, run.encode_to_vec().into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("creating the run", e)),
        }
    }

    /// Writes a run if its revision is still `revision`; `Ok(false)` when
    /// another writer got there first.
    async fn update_run(&self, run: &pb::Run, revision: u64) -> Result<bool> {
        match self
            .runs
            .update(&run.id, run.encode_to_vec().into(), revision)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if lost_compare_and_set(&e) => Ok(false),
            Err(e) => Err(BrokerError::nats("updating the run", e)),
        }
    }

    /// Reads an agent spec.
    async fn purge_run(&self, run_id: &str, keep_events_from: u64) -> Result<()> {
        let state = self.js.get_stream_no_info(format!("KV_{STATE_BUCKET}"));
        let barriers = self.js.get_stream_no_info(format!("KV_{BARRIERS_BUCKET}"));
        let runs = self.js.get_stream_no_info(format!("KV_{RUNS_BUCKET}"));
        let (state, barriers, runs) = tokio::try_join!(state, barriers, runs)
            .map_err(|e| BrokerError::nats("opening the run's buckets", e))?;
        let failed = |e| BrokerError::nats("purging a run", e);
        let events = self
            .events
            .purge()
            .filter(format!("handoff.v1.events.{run_id}.>"))
            .sequence(keep_events_from);
        let branches = self
            .branches
            .purge()
            .filter(format!("handoff.v1.branches.{run_id}.>"));
        let state = state
            .purge()
            .filter(format!("$KV.{STATE_BUCKET}.{run_id}.>"));
        let barriers = barriers
            .purge()
            .filter(format!("$KV.{BARRIERS_BUCKET}.{run_id}.>"));
        // Its deadline, input and barrier timers, when they have not fired.
        let deadline = self
            .timers
            .purge()
            .filter(format!("handoff.v1.timers.run.{run_id}"));
        let input_timers = self
            .timers
            .purge()
            .filter(format!("handoff.v1.timers.run.{run_id}.>"));
        let barrier_timers = self
            .timers
            .purge()
            .filter(format!("handoff.v1.timers.barrier.{run_id}.>"));
        tokio::try_join!(
            events.into_future(),
            branches.into_future(),
            state.into_future(),
            barriers.into_future(),
            deadline.into_future(),
            input_timers.into_future(),
            barrier_timers.into_future(),
        )
        .map_err(failed)?;
        // The run record last: while it is there, the purge is not done.
        runs.purge()
            .filter(format!("$KV.{RUNS_BUCKET}.{run_id}"))
            .await
            .map_err(failed)?;
        Ok(())
    }
}
