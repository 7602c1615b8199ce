use super::layer::LORA_MODULES;
use serde::{Deserialize, Serialize};

use super::device::{DeviceSpec, Precision};
use super::quant::Quantize;

/// The `model` section: which weights, on which device, in which dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelOptions {
    /// A Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`) or a local directory in HF layout.
    pub model: String,
    /// Hub revision (branch, tag or commit).
    pub revision: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// `f32`, `bf16` or `f16`; `None` = f32 on CPU, bf16 on CUDA.
    pub dtype: Option<Precision>,
    /// Sample from a copy of the weights with the adapters merged in, in this dtype (the
    /// model's, or `f16` for an f32 model on the CPU); `None` = through the adapters.
    pub sample_dtype: Option<Precision>,
    /// The linear layers' frozen weights: `none` (dequantized, exact), `keep` (a GGUF's
    /// quantized tensors stay quantized) or `q8_0`/`q4_k` (quantized at load); see
    /// src/model/quant.rs.
    pub quantize: Quantize,
    /// A PEFT adapter directory to start from.
    pub adapter: Option<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            model: "Qwen/Qwen2.5-0.5B-Instruct".into(),
            revision: "main".into(),
            device: DeviceSpec::Auto,
            dtype: None,
            sample_dtype: None,
            quantize: Quantize::None,
            adapter: None,
        }
    }
}

/// The `lora` section, with PEFT's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraOptions {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        Self {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: LORA_MODULES.map(String::from).to_vec(),
        }
    }
}

/// How completions are drawn (TRL's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingOptions {
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off.
    pub min_p: f64,
    pub max_completion_length: usize,
    pub max_prompt_length: usize,
    /// Extra stop strings besides the model's EOS tokens.
    pub stop: Vec<String>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_completion_length: 512,
            max_prompt_length: 1024,
            stop: Vec::new(),
        }
    }
}
