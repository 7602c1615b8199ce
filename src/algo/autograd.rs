//! Differentiable element-wise helpers whose gradients follow PyTorch's conventions, which the
//! test vectors pin (spec §8 "Autograd conventions").
//!
//! Candle's `clamp` is `maximum` then `minimum`, and its min/max backward splits the gradient
//! equally on ties, so at a clip boundary candle's clamp passes only half the gradient where
//! PyTorch's passes all of it. These helpers select with `where_cond` instead, so the gradient
//! flows wherever the value passes through unchanged, closed interval included. Candle's `abs`
//! and `relu` have gradient 1 at 0 (PyTorch: 0 and 0), so they are avoided too. `minimum` of
//! two tensors is used as is: its equal split on ties is exactly PyTorch's.

use candle_core::{Result, Tensor};

fn full_like(x: &Tensor, value: f64) -> Result<Tensor> {
    Tensor::full(value, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// `clamp(x, lo, hi)`; the gradient passes where lo ≤ x ≤ hi.
pub fn clamp_closed(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let upper = x.gt(hi)?.where_cond(&full_like(x, hi)?, x)?;
    x.lt(lo)?.where_cond(&full_like(x, lo)?, &upper)
}

/// `min(x, hi)`; the gradient passes where x ≤ hi.
pub fn cap_above(x: &Tensor, hi: f64) -> Result<Tensor> {
    x.gt(hi)?.where_cond(&full_like(x, hi)?, x)
}

/// |x| with gradient sign(x), which is 0 at 0 (the policy equals the reference at step one).
pub fn abs(x: &Tensor) -> Result<Tensor> {
    let sign = (x.gt(0.0)?.to_dtype(x.dtype())? - x.lt(0.0)?.to_dtype(x.dtype())?)?;
    x.mul(&sign)
}

/// Below this |x|, `expm1_minus_x` uses its Taylor series (exp(x) − 1 − x cancels in f32).
const TAYLOR_BELOW: f64 = 0.1;

/// exp(x) − 1 − x (Schulman's k3 for x = log π_ref/π), accurate near 0 in f32.
///
/// For |x| < 0.1 the Taylor series x²(1/2 + x(1/6 + x(1/24 + x(1/120 + x/720)))) is exact to
/// f32 precision (next term x⁷/5040); elsewhere exp(x) − 1 − x loses at most 1e-5 relative.
/// Both branches are finite for the clamped inputs this receives, so `where_cond` never lets a
/// non-finite value into the backward pass.
pub fn expm1_minus_x(x: &Tensor) -> Result<Tensor> {
    let mut poly = x.affine(1.0 / 720.0, 1.0 / 120.0)?;
    for c in [1.0 / 24.0, 1.0 / 6.0, 0.5] {
        poly = (x.mul(&poly)? + c)?;
    }
    let taylor = x.sqr()?.mul(&poly)?;
    let direct = ((x.exp()? - 1.0)? - x)?;
    let small = x.abs()?.lt(TAYLOR_BELOW)?;
    small.where_cond(&taylor, &direct)
}

/// log(1 + exp(x)), stable for any x, with gradient sigmoid(x) everywhere (0.5 at 0).
///
/// Written as p + log(1 + exp(n − p)) with p = max(x, 0), n = min(x, 0) selected by one
/// predicate, so the exponent is never positive and both pieces agree on which side 0 is.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let nonneg = x.ge(0.0)?;
    let p = nonneg.where_cond(x, &zero)?;
    let n = nonneg.where_cond(&zero, x)?;
    let tail = ((n - &p)?.exp()? + 1.0)?.log()?;
    p + tail
}
