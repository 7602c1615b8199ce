//! Differentiable fused kernels for the training forward: RMS-norm, RoPE, softmax, SwiGLU.
//!
//! candle's fused kernels for these have no backward (docs/design.md, the model section),
//! and their differentiable compositions (`rms_norm_slow`, `rope_slow`, `softmax`,
//! `silu(g) * u`) are 4 to 10 graph nodes each. Every node is a pass over memory in the
//! forward and, in the backward, a pass plus a zeroed gradient buffer and an add (candle's
//! `GradStore` accumulates into zeros).
//! Each op here is one pass forward and one pass backward.
//!
//! On the CPU in f32 and f64 the ops run their own loops, rows in parallel; other devices and
//! dtypes take the composed tensor ops, which the tests hold the kernels to.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use num_traits::Float;
use rayon::prelude::*;

/// `run` (a kernel call whose slices come from [`slice()`]) in the float type of `storage`,
/// wrapped back into a storage; inputs of another dtype than `storage` fail in [`slice()`].
macro_rules! per_float {
    ($op:literal, $storage:expr, $run:expr) => {
        match $storage {
            CpuStorage::F32(_) => CpuStorage::F32($run),
            CpuStorage::F64(_) => CpuStorage::F64($run),
            _ => bail!(concat!($op, ": expected f32 or f64")),
        }
    };
}

/// Rows of at most this many elements form one parallel task (small rows are batched).
const TASK_ELEMS: usize = 1 << 14;

/// Whether `x` takes the kernels here rather than the composed tensor ops.
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

// ---------------------------------------------------------------------------------------------
// RMS-norm.

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, differentiable w.r.t. `x` (`w` is a
/// frozen norm weight and gets no gradient).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f64 })
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let mut y = vec![T::zero(); x.len()];
            rows_mut(&mut y, n)
                .zip(x.par_chunks(rows_per_task(n) * n))
                .for_each(|(ys, xs)| {
                    for (yr, xr) in ys.chunks_mut(n).zip(xs.chunks(n)) {
                        let r = inv_rms(xr, eps);
                        for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                            *y = x * r * w;
                        }
                    }
                });
            y
        }
        let n = last_dim(lw)?;
        check_last(lx, n, "rms-norm input")?;
        let y = per_float!(
            "fused-rms-norm",
            x,
            run(slice(x, lx)?, slice(w, lw)?, self.eps)
        );
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// `dx = r·(g∘w) − x·r³·mean(g∘w∘x)` with `r = 1/sqrt(mean(x²) + eps)`.
struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let chunk = rows_per_task(n) * n;
            let mut dx = vec![T::zero(); x.len()];
            rows_mut(&mut dx, n)
                .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .for_each(|(ds, (xs, gs))| {
                    for ((dr, xr), gr) in ds.chunks_mut(n).zip(xs.chunks(n)).zip(gs.chunks(n)) {
                        let r = inv_rms(xr, eps);
                        let dot = xr
                            .iter()
                            .zip(gr)
                            .zip(w)
                            .fold(T::zero(), |s, ((&x, &g), &w)| s + x * g * w);
                        let c = r * r * r * dot / T::from(n).unwrap_or_else(T::one);
                        for (((d, &x), &g), &w) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                            *d = r * g * w - x * c;
                        }
                    }
                });
            dx
        }
        let n = last_dim(lw)?;
        check_last(lx, n, "rms-norm input")?;
        let dx = per_float!(
            "fused-rms-norm-grad",
            x,
            run(slice(x, lx)?, slice(w, lw)?, slice(g, lg)?, self.eps)
        );
        Ok((dx, lx.shape().clone()))
    }
}

fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let ss = x.iter().fold(T::zero(), |s, &v| s + v * v);
    let n = T::from(x.len()).unwrap_or_else(T::one);
    (ss / n + T::from(eps).unwrap_or_else(T::zero))
        .sqrt()
        .recip()
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding.

/// RoPE in the rotate-half layout (Llama, Qwen) of `x` `[B, H, T, d]`, with `cos`/`sin` of
/// `[T, d/2]` (every row at positions `0..T`) or `[B, T, d/2]` (a position per row and token).
/// Differentiable w.r.t. `x`: the rotation is orthogonal, so its backward is the rotation by
/// the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let per_row = match cos.rank() {
        2 => false,
        3 if cos.dim(0)? == b => true,
        _ => bail!(
            "rope: cos {:?} is neither [T, d/2] nor [B, T, d/2] for x {:?}",
            cos.shape(),
            x.shape()
        ),
    };
    if cos.dim(D::Minus2)? != t || cos.dim(D::Minus1)? * 2 != d || cos.shape() != sin.shape() {
        bail!(
            "rope: cos {:?} / sin {:?} do not fit x {:?}",
            cos.shape(),
            sin.shape(),
            x.shape()
        );
    }
    if !fused(x) {
        return rope_ops(x, cos, sin, per_row);
    }
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// The composed tensor ops: `x·cos + rotate_half(x)·sin`.
fn rope_ops(x: &Tensor, cos: &Tensor, sin: &Tensor, per_row: bool) -> Result<Tensor> {
    let full = |c: &Tensor| -> Result<Tensor> {
        let c = Tensor::cat(&[c, c], D::Minus1)?.to_dtype(x.dtype())?;
        if per_row {
            c.unsqueeze(1)
        } else {
            c.unsqueeze(0)?.unsqueeze(0)
        }
    };
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&full(cos)?)? + rotated.broadcast_mul(&full(sin)?)?
}

/// `y = x·cos + rotate_half(x)·sin`, or the rotation back (`sin` negated) when `inverse`.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], cos: &[T], sin: &[T], dims: [usize; 4], inverse: bool) -> Vec<T> {
            let [b, h, t, d] = dims;
            let half = d / 2;
            let per_row = cos.len() == b * t * half;
            let sign = if inverse { -T::one() } else { T::one() };
            let mut y = vec![T::zero(); x.len()];
            // One task per (row, head): `t` tokens of `d` values.
            y.par_chunks_mut(t * d)
                .zip(x.par_chunks(t * d))
                .enumerate()
                .for_each(|(bh, (ys, xs))| {
                    let row = bh / h;
                    let base = if per_row { row * t * half } else { 0 };
                    for (i, (yt, xt)) in ys.chunks_mut(d).zip(xs.chunks(d)).enumerate() {
                        let c = &cos[base + i * half..base + (i + 1) * half];
                        let s = &sin[base + i * half..base + (i + 1) * half];
                        let (x1, x2) = xt.split_at(half);
                        let (y1, y2) = yt.split_at_mut(half);
                        for j in 0..half {
                            let sj = sign * s[j];
                            y1[j] = x1[j] * c[j] - x2[j] * sj;
                            y2[j] = x2[j] * c[j] + x1[j] * sj;
                        }
                    }
                });
            y
        }
        let dims = lx.shape().dims4()?;
        let dims = [dims.0, dims.1, dims.2, dims.3];
        let y = per_float!(
            "fused-rope",
            x,
            run(
                slice(x, lx)?,
                slice(cos, lc)?,
                slice(sin, ls)?,
                dims,
                self.inverse
            )
        );
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope {
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax.

/// Softmax over the last dimension, differentiable (`dx = y·(dy − Σ y·dy)`).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], n: usize) -> Vec<T> {
            let mut y = vec![T::zero(); x.len()];
            rows_mut(&mut y, n)
                .zip(x.par_chunks(rows_per_task(n) * n))
                .for_each(|(ys, xs)| {
                    for (yr, xr) in ys.chunks_mut(n).zip(xs.chunks(n)) {
                        let max = xr.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                        let mut sum = T::zero();
                        for (y, &x) in yr.iter_mut().zip(xr) {
                            *y = (x - max).exp();
                            sum = sum + *y;
                        }
                        let inv = sum.recip();
                        yr.iter_mut().for_each(|y| *y = *y * inv);
                    }
                });
            y
        }
        let n = last_dim(lx)?;
        let y = per_float!("fused-softmax", x, run(slice(x, lx)?, n));
        Ok((y, lx.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `dx = y·(dy − Σ y·dy)` per row, from the softmax output `y` and its gradient `dy`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(y: &[T], g: &[T], n: usize) -> Vec<T> {
            let chunk = rows_per_task(n) * n;
            let mut dx = vec![T::zero(); y.len()];
            rows_mut(&mut dx, n)
                .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .for_each(|(ds, (ys, gs))| {
                    for ((dr, yr), gr) in ds.chunks_mut(n).zip(ys.chunks(n)).zip(gs.chunks(n)) {
                        let dot = yr.iter().zip(gr).fold(T::zero(), |s, (&y, &g)| s + y * g);
                        for ((d, &y), &g) in dr.iter_mut().zip(yr).zip(gr) {
                            *d = y * (g - dot);
                        }
                    }
                });
            dx
        }
        let n = last_dim(ly)?;
        let dx = per_float!(
            "fused-softmax-grad",
            y,
            run(slice(y, ly)?, slice(g, lg)?, n)
        );
        Ok((dx, ly.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU.

/// `silu(gate) · up`, the gated MLP's activation, differentiable w.r.t. both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        );
    }
    if !fused(gate) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); g.len()];
            y.par_chunks_mut(TASK_ELEMS)
                .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
                .for_each(|(ys, (gs, us))| {
                    for ((y, &g), &u) in ys.iter_mut().zip(gs).zip(us) {
                        *y = g * sigmoid(g) * u;
                    }
                });
            y
        }
        let y = per_float!("fused-swiglu", g, run(slice(g, lg)?, slice(u, lu)?));
        Ok((y, lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = swiglu_grads(gate, up, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `silu(gate) · up` of contiguous CPU storages (f32, f64), without a graph: for ops that fuse
/// the activation into what consumes it (`super::lora`).
pub(crate) fn swiglu_storage(
    g: &CpuStorage,
    lg: &Layout,
    u: &CpuStorage,
    lu: &Layout,
) -> Result<CpuStorage> {
    Ok(Swiglu.cpu_fwd(g, lg, u, lu)?.0)
}

/// The gradients w.r.t. `gate` and `up` of `silu(gate) · up` for the output gradient `grad`
/// (contiguous CPU tensors, f32 or f64), without a graph.
pub(crate) fn swiglu_grads(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let grad = grad.contiguous()?;
    let d_gate = gate.apply_op3_no_bwd(up, &grad, &SwigluGrad { up: false })?;
    let d_up = gate.apply_op3_no_bwd(up, &grad, &SwigluGrad { up: true })?;
    Ok((d_gate, d_up))
}

/// The gradient w.r.t. `up` (`dy·silu(g)`) or w.r.t. the gate
/// (`dy·u·σ(g)·(1 + g·(1 − σ(g)))`).
struct SwigluGrad {
    up: bool,
}

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        dy: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(g: &[T], u: &[T], dy: &[T], up: bool) -> Vec<T> {
            let mut out = vec![T::zero(); g.len()];
            out.par_chunks_mut(TASK_ELEMS)
                .zip(g.par_chunks(TASK_ELEMS))
                .zip(u.par_chunks(TASK_ELEMS).zip(dy.par_chunks(TASK_ELEMS)))
                .for_each(|((os, gs), (us, ds))| {
                    for (((o, &g), &u), &d) in os.iter_mut().zip(gs).zip(us).zip(ds) {
                        let s = sigmoid(g);
                        *o = if up {
                            d * g * s
                        } else {
                            d * u * s * (T::one() + g * (T::one() - s))
                        };
                    }
                });
            out
        }
        let out = per_float!(
            "fused-swiglu-grad",
            g,
            run(slice(g, lg)?, slice(u, lu)?, slice(dy, ld)?, self.up)
        );
        Ok((out, lg.shape().clone()))
    }
}

fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp()).recip()
}

// ---------------------------------------------------------------------------------------------
// Storage plumbing.

/// The float types the kernels run in.
trait Real: Float + Send + Sync + 'static {
    fn data(s: &CpuStorage) -> Option<&[Self]>;
}

impl Real for f32 {
    fn data(s: &CpuStorage) -> Option<&[f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Real for f64 {
    fn data(s: &CpuStorage) -> Option<&[f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// The contiguous data of `s` under `l` (the public functions make every input contiguous).
fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused kernel: input is not contiguous")
    };
    match T::data(s) {
        Some(v) => Ok(&v[a..b]),
        None => bail!("fused kernel: inputs of mixed dtypes ({:?})", s.dtype()),
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.shape().dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => bail!("fused kernel: empty last dimension in {:?}", l.shape()),
    }
}

fn check_last(l: &Layout, n: usize, what: &str) -> Result<()> {
    if l.shape().dims().last() != Some(&n) {
        bail!("{what} {:?} does not end in {n}", l.shape());
    }
    Ok(())
}

/// Rows of `n` per parallel task: about [`TASK_ELEMS`] elements, at least one row.
fn rows_per_task(n: usize) -> usize {
    (TASK_ELEMS / n).max(1)
}

fn rows_mut<T: Send>(y: &mut [T], n: usize) -> rayon::slice::ChunksMut<'_, T> {
    y.par_chunks_mut(rows_per_task(n) * n)
}
