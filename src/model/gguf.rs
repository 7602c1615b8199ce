//! GGUF checkpoints (llama.cpp's format): metadata to [`ModelConfig`], tensors renamed to their
//! Hugging Face names, so the decoder never knows where weights came from. Tensors are
//! dequantised, except under `--quantize keep` (or `q8_0`/`q4_k`) the linear layers' quantized
//! weights and, when the head is not tied to it, the embedding table's, which stay in their
//! format (src/model/quant.rs).
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` of the `llama` architecture to
//! suit its interleaved RoPE; we undo that so the rotate-half RoPE of the decoder applies.
//! Qwen2/Qwen3 GGUFs are stored unpermuted.

use super::config::{Arch, ModelConfig};
use super::quant::{self, Quantize};
use super::weights::{ModelFiles, TensorMap};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Loads a `.gguf` file; quantised tensors are dequantised to f32 then cast to `dtype`, but
/// for `quantize` other than [`Quantize::None`] those of `kept` stay quantized.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    dtype: DType,
    quantize: Quantize,
) -> Result<ModelFiles> {
    let origin = path.display().to_string();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {origin}"))?;
    let content =
        Content::read(&mut file).with_context(|| format!("{origin} is not a GGUF file"))?;
    // llama.cpp writes no `output.weight` when the head is the embedding matrix (SmolLM2,
    // Qwen2.5-0.5B), and its loader then ties the two; the tensor list is how the file says so.
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = config_from_metadata(&content.metadata, tied)
        .with_context(|| format!("reading the metadata of {origin}"))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!(
            "{origin} stores Llama-3.1-style RoPE frequency factors, which the GGUF loader does \
             not map; load the Hugging Face safetensors checkpoint of this model instead"
        );
    }
    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else { continue };
        let t = content
            .tensor(&mut file, name, device)
            .with_context(|| format!("reading tensor {name} of {origin}"))?;
        // llama.cpp permutes the rows of the `llama` q/k projections (see the module doc).
        let heads = match (config.arch, hf.rsplit('.').nth(1)) {
            (Arch::Llama, Some("q_proj")) => Some(config.num_attention_heads),
            (Arch::Llama, Some("k_proj")) => Some(config.num_key_value_heads),
            _ => None,
        };
        let heads = heads.filter(|_| hf.ends_with(".weight"));
        if quantize.keeps() && kept(&hf, tied) && quant::supported(t.dtype()) {
            let t = match heads {
                Some(h) => quant::reorder_rows(&t, &unpermuted_rows(t.shape().dims()[0], h))?,
                None => t,
            };
            quantized.insert(hf, Arc::new(t));
            continue;
        }
        let t = dense(&t, device, &hf, quantize)?;
        let t = match heads {
            Some(h) => unpermute(&t, h)?,
            None => t,
        };
        tensors.insert(hf, t);
    }
    let weights = TensorMap {
        tensors,
        quantized,
        quantize: quantize.target(),
        dtype,
        origin,
    };
    Ok(ModelFiles {
        config,
        weights: Box::new(weights),
        // The file itself: the tokenizer comes from its metadata, or from a tokenizer.json
        // beside it (`Tokenizer::from_dir` takes either).
        dir: path.to_path_buf(),
    })
}

/// A linear layer's weight: a quantized one `--quantize keep` cannot keep is an error.
fn is_linear(hf: &str) -> bool {
    hf.starts_with("model.layers.") && hf.ends_with("_proj.weight") && !hf.contains("_norm")
}

/// What `--quantize keep` keeps quantized: the linear layers' weights, and the embedding table
/// when the head is a tensor of its own (a tied head is the training's LM-head product, which
/// reads it dense). Norms and the head stay dense.
fn kept(hf: &str, tied: bool) -> bool {
    is_linear(hf) || (!tied && hf == "model.embed_tokens.weight")
}

/// A tensor `--quantize keep` does not keep, dequantised; a quantized linear weight in a
/// format candle cannot multiply is an error rather than a silent f32 copy.
fn dense(t: &QTensor, device: &Device, hf: &str, quantize: Quantize) -> Result<Tensor> {
    let kept_format = !matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if quantize.keeps() && is_linear(hf) && kept_format {
        bail!(
            "`{hf}` is stored as {:?}, which --quantize keep does not support (Q4_0, Q4_1, \
             Q5_0, Q5_1, Q8_0, Q2_K to Q6_K); use --quantize none to dequantize it",
            t.dtype()
        );
    }
    Ok(t.dequantize(device)?)
}

/// The row order that undoes llama.cpp's `permute` on a `[out, in]` weight of `heads` heads:
/// row `(h, i, j)` of the original (head, half, pair) sits at `(h, j, i)` in the file.
fn unpermuted_rows(out: usize, heads: usize) -> Vec<usize> {
    let half = out / heads / 2;
    let mut order = Vec::with_capacity(out);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * 2 * half + i * 2 + j);
            }
        }
    }
    order
}

/// llama.cpp tensor name → HF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Inverse of llama.cpp's `permute(w, n_head)`:
/// `w.reshape(n_head, head_dim / 2, 2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// llama.cpp's `permute(w, n_head)`: `w.reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2)`.
/// Public so tests can write GGUFs the way llama.cpp's converter does.
pub fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, 2, half, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The [`ModelConfig`] of a GGUF file's metadata; `tied` says whether the head is the embedding
/// matrix (the file has no `output.weight`).
fn config_from_metadata(md: &HashMap<String, Value>, tied: bool) -> Result<ModelConfig> {
    let arch_name = md
        .get("general.architecture")
        .context("no general.architecture")?
        .to_string()?
        .clone();
    let get = |key: &str| -> Result<&Value> {
        md.get(&format!("{arch_name}.{key}"))
            .with_context(|| format!("missing metadata {arch_name}.{key}"))
    };
    let int = |key: &str| -> Result<usize> {
        let v = get(key)?;
        let n = match v {
            Value::U8(x) => u64::from(*x),
            Value::U16(x) => u64::from(*x),
            Value::U32(x) => u64::from(*x),
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => bail!("metadata {arch_name}.{key} = {other:?} is not a count"),
        };
        Ok(n as usize)
    };
    let opt_f = |key: &str| -> Option<f64> {
        get(key)
            .ok()
            .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let vocab = match int("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .context("neither vocab_size nor tokenizer.ggml.tokens in the metadata")?
            .to_vec()?
            .len(),
    };
    let token = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let json = serde_json::json!({
        "model_type": arch_name,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int("feed_forward_length")?,
        "num_hidden_layers": int("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int("attention.key_length").ok(),
        "rms_norm_eps": opt_f("attention.layer_norm_rms_epsilon"),
        "rope_theta": opt_f("rope.freq_base"),
        "max_position_embeddings": int("context_length").ok(),
        "tie_word_embeddings": tied,
        "bos_token_id": token("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token("tokenizer.ggml.eos_token_id"),
    });
    ModelConfig::from_json(&json.to_string())
}
