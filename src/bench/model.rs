//! Policy speed on a random model of a given shape, f32 on the CPU: sampling tokens/s at batch
//! 1 and 8, the trainer's update of one group, and the reference (adapters off) log-probs that
//! a KL term adds. For context on a shared machine, candle-transformers' own `qwen2` (fused
//! kernels, no LoRA, no batching) decodes the same weights at batch 1: our batch-1 figure
//! should be close to it.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Map;

use super::{best_of, timed};
use crate::algo::{prepare, AlgoConfig, BatchShape, Prepared};
use crate::config::TrainOptions;
use crate::model::init::{random_model, InitOptions, LazyRandomWeights};
use crate::model::optim::Optimizer;
use crate::model::sampler::Sampler;
use crate::model::{GenerateOptions, LoraOptions, Policy, Quantize, SamplingOptions};
use crate::train::Update;

/// What the model section measures, and on which shapes.
#[derive(Debug, Clone, Serialize)]
pub struct ModelPlan {
    /// What the shape is (`Qwen2.5-0.5B`, `small`).
    pub shape: &'static str,
    pub model: InitOptions,
    /// Sampling: one prompt of this many tokens, prefilled once and copied to every row of the
    /// batch (as `train` samples a group), then this many new tokens per row (no EOS).
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Training step: one group of this many completions of one prompt.
    pub group_size: usize,
    pub train_prompt_tokens: usize,
    pub train_completion_tokens: usize,
    /// Memory: one group of this many completions of this many tokens after a prompt of this
    /// many (a real prompt's length: a header and instructions), with and without gradient
    /// checkpointing.
    pub memory_group_size: usize,
    pub memory_prompt_tokens: usize,
    pub memory_completion_tokens: usize,
    /// Each figure is the best of this many runs.
    pub rounds: usize,
}

/// What the model section ran with, besides the plan.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    #[serde(flatten)]
    pub plan: ModelPlan,
    pub parameters: usize,
    pub lora: LoraOptions,
    pub dtype: &'static str,
    pub candle_threads: usize,
}

/// Tokens generated per second, prefill included.
#[derive(Debug, Clone, Serialize)]
pub struct SamplingFigures {
    /// The default: the f32 weights and the LoRA branch, the training forward's arithmetic.
    pub batch_1_tokens_per_second: f64,
    pub batch_8_tokens_per_second: f64,
    /// A training step's rollout: 2 prompts × 8 completions decoded in one batch, as `train`
    /// samples (src/rollout/local.rs), and the same groups one after another, as it did before.
    pub step_one_batch_tokens_per_second: f64,
    pub step_group_by_group_tokens_per_second: f64,
    /// `--sample-dtype f16`: an f16 copy of the weights with the adapters merged in, as the
    /// second and later groups of a step (or of an evaluation) sample: the copy is already
    /// built. Building it is [`Self::f16_merge_seconds`], once per optimizer step.
    pub f16_merged_batch_1_tokens_per_second: f64,
    pub f16_merged_batch_8_tokens_per_second: f64,
    /// Building the f16 merged copy from the current adapters, after one untimed build.
    pub f16_merge_seconds: f64,
    pub candle_transformers_batch_1_tokens_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainingFigures {
    /// The trainer's own update of one generation batch (one group) with the GRPO preset:
    /// policy log-probs with gradient through the LoRA adapters, loss, backward, gradient
    /// clipping and one AdamW step, and the log-probs with the adapters off that the
    /// `kl_to_start` metric reads. No sampling, no Lean. Steady state: after one untimed
    /// update, as every step of a run but its first.
    pub step_seconds: f64,
    /// Log-probs of the same batch with the adapters off and no gradient: the part of
    /// `step_seconds` that `kl_to_start` costs (a `beta > 0` KL term reuses them).
    pub reference_logprobs_seconds: f64,
}

/// Peak resident memory (GiB, the whole process: weights included) of a phase, on Linux.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigures {
    /// Resident memory before the phases below: the f32 weights, mostly.
    pub model_rss_gib: Option<f64>,
    /// Sampling `memory_group_size` completions of the memory plan's prompt.
    pub sampling_peak_rss_gib: Option<f64>,
    /// Its speed, prefill of the long prompt included.
    pub sampling_tokens_per_second: f64,
    /// Resident after sampling, once the allocator has returned its free pages: what sampling
    /// leaves held for the rest of the run. With a Q4_K/Q8_0 base on an x86 CPU with VNNI this is
    /// candle's repacked copy of the weights that its decode kernel builds on first use
    /// (docs/model.md §8), which the training step's peak then includes.
    pub resident_after_sampling_gib: Option<f64>,
    /// The training update of that group (GRPO), the whole graph kept for the backward.
    pub training_step_peak_rss_gib: Option<f64>,
    /// The same update with `train.gradient_checkpointing`.
    pub training_step_checkpointed_peak_rss_gib: Option<f64>,
    pub training_step_seconds: f64,
    pub training_step_checkpointed_seconds: f64,
}

/// Builds the model and measures sampling and one training step.
pub fn measure(
    plan: &ModelPlan,
) -> Result<(
    ModelSettings,
    SamplingFigures,
    TrainingFigures,
    MemoryFigures,
)> {
    ensure!(
        plan.group_size >= 2,
        "the training step needs a group of two or more completions"
    );
    let dev = Device::Cpu;
    let model = random_model(&plan.model)?;
    tracing::info!(
        "bench: random {} model, {} parameters",
        plan.shape,
        model.parameters
    );
    let baseline = candle_transformers_batch_1(plan, &model.config_json, &model.weights)?;
    let lora = LoraOptions::default();
    let mut policy = Policy::from_weights(
        &model.config,
        &model.weights,
        std::path::Path::new("."),
        &lora,
        &dev,
        DType::F32,
        0,
    )?;
    drop(model.weights);
    let (batch_1, batch_8) = (sampling(&policy, plan, 1)?, sampling(&policy, plan, 8)?);
    let step_one_batch = sampling_step(&policy, plan, true)?;
    let step_group_by_group = sampling_step(&policy, plan, false)?;
    policy.set_sample_dtype(Some(DType::F16))?;
    let merge = || Ok(policy.decoder().sample_weights(DType::F16, true)?);
    // The first merges of a process also fault in the gigabyte they write (2-3 s against
    // ~0.8 s after); a run merges once per optimizer step, so one is run here untimed.
    merge()?;
    let (f16_merge_seconds, _) = best_of(plan.rounds, merge)?;
    // Builds the copy that the timed calls then reuse.
    policy.sampling_weights(true)?;
    let (f16_batch_1, f16_batch_8) = (sampling(&policy, plan, 1)?, sampling(&policy, plan, 8)?);
    policy.set_sample_dtype(None)?;
    let sampling = SamplingFigures {
        batch_1_tokens_per_second: batch_1,
        batch_8_tokens_per_second: batch_8,
        step_one_batch_tokens_per_second: step_one_batch,
        step_group_by_group_tokens_per_second: step_group_by_group,
        f16_merged_batch_1_tokens_per_second: f16_batch_1,
        f16_merged_batch_8_tokens_per_second: f16_batch_8,
        f16_merge_seconds,
        candle_transformers_batch_1_tokens_per_second: baseline,
    };
    let training = training_step(&policy, plan)?;
    let memory = memory(&mut policy, plan)?;
    let settings = ModelSettings {
        plan: plan.clone(),
        parameters: model.parameters,
        lora,
        dtype: "f32",
        candle_threads: candle_core::utils::get_num_threads(),
    };
    Ok((settings, sampling, training, memory))
}

/// `len` token ids below `vocab`, spread over the vocabulary, a different run per `seed`.
fn token_ids(seed: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|k| ((seed * 7919 + k * 104_729) % vocab) as u32)
        .collect()
}

fn sampling(policy: &Policy, plan: &ModelPlan, batch: usize) -> Result<f64> {
    let prompt = token_ids(0, plan.prompt_tokens, plan.model.vocab_size);
    let rate = sampling_groups(policy, plan, &[prompt], batch, true)?;
    tracing::info!("bench: sampling batch {batch}: {rate:.1} tokens/s");
    Ok(rate)
}

/// Tokens/s of a step's rollout: [`STEP_GROUPS`] distinct prompts × 8 completions, decoded in one
/// batch as `train` does (`together`), or one group after another.
fn sampling_step(policy: &Policy, plan: &ModelPlan, together: bool) -> Result<f64> {
    let prompts: Vec<Vec<u32>> = (0..STEP_GROUPS)
        .map(|i| token_ids(10 + i, plan.prompt_tokens, plan.model.vocab_size))
        .collect();
    let rate = sampling_groups(policy, plan, &prompts, 8, together)?;
    tracing::info!("bench: sampling a step, one batch {together}: {rate:.1} tokens/s");
    Ok(rate)
}

/// Groups of a step sampled by the step-sampling figures.
const STEP_GROUPS: usize = 2;

fn sampling_groups(
    policy: &Policy,
    plan: &ModelPlan,
    prompts: &[Vec<u32>],
    group_size: usize,
    together: bool,
) -> Result<f64> {
    let opts = GenerateOptions {
        max_new_tokens: plan.new_tokens,
        eos_ids: Vec::new(),
        adapters: true,
    };
    let batches: Vec<&[Vec<u32>]> = if together {
        vec![prompts]
    } else {
        prompts.chunks(1).collect()
    };
    let (seconds, tokens) = best_of(plan.rounds, || {
        let mut sampler = Sampler::new(&SamplingOptions::default(), 0);
        let mut tokens = 0;
        for batch in &batches {
            let gens = policy.generate(
                batch,
                group_size,
                &opts,
                &mut |rows: &[Vec<f32>]| sampler.sample_rows(rows),
                &mut |_: &[u32]| false,
            )?;
            tokens += gens.iter().map(|g| g.tokens.len()).sum::<usize>();
        }
        Ok(tokens)
    })?;
    Ok(tokens as f64 / seconds)
}

fn training_step(policy: &Policy, plan: &ModelPlan) -> Result<TrainingFigures> {
    let (g, width, vocab) = (
        plan.group_size,
        plan.train_completion_tokens,
        plan.model.vocab_size,
    );
    let prompts = vec![token_ids(1, plan.train_prompt_tokens, vocab); g];
    let completions: Vec<Vec<u32>> = (0..g).map(|i| token_ids(100 + i, width, vocab)).collect();
    let train = TrainOptions::default();
    let mut optimizer = Optimizer::new(&policy.lora_vars(), &train.optimizer(), plan.rounds + 1)?;
    let mut step = || one_update(policy, &prompts, &completions, &mut optimizer);
    // A run's first update also touches its activation memory for the first time and creates
    // the optimizer's moments (1-1.3 s more on the bench machine); a run pays that once in
    // hundreds of steps, so it is run here untimed.
    step()?;
    let (step_seconds, _) = best_of(plan.rounds, step)?;
    tracing::info!("bench: training step {step_seconds:.3} s");
    let (reference_logprobs_seconds, _) = best_of(plan.rounds, || {
        policy.logprobs(&prompts, &completions, 1.0, false, false)
    })?;
    Ok(TrainingFigures {
        step_seconds,
        reference_logprobs_seconds,
    })
}

/// Peak RSS of sampling and of the training update at the memory plan's lengths.
fn memory(policy: &mut Policy, plan: &ModelPlan) -> Result<MemoryFigures> {
    let sampled = sampling_memory(policy, plan)?;
    let (training_step_peak_rss_gib, training_step_seconds) = step_memory(policy, plan, false)?;
    let (checkpointed_peak, checkpointed_seconds) = step_memory(policy, plan, true)?;
    tracing::info!(
        "bench: memory: model {:?} GiB, sampling peak {:?} (resident after {:?}), training \
         step peak {training_step_peak_rss_gib:?} ({training_step_seconds:.1} s), checkpointed \
         {checkpointed_peak:?} ({checkpointed_seconds:.1} s)",
        sampled.model_rss_gib,
        sampled.peak_rss_gib,
        sampled.after_rss_gib
    );
    Ok(MemoryFigures {
        model_rss_gib: sampled.model_rss_gib,
        sampling_peak_rss_gib: sampled.peak_rss_gib,
        sampling_tokens_per_second: sampled.tokens_per_second,
        resident_after_sampling_gib: sampled.after_rss_gib,
        training_step_peak_rss_gib,
        training_step_checkpointed_peak_rss_gib: checkpointed_peak,
        training_step_seconds,
        training_step_checkpointed_seconds: checkpointed_seconds,
    })
}

/// What sampling the memory plan's group cost.
struct SampledMemory {
    /// Resident memory before sampling: the weights, mostly.
    model_rss_gib: Option<f64>,
    peak_rss_gib: Option<f64>,
    /// Resident afterwards, free pages returned.
    after_rss_gib: Option<f64>,
    tokens_per_second: f64,
}

/// The memory plan's prompt (a real prompt's length).
fn memory_prompt(plan: &ModelPlan) -> Vec<u32> {
    token_ids(2, plan.memory_prompt_tokens, plan.model.vocab_size)
}

fn sampling_memory(policy: &Policy, plan: &ModelPlan) -> Result<SampledMemory> {
    let prompt = memory_prompt(plan);
    crate::model::device::release_cpu_memory();
    let model_rss_gib = super::memory::rss_gib();
    let opts = GenerateOptions {
        max_new_tokens: plan.memory_completion_tokens,
        eos_ids: Vec::new(),
        adapters: true,
    };
    let (peak_rss_gib, (seconds, tokens)) = super::memory::peak_rss_gib(|| {
        timed(|| {
            let mut sampler = Sampler::new(&SamplingOptions::default(), 0);
            let gens = policy.generate(
                std::slice::from_ref(&prompt),
                plan.memory_group_size,
                &opts,
                &mut |rows: &[Vec<f32>]| sampler.sample_rows(rows),
                &mut |_: &[u32]| false,
            )?;
            Ok(gens.iter().map(|g| g.tokens.len()).sum::<usize>())
        })
    })?;
    crate::model::device::release_cpu_memory();
    Ok(SampledMemory {
        model_rss_gib,
        peak_rss_gib,
        after_rss_gib: super::memory::rss_gib(),
        tokens_per_second: tokens as f64 / seconds,
    })
}

/// Peak RSS and seconds of one training update of the memory plan's group.
fn step_memory(
    policy: &mut Policy,
    plan: &ModelPlan,
    checkpointing: bool,
) -> Result<(Option<f64>, f64)> {
    let (g, vocab, width) = (
        plan.memory_group_size,
        plan.model.vocab_size,
        plan.memory_completion_tokens,
    );
    let prompts = vec![memory_prompt(plan); g];
    let completions: Vec<Vec<u32>> = (0..g).map(|i| token_ids(200 + i, width, vocab)).collect();
    let settings = TrainOptions::default().optimizer();
    policy.set_gradient_checkpointing(checkpointing);
    let out = super::memory::peak_rss_gib(|| {
        let mut optimizer = Optimizer::new(&policy.lora_vars(), &settings, 1)?;
        timed(|| one_update(policy, &prompts, &completions, &mut optimizer))
    });
    policy.set_gradient_checkpointing(false);
    let (peak, (seconds, ())) = out?;
    Ok((peak, seconds))
}

/// The memory figures of a model whose linear layers' base weights are quantized
/// (`--quantize`), built from [`LazyRandomWeights`] so that no f32 copy of them ever exists.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizedFigures {
    pub shape: &'static str,
    pub quantize: Quantize,
    /// What the linear layers' frozen weights hold, and would hold in f32.
    pub linear_weights_gib: f64,
    pub linear_weights_f32_gib: f64,
    pub model_rss_gib: Option<f64>,
    pub sampling_peak_rss_gib: Option<f64>,
    pub sampling_tokens_per_second: f64,
    /// Resident after sampling, once the allocator has returned its free pages: what sampling
    /// leaves held for the rest of the run. With a Q4_K/Q8_0 base on an x86 CPU with VNNI this is
    /// candle's repacked copy of the weights that its decode kernel builds on first use
    /// (docs/model.md §8), which the training step's peak then includes.
    pub resident_after_sampling_gib: Option<f64>,
    /// The whole graph kept for the backward; `None` where the plan skips it (the 7B shape,
    /// whose activations alone would not fit the bench machine).
    pub training_step_peak_rss_gib: Option<f64>,
    pub training_step_seconds: Option<f64>,
    pub training_step_checkpointed_peak_rss_gib: Option<f64>,
    pub training_step_checkpointed_seconds: f64,
}

/// A quantized memory measurement: the model plan and its format.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizedPlan {
    #[serde(flatten)]
    pub model: ModelPlan,
    pub quantize: Quantize,
    /// Also measure the step without checkpointing.
    pub full_graph: bool,
}

pub fn measure_quantized(plan: &QuantizedPlan) -> Result<QuantizedFigures> {
    let weights = LazyRandomWeights {
        options: plan.model.model.clone(),
        quantize: plan.quantize.target(),
    };
    let config = weights.config()?;
    tracing::info!(
        "bench: random {} model, linear weights in {:?}",
        plan.model.shape,
        plan.quantize
    );
    let mut policy = Policy::from_weights(
        &config,
        &weights,
        std::path::Path::new("."),
        &LoraOptions::default(),
        &Device::Cpu,
        DType::F32,
        0,
    )?;
    let (bytes, _) = policy.decoder().frozen_linear_bytes();
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let kv = config.num_key_value_heads * config.head_dim;
    let q = config.num_attention_heads * config.head_dim;
    let linear = config.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * i);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let sampled = sampling_memory(&policy, &plan.model)?;
    let full = if plan.full_graph {
        let (peak, seconds) = step_memory(&mut policy, &plan.model, false)?;
        (peak, Some(seconds))
    } else {
        (None, None)
    };
    let (checkpointed_peak, checkpointed_seconds) = step_memory(&mut policy, &plan.model, true)?;
    tracing::info!(
        "bench: quantized {}: linear weights {:.2} GiB, model {:?} GiB, sampling peak {:?} \
         ({:.1} tokens/s, resident after {:?}), training step peak {:?}, checkpointed \
         {checkpointed_peak:?} ({checkpointed_seconds:.1} s)",
        plan.model.shape,
        gib(bytes),
        sampled.model_rss_gib,
        sampled.peak_rss_gib,
        sampled.tokens_per_second,
        sampled.after_rss_gib,
        full.0
    );
    Ok(QuantizedFigures {
        shape: plan.model.shape,
        quantize: plan.quantize,
        linear_weights_gib: gib(bytes),
        linear_weights_f32_gib: gib(4 * linear),
        model_rss_gib: sampled.model_rss_gib,
        sampling_peak_rss_gib: sampled.peak_rss_gib,
        sampling_tokens_per_second: sampled.tokens_per_second,
        resident_after_sampling_gib: sampled.after_rss_gib,
        training_step_peak_rss_gib: full.0,
        training_step_seconds: full.1,
        training_step_checkpointed_peak_rss_gib: checkpointed_peak,
        training_step_checkpointed_seconds: checkpointed_seconds,
    })
}

/// GRPO on one group of `g` completions of `width` tokens, half of them right: non-zero
/// advantages, so every update has a gradient to apply.
fn grpo_group(g: usize, width: usize) -> Result<(AlgoConfig, Prepared)> {
    let shape = BatchShape {
        group_size: g,
        max_completion_length: width,
    };
    let algo = AlgoConfig::resolve("grpo", &Map::new(), shape)?;
    let rewards: Vec<f64> = (0..g).map(|i| (i % 2) as f64).collect();
    let prepared = prepare(&algo, &rewards, &vec![width; g], &vec![false; g])?;
    Ok((algo, prepared))
}

/// The trainer's update of one GRPO group (half of it right) with the default settings.
fn one_update(
    policy: &Policy,
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    optimizer: &mut Optimizer,
) -> Result<()> {
    let width = completions.iter().map(Vec::len).max().unwrap_or(0);
    let (algo, prepared) = grpo_group(completions.len(), width)?;
    let update = Update {
        algo: &algo,
        policy,
        temperature: 1.0,
        micro_batches: 1,
        max_grad_norm: TrainOptions::default().max_grad_norm,
    };
    let outcome = update.run_tokens(&prepared, prompts, completions, optimizer)?;
    ensure!(outcome.stepped, "the training step took no optimizer step");
    Ok(())
}

/// Batch-1 greedy decoding through candle-transformers' Qwen2 on the same weights: tokens/s.
fn candle_transformers_batch_1(
    plan: &ModelPlan,
    config_json: &serde_json::Value,
    weights: &crate::model::weights::TensorMap,
) -> Result<f64> {
    use candle_transformers::models::qwen2;
    let dev = Device::Cpu;
    let cfg: qwen2::Config = serde_json::from_value(config_json.clone())?;
    let vb = candle_nn::VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &dev);
    let mut model = qwen2::ModelForCausalLM::new(&cfg, vb)?;
    let prompt = token_ids(0, plan.prompt_tokens, plan.model.vocab_size);
    let (seconds, _) = best_of(plan.rounds, || {
        model.clear_kv_cache();
        let input = Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?;
        let mut logits = model.forward(&input, 0)?;
        for i in 1..plan.new_tokens {
            let token = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            logits = model.forward(&Tensor::new(&[[token]], &dev)?, prompt.len() + i - 1)?;
        }
        Ok(())
    })?;
    Ok(plan.new_tokens as f64 / seconds)
}
