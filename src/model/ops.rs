//! Two autograd ops that candle does not have and that dominate the cost of a LoRA step.
//!
//! * [`frozen_matmul`]: `x · Wᵀ` for a frozen weight. candle's matmul backward computes and keeps
//!   `dL/dW` even when `W` is a constant; for LoRA training that is the largest tensor of the
//!   step and is thrown away. This op's backward returns only `dL/dx = g · W`.
//! * [`selective_log_softmax`] and [`lm_head_logprobs`]: `log_softmax(logits / T)[target]` per
//!   row, in f32, with the backward `(onehot − softmax) · g / T` computed in one pass instead of
//!   autograd's chain through log_softmax and gather over a 152k vocabulary.
//!   `lm_head_logprobs` fuses the LM head too and works tile by tile (a block of rows times a
//!   slice of the vocabulary, with a running log-sum-exp per row), so the `[rows, vocab]`
//!   logits never exist at once, neither in the forward nor in the backward.
//!
//! Forwards run candle kernels (matmul through the storage backend, so the same code serves CPU
//! and CUDA). The log-softmax kernels have a fast CPU loop and a tensor-op path for other
//! devices.

use super::gemv;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Tensor, D,
};
use rayon::prelude::*;

/// Most bytes of f32 logits in one tile of [`lm_head_logprobs`]: under the 32 MiB up to which
/// [`super::device::tune_cpu_allocator`] keeps buffers in the heap (a larger buffer is a fresh
/// mapping, zeroed and faulted in page by page at every allocation).
pub const TILE_BYTES: usize = 24 << 20;

/// Most rows in one tile of [`lm_head_logprobs`]; the vocabulary slice is what fits beside
/// them in [`TILE_BYTES`].
pub const TILE_ROWS: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Frozen linear.

/// Up to this many rows, [`frozen_matmul`] computes `(W · xᵀ)ᵀ` where it does not use
/// [`gemv`]: with few rows (decoding) the gemm is up to twice as fast with the weight as the
/// left operand.
const SWAP_MAX_ROWS: usize = 32;

/// `x · wᵀ` where `w` (`[out, in]`) never receives a gradient. `x` is `[..., in]`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&inner, lead)) = dims.split_last() else {
        bail!("frozen_matmul: input must have at least one dimension")
    };
    let (out, w_in) = w.dims2()?;
    if w_in != inner {
        bail!("frozen_matmul: input has {inner} features, weight expects {w_in}");
    }
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, inner))?;
    // On the CPU, up to gemv::MAX_ROWS rows go through gemv (see `cpu_fwd`), which writes
    // `x · Wᵀ` directly.
    let gemv_rows = x.device().is_cpu() && rows <= gemv::MAX_ROWS;
    let swapped = rows <= SWAP_MAX_ROWS && !gemv_rows;
    let y = x2.apply_op2(w, FrozenMatmul { swapped })?;
    let y = if swapped { y.t()?.contiguous()? } else { y };
    let mut out_dims = lead.to_vec();
    out_dims.push(out);
    y.reshape(out_dims)
}

/// `x · Wᵀ` (`[m, n]`), or `W · xᵀ` (`[n, m]`) when `swapped`.
struct FrozenMatmul {
    swapped: bool,
}

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(&self, x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<(S, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, _) = lw.shape().dims2()?;
        if self.swapped {
            let y = w.matmul(x, (1, n, m, k), lw, &lx.transpose(0, 1)?)?;
            Ok((y, Shape::from((n, m))))
        } else {
            let y = x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
            Ok((y, Shape::from((m, n))))
        }
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, _) = lw.shape().dims2()?;
        let contiguous = |l: &Layout| l.contiguous_offsets();
        if !self.swapped && m <= gemv::MAX_ROWS {
            if let (CpuStorage::F32(xs), Some((xa, xb)), Some((wa, wb))) =
                (x, contiguous(lx), contiguous(lw))
            {
                let weight = match w {
                    CpuStorage::F32(ws) => Some(gemv::Weight::F32(&ws[wa..wb])),
                    CpuStorage::F16(ws) => Some(gemv::Weight::F16(&ws[wa..wb])),
                    _ => None,
                };
                if let Some(weight) = weight {
                    let y = gemv::matmul_t(&xs[xa..xb], m, weight, n, k)
                        .map_err(candle_core::Error::wrap)?;
                    return Ok((CpuStorage::F32(y), Shape::from((m, n))));
                }
            }
        }
        self.fwd(x, lx, w, lw)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.fwd(x, lx, w, lw)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = if self.swapped {
            grad.t()?
        } else {
            grad.clone()
        };
        Ok((Some(grad.matmul(w)?), None))
    }
}

// ---------------------------------------------------------------------------------------------
// Selective log-softmax.

/// `logp[n] = log_softmax(logits[n] / temperature)[targets[n]]` for `logits` `[N, V]` (any
/// float dtype, computed in f32) and `targets` `[N]` u32. Differentiable w.r.t. `logits`.
pub fn selective_log_softmax(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    check_temperature(temperature)?;
    let logits = logits.to_dtype(logp_dtype(logits.dtype()))?.contiguous()?;
    let (n, v) = logits.dims2()?;
    let targets = checked_targets(targets, n, v)?;
    let logp = logp_forward(&logits.detach(), &targets, temperature)?;
    if !logits.track_op() {
        return Ok(logp);
    }
    let op = LogProbGrad {
        targets,
        temperature,
        lm_head: None,
    };
    logits.apply_op2(&logp, op)
}

/// Logits up to this size are kept from the forward for the backward of
/// [`lm_head_logprobs`]; beyond it they are recomputed tile by tile (one more LM-head matmul,
/// bounded memory).
pub const KEEP_LOGITS_BYTES: usize = 1 << 30;

/// How [`lm_head_logprobs_tiled`] cuts the `[N, V]` logits: blocks of `rows` rows times
/// slices of `vocab` tokens, and how many bytes of them it may keep for the backward.
///
/// Why slices of the vocabulary rather than chunks of rows: every tile multiplies by a part of
/// the LM head, and the CPU gemm repacks that part for each product. Cut by rows (48 rows of a
/// 152k vocabulary fill 29 MB), the whole 544 MB head is repacked for every 48 rows and the
/// products run at half speed; cut by vocabulary, each part of the head is packed once per
/// block of up to [`TILE_ROWS`] rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogitTiles {
    pub rows: usize,
    pub vocab: usize,
    pub keep_bytes: usize,
}

impl LogitTiles {
    /// Tiles of at most [`TILE_ROWS`] rows and [`TILE_BYTES`] of f32 logits for `n` rows
    /// over a vocabulary of `v`; logits kept up to [`KEEP_LOGITS_BYTES`].
    pub fn for_shape(n: usize, v: usize) -> LogitTiles {
        let rows = n.clamp(1, TILE_ROWS);
        LogitTiles {
            rows,
            vocab: (TILE_BYTES / 4 / rows).clamp(1, v.max(1)),
            keep_bytes: KEEP_LOGITS_BYTES,
        }
    }
}

/// [`selective_log_softmax`] of `hidden · weightᵀ`, fused and tiled: `hidden` `[N, d]`,
/// `weight` `[V, d]` (frozen, e.g. the LM head or tied embeddings), `targets` `[N]`. Only
/// `hidden` gets a gradient. The forward never holds more than one tile of temporaries; the
/// logits themselves are kept for the backward while they fit in [`KEEP_LOGITS_BYTES`], and
/// recomputed otherwise.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let tiles = LogitTiles::for_shape(hidden.dim(0)?, weight.dim(0)?);
    lm_head_logprobs_tiled(hidden, weight, targets, temperature, tiles)
}

/// [`lm_head_logprobs`] with the given tiling.
pub fn lm_head_logprobs_tiled(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    tiles: LogitTiles,
) -> Result<Tensor> {
    check_temperature(temperature)?;
    if tiles.rows == 0 || tiles.vocab == 0 {
        bail!("lm_head_logprobs: empty tiles {tiles:?}");
    }
    let (n, _) = hidden.dims2()?;
    let v = weight.dim(0)?;
    let targets = checked_targets(targets, n, v)?;
    let h = hidden.detach();
    let dtype = logp_dtype(weight.dtype());
    let keep = hidden.track_op() && n * v * dtype.size_in_bytes() <= tiles.keep_bytes;
    let mut logp_parts = Vec::with_capacity(n.div_ceil(tiles.rows));
    let mut lse_parts = Vec::with_capacity(n.div_ceil(tiles.rows));
    let mut kept = Vec::new();
    for (r0, rn) in spans(n, tiles.rows) {
        let hb = h.narrow(0, r0, rn)?;
        let tb = targets.narrow(0, r0, rn)?;
        let mut running: Option<SliceStats> = None;
        for (v0, vn) in spans(v, tiles.vocab) {
            let logits = tile_logits(&hb, weight, v0, vn, dtype)?;
            let stats = slice_stats(&logits, &tb, v0, temperature)?;
            running = Some(match running {
                None => stats,
                Some(r) => r.merge(&stats)?,
            });
            if keep {
                kept.push(logits);
            }
        }
        if let Some(r) = running {
            let lse = r.log_sum_exp()?;
            logp_parts.push((&r.picked - &lse)?);
            lse_parts.push(lse);
        }
    }
    if logp_parts.is_empty() {
        return Tensor::zeros(0, dtype, hidden.device());
    }
    let logp = Tensor::cat(&logp_parts, 0)?;
    if !hidden.track_op() {
        return Ok(logp);
    }
    let op = LogProbGrad {
        targets,
        temperature,
        lm_head: Some(LmHead {
            weight: weight.detach(),
            tiles,
            lse: Tensor::cat(&lse_parts, 0)?,
            logits: kept,
        }),
    };
    hidden.apply_op2(&logp, op)
}

/// `(start, len)` of consecutive pieces of at most `step` (≥ 1) covering `0..n`.
fn spans(n: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(step).map(move |s| (s, step.min(n - s)))
}

/// Logits of the rows `hb` over tokens `v0 .. v0 + vn`, in `dtype`.
fn tile_logits(hb: &Tensor, weight: &Tensor, v0: usize, vn: usize, dtype: DType) -> Result<Tensor> {
    hb.matmul(&weight.narrow(0, v0, vn)?.t()?)?.to_dtype(dtype)
}

/// Per row of one vocabulary slice of `logits / T`: the largest value, the sum of
/// `exp(value − largest)`, and the target's value (−∞ when the target is in another slice).
struct SliceStats {
    max: Tensor,
    sum: Tensor,
    picked: Tensor,
}

impl SliceStats {
    /// The statistics of the two slices together (a running log-sum-exp).
    fn merge(&self, other: &SliceStats) -> Result<SliceStats> {
        let max = self.max.maximum(&other.max)?;
        let sum = ((&self.sum * (&self.max - &max)?.exp()?)?
            + (&other.sum * (&other.max - &max)?.exp()?)?)?;
        Ok(SliceStats {
            max,
            sum,
            picked: self.picked.maximum(&other.picked)?,
        })
    }

    fn log_sum_exp(&self) -> Result<Tensor> {
        &self.max + self.sum.log()?
    }
}

/// [`SliceStats`] of `logits` `[rows, vn]`, the tokens `offset .. offset + vn`: one pass per
/// row on the CPU, tensor ops elsewhere.
fn slice_stats(
    logits: &Tensor,
    targets: &Tensor,
    offset: usize,
    temperature: f64,
) -> Result<SliceStats> {
    let inv_t = 1.0 / temperature;
    let stats = if matches!(logits.device(), Device::Cpu) && logits.dtype() == DType::F32 {
        logits.contiguous()?.apply_op2_no_bwd(
            targets,
            &SliceStatsCpu {
                inv_t: inv_t as f32,
                offset,
            },
        )?
    } else {
        let scaled = (logits * inv_t)?;
        let max = scaled.max_keepdim(D::Minus1)?;
        let sum = scaled.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
        let hit = in_slice(targets, offset, logits.dim(1)?)?;
        let neg_inf = Tensor::full(f32::NEG_INFINITY, scaled.shape(), scaled.device())?
            .to_dtype(scaled.dtype())?;
        let picked = hit.where_cond(&scaled, &neg_inf)?.max_keepdim(D::Minus1)?;
        Tensor::cat(&[max, sum, picked], 1)?
    };
    Ok(SliceStats {
        max: stats.narrow(1, 0, 1)?.squeeze(1)?,
        sum: stats.narrow(1, 1, 1)?.squeeze(1)?,
        picked: stats.narrow(1, 2, 1)?.squeeze(1)?,
    })
}

/// `[rows, vn]` u8 mask: column `j` is row `i`'s target `offset + j`.
fn in_slice(targets: &Tensor, offset: usize, vn: usize) -> Result<Tensor> {
    let rows = targets.dim(0)?;
    let ids = Tensor::arange(offset as u32, (offset + vn) as u32, targets.device())?
        .unsqueeze(0)?
        .broadcast_as((rows, vn))?;
    targets.unsqueeze(1)?.broadcast_as((rows, vn))?.eq(&ids)
}

/// Log-probs are computed in f32 whatever the model dtype (bf16/f16 are upcast), except for
/// f64 models (used by gradient checks), which keep f64.
pub fn logp_dtype(model: DType) -> DType {
    if model == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `targets` as contiguous u32, checked once here (one per row of `n`, each below the
/// vocabulary `v`) so that the per-tile kernels can take any target of any slice.
fn checked_targets(targets: &Tensor, n: usize, v: usize) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    if targets.dims1()? != n {
        bail!("{} targets for {n} rows", targets.dim(0)?);
    }
    if n > 0 {
        let top = targets.max_all()?.to_scalar::<u32>()?;
        if top as usize >= v {
            bail!("target token {top} is outside the vocabulary of {v}");
        }
    }
    Ok(targets)
}

fn check_temperature(t: f64) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        bail!("log-prob temperature must be a positive number, got {t}");
    }
    Ok(())
}

/// Carries a precomputed `[N]` result into the graph of its first argument; `bwd` does the
/// real work. The forward only copies the (small) second argument.
fn pass_through<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        bail!("internal: log-prob result must be a fresh contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// Carries a log-prob result computed outside the graph into the graph of its first argument
/// (`logits`, or `hidden` for the fused LM head); `bwd` does the real work.
struct LogProbGrad {
    targets: Tensor,
    temperature: f64,
    /// Set when the first argument is `hidden` and the logits are `hidden · Wᵀ`.
    lm_head: Option<LmHead>,
}

struct LmHead {
    weight: Tensor,
    tiles: LogitTiles,
    /// Per row, the log-sum-exp of `logits / T` (from the forward).
    lse: Tensor,
    /// The forward's logits per tile (row block by row block, slice by slice), or empty to
    /// recompute them.
    logits: Vec<Tensor>,
}

impl CustomOp2 for LogProbGrad {
    fn name(&self) -> &'static str {
        "selective-log-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        pass_through(s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        logp: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(LmHead {
            weight,
            tiles,
            lse,
            logits: kept,
        }) = &self.lm_head
        else {
            let g = logp_backward(arg, &self.targets, logp, grad, self.temperature)?;
            return Ok((Some(g), None));
        };
        let (n, v) = (arg.dim(0)?, weight.dim(0)?);
        let dtype = logp_dtype(weight.dtype());
        let h = arg.detach();
        // Per row: (g / T, log-sum-exp of the row / T).
        let coef = Tensor::stack(
            &[
                (grad.to_dtype(dtype)? / self.temperature)?,
                lse.to_dtype(dtype)?,
            ],
            1,
        )?
        .contiguous()?;
        let mut kept = kept.iter();
        let mut parts = Vec::with_capacity(n.div_ceil(tiles.rows));
        for (r0, rn) in spans(n, tiles.rows) {
            let tb = self.targets.narrow(0, r0, rn)?;
            let cb = coef.narrow(0, r0, rn)?;
            let mut g_hidden: Option<Tensor> = None;
            for (v0, vn) in spans(v, tiles.vocab) {
                let logits = match kept.next() {
                    Some(l) => l.clone(),
                    None => tile_logits(&h.narrow(0, r0, rn)?, weight, v0, vn, dtype)?,
                };
                let g_logits = slice_grad(&logits, &tb, v0, &cb, self.temperature)?;
                let part = g_logits
                    .to_dtype(weight.dtype())?
                    .matmul(&weight.narrow(0, v0, vn)?)?;
                g_hidden = Some(match g_hidden {
                    None => part,
                    Some(acc) => (acc + part)?,
                });
            }
            parts.extend(g_hidden);
        }
        let g = Tensor::cat(&parts, 0)?.to_dtype(arg.dtype())?;
        Ok((Some(g), None))
    }
}

/// `dL/dlogits` of one tile: `(onehot(target) − exp(logits / T − lse)) · g / T` for the
/// tokens `offset .. offset + vn`, with `coef` `[rows, 2]` holding `(g / T, lse)` per row.
fn slice_grad(
    logits: &Tensor,
    targets: &Tensor,
    offset: usize,
    coef: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    if matches!(logits.device(), Device::Cpu) && logits.dtype() == DType::F32 {
        let op = LogpGradCpu {
            inv_t: (1.0 / temperature) as f32,
            offset,
        };
        return logits
            .contiguous()?
            .apply_op3_no_bwd(targets, &coef.contiguous()?, &op);
    }
    let g = coef.narrow(1, 0, 1)?;
    let lse = coef.narrow(1, 1, 1)?;
    let probs = (logits / temperature)?.broadcast_sub(&lse)?.exp()?;
    let onehot = in_slice(targets, offset, logits.dim(1)?)?.to_dtype(logits.dtype())?;
    (onehot - probs)?.broadcast_mul(&g)
}

/// Forward value, no graph: whole rows are one vocabulary slice.
fn logp_forward(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let stats = slice_stats(logits, targets, 0, temperature)?;
    &stats.picked - stats.log_sum_exp()?
}

/// `dL/dlogits = (onehot(target) − softmax(logits / T)) · g / T`, shape `[N, V]`, f32.
/// `logp` is the forward's result: with it the log-sum-exp of each row is
/// `logits[target] / T − logp` and the CPU kernel needs a single pass over the row.
fn logp_backward(
    logits: &Tensor,
    targets: &Tensor,
    logp: &Tensor,
    grad: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let logits = logits.to_dtype(logp_dtype(logits.dtype()))?.contiguous()?;
    let grad = grad.to_dtype(logits.dtype())?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let lse = ((picked / temperature)? - logp.to_dtype(logits.dtype())?)?;
    let coef = Tensor::stack(&[(grad / temperature)?, lse], 1)?;
    slice_grad(&logits, targets, 0, &coef, temperature)
}

fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], usize)> {
    let data = s.as_slice::<f32>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    let v = match l.dims() {
        [_, v] => *v,
        [_] => 1,
        d => bail!("{what}: expected 1 or 2 dimensions, got {d:?}"),
    };
    Ok((&data[a..b], v))
}

/// The `rows` targets (checked against the vocabulary by [`checked_targets`]; a vocabulary
/// slice holds the targets of other slices too).
fn u32_targets<'a>(s: &'a CpuStorage, l: &Layout, rows: usize) -> Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("targets must be contiguous")
    };
    let t = &data[a..b];
    if t.len() != rows {
        bail!("{} targets for {rows} rows of logits", t.len());
    }
    Ok(t)
}

/// Max of one row of `x · inv_t`, and the sum of `exp(x · inv_t − max)`.
fn row_max_sum(row: &[f32], inv_t: f32) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * inv_t));
    (max, row.iter().map(|&x| (x * inv_t - max).exp()).sum())
}

struct LogpGradCpu {
    inv_t: f32,
    /// The first token of the logits' vocabulary slice.
    offset: usize,
}

impl CustomOp3 for LogpGradCpu {
    fn name(&self) -> &'static str {
        "selective-log-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, v) = f32_rows(s1, l1, "logits")?;
        let rows = l1.dims()[0];
        let targets = u32_targets(s2, l2, rows)?;
        // Per row: (g / T, log-sum-exp of the row / T).
        let (coef, _) = f32_rows(s3, l3, "grad")?;
        let (inv_t, offset) = (self.inv_t, self.offset);
        let mut out = vec![0f32; rows * v];
        out.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let (g, lse) = (coef[2 * i], coef[2 * i + 1]);
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = -(x * inv_t - lse).exp() * g;
                }
                if let Some(o) = (targets[i] as usize)
                    .checked_sub(offset)
                    .and_then(|t| o.get_mut(t))
                {
                    *o += g;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, v))))
    }
}

/// [`SliceStats`] of a `[rows, vn]` f32 tile in one pass per row: `[rows, 3]`.
struct SliceStatsCpu {
    inv_t: f32,
    offset: usize,
}

impl CustomOp2 for SliceStatsCpu {
    fn name(&self) -> &'static str {
        "log-sum-exp-slice"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, v) = f32_rows(s1, l1, "logits")?;
        let rows = l1.dims()[0];
        let targets = u32_targets(s2, l2, rows)?;
        let (inv_t, offset) = (self.inv_t, self.offset);
        let mut out = vec![0f32; rows * 3];
        out.par_chunks_mut(3)
            .zip(logits.par_chunks(v))
            .zip(targets.par_iter())
            .for_each(|((o, row), &t)| {
                (o[0], o[1]) = row_max_sum(row, inv_t);
                o[2] = (t as usize)
                    .checked_sub(offset)
                    .and_then(|j| row.get(j))
                    .map_or(f32::NEG_INFINITY, |&x| x * inv_t);
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, 3))))
    }
}
