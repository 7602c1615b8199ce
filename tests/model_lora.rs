//! LoRA and the training path: adapters start as the identity, log-prob gradients match finite
//! differences, every trainable tensor receives a gradient, one AdamW step moves the adapters
//! and nothing frozen, and the custom ops' gradients equal candle's autograd on the plain path.

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use lean_grpo::model::adapter::save_adapter;
use lean_grpo::model::decoder::SampleWeights;
use lean_grpo::model::load::load_dir;
use lean_grpo::model::ops::{
    frozen_matmul, lm_head_logprobs_tiled, selective_log_softmax, LogitTiles,
};
use lean_grpo::model::{argmax, GenerateOptions, LoraOptions, ModelOptions, Policy};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::sync::Arc;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn policy(name: &str, dtype: DType, lora: &LoraOptions) -> Policy {
    let files = load_dir(&dir(name), &Device::Cpu, dtype).unwrap();
    Policy::from_files(files, lora, &Device::Cpu, dtype, 11).unwrap()
}

fn random(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Gives every adapter a random non-zero `B` so that `A` matters too.
fn randomize_b(p: &Policy, scale: f64, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<_> = p
        .lora_vars()
        .into_iter()
        .map(|(name, a, b)| {
            let a = a.as_tensor().clone();
            (name, a, random(b.dims(), scale, &mut rng, b.dtype()))
        })
        .collect();
    p.set_lora_weights(&w).unwrap();
}

/// Prompts and their completions, row by row.
type Rows = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Prompts of different lengths, two of them shared by two rows (as a group shares one), and
/// completions of 0 to 6 tokens.
fn batch() -> Rows {
    let a = vec![295, 266, 269, 62, 15];
    let c = vec![5, 6, 7];
    let prompts = vec![a.clone(), vec![72, 77], a, c.clone(), c];
    let completions = vec![
        vec![62, 17, 256, 262],
        vec![67, 315, 280, 258, 220, 86],
        vec![17, 62],
        vec![],
        vec![9],
    ];
    (prompts, completions)
}

/// Distinct prompts that share a long start (instructions and preamble, then the statement),
/// which the log-prob pass computes once for all rows (src/model/prefix.rs).
fn preamble_batch() -> Rows {
    let prompt = after_preamble;
    let prompts = vec![
        prompt(&[90, 91]),
        prompt(&[90]),
        prompt(&[]),
        prompt(&[12, 13]),
    ];
    let completions = vec![vec![62, 17, 256], vec![67, 315], vec![17, 62, 5, 9], vec![]];
    (prompts, completions)
}

/// A prompt: the same instructions and preamble as every other, then `end` (the statement).
fn after_preamble(end: &[u32]) -> Vec<u32> {
    let preamble = [295, 266, 269, 62, 15, 72, 77, 5, 6, 7, 300, 41, 8, 19];
    [&preamble[..], end].concat()
}

/// Two groups of rows whose prompts share a long start, as an RL step of two theorems: the pass
/// computes the common start once, then each distinct prompt's rest once, then the completions
/// (src/model/prefix.rs: 14 + 2 × 2 + 5 × 3 positions instead of 2 × 16 + 5 × 3 per prompt).
fn groups_batch() -> Rows {
    let (a, b) = (after_preamble(&[90, 91]), after_preamble(&[12]));
    let prompts = vec![a.clone(), a.clone(), a, b.clone(), b];
    let completions = vec![
        vec![62, 17, 256, 9],
        vec![67],
        vec![17, 62],
        vec![],
        vec![5, 9, 300],
    ];
    (prompts, completions)
}

/// `Σ w ⊙ logp` with fixed pseudo-random weights (zero weight on padding is not assumed).
fn objective(p: &Policy, grad: bool) -> Tensor {
    let (prompts, completions) = batch();
    let logp = p.logprobs(&prompts, &completions, 0.8, grad, true).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = random(logp.dims(), 1.0, &mut rng, logp.dtype());
    (logp * w).unwrap().sum_all().unwrap()
}

#[test]
fn fresh_adapters_are_the_identity_and_switch_off() {
    let lora = LoraOptions {
        r: 4,
        ..LoraOptions::default()
    };
    let p = policy("tiny-qwen2", DType::F32, &lora);
    let rows = vec![vec![295, 266, 269, 62, 15, 62, 17]];
    let base = p.logits(&rows, false).unwrap();
    let fresh = p.logits(&rows, true).unwrap();
    assert_eq!(
        base.to_vec3::<f32>().unwrap(),
        fresh.to_vec3::<f32>().unwrap()
    );
    // PEFT init: A uniform in ±1/√in, B zero.
    for (name, a, b) in p.lora_vars() {
        let bound = 1.0 / (a.dim(1).unwrap() as f32).sqrt();
        let a = a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a.iter().all(|x| x.abs() <= bound), "{name}");
        assert!(a.iter().any(|&x| x != 0.0), "{name}");
        assert_eq!(
            b.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
    randomize_b(&p, 0.3, 1);
    let adapted = p.logits(&rows, true).unwrap();
    let diff = (adapted - &base)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff > 1e-3,
        "a non-zero B must change the logits (diff {diff})"
    );
    let off = p.logits(&rows, false).unwrap();
    assert_eq!(
        off.to_vec3::<f32>().unwrap(),
        base.to_vec3::<f32>().unwrap()
    );
}

#[test]
fn adapters_cover_the_target_modules_with_hf_names() {
    let lora = LoraOptions {
        r: 2,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        ..LoraOptions::default()
    };
    let p = policy("tiny-qwen3", DType::F32, &lora);
    let names: Vec<String> = p.lora_vars().into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    let (_, a, b) = &p.lora_vars()[0];
    // Qwen3 tiny: hidden 64, 4 heads of head_dim 32.
    assert_eq!((a.dims(), b.dims()), (&[2, 64][..], &[128, 2][..]));
    let bad = LoraOptions {
        target_modules: vec!["qkv".into()],
        ..LoraOptions::default()
    };
    let files = load_dir(&dir("tiny-qwen3"), &Device::Cpu, DType::F32).unwrap();
    let err = Policy::from_files(files, &bad, &Device::Cpu, DType::F32, 0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("unknown module `qkv`"), "{err}");
}

#[test]
fn logprobs_are_log_softmax_of_logits_at_the_completion_tokens() {
    let p = policy(
        "tiny-llama",
        DType::F32,
        &LoraOptions {
            r: 4,
            ..LoraOptions::default()
        },
    );
    randomize_b(&p, 0.2, 2);
    let (prompts, completions) = batch();
    let t = 0.7;
    let lp = p.logprobs(&prompts, &completions, t, false, true).unwrap();
    assert_eq!(lp.dims(), &[5, 6]);
    let lp = lp.to_vec2::<f32>().unwrap();
    for (i, (pr, c)) in prompts.iter().zip(&completions).enumerate() {
        let row = [pr.as_slice(), c].concat();
        let logits = p.logits(&[row], true).unwrap().i(0).unwrap();
        let ls = candle_nn::ops::log_softmax(&(logits / t).unwrap(), D::Minus1).unwrap();
        let ls = ls.to_vec2::<f32>().unwrap();
        for j in 0..6 {
            let want = if j < c.len() {
                ls[pr.len() - 1 + j][c[j] as usize]
            } else {
                0.0
            };
            assert!(
                (lp[i][j] - want).abs() < 1e-5,
                "row {i} token {j}: {} vs {want}",
                lp[i][j]
            );
        }
    }
    // With gradient: the same values.
    let lpg = p
        .logprobs(&prompts, &completions, t, true, true)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(lpg, lp);
}

#[test]
fn rows_sharing_a_prompt_match_rows_computed_alone_with_gradients() {
    rows_sharing_prompt_tokens_match_rows_alone(batch());
}

#[test]
fn prompts_sharing_their_start_match_rows_computed_alone_with_gradients() {
    rows_sharing_prompt_tokens_match_rows_alone(preamble_batch());
}

#[test]
fn groups_whose_prompts_share_their_start_match_rows_computed_alone_with_gradients() {
    rows_sharing_prompt_tokens_match_rows_alone(groups_batch());
}

fn rows_sharing_prompt_tokens_match_rows_alone((prompts, completions): Rows) {
    let p = policy(
        "tiny-qwen3",
        DType::F64,
        &LoraOptions {
            r: 4,
            ..LoraOptions::default()
        },
    );
    randomize_b(&p, 0.2, 4);
    let vars = trainable_vars(&p);
    let weights: Vec<f64> = (0..prompts.len()).map(|i| 1.0 + i as f64).collect();
    let weighted = |lp: Tensor, w: f64| (lp.sum_all().unwrap() * w).unwrap();
    let shared = p.logprobs(&prompts, &completions, 0.9, true, true).unwrap();
    let shared_loss = (0..prompts.len())
        .map(|i| weighted(shared.get(i).unwrap(), weights[i]))
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let shared_grads = shared_loss.backward().unwrap();
    let mut alone_loss = None::<Tensor>;
    for i in 0..prompts.len() {
        let lp = p
            .logprobs(&prompts[i..=i], &completions[i..=i], 0.9, true, true)
            .unwrap();
        let row = lp.get(0).unwrap();
        let width = completions[i].len();
        assert!(
            width == 0
                || max_diff(
                    &row.narrow(0, 0, width).unwrap(),
                    &shared.get(i).unwrap().narrow(0, 0, width).unwrap()
                ) < 1e-10,
            "row {i}: log-probs differ"
        );
        let l = weighted(row, weights[i]);
        alone_loss = Some(match alone_loss {
            Some(acc) => (acc + l).unwrap(),
            None => l,
        });
    }
    let alone_grads = alone_loss.unwrap().backward().unwrap();
    for (k, v) in vars.iter().enumerate() {
        let (a, b) = (
            shared_grads.get(v.as_tensor()).expect("shared gradient"),
            alone_grads.get(v.as_tensor()).expect("gradient"),
        );
        assert!(
            max_diff(a, b) < 1e-10,
            "trainable tensor {k}: gradients differ"
        );
    }
}

#[test]
fn logprob_gradients_match_finite_differences() {
    let lora = LoraOptions {
        r: 2,
        lora_alpha: 4.0,
        ..LoraOptions::default()
    };
    let p = policy("tiny-qwen2", DType::F64, &lora);
    randomize_b(&p, 0.3, 5);
    let vars = trainable_vars(&p);
    let grads = objective(&p, true).backward().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Directional derivative along a random direction, for all adapters at once and for
    // single adapters on different paths (attention input, MLP output, last layer).
    let all: Vec<usize> = (0..vars.len()).collect();
    let n = vars.len();
    for subset in [all, vec![0], vec![1], vec![n - 1], vec![n / 2 + 1]] {
        let dirs: Vec<(usize, Tensor)> = subset
            .iter()
            .map(|&i| (i, random(vars[i].dims(), 1.0, &mut rng, DType::F64)))
            .collect();
        let analytic: f64 = dirs
            .iter()
            .map(|(i, d)| {
                let g = grads.get(vars[*i].as_tensor()).expect("gradient present");
                (g * d)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum();
        let eps = 1e-5;
        let at = |s: f64| {
            let saved: Vec<Tensor> = dirs
                .iter()
                .map(|(i, _)| vars[*i].as_tensor().copy().unwrap())
                .collect();
            for ((i, d), orig) in dirs.iter().zip(&saved) {
                vars[*i].set(&(orig + (d * s).unwrap()).unwrap()).unwrap();
            }
            let v = objective(&p, false).to_scalar::<f64>().unwrap();
            for ((i, _), orig) in dirs.iter().zip(&saved) {
                vars[*i].set(orig).unwrap();
            }
            v
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let rel = (numeric - analytic).abs() / analytic.abs().max(1e-3);
        assert!(
            rel < 1e-6,
            "vars {subset:?}: analytic {analytic}, numeric {numeric}"
        );
        assert!(
            analytic.abs() > 1e-3,
            "vars {subset:?}: degenerate direction {analytic}"
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
        let p = policy(
            name,
            DType::F32,
            &LoraOptions {
                r: 4,
                ..LoraOptions::default()
            },
        );
        // Fresh adapters (B = 0): every B gets a gradient, every A exactly none (PEFT's init).
        let grads = objective(&p, true).backward().unwrap();
        let norm = |grads: &candle_core::backprop::GradStore, v: &Var| {
            grads.get(v.as_tensor()).map_or(0.0, |g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
        };
        for (n, a, b) in p.lora_vars() {
            assert!(norm(&grads, &b) > 0.0, "{name} {n}: B has no gradient");
            assert_eq!(norm(&grads, &a), 0.0, "{name} {n}: A moves while B = 0");
        }
        randomize_b(&p, 0.1, 4);
        let grads = objective(&p, true).backward().unwrap();
        for (i, v) in trainable_vars(&p).iter().enumerate() {
            assert!(
                norm(&grads, v) > 0.0,
                "{name}: trainable tensor {i} has no gradient"
            );
        }
    }
}

#[test]
fn frozen_matmul_backward_equals_autograd_without_a_weight_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 10 rows take the swapped (W · xᵀ) path, 60 rows the direct one.
    for rows in [5, 30] {
        let x = Var::from_tensor(&random(&[2, rows, 7], 1.0, &mut rng, DType::F64)).unwrap();
        let w = random(&[3, 7], 1.0, &mut rng, DType::F64);
        let r = random(&[2, rows, 3], 1.0, &mut rng, DType::F64);
        let ours = frozen_matmul(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let d = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = (plain * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let a = g_ours.get(x.as_tensor()).unwrap();
        let b = g_plain.get(x.as_tensor()).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{rows} rows: dL/dx differs by {d}");
        assert!(
            g_ours.get(&w).is_none(),
            "the frozen weight must not get a gradient"
        );
    }
}

fn plain_logp(logits: &Tensor, targets: &Tensor, t: f64) -> Tensor {
    let ls = candle_nn::ops::log_softmax(&(logits / t).unwrap(), D::Minus1).unwrap();
    ls.gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn selective_log_softmax_matches_autograd() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, v, t) = (9, 37, 0.7);
    let logits = Var::from_tensor(&random(&[n, v], 4.0, &mut rng, DType::F32)).unwrap();
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let g = random(&[n], 1.0, &mut rng, DType::F32);
    let ours = selective_log_softmax(logits.as_tensor(), &targets, t).unwrap();
    let plain = plain_logp(logits.as_tensor(), &targets, t);
    assert!(max_diff(&ours, &plain) < 1e-5);
    let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let d = max_diff(
        ga.get(logits.as_tensor()).unwrap(),
        gb.get(logits.as_tensor()).unwrap(),
    );
    assert!(d < 1e-6, "gradient differs by {d}");
    let err = selective_log_softmax(logits.as_tensor(), &targets, 0.0).unwrap_err();
    assert!(err.to_string().contains("temperature"), "{err}");
}

#[test]
fn fused_lm_head_logprobs_match_autograd_across_tiles() {
    let (n, d, v, t) = (150, 8, 29, 1.3);
    let keep = 1 << 30;
    let tiles = |rows, vocab, keep_bytes| LogitTiles {
        rows,
        vocab,
        keep_bytes,
    };
    for (dtype, tiles) in [
        // Four row blocks (the last partial) times five vocabulary slices (the last partial),
        // logits recomputed in the backward, then kept from the forward.
        (DType::F32, tiles(48, 7, 0)),
        (DType::F32, tiles(48, 7, keep)),
        // One slice per row; one tile for everything; the default tiling.
        (DType::F32, tiles(150, 1, keep)),
        (DType::F32, tiles(1024, 29, keep)),
        (DType::F32, LogitTiles::for_shape(n, v)),
        // f64 runs the tensor-op path (the one other devices take).
        (DType::F64, tiles(48, 7, 0)),
        (DType::F64, tiles(48, 7, keep)),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let hidden = Var::from_tensor(&random(&[n, d], 1.0, &mut rng, dtype)).unwrap();
        let w = random(&[v, d], 1.0, &mut rng, dtype);
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let g = random(&[n], 1.0, &mut rng, dtype);
        let ours = lm_head_logprobs_tiled(hidden.as_tensor(), &w, &targets, t, tiles).unwrap();
        let plain = plain_logp(
            &hidden.as_tensor().matmul(&w.t().unwrap()).unwrap(),
            &targets,
            t,
        );
        let d_value = max_diff(&ours, &plain);
        assert!(
            d_value < 1e-5,
            "{dtype:?} {tiles:?}: log-probs differ by {d_value}"
        );
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let d_grad = max_diff(
            ga.get(hidden.as_tensor()).unwrap(),
            gb.get(hidden.as_tensor()).unwrap(),
        );
        assert!(
            d_grad < 1e-5,
            "{dtype:?} {tiles:?}: gradient differs by {d_grad}"
        );
        assert!(ga.get(&w).is_none());
    }
    // A target outside the vocabulary is an error, also when the tiles are slices.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let hidden = random(&[2, d], 1.0, &mut rng, DType::F32);
    let w = random(&[v, d], 1.0, &mut rng, DType::F32);
    let bad = Tensor::new(&[3u32, v as u32], &Device::Cpu).unwrap();
    let err = lm_head_logprobs_tiled(&hidden, &w, &bad, 1.0, tiles(1, 7, keep)).unwrap_err();
    assert!(
        err.to_string().contains("outside the vocabulary of 29"),
        "{err}"
    );
}

#[test]
fn a_saved_adapter_reloads_through_model_options() {
    let lora = LoraOptions {
        r: 4,
        ..LoraOptions::default()
    };
    let p = policy("tiny-qwen2", DType::F32, &lora);
    randomize_b(&p, 0.3, 8);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    save_adapter(&out, &p.adapter_weights().unwrap(), &lora, "tiny-qwen2").unwrap();
    let model = ModelOptions {
        model: dir("tiny-qwen2").display().to_string(),
        device: lean_grpo::model::device::DeviceSpec::Cpu,
        adapter: Some(out.display().to_string()),
        ..ModelOptions::default()
    };
    // Another seed: the fresh adapters differ, the loaded ones must not.
    let q = Policy::load(&model, &lora, 99).unwrap();
    let rows = vec![vec![295, 266, 269, 62, 15, 62, 17]];
    let want = p.logits(&rows, true).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(
        q.logits(&rows, true).unwrap().to_vec3::<f32>().unwrap(),
        want
    );
    // A run configured with another rank refuses the adapter instead of guessing.
    let other = LoraOptions {
        r: 8,
        ..LoraOptions::default()
    };
    let err = format!("{:#}", Policy::load(&model, &other, 0).err().unwrap());
    assert!(err.contains("rank"), "{err}");
}

#[test]
fn policy_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
}

#[test]
fn lora_dropout_only_acts_on_gradient_passes_and_is_seeded() {
    let lora = LoraOptions {
        r: 4,
        lora_dropout: 0.5,
        ..LoraOptions::default()
    };
    let (prompts, completions) = batch();
    let run = || {
        let p = policy("tiny-qwen2", DType::F32, &lora);
        randomize_b(&p, 0.3, 1);
        let eval = p
            .logprobs(&prompts, &completions, 1.0, false, true)
            .unwrap();
        let train = p.logprobs(&prompts, &completions, 1.0, true, true).unwrap();
        (
            eval.to_vec2::<f32>().unwrap(),
            train.to_vec2::<f32>().unwrap(),
        )
    };
    let (eval, train) = run();
    assert_ne!(eval, train, "dropout 0.5 must change a training pass");
    assert_eq!(run(), (eval, train), "same seed, same dropout masks");
}

/// Logits of one 5-token prefill step through `merged` sampling weights (or the adapter path).
fn step_logits(p: &Policy, adapters: bool, merged: Option<&SampleWeights>) -> Tensor {
    let dec = p.decoder();
    let mut cache = dec.new_cache(1, 8).unwrap();
    let tokens = Tensor::new(&[[295u32, 266, 269, 62, 15]], &Device::Cpu).unwrap();
    let positions = Tensor::new(&[[0u32, 1, 2, 3, 4]], &Device::Cpu).unwrap();
    dec.forward_step(&tokens, &positions, &[0], &mut cache, adapters, merged)
        .unwrap()
}

#[test]
fn a_decoding_step_without_tokens_is_rejected() {
    let p = policy("tiny-qwen2", DType::F32, &LoraOptions::default());
    let dec = p.decoder();
    let mut cache = dec.new_cache(1, 8).unwrap();
    let none = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    let err = dec
        .forward_step(&none, &none, &[0], &mut cache, true, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one token"), "{err}");
    assert_eq!(cache.len(), 0, "nothing was written");
}

#[test]
fn merged_sampling_weights_match_the_adapter_path_and_follow_the_adapters() {
    let lora = LoraOptions {
        r: 4,
        ..LoraOptions::default()
    };
    for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
        let mut p = policy(name, DType::F32, &lora);
        randomize_b(&p, 0.5, 3);
        let exact = step_logits(&p, true, None);
        let base = step_logits(&p, false, None);
        assert!(
            max_diff(&exact, &base) > 1e-3,
            "{name}: the adapters must matter"
        );
        let dec = p.decoder();
        let f32_merged = dec.sample_weights(DType::F32, true).unwrap();
        let f16_merged = dec.sample_weights(DType::F16, true).unwrap();
        let base_merged = dec.sample_weights(DType::F32, false).unwrap();
        let d32 = max_diff(&step_logits(&p, true, Some(&f32_merged)), &exact);
        let d16 = max_diff(&step_logits(&p, true, Some(&f16_merged)), &exact);
        let d_base = max_diff(&step_logits(&p, false, Some(&base_merged)), &base);
        assert!(d32 < 1e-4, "{name}: f32 merged weights differ by {d32}");
        assert!(d_base < 1e-4, "{name}: base weights differ by {d_base}");
        // f16 rounds (so the copy is really read) but stays close.
        assert!(
            d16 > 0.0 && d16 < 2e-2,
            "{name}: f16 merged weights differ by {d16}"
        );

        // Greedy sampling through merged f32 weights gives the adapter path's tokens, also
        // after the adapters change: the copy is rebuilt per call, never stale.
        let prompts = vec![vec![295, 266, 269, 62, 15], vec![72, 77]];
        let opts = GenerateOptions {
            max_new_tokens: 12,
            eos_ids: vec![],
            adapters: true,
        };
        let greedy = |p: &Policy| -> Vec<Vec<u32>> {
            p.generate(
                &prompts,
                2,
                &opts,
                &mut |rows: &[Vec<f32>]| Ok(rows.iter().map(|l| argmax(l)).collect()),
                &mut |_: &[u32]| false,
            )
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect()
        };
        for seed in [3, 4] {
            randomize_b(&p, 0.5, seed);
            p.set_sample_dtype(None).unwrap();
            let want = greedy(&p);
            p.set_sample_dtype(Some(DType::F32)).unwrap();
            assert_eq!(greedy(&p), want, "{name}, adapters from seed {seed}");
        }

        // The merged copy is kept while the adapters stay the same, and merged again when
        // they change or when a gradient pass (before an optimizer step) has freed it.
        let kept = p.sampling_weights(true).unwrap().unwrap();
        assert!(Arc::ptr_eq(
            &kept,
            &p.sampling_weights(true).unwrap().unwrap()
        ));
        randomize_b(&p, 0.5, 5);
        let changed = p.sampling_weights(true).unwrap().unwrap();
        assert!(
            !Arc::ptr_eq(&kept, &changed),
            "{name}: stale copy after new adapters"
        );
        p.logprobs(&prompts, &prompts, 1.0, true, true).unwrap();
        let after_grad = p.sampling_weights(true).unwrap().unwrap();
        assert!(
            !Arc::ptr_eq(&changed, &after_grad),
            "{name}: kept through a gradient pass"
        );
        let base = p.sampling_weights(false).unwrap().unwrap();
        assert!(
            !Arc::ptr_eq(&after_grad, &base),
            "{name}: base and adapted copies differ"
        );
        p.set_sample_dtype(None).unwrap();
        assert!(p.sampling_weights(true).unwrap().is_none());
    }
}

#[test]
fn sample_dtype_must_be_the_model_dtype_or_f16_on_the_cpu() {
    let mut p = policy("tiny-qwen2", DType::F32, &LoraOptions::default());
    p.set_sample_dtype(Some(DType::F16)).unwrap();
    let err = p
        .set_sample_dtype(Some(DType::BF16))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--sample-dtype bf16") && err.contains("model dtype (f32)"),
        "{err}"
    );
    // A dtype that does not exist fails when the configuration is read, naming the key.
    let flags = [lean_grpo::config::Override::new(
        "model",
        "sample_dtype",
        "f8",
    )];
    let err = lean_grpo::config::Config::load(None, &flags, None)
        .expect_err("f8 is not a sampling dtype")
        .to_string();
    assert!(
        err.contains("`model.sample_dtype`")
            && err.contains("`f8`: expected `f32`, `bf16` or `f16`"),
        "{err}"
    );
}

/// The one-node LoRA linear (taken above 16 rows on the CPU) against its definition,
/// `x·Wᵀ + b + s·((x∘mask)·Aᵀ)·Bᵀ` in plain autograd ops, with dropout on: values and the
/// gradients w.r.t. `x`, `A` and `B`. At or below 16 rows the composed path runs; it must give
/// the same.
#[test]
fn lora_linear_with_dropout_matches_its_definition_with_gradients() {
    use lean_grpo::model::lora::Pass;
    use std::sync::Mutex;
    let (inp, out, r, p, scale) = (24, 20, 4, 0.3, 2.0);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let w = random(&[out, inp], 0.5, &mut rng, DType::F64);
    let bias = random(&[out], 0.5, &mut rng, DType::F64);
    for rows in [40, 12] {
        let a = Var::from_tensor(&random(&[r, inp], 0.5, &mut rng, DType::F64)).unwrap();
        let b = Var::from_tensor(&random(&[out, r], 0.5, &mut rng, DType::F64)).unwrap();
        let x = Var::from_tensor(&random(&[rows, inp], 1.0, &mut rng, DType::F64)).unwrap();
        let lin = dense_lora_linear(&w, &bias, (&a, &b), scale, p);
        let seed = 5;
        let dropout_rng = Mutex::new(ChaCha8Rng::seed_from_u64(seed));
        let pass = Pass {
            adapters: true,
            grad: true,
            dropout_rng: Some(&dropout_rng),
        };
        let y = lin.forward(x.as_tensor(), &pass).unwrap();
        // The same mask, drawn as the layer draws it: one uniform per input element.
        let mut mask_rng = ChaCha8Rng::seed_from_u64(seed);
        let mask: Vec<f64> = (0..rows * inp)
            .map(|_| {
                if mask_rng.random::<f64>() < p {
                    0.0
                } else {
                    1.0 / (1.0 - p)
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rows, inp), &Device::Cpu).unwrap();
        let xt = x.as_tensor();
        let want = (xt
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            + ((xt * &mask)
                .unwrap()
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                * scale)
                .unwrap())
        .unwrap();
        assert!(
            max_diff(&y, &want) < 1e-12,
            "{rows} rows: values differ by {}",
            max_diff(&y, &want)
        );
        let weights = random(&[rows, out], 1.0, &mut rng, DType::F64);
        let got = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let exp = (&want * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, t) in [("x", xt), ("A", a.as_tensor()), ("B", b.as_tensor())] {
            let d = max_diff(got.get(t).unwrap(), exp.get(t).unwrap());
            assert!(
                d < 1e-12,
                "{rows} rows: gradient w.r.t. {name} differs by {d}"
            );
        }
    }
}

/// A linear layer with dense frozen weight `w`, `bias` and the adapter `(A, B)`.
fn dense_lora_linear(
    w: &Tensor,
    bias: &Tensor,
    (a, b): (&Var, &Var),
    scale: f64,
    dropout: f64,
) -> lean_grpo::model::lora::LoraLinear {
    use lean_grpo::model::lora::{LoraLinear, LoraPair};
    use lean_grpo::model::quant::Frozen;
    let adapter = LoraPair {
        a: a.clone(),
        b: b.clone(),
        scale,
        dropout,
    };
    LoraLinear::new(Frozen::Dense(w.clone()), Some(bias.clone()), Some(adapter))
}

/// The fused down projection of the gated MLP, `forward_swiglu`, keeps `gate` and `up` instead
/// of their activation and recomputes it in the backward: its values and its gradients w.r.t.
/// `gate`, `up`, `A` and `B` are those of the definition `(silu(gate)·up)·Wᵀ + b + ((silu(gate)·up)·Aᵀ)·Bᵀ·s`,
/// fused (40 rows) and composed (12 rows, and with dropout on, where it takes `forward`).
#[test]
fn lora_linear_of_a_swiglu_matches_its_definition_with_gradients() {
    use lean_grpo::model::lora::Pass;
    use std::sync::Mutex;
    let (inp, out, r, scale) = (24, 20, 4, 2.0);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let w = random(&[out, inp], 0.5, &mut rng, DType::F64);
    let bias = random(&[out], 0.5, &mut rng, DType::F64);
    let dropout_rng = Mutex::new(ChaCha8Rng::seed_from_u64(1));
    for (rows, dropout) in [(40, 0.0), (12, 0.0), (40, 0.3)] {
        let mut var =
            |shape: &[usize]| Var::from_tensor(&random(shape, 1.0, &mut rng, DType::F64)).unwrap();
        let (a, b) = (var(&[r, inp]), var(&[out, r]));
        let (gate, up) = (var(&[rows, inp]), var(&[rows, inp]));
        let lin = dense_lora_linear(&w, &bias, (&a, &b), scale, dropout);
        let pass = Pass {
            adapters: true,
            grad: true,
            dropout_rng: Some(&dropout_rng),
        };
        let (g, u) = (gate.as_tensor(), up.as_tensor());
        let act = (g.silu().unwrap() * u).unwrap();
        let want = if dropout > 0.0 {
            // Dropout draws a mask: the reference is `forward` from the same RNG state.
            let state = dropout_rng.lock().unwrap().clone();
            let y = lin.forward(&act, &pass).unwrap();
            *dropout_rng.lock().unwrap() = state;
            y
        } else {
            let low = act.matmul(&a.as_tensor().t().unwrap()).unwrap();
            let branch = (low.matmul(&b.as_tensor().t().unwrap()).unwrap() * scale).unwrap();
            let base = act.matmul(&w.t().unwrap()).unwrap();
            (base.broadcast_add(&bias).unwrap() + branch).unwrap()
        };
        let y = lin.forward_swiglu(g, u, &pass).unwrap();
        let case = format!("{rows} rows, dropout {dropout}");
        assert!(
            max_diff(&y, &want) < 1e-12,
            "{case}: values differ by {}",
            max_diff(&y, &want)
        );
        let weights = random(&[rows, out], 1.0, &mut rng, DType::F64);
        let grads = |y: &Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (got, exp) = (grads(&y), grads(&want));
        let named = [
            ("gate", g),
            ("up", u),
            ("A", a.as_tensor()),
            ("B", b.as_tensor()),
        ];
        for (name, t) in named {
            let d = max_diff(got.get(t).unwrap(), exp.get(t).unwrap());
            assert!(d < 1e-12, "{case}: gradient w.r.t. {name} differs by {d}");
        }
    }
}

/// The bits of a tensor, for exact before/after comparisons.
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn one_adamw_step_moves_every_adapter_tensor_and_nothing_frozen() {
    use lean_grpo::config::TrainOptions;
    use lean_grpo::model::optim::{Optimizer, ScheduleKind};
    let train = TrainOptions {
        learning_rate: 1e-3,
        lr_scheduler_type: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        ..TrainOptions::default()
    };
    let rows = vec![vec![295, 266, 269, 62, 15, 17], vec![72, 77, 67]];
    for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
        let p = policy(
            name,
            DType::F32,
            &LoraOptions {
                r: 4,
                ..LoraOptions::default()
            },
        );
        // B ≠ 0, so that A gets a gradient too.
        randomize_b(&p, 0.1, 6);
        let frozen = |p: &Policy| -> Vec<(String, Vec<u32>)> {
            let dec = p.decoder();
            let mut all: Vec<_> = dec
                .linears()
                .into_iter()
                .map(|(n, lin)| (n, bits(&lin.weight().to_dense(DType::F32).unwrap())))
                .collect();
            all.push(("lm_head".into(), bits(dec.lm_head())));
            // Embeddings, norms and biases: the base model's logits, bit for bit.
            all.push(("base logits".into(), bits(&p.logits(&rows, false).unwrap())));
            all
        };
        let adapters = |p: &Policy| -> Vec<(String, Vec<u32>, Vec<u32>)> {
            p.lora_vars()
                .into_iter()
                .map(|(n, a, b)| (n, bits(a.as_tensor()), bits(b.as_tensor())))
                .collect()
        };
        let (frozen_before, adapters_before) = (frozen(&p), adapters(&p));
        let adapted_before = bits(&p.logits(&rows, true).unwrap());

        let mut optimizer = Optimizer::new(&p.lora_vars(), &train.optimizer(), 1).unwrap();
        let mut grads = objective(&p, true).backward().unwrap();
        optimizer.step(&mut grads, train.max_grad_norm).unwrap();

        for ((n, before), (_, after)) in frozen_before.iter().zip(frozen(&p)) {
            assert!(before == &after, "{name}: frozen {n} moved");
        }
        for ((n, a0, b0), (_, a1, b1)) in adapters_before.iter().zip(adapters(&p)) {
            assert!(a0 != &a1, "{name} {n}: lora_A did not move");
            assert!(b0 != &b1, "{name} {n}: lora_B did not move");
        }
        assert!(
            bits(&p.logits(&rows, true).unwrap()) != adapted_before,
            "{name}: the adapted model did not change"
        );
    }
}

/// Every trainable variable of `p`: `A` then `B` of each adapter.
fn trainable_vars(p: &Policy) -> Vec<candle_core::Var> {
    p.lora_vars()
        .into_iter()
        .flat_map(|(_, a, b)| [a, b])
        .collect()
}

/// With and without dropout: without, the full graph fuses the MLP's activation into its down
/// projection and recomputes each layer's attention in the backward (src/model/recompute.rs),
/// while the checkpointed backward keeps the attention of the one layer it recomputes.
#[test]
fn gradient_checkpointing_gives_the_same_gradients_with_the_same_dropout_masks() {
    for dropout in [0.3, 0.0] {
        checkpointed_gradients_equal_plain_ones(dropout, batch());
    }
    // Prompts computed as one common prefix and tails that finish them.
    checkpointed_gradients_equal_plain_ones(0.0, preamble_batch());
    // A common start, then each group's prompt rest, then the completions.
    checkpointed_gradients_equal_plain_ones(0.0, groups_batch());
}

fn checkpointed_gradients_equal_plain_ones(dropout: f64, (prompts, completions): Rows) {
    let lora = LoraOptions {
        r: 4,
        lora_dropout: dropout,
        ..LoraOptions::default()
    };
    let moved = |checkpointing: bool| {
        let mut p = policy("tiny-qwen3", DType::F64, &lora);
        p.set_gradient_checkpointing(checkpointing);
        randomize_b(&p, 0.2, 4);
        p
    };
    let (plain, checkpointed) = (moved(false), moved(true));
    let gradients = |p: &Policy| {
        let forward = p.train_logprobs(&prompts, &completions, 0.8).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let w = random(forward.logp.dims(), 1.0, &mut rng, forward.logp.dtype());
        let loss = (&forward.logp * w).unwrap().sum_all().unwrap();
        let grads = forward.backward(&loss).unwrap();
        trainable_vars(p)
            .iter()
            .map(|v| grads.get(v).expect("every adapter gets a gradient").clone())
            .collect::<Vec<_>>()
    };
    // Twice: the second pass draws its dropout masks after the first's, so a checkpointed
    // backward that left the dropout RNG elsewhere than the plain one would show there.
    for pass in 0..2 {
        let (a, b) = (gradients(&plain), gradients(&checkpointed));
        assert_eq!(a.len(), b.len());
        let largest = a.iter().map(max_abs).fold(0.0, f32::max);
        assert!(largest > 1e-3, "pass {pass}: the gradients are not trivial");
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            let diff = max_diff(a, b);
            assert!(
                diff <= 1e-9 * largest.max(1.0),
                "dropout {dropout}, pass {pass}, tensor {i}: {diff}"
            );
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
