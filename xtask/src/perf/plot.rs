//! SVG figures of `cargo xtask perf` results, drawn with plotters' SVG backend: grouped bars,
//! lines through percentiles, and heatmaps of figures against a limit, laid out as panels in
//! one file. Not a general plotting library: the layouts are fixed, made to be read at a
//! glance next to the JSON they come from. Text is left to the SVG viewer's sans-serif font
//! (plotters only estimates its width), so no font files or libraries are needed.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One named run of values along a panel's categories or points; NaN is "no value".
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

impl Series {
    pub fn new(name: impl Into<String>, values: Vec<f64>) -> Series {
        Series {
            name: name.into(),
            values,
        }
    }
}

/// When a heatmap cell is good: its value at most, or at least, a limit.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

/// One chart of a figure.
#[derive(Clone, Debug)]
pub enum Panel {
    /// For each category along x, one bar per series, its value printed on top.
    Bars {
        title: String,
        y_label: String,
        categories: Vec<String>,
        series: Vec<Series>,
    },
    /// One line per series through the points along x (e.g. p50, p90, p99, p99.9).
    Lines {
        title: String,
        y_label: String,
        points: Vec<String>,
        series: Vec<Series>,
    },
    /// One cell per row and column, green when it meets `goal`, yellow near the limit, orange
    /// past it and red at twice it (or half, for `AtLeast`); the value is printed in the cell.
    Heatmap {
        title: String,
        rows: Vec<String>,
        cols: Vec<String>,
        values: Vec<Vec<f64>>,
        goal: Goal,
    },
}

/// Writes one grouped bar chart to `path`: for each category, one bar per series.
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "drawn by the routing-matrix scenario (issue 13)")
)]
pub fn bars(path: &Path, title: &str, y_label: &str, categories: &[String], series: &[Series]) -> anyhow::Result<()> {
    let panel = Panel::Bars {
        title: String::new(),
        y_label: y_label.to_owned(),
        categories: categories.to_vec(),
        series: series.to_vec(),
    };
    figure(path, title, 1, &[panel])
}

/// Writes a heatmap to `path`: `values[row][col]`, a cell green when its value is at most
/// `good_at_most` and turning red up to twice that (for figures where more is better, plot
/// the limit over the value, or use `Panel::Heatmap` with `Goal::AtLeast`).
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "drawn by the routing-matrix scenario (issue 13)")
)]
pub fn heatmap(
    path: &Path,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    good_at_most: f64,
) -> anyhow::Result<()> {
    let panel = Panel::Heatmap {
        title: String::new(),
        rows: rows.to_vec(),
        cols: cols.to_vec(),
        values: values.to_vec(),
        goal: Goal::AtMost(good_at_most),
    };
    figure(path, title, 1, &[panel])
}

/// Writes `panels` to `path` as one SVG under `title`, `columns` panels a row.
pub fn figure(path: &Path, title: &str, columns: usize, panels: &[Panel]) -> anyhow::Result<()> {
    let svg = render(title, columns, panels)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const TITLE_PX: u32 = 36;
/// One category (or point) along x, in the x coordinate's units (integers: plotters formats
/// the labels of integer axes only).
const X_UNIT: i32 = 1000;
const FONT: &str = "sans-serif";
/// The mesh's fine lines (one between two labelled ones): faint, a guide for the eye only.
const LIGHT: RGBAColor = RGBAColor(0, 0, 0, 0.04);
/// Tableau's ten colours: distinct, and readable on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(89, 161, 79),
    RGBColor(237, 201, 72),
    RGBColor(176, 122, 161),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];

fn render(title: &str, columns: usize, panels: &[Panel]) -> anyhow::Result<String> {
    for p in panels {
        check(p)?;
    }
    let columns = columns.clamp(1, panels.len().max(1));
    // Every panel as wide as the widest; each row as high as its highest panel.
    let w = panels.iter().map(|p| size(p).0).max().unwrap_or(100);
    let heights: Vec<u32> = panels
        .chunks(columns)
        .map(|row| row.iter().map(|p| size(p).1).max().unwrap_or(100))
        .collect();
    let title_px = if title.is_empty() { 0 } else { TITLE_PX };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w * columns as u32, title_px + heights.iter().sum::<u32>()))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let (top, body) = root.split_vertically(title_px);
        if !title.is_empty() {
            let (tw, _) = top.dim_in_pixel();
            top.draw(&Text::new(
                title.to_owned(),
                (tw as i32 / 2, TITLE_PX as i32 / 2),
                TextStyle::from((FONT, 22, FontStyle::Bold).into_font()).pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
        }
        let mut rest = body;
        let mut areas = Vec::new();
        for h in heights {
            let (row, below) = rest.split_vertically(h);
            areas.extend(row.split_evenly((1, columns)));
            rest = below;
        }
        for (panel, area) in panels.iter().zip(areas) {
            match panel {
                Panel::Bars {
                    title,
                    y_label,
                    categories,
                    series,
                } => draw_bars(&area, title, y_label, categories, series)?,
                Panel::Lines {
                    title,
                    y_label,
                    points,
                    series,
                } => draw_lines(&area, title, y_label, points, series)?,
                Panel::Heatmap {
                    title,
                    rows,
                    cols,
                    values,
                    goal,
                } => draw_heatmap(&area, title, rows, cols, values, *goal)?,
            }
        }
        root.present()?;
    }
    Ok(svg)
}

/// Every series (or heatmap row) has one value per category (or column).
fn check(panel: &Panel) -> anyhow::Result<()> {
    let (title, width, lengths): (&str, usize, Vec<usize>) = match panel {
        Panel::Bars {
            title,
            categories,
            series,
            ..
        } => (title, categories.len(), series.iter().map(|s| s.values.len()).collect()),
        Panel::Lines {
            title, points, series, ..
        } => (title, points.len(), series.iter().map(|s| s.values.len()).collect()),
        Panel::Heatmap {
            title,
            rows,
            cols,
            values,
            ..
        } => {
            if rows.len() != values.len() {
                bail!("heatmap {title:?}: {} rows named, {} given", rows.len(), values.len());
            }
            (title, cols.len(), values.iter().map(Vec::len).collect())
        }
    };
    if let Some(n) = lengths.iter().find(|&&n| n != width) {
        bail!("panel {title:?}: {n} values where {width} are expected");
    }
    Ok(())
}

/// The pixels a panel needs to be read.
fn size(panel: &Panel) -> (u32, u32) {
    match panel {
        Panel::Bars { categories, series, .. } => {
            // A category: its bars side by side, or its label, whichever is wider.
            let label = categories.iter().map(|c| c.chars().count()).max().unwrap_or(0) as u32;
            let category = (series.len() as u32 * 26 + 24).max(label * 8 + 16);
            ((90 + category * categories.len() as u32).max(460), 340)
        }
        Panel::Lines { .. } => (460, 340),
        Panel::Heatmap { rows, cols, .. } => {
            let (label_w, cell_w) = heatmap_widths(rows, cols);
            (
                label_w + cell_w * cols.len() as u32 + 20,
                HEAT_TOP_PX + HEAT_CELL_H * rows.len() as u32 + 20,
            )
        }
    }
}

fn draw_bars(area: &Area, title: &str, y_label: &str, categories: &[String], series: &[Series]) -> anyhow::Result<()> {
    let area = header(area, title, series)?;
    let n = categories.len().max(1) as i32;
    let top = headroom(series);
    let centres: Vec<i32> = (0..n).map(|i| i * X_UNIT + X_UNIT / 2).collect();
    let mut chart = ChartBuilder::on(&area)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n * X_UNIT).with_key_points(centres), 0.0..top)?;
    let category = |x: &i32| categories.get((x / X_UNIT) as usize).cloned().unwrap_or_default();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(1)
        .light_line_style(LIGHT)
        .x_label_formatter(&category)
        .x_label_style((FONT, 14))
        .y_desc(y_label)
        .y_label_formatter(&|v| tick(*v))
        .draw()?;
    // Each category's bars share 80% of its width, a tenth of that apart.
    let width = X_UNIT * 8 / 10 / series.len().max(1) as i32;
    for (j, s) in series.iter().enumerate() {
        let colour = PALETTE[j % PALETTE.len()];
        let bars: Vec<(i32, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| (i as i32 * X_UNIT + X_UNIT / 10 + j as i32 * width, *v))
            .collect();
        chart.draw_series(
            bars.iter()
                .map(|&(x, v)| Rectangle::new([(x, 0.0), (x + width * 9 / 10, v)], colour.filled())),
        )?;
        chart.draw_series(
            bars.iter()
                .map(|&(x, v)| Text::new(short(v), (x + width * 9 / 20, v), text(12, HPos::Center, VPos::Bottom))),
        )?;
    }
    Ok(())
}

fn draw_lines(area: &Area, title: &str, y_label: &str, points: &[String], series: &[Series]) -> anyhow::Result<()> {
    let area = header(area, title, series)?;
    let n = points.len().max(1) as i32;
    let top = headroom(series);
    let ticks: Vec<i32> = (0..n).map(|i| i * X_UNIT).collect();
    let mut chart = ChartBuilder::on(&area)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (-X_UNIT * 3 / 10..(n - 1) * X_UNIT + X_UNIT * 3 / 10).with_key_points(ticks),
            0.0..top,
        )?;
    let point = |x: &i32| points.get((x / X_UNIT) as usize).cloned().unwrap_or_default();
    chart
        .configure_mesh()
        .max_light_lines(1)
        .light_line_style(LIGHT)
        .x_label_formatter(&point)
        .x_label_style((FONT, 14))
        .y_desc(y_label)
        .y_label_formatter(&|v| tick(*v))
        .draw()?;
    for (j, s) in series.iter().enumerate() {
        let colour = PALETTE[j % PALETTE.len()];
        let line: Vec<(i32, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| (i as i32 * X_UNIT, *v))
            .collect();
        chart.draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))?;
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    Ok(())
}

/// Draws a panel's title, and under it the legend (a swatch and the name of each series,
/// when there are several) where it hides no data; returns the area left for the chart.
fn header<'a>(area: &Area<'a>, title: &str, series: &[Series]) -> anyhow::Result<Area<'a>> {
    let (w, _) = area.dim_in_pixel();
    let legend = series.len() > 1;
    let (top, chart) = area.split_vertically(if legend { 52 } else { 30 });
    top.draw(&Text::new(
        title.to_owned(),
        (w as i32 / 2, 16),
        text(18, HPos::Center, VPos::Center),
    ))?;
    if legend {
        // Names are about 7 px a character at this size; the row is centred.
        let widths: Vec<i32> = series.iter().map(|s| s.name.chars().count() as i32 * 7 + 34).collect();
        let mut x = (w as i32 - widths.iter().sum::<i32>()) / 2;
        for (j, (s, width)) in series.iter().zip(widths).enumerate() {
            let colour = PALETTE[j % PALETTE.len()];
            top.draw(&Rectangle::new([(x, 34), (x + 12, 46)], colour.filled()))?;
            top.draw(&Text::new(
                s.name.clone(),
                (x + 17, 40),
                text(14, HPos::Left, VPos::Center),
            ))?;
            x += width;
        }
    }
    Ok(chart)
}

const HEAT_CELL_H: u32 = 30;
/// Title, the scale's note and the column labels above the cells.
const HEAT_TOP_PX: u32 = 76;

/// Widths of the row labels' column and of a cell, from the text they hold.
fn heatmap_widths(rows: &[String], cols: &[String]) -> (u32, u32) {
    let chars = |v: &[String]| v.iter().map(|s| s.chars().count()).max().unwrap_or(0) as u32;
    (chars(rows) * 8 + 16, (chars(cols) * 8 + 12).max(64))
}

fn draw_heatmap(
    area: &Area,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    goal: Goal,
) -> anyhow::Result<()> {
    let (label_w, cell_w) = heatmap_widths(rows, cols);
    let centred = |size| text(size, HPos::Center, VPos::Center);
    let (w, _) = area.dim_in_pixel();
    area.draw(&Text::new(title.to_owned(), (w as i32 / 2, 14), centred(18)))?;
    let note = match goal {
        Goal::AtMost(l) => format!(
            "green: at most {}; orange past it; red at {} or more",
            short(l),
            short(2.0 * l)
        ),
        Goal::AtLeast(l) => format!(
            "green: at least {}; orange under it; red at {} or less",
            short(l),
            short(l / 2.0)
        ),
    };
    area.draw(&Text::new(note, (w as i32 / 2, 34), centred(13)))?;
    let top = HEAT_TOP_PX as i32;
    let (cell_w, cell_h) = (cell_w as i32, HEAT_CELL_H as i32);
    // Centred in the panel: the row labels' right edge, where the cells start.
    let label_w = (w as i32 - label_w as i32 - cell_w * cols.len() as i32) / 2 + label_w as i32;
    for (c, name) in cols.iter().enumerate() {
        let x = label_w + c as i32 * cell_w + cell_w / 2;
        area.draw(&Text::new(name.clone(), (x, top - 12), centred(14)))?;
    }
    for (r, (name, row)) in rows.iter().zip(values).enumerate() {
        let y = top + r as i32 * cell_h;
        area.draw(&Text::new(
            name.clone(),
            (label_w - 8, y + cell_h / 2),
            text(14, HPos::Right, VPos::Center),
        ))?;
        for (c, &v) in row.iter().enumerate() {
            let x = label_w + c as i32 * cell_w;
            area.draw(&Rectangle::new(
                [(x, y), (x + cell_w, y + cell_h)],
                cell_colour(v, goal).filled(),
            ))?;
            area.draw(&Rectangle::new(
                [(x, y), (x + cell_w, y + cell_h)],
                WHITE.stroke_width(2),
            ))?;
            area.draw(&Text::new(short(v), (x + cell_w / 2, y + cell_h / 2), centred(14)))?;
        }
    }
    Ok(())
}

/// Green (hue 120) well inside the goal, yellow-green at the limit, orange just past it, red
/// (hue 0) at twice the limit (half, for `AtLeast`) and beyond; grey without a value.
fn cell_colour(v: f64, goal: Goal) -> HSLColor {
    // `over` is the value against the limit, 1 at the limit and more the worse.
    let over = match goal {
        Goal::AtMost(limit) => v / limit,
        Goal::AtLeast(limit) => limit / v,
    };
    if over.is_nan() {
        return HSLColor(0.0, 0.0, 0.85);
    }
    let hue = if over <= 1.0 {
        75.0 + 45.0 * ((1.0 - over) / 0.5).clamp(0.0, 1.0)
    } else {
        40.0 * (2.0 - over).clamp(0.0, 1.0)
    };
    HSLColor(hue / 360.0, 0.65, 0.62)
}

fn text(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).pos(Pos::new(h, v))
}

/// Room above the highest value for the labels on top of it.
fn headroom(series: &[Series]) -> f64 {
    let max = series
        .iter()
        .flat_map(|s| &s.values)
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    if max > 0.0 { max * 1.15 } else { 1.0 }
}

/// An axis' tick, without trailing zeros: 50, 2.5, 0.125.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A value in as few characters as reads well: 36272, 4645, 23.7, 0.908; `n/a` for NaN.
fn short(v: f64) -> String {
    let a = v.abs();
    if v.is_nan() {
        "n/a".into()
    } else if a.is_infinite() {
        if v > 0.0 { "inf".into() } else { "-inf".into() }
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A path for a test's figure, in one directory under the system's temporary one.
    pub(in crate::perf) fn temp_svg(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join("xtask-plot-tests");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{}-{name}.svg", std::process::id()))
    }

    /// Parses the SVG at `path` (then removes it) and returns its text, one string per
    /// `<text>` element.
    pub(in crate::perf) fn svg_texts(path: &Path) -> Vec<String> {
        let svg = std::fs::read_to_string(path).unwrap();
        std::fs::remove_file(path).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or("").trim().to_owned())
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn bars_are_well_formed_svg_with_categories_series_and_values() {
        let path = temp_svg("bars");
        bars(
            &path,
            "req/s <by> target",
            "req/s",
            &names(&["direct", "lmstack", "nginx"]),
            &[
                Series::new("round 1", vec![36272.0, 33771.0, 34689.0]),
                Series::new("round 2", vec![36000.0, f64::NAN, 34000.0]),
            ],
        )
        .unwrap();
        let texts = svg_texts(&path);
        for label in [
            "req/s <by> target",
            "direct",
            "lmstack",
            "nginx",
            "round 1",
            "round 2",
            "36272",
            "33771",
        ] {
            assert!(texts.iter().any(|t| t == label), "{label:?} missing from {texts:?}");
        }
        // The missing value has no bar and no label.
        assert!(!texts.iter().any(|t| t == "n/a"));
    }

    #[test]
    fn heatmap_prints_every_cell_and_colours_by_the_limit() {
        let path = temp_svg("heatmap");
        let rows = names(&["4 engines, base", "8 engines, rag"]);
        let cols = names(&["round_robin", "prefix"]);
        heatmap(
            &path,
            "TTFT p99 / limit",
            &rows,
            &cols,
            &[vec![2.4, 0.6], vec![1.1, f64::NAN]],
            1.0,
        )
        .unwrap();
        let texts = svg_texts(&path);
        for label in [
            "TTFT p99 / limit",
            "4 engines, base",
            "8 engines, rag",
            "round_robin",
            "prefix",
            "2.40",
            "0.600",
            "1.10",
            "n/a",
        ] {
            assert!(texts.iter().any(|t| t == label), "{label:?} missing from {texts:?}");
        }
        let hue = |v, goal| cell_colour(v, goal).0 * 360.0;
        assert!((hue(0.4, Goal::AtMost(1.0)) - 120.0).abs() < 1e-9, "well within: green");
        assert!(hue(1.0, Goal::AtMost(1.0)) > 60.0, "at the limit: still good");
        assert!(hue(1.01, Goal::AtMost(1.0)) <= 40.0, "just past: orange");
        assert!(hue(3.0, Goal::AtMost(1.0)).abs() < 1e-9, "twice past: red");
        assert!(hue(0.96, Goal::AtLeast(0.95)) > 60.0);
        assert!(hue(0.5, Goal::AtLeast(0.95)) < 40.0);
        assert!(
            hue(0.0, Goal::AtLeast(0.95)).abs() < 1e-9,
            "nothing where more is better: red"
        );
    }

    #[test]
    fn figures_hold_lines_bars_and_heatmaps_together() {
        let path = temp_svg("figure");
        let panels = [
            Panel::Lines {
                title: "latency".into(),
                y_label: "ms".into(),
                points: names(&["p50", "p90", "p99", "p99.9"]),
                series: vec![
                    Series::new("direct", vec![1.8, 2.0, 2.4, 3.9]),
                    Series::new("lmstack", vec![1.7, 2.1, 3.6, 4.5]),
                ],
            },
            Panel::Bars {
                title: "hit rate".into(),
                y_label: "share".into(),
                categories: names(&["prefix"]),
                series: vec![Series::new("hit rate", vec![0.871])],
            },
            Panel::Heatmap {
                title: "hit rate / limit".into(),
                rows: names(&["a"]),
                cols: names(&["prefix"]),
                values: vec![vec![0.97]],
                goal: Goal::AtLeast(0.95),
            },
        ];
        figure(&path, "everything", 2, &panels).unwrap();
        let texts = svg_texts(&path);
        for label in [
            "everything",
            "latency",
            "p99.9",
            "direct",
            "lmstack",
            "hit rate",
            "0.871",
            "hit rate / limit",
            "0.970",
        ] {
            assert!(texts.iter().any(|t| t == label), "{label:?} missing from {texts:?}");
        }
    }

    #[test]
    fn a_series_of_the_wrong_length_is_an_error_not_a_picture() {
        let path = temp_svg("wrong");
        let err = bars(&path, "t", "y", &names(&["a", "b"]), &[Series::new("s", vec![1.0])]).unwrap_err();
        assert!(err.to_string().contains("1 values where 2 are expected"), "{err}");
        let err = heatmap(&path, "t", &names(&["a"]), &names(&["x"]), &[], 1.0).unwrap_err();
        assert!(err.to_string().contains("1 rows named, 0 given"), "{err}");
    }

    #[test]
    fn values_and_ticks_are_short() {
        assert_eq!(short(36272.4), "36272");
        assert_eq!(short(23.71), "23.7");
        assert_eq!(short(1.234), "1.23");
        assert_eq!(short(0.9081), "0.908");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(f64::NAN), "n/a");
        assert_eq!(short(f64::INFINITY), "inf");
        assert_eq!(tick(50.0), "50");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(0.0), "0");
    }
}
