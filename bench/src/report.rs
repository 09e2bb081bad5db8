//! Figures: latency summaries from HDR histograms, rows of the table, and
//! their JSON form.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A new histogram of microseconds (1 µs to 10 min, 3 significant digits).
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Percentiles of one latency distribution, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One measured figure, with the same work on raw JetStream when there is
/// one.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Figure {
    /// Latency (ms); ratio = handoff p50 / raw p50 (and p99).
    Latency {
        handoff: Latency,
        raw: Option<Latency>,
    },
    /// A rate (per second); ratio = handoff / raw.
    Rate { handoff: f64, raw: Option<f64> },
    /// Bytes of resident memory.
    Memory { bytes: u64 },
    /// A ratio of two measurements of handoffd itself.
    Ratio { value: f64, of: String },
    /// handoffd failed the work (the error), next to raw JetStream's
    /// latency for the same work when it has one.
    Failed { error: String, raw: Option<Latency> },
}

/// A row of the result table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) metric: String,
    pub(crate) figure: Figure,
}

impl Row {
    pub(crate) fn new(scenario: &str, metric: impl Into<String>, figure: Figure) -> Row {
        Row {
            scenario: scenario.to_string(),
            metric: metric.into(),
            figure,
        }
    }
}

/// The table printed on stdout.
pub(crate) fn table(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<44} {:>9} {:>9} {:>9} {:>9} {:>9}   raw JetStream p50 / p99, ratio",
        "scenario", "metric", "p50", "p90", "p99", "p99.9", "max"
    );
    for r in rows {
        let lead = format!("{:<11} {:<44}", r.scenario, r.metric);
        let _ = match &r.figure {
            Figure::Latency { handoff: h, raw } => {
                let raw = match raw {
                    Some(raw) => format!(
                        "{:.3} / {:.3} ms, {:.2}x / {:.2}x",
                        raw.p50,
                        raw.p99,
                        h.p50 / raw.p50.max(f64::MIN_POSITIVE),
                        h.p99 / raw.p99.max(f64::MIN_POSITIVE)
                    ),
                    None => String::new(),
                };
                writeln!(
                    out,
                    "{lead} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}   {raw}",
                    h.p50, h.p90, h.p99, h.p999, h.max
                )
            }
            Figure::Rate { handoff, raw } => {
                let raw = match raw {
                    Some(raw) => {
                        format!("{raw:.0} /s, {:.2}x", handoff / raw.max(f64::MIN_POSITIVE))
                    }
                    None => String::new(),
                };
                writeln!(out, "{lead} {:>9.0} /s{:>40}   {raw}", handoff, "")
            }
            Figure::Memory { bytes } => {
                writeln!(out, "{lead} {:>9.1} MiB", *bytes as f64 / (1024.0 * 1024.0))
            }
            Figure::Ratio { value, of } => writeln!(out, "{lead} {value:>9.2}x   ({of})"),
            Figure::Failed { error, raw } => {
                let raw = raw.as_ref().map_or(String::new(), |raw| {
                    format!("   raw {:.3} / {:.3} ms", raw.p50, raw.p99)
                });
                writeln!(out, "{lead} failed: {error}{raw}")
            }
        };
    }
    out.push_str("latencies in ms\n");
    out
}
