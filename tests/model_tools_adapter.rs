//! PEFT adapter files: names, config, round trip, errors, and merging into a base model.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lean_grpo::model::adapter::{
    export_merged, load_adapter, save_adapter, AdapterWeights, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
};
use lean_grpo::model::LoraOptions;
use serde_json::Value as Json;

const BASE: &str = "Qwen/Qwen2.5-0.5B-Instruct";

/// Deterministic, distinct values: sin of a per-tensor offset.
fn filled(rows: usize, cols: usize, seed: f32) -> Tensor {
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 + 1.0) * seed).sin())
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
}

fn lora(r: usize, alpha: f64, targets: &[&str]) -> LoraOptions {
    LoraOptions {
        r,
        lora_alpha: alpha,
        lora_dropout: 0.05,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    }
}

/// q_proj [out 6, in 4] and v_proj [out 2, in 4] in layers 0 and 1, rank `r`.
fn weights(r: usize) -> Vec<AdapterWeights> {
    let mut out = Vec::new();
    for layer in 0..2 {
        for (proj, out_features) in [("q_proj", 6), ("v_proj", 2)] {
            let seed = 0.3 + layer as f32 + out_features as f32 * 0.01;
            out.push(AdapterWeights {
                module: format!("model.layers.{layer}.self_attn.{proj}"),
                a: filled(r, 4, seed),
                b: filled(out_features, r, seed * 1.7),
            });
        }
    }
    out
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let flat = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    flat.to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn error_text<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    format!("{:#}", result.unwrap_err())
}

fn saved_adapter(r: usize) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    save_adapter(
        &root.path().join("adapter"),
        &weights(r),
        &lora(r, 16.0, &["q_proj", "v_proj"]),
        BASE,
    )
    .unwrap();
    root
}

#[test]
fn saved_files_use_peft_names_shapes_and_config() {
    let root = saved_adapter(4);
    let dir = root.path().join("adapter");

    let config = read_json(&dir.join(ADAPTER_CONFIG_FILE));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    // An integral alpha is written as an int, as PEFT does.
    assert_eq!(config["lora_alpha"].to_string(), "16");
    assert_eq!(config["lora_dropout"], 0.05);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(config["base_model_name_or_path"], BASE);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!(config["inference_mode"], true);
    assert_eq!(config["modules_to_save"], Json::Null);
    assert_eq!(config["use_rslora"], false);
    assert_eq!(config["use_dora"], false);

    let bytes = fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_string())
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names.len(), 8);
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(
        names[1],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    );
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    let b = st
        .tensor("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        .unwrap();
    assert_eq!((a.shape(), b.shape()), (&[4, 4][..], &[2, 4][..]));
    assert_eq!(a.dtype(), safetensors::Dtype::F32);

    // Nothing but the adapter directory is left next to it.
    let siblings: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, vec!["adapter"]);
}

#[test]
fn save_then_load_is_bit_identical() {
    let root = saved_adapter(4);
    let adapter = load_adapter(&root.path().join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(adapter.lora, lora(4, 16.0, &["q_proj", "v_proj"]));
    assert_eq!(adapter.base_model, BASE);
    assert_eq!(adapter.scaling(), 4.0);
    let mut expected = weights(4);
    expected.sort_by(|x, y| x.module.cmp(&y.module));
    assert_eq!(adapter.weights.len(), expected.len());
    for (got, want) in adapter.weights.iter().zip(&expected) {
        assert_eq!(got.module, want.module);
        assert_eq!(bits(&got.a), bits(&want.a), "{}", got.module);
        assert_eq!(bits(&got.b), bits(&want.b), "{}", got.module);
    }
    adapter
        .ensure_matches(&lora(4, 16.0, &["v_proj", "q_proj"]))
        .unwrap();
    let err = error_text(adapter.ensure_matches(&lora(8, 16.0, &["q_proj", "v_proj"])));
    assert!(
        err.contains("rank r = 4") && err.contains("lora.r = 8"),
        "{err}"
    );
    let err = error_text(adapter.ensure_matches(&lora(4, 16.0, &["q_proj"])));
    assert!(err.contains("target_modules"), "{err}");
}

#[test]
fn saving_over_an_adapter_replaces_it_and_a_failed_save_keeps_it() {
    let root = saved_adapter(4);
    let dir = root.path().join("adapter");
    save_adapter(
        &dir,
        &weights(2),
        &lora(2, 8.0, &["q_proj", "v_proj"]),
        BASE,
    )
    .unwrap();
    assert_eq!(load_adapter(&dir, &Device::Cpu).unwrap().lora.r, 2);

    // Rank 4 tensors declared as rank 2: refused, and the previous adapter is intact.
    let err = error_text(save_adapter(
        &dir,
        &weights(4),
        &lora(2, 8.0, &["q_proj", "v_proj"]),
        BASE,
    ));
    assert!(err.contains("rank mismatch"), "{err}");
    // A module the config would not describe.
    let err = error_text(save_adapter(
        &dir,
        &weights(2),
        &lora(2, 8.0, &["q_proj"]),
        BASE,
    ));
    assert!(
        err.contains("v_proj matches none of target_modules"),
        "{err}"
    );
    assert_eq!(load_adapter(&dir, &Device::Cpu).unwrap().lora.r, 2);
    let siblings: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, vec!["adapter"]);
}

/// Rewrites the saved config with `edit` and returns the load error.
fn load_error_after(edit: impl FnOnce(&mut Json)) -> String {
    let root = saved_adapter(4);
    let dir = root.path().join("adapter");
    let mut config = read_json(&dir.join(ADAPTER_CONFIG_FILE));
    edit(&mut config);
    fs::write(dir.join(ADAPTER_CONFIG_FILE), config.to_string()).unwrap();
    error_text(load_adapter(&dir, &Device::Cpu))
}

#[test]
fn load_errors_say_what_is_wrong() {
    let err = load_error_after(|c| c["peft_type"] = "PREFIX_TUNING".into());
    assert!(
        err.contains("peft_type is \"PREFIX_TUNING\"") && err.contains("LORA"),
        "{err}"
    );
    let err = load_error_after(|c| c["r"] = 8.into());
    assert!(
        err.contains("rank mismatch") && err.contains("r = 8"),
        "{err}"
    );
    let err = load_error_after(|c| c["use_dora"] = true.into());
    assert!(err.contains("DoRA"), "{err}");
    let err = load_error_after(|c| c["modules_to_save"] = serde_json::json!(["lm_head"]));
    assert!(err.contains("modules_to_save"), "{err}");
    let err = load_error_after(|c| c["target_modules"] = serde_json::json!(["k_proj"]));
    assert!(err.contains("matches none of target_modules"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = error_text(load_adapter(empty.path(), &Device::Cpu));
    assert!(
        err.contains("adapter_config.json not found") && err.contains("not a PEFT adapter"),
        "{err}"
    );

    let root = saved_adapter(4);
    let dir = root.path().join("adapter");
    fs::rename(
        dir.join(ADAPTER_WEIGHTS_FILE),
        dir.join("adapter_model.bin"),
    )
    .unwrap();
    let err = error_text(load_adapter(&dir, &Device::Cpu));
    assert!(
        err.contains("adapter_model.safetensors not found") && err.contains("safe_serialization"),
        "{err}"
    );
}

#[test]
fn regex_target_modules_are_reported_from_the_weights() {
    let root = saved_adapter(4);
    let dir = root.path().join("adapter");
    let mut config = read_json(&dir.join(ADAPTER_CONFIG_FILE));
    config["target_modules"] = ".*\\.(q_proj|v_proj)".into();
    fs::write(dir.join(ADAPTER_CONFIG_FILE), config.to_string()).unwrap();
    let adapter = load_adapter(&dir, &Device::Cpu).unwrap();
    assert_eq!(adapter.lora.target_modules, vec!["q_proj", "v_proj"]);
}

#[test]
fn stray_or_unpaired_tensors_are_errors() {
    let root = saved_adapter(4);
    let dir = root.path().join("adapter");
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert("base_model.model.lm_head.weight".into(), filled(2, 2, 1.0));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = error_text(load_adapter(&dir, &Device::Cpu));
    assert!(
        err.contains("\"base_model.model.lm_head.weight\" is not a LoRA matrix"),
        "{err}"
    );

    tensors.remove("base_model.model.lm_head.weight");
    tensors.remove("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = error_text(load_adapter(&dir, &Device::Cpu));
    assert!(
        err.contains("layers.1.self_attn.q_proj has only one of lora_A / lora_B"),
        "{err}"
    );
}

/// A tiny model in HF layout: layer-0/1 projections, an embedding and a bf16 norm, with
/// config/tokenizer files and a stale `pytorch_model.bin` that must not be copied.
fn write_base_model(dir: &Path, sharded: bool) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    for layer in 0..2 {
        let s = layer as f32 + 1.0;
        tensors.insert(
            format!("model.layers.{layer}.self_attn.q_proj.weight"),
            filled(6, 4, 0.11 * s),
        );
        tensors.insert(
            format!("model.layers.{layer}.self_attn.v_proj.weight"),
            filled(2, 4, 0.07 * s),
        );
        tensors.insert(
            format!("model.layers.{layer}.mlp.up_proj.weight"),
            filled(8, 4, 0.05 * s),
        );
    }
    tensors.insert("model.embed_tokens.weight".into(), filled(10, 4, 0.2));
    tensors.insert(
        "model.norm.weight".into(),
        filled(1, 4, 0.9).to_dtype(DType::BF16).unwrap(),
    );
    fs::create_dir_all(dir).unwrap();
    if sharded {
        let mut map = serde_json::Map::new();
        let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
        for (name, t) in &tensors {
            let i = usize::from(name.contains("layers.1") || name.contains("norm"));
            let file = format!("model-0000{}-of-00002.safetensors", i + 1);
            map.insert(name.clone(), file.into());
            shards[i].insert(name.clone(), t.clone());
        }
        for (i, shard) in shards.iter().enumerate() {
            let file = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
            candle_core::safetensors::save(shard, file).unwrap();
        }
        let index = serde_json::json!({"metadata": {"total_size": 1234}, "weight_map": map});
        fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }
    fs::write(dir.join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
    fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 1}"#).unwrap();
    fs::write(dir.join("pytorch_model.bin"), "stale").unwrap();
    tensors
}

/// W + (alpha / r) · B · A, written out with plain loops in f64.
fn reference_merge(w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Vec<f64> {
    let w = w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    let a = a.to_vec2::<f32>().unwrap();
    let b = b.to_vec2::<f32>().unwrap();
    let mut out = Vec::new();
    for (i, row) in w.iter().enumerate() {
        for (j, &wij) in row.iter().enumerate() {
            let ba: f64 = (0..a.len())
                .map(|k| f64::from(b[i][k]) * f64::from(a[k][j]))
                .sum();
            out.push(f64::from(wij) + scaling * ba);
        }
    }
    out
}

fn check_merge(sharded: bool) {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let base_tensors = write_base_model(&base, sharded);
    let adapter_dir = root.path().join("adapter");
    let opts = lora(4, 16.0, &["q_proj", "v_proj"]);
    save_adapter(&adapter_dir, &weights(4), &opts, BASE).unwrap();
    let out = root.path().join("merged");

    let summary = export_merged(&base, &adapter_dir, &out).unwrap();
    assert_eq!(summary.merged_weights, 4);
    assert_eq!(summary.weight_files, if sharded { 2 } else { 1 });
    let mut expected_files = vec!["config.json", "generation_config.json", "tokenizer.json"];
    if sharded {
        expected_files.push("model.safetensors.index.json");
        expected_files.sort();
    }
    assert_eq!(summary.copied_files, expected_files);
    assert!(!out.join("pytorch_model.bin").exists());
    assert_eq!(
        fs::read_to_string(out.join("config.json")).unwrap(),
        r#"{"model_type": "qwen2"}"#
    );

    let mut merged = HashMap::new();
    for entry in fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            merged.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    assert_eq!(merged.len(), base_tensors.len());
    let lora_weights = weights(4);
    let adapted: HashMap<String, &AdapterWeights> = lora_weights
        .iter()
        .map(|w| (format!("{}.weight", w.module), w))
        .collect();
    for (name, original) in &base_tensors {
        let got = &merged[name];
        assert_eq!(got.dtype(), original.dtype(), "{name}");
        match adapted.get(name) {
            Some(w) => {
                let want = reference_merge(original, &w.a, &w.b, 16.0 / 4.0);
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!((f64::from(*g) - e).abs() < 1e-5, "{name}: {g} vs {e}");
                }
                assert_ne!(bits(&merged[name]), bits(original), "{name} unchanged");
            }
            None => assert_eq!(bits(got), bits(original), "{name} must be copied as is"),
        }
    }
}

#[test]
fn merged_export_equals_w_plus_scaled_ba() {
    check_merge(false);
}

#[test]
fn merged_export_of_a_sharded_model_keeps_its_shards() {
    check_merge(true);
}

#[test]
fn merging_a_bf16_weight_rounds_once_to_bf16() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    fs::create_dir_all(&base).unwrap();
    let w = filled(2, 4, 0.3).to_dtype(DType::BF16).unwrap();
    let tensors = HashMap::from([(
        "model.layers.0.self_attn.v_proj.weight".to_string(),
        w.clone(),
    )]);
    candle_core::safetensors::save(&tensors, base.join("model.safetensors")).unwrap();
    let adapter_dir = root.path().join("adapter");
    let a = filled(1, 4, 0.5);
    let b = filled(2, 1, 0.25);
    let module = AdapterWeights {
        module: "model.layers.0.self_attn.v_proj".into(),
        a: a.clone(),
        b: b.clone(),
    };
    save_adapter(&adapter_dir, &[module], &lora(1, 2.0, &["v_proj"]), BASE).unwrap();
    let out = root.path().join("merged");
    export_merged(&base, &adapter_dir, &out).unwrap();
    let merged =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let got = &merged["model.layers.0.self_attn.v_proj.weight"];
    assert_eq!(got.dtype(), DType::BF16);
    let want: Vec<f32> = reference_merge(&w, &a, &b, 2.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let want = Tensor::from_vec(want, (2, 4), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(bits(got), bits(&want));
}

#[test]
fn merge_errors_leave_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    write_base_model(&base, false);
    let adapter_dir = root.path().join("adapter");
    let module = AdapterWeights {
        module: "model.layers.0.self_attn.k_proj".into(),
        a: filled(2, 4, 0.1),
        b: filled(2, 2, 0.2),
    };
    save_adapter(&adapter_dir, &[module], &lora(2, 4.0, &["k_proj"]), BASE).unwrap();
    let out = root.path().join("merged");
    let err = error_text(export_merged(&base, &adapter_dir, &out));
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("wrong base model"),
        "{err}"
    );
    assert!(!out.exists());

    // A non-empty output directory is never overwritten.
    let adapter_ok = root.path().join("adapter_ok");
    save_adapter(
        &adapter_ok,
        &weights(4),
        &lora(4, 16.0, &["q_proj", "v_proj"]),
        BASE,
    )
    .unwrap();
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = error_text(export_merged(&base, &adapter_ok, &out));
    assert!(err.contains("already exists and is not empty"), "{err}");
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");

    let no_weights = root.path().join("empty_base");
    fs::create_dir_all(&no_weights).unwrap();
    let err = error_text(export_merged(
        &no_weights,
        &adapter_ok,
        &root.path().join("m2"),
    ));
    assert!(
        err.contains("has neither model.safetensors nor model.safetensors.index.json"),
        "{err}"
    );
    let corrupt = root.path().join("corrupt_base");
    fs::create_dir_all(&corrupt).unwrap();
    fs::write(
        corrupt.join("model.safetensors"),
        b"\x05\x00\x00\x00\x00\x00\x00\x00{oops",
    )
    .unwrap();
    let err = error_text(export_merged(
        &corrupt,
        &adapter_ok,
        &root.path().join("m3"),
    ));
    assert!(
        err.contains("corrupt_base/model.safetensors is not a safetensors file"),
        "{err}"
    );

    let leftovers: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
