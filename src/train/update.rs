//! The update of one generation batch (docs/algorithms.md §2, steps 4–6): minibatches of whole
//! groups × `num_iterations`, each minibatch one optimizer step whose gradient is accumulated
//! over memory micro-batches under the minibatch's denominators.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use crate::algo::{self, AlgoConfig, Denominators, Diagnostics, LogProbs, Prepared, StepBatch};
use crate::model::optim::Optimizer;
use crate::model::Policy;
use crate::rollout::Group;

pub(crate) struct Update<'a> {
    pub algo: &'a AlgoConfig,
    pub policy: &'a Policy,
    pub temperature: f64,
    /// Memory micro-batches per optimizer step (`gradient_accumulation_steps`).
    pub micro_batches: usize,
    pub max_grad_norm: f64,
}

/// What the update did, averaged over its optimizer steps.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpdateOutcome {
    /// At least one optimizer step was taken.
    pub stepped: bool,
    pub loss: f64,
    pub pg_loss: f64,
    pub kl: Option<f64>,
    pub dpo_loss: Option<f64>,
    pub grad_norm: f64,
    pub diagnostics: Diagnostics,
}

/// Prompt and completion tokens of every row of the generation batch, by row index.
struct Rows<'a> {
    prompts: Vec<&'a [u32]>,
    completions: Vec<&'a [u32]>,
}

impl Update<'_> {
    /// The update of the generation batch `groups`; `prompts` are by theorem index.
    pub fn run(
        &self,
        prepared: &Prepared,
        groups: &[Group],
        prompts: &[Vec<u32>],
        optimizer: &mut Optimizer,
    ) -> Result<UpdateOutcome> {
        let rows = Rows {
            prompts: groups
                .iter()
                .flat_map(|g| g.completions.iter().map(|_| prompts[g.theorem].as_slice()))
                .collect(),
            completions: groups
                .iter()
                .flat_map(|g| g.completions.iter().map(|c| c.tokens.as_slice()))
                .collect(),
        };
        self.run_rows(prepared, rows, optimizer)
    }

    /// The same update on token rows given directly (`prompts[i]`, `completions[i]` of
    /// generation-batch row `i`): what the benchmark's training step runs.
    pub fn run_tokens(
        &self,
        prepared: &Prepared,
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        optimizer: &mut Optimizer,
    ) -> Result<UpdateOutcome> {
        let rows = Rows {
            prompts: prompts.iter().map(Vec::as_slice).collect(),
            completions: completions.iter().map(Vec::as_slice).collect(),
        };
        self.run_rows(prepared, rows, optimizer)
    }

    fn run_rows(
        &self,
        prepared: &Prepared,
        rows: Rows<'_>,
        optimizer: &mut Optimizer,
    ) -> Result<UpdateOutcome> {
        let batch = prepared.kept_rows();
        let mut outcome = UpdateOutcome::default();
        if batch.is_empty() {
            tracing::debug!("no group left to learn from after dynamic sampling; update skipped");
            return Ok(outcome);
        }
        let minibatches = batch.split(self.algo.num_minibatches);
        // On-policy with a single optimizer step, ℓ^old equals the detached ℓ of the training
        // forward; otherwise it is frozen before the first update (docs/algorithms.md §2, step 1).
        let old = if self.algo.num_iterations == 1 && minibatches.len() == 1 {
            None
        } else {
            Some(self.no_grad(&rows, &batch, true)?)
        };
        let reference = if self.algo.needs_reference() {
            Some(self.no_grad(&rows, &batch, false)?)
        } else {
            None
        };
        let mut steps = 0usize;
        let (mut kl_sum, mut dpo_sum) = (0.0, 0.0);
        for _ in 0..self.algo.num_iterations {
            for minibatch in &minibatches {
                let denom = Denominators::new(self.algo, minibatch)?;
                if denom.is_empty() {
                    tracing::info!("a minibatch has no loss tokens; its optimizer step is skipped");
                    continue;
                }
                let mut grads = optimizer.accumulator();
                let (mut loss, mut pg, mut kl, mut dpo) = (0.0, 0.0, None, None);
                for micro in minibatch.split(self.micro_batches) {
                    let (p, c) = rows.select(&micro);
                    let forward = self
                        .policy
                        .train_logprobs(&p, &c, self.temperature)
                        .context("forward pass of the policy")?;
                    let new = &forward.logp;
                    let width = new.dim(1)?;
                    let old_t = match &old {
                        Some(table) => table.gather(&micro, width, new.device())?,
                        None => new.detach(),
                    };
                    let ref_t = reference
                        .as_ref()
                        .map(|table| table.gather(&micro, width, new.device()))
                        .transpose()?;
                    let logp = LogProbs {
                        new,
                        old: &old_t,
                        reference: ref_t.as_ref(),
                        entropy: None,
                    };
                    let out = algo::loss(self.algo, &micro, &logp, &denom)?;
                    loss += out.value;
                    pg += out.pg_loss;
                    if let Some(v) = out.kl_term {
                        *kl.get_or_insert(0.0) += v;
                    }
                    if let Some(v) = out.dpo_loss {
                        *dpo.get_or_insert(0.0) += v;
                    }
                    outcome.diagnostics.merge(&out.diagnostics);
                    grads.add(forward.backward(&out.loss)?)?;
                }
                outcome.grad_norm += optimizer.step(&mut grads.take(), self.max_grad_norm)?;
                steps += 1;
                outcome.loss += loss;
                outcome.pg_loss += pg;
                if let Some(v) = kl {
                    kl_sum += v;
                    outcome.kl = Some(0.0);
                }
                if let Some(v) = dpo {
                    dpo_sum += v;
                    outcome.dpo_loss = Some(0.0);
                }
            }
        }
        if steps > 0 {
            let n = steps as f64;
            outcome.stepped = true;
            outcome.loss /= n;
            outcome.pg_loss /= n;
            outcome.grad_norm /= n;
            outcome.kl = outcome.kl.map(|_| kl_sum / n);
            outcome.dpo_loss = outcome.dpo_loss.map(|_| dpo_sum / n);
        }
        Ok(outcome)
    }

    /// Log-probs without gradient of every row of `batch` (adapters on: ℓ^old; off: ℓ^ref).
    fn no_grad(&self, rows: &Rows, batch: &StepBatch, adapters: bool) -> Result<LogProbTable> {
        let (p, c) = rows.select(batch);
        let t = self
            .policy
            .logprobs(&p, &c, self.temperature, false, adapters)?;
        let values: Vec<Vec<f32>> = t.to_vec2()?;
        let mut table = LogProbTable {
            rows: vec![Vec::new(); rows.completions.len()],
        };
        for (row, mut v) in batch.rows.iter().zip(values) {
            v.truncate(row.length);
            table.rows[row.index] = v;
        }
        Ok(table)
    }
}

impl Rows<'_> {
    fn select(&self, batch: &StepBatch) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        batch
            .rows
            .iter()
            .map(|r| {
                (
                    self.prompts[r.index].to_vec(),
                    self.completions[r.index].to_vec(),
                )
            })
            .unzip()
    }
}

/// Constant per-token log-probs, by generation-batch row.
struct LogProbTable {
    rows: Vec<Vec<f32>>,
}

impl LogProbTable {
    /// The rows of `batch` as a `[b, width]` tensor, zero-padded.
    fn gather(&self, batch: &StepBatch, width: usize, device: &Device) -> Result<Tensor> {
        let mut flat = vec![0f32; batch.len() * width];
        for (i, row) in batch.rows.iter().enumerate() {
            let values = &self.rows[row.index];
            let n = values.len().min(width);
            flat[i * width..i * width + n].copy_from_slice(&values[..n]);
        }
        Ok(Tensor::from_vec(flat, (batch.len(), width), device)?)
    }
}
