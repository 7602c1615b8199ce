//! A frozen linear layer with an optional LoRA adapter (Hu et al. 2021, PEFT's conventions).
//!
//! `y = x·Wᵀ + b + (dropout(x)·Aᵀ)·Bᵀ · alpha/r`, with `A` `[r, in]` drawn like PEFT
//! (kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in)) and `B` `[out, r]` zero, so a fresh
//! adapter leaves the model unchanged. `A` and `B` are the only [`Var`]s of the model; they are
//! kept in f32 when the model runs in f32/bf16/f16 so that optimizer updates are not rounded
//! away (f64 models, used by gradient checks, get f64 adapters).

use super::ops::frozen_matmul;
use candle_core::{DType, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// How one forward pass treats the adapters.
pub struct Pass<'a> {
    /// Use the LoRA branch (off = the reference policy, i.e. the base model).
    pub adapters: bool,
    /// Keep the adapters in the autograd graph (training); off detaches them so that sampling
    /// does not keep the decode history alive.
    pub grad: bool,
    /// Apply LoRA dropout with this RNG (training passes only).
    pub dropout_rng: Option<&'a Mutex<ChaCha8Rng>>,
}

impl Pass<'_> {
    /// A pass without gradient or dropout, with or without adapters.
    pub fn inference(adapters: bool) -> Pass<'static> {
        Pass {
            adapters,
            grad: false,
            dropout_rng: None,
        }
    }
}

/// The trainable part of one adapted linear layer.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    pub dropout: f64,
}

impl Adapter {
    /// A fresh adapter for the frozen `weight` (`[out, in]`): `A` as PEFT initialises it,
    /// `B = 0`, on the weight's device.
    pub fn for_weight(
        weight: &Tensor,
        r: usize,
        alpha: f64,
        dropout: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let device = weight.device();
        let dtype = if weight.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..r * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), device)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out_dim, r), dtype, device)?;
        Ok(Self {
            a,
            b,
            scale: alpha / r as f64,
            dropout,
        })
    }
}

/// A linear layer whose base weight is frozen.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `[out, in]`.
    weight: Tensor,
    /// `[out]`.
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl LoraLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, adapter: Option<Adapter>) -> Self {
        Self {
            weight,
            bias,
            adapter,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[1], d[0])
    }

    /// `x` is `[..., in]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let mut y = frozen_matmul(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let Some(ad) = self.adapter.as_ref().filter(|_| pass.adapters) else {
            return Ok(y);
        };
        let (a, b) = if pass.grad {
            (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())
        } else {
            (ad.a.as_tensor().detach(), ad.b.as_tensor().detach())
        };
        let mut xin = x.to_dtype(a.dtype())?;
        if let (Some(rng), true) = (pass.dropout_rng, ad.dropout > 0.0) {
            // A poisoned lock only means another pass panicked; the RNG state is still valid.
            let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
            xin = dropout(&xin, ad.dropout, &mut rng)?;
        }
        let low = xin.broadcast_matmul(&a.t()?)?;
        let up = (low.broadcast_matmul(&b.t()?)? * ad.scale)?;
        let up = up.to_dtype(y.dtype())?;
        y + up
    }
}

/// Inverted dropout with a mask from our seeded RNG (candle's own draws from an unseeded one).
fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
