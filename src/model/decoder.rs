//! The Llama-family decoder (Llama 2/3, Qwen2/2.5, Qwen3) with LoRA built in.
//!
//! One file with switches, in the style of candle-transformers' model files: attention biases
//! (Qwen2), per-head q/k RMS-norm (Qwen3), tied embeddings, RoPE theta and Llama-3 scaling, GQA.
//!
//! There are two forwards, because candle's fused kernels have no backward (see
//! `shared/spec/model.md`):
//! * [`Decoder::forward_shared`] (and [`Decoder::forward_train`], its case without shared
//!   prompts): differentiable ops only ([`super::fused`]'s kernels, matmul), all positions, for
//!   log-probs with or without gradient. Each prompt is computed once for the rows that continue
//!   it. Batches are right-padded: with a causal mask, padding at the end of a row is never
//!   attended to by the real tokens before it, and every row keeps its true positions.
//! * [`Decoder::forward_step`]: sampling, with fused kernels, per-row positions (prompts are
//!   left-padded), a key-padding mask and a preallocated [`KvCache`].
//!
//! Grouped-query attention never materialises repeated keys: the `n_rep` query heads that share
//! a key head are folded into the row dimension of one matmul.

use super::config::Config;
use super::fused;
use super::lora::{Adapter, LoraLinear, Pass};
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::ops::{rms_norm, softmax_last_dim};
use candle_nn::rotary_emb::rope;

/// Source of the frozen weights by HF tensor name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    fn get(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
}

/// Which linear layers get an adapter, and how big.
pub struct LoraSpec<'a> {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names as in PEFT's `target_modules` (`q_proj`, ..., `down_proj`).
    pub targets: &'a [String],
    pub rng: &'a mut rand_chacha::ChaCha8Rng,
}

/// The module names an adapter can target.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// A sampling copy of the weights: each linear layer's frozen weight with its adapter merged
/// in, and the LM head, in the sampling dtype. [`super::Policy::sampling_weights`] keeps it
/// only while the adapters it was merged from are unchanged, so it is never stale. See
/// [`Decoder::sample_weights`].
pub struct SampleWeights {
    /// Per layer, in [`LORA_MODULES`] order.
    layers: Vec<[Tensor; 7]>,
    lm_head: Tensor,
}

/// How one forward applies its linear layers.
#[derive(Clone, Copy)]
enum Linears<'a> {
    /// Frozen weight plus the LoRA branch, as `pass` says.
    Lora(&'a Pass<'a>),
    /// Merged sampling weights (in [`LORA_MODULES`] order) for products of few rows, where
    /// reading the weights is the whole cost; the LoRA path for longer ones (prefill).
    Merged(&'a Pass<'a>, &'a [Tensor; 7]),
}

impl Linears<'_> {
    /// `x · Wᵀ` through the layer `lin`, the `slot`-th of [`LORA_MODULES`].
    fn apply(self, lin: &LoraLinear, slot: usize, x: &Tensor) -> Result<Tensor> {
        match self {
            Linears::Merged(_, w) if few_rows(x) => lin.forward_merged(x, &w[slot]),
            Linears::Merged(pass, _) | Linears::Lora(pass) => lin.forward(x, pass),
        }
    }
}

/// Whether a product of `x` (`[..., in]`) reads merged sampling weights: few rows, where
/// reading the weights is the whole cost (see [`super::gemv`]).
fn few_rows(x: &Tensor) -> bool {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    rows <= super::gemv::MAX_ROWS
}

/// Slots of [`LORA_MODULES`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The whole model: frozen weights, adapters, rotary tables.
pub struct Decoder {
    cfg: Config,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
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
        cfg: &Config,
        weights: &dyn WeightSource,
        device: &Device,
        dtype: DType,
        mut lora: Option<LoraSpec>,
    ) -> anyhow::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings || !weights.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            weights.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let mut linear = |prefix: &str, name: &str, i: usize, o: usize, bias: bool| {
            let p = format!("{prefix}.{name}");
            let w = weights.get(&format!("{p}.weight"), &[o, i])?;
            let b = if bias {
                Some(weights.get(&format!("{p}.bias"), &[o])?)
            } else {
                None
            };
            let adapter = match lora.as_mut() {
                Some(l) if l.targets.iter().any(|t| t == name) => {
                    Some(Adapter::for_weight(&w, l.r, l.alpha, l.dropout, l.rng)?)
                }
                _ => None,
            };
            anyhow::Ok(LoraLinear::new(w, b, adapter))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let a = format!("model.layers.{l}.self_attn");
            let m = format!("model.layers.{l}.mlp");
            let self_attn = Attention {
                q_proj: linear(&a, "q_proj", h, nh * hd, cfg.qkv_bias)?,
                k_proj: linear(&a, "k_proj", h, nkv * hd, cfg.qkv_bias)?,
                v_proj: linear(&a, "v_proj", h, nkv * hd, cfg.qkv_bias)?,
                o_proj: linear(&a, "o_proj", nh * hd, h, cfg.o_bias)?,
                q_norm: cfg
                    .qk_norm
                    .then(|| weights.get(&format!("{a}.q_norm.weight"), &[hd]))
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| weights.get(&format!("{a}.k_norm.weight"), &[hd]))
                    .transpose()?,
            };
            let mlp = Mlp {
                gate_proj: linear(&m, "gate_proj", h, cfg.intermediate_size, false)?,
                up_proj: linear(&m, "up_proj", h, cfg.intermediate_size, false)?,
                down_proj: linear(&m, "down_proj", cfg.intermediate_size, h, false)?,
            };
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_layernorm: weights.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn,
                post_attention_layernorm: weights
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let norm = weights.get("model.norm.weight", &[h])?;
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
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos: table(cos)?,
            sin: table(sin)?,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Longest sequence the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Every adapted linear layer by HF module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            let named = [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ];
            out.extend(
                named
                    .into_iter()
                    .map(|(n, lin)| (format!("model.layers.{i}.{n}"), lin)),
            );
        }
        out
    }

    /// Final hidden states `[B, T, hidden]` of a right-padded batch `tokens` `[B, T]`,
    /// differentiable w.r.t. the adapters when `pass.grad`.
    pub fn forward_train(&self, tokens: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let batch = SharedBatch {
            prefixes: tokens.clone(),
            prefix_lens: vec![t; b],
            tails: Tensor::zeros((0, 0), DType::U32, &self.device)?,
            prefix_of: Vec::new(),
        };
        self.forward_shared(&batch, pass)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Final hidden states of a batch whose rows share prompts, differentiable w.r.t. the
    /// adapters when `pass.grad`: `[k·P + B·C, hidden]`, the `k × P` prefix positions row by
    /// row, then the `B × C` tail positions.
    ///
    /// Why: a group's G completions continue one prompt, and prompts are long (a Mathlib
    /// header and instructions: hundreds of tokens). Each prompt's positions go through the
    /// model once instead of G times, forward and backward, and the attention scores kept for
    /// the backward are `C × (P + C)` per row instead of `(P + C)²`.
    pub fn forward_shared(&self, batch: &SharedBatch, pass: &Pass) -> Result<Tensor> {
        let (k, p) = batch.prefixes.dims2()?;
        let (bt, c) = batch.tails.dims2()?;
        if batch.prefix_lens.len() != k || batch.prefix_of.len() != bt {
            candle_core::bail!(
                "{k} prefixes with {} lengths, {bt} tails with {} prefix indices",
                batch.prefix_lens.len(),
                batch.prefix_of.len()
            );
        }
        if let Some(&u) = batch.prefix_of.iter().find(|&&u| u >= k) {
            candle_core::bail!("a tail continues prefix {u} of {k}");
        }
        let tail_pos: Vec<u32> = batch
            .prefix_of
            .iter()
            .flat_map(|&u| (0..c).map(move |j| (batch.prefix_lens[u] + j) as u32))
            .collect();
        let longest = tail_pos.iter().map(|&q| q as usize + 1).max().unwrap_or(0);
        if p.max(longest) > self.max_positions() {
            candle_core::bail!(
                "sequence of {} tokens exceeds the {} positions of the model",
                p.max(longest),
                self.max_positions()
            );
        }
        let (np, nt) = (k * p, bt * c);
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let tokens = Tensor::cat(
            &[batch.prefixes.flatten_all()?, batch.tails.flatten_all()?],
            0,
        )?;
        let mut x = self.embed_tokens.index_select(&tokens, 0)?;
        let (cos_p, sin_p) = (self.cos.narrow(0, 0, p)?, self.sin.narrow(0, 0, p)?);
        let prefix_mask = causal_mask(p, &self.device, self.dtype)?;
        let tail = if nt == 0 {
            None
        } else {
            let pos = Tensor::new(tail_pos.as_slice(), &self.device)?;
            let table = |t: &Tensor| t.index_select(&pos, 0)?.reshape((bt, c, hd / 2));
            let rows = Tensor::new(
                batch
                    .prefix_of
                    .iter()
                    .map(|&u| u as u32)
                    .collect::<Vec<_>>(),
                &self.device,
            )?;
            let lens: Vec<usize> = batch
                .prefix_of
                .iter()
                .map(|&u| batch.prefix_lens[u])
                .collect();
            let mask = tail_mask(&lens, p, c, &self.device, self.dtype)?;
            Some((table(&self.cos)?, table(&self.sin)?, rows, mask))
        };
        // `[rows, heads·d]` → `[b, heads, t, d]` for the `b × t` positions from `start`.
        let heads = |x: &Tensor, start: usize, b: usize, t: usize, n: usize| {
            x.narrow(0, start, b * t)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)
        };
        let eps = self.cfg.rms_norm_eps as f32;
        for layer in &self.layers {
            let lin = Linears::Lora(pass);
            let h = fused::rms_norm(&x, &layer.input_layernorm, eps)?;
            let (q, kk, v) = self.qkv(&layer.self_attn, &h, lin, false)?;
            let qp = fused::rope(&heads(&q, 0, k, p, nh)?, &cos_p, &sin_p)?;
            let kp = fused::rope(&heads(&kk, 0, k, p, nkv)?, &cos_p, &sin_p)?;
            let vp = heads(&v, 0, k, p, nkv)?.contiguous()?;
            let mut o = self
                .attend(&qp, &kp, &vp, Some(&prefix_mask), false)?
                .reshape((np, nh * hd))?;
            if let Some((cos_t, sin_t, rows, mask)) = &tail {
                let qt = fused::rope(&heads(&q, np, bt, c, nh)?, cos_t, sin_t)?;
                let kt = fused::rope(&heads(&kk, np, bt, c, nkv)?, cos_t, sin_t)?;
                let vt = heads(&v, np, bt, c, nkv)?.contiguous()?;
                // Each tail row attends to its prefix's keys, then to its own.
                let keys = Tensor::cat(&[&kp.index_select(rows, 0)?, &kt], 2)?;
                let values = Tensor::cat(&[&vp.index_select(rows, 0)?, &vt], 2)?;
                let ot = self.attend(&qt, &keys, &values, Some(mask), false)?;
                o = Tensor::cat(&[o, ot.reshape((nt, nh * hd))?], 0)?;
            }
            x = (x + lin.apply(&layer.self_attn.o_proj, O, &o)?)?;
            let h = fused::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            x = (&x + self.mlp(&layer.mlp, &h, lin)?)?;
        }
        fused::rms_norm(&x, &self.norm, eps)
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
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                let merge = |lin: &LoraLinear| lin.merged_weight(adapters, dtype);
                Ok([
                    merge(&a.q_proj)?,
                    merge(&a.k_proj)?,
                    merge(&a.v_proj)?,
                    merge(&a.o_proj)?,
                    merge(&m.gate_proj)?,
                    merge(&m.up_proj)?,
                    merge(&m.down_proj)?,
                ])
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
        if cache.rows != n || key_pad.len() != n {
            candle_core::bail!(
                "cache has {} rows, step has {n} tokens rows and {} pads",
                cache.rows,
                key_pad.len()
            );
        }
        let start = cache.len;
        if start + t > cache.max_len {
            candle_core::bail!("KV cache full: {start} + {t} > {}", cache.max_len);
        }
        let pass = Pass::inference(adapters);
        let hd = self.cfg.head_dim;
        let hd2 = hd / 2;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((n, t, hd2))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((n, t, hd2))?;
        let total = start + t;
        let mask = step_mask(key_pad, start, t, &self.device, self.dtype)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = self.embed(tokens)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let lin = match merged {
                Some(m) => Linears::Merged(&pass, &m.layers[li]),
                None => Linears::Lora(&pass),
            };
            let h = rms_norm(&x.contiguous()?, &layer.input_layernorm, eps)?;
            let (q, k, v) = self.qkv(&layer.self_attn, &h, lin, true)?;
            let heads = |x: &Tensor| x.reshape((n, t, (), hd))?.transpose(1, 2);
            let (q, k, v) = (heads(&q)?, heads(&k)?, heads(&v)?);
            let q = rope(&q.contiguous()?, &cos, &sin)?;
            let k = rope(&k.contiguous()?, &cos, &sin)?;
            let (ck, cv) = &cache.layers[li];
            let (ck, cv) = (ck.narrow(0, 0, n)?, cv.narrow(0, 0, n)?);
            ck.slice_set(&k, 2, start)?;
            cv.slice_set(&v.contiguous()?, 2, start)?;
            let k_all = ck.narrow(2, 0, total)?;
            let v_all = cv.narrow(2, 0, total)?;
            let o = match super::attention::decode_step(&q, &k_all, &v_all, key_pad)? {
                Some(o) => o,
                None => self.attend(&q, &k_all, &v_all, mask.as_ref(), true)?,
            };
            x = (x + lin.apply(&layer.self_attn.o_proj, O, &o)?)?;
            let h = rms_norm(&x.contiguous()?, &layer.post_attention_layernorm, eps)?;
            x = (&x + self.mlp(&layer.mlp, &h, lin)?)?;
        }
        cache.len = total;
        let last = x.i((.., t - 1, ..))?.contiguous()?;
        let last = rms_norm(&last, &self.norm, eps)?;
        let head = match merged {
            Some(m) if few_rows(&last) => &m.lm_head,
            _ => &self.lm_head,
        };
        super::ops::frozen_matmul(&last, head)?.to_dtype(DType::F32)
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let ids = tokens.flatten_all()?;
        self.embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Projections of `h` `[..., hidden]`, flattened to `[rows, heads·head_dim]`, with
    /// Qwen3's per-head q/k norm.
    fn qkv(
        &self,
        a: &Attention,
        h: &Tensor,
        lin: Linears,
        sampling: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hd = self.cfg.head_dim;
        let eps = self.cfg.rms_norm_eps as f32;
        let rows = h.elem_count() / self.cfg.hidden_size;
        let flat = |x: Tensor| x.reshape((rows, ()));
        let mut q = flat(lin.apply(&a.q_proj, Q, h)?)?;
        let mut k = flat(lin.apply(&a.k_proj, K, h)?)?;
        let v = flat(lin.apply(&a.v_proj, V, h)?)?;
        let norm = |x: &Tensor, w: &Tensor| {
            let heads = x.reshape((rows, (), hd))?;
            let y = if sampling {
                rms_norm(&heads.contiguous()?, w, eps)?
            } else {
                fused::rms_norm(&heads, w, eps)?
            };
            y.reshape((rows, ()))
        };
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = norm(&q, qn)?;
            k = norm(&k, kn)?;
        }
        Ok((q, k, v))
    }

    /// Scaled dot-product attention with GQA folding. `q` `[b, H, t, d]`, `k`/`v`
    /// `[b, KV, L, d]`, `mask` broadcastable to `[b, H, t, L]`. Returns `[b, t, H·d]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        sampling: bool,
    ) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, l, _) = k.dims4()?;
        let rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let mut scores = scores.reshape((b, nh, t, l))?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let p = if sampling {
            softmax_last_dim(&scores)?
        } else {
            fused::softmax_last_dim(&scores)?
        };
        let o = p.reshape((b, nkv, rep * t, l))?.matmul(v)?;
        o.reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))
    }

    fn mlp(&self, m: &Mlp, h: &Tensor, lin: Linears) -> Result<Tensor> {
        let gate = lin.apply(&m.gate_proj, GATE, h)?;
        let up = lin.apply(&m.up_proj, UP, h)?;
        lin.apply(&m.down_proj, DOWN, &fused::swiglu(&gate, &up)?)
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

/// A training batch for [`Decoder::forward_shared`]: prompts, each computed once, and the rows
/// that continue them.
pub struct SharedBatch {
    /// `[k, P]` u32 prompts, right-padded.
    pub prefixes: Tensor,
    /// The true length of each prompt.
    pub prefix_lens: Vec<usize>,
    /// `[B, C]` u32 continuations, right-padded.
    pub tails: Tensor,
    /// Which prompt each continuation continues.
    pub prefix_of: Vec<usize>,
}

/// `[B, 1, C, P + C]` mask for tails after right-padded prefixes: key column `j < P` is
/// visible to row `r` when it is a real prefix token (`j < lens[r]`), tail column `P + j'`
/// when it is not in the future (`j' <= i`).
fn tail_mask(lens: &[usize], p: usize, c: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let mut m = Vec::with_capacity(lens.len() * c * (p + c));
    for &len in lens {
        for i in 0..c {
            m.extend((0..p).map(|j| if j < len { 0.0 } else { f32::NEG_INFINITY }));
            m.extend((0..c).map(|j| if j <= i { 0.0 } else { f32::NEG_INFINITY }));
        }
    }
    Tensor::from_vec(m, (lens.len(), 1, c, p + c), device)?.to_dtype(dtype)
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
    layers: Vec<(Tensor, Tensor)>,
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
