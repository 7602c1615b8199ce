//! The fused training kernels against candle's differentiable compositions: same values, same
//! gradients (f64 to 1e-12, f32 to 1e-5), and the composed fallback other dtypes take.

use candle_core::{DType, Device, Tensor, Var, D};
use lean_grpo::model::fused;

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    // A fixed, seed-dependent spread of values in [-2, 2).
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n as u64)
        .map(|i| {
            let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D);
            ((h >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Output and the gradient of `Σ y·r` w.r.t. every input, for `f` over fresh variables.
fn value_and_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = random(y.dims(), 99, y.dtype());
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (y, g)
}

fn assert_same(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    plain: impl Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let (yf, gf) = value_and_grads(inputs, fused);
    let (yp, gp) = value_and_grads(inputs, plain);
    assert!(
        max_diff(&yf, &yp) < tol,
        "values differ: {}",
        max_diff(&yf, &yp)
    );
    for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
        let d = max_diff(a, b);
        assert!(d < tol, "gradient of input {i} differs by {d}");
        assert!(
            max_diff(a, &a.zeros_like().unwrap()) > 0.0,
            "gradient {i} is zero"
        );
    }
}

#[test]
fn rms_norm_matches_rms_norm_slow_with_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let x = random(&[3, 5, 96], 1, dtype);
        let w = random(&[96], 2, dtype);
        let wf = w.clone();
        let wp = w.clone();
        assert_same(
            &[x],
            move |t| fused::rms_norm(&t[0], &wf, 1e-6).unwrap(),
            move |t| candle_nn::ops::rms_norm_slow(&t[0], &wp, 1e-6).unwrap(),
            tol,
        );
    }
}

#[test]
fn rope_matches_rope_slow_and_per_row_positions() {
    let (b, h, t, d) = (3, 2, 5, 8);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let x = random(&[b, h, t, d], 3, dtype);
        let cos = random(&[t, d / 2], 4, dtype);
        let sin = random(&[t, d / 2], 5, dtype);
        let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos.clone(), sin.clone());
        assert_same(
            std::slice::from_ref(&x),
            move |v| fused::rope(&v[0], &c1, &s1).unwrap(),
            move |v| candle_nn::rotary_emb::rope_slow(&v[0], &c2, &s2).unwrap(),
            tol,
        );
        // A table per row: row r is rope_slow with its own table.
        let cos = random(&[b, t, d / 2], 6, dtype);
        let sin = random(&[b, t, d / 2], 7, dtype);
        let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos.clone(), sin.clone());
        assert_same(
            &[x],
            move |v| fused::rope(&v[0], &c1, &s1).unwrap(),
            move |v| {
                let rows: Vec<Tensor> = (0..b)
                    .map(|r| {
                        candle_nn::rotary_emb::rope_slow(
                            &v[0].narrow(0, r, 1).unwrap(),
                            &c2.get(r).unwrap(),
                            &s2.get(r).unwrap(),
                        )
                        .unwrap()
                    })
                    .collect();
                Tensor::cat(&rows, 0).unwrap()
            },
            tol,
        );
    }
}

#[test]
fn rope_rejects_tables_that_do_not_fit() {
    let x = random(&[2, 2, 5, 8], 1, DType::F32);
    let short = random(&[4, 4], 2, DType::F32);
    let err = fused::rope(&x, &short, &short).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
    let rows = random(&[3, 5, 4], 2, DType::F32);
    let err = fused::rope(&x, &rows, &rows).unwrap_err().to_string();
    assert!(err.contains("neither"), "{err}");
}

#[test]
fn other_dtypes_take_the_composed_ops() {
    // bf16 runs the tensor-op fallback (what a CUDA device runs); it must agree with the
    // f32 kernels to bf16 precision, per-row RoPE tables included.
    let x = random(&[2, 2, 4, 8], 8, DType::F32);
    let cos = random(&[2, 4, 4], 9, DType::F32);
    let sin = random(&[2, 4, 4], 10, DType::F32);
    let w = random(&[8], 11, DType::F32);
    let u = random(&[2, 2, 4, 8], 15, DType::F32);
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let pairs = [
        (
            fused::rope(&x, &cos, &sin).unwrap(),
            fused::rope(&bf(&x), &bf(&cos), &bf(&sin)).unwrap(),
        ),
        (
            fused::rms_norm(&x, &w, 1e-6).unwrap(),
            fused::rms_norm(&bf(&x), &bf(&w), 1e-6).unwrap(),
        ),
        (
            fused::softmax_last_dim(&x).unwrap(),
            fused::softmax_last_dim(&bf(&x)).unwrap(),
        ),
        (
            fused::swiglu(&x, &u).unwrap(),
            fused::swiglu(&bf(&x), &bf(&u)).unwrap(),
        ),
    ];
    for (i, (a, b)) in pairs.iter().enumerate() {
        assert_eq!(b.dtype(), DType::BF16);
        let d = max_diff(a, b);
        assert!(d < 0.1, "op {i}: bf16 differs from f32 by {d}");
    }
}

#[test]
fn softmax_matches_candle_softmax_with_masked_entries() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        // A causal mask's −∞ entries: zero probability and zero gradient.
        let x = random(&[2, 3, 6, 6], 12, dtype);
        let mask: Vec<f64> = (0..6)
            .flat_map(|i| (0..6).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (6, 6), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (m1, m2) = (mask.clone(), mask.clone());
        assert_same(
            &[x],
            move |v| fused::softmax_last_dim(&v[0].broadcast_add(&m1).unwrap()).unwrap(),
            move |v| candle_nn::ops::softmax(&v[0].broadcast_add(&m2).unwrap(), D::Minus1).unwrap(),
            tol,
        );
    }
}

#[test]
fn swiglu_matches_silu_times_up() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let g = random(&[4, 7, 40], 13, dtype);
        let u = random(&[4, 7, 40], 14, dtype);
        assert_same(
            &[g, u],
            |v| fused::swiglu(&v[0], &v[1]).unwrap(),
            |v| (v[0].silu().unwrap() * &v[1]).unwrap(),
            tol,
        );
    }
}
