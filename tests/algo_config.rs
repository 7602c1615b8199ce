//! Configuration: presets, overrides, the seed keys of docs/algorithms.md §6 and every validation
//! of §5, as the messages a user sees.

use lean_grpo::algo::{
    catalog_json, presets, table, AdvantageNorm, AlgoConfig, BatchShape, DynamicSamplingMetric,
    ImportanceLevel, KlEstimator, LossAgg, ScaleRewards, KEYS,
};
use serde_json::{json, Map, Value};

fn overrides(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn resolve(algorithm: &str, v: Value) -> AlgoConfig {
    AlgoConfig::resolve(
        algorithm,
        &overrides(v),
        BatchShape {
            group_size: 8,
            max_completion_length: 512,
        },
    )
    .unwrap_or_else(|e| panic!("{algorithm}: {e}"))
}

fn error(algorithm: &str, v: Value) -> String {
    match AlgoConfig::resolve(
        algorithm,
        &overrides(v.clone()),
        BatchShape {
            group_size: 8,
            max_completion_length: 512,
        },
    ) {
        Ok(c) => panic!("{v} should be rejected, resolved to {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

#[test]
fn grpo_is_the_base_defaults() {
    let c = resolve("grpo", json!({}));
    assert_eq!(c.algorithm, "grpo");
    assert_eq!((c.group_size, c.max_completion_length), (8, 512));
    assert_eq!(c.scale_rewards, ScaleRewards::Group);
    assert_eq!(c.std_eps, 1e-4);
    assert_eq!(c.advantage_norm, AdvantageNorm::Zscore);
    assert_eq!(c.importance_sampling_level, ImportanceLevel::Token);
    assert_eq!(
        (c.epsilon, c.epsilon_high, c.epsilon_high()),
        (0.2, None, 0.2)
    );
    assert_eq!((c.delta, c.beta, c.log_ratio_clamp), (None, 0.0, 20.0));
    assert_eq!(c.kl_estimator, KlEstimator::K3);
    assert_eq!(c.loss_agg, LossAgg::SeqMeanTokenMean);
    assert!(!c.dynamic_sampling && !c.mask_truncated_completions && !c.use_dpo_loss);
    assert_eq!((c.overlong_cache, c.max_resample_rounds), (0, 3));
    assert_eq!((c.num_iterations, c.num_minibatches), (1, 1));
    assert_eq!(
        (c.dpo_coef, c.dpo_beta, c.dpo_max_pairs_per_group),
        (0.0, 0.1, 0)
    );
    assert!(!c.needs_reference());
}

#[test]
fn dapo_preset_and_its_overlong_window() {
    let c = resolve("dapo", json!({}));
    assert_eq!((c.epsilon, c.epsilon_high()), (0.2, 0.28));
    assert_eq!(c.loss_agg, LossAgg::TokenMean);
    assert!(c.dynamic_sampling && c.mask_truncated_completions);
    assert_eq!(
        c.dynamic_sampling_metric,
        DynamicSamplingMetric::Reward,
        "filters on accuracy, like the paper"
    );
    assert_eq!(
        resolve("dapo", json!({"dynamic_sampling_metric": "shaped_reward"}))
            .dynamic_sampling_metric,
        DynamicSamplingMetric::ShapedReward
    );
    assert_eq!(c.overlong_cache, 102, "floor(512 / 5)");
    assert_eq!(c.beta, 0.0);
    for (l, want) in [(10, 2), (4, 0), (1024, 204), (4096, 819)] {
        let c = AlgoConfig::resolve(
            "dapo",
            &Map::new(),
            BatchShape {
                group_size: 8,
                max_completion_length: l,
            },
        )
        .unwrap();
        assert_eq!(c.overlong_cache, want, "L = {l}");
    }
    assert_eq!(
        resolve("dapo", json!({"overlong_cache": 7})).overlong_cache,
        7
    );
    assert_eq!(
        resolve("dapo", json!({"overlong_cache": 0})).overlong_cache,
        0
    );
}

#[test]
fn drgrpo_gspo_dgpo_presets() {
    for name in ["drgrpo", "dr_grpo", "DrGRPO"] {
        let c = resolve(name, json!({}));
        assert_eq!(c.algorithm, "drgrpo");
        assert_eq!(c.scale_rewards, ScaleRewards::None);
        assert_eq!(c.loss_agg, LossAgg::SeqMeanTokenSumNorm);
    }
    let c = resolve("gspo", json!({}));
    assert_eq!(c.importance_sampling_level, ImportanceLevel::Sequence);
    assert_eq!((c.epsilon, c.epsilon_high()), (3e-4, 4e-4));
    assert_eq!(c.num_minibatches, 4);
    let c = resolve("dgpo", json!({}));
    assert!(c.use_dpo_loss && c.dpo_enabled());
    assert_eq!((c.dpo_coef, c.dpo_beta, c.pairwise_margin), (0.3, 0.1, 0.0));
    assert_eq!(c.dpo_max_pairs_per_group, 0);
    assert!(c.needs_reference());
    assert!(!resolve("dgpo", json!({"dpo_reference_free": true})).needs_reference());
    assert!(!resolve("dgpo", json!({"dpo_coef": 0})).needs_reference());
    assert!(resolve("grpo", json!({"beta": 0.04})).needs_reference());
}

#[test]
fn unknown_algorithm_lists_the_valid_names() {
    let msg = error("ppo", json!({}));
    assert_contains(
        &msg,
        &[
            "unknown algorithm `ppo`",
            "grpo, dapo, drgrpo (alias dr_grpo), gspo, dgpo",
        ],
    );
}

#[test]
fn unknown_key_lists_every_valid_key() {
    let msg = error("grpo", json!({"epsilonhigh": 0.3}));
    assert_contains(
        &msg,
        &["unknown algorithm_config key `epsilonhigh`", "valid keys: "],
    );
    assert_contains(&msg, KEYS);
    assert_eq!(
        KEYS.len(),
        29,
        "docs/algorithms.md §5 has 29 keys besides the batch shape"
    );
}

#[test]
fn range_errors_name_the_key_and_the_allowed_range() {
    let cases = [
        (
            json!({"epsilon": 1.0}),
            "`epsilon` must be a number in [0, 1), got 1.0",
        ),
        (
            json!({"epsilon": -0.1}),
            "`epsilon` must be a number in [0, 1)",
        ),
        (
            json!({"delta": 1.2}),
            "`delta` must be a number > 1 + epsilon_high = 1.2 or null, got 1.2",
        ),
        (
            json!({"epsilon_high": 0.28, "delta": 1.25}),
            "1 + epsilon_high = 1.28",
        ),
        (
            json!({"delta": 0.5}),
            "`delta` must be a number > 1 + epsilon_high",
        ),
        (
            json!({"beta": 0.04, "dpo_reference_free": true}),
            "`beta` must be 0 when `dpo_reference_free` is true",
        ),
        (
            json!({"overlong_cache": 513}),
            "`overlong_cache` must be an integer in [0, max_completion_length = 512], got 513",
        ),
        (
            json!({"dpo_coef": 1.5}),
            "`dpo_coef` must be a number in [0, 1], got 1.5",
        ),
        (
            json!({"dpo_coef": -0.1}),
            "`dpo_coef` must be a number in [0, 1]",
        ),
        (
            json!({"std_eps": 0}),
            "`std_eps` must be a number > 0, got 0",
        ),
        (json!({"dpo_beta": 0.0}), "`dpo_beta` must be a number > 0"),
        (json!({"beta": -1}), "`beta` must be a number ≥ 0"),
        (
            json!({"advantage_clip": 0}),
            "`advantage_clip` must be a number > 0 or null",
        ),
        (
            json!({"negative_advantage_scale": -0.5}),
            "`negative_advantage_scale` must be a number ≥ 0",
        ),
        (
            json!({"log_ratio_clamp": 0}),
            "`log_ratio_clamp` must be a number > 0",
        ),
        (
            json!({"num_iterations": 0}),
            "`num_iterations` must be an integer ≥ 1, got 0",
        ),
        (
            json!({"num_minibatches": 2.5}),
            "`num_minibatches` must be an integer ≥ 1, got 2.5",
        ),
        (
            json!({"max_resample_rounds": -1}),
            "`max_resample_rounds` must be an integer ≥ 0",
        ),
        (
            json!({"scale_rewards": "std"}),
            "`scale_rewards` must be one of group, batch, none, got \"std\"",
        ),
        (
            json!({"loss_agg": "mean_mean"}),
            "one of seq_mean_token_mean, token_mean, seq_mean_token_sum_norm",
        ),
        (
            json!({"kl_estimator": "k2"}),
            "`kl_estimator` must be one of k3, abs, mse",
        ),
        (
            json!({"importance_sampling_level": "seq"}),
            "one of token, sequence",
        ),
        (
            json!({"dynamic_sampling": "yes"}),
            "`dynamic_sampling` must be true or false",
        ),
        (
            json!({"dynamic_sampling_metric": "accuracy"}),
            "`dynamic_sampling_metric` must be one of reward, shaped_reward, got \"accuracy\"",
        ),
        (
            json!({"group_size": 8}),
            "`group_size` is not accepted: the group size is the trainer's: set `train.num_generations`",
        ),
        (
            json!({"max_completion_length": 512}),
            "set `sampling.max_completion_length` (--max-completion-length)",
        ),
        (
            json!({"algorithm": "dapo"}),
            "`algorithm` must be the algorithm being configured (`grpo`)",
        ),
    ];
    for (v, want) in cases {
        let msg = error("grpo", v.clone());
        assert!(msg.contains(want), "{v}: message {msg:?} lacks {want:?}");
    }
    // `delta` is fine above the bound.
    let c = resolve("grpo", json!({"delta": 1.21}));
    assert_eq!(c.delta, Some(1.21));
}

#[test]
fn seed_keys_map_onto_spec_keys() {
    let c = resolve(
        "grpo",
        json!({
            "reduce_loss": "mean",
            "kl_estimator": "schulman",
            "min_group_std": 0.01,
            "advantage_norm": "standard",
            "normalize_advantages": false,
            "is_level": "sequence",
            "clip_high": 0.3,
            "clip_low": 0.1,
            "negative_adv_scale": 0.8,
            "negative_adv_max_is": 2.0,
            "use_unbiased_kl": true,
            "use_asymmetric_clip": true,
            "use_entropy_bonus": false,
        }),
    );
    assert_eq!(c.loss_agg, LossAgg::TokenMean);
    assert_eq!(c.kl_estimator, KlEstimator::K3);
    assert_eq!(c.std_eps, 0.01);
    assert_eq!(c.advantage_norm, AdvantageNorm::Zscore);
    assert_eq!(c.scale_rewards, ScaleRewards::None);
    assert_eq!(c.importance_sampling_level, ImportanceLevel::Sequence);
    assert_eq!((c.epsilon, c.epsilon_high), (0.1, Some(0.3)));
    assert_eq!((c.negative_advantage_scale, c.delta), (0.8, Some(2.0)));
    let c = resolve(
        "drgrpo",
        json!({"max_negative_advantage_is_weight": 3.0, "advantage_norm_method": "rank"}),
    );
    assert_eq!(
        (c.delta, c.advantage_norm),
        (Some(3.0), AdvantageNorm::Rank)
    );
    assert_eq!(
        resolve("drgrpo", json!({"normalize_advantages": true})).scale_rewards,
        ScaleRewards::Group
    );
}

#[test]
fn a_key_given_twice_under_two_names_is_an_error() {
    let msg = error("grpo", json!({"epsilon_high": 0.28, "clip_high": 0.3}));
    assert_contains(
        &msg,
        &["`clip_high`", "`epsilon_high` already sets `epsilon_high`"],
    );
}

#[test]
fn rejected_seed_keys_name_their_replacement() {
    let cases = [
        (
            json!({"ratio_clip_high": 1.5}),
            "key `ratio_clip_high` is not accepted: use `epsilon_high`",
        ),
        (
            json!({"ratio_clip_low": 0.5}),
            "key `ratio_clip_low` is not accepted: use `epsilon`",
        ),
        (
            json!({"reduce_loss": "sum"}),
            "`reduce_loss: \"sum\"` is not accepted",
        ),
        (
            json!({"advantage_norm_method": "winsorized"}),
            "use `rank` or `advantage_clip`",
        ),
        (
            json!({"advantage_normalization_method": "max_min"}),
            "`advantage_normalization_method: \"max_min\"` is not accepted",
        ),
        (json!({"is_level": "geometric_mean"}), "use `sequence`"),
        (
            json!({"importance_sampling_level": "average"}),
            "never implemented",
        ),
        (
            json!({"num_preference_pairs": 4}),
            "use `dpo_max_pairs_per_group`",
        ),
        (
            json!({"use_population_norm": true}),
            "`dynamic_sampling: true`",
        ),
        (json!({"use_consensus": true}), "`scale_rewards: batch`"),
        (json!({"logprob_min": -20}), "`log_ratio_clamp`"),
        (json!({"gamma": 0.99}), "no critic"),
        (json!({"truncated_is": 2.0}), "not accepted"),
        (
            json!({"use_entropy_bonus": true}),
            "no entropy bonus yet (`entropy_coef` must be 0)",
        ),
        (json!({"learning_rate": 1e-5}), "`train.learning_rate`"),
    ];
    for (v, want) in cases {
        let msg = error("grpo", v.clone());
        assert!(msg.contains(want), "{v}: message {msg:?} lacks {want:?}");
        assert!(msg.contains("see docs/algorithms.md §6"), "{v}: {msg:?}");
    }
}

#[test]
fn the_effective_config_serialises_and_resolves_back() {
    for p in presets::PRESETS {
        let c = resolve(p.name, json!({"beta": 0.01, "advantage_clip": 3.0}));
        let mut saved = serde_json::to_value(&c).unwrap();
        assert_eq!(saved["algorithm"], p.name);
        // G and L_max are the batch shape, given apart from the keys.
        let shape = saved.as_object_mut().unwrap();
        assert_eq!(shape.remove("group_size"), Some(8.into()));
        assert_eq!(shape.remove("max_completion_length"), Some(512.into()));
        assert_eq!(
            saved["epsilon_high"],
            c.epsilon_high.map_or(Value::Null, Value::from)
        );
        let back = AlgoConfig::resolve(p.name, &overrides(saved), c.shape()).unwrap();
        assert_eq!(back, c);
    }
}

#[test]
fn table_has_one_row_per_algorithm_within_120_columns() {
    let t = table();
    for line in t.lines() {
        assert!(line.chars().count() <= 120, "line too wide: {line:?}");
    }
    assert!(t.starts_with("name"), "{t}");
    assert!(t.contains("(dr_grpo)"), "alias missing:\n{t}");
    for name in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        assert!(
            t.lines().any(|l| l.starts_with(name)),
            "no row starts with {name}:\n{t}"
        );
    }
    assert_contains(
        &t,
        &[
            "0.2 / 0.28",
            "0.0003 /",
            "per sequence",
            "token_mean",
            "dpo_coef 0.3",
        ],
    );
    assert_contains(&t, &["overlong_cache", "⌊L_max/5⌋", "num_minibatches 4"]);
}

#[test]
fn catalog_json_lists_all_five_with_their_preset_overrides() {
    let cat = catalog_json();
    let algos = cat["algorithms"].as_array().unwrap();
    let names: Vec<&str> = algos.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["grpo", "dapo", "drgrpo", "gspo", "dgpo"]);
    assert_eq!(algos[0]["overrides"], json!({}));
    assert_eq!(
        algos[1]["overrides"],
        json!({
            "epsilon_high": 0.28,
            "loss_agg": "token_mean",
            "dynamic_sampling": true,
            "mask_truncated_completions": true,
            "overlong_cache": "floor(max_completion_length / 5)",
        })
    );
    assert_eq!(algos[1]["resolved"]["overlong_cache"], 102);
    assert_eq!(algos[2]["aliases"], json!(["dr_grpo"]));
    assert_eq!(
        algos[2]["overrides"],
        json!({"scale_rewards": "none", "loss_agg": "seq_mean_token_sum_norm"})
    );
    assert_eq!(algos[3]["overrides"]["num_minibatches"], 4);
    assert_eq!(
        algos[3]["overrides"]["importance_sampling_level"],
        "sequence"
    );
    assert_eq!(
        algos[4]["overrides"],
        json!({"use_dpo_loss": true, "dpo_coef": 0.3})
    );
    for a in algos {
        // The keys, the algorithm's name and the batch shape (G, L_max).
        assert_eq!(a["resolved"].as_object().unwrap().len(), KEYS.len() + 3);
        assert!(!a["description"].as_str().unwrap().is_empty());
    }
}
