//! One decoder layer, in the shape of candle-transformers' `models/qwen2.rs`: [`Attention`],
//! [`Mlp`] and [`DecoderLayer`], each built from its checkpoint names with
//! `new(cfg, weights.pp(..), lora)` and run by its own `forward`.
//!
//! Training, shared-prompt scoring and decoding run the same layer body. What differs between
//! them is said by two values built once per forward by [`super::decoder::Decoder`]: a [`Span`]
//! (which positions the rows hold and what they attend to) and [`Kernels`] (which kernels and
//! weights compute it). [`Kernels`], with [`Math`] (its kernels without the adapters), is the only
//! place in a layer that picks a kernel.

use super::attention;
use super::config::ModelConfig;
use super::fused;
use super::lora::{LoraLinear, LoraPair, Pass};
use super::recompute::recompute3;
use super::weights::Weights;
use candle_core::{Result, Tensor};
use candle_nn::ops::{rms_norm, softmax_last_dim};
use candle_nn::rotary_emb::rope;

/// The module names an adapter can target, in the order of a layer's linear layers: the order
/// of `DecoderLayer::linears`, of the merged sampling weights and of the default
/// `lora.target_modules`.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Slots of [`LORA_MODULES`] (a unit test holds them to the names).
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Which linear layers get an adapter, and how big.
pub struct LoraSpec<'a> {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names as in PEFT's `target_modules` (some of [`LORA_MODULES`]).
    pub targets: &'a [String],
    pub rng: &'a mut rand_chacha::ChaCha8Rng,
}

/// The kernels and weights of one forward pass.
///
/// Why two sets: candle's fused kernels (RMS-norm, RoPE, softmax) have no backward, so a pass
/// whose log-probs may need a gradient takes [`super::fused`]'s differentiable kernels; a
/// sampling pass never needs one and takes candle's, the one-token attention kernel and the
/// merged sampling weights (see docs/design.md, the model section).
#[derive(Clone, Copy)]
pub enum Kernels<'a> {
    /// Differentiable kernels; the linear layers apply their adapters as `pass` says.
    Train(&'a Pass<'a>),
    /// Sampling kernels. With this layer's merged weights (in [`LORA_MODULES`] order),
    /// products of few rows read them, where reading the weights is the whole cost; longer
    /// ones (prefill) go through the adapters as `pass` says.
    Decode(&'a Pass<'a>, Option<&'a [Tensor; 7]>),
}

impl Kernels<'_> {
    /// The kernel set alone, without the adapters' pass.
    pub fn math(self) -> Math {
        match self {
            Kernels::Train(_) => Math::Train,
            Kernels::Decode(..) => Math::Decode,
        }
    }

    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        self.math().rms_norm(x, w, eps)
    }

    /// `linear(lin, slot, silu(gate) · up)`: the gated MLP's down projection, which a
    /// training pass fuses with its activation ([`LoraLinear::forward_swiglu`]).
    fn swiglu_linear(
        self,
        lin: &LoraLinear,
        slot: usize,
        gate: &Tensor,
        up: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Kernels::Train(pass) => lin.forward_swiglu(gate, up, pass),
            Kernels::Decode(..) => self.linear(lin, slot, &fused::swiglu(gate, up)?),
        }
    }

    /// `x · Wᵀ (+ b)` through `lin`, the `slot`-th of [`LORA_MODULES`].
    fn linear(self, lin: &LoraLinear, slot: usize, x: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Decode(_, Some(w)) if few_rows(x) => lin.forward_merged(x, &w[slot]),
            Kernels::Decode(pass, _) | Kernels::Train(pass) => lin.forward(x, pass),
        }
    }

    /// [`attention()`] over cached keys whose first `key_pad[r]` columns row `r` does not see;
    /// a sampling pass takes [`attention::decode_step`] where it applies.
    fn attend_cached(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_pad: &[usize],
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Kernels::Decode(..) = self {
            if let Some(o) = attention::decode_step(q, k, v, key_pad)? {
                return Ok(o);
            }
        }
        attention(q, k, v, mask, self.math())
    }
}

/// The kernels of a pass without its adapters: what a piece of the forward that has no
/// linear layer computes with, and can own (see [`SharedAttention`]).
#[derive(Clone, Copy)]
pub enum Math {
    /// Differentiable kernels ([`super::fused`]).
    Train,
    /// candle's fused kernels, which have no backward.
    Decode,
}

impl Math {
    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        match self {
            Math::Train => fused::rms_norm(x, w, eps),
            Math::Decode => rms_norm(&x.contiguous()?, w, eps),
        }
    }

    /// RoPE of `x` `[b, heads, t, d]` (see [`fused::rope`] for the table shapes).
    fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            Math::Train => fused::rope(x, cos, sin),
            Math::Decode => rope(&x.contiguous()?, cos, sin),
        }
    }

    fn softmax(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Math::Train => fused::softmax_last_dim(x),
            Math::Decode => softmax_last_dim(x),
        }
    }
}

/// Scaled dot-product attention with GQA folding: the `n_rep` query heads that share a key
/// head are folded into the row dimension of one matmul, so repeated keys are never
/// materialised. `q` `[b, H, t, d]`, `k`/`v` `[b, KV, L, d]`, `mask` broadcastable to
/// `[b, H, t, L]`. Returns `[b, t, H·d]`.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    math: Math,
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
    let p = math.softmax(&scores)?;
    let o = p.reshape((b, nkv, rep * t, l))?.matmul(v)?;
    o.reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

/// Whether a product of `x` (`[..., in]`) reads merged sampling weights: few rows, where
/// reading the weights is the whole cost (see [`super::gemv`]).
pub fn few_rows(x: &Tensor) -> bool {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    rows <= super::gemv::MAX_ROWS
}

/// Which positions a forward's rows hold and what they attend to.
#[derive(Clone, Copy)]
pub enum Span<'a> {
    /// Shared prompts, each once, then the rows that continue them (training and scoring).
    Shared(&'a SharedSpan),
    /// A decoding step appended to this layer's KV cache.
    Step(&'a StepSpan<'a>, &'a KvLayer),
}

/// The linear layer at `weights` (`weight` `[out, in]`, and `bias` `[out]` when `bias`), with a
/// fresh adapter when `lora` targets its module name.
fn linear(
    weights: Weights,
    (inp, out): (usize, usize),
    bias: bool,
    lora: Option<&mut LoraSpec>,
) -> anyhow::Result<LoraLinear> {
    let w = weights.get_frozen("weight", &[out, inp])?;
    let b = bias.then(|| weights.get("bias", &[out])).transpose()?;
    let adapter = match lora {
        Some(l) if l.targets.iter().any(|t| t == weights.module()) => {
            Some(LoraPair::for_weight(&w, l.r, l.alpha, l.dropout, l.rng)?)
        }
        _ => None,
    };
    Ok(LoraLinear::new(w, b, adapter))
}

pub struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    /// Qwen3's per-head RMS-norm of queries and keys.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    heads: Heads,
    eps: f32,
}

/// The head layout of an attention layer.
#[derive(Clone, Copy)]
struct Heads {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Heads {
    /// `[b, n, t, d]` view of the `b × t` rows of `x` (`[rows, n·d]`) from `start`.
    fn view(self, x: &Tensor, start: usize, (b, t): (usize, usize), n: usize) -> Result<Tensor> {
        x.narrow(0, start, b * t)?
            .reshape((b, t, n, self.head_dim))?
            .transpose(1, 2)
    }
}

impl Attention {
    pub fn new(
        cfg: &ModelConfig,
        weights: Weights,
        mut lora: Option<&mut LoraSpec>,
    ) -> anyhow::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut proj =
            |name: &str, dims, bias| linear(weights.pp(name), dims, bias, lora.as_deref_mut());
        let q_proj = proj("q_proj", (h, nh * hd), cfg.qkv_bias)?;
        let k_proj = proj("k_proj", (h, nkv * hd), cfg.qkv_bias)?;
        let v_proj = proj("v_proj", (h, nkv * hd), cfg.qkv_bias)?;
        let o_proj = proj("o_proj", (nh * hd, h), cfg.o_bias)?;
        let norm = |name: &str| {
            cfg.qk_norm
                .then(|| weights.pp(name).get("weight", &[hd]))
                .transpose()
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: Heads {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            },
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// `h` `[rows, hidden]` (shared span) or `[n, t, hidden]` (step) → the same shape.
    pub fn forward(&self, h: &Tensor, span: Span, kernels: Kernels) -> Result<Tensor> {
        let (q, k, v) = self.qkv(h, kernels)?;
        let o = match span {
            Span::Shared(s) => {
                let core = SharedAttention {
                    span: s.clone(),
                    heads: self.heads,
                    math: kernels.math(),
                };
                if s.recompute_attention {
                    // The graph keeps q, k, v and the output, not what lies between.
                    recompute3(&q, &k, &v, Box::new(move |q, k, v| core.forward(q, k, v)))?
                } else {
                    core.forward(&q, &k, &v)?
                }
            }
            Span::Step(s, cache) => self.attend_step(s, cache, (&q, &k, &v), kernels)?,
        };
        kernels.linear(&self.o_proj, O, &o)
    }

    /// Projections of `h` `[..., hidden]`, flattened to `[rows, heads·head_dim]`, with
    /// Qwen3's per-head q/k norm.
    fn qkv(&self, h: &Tensor, kernels: Kernels) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = h.elem_count() / h.dims().last().copied().unwrap_or(1).max(1);
        let flat = |x: Tensor| x.reshape((rows, ()));
        let mut q = flat(kernels.linear(&self.q_proj, Q, h)?)?;
        let mut k = flat(kernels.linear(&self.k_proj, K, h)?)?;
        let v = flat(kernels.linear(&self.v_proj, V, h)?)?;
        let norm = |x: &Tensor, w: &Tensor| {
            let heads = x.reshape((rows, (), self.heads.head_dim))?;
            kernels.rms_norm(&heads, w, self.eps)?.reshape((rows, ()))
        };
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = norm(&q, qn)?;
            k = norm(&k, kn)?;
        }
        Ok((q, k, v))
    }

    /// Writes the step's keys and values into `cache` at column `s.start`, then attends over
    /// the columns written so far. Returns `[n, t, H·d]`.
    fn attend_step(
        &self,
        s: &StepSpan,
        (ck, cv): &KvLayer,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (n, t, h) = (s.rows, s.len, self.heads);
        let math = kernels.math();
        let q = math.rope(&h.view(q, 0, (n, t), h.num_heads)?, &s.cos, &s.sin)?;
        let k = math.rope(&h.view(k, 0, (n, t), h.num_kv_heads)?, &s.cos, &s.sin)?;
        let v = h.view(v, 0, (n, t), h.num_kv_heads)?;
        let (ck, cv) = (ck.narrow(0, 0, n)?, cv.narrow(0, 0, n)?);
        ck.slice_set(&k, 2, s.start)?;
        cv.slice_set(&v.contiguous()?, 2, s.start)?;
        let total = s.start + t;
        let (k_all, v_all) = (ck.narrow(2, 0, total)?, cv.narrow(2, 0, total)?);
        kernels.attend_cached(&q, &k_all, &v_all, s.key_pad, s.mask.as_ref())
    }
}

/// The attention of a [`SharedSpan`] between the projections and `o_proj`: RoPE, then rows
/// of level 0 attend causally to themselves, and each row of a later level to its parent's
/// keys (its ancestors' and the parent's own), then causally to its own.
///
/// Why a value of its own: it is a pure function of `q`, `k`, `v`, so a training forward can
/// keep just those and its output and recompute the rest in the backward (the rotated copies,
/// the parent keys gathered per row, and the `heads × t × L` scores, most of a layer's
/// activations for long prompts).
#[derive(Clone)]
struct SharedAttention {
    span: SharedSpan,
    heads: Heads,
    math: Math,
}

impl SharedAttention {
    /// `q` `[Σ n·W, H·d]`, `k`/`v` `[Σ n·W, KV·d]` → `[Σ n·W, H·d]`.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (s, h, math) = (&self.span, self.heads, self.math);
        let (nh, nkv) = (h.num_heads, h.num_kv_heads);
        let roots = (s.roots, s.root_len);
        let mut start = s.roots * s.root_len;
        let qr = math.rope(&h.view(q, 0, roots, nh)?, &s.cos, &s.sin)?;
        let mut keys = math.rope(&h.view(k, 0, roots, nkv)?, &s.cos, &s.sin)?;
        let mut values = h.view(v, 0, roots, nkv)?.contiguous()?;
        let o = attention(&qr, &keys, &values, Some(&s.mask), math)?;
        let mut out = vec![o.reshape((start, ()))?];
        for level in &s.levels {
            let shape = (level.rows.dim(0)?, level.len);
            let ql = math.rope(&h.view(q, start, shape, nh)?, &level.cos, &level.sin)?;
            let kl = math.rope(&h.view(k, start, shape, nkv)?, &level.cos, &level.sin)?;
            let vl = h.view(v, start, shape, nkv)?.contiguous()?;
            keys = Tensor::cat(&[&keys.index_select(&level.rows, 0)?, &kl], 2)?;
            values = Tensor::cat(&[&values.index_select(&level.rows, 0)?, &vl], 2)?;
            let o = attention(&ql, &keys, &values, Some(&level.mask), math)?;
            start += shape.0 * shape.1;
            out.push(o.reshape((shape.0 * shape.1, ()))?);
        }
        Tensor::cat(&out, 0)
    }
}

pub struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    pub fn new(
        cfg: &ModelConfig,
        weights: Weights,
        mut lora: Option<&mut LoraSpec>,
    ) -> anyhow::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut proj =
            |name: &str, dims| linear(weights.pp(name), dims, false, lora.as_deref_mut());
        Ok(Self {
            gate_proj: proj("gate_proj", (h, i))?,
            up_proj: proj("up_proj", (h, i))?,
            down_proj: proj("down_proj", (i, h))?,
        })
    }

    pub fn forward(&self, h: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let gate = kernels.linear(&self.gate_proj, GATE, h)?;
        let up = kernels.linear(&self.up_proj, UP, h)?;
        kernels.swiglu_linear(&self.down_proj, DOWN, &gate, &up)
    }
}

pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f32,
}

impl DecoderLayer {
    /// The layer at `weights` (`model.layers.{i}`). Adapters are drawn from `lora`'s RNG in
    /// [`LORA_MODULES`] order: a seed's adapters depend on that order.
    pub fn new(
        cfg: &ModelConfig,
        weights: Weights,
        mut lora: Option<&mut LoraSpec>,
    ) -> anyhow::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: Attention::new(cfg, weights.pp("self_attn"), lora.as_deref_mut())?,
            mlp: Mlp::new(cfg, weights.pp("mlp"), lora)?,
            input_layernorm: weights.pp("input_layernorm").get("weight", &[h])?,
            post_attention_layernorm: weights.pp("post_attention_layernorm").get("weight", &[h])?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// The pre-norm residual block: `x + attn(norm(x))`, then `+ mlp(norm(·))`.
    pub fn forward(&self, x: &Tensor, span: Span, kernels: Kernels) -> Result<Tensor> {
        let h = kernels.rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&h, span, kernels)?)?;
        let h = kernels.rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        &x + self.mlp.forward(&h, kernels)?
    }

    /// The linear layers in [`LORA_MODULES`] order, each with its parent module's name.
    pub fn linears(&self) -> [(&'static str, &LoraLinear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn", &a.q_proj),
            ("self_attn", &a.k_proj),
            ("self_attn", &a.v_proj),
            ("self_attn", &a.o_proj),
            ("mlp", &m.gate_proj),
            ("mlp", &m.up_proj),
            ("mlp", &m.down_proj),
        ]
    }
}

/// What the layers of `Decoder::forward_shared` attend over: `roots` right-padded rows of
/// `root_len` positions (level 0), then the levels that continue them.
#[derive(Clone)]
pub(crate) struct SharedSpan {
    pub(crate) roots: usize,
    pub(crate) root_len: usize,
    /// `[P, head_dim / 2]`: every root row at positions `0..P`.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// `[P, P]` causal mask.
    pub(crate) mask: Tensor,
    /// The levels after level 0 (none empty).
    pub(crate) levels: Vec<LevelSpan>,
    /// Whether a forward with a graph keeps each layer's attention as q, k, v and its output
    /// and recomputes the rest in the backward (src/model/recompute.rs): on for the full
    /// graph, off where the whole layer is recomputed (gradient checkpointing) and its graph
    /// lives for that layer's backward only.
    pub(crate) recompute_attention: bool,
}

/// A level of `n` rows of `len` positions of a [`SharedSpan`], continuing the level before.
#[derive(Clone)]
pub(crate) struct LevelSpan {
    /// `[n]` u32: the row of the level before that each row continues.
    pub(crate) rows: Tensor,
    pub(crate) len: usize,
    /// `[n, len, head_dim / 2]`: each row at its own positions, after its ancestors' tokens.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// `[n, 1, len, W + len]`, `W` the parent level's key columns (see
    /// `decoder::continuation_mask`).
    pub(crate) mask: Tensor,
}

/// What the layers of `Decoder::forward_step` attend over: `rows × len` new positions
/// written at cache column `start`.
pub(crate) struct StepSpan<'a> {
    pub(crate) rows: usize,
    pub(crate) len: usize,
    pub(crate) start: usize,
    /// `[rows, len, head_dim / 2]`, per row and token.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// See `decoder::step_mask`; `None` when nothing is masked.
    pub(crate) mask: Option<Tensor>,
    /// Leading padding columns of each row's cache.
    pub(crate) key_pad: &'a [usize],
}

/// One layer's cached keys and values, each `[rows, kv_heads, max_len, head_dim]`.
pub(crate) type KvLayer = (Tensor, Tensor);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_name_their_modules() {
        let slots = [
            (Q, "q_proj"),
            (K, "k_proj"),
            (V, "v_proj"),
            (O, "o_proj"),
            (GATE, "gate_proj"),
            (UP, "up_proj"),
            (DOWN, "down_proj"),
        ];
        for (slot, name) in slots {
            assert_eq!(LORA_MODULES[slot], name);
        }
    }
}
