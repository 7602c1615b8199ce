//! The Llama-family decoder (Llama 2/3, Qwen2/2.5, Qwen3) with LoRA built in: embeddings, the
//! layers of `super::layer`, the final norm and the LM head, and the rotary tables and masks
//! the layers read.
//!
//! One architecture with switches, in the style of candle-transformers' model files: attention
//! biases (Qwen2), per-head q/k RMS-norm (Qwen3), tied embeddings, RoPE theta and Llama-3
//! scaling, GQA.
//!
//! Two entry points run the same layers with different `Kernels`, because candle's fused
//! kernels have no backward (see docs/design.md, the model section):
//! * [`Decoder::forward_shared`] (and [`Decoder::forward_train`], its case without shared
//!   prompts): differentiable kernels, all positions, for log-probs with or without gradient.
//!   Each prompt is computed once for the rows that continue it. Batches are right-padded:
//!   with a causal mask, padding at the end of a row is never attended to by the real tokens
//!   before it, and every row keeps its true positions.
//! * [`Decoder::forward_step`]: sampling, with candle's fused kernels, per-row positions
//!   (prompts are left-padded), a key-padding mask and a preallocated [`KvCache`].

use super::config::ModelConfig;
use super::layer::{
    few_rows, DecoderLayer, Kernels, KvLayer, LevelSpan, SharedSpan, Span, StepSpan,
};
pub use super::layer::{LoraSpec, LORA_MODULES};
use super::lora::{LoraLinear, Pass};
use super::quant::Frozen;
use super::weights::{WeightSource, Weights};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;

/// A sampling copy of the weights: each linear layer's frozen weight with its adapter merged
/// in, and the LM head, in the sampling dtype. [`super::Policy::sampling_weights`] keeps it
/// only while the adapters it was merged from are unchanged, so it is never stale. See
/// [`Decoder::sample_weights`].
pub struct SampleWeights {
    /// Per layer, in [`LORA_MODULES`] order.
    layers: Vec<[Tensor; 7]>,
    lm_head: Tensor,
}

/// The whole model: frozen weights, adapters, rotary tables.
pub struct Decoder {
    cfg: ModelConfig,
    /// `[vocab, hidden]`; quantized under `--quantize` when the head is not tied to it (a tied
    /// head needs it dense anyway, for the training products).
    embed_tokens: Frozen,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `[vocab, hidden]`; the embedding matrix itself when tied.
    lm_head: Tensor,
    /// `[max_positions, head_dim / 2]` in the model dtype.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

/// Rotary tables are built for at most this many positions (memory: 2 × 128k × head_dim/2).
const MAX_ROPE_POSITIONS: usize = 131_072;

impl Decoder {
    /// Builds the model from frozen weights; `lora` adds fresh adapters to the target modules.
    pub fn new(
        cfg: &ModelConfig,
        weights: &dyn WeightSource,
        device: &Device,
        dtype: DType,
        mut lora: Option<LoraSpec>,
    ) -> anyhow::Result<Self> {
        let h = cfg.hidden_size;
        let root = Weights::new(weights);
        let model = root.pp("model");
        let table = model.pp("embed_tokens");
        let shape = [cfg.vocab_size, h];
        let (embed_tokens, lm_head) = if cfg.tie_word_embeddings || !root.contains("lm_head.weight")
        {
            let tied = table.get("weight", &shape)?;
            (Frozen::Dense(tied.clone()), tied)
        } else {
            let head = root.get("lm_head.weight", &shape)?;
            (table.get_frozen("weight", &shape)?, head)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp(format!("layers.{i}")), lora.as_mut()))
            .collect::<anyhow::Result<_>>()?;
        let norm = model.pp("norm").get("weight", &[h])?;
        let (cos, sin) = rope_tables(cfg, device, dtype)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held by the linear layers' frozen weights (quantized or dense), and how many of
    /// those weights are quantized: what `--quantize` changes.
    pub fn frozen_linear_bytes(&self) -> (usize, usize) {
        let weights = self
            .layers
            .iter()
            .flat_map(|l| l.linears().map(|(_, lin)| lin.weight()));
        weights.fold((0, 0), |(bytes, quantized), w| {
            (bytes + w.bytes(), quantized + usize::from(w.is_quantized()))
        })
    }

    /// The embedding table, `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &Frozen {
        &self.embed_tokens
    }

    /// `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Longest sequence the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps as f32
    }

    /// Every adapted linear layer by HF module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let named = LORA_MODULES.iter().zip(layer.linears());
            out.extend(
                named.map(|(name, (parent, lin))| {
                    (format!("model.layers.{i}.{parent}.{name}"), lin)
                }),
            );
        }
        out
    }

    /// Final hidden states `[B, T, hidden]` of a right-padded batch `tokens` `[B, T]`,
    /// differentiable w.r.t. the adapters when `pass.grad`.
    pub fn forward_train(&self, tokens: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let batch = SharedBatch {
            levels: vec![BatchLevel {
                tokens: tokens.clone(),
                lens: vec![t; b],
                parent: Vec::new(),
            }],
        };
        self.forward_shared(&batch, pass)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Final hidden states of a batch whose rows share prompt tokens, differentiable w.r.t.
    /// the adapters when `pass.grad`: `[Σ n·W, hidden]`, the `n × W` positions of each level
    /// in turn, row by row.
    ///
    /// Why: a group's G completions continue one prompt, and prompts are long (a Mathlib
    /// header and instructions: hundreds of tokens), most of them the same for every theorem.
    /// Each shared token goes through the model once instead of once per row, forward and
    /// backward, and the attention scores kept for the backward are `C × (P + C)` per
    /// completion instead of `(P + C)²`.
    pub fn forward_shared(&self, batch: &SharedBatch, pass: &Pass) -> Result<Tensor> {
        let span = self.shared_span(batch)?;
        let tokens = batch.tokens()?;
        let mut x = self.embed_tokens.rows(&tokens, self.dtype)?;
        let kernels = Kernels::Train(pass);
        for layer in &self.layers {
            x = layer.forward(&x, Span::Shared(&span), kernels)?;
        }
        kernels.rms_norm(&x, &self.norm, self.eps())
    }

    /// [`Self::forward_shared`] with gradient checkpointing per layer: the layers run without a
    /// graph, each keeping only its input, and the returned hidden states hang off a leaf (the
    /// last layer's output) whose gradient [`Self::backward_checkpointed`] carries down through
    /// the layers, recomputing one layer at a time.
    ///
    /// Why: the graph of a training forward keeps every intermediate of every layer until the
    /// backward, above all the attention scores (several `heads × T × T` tensors per layer and
    /// prompt); checkpointed, the backward holds one layer's at a time, for one more forward.
    pub fn forward_checkpointed(
        &self,
        batch: &SharedBatch,
        pass: &Pass,
    ) -> Result<(Tensor, LayerTape)> {
        let span = SharedSpan {
            recompute_attention: false,
            ..self.shared_span(batch)?
        };
        let tokens = batch.tokens()?;
        let mut x = self.embed_tokens.rows(&tokens, self.dtype)?;
        let no_graph = Pass {
            adapters: pass.adapters,
            grad: false,
            dropout_rng: pass.dropout_rng,
        };
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut dropout = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            inputs.push(x.clone());
            dropout.push(rng_state(&no_graph));
            x = layer.forward(&x, Span::Shared(&span), Kernels::Train(&no_graph))?;
        }
        let top = Var::from_tensor(&x)?;
        let hidden = Kernels::Train(pass).rms_norm(top.as_tensor(), &self.norm, self.eps())?;
        let tape = LayerTape {
            span,
            inputs,
            dropout,
            top,
        };
        Ok((hidden, tape))
    }

    /// The adapters' gradients of a loss over [`Self::forward_checkpointed`]'s hidden states,
    /// from `grads` (the loss's own backward, which stops at the tape's leaf): each layer is
    /// run again from its saved input, with the dropout masks of the first run, and
    /// backpropagated alone. `pass` must be the one the forward ran with.
    pub fn backward_checkpointed(
        &self,
        tape: LayerTape,
        mut grads: GradStore,
        pass: &Pass,
    ) -> Result<GradStore> {
        let mut out = GradStore::default();
        let Some(mut g) = grads.remove(tape.top.as_tensor()) else {
            return Ok(out); // the loss does not depend on the model
        };
        drop(grads); // the rest are gradients of constants (the LM head's, say)
        let after_forward = rng_state(pass);
        for (l, layer) in self.layers.iter().enumerate().rev() {
            set_rng_state(pass, &tape.dropout[l]);
            // The embeddings are frozen: no gradient is needed below the first layer.
            let input = match l {
                0 => None,
                _ => Some(Var::from_tensor(&tape.inputs[l])?),
            };
            let x = input.as_ref().map_or(&tape.inputs[l], Var::as_tensor);
            let y = layer.forward(x, Span::Shared(&tape.span), Kernels::Train(pass))?;
            // d/dy of sum(y ⊙ g) is exactly g: the layer's backward gets the gradient from above.
            let mut layer_grads = (y * &g)?.sum_all()?.backward()?;
            if let Some(input) = &input {
                g = match layer_grads.remove(input.as_tensor()) {
                    Some(grad) => grad,
                    None => input.as_tensor().zeros_like()?,
                };
            }
            // Keep the adapters' gradients only: candle's backward also leaves gradients of
            // the graph's constants (the attention mask broadcast to heads × T × T, the rotary
            // tables), which would pile up layer after layer.
            let vars = layer
                .linears()
                .into_iter()
                .filter_map(|(_, lin)| lin.adapter());
            for var in vars.flat_map(|pair| [&pair.a, &pair.b]) {
                if let Some(grad) = layer_grads.remove(var.as_tensor()) {
                    out.insert(var.as_tensor(), grad);
                }
            }
        }
        set_rng_state(pass, &after_forward);
        Ok(out)
    }

    /// The positions, rotary tables and masks of `batch`, after checking it is consistent.
    fn shared_span(&self, batch: &SharedBatch) -> Result<SharedSpan> {
        let Some((root, rest)) = batch.levels.split_first() else {
            candle_core::bail!("a shared batch needs at least one level");
        };
        let (k, p) = root.tokens.dims2()?;
        self.check_level(0, root, k, p, None)?;
        self.check_positions(p)?;
        // Per row of the level before: where its continuation starts, and which of its key
        // columns (its ancestors' and its own, padded) hold real tokens.
        let mut ends = root.lens.clone();
        let mut real: Vec<Vec<bool>> = root.lens.iter().map(|&n| real_columns(n, p)).collect();
        let mut levels = Vec::with_capacity(rest.len());
        for (l, level) in rest.iter().enumerate() {
            let (n, c) = level.tokens.dims2()?;
            self.check_level(l + 1, level, n, c, Some(ends.len()))?;
            if n * c == 0 {
                if l + 1 < rest.len() {
                    candle_core::bail!("level {} is empty and continued", l + 1);
                }
                break;
            }
            let pos: Vec<u32> = (level.parent.iter())
                .flat_map(|&u| (ends[u]..ends[u] + c).map(|q| q as u32))
                .collect();
            self.check_positions(pos.iter().map(|&q| q as usize + 1).max().unwrap_or(0))?;
            levels.push(self.level_span(level, &pos, &real, c)?);
            real = (level.parent.iter().zip(&level.lens))
                .map(|(&u, &len)| [&real[u][..], &real_columns(len, c)].concat())
                .collect();
            ends = (level.parent.iter().zip(&level.lens))
                .map(|(&u, &len)| ends[u] + len)
                .collect();
        }
        Ok(SharedSpan {
            roots: k,
            root_len: p,
            cos: self.cos.narrow(0, 0, p)?,
            sin: self.sin.narrow(0, 0, p)?,
            mask: causal_mask(p, &self.device, self.dtype)?,
            levels,
            recompute_attention: true,
        })
    }

    /// Level `l` of a shared batch has `n` rows of width `w`, a length per row within it and,
    /// below level 0, a parent per row among the `parents` rows of the level before.
    fn check_level(
        &self,
        l: usize,
        level: &BatchLevel,
        n: usize,
        w: usize,
        parents: Option<usize>,
    ) -> Result<()> {
        if level.lens.len() != n || level.parent.len() != parents.map_or(0, |_| n) {
            candle_core::bail!(
                "level {l}: {n} rows with {} lengths and {} parents",
                level.lens.len(),
                level.parent.len()
            );
        }
        if let Some(&len) = level.lens.iter().find(|&&len| len > w) {
            candle_core::bail!("level {l}: a row of {len} tokens in a width of {w}");
        }
        match (parents, level.parent.iter().max()) {
            (Some(k), Some(&u)) if u >= k => {
                candle_core::bail!("level {l}: a row continues row {u} of {k}")
            }
            _ => Ok(()),
        }
    }

    fn check_positions(&self, longest: usize) -> Result<()> {
        if longest > self.max_positions() {
            candle_core::bail!(
                "sequence of {longest} tokens exceeds the {} positions of the model",
                self.max_positions()
            );
        }
        Ok(())
    }

    /// A level of `c` positions per row, at positions `pos` (row by row), whose rows attend to
    /// the real key columns `real` of their parents.
    fn level_span(
        &self,
        level: &BatchLevel,
        pos: &[u32],
        real: &[Vec<bool>],
        c: usize,
    ) -> Result<LevelSpan> {
        let n = level.parent.len();
        let at = Tensor::new(pos, &self.device)?;
        let half = self.cfg.head_dim / 2;
        let table = |t: &Tensor| t.index_select(&at, 0)?.reshape((n, c, half));
        let rows: Vec<u32> = level.parent.iter().map(|&u| u as u32).collect();
        let parents: Vec<&[bool]> = level.parent.iter().map(|&u| &real[u][..]).collect();
        Ok(LevelSpan {
            rows: Tensor::new(rows, &self.device)?,
            len: c,
            cos: table(&self.cos)?,
            sin: table(&self.sin)?,
            mask: continuation_mask(&parents, c, &self.device, self.dtype)?,
        })
    }

    /// Logits `[..., vocab]` of hidden states (no gradient to the LM head).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        super::ops::frozen_matmul(hidden, &self.lm_head)
    }

    /// The sampling copy of the weights in `dtype`, adapters merged in when `adapters`.
    ///
    /// Why: a decoded token reads every weight once, and a LoRA branch per linear layer adds
    /// two small matmuls each (on the CPU a third of a Qwen2.5-0.5B-shaped step); merged, a
    /// step is one product per layer. In f16 on the CPU (`gemv`'s f16 kernel) it also reads
    /// half the bytes. Memory: one more copy of the frozen weights while sampling.
    pub fn sample_weights(&self, dtype: DType, adapters: bool) -> Result<SampleWeights> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let [q, k, v, o, gate, up, down] = layer
                    .linears()
                    .map(|(_, lin)| lin.merged_weight(adapters, dtype));
                Ok([q?, k?, v?, o?, gate?, up?, down?])
            })
            .collect::<Result<_>>()?;
        Ok(SampleWeights {
            layers,
            lm_head: super::lora::sampling_copy(&self.lm_head, None, dtype)?,
        })
    }

    /// One sampling step: `tokens` `[N, t]` at `positions` `[N, t]` (u32, per row), appended to
    /// `cache` at its current length. `key_pad` gives, per row, how many leading cache columns
    /// are padding (left-padded prompts). `merged`: sampling weights from
    /// [`Self::sample_weights`], used by products of few rows. Returns the logits of the last
    /// position, `[N, vocab]`.
    pub fn forward_step(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        key_pad: &[usize],
        cache: &mut KvCache,
        adapters: bool,
        merged: Option<&SampleWeights>,
    ) -> Result<Tensor> {
        let (n, t) = tokens.dims2()?;
        let span = self.step_span(cache, (n, t), positions, key_pad)?;
        let pass = Pass::inference(adapters);
        let mut x = self.embed(tokens)?;
        for (i, (layer, kv)) in self.layers.iter().zip(&cache.layers).enumerate() {
            let kernels = Kernels::Decode(&pass, merged.map(|m| &m.layers[i]));
            x = layer.forward(&x, Span::Step(&span, kv), kernels)?;
        }
        cache.len = span.start + t;
        let last = x.i((.., t - 1, ..))?.contiguous()?;
        let last = Kernels::Decode(&pass, None).rms_norm(&last, &self.norm, self.eps())?;
        let head = match merged {
            Some(m) if few_rows(&last) => &m.lm_head,
            _ => &self.lm_head,
        };
        super::ops::frozen_matmul(&last, head)?.to_dtype(DType::F32)
    }

    /// The span of `n × t` step tokens at `positions` appended to `cache`, after checking
    /// they fit it.
    fn step_span<'a>(
        &self,
        cache: &KvCache,
        (n, t): (usize, usize),
        positions: &Tensor,
        key_pad: &'a [usize],
    ) -> Result<StepSpan<'a>> {
        if cache.rows != n || key_pad.len() != n || cache.layers.len() != self.layers.len() {
            candle_core::bail!(
                "cache has {} rows and {} layers, step has {n} tokens rows, {} pads and {} layers",
                cache.rows,
                cache.layers.len(),
                key_pad.len(),
                self.layers.len()
            );
        }
        if t == 0 {
            candle_core::bail!("a decoding step needs at least one token per row");
        }
        let start = cache.len;
        if start + t > cache.max_len {
            candle_core::bail!("KV cache full: {start} + {t} > {}", cache.max_len);
        }
        let flat = positions.flatten_all()?;
        let half = self.cfg.head_dim / 2;
        let table = |x: &Tensor| x.index_select(&flat, 0)?.reshape((n, t, half));
        Ok(StepSpan {
            rows: n,
            len: t,
            start,
            cos: table(&self.cos)?,
            sin: table(&self.sin)?,
            mask: step_mask(key_pad, start, t, &self.device, self.dtype)?,
            key_pad,
        })
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let ids = tokens.flatten_all()?;
        self.embed_tokens
            .rows(&ids, self.dtype)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// An empty cache for `rows` sequences of up to `max_len` tokens.
    pub fn new_cache(&self, rows: usize, max_len: usize) -> Result<KvCache> {
        let shape = (
            rows,
            self.cfg.num_key_value_heads,
            max_len,
            self.cfg.head_dim,
        );
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            rows,
            len: 0,
            max_len,
        })
    }
}

/// `[max_positions, head_dim / 2]` cos and sin tables in `dtype`.
fn rope_tables(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let positions = cfg.max_position_embeddings.min(MAX_ROPE_POSITIONS);
    let inv_freq = cfg.rope_inv_freq();
    let mut cos = Vec::with_capacity(positions * inv_freq.len());
    let mut sin = Vec::with_capacity(positions * inv_freq.len());
    for p in 0..positions {
        for f in &inv_freq {
            // f32 product like transformers, so long positions round the same way.
            let angle = (p as f32 * *f as f32) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let table =
        |v: Vec<f32>| Tensor::from_vec(v, (positions, inv_freq.len()), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}

/// A training batch for [`Decoder::forward_shared`]: levels of token rows, each row computed
/// once; a row of a later level continues a row of the level before and attends to its keys
/// and its ancestors' (how rows are split into levels: src/model/prefix.rs).
pub struct SharedBatch {
    /// Level 0, whose rows attend causally to themselves, then the levels that continue it.
    pub levels: Vec<BatchLevel>,
}

/// One level of a [`SharedBatch`].
pub struct BatchLevel {
    /// `[n, W]` u32 rows, right-padded.
    pub tokens: Tensor,
    /// The true length of each row.
    pub lens: Vec<usize>,
    /// The row of the level before that each row continues (empty at level 0).
    pub parent: Vec<usize>,
}

impl SharedBatch {
    /// Every level's tokens, flattened in order: the rows the layers compute.
    fn tokens(&self) -> Result<Tensor> {
        let flat = (self.levels.iter())
            .map(|l| l.tokens.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)
    }
}

/// What [`Decoder::backward_checkpointed`] needs of a checkpointed forward.
pub struct LayerTape {
    span: SharedSpan,
    /// The input of each layer, without graph.
    inputs: Vec<Tensor>,
    /// The dropout RNG before each layer ran, so its recomputation draws the same masks.
    dropout: Vec<Option<ChaCha8Rng>>,
    /// The last layer's output, as a leaf: the loss's own backward ends here.
    top: Var,
}

fn rng_state(pass: &Pass) -> Option<ChaCha8Rng> {
    pass.dropout_rng
        .map(|rng| rng.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

fn set_rng_state(pass: &Pass, state: &Option<ChaCha8Rng>) {
    if let (Some(rng), Some(state)) = (pass.dropout_rng, state) {
        *rng.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
    }
}

/// `[n, 1, c, W + c]` mask for the rows of a level, each after its parent's `W` key columns:
/// parent column `j` is visible to row `r` when it holds a real token (`parents[r][j]`), the
/// row's own column `j'` when it is not in the future (`j' <= i`).
fn continuation_mask(
    parents: &[&[bool]],
    c: usize,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let w = parents.first().map_or(0, |r| r.len());
    let mut m = Vec::with_capacity(parents.len() * c * (w + c));
    for real in parents {
        for i in 0..c {
            m.extend(
                real.iter()
                    .map(|&r| if r { 0.0 } else { f32::NEG_INFINITY }),
            );
            m.extend((0..c).map(|j| if j <= i { 0.0 } else { f32::NEG_INFINITY }));
        }
    }
    Tensor::from_vec(m, (parents.len(), 1, c, w + c), device)?.to_dtype(dtype)
}

/// Which of `w` right-padded columns hold the `len` real tokens.
fn real_columns(len: usize, w: usize) -> Vec<bool> {
    (0..w).map(|j| j < len).collect()
}

/// `[t, t]`: 0 on and below the diagonal, −∞ above.
fn causal_mask(t: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, t), device)?.to_dtype(dtype)
}

/// `[n, 1, t, start + t]` mask for a cached step, or `None` when nothing is masked. Key column
/// `j` is hidden from row `r`, query `i` when it is padding (`j < pad[r]`) or in the future
/// (`j > start + i`). A padding query keeps its own column so its softmax stays finite.
fn step_mask(
    pad: &[usize],
    start: usize,
    t: usize,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let total = start + t;
    if t == 1 && pad.iter().all(|&p| p == 0) {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(pad.len() * t * total);
    for &p in pad {
        for i in 0..t {
            let q = start + i;
            m.extend((0..total).map(|j| {
                let hidden = j > q || (j < p && j != q);
                if hidden {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            }));
        }
    }
    Ok(Some(
        Tensor::from_vec(m, (pad.len(), 1, t, total), device)?.to_dtype(dtype)?,
    ))
}

/// Preallocated keys and values, `[rows, kv_heads, max_len, head_dim]` per layer. All rows
/// share the write column `len`; rows whose sequence finished are dropped with [`Self::retain`].
pub struct KvCache {
    layers: Vec<KvLayer>,
    rows: usize,
    len: usize,
    max_len: usize,
}

impl KvCache {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A new cache of `max_len` columns whose row `i` is a copy of row `from[i]` of `self`:
    /// this is how the G completions of a prompt share its prefill.
    pub fn expand(&self, from: &[usize], max_len: usize) -> Result<KvCache> {
        if max_len < self.len {
            candle_core::bail!(
                "cannot shrink a KV cache from {} to {max_len} columns",
                self.len
            );
        }
        let Some((k0, _)) = self.layers.first() else {
            return Ok(KvCache {
                layers: Vec::new(),
                rows: from.len(),
                len: self.len,
                max_len,
            });
        };
        let idx = Tensor::from_vec(
            from.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            from.len(),
            k0.device(),
        )?;
        let (_, kv, _, hd) = k0.dims4()?;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                let grow = |src: &Tensor| -> Result<Tensor> {
                    let used = src
                        .narrow(0, 0, self.rows)?
                        .narrow(2, 0, self.len)?
                        .index_select(&idx, 0)?;
                    let dst =
                        Tensor::zeros((from.len(), kv, max_len, hd), src.dtype(), src.device())?;
                    dst.slice_set(&used.contiguous()?, 2, 0)?;
                    Ok(dst)
                };
                Ok((grow(k)?, grow(v)?))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            rows: from.len(),
            len: self.len,
            max_len,
        })
    }

    /// Keeps the rows `keep` (ascending) in that order, moving them down in place.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&r| r >= self.rows) {
            candle_core::bail!(
                "retain: rows {keep:?} are not ascending rows of {}",
                self.rows
            );
        }
        for (new, &old) in keep.iter().enumerate() {
            if new == old {
                continue;
            }
            for (k, v) in &self.layers {
                for t in [k, v] {
                    let row = t.narrow(0, old, 1)?.copy()?;
                    t.slice_set(&row, 0, new)?;
                }
            }
        }
        self.rows = keep.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::TensorMap;

    #[test]
    fn weights_read_tensors_by_their_full_checkpoint_path() {
        let name = "model.layers.3.mlp.up_proj.weight";
        let source = TensorMap::dense(
            [(
                name.to_string(),
                Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
            )]
            .into(),
            DType::F32,
            "a test map".into(),
        );
        let up = Weights::new(&source)
            .pp("model")
            .pp(format!("layers.{}", 3))
            .pp("mlp")
            .pp("up_proj");
        assert_eq!(up.module(), "up_proj");
        assert!(up.contains("weight") && !up.contains("bias"));
        assert_eq!(up.get("weight", &[2, 3]).unwrap().dims(), [2, 3]);
        let err = format!("{:#}", up.get("bias", &[2]).unwrap_err());
        assert!(err.contains("model.layers.3.mlp.up_proj.bias"), "{err}");
    }
}
