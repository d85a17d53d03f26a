//! The bench's table: rows are figures, columns backends.

use std::fmt::Write as _;

use crate::measure::{median, range, PairResult, Plan};
use crate::{mlp, Args, Outcome, Results, COUNTS};

const LABEL: usize = 50;
const CELL: usize = 26;

fn short(e: &str) -> String {
    format!("error: {}", e.chars().take(CELL - 9).collect::<String>())
}

fn row(out: &mut String, label: &str, cells: impl Iterator<Item = String>, note: &str) {
    let mut line = format!("{label:<LABEL$}");
    for cell in cells {
        let _ = write!(line, "{cell:<CELL$}");
    }
    let _ = writeln!(out, "{}", format!("{line}{note}").trim_end());
}

fn ratio(p: &Option<&Outcome<PairResult>>) -> String {
    match p {
        Some(Ok(p)) => {
            let (lo, hi) = range(&p.ratios);
            format!("{:.2} [{lo:.2}-{hi:.2}]", median(&p.ratios))
        }
        Some(Err(e)) => short(e),
        None => "-".into(),
    }
}

fn times(p: &Option<&Outcome<PairResult>>) -> String {
    match p {
        Some(Ok(p)) => format!("{:.3} / {:.3}", median(&p.a) * 1e3, median(&p.b) * 1e3),
        Some(Err(_)) => "error".into(),
        None => "-".into(),
    }
}

/// Model `m` of a backend's results: the MLPs in [`mlp::SPECS`] order, then
/// the conv model.
fn pick(r: &Results, m: usize) -> Option<&Outcome<PairResult>> {
    if m < mlp::SPECS.len() {
        r.mlp.get(m)
    } else {
        r.cnn.as_ref()
    }
}

/// The report: a header with the run's settings, then the table, then every
/// error in full.
pub fn table(
    results: &[Results],
    args: &Args,
    plan: &Plan,
    unavailable: &[(&'static str, String)],
    secs: f64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nAMP (adversarial model perturbation) on {:?}: {} run, {} rounds of >= {:.2} s blocks \
         (models: {:.2} s), conv batch {}; took {secs:.0} s",
        args.device,
        if args.quick { "QUICK" } else { "full" },
        plan.rounds,
        plan.block_secs,
        4.0 * plan.block_secs,
        args.cnn_batch
    );
    for (name, why) in unavailable {
        let _ = writeln!(out, "not run: {name}: {why}");
    }
    let _ = writeln!(out);
    row(
        &mut out,
        "figure (median of interleaved pairs)",
        results.iter().map(|r| r.name.to_string()),
        "target",
    );
    let _ = writeln!(out, "{}", "-".repeat(LABEL + CELL * results.len() + 12));

    let mut models: Vec<String> = mlp::SPECS
        .iter()
        .map(|s| {
            format!(
                "MLP {} ({} t, {:.2}M p, b{})",
                s.name,
                s.tensors(),
                s.numel() as f64 / 1e6,
                s.batch
            )
        })
        .collect();
    models.push(format!(
        "ResNet-18-sized conv (62 t, 11.2M p, b{})",
        args.cnn_batch
    ));
    for (m, model) in models.iter().enumerate() {
        row(
            &mut out,
            &format!("AMP/ERM step time, {model}"),
            results.iter().map(|r| ratio(&pick(r, m))),
            "~2 (two passes per step)",
        );
    }
    for (m, model) in models.iter().enumerate() {
        let name = model.split(" (").next().unwrap_or(model);
        row(
            &mut out,
            &format!("  ERM / AMP ms per step, {name}"),
            results.iter().map(|r| times(&pick(r, m))),
            "",
        );
    }

    let sizes: Vec<usize> = results
        .first()
        .map(|r| r.sizes.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default();
    for (k, n) in sizes.iter().enumerate() {
        row(
            &mut out,
            &format!("optimizer-only {n:.0e} f32: fraction of D2D copy"),
            results.iter().map(|r| match r.sizes.get(k) {
                Some((_, Ok(s))) => format!("{:.2} ({:.0}/{:.0} GB/s)", s[0], s[1], s[2]),
                Some((_, Err(e))) => short(e),
                None => "-".into(),
            }),
            "(optimizer / copy GB/s)",
        );
    }
    for (k, n) in sizes.iter().enumerate() {
        row(
            &mut out,
            &format!("  optimizer-only ms per step at {n:.0e}"),
            results.iter().map(|r| match r.sizes.get(k) {
                Some((_, Ok(s))) => format!("{:.3}", s[3]),
                _ => "-".into(),
            }),
            "",
        );
    }

    for (k, count) in COUNTS.iter().enumerate() {
        row(
            &mut out,
            &format!("host syncs per AMP step, {count} tensors (store+loss)"),
            results.iter().map(|r| match r.syncs.get(k) {
                Some(Ok(s)) => format!("{} ({} + {})", s[0] + s[1], s[0], s[1]),
                Some(Err(e)) => short(e),
                None => "-".into(),
            }),
            if k == 0 {
                "constant in the tensor count"
            } else {
                ""
            },
        );
    }
    row(
        &mut out,
        "  syncs independent of the tensor count",
        results
            .iter()
            .map(|r| match (r.syncs.first(), r.syncs.get(1)) {
                (Some(Ok(a)), Some(Ok(b))) => {
                    if a[0] + a[1] == b[0] + b[1] {
                        "ok".into()
                    } else {
                        "MISS".into()
                    }
                }
                _ => "-".into(),
            }),
        "",
    );
    row(
        &mut out,
        "  optimizer ms per step at 12 | 1000 tensors, 1e6 p",
        results.iter().map(|r| {
            r.syncs
                .iter()
                .map(|s| s.as_ref().map_or("err".into(), |s| format!("{:.3}", s[2])))
                .collect::<Vec<String>>()
                .join(" | ")
        }),
        "",
    );

    row(
        &mut out,
        "  own kernel launches per optimizer step, 12 | 1000 tensors",
        results.iter().map(|r| {
            r.syncs
                .iter()
                .map(|s| match s {
                    Ok(s) if s[3].is_finite() => format!("{:.0}", s[3]),
                    _ => "-".into(),
                })
                .collect::<Vec<String>>()
                .join(" | ")
        }),
        "one per tensor and operation",
    );

    for r in results {
        let errors = r
            .mlp
            .iter()
            .chain(r.cnn.iter())
            .filter_map(|m| m.as_ref().err())
            .chain(r.sizes.iter().filter_map(|(_, s)| s.as_ref().err()))
            .chain(r.syncs.iter().filter_map(|s| s.as_ref().err()));
        for e in errors {
            let _ = writeln!(out, "{} error: {e}", r.name);
        }
    }
    out
}
