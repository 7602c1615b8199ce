//! A frozen base weight kept quantized (`model.quantize`, `--quantize`), as QLoRA trains:
//! the base in 4 or 8 bits, the adapters in f32.
//!
//! Why: every base weight in f32 is 4 bytes a parameter, so a 7B model needs 28 GB before a
//! single activation. Kept in Q4_K it needs about 4 GB.
//!
//! How, on the CPU: a product of few rows (a decoding step) runs candle's quantized matmul,
//! which rounds the activations to 8 bits and reads the weights once. A product of many rows
//! (training, scoring, prefill) dequantizes `W` a strip of rows at a time into a small f32
//! buffer and multiplies in f32, so it computes exactly what the dequantized model does and
//! the whole matrix is never held in f32. LoRA below a frozen layer needs that layer's input
//! gradient `dL/dx = dL/dy · W`, computed the same way by strips of `W`'s columns. On CUDA the
//! forward is candle's quantized kernel and the input gradient dequantizes one layer's weight
//! at a time (docs/model.md §8).
//!
//! The default ([`Quantize::None`]) dequantizes everything at load: the exact path, the one
//! that matches transformers.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use serde::{Deserialize, Serialize};

/// What happens at load to the base weights of the linear layers, and of the embedding table
/// when the head is not tied to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantize {
    /// Dequantize a GGUF's tensors; keep a safetensors model as it is (the exact path).
    #[default]
    #[serde(rename = "none")]
    None,
    /// Keep a GGUF's quantized tensors quantized (safetensors weights stay dense).
    #[serde(rename = "keep")]
    Keep,
    /// Quantize to Q8_0 at load (GGUF tensors already quantized are kept as they are).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Quantize to Q4_K at load (GGUF tensors already quantized are kept as they are).
    #[serde(rename = "q4_k")]
    Q4K,
}

impl Quantize {
    /// The format dense linear weights are quantized to at load, if any.
    pub fn target(self) -> Option<GgmlDType> {
        match self {
            Quantize::None | Quantize::Keep => None,
            Quantize::Q8_0 => Some(GgmlDType::Q8_0),
            Quantize::Q4K => Some(GgmlDType::Q4K),
        }
    }

    /// Whether quantized GGUF tensors stay quantized.
    pub fn keeps(self) -> bool {
        self != Quantize::None
    }
}

/// The formats a kept weight may have: those candle multiplies on the CPU and that GGUF
/// checkpoints of the models we train ship in.
pub fn supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// A frozen `[out, in]` weight: dense, or quantized row by row (GGUF layout).
#[derive(Debug, Clone)]
pub enum Frozen {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Frozen {
    /// Quantizes a dense `[out, in]` weight to `dtype`; `name` is for the error.
    pub fn quantize(weight: &Tensor, dtype: GgmlDType, name: &str) -> anyhow::Result<Frozen> {
        let (_, inp) = weight.dims2()?;
        let block = dtype.block_size();
        if inp % block != 0 {
            anyhow::bail!(
                "cannot quantize `{name}` to {dtype:?}: its {inp} input features are not a \
                 multiple of the format's block of {block}; use --quantize q8_0 (blocks of 32) \
                 or --quantize none"
            );
        }
        let q = QTensor::quantize(&weight.to_dtype(DType::F32)?, dtype)?;
        Ok(Frozen::Quantized(Arc::new(q)))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Quantized(q) => q.shape().dims2(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Frozen::Dense(w) => w.device().clone(),
            Frozen::Quantized(q) => q.device(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Frozen::Quantized(_))
    }

    /// The whole weight in `dtype` (a dequantized copy for a quantized one): for merged
    /// sampling copies and exports, never for a training product.
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => w.to_dtype(dtype),
            Frozen::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// Rows `ids` (`[n]`, u32) of the weight in `dtype`, `[n, in]`: an embedding lookup. A
    /// quantized table dequantizes just those rows, to the values the dequantized table holds.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => w.index_select(ids, 0)?.to_dtype(dtype),
            Frozen::Quantized(q) => q.embedding(ids)?.to_dtype(dtype),
        }
    }

    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        match self {
            Frozen::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Frozen::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// `g · W` (`[m, out]` → `[m, in]`): the input gradient of a product with this weight,
    /// without a graph.
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => g.matmul(w),
            Frozen::Quantized(q) => input_grad(q, g),
        }
    }

    /// `x · Wᵀ` of a CPU storage `x` `[m, in]` (f32 for a quantized weight), without a graph:
    /// for ops that fuse more around the product (`super::lora`).
    pub(crate) fn cpu_product(&self, x: &CpuStorage, lx: &Layout) -> Result<CpuStorage> {
        let (m, k) = lx.shape().dims2()?;
        match self {
            Frozen::Dense(w) => {
                let n = w.dim(0)?;
                let (w, lw) = w.storage_and_layout();
                let Storage::Cpu(w) = &*w else {
                    bail!("frozen product: the weight is not on the CPU")
                };
                x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)
            }
            Frozen::Quantized(q) => Ok(QuantizedLinear(q.clone()).cpu_fwd(x, lx)?.0),
        }
    }

    /// `x · Wᵀ` for a quantized weight, `x` `[..., in]`, with the gradient to `x`.
    pub fn quantized_matmul(q: &Arc<QTensor>, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&inner, lead)) = dims.split_last() else {
            bail!("quantized matmul: input must have at least one dimension")
        };
        let (out, _) = q.shape().dims2()?;
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, inner))?.contiguous()?;
        let y = x2.apply_op1(QuantizedLinear(q.clone()))?;
        let mut out_dims = lead.to_vec();
        out_dims.push(out);
        y.reshape(out_dims)
    }
}

/// `x · Wᵀ` through candle's quantized kernels, with the input gradient of [`input_grad`].
struct QuantizedLinear(Arc<QTensor>);

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if m <= super::gemv::MAX_ROWS || !matches!(x, CpuStorage::F32(_)) {
            return CustomOp1::cpu_fwd(self.0.as_ref(), x, layout);
        }
        let q = self.0.as_ref();
        let (n, _) = q.shape().dims2()?;
        let data = q.data()?;
        let strip_rows = (STRIP_ELEMS / k.max(1)).clamp(1, n.max(1));
        let mut y = vec![0f32; m * n];
        let mut first = 0;
        while first < n {
            let rows = strip_rows.min(n - first);
            let w = dequantize_rows(q, &data, first, rows)?;
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cpu(ws) = &*ws else {
                bail!("quantized-linear: a dequantized strip is not on the CPU")
            };
            let CpuStorage::F32(part) =
                x.matmul(ws, (1, m, rows, k), layout, &wl.transpose(0, 1)?)?
            else {
                bail!("quantized-linear: expected an f32 product")
            };
            for (dst, src) in y.chunks_exact_mut(n).zip(part.chunks_exact(rows)) {
                dst[first..first + rows].copy_from_slice(src);
            }
            first += rows;
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        CustomOp1::cuda_fwd(self.0.as_ref(), x, layout)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        input_grad(&self.0, grad).map(Some)
    }
}

/// Elements of `W` dequantized at once in [`input_grad`]: 4 MiB of f32, whatever the layer.
const STRIP_ELEMS: usize = 1 << 20;

/// `g · W` (`[m, out]` · `[out, in]` → `[m, in]`) for a quantized `W`.
///
/// On the CPU, by strips of `W`'s columns whole blocks wide: each strip's blocks are gathered
/// from every row, dequantized (`out × width` f32, about `STRIP_ELEMS`) and multiplied, and
/// the strips of `dL/dx` are joined. On CUDA candle has no partial dequantization, so the
/// layer's weight is dequantized to f16 for the product and dropped after it: one layer at a
/// time, never the model.
pub fn input_grad(q: &QTensor, g: &Tensor) -> Result<Tensor> {
    let (out, inp) = q.shape().dims2()?;
    let g = g.contiguous()?;
    if !q.device().is_cpu() {
        let w = q.dequantize_f16(&q.device())?.to_dtype(g.dtype())?;
        return g.matmul(&w);
    }
    let block = q.dtype().block_size();
    let blocks = inp / block;
    let strip_blocks = (STRIP_ELEMS / (out * block).max(1)).clamp(1, blocks.max(1));
    let bytes = q.data()?;
    let g32 = g.to_dtype(DType::F32)?;
    let mut strips = Vec::with_capacity(blocks.div_ceil(strip_blocks));
    let mut first = 0;
    while first < blocks {
        let width = strip_blocks.min(blocks - first);
        let w = dequantize_columns(q, &bytes, first, width)?;
        strips.push(g32.matmul(&w)?);
        first += width;
    }
    let dx = if strips.len() == 1 {
        strips.pop().unwrap_or(g32)
    } else {
        Tensor::cat(&strips, 1)?
    };
    debug_assert_eq!(dx.dims2()?, (g.dim(0)?, inp));
    dx.to_dtype(g.dtype())
}

/// Rows `first .. first + rows` of a CPU-held quantized `W` (`data` its bytes), as an f32
/// `[rows, in]` tensor. A row is whole blocks, so the rows are one run of bytes.
fn dequantize_rows(q: &QTensor, data: &[u8], first: usize, rows: usize) -> Result<Tensor> {
    let dtype = q.dtype();
    let (_, inp) = q.shape().dims2()?;
    let row_bytes = inp / dtype.block_size() * dtype.type_size();
    let bytes = &data[first * row_bytes..(first + rows) * row_bytes];
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, inp))?.dequantize(&Device::Cpu)
}

/// Columns `first·block .. (first + width)·block` of a CPU-held quantized `W` (`data` its
/// bytes), as an f32 `[out, width·block]` tensor.
fn dequantize_columns(q: &QTensor, data: &[u8], first: usize, width: usize) -> Result<Tensor> {
    let dtype = q.dtype();
    let (out, inp) = q.shape().dims2()?;
    let block_bytes = dtype.type_size();
    let row_bytes = inp / dtype.block_size() * block_bytes;
    let (start, len) = (first * block_bytes, width * block_bytes);
    // u64 words: the block structs candle reads the bytes as need at most 8-byte alignment.
    let mut words = vec![0u64; (out * len).div_ceil(8)];
    let strip = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..out * len];
    for (row, dst) in strip.chunks_exact_mut(len).enumerate() {
        let at = row * row_bytes + start;
        dst.copy_from_slice(&data[at..at + len]);
    }
    let storage = QStorage::from_data(Cow::Borrowed(strip), &Device::Cpu, dtype)?;
    QTensor::new(storage, (out, width * dtype.block_size()))?.dequantize(&Device::Cpu)
}

/// `q` with its rows reordered: row `i` of the result is row `order[i]` of `q` (a GGUF
/// `llama` q/k projection's rows are permuted for llama.cpp's RoPE; see `gguf.rs`).
pub fn reorder_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (out, inp) = q.shape().dims2()?;
    if order.len() != out {
        bail!("reorder_rows: {} indices for {out} rows", order.len());
    }
    let dtype = q.dtype();
    let row_bytes = inp / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut words = vec![0u64; (out * row_bytes).div_ceil(8)];
    let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..out * row_bytes];
    for (dst, &src) in bytes.chunks_exact_mut(row_bytes).zip(order) {
        dst.copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &q.device(), dtype)?;
    QTensor::new(storage, (out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// Relative error of `a` against `b`: max |a − b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap()) / max_abs(b)
    }

    const FORMATS: [GgmlDType; 6] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
    ];

    /// The error candle's kernel (few rows) may have against the f32 product on the same
    /// dequantized weights: it rounds the activations to 8 bits for the dot products.
    fn forward_tolerance(dtype: GgmlDType) -> f32 {
        match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q6K => 0.01,
            _ => 0.02,
        }
    }

    #[test]
    fn the_quantized_forward_matches_the_dequantized_f32_product_in_every_format() {
        // 768 inputs: three K-quant super-blocks, and 24 blocks of the 32-wide formats; 2048
        // outputs: more than one strip of rows.
        let w = random((2048, 768), 1);
        for dtype in FORMATS {
            let Frozen::Quantized(q) = Frozen::quantize(&w, dtype, "w").unwrap() else {
                unreachable!()
            };
            let dense = q.dequantize(&Device::Cpu).unwrap();
            // Many rows (training): dequantized strips in f32, the dense product's arithmetic.
            let x = random((40, 768), 2);
            let y = Frozen::quantized_matmul(&q, &x).unwrap();
            let exact = x.matmul(&dense.t().unwrap()).unwrap();
            let err = rel(&y, &exact);
            assert!(err < 1e-5, "{dtype:?}, 40 rows: {err}");
            // Few rows (decoding): candle's kernel, activations rounded to 8 bits.
            let x = random((5, 768), 3);
            let y = Frozen::quantized_matmul(&q, &x).unwrap();
            let exact = x.matmul(&dense.t().unwrap()).unwrap();
            let err = rel(&y, &exact);
            assert!(
                err > 0.0 && err < forward_tolerance(dtype),
                "{dtype:?}, 5 rows: {err}"
            );
            // And the dequantized weight is the original up to the format's own error.
            let werr = rel(&dense, &w);
            assert!(werr < 0.2, "{dtype:?} weight error {werr}");
        }
    }

    #[test]
    fn the_input_gradient_by_strips_equals_the_dequantized_f32_gradient() {
        // out × in large enough for several strips: 2048 × 1024 = 2 Mi elements, 2 strips.
        let w = random((2048, 1024), 3);
        let g = random((7, 2048), 4);
        for dtype in FORMATS {
            let Frozen::Quantized(q) = Frozen::quantize(&w, dtype, "w").unwrap() else {
                unreachable!()
            };
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let exact = g.matmul(&dense).unwrap();
            let dx = input_grad(&q, &g).unwrap();
            assert_eq!(dx.dims2().unwrap(), (7, 1024));
            let err = rel(&dx, &exact);
            assert!(err < 1e-4, "{dtype:?}: {err}");
        }
    }

    #[test]
    fn the_gradient_through_a_quantized_layer_passes_a_finite_difference_check() {
        // L = Σ c ⊙ (x · Wᵀ) with W frozen and quantized and c fixed: dL/dx from the backward
        // against central differences of the forward. The forward rounds x to 8 bits per
        // block of 32 (step max|x|/127), which would swamp a small difference; so every block
        // of x holds a 1.0 (its max) and multiples of 1/127, and steps are multiples of 1/127:
        // the rounding is exact and the check sees the backward alone.
        let w = random((64, 256), 5);
        let Frozen::Quantized(q) = Frozen::quantize(&w, GgmlDType::Q8_0, "w").unwrap() else {
            unreachable!()
        };
        let grid = (random((2, 256), 6) * (0.8 * 127.0))
            .unwrap()
            .round()
            .unwrap();
        let x = (grid / 127.0).unwrap().to_vec2::<f32>().unwrap();
        let x: Vec<Vec<f32>> = x
            .into_iter()
            .map(|mut row| {
                row.iter_mut().step_by(32).for_each(|v| *v = 1.0);
                row
            })
            .collect();
        let x = Var::from_tensor(&Tensor::new(x, &Device::Cpu).unwrap()).unwrap();
        let c = random((2, 64), 9);
        let loss_of = |x: &Tensor| {
            let y = Frozen::quantized_matmul(&q, x).unwrap();
            (y * &c).unwrap().sum_all().unwrap()
        };
        let loss = |x: &Tensor| -> f32 { loss_of(x).to_scalar().unwrap() };
        let grads = loss_of(x.as_tensor()).backward().unwrap();
        let analytic = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let base = x.as_tensor().to_vec2::<f32>().unwrap();
        let h = 8.0f32 / 127.0;
        for &(r, c) in &[(0usize, 1usize), (0, 100), (1, 37), (1, 255)] {
            let bump = |d: f32| {
                let mut v = base.clone();
                v[r][c] += d;
                loss(&Tensor::new(v, &Device::Cpu).unwrap())
            };
            let numeric = (bump(h) - bump(-h)) / (2.0 * h);
            let a = analytic[r][c];
            assert!(
                (numeric - a).abs() <= 1e-3 * a.abs().max(1.0),
                "({r}, {c}): finite difference {numeric}, backward {a}"
            );
        }
    }

    #[test]
    fn reordering_rows_moves_whole_quantized_rows() {
        let w = random((4, 64), 7);
        let Frozen::Quantized(q) = Frozen::quantize(&w, GgmlDType::Q8_0, "w").unwrap() else {
            unreachable!()
        };
        let r = reorder_rows(&q, &[2, 0, 3, 1]).unwrap();
        let (a, b) = (
            q.dequantize(&Device::Cpu).unwrap(),
            r.dequantize(&Device::Cpu).unwrap(),
        );
        let idx = Tensor::new(&[2u32, 0, 3, 1], &Device::Cpu).unwrap();
        let expected = a.index_select(&idx, 0).unwrap();
        assert_eq!(max_abs(&(b - expected).unwrap()), 0.0);
    }

    #[test]
    fn a_width_off_the_block_names_the_tensor_and_the_fix() {
        let w = random((8, 96), 8);
        let err = Frozen::quantize(&w, GgmlDType::Q4K, "model.layers.0.mlp.up_proj.weight")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.layers.0.mlp.up_proj.weight"), "{err}");
        assert!(err.contains("--quantize q8_0"), "{err}");
    }
}
