//! Human-readable rendering of runs and timelines (used by `handoffctl`
//! and the examples).

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use crate::pb;

/// A run's status as a word.
pub fn status(status: i32) -> &'static str {
    match pb::RunStatus::try_from(status) {
        Ok(pb::RunStatus::Running) => "running",
        Ok(pb::RunStatus::Completed) => "completed",
        Ok(pb::RunStatus::Failed) => "failed",
        Ok(pb::RunStatus::TimedOut) => "timed_out",
        _ => "unknown",
    }
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
pub fn event_line(e: &pb::Event) -> String {
    let who = match (e.source_agent.as_str(), e.agent.as_str()) {
        ("", a) => a.to_string(),
        (s, "") => format!("{s} ->"),
        (s, a) => format!("{s} -> {a}"),
    };
    let mut detail = String::new();
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
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(" ")
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
        };
        assert_eq!(
            rules_summary(Some(&rules)),
            "required=a,b.c max_tokens=200 min_confidence=0.5 max_tool_result_age=1h"
        );
        assert_eq!(compatibility(pb::Compatibility::Full as i32), "full");
        assert_eq!(contract_name("a.B", 0), "a.B");
        assert_eq!(contract_name("a.B", 3), "a.B@v3");
    }
}
