//! The Hugging Face `config.json` of a Llama, Qwen2 or Qwen3 checkpoint.
//!
//! The three are one architecture with switches (see `decoder.rs`); this file reads the JSON,
//! fills in each family's defaults, and refuses what the decoder does not implement with an
//! error that names the field, instead of producing a model that silently computes something
//! else.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Which member of the Llama family a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

/// Llama-3 frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the decoder needs, defaults resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (always on for Qwen2, `attention_bias` for the others).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` for Llama and Qwen3, never for Qwen2).
    pub o_bias: bool,
    /// Per-head RMS-norm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the model config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).context("config.json is not a Llama/Qwen config")?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => bail!(
                "unsupported model_type `{other}` (architectures {:?}): lean-grpo implements the \
                 Llama family only: `llama`, `qwen2`, `qwen3` (e.g. Qwen/Qwen2.5-0.5B-Instruct, \
                 Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-1B)",
                raw.architectures
            ),
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (only `silu`)");
            }
        }
        if raw.mlp_bias == Some(true) {
            bail!("mlp_bias = true is not supported");
        }
        if raw.use_sliding_window == Some(true) {
            bail!("use_sliding_window = true is not supported; set it to false in config.json");
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            bail!(
                "num_attention_heads ({heads}) must be a positive multiple of \
                 num_key_value_heads ({kv_heads})"
            );
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size % heads == 0 => raw.hidden_size / heads,
            None => bail!(
                "hidden_size {} is not divisible by {heads} heads",
                raw.hidden_size
            ),
        };
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Llama | Arch::Qwen3 => (attention_bias, attention_bias),
        };
        let rope_params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_scaling = match raw
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(rope_params)
        {
            None => None,
            Some(v) => parse_rope_scaling(v)?,
        };
        let rope_theta = raw.rope_theta.or_else(|| {
            rope_params
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
        });
        Ok(ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32_768),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?,
        })
    }

    /// Inverse frequencies of the rotary embedding, `head_dim / 2` of them, with the Llama-3
    /// scaling applied when configured (the formula of transformers' `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let old_len = s.original_max_position_embeddings as f64;
        let low_wavelen = old_len / s.low_freq_factor;
        let high_wavelen = old_len / s.high_freq_factor;
        base.into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (old_len / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                }
            })
            .collect()
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Option<Llama3RopeScaling>> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| -> Result<f64> {
                v.get(key)
                    .and_then(|x| x.as_f64())
                    .with_context(|| format!("rope_scaling.{key} is missing or not a number"))
            };
            let scaling = Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            };
            if scaling.high_freq_factor <= scaling.low_freq_factor {
                bail!("rope_scaling.high_freq_factor must exceed low_freq_factor");
            }
            Ok(Some(scaling))
        }
        other => {
            bail!("rope_scaling type `{other}` is not supported (only `llama3` and `default`)")
        }
    }
}

fn token_ids(v: Option<&serde_json::Value>, field: &str) -> Result<Vec<u32>> {
    let as_id = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("{field}: `{x}` is not a token id"))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(xs)) => xs.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN25_05B: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
      "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 151936}"#;

    #[test]
    fn qwen2_has_qkv_bias_and_tied_embeddings() {
        let c = ModelConfig::from_json(QWEN25_05B).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert_eq!((c.head_dim, c.num_key_value_heads), (64, 2));
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm && c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert_eq!(c.rope_theta, 1e6);
    }

    #[test]
    fn llama3_scaling_matches_transformers() {
        let json = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 1, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rope_theta": 500000.0, "eos_token_id": [128001, 128008],
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
        let c = ModelConfig::from_json(json).unwrap();
        assert_eq!(c.eos_token_ids, vec![128001, 128008]);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        // High frequencies unchanged, low ones divided by the factor (values from transformers'
        // `_compute_llama3_parameters` for Llama-3.2-1B).
        assert_eq!(f[0], 1.0);
        let base_last = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!((f[31] - base_last / 32.0).abs() < 1e-15);
    }

    #[test]
    fn unsupported_architectures_are_named() {
        let json = r#"{"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#;
        let err = ModelConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unsupported model_type `gemma2`"), "{err}");
        let json = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_scaling": {"type": "yarn", "factor": 4.0}}"#;
        let err = format!("{:#}", ModelConfig::from_json(json).unwrap_err());
        assert!(err.contains("rope_scaling type `yarn`"), "{err}");
    }
}
