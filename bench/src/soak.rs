//! `soak`: a steady open-loop load for many minutes, to see whether
//! handoffd's memory and latency stay flat.
//!
//! Handoffs of 1 KiB Subtasks go to `sink` (contract checked) at a fixed
//! rate, sent on a clock whatever the answers (open loop: a slow broker
//! makes the handoffs in flight pile up instead of slowing the sender
//! down), while four instances of `sink` ack every delivery. Each handoff
//! counts toward the minute it was accepted in; its latency runs from
//! its acceptance (the envelope's `created_at`, stamped by the broker on
//! this machine's clock) to its delivery to an instance. At the end of
//! every minute the broker's resident memory is read.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use handoff_client::{Client, Delivery, Handoff, RunConfig};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use plotters::prelude::*;
use tokio::sync::Semaphore;

use crate::{
    report::{histogram, Figure, Latency, Row},
    scenarios::{spawn_acker, subtask, WAIT},
    stack, BoxError,
};

/// How often the sender wakes to send what the rate owes.
const TICK: Duration = Duration::from_millis(10);
/// Handoffs in flight (sent, not yet answered) beyond which the sender
/// counts a send as missed instead of piling up more.
const MAX_OUTSTANDING: usize = 10_000;
/// The RSS of the last minute may differ from the second's by this much
/// (the first minute still warms up).
const FLAT: f64 = 0.10;

/// One minute of the soak.
#[derive(Debug, Clone)]
pub(crate) struct Minute {
    /// Handoffs sent in the minute.
    pub(crate) sent: u64,
    /// Handoffs that could not be sent because too many were in flight.
    pub(crate) missed: u64,
    /// Handoffs the broker refused or failed (sent in the minute).
    pub(crate) errors: u64,
    /// Accepted -> delivered of the handoffs accepted in the minute (µs).
    pub(crate) latency: Histogram<u64>,
    /// handoffd's resident memory at the minute's end.
    pub(crate) rss: Option<u64>,
}

/// A soak's outcome: the rate it ran at and its minutes.
#[derive(Debug, Clone)]
pub(crate) struct Soak {
    /// Handoffs per second sent.
    pub(crate) rate: f64,
    /// The capacity the rate is half of (accepted-and-delivered per
    /// second).
    pub(crate) capacity: f64,
    /// One entry per minute.
    pub(crate) minutes: Vec<Minute>,
    /// Handoffs accepted but not delivered a minute after the load ended
    /// (a backlog the rate outran, or a loss): reported, with the table.
    pub(crate) undelivered: u64,
}

/// Per-minute tallies the sender and the instances fill.
struct Tally {
    start: SystemTime,
    sent: Vec<AtomicU64>,
    missed: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    latency: Vec<Mutex<Histogram<u64>>>,
    delivered: AtomicU64,
}

impl Tally {
    fn new(minutes: usize) -> Tally {
        let counters = || (0..minutes).map(|_| AtomicU64::new(0)).collect();
        Tally {
            start: SystemTime::now(),
            sent: counters(),
            missed: counters(),
            errors: counters(),
            latency: (0..minutes).map(|_| Mutex::new(histogram())).collect(),
            delivered: AtomicU64::new(0),
        }
    }

    /// The minute (from 0) `at` falls in, if within the soak.
    fn minute(&self, at: SystemTime) -> Option<usize> {
        let m = at.duration_since(self.start).ok()?.as_secs() / 60;
        usize::try_from(m).ok().filter(|m| *m < self.sent.len())
    }

    /// Records a delivery: its latency from its acceptance, in the minute
    /// it was accepted in.
    fn delivered(&self, d: &Delivery) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let Some(created) = d.envelope().created_at.as_ref() else {
            return;
        };
        let accepted = SystemTime::UNIX_EPOCH
            + Duration::new(
                u64::try_from(created.seconds).unwrap_or(0),
                u32::try_from(created.nanos).unwrap_or(0),
            );
        let (Some(m), Ok(took)) = (self.minute(accepted), now.duration_since(accepted)) else {
            return;
        };
        if let Ok(mut h) = self.latency[m].lock() {
            let _ = h.record(took.as_micros().max(1) as u64);
        }
    }
}

/// Runs the soak: `rate` handoffs per second for `minutes` minutes, the
/// broker's memory read from process `broker` at every minute's end.
pub(crate) async fn soak(
    client: &Client,
    rate: f64,
    capacity: f64,
    minutes: u32,
    broker: Option<u32>,
    bar: &ProgressBar,
) -> Result<Soak, BoxError> {
    let run = client
        .start_run(RunConfig::new("bench").no_timeout())
        .await?;
    let n = minutes as usize;
    let tally = Arc::new(Tally::new(n));
    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for i in 0..4 {
        let sub = client.subscribe("sink", &format!("soak{i}"), 256).await?;
        let tally = tally.clone();
        consumers.push(spawn_acker(
            sub,
            move |d: Delivery| {
                tally.delivered(&d);
                async move { d.ack().await }
            },
            acked.clone(),
        ));
    }
    let rss = Arc::new(Mutex::new(vec![None; n]));
    let start = Instant::now();
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            for m in 0..n {
                tokio::time::sleep_until((start + Duration::from_secs(60 * (m as u64 + 1))).into())
                    .await;
                if let Ok(mut rss) = rss.lock() {
                    rss[m] = broker.and_then(stack::rss);
                }
            }
        })
    };
    let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
    let end = start + Duration::from_secs(60 * u64::from(minutes));
    let per_tick = rate * TICK.as_secs_f64();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (payload, mut owed, mut total) = (subtask(), 0.0, 0u64);
    while Instant::now() < end {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let Some(m) = tally.minute(SystemTime::now()) else {
                break;
            };
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                tally.missed[m].fetch_add(1, Ordering::Relaxed);
                continue;
            };
            tally.sent[m].fetch_add(1, Ordering::Relaxed);
            total += 1;
            let (client, tally, h) = (
                client.clone(),
                tally.clone(),
                Handoff::to(run.id.as_str(), "sink", &payload),
            );
            let bar = bar.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let ok = match h {
                    Ok(h) => client.handoff(h).await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    tally.errors[m].fetch_add(1, Ordering::Relaxed);
                }
                bar.inc(1);
            });
        }
    }
    // Every handoff answered, and every accepted one delivered.
    let deadline = Instant::now() + WAIT;
    let undelivered = loop {
        let errors: u64 = tally.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum();
        let answered = outstanding.available_permits() == MAX_OUTSTANDING;
        let done = tally.delivered.load(Ordering::Relaxed) + errors;
        if answered && done >= total {
            break 0;
        }
        if Instant::now() > deadline {
            break total.saturating_sub(done);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = sampler.await;
    for c in consumers {
        c.abort();
    }
    let rss = rss.lock().map(|r| r.clone()).unwrap_or_default();
    let minutes = (0..n)
        .map(|m| Minute {
            sent: tally.sent[m].load(Ordering::Relaxed),
            missed: tally.missed[m].load(Ordering::Relaxed),
            errors: tally.errors[m].load(Ordering::Relaxed),
            latency: tally.latency[m]
                .lock()
                .map(|h| h.clone())
                .unwrap_or_else(|_| histogram()),
            rss: rss[m],
        })
        .collect();
    Ok(Soak {
        rate,
        capacity,
        minutes,
        undelivered,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Soak {
    /// The last minute's RSS over the second's, when both were read.
    pub(crate) fn rss_drift(&self) -> Option<f64> {
        let second = self.minutes.get(1)?.rss?;
        let last = self.minutes.last()?.rss?;
        Some(last as f64 / second.max(1) as f64)
    }

    /// The per-minute table printed after the main one.
    pub(crate) fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "soak at {:.0} handoffs/s (50% of the measured {:.0}/s accepted and delivered)",
            self.rate, self.capacity
        );
        let _ = writeln!(
            out,
            "{:>6} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "minute", "sent", "missed", "errors", "p50 ms", "p99 ms", "max ms", "RSS MiB"
        );
        for (i, m) in self.minutes.iter().enumerate() {
            let l = Latency::of(&m.latency);
            let rss = m.rss.map_or("-".to_string(), |b| format!("{:.1}", mib(b)));
            let _ = writeln!(
                out,
                "{:>6} {:>9} {:>7} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9}",
                i + 1,
                m.sent,
                m.missed,
                m.errors,
                l.p50,
                l.p99,
                l.max,
                rss
            );
        }
        if self.undelivered > 0 {
            let _ = writeln!(
                out,
                "{} accepted handoffs were not delivered a minute after the load ended",
                self.undelivered
            );
        }
        match self.rss_drift() {
            Some(d) => {
                let _ = writeln!(
                    out,
                    "RSS, last minute / second minute: {d:.3} ({:+.1}%): {}",
                    (d - 1.0) * 100.0,
                    if (d - 1.0).abs() <= FLAT {
                        "flat (within 10%)"
                    } else {
                        "NOT within 10%"
                    }
                );
            }
            None => {
                let _ = writeln!(out, "RSS flatness needs at least two minutes");
            }
        }
        out
    }

    /// The rows of the main table (and of `--json`).
    pub(crate) fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for (i, m) in self.minutes.iter().enumerate() {
            rows.push(Row::new(
                "soak",
                format!(
                    "minute {}: accepted -> delivered, {:.0}/s",
                    i + 1,
                    m.sent as f64 / 60.0
                ),
                Figure::Latency {
                    handoff: Latency::of(&m.latency),
                    raw: None,
                },
            ));
            if let Some(bytes) = m.rss {
                rows.push(Row::new(
                    "soak",
                    format!("minute {}: handoffd RSS", i + 1),
                    Figure::Memory { bytes },
                ));
            }
        }
        if let Some(d) = self.rss_drift() {
            rows.push(Row::new(
                "soak",
                "RSS, last minute / second minute",
                Figure::Ratio {
                    value: d,
                    of: if (d - 1.0).abs() <= FLAT {
                        "flat: within 10%".into()
                    } else {
                        "NOT within 10%".into()
                    },
                },
            ));
        }
        rows
    }

    /// Draws RSS and the latency p50/p99 per minute into `path` (PNG).
    pub(crate) fn plot(&self, path: &Path) -> Result<(), BoxError> {
        const FONT: &str = "sans-serif";
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "--plot: the embedded font does not load")?;
        let root = BitMapBackend::new(path, (1280, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(640);
        let x_max = self.minutes.len().max(2) as f64 + 0.5;
        let rss: Vec<(f64, f64)> = self
            .minutes
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i as f64 + 1.0, mib(m.rss?))))
            .collect();
        let p = |q: f64| -> Vec<(f64, f64)> {
            self.minutes
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    (
                        i as f64 + 1.0,
                        m.latency.value_at_quantile(q) as f64 / 1000.0,
                    )
                })
                .collect()
        };
        let series = [
            (
                "handoffd RSS, MiB (per minute)",
                "MiB",
                vec![("RSS", rss, RGBColor(200, 40, 40))],
                &left,
            ),
            (
                "accepted -> delivered (per minute)",
                "ms",
                vec![
                    ("p50", p(0.5), RGBColor(40, 80, 200)),
                    ("p99", p(0.99), RGBColor(200, 40, 40)),
                ],
                &right,
            ),
        ];
        for (title, unit, lines, area) in series {
            let y_max = lines
                .iter()
                .flat_map(|(_, pts, _)| pts.iter().map(|p| p.1))
                .fold(0.0, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(title, (FONT, 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(0.5..x_max, 0.0..y_max.max(0.001))?;
            chart
                .configure_mesh()
                .x_desc("minute")
                .x_label_formatter(&|x| {
                    // Whole minutes only.
                    if (x - x.round()).abs() < 1e-6 {
                        format!("{}", x.round())
                    } else {
                        String::new()
                    }
                })
                .y_desc(unit)
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .draw()?;
            for (name, pts, color) in lines {
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

/// Where the soak's plot goes: `FILE.png` itself when nothing else is
/// drawn, otherwise `FILE-soak.png` beside it.
pub(crate) fn plot_path(path: &Path, alone: bool) -> PathBuf {
    if alone {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bench".into());
    path.with_file_name(format!("{stem}-soak.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(rss: Option<u64>) -> Minute {
        Minute {
            sent: 0,
            missed: 0,
            errors: 0,
            latency: histogram(),
            rss,
        }
    }

    #[test]
    fn rss_drift_compares_the_last_minute_with_the_second() {
        let soak = |rss: &[Option<u64>]| Soak {
            rate: 1.0,
            capacity: 2.0,
            minutes: rss.iter().map(|r| minute(*r)).collect(),
            undelivered: 0,
        };
        assert_eq!(
            soak(&[Some(50), Some(100), Some(120), Some(105)]).rss_drift(),
            Some(1.05)
        );
        assert_eq!(soak(&[Some(100)]).rss_drift(), None);
        assert_eq!(soak(&[Some(100), None]).rss_drift(), None);
    }

    #[test]
    fn the_soak_plot_goes_beside_the_latency_plot() {
        let path = Path::new("/tmp/run.png");
        assert_eq!(plot_path(path, true), PathBuf::from("/tmp/run.png"));
        assert_eq!(plot_path(path, false), PathBuf::from("/tmp/run-soak.png"));
    }
}
