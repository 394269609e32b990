//! Charts for people: the `fastkv bench` TTFT bars, the `fastkv eval` score heat maps and the
//! `fastkv calibrate` trade-off lines, written as SVG or PNG
//! (plotters). Text is laid out with a TrueType font: DejaVu Sans from the system, or the file in `FASTKV_FONT`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use anyhow::{anyhow, Result};
use fastkv::eval::Grid;

/// Runs `$paint` (a block using `$root`, a white drawing area) on an SVG or a PNG canvas as `$path`'s extension
/// says, so each chart is written once for both formats.
macro_rules! on_canvas {
    ($path:expr, $size:expr, |$root:ident| $paint:block) => {{
        let path: &Path = $path;
        let failed = |e: Box<dyn std::error::Error>| anyhow!("{}: cannot draw chart: {e}", path.display());
        let format = Format::of(path)?;
        load_font()?;
        match format {
            Format::Svg => {
                let $root = SVGBackend::new(path, $size).into_drawing_area();
                let paint = || -> DrawResult {
                    $root.fill(&WHITE)?;
                    $paint
                    Ok($root.present()?)
                };
                paint().map_err(failed)
            }
            Format::Png => {
                let $root = BitMapBackend::new(path, $size).into_drawing_area();
                let paint = || -> DrawResult {
                    $root.fill(&WHITE)?;
                    $paint
                    Ok($root.present()?)
                };
                paint().map_err(failed)
            }
        }
    }};
}

/// Heat maps side by side, one per grid (e.g. one per method), red = 0 to green = 1.
pub fn heatmaps(path: &Path, x_label: &str, y_label: &str, grids: &[Grid]) -> Result<()> {
    let rows = grids.iter().map(|g| g.rows.len()).max().unwrap_or(1) as u32;
    let label_px = 24 + 8 * grids.iter().flat_map(|g| &g.rows).map(|r| r.len()).max().unwrap_or(4) as u32;
    let cols = grids.iter().map(|g| g.cols.len()).max().unwrap_or(1) as u32;
    let size = ((label_px + 30 + 56 * cols) * grids.len().max(1) as u32, 110 + 30 * rows);
    on_canvas!(path, size, |root| {
        for (area, grid) in root.split_evenly((1, grids.len().max(1))).iter().zip(grids) {
            let (nr, nc) = (grid.rows.len(), grid.cols.len());
            let mut chart = ChartBuilder::on(area)
                .caption(&grid.title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(40)
                .y_label_area_size(label_px)
                .build_cartesian_2d((0..nc.max(1) - 1).into_segmented(), (0..nr.max(1) - 1).into_segmented())?;
            // The first row is drawn on top.
            let top_down: Vec<String> = grid.rows.iter().rev().cloned().collect();
            let name = |names: &[String], v: &SegmentValue<usize>| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            };
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_labels(nc)
                .y_labels(nr)
                .x_label_formatter(&|v| name(&grid.cols, v))
                .y_label_formatter(&|v| name(&top_down, v))
                .draw()?;
            let cells = grid
                .cells
                .iter()
                .enumerate()
                .flat_map(|(r, row)| row.iter().enumerate().map(move |(c, &v)| (nr - 1 - r, c, v)));
            chart.draw_series(cells.clone().map(|(r, c, v)| {
                let color = if v.is_nan() { RGBColor(200, 200, 200) } else { score_color(v) };
                let corner = |r: usize, c: usize| (SegmentValue::Exact(c), SegmentValue::Exact(r));
                Rectangle::new([corner(r, c), corner(r + 1, c + 1)], color.filled())
            }))?;
            let centered = ("sans-serif", 13).into_text_style(area).pos(Pos::new(HPos::Center, VPos::Center));
            chart.draw_series(cells.filter(|(_, _, v)| !v.is_nan()).map(|(r, c, v)| {
                Text::new(
                    format!("{:.0}", 100.0 * v),
                    (SegmentValue::CenterOf(c), SegmentValue::CenterOf(r)),
                    centered.clone(),
                )
            }))?;
        }
    })
}

/// Red (0) → yellow (0.5) → green (1).
fn score_color(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let (r, g) = if v < 0.5 { (220.0, 60.0 + 320.0 * v) } else { (220.0 - 360.0 * (v - 0.5), 220.0) };
    RGBColor(r as u8, g as u8, 70)
}

/// Grouped bars: one group per x label, one bar per series; `values[series][group]`.
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[String],
    values: &[Vec<f64>],
) -> Result<()> {
    let size = (240 + 70 * (groups.len() * (series.len() + 1)) as u32, 480);
    on_canvas!(path, size, |root| {
        let top = values.iter().flatten().copied().filter(|v| v.is_finite()).fold(0.0, f64::max) * 1.2;
        let slots = series.len() + 1; // one empty slot between groups
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(20)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..(groups.len() * slots) as f64, 0.0..top.max(1e-9))?;
        chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(y_label).draw()?;
        for (s, name) in series.iter().enumerate() {
            let color = Palette99::pick(s).to_rgba();
            chart
                .draw_series((0..groups.len()).map(|g| {
                    let x = (g * slots + s) as f64 + 0.5;
                    Rectangle::new([(x, 0.0), (x + 1.0, values[s][g])], color.filled())
                }))?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        chart.draw_series(
            groups
                .iter()
                .enumerate()
                .map(|(g, name)| Text::new(name.clone(), ((g * slots) as f64 + 0.5, top * 0.97), ("sans-serif", 14))),
        )?;
        chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()?;
    })
}

/// Lines with their points marked: one series per name, `(x, y)` points in x order (a series of
/// one point is a marker).
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(0.0, f64::max) * 1.05;
    let y_max = points().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    on_canvas!(path, (720, 480), |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max.max(1e-9), 0.0..y_max)?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
        for (i, (name, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(p.iter().map(|&xy| Circle::new(xy, 4, color.filled())))?;
        }
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).border_style(BLACK).draw()?;
    })
}

/// Checks that `path` names a chart format this module writes, before any long work starts.
pub fn check_path(path: &Path) -> Result<()> {
    Format::of(path).map(|_| ())
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

enum Format {
    Svg,
    Png,
}

impl Format {
    fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(anyhow!("invalid --plot: {}: name the chart *.svg or *.png", path.display())),
        }
    }
}

/// Registers the TrueType font chart text is measured and drawn with, once per process.
fn load_font() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let candidates: Vec<PathBuf> = std::env::var_os("FASTKV_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"]
                .map(PathBuf::from),
        )
        .collect();
    LOADED
        .get_or_init(|| {
            let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
                "charts need a TrueType font: install fonts-dejavu-core or set FASTKV_FONT=FILE.ttf".to_string()
            })?;
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(|msg| anyhow!("invalid --plot: {msg}"))
}
