//! Configuration: built-in defaults < a config file (YAML or JSON) < command-line flags.
//!
//! A file has up to seven sections, each a mapping of keys (TRL's names where the meaning is the
//! same): `model`, `lora`, `sampling`, `train`, `algorithm_config`, `checker`, `eval`. An unknown
//! section or key is an error that lists the valid ones, because a misspelt key that silently
//! keeps its default is the worst kind of wrong run.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::algo::{AlgoConfig, AlgoError, BatchShape};
use crate::lean::CheckerOptions;
use crate::model::optim::{AdamWParams, OptimizerSettings, ScheduleKind};
use crate::model::{LoraOptions, ModelOptions, SamplingOptions};
use crate::reward::RewardPreset;

/// The effective configuration of one run: what `--print-config` prints and what a run directory
/// keeps as `config.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelOptions,
    pub lora: LoraOptions,
    pub sampling: SamplingOptions,
    pub train: TrainOptions,
    /// Overrides of the chosen algorithm's preset (keys of docs/algorithms.md §5), validated by
    /// [`crate::algo`] when the run starts.
    pub algorithm_config: Map<String, Value>,
    pub checker: CheckerOptions,
    pub eval: EvalOptions,
}

/// The `train` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// `grpo`, `dapo`, `drgrpo`, `gspo` or `dgpo` (see `lean-grpo algorithms`).
    pub algorithm: String,
    /// Completions sampled per theorem (G).
    pub num_generations: usize,
    /// Theorems per generation batch; each step trains on `batch_size × num_generations` proofs.
    pub batch_size: usize,
    /// Stop after this many steps; `None` = run `num_train_epochs` over the theorems.
    pub max_steps: Option<usize>,
    pub num_train_epochs: usize,
    pub learning_rate: f64,
    /// `constant`, `constant_with_warmup`, `linear` or `cosine`.
    pub lr_scheduler_type: ScheduleKind,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    /// Micro-batches per optimizer step (memory only: the gradient is the same).
    pub gradient_accumulation_steps: usize,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// (memory only: the gradient is the same, for about one more forward's time). On by
    /// default: on SmolLM2-135M with four prelude prompts of ~790 tokens, one SFT step peaked
    /// at 19.5 GB without it and 2.0 GB with it (docs/model.md §5).
    pub gradient_checkpointing: bool,
    pub seed: u64,
    /// Run directory; `None` = `runs/<algorithm>-<time>`.
    pub output_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub save_steps: usize,
    /// Also write one after any step that ends more than this many minutes after the last
    /// checkpoint (0 = off): on a CPU a real model's step takes minutes, so `save_steps` alone
    /// could lose hours to a crash.
    pub save_every_minutes: f64,
    /// Keep this many checkpoints (the oldest are deleted).
    pub save_total_limit: usize,
    /// Reward preset: `binary` (1 accepted, 0 otherwise) or `partial`.
    pub reward: RewardPreset,
    /// Cap of partial credit for a rejected proof (`reward: partial`).
    pub partial_credit_cap: f64,
    /// Reward subtracted per completion token (0 = off).
    pub length_penalty: f64,
    /// Train only on records of this split (`None` = all records).
    pub split: Option<String>,
    /// Sample proofs from this OpenAI-compatible server (vLLM, SGLang, ...) instead of the
    /// policy; `None` = sample locally. The server does not see the LoRA updates, so rollouts
    /// are off-policy (see `lean-grpo train --help`).
    pub endpoint: Option<String>,
    /// The model name the endpoint serves; required with `endpoint`.
    pub served_model: Option<String>,
    /// Environment variable holding the endpoint's API key (the key never goes in a file).
    pub api_key_env: Option<String>,
    /// On-policy endpoint rollouts: write the policy's adapter into this directory (one the
    /// server can read) and hot-load it into the server every `sync_steps` steps (vLLM's or
    /// SGLang's `load_lora_adapter`); `None` = off-policy (the server samples its own model).
    pub endpoint_adapter_dir: Option<PathBuf>,
    /// Steps between adapter loads into the endpoint (1 = every step: fully on-policy).
    pub sync_steps: usize,
    /// Seconds the endpoint may take to load an adapter before the load counts as failed (the
    /// step then samples from the adapter loaded before).
    pub sync_timeout_secs: f64,
    /// `proof` (write the whole proof) or `fim` (fill a hole in a known proof, docs/fim.md).
    pub task: Task,
    /// The mask-ratio curriculum of `task: fim`.
    pub fim: FimOptions,
}

/// What the model is asked to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// The whole proof after `:=`.
    #[default]
    Proof,
    /// The text of a hole cut in a record's known proof (records without a proof are skipped).
    Fim,
}

/// How the mask ratio moves during a FIM run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FimSchedule {
    /// From `start_ratio` at the first step to `end_ratio` at the last.
    #[default]
    Linear,
    /// By `ratio_step` up when the pass rate at the current ratio is above `raise_above`, down
    /// when it is below `lower_below`, each judged over the last `window` steps at that ratio.
    Adaptive,
}

/// The `train.fim` section (docs/fim.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FimOptions {
    pub start_ratio: f64,
    /// 1.0 ends on the whole-proof task.
    pub end_ratio: f64,
    pub schedule: FimSchedule,
    /// Adaptive: the change of ratio per move.
    pub ratio_step: f64,
    /// Adaptive: raise the ratio when the rolling pass rate exceeds this.
    pub raise_above: f64,
    /// Adaptive: lower it when the rolling pass rate falls below this.
    pub lower_below: f64,
    /// Adaptive: steps at the current ratio the rolling pass rate covers; no move before.
    pub window: usize,
}

impl Default for FimOptions {
    fn default() -> Self {
        Self {
            start_ratio: 0.2,
            end_ratio: 1.0,
            schedule: FimSchedule::Linear,
            ratio_step: 0.1,
            raise_above: 0.5,
            lower_below: 0.1,
            window: 4,
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            algorithm: "grpo".into(),
            num_generations: 8,
            batch_size: 4,
            max_steps: None,
            num_train_epochs: 1,
            learning_rate: 1e-5,
            lr_scheduler_type: ScheduleKind::Constant,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.99,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: true,
            seed: 42,
            output_dir: None,
            save_steps: 50,
            save_every_minutes: 10.0,
            save_total_limit: 3,
            reward: RewardPreset::Binary,
            partial_credit_cap: 0.3,
            length_penalty: 0.0,
            split: None,
            endpoint: None,
            served_model: None,
            api_key_env: None,
            endpoint_adapter_dir: None,
            sync_steps: 1,
            sync_timeout_secs: 120.0,
            task: Task::Proof,
            fim: FimOptions::default(),
        }
    }
}

impl TrainOptions {
    /// The optimizer this section configures.
    pub fn optimizer(&self) -> OptimizerSettings {
        OptimizerSettings {
            adamw: AdamWParams {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            learning_rate: self.learning_rate,
            schedule: self.lr_scheduler_type,
            warmup_ratio: self.warmup_ratio,
        }
    }
}

/// The `eval` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalOptions {
    /// Samples per problem (n of pass@k).
    pub num_samples: usize,
    /// The k values to report; `None`: [`DEFAULT_K`], those of them that fit `num_samples`.
    pub k: Option<Vec<usize>>,
    /// Evaluate only records of this split.
    pub split: Option<String>,
    /// Directory for the per-problem results and the summary; `None` = `evals/<time>`.
    pub output_dir: Option<PathBuf>,
    /// Requests in flight at once against an endpoint.
    pub concurrency: usize,
    pub seed: u64,
    /// Sample from this OpenAI-compatible server instead of the local model.
    pub endpoint: Option<String>,
    /// The name the endpoint serves the model under; `None`: `model.model`.
    pub served_model: Option<String>,
    /// Environment variable holding the endpoint's API key.
    pub api_key_env: Option<String>,
    /// `proof`, or `fim`: fill holes cut at `mask_ratio` in the records' proofs.
    pub task: Task,
    /// The hole's share of the proof's tokens for `task: fim` (1.0 = the whole proof).
    pub mask_ratio: f64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            num_samples: 8,
            k: None,
            split: None,
            output_dir: None,
            concurrency: 8,
            seed: 0,
            endpoint: None,
            served_model: None,
            api_key_env: None,
            task: Task::Proof,
            mask_ratio: 0.5,
        }
    }
}

/// The pass@k values `eval` reports unless `eval.k` names others.
pub const DEFAULT_K: [usize; 2] = [1, 8];

/// A configuration that cannot be used. Always an input error (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    origin: String,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            message: message.into(),
        }
    }
}

/// One value set on the command line: `section.key = value`.
#[derive(Debug, Clone)]
pub struct Override {
    pub section: &'static str,
    pub key: &'static str,
    pub value: Value,
}

impl Override {
    pub fn new(section: &'static str, key: &'static str, value: impl Serialize) -> Self {
        Self {
            section,
            key,
            value: serde_json::to_value(value).unwrap_or(Value::Null),
        }
    }
}

const SECTIONS: [&str; 7] = [
    "model",
    "lora",
    "sampling",
    "train",
    "algorithm_config",
    "checker",
    "eval",
];

impl Config {
    /// Builds the effective configuration: defaults, then `file` (if any), then `flags`, then
    /// `algo_config` (the JSON of `--algo-config`) over the `algorithm_config` section.
    pub fn load(
        file: Option<&Path>,
        flags: &[Override],
        algo_config: Option<&str>,
    ) -> Result<Config, ConfigError> {
        Self::load_onto(&Config::default(), file, flags, algo_config)
    }

    /// [`Self::load`] with `base` in place of the built-in defaults: a resumed run's own
    /// `config.yaml`, so `--resume RUN` alone continues the run as it was started.
    pub fn load_onto(
        base: &Config,
        file: Option<&Path>,
        flags: &[Override],
        algo_config: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let mut merged = match serde_json::to_value(base) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let origin = match file {
            Some(path) => {
                merge_file(&mut merged, path)?;
                path.display().to_string()
            }
            None => "configuration".to_string(),
        };
        for flag in flags {
            if let Some(Value::Object(section)) = merged.get_mut(flag.section) {
                section.insert(flag.key.to_string(), flag.value.clone());
            }
        }
        if let Some(json) = algo_config {
            let overrides: Value = serde_json::from_str(json)
                .map_err(|e| ConfigError::new("--algo-config", format!("invalid JSON: {e}")))?;
            let Value::Object(overrides) = overrides else {
                return Err(ConfigError::new(
                    "--algo-config",
                    "expected a JSON object such as '{\"epsilon_high\": 0.28}'",
                ));
            };
            if let Some(Value::Object(section)) = merged.get_mut("algorithm_config") {
                section.extend(overrides);
            }
        }
        let config = Config {
            model: section(&merged, "model", &origin)?,
            lora: section(&merged, "lora", &origin)?,
            sampling: section(&merged, "sampling", &origin)?,
            train: section(&merged, "train", &origin)?,
            algorithm_config: section(&merged, "algorithm_config", &origin)?,
            checker: section(&merged, "checker", &origin)?,
            eval: section(&merged, "eval", &origin)?,
        };
        // A bad algorithm key fails here, before any model is loaded.
        config
            .algorithm()
            .map_err(|e| ConfigError::new(&origin, e.to_string()))?;
        Ok(config)
    }

    /// The run's algorithm: `train.algorithm`'s preset with the `algorithm_config` overrides,
    /// for the trainer's group size and completion length.
    pub fn algorithm(&self) -> Result<AlgoConfig, AlgoError> {
        let algo = AlgoConfig::resolve(
            &self.train.algorithm,
            &self.algorithm_config,
            BatchShape {
                group_size: self.train.num_generations,
                max_completion_length: self.sampling.max_completion_length,
            },
        )?;
        // The loss can weigh an entropy bonus (docs/algorithms.md §5), but the trainer scores
        // the sampled tokens only and has no full-vocabulary entropies to give it.
        if algo.entropy_coef != 0.0 {
            return Err(AlgoError::invalid(
                "entropy_coef",
                "0: the trainer computes no full-vocabulary entropies, so it has no entropy \
                 bonus; against entropy collapse raise `epsilon_high` (DAPO's clip-higher) or \
                 the sampling temperature",
                algo.entropy_coef,
            ));
        }
        Ok(algo)
    }

    /// This configuration with every algorithm key written out (the preset's values included),
    /// as `--print-config` shows it: reading it back resolves to the same algorithm.
    pub fn with_resolved_algorithm(&self) -> Result<Config, AlgoError> {
        let resolved = serde_json::to_value(self.algorithm()?).map_err(|e| {
            AlgoError::Batch(format!("cannot serialise the algorithm configuration: {e}"))
        })?;
        let mut keys = match resolved {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        // The preset is `train.algorithm`, and G and L_max are the trainer's keys.
        for trainer_key in ["algorithm", "group_size", "max_completion_length"] {
            keys.remove(trainer_key);
        }
        Ok(Config {
            algorithm_config: keys,
            ..self.clone()
        })
    }

    /// The configuration as YAML, in the shape `--config` reads back.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn merge_file(merged: &mut Map<String, Value>, path: &Path) -> Result<(), ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&origin, format!("cannot read: {e}")))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let value: Value = match extension.as_str() {
        "yaml" | "yml" => serde_yaml_ng::from_str(&text)
            .map_err(|e| ConfigError::new(&origin, format!("invalid YAML: {e}")))?,
        "json" => serde_json::from_str(&text)
            .map_err(|e| ConfigError::new(&origin, format!("invalid JSON: {e}")))?,
        _ => {
            return Err(ConfigError::new(
                &origin,
                "unknown config format; name the file *.yaml, *.yml or *.json",
            ))
        }
    };
    let file = match value {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => {
            return Err(ConfigError::new(
                &origin,
                format!("expected a mapping of sections, found {}", kind(&other)),
            ))
        }
    };
    for (name, content) in file {
        if !SECTIONS.contains(&name.as_str()) {
            return Err(ConfigError::new(
                &origin,
                format!(
                    "unknown section `{name}`; valid sections: {}",
                    SECTIONS.join(", ")
                ),
            ));
        }
        let Value::Object(content) = content else {
            if content.is_null() {
                continue;
            }
            return Err(ConfigError::new(
                &origin,
                format!(
                    "section `{name}` must be a mapping of keys, found {}",
                    kind(&content)
                ),
            ));
        };
        if let Some(Value::Object(target)) = merged.get_mut(&name) {
            target.extend(content);
        }
    }
    Ok(())
}

fn section<T: DeserializeOwned>(
    merged: &Map<String, Value>,
    name: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    let value = merged.get(name).cloned().unwrap_or(Value::Null);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            format!("section `{name}`")
        } else {
            format!("`{name}.{path}`")
        };
        ConfigError::new(origin, format!("{key}: {}", e.into_inner()))
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
