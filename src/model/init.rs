//! A tiny randomly initialised Qwen2 model in Hugging Face layout, built from scratch: a
//! byte-level BPE tokenizer trained on a corpus, ChatML chat template, config and seeded f32
//! weights.
//!
//! Why: from-scratch experiments (does the trainer learn at all, on CPU, in minutes?) need a
//! model whose tokenizer fits the data (a Lean preamble of 1,700 characters becomes a few
//! hundred tokens, not a thousand) and whose size is a flag, with no download. Everything is
//! a pure function of the corpus and the seed, so a run that starts from it is reproducible.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// Special tokens, in id order (0, 1, 2), with Qwen's names so ChatML prompts look familiar.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as Qwen2.5 renders it without a system prompt.
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}{{ '<|im_start|>' + \
message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if \
add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// Sizes of the model to build.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InitOptions {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    /// Target vocabulary size of the BPE tokenizer (at least 256 bytes + 3 special tokens).
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub seed: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            vocab_size: 1024,
            max_position_embeddings: 2048,
            seed: 0,
        }
    }
}

/// What [`init_model`] wrote.
#[derive(Debug, Clone)]
pub struct InitSummary {
    /// Vocabulary of the trained tokenizer (may be below the target on a small corpus).
    pub vocab_size: usize,
    pub parameters: usize,
}

/// Trains the tokenizer on `texts`, writes a complete HF model directory into `out` and
/// returns its vocabulary and parameter count.
pub fn init_model(texts: &[String], options: &InitOptions, out: &Path) -> Result<InitSummary> {
    check_sizes(options)?;
    if texts.iter().all(|t| t.trim().is_empty()) {
        bail!("the tokenizer corpus is empty: give texts to train the tokenizer on");
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the model directory {}", out.display()))?;
    let tokenizer = train_tokenizer(texts, options.vocab_size)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let tokenizer_path = out.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| anyhow!("cannot write {}: {e}", tokenizer_path.display()))?;
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| anyhow!("the trained tokenizer lost the special token {token}"))
    };
    let (eot, im_end) = (id(SPECIAL_TOKENS[0])?, id(SPECIAL_TOKENS[2])?);

    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            let entry = json!({"content": t, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true});
            Ok((id(t)?.to_string(), entry))
        })
        .collect::<Result<_>>()?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({
            "added_tokens_decoder": added,
            "add_bos_token": false,
            "bos_token": null,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": SPECIAL_TOKENS[2],
            "pad_token": SPECIAL_TOKENS[0],
            "model_max_length": options.max_position_embeddings,
            "tokenizer_class": "Qwen2Tokenizer",
        }),
    )?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot}),
    )?;
    write_json(
        &out.join("config.json"),
        &config_json(options, vocab_size, eot, im_end),
    )?;

    let weights = random_weights(options, vocab_size)?;
    let parameters = weights.values().map(|t| t.elem_count()).sum();
    let path = out.join("model.safetensors");
    candle_core::safetensors::save(&weights, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(InitSummary {
        vocab_size,
        parameters,
    })
}

/// A model of these sizes in memory, with no tokenizer and nothing written: its `config.json`
/// as [`init_model`] writes it, the parsed [`ModelConfig`](super::ModelConfig), and the same seeded
/// weights. For speed measurements, where only the shapes matter (token ids are any numbers
/// below `vocab_size`).
pub struct RandomModel {
    pub config_json: serde_json::Value,
    pub config: super::ModelConfig,
    pub weights: super::weights::TensorMap,
    pub parameters: usize,
}

/// Builds a [`RandomModel`]. The output head is untied from the embedding, as in
/// [`init_model`]: a model whose checkpoint ties them (Qwen2.5-0.5B) runs the same matmul.
pub fn random_model(options: &InitOptions) -> Result<RandomModel> {
    check_sizes(options)?;
    let vocab = options.vocab_size;
    let config_json = config_json(options, vocab, 0, 2);
    let config = super::ModelConfig::from_json(&config_json.to_string())?;
    let tensors = random_weights(options, vocab)?;
    let parameters = tensors.values().map(|t| t.elem_count()).sum();
    Ok(RandomModel {
        config_json,
        config,
        weights: super::weights::TensorMap::dense(
            tensors,
            candle_core::DType::F32,
            "random weights".into(),
        ),
        parameters,
    })
}

fn check_sizes(o: &InitOptions) -> Result<()> {
    let heads = o.num_attention_heads;
    if o.hidden_size == 0 || o.num_hidden_layers == 0 || o.intermediate_size == 0 {
        bail!("hidden size, layers and intermediate size must be at least 1");
    }
    if heads == 0 || o.hidden_size % heads != 0 || (o.hidden_size / heads) % 2 != 0 {
        bail!(
            "hidden size {} must split into {heads} heads of an even size (rotary embeddings)",
            o.hidden_size
        );
    }
    if o.num_key_value_heads == 0 || heads % o.num_key_value_heads != 0 {
        bail!(
            "{heads} attention heads must be a multiple of {} key/value heads",
            o.num_key_value_heads
        );
    }
    let min_vocab = 256 + SPECIAL_TOKENS.len();
    if o.vocab_size < min_vocab {
        bail!(
            "vocabulary size {} is below {min_vocab} (256 bytes + {} special tokens)",
            o.vocab_size,
            SPECIAL_TOKENS.len()
        );
    }
    Ok(())
}

/// A byte-level BPE (GPT-2/Qwen style: any text encodes, nothing is unknown) trained on `texts`,
/// with [`SPECIAL_TOKENS`] at ids 0, 1, 2.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.with_post_processor(Some(byte_level));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training the BPE tokenizer failed: {e}"))?;
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow!("cannot register the special tokens: {e}"))?;
    Ok(tokenizer)
}

fn config_json(o: &InitOptions, vocab: usize, eot: u32, im_end: u32) -> serde_json::Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": o.hidden_size,
        "intermediate_size": o.intermediate_size,
        "num_hidden_layers": o.num_hidden_layers,
        "num_attention_heads": o.num_attention_heads,
        "num_key_value_heads": o.num_key_value_heads,
        "max_position_embeddings": o.max_position_embeddings,
        "max_window_layers": o.num_hidden_layers,
        "sliding_window": o.max_position_embeddings,
        "use_sliding_window": false,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "attention_dropout": 0.0,
        "initializer_range": INITIALIZER_RANGE,
        "vocab_size": vocab,
        "bos_token_id": eot,
        "eos_token_id": im_end,
        "torch_dtype": "float32",
        "use_cache": true,
    })
}

/// transformers' `initializer_range`, written to config.json for tools that read it. The weights
/// here use 1/√fan_in instead: at hidden 64, 0.02 would make every attention near-uniform and
/// every MLP output near zero (its gradient is a product of two tiny factors), and a LoRA-only
/// learner on such a base barely moves.
const INITIALIZER_RANGE: f64 = 0.02;

/// Norm of a row of the output head. LoRA never touches the head, so it must let a hidden state
/// (RMS-normed to length √hidden) single out one token with a confident margin: rows of length
/// 2 allow logits up to 2·√hidden, while a random hidden state sees logits of spread 2 (a start
/// near uniform). transformers' 0.02 would cap every logit near 0.2·√hidden and leave a
/// LoRA-only learner unable to become confident at all. The head is untied from the input
/// embedding: tied, each position would predict its own input token with that same confidence.
const HEAD_ROW_NORM: f64 = 2.0;

/// Seeded normal weights in Qwen2's tensor names: projections N(0, 1/fan_in), biases 0, norms 1,
/// embedding and head as described at [`HEAD_ROW_NORM`].
fn random_weights(o: &InitOptions, vocab: usize) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let h = o.hidden_size;
    let head_dim = h / o.num_attention_heads;
    let kv = o.num_key_value_heads * head_dim;
    let mut out = HashMap::new();
    let mut normal = |shape: &[usize], std: f64| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (std * gaussian(&mut rng)) as f32).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    };
    // Input rows of unit length: the residual stream starts at the scale RMS norm works at.
    let unit = 1.0 / (h as f64).sqrt();
    out.insert(
        "model.embed_tokens.weight".into(),
        normal(&[vocab, h], unit)?,
    );
    let head_std = HEAD_ROW_NORM / (h as f64).sqrt();
    out.insert("lm_head.weight".into(), normal(&[vocab, h], head_std)?);
    for i in 0..o.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", o.intermediate_size, h),
            ("mlp.up_proj", o.intermediate_size, h),
            ("mlp.down_proj", h, o.intermediate_size),
        ] {
            let std = 1.0 / (cols as f64).sqrt();
            out.insert(format!("{p}.{name}.weight"), normal(&[rows, cols], std)?);
        }
        for (name, size) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
            let zeros = Tensor::zeros(size, candle_core::DType::F32, &Device::Cpu)?;
            out.insert(format!("{p}.self_attn.{name}.bias"), zeros);
        }
        for name in ["input_layernorm", "post_attention_layernorm"] {
            let ones = Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?;
            out.insert(format!("{p}.{name}.weight"), ones);
        }
    }
    let ones = Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?;
    out.insert("model.norm.weight".into(), ones);
    Ok(out)
}

/// Random weights of `options`' shape made tensor by tensor when the model asks for them, the
/// linear layers' quantized as they are made (`quantize`): the bench's quantized figures at
/// 7B shapes, whose f32 weights (28 GB) would not fit where their Q4_K ones do. Same
/// distributions as [`random_model`], drawn per tensor from a seed of its name.
pub struct LazyRandomWeights {
    pub options: InitOptions,
    pub quantize: Option<candle_core::quantized::GgmlDType>,
}

impl LazyRandomWeights {
    /// The model config of these weights (untied head, like [`random_model`]).
    pub fn config(&self) -> Result<super::ModelConfig> {
        check_sizes(&self.options)?;
        let json = config_json(&self.options, self.options.vocab_size, 0, 2);
        super::ModelConfig::from_json(&json.to_string())
    }

    /// How tensor `name` is drawn (`fan_in`: its last dimension), as [`random_weights`] draws
    /// it; `None` for a tensor the model does not have.
    fn draw(&self, name: &str, fan_in: usize) -> Option<Draw> {
        let h = self.options.hidden_size as f64;
        let layer = name.starts_with("model.layers.");
        Some(match name {
            "model.embed_tokens.weight" => Draw::Normal(1.0 / h.sqrt()),
            "lm_head.weight" => Draw::Normal(HEAD_ROW_NORM / h.sqrt()),
            n if n.ends_with("norm.weight") => Draw::Const(1.0),
            n if layer
                && ["q", "k", "v"]
                    .iter()
                    .any(|p| n.ends_with(&format!("{p}_proj.bias"))) =>
            {
                Draw::Const(0.0)
            }
            n if layer && n.ends_with("_proj.weight") => Draw::Normal(1.0 / (fan_in as f64).sqrt()),
            _ => return None,
        })
    }

    fn make(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        use rayon::prelude::*;
        let fan_in = shape.last().copied().unwrap_or(1);
        let std = match self.draw(name, fan_in) {
            Some(Draw::Normal(std)) => std,
            Some(Draw::Const(v)) => return Ok(Tensor::full(v, shape, &Device::Cpu)?),
            None => bail!("random weights have no tensor `{name}`"),
        };
        // FNV-1a of the name: each tensor its own stream, whatever order they are asked in.
        let key = name
            .bytes()
            .fold(self.options.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        const CHUNK: usize = 1 << 16;
        let mut data = vec![0f32; shape.iter().product()];
        data.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut rng = ChaCha8Rng::seed_from_u64(key);
                rng.set_stream(i as u64);
                for v in chunk {
                    *v = (std * gaussian(&mut rng)) as f32;
                }
            });
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// How [`LazyRandomWeights`] fills a tensor.
enum Draw {
    Normal(f64),
    Const(f32),
}

impl super::weights::WeightSource for LazyRandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.make(name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.draw(name, 1).is_some()
    }

    fn get_frozen(&self, name: &str, shape: &[usize]) -> Result<super::quant::Frozen> {
        let dense = self.make(name, shape)?;
        match self.quantize {
            Some(format) => super::quant::Frozen::quantize(&dense, format, name),
            None => Ok(super::quant::Frozen::Dense(dense)),
        }
    }
}

/// A standard normal draw (Box–Muller), so the weights depend on the seed alone.
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}
