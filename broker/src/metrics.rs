//! The broker's metrics, and the endpoint that exposes them
//! (`metrics_listen`, `GET /metrics`, OpenMetrics text).
//!
//! The families are [`prometheus_client`]'s, encoded by its OpenMetrics
//! text encoder, and served by axum: a maintained encoder and a real HTTP
//! server (keep-alive, requests split across reads, concurrent scrapes)
//! rather than hand-written ones.
//!
//! Every value lives in this replica's memory: each replica reports its
//! own, and Prometheus sums them (`sum by (agent) (...)`). The exception
//! is `handoff_pending`, the backlog of an agent's inbox as JetStream
//! counts it, which every replica with a session of that agent reports
//! alike: aggregate it with `max`, not `sum`.
//!
//! Labels are agents, pipelines, rules, reasons, tools and fields, never
//! run ids (one series per run would grow without bound). Label values
//! come from requests, so they are bounded here: a value is cut to
//! [`MAX_LABEL_BYTES`] bytes, and once a family holds [`MAX_SERIES`] label
//! sets, a new one is counted under [`OTHER`] in every label instead.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeMetric},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

/// The longest label value kept, in bytes; longer ones are cut (at a
/// character boundary).
pub const MAX_LABEL_BYTES: usize = 128;

/// The most label sets one metric family keeps; past it, new label sets
/// are folded into one whose every value is [`OTHER`].
pub const MAX_SERIES: usize = 1000;

/// The label value of series folded past [`MAX_SERIES`].
pub const OTHER: &str = "_other";

/// The `agent` label of a final handoff (it has no target agent).
pub const FINAL: &str = "_final";

/// The `agent` label of a branch result handed to its barrier without a
/// target agent.
pub const BARRIER: &str = "_barrier";

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of the latency histograms, in seconds: 1 ms to an hour.
const SECONDS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Buckets of tool-result ages, in seconds: a second to a day.
const AGES: [f64; 13] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

/// Buckets of handoffs per resolved run.
const HOPS: [f64; 10] = [1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0, 89.0];

/// Buckets of intent scores: 0.1 to 1.0 in steps of 0.1.
fn score_buckets() -> impl Iterator<Item = f64> {
    (1..=10).map(|i| f64::from(i) / 10.0)
}

/// A label set: the family's label names with this series' values.
type Labels = Vec<(&'static str, String)>;

/// A metric family whose label values are bounded (see the module doc).
struct Capped<M, C = fn() -> M> {
    names: &'static [&'static str],
    family: Family<Labels, M, C>,
    /// How many label sets the family holds, counted under the lock that
    /// creates them (creation is rare: once per label set).
    series: Mutex<usize>,
}

impl<M, C> Capped<M, C>
where
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    /// The series for `values` (one per label name, in order), folded into
    /// [`OTHER`] when the family is full.
    fn with(&self, values: &[&str]) -> M {
        let labels: Labels = self
            .names
            .iter()
            .zip(values.iter().chain(std::iter::repeat(&"")))
            .map(|(name, value)| (*name, label_value(value).into_owned()))
            .collect();
        if let Some(m) = self.family.get(&labels) {
            return m.clone();
        }
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if self.family.get(&labels).is_none() {
            if *series >= MAX_SERIES {
                let other: Labels = self.names.iter().map(|n| (*n, OTHER.to_string())).collect();
                if self.family.get(&other).is_none() {
                    *series += 1;
                }
                return self.family.get_or_create_owned(&other);
            }
            *series += 1;
        }
        self.family.get_or_create_owned(&labels)
    }

    /// The value series `values` would be folded into, if any exists.
    fn get(&self, values: &[&str]) -> Option<M> {
        let labels: Labels = self
            .names
            .iter()
            .zip(values.iter())
            .map(|(name, value)| (*name, label_value(value).into_owned()))
            .collect();
        self.family.get(&labels).map(|m| m.clone())
    }

    /// Forgets the series of `values`.
    fn remove(&self, values: &[&str]) {
        let labels: Labels = self
            .names
            .iter()
            .zip(values.iter())
            .map(|(name, value)| (*name, label_value(value).into_owned()))
            .collect();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if self.family.remove(&labels) {
            *series = series.saturating_sub(1);
        }
    }
}

/// A label value as exposed: cut to [`MAX_LABEL_BYTES`] bytes, then
/// escaped for the text format (`\`, `"` and line feeds; the encoder
/// writes label values verbatim, and tool and field names are free text).
fn label_value(value: &str) -> Cow<'_, str> {
    let mut end = value.len().min(MAX_LABEL_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let cut = &value[..end];
    if !cut.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(cut);
    }
    let mut out = String::with_capacity(cut.len() + 8);
    for c in cut.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The `agent` label of a handoff's target: the agent, or [`FINAL`] for a
/// final handoff, or [`BARRIER`] for a branch result with no target.
pub fn target_label(target_agent: &str, is_final: bool, to_barrier: bool) -> &str {
    if is_final {
        FINAL
    } else if target_agent.is_empty() && to_barrier {
        BARRIER
    } else {
        target_agent
    }
}

type Histograms = Capped<Histogram, fn() -> Histogram>;

/// One family as exposed: its name (without `_total` or the unit, which
/// the encoder appends), its help, its unit, and its series.
struct Described {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    metric: Box<dyn EncodeMetric + Send + Sync>,
}

/// Every family, described (`# HELP`, `# TYPE`) even while it has no
/// series: the registry leaves out empty families, and a dashboard or a
/// scrape check should find every family from the start.
struct Families(Vec<Described>);

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|d| d.name))
            .finish()
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for d in &self.0 {
            let series = encoder.encode_descriptor(
                d.name,
                d.help,
                d.unit.as_ref(),
                d.metric.metric_type(),
            )?;
            d.metric.encode(series)?;
        }
        Ok(())
    }
}

/// Registers `family`, bounded to `names`' label sets.
fn register<M, C>(
    registry: &mut Vec<Described>,
    (name, help, unit): (&'static str, &'static str, Option<Unit>),
    names: &'static [&'static str],
    family: Family<Labels, M, C>,
) -> Capped<M, C>
where
    Family<Labels, M, C>: EncodeMetric + Clone + Send + Sync + 'static,
{
    registry.push(Described {
        name,
        help,
        unit,
        metric: Box::new(family.clone()),
    });
    Capped {
        names,
        family,
        series: Mutex::new(0),
    }
}

/// Registers a bounded counter family; `name` without `_total`, which
/// the encoder appends.
fn counters(
    registry: &mut Vec<Described>,
    name: &'static str,
    help: &'static str,
    names: &'static [&'static str],
) -> Capped<Counter> {
    register(registry, (name, help, None), names, Family::default())
}

/// Registers a bounded histogram family.
fn histograms(
    registry: &mut Vec<Described>,
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    names: &'static [&'static str],
    buckets: fn() -> Histogram,
) -> Histograms {
    let family = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(buckets);
    register(registry, (name, help, unit), names, family)
}

/// Registers a bounded gauge family.
fn gauges(
    registry: &mut Vec<Described>,
    name: &'static str,
    help: &'static str,
    names: &'static [&'static str],
) -> Capped<Gauge> {
    register(registry, (name, help, None), names, Family::default())
}

const AGENT: &[&str] = &["agent"];
const STREAM: &[&str] = &["stream"];

/// The broker's metrics (see the module doc for the series and labels).
pub struct Metrics {
    registry: Registry,
    accepted: Capped<Counter>,
    deliveries: Capped<Counter>,
    acked: Capped<Counter>,
    nacked: Capped<Counter>,
    redelivered: Capped<Counter>,
    rejected: Capped<Counter>,
    dead_lettered: Capped<Counter>,
    contract_rejections: Capped<Counter>,
    denied: Capped<Counter>,
    unauthenticated: Capped<Counter>,
    denials_unrecorded: Counter,
    events_dropped: Counter,
    call: Histograms,
    queue_wait: Histograms,
    processing: Histograms,
    barrier_wait: Histograms,
    barrier_release: Histograms,
    in_flight: Capped<Gauge>,
    pending: Capped<Gauge>,
    store_bytes: Capped<Gauge>,
    store_messages: Capped<Gauge>,
    store_limit: Capped<Gauge>,
    dropped_fields: Capped<Counter>,
    stale_reasks: Capped<Counter>,
    intent_score: Histograms,
    intent_drift: Capped<Counter>,
    run_handoffs: Histograms,
    tool_result_age: Histograms,
    stale_tool_results: Capped<Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every family, registered and empty.
    pub fn new() -> Metrics {
        let mut r = Vec::new();
        let seconds = || Histogram::new(SECONDS);
        let accepted = counters(
            &mut r,
            "handoff_handoffs_accepted",
            "Handoffs durably accepted, by target agent (_final: a run's result; _barrier: a branch result to its barrier).",
            AGENT,
        );
        let deliveries = counters(
            &mut r,
            "handoff_deliveries",
            "Deliveries to an instance, redeliveries included, by agent.",
            AGENT,
        );
        let acked = counters(
            &mut r,
            "handoff_acked",
            "Deliveries acked (by the instance, or by a handoff that consumed them), by agent.",
            AGENT,
        );
        let nacked = counters(
            &mut r,
            "handoff_nacked",
            "Deliveries nacked by the instance (retry later), by agent.",
            AGENT,
        );
        let redelivered = counters(
            &mut r,
            "handoff_redelivered",
            "Deliveries of a later attempt (after a nack or an expired lease), by agent.",
            AGENT,
        );
        let rejected = counters(
            &mut r,
            "handoff_rejected",
            "Deliveries rejected by the instance (terminal failure), by agent.",
            AGENT,
        );
        let dead_lettered = counters(
            &mut r,
            "handoff_dead_lettered",
            "Handoffs sent to the dead letter, by the agent that did not settle them.",
            AGENT,
        );
        let contract_rejections = counters(
            &mut r,
            "handoff_contract_rejections",
            "Handoffs refused at the door, by guard.",
            &["rule"],
        );
        let denied = counters(
            &mut r,
            "handoff_access_denied",
            "Calls refused for who made them, by reason.",
            &["reason"],
        );
        let unauthenticated = counters(
            &mut r,
            "handoff_unauthenticated",
            "Calls refused for carrying no valid credentials, by reason and peer address (never stored as events).",
            &["reason", "peer"],
        );
        let denials_unrecorded = Counter::default();
        r.push(Described {
            name: "handoff_access_denied_unrecorded",
            help: "access_denied events not stored because their principal was over its rate.",
            unit: None,
            metric: Box::new(denials_unrecorded.clone()),
        });
        let events_dropped = Counter::default();
        r.push(Described {
            name: "handoff_events_dropped",
            help: "Events given up after retrying to store them.",
            unit: None,
            metric: Box::new(events_dropped.clone()),
        });
        let call = histograms(
            &mut r,
            "handoff_handoff_call",
            "Latency of accepted Handoff calls, at the gRPC edge, by target agent.",
            Some(Unit::Seconds),
            AGENT,
            seconds,
        );
        let queue_wait = histograms(
            &mut r,
            "handoff_queue_wait",
            "From a handoff's creation to its first delivery, by agent.",
            Some(Unit::Seconds),
            AGENT,
            seconds,
        );
        let processing = histograms(
            &mut r,
            "handoff_processing",
            "From a delivery to its ack, nack or rejection, by agent.",
            Some(Unit::Seconds),
            AGENT,
            seconds,
        );
        let barrier_wait = histograms(
            &mut r,
            "handoff_barrier_wait",
            "From a barrier's opening to its release, by the barrier's target agent.",
            Some(Unit::Seconds),
            AGENT,
            seconds,
        );
        let barrier_release = histograms(
            &mut r,
            "handoff_barrier_release",
            "From the last branch arrival to the release handoff stored, by the barrier's target agent.",
            Some(Unit::Seconds),
            AGENT,
            seconds,
        );
        let in_flight = gauges(
            &mut r,
            "handoff_in_flight",
            "Deliveries held by instances connected to this replica, by agent.",
            AGENT,
        );
        let pending = gauges(
            &mut r,
            "handoff_pending",
            "Handoffs waiting in an agent's inbox as JetStream last counted them (reported by every replica with a session of the agent: aggregate with max).",
            AGENT,
        );
        let store_bytes = gauges(
            &mut r,
            "handoff_store_bytes",
            "Bytes a stream or bucket of the broker holds in JetStream (a bucket as its stream, KV_<bucket>), as last read.",
            STREAM,
        );
        let store_messages = gauges(
            &mut r,
            "handoff_store_messages",
            "Messages a stream or bucket of the broker holds in JetStream, as last read.",
            STREAM,
        );
        let store_limit = gauges(
            &mut r,
            "handoff_store_limit_bytes",
            "The byte limit of a stream or bucket of the broker (-1: none).",
            STREAM,
        );
        let dropped_fields = counters(
            &mut r,
            "handoff_dropped_fields",
            "State or payload fields dropped on an edge, by source agent, target agent and field.",
            &["source", "target", "field"],
        );
        let stale_reasks = counters(
            &mut r,
            "handoff_stale_state_reasks",
            "Handoffs asking for a state key the run already holds, by agent.",
            AGENT,
        );
        let intent_score = histograms(
            &mut r,
            "handoff_intent_score",
            "Intent preservation scores at run completion, by pipeline.",
            None,
            &["pipeline"],
            || Histogram::new(score_buckets()),
        );
        let intent_drift = counters(
            &mut r,
            "handoff_intent_drift",
            "Hops whose pinned-context digest no longer matched, by pipeline.",
            &["pipeline"],
        );
        let run_handoffs = histograms(
            &mut r,
            "handoff_run_handoffs",
            "Handoffs per resolved run, by pipeline and outcome.",
            None,
            &["pipeline", "outcome"],
            || Histogram::new(HOPS),
        );
        let tool_result_age = histograms(
            &mut r,
            "handoff_tool_result_age",
            "Age of each tool result of an accepted handoff at acceptance, by tool.",
            Some(Unit::Seconds),
            &["tool"],
            || Histogram::new(AGES),
        );
        let stale_tool_results = counters(
            &mut r,
            "handoff_stale_tool_results",
            "Handoffs refused by max_tool_result_age, by the offending tool.",
            &["tool"],
        );
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Families(r)));
        Metrics {
            registry,
            accepted,
            deliveries,
            acked,
            nacked,
            redelivered,
            rejected,
            dead_lettered,
            contract_rejections,
            denied,
            unauthenticated,
            denials_unrecorded,
            events_dropped,
            call,
            queue_wait,
            processing,
            barrier_wait,
            barrier_release,
            in_flight,
            pending,
            store_bytes,
            store_messages,
            store_limit,
            dropped_fields,
            stale_reasks,
            intent_score,
            intent_drift,
            run_handoffs,
            tool_result_age,
            stale_tool_results,
        }
    }

    /// Counts an accepted handoff to `agent` (see [`target_label`]).
    pub fn accepted(&self, agent: &str) {
        self.accepted.with(&[agent]).inc();
    }

    /// Counts a delivery to an instance of `agent`: attempt 1 is a first
    /// delivery, later ones are also counted as redeliveries.
    pub fn delivered(&self, agent: &str, attempt: u32) {
        self.deliveries.with(&[agent]).inc();
        if attempt > 1 {
            self.redelivered.with(&[agent]).inc();
        }
    }

    /// Counts an acked delivery of `agent`.
    pub fn acked(&self, agent: &str) {
        self.acked.with(&[agent]).inc();
    }

    /// Counts a nacked delivery of `agent`.
    pub fn nacked(&self, agent: &str) {
        self.nacked.with(&[agent]).inc();
    }

    /// Counts a delivery of `agent` rejected by its instance.
    pub fn delivery_rejected(&self, agent: &str) {
        self.rejected.with(&[agent]).inc();
    }

    /// Counts a handoff of `agent` sent to the dead letter.
    pub fn dead_lettered(&self, agent: &str) {
        self.dead_lettered.with(&[agent]).inc();
    }

    /// Counts a handoff refused by the contract guard `rule`.
    pub fn rejected(&self, rule: &'static str) {
        self.contract_rejections.with(&[rule]).inc();
    }

    /// Counts an event given up after its retries.
    pub fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    /// Counts a call refused for who made it, by reason.
    pub fn denied(&self, reason: &'static str) {
        self.denied.with(&[reason]).inc();
    }

    /// Counts a call refused for carrying no valid credentials, by reason
    /// and peer address.
    pub fn unauthenticated(&self, reason: &'static str, peer: &str) {
        self.unauthenticated.with(&[reason, peer]).inc();
    }

    /// Counts an `access_denied` event not stored (its principal was over
    /// its rate).
    pub fn denial_unrecorded(&self) {
        self.denials_unrecorded.inc();
    }

    /// Records the latency of an accepted Handoff call to `agent` (see
    /// [`target_label`]).
    pub fn handoff_call(&self, agent: &str, took: Duration) {
        self.call.with(&[agent]).observe(took.as_secs_f64());
    }

    /// Records how long a handoff to `agent` waited from its creation to
    /// its first delivery.
    pub fn queue_wait(&self, agent: &str, waited: Duration) {
        self.queue_wait.with(&[agent]).observe(waited.as_secs_f64());
    }

    /// Records how long an instance of `agent` held a delivery before it
    /// acked, nacked or rejected it.
    pub fn processing(&self, agent: &str, took: Duration) {
        self.processing.with(&[agent]).observe(took.as_secs_f64());
    }

    /// Records how long a barrier releasing to `agent` stayed open.
    pub fn barrier_wait(&self, agent: &str, open: Duration) {
        self.barrier_wait.with(&[agent]).observe(open.as_secs_f64());
    }

    /// Records the time from a barrier's last branch arrival to its
    /// release handoff being stored.
    pub fn barrier_release(&self, agent: &str, took: Duration) {
        self.barrier_release
            .with(&[agent])
            .observe(took.as_secs_f64());
    }

    /// One more delivery of `agent` held by an instance on this replica.
    pub fn in_flight_inc(&self, agent: &str) {
        self.in_flight.with(&[agent]).inc();
    }

    /// One delivery of `agent` fewer held on this replica.
    pub fn in_flight_dec(&self, agent: &str) {
        self.in_flight.with(&[agent]).dec();
    }

    /// Sets the number of handoffs waiting in `agent`'s inbox.
    pub fn set_pending(&self, agent: &str, pending: u64) {
        self.pending
            .with(&[agent])
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Sets what stream `stream` holds (bytes and messages) and its byte
    /// limit (-1: none).
    pub fn set_store_usage(&self, stream: &str, bytes: u64, messages: u64, limit: i64) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.store_bytes.with(&[stream]).set(gauge(bytes));
        self.store_messages.with(&[stream]).set(gauge(messages));
        self.store_limit.with(&[stream]).set(limit);
    }

    /// Stops reporting `agent`'s inbox (no session of it here any more).
    pub fn forget_pending(&self, agent: &str) {
        self.pending.remove(&[agent]);
    }

    /// Counts a field dropped on the edge `source` -> `target`: counter
    /// `handoff_dropped_fields_total{source,target,field}`.
    pub fn dropped_field(&self, source: &str, target: &str, field: &str) {
        self.dropped_fields.with(&[source, target, field]).inc();
    }

    /// Counts a handoff to `agent` that asked for a state key its run
    /// already holds: counter `handoff_stale_state_reasks_total{agent}`.
    pub fn stale_reask(&self, agent: &str) {
        self.stale_reasks.with(&[agent]).inc();
    }

    /// Records an intent preservation score (0 to 1) of a run of
    /// `pipeline`: histogram `handoff_intent_score{pipeline}`, buckets 0.1
    /// to 1.0 by 0.1. A score that is not a number is ignored.
    pub fn intent_score(&self, pipeline: &str, score: f64) {
        if score.is_finite() {
            self.intent_score.with(&[pipeline]).observe(score);
        }
    }

    /// Counts a hop of `pipeline` whose pinned context drifted: counter
    /// `handoff_intent_drift_total{pipeline}`.
    pub fn intent_drift(&self, pipeline: &str) {
        self.intent_drift.with(&[pipeline]).inc();
    }

    /// Records how many handoffs a resolved run of `pipeline` took, by
    /// `outcome` (completed, failed, timed out): histogram
    /// `handoff_run_handoffs{pipeline,outcome}`, buckets 1 to 89
    /// (Fibonacci).
    pub fn run_resolved(&self, pipeline: &str, outcome: &str, handoffs: u64) {
        self.run_handoffs
            .with(&[pipeline, outcome])
            .observe(handoffs as f64);
    }

    /// Records the age of a `tool` result at the acceptance of the handoff
    /// carrying it: histogram `handoff_tool_result_age_seconds{tool}`. A
    /// negative age (a clock ahead) counts as 0.
    pub fn tool_result_age(&self, tool: &str, age_seconds: f64) {
        if age_seconds.is_nan() {
            return;
        }
        self.tool_result_age
            .with(&[tool])
            .observe(age_seconds.max(0.0));
    }

    /// Records the ages of tool results observed at `observed` times, at
    /// `now` (results without a time are skipped).
    pub fn tool_result_ages<'a>(
        &self,
        results: impl IntoIterator<Item = (&'a str, Option<SystemTime>)>,
        now: SystemTime,
    ) {
        for (tool, observed) in results {
            let Some(observed) = observed else { continue };
            let age = match now.duration_since(observed) {
                Ok(d) => d.as_secs_f64(),
                Err(_) => 0.0,
            };
            self.tool_result_age(tool, age);
        }
    }

    /// Counts a handoff refused by `max_tool_result_age` for `tool`'s
    /// result: counter `handoff_stale_tool_results_total{tool}`.
    pub fn stale_tool_result(&self, tool: &str) {
        self.stale_tool_results.with(&[tool]).inc();
    }

    /// Deliveries of `agent` held on this replica now.
    pub fn in_flight(&self, agent: &str) -> i64 {
        self.in_flight.get(&[agent]).map_or(0, |g| g.get())
    }

    /// Every family in the OpenMetrics text format, ending in `# EOF`.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Who may scrape: whether the bearer token a request presents (if any)
/// allows reading the metrics.
pub type Gate =
    Arc<dyn Fn(Option<String>) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// The bearer token of a request's `authorization` header.
fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The router of the metrics endpoint: `GET /metrics`, and 404 for
/// anything else. With a `gate`, a scrape it does not let through is
/// answered 401.
pub fn router(metrics: Arc<Metrics>, gate: Option<Gate>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let metrics = metrics.clone();
                let gate = gate.clone();
                async move {
                    if let Some(gate) = gate {
                        if !gate(bearer(&headers)).await {
                            return (
                                StatusCode::UNAUTHORIZED,
                                [(header::WWW_AUTHENTICATE, "Bearer")],
                                "a bearer token of a principal with read is required\n",
                            )
                                .into_response();
                        }
                    }
                    match metrics.render() {
                        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body)
                            .into_response(),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "metrics could not be encoded\n",
                        )
                            .into_response(),
                    }
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try GET /metrics\n") })
}

/// Serves the metrics endpoint on `listener` until the task is dropped
/// (or the listener fails, which is logged); with a `gate`, only the
/// scrapes it lets through.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, gate: Option<Gate>) {
    if let Err(e) = axum::serve(listener, router(metrics, gate)).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests;
