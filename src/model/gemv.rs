//! A weight matrix times a few activation rows: the matmuls of a sampling step, on the CPU.
//!
//! A decoding step multiplies 1 to [`MAX_ROWS`] rows (the live completions) by every weight of
//! the model, so it lasts as long as reading the weights from memory. candle's CPU matmul (the
//! `gemm` crate) first packs the weight into panels, a second pass over it; on the 2-core bench
//! machine a 4864×896 f32 weight took 1.73 ms at 1 row and 2.30 ms at 8, against 0.9 ms to
//! stream it once (candle's own quantized kernels are no faster at 8 rows, and its f16 ones
//! are scalar). Here each weight row is read once, straight from its row-major storage, and
//! dotted with every activation row while it sits in registers. An f16 weight (the sampling
//! copy, see `Policy`) halves the bytes to read.

use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

/// Row counts up to this go through [`matmul_t`]; beyond it gemm's packing pays for itself.
pub const MAX_ROWS: usize = 16;

/// Most weight rows and activation rows in one block (the accumulator array's shape).
const NR: usize = 4;
const MR: usize = 8;

/// The block shape for `m` activation rows: up to 8 activation rows in one pass, so each
/// weight vector is loaded once per 8 rows (on the 544 MB LM head, 8 rows in one pass and in
/// two passes of 4 measured the same, ~62 ms, against ~35 ms for 1 row); with few rows,
/// several weight rows at once keep more reads in flight (one core reads ~8 GB/s here, two
/// ~19).
fn block_shape(m: usize) -> (usize, usize) {
    match m {
        0..=2 => (4, m.max(1)),
        3..=4 => (2, m),
        _ => (1, m.min(MR)),
    }
}

/// Weight rows per parallel task: small enough to spread a 128-row projection over the
/// threads, large enough that a task is not dominated by its scheduling.
const TASK_ROWS: usize = 16;

/// A row-major `[n, k]` weight matrix.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Weight<'_> {
    fn len(&self) -> usize {
        match self {
            Weight::F32(w) => w.len(),
            Weight::F16(w) => w.len(),
        }
    }
}

/// `W · xᵀ`, `[n, m]` row-major (row `j` holds the `m` dot products of weight row `j`), for
/// `x` `[m, k]` and `w` `[n, k]`, both row-major. f32 accumulation.
pub fn matmul_t(x: &[f32], m: usize, w: Weight, n: usize, k: usize) -> Result<Vec<f32>> {
    if x.len() != m * k || w.len() != n * k {
        bail!(
            "gemv: x has {} values for [{m}, {k}], w has {} for [{n}, {k}]",
            x.len(),
            w.len()
        );
    }
    let mut out = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let kernel = Kernel::detect();
    out.par_chunks_mut(TASK_ROWS * m)
        .enumerate()
        .for_each(|(task, out)| {
            let j0 = task * TASK_ROWS;
            let rows = out.len() / m;
            match w {
                Weight::F32(w) => kernel.rows_f32(x, m, &w[j0 * k..(j0 + rows) * k], k, out),
                Weight::F16(w) => kernel.rows_f16(x, m, &w[j0 * k..(j0 + rows) * k], k, out),
            }
        });
    Ok(out)
}

/// The instruction set the dot products run on, chosen once per call.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// Declares the function that fills `out` `[rows, m]` for the weight rows `w` (`[rows, k]`),
/// block by block of [`block_shape`]. (Splitting `k` into L1-sized slices, so the activation
/// rows stay cached, was tried and ran slower: the weight stream stops being sequential.)
macro_rules! rows_fn {
    ($name:ident, $elem:ty, $avx:ident, $portable:ident) => {
        fn $name(self, x: &[f32], m: usize, w: &[$elem], k: usize, out: &mut [f32]) {
            let rows = w.len() / k;
            debug_assert_eq!(out.len(), rows * m);
            let (block_nr, block_mr) = block_shape(m);
            let mut j = 0;
            while j < rows {
                let nr = (rows - j).min(block_nr);
                let mut r = 0;
                while r < m {
                    let mr = (m - r).min(block_mr);
                    let xs = &x[r * k..(r + mr) * k];
                    let ws = &w[j * k..(j + nr) * k];
                    let mut acc = [[0f32; MR]; NR];
                    match self {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `detect` chose Avx2 only when the CPU has AVX2, FMA and
                        // F16C; `xs` and `ws` hold `mr` and `nr` rows of `k` values.
                        Kernel::Avx2 => unsafe { avx2::$avx(xs, mr, ws, nr, k, &mut acc) },
                        Kernel::Portable => portable::$portable(xs, mr, ws, nr, k, &mut acc),
                    }
                    for (jj, acc) in acc.iter().enumerate().take(nr) {
                        out[(j + jj) * m + r..(j + jj) * m + r + mr].copy_from_slice(&acc[..mr]);
                    }
                    r += mr;
                }
                j += nr;
            }
        }
    };
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    rows_fn!(rows_f32, f32, block_f32, block);
    rows_fn!(rows_f16, f16, block_f16, block);
}

/// Any CPU: plain loops (the compiler vectorises what it can).
mod portable {
    use super::{MR, NR};

    /// `acc[j][r] = w[j] · x[r]` for `nr` weight rows and `mr` activation rows of `k` values.
    pub fn block<E: Copy + Into<f32>>(
        x: &[f32],
        mr: usize,
        w: &[E],
        nr: usize,
        k: usize,
        acc: &mut [[f32; MR]; NR],
    ) {
        for j in 0..nr {
            let wr = &w[j * k..(j + 1) * k];
            for r in 0..mr {
                let xr = &x[r * k..(r + 1) * k];
                acc[j][r] = wr.iter().zip(xr).map(|(&a, &b)| a.into() * b).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One block with compile-time sizes, so the accumulators live in registers.
    macro_rules! block_fixed {
        ($name:ident, $elem:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const J: usize, const R: usize>(
                x: &[f32],
                w: &[$elem],
                k: usize,
                acc: &mut [[f32; MR]; NR],
            ) {
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let mut v = [[_mm256_setzero_ps(); R]; J];
                let mut c = 0;
                while c + 8 <= k {
                    let mut wv = [_mm256_setzero_ps(); J];
                    for (j, wv) in wv.iter_mut().enumerate() {
                        *wv = $load(wp.add(j * k + c));
                    }
                    for r in 0..R {
                        let xv = _mm256_loadu_ps(xp.add(r * k + c));
                        for j in 0..J {
                            v[j][r] = _mm256_fmadd_ps(wv[j], xv, v[j][r]);
                        }
                    }
                    c += 8;
                }
                for j in 0..J {
                    for r in 0..R {
                        let mut s = hsum(v[j][r]);
                        for cc in c..k {
                            s += f32::from(w[j * k + cc]) * x[r * k + cc];
                        }
                        acc[j][r] = s;
                    }
                }
            }
        };
    }

    block_fixed!(fixed_f32, f32, load_f32);
    block_fixed!(fixed_f16, f16, load_f16);

    macro_rules! block_dispatch {
        ($name:ident, $elem:ty, $fixed:ident) => {
            /// # Safety
            /// The CPU must have AVX2, FMA and F16C; `x` holds `mr` rows and `w` `nr` rows of
            /// `k` values, `(nr, mr)` one of [`super::block_shape`]'s shapes.
            pub unsafe fn $name(
                x: &[f32],
                mr: usize,
                w: &[$elem],
                nr: usize,
                k: usize,
                acc: &mut [[f32; MR]; NR],
            ) {
                assert!(x.len() >= mr * k && w.len() >= nr * k);
                match (nr, mr) {
                    (4, 2) => $fixed::<4, 2>(x, w, k, acc),
                    (4, 1) => $fixed::<4, 1>(x, w, k, acc),
                    (3, 2) => $fixed::<3, 2>(x, w, k, acc),
                    (3, 1) => $fixed::<3, 1>(x, w, k, acc),
                    (2, 4) => $fixed::<2, 4>(x, w, k, acc),
                    (2, 3) => $fixed::<2, 3>(x, w, k, acc),
                    (2, 2) => $fixed::<2, 2>(x, w, k, acc),
                    (2, 1) => $fixed::<2, 1>(x, w, k, acc),
                    (1, 8) => $fixed::<1, 8>(x, w, k, acc),
                    (1, 7) => $fixed::<1, 7>(x, w, k, acc),
                    (1, 6) => $fixed::<1, 6>(x, w, k, acc),
                    (1, 5) => $fixed::<1, 5>(x, w, k, acc),
                    (1, 4) => $fixed::<1, 4>(x, w, k, acc),
                    (1, 3) => $fixed::<1, 3>(x, w, k, acc),
                    (1, 2) => $fixed::<1, 2>(x, w, k, acc),
                    (1, 1) => $fixed::<1, 1>(x, w, k, acc),
                    _ => unreachable!("block shape {nr}x{mr} is not one of block_shape's"),
                }
            }
        };
    }

    block_dispatch!(block_f32, f32, fixed_f32);
    block_dispatch!(block_f16, f16, fixed_f16);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * m];
        for j in 0..n {
            for r in 0..m {
                let s: f64 = (0..k)
                    .map(|c| w[j * k + c] as f64 * x[r * k + c] as f64)
                    .sum();
                out[j * m + r] = s as f32;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_plain_dot_product_for_every_block_shape() {
        // k not a multiple of 8 exercises the tail; n and m not multiples of the block sizes
        // exercise every (nr, mr) pair; n above TASK_ROWS spreads over several tasks.
        for (n, k) in [(1, 1), (37, 19), (5, 8), (34, 64), (33, 45)] {
            for m in 1..=MAX_ROWS {
                let x = values(m * k, 1);
                let w = values(n * k, 2);
                let want = reference(&x, m, &w, n, k);
                let got = matmul_t(&x, m, Weight::F32(&w), n, k).unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-4, "m={m} n={n} k={k}: {g} vs {e}");
                }
                let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let w16_f32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
                let want = reference(&x, m, &w16_f32, n, k);
                let got = matmul_t(&x, m, Weight::F16(&w16), n, k).unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-4, "f16 m={m} n={n} k={k}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn portable_and_vector_kernels_agree() {
        let (m, n, k) = (5, 6, 100);
        let x = values(m * k, 3);
        let w = values(n * k, 4);
        let mut a = vec![0f32; n * m];
        let mut b = vec![0f32; n * m];
        Kernel::Portable.rows_f32(&x, m, &w, k, &mut a);
        Kernel::detect().rows_f32(&x, m, &w, k, &mut b);
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        let err = matmul_t(&[0.0; 5], 2, Weight::F32(&[0.0; 6]), 2, 3).unwrap_err();
        assert!(err.to_string().contains("[2, 3]"), "{err}");
    }
}
