//! Counters, and the Prometheus text endpoint that exposes them
//! (`metrics_listen`, `GET /metrics`).
//!
//! Counters live in this replica's memory: each replica reports its own,
//! and Prometheus sums them.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use dashmap::DashMap;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// The broker's counters.
#[derive(Default)]
pub struct Metrics {
    accepted: AtomicU64,
    rejected: DashMap<&'static str, AtomicU64>,
    denied: DashMap<&'static str, AtomicU64>,
    events_dropped: AtomicU64,
}

impl Metrics {
    /// Counts an accepted handoff.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a handoff refused by the contract guard `rule`.
    pub fn rejected(&self, rule: &'static str) {
        self.rejected
            .entry(rule)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an event given up after its retries.
    pub fn event_dropped(&self) {
        self.events_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a payload field dropped on the edge `source` -> `target`.
    pub fn dropped_field(&self, _source: &str, _target: &str, _field: &str) {}

    /// Counts a handoff from `agent` asking for a key the run state held.
    pub fn stale_reask(&self, _agent: &str) {}

    /// Records a judge's score of a run of `pipeline`.
    pub fn intent_score(&self, _pipeline: &str, _score: f64) {}

    /// Counts a run of `pipeline` whose judge scored it under its threshold.
    pub fn intent_drift(&self, _pipeline: &str) {}

    /// Records how many handoffs a run of `pipeline` took to end (`outcome`).
    pub fn run_resolved(&self, _pipeline: &str, _outcome: &str, _handoffs: u64) {}

    /// Counts a call refused for who made it, by reason.
    pub fn denied(&self, reason: &'static str) {
        self.denied
            .entry(reason)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals by rule, sorted by rule.
    pub fn rejections(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<_> = self
            .rejected
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        out.sort();
        out
    }

    /// The counters in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP handoff_handoffs_accepted_total Handoffs durably accepted.\n");
        out.push_str("# TYPE handoff_handoffs_accepted_total counter\n");
        let _ = writeln!(
            out,
            "handoff_handoffs_accepted_total {}",
            self.accepted.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP handoff_contract_rejections_total Handoffs refused at the door, by guard.\n",
        );
        out.push_str("# TYPE handoff_contract_rejections_total counter\n");
        for (rule, n) in self.rejections() {
            let _ = writeln!(
                out,
                "handoff_contract_rejections_total{{rule=\"{rule}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP handoff_events_dropped_total Events given up after retrying to store them.\n",
        );
        out.push_str("# TYPE handoff_events_dropped_total counter\n");
        let _ = writeln!(
            out,
            "handoff_events_dropped_total {}",
            self.events_dropped.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP handoff_access_denied_total Calls refused for who made them, by reason.\n",
        );
        out.push_str("# TYPE handoff_access_denied_total counter\n");
        let mut denied: Vec<_> = self
            .denied
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        denied.sort();
        for (reason, n) in denied {
            let _ = writeln!(
                out,
                "handoff_access_denied_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. A
/// minimal HTTP/1.1 responder: one request per connection.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read until the end of the request head (or a full buffer).
            while len < buf.len() {
                match socket.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let first = head.lines().next().unwrap_or("");
            let (status, body) = if first.starts_with("GET /metrics ") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "not found; try GET /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_rule() {
        let m = Metrics::default();
        m.accepted();
        m.rejected("max_tokens");
        m.rejected("max_tokens");
        m.rejected("decode");
        m.denied("NOT_GRANTED");
        assert_eq!(m.rejections(), vec![("decode", 1), ("max_tokens", 2)]);
        let text = m.render();
        assert!(
            text.contains("handoff_handoffs_accepted_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("handoff_contract_rejections_total{rule=\"max_tokens\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("handoff_access_denied_total{reason=\"NOT_GRANTED\"} 1\n"),
            "{text}"
        );
    }
}
