//! The update spends no compute on rows that cannot change the gradient (docs/algorithms.md
//! §3.9), and yet its gradients and optimizer steps are those of the loss over every row; and
//! `kl_to_start` is k3 of ℓ^ref − ℓ^old, 0 while LoRA's B is 0.
//!
//! The reference side never goes through [`Update`]: it is the plain recipe of §2 written with
//! the library's public pieces (`Policy::logprobs` on every row, [`algo::loss`], backward, the
//! optimizer), so a wrong denominator, a missing optimizer step or a dropped DGPO row in the
//! update shows as a difference.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::*;
use crate::algo::{prepare, BatchShape};
use crate::model::load::load_dir;
use crate::model::optim::{AdamWParams, OptimizerSettings, ScheduleKind};
use crate::model::{LoraOptions, Policy};

const G: usize = 4;
const L_MAX: usize = 8;
const ALGORITHMS: [&str; 5] = ["grpo", "dapo", "drgrpo", "gspo", "dgpo"];

/// Three groups of four: rewards 0, ½, 1, ½ (the two ½ rows sit at the group mean, A = 0, yet
/// form DGPO pairs), a group that all failed (zero variance) and 1, 0, 0, 1 with its last row
/// truncated at L_max (no loss token under DAPO's overlong filtering).
struct Case {
    prompts: Vec<Vec<u32>>,
    completions: Vec<Vec<u32>>,
    rewards: Vec<f64>,
    truncated: Vec<bool>,
}

fn case() -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut token = || rng.random_range(3..300u32);
    let prompts: Vec<Vec<u32>> = (0..3)
        .flat_map(|g| {
            let p: Vec<u32> = (0..3 + g).map(|_| token()).collect();
            vec![p; G]
        })
        .collect();
    // Lengths at most L_max − ⌊L_max/5⌋ (no overlong penalty) except the truncated row.
    let lengths = [3, 5, 2, 6, 4, 1, 6, 3, 5, 2, 6, L_MAX];
    let completions = lengths
        .iter()
        .map(|&n| (0..n).map(|_| token()).collect())
        .collect();
    let mut truncated = vec![false; 3 * G];
    truncated[3 * G - 1] = true;
    Case {
        prompts,
        completions,
        rewards: vec![0.0, 0.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0],
        truncated,
    }
}

fn config(algorithm: &str) -> AlgoConfig {
    let shape = BatchShape {
        group_size: G,
        max_completion_length: L_MAX,
    };
    AlgoConfig::resolve(algorithm, &Map::new(), shape).unwrap()
}

fn prepared(cfg: &AlgoConfig, case: &Case) -> Prepared {
    let lengths: Vec<usize> = case.completions.iter().map(Vec::len).collect();
    prepare(cfg, &case.rewards, &lengths, &case.truncated).unwrap()
}

/// The tiny Qwen2 in f64 with rank-4 adapters; `b_scale` > 0 gives B random values so that A
/// has a gradient too (0 keeps B = 0, the adapters' start).
fn policy(b_scale: f64) -> Policy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-qwen2");
    let files = load_dir(&dir, &Device::Cpu, DType::F64).unwrap();
    let lora = LoraOptions {
        r: 4,
        ..LoraOptions::default()
    };
    let p = Policy::from_files(files, &lora, &Device::Cpu, DType::F64, 11).unwrap();
    if b_scale > 0.0 {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let weights: Vec<_> = p
            .lora_vars()
            .into_iter()
            .map(|(name, a, b)| {
                let n = b.elem_count();
                let v: Vec<f64> = (0..n)
                    .map(|_| rng.random_range(-b_scale..b_scale))
                    .collect();
                let b = Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap();
                (name, a.as_tensor().clone(), b)
            })
            .collect();
        p.set_lora_weights(&weights).unwrap();
    }
    p
}

fn optimizer(p: &Policy) -> Optimizer {
    let settings = OptimizerSettings {
        adamw: AdamWParams {
            weight_decay: 0.1,
            ..AdamWParams::default()
        },
        learning_rate: 1e-2,
        schedule: ScheduleKind::Constant,
        warmup_ratio: 0.0,
    };
    Optimizer::new(&p.lora_vars(), &settings, 100).unwrap()
}

fn update<'a>(cfg: &'a AlgoConfig, p: &'a Policy, micro_batches: usize) -> Update<'a> {
    Update {
        algo: cfg,
        policy: p,
        temperature: 0.9,
        micro_batches,
        max_grad_norm: 0.0,
    }
}

fn rows(case: &Case) -> Rows<'_> {
    Rows {
        prompts: case.prompts.iter().map(Vec::as_slice).collect(),
        completions: case.completions.iter().map(Vec::as_slice).collect(),
    }
}

/// Log-probs of the rows of `batch`, every one of them computed.
fn logprobs(p: &Policy, case: &Case, batch: &StepBatch, grad: bool, adapters: bool) -> Tensor {
    let (prompts, completions) = rows(case).select(&batch.rows);
    p.logprobs(&prompts, &completions, 0.9, grad, adapters)
        .unwrap()
}

/// The reference gradient: [`algo::loss`] on every row of `batch`, on-policy (ℓ^old = detached
/// ℓ), under `denom`.
fn full_gradient(
    cfg: &AlgoConfig,
    p: &Policy,
    case: &Case,
    batch: &StepBatch,
    denom: &Denominators,
) -> Vec<Tensor> {
    let new = logprobs(p, case, batch, true, true);
    let reference = cfg
        .needs_reference()
        .then(|| logprobs(p, case, batch, false, false));
    let old = new.detach();
    let logp = LogProbs {
        new: &new,
        old: &old,
        reference: reference.as_ref(),
        entropy: None,
    };
    let grads = algo::loss(cfg, batch, &logp, denom)
        .unwrap()
        .loss
        .backward()
        .unwrap();
    vars_of(p, &grads)
}

fn vars_of(p: &Policy, grads: &GradStore) -> Vec<Tensor> {
    p.lora_vars()
        .iter()
        .flat_map(|(_, a, b)| [a, b])
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("a gradient per adapter")
                .clone()
        })
        .collect()
}

fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

/// max |a − b| / max |b|.
fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(
        scale > 0.0,
        "the reference is all zeros: nothing is compared"
    );
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn skipped_rows_leave_the_gradient_of_every_algorithm_unchanged() {
    let case = case();
    let p = policy(0.3);
    for algorithm in ALGORITHMS {
        let cfg = config(algorithm);
        let batch = prepared(&cfg, &case).kept_rows();
        let computed: Vec<Row> = batch
            .rows_with_gradient(&cfg)
            .into_iter()
            .map(|i| batch.rows[i].clone())
            .collect();
        let skipped = batch.len() - computed.len();
        // grpo/drgrpo/gspo: the two rows at the mean and the flat group; dapo: dynamic sampling
        // dropped the flat group, the truncated row has no loss token; dgpo: the rows at the mean
        // are in pairs.
        let want = match algorithm {
            "dapo" => 3,
            "dgpo" => 4,
            _ => 6,
        };
        assert_eq!(skipped, want, "{algorithm}: rows skipped");
        let denom = Denominators::new(&cfg, &batch).unwrap();
        let want = flat(&full_gradient(&cfg, &p, &case, &batch, &denom));

        // The update's own accumulation, one micro-batch per group, so that one (the flat group)
        // runs no forward at all.
        let up = update(&cfg, &p, 3);
        let rows = rows(&case);
        let reference = cfg
            .needs_reference()
            .then(|| up.no_grad(&rows, &computed, false).unwrap());
        let tables = Tables {
            rows: &rows,
            old: None,
            reference: reference.as_ref(),
        };
        let opt = optimizer(&p);
        let mut grads = opt.accumulator();
        let mut seen = LogProbTable::new(case.completions.len());
        let sums = up
            .accumulate(&batch, &denom, &tables, &mut seen, &mut grads)
            .unwrap();
        let got = flat(&vars_of(&p, &grads.take()));
        let diff = rel_diff(&got, &want);
        assert!(
            diff < 1e-6,
            "{algorithm}: gradients differ by {diff:e} (relative)"
        );
        // Only computed rows count as units (tokens here, sequences for gspo).
        let units: usize = match cfg.importance_sampling_level {
            algo::ImportanceLevel::Token => computed.iter().map(|r| r.loss_len(&cfg)).sum(),
            algo::ImportanceLevel::Sequence => computed.len(),
        };
        assert_eq!(sums.diagnostics.units, units, "{algorithm}: units");

        // The comparison catches a wrong denominator: normalising by the computed rows alone
        // moves the gradient far beyond the tolerance.
        let wrong = Denominators {
            sequences: computed.len(),
            loss_tokens: computed.iter().map(|r| r.loss_len(&cfg)).sum(),
            ..denom
        };
        let wrong = flat(&full_gradient(&cfg, &p, &case, &batch, &wrong));
        assert!(
            rel_diff(&wrong, &want) > 1e-2,
            "{algorithm}: the test cannot tell a wrong denominator"
        );
    }
}

/// The trainer's update recipe (docs/algorithms.md §2, steps 5–6) with every row computed.
fn reference_update(cfg: &AlgoConfig, p: &Policy, case: &Case, opt: &mut Optimizer) {
    let batch = prepared(cfg, case).kept_rows();
    let minibatches = batch.split(cfg.num_minibatches);
    let on_policy = cfg.num_iterations == 1 && minibatches.len() == 1;
    let old = (!on_policy).then(|| logprobs(p, case, &batch, false, true));
    let reference = cfg
        .needs_reference()
        .then(|| logprobs(p, case, &batch, false, false));
    for _ in 0..cfg.num_iterations {
        let mut start = 0;
        for mb in &minibatches {
            let range = start..start + mb.len();
            start += mb.len();
            let denom = Denominators::new(cfg, mb).unwrap();
            if denom.is_empty() {
                continue;
            }
            let new = logprobs(p, case, mb, true, true);
            let width = new.dim(1).unwrap();
            let part = |t: &Tensor| {
                t.narrow(0, range.start, mb.len())
                    .unwrap()
                    .narrow(1, 0, width)
                    .unwrap()
            };
            let old_t = old.as_ref().map_or_else(|| new.detach(), part);
            let ref_t = reference.as_ref().map(part);
            let logp = LogProbs {
                new: &new,
                old: &old_t,
                reference: ref_t.as_ref(),
                entropy: None,
            };
            let loss = algo::loss(cfg, mb, &logp, &denom).unwrap();
            let mut grads = opt.accumulator();
            grads.add(loss.loss.backward().unwrap()).unwrap();
            opt.step(&mut grads.take(), 0.0).unwrap();
        }
    }
}

fn adapters(p: &Policy) -> Vec<f64> {
    let ts: Vec<Tensor> = p
        .lora_vars()
        .iter()
        .flat_map(|(_, a, b)| [a.as_tensor().clone(), b.as_tensor().clone()])
        .collect();
    flat(&ts)
}

#[test]
fn updates_with_skipped_rows_step_like_updates_over_every_row() {
    let case = case();
    for algorithm in ALGORITHMS {
        // Two passes, so that the second moves ratios off 1 and, for gspo's one-group
        // minibatches, the flat group's zero-gradient step applies momentum and decay.
        let overrides: Map<String, Value> =
            serde_json::from_value(json!({"num_iterations": 2})).unwrap();
        let cfg = AlgoConfig::resolve(
            algorithm,
            &overrides,
            BatchShape {
                group_size: G,
                max_completion_length: L_MAX,
            },
        )
        .unwrap();
        let prepared = prepared(&cfg, &case);
        let start = policy(0.3);
        let before = adapters(&start);

        let p = policy(0.3);
        let mut opt = optimizer(&p);
        let outcome = update(&cfg, &p, 2)
            .run_tokens(&prepared, &case.prompts, &case.completions, &mut opt)
            .unwrap();
        assert!(outcome.stepped && outcome.rows_skipped > 0, "{algorithm}");
        let got: Vec<f64> = adapters(&p)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();

        let q = policy(0.3);
        let mut opt = optimizer(&q);
        reference_update(&cfg, &q, &case, &mut opt);
        let want: Vec<f64> = adapters(&q)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        let diff = rel_diff(&got, &want);
        assert!(
            diff < 1e-6,
            "{algorithm}: the adapters moved differently ({diff:e})"
        );
    }
}

#[test]
fn kl_to_start_is_zero_at_the_start_and_grows_with_updates() {
    let case = case();
    let cfg = config("grpo");
    let prepared = prepared(&cfg, &case);
    let p = policy(0.0);
    let mut opt = optimizer(&p);
    let up = update(&cfg, &p, 1);
    let mut kl = Vec::new();
    for _ in 0..3 {
        let outcome = up
            .run_tokens(&prepared, &case.prompts, &case.completions, &mut opt)
            .unwrap();
        kl.push(outcome.kl_to_start.expect("rows were computed"));
    }
    assert!(
        kl[0].abs() < 1e-12,
        "B = 0: the policy is the base model, got {}",
        kl[0]
    );
    assert!(kl[1] > 1e-9 && kl[2] > kl[1], "{kl:?}");
}

#[test]
fn kl_to_start_is_k3_of_the_sampling_policy_to_the_base_model() {
    let case = case();
    for algorithm in ["grpo", "gspo"] {
        let cfg = config(algorithm);
        let prepared = prepared(&cfg, &case);
        let p = policy(0.3);
        let batch = prepared.kept_rows();
        let computed = StepBatch {
            group_size: G,
            rows: batch
                .rows_with_gradient(&cfg)
                .into_iter()
                .map(|i| batch.rows[i].clone())
                .collect(),
        };
        // Before the update: the policy that sampled.
        let old: Vec<Vec<f64>> = logprobs(&p, &case, &computed, false, true)
            .to_vec2()
            .unwrap();
        let reference: Vec<Vec<f64>> = logprobs(&p, &case, &computed, false, false)
            .to_vec2()
            .unwrap();
        let (mut sum, mut n) = (0.0, 0);
        let mut want_by_row = vec![None; case.completions.len()];
        for (i, row) in computed.rows.iter().enumerate() {
            let k3: Vec<f64> = (0..row.length)
                .map(|t| reference[i][t] - old[i][t])
                .map(|d| d.exp() - d - 1.0)
                .collect();
            want_by_row[row.index] = Some(k3.iter().sum::<f64>() / k3.len() as f64);
            sum += k3.iter().sum::<f64>();
            n += k3.len();
        }
        let want = sum / n as f64;
        let mut opt = optimizer(&p);
        let outcome = update(&cfg, &p, 2)
            .run_tokens(&prepared, &case.prompts, &case.completions, &mut opt)
            .unwrap();
        let got = outcome.kl_to_start.unwrap();
        assert!(
            want > 1e-4,
            "{algorithm}: random adapters differ from the base: {want}"
        );
        assert!(
            (got - want).abs() < 1e-5 * want,
            "{algorithm}: kl_to_start {got}, want {want}"
        );
        // Per completion: the rows computed, each its own mean; the others none.
        assert!(computed.rows.len() < case.completions.len());
        assert_eq!(outcome.kl_to_start_by_row.len(), case.completions.len());
        for (row, (got, want)) in outcome
            .kl_to_start_by_row
            .iter()
            .zip(&want_by_row)
            .enumerate()
        {
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-5 * w, "row {row}: {g}, {w}"),
                (None, None) => {}
                _ => panic!("{algorithm}: row {row}: kl {got:?}, want {want:?}"),
            }
        }
    }
}

#[test]
fn a_batch_with_no_row_to_compute_still_takes_its_step() {
    // Every group flat: nothing to compute, and yet the optimizer step of a zero gradient is
    // taken, as it was when those rows were computed (AdamW decays the weights).
    let case = case();
    let cfg = config("grpo");
    let lengths: Vec<usize> = case.completions.iter().map(Vec::len).collect();
    let prepared = prepare(&cfg, &[0.0; 3 * G], &lengths, &case.truncated).unwrap();
    let p = policy(0.3);
    let before = adapters(&p);
    let mut opt = optimizer(&p);
    let outcome = update(&cfg, &p, 1)
        .run_tokens(&prepared, &case.prompts, &case.completions, &mut opt)
        .unwrap();
    assert!(outcome.stepped);
    assert_eq!(outcome.rows_skipped, 3 * G);
    assert_eq!(outcome.kl_to_start, None);
    assert_eq!(outcome.grad_norm, 0.0);
    let after = adapters(&p);
    let decayed: Vec<f64> = before.iter().map(|w| w * (1.0 - 1e-2 * 0.1)).collect();
    let diff = rel_diff(&after, &decayed);
    let moved = rel_diff(&after, &before);
    // The adapters are f32: equal to rounding, against a move of lr · weight_decay = 1e-3.
    assert!(
        diff < 1e-6,
        "weight decay alone moves the weights: {diff:e}, moved {moved:e}"
    );
}
