//! AdamW on the LoRA parameters with the configured learning-rate schedule: the one object the
//! loop steps, checkpoints and restores.

use std::path::Path;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Var;

use crate::config::TrainOptions;
use crate::model::optim::{clip_grad_norm, AdamW, AdamWParams, GradAccumulator, LrSchedule};

pub struct Optimizer {
    adamw: AdamW,
    schedule: LrSchedule,
}

impl Optimizer {
    /// `updates` is the number of optimizer steps the whole run will take (training steps ×
    /// minibatches × iterations), which the decaying schedules need.
    pub fn new(lora: &[(String, Var, Var)], train: &TrainOptions, updates: usize) -> Result<Self> {
        let vars = lora
            .iter()
            .flat_map(|(module, a, b)| {
                [
                    (format!("{module}.lora_A"), a.clone()),
                    (format!("{module}.lora_B"), b.clone()),
                ]
            })
            .collect();
        let params = AdamWParams {
            beta1: train.adam_beta1,
            beta2: train.adam_beta2,
            eps: train.adam_epsilon,
            weight_decay: train.weight_decay,
        };
        let total = updates as u64;
        Ok(Self {
            adamw: AdamW::new(vars, params)?,
            schedule: LrSchedule {
                kind: train.lr_scheduler_type.parse()?,
                base_lr: train.learning_rate,
                warmup_steps: LrSchedule::warmup_steps_for_ratio(train.warmup_ratio, total),
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
