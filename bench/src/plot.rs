//! `--plot`: the latency distributions of a run as one PNG, a panel per
//! measured latency, handoffd next to raw JetStream.
//!
//! Each panel is a percentile spectrum: the x axis runs from the minimum to
//! the 99.99th percentile on a log scale of the tail (`-log10(1 - q)`), so
//! the p90, p99 and p99.9 that the table prints are evenly spaced and the
//! tail is as readable as the body.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::BoxError;

/// One panel: a latency measured through handoffd and, when there is an
/// equivalent, the same work on raw JetStream.
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) handoff: Histogram<u64>,
    pub(crate) raw: Option<Histogram<u64>>,
}

/// The x axis ends at the 99.99th percentile.
const X_MAX: f64 = 4.0;
/// The x axis starts at the minimum.
const X_MIN: f64 = 0.0;
const PANEL: (u32, u32) = (640, 400);
const FONT: &str = "sans-serif";

/// Writes `panels` to `path` as a PNG, two panels per row.
pub(crate) fn write(path: &Path, panels: &[Panel]) -> Result<(), BoxError> {
    if panels.is_empty() {
        return Err("--plot: the chosen scenarios measured no latency to plot".into());
    }
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "--plot: the embedded font does not load")?;
    let cols = panels.len().min(2);
    let rows = panels.len().div_ceil(cols);
    let size = (
        PANEL.0 * u32::try_from(cols)?,
        PANEL.1 * u32::try_from(rows)?,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    for (panel, area) in panels.iter().zip(root.split_evenly((rows, cols))) {
        draw(&area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<(), BoxError> {
    let curves: Vec<(&str, &Histogram<u64>, RGBColor)> = [
        Some(("handoffd", &panel.handoff, RGBColor(200, 40, 40))),
        panel
            .raw
            .as_ref()
            .map(|h| ("raw JetStream", h, RGBColor(40, 80, 200))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let y_max = curves
        .iter()
        .map(|(_, h, _)| ms(h.value_at_quantile(quantile(X_MAX))))
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(X_MIN..X_MAX, 0.0..y_max.max(0.001))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(5)
        .x_label_formatter(&|x| percentile(*x))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    for (name, h, color) in curves {
        let points = (0..=400)
            .map(|i| X_MIN + (X_MAX - X_MIN) * f64::from(i) / 400.0)
            .map(|x| (x, ms(h.value_at_quantile(quantile(x)))));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!("{name} (n = {})", h.len()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The quantile at `x` on the tail scale: 0 -> 0, 1 -> 0.9, 2 -> 0.99...
fn quantile(x: f64) -> f64 {
    1.0 - 10f64.powf(-x)
}

/// The x tick label: the percentile at `x`, as the table names it.
fn percentile(x: f64) -> String {
    let p = 100.0 * quantile(x);
    let mut s = format!("{p:.2}");
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.pop();
    }
    format!("p{s}")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_scale_puts_the_table_percentiles_on_whole_numbers() {
        assert_eq!(percentile(X_MIN), "p0");
        assert_eq!(percentile(std::f64::consts::LOG10_2), "p50");
        assert_eq!(percentile(1.0), "p90");
        assert_eq!(percentile(2.0), "p99");
        assert_eq!(percentile(3.0), "p99.9");
        assert_eq!(percentile(4.0), "p99.99");
    }
}
