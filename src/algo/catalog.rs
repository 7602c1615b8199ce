//! What `lean-grpo algorithms` shows: the presets resolved into full configurations, as a
//! table and as JSON. Every column that describes behaviour is derived from the resolved
//! configuration, so the catalog cannot drift from the code.

use serde_json::{json, Map, Value};

use super::config::{
    AdvantageNorm, AlgoConfig, BatchShape, DynamicSamplingMetric, ImportanceLevel, ScaleRewards,
};
use super::presets::{Preset, PresetValue, PRESETS};

/// L_max used to show concrete numbers in the catalog (the trainer's default).
const CATALOG_MAX_COMPLETION_LENGTH: usize = 512;
const CATALOG_GROUP_SIZE: usize = 8;

fn resolved(p: &Preset) -> AlgoConfig {
    // Presets are static and valid; a failure here is a bug in this file, caught by the tests.
    AlgoConfig::resolve(
        p.name,
        &Map::new(),
        BatchShape {
            group_size: CATALOG_GROUP_SIZE,
            max_completion_length: CATALOG_MAX_COMPLETION_LENGTH,
        },
    )
    .unwrap_or_else(|e| panic!("built-in preset `{}` is invalid: {e}", p.name))
}

fn advantage_text(c: &AlgoConfig) -> String {
    let base = match (c.advantage_norm, c.scale_rewards) {
        (AdvantageNorm::Rank, _) => "group rank in [-1, 1]",
        (AdvantageNorm::Zscore, ScaleRewards::Group) => "group z-score",
        (AdvantageNorm::Zscore, ScaleRewards::Batch) => "(r - group mean) / batch std",
        (AdvantageNorm::Zscore, ScaleRewards::None) => "r - group mean",
    };
    match (c.dynamic_sampling, c.dynamic_sampling_metric) {
        (false, _) => base.to_string(),
        (true, DynamicSamplingMetric::Reward) => {
            format!("{base}, groups with equal task rewards dropped")
        }
        (true, DynamicSamplingMetric::ShapedReward) => {
            format!("{base}, groups with equal shaped rewards dropped")
        }
    }
}

fn ratio_text(c: &AlgoConfig) -> &'static str {
    match c.importance_sampling_level {
        ImportanceLevel::Token => "per token",
        ImportanceLevel::Sequence => "per sequence (geometric mean)",
    }
}

fn clip_text(c: &AlgoConfig) -> String {
    let mut s = format!("{} / {}", c.epsilon, c.epsilon_high());
    if let Some(d) = c.delta {
        s.push_str(&format!(", delta {d}"));
    }
    s
}

fn overrides_text(p: &Preset) -> String {
    if p.overrides.is_empty() {
        return "-".into();
    }
    let items: Vec<String> = p
        .overrides
        .iter()
        .map(|(k, v)| format!("{k} {}", v.describe()))
        .collect();
    items.join(", ")
}

/// The `lean-grpo algorithms` table: one row per algorithm, cells wrapped to fit ~120 columns.
pub fn table() -> String {
    let header = [
        "name",
        "what it is",
        "advantage",
        "ratio",
        "clip lo/hi",
        "reduction",
        "differs from grpo",
        "best for",
    ];
    let widths = [9, 17, 15, 13, 10, 12, 20, 17];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    rows.push(widths.iter().map(|w| "-".repeat(*w)).collect());
    for p in PRESETS {
        let c = resolved(p);
        let name = match p.aliases {
            [] => p.name.to_string(),
            aliases => format!("{} ({})", p.name, aliases.join(", ")),
        };
        rows.push(vec![
            name,
            p.title.to_string(),
            advantage_text(&c),
            ratio_text(&c).to_string(),
            clip_text(&c),
            c.loss_agg.to_string(),
            overrides_text(p),
            p.best_for.to_string(),
        ]);
    }
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        // A blank line between algorithms keeps wrapped cells readable.
        if r > 2 {
            out.push('\n');
        }
        let cells: Vec<Vec<String>> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| wrap(cell, w))
            .collect();
        let height = cells.iter().map(Vec::len).max().unwrap_or(1);
        for line in 0..height {
            let parts: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{:<w$}", c.get(line).map_or("", String::as_str)))
                .collect();
            out.push_str(parts.join(" ").trim_end());
            out.push('\n');
        }
    }
    out.push_str(
        "\nEvery column is a key of algorithm_config; `--algo-config` overrides any of them.\n\
         max_completion_length is L_max; `lean-grpo algorithms --json` gives the full presets.\n",
    );
    out
}

/// Greedy word wrap to `width` columns; a word longer than the width is split (`seq_mean_...`
/// names are split at underscores first).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        for piece in split_long(word, width) {
            let len = line.chars().count();
            let plen = piece.chars().count();
            if len > 0 && len + 1 + plen > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() && !line.ends_with('_') {
                line.push(' ');
            }
            line.push_str(&piece);
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// Splits a word wider than `width` after underscores where possible, else anywhere.
fn split_long(word: &str, width: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest: Vec<char> = word.chars().collect();
    while rest.len() > width {
        let cut = rest[..width]
            .iter()
            .rposition(|c| *c == '_')
            .map_or(width, |i| i + 1);
        pieces.push(rest.drain(..cut).collect());
    }
    pieces.push(rest.into_iter().collect());
    pieces
}

/// `lean-grpo algorithms --json`: every preset with its description, its overrides of the base
/// defaults, and its fully resolved configuration for L_max = 512, G = 8.
pub fn catalog_json() -> Value {
    let algorithms: Vec<Value> = PRESETS
        .iter()
        .map(|p| {
            let c = resolved(p);
            let overrides: Map<String, Value> = p
                .overrides
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        PresetValue::FifthOfMaxCompletionLength => {
                            Value::from("floor(max_completion_length / 5)")
                        }
                        other => other.to_json(0),
                    };
                    (k.to_string(), value)
                })
                .collect();
            json!({
                "name": p.name,
                "aliases": p.aliases,
                "title": p.title,
                "description": p.description,
                "best_for": p.best_for,
                "advantage": advantage_text(&c),
                "ratio": ratio_text(&c),
                "clip": { "epsilon": c.epsilon, "epsilon_high": c.epsilon_high(), "delta": c.delta },
                "loss_agg": c.loss_agg,
                "overrides": overrides,
                "resolved": c,
            })
        })
        .collect();
    json!({
        "resolved_for": {
            "group_size": CATALOG_GROUP_SIZE,
            "max_completion_length": CATALOG_MAX_COMPLETION_LENGTH,
        },
        "algorithms": algorithms,
    })
}
