//! Fan-out and join: parallel branches that meet at a barrier.
//!
//! A planner hands a list of items to a worker agent, one branch per item,
//! and names the agent that receives the joined results:
//! [`Client::fan_out`] or [`Delivery::fan_out`] build a [`FanOut`], and
//! [`FanOut::join`] opens the barrier and hands off every branch in one
//! `FanOut` call (a chord), so the barrier exists before any branch can
//! reach it. Each worker answers its branch with [`Delivery::to_barrier`]
//! (or reports it [skipped](Delivery::skip_branch) or
//! [failed](Delivery::fail_branch)) instead of handing off to an agent.
//! When the barrier is satisfied the broker hands its target exactly one
//! delivery whose payload is a [`pb::BarrierRelease`];
//! [`Delivery::join`] decodes it into a [`Join`] of the workers' typed
//! results, in branch-key order.
//!
//! A fan-out without an explicit [`barrier_id`](FanOut::barrier_id) gets
//! a deterministic one: derived from the delivery it consumes (a
//! planner's input), so a planner that is redelivered its input and redoes
//! the work, even with other items, meets the barrier of its first
//! fan-out and the broker answers with that fan-out's branches; or, with
//! no delivery consumed, from what it hands out, so a retry repeats the
//! same branch handoffs. Either way there is never a second join.

use std::time::{Duration, SystemTime};

use crate::{
    error::{Error, ErrorKind, Result},
    handoff::{encode, type_name, Receipt},
    pb, Client, Delivery,
};

/// How the barrier of a [`FanOut`] releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinMode {
    /// When every branch has arrived, failed or been skipped.
    All,
    /// At the k-th arrived branch; the branches after it are recorded as
    /// late and never released again. k must be in `1..=branches`; a
    /// barrier that can no longer reach k releases a failure.
    Quorum(u32),
}

impl JoinMode {
    /// Sets the mode and quorum of `spec`.
    fn apply(self, spec: &mut pb::BarrierSpec) {
        match self {
            JoinMode::All => {
                spec.mode = pb::BarrierMode::All as i32;
                spec.quorum = 0;
            }
            JoinMode::Quorum(k) => {
                spec.mode = pb::BarrierMode::Quorum as i32;
                spec.quorum = k;
            }
        }
    }
}

/// A fan-out to build: from [`Client::fan_out`] or [`Delivery::fan_out`],
/// refined with the builder methods, sent with [`FanOut::join`].
///
/// Each item becomes one branch handoff to the worker agent. By default
/// the branches are counted (keys `"0"`, `"1"`, ... in item order) and the
/// barrier waits for all of them, without a timeout.
#[must_use = "a FanOut does nothing until it is joined"]
#[derive(Debug, Clone)]
pub struct FanOut {
    client: Client,
    /// The delivery the branches consume (a planner's input), if any.
    delivery: Option<Delivery>,
    run_id: String,
    worker: String,
    source_agent: String,
    /// The encoded items, or the first encode error (reported by `join`).
    items: Result<Vec<prost_types::Any>>,
    keys: Option<Vec<String>>,
    barrier_id: Option<String>,
    timeout: Option<Duration>,
    release_partial: bool,
    fail_fast: bool,
}

impl FanOut {
    pub(crate) fn new<M: prost::Message + prost::Name>(
        client: Client,
        delivery: Option<Delivery>,
        run_id: String,
        worker: String,
        source_agent: String,
        items: impl IntoIterator<Item = M>,
    ) -> FanOut {
        let items = items.into_iter().map(|m| encode(&m)).collect();
        FanOut {
            client,
            delivery,
            run_id,
            worker,
            source_agent,
            items,
            keys: None,
            barrier_id: None,
            timeout: None,
            release_partial: false,
            fail_fast: false,
        }
    }

    /// Names the barrier (default: `join-` and 16 hex digits of a hash of
    /// the run, the consumed delivery's handoff, the worker and the
    /// aggregator, so a planner that redoes its fan-out after a crash, even
    /// with other items, meets the barrier it opened first and the broker
    /// answers with the first fan-out; without a consumed delivery, of the
    /// run, the worker, the aggregator, the mode, the keys and the encoded
    /// items, so the same fan-out repeated opens the same barrier).
    pub fn barrier_id(mut self, barrier_id: impl Into<String>) -> Self {
        self.barrier_id = Some(barrier_id.into());
        self
    }

    /// Names the branches, one key per item in item order (default: the
    /// keys `"0"`, `"1"`, ..., as a branch count). Keys are
    /// `[A-Za-z0-9_-]{1,128}` and distinct; the release lists branches in
    /// this order.
    pub fn keys<K: Into<String>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.keys = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Releases the barrier when `timeout` passes after it opened, even if
    /// branches are missing: as a failure (`failure` and `timed_out` set in
    /// the release the aggregator receives; the run goes on, its owner sees
    /// the failed release) unless
    /// [`on_timeout_release_partial`](FanOut::on_timeout_release_partial).
    /// Default: no timeout (the run's deadline still applies).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// At the timeout, release what arrived and list the missing branches,
    /// instead of failing.
    pub fn on_timeout_release_partial(mut self) -> Self {
        self.release_partial = true;
        self
    }

    /// Release a failure as soon as one branch fails.
    pub fn fail_fast(mut self) -> Self {
        self.fail_fast = true;
        self
    }

    /// Names the agent handing off (default: the consumed delivery's
    /// agent for [`Delivery::fan_out`]; none, i.e. the run's owner, for
    /// [`Client::fan_out`]).
    pub fn from_agent(mut self, source: impl Into<String>) -> Self {
        self.source_agent = source.into();
        self
    }

    /// The request [`join`](FanOut::join) sends: the barrier targeting
    /// `aggregator` with `mode`, and one handoff per item.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidArgument`] when an item did not encode, there
    /// are no items, or the number of [`keys`](FanOut::keys) differs from
    /// the number of items. Everything else (names, quorum range,
    /// duplicate keys) is checked by the broker.
    pub fn request(&self, aggregator: &str, mode: JoinMode) -> Result<pb::FanOutRequest> {
        let items = self.items.as_ref().map_err(Clone::clone)?;
        if items.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "a fan-out needs at least one item",
            ));
        }
        let keys: Vec<String> = match &self.keys {
            Some(keys) if keys.len() != items.len() => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{} keys for {} items: give one key per item",
                        keys.len(),
                        items.len()
                    ),
                ))
            }
            Some(keys) => keys.clone(),
            None => (0..items.len()).map(|i| i.to_string()).collect(),
        };
        let barrier_id = match &self.barrier_id {
            Some(id) => id.clone(),
            None => self.default_barrier_id(aggregator, mode, &keys, items),
        };
        let mut spec = pb::BarrierSpec {
            run_id: self.run_id.clone(),
            barrier_id: barrier_id.clone(),
            fail_fast: self.fail_fast,
            timeout: self
                .timeout
                .and_then(|t| prost_types::Duration::try_from(t).ok()),
            on_timeout: if self.release_partial {
                pb::OnTimeout::ReleasePartial
            } else {
                pb::OnTimeout::Fail
            } as i32,
            target_agent: aggregator.to_string(),
            ..Default::default()
        };
        if self.keys.is_some() {
            spec.branch_keys = keys.clone();
        } else {
            spec.branch_count = u32::try_from(items.len()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{} items are too many branches", items.len()),
                )
            })?;
        }
        mode.apply(&mut spec);
        let consumes = self
            .delivery
            .as_ref()
            .map(|d| d.id().to_string())
            .unwrap_or_default();
        // Every branch continues the consumed delivery's trace.
        let mut trace_context = std::collections::HashMap::new();
        if let Some(d) = &self.delivery {
            d.continue_trace(&mut trace_context);
        }
        let branches = items
            .iter()
            .zip(&keys)
            .map(|(payload, key)| pb::HandoffRequest {
                run_id: self.run_id.clone(),
                source_agent: self.source_agent.clone(),
                target_agent: self.worker.clone(),
                payload: Some(payload.clone()),
                barrier_id: barrier_id.clone(),
                branch_key: key.clone(),
                idempotency_key: branch_idempotency_key(&barrier_id, key),
                fan_out: !consumes.is_empty(),
                consumes: consumes.clone(),
                trace_context: trace_context.clone(),
                ..Default::default()
            })
            .collect();
        Ok(pb::FanOutRequest {
            barrier: Some(spec),
            branches,
        })
    }

    /// Opens the barrier, which releases to `aggregator` according to
    /// `mode`, and hands off every branch to the worker agent, in one
    /// call. Accepted means the barrier is open and every branch is
    /// durably stored; from a delivery, that delivery is then settled
    /// (the broker acks it after the last branch). Repeating the same
    /// fan-out (after UNAVAILABLE, or a redelivery) answers the same
    /// barrier and the same branch handoffs, marked duplicate.
    ///
    /// # Errors
    ///
    /// Those of [`request`](FanOut::request), and the broker's: a bad
    /// spec or name (INVALID_ARGUMENT), an unknown aggregator or run
    /// (NOT_FOUND), a barrier of the same id open with another spec
    /// (ALREADY_EXISTS), a branch refused by the worker's contract
    /// (FAILED_PRECONDITION) or its source's undeclared emit
    /// (PERMISSION_DENIED).
    pub async fn join(
        self,
        aggregator: impl Into<String>,
        mode: JoinMode,
    ) -> Result<FanOutReceipt> {
        let aggregator = aggregator.into();
        let req = self.request(&aggregator, mode)?;
        let barrier_id = req
            .barrier
            .as_ref()
            .map(|b| b.barrier_id.clone())
            .unwrap_or_default();
        let keys: Vec<String> = req.branches.iter().map(|b| b.branch_key.clone()).collect();
        let resp = self.client.send_fan_out(req).await?;
        // A redo is answered with the first fan-out: its barrier's keys.
        let keys = match resp.barrier.as_ref().and_then(|b| b.spec.as_ref()) {
            Some(spec) if !spec.branch_keys.is_empty() => spec.branch_keys.clone(),
            Some(spec) if spec.branch_count > 0 => {
                (0..spec.branch_count).map(|i| i.to_string()).collect()
            }
            _ => keys,
        };
        let branches: Vec<Receipt> = resp.branches.into_iter().map(Receipt::from).collect();
        if let Some(delivery) = &self.delivery {
            // The broker acked the consumed delivery after the last branch.
            let made = keys.iter().zip(&branches).map(|(key, receipt)| {
                (
                    branch_idempotency_key(&barrier_id, key),
                    receipt.handoff_id.clone(),
                )
            });
            delivery.fanned_out(&self.worker, made);
        }
        if branches.len() != keys.len() {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "the broker answered {} branch handoffs for {} branches",
                    branches.len(),
                    keys.len()
                ),
            ));
        }
        let barrier = resp.barrier.ok_or_else(|| {
            Error::new(ErrorKind::Other, "the broker answered without the barrier")
        })?;
        Ok(FanOutReceipt {
            barrier_id,
            keys,
            branches,
            barrier,
        })
    }

    /// The deterministic barrier id: `join-` and a 64-bit FNV-1a hash, in
    /// hex, of everything that makes this fan-out what it is.
    fn default_barrier_id(
        &self,
        aggregator: &str,
        mode: JoinMode,
        keys: &[String],
        items: &[prost_types::Any],
    ) -> String {
        let mut h = Fnv1a::new();
        h.field(b"handoff fan-out");
        h.field(self.run_id.as_bytes());
        h.field(
            self.delivery
                .as_ref()
                .map(|d| d.handoff_id())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.field(self.worker.as_bytes());
        h.field(aggregator.as_bytes());
        if self.delivery.is_some() {
            // Identified by the delivery it consumes, not by its content.
            return format!("join-{:016x}", h.finish());
        }
        match mode {
            JoinMode::All => h.field(b"all"),
            JoinMode::Quorum(k) => {
                h.field(b"quorum");
                h.field(&k.to_le_bytes());
            }
        }
        h.field(if self.keys.is_some() {
            b"keys"
        } else {
            b"count"
        });
        h.field(&(keys.len() as u64).to_le_bytes());
        for key in keys {
            h.field(key.as_bytes());
        }
        for item in items {
            h.field(item.type_url.as_bytes());
            h.field(&item.value);
        }
        format!("join-{:016x}", h.finish())
    }
}

/// The idempotency key of a branch handoff (the one the broker would
/// fill in): distinct per branch, the same on every repetition.
fn branch_idempotency_key(barrier_id: &str, key: &str) -> String {
    format!("fan-out/{barrier_id}/{key}")
}

/// 64-bit FNV-1a, for deterministic ids (stable across processes and
/// releases, unlike `std`'s hasher).
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Fnv1a {
        Fnv1a(Self::OFFSET)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// A length-prefixed field, so that `("ab", "c")` and `("a", "bc")`
    /// hash differently.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the broker answered to an accepted [`FanOut`].
#[derive(Debug, Clone, PartialEq)]
pub struct FanOutReceipt {
    /// The barrier's id (the default one unless named).
    pub barrier_id: String,
    /// The branch keys, in item order.
    pub keys: Vec<String>,
    /// One receipt per branch handoff, in item order (`keys[i]` is the
    /// key of `branches[i]`); `duplicate` when the fan-out was repeated.
    pub branches: Vec<Receipt>,
    /// The barrier as it stood after the branches were handed off.
    pub barrier: pb::Barrier,
}

// ------------------------------------------------------------ join

/// A barrier's release decoded: every branch in branch-key order with the
/// workers' results as `T`. From [`Delivery::join`] or
/// [`Join::from_release`].
#[derive(Debug, Clone, PartialEq)]
pub struct Join<T> {
    /// The run.
    pub run_id: String,
    /// The barrier that released.
    pub barrier_id: String,
    /// Every branch in branch-key order, missing ones included.
    pub branches: Vec<Branch<T>>,
    /// Keys of the branches that had not arrived at the release.
    pub missing: Vec<String>,
    /// Keys of the branches that failed.
    pub failed: Vec<String>,
    /// Keys of the branches that were skipped.
    pub skipped: Vec<String>,
    /// Arrived branches / expected branches.
    pub confidence: f64,
    /// What the receiver should know: failed branches with their reasons,
    /// branches missing at a timeout, a quorum reached or not.
    pub warnings: Vec<String>,
    /// True when the release is a failure (fail-fast, a quorum that can
    /// no longer be reached, or a timeout with FAIL).
    pub failure: bool,
    /// True when the barrier released because its timeout fired.
    pub timed_out: bool,
}

/// One branch of a [`Join`].
#[derive(Debug, Clone, PartialEq)]
pub struct Branch<T> {
    /// The branch key.
    pub key: String,
    /// ARRIVED, FAILED, SKIPPED or MISSING.
    pub status: pb::BranchStatus,
    /// The worker's result: set for an arrived branch that carries one,
    /// and for a failed or skipped branch whose payload is a `T` (a
    /// partial result); `None` for a missing branch and for a failed or
    /// skipped one that carries something else (such as the reason).
    pub result: Option<T>,
    /// The branch handoff's id (empty for a missing branch).
    pub handoff_id: String,
    /// The agent that reported the branch.
    pub source_agent: String,
    /// The branch's confidence in [0, 1].
    pub confidence: f64,
    /// The branch's warnings (the reason of a failed or skipped branch).
    pub warnings: Vec<String>,
    /// The branch handoff's depth in the run.
    pub depth: u32,
    /// When the branch reached the barrier.
    pub arrived_at: Option<SystemTime>,
}

impl<T> Branch<T> {
    /// True for a branch that arrived with a result (not failed, skipped
    /// or missing).
    pub fn arrived(&self) -> bool {
        self.status == pb::BranchStatus::Arrived
    }
}

impl<T: prost::Message + prost::Name + Default> Join<T> {
    /// Decodes a release: each arrived branch's result as `T`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`], naming the branch key, when an arrived
    /// branch's result is not a `T` or does not decode as one (or a failed
    /// or skipped branch's payload claims to be a `T` but does not decode).
    pub fn from_release(release: pb::BarrierRelease) -> Result<Join<T>> {
        let branches = release
            .branches
            .into_iter()
            .map(|b| {
                let status = branch_status(b.status);
                let result = decode_result::<T>(&b.key, status, b.payload.as_ref())?;
                Ok(Branch {
                    key: b.key,
                    status,
                    result,
                    handoff_id: b.handoff_id,
                    source_agent: b.source_agent,
                    confidence: b.confidence,
                    warnings: b.warnings,
                    depth: b.depth,
                    arrived_at: b.arrived_at.and_then(|t| SystemTime::try_from(t).ok()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Join {
            run_id: release.run_id,
            barrier_id: release.barrier_id,
            branches,
            missing: release.missing,
            failed: release.failed,
            skipped: release.skipped,
            confidence: release.confidence,
            warnings: release.warnings,
            failure: release.failure,
            timed_out: release.timed_out,
        })
    }
}

impl<T> Join<T> {
    /// The results of the arrived branches, with their keys, in
    /// branch-key order.
    pub fn results(&self) -> impl Iterator<Item = (&str, &T)> + '_ {
        self.branches
            .iter()
            .filter(|b| b.arrived())
            .filter_map(|b| b.result.as_ref().map(|r| (b.key.as_str(), r)))
    }

    /// The branch with key `key`.
    pub fn branch(&self, key: &str) -> Option<&Branch<T>> {
        self.branches.iter().find(|b| b.key == key)
    }
}

/// A branch status as the broker means it: UNSPECIFIED is ARRIVED (the
/// default of a branch handoff); a value this SDK does not know counts as
/// FAILED, never as a result.
fn branch_status(status: i32) -> pb::BranchStatus {
    match pb::BranchStatus::try_from(status) {
        Ok(pb::BranchStatus::Unspecified) => pb::BranchStatus::Arrived,
        Ok(s) => s,
        Err(_) => pb::BranchStatus::Failed,
    }
}

/// The result of branch `key` as `T` (see [`Branch::result`]).
fn decode_result<T: prost::Message + prost::Name + Default>(
    key: &str,
    status: pb::BranchStatus,
    payload: Option<&prost_types::Any>,
) -> Result<Option<T>> {
    let Some(any) = payload else {
        return Ok(None);
    };
    let expected = T::full_name();
    let actual = type_name(&any.type_url);
    if actual != expected {
        if status == pb::BranchStatus::Arrived {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("branch {key:?}: its result is a {actual}, not a {expected}"),
            ));
        }
        return Ok(None);
    }
    T::decode(any.value.as_slice()).map(Some).map_err(|e| {
        Error::new(
            ErrorKind::Decode,
            format!("branch {key:?}: its result does not decode as {expected}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnectOptions, Handoff};
    use handoff_proto::demo;

    /// A client that never connects (the tests only build requests).
    async fn client() -> Client {
        match ConnectOptions::new()
            .lazy(true)
            .connect("127.0.0.1:1")
            .await
        {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn subtasks(n: u32) -> Vec<demo::Subtask> {
        (0..n)
            .map(|i| demo::Subtask {
                index: i,
                of: n,
                instruction: format!("part {i}"),
                sources: vec![],
            })
            .collect()
    }

    fn ok<T>(r: Result<T>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn counted_branches_by_default() {
        let c = client().await;
        let req = ok(c
            .fan_out("run-1", "worker", subtasks(3))
            .request("aggregator", JoinMode::All));
        let spec = req.barrier.clone().unwrap_or_default();
        assert_eq!(spec.run_id, "run-1");
        assert_eq!(spec.target_agent, "aggregator");
        assert_eq!(spec.branch_count, 3);
        assert!(spec.branch_keys.is_empty());
        assert_eq!(spec.mode, pb::BarrierMode::All as i32);
        assert_eq!(spec.quorum, 0);
        assert_eq!(spec.on_timeout, pb::OnTimeout::Fail as i32);
        assert_eq!(spec.timeout, None);
        assert!(!spec.fail_fast);
        assert!(spec.barrier_id.starts_with("join-"), "{}", spec.barrier_id);
        assert_eq!(spec.barrier_id.len(), "join-".len() + 16);
        let keys: Vec<&str> = req.branches.iter().map(|b| b.branch_key.as_str()).collect();
        assert_eq!(keys, ["0", "1", "2"]);
        for (i, b) in req.branches.iter().enumerate() {
            assert_eq!(b.run_id, "run-1");
            assert_eq!(b.target_agent, "worker");
            assert_eq!(b.barrier_id, spec.barrier_id);
            assert_eq!(
                b.idempotency_key,
                format!("fan-out/{}/{i}", spec.barrier_id)
            );
            assert!(b.consumes.is_empty() && !b.fan_out && !b.to_barrier);
            assert!(b.source_agent.is_empty());
            let task: demo::Subtask = ok(crate::decode(&b.payload.clone().unwrap_or_default()));
            assert_eq!(task.index, i as u32);
        }
    }

    #[tokio::test]
    async fn named_keys_quorum_and_options() {
        let c = client().await;
        let req = ok(c
            .fan_out("run-1", "worker", subtasks(3))
            .keys(["eu", "us", "asia"])
            .barrier_id("regions")
            .timeout(Duration::from_secs(30))
            .on_timeout_release_partial()
            .fail_fast()
            .from_agent("planner")
            .request("aggregator", JoinMode::Quorum(2)));
        let spec = req.barrier.clone().unwrap_or_default();
        assert_eq!(spec.barrier_id, "regions");
        assert_eq!(spec.branch_keys, ["eu", "us", "asia"]);
        assert_eq!(spec.branch_count, 0);
        assert_eq!(spec.mode, pb::BarrierMode::Quorum as i32);
        assert_eq!(spec.quorum, 2);
        assert_eq!(spec.on_timeout, pb::OnTimeout::ReleasePartial as i32);
        assert_eq!(
            spec.timeout,
            Some(prost_types::Duration {
                seconds: 30,
                nanos: 0
            })
        );
        assert!(spec.fail_fast);
        let keys: Vec<&str> = req.branches.iter().map(|b| b.branch_key.as_str()).collect();
        assert_eq!(keys, ["eu", "us", "asia"]);
        assert!(req.branches.iter().all(|b| b.source_agent == "planner"));
        assert_eq!(req.branches[1].idempotency_key, "fan-out/regions/us");
    }

    #[tokio::test]
    async fn bad_fan_outs_are_refused_before_sending() {
        let c = client().await;
        let err = c
            .fan_out("r", "worker", subtasks(3))
            .keys(["a", "b"])
            .request("aggregator", JoinMode::All)
            .err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::InvalidArgument));
        let err = c
            .fan_out("r", "worker", Vec::<demo::Subtask>::new())
            .request("aggregator", JoinMode::All)
            .err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::InvalidArgument));
        let err = c
            .fan_out("r", "worker", Vec::<demo::Subtask>::new())
            .join("aggregator", JoinMode::All)
            .await
            .err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::InvalidArgument));
    }

    #[tokio::test]
    async fn default_barrier_id_is_deterministic() {
        let c = client().await;
        let id = |f: FanOut, aggregator: &str, mode: JoinMode| {
            ok(f.request(aggregator, mode))
                .barrier
                .unwrap_or_default()
                .barrier_id
        };
        let base = || c.fan_out("run-1", "worker", subtasks(3));
        let first = id(base(), "aggregator", JoinMode::All);
        // Stable across calls and processes (a fixed hash, not std's).
        assert_eq!(first, id(base(), "aggregator", JoinMode::All));
        assert_eq!(first, "join-5d46028fee5b3d68");
        // Anything that changes the fan-out changes the barrier.
        let others = [
            id(
                c.fan_out("run-2", "worker", subtasks(3)),
                "aggregator",
                JoinMode::All,
            ),
            id(
                c.fan_out("run-1", "critic", subtasks(3)),
                "aggregator",
                JoinMode::All,
            ),
            id(base(), "editor", JoinMode::All),
            id(base(), "aggregator", JoinMode::Quorum(2)),
            id(base(), "aggregator", JoinMode::Quorum(3)),
            id(base().keys(["a", "b", "c"]), "aggregator", JoinMode::All),
            id(
                c.fan_out("run-1", "worker", subtasks(4)),
                "aggregator",
                JoinMode::All,
            ),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(&first, other, "variant {i}");
        }
        // Options that do not shape the branches keep the id.
        assert_eq!(
            first,
            id(base().fail_fast(), "aggregator", JoinMode::All),
            "fail_fast is part of the spec, not of the id"
        );
        assert_eq!(
            id(base().barrier_id("mine"), "aggregator", JoinMode::All),
            "mine"
        );
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        let hash = |s: &str| {
            let mut h = Fnv1a::new();
            h.bytes(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn join_modes_map_to_the_spec() {
        let mut spec = pb::BarrierSpec::default();
        JoinMode::Quorum(3).apply(&mut spec);
        assert_eq!(
            (spec.mode, spec.quorum),
            (pb::BarrierMode::Quorum as i32, 3)
        );
        JoinMode::All.apply(&mut spec);
        assert_eq!((spec.mode, spec.quorum), (pb::BarrierMode::All as i32, 0));
    }

    #[test]
    fn to_barrier_builder() {
        let result = demo::WorkerResult {
            index: 1,
            of: 2,
            summary: "s".into(),
            citations: vec![],
        };
        let h = ok(Handoff::to_barrier("run-1", "join", "1", &result))
            .branch_status(pb::BranchStatus::Skipped);
        let req = h.request();
        assert!(req.to_barrier && !req.r#final);
        assert!(req.target_agent.is_empty());
        assert_eq!(
            (
                req.run_id.as_str(),
                req.barrier_id.as_str(),
                req.branch_key.as_str()
            ),
            ("run-1", "join", "1")
        );
        assert_eq!(req.branch_status, pb::BranchStatus::Skipped as i32);
    }

    fn any<M: prost::Message + prost::Name>(m: &M) -> Option<prost_types::Any> {
        Some(ok(encode(m)))
    }

    fn result(i: u32) -> demo::WorkerResult {
        demo::WorkerResult {
            index: i,
            of: 4,
            summary: format!("summary {i}"),
            citations: vec![],
        }
    }

    fn release() -> pb::BarrierRelease {
        pb::BarrierRelease {
            run_id: "run-1".into(),
            barrier_id: "join".into(),
            branches: vec![
                pb::BranchResult {
                    key: "0".into(),
                    status: pb::BranchStatus::Arrived as i32,
                    payload: any(&result(0)),
                    handoff_id: "h0".into(),
                    source_agent: "worker".into(),
                    confidence: 0.9,
                    depth: 3,
                    arrived_at: Some(prost_types::Timestamp {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                pb::BranchResult {
                    key: "1".into(),
                    status: pb::BranchStatus::Skipped as i32,
                    payload: any(&"nothing to read".to_string()),
                    handoff_id: "h1".into(),
                    warnings: vec!["nothing to read".into()],
                    ..Default::default()
                },
                pb::BranchResult {
                    key: "2".into(),
                    status: pb::BranchStatus::Missing as i32,
                    ..Default::default()
                },
                pb::BranchResult {
                    key: "3".into(),
                    // UNSPECIFIED: arrived.
                    payload: any(&result(3)),
                    handoff_id: "h3".into(),
                    ..Default::default()
                },
            ],
            missing: vec!["2".into()],
            skipped: vec!["1".into()],
            confidence: 0.5,
            warnings: vec!["branch 2 missing at timeout".into()],
            timed_out: true,
            ..Default::default()
        }
    }

    #[test]
    fn join_decodes_every_branch_in_key_order() {
        let join = ok(Join::<demo::WorkerResult>::from_release(release()));
        assert_eq!(join.barrier_id, "join");
        assert_eq!(join.run_id, "run-1");
        let keys: Vec<&str> = join.branches.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(keys, ["0", "1", "2", "3"]);
        let statuses: Vec<pb::BranchStatus> = join.branches.iter().map(|b| b.status).collect();
        assert_eq!(
            statuses,
            [
                pb::BranchStatus::Arrived,
                pb::BranchStatus::Skipped,
                pb::BranchStatus::Missing,
                pb::BranchStatus::Arrived
            ]
        );
        assert_eq!(join.branches[0].result, Some(result(0)));
        assert_eq!(join.branches[0].source_agent, "worker");
        assert_eq!(join.branches[0].depth, 3);
        assert_eq!(
            join.branches[0].arrived_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        );
        assert_eq!(join.branches[1].result, None, "a skip reason is not a T");
        assert_eq!(join.branches[1].warnings, ["nothing to read"]);
        assert_eq!(join.branches[2].result, None);
        assert!(join.branches[2].handoff_id.is_empty());
        let results: Vec<(&str, u32)> = join.results().map(|(k, r)| (k, r.index)).collect();
        assert_eq!(results, [("0", 0), ("3", 3)]);
        assert_eq!(join.missing, ["2"]);
        assert_eq!(join.skipped, ["1"]);
        assert!(join.failed.is_empty());
        assert_eq!(join.confidence, 0.5);
        assert!(join.timed_out && !join.failure);
        assert_eq!(join.warnings, ["branch 2 missing at timeout"]);
        assert_eq!(join.branch("3").map(|b| b.handoff_id.as_str()), Some("h3"));
        assert!(join.branch("9").is_none());
    }

    #[test]
    fn a_mistyped_branch_is_a_decode_error_naming_its_key() {
        let mut r = release();
        r.branches[3].payload = any(&demo::Subtask::default());
        let err = Join::<demo::WorkerResult>::from_release(r).err();
        let Some(err) = err else {
            panic!("a Subtask decoded as a WorkerResult")
        };
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.message().contains("branch \"3\""), "{}", err.message());
        assert!(
            err.message().contains("handoff.demo.v1.Subtask"),
            "{}",
            err.message()
        );
        // Bytes that claim to be a T but are not one.
        let mut r = release();
        r.branches[0].payload = Some(prost_types::Any {
            type_url: "type.googleapis.com/handoff.demo.v1.WorkerResult".into(),
            value: vec![0xff, 0xff, 0xff],
        });
        let err = Join::<demo::WorkerResult>::from_release(r).err();
        assert_eq!(err.as_ref().map(|e| e.kind()), Some(ErrorKind::Decode));
        assert!(
            err.is_some_and(|e| e.message().contains("branch \"0\"")),
            "the error names the key"
        );
    }

    #[test]
    fn unknown_statuses_never_count_as_results() {
        assert_eq!(branch_status(0), pb::BranchStatus::Arrived);
        assert_eq!(branch_status(99), pb::BranchStatus::Failed);
        let mut r = release();
        r.branches[0].status = 99;
        let join = ok(Join::<demo::WorkerResult>::from_release(r));
        assert_eq!(join.branches[0].status, pb::BranchStatus::Failed);
        // Its payload is a T: kept as a partial result, not in results().
        assert_eq!(join.branches[0].result, Some(result(0)));
        assert_eq!(join.results().count(), 1);
    }
}
