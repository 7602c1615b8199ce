//! The RL loop (docs/algorithms.md §2): sample P theorems × G proofs, check them with Lean, turn
//! verdicts into rewards, refill for dynamic sampling, compute advantages, then minibatches ×
//! iterations of forward, loss, backward, clip and AdamW step on the LoRA adapters.
//!
//! Proofs are sampled by the policy itself or, with `train.endpoint`, by an OpenAI-compatible
//! server ([`remote`]: off-policy, the server does not see the adapters); everything after
//! sampling is the same code for both.

mod cursor;
mod metrics;
mod optimizer;
mod remote;
mod rollout;
mod run_dir;
mod update;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

pub use cursor::Cursor;
pub use metrics::{SampleRecord, StepMetrics};
pub use rollout::{prompt_tokens, rollout, Completion, Group, RolloutTimes, SamplingSetup};
pub use run_dir::{read_state, write_atomic, RunDir, TrainerState};

use crate::algo::{self, AlgoConfig};
use crate::config::Config;
use crate::data::Theorem;
use crate::lean::Checker;
use crate::model::adapter::{self, AdapterWeights};
use crate::model::sampler::{Sampler, StopStrings};
use crate::model::tokenizer::Tokenizer;
use crate::model::{GenerateOptions, Policy};
use crate::reward::RewardFn;
pub use optimizer::Optimizer;
use remote::{endpoint_client, rollout_seed, RemoteSampler};
pub(crate) use update::Update;

/// How a training run ended.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub steps: usize,
    /// Stopped by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    pub last: Option<StepMetrics>,
}

/// Everything `lean-grpo train` needs besides the configuration.
pub struct TrainInputs<'a> {
    pub theorems: Vec<Theorem>,
    /// Continue the run in this directory.
    pub resume: Option<&'a Path>,
    pub show_progress: bool,
    /// Set by Ctrl-C: the loop saves a checkpoint and stops at the next safe point.
    pub stop: Arc<AtomicBool>,
}

/// Runs (or resumes) a training run and returns where it ended.
pub fn train(config: &Config, inputs: TrainInputs) -> Result<TrainReport> {
    let train = &config.train;
    if train.num_generations < 2 {
        bail!(
            "train.num_generations must be at least 2: group-relative advantages compare a \
             proof with its siblings (got {})",
            train.num_generations
        );
    }
    if train.batch_size == 0 {
        bail!("train.batch_size (theorems per step) must be at least 1");
    }
    let algo = config.algorithm()?;
    if algo.entropy_coef > 0.0 {
        bail!(
            "algorithm_config.entropy_coef > 0 needs full-vocabulary entropies, which the \
             trainer does not compute; set it to 0"
        );
    }
    let reward = RewardFn::from_options(train)?;
    let endpoint = endpoint_client(train)?;
    let root = match (&inputs.resume, &train.output_dir) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => default_run_dir(&train.algorithm),
    };
    // Fail on an unusable run directory before minutes of model loading.
    let (mut run, latest) = match inputs.resume {
        Some(dir) => RunDir::resume(dir, config)?,
        None => (RunDir::create(&root, config)?, None),
    };
    let checker = Checker::new(&config.checker)?;
    let policy = Policy::load(&config.model, &config.lora, train.seed)?;
    let tokenizer = Tokenizer::from_dir(policy.model_dir())?;
    if let Some(dir) = &config.model.adapter {
        load_adapter_into(&policy, &config.lora, Path::new(dir))?;
    }
    let prompts = inputs
        .theorems
        .iter()
        .map(|t| prompt_tokens(&tokenizer, t))
        .collect::<Result<Vec<_>>>()?;
    let total_steps = total_steps(config, inputs.theorems.len());
    let updates = total_steps * algo.num_iterations * algo.num_minibatches;
    let mut optimizer = Optimizer::new(&policy.lora_vars(), train, updates)?;
    let mut sampler = Sampler::new(&config.sampling, train.seed);
    let mut state = TrainerState {
        step: 0,
        cursor: Cursor::start(),
        sampler: sampler.state(),
    };
    if let Some(checkpoint) = &latest {
        state = read_state(checkpoint)?;
        load_adapter_into(&policy, &config.lora, checkpoint)?;
        optimizer.load(checkpoint)?;
        sampler = Sampler::from_state(&config.sampling, state.sampler.clone());
        tracing::info!(
            "resuming {} after step {}",
            run.root().display(),
            state.step
        );
    }
    let setup = SamplingSetup {
        policy: &policy,
        tokenizer: &tokenizer,
        checker: &checker,
        generate: GenerateOptions {
            max_new_tokens: config.sampling.max_completion_length,
            eos_ids: tokenizer.eos_ids().to_vec(),
            adapters: true,
        },
        stop: StopStrings::new(&config.sampling.stop),
    };
    let remote = endpoint.map(|client| RemoteSampler::new(client, &config.sampling, &tokenizer));
    let bar = progress_bar(total_steps, state.step, inputs.show_progress);
    let save = |run: &RunDir, state: &TrainerState, optimizer: &Optimizer| {
        run.save_checkpoint(state, train.save_total_limit, |dir| {
            save_adapter(&policy, config, dir)?;
            optimizer.save(dir)
        })
    };
    let mut last = None;
    let mut interrupted = false;
    while state.step < total_steps {
        if inputs.stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let at_start = state.clone();
        let mut step = Step {
            config,
            algo: &algo,
            reward: &reward,
            setup: &setup,
            remote: remote.as_ref(),
            theorems: &inputs.theorems,
            prompts: &prompts,
            stop: &inputs.stop,
        };
        let Some((metrics, samples)) = step.run(&mut state, &mut sampler, &mut optimizer)? else {
            // Interrupted before the update: the checkpoint is the state the step started from.
            state = at_start;
            interrupted = true;
            break;
        };
        run.append_samples(&samples)?;
        run.append_metrics(&metrics)?;
        bar.set_message(format!(
            "reward {:.3}  pass {:.1}%",
            metrics.reward_mean,
            100.0 * metrics.pass_rate
        ));
        bar.inc(1);
        if train.save_steps > 0 && state.step % train.save_steps == 0 && state.step < total_steps {
            save(&run, &state, &optimizer)?;
        }
        last = Some(metrics);
    }
    bar.finish_and_clear();
    save(&run, &state, &optimizer)?;
    if !interrupted {
        let final_dir = run.root().join("adapter");
        let tmp = run.root().join(".tmp-adapter");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        save_adapter(&policy, config, &tmp)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("cannot write {}", final_dir.display()))?;
    }
    Ok(TrainReport {
        run_dir: run.root().to_path_buf(),
        steps: state.step,
        interrupted,
        last,
    })
}

/// Writes the policy's LoRA weights as a PEFT adapter into `dir`.
pub fn save_adapter(policy: &Policy, config: &Config, dir: &Path) -> Result<()> {
    let weights: Vec<AdapterWeights> = policy
        .lora_vars()
        .into_iter()
        .map(|(module, a, b)| AdapterWeights {
            module,
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
        })
        .collect();
    adapter::save_adapter(dir, &weights, &config.lora, &config.model.model)
}

/// Loads a PEFT adapter into the policy's LoRA layers (rank and targets must match).
pub fn load_adapter_into(
    policy: &Policy,
    lora: &crate::model::LoraOptions,
    dir: &Path,
) -> Result<()> {
    let adapter = adapter::load_adapter(dir, policy.device())?;
    adapter.ensure_matches(lora)?;
    let weights: Vec<_> = adapter
        .weights
        .into_iter()
        .map(|w| (w.module, w.a, w.b))
        .collect();
    policy.set_lora_weights(&weights)
}

/// `max_steps`, or enough steps for `num_train_epochs` passes over the theorems.
fn total_steps(config: &Config, theorems: usize) -> usize {
    config.train.max_steps.unwrap_or_else(|| {
        (theorems * config.train.num_train_epochs).div_ceil(config.train.batch_size.max(1))
    })
}

fn default_run_dir(algorithm: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    PathBuf::from("runs").join(format!("{algorithm}-{secs}"))
}

pub(crate) fn progress_bar(total: usize, done: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}

/// One training step's borrowed context.
struct Step<'a> {
    config: &'a Config,
    algo: &'a AlgoConfig,
    reward: &'a RewardFn,
    setup: &'a SamplingSetup<'a>,
    /// Sample from this server instead of the policy.
    remote: Option<&'a RemoteSampler>,
    theorems: &'a [Theorem],
    prompts: &'a [Vec<u32>],
    stop: &'a AtomicBool,
}

impl Step<'_> {
    /// Runs one step; `None` when Ctrl-C arrived before the update (nothing was changed that
    /// the caller cannot roll back).
    fn run(
        &mut self,
        state: &mut TrainerState,
        sampler: &mut Sampler,
        optimizer: &mut Optimizer,
    ) -> Result<Option<(StepMetrics, Vec<SampleRecord>)>> {
        let train = &self.config.train;
        let g = train.num_generations;
        let wanted = train.batch_size;
        let mut groups: Vec<Group> = Vec::new();
        let mut rewards: Vec<f64> = Vec::new();
        let mut times = RolloutTimes::default();
        let mut rounds = 0;
        let prepared = loop {
            let kept_so_far = if groups.is_empty() {
                0
            } else {
                self.prepare(&groups, &rewards)?.kept_groups().len()
            };
            let ids = state
                .cursor
                .take(wanted - kept_so_far, self.theorems.len(), train.seed);
            let (new_groups, t) = match self.remote {
                Some(remote) => {
                    let seed = rollout_seed(train.seed, state.step, rounds);
                    remote.rollout(self.setup, self.theorems, &ids, g, seed)?
                }
                None => rollout(self.setup, sampler, self.theorems, self.prompts, &ids, g)?,
            };
            times.sampling += t.sampling;
            times.checking += t.checking;
            times.checking_tail += t.checking_tail;
            times.tokens += t.tokens;
            for group in &new_groups {
                for c in &group.completions {
                    rewards.push(self.reward.reward(&c.checked.verdict, c.tokens.len()));
                }
            }
            groups.extend(new_groups);
            if self.stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let prepared = self.prepare(&groups, &rewards)?;
            let kept = prepared.kept_groups().len();
            if !self.algo.dynamic_sampling
                || kept >= wanted
                || rounds >= self.algo.max_resample_rounds
            {
                break prepared;
            }
            rounds += 1;
            tracing::debug!("dynamic sampling: {kept} of {wanted} groups kept, resampling");
        };
        state.step += 1;
        let step = state.step;
        if prepared.kept_groups().is_empty() {
            tracing::info!(
                "step {step}: no optimizer step: dynamic sampling dropped all {} groups ({} with \
                 equal task rewards) after {rounds} extra sampling rounds",
                prepared.groups(),
                prepared.dropped_flat_task_reward()
            );
        }
        let lr = optimizer.learning_rate();
        let train_start = Instant::now();
        let outcome = Update {
            algo: self.algo,
            policy: self.setup.policy,
            temperature: self.config.sampling.temperature,
            micro_batches: train.gradient_accumulation_steps,
            max_grad_norm: train.max_grad_norm,
        }
        .run(&prepared, &groups, self.prompts, optimizer)?;
        let training_seconds = train_start.elapsed().as_secs_f64();
        state.sampler = sampler.state();

        let completions: Vec<(&Group, &Completion)> = groups
            .iter()
            .flat_map(|grp| grp.completions.iter().map(move |c| (grp, c)))
            .collect();
        let n = completions.len().max(1) as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        let mut verdicts = BTreeMap::new();
        for (_, c) in &completions {
            *verdicts
                .entry(c.checked.verdict.kind.name().to_string())
                .or_insert(0) += 1;
        }
        let accepted = completions
            .iter()
            .filter(|(_, c)| c.checked.verdict.is_accepted())
            .count();
        let lengths: Vec<usize> = completions.iter().map(|(_, c)| c.tokens.len()).collect();
        let metrics = StepMetrics {
            step,
            epoch: state.cursor.epoch,
            sampler: if self.remote.is_some() {
                "endpoint"
            } else {
                "policy"
            }
            .to_string(),
            reward_mean: mean,
            reward_std: var.sqrt(),
            pass_rate: accepted as f64 / n,
            completions: completions.len(),
            verdicts,
            zero_variance_fraction: prepared.zero_variance_fraction(),
            groups_dropped: prepared.groups() - prepared.kept_groups().len(),
            groups_dropped_flat_reward: prepared.dropped_flat_task_reward(),
            kept_groups_none_accepted: prepared
                .kept_groups()
                .iter()
                .filter(|&&g| {
                    groups[g]
                        .completions
                        .iter()
                        .all(|c| !c.checked.verdict.is_accepted())
                })
                .count(),
            resample_rounds: rounds,
            optimizer_step: outcome.stepped,
            loss: outcome.loss,
            pg_loss: outcome.pg_loss,
            kl: outcome.kl,
            dpo_loss: outcome.dpo_loss,
            clip_low_frac: outcome.diagnostics.clip_low_frac(),
            clip_high_frac: outcome.diagnostics.clip_high_frac(),
            ratio_mean: outcome.diagnostics.ratio_mean(),
            grad_norm: outcome.grad_norm,
            learning_rate: lr,
            completion_length_mean: lengths.iter().sum::<usize>() as f64 / n,
            completion_length_max: lengths.iter().copied().max().unwrap_or(0),
            sampling_seconds: times.sampling,
            checking_seconds: times.checking,
            training_seconds,
            tokens_per_second: times.tokens as f64 / times.sampling.max(1e-9),
        };
        let samples = completions
            .iter()
            .zip(&rewards)
            .enumerate()
            .map(|(i, ((grp, c), &reward))| SampleRecord {
                step,
                theorem: self.theorems[grp.theorem].name.clone(),
                index: i % g,
                completion: c.text.clone(),
                proof: c.checked.proof.clone(),
                tokens: c.tokens.len(),
                truncated: c.truncated,
                reward,
                verdict: c.checked.verdict.kind.name().to_string(),
                accepted: c.checked.verdict.is_accepted(),
                evidence: c.checked.verdict.evidence.clone(),
                seconds: c.checked.seconds,
            })
            .collect();
        Ok(Some((metrics, samples)))
    }

    fn prepare(&self, groups: &[Group], rewards: &[f64]) -> Result<algo::Prepared> {
        let lengths: Vec<usize> = groups
            .iter()
            .flat_map(|g| g.completions.iter().map(|c| c.tokens.len()))
            .collect();
        let truncated: Vec<bool> = groups
            .iter()
            .flat_map(|g| g.completions.iter().map(|c| c.truncated))
            .collect();
        Ok(algo::prepare(self.algo, rewards, &lengths, &truncated)?)
    }
}
