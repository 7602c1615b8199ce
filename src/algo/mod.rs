//! Policy-optimisation algorithms (GRPO, DAPO, Dr. GRPO, GSPO, DGPO): advantages and losses.
//!
//! One code path implements all five (docs/algorithms.md): every difference
//! between them is a key of [`AlgoConfig`], and an algorithm is a named preset of keys
//! ([`presets::PRESETS`]). A training step uses this module in four calls:
//!
//! 1. [`AlgoConfig::resolve`] once per run (preset + `algorithm_config` overrides, validated);
//!    [`AlgoConfig::needs_reference`] says whether to compute LoRA-off log-probs.
//! 2. [`prepare`] on each generation batch's rewards: shaped rewards, which groups dynamic
//!    sampling keeps, advantages. [`Prepared::kept_rows`] gives the rows to train on.
//! 3. [`StepBatch::split`] into `num_minibatches` optimizer-step batches (and again into memory
//!    micro-batches); [`Denominators::new`] on each optimizer-step batch.
//! 4. [`loss()`] on each micro-batch with the step's denominators; `backward` on
//!    [`LossOutput::loss`] accumulates exactly the step-batch gradient. [`loss_rows`] is the
//!    same loss when log-probs were computed only for [`StepBatch::rows_with_gradient`]: the
//!    trainer spends no forward or backward on rows that cannot change the gradient.

mod advantage;
mod autograd;
mod batch;
mod catalog;
mod config;
mod dgpo;
mod loss;
pub mod presets;
mod seed_keys;
mod stats;

pub use advantage::{overlong_penalty, prepare, Prepared};
pub use batch::{Denominators, Row, StepBatch};
pub use catalog::{catalog_json, table};
pub use config::{
    AdvantageNorm, AlgoConfig, BatchShape, DynamicSamplingMetric, ImportanceLevel, KlEstimator,
    LossAgg, ScaleRewards,
};
pub use loss::{loss, loss_rows, Diagnostics, LogProbs, LossOutput};

use std::fmt::Display;

/// The keys of docs/algorithms.md §5 in its order: what `algorithm_config` accepts and errors list.
/// (G and L_max are not among them: they come from the trainer, see [`BatchShape`].)
pub const KEYS: &[&str] = &[
    "scale_rewards",
    "std_eps",
    "advantage_norm",
    "advantage_clip",
    "positive_advantage_scale",
    "negative_advantage_scale",
    "dynamic_sampling",
    "dynamic_sampling_metric",
    "max_resample_rounds",
    "mask_truncated_completions",
    "overlong_cache",
    "overlong_penalty_factor",
    "importance_sampling_level",
    "epsilon",
    "epsilon_high",
    "delta",
    "log_ratio_clamp",
    "beta",
    "kl_estimator",
    "loss_agg",
    "num_iterations",
    "num_minibatches",
    "entropy_coef",
    "use_dpo_loss",
    "dpo_coef",
    "dpo_beta",
    "pairwise_margin",
    "dpo_max_pairs_per_group",
    "dpo_reference_free",
];

/// Everything that can go wrong in this module; messages name the key or input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AlgoError {
    #[error("unknown algorithm `{name}`; valid algorithms: {valid} (see `lean-grpo algorithms`)")]
    UnknownAlgorithm { name: String, valid: String },
    #[error("unknown algorithm_config key `{key}`; valid keys: {valid}")]
    UnknownKey { key: String, valid: String },
    #[error("algorithm_config {what} is not accepted: {advice} (see docs/algorithms.md §6)")]
    Rejected { what: String, advice: String },
    #[error("algorithm_config key `{key}` must be {expected}, got {got}")]
    Invalid {
        key: String,
        expected: String,
        got: String,
    },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl AlgoError {
    pub(crate) fn invalid(key: &str, expected: impl Display, got: impl Display) -> Self {
        Self::Invalid {
            key: key.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub(crate) fn unknown_key(key: &str) -> Self {
        Self::UnknownKey {
            key: key.to_string(),
            valid: KEYS.join(", "),
        }
    }

    pub(crate) fn rejected(key: &str, value: Option<&serde_json::Value>, advice: &str) -> Self {
        let what = match value {
            Some(v) => format!("`{key}: {v}`"),
            None => format!("key `{key}`"),
        };
        Self::Rejected {
            what,
            advice: advice.to_string(),
        }
    }
}
