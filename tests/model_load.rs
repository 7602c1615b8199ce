//! Every weight source gives the same model: a plain HF directory, a sharded one, the hub cache
//! (offline), and a GGUF file written the way llama.cpp's converter writes it. And the errors a
//! user sees when the model is not there say how to fix it.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use lean_grpo::model::gguf::permute;
use lean_grpo::model::load::{load_dir, load_model, resolve_hub, HubSettings};
use lean_grpo::model::{LoraOptions, ModelConfig, Policy};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    let files = load_model(model, "main", hub, &Device::Cpu, DType::F32).unwrap();
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
    let err = load_model("./no/such/dir", "main", &offline, &Device::Cpu, DType::F32)
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

/// Writes the model in `model_dir` as a GGUF file with llama.cpp's tensor names, metadata and
/// q/k permutation.
fn write_gguf(model_dir: &Path, arch: &str, path: &Path) {
    let cfg = ModelConfig::from_file(&model_dir.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in &tensors {
        let gg = match hf.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            other => {
                let rest = other.strip_prefix("model.layers.").unwrap();
                let (layer, rest) = rest.split_once('.').unwrap();
                let (module, kind) = rest.rsplit_once('.').unwrap();
                let m = match module {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "self_attn.q_norm" => "attn_q_norm",
                    "self_attn.k_norm" => "attn_k_norm",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    m => panic!("unexpected module {m}"),
                };
                format!("blk.{layer}.{m}.{kind}")
            }
        };
        let t = match (
            arch,
            gg.ends_with("attn_q.weight"),
            gg.ends_with("attn_k.weight"),
        ) {
            ("llama", true, _) => permute(t, cfg.num_attention_heads).unwrap(),
            ("llama", _, true) => permute(t, cfg.num_key_value_heads).unwrap(),
            _ => t.clone(),
        };
        out.push((gg, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let u32v = |x: usize| Value::U32(x as u32);
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u32v(cfg.num_hidden_layers)),
        (format!("{arch}.embedding_length"), u32v(cfg.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u32v(cfg.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u32v(cfg.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(cfg.num_key_value_heads),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.context_length"),
            u32v(cfg.max_position_embeddings),
        ),
        (format!("{arch}.vocab_size"), u32v(cfg.vocab_size)),
        (
            "tokenizer.ggml.eos_token_id".into(),
            u32v(cfg.eos_token_ids[0] as usize),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = out.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn gguf_files_load_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = unreachable_hub(tmp.path());
    // Qwen2: q/k/v biases, tied embeddings (no output.weight), no permutation.
    let path = tmp.path().join("tiny-qwen2.gguf");
    write_gguf(&dir("tiny-qwen2"), "qwen2", &path);
    let want = logits_of(dir("tiny-qwen2").to_str().unwrap(), &hub);
    assert_eq!(logits_of(path.to_str().unwrap(), &hub), want);
    // Llama: llama.cpp permutes q/k rows, which the loader must undo. (The tiny Llama uses
    // llama3 RoPE scaling, which GGUF stores differently, so this one is built without it.)
    let plain = tmp.path().join("plain-llama");
    copy_dir(&dir("tiny-llama"), &plain);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("config.json")).unwrap()).unwrap();
    let mut cfg = cfg.as_object().unwrap().clone();
    cfg.remove("rope_parameters");
    cfg.insert("rope_theta".into(), 10000.0.into());
    std::fs::write(
        plain.join("config.json"),
        serde_json::Value::Object(cfg).to_string(),
    )
    .unwrap();
    let path = tmp.path().join("tiny-llama.gguf");
    write_gguf(&plain, "llama", &path);
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
