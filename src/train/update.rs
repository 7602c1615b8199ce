//! The update of one generation batch (docs/algorithms.md §2, steps 4–6): minibatches of whole
//! groups × `num_iterations`, each minibatch one optimizer step whose gradient is accumulated
//! over memory micro-batches under the minibatch's denominators.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::algo::{
    self, AlgoConfig, Denominators, Diagnostics, LogProbs, Prepared, Row, StepBatch,
};
use crate::model::optim::{GradAccumulator, Optimizer};
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
    /// Over the rows that were computed only.
    pub diagnostics: Diagnostics,
    /// Rows of the trained batch that got no forward or backward: they cannot change the
    /// gradient (docs/algorithms.md §3.9).
    pub rows_skipped: usize,
    /// KL(π_old ‖ π_ref) per completion token of the computed rows (see [`kl_to_start`]);
    /// `None` when no row was computed.
    pub kl_to_start: Option<f64>,
    /// The same per completion, by generation-batch row (`None` for rows not computed): the
    /// estimator is heavy-tailed, and this names the replies that move a step's mean.
    pub kl_to_start_by_row: Vec<Option<f64>>,
}

impl UpdateOutcome {
    /// Turns the sums over `steps` optimizer steps into means (`kl_sum`, `dpo_sum`: the sums of
    /// `kl` and `dpo_loss`, which are `Some` when any step reported them).
    fn average(&mut self, steps: usize, kl_sum: f64, dpo_sum: f64) {
        if steps == 0 {
            return;
        }
        let n = steps as f64;
        self.stepped = true;
        self.loss /= n;
        self.pg_loss /= n;
        self.grad_norm /= n;
        self.kl = self.kl.map(|_| kl_sum / n);
        self.dpo_loss = self.dpo_loss.map(|_| dpo_sum / n);
    }
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
        // Rows that cannot change the gradient get no forward at all (docs/algorithms.md §3.9);
        // whether a row can is the same in every minibatch and pass.
        let computed: Vec<Row> = batch
            .rows_with_gradient(self.algo)
            .into_iter()
            .map(|i| batch.rows[i].clone())
            .collect();
        outcome.rows_skipped = batch.len() - computed.len();
        let on_policy = self.algo.num_iterations == 1 && minibatches.len() == 1;
        let (old, reference) = self.frozen(&rows, &computed, on_policy)?;
        let tables = Tables {
            rows: &rows,
            old: old.as_ref(),
            reference: reference.as_ref().filter(|_| self.algo.needs_reference()),
        };
        let mut seen = LogProbTable::new(rows.completions.len());
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
                let sums = self.accumulate(minibatch, &denom, &tables, &mut seen, &mut grads)?;
                outcome.diagnostics.merge(&sums.diagnostics);
                outcome.grad_norm += optimizer.step(&mut grads.take(), self.max_grad_norm)?;
                steps += 1;
                outcome.loss += sums.loss;
                outcome.pg_loss += sums.pg;
                if let Some(v) = sums.kl {
                    kl_sum += v;
                    outcome.kl = Some(0.0);
                }
                if let Some(v) = sums.dpo {
                    dpo_sum += v;
                    outcome.dpo_loss = Some(0.0);
                }
            }
        }
        outcome.average(steps, kl_sum, dpo_sum);
        if let Some(r) = &reference {
            let kl = kl_to_start(self.algo, &computed, old.as_ref().unwrap_or(&seen), r);
            (outcome.kl_to_start, outcome.kl_to_start_by_row) = (Some(kl.mean), kl.by_row);
        }
        Ok(outcome)
    }

    /// ℓ^old and ℓ^ref of the `computed` rows, without gradient, before any update
    /// (docs/algorithms.md §2, step 1). ℓ^old is `None` when `on_policy` (μ = 1, a single
    /// minibatch): it equals the detached ℓ of the training forward. ℓ^ref feeds the loss when the
    /// algorithm needs it, and `kl_to_start` always. Both are `None` without computed rows.
    fn frozen(
        &self,
        rows: &Rows,
        computed: &[Row],
        on_policy: bool,
    ) -> Result<(Option<LogProbTable>, Option<LogProbTable>)> {
        if computed.is_empty() {
            return Ok((None, None));
        }
        let old = if on_policy {
            None
        } else {
            Some(self.no_grad(rows, computed, true)?)
        };
        Ok((old, Some(self.no_grad(rows, computed, false)?)))
    }

    /// Forward, loss and backward of the micro-batches of one optimizer-step batch under its
    /// denominators, gradients summed into `grads`. Only the rows with gradient are computed; a
    /// micro-batch without any gets no forward, and when no row of the step has gradient the
    /// sum is an explicit zero, so the optimizer step is the one a zero backward would give.
    /// `seen` receives the detached training log-probs when they serve as ℓ^old.
    fn accumulate(
        &self,
        minibatch: &StepBatch,
        denom: &Denominators,
        tables: &Tables,
        seen: &mut LogProbTable,
        grads: &mut GradAccumulator,
    ) -> Result<StepSums> {
        let mut sums = StepSums {
            kl: tables.reference.map(|_| 0.0),
            dpo: self.algo.dpo_enabled().then_some(0.0),
            ..StepSums::default()
        };
        for micro in minibatch.split(self.micro_batches) {
            let keep = micro.rows_with_gradient(self.algo);
            if keep.is_empty() {
                continue;
            }
            let computed: Vec<Row> = keep.iter().map(|&i| micro.rows[i].clone()).collect();
            let (p, c) = tables.rows.select(&computed);
            let forward = self
                .policy
                .train_logprobs(&p, &c, self.temperature)
                .context("forward pass of the policy")?;
            let new = &forward.logp;
            let width = new.dim(1)?;
            let old_t = match tables.old {
                Some(table) => table.gather(&computed, width, new.device())?,
                None => {
                    seen.record(&computed, new)?;
                    new.detach()
                }
            };
            let ref_t = tables
                .reference
                .map(|table| table.gather(&computed, width, new.device()))
                .transpose()?;
            let logp = LogProbs {
                new,
                old: &old_t,
                reference: ref_t.as_ref(),
                entropy: None,
            };
            let out = algo::loss_rows(self.algo, &micro, &keep, &logp, denom)?;
            sums.loss += out.value;
            sums.pg += out.pg_loss;
            if let Some(v) = out.kl_term {
                *sums.kl.get_or_insert(0.0) += v;
            }
            if let Some(v) = out.dpo_loss {
                *sums.dpo.get_or_insert(0.0) += v;
            }
            sums.diagnostics.merge(&out.diagnostics);
            grads.add(forward.backward(&out.loss)?)?;
        }
        if grads.micro_batches() == 0 {
            grads.add_zero()?;
        }
        Ok(sums)
    }

    /// Log-probs without gradient of `computed` (adapters on: ℓ^old; off: ℓ^ref).
    fn no_grad(&self, rows: &Rows, computed: &[Row], adapters: bool) -> Result<LogProbTable> {
        let (p, c) = rows.select(computed);
        let t = self
            .policy
            .logprobs(&p, &c, self.temperature, false, adapters)?;
        let mut table = LogProbTable::new(rows.completions.len());
        table.record(computed, &t)?;
        Ok(table)
    }
}

/// The rows' tokens and the constant log-prob tables the loss reads: ℓ^old (`None`: the
/// detached training forward) and ℓ^ref (`None` unless the algorithm needs it).
struct Tables<'a> {
    rows: &'a Rows<'a>,
    old: Option<&'a LogProbTable>,
    reference: Option<&'a LogProbTable>,
}

/// One optimizer step's loss values and diagnostics, summed over its micro-batches.
#[derive(Default)]
struct StepSums {
    loss: f64,
    pg: f64,
    kl: Option<f64>,
    dpo: Option<f64>,
    diagnostics: Diagnostics,
}

/// `kl_to_start`: the mean over the completion tokens of `computed` of Schulman's k3 estimator
/// exp(Δ) − Δ − 1 with Δ = ℓ^ref − ℓ^old (docs/algorithms.md §3.6), i.e. KL(π_old ‖ π_ref)
/// estimated on the tokens π_old sampled, and the same mean per row. Computed rows have no
/// masked tokens, so their completion tokens are their loss tokens. Δ is clamped to
/// ±`log_ratio_clamp` (§8).
///
/// Unbiased but heavy-tailed: a token the policy sampled at probability q that the base model
/// gives p ≫ q adds p/q to the sum, so one rare token can carry a step (docs/learning.md).
fn kl_to_start(
    cfg: &AlgoConfig,
    computed: &[Row],
    old: &LogProbTable,
    reference: &LogProbTable,
) -> KlToStart {
    let mut by_row = vec![None; old.rows.len()];
    let (mut sum, mut tokens) = (0.0, 0usize);
    for row in computed {
        let (o, r) = (&old.rows[row.index], &reference.rows[row.index]);
        let (row_sum, n) =
            (o.iter().zip(r).take(row.loss_len(cfg))).fold((0.0, 0usize), |(sum, n), (&o, &r)| {
                let delta = (r as f64 - o as f64).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp);
                (sum + delta.exp_m1() - delta, n + 1)
            });
        if n > 0 {
            by_row[row.index] = Some(row_sum / n as f64);
        }
        sum += row_sum;
        tokens += n;
    }
    KlToStart {
        mean: sum / tokens.max(1) as f64,
        by_row,
    }
}

struct KlToStart {
    mean: f64,
    by_row: Vec<Option<f64>>,
}

impl Rows<'_> {
    fn select(&self, rows: &[Row]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        rows.iter()
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
    /// An empty table for a generation batch of `n` rows.
    fn new(n: usize) -> Self {
        Self {
            rows: vec![Vec::new(); n],
        }
    }

    /// Stores `values` (`[rows.len(), T]`, detached) as the log-probs of `rows`.
    fn record(&mut self, rows: &[Row], values: &Tensor) -> Result<()> {
        let values: Vec<Vec<f32>> = values.detach().to_dtype(DType::F32)?.to_vec2()?;
        for (row, mut v) in rows.iter().zip(values) {
            v.truncate(row.length);
            self.rows[row.index] = v;
        }
        Ok(())
    }

    /// `rows` as a `[rows.len(), width]` tensor, zero-padded.
    fn gather(&self, rows: &[Row], width: usize, device: &Device) -> Result<Tensor> {
        let mut flat = vec![0f32; rows.len() * width];
        for (i, row) in rows.iter().enumerate() {
            let values = &self.rows[row.index];
            let n = values.len().min(width);
            flat[i * width..i * width + n].copy_from_slice(&values[..n]);
        }
        Ok(Tensor::from_vec(flat, (rows.len(), width), device)?)
    }
}

#[cfg(test)]
mod tests;
