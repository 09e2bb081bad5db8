//! Human-readable rendering of runs and timelines (used by `handoffctl`
//! and the examples).

use std::{fmt::Write as _, time::SystemTime};

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
