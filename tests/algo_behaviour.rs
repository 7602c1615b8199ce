//! Behaviour of `prepare` and `loss` beyond the vectors: the worked examples of
//! docs/algorithms.md, edge cases of its §8 and the properties it states in prose.

mod algo_support;

use algo_support::{run, synthetic_logps, tensor2};
use candle_core::{Device, Tensor, Var};
use lean_grpo::algo::{
    loss, loss_rows, prepare, AlgoConfig, BatchShape, Denominators, LogProbs, Prepared, StepBatch,
};
use serde_json::{json, Map, Value};

fn config(algorithm: &str, overrides: Value, g: usize, l: usize) -> AlgoConfig {
    let map: Map<String, Value> = serde_json::from_value(overrides).unwrap();
    AlgoConfig::resolve(
        algorithm,
        &map,
        BatchShape {
            group_size: g,
            max_completion_length: l,
        },
    )
    .unwrap()
}

fn prep(cfg: &AlgoConfig, rewards: &[f64], lengths: &[usize]) -> Prepared {
    prepare(cfg, rewards, lengths, &vec![false; rewards.len()]).unwrap()
}

fn assert_close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
}

#[test]
fn soft_overlong_punishment_makes_a_failed_group_non_constant() {
    // docs/algorithms.md §3.1: four failed proofs of lengths 9, 10, 5, 4 with L = 10, C = 2.
    let cfg = config("dapo", json!({}), 4, 10);
    assert_eq!(cfg.overlong_cache, 2);
    let p = prep(&cfg, &[0.0; 4], &[9, 10, 5, 4]);
    assert_eq!(p.shaped_rewards, [-0.5, -1.0, 0.0, 0.0]);
    assert_eq!(p.zero_variance_groups, 0);
    // ... and yet dynamic sampling drops it, since it filters on the task reward (§3.2).
    assert_eq!(p.kept, [false; 4]);
    // Longer than L_max gets the full penalty, scaled by the factor.
    let cfg = config("dapo", json!({"overlong_penalty_factor": 0.5}), 4, 10);
    assert_eq!(lean_grpo::algo::overlong_penalty(&cfg, 11), -0.5);
    assert_eq!(lean_grpo::algo::overlong_penalty(&cfg, 8), 0.0);
}

#[test]
fn dynamic_sampling_drops_zero_variance_groups_and_reports_the_fraction() {
    let cfg = config("dapo", json!({"overlong_cache": 0}), 2, 16);
    let p = prep(&cfg, &[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], &[3; 6]);
    assert_eq!(p.kept, [false, false, true, true, false, false]);
    assert_eq!(p.kept_groups(), [1]);
    assert!((p.zero_variance_fraction() - 2.0 / 3.0).abs() < 1e-12);
    assert_close(&p.advantages, &[0.0, 0.0, -0.7070068, 0.7070068, 0.0, 0.0]);
    let kept = p.kept_rows();
    assert_eq!(
        kept.rows.iter().map(|r| r.index).collect::<Vec<_>>(),
        [2, 3]
    );
    // Without dynamic sampling the group stays with advantages exactly 0.
    let cfg = config("grpo", json!({}), 2, 16);
    let p = prep(&cfg, &[0.3, 0.3, 0.0, 1.0], &[3; 4]);
    assert_eq!(p.kept, [true; 4]);
    assert_eq!(&p.advantages[..2], [0.0, 0.0]);
}

/// docs/algorithms.md §3.1–§3.2: four failed proofs of lengths 9, 10, 5, 4 with L = 10, C = 2
/// have shaped rewards −0.5, −1, 0, 0. Filtering on the task reward drops the group (nothing
/// was accepted, so only length would be learned); filtering on the shaped reward keeps it.
#[test]
fn failed_proofs_of_different_lengths_are_dropped_on_task_reward_kept_on_shaped() {
    let failed = [0.0; 4];
    let lengths = [9, 10, 5, 4];
    let on_reward = config("dapo", json!({"overlong_cache": 2}), 4, 10);
    assert_eq!(
        on_reward.dynamic_sampling_metric,
        lean_grpo::algo::DynamicSamplingMetric::Reward,
        "the dapo preset filters like the paper"
    );
    let p = prep(&on_reward, &failed, &lengths);
    assert_close(
        &p.shaped_rewards
            .iter()
            .map(|&r| r as f32)
            .collect::<Vec<_>>(),
        &[-0.5, -1.0, 0.0, 0.0],
    );
    assert_eq!(p.kept, [false; 4]);
    assert!(p.kept_rows().is_empty());
    assert_eq!(p.dropped_flat_task_reward(), 1);
    assert_eq!(p.zero_variance_groups, 0, "the shaped rewards do differ");

    let on_shaped = config(
        "dapo",
        json!({"overlong_cache": 2, "dynamic_sampling_metric": "shaped_reward"}),
        4,
        10,
    );
    let p = prep(&on_shaped, &failed, &lengths);
    assert_eq!(p.kept, [true; 4]);
    assert_eq!(p.dropped_flat_task_reward(), 0);
    // The kept group learns length alone: the shortest replies get the positive advantages.
    assert!(p.advantages[2] > 0.0 && p.advantages[3] > 0.0 && p.advantages[1] < 0.0);

    // A group with a spread in task reward is kept under both, and its advantages use the shaped
    // rewards (§3.3): the long accepted proof gains less than the short one.
    let mixed = [1.0, 0.0, 1.0, 0.0];
    let a = prep(&on_reward, &mixed, &lengths);
    let b = prep(&on_shaped, &mixed, &lengths);
    assert_eq!(
        (a.kept.clone(), b.kept.clone()),
        (vec![true; 4], vec![true; 4])
    );
    assert_eq!(a.advantages, b.advantages);
    assert!(a.advantages[2] > a.advantages[0]);
}

#[test]
fn nothing_kept_means_nothing_to_learn() {
    let cfg = config("dapo", json!({}), 2, 16);
    let p = prep(&cfg, &[1.0, 1.0, 0.0, 0.0], &[3; 4]);
    assert!(p.kept_rows().is_empty());
    let step = p.all_rows();
    let denom = Denominators::new(&cfg, &step).unwrap();
    assert!(denom.is_empty());
    let (new, old, _) = synthetic_logps(&[3; 4], 4, 0.1, 1);
    let logp = LogProbs {
        new: &new,
        old: &old,
        reference: None,
        entropy: None,
    };
    let out = loss(&cfg, &step, &logp, &denom).unwrap();
    assert_eq!(out.value, 0.0);
    assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn bad_batches_are_reported() {
    let cfg = config("grpo", json!({}), 4, 16);
    let e = prepare(&cfg, &[0.0, 1.0, f64::NAN, 0.0], &[1; 4], &[false; 4]).unwrap_err();
    assert!(
        e.to_string()
            .contains("reward of completion 2 (group 0) is NaN"),
        "{e}"
    );
    let e = prepare(&cfg, &[0.0, f64::INFINITY, 0.0, 0.0], &[1; 4], &[false; 4]).unwrap_err();
    assert!(e.to_string().contains("must be finite"), "{e}");
    let e = prepare(&cfg, &[0.0; 6], &[1; 6], &[false; 6]).unwrap_err();
    assert!(
        e.to_string()
            .contains("batch of 6 completions is not a multiple of group_size 4"),
        "{e}"
    );
    let e = prepare(&cfg, &[0.0; 4], &[1; 3], &[false; 4]).unwrap_err();
    assert!(e.to_string().contains("4 rewards but 3 lengths"), "{e}");
}

#[test]
fn advantage_modes() {
    // G = 1: sigma = 0 and A = 0.
    let p = prep(&config("grpo", json!({}), 1, 8), &[1.0, 0.0], &[1, 1]);
    assert_eq!(p.advantages, [0.0, 0.0]);
    assert_eq!(p.zero_variance_fraction(), 1.0);
    // Rank with ties sharing the mean rank.
    let cfg = config("grpo", json!({"advantage_norm": "rank"}), 4, 8);
    let p = prep(&cfg, &[1.0, 0.0, 1.0, 0.5], &[1; 4]);
    assert_close(&p.advantages, &[2.0 / 3.0, -1.0, 2.0 / 3.0, -1.0 / 3.0]);
    // Batch std: mean per group, std over all kept rewards.
    let cfg = config("grpo", json!({"scale_rewards": "batch"}), 2, 8);
    let p = prep(&cfg, &[0.0, 1.0, 0.0, 0.5], &[1; 4]);
    let rs = [0.0, 1.0, 0.0, 0.5];
    let m = rs.iter().sum::<f64>() / 4.0;
    let sd = (rs.iter().map(|r| (r - m) * (r - m)).sum::<f64>() / 3.0).sqrt() + 1e-4;
    assert_close(&p.advantages, &[-0.5 / sd, 0.5 / sd, -0.25 / sd, 0.25 / sd]);
    // Clip first, then sign scales.
    let cfg = config(
        "drgrpo",
        json!({"advantage_clip": 0.3, "positive_advantage_scale": 2.0, "negative_advantage_scale": 0.5}),
        2,
        8,
    );
    let p = prep(&cfg, &[0.0, 1.0, 0.0, 0.2], &[1; 4]);
    assert_close(&p.advantages, &[-0.15, 0.6, -0.05, 0.2]);
}

#[test]
fn split_makes_even_parts_of_whole_groups() {
    let cfg = config("grpo", json!({}), 2, 8);
    let p = prep(&cfg, &[0.0, 1.0].repeat(7), &[1; 14]);
    let sizes: Vec<usize> = p.kept_rows().split(3).iter().map(|b| b.groups()).collect();
    assert_eq!(sizes, [3, 2, 2]);
    let parts = p.kept_rows().split(3);
    assert_eq!(parts[1].rows[0].index, 6);
    assert_eq!(
        p.kept_rows().split(20).len(),
        7,
        "never more parts than groups"
    );
    assert_eq!(p.kept_rows().split(0).len(), 1);
}

#[test]
fn on_policy_loss_is_minus_the_mean_advantage_and_gspo_matches_grpo() {
    let g = 4;
    let rewards = [0.0, 1.0, 1.0, 0.0, 0.25, 0.5, 1.0, 0.0];
    let lengths = [3, 5, 1, 6, 2, 6, 4, 5];
    let (new, _, _) = synthetic_logps(&lengths, 6, 0.0, 3);
    let mut grads = Vec::new();
    for algorithm in ["grpo", "gspo"] {
        let cfg = config(algorithm, json!({}), g, 8);
        let p = prep(&cfg, &rewards, &lengths);
        let r = run(&cfg, &p.all_rows(), &new, &new, None, 1);
        let mean_a: f64 = p.advantages.iter().map(|&a| a as f64).sum::<f64>() / 8.0;
        assert!(
            (r.pg_loss + mean_a).abs() < 1e-6,
            "{algorithm}: {} vs {}",
            r.pg_loss,
            -mean_a
        );
        grads.push(r.grad);
    }
    for (a, b) in grads[0].iter().flatten().zip(grads[1].iter().flatten()) {
        assert!((a - b).abs() < 1e-6, "grpo {a} vs gspo {b}");
    }
}

#[test]
fn junk_in_padding_never_reaches_the_loss_or_gradient() {
    for algorithm in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        let cfg = config(algorithm, json!({"beta": 0.0}), 2, 4);
        let p = prep(&cfg, &[0.0, 1.0, 1.0, 0.5], &[2, 0, 4, 1]);
        let mut rows = vec![vec![-0.5f64; 4]; 4];
        let mut old_rows = vec![vec![-0.6f64; 4]; 4];
        for (i, &len) in [2usize, 0, 4, 1].iter().enumerate() {
            for t in len..4 {
                rows[i][t] = f64::NEG_INFINITY;
                old_rows[i][t] = f64::NAN;
            }
        }
        let (new, old) = (tensor2(&rows), tensor2(&old_rows));
        let reference = tensor2(&old_rows);
        let r = run(&cfg, &p.all_rows(), &new, &old, Some(&reference), 2);
        assert!(r.loss.is_finite(), "{algorithm}: loss {}", r.loss);
        for (i, row) in r.grad.iter().enumerate() {
            for (t, &x) in row.iter().enumerate() {
                assert!(x.is_finite(), "{algorithm}: grad[{i}][{t}] = {x}");
            }
        }
        assert_eq!(r.grad[1], [0.0; 4], "{algorithm}: empty completion");
        assert_eq!(&r.grad[0][2..], [0.0; 2], "{algorithm}: padding");
    }
}

#[test]
fn two_sided_clip_caps_negative_advantages_with_large_ratios() {
    let cfg = config(
        "grpo",
        json!({"delta": 1.5, "loss_agg": "token_mean"}),
        2,
        4,
    );
    let p = prep(&cfg, &[0.0, 1.0], &[1, 1]);
    let a0 = p.advantages[0] as f64;
    assert!(a0 < 0.0);
    // Row 0: rho = e^1 > delta with A < 0: loss −delta·A, no gradient. Row 1: rho = 1.
    let new = tensor2(&[vec![-1.0], vec![-1.0]]);
    let old = tensor2(&[vec![-2.0], vec![-1.0]]);
    let r = run(&cfg, &p.all_rows(), &new, &old, None, 1);
    let a1 = p.advantages[1] as f64;
    let want = (-1.5 * a0 - a1) / 2.0;
    assert!((r.pg_loss - want).abs() < 1e-6, "{} vs {want}", r.pg_loss);
    assert_eq!(r.grad[0][0], 0.0);
    // Without delta the unclipped branch is active: gradient −A·rho/2.
    let cfg = config("grpo", json!({"loss_agg": "token_mean"}), 2, 4);
    let r = run(&cfg, &p.all_rows(), &new, &old, None, 1);
    let want = -a0 * 1f64.exp() / 2.0;
    assert!(
        (r.grad[0][0] as f64 - want).abs() < 1e-5,
        "{} vs {want}",
        r.grad[0][0]
    );
}

#[test]
fn dgpo_pairs_top_k_by_gap_and_ln2_at_the_reference() {
    let rewards = [0.0, 1.0, 0.5, 1.0];
    let lengths = [2, 3, 3, 2];
    let (new, old, _) = synthetic_logps(&lengths, 3, 0.2, 5);
    // Policy = reference: every z is 0 and L_DPO = ln 2.
    for (overrides, pairs) in [
        (json!({}), 5),
        (json!({"dpo_max_pairs_per_group": 2}), 2),
        (json!({"pairwise_margin": 0.5}), 2),
    ] {
        let cfg = config("dgpo", overrides.clone(), 4, 8);
        let p = prep(&cfg, &rewards, &lengths);
        let r = run(&cfg, &p.all_rows(), &new, &old, Some(&new), 1);
        assert_eq!(r.diagnostics.n_pairs, pairs, "{overrides}");
        let dpo = r.dpo_loss.unwrap();
        assert!(
            (dpo - std::f64::consts::LN_2).abs() < 1e-6,
            "{overrides}: {dpo}"
        );
    }
    // Top-2 by gap are (1, 0) and (3, 0) (gap 1, index order), so row 2 gets no DPO gradient:
    // with the policy pushed away from the reference on row 2 only, the loss is unchanged.
    let cfg = config(
        "dgpo",
        json!({"dpo_max_pairs_per_group": 2, "dpo_coef": 1.0}),
        4,
        8,
    );
    let p = prep(&cfg, &rewards, &lengths);
    let base = run(&cfg, &p.all_rows(), &new, &old, Some(&new), 1);
    assert_eq!(base.grad[2], [0.0; 3]);
    assert!(
        base.grad[1][0] < 0.0 && base.grad[0][0] > 0.0,
        "winner up, loser down"
    );
}

#[test]
fn entropy_bonus_subtracts_the_mean_loss_token_entropy() {
    let cfg = config("grpo", json!({"entropy_coef": 0.1}), 2, 4);
    let p = prep(&cfg, &[0.0, 1.0], &[2, 3]);
    let (new, old, _) = synthetic_logps(&[2, 3], 4, 0.1, 9);
    let h = Var::from_tensor(
        &Tensor::new(
            &[[1f32, 2.0, 99.0, 99.0], [3.0, 4.0, 5.0, f32::NAN]],
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let step = p.all_rows();
    let denom = Denominators::new(&cfg, &step).unwrap();
    let with = |entropy: Option<&Tensor>, cfg: &AlgoConfig| {
        let logp = LogProbs {
            new: &new,
            old: &old,
            reference: None,
            entropy,
        };
        loss(cfg, &step, &logp, &denom).unwrap()
    };
    let out = with(Some(h.as_tensor()), &cfg);
    let plain = with(None, &config("grpo", json!({}), 2, 4));
    assert!((out.value - (plain.value - 0.1 * 15.0 / 5.0)).abs() < 1e-6);
    let g = out.loss.backward().unwrap();
    let gh: Vec<Vec<f32>> = g.get(h.as_tensor()).unwrap().to_vec2().unwrap();
    let want = [[-0.02, -0.02, 0.0, 0.0], [-0.02, -0.02, -0.02, 0.0]];
    for (g, w) in gh.iter().flatten().zip(want.iter().flatten()) {
        assert!(
            (*g as f64 - w).abs() < 1e-7,
            "entropy gradient {gh:?}, want {want:?}"
        );
    }
    let logp = LogProbs {
        new: &new,
        old: &old,
        reference: None,
        entropy: None,
    };
    let e = loss(&cfg, &step, &logp, &denom).unwrap_err();
    assert!(
        e.to_string()
            .contains("entropy_coef = 0.1 needs per-token entropies"),
        "{e}"
    );
}

#[test]
fn missing_reference_and_shape_errors() {
    let cfg = config("grpo", json!({"beta": 0.04}), 2, 4);
    let p = prep(&cfg, &[0.0, 1.0], &[2, 3]);
    let (new, old, _) = synthetic_logps(&[2, 3], 3, 0.1, 9);
    let step = p.all_rows();
    let denom = Denominators::new(&cfg, &step).unwrap();
    let logp = LogProbs {
        new: &new,
        old: &old,
        reference: None,
        entropy: None,
    };
    let e = loss(&cfg, &step, &logp, &denom).unwrap_err().to_string();
    assert!(e.contains("beta = 0.04 needs reference log-probs"), "{e}");
    let short = new.narrow(1, 0, 2).unwrap();
    let logp = LogProbs {
        new: &short,
        old: &short,
        reference: Some(&short),
        entropy: None,
    };
    let e = loss(&cfg, &step, &logp, &denom).unwrap_err().to_string();
    assert!(
        e.contains("completion 1 has 3 tokens but the log-probs are only 2 wide"),
        "{e}"
    );
    let logp = LogProbs {
        new: &new,
        old: &short,
        reference: Some(&new),
        entropy: None,
    };
    let e = loss(&cfg, &step, &logp, &denom).unwrap_err().to_string();
    assert!(e.contains("`old` has shape [2, 2]"), "{e}");
}

#[test]
fn on_policy_ratio_on_a_zero_width_clip_keeps_the_full_gradient() {
    // ε_low = ε_high = 0 puts ρ = 1 exactly on both clip bounds: PyTorch's clamp passes the
    // gradient on its closed interval, so the update equals the unclipped policy gradient.
    let rewards = [0.0, 1.0, 0.5, 1.0];
    let lengths = [2, 3, 1, 3];
    let (new, _, _) = synthetic_logps(&lengths, 3, 0.0, 11);
    let tight = config("grpo", json!({"epsilon": 0.0, "epsilon_high": 0.0}), 4, 8);
    let loose = config("grpo", json!({}), 4, 8);
    let p = prep(&tight, &rewards, &lengths);
    let a = run(&tight, &p.all_rows(), &new, &new, None, 1);
    let b = run(&loose, &p.all_rows(), &new, &new, None, 1);
    assert_eq!(a.grad, b.grad);
    assert!(
        a.grad[1][0] < 0.0,
        "positive advantage: gradient pushes ℓ up"
    );
}

/// docs/algorithms.md §3.9: three groups of four. Rewards 0, ½, 1, ½ (the ½ rows sit at the
/// group mean: A = 0, yet DGPO pairs them), an all-failed group (A = 0) and 1, 0, 0, 1 whose last
/// row is truncated (no loss token when truncated rows are masked).
fn skip_case(cfg: &AlgoConfig) -> (StepBatch, [usize; 12]) {
    let rewards = [0.0, 0.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    let lengths = [3, 5, 2, 6, 4, 1, 6, 3, 5, 2, 6, 8];
    let mut truncated = [false; 12];
    truncated[11] = true;
    let p = prepare(cfg, &rewards, &lengths, &truncated).unwrap();
    (p.kept_rows(), lengths)
}

fn computed(algorithm: &str, overrides: Value) -> Vec<usize> {
    let cfg = config(algorithm, overrides, 4, 8);
    let (batch, _) = skip_case(&cfg);
    batch
        .rows_with_gradient(&cfg)
        .into_iter()
        .map(|i| batch.rows[i].index)
        .collect()
}

#[test]
fn rows_with_gradient_leave_out_zero_advantages_unless_kl_or_dpo_reads_them() {
    let all: Vec<usize> = (0..12).collect();
    let nonzero = vec![0, 2, 8, 9, 10, 11];
    assert_eq!(computed("grpo", json!({})), nonzero);
    assert_eq!(computed("drgrpo", json!({})), nonzero);
    assert_eq!(computed("gspo", json!({})), nonzero);
    // The KL term reads every row with a loss token.
    assert_eq!(computed("grpo", json!({"beta": 0.04})), all);
    // DGPO's pairs use the rows at the mean: 1 > ½ > 0.
    assert_eq!(computed("dgpo", json!({})), [0, 1, 2, 3, 8, 9, 10, 11]);
    assert_eq!(
        computed("dgpo", json!({"dpo_reference_free": true})),
        [0, 1, 2, 3, 8, 9, 10, 11]
    );
    // DAPO: dynamic sampling dropped the flat group, the masked truncated row has no loss token
    // (even with β ≠ 0).
    assert_eq!(computed("dapo", json!({})), [0, 2, 8, 9, 10]);
    assert_eq!(
        computed("dapo", json!({"beta": 0.04})),
        [0, 1, 2, 3, 8, 9, 10]
    );
}

/// Value and ∂/∂ℓ of the loss of `batch` computed from the rows `rows` only, and from all rows.
fn both_ways(cfg: &AlgoConfig, batch: &StepBatch, lengths: &[usize]) -> [(f64, Vec<Vec<f32>>); 2] {
    let (new, old, reference) = synthetic_logps(lengths, 8, 0.3, 21);
    let rows = batch.rows_with_gradient(cfg);
    let reference = cfg.needs_reference().then_some(&reference);
    let denom = Denominators::new(cfg, batch).unwrap();
    let eval = |subset: Option<&[usize]>| {
        let var = Var::from_tensor(&new).unwrap();
        let pick = |t: &Tensor| match subset {
            Some(rows) => {
                let idx: Vec<u32> = rows.iter().map(|&i| i as u32).collect();
                t.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0)
                    .unwrap()
            }
            None => t.clone(),
        };
        let (n, o, r) = (pick(var.as_tensor()), pick(&old), reference.map(pick));
        let logp = LogProbs {
            new: &n,
            old: &o,
            reference: r.as_ref(),
            entropy: None,
        };
        let out = match subset {
            Some(rows) => loss_rows(cfg, batch, rows, &logp, &denom).unwrap(),
            None => loss(cfg, batch, &logp, &denom).unwrap(),
        };
        let grads = out.loss.backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
        (out.value, grad)
    };
    [eval(Some(&rows)), eval(None)]
}

#[test]
fn the_loss_of_the_rows_with_gradient_is_the_loss_of_all_rows() {
    // Off-policy log-probs (spread 0.3), so that ratios differ from 1 and clips bind.
    for algorithm in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        for overrides in [json!({}), json!({"beta": 0.04})] {
            let cfg = config(algorithm, overrides.clone(), 4, 8);
            let (batch, lengths) = skip_case(&cfg);
            let lengths: Vec<usize> = batch.rows.iter().map(|r| lengths[r.index]).collect();
            let [(v_rows, g_rows), (v_all, g_all)] = both_ways(&cfg, &batch, &lengths);
            assert!(
                (v_rows - v_all).abs() <= 1e-6 * v_all.abs().max(1.0),
                "{algorithm} {overrides}: loss {v_rows} from the rows with gradient, {v_all} from all"
            );
            let scale = g_all.iter().flatten().fold(0f32, |m, g| m.max(g.abs()));
            assert!(scale > 0.0);
            for (a, b) in g_rows.iter().flatten().zip(g_all.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-6 * scale,
                    "{algorithm} {overrides}: gradients {g_rows:?} and {g_all:?}"
                );
            }
        }
    }
}

#[test]
fn loss_rows_refuses_to_leave_out_a_row_with_gradient() {
    let (new, old, reference) = synthetic_logps(&[3, 5, 2, 6], 6, 0.1, 4);
    let rewards = [0.0, 0.5, 1.0, 0.5];
    for (algorithm, overrides) in [("dgpo", json!({})), ("grpo", json!({"beta": 0.04}))] {
        let cfg = config(algorithm, overrides, 4, 8);
        let batch = prep(&cfg, &rewards, &[3, 5, 2, 6]).all_rows();
        assert_eq!(batch.rows[1].advantage, 0.0);
        let idx = Tensor::new(&[0u32, 2, 3], &Device::Cpu).unwrap();
        let pick = |t: &Tensor| t.index_select(&idx, 0).unwrap();
        let (n, o, r) = (pick(&new), pick(&old), pick(&reference));
        let logp = LogProbs {
            new: &n,
            old: &o,
            reference: Some(&r),
            entropy: None,
        };
        let denom = Denominators::new(&cfg, &batch).unwrap();
        let e = loss_rows(&cfg, &batch, &[0, 2, 3], &logp, &denom).unwrap_err();
        assert!(
            e.to_string().contains("row 1 (completion 1) was left out"),
            "{algorithm}: {e}"
        );
    }
}
