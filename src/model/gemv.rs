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
//!
//! Each thread walks its weight rows one after the other, so it reads one sequential stream,
//! and asks for the bytes `PREFETCH_BYTES` ahead before it needs them. Reading 2-4 rows
//! side by side (short interleaved streams) instead left an f16 Qwen2.5-0.5B-shaped step at
//! ~100 ms of matmuls at 1 row (~12 GB/s); one stream with prefetch takes ~68 ms (~18.5 GB/s,
//! what this machine's two cores can read), and at 8 rows 123 ms became 110.

use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

/// Row counts up to this go through [`matmul_t`]; beyond it gemm's packing pays for itself.
pub const MAX_ROWS: usize = 16;

/// Most activation rows in one pass over a weight row (the accumulator array's length): each
/// weight vector, once loaded, is used for up to 8 rows.
const MR: usize = 8;

/// How far ahead of the dot product the weight stream is prefetched, in bytes (for f16, 512
/// and 2048 measured slower than 1024).
const PREFETCH_BYTES: usize = 1024;

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

/// `x · wᵀ`, `[m, n]` row-major, for `x` `[m, k]` (at most [`MAX_ROWS`] rows) and `w`
/// `[n, k]`, both row-major. f32 accumulation.
///
/// The result is written in the caller's layout: producing `[n, m]` (what the kernel computes
/// weight row by weight row) and transposing it afterwards was a single-threaded strided copy
/// of ~12 ms per batch-8 step of a Qwen2.5-0.5B-shaped model.
pub fn matmul_t(x: &[f32], m: usize, w: Weight, n: usize, k: usize) -> Result<Vec<f32>> {
    if x.len() != m * k || w.len() != n * k {
        bail!(
            "gemv: x has {} values for [{m}, {k}], w has {} for [{n}, {k}]",
            x.len(),
            w.len()
        );
    }
    if m > MAX_ROWS {
        bail!("gemv: {m} rows, at most {MAX_ROWS}");
    }
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let kernel = Kernel::detect();
    let dst = Columns(out.as_mut_ptr());
    (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|task| {
        let j0 = task * TASK_ROWS;
        let rows = TASK_ROWS.min(n - j0);
        // `[rows, m]`: the m dot products of each weight row of the task.
        let mut block = [0f32; TASK_ROWS * MAX_ROWS];
        let block = &mut block[..rows * m];
        match w {
            Weight::F32(w) => kernel.rows_f32(x, m, &w[j0 * k..(j0 + rows) * k], k, block),
            Weight::F16(w) => kernel.rows_f16(x, m, &w[j0 * k..(j0 + rows) * k], k, block),
        }
        for r in 0..m {
            for (jj, values) in block.chunks_exact(m).enumerate() {
                // SAFETY: `r < m` and `j0 + jj < n`, so the index is inside `out` (`m · n`
                // values); columns `j0 .. j0 + rows` belong to this task alone, so no two
                // tasks write the same value, and `out` is not read until they all finish.
                unsafe { dst.write(r * n + j0 + jj, values[r]) };
            }
        }
    });
    Ok(out)
}

/// The result buffer of [`matmul_t`], shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Columns(*mut f32);

// SAFETY: tasks write disjoint elements (see `matmul_t`); the pointer outlives them.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// # Safety
    /// `i` is inside the buffer and no other thread accesses element `i` meanwhile.
    unsafe fn write(self, i: usize, value: f32) {
        *self.0.add(i) = value;
    }
}

/// The instruction set the dot products run on, chosen once per call.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// Declares the function that fills `out` `[rows, m]` for the weight rows `w` (`[rows, k]`).
///
/// One weight row at a time against [`MR`] activation rows per pass: 1 weight load and 8
/// activation loads per 8 FMAs, fine while those rows sit in L1. When they do not (the MLP's
/// down projection, k = 4864: 8 rows are 152 KB) the activation loads come from L2 at about one
/// vector per cycle and the FMA units wait on them; there the weight rows go in pairs against
/// groups of up to [`PR`] activation rows, so each activation vector feeds two weight rows
/// (measured on the bench machine at 8 rows: 67-83 -> 85-96 GFLOP/s for that projection; the
/// same pairs at k = 896 ran slower than one row, 85 -> 57-68). (Splitting `k` into L1-sized
/// slices, so the activation rows stay cached, was tried and ran slower: the weight stream
/// stops being sequential.)
macro_rules! rows_fn {
    ($name:ident, $elem:ty, $avx:ident, $pair:ident, $portable:ident) => {
        fn $name(self, x: &[f32], m: usize, w: &[$elem], k: usize, out: &mut [f32]) {
            debug_assert_eq!(out.len(), w.len() / k * m);
            let mut paired = 0;
            #[cfg(target_arch = "x86_64")]
            if matches!(self, Kernel::Avx2) && m >= 2 && m.min(MR) * k * 4 > L1_BYTES {
                for (pair, out) in w.chunks_exact(2 * k).zip(out.chunks_exact_mut(2 * m)) {
                    let (out0, out1) = out.split_at_mut(m);
                    for (r, g) in row_groups(m) {
                        let mut acc = [[0f32; PR]; 2];
                        // SAFETY: `detect` chose Avx2 only when the CPU has AVX2, FMA and
                        // F16C; `x` rows `r .. r + g` hold `g` (1..=PR) rows of `k` values and
                        // `pair` two.
                        unsafe { avx2::$pair(&x[r * k..(r + g) * k], g, pair, &mut acc) };
                        out0[r..r + g].copy_from_slice(&acc[0][..g]);
                        out1[r..r + g].copy_from_slice(&acc[1][..g]);
                    }
                    paired += 2;
                }
            }
            let rest = w[paired * k..].chunks_exact(k);
            for (wr, out) in rest.zip(out[paired * m..].chunks_exact_mut(m)) {
                let mut r = 0;
                while r < m {
                    let mr = (m - r).min(MR);
                    let xs = &x[r * k..(r + mr) * k];
                    let mut acc = [0f32; MR];
                    match self {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above; `xs` holds `mr` rows of `k` values and `wr` one.
                        Kernel::Avx2 => unsafe { avx2::$avx(xs, mr, wr, &mut acc) },
                        Kernel::Portable => portable::$portable(xs, mr, wr, &mut acc),
                    }
                    out[r..r + mr].copy_from_slice(&acc[..mr]);
                    r += mr;
                }
            }
        }
    };
}

/// Most activation rows against one pair of weight rows (2 × 4 accumulators).
const PR: usize = 4;

/// L1 data cache per core on the machines we measured (Zen 3, most x86 cores): activation
/// rows beyond it are read from L2 by each pass.
const L1_BYTES: usize = 32 << 10;

/// `m` activation rows cut into `(start, len)` groups of at most [`PR`] rows, as even as
/// possible (5 rows: 3 + 2, not 4 + 1: a group of one leaves the FMA units waiting on two
/// dependency chains).
fn row_groups(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let groups = m.div_ceil(PR).max(1);
    (0..groups).map(move |i| {
        let start = i * m / groups;
        (start, (i + 1) * m / groups - start)
    })
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

    rows_fn!(rows_f32, f32, block_f32, pair_f32, block);
    rows_fn!(rows_f16, f16, block_f16, pair_f16, block);
}

/// Any CPU: plain loops (the compiler vectorises what it can).
mod portable {
    use super::MR;

    /// `acc[r] = w · x[r]` for one weight row `w` and `mr` activation rows of `w.len()` values.
    pub fn block<E: Copy + Into<f32>>(x: &[f32], mr: usize, w: &[E], acc: &mut [f32; MR]) {
        for (r, xr) in x.chunks_exact(w.len()).take(mr).enumerate() {
            acc[r] = w.iter().zip(xr).map(|(&a, &b)| a.into() * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, PR, PREFETCH_BYTES};
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

    /// One weight row against `R` activation rows, with `U` independent accumulators per
    /// row along `k` (one or two rows alone would otherwise wait on a single chain of FMAs).
    /// Compile-time sizes keep the accumulators in registers.
    macro_rules! block_fixed {
        ($name:ident, $elem:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const R: usize, const U: usize>(
                x: &[f32],
                w: &[$elem],
                acc: &mut [f32; MR],
            ) {
                let k = w.len();
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let size = std::mem::size_of::<$elem>();
                let ahead = PREFETCH_BYTES / size;
                // f32 at one row streams as fast without hints (measured: ~10% faster).
                let prefetch = size < 4 || R > 1;
                let mut v = [[_mm256_setzero_ps(); U]; R];
                let mut c = 0;
                while c + 8 * U <= k {
                    for u in 0..U {
                        // One hint per 64-byte line (8 f32 are half a line, 8 f16 a quarter);
                        // a hint never faults, even past the end of the weights.
                        if prefetch && (u == 0 || (8 * u * size) % 64 == 0) {
                            let ahead = wp.wrapping_add(c + 8 * u + ahead);
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        }
                        let wv = $load(wp.add(c + 8 * u));
                        for r in 0..R {
                            let xv = _mm256_loadu_ps(xp.add(r * k + c + 8 * u));
                            v[r][u] = _mm256_fmadd_ps(wv, xv, v[r][u]);
                        }
                    }
                    c += 8 * U;
                }
                while c + 8 <= k {
                    let wv = $load(wp.add(c));
                    for r in 0..R {
                        let xv = _mm256_loadu_ps(xp.add(r * k + c));
                        v[r][0] = _mm256_fmadd_ps(wv, xv, v[r][0]);
                    }
                    c += 8;
                }
                for r in 0..R {
                    let mut t = v[r][0];
                    for u in 1..U {
                        t = _mm256_add_ps(t, v[r][u]);
                    }
                    let mut s = hsum(t);
                    for cc in c..k {
                        s += f32::from(w[cc]) * x[r * k + cc];
                    }
                    acc[r] = s;
                }
            }
        };
    }

    block_fixed!(fixed_f32, f32, load_f32);
    block_fixed!(fixed_f16, f16, load_f16);

    macro_rules! block_dispatch {
        ($name:ident, $elem:ty, $fixed:ident) => {
            /// # Safety
            /// The CPU must have AVX2, FMA and F16C; `x` holds `mr` (1..=8) rows of `w.len()`
            /// values.
            pub unsafe fn $name(x: &[f32], mr: usize, w: &[$elem], acc: &mut [f32; MR]) {
                assert!(x.len() >= mr * w.len());
                match mr {
                    1 => $fixed::<1, 4>(x, w, acc),
                    2 => $fixed::<2, 2>(x, w, acc),
                    3 => $fixed::<3, 1>(x, w, acc),
                    4 => $fixed::<4, 1>(x, w, acc),
                    5 => $fixed::<5, 1>(x, w, acc),
                    6 => $fixed::<6, 1>(x, w, acc),
                    7 => $fixed::<7, 1>(x, w, acc),
                    8 => $fixed::<8, 1>(x, w, acc),
                    _ => unreachable!("{mr} activation rows in one pass; at most {MR}"),
                }
            }
        };
    }

    block_dispatch!(block_f32, f32, fixed_f32);
    block_dispatch!(block_f16, f16, fixed_f16);

    /// Two adjacent weight rows (`w`, `[2, k]`) against `R` (1..=[`PR`]) activation rows,
    /// `U` accumulators per product along `k` (so that even 2 × 1 products keep 4 FMA chains
    /// going). The two rows are read side by side, each prefetched once per 64-byte line.
    macro_rules! pair_fixed {
        ($name:ident, $elem:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const R: usize, const U: usize>(
                x: &[f32],
                w: &[$elem],
                acc: &mut [[f32; PR]; 2],
            ) {
                let k = w.len() / 2;
                let xp = x.as_ptr();
                let rows = [w.as_ptr(), w.as_ptr().add(k)];
                let size = std::mem::size_of::<$elem>();
                let ahead = PREFETCH_BYTES / size;
                let line = 64 / size;
                let mut v = [[[_mm256_setzero_ps(); U]; R]; 2];
                let mut c = 0;
                while c + 8 * U <= k {
                    if c % line < 8 * U {
                        for wp in rows {
                            let ahead = wp.wrapping_add(c + ahead);
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        }
                    }
                    for u in 0..U {
                        let a = $load(rows[0].add(c + 8 * u));
                        let b = $load(rows[1].add(c + 8 * u));
                        for r in 0..R {
                            let xv = _mm256_loadu_ps(xp.add(r * k + c + 8 * u));
                            v[0][r][u] = _mm256_fmadd_ps(a, xv, v[0][r][u]);
                            v[1][r][u] = _mm256_fmadd_ps(b, xv, v[1][r][u]);
                        }
                    }
                    c += 8 * U;
                }
                let body = c;
                for (i, wp) in rows.into_iter().enumerate() {
                    for r in 0..R {
                        let mut t = v[i][r][0];
                        for u in 1..U {
                            t = _mm256_add_ps(t, v[i][r][u]);
                        }
                        let mut s = hsum(t);
                        for cc in body..k {
                            s += f32::from(*wp.add(cc)) * x[r * k + cc];
                        }
                        acc[i][r] = s;
                    }
                }
            }
        };
    }

    pair_fixed!(pair_fixed_f32, f32, load_f32);
    pair_fixed!(pair_fixed_f16, f16, load_f16);

    macro_rules! pair_dispatch {
        ($name:ident, $elem:ty, $fixed:ident) => {
            /// # Safety
            /// The CPU must have AVX2, FMA and F16C; `w` holds two rows of `k` values and `x`
            /// `mr` (1..=[`PR`]) rows of `k`.
            pub unsafe fn $name(x: &[f32], mr: usize, w: &[$elem], acc: &mut [[f32; PR]; 2]) {
                assert!(w.len() % 2 == 0 && x.len() >= mr * (w.len() / 2));
                match mr {
                    1 => $fixed::<1, 2>(x, w, acc),
                    2 => $fixed::<2, 2>(x, w, acc),
                    3 => $fixed::<3, 1>(x, w, acc),
                    4 => $fixed::<4, 1>(x, w, acc),
                    _ => unreachable!("{mr} activation rows against a pair; at most {PR}"),
                }
            }
        };
    }

    pair_dispatch!(pair_f32, f32, pair_fixed_f32);
    pair_dispatch!(pair_f16, f16, pair_fixed_f16);
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
                out[r * n + j] = s as f32;
            }
        }
        out
    }

    /// f32 sums of thousands of terms are ~1e-4 off at values ~1e3; a dropped or misplaced
    /// term moves them by ~0.1.
    fn close(got: f32, want: f32) -> bool {
        (got - want).abs() <= 1e-4 * (1.0 + want.abs() / 100.0)
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
        // exercise every pass length; n above TASK_ROWS spreads over several tasks. k = 4100
        // puts two or more activation rows beyond L1: weight rows in pairs (an odd n leaves
        // one alone), every group split of m.
        for (n, k) in [
            (1, 1),
            (37, 19),
            (5, 8),
            (34, 64),
            (33, 45),
            (5, 4100),
            (18, 4096),
        ] {
            for m in 1..=MAX_ROWS {
                let x = values(m * k, 1);
                let w = values(n * k, 2);
                let want = reference(&x, m, &w, n, k);
                let got = matmul_t(&x, m, Weight::F32(&w), n, k).unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!(close(*g, *e), "m={m} n={n} k={k}: {g} vs {e}");
                }
                let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let w16_f32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
                let want = reference(&x, m, &w16_f32, n, k);
                let got = matmul_t(&x, m, Weight::F16(&w16), n, k).unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!(close(*g, *e), "f16 m={m} n={n} k={k}: {g} vs {e}");
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
    fn mismatched_lengths_and_too_many_rows_are_errors() {
        let err = matmul_t(&[0.0; 5], 2, Weight::F32(&[0.0; 6]), 2, 3).unwrap_err();
        assert!(err.to_string().contains("[2, 3]"), "{err}");
        let rows = MAX_ROWS + 1;
        let err = matmul_t(&vec![0.0; rows], rows, Weight::F32(&[0.0; 2]), 2, 1).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}
