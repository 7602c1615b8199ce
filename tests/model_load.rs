//! Every weight source gives the same model: a plain HF directory, a sharded one, the hub cache
//! (offline), and a GGUF file written the way llama.cpp's converter writes it. And the errors a
//! user sees when the model is not there say how to fix it.

mod support;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use lean_grpo::model::load::{load_dir, load_model, resolve_hub, HubSettings};
use lean_grpo::model::{LoraOptions, Policy, Quantize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use support::gguf::{plain_llama, write_gguf};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// An endpoint on which nothing listens: any download fails at once.
fn unreachable_hub(cache: &Path) -> HubSettings {
    HubSettings {
        cache_dir: cache.to_path_buf(),
        endpoint: Some("http://127.0.0.1:9".into()),
        offline: false,
    }
}

/// Logits of a fixed sequence through a policy built from `model`.
fn logits_of(model: &str, hub: &HubSettings) -> Vec<Vec<f32>> {
    let files = load_model(model, "main", hub, &Device::Cpu, DType::F32, Quantize::None).unwrap();
    let lora = LoraOptions {
        r: 2,
        ..LoraOptions::default()
    };
    let p = Policy::from_files(files, &lora, &Device::Cpu, DType::F32, 0).unwrap();
    p.logits(&[vec![295, 266, 269, 62, 15, 62, 17, 256]], true)
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dir("tiny-qwen2");
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, tmp.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let hub = unreachable_hub(tmp.path());
    let sharded = logits_of(tmp.path().to_str().unwrap(), &hub);
    assert_eq!(sharded, logits_of(src.to_str().unwrap(), &hub));

    // A shard listed in the index but absent is named.
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_dir(tmp.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors, which is missing"),
        "{err}"
    );
}

#[test]
fn hub_ids_resolve_from_the_cache_without_network() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny--qwen2");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_dir(&dir("tiny-qwen2"), &repo.join("snapshots/0123abcd"));
    let hub = unreachable_hub(cache.path());
    let snapshot = resolve_hub("tiny/qwen2", "main", &hub).unwrap();
    assert_eq!(snapshot, repo.join("snapshots/0123abcd"));
    assert_eq!(
        logits_of("tiny/qwen2", &hub),
        logits_of(dir("tiny-qwen2").to_str().unwrap(), &hub)
    );
}

#[test]
fn uncached_model_without_network_says_how_to_fix_it() {
    let cache = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        resolve_hub(
            "Qwen/Qwen2.5-0.5B-Instruct",
            "main",
            &unreachable_hub(cache.path())
        )
        .unwrap_err()
    );
    assert!(err.contains("unreachable"), "{err}");
    assert!(
        err.contains("huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct"),
        "{err}"
    );
    assert!(err.contains("local directory"), "{err}");
    let offline = HubSettings {
        offline: true,
        ..unreachable_hub(cache.path())
    };
    let err = resolve_hub("Qwen/Qwen2.5-0.5B-Instruct", "main", &offline)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("huggingface-cli download"), "{err}");
    // A path-looking name that does not exist is not sent to the hub.
    let err = load_model(
        "./no/such/dir",
        "main",
        &offline,
        &Device::Cpu,
        DType::F32,
        Quantize::None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no such file or directory"), "{err}");
}

#[test]
fn unsupported_architecture_and_bad_shapes_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&dir("tiny-qwen2"), tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"qwen2\"", "\"mistral\""),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        load_dir(tmp.path(), &Device::Cpu, DType::F32)
            .err()
            .unwrap()
    );
    assert!(err.contains("unsupported model_type `mistral`"), "{err}");
    assert!(err.contains("config.json"), "{err}");

    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 96", "\"intermediate_size\": 128"),
    )
    .unwrap();
    let files = load_dir(tmp.path(), &Device::Cpu, DType::F32).unwrap();
    let err = Policy::from_files(files, &LoraOptions::default(), &Device::Cpu, DType::F32, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn gguf_files_load_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = unreachable_hub(tmp.path());
    // Qwen2: q/k/v biases, tied embeddings (no output.weight), no permutation.
    let path = tmp.path().join("tiny-qwen2.gguf");
    write_gguf(&dir("tiny-qwen2"), "qwen2", &path, GgmlDType::F32);
    let want = logits_of(dir("tiny-qwen2").to_str().unwrap(), &hub);
    assert_eq!(logits_of(path.to_str().unwrap(), &hub), want);
    // Llama: llama.cpp permutes q/k rows, which the loader must undo. (The tiny Llama uses
    // llama3 RoPE scaling, which GGUF stores differently, so this one is built without it.)
    let plain = tmp.path().join("plain-llama");
    plain_llama(&dir("tiny-llama"), &plain);
    let path = tmp.path().join("tiny-llama.gguf");
    write_gguf(&plain, "llama", &path, GgmlDType::F32);
    let want = logits_of(plain.to_str().unwrap(), &hub);
    let got = logits_of(path.to_str().unwrap(), &hub);
    let d = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "llama GGUF logits differ by {d}");
}
