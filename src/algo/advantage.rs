//! From rewards to advantages (docs/algorithms.md §3.1–§3.3): overlong shaping, dynamic sampling
//! and group-relative advantages. All statistics are computed in f64 from f64 rewards.

use serde::Serialize;

use super::batch::{Row, StepBatch};
use super::config::{AdvantageNorm, AlgoConfig, DynamicSamplingMetric, ScaleRewards};
use super::stats::{is_zero_variance, mean, ranks, sample_std};
use super::AlgoError;

/// A generation batch after §3.1–§3.3: what the training loop needs before any forward pass.
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    pub group_size: usize,
    /// r'_i = r_i + overlong penalty.
    pub shaped_rewards: Vec<f64>,
    /// False for rows of groups dropped by dynamic sampling.
    pub kept: Vec<bool>,
    /// Final advantages (after clip and sign scales); 0 for dropped rows and zero-variance groups.
    pub advantages: Vec<f32>,
    pub lengths: Vec<usize>,
    pub truncated: Vec<bool>,
    /// Groups whose shaped rewards are all equal (dropped or not).
    pub zero_variance_groups: usize,
    /// Per group: its task rewards (before shaping) are all equal, e.g. every proof failed.
    pub flat_task_reward: Vec<bool>,
}

impl Prepared {
    /// Number of groups (prompts) in the generation batch.
    pub fn groups(&self) -> usize {
        self.shaped_rewards.len() / self.group_size.max(1)
    }

    /// Fraction of zero-variance groups, logged every step (docs/algorithms.md §3.2); 0 if empty.
    pub fn zero_variance_fraction(&self) -> f64 {
        match self.groups() {
            0 => 0.0,
            n => self.zero_variance_groups as f64 / n as f64,
        }
    }

    /// Groups dropped by dynamic sampling whose task rewards were all equal: under the default
    /// `dynamic_sampling_metric: reward`, every dropped group.
    pub fn dropped_flat_task_reward(&self) -> usize {
        self.flat_task_reward
            .iter()
            .enumerate()
            .filter(|&(g, flat)| *flat && !self.kept[g * self.group_size])
            .count()
    }

    /// Indices of the groups that stay in the batch. With dynamic sampling the loop refills
    /// from fresh prompts when this is short, then calls [`prepare`] again on all kept groups
    /// (so batch-level statistics see the final batch).
    pub fn kept_groups(&self) -> Vec<usize> {
        (0..self.groups())
            .filter(|g| self.kept[g * self.group_size])
            .collect()
    }

    /// Every row, dropped ones included (they have zero loss mask and count nowhere).
    pub fn all_rows(&self) -> StepBatch {
        self.batch(|_| true)
    }

    /// Only the kept rows, in order; `Row::index` points back into this generation batch.
    pub fn kept_rows(&self) -> StepBatch {
        self.batch(|i| self.kept[i])
    }

    fn batch(&self, take: impl Fn(usize) -> bool) -> StepBatch {
        let rows = (0..self.shaped_rewards.len())
            .filter(|&i| take(i))
            .map(|i| Row {
                index: i,
                shaped_reward: self.shaped_rewards[i],
                advantage: self.advantages[i],
                kept: self.kept[i],
                length: self.lengths[i],
                truncated: self.truncated[i],
            })
            .collect();
        StepBatch {
            group_size: self.group_size,
            rows,
        }
    }
}

/// Shapes rewards, decides which groups to keep and computes advantages for one generation
/// batch of `rewards.len()` completions in groups of `cfg.group_size` (contiguous).
///
/// `lengths` count generated tokens including the first EOS; `truncated` marks completions that
/// hit `max_completion_length` without EOS. Errors on mismatched lengths, a batch that is not a
/// whole number of groups, or a non-finite reward (a bug upstream, never silently zeroed).
pub fn prepare(
    cfg: &AlgoConfig,
    rewards: &[f64],
    lengths: &[usize],
    truncated: &[bool],
) -> Result<Prepared, AlgoError> {
    let b = rewards.len();
    let g = cfg.group_size;
    if lengths.len() != b || truncated.len() != b {
        return Err(AlgoError::Batch(format!(
            "{b} rewards but {} lengths and {} truncation flags; give one of each per completion",
            lengths.len(),
            truncated.len()
        )));
    }
    if g == 0 || b % g != 0 {
        return Err(AlgoError::Batch(format!(
            "batch of {b} completions is not a multiple of group_size {g}; completions of one \
             prompt must be contiguous and complete"
        )));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(AlgoError::Batch(format!(
            "reward of completion {i} (group {}) is {}; rewards must be finite, this is a bug in \
             the reward function",
            i / g,
            rewards[i]
        )));
    }

    let shaped: Vec<f64> = rewards
        .iter()
        .zip(lengths)
        .map(|(r, &len)| r + overlong_penalty(cfg, len))
        .collect();
    let zero_var: Vec<bool> = shaped.chunks(g).map(is_zero_variance).collect();
    let flat_task_reward: Vec<bool> = rewards.chunks(g).map(is_zero_variance).collect();
    let no_spread = match cfg.dynamic_sampling_metric {
        DynamicSamplingMetric::Reward => &flat_task_reward,
        DynamicSamplingMetric::ShapedReward => &zero_var,
    };
    let kept: Vec<bool> = (0..b)
        .map(|i| !(cfg.dynamic_sampling && no_spread[i / g]))
        .collect();
    let advantages = advantages(cfg, &shaped, &kept, &zero_var);
    Ok(Prepared {
        group_size: g,
        shaped_rewards: shaped,
        kept,
        advantages,
        lengths: lengths.to_vec(),
        truncated: truncated.to_vec(),
        zero_variance_groups: zero_var.iter().filter(|z| **z).count(),
        flat_task_reward,
    })
}

/// DAPO's soft overlong punishment (docs/algorithms.md §3.1); 0 when `overlong_cache` is 0.
pub fn overlong_penalty(cfg: &AlgoConfig, len: usize) -> f64 {
    let c = cfg.overlong_cache;
    let l = cfg.max_completion_length;
    let f = cfg.overlong_penalty_factor;
    if c == 0 || len + c <= l {
        0.0
    } else if len <= l {
        f * ((l - c) as f64 - len as f64) / c as f64
    } else {
        -f
    }
}

/// Advantages of docs/algorithms.md §3.3 for kept rows (0 for dropped and zero-variance groups).
fn advantages(cfg: &AlgoConfig, shaped: &[f64], kept: &[bool], zero_var: &[bool]) -> Vec<f32> {
    let g = cfg.group_size;
    let kept_rewards: Vec<f64> = shaped
        .iter()
        .zip(kept)
        .filter(|(_, k)| **k)
        .map(|(r, _)| *r)
        .collect();
    let batch_std = sample_std(&kept_rewards);

    let mut out = vec![0f32; shaped.len()];
    for (gi, group) in shaped.chunks(g).enumerate() {
        if zero_var[gi] || !kept[gi * g] {
            continue;
        }
        let raw: Vec<f64> = match cfg.advantage_norm {
            AdvantageNorm::Rank => ranks(group)
                .iter()
                .map(|r| 2.0 * r / (g - 1) as f64 - 1.0)
                .collect(),
            AdvantageNorm::Zscore => {
                let mu = mean(group);
                let scale = match cfg.scale_rewards {
                    ScaleRewards::Group => sample_std(group) + cfg.std_eps,
                    ScaleRewards::Batch => batch_std + cfg.std_eps,
                    ScaleRewards::None => 1.0,
                };
                group.iter().map(|r| (r - mu) / scale).collect()
            }
        };
        for (j, a) in raw.into_iter().enumerate() {
            out[gi * g + j] = post_process(cfg, a) as f32;
        }
    }
    out
}

/// Optional clip, then sign-dependent scaling (docs/algorithms.md §3.3, in that order).
fn post_process(cfg: &AlgoConfig, mut a: f64) -> f64 {
    if let Some(c) = cfg.advantage_clip {
        a = a.clamp(-c, c);
    }
    if a > 0.0 {
        a * cfg.positive_advantage_scale
    } else if a < 0.0 {
        a * cfg.negative_advantage_scale
    } else {
        a
    }
}
