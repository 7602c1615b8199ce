//! The registry: each algorithm is a named preset of `algorithm_config` keys (docs/algorithms.md
//! §4, §5) plus the words `lean-grpo algorithms` shows for it (see the `catalog` module). Data
//! only: resolving a preset into an [`super::AlgoConfig`] is the configuration's job.

use serde_json::Value;

use super::AlgoError;

/// A preset override value. `FifthOfMaxCompletionLength` is DAPO's overlong window ⌊L_max/5⌋.
#[derive(Debug, Clone, Copy)]
pub enum PresetValue {
    Bool(bool),
    Float(f64),
    Int(usize),
    Str(&'static str),
    FifthOfMaxCompletionLength,
}

impl PresetValue {
    /// The JSON value this override sets for a run with the given L_max.
    pub fn to_json(self, max_completion_length: usize) -> Value {
        match self {
            Self::Bool(b) => Value::from(b),
            Self::Float(x) => Value::from(x),
            Self::Int(n) => Value::from(n),
            Self::Str(s) => Value::from(s),
            Self::FifthOfMaxCompletionLength => Value::from(max_completion_length / 5),
        }
    }

    pub(super) fn describe(self) -> String {
        match self {
            Self::FifthOfMaxCompletionLength => "⌊L_max/5⌋".into(),
            Self::Str(s) => s.into(),
            other => other.to_json(0).to_string(),
        }
    }
}

/// One named algorithm.
#[derive(Debug)]
pub struct Preset {
    /// Canonical `--algorithm` name.
    pub name: &'static str,
    /// Other accepted spellings.
    pub aliases: &'static [&'static str],
    /// Full name and origin.
    pub title: &'static str,
    /// One paragraph: what it changes and why.
    pub description: &'static str,
    /// When to choose it.
    pub best_for: &'static str,
    /// The keys that differ from the base (GRPO) defaults.
    pub overrides: &'static [(&'static str, PresetValue)],
}

/// The five algorithms, in the order `lean-grpo algorithms` lists them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "grpo",
        aliases: &[],
        title: "GRPO (DeepSeekMath, 2024)",
        description: "Group mean as baseline instead of a value network, advantages scaled by the \
            group std, PPO-clipped token ratios, token mean per completion then mean over \
            completions; optional k3 KL to the LoRA-off base model (beta).",
        best_for: "the reference baseline; short proofs of similar length",
        overrides: &[],
    },
    Preset {
        name: "dapo",
        aliases: &[],
        title: "DAPO: Decoupled Clip and Dynamic sAmpling PO (2025)",
        description:
            "GRPO plus clip-higher (eps_high 0.28), dynamic sampling (groups that are all \
            right or all wrong are dropped and refilled), a token-level loss over the whole batch, \
            and overlong shaping (truncated completions leave the loss, a soft length penalty \
            near max_completion_length).",
        best_for: "sparse success (most groups all-fail), long proofs, entropy collapse",
        overrides: &[
            ("epsilon_high", PresetValue::Float(0.28)),
            ("loss_agg", PresetValue::Str("token_mean")),
            ("dynamic_sampling", PresetValue::Bool(true)),
            ("mask_truncated_completions", PresetValue::Bool(true)),
            ("overlong_cache", PresetValue::FifthOfMaxCompletionLength),
        ],
    },
    Preset {
        name: "drgrpo",
        aliases: &["dr_grpo"],
        title: "Dr. GRPO: GRPO done right (2025)",
        description: "Removes GRPO's two biases: no division by the group std (over-weights \
            nearly-solved or nearly-failed prompts) and no division by each completion's length \
            (rewards short right and long wrong answers); token losses are summed and divided by \
            B * max_completion_length.",
        best_for: "unbiased updates; keeping wrong proofs from growing long; rewards in [0, 1]",
        overrides: &[
            ("scale_rewards", PresetValue::Str("none")),
            ("loss_agg", PresetValue::Str("seq_mean_token_sum_norm")),
        ],
    },
    Preset {
        name: "gspo",
        aliases: &[],
        title: "GSPO: Group Sequence PO (Qwen, 2025)",
        description: "One importance ratio per completion (the geometric mean of its token \
            ratios) clipped to a very tight range, averaged over sequences; matches the unit of \
            optimisation to the unit of reward. Differs from GRPO only off-policy, hence 4 \
            minibatches per generation batch.",
        best_for: "long proofs and several updates per batch (off-policy stability)",
        overrides: &[
            ("importance_sampling_level", PresetValue::Str("sequence")),
            ("epsilon", PresetValue::Float(3e-4)),
            ("epsilon_high", PresetValue::Float(4e-4)),
            ("num_minibatches", PresetValue::Int(4)),
        ],
    },
    Preset {
        name: "dgpo",
        aliases: &[],
        title: "DGPO: Direct GRPO (seed project's design)",
        description: "GRPO mixed with a DPO-style pairwise term from the same groups: every \
            in-group pair (better, worse) contributes softplus(-z) with z the dpo_beta-scaled \
            log-likelihood margin against the reference; loss = 0.7 GRPO + 0.3 DPO.",
        best_for: "graded rewards with many distinct values per group (partial credit)",
        overrides: &[
            ("use_dpo_loss", PresetValue::Bool(true)),
            ("dpo_coef", PresetValue::Float(0.3)),
        ],
    },
];

/// The preset named `name` (canonical name or alias, case-insensitive).
pub fn find(name: &str) -> Result<&'static Preset, AlgoError> {
    let wanted = name.trim().to_ascii_lowercase();
    PRESETS
        .iter()
        .find(|p| p.name == wanted || p.aliases.contains(&wanted.as_str()))
        .ok_or_else(|| AlgoError::UnknownAlgorithm {
            name: name.to_string(),
            valid: valid_names(),
        })
}

/// "grpo, dapo, drgrpo (alias dr_grpo), gspo, dgpo".
fn valid_names() -> String {
    let names: Vec<String> = PRESETS
        .iter()
        .map(|p| match p.aliases {
            [] => p.name.to_string(),
            aliases => format!("{} (alias {})", p.name, aliases.join(", ")),
        })
        .collect();
    names.join(", ")
}
