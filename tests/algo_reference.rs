//! The candle loss against a plain f64 transcription of docs/algorithms.md §3.4–§3.8 and §4.5
//! (value and gradient written out by hand), on random batches and random configurations:
//! covers the options the public vectors do not (abs/mse KL, δ, a binding log-ratio clamp, rank
//! advantages, masked truncation, DPO margins and top-K), for every preset.

mod algo_support;

use algo_support::{run, synthetic_logps};
use lean_grpo::algo::{
    prepare, presets::PRESETS, AlgoConfig, BatchShape, ImportanceLevel, KlEstimator, LossAgg,
    Prepared,
};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// The formulas of docs/algorithms.md in f64. Returns (loss, gradient w.r.t. ℓ).
fn reference_loss(
    cfg: &AlgoConfig,
    p: &Prepared,
    new: &[Vec<f64>],
    old: &[Vec<f64>],
    refp: &[Vec<f64>],
) -> (f64, Vec<Vec<f64>>) {
    let b_rows = new.len();
    let t = new[0].len();
    let m: Vec<usize> = (0..b_rows)
        .map(|i| {
            if !p.kept[i] || (p.truncated[i] && cfg.mask_truncated_completions) {
                0
            } else {
                p.lengths[i]
            }
        })
        .collect();
    let b = p.kept.iter().filter(|k| **k).count() as f64;
    let n_tok: usize = m.iter().sum();
    if b == 0.0 || n_tok == 0 {
        return (0.0, vec![vec![0.0; t]; b_rows]);
    }
    let w = |i: usize| match cfg.loss_agg {
        LossAgg::SeqMeanTokenMean => 1.0 / (b * m[i].max(1) as f64),
        LossAgg::TokenMean => 1.0 / n_tok as f64,
        LossAgg::SeqMeanTokenSumNorm => 1.0 / (b * cfg.max_completion_length as f64),
    };
    let c = cfg.log_ratio_clamp;
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high());
    // Value and d/dρ of the surrogate f(ρ) = −min(min(ρ, δ)·A, clip(ρ)·A).
    let surrogate = |rho: f64, a: f64| -> (f64, f64) {
        let (unc, d_unc) = match cfg.delta {
            Some(d) if rho > d => (d, 0.0),
            _ => (rho, 1.0),
        };
        let (clp, d_clp) = if rho < lo {
            (lo, 0.0)
        } else if rho > hi {
            (hi, 0.0)
        } else {
            (rho, 1.0)
        };
        let (x, y) = (unc * a, clp * a);
        let d = if x < y {
            d_unc * a
        } else if y < x {
            d_clp * a
        } else {
            (d_unc + d_clp) * a / 2.0
        };
        (-x.min(y), -d)
    };
    let clamp = |x: f64| (x.clamp(-c, c), if x.abs() <= c { 1.0 } else { 0.0 });
    let mut grad = vec![vec![0.0; t]; b_rows];
    let (mut pg, mut kl) = (0.0, 0.0);
    for i in 0..b_rows {
        let a = p.advantages[i] as f64;
        match cfg.importance_sampling_level {
            ImportanceLevel::Token => {
                for j in 0..m[i] {
                    let (lw, dl) = clamp(new[i][j] - old[i][j]);
                    let rho = lw.exp();
                    let (f, df) = surrogate(rho, a);
                    pg += w(i) * f;
                    grad[i][j] += w(i) * df * rho * dl;
                }
            }
            ImportanceLevel::Sequence => {
                let inv = 1.0 / m[i].max(1) as f64;
                let sum: f64 = (0..m[i]).map(|j| new[i][j] - old[i][j]).sum();
                let (lw, dl) = clamp(sum * inv);
                let rho = lw.exp();
                let (f, df) = surrogate(rho, a);
                let row_w = w(i) * m[i] as f64;
                pg += row_w * f;
                for g in grad[i].iter_mut().take(m[i]) {
                    *g += row_w * df * rho * dl * inv;
                }
            }
        }
        for j in 0..m[i] {
            let (d, dd) = clamp(refp[i][j] - new[i][j]);
            let (k, dk) = match cfg.kl_estimator {
                KlEstimator::K3 => (d.exp_m1() - d, d.exp_m1()),
                KlEstimator::Abs => (d.abs(), if d == 0.0 { 0.0 } else { d.signum() }),
                KlEstimator::Mse => (d * d, 2.0 * d),
            };
            kl += w(i) * k;
            grad[i][j] -= cfg.beta * w(i) * dk * dd;
        }
    }
    let rl = pg + cfg.beta * kl;
    if !(cfg.use_dpo_loss && cfg.dpo_coef > 0.0) {
        return (rl, grad);
    }
    let coef = cfg.dpo_coef;
    for row in grad.iter_mut() {
        for g in row.iter_mut() {
            *g *= 1.0 - coef;
        }
    }
    let s = |x: &[Vec<f64>], i: usize| x[i][..m[i]].iter().sum::<f64>();
    let g = cfg.group_size;
    let mut pairs = Vec::new();
    for start in (0..b_rows).step_by(g) {
        let rs = &p.shaped_rewards[start..start + g];
        let span = rs.iter().cloned().fold(f64::MIN, f64::max)
            - rs.iter().cloned().fold(f64::MAX, f64::min);
        if span <= 1e-9 {
            continue;
        }
        let mut group = Vec::new();
        for wi in start..start + g {
            for li in start..start + g {
                let gap = p.shaped_rewards[wi] - p.shaped_rewards[li];
                if m[wi] > 0 && m[li] > 0 && gap > cfg.pairwise_margin {
                    group.push((gap, wi, li));
                }
            }
        }
        if cfg.dpo_max_pairs_per_group > 0 {
            group.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap());
            group.truncate(cfg.dpo_max_pairs_per_group);
        }
        pairs.extend(group);
    }
    let mut dpo = 0.0;
    let np = pairs.len() as f64;
    for (_, wi, li) in pairs {
        let mut z = s(new, wi) - s(new, li);
        if !cfg.dpo_reference_free {
            z -= s(refp, wi) - s(refp, li);
        }
        z *= cfg.dpo_beta;
        dpo += (-z).exp().ln_1p() / np; // softplus(−z), fine in f64 for |z| ≪ 700
        let dz = -1.0 / (1.0 + z.exp()) / np; // d softplus(−z)/dz = −σ(−z)
        for (row, sign) in [(wi, 1.0), (li, -1.0)] {
            for g in grad[row].iter_mut().take(m[row]) {
                *g += sign * coef * dz * cfg.dpo_beta;
            }
        }
    }
    ((1.0 - coef) * rl + coef * dpo, grad)
}

fn to_f64(x: &candle_core::Tensor) -> Vec<Vec<f64>> {
    let v: Vec<Vec<f32>> = x.to_vec2().unwrap();
    v.into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect()
}

fn options() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::sample::select(vec![
            "seq_mean_token_mean",
            "token_mean",
            "seq_mean_token_sum_norm",
        ]),
        prop::sample::select(vec!["k3", "abs", "mse"]),
        prop::sample::select(vec![0.0, 0.05]),
        prop::option::of(prop::sample::select(vec![1.3, 2.0])),
        prop::sample::select(vec![0.15, 20.0]),
        (
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec!["zscore", "rank"]),
        ),
        (
            prop::sample::select(vec![0usize, 1, 2]),
            prop::sample::select(vec![0.0, 0.3]),
        ),
    )
        .prop_map(
            |(agg, kl, beta, delta, clamp, (mask, ds, norm), (k, margin))| {
                let v = json!({
                    "loss_agg": agg, "kl_estimator": kl, "beta": beta, "delta": delta,
                    "log_ratio_clamp": clamp, "mask_truncated_completions": mask,
                    "dynamic_sampling": ds, "advantage_norm": norm,
                    "dpo_max_pairs_per_group": k, "pairwise_margin": margin,
                });
                serde_json::from_value(v).unwrap()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn candle_loss_matches_the_spec_formulas(
        g in 2usize..=4,
        groups in 1usize..=3,
        t in 1usize..=6,
        seed in any::<u64>(),
        opts in options(),
        rewards_seed in prop::collection::vec(prop::sample::select(vec![0.0, 0.5, 1.0]), 12),
        lengths_seed in prop::collection::vec(0usize..=6, 12),
        truncated_seed in prop::collection::vec(prop::bool::weighted(0.25), 12),
    ) {
        let bsz = g * groups;
        let rewards = &rewards_seed[..bsz];
        let lengths: Vec<usize> = lengths_seed[..bsz].iter().map(|&l| l.min(t)).collect();
        let truncated = &truncated_seed[..bsz];
        let (new, old, refp) = synthetic_logps(&lengths, t, 0.35, seed);
        for preset in PRESETS {
            let mut opts = opts.clone();
            if preset.name == "dgpo" && seed % 2 == 0 {
                opts.insert("dpo_reference_free".into(), json!(true));
                opts.insert("beta".into(), json!(0.0));
            }
            let cfg = AlgoConfig::resolve(preset.name, &opts, BatchShape { group_size: g, max_completion_length: 8 }).unwrap();
            let p = prepare(&cfg, rewards, &lengths, truncated).unwrap();
            let (want, want_grad) =
                reference_loss(&cfg, &p, &to_f64(&new), &to_f64(&old), &to_f64(&refp));
            let got = run(&cfg, &p.all_rows(), &new, &old, Some(&refp), 1);
            let ok = |a: f64, b: f64| (a - b).abs() <= 2e-6 + 1e-4 * b.abs();
            prop_assert!(ok(got.loss, want), "{} {:?}: loss {} vs {want}", preset.name, opts, got.loss);
            for (i, (gr, wr)) in got.grad.iter().zip(&want_grad).enumerate() {
                for (j, (&a, &b)) in gr.iter().zip(wr).enumerate() {
                    prop_assert!(ok(a as f64, b), "{} {:?}: grad[{i}][{j}] {a} vs {b}", preset.name, opts);
                }
            }
        }
    }
}
