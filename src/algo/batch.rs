//! Optimizer-step batches of whole groups, their split into minibatches and micro-batches, and the
//! step-batch denominators every micro-batch loss divides by (docs/algorithms.md §2, §3.7).

use std::ops::Range;

use serde::Serialize;

use super::config::AlgoConfig;
use super::stats::is_zero_variance;
use super::AlgoError;

/// Per-completion facts the loss needs besides log-probs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Position in the generation batch (to gather this row's tokens and log-probs).
    pub index: usize,
    pub shaped_reward: f64,
    pub advantage: f32,
    /// False for a row of a group dropped by dynamic sampling: it counts nowhere.
    pub kept: bool,
    /// Generated tokens, first EOS included; the completion mask is `t < length`.
    pub length: usize,
    pub truncated: bool,
}

impl Row {
    /// Loss tokens |o_i|: the length, or 0 when dropped or a masked truncated completion.
    pub fn loss_len(&self, cfg: &AlgoConfig) -> usize {
        if !self.kept || (self.truncated && cfg.mask_truncated_completions) {
            0
        } else {
            self.length
        }
    }
}

/// A batch of whole groups (rows of one group contiguous, in order). Built by
/// [`super::Prepared::kept_rows`] and split with [`StepBatch::split`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepBatch {
    pub group_size: usize,
    pub rows: Vec<Row>,
}

impl StepBatch {
    /// Ordered pairs (winner, loser) of row positions in this batch, group by group: kept rows with
    /// loss tokens, reward gap above `pairwise_margin`; with `dpo_max_pairs_per_group` = K > 0 only
    /// the K largest gaps per group, ties in (w, l) order. Zero-variance groups give none.
    pub fn dpo_pairs(&self, cfg: &AlgoConfig) -> Vec<(usize, usize)> {
        let batch = self;
        let g = cfg.group_size.max(1);
        let mut out = Vec::new();
        for start in (0..batch.len()).step_by(g) {
            let end = (start + g).min(batch.len());
            let rewards: Vec<f64> = batch.rows[start..end]
                .iter()
                .map(|r| r.shaped_reward)
                .collect();
            if is_zero_variance(&rewards) {
                continue;
            }
            let eligible = |i: usize| batch.rows[i].kept && batch.loss_len(cfg, i) > 0;
            let mut group: Vec<(f64, usize, usize)> = Vec::new();
            for w in (start..end).filter(|&i| eligible(i)) {
                for l in (start..end).filter(|&i| eligible(i)) {
                    let gap = batch.rows[w].shaped_reward - batch.rows[l].shaped_reward;
                    if gap > cfg.pairwise_margin {
                        group.push((gap, w, l));
                    }
                }
            }
            if cfg.dpo_max_pairs_per_group > 0 {
                // Stable sort by decreasing gap keeps (w, l) order among equal gaps.
                group.sort_by(|a, b| b.0.total_cmp(&a.0));
                group.truncate(cfg.dpo_max_pairs_per_group);
            }
            out.extend(group.into_iter().map(|(_, w, l)| (w, l)));
        }
        out
    }

    /// Number of completions (kept or not).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.rows.len() / self.group_size.max(1)
    }

    /// The groups in `groups`, as a batch of their own.
    pub fn slice_groups(&self, groups: Range<usize>) -> StepBatch {
        let g = self.group_size;
        let end = (groups.end * g).min(self.rows.len());
        let start = (groups.start * g).min(end);
        StepBatch {
            group_size: g,
            rows: self.rows[start..end].to_vec(),
        }
    }

    /// Splits into `parts` consecutive batches of whole groups, as even as possible (earlier
    /// parts get the extra group). Never more parts than groups: this is how both
    /// `num_minibatches` and memory micro-batches are formed.
    pub fn split(&self, parts: usize) -> Vec<StepBatch> {
        let groups = self.groups();
        let parts = parts.clamp(1, groups.max(1));
        let (per, extra) = (groups / parts, groups % parts);
        let mut start = 0;
        (0..parts)
            .map(|p| {
                let n = per + usize::from(p < extra);
                let part = self.slice_groups(start..start + n);
                start += n;
                part
            })
            .collect()
    }

    /// Loss tokens of row `i` ([`Row::loss_len`]).
    pub(crate) fn loss_len(&self, cfg: &AlgoConfig, i: usize) -> usize {
        self.rows[i].loss_len(cfg)
    }

    /// Positions of the rows whose log-probs can change the gradient of this batch's loss
    /// (docs/algorithms.md §3.9), in order. A row is left out when it has no loss token (it adds 0
    /// to every sum), or when its advantage is exactly 0 while nothing else reads its log-probs:
    /// β = 0 (no KL term), `entropy_coef` = 0 and no DGPO pair uses it. Its surrogate is then
    /// −min(ρ·0, clip(ρ)·0) = 0 whatever ρ, with zero derivative. The trainer runs no forward
    /// or backward for the rows left out; the denominators stay those of the whole step batch.
    pub fn rows_with_gradient(&self, cfg: &AlgoConfig) -> Vec<usize> {
        let mut paired = vec![false; self.len()];
        if cfg.dpo_enabled() {
            for (w, l) in self.dpo_pairs(cfg) {
                paired[w] = true;
                paired[l] = true;
            }
        }
        let read_anyway = cfg.beta != 0.0 || cfg.entropy_coef != 0.0;
        (0..self.len())
            .filter(|&i| {
                self.loss_len(cfg, i) > 0
                    && (self.rows[i].advantage != 0.0 || read_anyway || paired[i])
            })
            .collect()
    }

    /// Checks the batch is whole groups, as every per-group computation assumes.
    pub(crate) fn check_groups(&self, cfg: &AlgoConfig) -> Result<(), AlgoError> {
        let g = self.group_size;
        if g != cfg.group_size || g == 0 || self.rows.len() % g != 0 {
            return Err(AlgoError::Batch(format!(
                "a step batch of {} rows with group_size {g} is not whole groups of the \
                 configured group_size {}; split batches with StepBatch::split",
                self.rows.len(),
                cfg.group_size
            )));
        }
        Ok(())
    }
}

/// The normalisers of docs/algorithms.md §3.7 over a whole optimizer-step batch. Compute them once
/// with [`Denominators::new`] and pass them to every micro-batch loss, so the micro-batch losses
/// (and gradients) sum to those of the step batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Denominators {
    /// B: kept completions (rows masked for truncation included).
    pub sequences: usize,
    /// Σ M over the step batch.
    pub loss_tokens: usize,
    /// DGPO pairs of the step batch (0 when the pairwise term is off).
    pub pairs: usize,
    /// L_max, Dr. GRPO's constant.
    pub max_completion_length: usize,
}

impl Denominators {
    pub fn new(cfg: &AlgoConfig, step: &StepBatch) -> Result<Self, AlgoError> {
        step.check_groups(cfg)?;
        let pairs = if cfg.dpo_enabled() {
            step.dpo_pairs(cfg).len()
        } else {
            0
        };
        Ok(Self {
            sequences: step.rows.iter().filter(|r| r.kept).count(),
            loss_tokens: (0..step.len()).map(|i| step.loss_len(cfg, i)).sum(),
            pairs,
            max_completion_length: cfg.max_completion_length,
        })
    }

    /// True when the step has nothing to learn from (no sequences or no loss tokens): the loss
    /// is 0 and the optimizer step must be skipped, since AdamW would still decay and move.
    pub fn is_empty(&self) -> bool {
        self.sequences == 0 || self.loss_tokens == 0
    }
}
