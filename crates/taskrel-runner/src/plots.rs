//! Score-vs-accuracy scatter plots (PNG and SVG) with the least-squares line and Pearson's r
//! in the title. The font is embedded (DejaVu Sans, `assets/`), so no system fonts are needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::results::CorrelationRow;
use crate::stats;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("could not load the embedded font"))
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    row: &CorrelationRow,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let (xs, ys): (Vec<f64>, Vec<f64>) = row.points.iter().copied().unzip();
    let r = stats::pearson(&xs, &ys);
    let span = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.08).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    let (xr, yr) = (span(&xs), span(&ys));
    let group = if row.group_by == "all" {
        String::new()
    } else {
        format!(", {} = {}", row.group_by, row.group)
    };
    let title = format!(
        "{} vs accuracy ({}){group}: r = {:.3}, n = {}",
        row.score, row.measure, r, row.n
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(xr.clone(), yr)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(row.score.as_str())
        .y_desc(format!("accuracy after {}", row.measure))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            row.points
                .iter()
                .map(|&p| Circle::new(p, 4, BLUE.mix(0.7).filled())),
        )
        .map_err(err)?;
    if let Some((slope, intercept)) = stats::fit_line(&xs, &ys) {
        chart
            .draw_series(LineSeries::new(
                [xr.start, xr.end].map(|x| (x, slope * x + intercept)),
                &RED,
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `<stem>.png` and `<stem>.svg` for each row with at least two points; returns the
/// PNG paths.
pub fn write(dir: &Path, rows: &[CorrelationRow]) -> anyhow::Result<Vec<PathBuf>> {
    register_font()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for row in rows.iter().filter(|r| r.points.len() >= 2) {
        let mut stem = format!("{}_vs_{}_{}", row.score, row.measure, row.group_by);
        if row.group_by != "all" {
            let safe: String = row
                .group
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            stem = format!("{stem}_{safe}");
        }
        let png = dir.join(format!("{stem}.png"));
        let svg = dir.join(format!("{stem}.svg"));
        // Drawn into temporary files (the PNG encoder goes by the extension) and renamed, so
        // an interrupted report leaves the previous plot or none, never a partial one.
        let tmp = |ext: &str| dir.join(format!(".{stem}.tmp-{}.{ext}", std::process::id()));
        let (png_tmp, svg_tmp) = (tmp("png"), tmp("svg"));
        draw(
            BitMapBackend::new(&png_tmp, (720, 520)).into_drawing_area(),
            row,
        )
        .with_context(|| format!("writing {}", png_tmp.display()))?;
        draw(
            SVGBackend::new(&svg_tmp, (720, 520)).into_drawing_area(),
            row,
        )
        .with_context(|| format!("writing {}", svg_tmp.display()))?;
        for (from, to) in [(&png_tmp, &png), (&svg_tmp, &svg)] {
            std::fs::rename(from, to).with_context(|| format!("renaming to {}", to.display()))?;
        }
        written.push(png);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Estimate;

    #[test]
    fn plots_replace_old_ones_whole_and_leave_no_temporary_files() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let none = Estimate {
            value: 0.5,
            low: 0.1,
            high: 0.9,
        };
        let row = CorrelationRow {
            score: "bound".into(),
            measure: "linear_probe".into(),
            group_by: "all".into(),
            group: "all".into(),
            n: 3,
            pearson: none,
            spearman: none,
            kendall: none,
            weighted_tau: 0.5,
            top1_relative: 1.0,
            points: vec![(1.0, 0.9), (2.0, 0.7), (3.0, 0.75)],
        };
        // A 0-byte plot from an interrupted write is replaced by a whole one.
        let png = dir.path().join("bound_vs_linear_probe_all.png");
        std::fs::write(&png, b"")?;
        let written = write(dir.path(), std::slice::from_ref(&row))?;
        assert_eq!(written, vec![png.clone()]);
        let bytes = std::fs::read(&png)?;
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        assert_eq!(
            names,
            [
                "bound_vs_linear_probe_all.png",
                "bound_vs_linear_probe_all.svg"
            ]
        );
        Ok(())
    }
}
