//! A pure piece of the forward kept out of the autograd graph and recomputed in the backward:
//! activation checkpointing at the scale of one op.
//!
//! Why: candle's graph keeps every intermediate of a forward until the backward. In a decoder
//! layer the largest are the attention's: the scores, their scaled and masked copies and the
//! softmax, each `heads × t × L` (four 27 MB tensors per layer for one 700-token prompt at the
//! Qwen2.5-0.5B shape, more than half of a full-graph step's memory). [`recompute3`] keeps only
//! the piece's inputs and output; its backward runs the piece again with a graph and
//! backpropagates through that copy, one layer at a time, for one more attention forward
//! (a few percent of a layer's arithmetic). See docs/performance.md, "Memory".

use candle_core::backend::{BackendDevice, BackendStorage};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, Var};
use std::sync::Mutex;

/// What [`recompute3`] runs: a pure function of its three inputs (no randomness, no state), so
/// that running it again in the backward gives the same graph.
pub type Piece = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(a, b, c)`, differentiable w.r.t. the three inputs, holding none of `f`'s intermediates.
/// Where no input is part of a graph the result is `f`'s own, with no extra copy.
pub fn recompute3(a: &Tensor, b: &Tensor, c: &Tensor, f: Piece) -> Result<Tensor> {
    let out = f(&a.detach(), &b.detach(), &c.detach())?;
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(out);
    }
    a.apply_op3(
        b,
        c,
        Recompute {
            f,
            out: Mutex::new(Some(out)),
        },
    )
}

/// The graph node of [`recompute3`]: its forward hands over the output computed without a
/// graph (once), its backward recomputes.
struct Recompute {
    f: Piece,
    out: Mutex<Option<Tensor>>,
}

impl Recompute {
    /// The output computed in [`recompute3`], which candle's forward call then owns.
    fn take(&self) -> Result<Tensor> {
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner()).take();
        match out {
            Some(out) => Ok(out),
            None => bail!("recompute: the forward ran twice"),
        }
    }
}

/// A fresh contiguous copy of the `l` view of `s`.
fn copy_view<S>(s: &S, l: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the new storage is written by `copy_strided_src` below.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((copy_view(s, layout)?, layout.shape().clone())),
            _ => bail!("recompute: the output is not on the CPU like the inputs"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((copy_view(s, layout)?, layout.shape().clone())),
            _ => bail!("recompute: the output is not on the GPU like the inputs"),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, c) = (
            Var::from_tensor(a)?,
            Var::from_tensor(b)?,
            Var::from_tensor(c)?,
        );
        let out = (self.f)(a.as_tensor(), b.as_tensor(), c.as_tensor())?;
        // d/d(out) of sum(out ⊙ grad) is exactly `grad`: the piece's backward from above.
        let mut grads = (out * grad)?.sum_all()?.backward()?;
        Ok((
            grads.remove(a.as_tensor()),
            grads.remove(b.as_tensor()),
            grads.remove(c.as_tensor()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn piece() -> Piece {
        // Enough ops to have intermediates: a·bᵀ, a softmax-like normalisation, then ·c.
        Box::new(|a, b, c| {
            let s = a.matmul(&b.t()?)?.exp()?;
            let s = s.broadcast_div(&s.sum_keepdim(1)?)?;
            s.matmul(c)
        })
    }

    #[test]
    fn gradients_equal_those_of_the_full_graph() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::randn(0f64, 1.0, (5, 4), &dev)?;
        let b = Var::randn(0f64, 1.0, (6, 4), &dev)?;
        let c = Var::randn(0f64, 1.0, (6, 3), &dev)?;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev)?;
        let (at, bt, ct) = (a.as_tensor(), b.as_tensor(), c.as_tensor());
        // The inputs reach the piece through ops, as the attention's q, k, v do.
        let inputs = || -> Result<_> { Ok(((at * 2.0)?, bt.sin()?, ct.clone())) };
        let (x, y, z) = inputs()?;
        let full = piece()(&x, &y, &z)?;
        let mut g_full = (&full * &w)?.sum_all()?.backward()?;
        let (x, y, z) = inputs()?;
        let rec = recompute3(&x, &y, &z, piece())?;
        assert_eq!(rec.to_vec2::<f64>()?, full.to_vec2::<f64>()?);
        let mut g_rec = (&rec * &w)?.sum_all()?.backward()?;
        for v in [&a, &b, &c] {
            let (f, r) = (g_full.remove(v).unwrap(), g_rec.remove(v).unwrap());
            let diff = (f - r)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "gradients differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn constants_take_no_copy_and_stay_out_of_the_graph() -> Result<()> {
        let dev = Device::Cpu;
        let t = |n| Tensor::ones((n, 2), DType::F32, &dev);
        let out = recompute3(&t(3)?, &t(4)?, &t(4)?, piece())?;
        assert!(!out.track_op());
        assert_eq!(out.dims(), &[3, 2]);
        Ok(())
    }
}
