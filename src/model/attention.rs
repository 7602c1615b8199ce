//! One decoding step's attention over the KV cache, on the CPU.
//!
//! Why: at one query token per row the attention is a few hundred kilobytes of arithmetic,
//! but as tensor ops it is two batched matmuls, a mask, a softmax and the reshapes between
//! them, per layer and step: each a dispatch, an allocation and, for the matmuls, a thread
//! hand-off (and candle asks the OS how many cores there are on every CPU matmul). Here it is
//! one pass per (row, key head), rows and heads in parallel. Prefill, other devices and
//! dtypes take [`super::decoder`]'s tensor ops.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// `softmax(q·Kᵀ/√d)·V` for one query token per row: `q` `[n, H, 1, d]`, `k`/`v`
/// `[n, KV, L, d]` (views of a cache, any strides with contiguous head vectors), row `r`
/// seeing key columns `pad[r]..L`. Returns `[n, 1, H·d]`, or `None` when the inputs are not
/// f32 on the CPU with one query token (the caller takes the tensor ops).
pub fn decode_step(q: &Tensor, k: &Tensor, v: &Tensor, pad: &[usize]) -> Result<Option<Tensor>> {
    let (n, nh, t, d) = q.dims4()?;
    let (_, nkv, l, _) = k.dims4()?;
    if t != 1 || !q.device().is_cpu() || pad.len() != n || nh % nkv != 0 {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Some(qd), Some(kd), Some(vd)) = (f32_data(&qs), f32_data(&ks), f32_data(&vs)) else {
        return Ok(None);
    };
    let (Some(ka), Some(va)) = (Heads::of(kl), Heads::of(vl)) else {
        return Ok(None);
    };
    let Some((q0, _)) = ql.contiguous_offsets() else {
        return Ok(None);
    };
    let qd = &qd[q0..q0 + n * nh * d];
    let rep = nh / nkv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; n * nh * d];
    // One task per (row, key head): its `rep` query heads are adjacent in `q` and in `out`.
    out.par_chunks_mut(rep * d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (task, o)| {
            let (r, g) = (task / nkv, task % nkv);
            let first = pad[r].min(l);
            for (h, oh) in o.chunks_mut(d).enumerate() {
                let qh = &qd[(task * rep + h) * d..][..d];
                scores.clear();
                scores.extend((first..l).map(|j| dot(qh, &kd[ka.at(r, g, j)..][..d]) * scale));
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (j, &p) in (first..l).zip(scores.iter()) {
                    let w = p / sum;
                    for (x, &y) in oh.iter_mut().zip(&vd[va.at(r, g, j)..][..d]) {
                        *x += w * y;
                    }
                }
            }
        });
    Ok(Some(Tensor::from_vec(out, (n, 1, nh * d), q.device())?))
}

fn f32_data(s: &Storage) -> Option<&[f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Some(v),
        _ => None,
    }
}

/// Where head vector `(row, head, position)` starts in a `[n, KV, L, d]` view.
struct Heads {
    start: usize,
    strides: [usize; 3],
}

impl Heads {
    /// `None` unless each head vector is contiguous.
    fn of(l: &Layout) -> Option<Heads> {
        match *l.stride() {
            [s0, s1, s2, 1] => Some(Heads {
                start: l.start_offset(),
                strides: [s0, s1, s2],
            }),
            _ => None,
        }
    }

    fn at(&self, r: usize, g: usize, j: usize) -> usize {
        self.start + r * self.strides[0] + g * self.strides[1] + j * self.strides[2]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler vectorises independent lanes, not one serial sum.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks(8).zip(b.chunks(8)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    acc.iter().sum()
}
