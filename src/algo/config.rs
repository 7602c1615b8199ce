//! [`AlgoConfig`]: every key of docs/algorithms.md §5, resolved from a preset plus overrides and
//! validated once, so the loss code never meets an out-of-range value.

use serde::Serialize;
use serde_json::{Map, Value};

use super::presets::{self, Preset};
use super::seed_keys;
use super::AlgoError;

/// How advantages are scaled after subtracting the group mean (docs/algorithms.md §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the group's sample std plus `std_eps` (GRPO).
    Group,
    /// Divide by the sample std of all kept rewards of the generation batch plus `std_eps`.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

/// What dynamic sampling measures a group's spread on (docs/algorithms.md §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DynamicSamplingMetric {
    /// The task reward before overlong shaping: for binary rewards, "some but not all proofs
    /// accepted" (the DAPO paper's filter). A group of failed proofs that differ only in length
    /// is dropped, so length alone never drives an update.
    Reward,
    /// The shaped reward (task reward plus the overlong penalty): keeps such groups.
    ShapedReward,
}

/// Z-score (mean, then `scale_rewards`) or within-group ranks mapped to [−1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageNorm {
    Zscore,
    Rank,
}

/// The unit of the importance weight (docs/algorithms.md §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceLevel {
    /// One ratio per token (GRPO, DAPO, Dr. GRPO, DGPO).
    Token,
    /// One length-normalised ratio per completion (GSPO).
    Sequence,
}

/// Per-token estimator of KL(π‖π_ref) (docs/algorithms.md §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// Schulman's k3: exp(Δ) − Δ − 1.
    K3,
    /// |Δ|.
    Abs,
    /// Δ².
    Mse,
}

/// How token losses are reduced to one number (docs/algorithms.md §3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAgg {
    /// Mean over sequences of per-sequence token means (GRPO).
    SeqMeanTokenMean,
    /// Mean over all loss tokens of the step batch (DAPO).
    TokenMean,
    /// Token sum divided by B · max_completion_length (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// The names each enum accepts, in the order error messages list them.
trait Choice: Copy + PartialEq + 'static {
    const CHOICES: &'static [(&'static str, Self)];

    fn name(self) -> &'static str {
        Self::CHOICES
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("?", |(n, _)| n)
    }
}

impl Choice for ScaleRewards {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("group", Self::Group),
        ("batch", Self::Batch),
        ("none", Self::None),
    ];
}
impl Choice for DynamicSamplingMetric {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("reward", Self::Reward),
        ("shaped_reward", Self::ShapedReward),
    ];
}
impl Choice for AdvantageNorm {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("zscore", Self::Zscore), ("rank", Self::Rank)];
}
impl Choice for ImportanceLevel {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("token", Self::Token), ("sequence", Self::Sequence)];
}
impl Choice for KlEstimator {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("k3", Self::K3), ("abs", Self::Abs), ("mse", Self::Mse)];
}
impl Choice for LossAgg {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("seq_mean_token_mean", Self::SeqMeanTokenMean),
        ("token_mean", Self::TokenMean),
        ("seq_mean_token_sum_norm", Self::SeqMeanTokenSumNorm),
    ];
}

macro_rules! display_choice {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    )*};
}
display_choice!(
    ScaleRewards,
    DynamicSamplingMetric,
    AdvantageNorm,
    ImportanceLevel,
    KlEstimator,
    LossAgg
);

/// The shape of a generation batch, fixed by the trainer: G completions per prompt
/// (`train.num_generations`), each at most L_max tokens (`sampling.max_completion_length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchShape {
    pub group_size: usize,
    pub max_completion_length: usize,
}

/// One algorithm's resolved settings (docs/algorithms.md §5). Build it with [`AlgoConfig::resolve`];
/// serialising it gives the effective configuration of a run, which `resolve` reads back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlgoConfig {
    /// Canonical preset name the configuration started from (`grpo`, `dapo`, ...).
    pub algorithm: String,
    pub group_size: usize,
    pub max_completion_length: usize,
    pub scale_rewards: ScaleRewards,
    pub std_eps: f64,
    pub advantage_norm: AdvantageNorm,
    pub advantage_clip: Option<f64>,
    pub positive_advantage_scale: f64,
    pub negative_advantage_scale: f64,
    pub dynamic_sampling: bool,
    pub dynamic_sampling_metric: DynamicSamplingMetric,
    pub max_resample_rounds: usize,
    pub mask_truncated_completions: bool,
    pub overlong_cache: usize,
    pub overlong_penalty_factor: f64,
    pub importance_sampling_level: ImportanceLevel,
    pub epsilon: f64,
    /// `None` means "same as `epsilon`"; read it through [`AlgoConfig::epsilon_high`].
    pub epsilon_high: Option<f64>,
    pub delta: Option<f64>,
    pub log_ratio_clamp: f64,
    pub beta: f64,
    pub kl_estimator: KlEstimator,
    pub loss_agg: LossAgg,
    pub num_iterations: usize,
    pub num_minibatches: usize,
    pub entropy_coef: f64,
    pub use_dpo_loss: bool,
    pub dpo_coef: f64,
    pub dpo_beta: f64,
    pub pairwise_margin: f64,
    pub dpo_max_pairs_per_group: usize,
    pub dpo_reference_free: bool,
}

impl AlgoConfig {
    /// The base defaults of docs/algorithms.md §5 (which are GRPO's).
    fn base(group_size: usize, max_completion_length: usize) -> Self {
        Self {
            algorithm: "grpo".into(),
            group_size,
            max_completion_length,
            scale_rewards: ScaleRewards::Group,
            std_eps: 1e-4,
            advantage_norm: AdvantageNorm::Zscore,
            advantage_clip: None,
            positive_advantage_scale: 1.0,
            negative_advantage_scale: 1.0,
            dynamic_sampling: false,
            dynamic_sampling_metric: DynamicSamplingMetric::Reward,
            max_resample_rounds: 3,
            mask_truncated_completions: false,
            overlong_cache: 0,
            overlong_penalty_factor: 1.0,
            importance_sampling_level: ImportanceLevel::Token,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            log_ratio_clamp: 20.0,
            beta: 0.0,
            kl_estimator: KlEstimator::K3,
            loss_agg: LossAgg::SeqMeanTokenMean,
            num_iterations: 1,
            num_minibatches: 1,
            entropy_coef: 0.0,
            use_dpo_loss: false,
            dpo_coef: 0.0,
            dpo_beta: 0.1,
            pairwise_margin: 0.0,
            dpo_max_pairs_per_group: 0,
            dpo_reference_free: false,
        }
    }

    /// Builds the configuration of `algorithm` (a name or alias from [`presets::PRESETS`]): base
    /// defaults, the preset, then `overrides` (the `algorithm_config` map; docs/algorithms.md §5
    /// keys or the seed keys §6 maps), then validation.
    ///
    /// G and L_max come in as `shape`, the trainer's own settings, never as overrides: the loss
    /// must use the group size and completion length the samples were drawn with. A key
    /// `algorithm` (as in a saved effective config) must name the same algorithm.
    pub fn resolve(
        algorithm: &str,
        overrides: &Map<String, Value>,
        shape: BatchShape,
    ) -> Result<Self, AlgoError> {
        let preset = presets::find(algorithm)?;
        let mut cfg = Self::base(shape.group_size, shape.max_completion_length);
        cfg.algorithm = preset.name.to_string();
        for (key, value) in preset.overrides {
            cfg.set(key, value.to_json(shape.max_completion_length))?;
        }

        let mut seen: Vec<(&'static str, &str)> = Vec::new();
        for (key, value) in overrides {
            if key == "algorithm" {
                check_same_algorithm(preset, value)?;
                continue;
            }
            let Some((canonical, value)) = seed_keys::canonicalize(key, value)? else {
                continue;
            };
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == canonical) {
                return Err(AlgoError::invalid(
                    key,
                    format!("given once: `{first}` already sets `{canonical}`; keep one of them"),
                    value,
                ));
            }
            seen.push((canonical, key));
            cfg.set(canonical, value)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The batch shape this configuration was resolved for.
    pub fn shape(&self) -> BatchShape {
        BatchShape {
            group_size: self.group_size,
            max_completion_length: self.max_completion_length,
        }
    }

    /// ε_high, defaulting to ε_low when unset.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// True when the DGPO pairwise term contributes (`use_dpo_loss` with `dpo_coef` > 0).
    pub fn dpo_enabled(&self) -> bool {
        self.use_dpo_loss && self.dpo_coef > 0.0
    }

    /// True when the trainer must compute reference log-probs (LoRA switched off): for the KL
    /// term (β ≠ 0) or for a DGPO pairwise term that is not reference-free.
    pub fn needs_reference(&self) -> bool {
        self.beta != 0.0 || (self.dpo_enabled() && !self.dpo_reference_free)
    }

    /// Sets one canonical key from a JSON value, checking its type and per-key range.
    fn set(&mut self, key: &str, v: Value) -> Result<(), AlgoError> {
        let v = &v;
        match key {
            "scale_rewards" => self.scale_rewards = parse_choice(key, v)?,
            "std_eps" => self.std_eps = parse_f64(key, v, |x| x > 0.0, "a number > 0")?,
            "advantage_norm" => self.advantage_norm = parse_choice(key, v)?,
            "advantage_clip" => {
                self.advantage_clip = parse_opt_f64(key, v, |x| x > 0.0, "a number > 0 or null")?
            }
            "positive_advantage_scale" => {
                self.positive_advantage_scale = parse_f64(key, v, |x| x >= 0.0, "a number ≥ 0")?
            }
            "negative_advantage_scale" => {
                self.negative_advantage_scale = parse_f64(key, v, |x| x >= 0.0, "a number ≥ 0")?
            }
            "dynamic_sampling" => self.dynamic_sampling = parse_bool(key, v)?,
            "dynamic_sampling_metric" => self.dynamic_sampling_metric = parse_choice(key, v)?,
            "max_resample_rounds" => {
                self.max_resample_rounds = parse_usize(key, v, 0, "an integer ≥ 0")?
            }
            "mask_truncated_completions" => self.mask_truncated_completions = parse_bool(key, v)?,
            "overlong_cache" => {
                self.overlong_cache =
                    parse_usize(key, v, 0, "an integer in [0, max_completion_length]")?
            }
            "overlong_penalty_factor" => {
                self.overlong_penalty_factor = parse_f64(key, v, |x| x >= 0.0, "a number ≥ 0")?
            }
            "importance_sampling_level" => self.importance_sampling_level = parse_choice(key, v)?,
            "epsilon" => {
                self.epsilon = parse_f64(key, v, |x| (0.0..1.0).contains(&x), "a number in [0, 1)")?
            }
            "epsilon_high" => {
                self.epsilon_high = parse_opt_f64(key, v, |x| x >= 0.0, "a number ≥ 0 or null")?
            }
            "delta" => {
                self.delta =
                    parse_opt_f64(key, v, |x| x > 1.0, "a number > 1 + epsilon_high or null")?
            }
            "log_ratio_clamp" => {
                self.log_ratio_clamp = parse_f64(key, v, |x| x > 0.0, "a number > 0")?
            }
            "beta" => self.beta = parse_f64(key, v, |x| x >= 0.0, "a number ≥ 0")?,
            "kl_estimator" => self.kl_estimator = parse_choice(key, v)?,
            "loss_agg" => self.loss_agg = parse_choice(key, v)?,
            "num_iterations" => self.num_iterations = parse_usize(key, v, 1, "an integer ≥ 1")?,
            "num_minibatches" => self.num_minibatches = parse_usize(key, v, 1, "an integer ≥ 1")?,
            "entropy_coef" => self.entropy_coef = parse_f64(key, v, |x| x >= 0.0, "a number ≥ 0")?,
            "use_dpo_loss" => self.use_dpo_loss = parse_bool(key, v)?,
            "dpo_coef" => {
                self.dpo_coef =
                    parse_f64(key, v, |x| (0.0..=1.0).contains(&x), "a number in [0, 1]")?
            }
            "dpo_beta" => self.dpo_beta = parse_f64(key, v, |x| x > 0.0, "a number > 0")?,
            "pairwise_margin" => {
                self.pairwise_margin = parse_f64(key, v, |x| x >= 0.0, "a number ≥ 0")?
            }
            "dpo_max_pairs_per_group" => {
                self.dpo_max_pairs_per_group =
                    parse_usize(key, v, 0, "an integer ≥ 0 (0 = all pairs)")?
            }
            "dpo_reference_free" => self.dpo_reference_free = parse_bool(key, v)?,
            _ => return Err(AlgoError::unknown_key(key)),
        }
        Ok(())
    }

    /// The checks that involve more than one key (single-key ranges are checked by `set`).
    fn validate(&self) -> Result<(), AlgoError> {
        if self.group_size == 0 {
            return Err(AlgoError::invalid("group_size", "an integer ≥ 1", 0));
        }
        if self.max_completion_length == 0 {
            return Err(AlgoError::invalid(
                "max_completion_length",
                "an integer ≥ 1",
                0,
            ));
        }
        if self.overlong_cache > self.max_completion_length {
            return Err(AlgoError::invalid(
                "overlong_cache",
                format!(
                    "an integer in [0, max_completion_length = {}]",
                    self.max_completion_length
                ),
                self.overlong_cache,
            ));
        }
        if let Some(delta) = self.delta {
            let bound = 1.0 + self.epsilon_high();
            if delta <= bound {
                return Err(AlgoError::invalid(
                    "delta",
                    format!("a number > 1 + epsilon_high = {bound} or null"),
                    delta,
                ));
            }
        }
        if self.dpo_reference_free && self.beta != 0.0 {
            return Err(AlgoError::invalid(
                "beta",
                "0 when `dpo_reference_free` is true (no reference pass is run, so there is no \
                 KL to penalise)",
                self.beta,
            ));
        }
        Ok(())
    }
}

fn check_same_algorithm(preset: &Preset, value: &Value) -> Result<(), AlgoError> {
    let name = value.as_str().unwrap_or_default();
    match presets::find(name) {
        Ok(p) if p.name == preset.name => Ok(()),
        _ => Err(AlgoError::invalid(
            "algorithm",
            format!(
                "the algorithm being configured (`{}`), or absent; choose the algorithm with \
                 `train.algorithm` / `--algorithm`",
                preset.name
            ),
            value,
        )),
    }
}

fn parse_f64(
    key: &str,
    v: &Value,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) -> Result<f64, AlgoError> {
    match v.as_f64() {
        Some(x) if x.is_finite() && ok(x) => Ok(x),
        _ => Err(AlgoError::invalid(key, expected, v)),
    }
}

fn parse_opt_f64(
    key: &str,
    v: &Value,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) -> Result<Option<f64>, AlgoError> {
    if v.is_null() {
        return Ok(None);
    }
    parse_f64(key, v, ok, expected).map(Some)
}

fn parse_usize(key: &str, v: &Value, min: usize, expected: &str) -> Result<usize, AlgoError> {
    match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
        Some(x) if x >= min => Ok(x),
        _ => Err(AlgoError::invalid(key, expected, v)),
    }
}

fn parse_bool(key: &str, v: &Value) -> Result<bool, AlgoError> {
    v.as_bool()
        .ok_or_else(|| AlgoError::invalid(key, "true or false", v))
}

fn parse_choice<T: Choice>(key: &str, v: &Value) -> Result<T, AlgoError> {
    let name = v.as_str().unwrap_or_default();
    T::CHOICES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            let names: Vec<&str> = T::CHOICES.iter().map(|(n, _)| *n).collect();
            AlgoError::invalid(key, format!("one of {}", names.join(", ")), v)
        })
}
