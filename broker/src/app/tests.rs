//! The use cases against the in-memory store: ids and dedupe, the order of
//! writes a crash or a failed step leaves behind, the guards, barriers and
//! settlements. The same behaviour against a real `nats-server` is in the
//! integration tests.

use std::sync::Arc;

use handoff_proto::pb;
use tokio::sync::watch;

use super::{access, auth::Caller, barriers, deliveries, fan_out, handoff, runs, Broker};
use crate::{
    config::Config,
    error::{BrokerError, Reason},
    store::{
        memory::{Memory, Standing},
        Barriers, ClaimKey, Claims, Events, Inboxes, Registry, Runs,
    },
};

struct Fixture {
    store: Arc<Memory>,
    broker: Broker,
    _drain: watch::Sender<bool>,
}

fn fixture() -> Fixture {
    fixture_with(Config::default())
}

fn fixture_with(config: Config) -> Fixture {
    let store = Arc::new(Memory::new());
    let (drain, rx) = watch::channel(false);
    let broker = Broker::new(config, store.clone(), rx);
    Fixture {
        store,
        broker,
        _drain: drain,
    }
}

impl Fixture {
    /// A replica that stores a complete-and-handoff and dies before it
    /// acks the consumed delivery.
    fn crashing_before_the_ack(&self) -> Broker {
        self.replica(Config {
            faults: crate::config::Faults {
                skip_consume_ack: true,
                ..Default::default()
            },
            ..Config::default()
        })
    }

    /// Another broker replica over the same store.
    fn replica(&self, config: Config) -> Broker {
        Broker::new(config, self.store.clone(), self._drain.subscribe())
    }

    async fn agents(&self, names: &[&str]) {
        for name in names {
            let req = pb::RegisterAgentRequest {
                agent: Some(pb::AgentSpec {
                    name: name.to_string(),
                    ..Default::default()
                }),
            };
            super::agents::register(&self.broker, &Caller::local(), req)
                .await
                .expect("register");
        }
    }

    async fn run(&self, max_depth: u32) -> String {
        let req = pb::StartRunRequest {
            owner: "owner".into(),
            max_depth,
            ..Default::default()
        };
        runs::start(&self.broker, &Caller::local(), req)
            .await
            .expect("start")
            .run
            .expect("run")
            .id
    }

    /// Hands `agent` a task in `run` and returns its delivery.
    async fn task_for(&self, run: &str, agent: &str) -> pb::Delivery {
        handoff::accept(&self.broker, &Caller::local(), to(run, agent))
            .await
            .expect("task");
        self.deliver(agent).await
    }

    /// Offers the next pending handoff of `agent` and returns its delivery.
    async fn deliver(&self, agent: &str) -> pb::Delivery {
        use futures::StreamExt;
        let spec = self.broker.agent(agent).await.expect("agent");
        let mut offers = self
            .store
            .pull(agent, 1, std::time::Duration::ZERO)
            .await
            .expect("pull");
        let offered = offers.next().await.expect("a pending handoff").expect("ok");
        match deliveries::offer(&self.broker, &spec, "i1", offered).await {
            deliveries::Offering::Deliver(d, _) => *d,
            deliveries::Offering::Skip => panic!("offer skipped"),
        }
    }
}

fn payload(text: &str) -> prost_types::Any {
    prost_types::Any {
        type_url: "type.googleapis.com/demo.Text".into(),
        value: text.as_bytes().to_vec(),
    }
}

fn to(run: &str, target: &str) -> pb::HandoffRequest {
    pb::HandoffRequest {
        run_id: run.into(),
        target_agent: target.into(),
        payload: Some(payload("work")),
        ..Default::default()
    }
}

fn consuming(run: &str, source: &str, target: &str, d: &pb::Delivery) -> pb::HandoffRequest {
    pb::HandoffRequest {
        source_agent: source.into(),
        consumes: d.delivery_id.clone(),
        ..to(run, target)
    }
}

/// The final handoff of `run` by `source`, consuming delivery `d`.
fn final_consuming(run: &str, source: &str, d: &pb::Delivery) -> pb::HandoffRequest {
    pb::HandoffRequest {
        r#final: true,
        ..consuming(run, source, "", d)
    }
}

fn reason(r: Result<pb::HandoffResponse, BrokerError>) -> Reason {
    r.expect_err("refused").reason()
}

#[tokio::test]
async fn a_retried_handoff_is_stored_once() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let req = pb::HandoffRequest {
        idempotency_key: "task-1".into(),
        ..to(&run, "worker")
    };
    let first = handoff::accept(&f.broker, &Caller::local(), req.clone())
        .await
        .expect("first");
    let again = handoff::accept(&f.broker, &Caller::local(), req)
        .await
        .expect("retry");
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(first.handoff_id, again.handoff_id);
    assert_eq!(f.store.inbox("worker").len(), 1);
    assert_eq!(
        f.store.events(&run, pb::EventKind::HandoffAccepted).len(),
        1
    );
}

#[tokio::test]
async fn a_redo_after_a_crash_between_store_and_ack_is_the_same_handoff() {
    let f = fixture();
    f.agents(&["planner", "worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    // A broker that stores the handoff and dies before acking its input.
    let crashing = f.crashing_before_the_ack();
    let first = handoff::accept(
        &crashing,
        &Caller::local(),
        consuming(&run, "planner", "worker", &d),
    )
    .await
    .expect("stored");
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Leased));
    // The input comes back (its lease expired) and the agent redoes it.
    f.store
        .settle(
            &access::decode(&f.broker, &d.delivery_id)
                .await
                .expect("token")
                .ack_subject,
            crate::store::Settlement::Nack(None),
        )
        .await
        .expect("expire");
    let redelivered = f.deliver("planner").await;
    assert_eq!(redelivered.attempt, 2);
    let redo = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &redelivered),
    )
    .await
    .expect("redo");
    assert!(redo.duplicate);
    assert_eq!(redo.handoff_id, first.handoff_id);
    assert_eq!(f.store.inbox("worker").len(), 1, "downstream sees it once");
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Acked));
}

#[tokio::test]
async fn an_event_lost_after_the_store_is_repaired_by_the_retry() {
    let f = fixture();
    f.agents(&["planner", "worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    f.store.fail("publish_event", 1);
    let failed = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &d),
    )
    .await;
    assert_eq!(reason(failed), Reason::NatsUnavailable);
    assert_eq!(f.store.inbox("worker").len(), 1, "stored before the event");
    assert!(
        f.store.events(&run, pb::EventKind::HandoffAccepted).len() == 1,
        "only the planner's task was announced"
    );
    let retry = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &d),
    )
    .await
    .expect("retry");
    assert!(retry.duplicate);
    assert_eq!(f.store.inbox("worker").len(), 1);
    assert_eq!(
        f.store.events(&run, pb::EventKind::HandoffAccepted).len(),
        2
    );
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Acked));
}

#[tokio::test]
async fn a_failed_store_leaves_no_claim() {
    let f = fixture();
    f.agents(&["planner", "worker", "critic"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    let consumed = ClaimKey::consumed(&d.handoff.as_ref().expect("handoff").id);
    f.store.fail("put_handoff", 1);
    let failed = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &d),
    )
    .await;
    assert_eq!(reason(failed), Reason::NatsUnavailable);
    assert!(f.store.claimed(&consumed).is_none(), "claim withdrawn");
    // The agent may now hand the same input to another target.
    handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "critic", &d),
    )
    .await
    .expect("another target");
    assert_eq!(f.store.inbox("critic").len(), 1);
    assert!(f.store.inbox("worker").is_empty());
}

#[tokio::test]
async fn one_delivery_goes_to_one_target() {
    let f = fixture();
    f.agents(&["planner", "worker", "critic"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    // A fan-out handoff leaves the delivery unsettled; a single handoff to
    // another target from it is role confusion.
    handoff::accept(
        &f.broker,
        &Caller::local(),
        pb::HandoffRequest {
            fan_out: true,
            idempotency_key: "w".into(),
            ..consuming(&run, "planner", "worker", &d)
        },
    )
    .await
    .expect("first");
    let second = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "critic", &d),
    )
    .await;
    assert_eq!(reason(second), Reason::RoleConfusion);
    assert!(f.store.inbox("critic").is_empty(), "nothing stored");
    assert_eq!(
        f.store.events(&run, pb::EventKind::ContractRejected).len(),
        1
    );
    // A single handoff settles the delivery: another target is still
    // told that cause (and nothing is published for it).
    let e = f.task_for(&run, "planner").await;
    handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &e),
    )
    .await
    .expect("single");
    let after = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "critic", &e),
    )
    .await;
    assert_eq!(reason(after), Reason::RoleConfusion);
    assert!(f.store.inbox("critic").is_empty(), "nothing stored");
    assert_eq!(
        f.store.events(&run, pb::EventKind::ContractRejected).len(),
        1
    );
}

#[tokio::test]
async fn depth_cap_and_closed_runs_refuse_before_storing() {
    let f = fixture();
    f.agents(&["a", "b"]).await;
    let run = f.run(1).await;
    handoff::accept(&f.broker, &Caller::local(), to(&run, "a"))
        .await
        .expect("depth 1");
    let d = f.deliver("a").await;
    let deep = handoff::accept(&f.broker, &Caller::local(), consuming(&run, "a", "b", &d)).await;
    assert_eq!(reason(deep), Reason::DepthCap);
    assert!(f.store.inbox("b").is_empty());
    let done = final_consuming(&run, "a", &d);
    handoff::accept(&f.broker, &Caller::local(), done)
        .await
        .expect("final");
    let after = handoff::accept(&f.broker, &Caller::local(), to(&run, "b")).await;
    assert_eq!(reason(after), Reason::RunClosed);
    assert_eq!(f.store.events(&run, pb::EventKind::RunCompleted).len(), 1);
}

#[tokio::test]
async fn an_ended_run_is_purged_retention_after_its_end_with_its_event_first() {
    use crate::store::TimerKind;
    let f = fixture();
    f.agents(&["a"]).await;
    let run = f.run(5).await;
    let open = f.run(5).await;
    let d = f.task_for(&run, "a").await;
    // Not ended: a purge leaves it alone.
    runs::purge(&f.broker, &run).await.expect("purge");
    assert!(f.store.run(&run).await.expect("read").is_some());
    let done = final_consuming(&run, "a", &d);
    handoff::accept(&f.broker, &Caller::local(), done)
        .await
        .expect("final");
    let (ended, _) = f.store.run(&run).await.expect("read").expect("the run");
    let purges: Vec<pb::Timer> = f
        .store
        .timers(&run)
        .into_iter()
        .filter(|(_, kind)| *kind == TimerKind::RunPurge)
        .map(|(t, _)| t)
        .collect();
    assert_eq!(purges.len(), 1, "one purge scheduled");
    let due = std::time::SystemTime::try_from(purges[0].due.expect("due")).expect("a time");
    let end = std::time::SystemTime::try_from(ended.ended_at.expect("ended")).expect("a time");
    assert_eq!(due, end + f.broker.config().retention);

    runs::purge(&f.broker, &run).await.expect("purge");
    runs::purge(&f.broker, &run)
        .await
        .expect("a purge repeated");
    assert!(f.store.run(&run).await.expect("read").is_none());
    let left = f.store.run_events(&run).await.expect("events");
    let kinds: Vec<i32> = left.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![pb::EventKind::RunPurged as i32],
        "only run_purged"
    );
    assert!(f
        .store
        .timers(&run)
        .iter()
        .all(|(_, kind)| *kind == TimerKind::RunPurge));
    // Another run is untouched.
    assert!(f.store.run(&open).await.expect("read").is_some());
    assert!(!f.store.run_events(&open).await.expect("events").is_empty());
}

/// Barrier `join` of `run`, of `branches` branches, released to
/// `aggregator`.
fn join(run: &str, branches: u32) -> pb::BarrierSpec {
    pb::BarrierSpec {
        run_id: run.to_string(),
        barrier_id: "join".into(),
        branch_count: branches,
        target_agent: "aggregator".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_fan_out_releases_once_to_its_target() {
    let f = fixture();
    f.agents(&["worker", "aggregator"]).await;
    let run = f.run(0).await;
    let spec = join(&run, 3);
    let branches = (0..3)
        .map(|i| pb::HandoffRequest {
            branch_key: i.to_string(),
            ..to(&run, "worker")
        })
        .collect();
    let req = pb::FanOutRequest {
        barrier: Some(spec),
        branches,
    };
    fan_out::fan_out(&f.broker, &Caller::local(), req)
        .await
        .expect("fan out");
    let mut results = Vec::new();
    for _ in 0..3 {
        let d = f.deliver("worker").await;
        let r = pb::HandoffRequest {
            to_barrier: true,
            ..consuming(&run, "worker", "", &d)
        };
        results.push(r.clone());
        handoff::accept(&f.broker, &Caller::local(), r)
            .await
            .expect("branch");
    }
    // The last branch repeated: recognised, no second release.
    let again = handoff::accept(&f.broker, &Caller::local(), results[2].clone())
        .await
        .expect("repeat");
    assert!(again.duplicate);
    assert_eq!(f.store.inbox("aggregator").len(), 1);
    assert_eq!(
        f.store.events(&run, pb::EventKind::BarrierReleased).len(),
        1
    );
    let (b, _) = f
        .store
        .barrier(&run, "join")
        .await
        .expect("read")
        .expect("barrier");
    assert!(b.release_published);
}

#[tokio::test]
async fn a_release_decided_but_not_published_is_published_by_the_retried_branch() {
    let f = fixture();
    f.agents(&["worker", "aggregator"]).await;
    let run = f.run(0).await;
    let spec = join(&run, 2);
    barriers::open(
        &f.broker,
        &Caller::local(),
        pb::OpenBarrierRequest {
            barrier: Some(spec),
        },
    )
    .await
    .expect("open");
    let branch = |key: &str| pb::HandoffRequest {
        to_barrier: true,
        barrier_id: "join".into(),
        branch_key: key.into(),
        idempotency_key: format!("branch-{key}"),
        ..to(&run, "")
    };
    handoff::accept(&f.broker, &Caller::local(), branch("0"))
        .await
        .expect("first branch");
    // The last branch decides the release; storing the release fails (as
    // when NATS loses the answer), so the call fails after the decision.
    f.store.fail("put_handoff", 1);
    assert!(handoff::accept(&f.broker, &Caller::local(), branch("1"))
        .await
        .is_err());
    assert!(f.store.inbox("aggregator").is_empty());
    // Its retry publishes the release at once, not at the release check.
    handoff::accept(&f.broker, &Caller::local(), branch("1"))
        .await
        .expect("the retried branch");
    assert_eq!(f.store.inbox("aggregator").len(), 1);
    let (b, _) = f
        .store
        .barrier(&run, "join")
        .await
        .expect("read")
        .expect("barrier");
    assert!(b.release_published);
}

#[tokio::test]
async fn a_fan_out_branch_key_the_barrier_lacks_is_refused() {
    let f = fixture();
    f.agents(&["worker", "aggregator"]).await;
    let run = f.run(0).await;
    let req = pb::FanOutRequest {
        barrier: Some(pb::BarrierSpec {
            branch_keys: vec!["a".into(), "b".into()],
            ..join(&run, 0)
        }),
        branches: vec![pb::HandoffRequest {
            branch_key: "c".into(),
            ..to(&run, "worker")
        }],
    };
    let err = fan_out::fan_out(&f.broker, &Caller::local(), req)
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), Reason::UnknownBranchKey);
    assert_eq!(err.field(), Some("branches[0].branch_key"));
    assert!(f.store.inbox("worker").is_empty());
}

#[tokio::test]
async fn a_reject_fails_the_run_before_the_delivery_is_terminated() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "worker").await;
    let spec = f.broker.agent("worker").await.expect("agent");
    // The run ends first; a failed settlement leaves the delivery to be
    // redelivered and discarded.
    f.store.fail("settle", 1);
    let op = deliveries::Op::Reject("bad input".into());
    let failed = deliveries::settle(&f.broker, &spec, "w1", &d.delivery_id, None, &op).await;
    assert_eq!(
        failed.expect_err("settle failed").reason(),
        Reason::NatsUnavailable
    );
    let (ended, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(ended.status, pb::RunStatus::Failed as i32);
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Leased));
    deliveries::settle(&f.broker, &spec, "w1", &d.delivery_id, None, &op)
        .await
        .expect("settled");
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Terminated));
    assert_eq!(f.store.events(&run, pb::EventKind::RunFailed).len(), 1);
}

#[tokio::test]
async fn a_delivery_of_another_agent_is_refused() {
    let f = fixture();
    f.agents(&["worker", "critic"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "worker").await;
    let critic = f.broker.agent("critic").await.expect("agent");
    let err = deliveries::settle(
        &f.broker,
        &critic,
        "c1",
        &d.delivery_id,
        None,
        &deliveries::Op::Ack,
    )
    .await
    .expect_err("refused");
    assert_eq!(err.reason(), Reason::BadDeliveryId);
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Leased));
}

#[tokio::test]
async fn a_run_ends_once() {
    let f = fixture();
    let run = f.run(0).await;
    let failed = runs::end(&f.broker, &run, runs::RunEnd::Failed("x".into()))
        .await
        .expect("end");
    let again = runs::end(&f.broker, &run, runs::RunEnd::TimedOut("y".into()))
        .await
        .expect("ended already");
    assert_eq!(failed.status, pb::RunStatus::Failed as i32);
    assert_eq!(again.status, pb::RunStatus::Failed as i32);
    assert_eq!(f.store.events(&run, pb::EventKind::RunFailed).len(), 1);
    assert!(f.store.events(&run, pb::EventKind::RunTimedOut).is_empty());
}

// ---------------------------------------------------------------- leases

/// The token inside a delivery id.
fn token_of(d: &pb::Delivery) -> pb::DeliveryToken {
    crate::rules::handoff::decode_token(&d.delivery_id).expect("token")
}

/// Lets the inbox offer a delivery again, as when its lease passes.
async fn expire(f: &Fixture, d: &pb::Delivery) {
    f.store
        .settle(
            &token_of(d).ack_subject,
            crate::store::Settlement::Nack(None),
        )
        .await
        .expect("expire");
}

#[tokio::test]
async fn a_superseded_attempt_may_not_settle() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let first = f.task_for(&run, "worker").await;
    expire(&f, &first).await;
    let second = f.deliver("worker").await;
    assert_eq!(second.attempt, 2);
    let spec = f.broker.agent("worker").await.expect("agent");
    let ops = [
        deliveries::Op::Ack,
        deliveries::Op::Nack(None),
        deliveries::Op::Reject("late".into()),
        deliveries::Op::Extend,
    ];
    for op in &ops {
        let err = deliveries::settle(&f.broker, &spec, "a", &first.delivery_id, None, op)
            .await
            .expect_err("superseded");
        assert_eq!(err.reason(), Reason::LeaseSuperseded, "{op:?}");
    }
    let (r, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(r.status, pb::RunStatus::Running as i32, "not failed");
    assert_eq!(f.store.standing(first.sequence), Some(Standing::Leased));
    assert!(f.store.events(&run, pb::EventKind::Rejected).is_empty());
    // The attempt that holds the lease settles it.
    deliveries::settle(&f.broker, &spec, "b", &second.delivery_id, None, &ops[0])
        .await
        .expect("ack");
    assert_eq!(f.store.standing(first.sequence), Some(Standing::Acked));
}

#[tokio::test]
async fn a_settled_attempt_repeats_only_the_same_settlement() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "worker").await;
    let spec = f.broker.agent("worker").await.expect("agent");
    let ack = deliveries::Op::Ack;
    deliveries::settle(&f.broker, &spec, "w", &d.delivery_id, None, &ack)
        .await
        .expect("ack");
    deliveries::settle(&f.broker, &spec, "w", &d.delivery_id, None, &ack)
        .await
        .expect("the same ack again is confirmed");
    let reject = deliveries::Op::Reject("after the fact".into());
    let err = deliveries::settle(&f.broker, &spec, "w", &d.delivery_id, None, &reject)
        .await
        .expect_err("settled");
    assert_eq!(err.reason(), Reason::AlreadySettled);
    let (r, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(r.status, pb::RunStatus::Running as i32);
    assert_eq!(f.store.events(&run, pb::EventKind::Acked).len(), 1);
}

#[tokio::test]
async fn an_altered_delivery_id_is_refused_and_changes_nothing() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "worker").await;
    let spec = f.broker.agent("worker").await.expect("agent");
    let mut altered = token_of(&d);
    altered.signature[0] ^= 1;
    let mut later = token_of(&d);
    later.attempt = 5;
    for forged in [altered, later] {
        let id = crate::rules::handoff::encode_token(&forged);
        let err = deliveries::settle(&f.broker, &spec, "w", &id, None, &deliveries::Op::Ack)
            .await
            .expect_err("forged");
        assert_eq!(err.reason(), Reason::BadSignature);
        let consume = consuming(
            &run,
            "worker",
            "worker",
            &pb::Delivery {
                delivery_id: id,
                ..d.clone()
            },
        );
        let refused = handoff::accept(&f.broker, &Caller::local(), consume).await;
        assert_eq!(reason(refused), Reason::BadSignature);
    }
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Leased));
    assert_eq!(f.store.inbox("worker").len(), 1, "nothing stored");
}

#[tokio::test]
async fn a_retry_whose_receipt_was_never_recorded_is_recognised_after_the_ack() {
    let f = fixture();
    f.agents(&["planner", "worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    let req = consuming(&run, "planner", "worker", &d);
    let first = handoff::accept(&f.broker, &Caller::local(), req.clone())
        .await
        .expect("stored and acked");
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Acked));
    // As if the receipt's write had failed after the store and the ack.
    let consumed = ClaimKey::consumed(&d.handoff.as_ref().expect("handoff").id);
    let (mut claim, revision) = f
        .store
        .claim(&consumed)
        .await
        .expect("read")
        .expect("claimed");
    claim.stored.clear();
    f.store
        .update_claim(&consumed, &claim, revision)
        .await
        .expect("write")
        .expect("written");
    let again = handoff::accept(&f.broker, &Caller::local(), req)
        .await
        .expect("the retry is recognised, not refused");
    assert_eq!(again.handoff_id, first.handoff_id);
    assert!(again.duplicate);
    assert_eq!(f.store.inbox("worker").len(), 1, "stored once");
    assert_eq!(
        f.store.claimed(&consumed).map(|c| c.stored.len()),
        Some(1),
        "and its receipt is recorded now"
    );
    // Another target from the settled delivery is still refused.
    let other = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "planner", &d),
    )
    .await;
    assert_eq!(reason(other), Reason::RoleConfusion);
}

#[tokio::test]
async fn a_complete_and_handoff_by_a_superseded_attempt_stores_nothing() {
    let f = fixture();
    f.agents(&["planner", "worker"]).await;
    let run = f.run(0).await;
    let first = f.task_for(&run, "planner").await;
    expire(&f, &first).await;
    let _second = f.deliver("planner").await;
    let late = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &first),
    )
    .await;
    assert_eq!(reason(late), Reason::LeaseSuperseded);
    assert!(f.store.inbox("worker").is_empty());
    let consumed = ClaimKey::consumed(&first.handoff.as_ref().expect("handoff").id);
    assert!(f.store.claimed(&consumed).is_none(), "no claim left behind");
}

// ---------------------------------------------------------------- auth

const BOOTSTRAP: &str = "bootstrap-token-bootstrap-token-0001";

fn secured() -> Fixture {
    let store = Arc::new(Memory::new());
    let (drain, rx) = watch::channel(false);
    let broker = Broker::with_auth(
        Config::default(),
        store.clone(),
        rx,
        super::auth::Auth::required(Some(BOOTSTRAP.to_string())),
    );
    Fixture {
        store,
        broker,
        _drain: drain,
    }
}

fn bearer(token: &str) -> super::auth::Credentials {
    super::auth::Credentials {
        bearer: Some(token.to_string()),
        ..Default::default()
    }
}

async fn caller(f: &Fixture, token: &str) -> Result<Caller, BrokerError> {
    super::auth::authenticate(&f.broker, &bearer(token)).await
}

/// A principal with `grants` and a token for it.
async fn principal(f: &Fixture, name: &str, grants: &[&str]) -> String {
    let admin = caller(f, BOOTSTRAP).await.expect("bootstrap");
    let principal = pb::Principal {
        name: name.into(),
        grants: grants
            .iter()
            .map(|g| crate::rules::grants::tests::g(g))
            .collect(),
    };
    super::auth::put_principal(
        &f.broker,
        &admin,
        pb::PutPrincipalRequest {
            principal: Some(principal),
        },
    )
    .await
    .expect("principal");
    super::auth::create_token(
        &f.broker,
        &admin,
        pb::CreateTokenRequest {
            principal: name.into(),
            description: String::new(),
        },
    )
    .await
    .expect("token")
    .secret
}

#[tokio::test]
async fn callers_prove_who_they_are() {
    let f = secured();
    let none = super::auth::authenticate(&f.broker, &super::auth::Credentials::default()).await;
    assert_eq!(none.expect_err("none").reason(), Reason::MissingCredentials);
    assert_eq!(
        caller(&f, "hot_nope_nope")
            .await
            .expect_err("unknown")
            .reason(),
        Reason::BadCredentials
    );
    let token = principal(&f, "svc", &["read"]).await;
    assert_eq!(caller(&f, &token).await.expect("valid").principal, "svc");
    let wrong = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(
        caller(&f, &wrong).await.expect_err("wrong").reason(),
        Reason::BadCredentials
    );
    let id = token
        .strip_prefix("hot_")
        .and_then(|t| t.split_once('_'))
        .map(|(id, _)| id.to_string())
        .expect("id");
    let admin = caller(&f, BOOTSTRAP).await.expect("bootstrap");
    super::auth::revoke_token(&f.broker, &admin, pb::RevokeTokenRequest { id })
        .await
        .expect("revoke");
    assert_eq!(
        caller(&f, &token).await.expect_err("revoked").reason(),
        Reason::TokenRevoked
    );
    assert!(
        f.store.events("_", pb::EventKind::AccessDenied).is_empty(),
        "a call without valid credentials stores nothing"
    );
    let text = f.broker.metrics().render().expect("metrics");
    for (reason, n) in [
        ("MISSING_CREDENTIALS", 1),
        ("BAD_CREDENTIALS", 2),
        ("TOKEN_REVOKED", 1),
    ] {
        let series =
            format!("handoff_unauthenticated_total{{reason=\"{reason}\",peer=\"unknown\"}} {n}\n");
        assert!(text.contains(&series), "{series} in {text}");
    }
}

#[tokio::test]
async fn grants_decide_and_a_refusal_stores_nothing() {
    let f = secured();
    let admin = caller(&f, BOOTSTRAP).await.expect("bootstrap");
    for name in ["planner", "worker"] {
        let req = pb::RegisterAgentRequest {
            agent: Some(pb::AgentSpec {
                name: name.into(),
                ..Default::default()
            }),
        };
        super::agents::register(&f.broker, &admin, req)
            .await
            .expect("agent");
    }
    let alice = caller(
        &f,
        &principal(&f, "alice", &["own alice", "send_as planner"]).await,
    )
    .await
    .expect("alice");
    let mallory = caller(
        &f,
        &principal(
            &f,
            "mallory",
            &["own mallory", "send_as *", "!send_as planner"],
        )
        .await,
    )
    .await
    .expect("mallory");
    let start = |owner: &str| pb::StartRunRequest {
        owner: owner.into(),
        ..Default::default()
    };
    let err = runs::start(&f.broker, &alice, start("bob"))
        .await
        .expect_err("not alice's");
    assert_eq!(err.reason(), Reason::NotGranted);
    let run = runs::start(&f.broker, &alice, start("alice"))
        .await
        .expect("own run")
        .run
        .expect("run")
        .id;
    let as_planner = pb::HandoffRequest {
        source_agent: "planner".into(),
        ..to(&run, "worker")
    };
    handoff::accept(&f.broker, &alice, as_planner.clone())
        .await
        .expect("alice sends as planner");
    assert_eq!(
        reason(handoff::accept(&f.broker, &mallory, as_planner).await),
        Reason::NotGranted,
        "deny wins over send_as *"
    );
    assert_eq!(
        reason(handoff::accept(&f.broker, &mallory, to(&run, "worker")).await),
        Reason::RunNotFound,
        "no right to the run: as if it did not exist"
    );
    let as_herself = pb::HandoffRequest {
        source_agent: "worker".into(),
        ..to(&run, "worker")
    };
    assert_eq!(
        reason(handoff::accept(&f.broker, &mallory, as_herself).await),
        Reason::RunNotFound,
        "send_as is no right to a run"
    );
    let done = pb::HandoffRequest {
        r#final: true,
        target_agent: String::new(),
        ..to(&run, "")
    };
    assert_eq!(
        reason(handoff::accept(&f.broker, &mallory, done).await),
        Reason::RunNotFound,
        "completing another owner's run"
    );
    assert_eq!(f.store.inbox("worker").len(), 1, "only alice's handoff");
    let err = super::agents::register(
        &f.broker,
        &alice,
        pb::RegisterAgentRequest {
            agent: Some(pb::AgentSpec {
                name: "worker".into(),
                max_attempts: 1,
                ..Default::default()
            }),
        },
    )
    .await
    .expect_err("not admin");
    assert_eq!(err.reason(), Reason::NotGranted);
    assert_ne!(
        f.broker.agent("worker").await.expect("agent").max_attempts,
        1,
        "the stored agent is unchanged"
    );
    assert!(
        f.store.events(&run, pb::EventKind::AccessDenied).is_empty(),
        "nothing in the run's timeline"
    );
    assert_eq!(
        f.store.events("_", pb::EventKind::AccessDenied).len(),
        6,
        "each refusal of a principal, on `_`"
    );
}

#[tokio::test]
async fn extends_keep_a_first_attempt_past_its_signed_deadline() {
    let f = fixture();
    let req = pb::RegisterAgentRequest {
        agent: Some(pb::AgentSpec {
            name: "worker".into(),
            lease: prost_types::Duration::try_from(std::time::Duration::from_millis(300)).ok(),
            ..Default::default()
        }),
    };
    super::agents::register(&f.broker, &Caller::local(), req)
        .await
        .expect("agent");
    let run = f.run(0).await;
    let d = f.task_for(&run, "worker").await;
    let spec = f.broker.agent("worker").await.expect("agent");
    let extend = deliveries::Op::Extend;
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        deliveries::settle(&f.broker, &spec, "w", &d.delivery_id, None, &extend)
            .await
            .expect("extended (600 ms past the token's own deadline by the end)");
    }
    deliveries::settle(
        &f.broker,
        &spec,
        "w",
        &d.delivery_id,
        None,
        &deliveries::Op::Ack,
    )
    .await
    .expect("acked within the extended lease");
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Acked));
}

#[tokio::test]
async fn a_handoff_taken_within_max_queue_wait_is_left_alone() {
    let f = fixture();
    f.agents(&["worker", "idle"]).await;
    let run = f.run(0).await;
    let taken = f.task_for(&run, "worker").await;
    deliveries::queue_wait_passed(&f.broker, "worker", taken.sequence)
        .await
        .expect("fired");
    assert_eq!(f.store.standing(taken.sequence), Some(Standing::Leased));
    assert!(f.store.events(&run, pb::EventKind::DeadLettered).is_empty());
    // One nobody took is dead-lettered and withdrawn, once.
    let waiting = handoff::accept(&f.broker, &Caller::local(), to(&run, "idle"))
        .await
        .expect("stored");
    for _ in 0..2 {
        deliveries::queue_wait_passed(&f.broker, "idle", waiting.sequence)
            .await
            .expect("fired");
    }
    assert_eq!(
        f.store.standing(waiting.sequence),
        Some(Standing::Terminated)
    );
    assert_eq!(f.store.events(&run, pb::EventKind::DeadLettered).len(), 1);
    assert_eq!(f.store.events(&run, pb::EventKind::RunFailed).len(), 1);
}

// ---------------------------------------------------------------- claims

#[tokio::test]
async fn a_redo_is_recognised_after_the_dedupe_window_whatever_its_content() {
    let f = fixture();
    f.agents(&["planner", "worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    let crashing = f.crashing_before_the_ack();
    let first = handoff::accept(
        &crashing,
        &Caller::local(),
        consuming(&run, "planner", "worker", &d),
    )
    .await
    .expect("stored, input left unacked");
    // The dedupe window passes; the input comes back; the agent redoes its
    // work, with other content this time.
    f.store.forget_ids();
    expire(&f, &d).await;
    let again = f.deliver("planner").await;
    let mut redo = consuming(&run, "planner", "worker", &again);
    redo.payload = Some(payload("different words"));
    redo.idempotency_key = "another".into();
    let answer = handoff::accept(&f.broker, &Caller::local(), redo)
        .await
        .expect("answered");
    assert!(answer.duplicate);
    assert_eq!(answer.handoff_id, first.handoff_id);
    assert_eq!(answer.sequence, first.sequence);
    assert_eq!(f.store.inbox("worker").len(), 1, "downstream sees it once");
    assert_eq!(f.store.standing(d.sequence), Some(Standing::Acked));
}

#[tokio::test]
async fn a_claim_left_by_a_crash_before_the_store_does_not_refuse_the_redo() {
    let f = fixture();
    f.agents(&["planner", "worker", "critic"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    // The broker dies between claiming and storing: nothing stored, and
    // the claim is never withdrawn.
    f.store.fail("put_handoff", 1);
    f.store.fail("release_claim", 1);
    let died = handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "worker", &d),
    )
    .await;
    assert_eq!(reason(died), Reason::NatsUnavailable);
    let consumed = ClaimKey::consumed(&d.handoff.as_ref().expect("handoff").id);
    assert!(f.store.claimed(&consumed).is_some(), "the claim was left");
    // The redo (the next attempt) chooses another target: accepted.
    expire(&f, &d).await;
    let again = f.deliver("planner").await;
    handoff::accept(
        &f.broker,
        &Caller::local(),
        consuming(&run, "planner", "critic", &again),
    )
    .await
    .expect("the redo takes the claim over");
    assert_eq!(f.store.inbox("critic").len(), 1);
    assert!(f.store.inbox("worker").is_empty());
    let claim = f.store.claimed(&consumed).expect("claim");
    assert_eq!(claim.target_agent, "critic");
    assert_eq!(claim.stored.len(), 1);
}

// ------------------------------------------------------ contract modes

/// An encoded descriptor set of package `mode.v1` with `body`.
fn mode_schema(body: &str) -> Vec<u8> {
    use prost::Message;
    use protox::file::{File, FileResolver};

    struct Source(String);
    impl FileResolver for Source {
        fn open_file(&self, name: &str) -> Result<File, protox::Error> {
            if name == "m.proto" {
                File::from_source(name, &self.0)
            } else {
                Err(protox::Error::file_not_found(name))
            }
        }
    }
    let source = format!("syntax = \"proto3\";\npackage mode.v1;\n{body}\n");
    let mut compiler = protox::Compiler::with_file_resolver(Source(source));
    compiler.include_imports(true);
    compiler.open_file("m.proto").expect("compile m.proto");
    compiler.file_descriptor_set().encode_to_vec()
}

const MODE_V1: &str = "message M { string a = 1; int32 b = 2; }";
/// Field 2 changes type: breaks BACKWARD, FORWARD and FULL.
const MODE_BREAK: &str = "message M { string a = 1; string b = 2; }";
/// Field 3 added: compatible under every mode.
const MODE_GROWN: &str = "message M { string a = 1; int32 b = 2; string c = 3; }";

async fn register_mode(
    f: &Fixture,
    body: &str,
    mode: pb::Compatibility,
) -> Result<pb::RegisterContractResponse, BrokerError> {
    let req = pb::RegisterContractRequest {
        message_type: "mode.v1.M".into(),
        compatibility: mode as i32,
        file_descriptor_set: mode_schema(body),
        ..Default::default()
    };
    super::contracts::register(&f.broker, &Caller::local(), req).await
}

async fn stored_versions(f: &Fixture) -> Vec<(u32, i32)> {
    let mut v: Vec<(u32, i32)> = Vec::new();
    for (t, n) in f.store.contract_versions().await.expect("versions") {
        let c = f
            .store
            .contract(&t, n)
            .await
            .expect("read")
            .expect("stored");
        v.push((c.version, c.compatibility));
    }
    v.sort();
    v
}

#[tokio::test]
async fn a_later_version_cannot_pick_another_compatibility_mode() {
    let f = fixture();
    let v1 = register_mode(&f, MODE_V1, pb::Compatibility::Backward)
        .await
        .expect("v1");
    assert!(v1.created);
    // v2 asks for NONE to slip a break through: refused, nothing stored.
    let err = register_mode(&f, MODE_BREAK, pb::Compatibility::None)
        .await
        .expect_err("another mode");
    assert_eq!(err.reason(), Reason::CompatibilityModeFixed);
    let meta: std::collections::HashMap<_, _> = err.metadata().into_iter().collect();
    assert_eq!(meta["stored_mode"], "BACKWARD");
    assert_eq!(meta["requested_mode"], "NONE");
    assert_eq!(meta["message_type"], "mode.v1.M");
    assert!(err.to_string().contains("BACKWARD") && err.to_string().contains("NONE"));
    // Even a compatible change may not ask for another mode.
    let err = register_mode(&f, MODE_GROWN, pb::Compatibility::Full)
        .await
        .expect_err("another mode");
    assert_eq!(err.reason(), Reason::CompatibilityModeFixed);
    assert_eq!(
        stored_versions(&f).await,
        [(1, pb::Compatibility::Backward as i32)]
    );
    // Unset: checked under v1's mode, so the break is refused as such.
    let err = register_mode(&f, MODE_BREAK, pb::Compatibility::Unspecified)
        .await
        .expect_err("break under BACKWARD");
    assert_eq!(err.reason(), Reason::IncompatibleContract);
    assert!(err.to_string().contains("BACKWARD"), "{err}");
    // The same content again, with the mode unset or named: a no-op.
    for mode in [pb::Compatibility::Unspecified, pb::Compatibility::Backward] {
        let again = register_mode(&f, MODE_V1, mode).await.expect("again");
        assert!(!again.created);
    }
    // A compatible change, unset or naming the stored mode: stored under it.
    let v2 = register_mode(&f, MODE_GROWN, pb::Compatibility::Unspecified)
        .await
        .expect("v2");
    assert!(v2.created);
    let v2 = v2.contract.expect("contract");
    assert_eq!(v2.version, 2);
    assert_eq!(v2.compatibility, pb::Compatibility::Backward as i32);
}

#[tokio::test]
async fn version_one_sets_the_mode() {
    let f = fixture();
    register_mode(&f, MODE_V1, pb::Compatibility::None)
        .await
        .expect("v1 under NONE");
    // Unset on v2 means NONE: the break is accepted, and carries NONE.
    let v2 = register_mode(&f, MODE_BREAK, pb::Compatibility::Unspecified)
        .await
        .expect("break under NONE")
        .contract
        .expect("contract");
    assert_eq!(v2.compatibility, pb::Compatibility::None as i32);
    let err = register_mode(&f, MODE_GROWN, pb::Compatibility::Backward)
        .await
        .expect_err("tightening needs SetCompatibility too");
    assert_eq!(err.reason(), Reason::CompatibilityModeFixed);
}

fn set_mode(mode: pb::Compatibility, reason: &str) -> pb::SetCompatibilityRequest {
    pb::SetCompatibilityRequest {
        message_type: "mode.v1.M".into(),
        compatibility: mode as i32,
        reason: reason.into(),
    }
}

#[tokio::test]
async fn set_compatibility_changes_the_mode_of_the_next_versions_and_is_an_event() {
    let f = fixture();
    // No contract yet: nothing to change.
    let err = super::contracts::set_compatibility(
        &f.broker,
        &Caller::local(),
        set_mode(pb::Compatibility::None, "why"),
    )
    .await
    .expect_err("no contract");
    assert_eq!(err.reason(), Reason::ContractNotFound);
    register_mode(&f, MODE_V1, pb::Compatibility::Backward)
        .await
        .expect("v1");
    // Bad input: a mode and a reason are required.
    for (req, field) in [
        (
            set_mode(pb::Compatibility::Unspecified, "why"),
            "compatibility",
        ),
        (set_mode(pb::Compatibility::None, "  "), "reason"),
    ] {
        let err = super::contracts::set_compatibility(&f.broker, &Caller::local(), req)
            .await
            .expect_err("malformed");
        assert_eq!(err.field(), Some(field), "{err}");
    }
    // Without the admin grant: refused, nothing recorded.
    let err = super::contracts::set_compatibility(
        &f.broker,
        &Caller::with_grants("worker-svc", Vec::new()),
        set_mode(pb::Compatibility::None, "why"),
    )
    .await
    .expect_err("not admin");
    assert_eq!(err.reason(), Reason::NotGranted);
    assert!(f
        .store
        .contract_mode("mode.v1.M")
        .await
        .expect("read")
        .is_none());

    let changed = super::contracts::set_compatibility(
        &f.broker,
        &Caller::local(),
        set_mode(pb::Compatibility::None, "v2 renumbers b"),
    )
    .await
    .expect("changed");
    assert!(changed.changed);
    assert_eq!(changed.previous, pb::Compatibility::Backward as i32);
    let latest = changed.contract.expect("contract");
    assert_eq!(
        (latest.version, latest.compatibility),
        (1, pb::Compatibility::None as i32)
    );
    assert!(latest.file_descriptor_set.is_empty());
    let events = f.store.events("_", pb::EventKind::ContractModeChanged);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].contract_type, "mode.v1.M");
    assert_eq!(events[0].agent, "local");
    assert_eq!(events[0].reason, "BACKWARD -> NONE: v2 renumbers b");
    // Again: a no-op, no second event.
    let again = super::contracts::set_compatibility(
        &f.broker,
        &Caller::local(),
        set_mode(pb::Compatibility::None, "v2 renumbers b"),
    )
    .await
    .expect("again");
    assert!(!again.changed);
    assert_eq!(
        f.store
            .events("_", pb::EventKind::ContractModeChanged)
            .len(),
        1
    );

    // The next version is checked under NONE (unset, or naming it); asking
    // for v1's BACKWARD is now the refused one.
    let err = register_mode(&f, MODE_BREAK, pb::Compatibility::Backward)
        .await
        .expect_err("stored is NONE now");
    assert_eq!(err.reason(), Reason::CompatibilityModeFixed);
    assert_eq!(
        err.metadata()
            .into_iter()
            .find(|(k, _)| *k == "stored_mode")
            .map(|(_, v)| v),
        Some("NONE".to_string())
    );
    let v2 = register_mode(&f, MODE_BREAK, pb::Compatibility::Unspecified)
        .await
        .expect("break under NONE")
        .contract
        .expect("contract");
    assert_eq!(
        (v2.version, v2.compatibility),
        (2, pb::Compatibility::None as i32)
    );
    // Re-registering v1's content names v1 (stored under BACKWARD): a no-op.
    let v1 = super::contracts::register(
        &f.broker,
        &Caller::local(),
        pb::RegisterContractRequest {
            message_type: "mode.v1.M".into(),
            version: 1,
            file_descriptor_set: mode_schema(MODE_V1),
            ..Default::default()
        },
    )
    .await
    .expect("v1 again");
    assert!(!v1.created);

    // Back to FULL: recorded once more, from NONE.
    super::contracts::set_compatibility(
        &f.broker,
        &Caller::local(),
        set_mode(pb::Compatibility::Full, "readers pinned"),
    )
    .await
    .expect("full");
    let events = f.store.events("_", pb::EventKind::ContractModeChanged);
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].reason, "NONE -> FULL: readers pinned");
    let err = register_mode(&f, MODE_V1, pb::Compatibility::Unspecified)
        .await
        .expect_err("v3 reverting b breaks FULL");
    assert_eq!(err.reason(), Reason::IncompatibleContract);
}

#[tokio::test]
async fn a_mode_changed_on_one_replica_holds_on_another() {
    let f = fixture();
    register_mode(&f, MODE_V1, pb::Compatibility::Backward)
        .await
        .expect("v1");
    let other = f.replica(Config::default());
    super::contracts::set_compatibility(
        &other,
        &Caller::local(),
        set_mode(pb::Compatibility::None, "migration"),
    )
    .await
    .expect("changed on the other replica");
    let v2 = register_mode(&f, MODE_BREAK, pb::Compatibility::Unspecified)
        .await
        .expect("NONE here too");
    assert!(v2.created);
}

#[tokio::test]
async fn a_fan_out_redone_with_other_items_is_answered_with_the_first() {
    let f = fixture();
    f.agents(&["planner", "worker", "aggregator"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    let fan_out = |d: &pb::Delivery, n: u32| pb::FanOutRequest {
        barrier: Some(pb::BarrierSpec {
            run_id: run.clone(),
            barrier_id: "join-of-the-input".into(),
            branch_count: n,
            target_agent: "aggregator".into(),
            ..Default::default()
        }),
        branches: (0..n)
            .map(|i| pb::HandoffRequest {
                branch_key: i.to_string(),
                payload: Some(payload(&format!("item {i} of {n}"))),
                ..consuming(&run, "planner", "worker", d)
            })
            .collect(),
    };
    // The broker dies after storing the branches, before acking the input
    // (neither its lease record nor the ack gets written).
    f.store.fail("put_lease", 1);
    f.store.fail("settle", 1);
    let first = fan_out::fan_out(&f.broker, &Caller::local(), fan_out(&d, 2))
        .await
        .expect("first fan-out");
    f.store.forget_ids();
    expire(&f, &d).await;
    let again = f.deliver("planner").await;
    let redo = fan_out::fan_out(&f.broker, &Caller::local(), fan_out(&again, 3))
        .await
        .expect("answered");
    let ids = |r: &pb::FanOutResponse| -> Vec<String> {
        r.branches.iter().map(|b| b.handoff_id.clone()).collect()
    };
    assert_eq!(ids(&redo), ids(&first), "the first fan-out's branches");
    assert!(redo.branches.iter().all(|b| b.duplicate));
    assert_eq!(
        redo.barrier
            .as_ref()
            .map(|b| b.spec.clone().unwrap_or_default().branch_count),
        Some(2),
        "the first barrier"
    );
    assert_eq!(f.store.inbox("worker").len(), 2, "no third branch");
}

#[tokio::test]
async fn a_live_session_is_listed_until_it_ends_and_a_dead_replicas_record_expires() {
    use crate::store::Instances as _;
    let f = fixture();
    let local = Caller::local();
    let list = |agent: &str| {
        let req = pb::ListInstancesRequest {
            agent: agent.to_string(),
        };
        super::instances::list(&f.broker, &local, req)
    };
    let presence =
        super::instances::Presence::start(&f.broker, "worker", "w1", 4, Box::new(|| (2, None)));
    // The first record is written at once, then refreshed.
    let mut found = Vec::new();
    for _ in 0..50 {
        found = list("worker").await.expect("list").instances;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    let i = &found[0];
    assert_eq!(
        (i.instance.as_str(), i.in_flight, i.max_in_flight),
        ("w1", 2, 4)
    );
    assert_eq!(i.replica, f.broker.config().replica_name);
    assert!(list("other").await.expect("list").instances.is_empty());
    presence.end().await;
    assert!(list("").await.expect("list").instances.is_empty());
    // A record its replica no longer refreshes is gone once it expires.
    let orphan = pb::Instance {
        agent: "worker".into(),
        session: "dead".into(),
        ..Default::default()
    };
    let expiry = std::time::Duration::from_millis(50);
    f.store.put_instance(&orphan, expiry).await.expect("put");
    assert_eq!(list("worker").await.expect("list").instances.len(), 1);
    tokio::time::sleep(2 * expiry).await;
    assert!(list("worker").await.expect("list").instances.is_empty());
}

/// Asks `run`'s owner a question from `agent`'s next delivery.
async fn ask(f: &Fixture, run: &str, agent: &str, timeout_secs: i64) -> pb::InputRequest {
    let d = f.task_for(run, agent).await;
    let req = pb::AwaitInputRequest {
        delivery_id: d.delivery_id,
        prompt: "which?".into(),
        timeout: Some(prost_types::Duration {
            seconds: timeout_secs,
            nanos: 0,
        }),
        ..Default::default()
    };
    super::input::await_input(&f.broker, &Caller::local(), req)
        .await
        .expect("await input")
        .request
        .expect("request")
}

#[tokio::test]
async fn an_answer_cut_short_after_its_decision_is_delivered_by_the_check() {
    let f = fixture();
    f.agents(&["asker"]).await;
    let run = f.run(0).await;
    let request = ask(&f, &run, "asker", 600).await;
    let (waiting, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(waiting.status, pb::RunStatus::WaitingInput as i32);
    // The answer is decided, then storing its handoff fails (a crash).
    f.store.fail("put_handoff", 1);
    let provide = pb::ProvideInputRequest {
        run_id: run.clone(),
        request_id: request.id.clone(),
        answer: Some(payload("Paris")),
    };
    super::input::provide_input(&f.broker, &Caller::local(), provide.clone())
        .await
        .expect_err("cut short");
    let (decided, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(
        decided.status,
        pb::RunStatus::Running as i32,
        "decided: not waiting"
    );
    assert_eq!(decided.waiting.len(), 1, "its follow-up is still due");
    // The timeout cannot take it any more; the check delivers the answer.
    super::input::time_out(&f.broker, &run, &request.id, false)
        .await
        .expect("timeout");
    let d = f.deliver("asker").await;
    let envelope = d.handoff.expect("handoff");
    assert_eq!(envelope.input_request_id, request.id);
    assert_eq!(envelope.payload, Some(payload("Paris")));
    let (done, _) = f.broker.run(&run).await.expect("run");
    assert!(done.waiting.is_empty());
    assert_eq!(done.settled_inputs, std::slice::from_ref(&request.id));
    assert_eq!(f.store.events(&run, pb::EventKind::InputProvided).len(), 1);
    assert!(f
        .store
        .events(&run, pb::EventKind::InputTimedOut)
        .is_empty());
    // Answering again is refused, and stores nothing.
    let again = super::input::provide_input(&f.broker, &Caller::local(), provide)
        .await
        .expect_err("answered");
    assert_eq!(again.reason(), Reason::AlreadySettled);
    assert_eq!(
        f.store.events(&run, pb::EventKind::HandoffAccepted).len(),
        2
    );
}

#[tokio::test]
async fn an_unanswered_request_times_out_into_its_runs_failure_once() {
    let f = fixture();
    f.agents(&["asker"]).await;
    let run = f.run(0).await;
    let request = ask(&f, &run, "asker", 1).await;
    // Decided, then cut short (its event not stored), then the timer comes
    // again.
    f.store.fail("publish_event", 1);
    super::input::time_out(&f.broker, &run, &request.id, false)
        .await
        .expect_err("cut short");
    let (decided, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(decided.status, pb::RunStatus::Running as i32);
    super::input::time_out(&f.broker, &run, &request.id, false)
        .await
        .expect("again");
    super::input::time_out(&f.broker, &run, &request.id, true)
        .await
        .expect("the check finds nothing to do");
    let (failed, _) = f.broker.run(&run).await.expect("run");
    assert_eq!(failed.status, pb::RunStatus::Failed as i32);
    assert!(failed.failure.contains("not answered in time"));
    assert_eq!(f.store.events(&run, pb::EventKind::InputTimedOut).len(), 1);
}

/// A delta that sets `key` to `n`.
fn set(key: &str, n: f64) -> pb::StateDelta {
    pb::StateDelta {
        set: [(
            key.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n)),
            },
        )]
        .into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_keyed_handoff_whose_store_failed_after_its_delta_finds_its_revision_after_100_more() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let keyed = |delta: pb::StateDelta| pb::HandoffRequest {
        idempotency_key: "kick-off".into(),
        state_delta: Some(delta),
        ..to(&run, "worker")
    };
    // The delta is applied (revision 1), then storing the handoff fails.
    f.store.fail("put_handoff", 1);
    let failed = handoff::accept(&f.broker, &Caller::local(), keyed(set("first", 1.0))).await;
    assert_eq!(reason(failed), Reason::NatsUnavailable);
    assert!(f.store.inbox("worker").is_empty());
    let id = crate::rules::handoff::handoff_id(&keyed(set("first", 1.0)), None);
    let key = ClaimKey::Keyed {
        run_id: run.clone(),
        handoff_id: id.clone(),
    };
    let claim = f.store.claimed(&key).expect("the claim stays");
    assert_eq!(claim.state_revision, 1, "{claim:?}");
    assert!(claim.stored.is_empty());
    // 100 other deltas land: more than the latest revision remembers.
    for i in 0..100 {
        let other = pb::HandoffRequest {
            state_delta: Some(set(&format!("n{i}"), f64::from(i))),
            ..to(&run, "worker")
        };
        handoff::accept(&f.broker, &Caller::local(), other)
            .await
            .expect("another delta");
    }
    // The retry (its delta written differently) applies nothing more: it
    // hands over the revision it made, and is stored once.
    let retry = handoff::accept(&f.broker, &Caller::local(), keyed(set("first", 99.0)))
        .await
        .expect("retry");
    assert_eq!(retry.handoff_id, id);
    assert_eq!(retry.state_revision, 1);
    let head = super::state::latest(&f.broker, &run)
        .await
        .expect("read")
        .expect("state");
    assert_eq!(head.revision, 101, "no revision for the retry");
    assert_eq!(
        head.entries
            .get("first")
            .and_then(|e| e.value.as_ref())
            .and_then(|v| v.kind.clone()),
        Some(prost_types::value::Kind::NumberValue(1.0))
    );
    let stored: Vec<_> = f
        .store
        .inbox("worker")
        .into_iter()
        .filter(|(e, _)| e.id == id)
        .collect();
    assert_eq!(stored.len(), 1);
    // And once more: answered from its receipt, as a duplicate.
    let again = handoff::accept(&f.broker, &Caller::local(), keyed(set("first", 7.0)))
        .await
        .expect("again");
    assert!(again.duplicate);
    assert_eq!(
        (again.handoff_id, again.sequence, again.state_revision),
        (id, retry.sequence, 1)
    );
}

/// `d` offered again as JetStream would after its consumer's state was
/// reset: counted as delivery 1 once more, with a settlement reference of
/// its own.
async fn offered_again_as_first(f: &Fixture, agent: &str, d: &pb::Delivery) -> pb::Delivery {
    use prost::Message as _;
    let spec = f.broker.agent(agent).await.expect("agent");
    let offered = crate::store::Offered {
        sequence: d.sequence,
        delivered: 1,
        reference: format!("mem.{agent}.{}#reset", d.sequence),
        payload: d.handoff.as_ref().expect("handoff").encode_to_vec().into(),
    };
    match deliveries::offer(&f.broker, &spec, "i2", offered).await {
        deliveries::Offering::Deliver(again, _) => *again,
        deliveries::Offering::Skip => panic!("offer skipped"),
    }
}

#[tokio::test]
async fn a_nacked_delivery_counted_from_1_again_is_a_later_attempt_and_its_ack_settles_it() {
    let f = fixture();
    f.agents(&["worker"]).await;
    let spec = f.broker.agent("worker").await.expect("agent");
    let run = f.run(0).await;
    let nack = |d: &pb::Delivery| {
        let id = d.delivery_id.clone();
        let spec = spec.clone();
        let broker = f.broker.clone();
        async move {
            deliveries::settle(&broker, &spec, "i1", &id, None, &deliveries::Op::Nack(None))
                .await
                .expect("nacked")
        }
    };
    let ack = |d: &pb::Delivery| {
        let id = d.delivery_id.clone();
        let spec = spec.clone();
        let broker = f.broker.clone();
        async move { deliveries::settle(&broker, &spec, "i2", &id, None, &deliveries::Op::Ack).await }
    };
    // Nacked here, then counted as delivery 1 again: offered as attempt 2,
    // and its ack settles it.
    let first = f.task_for(&run, "worker").await;
    assert_eq!(first.attempt, 1);
    nack(&first).await;
    let again = offered_again_as_first(&f, "worker", &first).await;
    assert_eq!(again.attempt, 2);
    ack(&again).await.expect("the redelivery's ack");
    assert_eq!(f.store.standing(first.sequence), Some(Standing::Acked));
    // Nacked through another replica (this one does not remember it): it
    // comes as attempt 1 again, and its ack still settles it, where the
    // nacked attempt's own ack stays refused.
    let second = f.task_for(&run, "worker").await;
    nack(&second).await;
    assert_eq!(f.broker.nacked_attempt("worker", second.sequence), Some(1));
    f.broker.forget_nack("worker", second.sequence);
    let again = offered_again_as_first(&f, "worker", &second).await;
    assert_eq!(again.attempt, 1);
    let stale = ack(&second).await.expect_err("the nacked attempt's ack");
    assert_eq!(stale.reason(), Reason::AlreadySettled);
    ack(&again).await.expect("the redelivery's ack");
    assert_eq!(f.store.standing(second.sequence), Some(Standing::Acked));
}

#[tokio::test]
async fn two_attempts_of_one_step_that_raced_store_one_handoff() {
    let f = fixture();
    f.agents(&["planner", "worker"]).await;
    let run = f.run(0).await;
    let d = f.task_for(&run, "planner").await;
    let with_key = |key: &str| pb::HandoffRequest {
        idempotency_key: key.into(),
        ..consuming(&run, "planner", "worker", &d)
    };
    // The first attempt is stored through a replica that dies before it
    // acks the delivery.
    let first = handoff::accept(
        &f.crashing_before_the_ack(),
        &Caller::local(),
        with_key("first"),
    )
    .await
    .expect("first");
    // As if the first attempt's answer was lost and its claim withdrawn
    // (it reached NATS but the broker saw an error): the second attempt,
    // with other content, finds no claim.
    let key = ClaimKey::consumed(&d.handoff.as_ref().expect("handoff").id);
    let (_, revision) = f.store.claim(&key).await.expect("read").expect("claim");
    f.store.release_claim(&key, revision).await;
    let second = handoff::accept(&f.broker, &Caller::local(), with_key("second"))
        .await
        .expect("second");
    assert!(second.duplicate);
    assert_eq!(second.handoff_id, first.handoff_id);
    assert_eq!(f.store.inbox("worker").len(), 1, "one handoff stored");
}

#[tokio::test]
async fn a_retry_of_a_handoff_whose_delta_was_made_before_its_run_ended_is_that_handoff_not_run_closed(
) {
    let f = fixture();
    f.agents(&["worker"]).await;
    let run = f.run(0).await;
    let keyed = pb::HandoffRequest {
        idempotency_key: "kick-off".into(),
        state_delta: Some(set("first", 1.0)),
        ..to(&run, "worker")
    };
    // The delta is made (revision 1), then storing the handoff fails; the
    // run is cancelled meanwhile.
    f.store.fail("put_handoff", 1);
    let failed = handoff::accept(&f.broker, &Caller::local(), keyed.clone()).await;
    assert_eq!(reason(failed), Reason::NatsUnavailable);
    runs::end(&f.broker, &run, runs::RunEnd::Cancelled("x".into()))
        .await
        .expect("cancelled");
    // Its retry finishes it, applying nothing more; a handoff with another
    // key is RUN_CLOSED.
    let retry = handoff::accept(&f.broker, &Caller::local(), keyed.clone())
        .await
        .expect("the retry is the handoff whose delta was made");
    assert_eq!(retry.state_revision, 1);
    let stored = f.store.inbox("worker");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let other = pb::HandoffRequest {
        idempotency_key: "another".into(),
        ..keyed
    };
    let closed = handoff::accept(&f.broker, &Caller::local(), other).await;
    assert_eq!(reason(closed), Reason::RunClosed);
    let head = super::state::latest(&f.broker, &run)
        .await
        .expect("read")
        .expect("state");
    assert_eq!(head.revision, 1);
}
