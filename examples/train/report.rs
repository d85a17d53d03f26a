//! Results: per-epoch histories, the paper-style table (mean ± std over
//! seeds) and the SVG plots.

use std::path::Path;

use amp::BoxError;
use plotters::prelude::*;

/// What one training run recorded, one entry per epoch.
#[derive(Clone, Debug, Default)]
pub struct RunHistory {
    /// Mean clean-pass loss L(θ) over the epoch's steps.
    pub train_loss: Vec<f64>,
    /// Validation error after the epoch, as a fraction.
    pub val_error: Vec<f64>,
    /// Test error after the epoch, as a fraction.
    pub test_error: Vec<f64>,
    /// Wall-clock seconds of the epoch's optimiser steps (evaluation not
    /// counted).
    pub epoch_seconds: Vec<f64>,
}

impl RunHistory {
    fn last(values: &[f64]) -> f64 {
        values.last().copied().unwrap_or(f64::NAN)
    }
}

/// One method (ERM or AMP) over every seed.
#[derive(Clone, Debug)]
pub struct MethodResult {
    /// Row label.
    pub name: String,
    /// One history per seed, in seed order.
    pub runs: Vec<RunHistory>,
}

impl MethodResult {
    /// Final-epoch values of `field` over the seeds.
    pub fn finals(&self, field: fn(&RunHistory) -> &[f64]) -> Vec<f64> {
        self.runs
            .iter()
            .map(|r| RunHistory::last(field(r)))
            .collect()
    }

    /// Mean seconds per epoch over every epoch of every seed.
    pub fn seconds_per_epoch(&self) -> f64 {
        let all: Vec<f64> = self
            .runs
            .iter()
            .flat_map(|r| r.epoch_seconds.iter().copied())
            .collect();
        all.iter().sum::<f64>() / all.len().max(1) as f64
    }

    /// Per-epoch mean of `field` over the seeds.
    pub fn mean_curve(&self, field: fn(&RunHistory) -> &[f64]) -> Vec<f64> {
        let epochs = self.runs.iter().map(|r| field(r).len()).min().unwrap_or(0);
        (0..epochs)
            .map(|e| self.runs.iter().map(|r| field(r)[e]).sum::<f64>() / self.runs.len() as f64)
            .collect()
    }
}

/// Mean and sample standard deviation (n − 1 in the denominator; 0 for a
/// single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

/// `"mean ± std"` with `decimals` decimals, values multiplied by `scale`
/// (100 turns error fractions into percent).
pub fn format_mean_std(values: &[f64], scale: f64, decimals: usize) -> String {
    let (mean, std) = mean_std(values);
    format!(
        "{:.*} ± {:.*}",
        decimals,
        mean * scale,
        decimals,
        std * scale
    )
}

/// The results table, in the style of the paper's: test error mean ± std over
/// seeds for each method, plus validation error, final training loss and
/// time per epoch, then the AMP/ERM time ratio and the paired difference.
/// With `show_test = false` the test column is left out and the paired
/// difference is taken on the validation error (for choosing
/// hyper-parameters without looking at the test split).
pub fn table(erm: &MethodResult, amp: &MethodResult, show_test: bool) -> String {
    let mut header = vec![
        "method",
        "test error (%)",
        "val error (%)",
        "train loss",
        "time/epoch",
    ];
    if !show_test {
        header.remove(1);
    }
    let row = |m: &MethodResult| {
        let mut cells = vec![
            m.name.clone(),
            format_mean_std(&m.finals(|r| &r.test_error), 100.0, 2),
            format_mean_std(&m.finals(|r| &r.val_error), 100.0, 2),
            format_mean_std(&m.finals(|r| &r.train_loss), 1.0, 3),
            format!("{:.1} ms", m.seconds_per_epoch() * 1e3),
        ];
        if !show_test {
            cells.remove(1);
        }
        cells
    };
    let rows = [
        header.iter().map(|h| h.to_string()).collect(),
        row(erm),
        row(amp),
    ];
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                let pad = w - cell.chars().count();
                if c == 0 {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    let ratio = amp.seconds_per_epoch() / erm.seconds_per_epoch();
    out.push_str(&format!("AMP/ERM time per epoch: {ratio:.2}x\n"));
    let (metric, field): (&str, fn(&RunHistory) -> &[f64]) = if show_test {
        ("test", |r| &r.test_error)
    } else {
        ("val", |r| &r.val_error)
    };
    let diffs: Vec<f64> = amp
        .finals(field)
        .iter()
        .zip(erm.finals(field))
        .map(|(a, e)| a - e)
        .collect();
    let wins = diffs.iter().filter(|&&d| d < 0.0).count();
    let ties = diffs.iter().filter(|&&d| d == 0.0).count();
    out.push_str(&format!(
        "AMP - ERM {metric} error, paired by seed: {} points (AMP lower on {wins} of {} seeds, tied on {ties})\n",
        format_mean_std(&diffs, 100.0, 2),
        diffs.len()
    ));
    out
}

/// Draws one SVG line chart: each method's per-seed curves faintly and its
/// mean over seeds boldly, against the epoch.
pub fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    methods: &[(&MethodResult, RGBColor)],
    field: fn(&RunHistory) -> &[f64],
    scale: f64,
) -> Result<(), BoxError> {
    let epochs = methods
        .iter()
        .flat_map(|(m, _)| m.runs.iter().map(|r| field(r).len()))
        .max()
        .unwrap_or(0);
    let values = methods
        .iter()
        .flat_map(|(m, _)| {
            m.runs
                .iter()
                .flat_map(|r| field(r).iter().map(|v| v * scale))
        })
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if epochs == 0 || !lo.is_finite() {
        return Err("nothing to plot".into());
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(1f64..epochs.max(2) as f64, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_label)
        .light_line_style(WHITE)
        .draw()?;
    let points = |ys: &[f64]| -> Vec<(f64, f64)> {
        ys.iter()
            .enumerate()
            .map(|(e, &y)| ((e + 1) as f64, y * scale))
            .collect()
    };
    for &(method, color) in methods {
        for run in &method.runs {
            chart.draw_series(LineSeries::new(
                points(field(run)),
                color.mix(0.25).stroke_width(1),
            ))?;
        }
    }
    for &(method, color) in methods {
        let mean = method.mean_curve(field);
        chart
            .draw_series(LineSeries::new(points(&mean), color.stroke_width(3)))?
            .label(format!(
                "{} (mean of {} seeds)",
                method.name,
                method.runs.len()
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_uses_the_sample_deviation() {
        // Values 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32,
        // sample variance 32 / 7.
        let (mean, std) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(mean, 5.0);
        assert!((std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn formats_percent_with_two_decimals() {
        assert_eq!(format_mean_std(&[0.25, 0.27], 100.0, 2), "26.00 ± 1.41");
        assert_eq!(format_mean_std(&[0.5], 1.0, 3), "0.500 ± 0.000");
    }

    fn method(name: &str, test_errors: &[f64], seconds: f64) -> MethodResult {
        MethodResult {
            name: name.into(),
            runs: test_errors
                .iter()
                .map(|&e| RunHistory {
                    train_loss: vec![1.0, 0.5],
                    val_error: vec![0.4, e],
                    test_error: vec![0.5, e],
                    epoch_seconds: vec![seconds, seconds],
                })
                .collect(),
        }
    }

    #[test]
    fn table_reports_ratio_and_paired_difference() {
        let erm = method("ERM", &[0.30, 0.20], 0.010);
        let amp = method("AMP", &[0.25, 0.20], 0.020);
        let text = table(&erm, &amp, true);
        assert!(text.contains("AMP/ERM time per epoch: 2.00x"), "{text}");
        assert!(
            text.contains("-2.50 ± 3.54 points (AMP lower on 1 of 2 seeds, tied on 1)"),
            "{text}"
        );
        assert!(text.contains("25.00 ± 7.07"), "{text}");
        assert_eq!(erm.mean_curve(|r| &r.test_error), vec![0.5, 0.25]);
        let val_only = table(&erm, &amp, false);
        assert!(!val_only.contains("test"), "{val_only}");
        assert!(val_only.contains("AMP - ERM val error"), "{val_only}");
    }

    #[test]
    fn plot_writes_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        let erm = method("ERM", &[0.30, 0.20], 0.010);
        let amp = method("AMP", &[0.25, 0.20], 0.020);
        plot(
            &path,
            "t",
            "y",
            &[(&erm, RED), (&amp, BLUE)],
            |r| &r.test_error,
            100.0,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("ERM (mean of 2 seeds)"));
    }
}
