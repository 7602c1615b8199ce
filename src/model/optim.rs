//! AdamW, learning-rate schedules, gradient clipping and accumulation, with resumable state.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments,
//! the single-tensor CPU code path op for op), the schedules are `transformers`'
//! `get_*_schedule_with_warmup`, and clipping is `torch.nn.utils.clip_grad_norm_`, so a run
//! here follows the same trajectory as TRL's with the same hyper-parameters.
//!
//! Unlike candle's own `AdamW`, a variable without a gradient is an error: candle's fused ops
//! have no backward and silently cut the graph, and skipping such a variable would train
//! nothing without a word.

use std::collections::{BTreeSet, HashMap};
use std::f64::consts::PI;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adapter::write_safetensors;
use crate::atomic;

pub const OPTIMIZER_STATE_FILE: &str = "optimizer.safetensors";
pub const OPTIMIZER_META_FILE: &str = "optimizer.json";
const STATE_FORMAT: &str = "lean-grpo-adamw-v1";

/// AdamW hyper-parameters other than the learning rate (which the schedule gives per step).
/// Defaults are `transformers`' `TrainingArguments` ones (which TRL keeps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named candle variables. Moments are kept in f32.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: u64,
}

impl AdamW {
    /// `vars` are the trainable tensors; names key the saved state and must be distinct.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut names = BTreeSet::new();
        for (name, _) in &vars {
            ensure!(
                names.insert(name),
                "variable {name:?} is given twice to the optimizer"
            );
        }
        let zeros = |v: &Var| v.as_tensor().zeros_like()?.to_dtype(DType::F32);
        let exp_avg = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let exp_avg_sq = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            params,
            vars,
            exp_avg,
            exp_avg_sq,
            steps: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    /// Optimizer steps taken so far (the `step` a schedule is evaluated at before the next one).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One AdamW update with learning rate `lr`. Every variable must have a gradient in
    /// `grads` (a zero one is fine): a missing one means the forward pass went through an op
    /// without backward.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let missing: Vec<&str> = self
            .vars
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            bail!(
                "no gradient for {} of {} trainable tensors (first: {}): the loss does not depend \
                 on them, or the forward pass used an op without backward (candle's fused \
                 rms_norm / softmax_last_dim / rope)",
                missing.len(),
                self.vars.len(),
                missing[0]
            );
        }
        self.steps += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                bail!("internal: gradient vanished between checks");
            };
            let grad = grad.to_dtype(DType::F32)?;
            let mut param = var.as_tensor().to_dtype(DType::F32)?;
            if weight_decay != 0.0 {
                param = param.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = &self.exp_avg[i];
            let m = (m + ((&grad - m)? * (1.0 - beta1))?)?;
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            let v = ((&self.exp_avg_sq[i] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let param = (param - ((&m / &denom)? * step_size)?)?;
            var.set(&param.to_dtype(var.dtype())?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// Writes the moments (`<name>.exp_avg`, `<name>.exp_avg_sq`) to
    /// `dir/optimizer.safetensors` and the step count and hyper-parameters to
    /// `dir/optimizer.json`, each through a temporary file and a rename.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut tensors = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.push((format!("{name}.exp_avg"), self.exp_avg[i].clone()));
            tensors.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].clone()));
        }
        write_safetensors(&dir.join(OPTIMIZER_STATE_FILE), tensors)?;
        let meta = StateMeta {
            format: STATE_FORMAT.to_string(),
            steps: self.steps,
            params: self.params,
            vars: self.vars.iter().map(|(n, _)| n.clone()).collect(),
        };
        atomic::write_file(
            &dir.join(OPTIMIZER_META_FILE),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )
    }

    /// Restores moments and step count saved by [`Self::save`] for the same variable names and
    /// shapes. The hyper-parameters stay those given to [`Self::new`] (a resumed run may change
    /// them on purpose); a difference is logged.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let meta_path = dir.join(OPTIMIZER_META_FILE);
        let state_path = dir.join(OPTIMIZER_STATE_FILE);
        let text = fs::read_to_string(&meta_path)
            .with_context(|| format!("cannot read optimizer state {}", meta_path.display()))?;
        let meta: StateMeta = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an optimizer state file", meta_path.display()))?;
        ensure!(
            meta.format == STATE_FORMAT,
            "{}: format {:?}, expected {STATE_FORMAT:?}",
            meta_path.display(),
            meta.format
        );
        let saved: BTreeSet<&String> = meta.vars.iter().collect();
        let ours: BTreeSet<&String> = self.vars.iter().map(|(n, _)| n).collect();
        if saved != ours {
            let only_saved: Vec<_> = saved.difference(&ours).take(3).collect();
            let only_ours: Vec<_> = ours.difference(&saved).take(3).collect();
            bail!(
                "{}: the saved optimizer state is for other variables (only in the file: \
                 {only_saved:?}, only in the model: {only_ours:?}); was the LoRA rank or \
                 target_modules changed?",
                meta_path.display()
            );
        }
        if meta.params != self.params {
            tracing::warn!(
                saved = ?meta.params,
                current = ?self.params,
                "AdamW hyper-parameters differ from the checkpoint's; using the current ones"
            );
        }
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&state_path, &candle_core::Device::Cpu)
                .with_context(|| format!("cannot read {}", state_path.display()))?;
        let mut exp_avg = Vec::with_capacity(self.vars.len());
        let mut exp_avg_sq = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (suffix, out) in [("exp_avg", &mut exp_avg), ("exp_avg_sq", &mut exp_avg_sq)] {
                let key = format!("{name}.{suffix}");
                let t = tensors.remove(&key).with_context(|| {
                    format!("{}: tensor {key} is missing", state_path.display())
                })?;
                ensure!(
                    t.dims() == var.dims(),
                    "{}: {key} has shape {:?} but the variable has {:?}",
                    state_path.display(),
                    t.dims(),
                    var.dims()
                );
                out.push(t.to_dtype(DType::F32)?.to_device(var.device())?);
            }
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.steps = meta.steps;
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StateMeta {
    format: String,
    steps: u64,
    params: AdamWParams,
    vars: Vec<String>,
}

/// `transformers`' `lr_scheduler_type` values that GRPO runs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// The base rate throughout; warm-up is ignored, as in `get_constant_schedule`.
    Constant,
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at `total_steps` (TrainingArguments' default).
    Linear,
    /// Linear warm-up, then half a cosine to 0 at `total_steps`.
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            other => bail!(
                "unknown lr_scheduler_type {other:?}; expected constant, constant_with_warmup, \
                 linear or cosine"
            ),
        })
    }
}

/// Learning rate as a function of the number of optimizer steps already taken, like a
/// `LambdaLR` stepped after each `optimizer.step()`: the first update uses `lr(0)`, which is 0
/// whenever there is a warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// `transformers`' `get_warmup_steps`: `ceil(total_steps · warmup_ratio)`.
    pub fn warmup_steps_for_ratio(warmup_ratio: f64, total_steps: u64) -> u64 {
        (total_steps as f64 * warmup_ratio).ceil() as u64
    }

    /// The learning rate of the update that follows `step` completed ones.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind == ScheduleKind::Constant {
            return 1.0;
        }
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let decay_steps = (total - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((total - step) / decay_steps).max(0.0),
            ScheduleKind::Cosine => {
                // num_cycles = 0.5: from 1 at the end of warm-up to 0 at total_steps.
                let progress = (step - warmup) / decay_steps;
                (0.5 * (1.0 + (PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// Scales the gradients of `vars` so that their global L2 norm is at most `max_norm` and
/// returns the norm before clipping, like `torch.nn.utils.clip_grad_norm_` (factor
/// `max_norm / (norm + 1e-6)`, applied only when below 1). Variables without a gradient are
/// skipped. A non-finite norm is returned with the gradients left as they are, so the caller
/// can skip the step instead of writing NaN into the weights.
pub fn clip_grad_norm<'a>(
    vars: impl IntoIterator<Item = &'a Var>,
    grads: &mut GradStore,
    max_norm: f64,
) -> Result<f64> {
    let vars: Vec<&Var> = vars.into_iter().collect();
    let mut sum_sq = 0.0f64;
    for var in &vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            sum_sq += s;
        }
    }
    let norm = sum_sq.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in &vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(norm)
}

/// Sums the gradients of a fixed set of variables over micro-batches, dropping everything else
/// a backward pass returns (activations' gradients would otherwise stay alive). The loss of
/// each micro-batch must already be divided by the step batch's normaliser, so the sum is the
/// gradient of the step loss.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Tensor>,
    sum: GradStore,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new<'a>(vars: impl IntoIterator<Item = &'a Var>) -> Self {
        Self {
            vars: vars.into_iter().map(|v| v.as_tensor().clone()).collect(),
            sum: GradStore::default(),
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, mut grads: GradStore) -> Result<()> {
        for var in &self.vars {
            if let Some(g) = grads.remove(var) {
                let total = match self.sum.remove(var) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                self.sum.insert(var, total);
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Counts a micro-batch whose gradient is known to be exactly zero without a backward pass
    /// (every row of it was left out because it cannot change the gradient): each variable
    /// without a gradient so far gets zeros. The optimizer step then happens as it would after
    /// a backward that returned zeros; AdamW still applies weight decay and its momentum.
    pub fn add_zero(&mut self) -> Result<()> {
        for var in &self.vars {
            if self.sum.get(var).is_none() {
                self.sum.insert(var, var.zeros_like()?);
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// The summed gradients; the accumulator starts over empty.
    pub fn take(&mut self) -> GradStore {
        self.micro_batches = 0;
        std::mem::take(&mut self.sum)
    }
}

/// What [`Optimizer`] needs of a run's configuration (the `train` section's optimizer keys, see
/// `TrainOptions::optimizer`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub adamw: AdamWParams,
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    pub warmup_ratio: f64,
}

/// AdamW on the LoRA parameters with the configured learning-rate schedule: the one object the
/// training loop and the supervised warm-up step, checkpoint and restore.
pub struct Optimizer {
    adamw: AdamW,
    schedule: LrSchedule,
}

impl Optimizer {
    /// `updates` is the number of optimizer steps the whole run will take (training steps ×
    /// minibatches × iterations), which the decaying schedules need.
    pub fn new(
        lora: &[(String, Var, Var)],
        settings: &OptimizerSettings,
        updates: usize,
    ) -> Result<Self> {
        let vars = lora
            .iter()
            .flat_map(|(module, a, b)| {
                [
                    (format!("{module}.lora_A"), a.clone()),
                    (format!("{module}.lora_B"), b.clone()),
                ]
            })
            .collect();
        let total = updates as u64;
        Ok(Self {
            adamw: AdamW::new(vars, settings.adamw)?,
            schedule: LrSchedule {
                kind: settings.schedule,
                base_lr: settings.learning_rate,
                warmup_steps: LrSchedule::warmup_steps_for_ratio(settings.warmup_ratio, total),
                total_steps: total,
            },
        })
    }

    /// The learning rate of the next update.
    pub fn learning_rate(&self) -> f64 {
        self.schedule.lr(self.adamw.steps())
    }

    /// Sums micro-batch gradients of the trainable variables only.
    pub fn accumulator(&self) -> GradAccumulator {
        GradAccumulator::new(self.adamw.vars().iter().map(|(_, v)| v))
    }

    /// Clips `grads` to global norm `max_norm` (≤ 0: no clipping) and applies one update at
    /// the scheduled rate. Returns the norm before clipping; a non-finite norm skips the update
    /// rather than writing NaN into the adapters.
    pub fn step(&mut self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let bound = if max_norm > 0.0 {
            max_norm
        } else {
            f64::INFINITY
        };
        let norm = clip_grad_norm(self.adamw.vars().iter().map(|(_, v)| v), grads, bound)?;
        if !norm.is_finite() {
            tracing::warn!("gradient norm is {norm}; update skipped");
            return Ok(norm);
        }
        let lr = self.learning_rate();
        self.adamw.step(grads, lr)?;
        Ok(norm)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        self.adamw.save(dir)
    }

    pub fn load(&mut self, dir: &Path) -> Result<()> {
        self.adamw.load(dir)
    }
}
