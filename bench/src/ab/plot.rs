//! SVG plots of the report with `plotters` (SVG backend only: no bitmap or font-rendering
//! libraries; the viewer draws the text).

use super::report::Row;
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plot: {err:?}")
}

/// A little above the largest finite value (and above zero), for an axis.
fn upper(v: impl Iterator<Item = f64>, headroom: f64) -> f64 {
    v.filter(|x| x.is_finite()).fold(0.0, f64::max).max(1e-3) * headroom
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A white 800×480 chart with a caption and a mesh.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    (x_max, x_desc): (f64, &str),
    (y_max, y_desc): (f64, &str),
) -> Result<Chart<'a, 'b>> {
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(e)?;
    Ok(chart)
}

/// One line of a plot: the value of a row, and whether the line is dashed.
pub type Series = (fn(&Row) -> f64, bool);

/// Metric by rate, one line per contender and series (`true`: dashed).
pub fn by_rate(path: &Path, title: &str, rows: &[Row], series: &[Series]) -> Result<()> {
    let mut by: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        by.entry(r.contender.as_str()).or_default().push(r);
    }
    let x_max = upper(rows.iter().map(|r| f64::from(r.rate)), 1.05);
    let y_max = upper(
        rows.iter()
            .flat_map(|r| series.iter().map(move |(f, _)| f(r))),
        1.1,
    );
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    let mut chart = frame(&root, title, (x_max, "offered events/s"), (y_max, ""))?;
    for (i, (name, rs)) in by.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        for (f, dashed) in series {
            let pts: Vec<(f64, f64)> = rs
                .iter()
                .map(|r| (f64::from(r.rate), f(r)))
                .filter(|p| p.1.is_finite())
                .collect();
            let style = color.stroke_width(2);
            if *dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                    .map_err(e)?;
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(e)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(e)?;
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// The poll.interval sweep: p99 latency against database CPU, one labelled point per interval.
pub fn sweep(path: &Path, rows: &[Row]) -> Result<()> {
    let x_max = upper(rows.iter().map(|r| r.db_backend_cpu_pct), 1.2);
    let y_max = upper(rows.iter().map(|r| r.latency_p99_ms), 1.2);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    let rate = rows.first().map_or(0, |r| r.rate);
    let mut chart = frame(
        &root,
        &format!("relay poll at {rate}/s: p99 latency vs database CPU by poll.interval"),
        (x_max, "polling backend CPU, % of one core"),
        (y_max, "p99 ms"),
    )?;
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.db_backend_cpu_pct, r.latency_p99_ms))
        .collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), PALETTE[1].stroke_width(2)))
        .map_err(e)?;
    for (r, p) in rows.iter().zip(pts) {
        chart
            .draw_series(std::iter::once(Circle::new(p, 4, PALETTE[1].filled())))
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(Text::new(
                r.variant.clone().unwrap_or_default(),
                (p.0, p.1),
                ("sans-serif", 14),
            )))
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
