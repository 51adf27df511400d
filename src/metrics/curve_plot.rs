//! The FID-versus-steps plot: log2 steps on x, FID on a log y axis (a teacher at one step and a
//! student at its best lie two orders of magnitude apart), one labelled line per model.
//! Text uses an ASCII subset of DejaVu Sans compiled into the binary (licence beside it), so the
//! plot needs no system fonts.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("DejaVuSans-subset.ttf");

/// One line of the plot: a label and (steps, FID) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(usize, f64)>,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The log FID axis for points between `lo` and `hi` (both > 0): a margin of a third on either
/// side, widened evenly to at least one decade.
fn log_axis_range(lo: f64, hi: f64) -> (f64, f64) {
    let (y_lo, y_hi) = (lo / 1.3, hi * 1.3);
    if y_hi / y_lo >= 10.0 {
        return (y_lo, y_hi);
    }
    let widen = (10.0 * y_lo / y_hi).sqrt();
    (y_lo / widen, y_hi * widen)
}

/// Writes the plot as a PNG.
pub fn plot_fid_curve(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    register_font();
    let err = |e: String| Error::file(path, format!("cannot draw the plot: {e}"));
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut max_steps, mut lo, mut hi) = (1usize, f64::INFINITY, 0f64);
    for &(steps, fid) in points {
        max_steps = max_steps.max(steps);
        if fid.is_finite() && fid > 0.0 {
            lo = lo.min(fid);
            hi = hi.max(fid);
        }
    }
    let (y_lo, y_hi) = if lo.is_finite() {
        log_axis_range(lo, hi)
    } else {
        log_axis_range(1.0, 1.0)
    };
    let x_max = (max_steps as f64).log2().ceil().max(1.0);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.25f64..x_max + 0.25, (y_lo..y_hi).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("sampling steps")
        .y_desc("FID (log scale)")
        .x_labels(x_max as usize + 2)
        .x_label_formatter(&|v| {
            let r = v.round();
            if (v - r).abs() < 1e-6 && r >= 0.0 {
                format!("{}", 1u64 << r as u32)
            } else {
                String::new()
            }
        })
        .y_labels(12)
        .y_label_formatter(&|v| {
            if *v >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{}", (v * 1000.0).round() / 1000.0)
            }
        })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(_, fid)| fid.is_finite() && *fid > 0.0)
            .map(|&(steps, fid)| ((steps as f64).log2(), fid))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, colour.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::log_axis_range;

    #[test]
    fn the_log_axis_holds_every_point_and_at_least_a_decade() {
        // A teacher at one step and a student at its best: the margins alone.
        let (lo, hi) = log_axis_range(7.8, 519.9);
        assert!(
            (lo - 6.0).abs() < 1e-9 && (hi - 675.87).abs() < 1e-9,
            "{lo} {hi}"
        );
        // Close points (or one): widened evenly to exactly a decade around them.
        for (a, b) in [(9.4, 11.9), (1.0, 1.0)] {
            let (lo, hi) = log_axis_range(a, b);
            assert!(lo < a && hi > b, "{lo} {hi}");
            assert!((hi / lo - 10.0).abs() < 1e-9, "{lo} {hi}");
            assert!(((a / lo) / (hi / b) - 1.0).abs() < 1e-9, "{lo} {hi}");
        }
    }
}
