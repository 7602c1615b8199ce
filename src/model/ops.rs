//! Two autograd ops that candle does not have and that dominate the cost of a LoRA step.
//!
//! * [`frozen_matmul`]: `x · Wᵀ` for a frozen weight. candle's matmul backward computes and keeps
//!   `dL/dW` even when `W` is a constant; for LoRA training that is the largest tensor of the
//!   step and is thrown away. This op's backward returns only `dL/dx = g · W`.
//! * [`selective_log_softmax`] and [`lm_head_logprobs`]: `log_softmax(logits / T)[target]` per
//!   row, in f32, with the backward `(onehot − softmax) · g / T` computed in one pass instead of
//!   autograd's chain through log_softmax and gather over a 152k vocabulary.
//!   `lm_head_logprobs` fuses the LM head too and works chunk by chunk over rows, so the
//!   `[rows, vocab]` logits never exist at once, neither in the forward nor in the backward.
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

/// Rows per chunk in [`lm_head_logprobs`] and the no-grad log-prob paths: 48 rows × 152k vocab
/// is 29 MB of f32 logits at a time, under the 32 MiB up to which
/// [`super::device::tune_cpu_allocator`] keeps buffers in the heap.
pub const LOGPROB_CHUNK_ROWS: usize = 48;

// ---------------------------------------------------------------------------------------------
// Frozen linear.

/// Up to this many rows, [`frozen_matmul`] computes `(W · xᵀ)ᵀ`: with few rows (decoding) the
/// CPU gemm is up to twice as fast with the weight as the left operand.
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
    let swapped = rows <= SWAP_MAX_ROWS;
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
        if self.swapped && m <= gemv::MAX_ROWS {
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
                    return Ok((CpuStorage::F32(y), Shape::from((n, m))));
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
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
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
/// [`lm_head_logprobs`]; beyond it they are recomputed chunk by chunk (one more LM-head matmul,
/// bounded memory).
pub const KEEP_LOGITS_BYTES: usize = 1 << 30;

/// [`selective_log_softmax`] of `hidden · weightᵀ`, fused and chunked: `hidden` `[N, d]`,
/// `weight` `[V, d]` (frozen, e.g. the LM head or tied embeddings), `targets` `[N]`. Only
/// `hidden` gets a gradient. The forward never holds more than one chunk of temporaries; the
/// logits themselves are kept for the backward while they fit in [`KEEP_LOGITS_BYTES`], and
/// recomputed otherwise.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    lm_head_logprobs_with_budget(hidden, weight, targets, temperature, KEEP_LOGITS_BYTES)
}

/// [`lm_head_logprobs`] keeping at most `keep_bytes` of logits for the backward.
pub fn lm_head_logprobs_with_budget(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    keep_bytes: usize,
) -> Result<Tensor> {
    check_temperature(temperature)?;
    let (n, _) = hidden.dims2()?;
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    let h = hidden.detach();
    let dtype = logp_dtype(weight.dtype());
    let keep = hidden.track_op() && n * weight.dim(0)? * dtype.size_in_bytes() <= keep_bytes;
    let mut parts = Vec::with_capacity(n.div_ceil(LOGPROB_CHUNK_ROWS));
    let mut kept = Vec::new();
    for start in (0..n).step_by(LOGPROB_CHUNK_ROWS) {
        let len = LOGPROB_CHUNK_ROWS.min(n - start);
        let logits = h
            .narrow(0, start, len)?
            .matmul(&weight.t()?)?
            .to_dtype(dtype)?;
        parts.push(logp_forward(
            &logits,
            &targets.narrow(0, start, len)?,
            temperature,
        )?);
        if keep {
            kept.push(logits);
        }
    }
    let logp = if parts.is_empty() {
        Tensor::zeros(0, logp_dtype(weight.dtype()), hidden.device())?
    } else {
        Tensor::cat(&parts, 0)?
    };
    if !hidden.track_op() {
        return Ok(logp);
    }
    let op = LogProbGrad {
        targets,
        temperature,
        lm_head: Some(LmHead {
            weight: weight.detach(),
            logits: kept,
        }),
    };
    hidden.apply_op2(&logp, op)
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
    /// The forward's logits per chunk, or empty to recompute them.
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
            logits: kept,
        }) = &self.lm_head
        else {
            let g = logp_backward(arg, &self.targets, logp, grad, self.temperature)?;
            return Ok((Some(g), None));
        };
        let n = arg.dim(0)?;
        let wt = weight.t()?;
        let mut parts = Vec::with_capacity(n.div_ceil(LOGPROB_CHUNK_ROWS));
        for start in (0..n).step_by(LOGPROB_CHUNK_ROWS) {
            let len = LOGPROB_CHUNK_ROWS.min(n - start);
            let logits = match kept.get(start / LOGPROB_CHUNK_ROWS) {
                Some(l) => l.clone(),
                None => arg
                    .narrow(0, start, len)?
                    .matmul(&wt)?
                    .to_dtype(logp_dtype(weight.dtype()))?,
            };
            let g_logits = logp_backward(
                &logits,
                &self.targets.narrow(0, start, len)?,
                &logp.narrow(0, start, len)?,
                &grad.narrow(0, start, len)?,
                self.temperature,
            )?;
            parts.push(g_logits.to_dtype(weight.dtype())?.matmul(weight)?);
        }
        let g = Tensor::cat(&parts, 0)?.to_dtype(arg.dtype())?;
        Ok((Some(g), None))
    }
}

/// Forward value, no graph: a single pass per row on the CPU, tensor ops elsewhere.
fn logp_forward(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    if matches!(logits.device(), Device::Cpu) && logits.dtype() == DType::F32 {
        let logits = logits.contiguous()?;
        let targets = targets.contiguous()?;
        return logits.apply_op2_no_bwd(
            &targets,
            &LogpCpu {
                inv_t: (1.0 / temperature) as f32,
            },
        );
    }
    let scaled = (logits / temperature)?;
    let max = scaled.max_keepdim(D::Minus1)?;
    let lse = scaled
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    let picked = scaled.gather(&targets.unsqueeze(1)?, 1)?;
    picked.sub(&lse)?.squeeze(1)
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
    let grad = grad.to_dtype(logits.dtype())?.contiguous()?;
    if matches!(logits.device(), Device::Cpu) && logits.dtype() == DType::F32 {
        let targets = targets.contiguous()?;
        let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        let lse = ((picked / temperature)? - logp.to_dtype(DType::F32)?)?;
        let coef = Tensor::stack(&[(&grad / temperature)?, lse], 1)?.contiguous()?;
        let op = LogpGradCpu {
            inv_t: (1.0 / temperature) as f32,
        };
        return logits.apply_op3_no_bwd(&targets, &coef, &op);
    }
    let v = logits.dim(1)?;
    let probs = candle_nn::ops::softmax_last_dim(&(&logits / temperature)?)?;
    let onehot = targets
        .unsqueeze(1)?
        .broadcast_as((targets.dim(0)?, v))?
        .eq(&Tensor::arange(0u32, v as u32, logits.device())?
            .unsqueeze(0)?
            .broadcast_as((targets.dim(0)?, v))?)?
        .to_dtype(logits.dtype())?;
    (onehot - probs)?.broadcast_mul(&(grad / temperature)?.unsqueeze(1)?)
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

fn u32_targets<'a>(s: &'a CpuStorage, l: &Layout, rows: usize, v: usize) -> Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("targets must be contiguous")
    };
    let t = &data[a..b];
    if t.len() != rows {
        bail!("{} targets for {rows} rows of logits", t.len());
    }
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        bail!("target token {bad} is outside the vocabulary of {v}");
    }
    Ok(t)
}

/// Max and log-sum-exp of one row of `x · inv_t`.
fn row_lse(row: &[f32], inv_t: f32) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * inv_t));
    let sum: f32 = row.iter().map(|&x| (x * inv_t - max).exp()).sum();
    max + sum.ln()
}

struct LogpCpu {
    inv_t: f32,
}

impl CustomOp2 for LogpCpu {
    fn name(&self) -> &'static str {
        "selective-log-softmax-fwd"
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
        let targets = u32_targets(s2, l2, rows, v)?;
        let inv_t = self.inv_t;
        let out: Vec<f32> = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| row[t as usize] * inv_t - row_lse(row, inv_t))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }
}

struct LogpGradCpu {
    inv_t: f32,
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
        let targets = u32_targets(s2, l2, rows, v)?;
        // Per row: (g / T, log-sum-exp of the row / T).
        let (coef, _) = f32_rows(s3, l3, "grad")?;
        let inv_t = self.inv_t;
        let mut out = vec![0f32; rows * v];
        out.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let (g, lse) = (coef[2 * i], coef[2 * i + 1]);
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = -(x * inv_t - lse).exp() * g;
                }
                o[targets[i] as usize] += g;
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, v))))
    }
}
