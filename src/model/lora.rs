//! A frozen linear layer with an optional LoRA adapter (Hu et al. 2021, PEFT's conventions).
//!
//! `y = x·Wᵀ + b + (dropout(x)·Aᵀ)·Bᵀ · alpha/r`, with `A` `[r, in]` drawn like PEFT
//! (kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in)) and `B` `[out, r]` zero, so a fresh
//! adapter leaves the model unchanged. `A` and `B` are the only [`Var`]s of the model; they are
//! kept in f32 when the model runs in f32/bf16/f16 so that optimizer updates are not rounded
//! away (f64 models, used by gradient checks, get f64 adapters).

use super::ops::frozen_matmul;
use super::quant::Frozen;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, Context, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, Var,
};
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
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    pub dropout: f64,
}

impl LoraPair {
    /// A fresh adapter for the frozen `weight` (`[out, in]`): `A` as PEFT initialises it,
    /// `B = 0`, on the weight's device.
    pub fn for_weight(
        weight: &Frozen,
        r: usize,
        alpha: f64,
        dropout: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims()?;
        let device = &weight.device();
        let dtype = match weight {
            Frozen::Dense(w) if w.dtype() == DType::F64 => DType::F64,
            _ => DType::F32,
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
    /// `[out, in]`, dense or quantized (src/model/quant.rs).
    weight: Frozen,
    /// `[out]`.
    bias: Option<Tensor>,
    adapter: Option<LoraPair>,
}

impl LoraLinear {
    pub fn new(weight: Frozen, bias: Option<Tensor>, adapter: Option<LoraPair>) -> Self {
        Self {
            weight,
            bias,
            adapter,
        }
    }

    pub fn weight(&self) -> &Frozen {
        &self.weight
    }

    pub fn adapter(&self) -> Option<&LoraPair> {
        self.adapter.as_ref()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let (out, inp) = self.weight.dims().unwrap_or_default();
        (inp, out)
    }

    /// The frozen weight with the adapter merged in, `W + (B·A)·alpha/r` (the base weight when
    /// `adapters` is off or there is no adapter), in `dtype`: what a sampling step reads
    /// instead of running the adapter's two small matmuls in every layer. A quantized weight
    /// is dequantized for it: a full-size copy, which is why a quantized base samples through
    /// the adapters unless `--sample-dtype` asks for the copy.
    pub fn merged_weight(&self, adapters: bool, dtype: DType) -> Result<Tensor> {
        let adapter = self.adapter.as_ref().filter(|_| adapters);
        match &self.weight {
            Frozen::Dense(w) => sampling_copy(w, adapter, dtype),
            Frozen::Quantized(_) => {
                sampling_copy(&self.weight.to_dense(DType::F32)?, adapter, dtype)
            }
        }
    }

    /// `x · Wᵀ` for the frozen weight alone.
    fn frozen_product(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Frozen::Dense(w) => frozen_matmul(x, w),
            Frozen::Quantized(q) => Frozen::quantized_matmul(q, x),
        }
    }

    /// `x · mergedᵀ + b` for a weight from [`Self::merged_weight`] (no gradient).
    pub fn forward_merged(&self, x: &Tensor, merged: &Tensor) -> Result<Tensor> {
        let y = frozen_matmul(x, merged)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    /// `x` is `[..., in]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let Some(ad) = self.adapter.as_ref().filter(|_| pass.adapters) else {
            return self.add_bias(self.frozen_product(x)?);
        };
        let (a, b) = if pass.grad {
            (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())
        } else {
            (ad.a.as_tensor().detach(), ad.b.as_tensor().detach())
        };
        let mask = match (pass.dropout_rng, ad.dropout > 0.0) {
            (Some(rng), true) => {
                // A poisoned lock only means another pass panicked; the RNG state is still valid.
                let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
                Some(dropout_mask(x, a.dtype(), ad.dropout, &mut rng)?)
            }
            _ => None,
        };
        if self.fusable(x, &a) {
            let (inner, _) = self.dims();
            let rows = x.elem_count() / inner.max(1);
            let x2 = x.reshape((rows, inner))?;
            let mask = mask.map(|m| m.reshape((rows, inner))).transpose()?;
            let op = LoraMatmul {
                weight: self.weight.clone(),
                x_in: mask.as_ref().map(|m| x2.detach() * m).transpose()?,
                mask,
                scale: ad.scale,
            };
            return self.unflatten(x2.apply_op3(&a, &b, op)?, x);
        }
        let y = self.add_bias(self.frozen_product(x)?)?;
        let mut xin = x.to_dtype(a.dtype())?;
        if let Some(mask) = &mask {
            xin = xin.mul(mask)?;
        }
        let low = xin.broadcast_matmul(&a.t()?)?;
        let up = (low.broadcast_matmul(&b.t()?)? * ad.scale)?;
        let up = up.to_dtype(y.dtype())?;
        y + up
    }

    /// `forward(silu(gate) · up)`: the gated MLP's down projection.
    ///
    /// Why: a training forward would keep the activation (`[rows, intermediate]`, the largest
    /// tensor of a layer) for this product's backward, beside `gate` and `up` that it is
    /// computed from. Fused here, the graph keeps `gate` and `up` only and the backward
    /// recomputes the activation, one pass over memory. Where [`Self::forward`] would compose
    /// (other devices, few rows, no adapter) or dropout is on, it composes.
    pub fn forward_swiglu(&self, gate: &Tensor, up: &Tensor, pass: &Pass) -> Result<Tensor> {
        let adapter = self.adapter.as_ref().filter(|ad| {
            pass.grad && pass.adapters && (pass.dropout_rng.is_none() || ad.dropout == 0.0)
        });
        let fused = adapter.filter(|ad| self.fusable(gate, ad.a.as_tensor()));
        let Some(ad) = fused else {
            return self.forward(&super::fused::swiglu(gate, up)?, pass);
        };
        let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
        let (inner, _) = self.dims();
        let rows = gate.elem_count() / inner.max(1);
        let flat = |x: &Tensor| x.reshape((rows, inner))?.contiguous();
        // A custom op takes three inputs: the adapter travels as one, [A.flatten(), B.flatten()].
        let ab = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
        let op = SwigluLoraMatmul {
            lora: LoraMatmul {
                weight: self.weight.clone(),
                x_in: None,
                mask: None,
                scale: ad.scale,
            },
            rank: a.dim(0)?,
        };
        self.unflatten(flat(gate)?.apply_op3(&flat(up)?, &ab, op)?, gate)
    }

    /// A fused op's output `y` (`[rows, out]`) in the leading dimensions of its input `x`
    /// (`[..., in]`), plus the bias.
    fn unflatten(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.dims().1;
        }
        self.add_bias(y.reshape(dims)?)
    }

    /// Whether a product of `x` with adapter `a` runs as one [`LoraMatmul`]: on the CPU, in
    /// f32 or f64 (f32 for a quantized weight), with more rows than decoding has.
    fn fusable(&self, x: &Tensor, a: &Tensor) -> bool {
        let rows = x.elem_count() / self.dims().0.max(1);
        let dtype = match &self.weight {
            Frozen::Dense(_) => matches!(x.dtype(), DType::F32 | DType::F64),
            Frozen::Quantized(_) => x.dtype() == DType::F32,
        };
        x.device().is_cpu() && x.dtype() == a.dtype() && dtype && rows > super::gemv::MAX_ROWS
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x·Wᵀ + s·(x_in·Aᵀ)·Bᵀ` for a frozen `W` as one autograd node, on the CPU (f32, f64; f32
/// for a quantized `W`, through src/model/quant.rs's kernels); `x_in` is `x` or its dropout.
/// Why: composed, a LoRA linear is five nodes (frozen product, two products, scale, add), each
/// kept by the graph, and in the backward every node's output gradient is a zeroed buffer
/// plus an add, over `[rows, out]` (out = 4864 for an MLP projection), and the input gradient
/// gathers two contributions. Here the forward adds the branch in place and the backward
/// returns `dL/dx`, `dL/dA` and `dL/dB` at once.
struct LoraMatmul {
    weight: Frozen,
    /// `x` with dropout applied, when dropout is on (no gradient flows through the mask).
    x_in: Option<Tensor>,
    /// The dropout mask (zeros and `1/(1-p)`), for `dL/dx` of the branch.
    mask: Option<Tensor>,
    scale: f64,
}

impl LoraMatmul {
    /// The forward on CPU storages: `x` `[m, k]`, `a` `[r, k]`, `b` `[n, r]` → `[m, n]`.
    fn product(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (a, la): (&CpuStorage, &Layout),
        (b, lb): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (r, _) = la.shape().dims2()?;
        let (n, _) = lb.shape().dims2()?;
        let y = self.weight.cpu_product(x, lx)?;
        let x_in = self.x_in.as_ref().map(Tensor::storage_and_layout);
        let (xs, lxs) = match &x_in {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => (s, *l),
                _ => bail!("lora-matmul: the dropout input is not on the CPU"),
            },
            None => (x, lx),
        };
        let low = xs.matmul(a, (1, m, r, k), lxs, &la.transpose(0, 1)?)?;
        let up = low.matmul(
            b,
            (1, m, n, r),
            &Layout::contiguous((m, r)),
            &lb.transpose(0, 1)?,
        )?;
        let y = match (y, up) {
            (CpuStorage::F32(mut y), CpuStorage::F32(up)) => {
                add_scaled(&mut y, &up, self.scale as f32);
                CpuStorage::F32(y)
            }
            (CpuStorage::F64(mut y), CpuStorage::F64(up)) => {
                add_scaled(&mut y, &up, self.scale);
                CpuStorage::F64(y)
            }
            _ => bail!("lora-matmul: expected f32 or f64 throughout"),
        };
        Ok((y, Shape::from((m, n))))
    }

    /// `(dL/dx, dL/dA, dL/dB)` for the output gradient `grad`; `dL/dx` only when `need_dx`.
    fn grads(
        &self,
        x: &Tensor,
        (a, b): (&Tensor, &Tensor),
        grad: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (a, b, g) = (a.detach(), b.detach(), grad.detach());
        let x_in = self.x_in.clone().unwrap_or_else(|| x.detach());
        let gb = (g.matmul(&b)? * self.scale)?;
        let da = gb.t()?.matmul(&x_in)?;
        let db = (g.t()?.matmul(&x_in.matmul(&a.t()?)?)? * self.scale)?;
        if !need_dx {
            return Ok((None, da, db));
        }
        let mut branch = gb.matmul(&a)?;
        if let Some(mask) = &self.mask {
            branch = (branch * mask)?;
        }
        let dx = (self.weight.input_grad(&g)? + branch)?;
        Ok((Some(dx), da, db))
    }
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.product((x, lx), (a, la), (b, lb))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The first layer's input (normed embeddings) has no gradient to carry: skipping its
        // dx saves one frozen product of every adapted projection of that layer.
        let (dx, da, db) = self.grads(x, (a, b), grad, x.track_op())?;
        Ok((dx, Some(da), Some(db)))
    }
}

/// [`LoraMatmul`] of `silu(gate) · up` as one node whose inputs are `gate`, `up` and the
/// adapter packed as `[A.flatten(), B.flatten()]`: the activation is computed in the forward
/// and again in the backward, never kept (see [`LoraLinear::forward_swiglu`]).
struct SwigluLoraMatmul {
    lora: LoraMatmul,
    rank: usize,
}

impl SwigluLoraMatmul {
    /// The layouts of `A` `[r, k]` and `B` `[n, r]` inside the packed adapter.
    fn unpack(&self, lab: &Layout, k: usize) -> Result<(Layout, Layout)> {
        let Some((start, _)) = lab.contiguous_offsets() else {
            bail!("swiglu-lora-matmul: the packed adapter is not contiguous")
        };
        let (n, r) = (self.lora.weight.dims()?.0, self.rank);
        if lab.shape().elem_count() != r * (k + n) {
            bail!("swiglu-lora-matmul: packed adapter of {:?}", lab.shape());
        }
        Ok((
            Layout::contiguous_with_offset((r, k), start),
            Layout::contiguous_with_offset((n, r), start + r * k),
        ))
    }
}

impl CustomOp3 for SwigluLoraMatmul {
    fn name(&self) -> &'static str {
        "swiglu-lora-matmul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        lg: &Layout,
        up: &CpuStorage,
        lu: &Layout,
        ab: &CpuStorage,
        lab: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lg.shape().dims2()?;
        let act = super::fused::swiglu_storage(gate, lg, up, lu)?;
        let (la, lb) = self.unpack(lab, k)?;
        self.lora
            .product((&act, &Layout::contiguous((m, k))), (ab, &la), (ab, &lb))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        ab: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gate, up) = (gate.detach(), up.detach());
        let k = gate.dim(1)?;
        let (n, r) = (self.lora.weight.dims()?.0, self.rank);
        let a = ab.narrow(0, 0, r * k)?.reshape((r, k))?;
        let b = ab.narrow(0, r * k, n * r)?.reshape((n, r))?;
        let act = super::fused::swiglu(&gate, &up)?;
        let (d_act, da, db) = self.lora.grads(&act, (&a, &b), grad, true)?;
        let d_act = d_act.context("swiglu-lora-matmul: no input gradient")?;
        let (d_gate, d_up) = super::fused::swiglu_grads(&gate, &up, &d_act)?;
        let d_ab = Tensor::cat(&[da.flatten_all()?, db.flatten_all()?], 0)?;
        Ok((Some(d_gate), Some(d_up), Some(d_ab)))
    }
}

/// `y += s·u`, in parallel.
fn add_scaled<T>(y: &mut [T], u: &[T], s: T)
where
    T: Copy + Send + Sync + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    use rayon::prelude::*;
    y.par_chunks_mut(1 << 14)
        .zip(u.par_chunks(1 << 14))
        .for_each(|(ys, us)| {
            for (y, &u) in ys.iter_mut().zip(us) {
                *y = *y + s * u;
            }
        });
}

/// `weight + (B·A)·alpha/r` for `adapter` (or `weight` alone), in `dtype`: a sampling copy.
pub fn sampling_copy(weight: &Tensor, adapter: Option<&LoraPair>, dtype: DType) -> Result<Tensor> {
    let (out_dim, in_dim) = weight.dims2()?;
    let (a, b, scale) = match adapter {
        Some(ad) => (
            ad.a.as_tensor().detach(),
            ad.b.as_tensor().detach(),
            ad.scale,
        ),
        // Rank 0: the same one-pass conversion with nothing added.
        None => (
            Tensor::zeros((0, in_dim), DType::F32, weight.device())?,
            Tensor::zeros((out_dim, 0), DType::F32, weight.device())?,
            0.0,
        ),
    };
    if let Some(copy) = copy_on_cpu(weight, &a, &b, scale, dtype)? {
        return Ok(copy);
    }
    let merged = match adapter {
        Some(_) => (weight.to_dtype(a.dtype())? + (b.matmul(&a)? * scale)?)?,
        None => weight.clone(),
    };
    merged.to_dtype(dtype)
}

/// [`sampling_copy`] in one parallel pass over the weight, for the common case (CPU, f32
/// weight and adapters, f32 or f16 result); `None` otherwise. Why: the tensor-op version
/// (`B·A`, scale, add, convert; candle's f16 conversion is one scalar loop) took 2-4 s for a
/// Qwen2.5-0.5B-shaped model on the bench machine, paid at every sampling call.
fn copy_on_cpu(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dtype: DType,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let f32s = [weight, a, b].iter().all(|t| t.dtype() == DType::F32);
    if !weight.device().is_cpu() || !f32s || !matches!(dtype, DType::F32 | DType::F16) {
        return Ok(None);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let r = a.dim(0)?;
    let (w, a, b) = (weight.contiguous()?, a.contiguous()?, b.contiguous()?);
    let guards = [
        w.storage_and_layout(),
        a.storage_and_layout(),
        b.storage_and_layout(),
    ];
    let mut slices = Vec::with_capacity(3);
    for (storage, layout) in &guards {
        let (Storage::Cpu(CpuStorage::F32(v)), Some((lo, hi))) =
            (&**storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        slices.push(&v[lo..hi]);
    }
    let (w, a, b) = (slices[0], slices[1], slices[2]);
    let scale = scale as f32;
    // Row j of the result: W[j] + scale · Σ_k B[j, k] · A[k].
    let merged_row = |j: usize, row: &mut [f32]| {
        row.copy_from_slice(&w[j * in_dim..(j + 1) * in_dim]);
        for (k, &bjk) in b[j * r..(j + 1) * r].iter().enumerate() {
            let c = scale * bjk;
            for (x, &akx) in row.iter_mut().zip(&a[k * in_dim..(k + 1) * in_dim]) {
                *x += c * akx;
            }
        }
    };
    let shape = (out_dim, in_dim);
    let tensor = if dtype == DType::F32 {
        let mut out = vec![0f32; out_dim * in_dim];
        out.par_chunks_mut(in_dim)
            .enumerate()
            .for_each(|(j, row)| merged_row(j, row));
        Tensor::from_vec(out, shape, weight.device())?
    } else {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![half::f16::ZERO; out_dim * in_dim];
        out.par_chunks_mut(in_dim).enumerate().for_each_init(
            || vec![0f32; in_dim],
            |row, (j, dst)| {
                merged_row(j, row);
                dst.convert_from_f32_slice(row);
            },
        );
        Tensor::from_vec(out, shape, weight.device())?
    };
    Ok(Some(tensor))
}

/// An inverted-dropout mask for `x` (zeros and `1/(1-p)`, in `dtype`) from our seeded RNG
/// (candle's own dropout draws from an unseeded one).
fn dropout_mask(x: &Tensor, dtype: DType, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let draws = (0..x.elem_count()).map(|_| rng.random::<f64>() >= p);
    let mask = if dtype == DType::F64 {
        let mask: Vec<f64> = draws.map(|kept| if kept { keep } else { 0.0 }).collect();
        Tensor::from_vec(mask, x.shape(), x.device())?
    } else {
        let mask: Vec<f32> = draws
            .map(|kept| if kept { keep as f32 } else { 0.0 })
            .collect();
        Tensor::from_vec(mask, x.shape(), x.device())?
    };
    mask.to_dtype(dtype)
}
