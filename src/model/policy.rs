//! The policy the trainer drives: one decoder with LoRA adapters that serves as the current
//! policy (adapters on), the old policy (adapters on, no gradient) and the reference policy
//! (adapters off), without a second copy of the weights.

use super::adapter::{load_adapter, Adapter, AdapterWeights};
use super::config::ModelConfig;
use super::decoder::{
    BatchLevel, Decoder, LayerTape, LoraSpec, SampleWeights, SharedBatch, LORA_MODULES,
};
use super::device::{model_dtype, tune_cpu_allocator};
use super::load::{load_model, HubSettings};
use super::lora::Pass;
use super::ops::{lm_head_logprobs, logp_dtype};
use super::options::{LoraOptions, ModelOptions};
use super::prefix::{PrefixLayout, Slot};
use super::weights::{ModelFiles, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

/// Rows per forward when log-probs are computed without gradient: bounds the attention scores,
/// which grow as rows × heads × C × (P + C). One RL step of the default 2 theorems × 8 fits in
/// one pass, so the theorems' common prompt start is computed once for both.
const NO_GRAD_ROWS: usize = 16;

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Generated tokens, including the EOS token that ended it, if any.
    pub tokens: Vec<u32>,
    /// Ended by one of the EOS ids.
    pub finished_by_eos: bool,
    /// Reached `max_new_tokens` without EOS or stop.
    pub truncated: bool,
}

/// What [`Policy::generate`] needs besides the prompts and the sampler.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// A completion ends after emitting any of these.
    pub eos_ids: Vec<u32>,
    /// Sample from the adapted policy (`false`: the base model).
    pub adapters: bool,
}

/// A LoRA-adapted Llama/Qwen2/Qwen3 model.
pub struct Policy {
    decoder: Decoder,
    dir: PathBuf,
    /// Behind a mutex so that the policy is `Sync` (shared by the trainer's threads).
    dropout_rng: std::sync::Mutex<ChaCha8Rng>,
    /// Sample from merged weights in this dtype (see [`Decoder::sample_weights`]); `None`:
    /// sample through the frozen weights and the LoRA branch, exactly the training forward.
    sample_dtype: Option<DType>,
    /// The merged copy last built, kept while the adapters stay as they were.
    sampling_copy: std::sync::Mutex<Option<SamplingCopy>>,
    /// [`Self::train_logprobs`] checkpoints per layer (see [`Decoder::forward_checkpointed`]).
    gradient_checkpointing: bool,
}

/// The longest completion, after checking there is one prompt per completion.
fn row_width(prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Result<usize> {
    if prompts.len() != completions.len() {
        bail!(
            "{} prompts for {} completions",
            prompts.len(),
            completions.len()
        );
    }
    Ok(completions.iter().map(Vec::len).max().unwrap_or(0))
}

/// How [`Policy::logprobs_rows`] runs the model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoGrad,
    /// The whole graph kept for `backward()`.
    Graph,
    /// Per-layer checkpoints kept for [`TrainLogProbs::backward`].
    Checkpointed,
}

/// Log-probs `[B, width]` of [`Policy::train_logprobs`], with what their backward needs.
pub struct TrainLogProbs<'a> {
    pub logp: Tensor,
    tape: Option<LayerTape>,
    policy: &'a Policy,
}

impl TrainLogProbs<'_> {
    /// Gradients of `loss` (a function of [`Self::logp`]) for the adapters.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        let grads = loss.backward()?;
        Ok(match self.tape {
            None => grads,
            Some(tape) => {
                let pass = self.policy.train_pass();
                self.policy
                    .decoder
                    .backward_checkpointed(tape, grads, &pass)?
            }
        })
    }
}

/// A merged sampling copy and what it was built from.
///
/// Why keep it: `train` and `eval` sample one theorem's group per [`Policy::generate`] call,
/// and a merge reads every weight (about a second for a 0.5B model on two cores), as long as
/// sampling a few dozen tokens. Between optimizer steps the adapters do not change, so one
/// merge serves every group of a step, and every theorem of an evaluation.
struct SamplingCopy {
    dtype: DType,
    adapters: bool,
    /// Every adapter tensor (A, B per adapted linear, [`Policy::lora_vars`] order) as it was
    /// when the copy was merged: the copy is reused only while they are all still equal.
    lora: Vec<Tensor>,
    weights: Arc<SampleWeights>,
}

impl Policy {
    /// Loads the model named by `model` (hub id, HF directory or `.gguf`) on its device and
    /// adds fresh adapters per `lora`, drawn from `seed`.
    pub fn load(model: &ModelOptions, lora: &LoraOptions, seed: u64) -> Result<Policy> {
        let device = model.device.open()?;
        let dtype = model_dtype(model.dtype, &device);
        let sample_dtype = model.sample_dtype.map(|p| p.dtype());
        let files = load_model(
            &model.model,
            &model.revision,
            &HubSettings::from_env(),
            &device,
            dtype,
            model.quantize,
        )
        .with_context(|| format!("loading model {}", model.model))?;
        let mut policy = Self::from_files(files, lora, &device, dtype, seed)?;
        policy.set_sample_dtype(sample_dtype)?;
        if let Some(dir) = &model.adapter {
            policy.read_adapter(Path::new(dir), lora)?;
        }
        Ok(policy)
    }

    /// Builds the policy from already loaded files.
    pub fn from_files(
        files: ModelFiles,
        lora: &LoraOptions,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Policy> {
        Self::from_weights(
            &files.config,
            files.weights.as_ref(),
            &files.dir,
            lora,
            device,
            dtype,
            seed,
        )
    }

    /// Builds the policy from any weight source (e.g. generated weights in benchmarks).
    pub fn from_weights(
        config: &ModelConfig,
        weights: &dyn WeightSource,
        dir: &Path,
        lora: &LoraOptions,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Policy> {
        if let Some(bad) = lora
            .target_modules
            .iter()
            .find(|m| !LORA_MODULES.contains(&m.as_str()))
        {
            bail!(
                "lora.target_modules: unknown module `{bad}` (expected some of {LORA_MODULES:?})"
            );
        }
        if lora.r == 0 && !lora.target_modules.is_empty() {
            bail!("lora.r must be at least 1");
        }
        if !(0.0..1.0).contains(&lora.lora_dropout) {
            bail!(
                "lora.lora_dropout must be in [0, 1), got {}",
                lora.lora_dropout
            );
        }
        if device.is_cpu() {
            tune_cpu_allocator();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let spec = LoraSpec {
            r: lora.r,
            alpha: lora.lora_alpha,
            dropout: lora.lora_dropout,
            targets: &lora.target_modules,
            rng: &mut rng,
        };
        let decoder = Decoder::new(config, weights, device, dtype, Some(spec))?;
        // A separate stream for dropout, so changing the dropout rate does not move A's init.
        let dropout_rng = std::sync::Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d20f));
        Ok(Policy {
            decoder,
            dir: dir.to_path_buf(),
            dropout_rng,
            sample_dtype: None,
            sampling_copy: std::sync::Mutex::new(None),
            gradient_checkpointing: false,
        })
    }

    /// Samples from a merged copy of the weights in `dtype` (`None`: through the adapters).
    /// The copy's dtype must be the model's, or f16 for an f32 model on the CPU (the decode
    /// kernels read f16 weights with f32 activations).
    pub fn set_sample_dtype(&mut self, dtype: Option<DType>) -> Result<()> {
        let model = self.decoder.dtype();
        if let Some(d) = dtype {
            let cpu_f16 = d == DType::F16 && model == DType::F32 && self.device().is_cpu();
            if d != model && !cpu_f16 {
                bail!(
                    "--sample-dtype {}: sampling weights must be in the model dtype ({}) or, \
                     for an f32 model on the CPU, in f16",
                    d.as_str(),
                    model.as_str()
                );
            }
        }
        self.sample_dtype = dtype;
        Ok(())
    }

    /// Recompute each layer in the backward instead of keeping its activations
    /// (`train.gradient_checkpointing`): the same gradient for one more forward's time, with the
    /// memory of one layer's activations instead of all of them.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn config(&self) -> &ModelConfig {
        self.decoder.config()
    }

    /// The merged weights [`Self::generate`] samples from (`None` without a sample dtype):
    /// the copy kept from an earlier call when it was built for the same dtype and `adapters`
    /// from adapters equal to the current ones, a fresh merge otherwise.
    pub fn sampling_weights(&self, adapters: bool) -> Result<Option<Arc<SampleWeights>>> {
        let Some(dtype) = self.sample_dtype else {
            return Ok(None);
        };
        let lora: Vec<Tensor> = if adapters {
            self.lora_vars()
                .into_iter()
                .flat_map(|(_, a, b)| [a.as_tensor().clone(), b.as_tensor().clone()])
                .collect()
        } else {
            Vec::new()
        };
        let mut kept = self.sampling_copy_slot();
        if let Some(copy) = kept.as_ref() {
            if copy.dtype == dtype && copy.adapters == adapters && same(&copy.lora, &lora)? {
                return Ok(Some(copy.weights.clone()));
            }
        }
        // Free the old copy before building the new one: never two copies at once.
        *kept = None;
        let weights = Arc::new(self.decoder.sample_weights(dtype, adapters)?);
        // `copy`: a variable's tensor shares its storage, which the optimizer overwrites.
        let lora = lora
            .iter()
            .map(Tensor::copy)
            .collect::<candle_core::Result<_>>()?;
        *kept = Some(SamplingCopy {
            dtype,
            adapters,
            lora,
            weights: weights.clone(),
        });
        Ok(Some(weights))
    }

    fn sampling_copy_slot(&self) -> MutexGuard<'_, Option<SamplingCopy>> {
        // A panic while the lock was held left at worst a stale `None` or a complete copy.
        self.sampling_copy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// Directory with the checkpoint's tokenizer files, or the `.gguf` file whose metadata
    /// holds the tokenizer; `Tokenizer::from_dir` takes either.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The adapters by HF module path (`model.layers.0.self_attn.q_proj`): `A` `[r, in]` and
    /// `B` `[out, r]`, in layer order. These are the only trainable tensors.
    pub fn lora_vars(&self) -> Vec<(String, Var, Var)> {
        self.decoder
            .linears()
            .into_iter()
            .filter_map(|(name, lin)| lin.adapter().map(|a| (name, a.a.clone(), a.b.clone())))
            .collect()
    }

    /// Overwrites adapter weights (e.g. from a saved adapter): `(module path, A, B)`. Every
    /// name must be an adapted module and shapes must match.
    pub fn set_lora_weights(&self, weights: &[(String, Tensor, Tensor)]) -> Result<()> {
        let vars = self.lora_vars();
        for (name, a, b) in weights {
            let Some((_, va, vb)) = vars.iter().find(|(n, _, _)| n == name) else {
                bail!("adapter weight for `{name}`, which has no LoRA adapter in this model");
            };
            for (what, v, t) in [("A", va, a), ("B", vb, b)] {
                if v.dims() != t.dims() {
                    bail!(
                        "adapter {what} of `{name}`: shape {:?}, expected {:?} (different rank?)",
                        t.dims(),
                        v.dims()
                    );
                }
                // `copy`: `Var::set` refuses a tensor sharing the variable's own storage.
                v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?.copy()?)?;
            }
        }
        Ok(())
    }

    /// Copies of the current adapter weights, for [`super::adapter::save_adapter`].
    pub fn adapter_weights(&self) -> Result<Vec<AdapterWeights>> {
        self.lora_vars()
            .into_iter()
            .map(|(module, a, b)| {
                Ok(AdapterWeights {
                    module,
                    a: a.as_tensor().copy()?,
                    b: b.as_tensor().copy()?,
                })
            })
            .collect()
    }

    /// Replaces the adapters by a saved one, which must adapt exactly the modules this policy
    /// adapts (a module left out would silently keep its fresh initialisation).
    pub fn load_adapter(&self, adapter: &Adapter) -> Result<()> {
        let ours: std::collections::BTreeSet<String> =
            self.lora_vars().into_iter().map(|(n, _, _)| n).collect();
        let theirs: std::collections::BTreeSet<String> =
            adapter.weights.iter().map(|w| w.module.clone()).collect();
        if ours != theirs {
            let missing: Vec<_> = ours.difference(&theirs).take(3).collect();
            let extra: Vec<_> = theirs.difference(&ours).take(3).collect();
            bail!("the adapter does not cover this model's LoRA modules (missing {missing:?}, unexpected {extra:?})");
        }
        let weights: Vec<_> = adapter
            .weights
            .iter()
            .map(|w| (w.module.clone(), w.a.clone(), w.b.clone()))
            .collect();
        self.set_lora_weights(&weights)
    }

    /// Replaces the adapters by the PEFT adapter in `dir`, which must have been trained with
    /// `lora`'s rank, alpha and targets: the one way an adapter directory (a warm start, a
    /// checkpoint) enters a policy.
    pub fn read_adapter(&self, dir: &Path, lora: &LoraOptions) -> Result<()> {
        let adapter = load_adapter(dir, self.device())
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        adapter
            .ensure_matches(lora)
            .with_context(|| format!("the adapter {}", dir.display()))?;
        self.load_adapter(&adapter)
            .with_context(|| format!("applying the adapter {}", dir.display()))
    }

    /// Writes the adapters into `dir` as a PEFT adapter of `base_model` (atomically: a crash
    /// leaves the previous adapter or this one).
    pub fn write_adapter(&self, dir: &Path, lora: &LoraOptions, base_model: &str) -> Result<()> {
        super::adapter::save_adapter(dir, &self.adapter_weights()?, lora, base_model)
            .with_context(|| format!("writing the adapter to {}", dir.display()))
    }

    /// Per-token log-probs of `completions[i]` after `prompts[i]`: `[B, max completion len]`
    /// f32 (f64 for an f64 model), zero beyond each completion. `log_softmax(logits / temperature)` at the sampled
    /// token (docs/algorithms.md §1). With `grad` the result carries gradient to the adapters;
    /// `adapters = false` gives the reference policy.
    ///
    /// Prompt tokens are computed once (src/model/prefix.rs): each distinct prompt goes through
    /// the model once and its rows' completions attend to it; where that computes fewer
    /// positions, the prompts' common start goes through once, then the rest of each distinct
    /// prompt (or of each row's prompt, followed by its completion).
    ///
    /// Memory: a gradient pass keeps, per layer, attention scores of heads × (Σ over levels of
    /// rows × W × (keys before + W)) floats, about B × C × (P + C) for B completions of up to
    /// C tokens after prompts of P; the trainer bounds B with micro-batches. Without gradient,
    /// rows are processed 16 at a time (`NO_GRAD_ROWS`).
    pub fn logprobs(
        &self,
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        temperature: f64,
        grad: bool,
        adapters: bool,
    ) -> Result<Tensor> {
        let width = row_width(prompts, completions)?;
        if grad {
            // A gradient pass comes before an optimizer step, after which the kept sampling
            // copy is stale anyway: free its memory for the backward.
            *self.sampling_copy_slot() = None;
        }
        let mode = if grad { Mode::Graph } else { Mode::NoGrad };
        if grad || prompts.len() <= NO_GRAD_ROWS {
            let rows = self.logprobs_rows(prompts, completions, width, temperature, mode, adapters);
            return Ok(rows?.0);
        }
        let parts = prompts
            .chunks(NO_GRAD_ROWS)
            .zip(completions.chunks(NO_GRAD_ROWS))
            .map(|(p, c)| {
                let rows = self.logprobs_rows(p, c, width, temperature, Mode::NoGrad, adapters);
                Ok(rows?.0)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The adapted policy's log-probs to differentiate, as [`Self::logprobs`] with `grad`;
    /// their gradient must be taken with [`TrainLogProbs::backward`], which recomputes the
    /// layers when gradient checkpointing is on.
    pub fn train_logprobs(
        &self,
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        temperature: f64,
    ) -> Result<TrainLogProbs<'_>> {
        let width = row_width(prompts, completions)?;
        *self.sampling_copy_slot() = None;
        let mode = if self.gradient_checkpointing {
            Mode::Checkpointed
        } else {
            Mode::Graph
        };
        let (logp, tape) =
            self.logprobs_rows(prompts, completions, width, temperature, mode, true)?;
        Ok(TrainLogProbs {
            logp,
            tape,
            policy: self,
        })
    }

    /// The training pass of [`Self::train_logprobs`] (adapters on, dropout on).
    fn train_pass(&self) -> Pass<'_> {
        Pass {
            adapters: true,
            grad: true,
            dropout_rng: Some(&self.dropout_rng),
        }
    }

    fn logprobs_rows(
        &self,
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        width: usize,
        temperature: f64,
        mode: Mode,
        adapters: bool,
    ) -> Result<(Tensor, Option<LayerTape>)> {
        let grad = mode != Mode::NoGrad;
        let b = prompts.len();
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            bail!("prompt {i} is empty: a completion needs at least one prompt token before it");
        }
        self.check_vocab(completions)?;
        // Prompt tokens are computed once: a group's shared prompt, the batch's common start,
        // or both (src/model/prefix.rs).
        let layout = PrefixLayout::new(prompts, completions);
        let (batch, offsets) = self.shared_batch(&layout)?;
        let pass = Pass {
            adapters,
            grad,
            dropout_rng: grad.then_some(&self.dropout_rng),
        };
        let (hidden, tape) = match mode {
            Mode::Checkpointed => {
                let (hidden, tape) = self.decoder.forward_checkpointed(&batch, &pass)?;
                (hidden, Some(tape))
            }
            _ => (self.decoder.forward_shared(&batch, &pass)?, None),
        };
        // Row of `hidden` predicting each completion token (the position before it), and
        // where it goes in the output.
        let mut pick = Vec::new();
        let mut targets = Vec::new();
        let n_total: usize = completions.iter().map(Vec::len).sum();
        let mut place = vec![n_total as u32; b * width];
        for (i, (prompt, comp)) in prompts.iter().zip(completions).enumerate() {
            for (j, &tok) in comp.iter().enumerate() {
                place[i * width + j] = pick.len() as u32;
                let Slot { level, row, at } = layout.slot(i, prompt.len() - 1 + j);
                let (start, width) = offsets[level];
                pick.push((start + row * width + at) as u32);
                targets.push(tok);
            }
        }
        let dev = self.device();
        let logp = if n_total == 0 {
            Tensor::zeros(0, logp_dtype(self.decoder.dtype()), dev)?
        } else {
            let sel = hidden.index_select(&Tensor::new(pick.as_slice(), dev)?, 0)?;
            let targets = Tensor::new(targets.as_slice(), dev)?;
            lm_head_logprobs(&sel, self.decoder.lm_head(), &targets, temperature)?
        };
        let padded = Tensor::cat(&[&logp, &Tensor::zeros(1, logp.dtype(), dev)?], 0)?;
        let logp = padded
            .index_select(&Tensor::new(place.as_slice(), dev)?, 0)?
            .reshape((b, width))?;
        Ok((logp, tape))
    }

    /// The layout's levels as right-padded tensors, and where each level's rows start in the
    /// hidden states of the forward and how wide they are.
    fn shared_batch(&self, layout: &PrefixLayout) -> Result<(SharedBatch, Vec<(usize, usize)>)> {
        let mut levels = Vec::with_capacity(layout.levels.len());
        let mut offsets = Vec::with_capacity(layout.levels.len());
        let mut start = 0;
        for level in &layout.levels {
            let (tokens, width) = self.right_padded(&level.rows)?;
            offsets.push((start, width));
            start += level.rows.len() * width;
            levels.push(BatchLevel {
                tokens,
                lens: level.rows.iter().map(Vec::len).collect(),
                parent: level.parent.clone(),
            });
        }
        Ok((SharedBatch { levels }, offsets))
    }

    /// Logits of every position of right-padded `rows`: `[B, T, vocab]` f32 (no gradient).
    pub fn logits(&self, rows: &[Vec<u32>], adapters: bool) -> Result<Tensor> {
        let (tokens, _) = self.right_padded(rows)?;
        let hidden = self
            .decoder
            .forward_train(&tokens, &Pass::inference(adapters))?;
        Ok(self.decoder.logits(&hidden)?.to_dtype(DType::F32)?)
    }

    fn check_vocab(&self, rows: &[Vec<u32>]) -> Result<()> {
        let vocab = self.config().vocab_size as u32;
        match rows.iter().flatten().find(|&&x| x >= vocab) {
            Some(bad) => bail!("token id {bad} is outside the model's vocabulary of {vocab}"),
            None => Ok(()),
        }
    }

    fn right_padded(&self, rows: &[Vec<u32>]) -> Result<(Tensor, usize)> {
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if t > self.decoder.max_positions() {
            bail!(
                "sequence of {t} tokens exceeds the model's {} positions",
                self.decoder.max_positions()
            );
        }
        self.check_vocab(rows)?;
        let mut flat = Vec::with_capacity(rows.len() * t);
        for r in rows {
            flat.extend_from_slice(r);
            flat.extend(std::iter::repeat_n(0, t - r.len()));
        }
        Ok((Tensor::from_vec(flat, (rows.len(), t), self.device())?, t))
    }

    /// Samples `group_size` completions of every prompt, in one batch: P × G results, the G
    /// completions of prompt p at indices `p·G .. (p+1)·G`.
    ///
    /// Each prompt is prefilled once (left-padded batch) and its KV cache copied to its G
    /// rows. `next_tokens(rows)` picks one token per row of f32 logits over the vocabulary
    /// (the caller's [`super::sampler::Sampler::sample_rows`]: temperature, top-p, ...), rows
    /// in batch order so a seeded sampler is reproducible. `stop(tokens)` is asked after every
    /// token whether the completion so far should end (stop strings). Finished rows leave the
    /// batch.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        group_size: usize,
        opts: &GenerateOptions,
        next_tokens: &mut PickTokens,
        stop: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<Vec<Generation>> {
        let n = prompts.len() * group_size;
        let mut out = vec![
            Generation {
                tokens: Vec::new(),
                finished_by_eos: false,
                truncated: false
            };
            n
        ];
        if n == 0 || opts.max_new_tokens == 0 {
            for g in &mut out {
                g.truncated = opts.max_new_tokens == 0;
            }
            return Ok(out);
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            bail!("prompt {i} is empty");
        }
        self.check_vocab(prompts)?;
        let c0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let max_len = c0 + opts.max_new_tokens;
        if max_len > self.decoder.max_positions() {
            bail!(
                "prompt of {c0} tokens + {} new tokens exceeds the model's {} positions",
                opts.max_new_tokens,
                self.decoder.max_positions()
            );
        }
        let dev = self.device();
        let pads: Vec<usize> = prompts.iter().map(|p| c0 - p.len()).collect();
        let mut flat = Vec::with_capacity(prompts.len() * c0);
        let mut pos = Vec::with_capacity(prompts.len() * c0);
        for (p, &pad) in prompts.iter().zip(&pads) {
            flat.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
            pos.extend((0..c0).map(|j| j.saturating_sub(pad) as u32));
        }
        let tokens = Tensor::from_vec(flat, (prompts.len(), c0), dev)?;
        let positions = Tensor::from_vec(pos, (prompts.len(), c0), dev)?;
        let merged = self.sampling_weights(opts.adapters)?;
        let mut prefill = self.decoder.new_cache(prompts.len(), c0)?;
        let first = self.decoder.forward_step(
            &tokens,
            &positions,
            &pads,
            &mut prefill,
            opts.adapters,
            merged.as_deref(),
        )?;
        let first = first.to_vec2::<f32>()?;
        let owners: Vec<usize> = (0..n).map(|i| i / group_size).collect();
        let mut cache = prefill.expand(&owners, max_len)?;
        drop(prefill);
        // `active[r]` is the output index of cache row r; `row_pad[r]` its left padding.
        let mut active: Vec<usize> = (0..n).collect();
        let mut row_pad: Vec<usize> = owners.iter().map(|&p| pads[p]).collect();
        let mut logits: Vec<Vec<f32>> = owners.iter().map(|&p| first[p].clone()).collect();
        loop {
            let mut keep = Vec::with_capacity(active.len());
            let mut step_tokens = Vec::with_capacity(active.len());
            let picked = next_tokens(&logits)?;
            if picked.len() != active.len() {
                bail!("{} tokens picked for {} rows", picked.len(), active.len());
            }
            for (r, (&i, &tok)) in active.iter().zip(&picked).enumerate() {
                let g = &mut out[i];
                g.tokens.push(tok);
                // The first reason wins: EOS, then a stop string, then the length limit.
                g.finished_by_eos = opts.eos_ids.contains(&tok);
                let stopped = g.finished_by_eos || stop(&g.tokens);
                g.truncated = !stopped && g.tokens.len() >= opts.max_new_tokens;
                if !stopped && !g.truncated {
                    keep.push(r);
                    step_tokens.push(tok);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                cache.retain(&keep)?;
                active = keep.iter().map(|&r| active[r]).collect();
                row_pad = keep.iter().map(|&r| row_pad[r]).collect();
            }
            let col = cache.len();
            let rows = active.len();
            let positions: Vec<u32> = row_pad.iter().map(|&p| (col - p) as u32).collect();
            let tokens = Tensor::from_vec(step_tokens, (rows, 1), dev)?;
            let positions = Tensor::from_vec(positions, (rows, 1), dev)?;
            let l = self.decoder.forward_step(
                &tokens,
                &positions,
                &row_pad,
                &mut cache,
                opts.adapters,
                merged.as_deref(),
            )?;
            logits = l.to_vec2::<f32>()?;
        }
        Ok(out)
    }
}

/// Picks one token per row of logits for [`Policy::generate`].
pub type PickTokens<'a> = dyn FnMut(&[Vec<f32>]) -> Result<Vec<u32>> + 'a;

/// Whether two lists of tensors are equal element by element (same shapes, same values).
fn same(a: &[Tensor], b: &[Tensor]) -> Result<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (a, b) in a.iter().zip(b) {
        if a.dims() != b.dims() || a.ne(b)?.max_all()?.to_scalar::<u8>()? != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Index of the largest logit (greedy decoding); ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}
