//! The algorithm's share of an optimizer step: advantages, loss and backward on given per-token
//! log-probs, with no model in the way (the model's forward and backward are [`super::model`]'s).

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Map;

use super::best_of;
use crate::algo::{
    loss, prepare, presets::PRESETS, AlgoConfig, BatchShape, Denominators, LogProbs,
};

/// The size of the batch the loss runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LossShape {
    pub groups: usize,
    pub group_size: usize,
    /// Completion length (the width of the log-prob tensors).
    pub tokens: usize,
}

/// Seeded inputs of one step: binary rewards, completion lengths, and old, new and reference
/// log-probs of `[groups × group_size, tokens]`, the new ones a variable to differentiate.
pub struct LossInputs {
    shape: LossShape,
    rewards: Vec<f64>,
    lengths: Vec<usize>,
    truncated: Vec<bool>,
    new: Var,
    old: Tensor,
    reference: Tensor,
}

impl LossInputs {
    pub fn new(shape: LossShape, seed: u64) -> Result<LossInputs> {
        ensure!(
            shape.groups > 0 && shape.group_size > 1 && shape.tokens > 0,
            "the loss benchmark needs at least one group of two completions of one token"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (b, t) = (shape.groups * shape.group_size, shape.tokens);
        let rewards = (0..b).map(|_| f64::from(rng.random_bool(0.3))).collect();
        // Lengths from t/16 up (32..=512 at 512 tokens), so most rows are partly padding.
        let lengths: Vec<usize> = (0..b)
            .map(|_| rng.random_range((t / 16).max(1)..=t))
            .collect();
        let truncated = lengths.iter().map(|&l| l == t).collect();
        let old: Vec<f32> = (0..b * t).map(|_| rng.random_range(-4.0..-0.01)).collect();
        let mut jitter = |xs: &[f32]| -> Vec<f32> {
            xs.iter().map(|x| x + rng.random_range(-0.2..0.2)).collect()
        };
        let new = jitter(&old);
        let reference = jitter(&old);
        let dev = Device::Cpu;
        Ok(LossInputs {
            shape,
            rewards,
            lengths,
            truncated,
            new: Var::from_vec(new, (b, t), &dev)?,
            old: Tensor::from_vec(old, (b, t), &dev)?,
            reference: Tensor::from_vec(reference, (b, t), &dev)?,
        })
    }

    pub fn shape(&self) -> LossShape {
        self.shape
    }
}

/// The configuration of algorithm `name` (a preset of `lean-grpo algorithms`) for `shape`.
pub fn preset(name: &str, shape: LossShape) -> Result<AlgoConfig> {
    Ok(AlgoConfig::resolve(
        name,
        &Map::new(),
        BatchShape {
            group_size: shape.group_size,
            max_completion_length: shape.tokens,
        },
    )?)
}

/// One step's algorithm work, as the trainer does it: [`prepare`] (shaped rewards, dynamic
/// sampling, advantages), the kept rows, the loss, and its backward to the new log-probs.
/// Returns the loss value.
pub fn loss_backward(cfg: &AlgoConfig, x: &LossInputs) -> Result<f64> {
    let p = prepare(cfg, &x.rewards, &x.lengths, &x.truncated)?;
    let batch = p.kept_rows();
    let rows: Vec<u32> = batch.rows.iter().map(|r| r.index as u32).collect();
    let idx = Tensor::new(rows.as_slice(), &Device::Cpu)?;
    let new = x.new.as_tensor().index_select(&idx, 0)?;
    let old = x.old.index_select(&idx, 0)?;
    let reference = x.reference.index_select(&idx, 0)?;
    let denom = Denominators::new(cfg, &batch)?;
    let logp = LogProbs {
        new: &new,
        old: &old,
        reference: cfg.needs_reference().then_some(&reference),
        entropy: None,
    };
    let out = loss(cfg, &batch, &logp, &denom)?;
    let grads = out.loss.backward()?;
    ensure!(
        grads.get(x.new.as_tensor()).is_some(),
        "the {} loss has no gradient to the log-probs",
        cfg.algorithm
    );
    Ok(out.value)
}

/// Seconds of [`loss_backward`] for every algorithm, best of `rounds`.
pub fn measure(shape: LossShape, rounds: usize) -> Result<BTreeMap<String, f64>> {
    let inputs = LossInputs::new(shape, 7)?;
    let mut seconds = BTreeMap::new();
    for p in PRESETS {
        let cfg = preset(p.name, shape)?;
        let (best, _) = best_of(rounds, || loss_backward(&cfg, &inputs))?;
        tracing::info!("bench: {} loss + backward {best:.4} s", p.name);
        seconds.insert(p.name.to_string(), best);
    }
    Ok(seconds)
}
