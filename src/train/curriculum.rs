//! The mask-ratio curriculum of `train.task: fim` (docs/fim.md): which ratio each step's holes
//! are cut at, and the pass rate seen at each ratio.
//!
//! Its whole state lives in the checkpoint (`trainer_state.json`), so a resumed run cuts the
//! same holes and moves the ratio exactly as the uninterrupted run would have.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::config::{FimOptions, FimSchedule};

/// Ratios are kept to this many decimals, so that they name the same holes (the hole sampler's
/// seed includes the ratio) and the same `pass_rate_by_ratio` key whatever the float path.
const DECIMALS: f64 = 1000.0;

fn round(ratio: f64) -> f64 {
    (ratio * DECIMALS).round() / DECIMALS
}

/// Completions and accepted ones at one ratio.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RatioCount {
    pub completions: usize,
    pub accepted: usize,
}

impl RatioCount {
    pub fn pass_rate(&self) -> f64 {
        self.accepted as f64 / self.completions.max(1) as f64
    }
}

/// Where the curriculum stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curriculum {
    /// The ratio of the next step (adaptive), or of the last one (linear).
    pub ratio: f64,
    /// Pass rates of the last steps at `ratio`, oldest first (adaptive: at most `window`).
    pub recent: Vec<f64>,
    /// Every ratio trained at so far (key: the ratio with three decimals) and its counts.
    pub by_ratio: BTreeMap<String, RatioCount>,
}

/// Checks the `train.fim` section.
pub fn validate(options: &FimOptions) -> Result<()> {
    let in_range = |r: f64| r.is_finite() && r > 0.0 && r <= 1.0;
    if !in_range(options.start_ratio) || !in_range(options.end_ratio) {
        bail!(
            "train.fim.start_ratio and end_ratio must lie in (0, 1] (the hole's share of the \
             proof's tokens; 1 is the whole proof), got {} and {}",
            options.start_ratio,
            options.end_ratio
        );
    }
    if options.schedule == FimSchedule::Adaptive {
        if !(options.ratio_step.is_finite() && options.ratio_step > 0.0) {
            bail!(
                "train.fim.ratio_step must be positive, got {}",
                options.ratio_step
            );
        }
        if options.lower_below >= options.raise_above {
            bail!(
                "train.fim.lower_below ({}) must be below raise_above ({}), or the ratio would \
                 move both ways at once",
                options.lower_below,
                options.raise_above
            );
        }
        if options.window == 0 {
            bail!("train.fim.window must be at least 1 step");
        }
    }
    Ok(())
}

impl Curriculum {
    pub fn start(options: &FimOptions) -> Curriculum {
        Curriculum {
            ratio: round(options.start_ratio),
            recent: Vec::new(),
            by_ratio: BTreeMap::new(),
        }
    }

    /// The ratio of step `step` (0-based) of `total` steps.
    pub fn ratio_at(&self, options: &FimOptions, step: usize, total: usize) -> f64 {
        match options.schedule {
            FimSchedule::Adaptive => self.ratio,
            FimSchedule::Linear => {
                let progress = if total > 1 {
                    step.min(total - 1) as f64 / (total - 1) as f64
                } else {
                    1.0
                };
                let (a, b) = (options.start_ratio, options.end_ratio);
                round(a + (b - a) * progress)
            }
        }
    }

    /// Records a step at `ratio` and, when adaptive, moves the ratio: up by `ratio_step` (to at
    /// most `end_ratio`) when the mean pass rate of the last `window` steps at this ratio is
    /// above `raise_above`, down (to at least `start_ratio`) when it is below `lower_below`.
    /// A move starts a new window.
    pub fn record(
        &mut self,
        options: &FimOptions,
        ratio: f64,
        accepted: usize,
        completions: usize,
    ) {
        let count = self.by_ratio.entry(format!("{ratio:.3}")).or_default();
        count.accepted += accepted;
        count.completions += completions;
        self.ratio = ratio;
        if options.schedule != FimSchedule::Adaptive {
            return;
        }
        self.recent
            .push(accepted as f64 / completions.max(1) as f64);
        if self.recent.len() > options.window {
            self.recent.remove(0);
        }
        if self.recent.len() < options.window {
            return;
        }
        let rolling = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        let (low, high) = (
            options.start_ratio.min(options.end_ratio),
            options.start_ratio.max(options.end_ratio),
        );
        let next = if rolling > options.raise_above {
            round((ratio + options.ratio_step).min(high))
        } else if rolling < options.lower_below {
            round((ratio - options.ratio_step).max(low))
        } else {
            ratio
        };
        if next != ratio {
            self.ratio = next;
            self.recent.clear();
        }
    }

    /// Pass rate per ratio trained at, for `metrics.jsonl`.
    pub fn pass_rates(&self) -> BTreeMap<String, f64> {
        self.by_ratio
            .iter()
            .map(|(k, c)| (k.clone(), c.pass_rate()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive() -> FimOptions {
        FimOptions {
            schedule: FimSchedule::Adaptive,
            window: 2,
            ..FimOptions::default()
        }
    }

    #[test]
    fn linear_goes_from_start_to_end() {
        let o = FimOptions::default();
        let c = Curriculum::start(&o);
        assert_eq!(c.ratio_at(&o, 0, 5), 0.2);
        assert_eq!(c.ratio_at(&o, 2, 5), 0.6);
        assert_eq!(c.ratio_at(&o, 4, 5), 1.0);
        assert_eq!(c.ratio_at(&o, 9, 5), 1.0);
    }

    #[test]
    fn adaptive_raises_after_a_full_window_and_lowers_on_failure() {
        let o = adaptive();
        let mut c = Curriculum::start(&o);
        c.record(&o, 0.2, 8, 8);
        assert_eq!(c.ratio, 0.2, "no move before the window is full");
        c.record(&o, 0.2, 6, 8);
        assert_eq!(c.ratio, 0.3);
        assert!(c.recent.is_empty());
        c.record(&o, 0.3, 0, 8);
        c.record(&o, 0.3, 0, 8);
        assert_eq!(c.ratio, 0.2);
        c.record(&o, 0.2, 0, 8);
        c.record(&o, 0.2, 0, 8);
        assert_eq!(c.ratio, 0.2, "never below start_ratio");
        c.record(&o, 0.2, 2, 8);
        c.record(&o, 0.2, 2, 8);
        assert_eq!(c.ratio, 0.2, "between the thresholds it stays");
        assert_eq!(c.by_ratio["0.200"].completions, 48);
        assert_eq!(c.pass_rates()["0.300"], 0.0);
    }

    #[test]
    fn bad_sections_are_refused() {
        let mut o = adaptive();
        o.lower_below = 0.9;
        assert!(validate(&o).is_err());
        let o = FimOptions {
            end_ratio: 1.5,
            ..FimOptions::default()
        };
        assert!(validate(&o).is_err());
        assert!(validate(&FimOptions::default()).is_ok());
    }
}
