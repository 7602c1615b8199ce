//! Properties that must hold for every algorithm on random batches (proptest).

mod algo_support;

use algo_support::{run, synthetic_logps};
use lean_grpo::algo::{prepare, presets::PRESETS, AlgoConfig, BatchShape};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Map, Value};

/// L_max far above the widths used, so overlong shaping never changes a reward here unless a
/// test asks for it.
const L_MAX: usize = 64;

#[derive(Debug, Clone)]
struct Batch {
    g: usize,
    t: usize,
    rewards: Vec<f64>,
    lengths: Vec<usize>,
    truncated: Vec<bool>,
    seed: u64,
}

/// 1–4 groups of 1–5 completions, widths 1–8, rewards with frequent ties, some empty rows.
fn batches() -> impl Strategy<Value = Batch> {
    (1usize..=5, 1usize..=4, 1usize..=8, any::<u64>()).prop_flat_map(|(g, groups, t, seed)| {
        let b = g * groups;
        (
            prop::collection::vec(prop::sample::select(vec![0.0, 0.25, 0.5, 1.0]), b),
            prop::collection::vec(0..=t, b),
            prop::collection::vec(prop::bool::weighted(0.2), b),
        )
            .prop_map(move |(rewards, lengths, truncated)| Batch {
                g,
                t,
                rewards,
                lengths,
                truncated,
                seed,
            })
    })
}

fn config(algorithm: &str, overrides: Value, g: usize) -> AlgoConfig {
    let map: Map<String, Value> = serde_json::from_value(overrides).unwrap();
    AlgoConfig::resolve(
        algorithm,
        &map,
        BatchShape {
            group_size: g,
            max_completion_length: L_MAX,
        },
    )
    .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 + 1e-4 * b.abs()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_group_of_equal_rewards_gets_no_gradient(mut batch in batches(), reward in 0.0f64..1.0) {
        for r in &mut batch.rewards[..batch.g] {
            *r = reward;
        }
        let (new, old, reference) = synthetic_logps(&batch.lengths, batch.t, 0.3, batch.seed);
        for preset in PRESETS {
            let cfg = config(preset.name, json!({"dynamic_sampling": false, "beta": 0.0}), batch.g);
            let p = prepare(&cfg, &batch.rewards, &batch.lengths, &batch.truncated).unwrap();
            let r = run(&cfg, &p.all_rows(), &new, &old, Some(&reference), 1);
            for (i, row) in r.grad[..batch.g].iter().enumerate() {
                prop_assert!(row.iter().all(|&x| x == 0.0), "{}: row {i} grad {row:?}", preset.name);
            }
        }
    }

    #[test]
    fn permuting_a_group_permutes_its_advantages(batch in batches()) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(batch.seed);
        let mut perm: Vec<usize> = Vec::new();
        for start in (0..batch.rewards.len()).step_by(batch.g) {
            let mut idx: Vec<usize> = (start..start + batch.g).collect();
            idx.shuffle(&mut rng);
            perm.extend(idx);
        }
        let permute = |xs: &[f64]| perm.iter().map(|&i| xs[i]).collect::<Vec<_>>();
        let rewards = permute(&batch.rewards);
        let lengths: Vec<usize> = perm.iter().map(|&i| batch.lengths[i]).collect();
        let truncated: Vec<bool> = perm.iter().map(|&i| batch.truncated[i]).collect();
        let variants = [
            ("grpo", json!({})),
            ("dapo", json!({"overlong_cache": 60})),
            ("drgrpo", json!({"advantage_clip": 0.3})),
            ("gspo", json!({"scale_rewards": "batch"})),
            ("dgpo", json!({"advantage_norm": "rank", "negative_advantage_scale": 0.5})),
        ];
        for (name, overrides) in variants {
            let cfg = config(name, overrides, batch.g);
            let a = prepare(&cfg, &batch.rewards, &batch.lengths, &batch.truncated).unwrap();
            let b = prepare(&cfg, &rewards, &lengths, &truncated).unwrap();
            for (j, &i) in perm.iter().enumerate() {
                prop_assert!(
                    close(b.advantages[j] as f64, a.advantages[i] as f64),
                    "{name}: row {j} (was {i}): {} vs {}", b.advantages[j], a.advantages[i]
                );
                prop_assert_eq!(b.kept[j], a.kept[i]);
            }
        }
    }

    #[test]
    fn micro_batches_accumulate_the_step_gradient(batch in batches(), parts in 1usize..=4) {
        let (new, old, reference) = synthetic_logps(&batch.lengths, batch.t, 0.4, batch.seed);
        for preset in PRESETS {
            let overrides = if preset.name == "dgpo" {
                json!({"dpo_max_pairs_per_group": 3})
            } else {
                json!({"beta": 0.04, "mask_truncated_completions": true})
            };
            let cfg = config(preset.name, overrides, batch.g);
            let p = prepare(&cfg, &batch.rewards, &batch.lengths, &batch.truncated).unwrap();
            let step = p.all_rows();
            let whole = run(&cfg, &step, &new, &old, Some(&reference), 1);
            let split = run(&cfg, &step, &new, &old, Some(&reference), parts);
            prop_assert!(close(split.loss, whole.loss), "{}: loss {} vs {}", preset.name, split.loss, whole.loss);
            let counts = |d: &lean_grpo::algo::Diagnostics| {
                (d.sequences, d.loss_tokens, d.units, d.clip_high_count, d.clip_low_count, d.n_pairs)
            };
            prop_assert_eq!(counts(&split.diagnostics), counts(&whole.diagnostics));
            for (a, b) in split.grad.iter().flatten().zip(whole.grad.iter().flatten()) {
                prop_assert!(close(*a as f64, *b as f64), "{}: grad {a} vs {b}", preset.name);
            }
        }
    }
}
