//! The seed project's (lzumot/lean_grpo) config keys and where they went (docs/algorithms.md §6).
//!
//! Users migrating a seed config get one of three outcomes per key: it maps onto a key of §5
//! (possibly with a value translation), it is accepted and has no effect, or it is rejected with
//! a message naming what to use instead. Nothing is silently ignored that could change training.

use serde_json::Value;

use super::{AlgoError, KEYS};

/// What happens to a seed key.
enum Seed {
    /// Renamed: the value is read as the value of this §5 key.
    Alias(&'static str),
    /// Accepted for compatibility; it changes nothing here.
    NoEffect,
    /// Not accepted; the text says why and what to use instead.
    Rejected(&'static str),
}

const NO_CRITIC: &str = "there is no critic (outcome reward, no value function), so a discount \
     or value loss has nothing to act on";
const NO_RUNNING_STATS: &str = "cross-step running statistics, bonuses and critics replace the \
     group baseline that defines these methods; for sparse success use `dynamic_sampling: true` \
     (DAPO's answer)";
const NOT_GSPO: &str = "the seed's group-synchronisation knobs describe a different method than \
     GSPO (docs/algorithms.md §7); the nearest principled relative of `consensus` is `scale_rewards: batch`";
const NO_REWARD_EDIT: &str =
    "rewards are not rescaled or filtered inside the algorithm; shape them \
     in the reward config, and use `std_eps` for the std floor";

/// Every key that is not itself a §5 key: the seed project's, and the batch shape's (which the
/// trainer sets).
const SEED_KEYS: &[(&str, Seed)] = &[
    (
        "group_size",
        Seed::Rejected(
            "the group size is the trainer's: set `train.num_generations` (--num-generations)",
        ),
    ),
    (
        "max_completion_length",
        Seed::Rejected(
            "the completion length is the sampler's: set `sampling.max_completion_length` \
             (--max-completion-length)",
        ),
    ),
    ("reduce_loss", Seed::Alias("loss_agg")),
    ("is_level", Seed::Alias("importance_sampling_level")),
    ("max_negative_advantage_is_weight", Seed::Alias("delta")),
    ("negative_adv_max_is", Seed::Alias("delta")),
    ("negative_adv_scale", Seed::Alias("negative_advantage_scale")),
    ("clip_high", Seed::Alias("epsilon_high")),
    ("clip_low", Seed::Alias("epsilon")),
    ("min_group_std", Seed::Alias("std_eps")),
    ("advantage_norm_method", Seed::Alias("advantage_norm")),
    ("advantage_normalization_method", Seed::Alias("advantage_norm")),
    ("use_unbiased_kl", Seed::NoEffect),
    ("use_asymmetric_clip", Seed::NoEffect),
    ("max_grad_norm", Seed::Rejected("`max_grad_norm` is a trainer option: set `train.max_grad_norm`")),
    ("learning_rate", Seed::Rejected("`learning_rate` is a trainer option: set `train.learning_rate`")),
    ("gamma", Seed::Rejected(NO_CRITIC)),
    ("use_value_function", Seed::Rejected(NO_CRITIC)),
    ("value_loss_coef", Seed::Rejected(NO_CRITIC)),
    (
        "use_importance_sampling",
        Seed::Rejected("importance ratios are intrinsic to the clipped surrogate and always on"),
    ),
    (
        "truncated_is",
        Seed::Rejected(
            "there is no sampler/trainer mismatch to correct: log-probs come from the trained model",
        ),
    ),
    (
        "ratio_clip_high",
        Seed::Rejected(
            "use `epsilon_high` (the upper clip is 1 + epsilon_high; the seed turned \
             ratio_clip_high 1.5 into a bound of 2.5)",
        ),
    ),
    (
        "ratio_clip_low",
        Seed::Rejected("use `epsilon` (the lower clip is 1 − epsilon)"),
    ),
    (
        "use_asymmetric_loss",
        Seed::Rejected(
            "use `positive_advantage_scale` / `negative_advantage_scale` (and `epsilon_high` for \
             clip-higher)",
        ),
    ),
    ("use_population_norm", Seed::Rejected(NO_RUNNING_STATS)),
    ("population_size", Seed::Rejected(NO_RUNNING_STATS)),
    ("advantage_ema_decay", Seed::Rejected(NO_RUNNING_STATS)),
    ("sparse_reward_threshold", Seed::Rejected(NO_RUNNING_STATS)),
    ("sparse_reward_bonus", Seed::Rejected(NO_RUNNING_STATS)),
    ("use_reward_shaping", Seed::Rejected(NO_RUNNING_STATS)),
    ("shaping_coef", Seed::Rejected(NO_RUNNING_STATS)),
    ("advantage_lr", Seed::Rejected(NO_RUNNING_STATS)),
    ("policy_lr_multiplier", Seed::Rejected(NO_RUNNING_STATS)),
    ("use_critic", Seed::Rejected(NO_RUNNING_STATS)),
    ("critic_coef", Seed::Rejected(NO_RUNNING_STATS)),
    (
        "winsorize_quantile",
        Seed::Rejected("winsorising is not accepted; use `advantage_norm: rank` or `advantage_clip`"),
    ),
    (
        "logprob_min",
        Seed::Rejected(
            "clamping log-probs zeroes the gradient of rare tokens; `log_ratio_clamp` guards the \
             log ratio instead",
        ),
    ),
    (
        "logprob_max",
        Seed::Rejected(
            "clamping log-probs zeroes the gradient of rare tokens; `log_ratio_clamp` guards the \
             log ratio instead",
        ),
    ),
    ("normalize_rewards", Seed::Rejected(NO_REWARD_EDIT)),
    ("reward_scale", Seed::Rejected(NO_REWARD_EDIT)),
    ("reward_shift", Seed::Rejected(NO_REWARD_EDIT)),
    ("outlier_threshold", Seed::Rejected(NO_REWARD_EDIT)),
    ("remove_outliers", Seed::Rejected(NO_REWARD_EDIT)),
    ("min_group_size", Seed::Rejected(NOT_GSPO)),
    ("max_group_size", Seed::Rejected(NOT_GSPO)),
    ("target_group_size", Seed::Rejected(NOT_GSPO)),
    ("use_dynamic_groups", Seed::Rejected(NOT_GSPO)),
    ("group_size_adjustment_rate", Seed::Rejected(NOT_GSPO)),
    ("target_advantage_std", Seed::Rejected(NOT_GSPO)),
    ("sync_frequency", Seed::Rejected(NOT_GSPO)),
    ("use_consensus", Seed::Rejected(NOT_GSPO)),
    ("consensus_weight", Seed::Rejected(NOT_GSPO)),
    ("consensus_window", Seed::Rejected(NOT_GSPO)),
    ("consensus_temperature", Seed::Rejected(NOT_GSPO)),
    ("gradient_sync_method", Seed::Rejected(NOT_GSPO)),
    ("gradient_sync_weight", Seed::Rejected(NOT_GSPO)),
    ("composition_strategy", Seed::Rejected(NOT_GSPO)),
    ("diversity_bonus", Seed::Rejected(NOT_GSPO)),
    ("adaptive_clipping", Seed::Rejected(NOT_GSPO)),
    ("diversity_clip_factor", Seed::Rejected(NOT_GSPO)),
    ("cross_group_entropy", Seed::Rejected(NOT_GSPO)),
    ("cross_group_entropy_coef", Seed::Rejected(NOT_GSPO)),
    (
        "num_preference_pairs",
        Seed::Rejected(
            "use `dpo_max_pairs_per_group` (deterministic: the pairs with the largest reward gap; \
             0 = all pairs)",
        ),
    ),
    (
        "use_ranked_preferences",
        Seed::Rejected("pairs come from rewards within each group; there are no external rankings"),
    ),
    (
        "preference_temperature",
        Seed::Rejected("the seed never used it; `dpo_beta` scales the pairwise logits"),
    ),
];

/// Maps one user key and value onto a §5 key and value: `Ok(None)` when the key is accepted but
/// has no effect, an error for an unknown or rejected key or value.
pub(crate) fn canonicalize(
    key: &str,
    value: &Value,
) -> Result<Option<(&'static str, Value)>, AlgoError> {
    let canonical = if let Some(k) = KEYS.iter().find(|k| **k == key) {
        *k
    } else {
        match SEED_KEYS.iter().find(|(k, _)| *k == key).map(|(_, s)| s) {
            Some(Seed::Alias(k)) => k,
            Some(Seed::NoEffect) => return Ok(None),
            Some(Seed::Rejected(advice)) => return Err(AlgoError::rejected(key, None, advice)),
            None => return special_key(key, value),
        }
    };
    Ok(Some((canonical, translate_value(key, canonical, value)?)))
}

/// Seed keys whose meaning depends on their value.
fn special_key(key: &str, value: &Value) -> Result<Option<(&'static str, Value)>, AlgoError> {
    match (key, value) {
        // The seed's default `true` (mean/std) is our default; `false` keeps the mean only.
        ("normalize_advantages", Value::Bool(true)) => {
            Ok(Some(("scale_rewards", Value::from("group"))))
        }
        ("normalize_advantages", Value::Bool(false)) => {
            Ok(Some(("scale_rewards", Value::from("none"))))
        }
        ("normalize_advantages", _) => Err(AlgoError::invalid(key, "true or false", value)),
        ("use_entropy_bonus", Value::Bool(false)) => Ok(None),
        ("use_entropy_bonus", _) => Err(AlgoError::rejected(
            key,
            Some(value),
            "the trainer has no entropy bonus yet (`entropy_coef` must be 0); raise the sampling \
             temperature or `epsilon_high` (DAPO's clip-higher) against entropy collapse",
        )),
        _ => Err(AlgoError::unknown_key(key)),
    }
}

/// Translates seed value spellings of a canonical key (`mean` → `token_mean`, ...).
fn translate_value(key: &str, canonical: &str, value: &Value) -> Result<Value, AlgoError> {
    let Some(s) = value.as_str() else {
        return Ok(value.clone());
    };
    let mapped =
        match (canonical, s) {
            ("loss_agg", "mean") => "token_mean",
            ("loss_agg", "sum") => {
                return Err(AlgoError::rejected(
                    key,
                    Some(value),
                    "a token sum has no normaliser; use `token_mean` or `seq_mean_token_sum_norm`",
                ))
            }
            ("kl_estimator", "schulman") => "k3",
            ("advantage_norm", "standard" | "mean_std") => "zscore",
            ("advantage_norm", "winsorized") => {
                return Err(AlgoError::rejected(
                    key,
                    Some(value),
                    "quantile clamps of a group of 8 trim one sample arbitrarily; use `rank` or \
                 `advantage_clip`",
                ))
            }
            ("advantage_norm", "max_min") => {
                return Err(AlgoError::rejected(
                    key,
                    Some(value),
                    "use `zscore` (default) or `rank`",
                ))
            }
            ("importance_sampling_level", "geometric_mean") => return Err(AlgoError::rejected(
                key,
                Some(value),
                "use `sequence`: GSPO's length-normalised sequence ratio is the geometric mean of \
                 the token ratios",
            )),
            ("importance_sampling_level", "average") => {
                return Err(AlgoError::rejected(
                    key,
                    Some(value),
                    "it was never implemented; use `token` or `sequence`",
                ))
            }
            _ => return Ok(value.clone()),
        };
    Ok(Value::from(mapped))
}
