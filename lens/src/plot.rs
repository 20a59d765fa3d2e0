//! Figures for papers, drawn with plotters into PNG or SVG (chosen by the file extension):
//! a prediction trajectory (layers x tokens, top-1 token in each cell), trajectories of one
//! prompt at several checkpoints side by side, a layer x checkpoint heatmap and per-layer
//! curves with one line per checkpoint. Every figure has a title naming model, revision and
//! lens, axis titles, tick labels and a colour bar with the statistic's unit.
//!
//! Text is drawn with DejaVu Sans, compiled in (`lens/fonts/`, Bitstream Vera licence next
//! to it), so figures look the same on every machine and need no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::trajectory::{PredictionTrajectory, Statistic};
use crate::{Error, Result};

/// DejaVu Sans (Bitstream Vera licence: `lens/fonts/DejaVuSans-LICENSE.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// The font family every figure uses.
const FONT: &str = "sans-serif";

/// Registers the bundled font under `sans-serif` (once per process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType file compiled into the binary.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS);
    });
}

/// Maps values to colours and describes the mapping for a colour bar.
#[derive(Debug, Clone, PartialEq)]
pub struct ColourScale {
    /// Lowest value (the bottom of the bar).
    pub min: f64,
    /// Highest value.
    pub max: f64,
    /// Log-10 spacing (positive values only).
    pub log: bool,
    /// Blue-white-red around zero (differences) instead of viridis.
    pub diverging: bool,
    /// The bar's title, with the unit.
    pub label: String,
}

impl ColourScale {
    /// A scale covering `values` (undefined cells ignored) for `statistic`; `diverging` makes
    /// it symmetric around zero (differences between lenses or checkpoints).
    pub fn fit<'a>(
        values: impl IntoIterator<Item = &'a Option<f64>>,
        statistic: Statistic,
        diverging: bool,
    ) -> Self {
        let finite: Vec<f64> = values
            .into_iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if finite.is_empty() {
            (0.0, 1.0)
        } else {
            (lo, hi)
        };
        let log = statistic.log_scale() && !diverging;
        let (min, max) = if diverging {
            let m = lo.abs().max(hi.abs()).max(1e-12);
            (-m, m)
        } else if log {
            (1.0, hi.max(10.0))
        } else if statistic == Statistic::MaxProbability {
            (0.0, 1.0)
        } else if (hi - lo).abs() < 1e-12 {
            (lo.min(0.0), hi.max(lo + 1.0))
        } else {
            (lo.min(0.0), hi)
        };
        let label = if diverging {
            format!("difference in {}", statistic.label())
        } else {
            statistic.label().to_string()
        };
        ColourScale {
            min,
            max,
            log,
            diverging,
            label,
        }
    }

    /// Where `value` sits on the bar, 0 (bottom) to 1 (top), clamped.
    pub fn position(&self, value: f64) -> f64 {
        let (v, lo, hi) = if self.log {
            (
                value.max(self.min).log10(),
                self.min.log10(),
                self.max.log10(),
            )
        } else {
            (value, self.min, self.max)
        };
        ((v - lo) / (hi - lo).max(1e-300)).clamp(0.0, 1.0)
    }

    /// The colour of a value.
    pub fn colour(&self, value: f64) -> RGBColor {
        self.colour_at(self.position(value))
    }

    fn colour_at(&self, t: f64) -> RGBColor {
        if self.diverging {
            // RdBu reversed: blue (negative), white (zero), red (positive).
            let stops = [
                (5.0, 48.0, 97.0),
                (67.0, 147.0, 195.0),
                (247.0, 247.0, 247.0),
                (214.0, 96.0, 77.0),
                (103.0, 0.0, 31.0),
            ];
            interpolate(&stops, t)
        } else {
            ViridisRGB::get_color(t as f32)
        }
    }

    /// Tick values for the bar: powers of ten on a log scale, else 1-2-5 steps.
    pub fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.min.log10().ceil() as i32,
                self.max.log10().floor() as i32,
            );
            return (a..=b).map(|e| 10f64.powi(e)).collect();
        }
        let span = self.max - self.min;
        let raw = span / 5.0;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * magnitude)
            .find(|s| span / s <= 6.0)
            .unwrap_or(10.0 * magnitude);
        let first = (self.min / step).ceil() as i64;
        let last = (self.max / step).floor() as i64;
        (first..=last).map(|k| k as f64 * step).collect()
    }
}

fn interpolate(stops: &[(f64, f64, f64)], t: f64) -> RGBColor {
    let x = t.clamp(0.0, 1.0) * (stops.len() - 1) as f64;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A tick label: integers plainly, else up to 3 significant digits without trailing zeros.
fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if (v - v.round()).abs() < 1e-9 && v.abs() < 1e6 {
        return format!("{}", v.round() as i64);
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let text = format!("{v:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// Black or white, whichever reads better on `background`.
fn text_colour(background: &RGBColor) -> RGBColor {
    let luminance =
        0.299 * background.0 as f64 + 0.587 * background.1 as f64 + 0.114 * background.2 as f64;
    if luminance > 140.0 {
        BLACK
    } else {
        WHITE
    }
}

/// A heatmap panel: rows bottom to top, one colour per cell, optional text per cell.
#[derive(Debug, Clone)]
pub struct Heatmap {
    /// Panel title.
    pub title: String,
    /// Column labels, left to right.
    pub x_labels: Vec<String>,
    /// Row labels, bottom to top.
    pub y_labels: Vec<String>,
    /// Horizontal axis title.
    pub x_title: String,
    /// Vertical axis title.
    pub y_title: String,
    /// `values[row][column]`, rows bottom to top (`None`: undefined, drawn grey).
    pub values: Vec<Vec<Option<f64>>>,
    /// Text written in each cell, same layout as `values`.
    pub cell_text: Option<Vec<Vec<String>>>,
}

/// Sizes of text and margins, in pixels.
const TITLE_SIZE: f64 = 30.0;
const AXIS_TITLE_SIZE: f64 = 24.0;
const TICK_SIZE: f64 = 20.0;
const BAR_WIDTH: u32 = 200;

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn font(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::Name(FONT), size, FontStyle::Normal)
}

/// Shortens a label to `max` characters with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

fn text_width<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, text: &str, size: f64) -> u32 {
    area.estimate_text_size(text, &font(size).into_text_style(area))
        .map_or(0, |(w, _)| w)
}

/// Draws `heatmap` into `area` with colours from `scale`.
fn draw_heatmap<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    heatmap: &Heatmap,
    scale: &ColourScale,
) -> DrawResult<DB> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let rows = heatmap.values.len().max(1) as i32;
    let cols = heatmap.values.first().map_or(1, Vec::len).max(1) as i32;
    let black = &BLACK;
    // Title.
    let title_height = 56;
    let mut title_size = TITLE_SIZE;
    while text_width(area, &heatmap.title, title_size) as i32 > w - 20 && title_size > 14.0 {
        title_size -= 1.0;
    }
    area.draw(&Text::new(
        heatmap.title.clone(),
        (w / 2, 14),
        font(title_size)
            .color(black)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    // Margins from the labels.
    let y_label_width = heatmap
        .y_labels
        .iter()
        .map(|l| text_width(area, l, TICK_SIZE))
        .max()
        .unwrap_or(0) as i32;
    let left = 16 + AXIS_TITLE_SIZE as i32 + 12 + y_label_width + 10;
    let x_labels: Vec<String> = heatmap.x_labels.iter().map(|l| shorten(l, 12)).collect();
    let widest_x = x_labels
        .iter()
        .map(|l| text_width(area, l, TICK_SIZE))
        .max()
        .unwrap_or(0) as i32;
    let right = 20;
    let plot_w = (w - left - right).max(10);
    let cell_w = plot_w / cols;
    let rotate = widest_x + 8 > cell_w;
    let x_label_height = if rotate { widest_x } else { TICK_SIZE as i32 };
    let bottom = 10 + x_label_height + 12 + AXIS_TITLE_SIZE as i32 + 14;
    let plot_h = (h - title_height - bottom).max(10);
    let cell_h = plot_h / rows;
    let (x0, y0) = (left, title_height);
    let (x1, y1) = (x0 + cell_w * cols, y0 + cell_h * rows);
    // Cells.
    let text_size = (cell_h as f64 * 0.5).clamp(9.0, 18.0);
    for (r, row) in heatmap.values.iter().enumerate() {
        let top = y1 - (r as i32 + 1) * cell_h;
        for (c, value) in row.iter().enumerate() {
            let left = x0 + c as i32 * cell_w;
            let fill = match value {
                Some(v) if v.is_finite() => scale.colour(*v),
                _ => RGBColor(200, 200, 200),
            };
            area.draw(&Rectangle::new(
                [(left, top), (left + cell_w, top + cell_h)],
                fill.filled(),
            ))?;
            if let Some(text) = heatmap.cell_text.as_ref().and_then(|t| t.get(r)?.get(c)) {
                let mut size = text_size;
                let mut shown = shorten(text, 8);
                while text_width(area, &shown, size) as i32 > cell_w - 4 && size > 9.0 {
                    size -= 1.0;
                }
                while text_width(area, &shown, size) as i32 > cell_w - 4
                    && shown.chars().count() > 2
                {
                    shown = shorten(&shown, shown.chars().count() - 1);
                }
                area.draw(&Text::new(
                    shown,
                    (left + cell_w / 2, top + cell_h / 2),
                    font(size)
                        .color(&text_colour(&fill))
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ))?;
            }
        }
    }
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], black.stroke_width(1)))?;
    // Row labels, thinned when rows are too short for every label.
    let every = ((TICK_SIZE as i32 + 4) / cell_h.max(1) + 1).max(1) as usize;
    for (r, label) in heatmap.y_labels.iter().enumerate() {
        if r % every != 0 && r + 1 != heatmap.y_labels.len() {
            continue;
        }
        let y = y1 - r as i32 * cell_h - cell_h / 2;
        area.draw(&Text::new(
            label.clone(),
            (x0 - 8, y),
            font(TICK_SIZE)
                .color(black)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    // Column labels, vertical when they do not fit side by side.
    let every = if rotate {
        ((TICK_SIZE as i32 + 4) / cell_w.max(1) + 1).max(1) as usize
    } else {
        1
    };
    for (c, label) in x_labels.iter().enumerate() {
        if c % every != 0 {
            continue;
        }
        let x = x0 + c as i32 * cell_w + cell_w / 2;
        let style = if rotate {
            font(TICK_SIZE)
                .transform(FontTransform::Rotate270)
                .color(black)
                .pos(Pos::new(HPos::Right, VPos::Center))
        } else {
            font(TICK_SIZE)
                .color(black)
                .pos(Pos::new(HPos::Center, VPos::Top))
        };
        area.draw(&Text::new(label.clone(), (x, y1 + 8), style))?;
    }
    // Axis titles.
    area.draw(&Text::new(
        heatmap.x_title.clone(),
        ((x0 + x1) / 2, y1 + 10 + x_label_height + 12),
        font(AXIS_TITLE_SIZE)
            .color(black)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    area.draw(&Text::new(
        heatmap.y_title.clone(),
        (16, (y0 + y1) / 2),
        font(AXIS_TITLE_SIZE)
            .transform(FontTransform::Rotate270)
            .color(black)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    Ok(())
}

/// Draws a vertical colour bar for `scale` into `area`, aligned with a plot spanning
/// `top..bottom` pixels.
fn draw_colour_bar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    scale: &ColourScale,
    top: i32,
    bottom: i32,
) -> DrawResult<DB> {
    let (x0, x1) = (10, 40);
    let steps = (bottom - top).max(1);
    for i in 0..steps {
        let t = 1.0 - i as f64 / steps as f64;
        area.draw(&Rectangle::new(
            [(x0, top + i), (x1, top + i + 1)],
            scale.colour_at(t).filled(),
        ))?;
    }
    area.draw(&Rectangle::new(
        [(x0, top), (x1, bottom)],
        BLACK.stroke_width(1),
    ))?;
    for tick in scale.ticks() {
        let y = bottom - (scale.position(tick) * (bottom - top) as f64).round() as i32;
        area.draw(&PathElement::new(vec![(x1, y), (x1 + 6, y)], BLACK))?;
        area.draw(&Text::new(
            format_tick(tick),
            (x1 + 10, y),
            font(TICK_SIZE)
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    let widest = scale
        .ticks()
        .iter()
        .map(|t| text_width(area, &format_tick(*t), TICK_SIZE))
        .max()
        .unwrap_or(0) as i32;
    let mut label_size = AXIS_TITLE_SIZE;
    while text_width(area, &scale.label, label_size) as i32 > bottom - top + 40 && label_size > 12.0
    {
        label_size -= 1.0;
    }
    area.draw(&Text::new(
        scale.label.clone(),
        (x1 + 10 + widest + 14, (top + bottom) / 2),
        font(label_size)
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    Ok(())
}

/// The plot area's top and bottom in a heatmap panel of height `h` (for the colour bar).
fn plot_span<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, heatmap: &Heatmap) -> (i32, i32) {
    // Mirrors the layout of `draw_heatmap`.
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let rows = heatmap.values.len().max(1) as i32;
    let cols = heatmap.values.first().map_or(1, Vec::len).max(1) as i32;
    let y_label_width = heatmap
        .y_labels
        .iter()
        .map(|l| text_width(area, l, TICK_SIZE))
        .max()
        .unwrap_or(0) as i32;
    let left = 16 + AXIS_TITLE_SIZE as i32 + 12 + y_label_width + 10;
    let widest_x = heatmap
        .x_labels
        .iter()
        .map(|l| text_width(area, &shorten(l, 12), TICK_SIZE))
        .max()
        .unwrap_or(0) as i32;
    let cell_w = (w - left - 20).max(10) / cols;
    let x_label_height = if widest_x + 8 > cell_w {
        widest_x
    } else {
        TICK_SIZE as i32
    };
    let bottom = 10 + x_label_height + 12 + AXIS_TITLE_SIZE as i32 + 14;
    let plot_h = (h - 56 - bottom).max(10);
    let cell_h = plot_h / rows;
    (56, 56 + cell_h * rows)
}

/// Heatmap panels in a grid of `cols` columns (row by row) sharing one colour scale, with a
/// figure title above them and the colour bar on the right.
fn draw_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: Option<&str>,
    panels: &[Heatmap],
    cols: usize,
    scale: &ColourScale,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (w, _) = root.dim_in_pixel();
    let body = match title {
        Some(title) => {
            let (head, body) = root.split_vertically(60);
            head.draw(&Text::new(
                title.to_string(),
                (w as i32 / 2, 14),
                font(TITLE_SIZE + 2.0)
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
            body
        }
        None => root.clone(),
    };
    let (plots, bar) = body.split_horizontally(w.saturating_sub(BAR_WIDTH));
    let cols = cols.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let areas = plots.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(panels) {
        draw_heatmap(area, panel, scale)?;
    }
    if let (Some(first), Some(last)) = (areas.first(), areas.get(panels.len().saturating_sub(1))) {
        let origin = body.get_base_pixel().1;
        let top = plot_span(first, &panels[0]).0 + first.get_base_pixel().1 - origin;
        let bottom =
            plot_span(last, &panels[panels.len() - 1]).1 + last.get_base_pixel().1 - origin;
        draw_colour_bar(&bar, scale, top, bottom)?;
    }
    root.present()
}

/// Renders with the backend the extension of `path` asks for (`.png` or `.svg`) in memory,
/// then writes the file atomically; evaluates to the size.
macro_rules! render {
    ($path:expr, $size:expr, |$root:ident| $draw:expr) => {{
        let path: &Path = $path;
        register_font();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let fail = |e: String| Error::Lens(format!("drawing {}: {e}", path.display()));
        let folder = hooks::atomic::folder_of(path);
        std::fs::create_dir_all(folder).map_err(|e| hooks::Error::io(folder, e))?;
        match ext.as_str() {
            "svg" => {
                let mut svg = String::new();
                {
                    let $root = SVGBackend::with_string(&mut svg, $size).into_drawing_area();
                    $draw.map_err(|e| fail(e.to_string()))?;
                }
                hooks::atomic::write(path, svg.as_bytes())?;
            }
            "png" => {
                let (width, height) = $size;
                let mut pixels = vec![0u8; width as usize * height as usize * 3];
                {
                    let $root = BitMapBackend::with_buffer(&mut pixels, $size).into_drawing_area();
                    $draw.map_err(|e| fail(e.to_string()))?;
                }
                hooks::atomic::write_with(path, |w| {
                    use image::ImageEncoder;
                    image::codecs::png::PngEncoder::new(w)
                        .write_image(&pixels, width, height, image::ColorType::Rgb8)
                        .map_err(std::io::Error::other)
                })?;
            }
            other => {
                return Err(Error::Lens(format!(
                    "{}: unknown figure format '{other}' (use .png or .svg)",
                    path.display()
                )))
            }
        }
        Ok($size)
    }};
}

/// What a trajectory figure shows: one lens's statistic, or the difference of two.
#[derive(Debug, Clone, Copy)]
pub enum TrajectoryView<'a> {
    /// One trajectory's statistic.
    Single(&'a PredictionTrajectory),
    /// `first − second` of the statistic (cell text: the first's top-1 token).
    Difference(&'a PredictionTrajectory, &'a PredictionTrajectory),
}

impl TrajectoryView<'_> {
    fn first(&self) -> &PredictionTrajectory {
        match self {
            TrajectoryView::Single(t) | TrajectoryView::Difference(t, _) => t,
        }
    }

    fn values(&self, statistic: Statistic) -> Result<Vec<Vec<Option<f64>>>> {
        match self {
            TrajectoryView::Single(t) => Ok(t.values(statistic)),
            TrajectoryView::Difference(a, b) => a.difference(b, statistic),
        }
    }

    fn description(&self) -> String {
        match self {
            TrajectoryView::Single(t) => t.description(),
            TrajectoryView::Difference(a, b) => {
                format!("{} minus {}", a.description(), b.lens_or_revision(a))
            }
        }
    }

    fn heatmap(&self, statistic: Statistic, title: String) -> Result<Heatmap> {
        let t = self.first();
        Ok(Heatmap {
            title,
            x_labels: t.tokens.clone(),
            y_labels: layer_labels(&t.layers),
            x_title: "input token".into(),
            y_title: "layer".into(),
            values: self.values(statistic)?,
            cell_text: Some(
                t.cells
                    .iter()
                    .map(|row| row.iter().map(|c| c.top_token().to_string()).collect())
                    .collect(),
            ),
        })
    }
}

impl PredictionTrajectory {
    /// How `other` differs from this one in a title: its lens, or its revision.
    fn lens_or_revision(&self, other: &PredictionTrajectory) -> String {
        if self.lens != other.lens {
            self.lens.clone()
        } else {
            self.description()
        }
    }
}

/// `0` -> `0 (embed)`, others unchanged.
fn layer_labels(layers: &[String]) -> Vec<String> {
    layers
        .iter()
        .map(|l| {
            if l == "0" {
                "0 (embed)".to_string()
            } else {
                l.clone()
            }
        })
        .collect()
}

/// Most tokens a trajectory figure shows: 92 pixels each, a panel is already about 47,000
/// pixels wide (a 20,000-token text would have asked for a 4 GB bitmap).
pub const MAX_PLOTTED_TOKENS: usize = 512;

/// Refuses a text of more than [`MAX_PLOTTED_TOKENS`] tokens for a trajectory figure.
pub fn check_plottable(tokens: usize) -> Result<()> {
    if tokens > MAX_PLOTTED_TOKENS {
        return Err(Error::Lens(format!(
            "a trajectory figure shows at most {MAX_PLOTTED_TOKENS} tokens, this text has \
             {tokens}: plot a shorter text"
        )));
    }
    Ok(())
}

/// Pixel size of a trajectory panel for `tokens` x `rows` cells.
fn panel_size(tokens: usize, rows: usize) -> Result<(u32, u32)> {
    check_plottable(tokens)?;
    let width = 260 + 92 * tokens as u32;
    let cell_h = if rows > 20 { 30 } else { 44 };
    let height = 56 + cell_h * rows as u32 + 190;
    Ok((width.max(640), height.max(420)))
}

/// Writes the trajectory figure for `statistic` to `path` (`.png` or `.svg`); returns its
/// size in pixels (92 per token plus margins).
pub fn plot_trajectory(
    path: &Path,
    view: TrajectoryView,
    statistic: Statistic,
) -> Result<(u32, u32)> {
    let values = view.values(statistic)?;
    let diverging = matches!(view, TrajectoryView::Difference(..));
    let scale = ColourScale::fit(values.iter().flatten(), statistic, diverging);
    let t = view.first();
    let title = format!("{}: {}", view.description(), statistic.label());
    let panel = view.heatmap(statistic, title)?;
    let (w, h) = panel_size(t.tokens.len(), t.layers.len())?;
    render!(path, (w + BAR_WIDTH, h), |root| draw_panels(
        &root,
        None,
        std::slice::from_ref(&panel),
        1,
        &scale
    ))
}

/// Writes trajectories of one prompt (one per checkpoint, same tokens) side by side (in rows
/// of as many as fit in about 2400 pixels) with a shared colour scale; returns the size in pixels.
pub fn plot_trajectories(
    path: &Path,
    title: &str,
    trajectories: &[(String, PredictionTrajectory)],
    statistic: Statistic,
) -> Result<(u32, u32)> {
    let Some((_, first)) = trajectories.first() else {
        return Err(Error::Lens("no trajectories to plot".into()));
    };
    if let Some((name, _)) = trajectories
        .iter()
        .find(|(_, t)| t.input_ids != first.input_ids || t.layers != first.layers)
    {
        return Err(Error::Lens(format!(
            "trajectory '{name}' has other tokens or layers than the first; side-by-side panels need the same prompt and model shape"
        )));
    }
    let panels = trajectories
        .iter()
        .map(|(name, t)| TrajectoryView::Single(t).heatmap(statistic, name.clone()))
        .collect::<Result<Vec<_>>>()?;
    let scale = ColourScale::fit(
        panels.iter().flat_map(|p| p.values.iter().flatten()),
        statistic,
        false,
    );
    let (w, h) = panel_size(first.tokens.len(), first.layers.len())?;
    // As many columns as fit in about 2400 pixels; one panel per row for long prompts.
    let cols = ((2400 / w) as usize).clamp(1, panels.len());
    let rows = panels.len().div_ceil(cols) as u32;
    let size = (w * cols as u32 + BAR_WIDTH, h * rows + 60);
    render!(path, size, |root| draw_panels(
        &root,
        Some(title),
        &panels,
        cols,
        &scale
    ))
}

/// One statistic per layer (rows, bottom to top, last = output) and checkpoint (columns).
#[derive(Debug, Clone)]
pub struct CheckpointGrid {
    /// Title (model and lens).
    pub title: String,
    /// Checkpoint names, in training order.
    pub checkpoints: Vec<String>,
    /// Layer labels, bottom to top.
    pub layers: Vec<String>,
    /// `values[layer][checkpoint]`.
    pub values: Vec<Vec<Option<f64>>>,
    /// The statistic and its unit.
    pub label: String,
}

/// Writes a layer x checkpoint heatmap of `grid` (the value written in each cell); returns
/// the size in pixels.
pub fn plot_checkpoint_heatmap(
    path: &Path,
    grid: &CheckpointGrid,
    statistic: Statistic,
) -> Result<(u32, u32)> {
    let mut scale = ColourScale::fit(grid.values.iter().flatten(), statistic, false);
    scale.label = grid.label.clone();
    let panel = Heatmap {
        title: grid.title.clone(),
        x_labels: grid.checkpoints.clone(),
        y_labels: layer_labels(&grid.layers),
        x_title: "checkpoint (training step)".into(),
        y_title: "layer".into(),
        values: grid.values.clone(),
        cell_text: Some(
            grid.values
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|v| v.map_or(String::new(), format_cell))
                        .collect()
                })
                .collect(),
        ),
    };
    let (w, h) = (
        (300 + 100 * grid.checkpoints.len() as u32).max(900),
        (300 + 40 * grid.layers.len() as u32).max(600),
    );
    render!(path, (w + BAR_WIDTH, h), |root| draw_panels(
        &root,
        None,
        std::slice::from_ref(&panel),
        1,
        &scale
    ))
}

fn format_cell(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes per-layer curves of `grid`: the statistic against layer, one line per checkpoint
/// (coloured from early = dark to late = light); returns the size in pixels.
pub fn plot_layer_curves(path: &Path, grid: &CheckpointGrid) -> Result<(u32, u32)> {
    let values: Vec<f64> = grid
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() {
        return Err(Error::Lens("no values to plot".into()));
    }
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(0.0);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let hi = if hi > lo { hi * 1.05 } else { lo + 1.0 };
    let size = (1500u32, 950u32);
    render!(path, size, |root| draw_curves(&root, grid, lo, hi))
}

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    grid: &CheckpointGrid,
    lo: f64,
    hi: f64,
) -> DrawResult<DB> {
    // "0 (embed)" only where there is room for it beside the next tick.
    let layers = if grid.layers.len() <= 16 {
        layer_labels(&grid.layers)
    } else {
        grid.layers.clone()
    };
    let n = grid.checkpoints.len();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(&grid.title, font(TITLE_SIZE))
        .margin(20)
        .x_label_area_size(90)
        .y_label_area_size(100)
        .build_cartesian_2d(-0.3f64..(layers.len() as f64 - 0.7), lo..hi)
        .map_err(plain)?;
    chart
        .configure_mesh()
        .x_labels(layers.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            layers.get(i as usize).cloned().unwrap_or_default()
        })
        .y_label_formatter(&|y| format_tick(*y))
        .x_desc("layer (the residual entering that block; 0 = embedding, last = model output)")
        .y_desc(grid.label.as_str())
        .axis_desc_style(font(AXIS_TITLE_SIZE))
        .label_style(font(TICK_SIZE))
        .light_line_style(WHITE)
        .draw()
        .map_err(plain)?;
    for (c, name) in grid.checkpoints.iter().enumerate() {
        let t = if n > 1 {
            c as f64 / (n - 1) as f64
        } else {
            0.0
        };
        let colour = ViridisRGB::get_color((0.9 * t) as f32);
        let points: Vec<(f64, f64)> = grid
            .values
            .iter()
            .enumerate()
            .filter_map(|(l, row)| Some((l as f64, (*row.get(c)?)?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))
            .map_err(plain)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 30, y)], colour.stroke_width(4))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(plain)?;
    }
    chart
        .configure_series_labels()
        .position(emptiest_corner(grid, lo, hi))
        .label_font(font(TICK_SIZE))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plain)?;
    root.present()
}

/// The legend corner with the fewest data points near it (left or right 40%, lower or
/// upper half).
fn emptiest_corner(grid: &CheckpointGrid, lo: f64, hi: f64) -> SeriesLabelPosition {
    let last = grid.layers.len().saturating_sub(1).max(1) as f64;
    let points: Vec<(f64, f64)> = grid
        .values
        .iter()
        .enumerate()
        .flat_map(|(l, row)| {
            row.iter()
                .flatten()
                .map(move |v| (l as f64 / last, (v - lo) / (hi - lo)))
        })
        .collect();
    let count = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|&&(x, y)| (if right { x >= 0.6 } else { x <= 0.4 }) && (upper == (y >= 0.5)))
            .count()
    };
    [
        (count(true, true), SeriesLabelPosition::UpperRight),
        (count(false, false), SeriesLabelPosition::LowerLeft),
        (count(true, false), SeriesLabelPosition::LowerRight),
        (count(false, true), SeriesLabelPosition::UpperLeft),
    ]
    .into_iter()
    .min_by_key(|(n, _)| *n)
    .map_or(SeriesLabelPosition::UpperRight, |(_, p)| p)
}

/// Chart errors carry the backend's error type already; this is the identity that lets `?`
/// name the type.
fn plain<E: std::error::Error + Send + Sync>(
    e: DrawingAreaErrorKind<E>,
) -> DrawingAreaErrorKind<E> {
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_ticks() {
        let values = [Some(0.5), None, Some(3.7)];
        let s = ColourScale::fit(values.iter(), Statistic::Entropy, false);
        assert_eq!((s.min, s.max), (0.0, 3.7));
        assert_eq!(s.ticks(), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.position(3.7), 1.0);
        let d = ColourScale::fit([Some(-0.2), Some(1.0)].iter(), Statistic::ForwardKl, true);
        assert_eq!((d.min, d.max), (-1.0, 1.0));
        assert_eq!(d.colour(0.0), RGBColor(247, 247, 247));
        let r = ColourScale::fit([Some(1.0), Some(3000.0)].iter(), Statistic::Rank, false);
        assert!(r.log);
        assert_eq!(r.ticks(), vec![1.0, 10.0, 100.0, 1000.0]);
        assert!((r.position(10f64.powf(3000f64.log10() / 2.0)) - 0.5).abs() < 1e-9);
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(0.8), "0.8");
        assert_eq!(format_tick(12.0), "12");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
    }

    #[test]
    fn long_texts_are_refused_before_their_bitmap() {
        assert_eq!(
            panel_size(512, 4).unwrap(),
            (260 + 92 * 512, 56 + 44 * 4 + 190)
        );
        let err = panel_size(20_000, 4).unwrap_err().to_string();
        assert!(
            err.contains("at most 512 tokens, this text has 20000"),
            "{err}"
        );
    }
}
