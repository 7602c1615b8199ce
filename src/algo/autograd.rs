//! Differentiable element-wise helpers whose gradients follow PyTorch's conventions, which the
//! test vectors pin (docs/algorithms.md §8, "Autograd conventions").
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradient of `f` at each point of `xs` (f32).
    fn value_and_grad(xs: &[f32], f: impl Fn(&Tensor) -> Result<Tensor>) -> (Vec<f32>, Vec<f32>) {
        let x = Var::new(xs, &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        (y.to_vec1().unwrap(), g)
    }

    #[test]
    fn clamp_passes_gradient_on_the_closed_interval() {
        let (y, g) = value_and_grad(&[0.5, 0.8, 1.0, 1.25, 1.5], |x| clamp_closed(x, 0.8, 1.25));
        assert_eq!(y, [0.8, 0.8, 1.0, 1.25, 1.25]);
        assert_eq!(g, [0.0, 1.0, 1.0, 1.0, 0.0]);
        // candle's own clamp halves the gradient at the bounds: the reason this helper exists.
        let (_, g) = value_and_grad(&[0.8, 1.25], |x| x.clamp(0.8f32, 1.25f32));
        assert_eq!(g, [0.5, 0.5]);
    }

    #[test]
    fn cap_passes_gradient_up_to_and_including_the_cap() {
        let (y, g) = value_and_grad(&[1.0, 2.0, 3.0], |x| cap_above(x, 2.0));
        assert_eq!(y, [1.0, 2.0, 2.0]);
        assert_eq!(g, [1.0, 1.0, 0.0]);
    }

    #[test]
    fn minimum_splits_ties_equally() {
        let (_, g) = value_and_grad(&[1.0, 2.0, 3.0], |x| {
            x.minimum(&Tensor::new(&[2f32; 3], x.device())?)
        });
        assert_eq!(g, [1.0, 0.5, 0.0]);
    }

    #[test]
    fn abs_has_zero_gradient_at_zero() {
        let (y, g) = value_and_grad(&[-2.0, 0.0, 3.0], abs);
        assert_eq!(y, [2.0, 0.0, 3.0]);
        assert_eq!(g, [-1.0, 0.0, 1.0]);
    }

    #[test]
    fn softplus_is_stable_with_sigmoid_gradient() {
        let xs = [-100.0f32, -3.0, 0.0, 2.0, 100.0];
        let (y, g) = value_and_grad(&xs, softplus);
        for ((&x, &y), &g) in xs.iter().zip(&y).zip(&g) {
            let x = x as f64;
            let want = x.max(0.0) + (-x.abs()).exp().ln_1p();
            let sigmoid = 1.0 / (1.0 + (-x).exp());
            assert!(
                (y as f64 - want).abs() < 1e-5,
                "softplus({x}) = {y}, want {want}"
            );
            assert!(
                (g as f64 - sigmoid).abs() < 1e-6,
                "softplus'({x}) = {g}, want {sigmoid}"
            );
        }
    }

    #[test]
    fn expm1_minus_x_is_accurate_near_zero_and_far() {
        let xs: Vec<f32> = [
            -20.0, -3.0, -0.5, -0.1, -0.0999, -1e-3, -1e-6, 0.0, 1e-6, 1e-3, 0.0999, 0.1, 0.7, 5.0,
            20.0,
        ]
        .to_vec();
        let (y, g) = value_and_grad(&xs, expm1_minus_x);
        for ((&x, &y), &g) in xs.iter().zip(&y).zip(&g) {
            let x = x as f64;
            let want = x.exp_m1() - x;
            let dwant = x.exp_m1();
            assert!(
                (y as f64 - want).abs() <= 2e-5 * want.abs() + 1e-30,
                "k3({x}) = {y}, want {want}"
            );
            assert!(
                (g as f64 - dwant).abs() <= 2e-5 * dwant.abs() + 1e-30,
                "k3'({x}) = {g}, want {dwant}"
            );
        }
    }
}
