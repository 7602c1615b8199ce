//! One line of `metrics.jsonl` per step, and one line of `samples.jsonl` per completion.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lean::Evidence;

/// What a step measured. Timings (`*_seconds`, `tokens_per_second`) vary between runs; every
/// other field is reproduced exactly by `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    /// Who sampled this step's proofs: `policy` (on-policy) or `endpoint` (a server that does
    /// not see the adapters: off-policy, and the rewards measure the served model).
    pub sampler: String,
    /// Mean and std of the raw rewards of every completion sampled this step.
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Fraction of completions Lean accepted.
    pub pass_rate: f64,
    pub completions: usize,
    /// Verdict kind → count.
    pub verdicts: BTreeMap<String, usize>,
    /// Fraction of groups whose shaped rewards were all equal.
    pub zero_variance_fraction: f64,
    /// Groups dropped by dynamic sampling, and the extra sampling rounds it took.
    pub groups_dropped: usize,
    /// Of the dropped groups, those whose task rewards (before overlong shaping) were all
    /// equal: all proofs failed, or all passed.
    #[serde(default)]
    pub groups_dropped_flat_reward: usize,
    /// Groups trained on in which Lean accepted no proof: their only signal is partial credit
    /// or length (none under DAPO's default filter with binary rewards).
    #[serde(default)]
    pub kept_groups_none_accepted: usize,
    pub resample_rounds: usize,
    /// False when nothing was left to learn from (no optimizer step).
    pub optimizer_step: bool,
    pub loss: f64,
    pub pg_loss: f64,
    pub kl: Option<f64>,
    pub dpo_loss: Option<f64>,
    pub clip_low_frac: f64,
    pub clip_high_frac: f64,
    pub ratio_mean: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub completion_length_mean: f64,
    pub completion_length_max: usize,
    pub sampling_seconds: f64,
    pub checking_seconds: f64,
    pub training_seconds: f64,
    pub tokens_per_second: f64,
}

/// One completion as users read it: their model's proof, what Lean said, what it earned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRecord {
    pub step: usize,
    pub theorem: String,
    pub index: usize,
    pub completion: String,
    /// The proof that was checked (extracted from the completion).
    pub proof: Option<String>,
    pub tokens: usize,
    pub truncated: bool,
    pub reward: f64,
    pub verdict: String,
    pub accepted: bool,
    pub evidence: Evidence,
    pub seconds: f64,
}
