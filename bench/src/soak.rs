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
//! every minute the resident memory of the broker and of nats-server (when
//! the bench started it) is read, and what every stream and bucket of the
//! broker holds in JetStream.

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
    /// nats-server's resident memory at the minute's end.
    pub(crate) nats_rss: Option<u64>,
    /// What the broker's streams and buckets held at the minute's end.
    pub(crate) stored: Option<Usage>,
}

/// What the broker's streams and buckets hold: (name, bytes, messages).
pub(crate) type Usage = Vec<(String, u64, u64)>;

/// Reads what every stream and bucket of the broker holds.
async fn usage(js: &async_nats::jetstream::Context) -> Option<Usage> {
    let mut out: Usage = handoffd::store::jetstream::usage(js)
        .await
        .ok()?
        .into_iter()
        .map(|(name, bytes, messages, _)| (name, bytes, messages))
        .collect();
    out.sort();
    Some(out)
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
    /// Handoffs delivered.
    pub(crate) delivered: u64,
    /// What the broker's streams and buckets held before the load.
    pub(crate) stored_before: Option<Usage>,
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
/// memory of processes `broker` and `nats` and the storage on NATS at
/// `nats_url` read at every minute's end.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn soak(
    client: &Client,
    rate: f64,
    capacity: f64,
    minutes: u32,
    broker: Option<u32>,
    nats: Option<u32>,
    nats_url: &str,
    bar: &ProgressBar,
) -> Result<Soak, BoxError> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
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
    let stored_before = usage(&js).await;
    type Sample = (Option<u64>, Option<u64>, Option<Usage>);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(vec![(None, None, None); n]));
    let start = Instant::now();
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            for m in 0..n {
                tokio::time::sleep_until((start + Duration::from_secs(60 * (m as u64 + 1))).into())
                    .await;
                let sample = (
                    broker.and_then(stack::rss),
                    nats.and_then(stack::rss),
                    usage(&js).await,
                );
                if let Ok(mut samples) = samples.lock() {
                    samples[m] = sample;
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
    let samples = samples.lock().map(|r| r.clone()).unwrap_or_default();
    let minutes = (0..n)
        .map(|m| Minute {
            sent: tally.sent[m].load(Ordering::Relaxed),
            missed: tally.missed[m].load(Ordering::Relaxed),
            errors: tally.errors[m].load(Ordering::Relaxed),
            latency: tally.latency[m]
                .lock()
                .map(|h| h.clone())
                .unwrap_or_else(|_| histogram()),
            rss: samples.get(m).and_then(|s| s.0),
            nats_rss: samples.get(m).and_then(|s| s.1),
            stored: samples.get(m).and_then(|s| s.2.clone()),
        })
        .collect();
    Ok(Soak {
        rate,
        capacity,
        minutes,
        undelivered,
        delivered: tally.delivered.load(Ordering::Relaxed),
        stored_before,
    })
}

/// One line of a plot: its name, points and colour.
type Line<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Soak {
    /// How much a per-minute figure moved: with 15 minutes or more, the
    /// mean of the last five over the mean of minutes 5 to 10; with fewer,
    /// the last minute over the second (the first still warms up). With
    /// what it compares.
    fn drift(&self, of: impl Fn(&Minute) -> Option<u64>) -> Option<(f64, &'static str)> {
        let mean = |range: std::ops::Range<usize>| -> Option<f64> {
            let values: Option<Vec<u64>> = self.minutes.get(range)?.iter().map(&of).collect();
            let values = values?;
            (!values.is_empty()).then(|| values.iter().sum::<u64>() as f64 / values.len() as f64)
        };
        let n = self.minutes.len();
        if n >= 15 {
            let (late, early) = (mean(n - 5..n)?, mean(4..10)?);
            Some((late / early.max(1.0), "last 5 minutes / minutes 5-10"))
        } else {
            let (second, last) = (mean(1..2)?, mean(n - 1..n)?);
            Some((last / second.max(1.0), "last minute / second minute"))
        }
    }

    /// handoffd's RSS drift (see `drift`).
    pub(crate) fn rss_drift(&self) -> Option<(f64, &'static str)> {
        self.drift(|m| m.rss)
    }

    /// nats-server's RSS drift (see `drift`).
    pub(crate) fn nats_rss_drift(&self) -> Option<(f64, &'static str)> {
        self.drift(|m| m.nats_rss)
    }

    /// Bytes held in JetStream by the broker, at the end of minute `m`.
    fn stored_bytes(m: &Minute) -> Option<u64> {
        m.stored.as_ref().map(|u| u.iter().map(|(_, b, _)| b).sum())
    }

    /// Per stream or bucket: bytes before the load, bytes and messages at
    /// its end, and what each delivered handoff left behind there.
    pub(crate) fn left_behind(&self) -> Vec<(String, u64, u64, u64, f64)> {
        let Some(end) = self.minutes.last().and_then(|m| m.stored.as_ref()) else {
            return Vec::new();
        };
        end.iter()
            .map(|(name, bytes, messages)| {
                let before = self
                    .stored_before
                    .iter()
                    .flatten()
                    .find(|(n, _, _)| n == name)
                    .map_or(0, |(_, b, _)| *b);
                let per = bytes.saturating_sub(before) as f64 / self.delivered.max(1) as f64;
                (name.clone(), before, *bytes, *messages, per)
            })
            .collect()
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
            "{:>6} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "minute",
            "sent",
            "missed",
            "errors",
            "p50 ms",
            "p99 ms",
            "max ms",
            "RSS MiB",
            "NATS MiB",
            "JS MiB"
        );
        let shown = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.1}", mib(b)));
        for (i, m) in self.minutes.iter().enumerate() {
            let l = Latency::of(&m.latency);
            let _ = writeln!(
                out,
                "{:>6} {:>9} {:>7} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9} {:>9} {:>9}",
                i + 1,
                m.sent,
                m.missed,
                m.errors,
                l.p50,
                l.p99,
                l.max,
                shown(m.rss),
                shown(m.nats_rss),
                shown(Soak::stored_bytes(m)),
            );
        }
        let behind = self.left_behind();
        if !behind.is_empty() {
            let _ = writeln!(
                out,
                "\nstored in JetStream ({} handoffs delivered):\n{:<24} {:>12} {:>12} {:>10} {:>14}",
                self.delivered, "stream or bucket", "before MiB", "end MiB", "messages", "bytes/handoff"
            );
            for (name, before, end, messages, per) in behind {
                let _ = writeln!(
                    out,
                    "{name:<24} {:>12.2} {:>12.2} {messages:>10} {per:>14.1}",
                    mib(before),
                    mib(end)
                );
            }
        }
        if self.undelivered > 0 {
            let _ = writeln!(
                out,
                "{} accepted handoffs were not delivered a minute after the load ended",
                self.undelivered
            );
        }
        for (who, drift) in [
            ("handoffd RSS", self.rss_drift()),
            ("nats-server RSS", self.nats_rss_drift()),
            ("JetStream bytes", self.drift(Soak::stored_bytes)),
        ] {
            match drift {
                Some((d, what)) => {
                    let _ = writeln!(
                        out,
                        "{who}, {what}: {d:.3} ({:+.1}%): {}",
                        (d - 1.0) * 100.0,
                        if (d - 1.0).abs() <= FLAT {
                            "flat (within 10%)"
                        } else {
                            "NOT within 10%"
                        }
                    );
                }
                None => {
                    let _ = writeln!(out, "{who}: flatness needs at least two minutes read");
                }
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
        if let Some((d, what)) = self.rss_drift() {
            rows.push(Row::new(
                "soak",
                format!("handoffd RSS, {what}"),
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

    /// Draws RSS, the latency p50/p99 and the bytes of each stream or
    /// bucket per minute into `path` (PNG).
    pub(crate) fn plot(&self, path: &Path) -> Result<(), BoxError> {
        const FONT: &str = "sans-serif";
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "--plot: the embedded font does not load")?;
        let root = BitMapBackend::new(path, (1920, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, rest) = root.split_horizontally(640);
        let (right, store) = rest.split_horizontally(640);
        let x_max = self.minutes.len().max(2) as f64 + 0.5;
        let rss: Vec<(f64, f64)> = self
            .minutes
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i as f64 + 1.0, mib(m.rss?))))
            .collect();
        let nats_rss: Vec<(f64, f64)> = self
            .minutes
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i as f64 + 1.0, mib(m.nats_rss?))))
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
        // What each stream or bucket held, per minute (those that held
        // anything).
        const COLORS: [RGBColor; 8] = [
            RGBColor(200, 40, 40),
            RGBColor(40, 80, 200),
            RGBColor(40, 150, 60),
            RGBColor(160, 90, 20),
            RGBColor(130, 40, 160),
            RGBColor(20, 140, 150),
            RGBColor(90, 90, 90),
            RGBColor(220, 120, 160),
        ];
        let mut names: Vec<String> = self
            .minutes
            .iter()
            .flat_map(|m| m.stored.iter().flatten())
            .filter(|(_, bytes, _)| *bytes > 0)
            .map(|(name, _, _)| name.clone())
            .collect();
        names.sort();
        names.dedup();
        let stored: Vec<Line> = names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let pts = self
                    .minutes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| {
                        let (_, bytes, _) =
                            m.stored.as_ref()?.iter().find(|(n, _, _)| n == name)?;
                        Some((i as f64 + 1.0, mib(*bytes)))
                    })
                    .collect();
                (name.as_str(), pts, COLORS[k % COLORS.len()])
            })
            .collect();
        let series = [
            (
                "RSS, MiB (per minute)",
                "MiB",
                vec![
                    ("handoffd", rss, RGBColor(200, 40, 40)),
                    ("nats-server", nats_rss, RGBColor(40, 80, 200)),
                ],
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
            ("held in JetStream, MiB (per minute)", "MiB", stored, &store),
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
            nats_rss: None,
            stored: rss.map(|b| vec![("HANDOFF_EVENTS".to_string(), b, 1)]),
        }
    }

    fn soak(rss: &[Option<u64>]) -> Soak {
        Soak {
            rate: 1.0,
            capacity: 2.0,
            minutes: rss.iter().map(|r| minute(*r)).collect(),
            undelivered: 0,
            delivered: 10,
            stored_before: Some(vec![("HANDOFF_EVENTS".to_string(), 20, 1)]),
        }
    }

    #[test]
    fn a_short_soak_compares_the_last_minute_with_the_second() {
        let d = soak(&[Some(50), Some(100), Some(120), Some(105)]).rss_drift();
        assert_eq!(d, Some((1.05, "last minute / second minute")));
        assert_eq!(soak(&[Some(100)]).rss_drift(), None);
        assert_eq!(soak(&[Some(100), None]).rss_drift(), None);
        assert_eq!(soak(&[Some(100)]).nats_rss_drift(), None);
    }

    #[test]
    fn a_long_soak_compares_the_last_five_minutes_with_minutes_5_to_10() {
        // Minutes 5-10 average 100, the last five 110.
        let mut rss = vec![Some(10); 20];
        for m in &mut rss[4..10] {
            *m = Some(100);
        }
        for m in &mut rss[15..20] {
            *m = Some(110);
        }
        let (d, what) = soak(&rss).rss_drift().expect("a drift");
        assert!((d - 1.1).abs() < 1e-9, "{d}");
        assert_eq!(what, "last 5 minutes / minutes 5-10");
    }

    #[test]
    fn what_a_handoff_leaves_behind_is_the_growth_over_the_handoffs_delivered() {
        let behind = soak(&[Some(100), Some(120)]).left_behind();
        assert_eq!(
            behind,
            vec![("HANDOFF_EVENTS".to_string(), 20, 120, 1, 10.0)]
        );
    }

    #[test]
    fn the_soak_plot_goes_beside_the_latency_plot() {
        let path = Path::new("/tmp/run.png");
        assert_eq!(plot_path(path, true), PathBuf::from("/tmp/run.png"));
        assert_eq!(plot_path(path, false), PathBuf::from("/tmp/run-soak.png"));
    }
}
