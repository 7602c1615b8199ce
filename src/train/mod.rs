//! The RL loop (docs/algorithms.md §2): sample P theorems × G proofs, check them with Lean, turn
//! verdicts into rewards, refill for dynamic sampling, compute advantages, then minibatches ×
//! iterations of forward, loss, backward, clip and AdamW step on the LoRA adapters.
//!
//! Proofs come from the [`crate::rollout`] layer: sampled by the policy itself or, with
//! `train.endpoint`, by an OpenAI-compatible server (off-policy unless
//! `train.endpoint_adapter_dir` has the policy's adapter hot-loaded into it); everything after
//! sampling is the same code for both. This module keeps what is
//! the loop's own: the run directory, the cursor over the theorems, the update and the metrics.

mod curriculum;
mod cursor;
mod metrics;
mod run_dir;
mod task;
mod update;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::ProgressBar;

pub use curriculum::{Curriculum, RatioCount};
pub use cursor::Cursor;
pub use metrics::{StepMetrics, TrainSample};
pub use run_dir::{read_state, RunDir, TheoremFile, TrainerState};
pub(crate) use update::Update;

use crate::algo::{self, AlgoConfig};
use crate::config::{Config, Task, TrainOptions};
use crate::data::{fim, Theorem};
use crate::lean::Checker;
use crate::model::optim::Optimizer;
use crate::model::sampler::Sampler;
use crate::model::tokenizer::Tokenizer;
use crate::model::Policy;
use crate::reward::RewardFn;
use crate::rollout::{
    all_prompt_tokens, endpoint_client, rollout, rollout_seed, AdapterSync, Group, RemoteSampler,
    RolloutTimes, SamplingSetup, SyncOptions,
};
use metrics::StepOutcome;
use task::{Holes, StepTask};

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
    /// The file they were read from, recorded in the run so a resume finds it and can tell
    /// whether it changed.
    pub theorem_file: TheoremFile,
    /// Continue the run in this directory.
    pub resume: Option<&'a Path>,
    pub show_progress: bool,
    /// Set by Ctrl-C: the loop saves a checkpoint and stops at the next safe point.
    pub stop: Arc<AtomicBool>,
}

/// Runs (or resumes) a training run and returns where it ended.
///
/// Everything that can be checked without the model is checked first (configuration,
/// endpoint, run directory), so a mistake costs seconds, not a model load; a new run directory
/// is created only once the model and the checker are ready, so a failed load leaves nothing.
pub fn train(config: &Config, inputs: TrainInputs) -> Result<TrainReport> {
    let train = &config.train;
    let algo = check(config)?;
    let fim_task = train.task == Task::Fim;
    let theorems = if fim_task {
        curriculum::validate(&train.fim)?;
        let (kept, _) = fim::with_proofs(&inputs.theorems);
        if kept.is_empty() {
            bail!("train.task: fim needs records with a `proof`, and none of these has one");
        }
        kept
    } else {
        inputs.theorems
    };
    let reward = RewardFn::new(train.reward, train.partial_credit_cap, train.length_penalty)?;
    let endpoint = endpoint_client(train)?;
    let root = match (&inputs.resume, &train.output_dir) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => default_run_dir(&train.algorithm),
    };
    let resumed = match inputs.resume {
        Some(dir) => Some(RunDir::resume(dir, config, &inputs.theorem_file)?),
        None => RunDir::ensure_new(&root).map(|()| None)?,
    };
    let checker = Checker::new(&config.checker)?;
    let mut policy = Policy::load(&config.model, &config.lora, train.seed)?;
    policy.set_gradient_checkpointing(train.gradient_checkpointing);
    let tokenizer = Tokenizer::from_dir(policy.model_dir())?;
    // FIM prompts depend on the step's holes: each step builds those it draws.
    let prompts = if fim_task {
        vec![Vec::new(); theorems.len()]
    } else {
        all_prompt_tokens(&tokenizer, &theorems)?
    };
    let (mut run, latest) = match resumed {
        Some(resumed) => resumed,
        None => (RunDir::create(&root, config, &inputs.theorem_file)?, None),
    };
    let total_steps = total_steps(config, theorems.len());
    let updates = total_steps * algo.num_iterations * algo.num_minibatches;
    let mut progress = Progress::start(config, &policy, updates)?;
    if fim_task {
        progress.state.curriculum = Some(Curriculum::start(&train.fim));
    }
    if let Some(checkpoint) = &latest {
        progress.restore(checkpoint, config, &policy)?;
        if fim_task && progress.state.curriculum.is_none() {
            bail!(
                "the checkpoint {} has no FIM curriculum state",
                checkpoint.display()
            );
        }
        tracing::info!(
            "resuming {} after step {}",
            root.display(),
            progress.state.step
        );
    }
    let setup = SamplingSetup::new(&policy, &tokenizer, &checker, &config.sampling, true);
    let remote = match endpoint {
        Some(client) => Some(remote_sampler(client, config, &tokenizer, run.root())?),
        None => None,
    };
    let step = Step {
        config,
        algo: &algo,
        reward: &reward,
        setup: &setup,
        remote: remote.as_ref(),
        theorems: &theorems,
        prompts: &prompts,
        stop: &inputs.stop,
        total_steps,
    };
    let bar = crate::progress::bar(
        total_steps,
        progress.state.step,
        "step",
        inputs.show_progress,
    );
    let ran = run_steps(&step, &mut run, &mut progress, total_steps, &bar);
    if let Some(remote) = &remote {
        remote.finish();
    }
    let (interrupted, last) = ran?;
    bar.finish_and_clear();
    progress.save(&run, config, &policy)?;
    if !interrupted {
        policy.write_adapter(
            &run.root().join("adapter"),
            &config.lora,
            &config.model.model,
        )?;
    }
    Ok(TrainReport {
        run_dir: run.root().to_path_buf(),
        steps: progress.state.step,
        interrupted,
        last,
    })
}

/// The endpoint sampler of a run, on-policy (its adapter hot-loaded into the server) when
/// `train.endpoint_adapter_dir` is set; the adapters are named after the run directory.
fn remote_sampler(
    client: crate::endpoint::EndpointClient,
    config: &Config,
    tokenizer: &Tokenizer,
    run_dir: &Path,
) -> Result<RemoteSampler> {
    let remote = RemoteSampler::new(client, &config.sampling, tokenizer);
    let Some(dir) = &config.train.endpoint_adapter_dir else {
        return Ok(remote);
    };
    let prefix = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lean-grpo".into());
    let sync = AdapterSync::new(SyncOptions {
        dir: dir.clone(),
        prefix,
        every: config.train.sync_steps,
        timeout: Duration::from_secs_f64(config.train.sync_timeout_secs),
    })?;
    Ok(remote.with_sync(sync))
}

/// Steps until `total_steps` or Ctrl-C, writing metrics, samples and the periodic checkpoints.
/// Returns whether it was interrupted, and the last step's metrics.
fn run_steps(
    step: &Step,
    run: &mut RunDir,
    progress: &mut Progress,
    total_steps: usize,
    bar: &ProgressBar,
) -> Result<(bool, Option<StepMetrics>)> {
    let mut checkpoints = Schedule::new(&step.config.train);
    let mut last = None;
    while progress.state.step < total_steps {
        if step.stop.load(Ordering::SeqCst) {
            return Ok((true, last));
        }
        let at_start = progress.state.clone();
        let Some((metrics, samples)) = step.run(progress)? else {
            // Interrupted before the update: the checkpoint is the state the step started from.
            progress.state = at_start;
            return Ok((true, last));
        };
        run.append_samples(&samples)?;
        run.append_metrics(&metrics)?;
        bar.set_message(format!(
            "reward {:.3}  pass {:.1}%",
            metrics.reward_mean,
            100.0 * metrics.pass_rate
        ));
        bar.inc(1);
        let done = progress.state.step;
        if done < total_steps && checkpoints.due(done) {
            progress.save(run, step.config, step.setup.policy)?;
            checkpoints.saved();
        }
        last = Some(metrics);
    }
    Ok((false, last))
}

/// When to write a checkpoint: every `save_steps` steps, and after any step that ends more
/// than `save_every_minutes` after the last checkpoint (or the run's start).
struct Schedule {
    every_steps: usize,
    every: Option<Duration>,
    last: Instant,
}

impl Schedule {
    fn new(train: &TrainOptions) -> Schedule {
        let minutes = train.save_every_minutes;
        Schedule {
            every_steps: train.save_steps,
            every: (minutes > 0.0).then(|| Duration::from_secs_f64(minutes * 60.0)),
            last: Instant::now(),
        }
    }

    /// Whether a checkpoint is due after step `done`.
    fn due(&self, done: usize) -> bool {
        let by_steps = self.every_steps > 0 && done % self.every_steps == 0;
        let by_time = self.every.is_some_and(|every| self.last.elapsed() >= every);
        by_steps || by_time
    }

    fn saved(&mut self) {
        self.last = Instant::now();
    }
}

/// The checks of the configuration that need no model: the batch shape and the algorithm.
fn check(config: &Config) -> Result<AlgoConfig> {
    let train: &TrainOptions = &config.train;
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
    let minutes = train.save_every_minutes;
    if !(minutes.is_finite() && minutes >= 0.0) {
        bail!("train.save_every_minutes must be a number of minutes, 0 or more (got {minutes})");
    }
    Ok(config.algorithm()?)
}

/// What a checkpoint holds besides the adapters: the loop's state, the sampling RNG and the
/// optimizer's moments.
struct Progress {
    state: TrainerState,
    sampler: Sampler,
    optimizer: Optimizer,
}

impl Progress {
    fn start(config: &Config, policy: &Policy, updates: usize) -> Result<Progress> {
        let train = &config.train;
        let sampler = Sampler::new(&config.sampling, train.seed);
        Ok(Progress {
            state: TrainerState::start(sampler.state()),
            sampler,
            optimizer: Optimizer::new(&policy.lora_vars(), &train.optimizer(), updates)?,
        })
    }

    /// Continues from `checkpoint`: its adapters, optimizer moments, RNG and cursor.
    fn restore(&mut self, checkpoint: &Path, config: &Config, policy: &Policy) -> Result<()> {
        self.state = read_state(checkpoint)?;
        policy.read_adapter(checkpoint, &config.lora)?;
        self.optimizer.load(checkpoint)?;
        self.sampler = Sampler::from_state(&config.sampling, self.state.sampler.clone());
        Ok(())
    }

    fn save(&self, run: &RunDir, config: &Config, policy: &Policy) -> Result<PathBuf> {
        run.save_checkpoint(&self.state, config.train.save_total_limit, |dir| {
            policy.write_adapter(dir, &config.lora, &config.model.model)?;
            self.optimizer.save(dir)
        })
    }
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

/// One training step's borrowed context.
struct Step<'a> {
    config: &'a Config,
    algo: &'a AlgoConfig,
    reward: &'a RewardFn,
    setup: &'a SamplingSetup<'a>,
    /// Sample from this server instead of the policy.
    remote: Option<&'a RemoteSampler>,
    theorems: &'a [Theorem],
    /// Whole-proof prompts (empty for a FIM run, whose prompts each step builds).
    prompts: &'a [Vec<u32>],
    stop: &'a AtomicBool,
    /// Steps of the whole run, for the linear FIM schedule.
    total_steps: usize,
}

/// A generation batch after dynamic sampling: every group sampled (dropped ones included), their
/// rewards, the algorithm's view of them, and what sampling them took.
struct Batch {
    groups: Vec<Group>,
    rewards: Vec<f64>,
    prepared: algo::Prepared,
    times: RolloutTimes,
    /// Extra sampling rounds dynamic sampling asked for.
    rounds: usize,
}

impl Step<'_> {
    /// Runs one step; `None` when Ctrl-C arrived before the update (nothing was changed that
    /// the caller cannot roll back).
    fn run(&self, progress: &mut Progress) -> Result<Option<(StepMetrics, Vec<TrainSample>)>> {
        let train = &self.config.train;
        let holes = progress.state.curriculum.as_ref().map(|c| Holes {
            ratio: c.ratio_at(&train.fim, progress.state.step, self.total_steps),
            // A new draw of holes every step, the same one on a resumed run.
            seed: train.seed.wrapping_add(progress.state.step as u64),
        });
        let mut task = StepTask::new(self.theorems, self.prompts, holes);
        let Some(batch) = self.sample(&mut progress.state, &mut progress.sampler, &mut task)?
        else {
            return Ok(None);
        };
        progress.state.step += 1;
        let step = progress.state.step;
        if batch.prepared.kept_groups().is_empty() {
            tracing::info!(
                "step {step}: no optimizer step: dynamic sampling dropped all {} groups ({} with \
                 equal task rewards) after {} extra sampling rounds",
                batch.prepared.groups(),
                batch.prepared.dropped_flat_task_reward(),
                batch.rounds
            );
        }
        let learning_rate = progress.optimizer.learning_rate();
        let train_start = Instant::now();
        let update = Update {
            algo: self.algo,
            policy: self.setup.policy,
            temperature: self.config.sampling.temperature,
            micro_batches: self.config.train.gradient_accumulation_steps,
            max_grad_norm: self.config.train.max_grad_norm,
        }
        .run(
            &batch.prepared,
            &batch.groups,
            &task.prompts,
            &mut progress.optimizer,
        )?;
        progress.state.sampler = progress.sampler.state();
        let outcome = StepOutcome {
            step,
            epoch: progress.state.cursor.epoch,
            remote: self.remote.is_some(),
            groups: &batch.groups,
            rewards: &batch.rewards,
            prepared: &batch.prepared,
            resample_rounds: batch.rounds,
            update: &update,
            learning_rate,
            sampled_entropy: progress.sampler.take_entropy(),
            times: batch.times,
            training_seconds: train_start.elapsed().as_secs_f64(),
        };
        let mut metrics = outcome.metrics();
        if let (Some(holes), Some(curriculum)) = (holes, progress.state.curriculum.as_mut()) {
            let completions = || batch.groups.iter().flat_map(|g| &g.completions);
            let accepted = completions()
                .filter(|c| c.checked.verdict.is_accepted())
                .count();
            curriculum.record(&train.fim, holes.ratio, accepted, completions().count());
            metrics.mask_ratio = Some(holes.ratio);
            metrics.pass_rate_by_ratio = curriculum.pass_rates();
        }
        Ok(Some((metrics, outcome.samples(&task.theorems))))
    }

    /// Samples, checks and rewards groups until dynamic sampling keeps `batch_size` of them or
    /// runs out of rounds; `None` when Ctrl-C arrived meanwhile.
    fn sample(
        &self,
        state: &mut TrainerState,
        sampler: &mut Sampler,
        task: &mut StepTask,
    ) -> Result<Option<Batch>> {
        let train = &self.config.train;
        let wanted = train.batch_size;
        let mut groups: Vec<Group> = Vec::new();
        let mut rewards: Vec<f64> = Vec::new();
        let mut times = RolloutTimes::default();
        let mut rounds = 0;
        loop {
            let kept_so_far = if groups.is_empty() {
                0
            } else {
                self.prepare(&groups, &rewards)?.kept_groups().len()
            };
            let ids = state
                .cursor
                .take(wanted - kept_so_far, self.theorems.len(), train.seed);
            task.prepare(&ids, self.setup.tokenizer)?;
            let (new_groups, t) = match self.remote {
                Some(remote) => {
                    let policy = self.setup.policy;
                    let (lora, base) = (&self.config.lora, &self.config.model.model);
                    remote.sync(state.step, |dir| policy.write_adapter(dir, lora, base))?;
                    let seed = rollout_seed(train.seed, state.step, rounds);
                    let g = train.num_generations;
                    let prompts = &task.prompts;
                    remote.rollout(self.setup, &task.theorems, prompts, &ids, g, seed)?
                }
                None => rollout(
                    self.setup,
                    sampler,
                    &task.theorems,
                    &task.prompts,
                    &ids,
                    train.num_generations,
                )?,
            };
            times.add(&t);
            for c in new_groups.iter().flat_map(|g| &g.completions) {
                rewards.push(self.reward.reward(&c.checked.verdict, c.tokens.len()));
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
                return Ok(Some(Batch {
                    groups,
                    rewards,
                    prepared,
                    times,
                    rounds,
                }));
            }
            rounds += 1;
            tracing::debug!("dynamic sampling: {kept} of {wanted} groups kept, resampling");
        }
    }

    fn prepare(&self, groups: &[Group], rewards: &[f64]) -> Result<algo::Prepared> {
        let completions = || groups.iter().flat_map(|g| &g.completions);
        let lengths: Vec<usize> = completions().map(|c| c.tokens.len()).collect();
        let truncated: Vec<bool> = completions().map(|c| c.truncated).collect();
        Ok(algo::prepare(self.algo, rewards, &lengths, &truncated)?)
    }
}
