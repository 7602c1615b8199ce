//! The frozen weights, whatever file they came from: a [`WeightSource`] gives tensors by their
//! Hugging Face name, [`Weights`] walks it by module path as the model builds itself, and
//! [`ModelFiles`] is what every loader (safetensors directory, GGUF, hub) returns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::quant::Frozen;

/// Source of the frozen weights by HF tensor name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    fn get(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    /// A frozen matrix (a linear layer's `[out, in]` weight, or an embedding table not tied to
    /// the head): quantized where the source keeps or quantizes it (`model.quantize`), dense
    /// otherwise.
    fn get_frozen(&self, name: &str, shape: &[usize]) -> anyhow::Result<Frozen> {
        Ok(Frozen::Dense(self.get(name, shape)?))
    }
}

/// A [`WeightSource`] seen from a module path, like candle-nn's `VarBuilder`:
/// `weights.pp("model.layers.0").pp("mlp").get("weight", ..)` reads
/// `model.layers.0.mlp.weight`. Lets each module build itself from its checkpoint names.
#[derive(Clone)]
pub struct Weights<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Weights<'a> {
    pub fn new(source: &'a dyn WeightSource) -> Self {
        Self {
            source,
            prefix: String::new(),
        }
    }

    /// The module `name` under this one.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights<'a> {
        Weights {
            source: self.source,
            prefix: self.path(&name.to_string()),
        }
    }

    /// The tensor `name` of this module, of `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        self.source.get(&self.path(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.path(name))
    }

    /// The frozen weight `name` of this linear module (see [`WeightSource::get_frozen`]).
    pub fn get_frozen(&self, name: &str, shape: &[usize]) -> anyhow::Result<Frozen> {
        self.source.get_frozen(&self.path(name), shape)
    }

    /// The last part of the module path (`q_proj`): what PEFT's `target_modules` name.
    pub fn module(&self) -> &str {
        self.prefix.rsplit('.').next().unwrap_or_default()
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}

/// A loaded checkpoint, whatever its source.
pub struct ModelFiles {
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    /// Where the tokenizer comes from, for `Tokenizer::from_dir`: the directory holding
    /// `tokenizer.json` and friends (the hub snapshot for hub ids), or for GGUF the `.gguf` file
    /// itself (its metadata holds the tokenizer unless a `tokenizer.json` sits beside it).
    pub dir: PathBuf,
}

/// Safetensors files, memory-mapped; tensors are converted to the model dtype on access.
pub struct SafetensorsWeights {
    pub(super) files: MmapedSafetensors,
    pub(super) device: Device,
    pub(super) dtype: DType,
    pub(super) origin: String,
    /// Linear weights are quantized to this format at load (`--quantize q8_0|q4_k`).
    pub(super) quantize: Option<GgmlDType>,
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .files
            .load(name, &self.device)
            .with_context(|| format!("tensor `{name}` missing from {}", self.origin))?;
        check_shape(&t, name, shape, &self.origin)?;
        Ok(t.to_dtype(self.dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    fn get_frozen(&self, name: &str, shape: &[usize]) -> Result<Frozen> {
        match self.quantize {
            Some(format) => Frozen::quantize(&self.get(name, shape)?, format, name),
            None => Ok(Frozen::Dense(self.get(name, shape)?)),
        }
    }
}

/// Tensors already in memory (GGUF after dequantisation, generated weights in benches).
pub struct TensorMap {
    pub tensors: HashMap<String, Tensor>,
    /// Linear weights and an untied embedding table kept quantized (a GGUF's with `--quantize
    /// keep`, generated ones in the quantized bench), by HF name; they are not in `tensors`.
    pub quantized: HashMap<String, Arc<QTensor>>,
    /// Dense linear weights are quantized to this format when read.
    pub quantize: Option<GgmlDType>,
    pub dtype: DType,
    pub origin: String,
}

impl TensorMap {
    /// Dense tensors only, used as they are.
    pub fn dense(tensors: HashMap<String, Tensor>, dtype: DType, origin: String) -> Self {
        Self {
            tensors,
            quantized: HashMap::new(),
            quantize: None,
            dtype,
            origin,
        }
    }
}

impl WeightSource for TensorMap {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor `{name}` missing from {}", self.origin))?;
        check_shape(t, name, shape, &self.origin)?;
        Ok(t.to_dtype(self.dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    fn get_frozen(&self, name: &str, shape: &[usize]) -> Result<Frozen> {
        if let Some(q) = self.quantized.get(name) {
            if q.shape().dims() != shape {
                bail!(
                    "tensor `{name}` in {} has shape {:?}, the config implies {shape:?}",
                    self.origin,
                    q.shape().dims()
                );
            }
            return Ok(Frozen::Quantized(q.clone()));
        }
        match self.quantize {
            Some(format) => Frozen::quantize(&self.get(name, shape)?, format, name),
            None => Ok(Frozen::Dense(self.get(name, shape)?)),
        }
    }
}

fn check_shape(t: &Tensor, name: &str, shape: &[usize], origin: &str) -> Result<()> {
    if t.dims() != shape {
        bail!(
            "tensor `{name}` in {origin} has shape {:?}, the config implies {shape:?}",
            t.dims()
        );
    }
    Ok(())
}
