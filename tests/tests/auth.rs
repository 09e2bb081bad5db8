//! Only the right agent acts: authenticated callers, grants, and leases
//! that cannot be forged or outlived, against a real broker and
//! `nats-server`. Every refusal is checked by code and reason, and by what
//! it left behind (the run's timeline, the agent's inbox).

use std::time::Duration;

use handoff_client::{pb, AgentConfig, Client, ContractSpec, Handoff, RunConfig};
use handoff_proto::{demo::Subtask, DEMO_FILE_DESCRIPTOR_SET};
use handoff_tests::{
    inbox, next_within, note,
    secured::{connect, count, decode_token as decode, encode_token as encode, refused, Secured},
};
use tonic::Code;

/// A run with one task for `worker`, delivered to an instance of
/// `worker_svc`: the run, the subscription and the delivery.
async fn task_for_worker(
    s: &Secured,
    worker_svc: &Client,
) -> (
    String,
    handoff_client::Subscription,
    handoff_client::Delivery,
) {
    let run = s
        .admin
        .start_run(RunConfig::new("ops"))
        .await
        .expect("run")
        .id;
    s.admin
        .handoff(Handoff::to(&run, "worker", &note("task", 1)).expect("handoff"))
        .await
        .expect("task");
    let mut sub = worker_svc.subscribe("worker", "w1", 1).await.expect("sub");
    let d = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivered");
    (run, sub, d)
}

use pb::GrantAction::{Own, Read, ReceiveAs, SendAs};

#[tokio::test]
async fn calls_without_valid_credentials_are_unauthenticated() {
    let s = Secured::start(Duration::from_secs(5), |_| {}).await;
    let anonymous = connect(&s.broker, None).await;
    refused(
        anonymous.list_agents().await,
        Code::Unauthenticated,
        "MISSING_CREDENTIALS",
    );
    let wrong = connect(&s.broker, Some("hot_0000_not-a-secret")).await;
    refused(
        wrong.list_agents().await,
        Code::Unauthenticated,
        "BAD_CREDENTIALS",
    );
    let (reader, token) = s.principal("reader", &[(Read, "", false)]).await;
    reader.list_agents().await.expect("a valid token reads");
    s.admin
        .raw()
        .revoke_token(pb::RevokeTokenRequest {
            id: token.id.clone(),
        })
        .await
        .expect("revoke");
    refused(
        reader.list_agents().await,
        Code::Unauthenticated,
        "TOKEN_REVOKED",
    );
    // A stream is refused the same way.
    refused(
        anonymous.subscribe("worker", "w1", 1).await,
        Code::Unauthenticated,
        "MISSING_CREDENTIALS",
    );
    let listed = s
        .admin
        .raw()
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("list")
        .into_inner()
        .tokens;
    assert!(
        listed.iter().all(|t| t.secret_sha256.is_empty()),
        "digests are never listed"
    );
    assert!(listed
        .iter()
        .any(|t| t.id == token.id && t.revoked_at.is_some()));
}

#[tokio::test]
async fn grants_decide_who_sends_receives_owns_and_administers() {
    let s = Secured::start(Duration::from_secs(5), |_| {}).await;
    let (alice, _) = s
        .principal(
            "alice",
            &[(Own, "alice", false), (SendAs, "planner", false)],
        )
        .await;
    let (mallory, _) = s
        .principal(
            "mallory",
            &[
                (Own, "mallory", false),
                (SendAs, "*", false),
                (SendAs, "planner", true),
                (ReceiveAs, "planner", false),
            ],
        )
        .await;
    let run = alice
        .start_run(RunConfig::new("alice"))
        .await
        .expect("alice's run")
        .id;
    refused(
        alice.start_run(RunConfig::new("bob")).await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );

    // 2: subscribing as an agent without receive_as.
    refused(
        mallory.subscribe("worker", "m1", 1).await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );

    // 3: a source without send_as (deny wins over send_as *); no source
    // on a run one does not own; completing another owner's run (no right
    // to the run and no read: answered as if it did not exist).
    let as_planner = Handoff::to(&run, "worker", &note("task", 1))
        .expect("handoff")
        .from_agent("planner");
    let err = refused(
        mallory.handoff(as_planner).await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    assert_eq!(
        err.metadata().get("action").map(String::as_str),
        Some("send_as")
    );
    refused(
        mallory
            .handoff(Handoff::to(&run, "worker", &note("task", 1)).expect("handoff"))
            .await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    refused(
        mallory
            .handoff(Handoff::final_result(&run, &note("done", 1)).expect("final"))
            .await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(
        count(&timeline, pb::EventKind::HandoffAccepted),
        0,
        "nothing stored"
    );
    assert_eq!(
        count(&timeline, pb::EventKind::AccessDenied),
        0,
        "refusals stay out of the run's timeline"
    );
    assert_eq!(inbox(s.nats.url(), "worker").await.stored, 0);
    let run_now = s.admin.get_run(&run).await.expect("run").run.expect("run");
    assert_eq!(run_now.status, pb::RunStatus::Running as i32);

    // Alice may: she sends as planner and owns the run.
    alice
        .handoff(
            Handoff::to(&run, "worker", &note("task", 1))
                .expect("handoff")
                .from_agent("planner"),
        )
        .await
        .expect("granted");
    assert_eq!(inbox(s.nats.url(), "worker").await.stored, 1);

    // 4: registering an agent or a contract without admin.
    refused(
        alice
            .register_agent(AgentConfig::new("worker").lease(Duration::from_millis(100)))
            .await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    refused(
        alice
            .register_contract(ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET))
            .await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    let worker = s
        .admin
        .list_agents()
        .await
        .expect("agents")
        .into_iter()
        .find(|a| a.name == "worker")
        .expect("worker");
    assert_eq!(
        worker.lease.map(|d| d.seconds),
        Some(5),
        "the stored agent is unchanged"
    );
    assert!(s
        .admin
        .list_contracts(None)
        .await
        .expect("contracts")
        .is_empty());

    // Reading another owner's run needs read or own: without, it is not
    // there.
    refused(mallory.get_run(&run).await, Code::NotFound, "RUN_NOT_FOUND");
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::AccessDenied), 0);
}

#[tokio::test]
async fn a_delivery_id_cannot_be_forged_altered_or_used_by_another_agent() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    let (worker_svc, _) = s
        .principal("worker-svc", &[(ReceiveAs, "worker", false)])
        .await;
    let (planner_svc, _) = s
        .principal("planner-svc", &[(ReceiveAs, "planner", false)])
        .await;
    let (run, _held, d) = task_for_worker(&s, &worker_svc).await;
    let planner_sub = planner_svc
        .subscribe("planner", "p1", 1)
        .await
        .expect("sub");

    // Another agent's session.
    refused(
        planner_sub.ack_id(d.id()).await,
        Code::InvalidArgument,
        "BAD_DELIVERY_ID",
    );
    // A forged id.
    let other = worker_svc.subscribe("worker", "w2", 1).await.expect("sub");
    refused(
        other.ack_id("aGFuZG9mZi1mb3JnZXJ5").await,
        Code::InvalidArgument,
        "BAD_DELIVERY_ID",
    );
    // The real id altered by one byte (its attempt: 1 -> 3).
    let mut token = decode(d.id());
    token.attempt = 3;
    refused(
        other.ack_id(&encode(&token)).await,
        Code::PermissionDenied,
        "BAD_SIGNATURE",
    );
    let mut token = decode(d.id());
    if let Some(b) = token.signature.first_mut() {
        *b ^= 0x01;
    }
    refused(
        other.ack_id(&encode(&token)).await,
        Code::PermissionDenied,
        "BAD_SIGNATURE",
    );
    // The delivery is still held by its instance, which settles it.
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Acked), 0);
    d.ack().await.expect("its holder acks");
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Acked), 1);
    assert_eq!(count(&timeline, pb::EventKind::Delivered), 1);
}

#[tokio::test]
async fn an_outlived_lease_settles_nothing_and_its_successor_does() {
    let lease = Duration::from_secs(1);
    let s = Secured::start(lease, |_| {}).await;
    let (worker_svc, _) = s
        .principal("worker-svc", &[(ReceiveAs, "worker", false)])
        .await;
    let run = s
        .admin
        .start_run(RunConfig::new("ops"))
        .await
        .expect("run")
        .id;
    let mut a = worker_svc.subscribe("worker", "a", 1).await.expect("a");
    s.admin
        .handoff(Handoff::to(&run, "worker", &note("task", 1)).expect("handoff"))
        .await
        .expect("task");
    let first = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("A's attempt");
    assert_eq!(first.attempt(), 1);
    // B waits with a pull outstanding while A holds its only slot, so the
    // redelivery after A's lease goes to B.
    let mut b = worker_svc.subscribe("worker", "b", 1).await.expect("b");
    let second = next_within(&mut b, Duration::from_secs(10))
        .await
        .expect("B's attempt after A's lease passed");
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.handoff_id(), first.handoff_id());

    refused(
        first.ack().await,
        Code::FailedPrecondition,
        "LEASE_SUPERSEDED",
    );
    refused(
        first.nack(None).await,
        Code::FailedPrecondition,
        "LEASE_SUPERSEDED",
    );
    refused(
        first.reject("too late").await,
        Code::FailedPrecondition,
        "LEASE_SUPERSEDED",
    );
    refused(
        first.extend().await,
        Code::FailedPrecondition,
        "LEASE_SUPERSEDED",
    );
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Rejected), 0);
    assert_eq!(count(&timeline, pb::EventKind::Acked), 0);
    let status = s
        .admin
        .get_run(&run)
        .await
        .expect("run")
        .run
        .expect("run")
        .status;
    assert_eq!(
        status,
        pb::RunStatus::Running as i32,
        "the run is not failed"
    );

    second.ack().await.expect("B's ack settles it");
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Acked), 1);
    let state = inbox(s.nats.url(), "worker").await;
    assert_eq!((state.pending, state.unacked), (0, 0), "settled once");
}

#[tokio::test]
async fn a_reject_after_an_ack_is_already_settled() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    let (worker_svc, _) = s
        .principal("worker-svc", &[(ReceiveAs, "worker", false)])
        .await;
    let (run, sub, d) = task_for_worker(&s, &worker_svc).await;
    d.ack().await.expect("ack");
    // The repeated ack (an answer lost) is confirmed; a reject is not.
    sub.ack_id(d.id()).await.expect("the same ack again");
    refused(
        d.reject("changed my mind").await,
        Code::FailedPrecondition,
        "ALREADY_SETTLED",
    );
    let got = s.admin.get_run(&run).await.expect("run");
    assert_eq!(
        got.run.expect("run").status,
        pb::RunStatus::Running as i32,
        "the run is not failed"
    );
    assert_eq!(count(&got.timeline, pb::EventKind::Rejected), 0);
    assert_eq!(count(&got.timeline, pb::EventKind::Acked), 1);
}
