//! One line of `metrics.jsonl` per step, and one line of `samples.jsonl` per completion.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::update::UpdateOutcome;
use crate::algo::Prepared;
use crate::data::fim::Hole;
use crate::data::Theorem;
use crate::lean::{Evidence, VerdictKind};
use crate::rollout::{Completion, Group, RolloutTimes};

/// What a step measured. Timings (`*_seconds`, `tokens_per_second`) vary between runs; every
/// other field is reproduced exactly by `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    /// Who sampled this step's proofs: `policy` (on-policy) or `endpoint` (a server that does
    /// not see the adapters: off-policy, and the rewards measure the served model).
    pub sampler: String,
    /// Mean and std of the raw rewards of every completion sampled this step.
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Fraction of completions Lean accepted.
    pub pass_rate: f64,
    pub completions: usize,
    /// Verdict kind → count.
    pub verdicts: BTreeMap<String, usize>,
    /// Fraction of groups whose shaped rewards were all equal.
    pub zero_variance_fraction: f64,
    /// Groups dropped by dynamic sampling, and the extra sampling rounds it took.
    pub groups_dropped: usize,
    /// Of the dropped groups, those whose task rewards (before overlong shaping) were all
    /// equal: all proofs failed, or all passed.
    #[serde(default)]
    pub groups_dropped_flat_reward: usize,
    /// Groups trained on in which Lean accepted no proof: their only signal is partial credit
    /// or length (none under DAPO's default filter with binary rewards).
    #[serde(default)]
    pub kept_groups_none_accepted: usize,
    /// Checker requests sent again to another kimina server this step (a cluster's failovers;
    /// proofs none could check are `checker_unavailable` in `verdicts`).
    #[serde(default)]
    pub checker_retries: u64,
    pub resample_rounds: usize,
    /// False when nothing was left to learn from (no optimizer step).
    pub optimizer_step: bool,
    pub loss: f64,
    pub pg_loss: f64,
    /// The reduced KL term (docs/algorithms.md §3.6), when the algorithm computes reference
    /// log-probs (β ≠ 0, or DGPO's pairwise term). With β = 0 it covers only the rows whose
    /// forward ran (see `rows_skipped`).
    pub kl: Option<f64>,
    pub dpo_loss: Option<f64>,
    /// Fractions of units (tokens, or sequences at sequence level) whose clip binds below
    /// (ρ < 1 − ε_low, A < 0) and above (ρ > 1 + ε_high, A > 0), and the mean ratio ρ, over
    /// the rows whose forward ran: rows skipped because they cannot change the gradient
    /// (`rows_skipped`, mostly A = 0) are not counted.
    pub clip_low_frac: f64,
    pub clip_high_frac: f64,
    pub ratio_mean: f64,
    /// Rows of the trained batch that got no forward or backward because they cannot change the
    /// gradient: no loss token, or advantage exactly 0 with β = 0 and no DGPO pair using them
    /// (docs/algorithms.md §3.9). Counted once per row, whatever `num_iterations`.
    #[serde(default)]
    pub rows_skipped: usize,
    /// KL of the policy that sampled this step (before its update) to the start policy (the
    /// base model, adapters off): the mean over the completion tokens of the rows whose forward
    /// ran of Schulman's k3 estimator exp(Δ) − Δ − 1, Δ = ℓ^ref − ℓ^old (docs/algorithms.md
    /// §3.6), measured whatever β. 0 at step 1 of a run from fresh adapters (LoRA B starts at
    /// 0); a run from a warm-start adapter (`model.adapter`, an SFT) starts at that adapter's
    /// distance from the base model (1.07 nats/token on SmolLM2 after SFT). `None` when no row was
    /// computed. With `train.endpoint` the tokens are the server's, not the policy's samples,
    /// so it is then a drift indicator rather than an estimate of KL(π_old ‖ π_ref).
    #[serde(default)]
    pub kl_to_start: Option<f64>,
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Shares of this step's replies with no extractable proof (`no_proof`: no code block or
    /// nothing after `:=`), rejected by screening before Lean ran (`forbidden`), and rejected by
    /// Lean with an error (`lean_error`); `pass_rate` is the accepted share. A policy
    /// collapsing into malformed or empty replies shows here first.
    #[serde(default)]
    pub share_no_proof: f64,
    #[serde(default)]
    pub share_screened: f64,
    #[serde(default)]
    pub share_lean_error: f64,
    /// Mean entropy (nats) of the policy's temperature-scaled next-token distributions at the
    /// sampled positions, before top-k/top-p (`None` for endpoint or greedy sampling): its
    /// fall toward 0 is entropy collapse.
    #[serde(default)]
    pub sampled_entropy: Option<f64>,
    pub completion_length_mean: f64,
    pub completion_length_max: usize,
    pub sampling_seconds: f64,
    pub checking_seconds: f64,
    pub training_seconds: f64,
    pub tokens_per_second: f64,
    /// `train.endpoint`: the share of this step's samples drawn with the policy's current
    /// adapter (hot-loaded by `train.endpoint_adapter_dir` at this step's version); 0 for
    /// off-policy sampling from the served model, below 1 between syncs of
    /// `train.sync_steps` > 1 or after a failed load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_current_share: Option<f64>,
    /// `train.endpoint_adapter_dir`: the mean over the sampled tokens of |log π_server −
    /// log π_policy| (both at temperature 1, the policy as it was before this step's update):
    /// the off-policy gap of the server's samples. Near 0 (numerics only) when the server
    /// sampled with the current adapter; it grows with the adapter's age. `None` when the
    /// server sent no token log-probs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_logprob_gap: Option<f64>,
    /// `train.task: fim`: the mask ratio this step's holes were cut at (docs/fim.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_ratio: Option<f64>,
    /// `train.task: fim`: the pass rate at every ratio trained at so far, this step included
    /// (key: the ratio with three decimals).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pass_rate_by_ratio: BTreeMap<String, f64>,
}

/// One completion as users read it: their model's proof, what Lean said, what it earned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSample {
    pub step: usize,
    pub theorem: String,
    pub index: usize,
    pub completion: String,
    /// The proof that was checked (extracted from the completion).
    pub proof: Option<String>,
    pub tokens: usize,
    pub truncated: bool,
    pub reward: f64,
    pub verdict: VerdictKind,
    pub accepted: bool,
    pub evidence: Evidence,
    pub seconds: f64,
    /// `train.task: fim`: the hole the completion fills; `proof` is then the reassembled proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hole: Option<Hole>,
    /// `train.endpoint_adapter_dir`: the version (training steps done) of the adapter the
    /// server sampled this completion with; absent for the served model or local sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_version: Option<usize>,
    /// KL to the base model per token of this completion (k3, as the step's `kl_to_start`),
    /// for the completions the update computed: the estimator is heavy-tailed, and this names
    /// the replies that carry a step's mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_to_start: Option<f64>,
}

/// Everything one step produced, from which its metrics line and sample lines are built.
pub(super) struct StepOutcome<'a> {
    pub step: usize,
    pub epoch: usize,
    /// Sampled by an endpoint rather than the policy.
    pub remote: bool,
    /// Every group sampled this step, dropped ones included, and their rewards in order.
    pub groups: &'a [Group],
    pub rewards: &'a [f64],
    pub prepared: &'a Prepared,
    pub resample_rounds: usize,
    pub update: &'a UpdateOutcome,
    pub learning_rate: f64,
    /// See [`StepMetrics::sampled_entropy`].
    pub sampled_entropy: Option<f64>,
    pub times: RolloutTimes,
    pub training_seconds: f64,
}

impl StepOutcome<'_> {
    fn completions(&self) -> impl Iterator<Item = (&Group, &Completion)> {
        self.groups
            .iter()
            .flat_map(|grp| grp.completions.iter().map(move |c| (grp, c)))
    }

    pub fn metrics(&self) -> StepMetrics {
        let n = self.rewards.len().max(1) as f64;
        let mean = self.rewards.iter().sum::<f64>() / n;
        let var = self.rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        let mut verdicts = BTreeMap::new();
        for (_, c) in self.completions() {
            *verdicts
                .entry(c.checked.verdict.kind.name().to_string())
                .or_insert(0) += 1;
        }
        let accepted = self
            .completions()
            .filter(|(_, c)| c.checked.verdict.is_accepted())
            .count();
        let lengths: Vec<usize> = self.completions().map(|(_, c)| c.tokens.len()).collect();
        let kept = self.prepared.kept_groups();
        let none_accepted = |g: &&usize| {
            self.groups[**g]
                .completions
                .iter()
                .all(|c| !c.checked.verdict.is_accepted())
        };
        let share = |kind: VerdictKind| verdicts.get(kind.name()).copied().unwrap_or(0) as f64 / n;
        let (share_no_proof, share_screened, share_lean_error) = (
            share(VerdictKind::NoProof),
            share(VerdictKind::Forbidden),
            share(VerdictKind::LeanError),
        );
        let update = self.update;
        StepMetrics {
            step: self.step,
            epoch: self.epoch,
            sampler: if self.remote { "endpoint" } else { "policy" }.to_string(),
            reward_mean: mean,
            reward_std: var.sqrt(),
            pass_rate: accepted as f64 / n,
            completions: lengths.len(),
            verdicts,
            zero_variance_fraction: self.prepared.zero_variance_fraction(),
            groups_dropped: self.prepared.groups() - kept.len(),
            groups_dropped_flat_reward: self.prepared.dropped_flat_task_reward(),
            kept_groups_none_accepted: kept.iter().filter(none_accepted).count(),
            checker_retries: self
                .completions()
                .map(|(_, c)| u64::from(c.checked.retries))
                .sum(),
            resample_rounds: self.resample_rounds,
            optimizer_step: update.stepped,
            loss: update.loss,
            pg_loss: update.pg_loss,
            kl: update.kl,
            dpo_loss: update.dpo_loss,
            clip_low_frac: update.diagnostics.clip_low_frac(),
            clip_high_frac: update.diagnostics.clip_high_frac(),
            ratio_mean: update.diagnostics.ratio_mean(),
            rows_skipped: update.rows_skipped,
            kl_to_start: update.kl_to_start,
            grad_norm: update.grad_norm,
            learning_rate: self.learning_rate,
            share_no_proof,
            share_screened,
            share_lean_error,
            sampled_entropy: self.sampled_entropy,
            completion_length_mean: lengths.iter().sum::<usize>() as f64 / n,
            completion_length_max: lengths.iter().copied().max().unwrap_or(0),
            sampling_seconds: self.times.sampling,
            checking_seconds: self.times.checking,
            training_seconds: self.training_seconds,
            tokens_per_second: self.times.tokens as f64 / self.times.sampling.max(1e-9),
            endpoint_current_share: self.remote.then(|| self.current_share()),
            endpoint_logprob_gap: self.logprob_gap(),
            mask_ratio: None,
            pass_rate_by_ratio: BTreeMap::new(),
        }
    }

    /// See [`StepMetrics::endpoint_current_share`]: the policy sampled at this step is the one
    /// of `step - 1` training steps.
    fn current_share(&self) -> f64 {
        let current = Some(self.step - 1);
        let (mut n, mut hits) = (0usize, 0usize);
        for (_, c) in self.completions() {
            n += 1;
            hits += usize::from(c.served.and_then(|s| s.adapter_version) == current);
        }
        hits as f64 / n.max(1) as f64
    }

    /// See [`StepMetrics::endpoint_logprob_gap`].
    fn logprob_gap(&self) -> Option<f64> {
        let gaps = self
            .completions()
            .filter_map(|(_, c)| c.served.and_then(|s| s.logprob_gap));
        let (sum, tokens) = gaps.fold((0.0, 0), |(s, n), g| (s + g.abs_sum, n + g.tokens));
        (tokens > 0).then(|| sum / tokens as f64)
    }

    /// One record per completion, in sampling order; `index` is the completion's place in its
    /// group.
    pub fn samples(&self, theorems: &[Theorem]) -> Vec<TrainSample> {
        self.groups
            .iter()
            .flat_map(|grp| {
                grp.completions
                    .iter()
                    .enumerate()
                    .map(move |(i, c)| (grp, i, c))
            })
            .zip(self.rewards)
            .enumerate()
            .map(|(row, ((grp, index, c), &reward))| TrainSample {
                step: self.step,
                theorem: theorems[grp.theorem].name.clone(),
                index,
                completion: c.text.clone(),
                proof: c.checked.proof.clone(),
                tokens: c.tokens.len(),
                truncated: c.truncated,
                reward,
                verdict: c.checked.verdict.kind,
                accepted: c.checked.verdict.is_accepted(),
                evidence: c.checked.verdict.evidence.clone(),
                seconds: c.checked.seconds,
                hole: theorems[grp.theorem].hole.clone(),
                adapter_version: c.served.and_then(|s| s.adapter_version),
                kl_to_start: self.update.kl_to_start_by_row.get(row).copied().flatten(),
            })
            .collect()
    }
}
