//! GGUF files written the way llama.cpp's converter writes them, from the tiny test models.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use lean_grpo::model::gguf::permute;
use lean_grpo::model::ModelConfig;
use std::path::Path;

/// Writes the model in `model_dir` as a GGUF file with llama.cpp's tensor names, metadata and
/// q/k permutation, the linear layers' weights in `linear`, and the embedding table too when
/// the head is a tensor of its own, as llama.cpp quantizes `token_embd` (norms, the head and a
/// tied embedding table in f32).
pub fn write_gguf(model_dir: &Path, arch: &str, path: &Path, linear: GgmlDType) {
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
        let untied_table =
            hf == "model.embed_tokens.weight" && tensors.contains_key("lm_head.weight");
        let format = if hf.ends_with("_proj.weight") || untied_table {
            linear
        } else {
            GgmlDType::F32
        };
        out.push((gg, QTensor::quantize(&t, format).unwrap()));
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

/// A copy of the tiny Llama in `tiny_llama` at `out` without its llama3 RoPE scaling, which
/// GGUF stores differently: the Llama that a GGUF file can hold.
pub fn plain_llama(tiny_llama: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for e in std::fs::read_dir(tiny_llama).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let mut cfg = cfg.as_object().unwrap().clone();
    cfg.remove("rope_parameters");
    cfg.insert("rope_theta".into(), 10000.0.into());
    std::fs::write(
        out.join("config.json"),
        serde_json::Value::Object(cfg).to_string(),
    )
    .unwrap();
}
