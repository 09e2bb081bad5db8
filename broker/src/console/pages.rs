//! The console's pages: each reads through the use cases with the
//! visitor's caller, so it shows exactly what the gRPC calls would.

use std::collections::{BTreeMap, BTreeSet};

use handoff_proto::pb::{self, EventKind as K};
use maud::{html, Markup};
use serde::Deserialize;

use super::{
    graph, json,
    view::{self, badge, layout, path_segment, short, time},
    Visitor,
};
use crate::{
    app::{self, clock, Broker},
    error::BrokerError,
};

/// Runs shown per page.
const PAGE: u32 = 50;
/// Handoffs whose payloads a run page shows inline (the rest on request).
const INLINE_PAYLOADS: usize = 40;
/// State revisions a run page shows (the latest ones).
const REVISIONS: u64 = 50;
/// The largest payload stored by reference a page fetches and shows.
const SHOWN_BYTES: u64 = 1 << 20;
/// Raw bytes shown at most.
const RAW_BYTES: usize = 64 << 10;

/// The runs list's filters, from its query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunsFilter {
    #[serde(default)]
    owner: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    pipeline: String,
    #[serde(default)]
    agent: String,
    /// Started at or after (`YYYY-MM-DDTHH:MM`, UTC).
    #[serde(default)]
    from: String,
    /// Started before.
    #[serde(default)]
    to: String,
    #[serde(default)]
    drift: String,
    #[serde(default)]
    dead_letters: String,
    #[serde(default)]
    page: String,
}

fn status_of(token: &str) -> Option<pb::RunStatus> {
    Some(match token {
        "running" => pb::RunStatus::Running,
        "completed" => pb::RunStatus::Completed,
        "failed" => pb::RunStatus::Failed,
        "timed_out" => pb::RunStatus::TimedOut,
        "cancelled" => pb::RunStatus::Cancelled,
        "waiting_input" => pb::RunStatus::WaitingInput,
        _ => return None,
    })
}

const STATUSES: [&str; 6] = [
    "running",
    "waiting_input",
    "completed",
    "failed",
    "timed_out",
    "cancelled",
];

fn datetime(
    field: &'static str,
    text: &str,
) -> Result<Option<prost_types::Timestamp>, BrokerError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let full = if text.len() == 16 {
        format!("{text}:00Z")
    } else {
        format!("{}Z", text.trim_end_matches('Z'))
    };
    humantime::parse_rfc3339_weak(&full)
        .map(|t| Some(prost_types::Timestamp::from(t)))
        .map_err(|_| {
            BrokerError::malformed(
                field,
                format!("{field}: {text:?} is not a date and time (YYYY-MM-DDTHH:MM, UTC)"),
            )
        })
}

/// `/`: the runs the visitor may read, newest first, filtered.
pub(crate) async fn runs(
    broker: &Broker,
    visitor: &Visitor,
    f: &RunsFilter,
) -> Result<Markup, BrokerError> {
    let status = match f.status.as_str() {
        "" => Vec::new(),
        s => vec![status_of(s)
            .ok_or_else(|| BrokerError::malformed("status", format!("{s:?} is not a run status")))?
            as i32],
    };
    let req = pb::ListRunsRequest {
        owner: f.owner.trim().to_string(),
        status,
        pipeline: f.pipeline.trim().to_string(),
        agent: f.agent.trim().to_string(),
        started_after: datetime("from", &f.from)?,
        started_before: datetime("to", &f.to)?,
        drift: !f.drift.is_empty(),
        has_dead_letters: !f.dead_letters.is_empty(),
        page_size: PAGE,
        page_token: f.page.clone(),
        ..Default::default()
    };
    let listed = app::runs::list(broker, &visitor.caller, req).await?;
    let next = (!listed.next_page_token.is_empty()).then(|| {
        let mut q: Vec<(&str, &str)> = vec![
            ("owner", &f.owner),
            ("status", &f.status),
            ("pipeline", &f.pipeline),
            ("agent", &f.agent),
            ("from", &f.from),
            ("to", &f.to),
            ("drift", &f.drift),
            ("dead_letters", &f.dead_letters),
        ];
        q.retain(|(_, v)| !v.is_empty());
        q.push(("page", &listed.next_page_token));
        let query: Vec<String> = q
            .iter()
            .map(|(k, v)| format!("{k}={}", path_segment(v)))
            .collect();
        format!("/?{}", query.join("&"))
    });
    let content = html! {
        h1 { "Runs" }
        form id="filters" method="get" action="/" {
            fieldset {
                legend { "Filter" }
                label { "Owner " input name="owner" value=(f.owner); }
                label { "Status "
                    select name="status" {
                        option value="" selected[f.status.is_empty()] { "any" }
                        @for s in STATUSES {
                            option value=(s) selected[f.status == s] { (s.replace('_', " ")) }
                        }
                    }
                }
                label { "Pipeline " input name="pipeline" value=(f.pipeline); }
                label { "Agent " input name="agent" value=(f.agent); }
                label { "Started from (UTC) " input type="datetime-local" name="from" value=(f.from); }
                label { "to " input type="datetime-local" name="to" value=(f.to); }
                label { input type="checkbox" name="drift" value="1" checked[!f.drift.is_empty()]; " Intent drift" }
                label { input type="checkbox" name="dead_letters" value="1" checked[!f.dead_letters.is_empty()]; " Dead letters" }
                button type="submit" { "Apply" }
                a href="/" { "Clear" }
            }
        }
        table id="runs" {
            caption { "Runs, newest first; updated live" }
            thead { tr {
                th scope="col" { "Run" } th scope="col" { "Status" } th scope="col" { "Owner" }
                th scope="col" { "Pipeline" } th scope="col" { "Started" } th scope="col" { "Ended" }
                th scope="col" { "Agents" } th scope="col" { "Signals" }
            } }
            tbody {
                @for s in &listed.runs {
                    @if let Some(r) = &s.run {
                        tr data-run-id=(r.id) data-status=(view::status(r.status)) {
                            td { a href={ "/runs/" (path_segment(&r.id)) } { code { (r.id) } } }
                            td { (badge(view::status(r.status))) }
                            td { (r.owner) }
                            td { (r.pipeline) }
                            td { (time(r.created_at.as_ref())) }
                            td { (time(r.ended_at.as_ref())) }
                            td { (s.agents.join(", ")) }
                            td {
                                @if s.drift { span.flag.warn { "drift" } " " }
                                @if s.dead_letters > 0 { span.flag.bad { (s.dead_letters) " dead letter(s)" } }
                            }
                        }
                    }
                }
                @if listed.runs.is_empty() {
                    tr.empty { td colspan="8" { "No runs match." } }
                }
            }
        }
        @if let Some(next) = next {
            p.pager { a rel="next" href=(next) { "Older runs →" } }
        }
    };
    Ok(layout("Runs", Some(visitor), Some("runs"), content))
}

/// A `google.protobuf.Value` as JSON.
fn value_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind as V;
    match &v.kind {
        None | Some(V::NullValue(_)) => serde_json::Value::Null,
        Some(V::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(V::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(V::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(V::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect(),
        ),
        Some(V::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_json).collect())
        }
    }
}

fn compact(v: &serde_json::Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 400 {
        let cut: String = text.chars().take(400).collect();
        format!("{cut}… ({} bytes)", text.len())
    } else {
        text
    }
}

/// One state revision as the run page shows it.
struct Revision {
    revision: u64,
    handoff_id: String,
    source_agent: String,
    at: Option<prost_types::Timestamp>,
    values: BTreeMap<String, serde_json::Value>,
    change: pb::StateChange,
}

/// One stored handoff with its payload.
struct Shown {
    event: pb::Event,
    envelope: Option<pb::HandoffEnvelope>,
    /// Whether the inbox was read for it (`envelope` `None`: settled and
    /// no longer kept).
    looked: bool,
}

/// The five signals of one run.
struct Signals {
    dropped: Vec<(String, String)>,
    reasks: Vec<(String, String)>,
    drift: Option<pb::IntentScore>,
    drift_events: usize,
    handoffs: usize,
    tool_age: Option<std::time::Duration>,
}

fn signals(run: &pb::Run, timeline: &[pb::Event], shown: &[Shown]) -> Signals {
    let mut s = Signals {
        dropped: Vec::new(),
        reasks: Vec::new(),
        drift: run.intent.clone(),
        drift_events: 0,
        handoffs: 0,
        tool_age: None,
    };
    for e in timeline {
        match K::try_from(e.kind) {
            Ok(K::HandoffAccepted) => {
                s.handoffs += 1;
                for f in &e.dropped_fields {
                    s.dropped.push((e.source_agent.clone(), f.clone()));
                }
                for k in &e.reasks {
                    s.reasks.push((e.source_agent.clone(), k.clone()));
                }
            }
            Ok(K::IntentDrift) => s.drift_events += 1,
            _ => {}
        }
    }
    for h in shown {
        let Some(env) = &h.envelope else { continue };
        let created = env
            .created_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok());
        for t in &env.tool_results {
            let observed = t
                .observed_at
                .and_then(|t| std::time::SystemTime::try_from(t).ok());
            if let (Some(c), Some(o)) = (created, observed) {
                let age = c.duration_since(o).unwrap_or_default();
                s.tool_age = Some(s.tool_age.map_or(age, |a| a.max(age)));
            }
        }
    }
    s
}

/// `/runs/<id>`: a run's header, signals, graph, timeline, state and
/// payloads, with the actions the visitor may take.
pub(crate) async fn run(
    broker: &Broker,
    visitor: &Visitor,
    run_id: &str,
) -> Result<Markup, BrokerError> {
    let got = app::runs::get(
        broker,
        &visitor.caller,
        pb::GetRunRequest {
            run_id: run_id.to_string(),
        },
    )
    .await?;
    let run = got.run.unwrap_or_default();
    let timeline = got.timeline;
    // Stored handoffs and their payloads.
    let accepted: Vec<&pb::Event> = timeline
        .iter()
        // Handoffs to an agent (a branch result is kept with its barrier).
        .filter(|e| {
            e.kind == K::HandoffAccepted as i32 && e.inbox_sequence > 0 && !e.agent.is_empty()
        })
        .collect();
    let envelopes = futures::future::join_all(
        accepted
            .iter()
            .take(INLINE_PAYLOADS)
            .map(|e| broker.store().handoff_at(e.inbox_sequence)),
    )
    .await;
    let mut shown: Vec<Shown> = accepted
        .iter()
        .zip(envelopes)
        .map(|(e, got)| Shown {
            event: (*e).clone(),
            envelope: got
                .ok()
                .flatten()
                .map(|m| m.envelope)
                .filter(|env| env.id == e.handoff_id),
            looked: true,
        })
        .collect();
    shown.extend(accepted.iter().skip(INLINE_PAYLOADS).map(|e| Shown {
        event: (*e).clone(),
        envelope: None,
        looked: false,
    }));
    // The barriers' branch results (kept with the barrier).
    let opened: BTreeSet<&str> = timeline
        .iter()
        .filter(|e| e.kind == K::BarrierOpened as i32)
        .map(|e| e.barrier_id.as_str())
        .collect();
    let mut barriers = Vec::new();
    for id in opened {
        let got = app::barriers::get(
            broker,
            &visitor.caller,
            pb::GetBarrierRequest {
                run_id: run.id.clone(),
                barrier_id: id.to_string(),
            },
        )
        .await?;
        barriers.extend(got.barrier);
    }
    // State revisions, the latest ones.
    let latest = app::state::latest(broker, &run.id).await?;
    let latest_revision = latest.as_ref().map_or(0, |l| l.revision);
    let first = latest_revision.saturating_sub(REVISIONS).max(1);
    let records = futures::future::join_all(
        (first.saturating_sub(1).max(1)..=latest_revision)
            .map(|r| app::state::at(broker, &run.id, r)),
    )
    .await;
    let revisions: Vec<Revision> = records
        .into_iter()
        .filter_map(|r| r.ok().flatten())
        .map(|record| {
            let state = crate::rules::state::view(&record, &[]);
            Revision {
                revision: record.revision,
                handoff_id: record.handoff_id.clone(),
                source_agent: record.source_agent.clone(),
                at: record.at,
                values: state
                    .values
                    .iter()
                    .map(|(k, v)| (k.clone(), value_json(v)))
                    .collect(),
                change: record.change.clone().unwrap_or_default(),
            }
        })
        .collect();
    // Dead letters of this run (the visitor may read it).
    // Read from the inboxes of the agents its timeline names.
    let dead_agents: BTreeSet<&str> = timeline
        .iter()
        .filter(|e| e.kind == K::DeadLettered as i32)
        .map(|e| e.agent.as_str())
        .collect();
    let mut dead: Vec<pb::DeadLetter> = Vec::new();
    for agent in dead_agents {
        dead.extend(
            broker
                .store()
                .dead_letters(Some(agent), 10_000)
                .await?
                .into_iter()
                .filter(|d| d.handoff.as_ref().is_some_and(|h| h.run_id == run.id)),
        );
    }
    let signals = signals(&run, &timeline, &shown);
    let may_act = visitor.may_own(&run.owner);
    let content = html! {
        (header(&run, &timeline))
        (signals_section(&run, &signals))
        @if may_act { (actions(visitor, &run, &revisions, &dead, broker)) }
        @else if !dead.is_empty() { (dead_letters_list(None, &dead, &format!("/runs/{}", path_segment(&run.id)))) }
        section id="graph-section" aria-labelledby="graph-h" {
            h2 id="graph-h" { "Graph" }
            div.graph-wrap { (view::svg(graph::draw(&run, &timeline))) }
        }
        (timeline_section(&timeline))
        (state_section(&revisions, &timeline))
        (payloads_section(broker, &run, &shown, &barriers))
    };
    Ok(layout(
        &format!("Run {}", short(&run.id)),
        Some(visitor),
        Some(&run.id),
        content,
    ))
}

fn header(run: &pb::Run, timeline: &[pb::Event]) -> Markup {
    let depth = timeline.iter().map(|e| e.depth).max().unwrap_or(0);
    let pinned = run.pinned.clone().unwrap_or_default();
    let fields: BTreeMap<&String, &String> = pinned.fields.iter().collect();
    html! {
        section id="run-header" data-run-id=(run.id) data-status=(view::status(run.status)) aria-labelledby="run-h" {
            h1 id="run-h" { "Run " code { (run.id) } " " (badge(view::status(run.status))) }
            dl.facts {
                dt { "Owner" } dd data-field="owner" { (run.owner) }
                dt { "Ask" } dd data-field="ask" { (pinned.ask) }
                @for (k, v) in &fields { dt { "Pinned " (k) } dd data-field={ "pinned." (k) } { (v) } }
                dt { "Pipeline" } dd { (if run.pipeline.is_empty() { "—" } else { &run.pipeline }) }
                dt { "Started" } dd { (time(run.created_at.as_ref())) }
                dt { "Deadline" } dd data-field="deadline" { (time(run.deadline.as_ref())) }
                dt { "Ended" } dd { (time(run.ended_at.as_ref())) }
                dt { "Depth" } dd data-field="depth" { (depth) " of " (if run.max_depth == 0 { "no cap".to_string() } else { run.max_depth.to_string() }) }
                @if !run.failure.is_empty() { dt { "Failure" } dd.error data-field="failure" { (run.failure) } }
                @if !run.parent_run_id.is_empty() {
                    dt { "Forked from" } dd { a href={ "/runs/" (path_segment(&run.parent_run_id)) } { code { (run.parent_run_id) } } " at revision " (run.forked_at_revision) }
                }
            }
        }
    }
}

fn signals_section(run: &pb::Run, s: &Signals) -> Markup {
    let judge = s.drift.as_ref();
    html! {
        section id="signals" aria-labelledby="signals-h" {
            h2 id="signals-h" { "Signals" }
            ul.signals {
                li data-signal="dropped_fields" data-count=(s.dropped.len()) class=[(!s.dropped.is_empty()).then_some("hot")] {
                    strong { "Dropped fields: " (s.dropped.len()) }
                    @for (agent, field) in &s.dropped { " " span.flag.bad { (field) " (by " (agent) ")" } }
                }
                li data-signal="reasks" data-count=(s.reasks.len()) class=[(!s.reasks.is_empty()).then_some("hot")] {
                    strong { "Stale re-asks: " (s.reasks.len()) }
                    @for (agent, key) in &s.reasks { " " span.flag.warn { (key) " (by " (agent) ")" } }
                }
                li data-signal="intent_drift" data-drift=(judge.is_some_and(|j| j.drift)) class=[judge.filter(|j| j.drift).map(|_| "hot")] {
                    strong { "Judge score: " }
                    @match judge {
                        Some(j) => {
                            span data-field="judge_score" { (format!("{:.2}", j.score)) }
                            @if let Some(spec) = &run.judge { " (threshold " (format!("{:.2}", spec.threshold)) ", judge " (spec.agent) ")" }
                            @if j.drift { " " span.flag.bad { "intent drift" } }
                            @if !j.reason.is_empty() { " — " (j.reason) }
                        }
                        None => { @if run.judge.is_some() { "waiting for the judge" } @else { "no judge" } }
                    }
                }
                li data-signal="handoffs" data-count=(s.handoffs) { strong { "Handoffs: " (s.handoffs) } }
                li data-signal="tool_result_age" {
                    strong { "Oldest tool result at handoff: " }
                    (s.tool_age.map_or("—".to_string(), |a| humantime::format_duration(std::time::Duration::from_secs(a.as_secs())).to_string()))
                }
            }
        }
    }
}

fn actions(
    visitor: &Visitor,
    run: &pb::Run,
    revisions: &[Revision],
    dead: &[pb::DeadLetter],
    broker: &Broker,
) -> Markup {
    let running = matches!(
        pb::RunStatus::try_from(run.status),
        Ok(pb::RunStatus::Running | pb::RunStatus::WaitingInput)
    );
    let base = format!("/runs/{}", path_segment(&run.id));
    let waiting: Vec<&pb::InputRequest> = run
        .waiting
        .iter()
        .filter(|r| r.outcome == 0 || r.outcome == pb::InputOutcome::Unspecified as i32)
        .collect();
    html! {
        section id="actions" aria-labelledby="actions-h" {
            h2 id="actions-h" { "Actions" }
            @if running {
                form.action data-action="cancel" method="post" action={ (base) "/cancel" } {
                    input type="hidden" name="csrf" value=(visitor.csrf);
                    label { "Reason " input name="reason" placeholder="why it is cancelled"; }
                    button.danger type="submit" { "Cancel run" }
                }
            }
            @for request in &waiting {
                (answer_form(visitor, broker, &base, request))
            }
            (dead_letters_list(Some(visitor), dead, &base))
            form.action data-action="fork" method="post" action={ (base) "/fork" } {
                input type="hidden" name="csrf" value=(visitor.csrf);
                fieldset {
                    legend { "Fork from a state revision" }
                    label { "Revision "
                        select name="revision" {
                            @if revisions.is_empty() { option value="0" { "0 (no state)" } }
                            @for r in revisions.iter().rev() { option value=(r.revision) { (r.revision) } }
                        }
                    }
                    label { "Hand off to agent " input name="agent" required pattern="[A-Za-z0-9_-]{1,128}"; }
                    label { "Payload (JSON of the agent's contract) " textarea name="payload" rows="3" {} }
                    button type="submit" { "Fork run" }
                }
            }
        }
    }
}

fn answer_form(
    visitor: &Visitor,
    broker: &Broker,
    base: &str,
    request: &pb::InputRequest,
) -> Markup {
    let contract = request.answer.clone().unwrap_or_default();
    let fields = json::answer_form(broker, &contract.message_type, contract.max_version);
    html! {
        form.action data-action="input" data-request=(request.id) method="post" action={ (base) "/inputs/" (path_segment(&request.id)) } {
            input type="hidden" name="csrf" value=(visitor.csrf);
            fieldset {
                legend { "Answer " (request.agent) ": " (request.prompt) }
                p.hint { "Answer contract " code { (contract.message_type) } "; asked " (time(request.asked_at.as_ref())) ", deadline " (time(request.deadline.as_ref())) }
                @match &fields {
                    Some(fields) => {
                        @for f in fields {
                            @let id = format!("in-{}-{}", short(&request.id), f.name);
                            @let name = format!("field.{}", f.name);
                            @match &f.input {
                                json::Input::Text => { label for=(id) { (f.name) } input id=(id) name=(name); }
                                json::Input::Number => { label for=(id) { (f.name) } input id=(id) name=(name) inputmode="decimal"; }
                                json::Input::Checkbox => { label { input id=(id) type="checkbox" name=(name) value="true"; " " (f.name) } }
                                json::Input::Choice(values) => {
                                    label for=(id) { (f.name) }
                                    select id=(id) name=(name) { @for v in values { option value=(v) { (v) } } }
                                }
                                json::Input::Json => { label for=(id) { (f.name) " (JSON)" } textarea id=(id) name=(name) rows="2" {} }
                            }
                        }
                    }
                    None => { p.error { "The answer's contract is not registered here; answer with handoffctl." } }
                }
                button type="submit" disabled[fields.is_none()] { "Send answer" }
            }
        }
    }
}

fn dead_letters_list(visitor: Option<&Visitor>, dead: &[pb::DeadLetter], back: &str) -> Markup {
    html! {
        @if !dead.is_empty() {
            div.dead-letters {
                h3 { "Dead letters" }
                ul {
                    @for d in dead {
                        li data-dead-letter=(d.sequence) {
                            "#" (d.sequence) " for " strong { (d.agent) } " after " (d.attempts) " attempt(s): " (d.reason)
                            @if let Some(v) = visitor {
                                form.action.inline data-action="redrive" method="post" action={ "/dead-letters/" (d.sequence) "/redrive" } {
                                    input type="hidden" name="csrf" value=(v.csrf);
                                    input type="hidden" name="back" value=(back);
                                    label { "to " input name="to_agent" placeholder=(d.agent) size="12"; }
                                    button type="submit" { "Redrive" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn event_detail(e: &pb::Event) -> String {
    let mut parts = Vec::new();
    if !e.source_agent.is_empty() {
        parts.push(format!("from {}", e.source_agent));
    }
    if !e.agent.is_empty() {
        parts.push(format!("agent {}", e.agent));
    }
    if !e.instance.is_empty() {
        parts.push(format!("instance {}", e.instance));
    }
    if !e.barrier_id.is_empty() {
        parts.push(format!("barrier {}", e.barrier_id));
    }
    if !e.branch_key.is_empty() {
        parts.push(format!("branch {}", e.branch_key));
    }
    if e.attempt > 1 {
        parts.push(format!("attempt {}", e.attempt));
    }
    if !e.dropped_fields.is_empty() {
        parts.push(format!("dropped {}", e.dropped_fields.join(", ")));
    }
    if !e.reasks.is_empty() {
        parts.push(format!("re-asked {}", e.reasks.join(", ")));
    }
    if e.kind == K::IntentScored as i32 || e.kind == K::IntentDrift as i32 {
        parts.push(format!("score {:.2}", e.intent_score));
    }
    if !e.rule.is_empty() {
        parts.push(format!("rule {}", e.rule));
    }
    if !e.reason.is_empty() {
        parts.push(e.reason.clone());
    }
    parts.join(" · ")
}

fn timeline_section(timeline: &[pb::Event]) -> Markup {
    let kinds: BTreeSet<&'static str> = timeline
        .iter()
        .map(|e| app::events::kind_token(e.kind))
        .collect();
    html! {
        section id="timeline-section" aria-labelledby="timeline-h" {
            h2 id="timeline-h" { "Timeline (" (timeline.len()) " events, in causal order)" }
            label.filter { "Show "
                select id="timeline-filter" aria-controls="timeline" {
                    option value="" { "every kind" }
                    @for k in &kinds { option value=(k) { (k) } }
                }
            }
            ol id="timeline" {
                @for e in timeline {
                    @let kind = app::events::kind_token(e.kind);
                    li data-kind=(kind) data-seq=(e.sequence) data-position=(clock::order_key(e).0) data-handoff-id=(e.handoff_id) data-branch=(e.branch_key) {
                        time { (time(e.at.as_ref())) }
                        " " span class={ "kind k-" (kind) } { (kind) }
                        @if !e.handoff_id.is_empty() { " " code title=(e.handoff_id) { (short(&e.handoff_id)) } }
                        " " span.detail { (event_detail(e)) }
                    }
                }
            }
        }
    }
}

fn state_section(revisions: &[Revision], timeline: &[pb::Event]) -> Markup {
    let dropped_by: BTreeMap<&str, &Vec<String>> = timeline
        .iter()
        .filter(|e| e.kind == K::HandoffAccepted as i32 && !e.dropped_fields.is_empty())
        .map(|e| (e.handoff_id.as_str(), &e.dropped_fields))
        .collect();
    html! {
        section id="state" aria-labelledby="state-h" {
            h2 id="state-h" { "State" }
            @if revisions.is_empty() { p { "This run has no state." } }
            @for (i, r) in revisions.iter().enumerate().rev() {
                @let before = i.checked_sub(1).and_then(|p| revisions.get(p));
                @let changed: BTreeSet<&str> = r.change.added.iter().chain(&r.change.changed).chain(&r.change.removed).map(String::as_str).collect();
                div.revision data-revision=(r.revision) {
                    h3 { "Revision " (r.revision) }
                    p.hint {
                        @if r.source_agent.is_empty() { "by the owner" } @else { "by " strong { (r.source_agent) } }
                        @if !r.handoff_id.is_empty() { ", handoff " code title=(r.handoff_id) { (short(&r.handoff_id)) } }
                        ", " (time(r.at.as_ref()))
                    }
                    @if let Some(fields) = dropped_by.get(r.handoff_id.as_str()) {
                        p.dropped role="note" { "Dropped on this hop: " @for f in fields.iter() { span.flag.bad { (f) } " " } }
                    }
                    table.diff {
                        caption.visually-hidden { "Changes of revision " (r.revision) }
                        thead { tr { th scope="col" { "Key" } th scope="col" { "Change" } th scope="col" { "Before" } th scope="col" { "After" } } }
                        tbody {
                            @for key in &r.change.added {
                                tr.added data-key=(key) { td { code { (key) } } td { "added" } td { "—" } td { code { (r.values.get(key).map(compact).unwrap_or_default()) } } }
                            }
                            @for key in &r.change.changed {
                                tr.changed data-key=(key) {
                                    td { code { (key) } } td { "changed" }
                                    td { code { (before.and_then(|b| b.values.get(key)).map(compact).unwrap_or_else(|| "…".to_string())) } }
                                    td { code { (r.values.get(key).map(compact).unwrap_or_default()) } }
                                }
                            }
                            @for key in &r.change.removed {
                                tr.removed data-key=(key) {
                                    td { code { (key) } } td { "removed" }
                                    td { code { (before.and_then(|b| b.values.get(key)).map(compact).unwrap_or_else(|| "…".to_string())) } }
                                    td { "—" }
                                }
                            }
                        }
                    }
                    details {
                        summary { "Whole state at revision " (r.revision) " (" (r.values.len()) " keys)" }
                        dl.state-values {
                            @for (k, v) in &r.values {
                                dt class=[changed.contains(k.as_str()).then_some("changed")] { code { (k) } }
                                dd { code { (compact(v)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn payloads_section(
    broker: &Broker,
    run: &pb::Run,
    shown: &[Shown],
    barriers: &[pb::Barrier],
) -> Markup {
    let base = format!("/runs/{}", path_segment(&run.id));
    html! {
        section id="payloads" aria-labelledby="payloads-h" {
            h2 id="payloads-h" { "Payloads" }
            @for h in shown {
                @let e = &h.event;
                div.handoff data-handoff-id=(e.handoff_id) {
                    h3 {
                        (if e.source_agent.is_empty() { "owner" } else { &e.source_agent }) " → " (e.agent)
                        @if !e.branch_key.is_empty() { " (branch " (e.branch_key) ")" }
                        " " code { (short(&e.handoff_id)) }
                    }
                    @match &h.envelope {
                        Some(env) => { (payload_view(broker, env.payload.as_ref(), env.payload_ref.as_ref(), env.contract_version, &format!("{base}/handoffs/{}", path_segment(&e.handoff_id)))) }
                        None if h.looked => { p.hint { "Settled: the inbox no longer keeps its payload." } }
                        None => { p { a href={ (base) "/handoffs/" (path_segment(&e.handoff_id)) } { "Show this handoff's payload" } } }
                    }
                }
            }
            @for b in barriers {
                @let spec = b.spec.clone().unwrap_or_default();
                @for r in b.branches.iter().filter(|r| r.payload.is_some() || r.payload_ref.is_some()) {
                    div.handoff.branch-result data-handoff-id=(r.handoff_id) data-branch=(r.key) {
                        h3 { (r.source_agent) " → barrier " (spec.barrier_id) " (branch " (r.key) ", "
                            (pb::BranchStatus::try_from(r.status).map_or("unknown", |s| s.as_str_name()).trim_start_matches("BRANCH_STATUS_").to_lowercase()) ")" }
                        (payload_view(broker, r.payload.as_ref(), r.payload_ref.as_ref(), 0, ""))
                    }
                }
            }
            @if let Some(result) = &run.result {
                div.handoff.result data-handoff-id=(run.result_handoff_id) {
                    h3 { "Result" }
                    (payload_view(broker, Some(result), run.result_ref.as_ref(), 0, ""))
                }
            }
        }
    }
}

fn payload_view(
    broker: &Broker,
    payload: Option<&prost_types::Any>,
    reference: Option<&pb::PayloadRef>,
    version: u32,
    raw_link: &str,
) -> Markup {
    html! {
        @if let Some(any) = payload {
            p.hint { code { (json::type_name(&any.type_url)) } " · " (any.value.len()) " bytes"
                @if !raw_link.is_empty() { " · " a href={ (raw_link) "?raw=true" } { "raw bytes" } }
            }
            @match json::payload_json(broker, any, version) {
                Some(text) => { (view::json_block("Payload as JSON", &text)) }
                None => { p { "No registered contract decodes this payload." } }
            }
        } @else if let Some(r) = reference {
            p.hint { "Stored by reference: " code { (json::type_name(&r.type_url)) } " · " (r.size) " bytes · sha256 " code { (short(&r.sha256)) }
                @if !raw_link.is_empty() { " · " a href=(raw_link) { "fetch and decode" } }
            }
        } @else {
            p.hint { "No payload." }
        }
    }
}

/// `/runs/<id>/handoffs/<handoff_id>`: one handoff, its payload decoded
/// (a reference fetched) or, with `raw`, its bytes.
pub(crate) async fn handoff(
    broker: &Broker,
    visitor: &Visitor,
    run_id: &str,
    handoff_id: &str,
    raw: bool,
) -> Result<Markup, BrokerError> {
    let got = app::inspect::get_handoff(
        broker,
        &visitor.caller,
        pb::GetHandoffRequest {
            run_id: run_id.to_string(),
            handoff_id: handoff_id.to_string(),
        },
    )
    .await?;
    let back = format!("/runs/{}", path_segment(run_id));
    let Some(env) = got.handoff else {
        let content = html! {
            h1 { "Handoff " code { (handoff_id) } }
            p { a href=(back) { "← run " code { (short(run_id)) } } }
            p { "Settled: the inbox no longer keeps this handoff's payload. Its events are on the run's timeline." }
        };
        return Ok(layout("Handoff", Some(visitor), Some(run_id), content));
    };
    let mut payload = env.payload.clone();
    let mut too_large = None;
    if payload.is_none() {
        if let Some(r) = env.payload_ref.as_ref().filter(|r| r.size > SHOWN_BYTES) {
            too_large = Some(r.size);
        } else if let Some(r) = &env.payload_ref {
            let bytes = app::payloads::fetch(broker, r).await?;
            payload = Some(prost_types::Any {
                type_url: r.type_url.clone(),
                value: bytes.to_vec(),
            });
        }
    }
    let content = html! {
        h1 { "Handoff " code { (env.id) } }
        p { a href=(back) { "← run " code { (short(run_id)) } } }
        dl.facts {
            dt { "From" } dd { (if env.source_agent.is_empty() { "owner" } else { &env.source_agent }) }
            dt { "To" } dd { (env.target_agent) }
            dt { "Depth" } dd { (env.depth) }
            dt { "Contract" } dd { code { (env.contract_type) } " v" (env.contract_version) }
            dt { "Created" } dd { (time(env.created_at.as_ref())) }
        }
        @if let Some(size) = too_large {
            p { "Stored by reference, " (size) " bytes: more than the console shows (" (SHOWN_BYTES) "); read it with " code { "handoffctl handoff show" } " or GetPayload." }
        }
        @if let Some(any) = &payload {
            @if raw {
                h2 { "Raw bytes (" (any.value.len()) ")" }
                pre.raw aria-label="Payload bytes in hexadecimal" tabindex="0" { code { (view::hex(&any.value[..any.value.len().min(RAW_BYTES)])) } }
                @if any.value.len() > RAW_BYTES { p.hint { "The first " (RAW_BYTES) " bytes." } }
            } @else {
                (payload_view(broker, Some(any), None, env.contract_version, &format!("/runs/{}/handoffs/{}", path_segment(run_id), path_segment(handoff_id))))
            }
        }
    };
    Ok(layout("Handoff", Some(visitor), Some(run_id), content))
}

/// `/agents` and `/agents/<name>`: registered agents, their contracts,
/// live instances by replica, backlog and dead letters.
pub(crate) async fn agents(
    broker: &Broker,
    visitor: &Visitor,
    only: Option<&str>,
) -> Result<Markup, BrokerError> {
    let listed = app::agents::list(broker, &visitor.caller).await?;
    let instances = app::instances::list(
        broker,
        &visitor.caller,
        pb::ListInstancesRequest {
            agent: only.unwrap_or_default().to_string(),
        },
    )
    .await?
    .instances;
    if let Some(name) = only {
        if !listed.agents.iter().any(|a| a.name == name) {
            return Err(BrokerError::AgentNotFound(name.to_string()));
        }
    }
    let dead = match only {
        Some(name) => {
            app::events::dead_letters(
                broker,
                &visitor.caller,
                pb::ListDeadLettersRequest {
                    agent: name.to_string(),
                    limit: 200,
                },
            )
            .await?
            .dead_letters
        }
        None => Vec::new(),
    };
    let status: BTreeMap<&str, &pb::AgentStatus> =
        listed.status.iter().map(|s| (s.name.as_str(), s)).collect();
    let content = html! {
        @match only {
            Some(name) => { h1 { "Agent " (name) } p { a href="/agents" { "← every agent" } } }
            None => { h1 { "Agents" } }
        }
        table id="agents" {
            caption.visually-hidden { "Registered agents" }
            thead { tr {
                th scope="col" { "Agent" } th scope="col" { "Accepts" } th scope="col" { "Emits" }
                th scope="col" { "Instances" } th scope="col" { "Pending" } th scope="col" { "In flight" }
                th scope="col" { "Oldest pending" }
            } }
            tbody {
                @for a in listed.agents.iter().filter(|a| only.is_none_or(|n| n == a.name)) {
                    @let s = status.get(a.name.as_str());
                    tr data-agent=(a.name) class=[s.filter(|s| s.unattended).map(|_| "unattended")] {
                        td { a href={ "/agents/" (path_segment(&a.name)) } { (a.name) } @if !a.description.is_empty() { br; small { (a.description) } } }
                        td { @if let Some(c) = &a.accepts { code { (c.message_type) } } }
                        td { (a.emits.join(", ")) }
                        td { (s.map_or(0, |s| s.instances)) }
                        td { (s.map_or(0, |s| s.pending)) }
                        td { (s.map_or(0, |s| s.in_flight)) }
                        td { (view::age(s.and_then(|s| s.oldest_pending_age.as_ref()))) @if s.is_some_and(|s| s.unattended) { " " span.flag.bad { "unattended" } } }
                    }
                }
            }
        }
        h2 { "Live instances" }
        table id="instances" {
            caption.visually-hidden { "Live instances by replica" }
            thead { tr { th scope="col" { "Agent" } th scope="col" { "Instance" } th scope="col" { "Replica" } th scope="col" { "In flight" } th scope="col" { "Connected since" } th scope="col" { "Last settled" } } }
            tbody {
                @for i in &instances {
                    tr data-instance=(i.instance) {
                        td { (i.agent) } td { (i.instance) } td { (i.replica) }
                        td { (i.in_flight) " / " (i.max_in_flight) }
                        td { (time(i.connected_since.as_ref())) } td { (time(i.last_settled_at.as_ref())) }
                    }
                }
                @if instances.is_empty() { tr.empty { td colspan="6" { "No live instance." } } }
            }
        }
        @if only.is_some() {
            h2 { "Dead letters" }
            @if dead.is_empty() { p { "None." } }
            @else {
                ul {
                    @for d in &dead {
                        @let run_id = d.handoff.as_ref().map(|h| h.run_id.clone()).unwrap_or_default();
                        li data-dead-letter=(d.sequence) {
                            "#" (d.sequence) " run " a href={ "/runs/" (path_segment(&run_id)) } { code { (short(&run_id)) } }
                            " after " (d.attempts) " attempt(s): " (d.reason)
                            " (redrive it from its run's page)"
                        }
                    }
                }
            }
        }
    };
    Ok(layout("Agents", Some(visitor), Some("agents"), content))
}

/// `/contracts`: every version of every contract, its mode and rules,
/// and what changed from the version before.
pub(crate) async fn contracts(broker: &Broker, visitor: &Visitor) -> Result<Markup, BrokerError> {
    // Who may: as ListContracts.
    app::contracts::list(broker, &visitor.caller, pb::ListContractsRequest::default()).await?;
    let mut by_type: BTreeMap<String, Vec<std::sync::Arc<crate::rules::contracts::Compiled>>> =
        BTreeMap::new();
    for c in broker.contracts().all() {
        by_type
            .entry(c.contract.message_type.clone())
            .or_default()
            .push(c);
    }
    let content = html! {
        h1 { "Contracts" }
        @if by_type.is_empty() { p { "No contract is registered." } }
        @for (name, versions) in &by_type {
            section.contract data-type=(name) {
                h2 { code { (name) } }
                @for (i, compiled) in versions.iter().enumerate() {
                    @let c = &compiled.contract;
                    @let rules = c.rules.clone().unwrap_or_default();
                    div.version data-version=(c.version) {
                        h3 { "Version " (c.version) " · " (crate::rules::contracts::mode_name(pb::Compatibility::try_from(c.compatibility).unwrap_or(pb::Compatibility::Backward))) }
                        p.hint { "registered " (time(c.registered_at.as_ref())) " · fingerprint " code { (short(&c.fingerprint)) } }
                        (rules_list(&rules))
                        @if let Some(prev) = i.checked_sub(1).and_then(|p| versions.get(p)) {
                            (contract_diff(prev, compiled))
                        }
                    }
                }
            }
        }
    };
    Ok(layout(
        "Contracts",
        Some(visitor),
        Some("contracts"),
        content,
    ))
}

fn rules_list(r: &pb::ContractRules) -> Markup {
    html! {
        ul.rules {
            @if !r.required_fields.is_empty() { li { "required: " (r.required_fields.join(", ")) } }
            @if r.max_tokens > 0 { li { "max tokens: " (r.max_tokens) } }
            @if r.max_bytes > 0 { li { "max bytes: " (r.max_bytes) } }
            @if let Some(c) = r.min_confidence { li { "min confidence: " (c) } }
            @if let Some(a) = &r.max_tool_result_age { li { "max tool-result age: " (view::age(Some(a))) } }
            @if !r.carry.is_empty() { li { "carry: " (r.carry.join(", ")) } }
        }
    }
}

/// Fields of a contract version's message, by name: type and number.
fn fields_of(c: &crate::rules::contracts::Compiled) -> BTreeMap<String, String> {
    c.message
        .fields()
        .map(|f| {
            let label = if f.is_list() { "repeated " } else { "" };
            (
                f.name().to_string(),
                format!(
                    "{label}{} = {}",
                    crate::rules::contracts::kind_name(&f.kind()),
                    f.number()
                ),
            )
        })
        .collect()
}

fn contract_diff(
    old: &crate::rules::contracts::Compiled,
    new: &crate::rules::contracts::Compiled,
) -> Markup {
    let (a, b) = (fields_of(old), fields_of(new));
    let (old, new) = (&old.contract, &new.contract);
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    html! {
        table.diff data-from=(old.version) data-to=(new.version) {
            caption { "Changes from version " (old.version) }
            thead { tr { th scope="col" { "Field" } th scope="col" { "Version " (old.version) } th scope="col" { "Version " (new.version) } } }
            tbody {
                @for n in names {
                    @let (x, y) = (a.get(n), b.get(n));
                    @if x != y {
                        tr class=(match (x, y) { (None, _) => "added", (_, None) => "removed", _ => "changed" }) {
                            td { code { (n) } } td { (x.map_or("—", String::as_str)) } td { (y.map_or("—", String::as_str)) }
                        }
                    }
                }
            }
        }
        @if old.rules != new.rules { p.hint { "Rules changed." } }
    }
}

/// `/barriers`: open barriers of the running runs the visitor may read,
/// with arrival progress.
pub(crate) async fn barriers(broker: &Broker, visitor: &Visitor) -> Result<Markup, BrokerError> {
    let listed = app::runs::list(
        broker,
        &visitor.caller,
        pb::ListRunsRequest {
            status: vec![
                pb::RunStatus::Running as i32,
                pb::RunStatus::WaitingInput as i32,
            ],
            page_size: 100,
            ..Default::default()
        },
    )
    .await?;
    let mut open: Vec<pb::Barrier> = Vec::new();
    for s in &listed.runs {
        let Some(run) = &s.run else { continue };
        let events = broker.store().run_events(&run.id).await?;
        let released: BTreeSet<&str> = events
            .iter()
            .filter(|e| e.kind == K::BarrierReleased as i32 || e.kind == K::BarrierTimedOut as i32)
            .map(|e| e.barrier_id.as_str())
            .collect();
        for e in events.iter().filter(|e| {
            e.kind == K::BarrierOpened as i32 && !released.contains(e.barrier_id.as_str())
        }) {
            if let Ok(got) = app::barriers::get(
                broker,
                &visitor.caller,
                pb::GetBarrierRequest {
                    run_id: run.id.clone(),
                    barrier_id: e.barrier_id.clone(),
                },
            )
            .await
            {
                open.extend(got.barrier);
            }
        }
    }
    let content = html! {
        h1 { "Open barriers" }
        p.hint { "Barriers of the 100 newest running runs, not yet released." }
        table id="barriers" {
            caption.visually-hidden { "Open barriers" }
            thead { tr { th scope="col" { "Run" } th scope="col" { "Barrier" } th scope="col" { "Target" } th scope="col" { "Progress" } th scope="col" { "Opened" } } }
            tbody {
                @for b in &open {
                    @let spec = b.spec.clone().unwrap_or_default();
                    @let expected = if b.expected > 0 { b.expected } else { u32::try_from(spec.branch_keys.len()).unwrap_or(spec.branch_count).max(spec.branch_count) };
                    @let done = b.arrived + b.failed + b.skipped;
                    tr data-barrier=(spec.barrier_id) {
                        td { a href={ "/runs/" (path_segment(&spec.run_id)) } { code { (short(&spec.run_id)) } } }
                        td { (spec.barrier_id) }
                        td { (spec.target_agent) }
                        td { progress max=(expected.max(1)) value=(done) aria-label="branches arrived" {} " " (done) " / " (expected) }
                        td { (time(b.opened_at.as_ref())) }
                    }
                }
                @if open.is_empty() { tr.empty { td colspan="5" { "No open barrier." } } }
            }
        }
    };
    Ok(layout("Barriers", Some(visitor), Some("barriers"), content))
}
