//! The pass-rate filter: keep the theorems a model solves sometimes, drop those it always or
//! never solves.
//!
//! Why: a group whose G proofs all pass or all fail has equal rewards, so every
//! group-relative advantage in it is zero and the whole group is sampled, checked and trained
//! on for no gradient. Measuring each problem's pass rate once with `eval` and training on the
//! problems in between is the "data filter + RL" stage of the formal-math RL recipes
//! (docs/data.md).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Theorem;

/// The part of an `eval` `results.jsonl` line the filter reads.
#[derive(Deserialize)]
struct Measured {
    name: String,
    accepted: usize,
    samples: Vec<serde_json::Value>,
}

/// The inclusive band of pass rates to keep.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Band {
    pub min: f64,
    pub max: f64,
}

impl Band {
    fn check(&self) -> Result<()> {
        let valid = |v: f64| (0.0..=1.0).contains(&v);
        if !valid(self.min) || !valid(self.max) || self.min > self.max {
            bail!(
                "--min-pass-rate {} and --max-pass-rate {} must lie in 0..=1 with min <= max",
                self.min,
                self.max
            );
        }
        Ok(())
    }
}

/// What the filter did, as written beside the output (`OUT.filter.json`) so that it can be
/// reproduced: the evaluation it read (with that run's configuration: model, adapter,
/// sampling, samples per problem), the band, and the counts.
#[derive(Debug, Clone, Serialize)]
pub struct FilterReport {
    pub theorems: PathBuf,
    pub eval_dir: PathBuf,
    /// The evaluation's `config.yaml`, when it wrote one.
    pub eval_config: Option<serde_json::Value>,
    pub band: Band,
    pub read: usize,
    pub kept: usize,
    pub below: usize,
    pub above: usize,
    /// Records the evaluation did not measure (dropped: their rate is unknown).
    pub not_evaluated: Vec<String>,
    /// Problems per pass-rate bin: exactly 0, ten equal bins of (0, 1), exactly 1.
    pub histogram: Vec<(String, usize)>,
}

/// Keeps the records of `theorems` whose pass rate in `eval_dir/results.jsonl` lies in `band`.
pub fn filter_by_pass_rate(
    theorems: &[Theorem],
    theorems_path: &Path,
    eval_dir: &Path,
    band: Band,
) -> Result<(Vec<Theorem>, FilterReport)> {
    band.check()?;
    let rates = read_rates(&eval_dir.join("results.jsonl"))?;
    let mut kept = Vec::new();
    let (mut below, mut above) = (0, 0);
    let mut not_evaluated = Vec::new();
    let mut measured = Vec::new();
    for theorem in theorems {
        let Some(&rate) = rates.get(&theorem.name) else {
            not_evaluated.push(theorem.name.clone());
            continue;
        };
        measured.push(rate);
        if rate < band.min {
            below += 1;
        } else if rate > band.max {
            above += 1;
        } else {
            kept.push(theorem.clone());
        }
    }
    let report = FilterReport {
        theorems: theorems_path.to_path_buf(),
        eval_dir: eval_dir.to_path_buf(),
        eval_config: eval_config(eval_dir)?,
        band,
        read: theorems.len(),
        kept: kept.len(),
        below,
        above,
        not_evaluated,
        histogram: histogram(&measured),
    };
    Ok((kept, report))
}

/// Pass rate by problem name from an evaluation's per-problem results.
fn read_rates(path: &Path) -> Result<HashMap<String, f64>> {
    let file = File::open(path).with_context(|| {
        format!(
            "cannot read {}: --from must be the output directory of `lean-grpo eval`",
            path.display()
        )
    })?;
    let mut rates = HashMap::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let m: Measured = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an eval result line", path.display(), i + 1))?;
        if m.samples.is_empty() {
            bail!("{}:{}: `{}` has no samples", path.display(), i + 1, m.name);
        }
        rates.insert(m.name, m.accepted as f64 / m.samples.len() as f64);
    }
    Ok(rates)
}

fn eval_config(eval_dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = eval_dir.join("config.yaml");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", path.display()))?;
    Ok(Some(value))
}

/// Counts of `rates` by bin: exactly 0, `(0, 0.1]` … `(0.9, 1)`, exactly 1.
fn histogram(rates: &[f64]) -> Vec<(String, usize)> {
    let mut bins = vec![0usize; 12];
    for &r in rates {
        let bin = if r <= 0.0 {
            0
        } else if r >= 1.0 {
            11
        } else {
            // Rates are k/n: the epsilon keeps 0.3 (3/10 = 0.30000000000000004 × 10) in its bin.
            ((r * 10.0 - 1e-9).ceil() as usize).clamp(1, 10)
        };
        bins[bin] += 1;
    }
    let label = |i: usize| match i {
        0 => "0".to_string(),
        11 => "1".to_string(),
        _ => format!(
            "({:.1}, {:.1}{}",
            (i - 1) as f64 / 10.0,
            i as f64 / 10.0,
            if i == 10 { ")" } else { "]" }
        ),
    };
    bins.into_iter()
        .enumerate()
        .map(|(i, n)| (label(i), n))
        .collect()
}

impl FilterReport {
    /// The summary `lean-grpo filter` prints: counts, then the histogram as bars.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} records read, {} kept (pass rate in [{}, {}]), {} below, {} above, {} not \
             evaluated\n",
            self.read,
            self.kept,
            self.band.min,
            self.band.max,
            self.below,
            self.above,
            self.not_evaluated.len()
        );
        let most = self
            .histogram
            .iter()
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
            .max(1);
        out.push_str("pass rate    problems\n");
        for (label, n) in &self.histogram {
            let bar = "#".repeat((n * 40).div_ceil(most));
            out.push_str(&format!("{label:<12} {n:>5} {bar}\n"));
        }
        if let Some(first) = self.not_evaluated.first() {
            out.push_str(&format!(
                "not evaluated (dropped): {first}{}\n",
                match self.not_evaluated.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_put_the_ends_apart_and_the_middle_in_tenths() {
        let h = histogram(&[0.0, 0.0, 0.05, 0.1, 0.125, 0.5, 0.875, 0.99, 1.0]);
        let count = |label: &str| h.iter().find(|(l, _)| l == label).unwrap().1;
        assert_eq!(count("0"), 2);
        assert_eq!(count("(0.0, 0.1]"), 2);
        assert_eq!(count("(0.1, 0.2]"), 1);
        assert_eq!(count("(0.4, 0.5]"), 1);
        assert_eq!(count("(0.8, 0.9]"), 1);
        assert_eq!(count("(0.9, 1.0)"), 1);
        assert_eq!(count("1"), 1);
        assert_eq!(h.iter().map(|(_, n)| n).sum::<usize>(), 9);
    }

    #[test]
    fn a_band_outside_zero_one_or_upside_down_is_refused() {
        for (min, max) in [(-0.1, 0.5), (0.2, 1.5), (0.8, 0.2)] {
            assert!(Band { min, max }.check().is_err(), "{min}..{max}");
        }
        assert!(Band { min: 0.0, max: 1.0 }.check().is_ok());
    }
}
