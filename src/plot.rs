//! Training curves as a PNG, read from a run's `metrics.jsonl`: reward mean and pass rate per
//! step, and beside them what shows a policy collapsing before the reward does: mean completion
//! length, share of replies with no proof, sampled-token entropy and KL to the base model.
//! A fill-in-the-middle run (`train.task: fim`, docs/fim.md) gets a fourth row: its mask ratio
//! per step and the pass rate at each ratio it trained at.
//!
//! A PNG is what a researcher pastes into a report or opens over ssh without a notebook.
//! Drawing is done by `plotters` into an in-memory RGB buffer, which the `png` crate encodes;
//! this keeps plotters' `image`-based encoder (and its JPEG/GIF/BMP codecs) out of the build.
//!
//! Axis labels need a font, and neither CI machines nor cluster nodes are guaranteed to have any
//! installed, so plotters' `ab_glyph` text backend draws with DejaVu Sans embedded in the binary
//! by the `dejavu` crate (the DejaVu fonts' Bitstream Vera licence allows embedding and
//! redistribution). Plotters' `ttf` backend, which looks fonts up on the system, would fail at
//! run time on exactly those machines.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::Path;

/// The file a training run writes one line per step to.
pub const METRICS_FILE: &str = "metrics.jsonl";

const WIDTH: u32 = 1400;
/// Height of one row of two panels.
const ROW_HEIGHT: u32 = 400;
const REWARD_COLOR: RGBColor = RGBColor(31, 119, 180);
const PASS_COLOR: RGBColor = RGBColor(214, 39, 40);
const DIAGNOSTIC_COLOR: RGBColor = RGBColor(44, 160, 44);
/// Above this many steps markers would merge into a smear; the line alone is clearer.
const MAX_STEPS_WITH_MARKERS: usize = 200;

/// The part of one `metrics.jsonl` line the plot uses; other keys are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepMetrics {
    pub step: u64,
    /// `None` where the run logged `null` (serde_json writes NaN as `null`): a gap in the curve.
    pub reward_mean: Option<f64>,
    /// Fraction of samples accepted, in `[0, 1]`; `None` for `null`.
    pub pass_rate: Option<f64>,
    /// The collapse diagnostics; `None` where the line lacks them (runs logged before they
    /// existed) or logged `null`.
    pub completion_length_mean: Option<f64>,
    pub share_no_proof: Option<f64>,
    pub sampled_entropy: Option<f64>,
    pub kl_to_start: Option<f64>,
    /// `train.task: fim`: the mask ratio the step's holes were cut at; `None` otherwise.
    pub mask_ratio: Option<f64>,
}

/// Reads `metrics.jsonl`: one JSON object per line with at least `step`, `reward_mean` and
/// `pass_rate`. Blank lines are skipped. A step logged twice (a resumed run repeats the steps
/// after its checkpoint) keeps its last line. The result is sorted by step.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading training metrics {}", path.display()))?;
    let mut by_step = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let metrics = parse_line(line)
            .with_context(|| format!("{}:{}: malformed metrics line", path.display(), i + 1))?;
        by_step.insert(metrics.step, metrics);
    }
    if by_step.is_empty() {
        bail!(
            "{} has no training steps yet: nothing to plot (the run writes a line after each step)",
            path.display()
        );
    }
    Ok(by_step.into_values().collect())
}

fn parse_line(line: &str) -> Result<StepMetrics> {
    let value: serde_json::Value = serde_json::from_str(line).context("not valid JSON")?;
    let object = value
        .as_object()
        .ok_or_else(|| anyhow!("expected a JSON object, found {value}"))?;
    let field = |name: &str| {
        object
            .get(name)
            .ok_or_else(|| anyhow!("missing field `{name}`"))
    };
    let step = field("step")?;
    let step = step
        .as_u64()
        .ok_or_else(|| anyhow!("`step` must be a non-negative integer, found {step}"))?;
    let number = |name: &str| -> Result<Option<f64>> {
        match field(name)? {
            serde_json::Value::Null => Ok(None),
            v => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("`{name}` must be a number or null, found {v}")),
        }
    };
    let optional = |name: &str| match object.get(name) {
        None => Ok(None),
        Some(_) => number(name),
    };
    Ok(StepMetrics {
        step,
        reward_mean: number("reward_mean")?,
        pass_rate: number("pass_rate")?,
        completion_length_mean: optional("completion_length_mean")?,
        share_no_proof: optional("share_no_proof")?,
        sampled_entropy: optional("sampled_entropy")?,
        kl_to_start: optional("kl_to_start")?,
        mask_ratio: optional("mask_ratio")?,
    })
}

/// Draws `run_dir/metrics.jsonl` as a PNG at `out_png`: reward mean and pass rate (top row),
/// then the collapse diagnostics, against the training step, and for a FIM run its curriculum.
pub fn plot_run(run_dir: &Path, out_png: &Path) -> Result<()> {
    let metrics = read_metrics(&run_dir.join(METRICS_FILE))?;
    plot_metrics(&metrics, &run_dir.display().to_string(), out_png)
}

/// Draws already-read metrics under `title`.
pub fn plot_metrics(metrics: &[StepMetrics], title: &str, out_png: &Path) -> Result<()> {
    // Plotters keeps ab_glyph fonts in its own process-wide table, looked up by family name;
    // every label here asks for "sans-serif". Registering the same bytes again is harmless.
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded DejaVu Sans font failed to load"))?;
    let fim = metrics.iter().any(|m| m.mask_ratio.is_some());
    let height = ROW_HEIGHT * if fim { 4 } else { 3 };
    let mut pixels = vec![0u8; WIDTH as usize * height as usize * 3];
    draw(metrics, title, height, &mut pixels).context("drawing the training curves")?;
    write_png(out_png, height, &pixels).with_context(|| format!("writing {}", out_png.display()))
}

fn draw(metrics: &[StepMetrics], title: &str, height: u32, pixels: &mut [u8]) -> Result<()> {
    let root = BitMapBackend::with_buffer(pixels, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 28))?;
    let panels = root.split_evenly(((height / ROW_HEIGHT) as usize, 2));
    let steps = step_range(metrics);
    let rewards = segments(metrics, |m| m.reward_mean);
    let reward_range = value_range(rewards.iter().flatten().map(|p| p.1));
    // Fractions get a fixed 0-100% axis: runs compare at a glance.
    let percent = |v: &f64| format!("{:.0}%", 100.0 * v);
    let decimals = decimals_for(reward_range.end - reward_range.start);
    let reward_label = move |v: &f64| fixed(*v, decimals);
    Panel {
        name: "reward mean",
        values: reward_range,
        y_format: &reward_label,
        color: REWARD_COLOR,
    }
    .draw(&panels[0], steps.clone(), &rewards)?;
    let fractions: [(&str, Series, RGBColor); 2] = [
        ("pass rate", |m| m.pass_rate, PASS_COLOR),
        (
            "share of replies with no proof",
            |m| m.share_no_proof,
            DIAGNOSTIC_COLOR,
        ),
    ];
    for (area, (name, value, color)) in [&panels[1], &panels[2]].into_iter().zip(fractions) {
        let series = segments(metrics, value);
        let panel = Panel {
            name,
            values: 0.0..1.0,
            y_format: &percent,
            color,
        };
        panel.draw(area, steps.clone(), &series)?;
    }
    let scaled: [(&str, Series); 3] = [
        ("mean completion length (tokens)", |m| {
            m.completion_length_mean
        }),
        ("sampled-token entropy (nats)", |m| m.sampled_entropy),
        ("KL to the base model (kl_to_start)", |m| m.kl_to_start),
    ];
    for (area, (name, value)) in panels[3..6].iter().zip(scaled) {
        let series = segments(metrics, value);
        let range = value_range(series.iter().flatten().map(|p| p.1));
        let decimals = decimals_for(range.end - range.start);
        let label = move |v: &f64| fixed(*v, decimals);
        let panel = Panel {
            name,
            values: range,
            y_format: &label,
            color: DIAGNOSTIC_COLOR,
        };
        panel.draw(area, steps.clone(), &series)?;
    }
    if let [ratio_area, by_ratio_area] = &panels[6..] {
        Panel {
            name: "FIM mask ratio",
            values: 0.0..1.0,
            y_format: &percent,
            color: DIAGNOSTIC_COLOR,
        }
        .draw(ratio_area, steps, &segments(metrics, |m| m.mask_ratio))?;
        draw_pass_rate_by_ratio(by_ratio_area, metrics)?;
    }
    root.present()?;
    Ok(())
}

/// Pass rate against mask ratio: the mean of the steps' pass rates at each ratio trained at,
/// so a curriculum's difficulty curve reads off one chart.
fn draw_pass_rate_by_ratio<DB>(area: &DrawingArea<DB, Shift>, metrics: &[StepMetrics]) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    // Keyed by the ratio in thousandths, as `pass_rate_by_ratio` in metrics.jsonl is.
    let mut by_ratio: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for m in metrics {
        if let (Some(ratio), Some(pass)) = (m.mask_ratio, m.pass_rate) {
            let entry = by_ratio.entry((ratio * 1000.0).round() as u64).or_default();
            entry.0 += pass;
            entry.1 += 1;
        }
    }
    let points: Vec<(f64, f64)> = by_ratio
        .into_iter()
        .map(|(key, (sum, n))| (key as f64 / 1000.0, sum / n as f64))
        .collect();
    let percent = |v: &f64| format!("{:.0}%", 100.0 * v);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(
            "pass rate by mask ratio (mean over steps)",
            ("sans-serif", 22),
        )
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("mask ratio")
        .y_desc("pass rate")
        .x_label_formatter(&percent)
        .y_label_formatter(&percent)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        PASS_COLOR.stroke_width(2),
    ))?;
    chart.draw_series(
        points
            .iter()
            .map(|&p| Circle::new(p, 4, PASS_COLOR.filled())),
    )?;
    Ok(())
}

/// Reads one plotted value of a step.
type Series = fn(&StepMetrics) -> Option<f64>;

/// One chart: a named series against the step.
struct Panel<'a> {
    name: &'a str,
    values: Range<f64>,
    y_format: &'a dyn Fn(&f64) -> String,
    color: RGBColor,
}

impl Panel<'_> {
    fn draw<DB>(
        &self,
        area: &DrawingArea<DB, Shift>,
        steps: Range<u64>,
        segments: &[Vec<(u64, f64)>],
    ) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .caption(self.name, ("sans-serif", 22))
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(steps, self.values.clone())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(self.name)
            .y_label_formatter(self.y_format)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .draw()?;
        for segment in segments {
            chart.draw_series(LineSeries::new(
                segment.iter().copied(),
                self.color.stroke_width(2),
            ))?;
        }
        let points = segments.iter().map(Vec::len).sum::<usize>();
        if points <= MAX_STEPS_WITH_MARKERS {
            let markers = segments
                .iter()
                .flatten()
                .map(|&p| Circle::new(p, 3, self.color.filled()));
            chart.draw_series(markers)?;
        }
        Ok(())
    }
}

/// The `(step, value)` points of one series, broken into runs at steps logged as `null`, so a
/// missing value shows as a gap rather than a line bridging it.
fn segments(
    metrics: &[StepMetrics],
    value: impl Fn(&StepMetrics) -> Option<f64>,
) -> Vec<Vec<(u64, f64)>> {
    let mut segments = Vec::new();
    let mut current = Vec::new();
    for m in metrics {
        match value(m) {
            Some(v) => current.push((m.step, v)),
            None if !current.is_empty() => segments.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

fn step_range(metrics: &[StepMetrics]) -> Range<u64> {
    let first = metrics.first().map_or(0, |m| m.step);
    let last = metrics.last().map_or(0, |m| m.step);
    first..last.max(first + 1)
}

/// The data's range with 5% headroom; a flat or empty series gets a unit-wide window.
fn value_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    if hi - lo < 1e-9 {
        return lo - 0.5..hi + 0.5;
    }
    let pad = 0.05 * (hi - lo);
    lo - pad..hi + pad
}

/// Decimals that tell apart ticks about a tenth of `span` apart.
fn decimals_for(span: f64) -> usize {
    (1.0 - span.log10().floor()).clamp(0.0, 6.0) as usize
}

/// `v` with `decimals` places, never as `-0.0`.
fn fixed(v: f64, decimals: usize) -> String {
    let text = format!("{v:.decimals$}");
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => text,
    }
}

fn write_png(path: &Path, height: u32, pixels: &[u8]) -> Result<()> {
    let file = File::create(path)?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(())
}
