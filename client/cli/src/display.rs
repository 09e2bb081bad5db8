//! Human-readable rendering of runs, timelines and barriers (used by
//! `handoffctl` and the examples).

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use handoff_client::pb;

/// A run's status as a word.
pub fn status(status: i32) -> &'static str {
    pb::RunStatus::try_from(status).map_or("unknown", pb::RunStatus::token)
}

/// A run status from its word (as [`status`] writes it, or the enum's
/// name).
pub fn parse_status(word: &str) -> Option<pb::RunStatus> {
    let lower = word.to_ascii_lowercase();
    let lower = lower.strip_prefix("run_status_").unwrap_or(&lower);
    [
        pb::RunStatus::Running,
        pb::RunStatus::Completed,
        pb::RunStatus::Failed,
        pb::RunStatus::TimedOut,
        pb::RunStatus::Cancelled,
        pb::RunStatus::WaitingInput,
    ]
    .into_iter()
    .find(|s| status(*s as i32) == lower)
}

/// An event kind as its subject token.
pub fn kind(kind: i32) -> &'static str {
    pb::EventKind::try_from(kind)
        .map(|k| k.token())
        .unwrap_or("unknown")
}

fn time(t: Option<prost_types::Timestamp>) -> String {
    let Some(t) = t.and_then(|t| SystemTime::try_from(t).ok()) else {
        return "-".to_string();
    };
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// One line of an event, as in a table row.
///
/// Barrier events name the barrier in the agents column: an opened,
/// released or timed-out barrier as `barrier -> target`, a branch result
/// (arrived or late) as `source -> barrier`; the detail starts with
/// `barrier=<id>`, or `branch=<id>[<key>]` for a branch. A release's
/// reason lists its warnings (failed branches, missing ones at a timeout,
/// the quorum).
pub fn event_line(e: &pb::Event) -> String {
    use pb::EventKind as K;
    let kind_of = pb::EventKind::try_from(e.kind).ok();
    let barrier_event = matches!(
        kind_of,
        Some(K::BarrierOpened | K::BarrierReleased | K::BarrierTimedOut)
    );
    let branch_event = matches!(kind_of, Some(K::BranchArrived | K::BranchLate));
    let who = match (e.source_agent.as_str(), e.agent.as_str()) {
        (_, a) if barrier_event => format!("barrier -> {a}"),
        ("", _) if branch_event => "-> barrier".to_string(),
        (s, _) if branch_event => format!("{s} -> barrier"),
        ("", a) => a.to_string(),
        (s, "") if !e.branch_key.is_empty() => format!("{s} -> barrier"),
        (s, "") => format!("{s} ->"),
        (s, a) => format!("{s} -> {a}"),
    };
    let mut detail = String::new();
    if !e.barrier_id.is_empty() {
        if e.branch_key.is_empty() {
            let _ = write!(detail, "barrier={} ", e.barrier_id);
        } else {
            let _ = write!(detail, "branch={}[{}] ", e.barrier_id, e.branch_key);
        }
    }
    if !e.instance.is_empty() {
        let _ = write!(detail, "instance={} ", e.instance);
    }
    if e.attempt > 0 {
        let _ = write!(detail, "attempt={} ", e.attempt);
    }
    if e.depth > 0 {
        let _ = write!(detail, "depth={} ", e.depth);
    }
    if !e.fallback_agent.is_empty() {
        let _ = write!(detail, "fallback={} ", e.fallback_agent);
    }
    if !e.rule.is_empty() {
        let _ = write!(detail, "rule={} ", e.rule);
    }
    if !e.contract_type.is_empty() {
        let _ = write!(
            detail,
            "contract={} ",
            contract_name(&e.contract_type, e.contract_version)
        );
    }
    if let Some(c) = &e.state_change {
        let _ = write!(detail, "state=r{}", c.revision);
        for (sign, keys) in [("+", &c.added), ("~", &c.changed), ("-", &c.removed)] {
            for k in keys {
                let _ = write!(detail, " {sign}{k}");
            }
        }
        detail.push(' ');
    }
    if !e.dropped_fields.is_empty() {
        let _ = write!(detail, "dropped={} ", e.dropped_fields.join(","));
    }
    if !e.reasks.is_empty() {
        let _ = write!(detail, "reasks={} ", e.reasks.join(","));
    }
    if matches!(kind_of, Some(K::IntentScored | K::IntentDrift)) {
        let _ = write!(detail, "score={:.2} ", e.intent_score);
    }
    if !e.reason.is_empty() {
        let _ = write!(detail, "reason={:?}", e.reason);
    }
    let line = format!(
        "{:>6}  {}  {:<18}  {:<24}  {:<8}  {}",
        e.sequence,
        time(e.at),
        kind(e.kind),
        who,
        short(&e.handoff_id),
        detail
    );
    line.trim_end().to_string()
}

/// A run and its timeline as a table.
pub fn run_table(run: &pb::Run, timeline: &[pb::Event]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  owner={}  status={}",
        run.id,
        run.owner,
        status(run.status)
    );
    if let Some(p) = &run.pinned {
        if !p.ask.is_empty() {
            let _ = writeln!(out, "ask: {}", p.ask);
        }
        let mut fields: Vec<_> = p.fields.iter().collect();
        fields.sort();
        for (k, v) in fields {
            let _ = writeln!(out, "pinned {k} = {v}");
        }
    }
    if !run.failure.is_empty() {
        let _ = writeln!(out, "failure: {}", run.failure);
    }
    if let Some(st) = &run.stats {
        let pipeline = if run.pipeline.is_empty() {
            "default"
        } else {
            &run.pipeline
        };
        let _ = writeln!(
            out,
            "pipeline={pipeline}  handoffs={}  hops={}  redeliveries={}  reasks={}  dropped_fields={}",
            st.handoffs, st.hops, st.redeliveries, st.reasks, st.dropped_fields
        );
    }
    if let Some(i) = &run.intent {
        let _ = writeln!(
            out,
            "intent score={:.2}{} judge={} reason={:?}",
            i.score,
            if i.drift { " (drift)" } else { "" },
            i.judge_agent,
            i.reason
        );
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<12}  {:<18}  {:<24}  {:<8}  detail",
        "seq", "time", "event", "agents", "handoff"
    );
    for e in timeline {
        let _ = writeln!(out, "{}", event_line(e));
    }
    out
}

/// Most branch keys [`barrier_table`] lists for a counted barrier (the
/// broker's own limit).
const MAX_LISTED_BRANCHES: u32 = 10_000;

/// A barrier as `handoffctl barrier show` prints it: state, mode, target,
/// times, fail-fast, timeout, the release, and every branch in branch-key
/// order with its status, source agent, handoff id and warnings. A key
/// with no branch result is `missing` once the barrier has released and
/// `waiting` while it is open.
pub fn barrier_table(b: &pb::Barrier) -> String {
    let no_spec = pb::BarrierSpec::default();
    let spec = b.spec.as_ref().unwrap_or(&no_spec);
    let open = b.state == pb::BarrierState::Open as i32;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "barrier {}  run={}  state={}",
        spec.barrier_id,
        spec.run_id,
        barrier_state(b.state)
    );
    let (keys, unlisted) = barrier_keys(spec);
    let expected = keys.len() as u64 + unlisted;
    let mode = if spec.mode == pb::BarrierMode::Quorum as i32 {
        format!("QUORUM {} of {expected}", spec.quorum)
    } else {
        format!("ALL of {expected}")
    };
    let _ = writeln!(out, "mode: {mode}");
    let _ = writeln!(out, "target: {}", dash(&spec.target_agent));
    let _ = writeln!(out, "opened: {}", timestamp(b.opened_at));
    let _ = writeln!(out, "released: {}", timestamp(b.released_at));
    let _ = writeln!(
        out,
        "fail_fast: {}",
        if spec.fail_fast { "yes" } else { "no" }
    );
    let on_timeout = if spec.on_timeout == pb::OnTimeout::ReleasePartial as i32 {
        "release partial"
    } else {
        "fail"
    };
    let timeout = match spec.timeout.map(Duration::try_from) {
        None => "none".to_string(),
        Some(Ok(d)) => format!(
            "{} (on timeout: {on_timeout})",
            humantime::format_duration(d)
        ),
        Some(Err(_)) => "invalid".to_string(),
    };
    let _ = writeln!(out, "timeout: {timeout}");

    let arrived = b
        .branches
        .iter()
        .filter(|r| {
            matches!(
                pb::BranchStatus::try_from(r.status),
                Ok(pb::BranchStatus::Arrived | pb::BranchStatus::Unspecified)
            )
        })
        .count();
    let confidence = match &b.release {
        Some(r) => format!("{} ({arrived} of {expected} arrived)", r.confidence),
        None if expected > 0 => format!(
            "{} so far ({arrived} of {expected} arrived)",
            arrived as f64 / expected as f64
        ),
        None => "-".to_string(),
    };
    let _ = writeln!(out, "confidence: {confidence}");
    let release = if b.release_handoff_id.is_empty() {
        "-".to_string()
    } else {
        format!(
            "handoff {}, {}",
            b.release_handoff_id,
            if b.release_published {
                "published"
            } else {
                "not published yet"
            }
        )
    };
    let _ = writeln!(out, "release: {release}");
    if let Some(r) = &b.release {
        let mut how = Vec::new();
        if r.failure {
            how.push("a failure");
        }
        if r.timed_out {
            how.push("at the timeout");
        }
        if !how.is_empty() {
            let _ = writeln!(out, "released as: {}", how.join(", "));
        }
        for w in &r.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
    }
    let _ = writeln!(
        out,
        "late: {}",
        if b.late.is_empty() {
            "none".to_string()
        } else {
            b.late.join(", ")
        }
    );

    let absent = if open { "waiting" } else { "missing" };
    let recorded: HashMap<&str, &pb::BranchResult> =
        b.branches.iter().map(|r| (r.key.as_str(), r)).collect();
    let listed: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut rows = Vec::with_capacity(keys.len());
    for key in &keys {
        rows.push(match recorded.get(key.as_str()) {
            Some(r) => branch_row(r),
            None => vec![
                key.clone(),
                absent.to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
            ],
        });
    }
    // Results under keys the spec does not list (a corrupt entry): shown
    // rather than hidden.
    if unlisted == 0 {
        for r in b
            .branches
            .iter()
            .filter(|r| !listed.contains(r.key.as_str()))
        {
            rows.push(branch_row(r));
        }
    }
    let _ = writeln!(out, "branches:");
    for line in aligned(&["KEY", "STATUS", "SOURCE", "HANDOFF", "WARNINGS"], &rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    if unlisted > 0 {
        let _ = writeln!(out, "  ... and {unlisted} more");
    }
    out
}

fn branch_row(r: &pb::BranchResult) -> Vec<String> {
    vec![
        r.key.clone(),
        branch_status(r.status).to_string(),
        dash(&r.source_agent),
        dash(&r.handoff_id),
        if r.warnings.is_empty() {
            "-".to_string()
        } else {
            r.warnings.join("; ")
        },
    ]
}

/// A barrier's branch keys in branch-key order (at most
/// [`MAX_LISTED_BRANCHES`] of a count), and how many more there are.
fn barrier_keys(spec: &pb::BarrierSpec) -> (Vec<String>, u64) {
    if !spec.branch_keys.is_empty() {
        return (spec.branch_keys.clone(), 0);
    }
    let listed = spec.branch_count.min(MAX_LISTED_BRANCHES);
    (
        (0..listed).map(|i| i.to_string()).collect(),
        u64::from(spec.branch_count - listed),
    )
}

/// A barrier's state as a word.
pub fn barrier_state(state: i32) -> &'static str {
    match pb::BarrierState::try_from(state) {
        Ok(pb::BarrierState::Open) => "open",
        Ok(pb::BarrierState::Released) => "released",
        Ok(pb::BarrierState::Failed) => "failed",
        Ok(pb::BarrierState::Closed) => "closed",
        _ => "unknown",
    }
}

/// A branch's status as a word (`arrived`, `failed`, `skipped`,
/// `missing`); UNSPECIFIED is the default of a branch result, `arrived`.
pub fn branch_status(status: i32) -> &'static str {
    match pb::BranchStatus::try_from(status) {
        Ok(pb::BranchStatus::Arrived | pb::BranchStatus::Unspecified) => "arrived",
        Ok(pb::BranchStatus::Failed) => "failed",
        Ok(pb::BranchStatus::Skipped) => "skipped",
        Ok(pb::BranchStatus::Missing) => "missing",
        Err(_) => "unknown",
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// An RFC 3339 UTC time, or `-` when unset or out of range.
pub fn timestamp(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| {
            time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_string())
}

/// Columns padded to their widest cell; the last one is left ragged.
fn aligned(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut text = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            line.push_str(cell);
            if i != last {
                line.push_str(&" ".repeat(w.saturating_sub(cell.chars().count()) + 2));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A contract and its version as `type@vN` (`type` alone for version 0,
/// i.e. not known).
pub fn contract_name(message_type: &str, version: u32) -> String {
    if version == 0 {
        message_type.to_string()
    } else {
        format!("{message_type}@v{version}")
    }
}

/// A compatibility mode as a word (`backward`, ...).
pub fn compatibility(mode: i32) -> &'static str {
    match pb::Compatibility::try_from(mode) {
        Ok(pb::Compatibility::None) => "none",
        Ok(pb::Compatibility::Backward) => "backward",
        Ok(pb::Compatibility::Forward) => "forward",
        Ok(pb::Compatibility::Full) => "full",
        _ => "unspecified",
    }
}

/// A contract's rules on one line (`required=a,b max_tokens=200 ...`),
/// or `-` when there are none.
pub fn rules_summary(rules: Option<&pb::ContractRules>) -> String {
    let Some(r) = rules else {
        return "-".to_string();
    };
    let mut parts = Vec::new();
    if !r.required_fields.is_empty() {
        parts.push(format!("required={}", r.required_fields.join(",")));
    }
    if r.max_tokens > 0 {
        parts.push(format!("max_tokens={}", r.max_tokens));
    }
    if r.max_bytes > 0 {
        parts.push(format!("max_bytes={}", r.max_bytes));
    }
    if let Some(c) = r.min_confidence {
        parts.push(format!("min_confidence={c}"));
    }
    if let Some(age) = r.max_tool_result_age {
        let age = Duration::try_from(age)
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|_| "invalid".to_string());
        parts.push(format!("max_tool_result_age={age}"));
    }
    if !r.carry.is_empty() {
        parts.push(format!("carry={}", r.carry.join(",")));
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(" ")
    }
}

/// A run state revision as `handoffctl state show` prints it: the revision,
/// the handoff that made it and what it changed, then every key with its
/// value as JSON (pinned keys marked).
pub fn state_table(resp: &pb::GetStateResponse) -> String {
    let mut out = String::new();
    let Some(state) = &resp.state else {
        return "no state\n".to_string();
    };
    let _ = writeln!(
        out,
        "run {}  revision {} of {}",
        state.run_id, state.revision, resp.latest_revision
    );
    if resp.handoff_id.is_empty() {
        let _ = writeln!(out, "made by: StartRun (seed)");
    } else {
        let _ = writeln!(
            out,
            "made by: handoff {} from {} at {}",
            resp.handoff_id,
            if resp.source_agent.is_empty() {
                "the owner"
            } else {
                &resp.source_agent
            },
            timestamp(resp.at)
        );
    }
    if let Some(c) = &resp.change {
        let _ = writeln!(
            out,
            "added: {}  changed: {}  removed: {}",
            list(&c.added),
            list(&c.changed),
            list(&c.removed)
        );
    }
    let mut keys: Vec<_> = state.values.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in keys {
        let pin = if state.pinned_keys.contains(k) {
            " (pinned)"
        } else {
            ""
        };
        let _ = writeln!(out, "{k}{pin} = {}", json(v));
    }
    out
}

fn list(keys: &[String]) -> String {
    if keys.is_empty() {
        "-".to_string()
    } else {
        keys.join(",")
    }
}

/// A state value as JSON text.
pub fn json(v: &prost_types::Value) -> String {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => "null".to_string(),
        Some(Kind::NumberValue(n)) => format!("{n}"),
        Some(Kind::StringValue(s)) => format!("{s:?}"),
        Some(Kind::BoolValue(b)) => format!("{b}"),
        Some(Kind::ListValue(l)) => format!(
            "[{}]",
            l.values.iter().map(json).collect::<Vec<_>>().join(", ")
        ),
        Some(Kind::StructValue(st)) => format!(
            "{{{}}}",
            st.fields
                .iter()
                .map(|(k, v)| format!("{k:?}: {}", json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_rejected_shows_rule_contract_and_reason() {
        let e = pb::Event {
            sequence: 7,
            kind: pb::EventKind::ContractRejected as i32,
            agent: "worker".to_string(),
            source_agent: "planner".to_string(),
            rule: "required_fields".to_string(),
            contract_type: "handoff.demo.v1.Subtask".to_string(),
            contract_version: 1,
            reason: "missing required fields: instruction".to_string(),
            ..Default::default()
        };
        let line = event_line(&e);
        assert!(line.contains("contract_rejected"), "{line}");
        assert!(line.contains("planner -> worker"), "{line}");
        assert!(
            line.ends_with(
                "rule=required_fields contract=handoff.demo.v1.Subtask@v1 reason=\"missing required fields: instruction\""
            ),
            "{line}"
        );
    }

    #[test]
    fn an_accepted_handoff_shows_its_state_delta_dropped_fields_and_reasks() {
        let e = pb::Event {
            sequence: 9,
            kind: pb::EventKind::HandoffAccepted as i32,
            agent: "c".to_string(),
            source_agent: "b".to_string(),
            depth: 3,
            state_change: Some(pb::StateChange {
                revision: 4,
                added: vec!["nights".into()],
                changed: vec!["city".into()],
                removed: vec!["draft".into()],
            }),
            dropped_fields: vec!["order_id".into()],
            reasks: vec!["budget".into()],
            ..Default::default()
        };
        let line = event_line(&e);
        assert!(
            line.ends_with("depth=3 state=r4 +nights ~city -draft dropped=order_id reasks=budget"),
            "{line}"
        );
        let state = pb::GetStateResponse {
            state: Some(pb::RunState {
                run_id: "r1".into(),
                revision: 2,
                values: [("order_id".to_string(), prost_types::Value::from("A-1"))].into(),
                pinned_keys: vec!["order_id".into()],
                ..Default::default()
            }),
            handoff_id: "h1".into(),
            source_agent: "a".into(),
            latest_revision: 3,
            ..Default::default()
        };
        let table = state_table(&state);
        assert!(
            table.starts_with("run r1  revision 2 of 3\nmade by: handoff h1 from a"),
            "{table}"
        );
        assert!(table.contains("order_id (pinned) = \"A-1\""), "{table}");
    }

    #[test]
    fn barrier_events_name_the_barrier_and_branch() {
        let opened = pb::Event {
            sequence: 10,
            kind: pb::EventKind::BarrierOpened as i32,
            agent: "aggregator".into(),
            barrier_id: "join-1".into(),
            ..Default::default()
        };
        let line = event_line(&opened);
        assert!(line.contains("barrier_opened"), "{line}");
        assert!(line.contains("barrier -> aggregator"), "{line}");
        assert!(line.ends_with("barrier=join-1"), "{line}");

        let arrived = pb::Event {
            sequence: 11,
            kind: pb::EventKind::BranchArrived as i32,
            agent: "aggregator".into(),
            source_agent: "worker".into(),
            handoff_id: "0123456789abcdef".into(),
            barrier_id: "join-1".into(),
            branch_key: "2".into(),
            depth: 3,
            ..Default::default()
        };
        let line = event_line(&arrived);
        assert!(line.contains("branch_arrived"), "{line}");
        assert!(line.contains("worker -> barrier"), "{line}");
        assert!(line.contains("01234567"), "{line}");
        assert!(line.ends_with("branch=join-1[2] depth=3"), "{line}");

        let late = pb::Event {
            kind: pb::EventKind::BranchLate as i32,
            ..arrived.clone()
        };
        assert!(event_line(&late).contains("branch_late"));
        assert!(event_line(&late).ends_with("branch=join-1[2] depth=3"));

        let released = pb::Event {
            sequence: 12,
            kind: pb::EventKind::BarrierReleased as i32,
            agent: "aggregator".into(),
            handoff_id: "fedcba9876543210".into(),
            barrier_id: "join-1".into(),
            depth: 4,
            reason: "branch 1 failed: no source".into(),
            ..Default::default()
        };
        let line = event_line(&released);
        assert!(line.contains("barrier -> aggregator"), "{line}");
        assert!(
            line.ends_with("barrier=join-1 depth=4 reason=\"branch 1 failed: no source\""),
            "{line}"
        );

        let timed_out = pb::Event {
            kind: pb::EventKind::BarrierTimedOut as i32,
            agent: "aggregator".into(),
            barrier_id: "join-1".into(),
            ..Default::default()
        };
        let line = event_line(&timed_out);
        assert!(line.contains("barrier_timed_out"), "{line}");
        assert!(line.ends_with("barrier=join-1"), "{line}");
    }

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn a_released_barrier_as_a_table() {
        let b = pb::Barrier {
            spec: Some(pb::BarrierSpec {
                run_id: "r1".into(),
                barrier_id: "join-1".into(),
                branch_keys: vec!["b".into(), "a".into(), "c".into(), "d".into()],
                mode: pb::BarrierMode::Quorum as i32,
                quorum: 2,
                fail_fast: true,
                timeout: Some(prost_types::Duration {
                    seconds: 90,
                    nanos: 0,
                }),
                on_timeout: pb::OnTimeout::ReleasePartial as i32,
                target_agent: "aggregator".into(),
                ..Default::default()
            }),
            state: pb::BarrierState::Released as i32,
            branches: vec![
                pb::BranchResult {
                    key: "b".into(),
                    status: pb::BranchStatus::Arrived as i32,
                    handoff_id: "h-b".into(),
                    source_agent: "worker".into(),
                    ..Default::default()
                },
                pb::BranchResult {
                    key: "a".into(),
                    status: pb::BranchStatus::Skipped as i32,
                    handoff_id: "h-a".into(),
                    source_agent: "worker".into(),
                    warnings: vec!["nothing to do".into()],
                    ..Default::default()
                },
                pb::BranchResult {
                    key: "c".into(),
                    status: pb::BranchStatus::Arrived as i32,
                    handoff_id: "h-c".into(),
                    source_agent: "reviewer".into(),
                    ..Default::default()
                },
            ],
            opened_at: ts(0),
            released_at: ts(61),
            release_handoff_id: "rel-1".into(),
            late: vec!["d".into()],
            release: Some(pb::BarrierRelease {
                confidence: 0.5,
                warnings: vec!["released at quorum 2 of 4".into()],
                ..Default::default()
            }),
            release_published: true,
            ..Default::default()
        };
        let text = barrier_table(&b);
        let expected = "\
barrier join-1  run=r1  state=released
mode: QUORUM 2 of 4
target: aggregator
opened: 1970-01-01T00:00:00Z
released: 1970-01-01T00:01:01Z
fail_fast: yes
timeout: 1m 30s (on timeout: release partial)
confidence: 0.5 (2 of 4 arrived)
release: handoff rel-1, published
warning: released at quorum 2 of 4
late: d
branches:
  KEY  STATUS   SOURCE    HANDOFF  WARNINGS
  b    arrived  worker    h-b      -
  a    skipped  worker    h-a      nothing to do
  c    arrived  reviewer  h-c      -
  d    missing  -         -        -
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn an_open_counted_barrier_waits() {
        let b = pb::Barrier {
            spec: Some(pb::BarrierSpec {
                run_id: "r1".into(),
                barrier_id: "j".into(),
                branch_count: 2,
                target_agent: "aggregator".into(),
                ..Default::default()
            }),
            state: pb::BarrierState::Open as i32,
            branches: vec![pb::BranchResult {
                key: "1".into(),
                status: pb::BranchStatus::Failed as i32,
                handoff_id: "h1".into(),
                source_agent: "worker".into(),
                warnings: vec!["timeout upstream".into()],
                ..Default::default()
            }],
            opened_at: ts(0),
            ..Default::default()
        };
        let text = barrier_table(&b);
        assert!(text.contains("state=open"), "{text}");
        assert!(text.contains("mode: ALL of 2"), "{text}");
        assert!(text.contains("released: -"), "{text}");
        assert!(text.contains("timeout: none"), "{text}");
        assert!(text.contains("release: -"), "{text}");
        assert!(
            text.contains("confidence: 0 so far (0 of 2 arrived)"),
            "{text}"
        );
        assert!(text.contains("  0    waiting  -"), "{text}");
        assert!(
            text.contains("  1    failed   worker  h1       timeout upstream"),
            "{text}"
        );
        // A corrupt entry (no spec) still renders.
        let text = barrier_table(&pb::Barrier::default());
        assert!(text.contains("state=unknown"), "{text}");
        // A huge count is cut, not listed.
        let huge = pb::Barrier {
            spec: Some(pb::BarrierSpec {
                branch_count: u32::MAX,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = barrier_table(&huge);
        assert!(
            text.ends_with(&format!("... and {} more\n", u32::MAX - 10_000)),
            "{}",
            &text[text.len() - 80..]
        );
    }

    #[test]
    fn rules_on_one_line() {
        assert_eq!(rules_summary(None), "-");
        assert_eq!(rules_summary(Some(&pb::ContractRules::default())), "-");
        let rules = pb::ContractRules {
            required_fields: vec!["a".into(), "b.c".into()],
            max_tokens: 200,
            max_bytes: 0,
            min_confidence: Some(0.5),
            max_tool_result_age: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            carry: vec!["order_id".into()],
        };
        assert_eq!(
            rules_summary(Some(&rules)),
            "required=a,b.c max_tokens=200 min_confidence=0.5 max_tool_result_age=1h carry=order_id"
        );
        assert_eq!(compatibility(pb::Compatibility::Full as i32), "full");
        assert_eq!(contract_name("a.B", 0), "a.B");
        assert_eq!(contract_name("a.B", 3), "a.B@v3");
    }
}
