use super::*;

const ARRIVED: pb::BranchStatus = pb::BranchStatus::Arrived;
const FAILED: pb::BranchStatus = pb::BranchStatus::Failed;
const SKIPPED: pb::BranchStatus = pb::BranchStatus::Skipped;

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn base() -> pb::BarrierSpec {
    pb::BarrierSpec {
        run_id: "run-1".into(),
        barrier_id: "join_1".into(),
        target_agent: "aggregator".into(),
        ..Default::default()
    }
}

fn counted(n: u32) -> pb::BarrierSpec {
    pb::BarrierSpec {
        branch_count: n,
        ..base()
    }
}

fn named(keys: &[&str]) -> pb::BarrierSpec {
    pb::BarrierSpec {
        branch_keys: keys.iter().map(|k| k.to_string()).collect(),
        ..base()
    }
}

fn quorum(n: u32, k: u32) -> pb::BarrierSpec {
    pb::BarrierSpec {
        mode: pb::BarrierMode::Quorum as i32,
        quorum: k,
        ..counted(n)
    }
}

fn result(key: &str, status: pb::BranchStatus) -> pb::BranchResult {
    pb::BranchResult {
        key: key.into(),
        status: status as i32,
        handoff_id: format!("h-{key}"),
        ..Default::default()
    }
}

/// A barrier header with its key records, as the broker keeps them: a
/// key's first result is its record (stored even when late), and the
/// header counts it.
#[derive(Debug, Clone, PartialEq)]
struct Sim {
    b: pb::Barrier,
    index: KeyIndex,
    records: Vec<pb::BranchResult>,
}

impl std::ops::Deref for Sim {
    type Target = pb::Barrier;
    fn deref(&self) -> &pb::Barrier {
        &self.b
    }
}

impl Sim {
    fn branches(&self) -> Vec<pb::BranchResult> {
        counted_branches(&self.b, &self.index, self.records.clone())
    }

    fn late(&self) -> Vec<String> {
        late_keys(&self.b, &self.index, &self.records)
    }
}

fn open(spec: pb::BarrierSpec, now: prost_types::Timestamp) -> Sim {
    Sim {
        index: KeyIndex::of(&spec),
        b: super::open(spec, now),
        records: Vec::new(),
    }
}

fn opened(spec: pb::BarrierSpec) -> Sim {
    assert!(branch_keys(&spec).is_ok(), "{spec:?}");
    open(spec, ts(1))
}

fn arrive(sim: &mut Sim, mut result: pb::BranchResult) -> Arrival {
    normalise(&mut result);
    if sim.index.position(&result.key).is_none() {
        return super::arrive(&mut sim.b, &sim.index, &result);
    }
    let record = match sim.records.iter().find(|r| r.key == result.key) {
        Some(first) => first.clone(),
        None => {
            sim.records.push(result.clone());
            result
        }
    };
    super::arrive(&mut sim.b, &sim.index, &record)
}

fn decide(sim: &Sim, timed_out: bool) -> Decision {
    super::decide(&sim.b, timed_out)
}

fn release(
    sim: &mut Sim,
    failure: bool,
    timed_out: bool,
    id: String,
    now: prost_types::Timestamp,
) -> pb::BarrierRelease {
    super::release(&mut sim.b, failure, timed_out, id, now);
    let counted = sim.branches();
    release_payload(&sim.b, &sim.index, counted, failure, timed_out)
}

fn keys(branches: &[pb::BranchResult]) -> Vec<&str> {
    branches.iter().map(|b| b.key.as_str()).collect()
}

const RELEASE_OK: Decision = Decision::Release {
    failure: false,
    timed_out: false,
};
const RELEASE_FAILURE: Decision = Decision::Release {
    failure: true,
    timed_out: false,
};

#[test]
fn accepts_valid_specs() {
    assert_eq!(
        branch_keys(&named(&["b", "a"])),
        Ok(vec!["b".into(), "a".into()])
    );
    assert_eq!(
        branch_keys(&counted(3)),
        Ok(vec!["0".into(), "1".into(), "2".into()])
    );
    assert_eq!(
        branch_keys(&counted(MAX_BRANCHES as u32)).map(|k| k.len()),
        Ok(MAX_BRANCHES)
    );
    assert!(branch_keys(&quorum(5, 5)).is_ok());
    assert!(branch_keys(&quorum(5, 1)).is_ok());
    let explicit = pb::BarrierSpec {
        mode: pb::BarrierMode::All as i32,
        on_timeout: pb::OnTimeout::ReleasePartial as i32,
        timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 1,
        }),
        fail_fast: true,
        ..counted(2)
    };
    assert!(branch_keys(&explicit).is_ok());
}

#[test]
fn refuses_each_bad_spec() {
    use BarrierError as E;
    let long = "x".repeat(129);
    type Check = fn(&BarrierError) -> bool;
    let cases: Vec<(pb::BarrierSpec, Check)> = vec![
        (
            pb::BarrierSpec {
                run_id: String::new(),
                ..counted(1)
            },
            |e| {
                matches!(
                    e,
                    E::InvalidName {
                        field: "run_id",
                        ..
                    }
                )
            },
        ),
        (
            pb::BarrierSpec {
                barrier_id: "a.b".into(),
                ..counted(1)
            },
            |e| {
                matches!(
                    e,
                    E::InvalidName {
                        field: "barrier_id",
                        ..
                    }
                )
            },
        ),
        (
            pb::BarrierSpec {
                target_agent: long.clone(),
                ..counted(1)
            },
            |e| {
                matches!(
                    e,
                    E::InvalidName {
                        field: "target_agent",
                        ..
                    }
                )
            },
        ),
        (base(), |e| matches!(e, E::NoBranches)),
        (
            pb::BarrierSpec {
                branch_count: 2,
                ..named(&["a"])
            },
            |e| matches!(e, E::KeysAndCount { keys: 1, count: 2 }),
        ),
        (
            counted(MAX_BRANCHES as u32 + 1),
            |e| matches!(e, E::TooManyBranches { count } if *count == MAX_BRANCHES + 1),
        ),
        (counted(u32::MAX), |e| {
            matches!(e, E::TooManyBranches { .. })
        }),
        (
            pb::BarrierSpec {
                branch_keys: (0..=MAX_BRANCHES).map(|i| format!("k{i}")).collect(),
                ..base()
            },
            |e| matches!(e, E::TooManyBranches { .. }),
        ),
        (named(&["a", "b c"]), |e| {
            matches!(e, E::InvalidBranchKey { index: 1, .. })
        }),
        (named(&["a", ""]), |e| {
            matches!(e, E::InvalidBranchKey { index: 1, .. })
        }),
        (named(&["a", "b", "a"]), |e| {
            matches!(
                e,
                E::DuplicateBranchKey {
                    first: 0,
                    second: 2,
                    ..
                }
            )
        }),
        (
            pb::BarrierSpec {
                mode: 9,
                ..counted(2)
            },
            |e| matches!(e, E::UnknownMode(9)),
        ),
        (quorum(5, 0), |e| {
            matches!(
                e,
                E::QuorumOutOfRange {
                    quorum: 0,
                    branches: 5
                }
            )
        }),
        (quorum(5, 6), |e| {
            matches!(
                e,
                E::QuorumOutOfRange {
                    quorum: 6,
                    branches: 5
                }
            )
        }),
        (
            pb::BarrierSpec {
                quorum: 2,
                ..counted(5)
            },
            |e| matches!(e, E::QuorumWithAll(2)),
        ),
        (
            pb::BarrierSpec {
                mode: pb::BarrierMode::All as i32,
                quorum: 1,
                ..counted(5)
            },
            |e| matches!(e, E::QuorumWithAll(1)),
        ),
        (
            pb::BarrierSpec {
                on_timeout: -1,
                ..counted(2)
            },
            |e| matches!(e, E::UnknownOnTimeout(-1)),
        ),
        (
            pb::BarrierSpec {
                timeout: Some(prost_types::Duration::default()),
                ..counted(2)
            },
            |e| {
                matches!(
                    e,
                    E::NonPositiveTimeout {
                        seconds: 0,
                        nanos: 0
                    }
                )
            },
        ),
        (
            pb::BarrierSpec {
                timeout: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..counted(2)
            },
            |e| matches!(e, E::NonPositiveTimeout { seconds: -5, .. }),
        ),
        (
            pb::BarrierSpec {
                timeout: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: -1,
                }),
                ..counted(2)
            },
            |e| matches!(e, E::NonPositiveTimeout { .. }),
        ),
    ];
    for (spec, expected) in cases {
        let err = branch_keys(&spec).expect_err("refused");
        assert!(expected(&err), "{err:?}");
        assert!(!err.to_string().is_empty());
    }
    let err = branch_keys(&pb::BarrierSpec {
        target_agent: long,
        ..counted(1)
    })
    .expect_err("long");
    assert_eq!(
        err.to_string(),
        format!(
            "target_agent \"{}...\" is 129 characters long; the limit is 128",
            "x".repeat(40)
        )
    );
    assert_eq!(
        branch_keys(&quorum(5, 6)).expect_err("quorum").to_string(),
        "quorum 6 is out of range for mode QUORUM with 5 branches; it must be 1..=5"
    );
}

#[test]
fn count_keys_are_in_numeric_order() {
    let all = branch_keys(&counted(12)).expect("valid");
    assert_eq!(all[2], "2");
    assert_eq!(all[10], "10");
    assert_eq!(all.last().map(String::as_str), Some("11"));

    let mut barrier = opened(counted(12));
    for key in ["10", "2", "11", "0"] {
        assert_eq!(arrive(&mut barrier, result(key, ARRIVED)), Arrival::Counted);
    }
    assert_eq!(keys(&barrier.branches()), ["0", "2", "10", "11"]);
    for bad in ["12", "02", "+2", "-1", "", "1.0", "99999999999999999999999"] {
        assert_eq!(
            arrive(&mut barrier, result(bad, ARRIVED)),
            Arrival::UnknownKey,
            "{bad}"
        );
    }
    assert_eq!(barrier.branches().len(), 4);
}

#[test]
fn arrival_cases() {
    let mut barrier = opened(named(&["a", "b"]));
    assert_eq!(arrive(&mut barrier, result("a", ARRIVED)), Arrival::Counted);

    // A second result for the same key keeps the first.
    let mut second = result("a", FAILED);
    second.handoff_id = "other".into();
    let before = barrier.clone();
    assert_eq!(arrive(&mut barrier, second), Arrival::Duplicate);
    assert_eq!(barrier, before);
    assert_eq!(barrier.branches()[0].handoff_id, "h-a");
    assert_eq!(barrier.branches()[0].status, ARRIVED as i32);

    // Unknown key: unchanged.
    assert_eq!(
        arrive(&mut barrier, result("z", ARRIVED)),
        Arrival::UnknownKey
    );
    assert_eq!(barrier, before);

    // Release, then "b" comes late: listed once.
    release(&mut barrier, false, false, "rel".into(), ts(2));
    assert_eq!(arrive(&mut barrier, result("b", ARRIVED)), Arrival::Late);
    assert_eq!(arrive(&mut barrier, result("b", FAILED)), Arrival::Late);
    assert_eq!(barrier.late(), ["b"]);
    assert_eq!(barrier.branches().len(), 1);
    // A redelivery of a branch counted before the release is a duplicate.
    assert_eq!(
        arrive(&mut barrier, result("a", ARRIVED)),
        Arrival::Duplicate
    );
    assert_eq!(
        arrive(&mut barrier, result("z", ARRIVED)),
        Arrival::UnknownKey
    );
    assert_eq!(barrier.late(), ["b"]);
}

#[test]
fn statuses_are_normalised() {
    let mut barrier = opened(counted(3));
    arrive(&mut barrier, result("0", pb::BranchStatus::Unspecified));
    arrive(&mut barrier, result("1", pb::BranchStatus::Missing));
    let mut odd = result("2", ARRIVED);
    odd.status = 42;
    arrive(&mut barrier, odd);
    assert_eq!(barrier.branches()[0].status, ARRIVED as i32);
    assert_eq!(barrier.branches()[1].status, FAILED as i32);
    assert_eq!(
        barrier.branches()[1].warnings,
        ["branch reported status BRANCH_STATUS_MISSING; recorded as failed"]
    );
    assert_eq!(barrier.branches()[2].status, FAILED as i32);
    assert_eq!(
        barrier.branches()[2].warnings,
        ["branch reported status 42; recorded as failed"]
    );
}

#[test]
fn all_releases_when_the_last_of_100_arrives() {
    let mut barrier = opened(counted(100));
    // Arrive in reverse order; the last one is "0".
    for i in (1..100).rev() {
        assert_eq!(
            arrive(&mut barrier, result(&i.to_string(), ARRIVED)),
            Arrival::Counted
        );
        assert_eq!(decide(&barrier, false), Decision::Wait, "after {i}");
    }
    assert_eq!(arrive(&mut barrier, result("0", ARRIVED)), Arrival::Counted);
    assert_eq!(decide(&barrier, false), RELEASE_OK);

    let out = release(&mut barrier, false, false, "rel-1".into(), ts(5));
    assert_eq!(barrier.state, pb::BarrierState::Released as i32);
    assert_eq!(barrier.released_at, Some(ts(5)));
    assert_eq!(barrier.release_handoff_id, "rel-1");
    assert_eq!(out.branches.len(), 100);
    let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(keys(&out.branches), expected);
    assert!(out.missing.is_empty() && out.failed.is_empty() && out.skipped.is_empty());
    assert_eq!(out.confidence, 1.0);
    assert!(out.warnings.is_empty());
    assert!(!out.failure && !out.timed_out);
    assert_eq!(
        (out.run_id.as_str(), out.barrier_id.as_str()),
        ("run-1", "join_1")
    );
    assert_eq!(decide(&barrier, false), Decision::Wait);
    assert_eq!(decide(&barrier, true), Decision::Wait);
}

#[test]
fn quorum_3_of_5_releases_at_the_third_arrival() {
    let mut barrier = opened(quorum(5, 3));
    arrive(&mut barrier, result("4", ARRIVED));
    arrive(&mut barrier, result("1", FAILED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    arrive(&mut barrier, result("0", ARRIVED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    arrive(&mut barrier, result("2", ARRIVED));
    assert_eq!(decide(&barrier, false), RELEASE_OK);

    let out = release(&mut barrier, false, false, "rel".into(), ts(3));
    assert_eq!(out.missing, ["3"]);
    assert_eq!(out.failed, ["1"]);
    assert_eq!(out.confidence, 3.0 / 5.0);
    assert_eq!(
        out.warnings,
        ["branch 1 failed", "released at quorum 3 of 5"]
    );
    assert_eq!(out.branches[3].status, pb::BranchStatus::Missing as i32);
    assert!(out.branches[3].payload.is_none());

    assert_eq!(arrive(&mut barrier, result("3", ARRIVED)), Arrival::Late);
    assert_eq!(barrier.late(), ["3"]);
    assert_eq!(barrier.branches().len(), 4);
}

#[test]
fn unreachable_quorum_is_a_failure() {
    let mut barrier = opened(quorum(5, 3));
    arrive(&mut barrier, result("0", ARRIVED));
    arrive(&mut barrier, result("1", FAILED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    arrive(&mut barrier, result("2", SKIPPED));
    // 1 arrived + 2 outstanding = 3: still reachable.
    assert_eq!(decide(&barrier, false), Decision::Wait);
    arrive(&mut barrier, result("3", FAILED));
    assert_eq!(decide(&barrier, false), RELEASE_FAILURE);

    let out = release(&mut barrier, true, false, "rel".into(), ts(3));
    assert_eq!(barrier.state, pb::BarrierState::Failed as i32);
    assert!(out.failure);
    assert_eq!(out.failed, ["1", "3"]);
    assert_eq!(out.skipped, ["2"]);
    assert_eq!(out.missing, ["4"]);
    assert_eq!(
        out.warnings.last().map(String::as_str),
        Some("quorum 3 of 5 not reached: 1 arrived")
    );
}

#[test]
fn fail_fast_releases_a_failure_at_the_first_failed_branch() {
    let spec = pb::BarrierSpec {
        fail_fast: true,
        ..named(&["x", "y", "z"])
    };
    let mut barrier = opened(spec);
    arrive(&mut barrier, result("y", SKIPPED));
    arrive(&mut barrier, result("z", ARRIVED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    let mut failed = result("x", FAILED);
    failed.warnings = vec!["tool crashed".into(), "no retry".into()];
    arrive(&mut barrier, failed);
    assert_eq!(decide(&barrier, false), RELEASE_FAILURE);
    let out = release(&mut barrier, true, false, "rel".into(), ts(2));
    assert_eq!(barrier.state, pb::BarrierState::Failed as i32);
    assert_eq!(out.warnings, ["branch x failed: tool crashed; no retry"]);
    assert!(out.failure);

    // Without fail_fast, ALL releases (not a failure) with the failure listed.
    let mut barrier = opened(named(&["x", "y"]));
    arrive(&mut barrier, result("x", FAILED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    arrive(&mut barrier, result("y", ARRIVED));
    assert_eq!(decide(&barrier, false), RELEASE_OK);
}

#[test]
fn skipped_branch_counts_toward_all() {
    let mut barrier = opened(counted(3));
    arrive(&mut barrier, result("0", ARRIVED));
    arrive(&mut barrier, result("2", ARRIVED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    arrive(&mut barrier, result("1", SKIPPED));
    assert_eq!(decide(&barrier, false), RELEASE_OK);
    let out = release(&mut barrier, false, false, "rel".into(), ts(2));
    assert_eq!(out.skipped, ["1"]);
    assert!(out.missing.is_empty());
    assert_eq!(out.confidence, 2.0 / 3.0);
    assert_eq!(out.branches[1].status, SKIPPED as i32);
}

#[test]
fn timeout_with_fail() {
    let spec = pb::BarrierSpec {
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..counted(4)
    };
    let mut barrier = opened(spec);
    arrive(&mut barrier, result("1", ARRIVED));
    assert_eq!(decide(&barrier, false), Decision::Wait);
    let decision = decide(&barrier, true);
    assert_eq!(
        decision,
        Decision::Release {
            failure: true,
            timed_out: true
        }
    );
    let out = release(&mut barrier, true, true, "rel".into(), ts(31));
    assert_eq!(barrier.state, pb::BarrierState::Failed as i32);
    assert!(out.failure && out.timed_out);
    assert_eq!(out.missing, ["0", "2", "3"]);
    assert_eq!(
        out.warnings,
        [
            "branch 0 missing at timeout",
            "branch 2 missing at timeout",
            "branch 3 missing at timeout"
        ]
    );
    assert_eq!(out.confidence, 0.25);
}

#[test]
fn timeout_with_release_partial() {
    let spec = pb::BarrierSpec {
        on_timeout: pb::OnTimeout::ReleasePartial as i32,
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..named(&["c", "a", "b", "d", "e"])
    };
    let mut barrier = opened(spec);
    arrive(&mut barrier, result("b", ARRIVED));
    arrive(&mut barrier, result("e", ARRIVED));
    arrive(&mut barrier, result("c", FAILED));
    let decision = decide(&barrier, true);
    assert_eq!(
        decision,
        Decision::Release {
            failure: false,
            timed_out: true
        }
    );
    let out = release(&mut barrier, false, true, "rel".into(), ts(31));
    assert_eq!(barrier.state, pb::BarrierState::Released as i32);
    assert!(!out.failure && out.timed_out);
    assert_eq!(out.missing, ["a", "d"]);
    assert_eq!(out.failed, ["c"]);
    assert_eq!(out.confidence, 2.0 / 5.0);
    assert_eq!(
        out.warnings,
        [
            "branch c failed",
            "branch a missing at timeout",
            "branch d missing at timeout"
        ]
    );

    // A timeout that fires once everything is in is a normal release.
    let mut barrier = opened(counted(1));
    arrive(&mut barrier, result("0", ARRIVED));
    assert_eq!(decide(&barrier, true), RELEASE_OK);
}

#[test]
fn release_lists_named_keys_in_spec_order() {
    let order = ["zeta", "alpha", "mid", "beta"];
    let mut barrier = opened(named(&order));
    for key in ["beta", "alpha", "zeta", "mid"] {
        let mut r = result(key, ARRIVED);
        r.payload = Some(prost_types::Any {
            type_url: "type.example/x".into(),
            value: key.as_bytes().to_vec(),
        });
        assert_eq!(arrive(&mut barrier, r), Arrival::Counted);
    }
    assert_eq!(keys(&barrier.branches()), order);
    assert_eq!(decide(&barrier, false), RELEASE_OK);
    let out = release(&mut barrier, false, false, "rel".into(), ts(2));
    assert_eq!(keys(&out.branches), order);
    for (branch, key) in out.branches.iter().zip(order) {
        assert_eq!(
            branch.payload.as_ref().map(|p| p.value.as_slice()),
            Some(key.as_bytes())
        );
        assert_eq!(branch.handoff_id, format!("h-{key}"));
    }
}

#[test]
fn applying_the_same_sequence_twice_changes_nothing() {
    let steps = [
        result("3", ARRIVED),
        result("0", FAILED),
        result("3", SKIPPED),
        result("9", ARRIVED),
        result("1", ARRIVED),
        result("4", ARRIVED),
        result("2", ARRIVED),
    ];
    let run = |barrier: &mut Sim| -> Vec<pb::BarrierRelease> {
        let mut releases = Vec::new();
        for step in &steps {
            arrive(barrier, step.clone());
            if let Decision::Release { failure, timed_out } = decide(barrier, false) {
                releases.push(release(barrier, failure, timed_out, "rel".into(), ts(7)));
            }
        }
        releases
    };
    let mut barrier = opened(quorum(5, 3));
    let first = run(&mut barrier);
    assert_eq!(first.len(), 1);
    let once = barrier.clone();
    let second = run(&mut barrier);
    assert!(second.is_empty());
    assert_eq!(barrier, once);
    assert_eq!(barrier.late(), ["2"]);

    // Each step applied twice in a row gives the same barrier as once.
    let mut a = opened(counted(5));
    let mut b = opened(counted(5));
    for step in &steps {
        arrive(&mut a, step.clone());
        arrive(&mut b, step.clone());
        arrive(&mut b, step.clone());
        assert_eq!(a, b);
    }

    // A second release does not change the first one's verdict.
    let mut released = once.clone();
    let again = release(&mut released, true, true, "other".into(), ts(99));
    assert_eq!(released, once);
    assert_eq!(Some(&again), first.first());
    assert_eq!(
        once.release
            .as_ref()
            .map(|r| (r.failure, r.timed_out, r.confidence)),
        first
            .first()
            .map(|r| (r.failure, r.timed_out, r.confidence))
    );
    assert_eq!(once.release_handoff_id, "rel");
}

#[test]
fn same_spec_normalises_defaults() {
    let a = counted(3);
    let b = pb::BarrierSpec {
        mode: pb::BarrierMode::All as i32,
        on_timeout: pb::OnTimeout::Fail as i32,
        ..counted(3)
    };
    assert!(same_spec(&a, &b));
    assert!(same_spec(&b, &a));
    assert!(!same_spec(&a, &counted(4)));
    assert!(!same_spec(
        &a,
        &pb::BarrierSpec {
            fail_fast: true,
            ..counted(3)
        }
    ));
    assert!(!same_spec(
        &a,
        &pb::BarrierSpec {
            on_timeout: pb::OnTimeout::ReleasePartial as i32,
            ..counted(3)
        }
    ));
    assert!(!same_spec(&quorum(3, 2), &quorum(3, 3)));
    assert!(!same_spec(&named(&["a", "b"]), &named(&["b", "a"])));
}

#[test]
fn corrupt_barriers_do_not_panic() {
    let mut empty = Sim {
        b: pb::Barrier::default(),
        index: KeyIndex::of(&pb::BarrierSpec::default()),
        records: Vec::new(),
    };
    assert_eq!(
        arrive(&mut empty, result("0", ARRIVED)),
        Arrival::UnknownKey
    );
    assert_eq!(decide(&empty, true), Decision::Wait);
    let mut no_spec = Sim {
        b: pb::Barrier {
            state: pb::BarrierState::Open as i32,
            ..Default::default()
        },
        ..empty.clone()
    };
    assert_eq!(decide(&no_spec, true), Decision::Wait);
    let out = release(&mut no_spec, false, true, "rel".into(), ts(1));
    assert!(out.branches.is_empty());
    assert_eq!(out.confidence, 0.0);

    let mut huge = open(
        pb::BarrierSpec {
            branch_count: u32::MAX,
            quorum: u32::MAX,
            mode: 2,
            ..base()
        },
        ts(1),
    );
    assert_eq!(arrive(&mut huge, result("9999", ARRIVED)), Arrival::Counted);
    assert_eq!(
        arrive(&mut huge, result("10000", ARRIVED)),
        Arrival::UnknownKey
    );
    assert_eq!(decide(&huge, false), RELEASE_FAILURE);
    let out = release(&mut huge, true, false, "rel".into(), ts(2));
    assert_eq!(out.branches.len(), MAX_BRANCHES);

    // Repeated named keys and a stray recorded key: no panic.
    let mut dup = open(
        pb::BarrierSpec {
            mode: 77,
            on_timeout: 77,
            ..named(&["a", "a", "b"])
        },
        ts(1),
    );
    dup.records.push(result("zz", ARRIVED));
    assert_eq!(arrive(&mut dup, result("b", ARRIVED)), Arrival::Counted);
    assert_eq!(arrive(&mut dup, result("a", ARRIVED)), Arrival::Counted);
    assert_eq!(arrive(&mut dup, result("a", ARRIVED)), Arrival::Duplicate);
    assert_ne!(decide(&dup, true), Decision::Wait);
    let out = release(&mut dup, true, true, "rel".into(), ts(2));
    assert_eq!(keys(&out.branches), ["a", "a", "b"]);
}

#[test]
fn thousands_of_branches_stay_fast() {
    let keys: Vec<String> = (0..MAX_BRANCHES)
        .map(|i| format!("k{}", MAX_BRANCHES - i))
        .collect();
    let spec = pb::BarrierSpec {
        branch_keys: keys.clone(),
        ..base()
    };
    let mut barrier = opened(spec);
    for key in keys.iter().rev() {
        assert_eq!(arrive(&mut barrier, result(key, ARRIVED)), Arrival::Counted);
    }
    assert_eq!(decide(&barrier, false), RELEASE_OK);
    let out = release(&mut barrier, false, false, "rel".into(), ts(2));
    assert_eq!(
        out.branches.iter().map(|b| &b.key).collect::<Vec<_>>(),
        keys.iter().collect::<Vec<_>>()
    );
}
