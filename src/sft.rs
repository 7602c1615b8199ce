//! Supervised warm-up ("SFT + RL"): teach the LoRA adapters to reply to a theorem's prompt with
//! its known proof, so that RL starts from a policy that sometimes succeeds.
//!
//! The prompt is exactly the one `train` and `eval` build ([`crate::rollout::prompt_tokens`]); the
//! target is the reply format proof extraction expects ([`completion_text`]) followed by the
//! model's end-of-turn token. The loss is the mean negative log-likelihood per target token, at
//! temperature 1, on the adapted policy; AdamW and its schedule are the trainer's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::data::{user_message, Theorem};
use crate::model::optim::Optimizer;
use crate::model::tokenizer::Tokenizer;
use crate::model::Policy;
use crate::rollout::prompt_tokens;

/// How long and how hard to fine-tune.
#[derive(Debug, Clone, PartialEq)]
pub struct SftOptions {
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Use only the first N records that carry a proof (`None`: all).
    pub limit: Option<usize>,
    /// Shuffles the examples each epoch.
    pub seed: u64,
}

impl Default for SftOptions {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 4,
            learning_rate: 2e-4,
            limit: None,
            seed: 0,
        }
    }
}

/// One supervised example: prompt tokens and the tokens to learn after them.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub theorem: String,
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct SftReport {
    pub examples: usize,
    pub steps: usize,
    /// Mean token NLL over all examples before the first and after the last update.
    pub nll_before: f64,
    pub nll_after: f64,
    pub adapter_dir: PathBuf,
}

/// The reply a model is taught for `proof`: a fenced `lean` block, as the prompt asks and as
/// proof extraction reads it.
pub fn completion_text(proof: &str) -> String {
    format!("```lean\n{}\n```", proof.trim())
}

/// The texts a tokenizer for theorem files should see (`init-model` trains one on them): every record's prompt message, proof
/// and the fenced reply the model is taught to write.
pub fn theorem_corpus(theorems: &[Theorem]) -> Vec<String> {
    let mut texts = Vec::new();
    for t in theorems {
        texts.push(user_message(t));
        if let Some(proof) = &t.proof {
            texts.push(completion_text(proof));
        }
    }
    texts
}

/// Examples for every theorem that has a `proof` (at most `limit`); an error when none has.
pub fn examples(
    tokenizer: &Tokenizer,
    theorems: &[Theorem],
    limit: Option<usize>,
) -> Result<Vec<Example>> {
    let end = end_of_turn(tokenizer)?;
    let mut out = Vec::new();
    for theorem in theorems {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let Some(proof) = theorem.proof.as_deref().filter(|p| !p.trim().is_empty()) else {
            continue;
        };
        let mut completion = tokenizer.encode(&completion_text(proof), false)?;
        completion.push(end);
        out.push(Example {
            theorem: theorem.name.clone(),
            prompt: prompt_tokens(tokenizer, theorem)?,
            completion,
        });
    }
    if out.is_empty() {
        bail!(
            "no record has a `proof`: supervised warm-up learns from known proofs; add a \
             \"proof\" field to the records (or pick a split that has them)"
        );
    }
    Ok(out)
}

/// The token that ends an assistant turn: `eos_token` of the tokenizer config, else the first
/// EOS id.
fn end_of_turn(tokenizer: &Tokenizer) -> Result<u32> {
    if let Some(id) = tokenizer
        .special_token("eos_token")
        .and_then(|t| tokenizer.token_to_id(t))
    {
        return Ok(id);
    }
    tokenizer
        .eos_ids()
        .first()
        .copied()
        .context("the tokenizer declares no EOS token, so a taught reply could never end")
}

/// Mean negative log-likelihood per completion token of `batch` (a scalar; with `grad` it
/// carries gradient to the adapters).
pub fn mean_nll(policy: &Policy, batch: &[&Example], grad: bool) -> Result<Tensor> {
    let (prompts, completions) = rows(batch);
    let logp = policy.logprobs(&prompts, &completions, 1.0, grad, true)?;
    token_mean_nll(&logp, &completions)
}

/// The mean NLL of `batch` and its gradient for the adapters (through
/// [`Policy::train_logprobs`], so gradient checkpointing applies).
fn nll_gradient(policy: &Policy, batch: &[&Example]) -> Result<(f32, GradStore)> {
    let (prompts, completions) = rows(batch);
    let forward = policy.train_logprobs(&prompts, &completions, 1.0)?;
    let loss = token_mean_nll(&forward.logp, &completions)?;
    let value = loss.to_scalar::<f32>()?;
    Ok((value, forward.backward(&loss)?))
}

fn rows(batch: &[&Example]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let prompts = batch.iter().map(|e| e.prompt.clone()).collect();
    let completions = batch.iter().map(|e| e.completion.clone()).collect();
    (prompts, completions)
}

fn token_mean_nll(logp: &Tensor, completions: &[Vec<u32>]) -> Result<Tensor> {
    let tokens: usize = completions.iter().map(Vec::len).sum();
    // Positions past a completion's end are zero in `logprobs`, so a plain sum is the masked sum.
    Ok((logp.sum_all()?.neg()? / tokens.max(1) as f64)?)
}

/// Mean token NLL over all `examples`, without gradient.
pub fn dataset_nll(policy: &Policy, examples: &[Example], batch_size: usize) -> Result<f64> {
    let mut total = 0.0;
    let mut tokens = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let n: usize = chunk.iter().map(|e| e.completion.len()).sum();
        total += mean_nll(policy, &refs, false)?.to_scalar::<f32>()? as f64 * n as f64;
        tokens += n;
    }
    Ok(total / tokens.max(1) as f64)
}

/// Loads the policy of `config.model` (with `config.model.adapter` when set), fine-tunes its
/// adapters on `theorems` and writes a PEFT adapter into `output`.
pub fn run_sft(
    config: &Config,
    theorems: &[Theorem],
    options: &SftOptions,
    output: &Path,
    show_progress: bool,
) -> Result<SftReport> {
    if options.batch_size == 0 || options.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    // Continues from `model.adapter` when one is set (`Policy::load` applies it).
    let mut policy = Policy::load(&config.model, &config.lora, options.seed)?;
    policy.set_gradient_checkpointing(config.train.gradient_checkpointing);
    let tokenizer = Tokenizer::from_dir(policy.model_dir())?;
    let examples = examples(&tokenizer, theorems, options.limit)?;
    let longest = examples
        .iter()
        .map(|e| e.prompt.len() + e.completion.len())
        .max()
        .unwrap_or(0);
    let context = policy.config().max_position_embeddings;
    if longest > context {
        bail!(
            "an example is {longest} tokens long but the model's context is {context} \
             (max_position_embeddings); use a model with a longer context"
        );
    }
    let steps_per_epoch = examples.len().div_ceil(options.batch_size);
    let steps = steps_per_epoch * options.epochs;
    let mut train = config.train.clone();
    train.learning_rate = options.learning_rate;
    let mut optimizer = Optimizer::new(&policy.lora_vars(), &train.optimizer(), steps)?;

    let nll_before = dataset_nll(&policy, &examples, options.batch_size)?;
    let bar = crate::progress::bar(steps, 0, "step", show_progress);
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    for epoch in 0..options.epochs {
        order.shuffle(&mut rng);
        for ids in order.chunks(options.batch_size) {
            let batch: Vec<&Example> = ids.iter().map(|&i| &examples[i]).collect();
            let (value, gradient) = nll_gradient(&policy, &batch)?;
            let mut grads = optimizer.accumulator();
            grads.add(gradient)?;
            optimizer.step(&mut grads.take(), train.max_grad_norm)?;
            bar.set_message(format!("epoch {}  loss {value:.3}", epoch + 1));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let nll_after = dataset_nll(&policy, &examples, options.batch_size)?;
    policy.write_adapter(output, &config.lora, &config.model.model)?;
    Ok(SftReport {
        examples: examples.len(),
        steps,
        nll_before,
        nll_after,
        adapter_dir: output.to_path_buf(),
    })
}
