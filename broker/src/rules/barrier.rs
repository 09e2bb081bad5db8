//! The rules of a barrier: joining parallel branches into one release.
//!
//! The broker keeps a barrier in two parts: a small header (a
//! [`pb::Barrier`] holding the spec, the state, one bit per counted branch
//! and the counts by status), changed with compare-and-set, and one record
//! per branch key (the key's first result, stored once). An arrival costs
//! the same whatever the width: its record is written once, and the
//! header, whose size grows by one bit per branch, once. The functions
//! below are pure (no NATS, no clock, no I/O), deterministic and
//! idempotent: counting the same key twice changes nothing the second
//! time, and a barrier that has released never changes its verdict.
//!
//! - [`branch_keys`] checks a spec and lists its branch keys;
//! - [`KeyIndex`] finds a key's position in branch-key order;
//! - [`open`] makes a new open barrier;
//! - [`normalise`] fixes a result's status before it is stored;
//! - [`arrive`] counts one branch result in the header;
//! - [`decide`] says whether an open barrier releases now;
//! - [`release`] closes it;
//! - [`counted_branches`], [`late_keys`] and [`release_payload`] read the
//!   records back: the counted results in order, the late keys, and the
//!   [`pb::BarrierRelease`] payload;
//! - [`same_spec`] recognises an idempotent re-open.
//!
//! Branch-key order is the order of the spec's `branch_keys` for named
//! branches and numeric order ("2" before "10") for `branch_count`; the
//! release lists every branch in it.
//!
//! Specs are validated with [`branch_keys`] before a barrier is opened; the
//! other functions still accept any stored barrier without panicking (an
//! unknown mode counts as ALL, an unknown `on_timeout` as FAIL, a branch
//! count above [`MAX_BRANCHES`] as [`MAX_BRANCHES`]).

use std::collections::HashMap;

use handoff_proto::pb;

/// Most branches a barrier may join.
pub const MAX_BRANCHES: usize = 10_000;

/// Why a [`pb::BarrierSpec`] is refused. Every variant is bad input
/// (INVALID_ARGUMENT at the gRPC edge).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// `run_id`, `barrier_id` or `target_agent` is not a valid name.
    #[error("{field} {value:?} {reason}")]
    InvalidName {
        /// Which field.
        field: &'static str,
        /// The (possibly shortened) value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A named branch key is not a valid name.
    #[error("branch_keys[{index}] {value:?} {reason}")]
    InvalidBranchKey {
        /// Position in `branch_keys`.
        index: usize,
        /// The (possibly shortened) key.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A named branch key is listed more than once.
    #[error(
        "branch key {key:?} is listed twice, at branch_keys[{first}] and branch_keys[{second}]"
    )]
    DuplicateBranchKey {
        /// The key.
        key: String,
        /// Its first position.
        first: usize,
        /// Its second position.
        second: usize,
    },
    /// Both `branch_keys` and `branch_count` are set.
    #[error("branch_keys ({keys} keys) and branch_count ({count}) are both set; set exactly one")]
    KeysAndCount {
        /// Number of named keys.
        keys: usize,
        /// The branch count.
        count: u32,
    },
    /// Neither `branch_keys` nor `branch_count` is set.
    #[error("the barrier has no branches; set branch_keys or a positive branch_count")]
    NoBranches,
    /// More branches than [`MAX_BRANCHES`].
    #[error("the barrier has {count} branches; the limit is {limit}", limit = MAX_BRANCHES)]
    TooManyBranches {
        /// Number of branches asked for.
        count: usize,
    },
    /// `mode` is not a known [`pb::BarrierMode`].
    #[error("mode {0} is not a known barrier mode (ALL or QUORUM)")]
    UnknownMode(i32),
    /// QUORUM with a quorum outside `1..=branches`.
    #[error("quorum {quorum} is out of range for mode QUORUM with {branches} branches; it must be 1..={branches}")]
    QuorumOutOfRange {
        /// The quorum asked for.
        quorum: u32,
        /// Number of branches.
        branches: usize,
    },
    /// A quorum set with mode ALL.
    #[error("quorum {0} is set but mode is ALL; quorum applies to mode QUORUM only")]
    QuorumWithAll(u32),
    /// `on_timeout` is not a known [`pb::OnTimeout`].
    #[error("on_timeout {0} is not a known value (FAIL or RELEASE_PARTIAL)")]
    UnknownOnTimeout(i32),
    /// A timeout that is zero, negative or not a normalised duration.
    #[error("timeout {seconds}s {nanos}ns is not a positive duration")]
    NonPositiveTimeout {
        /// The timeout's seconds.
        seconds: i64,
        /// The timeout's nanoseconds.
        nanos: i32,
    },
}

/// What [`arrive`] did with a branch result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Recorded: the barrier is open and the key had not arrived yet.
    Counted,
    /// The key had arrived already; the barrier is unchanged (first writer
    /// wins, whatever the new content).
    Duplicate,
    /// The barrier had released (or failed) before this key arrived; the
    /// key is in `late` (once).
    Late,
    /// The key is not one of the spec's branches; the barrier is unchanged.
    UnknownKey,
}

/// Whether an open barrier releases now (see [`decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep waiting.
    Wait,
    /// Release now.
    Release {
        /// The release is a failure (state FAILED).
        failure: bool,
        /// The release happens because the timeout fired.
        timed_out: bool,
    },
}

/// Checks a spec and returns its branch keys in branch-key order.
///
/// The keys are the named `branch_keys` in the order given (each a valid
/// name, no duplicates, at most [`MAX_BRANCHES`]) or "0".."n-1" for
/// `branch_count` n in `1..=MAX_BRANCHES`; exactly one of the two must be
/// set. `run_id`, `barrier_id` and `target_agent` must be valid names
/// (`[A-Za-z0-9_-]{1,128}`). Mode UNSPECIFIED means ALL; QUORUM needs
/// `1 <= quorum <= branches` and ALL needs `quorum == 0`. `on_timeout`
/// UNSPECIFIED means FAIL. A timeout, when set, must be a positive,
/// normalised duration.
///
/// # Errors
///
/// The first problem found, as a [`BarrierError`].
pub fn branch_keys(spec: &pb::BarrierSpec) -> Result<Vec<String>, BarrierError> {
    for (field, value) in [
        ("run_id", &spec.run_id),
        ("barrier_id", &spec.barrier_id),
        ("target_agent", &spec.target_agent),
    ] {
        if let Some(reason) = crate::rules::names::problem(value) {
            return Err(BarrierError::InvalidName {
                field,
                value: shorten(value),
                reason,
            });
        }
    }

    let keys = match (spec.branch_keys.is_empty(), spec.branch_count) {
        (true, 0) => return Err(BarrierError::NoBranches),
        (false, count) if count != 0 => {
            return Err(BarrierError::KeysAndCount {
                keys: spec.branch_keys.len(),
                count,
            })
        }
        (false, _) => {
            if spec.branch_keys.len() > MAX_BRANCHES {
                return Err(BarrierError::TooManyBranches {
                    count: spec.branch_keys.len(),
                });
            }
            let mut seen: HashMap<&str, usize> = HashMap::with_capacity(spec.branch_keys.len());
            for (index, key) in spec.branch_keys.iter().enumerate() {
                if let Some(reason) = crate::rules::names::problem(key) {
                    return Err(BarrierError::InvalidBranchKey {
                        index,
                        value: shorten(key),
                        reason,
                    });
                }
                if let Some(&first) = seen.get(key.as_str()) {
                    return Err(BarrierError::DuplicateBranchKey {
                        key: key.clone(),
                        first,
                        second: index,
                    });
                }
                seen.insert(key, index);
            }
            spec.branch_keys.clone()
        }
        (true, count) => {
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            if count > MAX_BRANCHES {
                return Err(BarrierError::TooManyBranches { count });
            }
            (0..count).map(|i| i.to_string()).collect()
        }
    };

    let mode =
        pb::BarrierMode::try_from(spec.mode).map_err(|_| BarrierError::UnknownMode(spec.mode))?;
    match mode {
        pb::BarrierMode::Unspecified | pb::BarrierMode::All => {
            if spec.quorum != 0 {
                return Err(BarrierError::QuorumWithAll(spec.quorum));
            }
        }
        pb::BarrierMode::Quorum => {
            let quorum = usize::try_from(spec.quorum).unwrap_or(usize::MAX);
            if quorum == 0 || quorum > keys.len() {
                return Err(BarrierError::QuorumOutOfRange {
                    quorum: spec.quorum,
                    branches: keys.len(),
                });
            }
        }
    }

    pb::OnTimeout::try_from(spec.on_timeout)
        .map_err(|_| BarrierError::UnknownOnTimeout(spec.on_timeout))?;

    if let Some(timeout) = &spec.timeout {
        let normalised = (0..1_000_000_000).contains(&timeout.nanos) && timeout.seconds >= 0;
        if !normalised || (timeout.seconds == 0 && timeout.nanos == 0) {
            return Err(BarrierError::NonPositiveTimeout {
                seconds: timeout.seconds,
                nanos: timeout.nanos,
            });
        }
    }

    Ok(keys)
}

/// A validated spec's branch keys, indexed: the position of a key in
/// branch-key order, and the key at a position, in constant time. Built
/// once per barrier (the spec never changes) and shared by its arrivals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIndex {
    /// Named keys in spec order, with their positions; empty for a count.
    named: Vec<String>,
    positions: HashMap<String, usize>,
    /// Number of branches.
    len: usize,
}

impl KeyIndex {
    /// The index of `spec`'s keys (named keys, or "0".."n-1" for a count
    /// capped at [`MAX_BRANCHES`]).
    pub fn of(spec: &pb::BarrierSpec) -> Self {
        if spec.branch_keys.is_empty() {
            return KeyIndex {
                named: Vec::new(),
                positions: HashMap::new(),
                len: count_of(spec),
            };
        }
        let mut positions = HashMap::with_capacity(spec.branch_keys.len());
        for (i, key) in spec.branch_keys.iter().enumerate() {
            positions.entry(key.clone()).or_insert(i);
        }
        KeyIndex {
            named: spec.branch_keys.clone(),
            positions,
            len: spec.branch_keys.len(),
        }
    }

    /// Number of branches.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the spec has no branch (a corrupt one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position of `key` in branch-key order, if it is one of the keys.
    pub fn position(&self, key: &str) -> Option<usize> {
        if self.named.is_empty() {
            count_position(key, self.len)
        } else {
            self.positions.get(key).copied()
        }
    }

    /// The key at `position` (`position < len`).
    pub fn key(&self, position: usize) -> String {
        match self.named.get(position) {
            Some(k) => k.clone(),
            None => position.to_string(),
        }
    }

    /// Every key in branch-key order.
    pub fn keys(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.len).map(|i| self.key(i))
    }
}

/// A new open barrier for `spec` (kept as given), opened at `now`, with no
/// branch counted. Validate the spec with [`branch_keys`] first.
pub fn open(spec: pb::BarrierSpec, now: prost_types::Timestamp) -> pb::Barrier {
    let expected = KeyIndex::of(&spec).len();
    pb::Barrier {
        spec: Some(spec),
        state: pb::BarrierState::Open as i32,
        opened_at: Some(now),
        counted: vec![0; expected.div_ceil(8)],
        expected: u32::try_from(expected).unwrap_or(u32::MAX),
        ..Default::default()
    }
}

/// Normalises a branch result's status before it is stored: UNSPECIFIED
/// is ARRIVED; ARRIVED, FAILED and SKIPPED stay; anything else (MISSING,
/// or a value this broker does not know) becomes FAILED with a warning
/// saying so, so that a malformed report can never count toward a
/// release as a success.
pub fn normalise(result: &mut pb::BranchResult) {
    if !matches!(
        pb::BranchStatus::try_from(result.status),
        Ok(pb::BranchStatus::Unspecified
            | pb::BranchStatus::Arrived
            | pb::BranchStatus::Failed
            | pb::BranchStatus::Skipped)
    ) {
        result.warnings.push(format!(
            "branch reported status {}; recorded as failed",
            status_name(result.status)
        ));
    }
    result.status = status_of(result.status) as i32;
}

/// Counts one branch result (already stored as its key's record) in the
/// barrier's header. Constant time and size, whatever the width.
///
/// - key not in the spec: unchanged, [`Arrival::UnknownKey`];
/// - key counted already: unchanged, [`Arrival::Duplicate`];
/// - barrier no longer open (released or failed): unchanged,
///   [`Arrival::Late`] (the record stays, not counted);
/// - otherwise its bit is set, its status counted and `last_arrival_at`
///   moved: [`Arrival::Counted`].
pub fn arrive(barrier: &mut pb::Barrier, index: &KeyIndex, result: &pb::BranchResult) -> Arrival {
    let Some(position) = index.position(&result.key) else {
        return Arrival::UnknownKey;
    };
    if is_counted(barrier, position) {
        return Arrival::Duplicate;
    }
    if barrier.state != pb::BarrierState::Open as i32 {
        return Arrival::Late;
    }
    let byte = position / 8;
    if barrier.counted.len() <= byte {
        barrier.counted.resize(byte + 1, 0);
    }
    barrier.counted[byte] |= 1 << (position % 8);
    match status_of(result.status) {
        pb::BranchStatus::Failed => barrier.failed += 1,
        pb::BranchStatus::Skipped => barrier.skipped += 1,
        _ => barrier.arrived += 1,
    }
    // The latest arrival counted (records can be counted out of their
    // time order, on replicas whose clocks differ).
    let later = |a: &prost_types::Timestamp, b: &prost_types::Timestamp| {
        (a.seconds, a.nanos) > (b.seconds, b.nanos)
    };
    if let Some(at) = result.arrived_at {
        if barrier.last_arrival_at.is_none_or(|last| later(&at, &last)) {
            barrier.last_arrival_at = Some(at);
        }
    }
    Arrival::Counted
}

/// Whether the branch at `position` is counted.
pub fn is_counted(barrier: &pb::Barrier, position: usize) -> bool {
    barrier
        .counted
        .get(position / 8)
        .is_some_and(|b| b & (1 << (position % 8)) != 0)
}

/// Whether an OPEN barrier releases now; any other barrier: [`Decision::Wait`].
///
/// In this order:
/// - `fail_fast` and a FAILED branch: `Release { failure: true }`;
/// - ALL: every branch counted (arrived, failed or skipped):
///   `Release { failure: false }`;
/// - QUORUM k: k branches ARRIVED: `Release { failure: false }`; so many
///   failed or skipped that k can no longer be reached:
///   `Release { failure: true }`;
/// - `timed_out` (the barrier's timeout fired):
///   `Release { failure: on_timeout == FAIL, timed_out: true }`;
/// - otherwise [`Decision::Wait`].
///
/// A barrier without a spec (a corrupt entry) waits.
pub fn decide(barrier: &pb::Barrier, timed_out: bool) -> Decision {
    if barrier.state != pb::BarrierState::Open as i32 {
        return Decision::Wait;
    }
    let Some(spec) = barrier.spec.as_ref() else {
        return Decision::Wait;
    };
    let expected = expected_of(barrier);
    let (arrived, failed, skipped) = (
        barrier.arrived as usize,
        barrier.failed as usize,
        barrier.skipped as usize,
    );
    let recorded = arrived + failed + skipped;

    if spec.fail_fast && failed > 0 {
        return Decision::Release {
            failure: true,
            timed_out: false,
        };
    }
    match mode_of(spec) {
        pb::BarrierMode::Quorum => {
            let quorum = quorum_of(spec);
            if arrived >= quorum {
                return Decision::Release {
                    failure: false,
                    timed_out: false,
                };
            }
            let outstanding = expected.saturating_sub(recorded);
            if arrived.saturating_add(outstanding) < quorum {
                return Decision::Release {
                    failure: true,
                    timed_out: false,
                };
            }
        }
        pb::BarrierMode::All | pb::BarrierMode::Unspecified => {
            if recorded >= expected {
                return Decision::Release {
                    failure: false,
                    timed_out: false,
                };
            }
        }
    }
    if timed_out {
        return Decision::Release {
            failure: on_timeout_of(spec) == pb::OnTimeout::Fail,
            timed_out: true,
        };
    }
    Decision::Wait
}

/// Closes the barrier: an OPEN barrier becomes RELEASED (FAILED when
/// `decision_failure`), with `released_at = now`, `release_handoff_id`,
/// and in `release` what the release was decided with (its flags and
/// confidence, no lists: [`release_payload`] builds those from the
/// records). A barrier that is no longer open is left as it is: the first
/// release wins.
pub fn release(
    barrier: &mut pb::Barrier,
    decision_failure: bool,
    timed_out: bool,
    release_handoff_id: String,
    now: prost_types::Timestamp,
) {
    if barrier.state != pb::BarrierState::Open as i32 {
        return;
    }
    let spec = barrier.spec.clone().unwrap_or_default();
    let expected = expected_of(barrier);
    barrier.state = if decision_failure {
        pb::BarrierState::Failed as i32
    } else {
        pb::BarrierState::Released as i32
    };
    barrier.released_at = Some(now);
    barrier.release_handoff_id = release_handoff_id;
    barrier.release = Some(pb::BarrierRelease {
        run_id: spec.run_id,
        barrier_id: spec.barrier_id,
        failure: decision_failure,
        timed_out,
        confidence: if expected == 0 {
            0.0
        } else {
            f64::from(barrier.arrived) / expected as f64
        },
        ..Default::default()
    });
}

/// The branch results the barrier counted, in branch-key order, from its
/// key records (any order; a key's first record is the one kept).
pub fn counted_branches(
    barrier: &pb::Barrier,
    index: &KeyIndex,
    records: impl IntoIterator<Item = pb::BranchResult>,
) -> Vec<pb::BranchResult> {
    let mut by_position: Vec<(usize, pb::BranchResult)> = Vec::new();
    let mut seen = vec![false; index.len()];
    for record in records {
        let Some(position) = index.position(&record.key) else {
            continue;
        };
        if is_counted(barrier, position) && !seen[position] {
            seen[position] = true;
            by_position.push((position, record));
        }
    }
    by_position.sort_by_key(|(p, _)| *p);
    by_position.into_iter().map(|(_, r)| r).collect()
}

/// Keys whose result came once the barrier was no longer open (a record
/// that was not counted), in branch-key order; none while it is open.
pub fn late_keys<'a>(
    barrier: &pb::Barrier,
    index: &KeyIndex,
    records: impl IntoIterator<Item = &'a pb::BranchResult>,
) -> Vec<String> {
    if barrier.state == pb::BarrierState::Open as i32 {
        return Vec::new();
    }
    let mut late: Vec<usize> = records
        .into_iter()
        .filter_map(|r| index.position(&r.key))
        .filter(|&p| !is_counted(barrier, p))
        .collect();
    late.sort_unstable();
    late.dedup();
    late.into_iter().map(|p| index.key(p)).collect()
}

/// The release payload of a released barrier (see [`release`]), from the
/// records of its counted branches ([`counted_branches`], in branch-key
/// order). For a barrier still open (a corrupt call), the flags given.
///
/// The payload lists every branch in branch-key order (counted ones as
/// recorded, the others with status MISSING and no payload), the
/// `missing`, `failed` and `skipped` keys in branch-key order, confidence =
/// ARRIVED branches / expected branches (0 without branches), and
/// warnings: one line per failed branch (`branch k failed: w1; w2`, or
/// `branch k failed` without warnings) and, when timed out, one per
/// missing branch (`branch k missing at timeout`), together in branch-key
/// order; then for QUORUM one line `released at quorum k of n` (or
/// `quorum k of n not reached: a arrived` when fewer than k arrived). A
/// counted branch whose record is gone is released without payload and
/// named in a warning.
pub fn release_payload(
    barrier: &pb::Barrier,
    index: &KeyIndex,
    counted: Vec<pb::BranchResult>,
    decision_failure: bool,
    timed_out: bool,
) -> pb::BarrierRelease {
    let no_spec = pb::BarrierSpec::default();
    let spec = barrier.spec.as_ref().unwrap_or(&no_spec);
    let (failure, timed_out) = match &barrier.release {
        Some(kept) => (kept.failure, kept.timed_out),
        None => (decision_failure, timed_out),
    };
    let mut out = pb::BarrierRelease {
        run_id: spec.run_id.clone(),
        barrier_id: spec.barrier_id.clone(),
        branches: Vec::with_capacity(index.len()),
        failure,
        timed_out,
        ..Default::default()
    };
    let mut counted = counted.into_iter().peekable();
    let mut arrived = 0usize;
    for position in 0..index.len() {
        let key = index.key(position);
        let record = counted
            .next_if(|r| index.position(&r.key) == Some(position))
            .or_else(|| {
                is_counted(barrier, position).then(|| pb::BranchResult {
                    key: key.clone(),
                    status: pb::BranchStatus::Failed as i32,
                    warnings: vec!["the branch's result is no longer stored".to_string()],
                    ..Default::default()
                })
            });
        match record {
            Some(branch) => {
                match status_of(branch.status) {
                    pb::BranchStatus::Failed => {
                        out.failed.push(key.clone());
                        out.warnings.push(if branch.warnings.is_empty() {
                            format!("branch {key} failed")
                        } else {
                            format!("branch {key} failed: {}", branch.warnings.join("; "))
                        });
                    }
                    pb::BranchStatus::Skipped => out.skipped.push(key.clone()),
                    _ => arrived += 1,
                }
                out.branches.push(branch);
            }
            None => {
                out.missing.push(key.clone());
                if timed_out {
                    out.warnings
                        .push(format!("branch {key} missing at timeout"));
                }
                out.branches.push(pb::BranchResult {
                    key,
                    status: pb::BranchStatus::Missing as i32,
                    ..Default::default()
                });
            }
        }
    }
    if mode_of(spec) == pb::BarrierMode::Quorum {
        let quorum = quorum_of(spec);
        out.warnings.push(if arrived >= quorum {
            format!("released at quorum {quorum} of {}", index.len())
        } else {
            format!(
                "quorum {quorum} of {} not reached: {arrived} arrived",
                index.len()
            )
        });
    }
    out.confidence = if index.is_empty() {
        0.0
    } else {
        arrived as f64 / index.len() as f64
    };
    out
}
/// Whether two specs describe the same barrier (for an idempotent
/// re-open): equal field by field after normalising defaults (mode
/// UNSPECIFIED = ALL, on_timeout UNSPECIFIED = FAIL); the trace context
/// of each opening is not part of the barrier.
pub fn same_spec(a: &pb::BarrierSpec, b: &pb::BarrierSpec) -> bool {
    fn normalised(spec: &pb::BarrierSpec) -> (i32, i32) {
        let mode = if spec.mode == pb::BarrierMode::Unspecified as i32 {
            pb::BarrierMode::All as i32
        } else {
            spec.mode
        };
        let on_timeout = if spec.on_timeout == pb::OnTimeout::Unspecified as i32 {
            pb::OnTimeout::Fail as i32
        } else {
            spec.on_timeout
        };
        (mode, on_timeout)
    }
    normalised(a) == normalised(b)
        && a.run_id == b.run_id
        && a.barrier_id == b.barrier_id
        && a.branch_keys == b.branch_keys
        && a.branch_count == b.branch_count
        && a.quorum == b.quorum
        && a.fail_fast == b.fail_fast
        && a.timeout == b.timeout
        && a.target_agent == b.target_agent
}

// ------------------------------------------------------------ internals

/// Whether `key` is one of the barrier's branches (a scan of named keys:
/// use a [`KeyIndex`] where it runs per arrival).
pub fn has_key(spec: &pb::BarrierSpec, key: &str) -> bool {
    if spec.branch_keys.is_empty() {
        count_position(key, count_of(spec)).is_some()
    } else {
        spec.branch_keys.iter().any(|k| k == key)
    }
}

/// Position of `key` among "0".."n-1": canonical decimal only ("7", not
/// "07" or "+7").
fn count_position(key: &str, n: usize) -> Option<usize> {
    let canonical = !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_digit())
        && (key == "0" || !key.starts_with('0'));
    if !canonical {
        return None;
    }
    key.parse::<usize>().ok().filter(|i| *i < n)
}

/// How many branches the barrier joins (its header's `expected`, or its
/// spec's count for a header without one).
fn expected_of(barrier: &pb::Barrier) -> usize {
    if barrier.expected > 0 {
        return barrier.expected as usize;
    }
    barrier
        .spec
        .as_ref()
        .map(|s| KeyIndex::of(s).len())
        .unwrap_or(0)
}

/// The branch count, capped at [`MAX_BRANCHES`] (a validated spec is within).
fn count_of(spec: &pb::BarrierSpec) -> usize {
    usize::try_from(spec.branch_count)
        .unwrap_or(usize::MAX)
        .min(MAX_BRANCHES)
}

/// The mode, UNSPECIFIED and unknown values counting as ALL.
fn mode_of(spec: &pb::BarrierSpec) -> pb::BarrierMode {
    match pb::BarrierMode::try_from(spec.mode) {
        Ok(pb::BarrierMode::Quorum) => pb::BarrierMode::Quorum,
        _ => pb::BarrierMode::All,
    }
}

/// The QUORUM threshold, at least 1.
fn quorum_of(spec: &pb::BarrierSpec) -> usize {
    usize::try_from(spec.quorum).unwrap_or(usize::MAX).max(1)
}

/// `on_timeout`, UNSPECIFIED and unknown values counting as FAIL.
fn on_timeout_of(spec: &pb::BarrierSpec) -> pb::OnTimeout {
    match pb::OnTimeout::try_from(spec.on_timeout) {
        Ok(pb::OnTimeout::ReleasePartial) => pb::OnTimeout::ReleasePartial,
        _ => pb::OnTimeout::Fail,
    }
}

/// A branch's effective status: UNSPECIFIED is ARRIVED; MISSING and
/// unknown values are FAILED.
fn status_of(status: i32) -> pb::BranchStatus {
    match pb::BranchStatus::try_from(status) {
        Ok(pb::BranchStatus::Unspecified | pb::BranchStatus::Arrived) => pb::BranchStatus::Arrived,
        Ok(pb::BranchStatus::Skipped) => pb::BranchStatus::Skipped,
        _ => pb::BranchStatus::Failed,
    }
}

fn status_name(status: i32) -> String {
    match pb::BranchStatus::try_from(status) {
        Ok(s) => s.as_str_name().to_string(),
        Err(_) => status.to_string(),
    }
}

fn shorten(value: &str) -> String {
    if value.chars().count() <= 40 {
        value.to_string()
    } else {
        let head: String = value.chars().take(40).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests;
