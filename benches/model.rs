//! Policy speed on a Qwen2.5-0.5B-shaped model with random weights generated in memory
//! (24 layers, hidden 896, 14/2 heads, intermediate 4864, vocab 151936, tied embeddings), f32 on
//! the CPU: sampling tokens/s at batch 1 and 8, and one LoRA (r = 16, all seven projections)
//! forward + backward of the log-probs of 4 completions of 64 tokens.
//!
//! For context on a shared machine, the same weights also run through candle-transformers'
//! own `qwen2` (fused kernels, no LoRA, no batching): our batch-1 figure should be close to it.
//!
//! `cargo bench --bench model`. Prints figures; asserts nothing about speed.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lean_grpo::model::load::TensorMap;
use lean_grpo::model::sampler::Sampler;
use lean_grpo::model::{Config, GenerateOptions, LoraOptions, Policy, SamplingOptions};
use std::collections::HashMap;
use std::time::Instant;

const CONFIG: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
  "max_position_embeddings": 32768, "model_type": "qwen2", "num_attention_heads": 14,
  "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "tie_word_embeddings": true, "use_sliding_window": false,
  "vocab_size": 151936}"#;

fn random_weights(cfg: &Config, dev: &Device) -> Result<TensorMap> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut t = HashMap::new();
    let mut add = |name: String, shape: &[usize]| -> Result<()> {
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        let w = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, dev)?
        } else {
            Tensor::randn(0f32, (1.0 / fan_in.sqrt()) as f32, shape, dev)?
        };
        t.insert(name, w);
        Ok(())
    };
    add("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])?;
    add("model.norm.weight".into(), &[h])?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h])?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h])?;
        for (name, out, inp) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)] {
            add(format!("{p}.self_attn.{name}.weight"), &[out, inp])?;
            add(format!("{p}.self_attn.{name}.bias"), &[out])?;
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q])?;
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
        add(format!("{p}.mlp.up_proj.weight"), &[i, h])?;
        add(format!("{p}.mlp.down_proj.weight"), &[h, i])?;
    }
    Ok(TensorMap {
        tensors: t,
        dtype: DType::F32,
        origin: "random weights".into(),
    })
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|k| (seed * 7919 + k * 104_729) % 151_000)
        .collect()
}

fn sampling(policy: &Policy, prompts: usize, group: usize, new_tokens: usize) -> Result<()> {
    let prompts: Vec<Vec<u32>> = (0..prompts as u32).map(|s| prompt(s, 15)).collect();
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        eos_ids: Vec::new(),
        adapters: true,
    };
    let mut sampler = Sampler::new(&SamplingOptions::default(), 0);
    let start = Instant::now();
    let gens = policy.generate(
        &prompts,
        group,
        &opts,
        &mut |l: &[f32]| sampler.sample(l),
        &mut |_: &[u32]| false,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    println!(
        "sampling, batch {:>2} ({} prompt(s) x {group}, 15-token prompts, {new_tokens} new tokens): \
         {:.1} tokens/s ({tokens} tokens in {secs:.2} s, prefill included)",
        prompts.len() * group,
        prompts.len(),
        tokens as f64 / secs
    );
    Ok(())
}

fn train_step(policy: &Policy) -> Result<()> {
    let prompts: Vec<Vec<u32>> = (0..4).map(|s| prompt(s, 16)).collect();
    let completions: Vec<Vec<u32>> = (0..4).map(|s| prompt(s + 100, 64)).collect();
    let adv = Tensor::new(&[[1f32], [-1.0], [0.5], [-0.5]], policy.device())?;
    for round in 0..2 {
        let start = Instant::now();
        let logp = policy.logprobs(&prompts, &completions, 1.0, true, true)?;
        let loss = logp.broadcast_mul(&adv)?.mean_all()?;
        let fwd = start.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let total = start.elapsed().as_secs_f64();
        let with_grad = policy
            .trainable_vars()
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        println!(
            "LoRA r=16 forward+backward, 4 x (16 prompt + 64 completion) tokens, round {round}: \
             {total:.2} s (forward {fwd:.2} s, backward {:.2} s; {with_grad}/{} tensors with gradient)",
            total - fwd,
            policy.trainable_vars().len()
        );
    }
    let start = Instant::now();
    policy.logprobs(&prompts, &completions, 1.0, false, false)?;
    println!(
        "reference log-probs (no gradient, adapters off), same batch: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Batch-1 greedy decoding through candle-transformers' Qwen2 on the same weights.
fn candle_transformers_baseline(weights: &TensorMap, new_tokens: usize) -> Result<()> {
    use candle_transformers::models::qwen2;
    let dev = Device::Cpu;
    let json = CONFIG.replace(
        "\"vocab_size\"",
        "\"sliding_window\": 32768, \"max_window_layers\": 21, \"vocab_size\"",
    );
    let cfg: qwen2::Config = serde_json::from_str(&json)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &dev);
    let mut model = qwen2::ModelForCausalLM::new(&cfg, vb)?;
    let start = Instant::now();
    let prompt = prompt(0, 15);
    let mut logits = model.forward(&Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?, 0)?;
    for i in 0..new_tokens - 1 {
        let tok = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        logits = model.forward(&Tensor::new(&[[tok]], &dev)?, prompt.len() + i)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "baseline: candle-transformers qwen2, batch 1, {new_tokens} new tokens: {:.1} tokens/s",
        new_tokens as f64 / secs
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = Config::from_json(CONFIG)?;
    let start = Instant::now();
    let weights = random_weights(&cfg, &dev)?;
    let lora = LoraOptions::default();
    let policy = Policy::from_weights(
        &cfg,
        &weights,
        std::path::Path::new("."),
        &lora,
        &dev,
        DType::F32,
        0,
    )?;
    candle_transformers_baseline(&weights, 64)?;
    drop(weights);
    println!(
        "Qwen2.5-0.5B shape, random f32 weights, {} threads: built in {:.1} s",
        candle_core::utils::get_num_threads(),
        start.elapsed().as_secs_f64()
    );
    sampling(&policy, 1, 1, 64)?;
    sampling(&policy, 2, 4, 64)?;
    train_step(&policy)?;
    Ok(())
}
