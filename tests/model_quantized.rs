//! A quantized frozen base (`--quantize`, src/model/quant.rs) on whole models: a GGUF kept
//! quantized computes, in training and scoring, what its dequantized weights compute; its
//! adapters' gradients are the dequantized model's; it samples; the adapters it trains load
//! onto the f32 base; and the errors name what to change.

mod support;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use lean_grpo::model::load::{load_dir, load_model, HubSettings};
use lean_grpo::model::{argmax, GenerateOptions, LoraOptions, Policy, Quantize};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use support::gguf::{plain_llama, write_gguf};

fn dir(name: &str) -> PathBuf {
    support::repo().join("tests/data").join(name)
}

fn offline(cache: &Path) -> HubSettings {
    HubSettings {
        cache_dir: cache.to_path_buf(),
        endpoint: Some("http://127.0.0.1:9".into()),
        offline: true,
    }
}

fn lora() -> LoraOptions {
    LoraOptions {
        r: 4,
        ..LoraOptions::default()
    }
}

fn load(model: &Path, quantize: Quantize) -> Policy {
    let hub = offline(model.parent().unwrap());
    let files = load_model(
        model.to_str().unwrap(),
        "main",
        &hub,
        &Device::Cpu,
        DType::F32,
        quantize,
    )
    .unwrap();
    Policy::from_files(files, &lora(), &Device::Cpu, DType::F32, 11).unwrap()
}

/// Gives every adapter the same random non-zero `B` (by seed), so that the adapters matter.
fn randomize_b(p: &Policy, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<_> = p
        .lora_vars()
        .into_iter()
        .map(|(name, a, b)| {
            let v: Vec<f32> = (0..b.elem_count())
                .map(|_| rng.random_range(-0.3..0.3))
                .collect();
            let b = Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap();
            (name, a.as_tensor().clone(), b)
        })
        .collect();
    p.set_lora_weights(&w).unwrap();
}

/// Two rows, 34 tokens: more than the 16 rows a product takes candle's decoding kernel for,
/// so these logits come from the training forward.
fn rows() -> Vec<Vec<u32>> {
    let a = [295, 266, 269, 62, 15, 62, 17, 256, 9, 40];
    let b = [72, 77, 5, 6, 300, 12, 70, 33];
    vec![a.repeat(2), b.repeat(2)]
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let m = |t: Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
    m((a - b).unwrap()) / m(b.clone())
}

/// The tiny Qwen2 (q/k/v biases, tied head) and the tiny Llama (q/k rows permuted by
/// llama.cpp's converter, untied head) as GGUF files with their linear layers, and the Llama's
/// embedding table, in `format`.
fn ggufs(tmp: &Path, format: GgmlDType) -> Vec<PathBuf> {
    let plain = tmp.join("plain-llama");
    if !plain.exists() {
        plain_llama(&dir("tiny-llama"), &plain);
    }
    let mut out = Vec::new();
    for (arch, src) in [("qwen2", dir("tiny-qwen2")), ("llama", plain)] {
        let path = tmp.join(format!("{arch}-{format:?}.gguf"));
        write_gguf(&src, arch, &path, format);
        out.push(path);
    }
    out
}

#[test]
fn a_gguf_kept_quantized_computes_what_its_dequantized_weights_compute() {
    let tmp = tempfile::tempdir().unwrap();
    for format in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        for path in ggufs(tmp.path(), format) {
            let dense = load(&path, Quantize::None);
            let kept = load(&path, Quantize::Keep);
            let layers = kept.config().num_hidden_layers;
            let (dense_bytes, none) = dense.decoder().frozen_linear_bytes();
            let (kept_bytes, all) = kept.decoder().frozen_linear_bytes();
            assert_eq!((none, all), (0, 7 * layers), "{path:?}");
            // The untied Llama's embedding table stays quantized too; the tied Qwen2's is the
            // head, dense.
            let untied = path.to_string_lossy().contains("llama");
            assert_eq!(
                kept.decoder().embed_tokens().is_quantized(),
                untied,
                "{path:?}"
            );
            assert!(!dense.decoder().embed_tokens().is_quantized());
            // 8.5 bits a weight for Q8_0, 4.5 to 5 for Q4_0/Q4_1, against 32.
            assert!(
                kept_bytes * 3 < dense_bytes,
                "{kept_bytes} vs {dense_bytes}"
            );
            randomize_b(&dense, 1);
            randomize_b(&kept, 1);
            for adapters in [false, true] {
                let want = dense.logits(&rows(), adapters).unwrap();
                let got = kept.logits(&rows(), adapters).unwrap();
                let err = rel(&got, &want);
                assert!(err < 1e-5, "{path:?} adapters {adapters}: {err}");
            }
        }
    }
}

#[test]
fn a_quantized_base_samples_close_to_its_dequantized_weights() {
    // Decoding steps (few rows) take candle's quantized kernel, which rounds activations to
    // 8 bits: greedy tokens may part after a near tie, so compare the first step's logits.
    let tmp = tempfile::tempdir().unwrap();
    let path = &ggufs(tmp.path(), GgmlDType::Q8_0)[1];
    let step = |p: &Policy| -> Vec<Vec<f32>> {
        let mut first = Vec::new();
        let opts = GenerateOptions {
            max_new_tokens: 4,
            eos_ids: vec![],
            adapters: true,
        };
        p.generate(
            &[vec![295, 266, 269, 62, 15]],
            2,
            &opts,
            &mut |rows: &[Vec<f32>]| {
                if first.is_empty() {
                    first = rows.to_vec();
                }
                Ok(rows.iter().map(|l| argmax(l)).collect())
            },
            &mut |_: &[u32]| false,
        )
        .unwrap();
        first
    };
    let (dense, kept) = (load(path, Quantize::None), load(path, Quantize::Keep));
    randomize_b(&dense, 4);
    randomize_b(&kept, 4);
    let (want, got) = (step(&dense), step(&kept));
    let want = Tensor::new(want, &Device::Cpu).unwrap();
    let got = Tensor::new(got, &Device::Cpu).unwrap();
    let err = rel(&got, &want);
    assert!(err > 0.0 && err < 0.05, "{err}");
}

#[test]
fn adapter_gradients_on_a_quantized_base_follow_the_dequantized_model() {
    let tmp = tempfile::tempdir().unwrap();
    for path in ggufs(tmp.path(), GgmlDType::Q8_0) {
        let grads = |p: &Policy| -> Vec<(String, Tensor)> {
            randomize_b(p, 2);
            let prompts = rows();
            let completions = vec![vec![62, 17, 256, 262], vec![67, 315, 280]];
            let out = p.train_logprobs(&prompts, &completions, 1.0).unwrap();
            let loss = out.logp.sum_all().unwrap();
            let g = out.backward(&loss).unwrap();
            p.lora_vars()
                .into_iter()
                .flat_map(|(name, a, b)| {
                    [
                        (format!("{name}.A"), g.get(a.as_tensor()).unwrap().clone()),
                        (format!("{name}.B"), g.get(b.as_tensor()).unwrap().clone()),
                    ]
                })
                .collect()
        };
        let want = grads(&load(&path, Quantize::None));
        let got = grads(&load(&path, Quantize::Keep));
        assert_eq!(want.len(), got.len());
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            let err = rel(g, w);
            assert!(err < 1e-4, "{path:?} {name}: gradient differs by {err}");
        }
    }
}

#[test]
fn adapters_trained_on_a_quantized_base_load_onto_the_f32_base() {
    let tmp = tempfile::tempdir().unwrap();
    let path = &ggufs(tmp.path(), GgmlDType::Q8_0)[0];
    let kept = load(path, Quantize::Keep);
    randomize_b(&kept, 3);
    let adapter = tmp.path().join("adapter");
    kept.write_adapter(&adapter, &lora(), "tiny-qwen2").unwrap();
    // The f32 safetensors model the GGUF was written from, as PEFT would load it.
    let files = load_dir(&dir("tiny-qwen2"), &Device::Cpu, DType::F32).unwrap();
    let f32_base = Policy::from_files(files, &lora(), &Device::Cpu, DType::F32, 0).unwrap();
    f32_base.read_adapter(&adapter, &lora()).unwrap();
    for ((_, a1, b1), (_, a2, b2)) in kept.lora_vars().iter().zip(f32_base.lora_vars()) {
        assert_eq!(rel(a2.as_tensor(), a1.as_tensor()), 0.0);
        assert_eq!(rel(b2.as_tensor(), b1.as_tensor()), 0.0);
    }
    // On the GGUF's weights dequantized, the adapter gives what it gave on the quantized base.
    let dequantized = load(path, Quantize::None);
    dequantized.read_adapter(&adapter, &lora()).unwrap();
    let want = dequantized.logits(&rows(), true).unwrap();
    let got = kept.logits(&rows(), true).unwrap();
    let err = rel(&got, &want);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn quantizing_a_safetensors_model_at_load_and_the_errors_that_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = offline(tmp.path());
    let model = dir("tiny-qwen2");
    let model = model.to_str().unwrap();
    let load = |q| load_model(model, "main", &hub, &Device::Cpu, DType::F32, q);
    let files = load(Quantize::Q8_0).unwrap();
    let p = Policy::from_files(files, &lora(), &Device::Cpu, DType::F32, 0).unwrap();
    assert_eq!(
        p.decoder().frozen_linear_bytes().1,
        7 * p.config().num_hidden_layers
    );
    // 64 hidden features are not a Q4_K block (256).
    let files = load(Quantize::Q4K).unwrap();
    let err = format!(
        "{:#}",
        Policy::from_files(files, &lora(), &Device::Cpu, DType::F32, 0)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
    assert!(err.contains("--quantize q8_0"), "{err}");
    let err = format!("{:#}", load(Quantize::Keep).err().unwrap());
    assert!(
        err.contains("not a GGUF file") && err.contains("q4_k"),
        "{err}"
    );
}
