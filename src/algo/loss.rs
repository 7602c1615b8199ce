//! The loss of one (micro-)batch (docs/algorithms.md §3.4–§3.7, §4.5): importance weights, clipped
//! surrogate, the KL penalty, the reduction and the DGPO mixing, as a candle graph whose only
//! gradient path is the current policy's log-probs.

use candle_core::{DType, Device, Tensor};
use serde::{Serialize, Serializer};

use super::autograd::{abs, cap_above, clamp_closed, expm1_minus_x};
use super::batch::{Denominators, StepBatch};
use super::config::{AlgoConfig, ImportanceLevel, KlEstimator, LossAgg};
use super::dgpo;
use super::AlgoError;

/// Per-token log-probs of one (micro-)batch, shape [b, T] with b = `batch.len()` and every row's
/// length ≤ T. Cells past a row's length are padding and may hold anything finite or not.
#[derive(Debug, Clone, Copy)]
pub struct LogProbs<'a> {
    /// ℓ: current policy; the loss backpropagates into it.
    pub new: &'a Tensor,
    /// ℓ^old: the policy that sampled the batch (treated as a constant).
    pub old: &'a Tensor,
    /// ℓ^ref: LoRA-off base model, when [`AlgoConfig::needs_reference`] (constant). When given
    /// with β = 0 the KL is still reported.
    pub reference: Option<&'a Tensor>,
    /// Per-token entropy of the current policy (with gradient), required when `entropy_coef` > 0.
    pub entropy: Option<&'a Tensor>,
}

/// What [`loss`] returns for one (micro-)batch. Every number is this batch's contribution under
/// the step denominators: summing over the micro-batches of a step gives the step's values.
#[derive(Debug, Clone, Serialize)]
pub struct LossOutput {
    /// Scalar f32 tensor to call `backward` on.
    #[serde(skip)]
    pub loss: Tensor,
    /// The loss value (same as `loss`).
    pub value: f64,
    /// Reduced surrogate alone.
    pub pg_loss: f64,
    /// Reduced KL estimator (without β), when reference log-probs were given.
    pub kl_term: Option<f64>,
    /// L_DPO part, when the pairwise term is on.
    pub dpo_loss: Option<f64>,
    pub diagnostics: Diagnostics,
}

/// Counters of one or more (micro-)batches; [`Diagnostics::merge`] accumulates a step. Units are
/// tokens at token level and non-empty sequences at sequence level. Only the rows whose log-probs
/// were given count ([`loss_rows`] leaves out rows without gradient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diagnostics {
    pub sequences: usize,
    pub loss_tokens: usize,
    pub units: usize,
    /// Units with ρ > 1 + ε_high and A > 0 (the clip binds).
    pub clip_high_count: usize,
    /// Units with ρ < 1 − ε_low and A < 0.
    pub clip_low_count: usize,
    pub ratio_sum: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// Σ of the KL estimator over loss tokens (0 without reference log-probs).
    pub kl_sum: f64,
    pub n_pairs: usize,
}

impl Default for Diagnostics {
    fn default() -> Self {
        Self {
            sequences: 0,
            loss_tokens: 0,
            units: 0,
            clip_high_count: 0,
            clip_low_count: 0,
            ratio_sum: 0.0,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            kl_sum: 0.0,
            n_pairs: 0,
        }
    }
}

impl Diagnostics {
    pub fn merge(&mut self, o: &Diagnostics) {
        self.sequences += o.sequences;
        self.loss_tokens += o.loss_tokens;
        self.units += o.units;
        self.clip_high_count += o.clip_high_count;
        self.clip_low_count += o.clip_low_count;
        self.ratio_sum += o.ratio_sum;
        self.ratio_min = self.ratio_min.min(o.ratio_min);
        self.ratio_max = self.ratio_max.max(o.ratio_max);
        self.kl_sum += o.kl_sum;
        self.n_pairs += o.n_pairs;
    }

    fn per_unit(&self, x: f64) -> f64 {
        x / self.units.max(1) as f64
    }

    pub fn clip_high_frac(&self) -> f64 {
        self.per_unit(self.clip_high_count as f64)
    }

    pub fn clip_low_frac(&self) -> f64 {
        self.per_unit(self.clip_low_count as f64)
    }

    pub fn ratio_mean(&self) -> f64 {
        self.per_unit(self.ratio_sum)
    }

    /// Mean KL estimate per loss token.
    pub fn kl_mean(&self) -> f64 {
        self.kl_sum / self.loss_tokens.max(1) as f64
    }
}

/// Serialised with the derived fractions and means, as the metrics log wants them.
impl Serialize for Diagnostics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let finite = |x: f64| x.is_finite().then_some(x);
        serde_json::json!({
            "sequences": self.sequences,
            "loss_tokens": self.loss_tokens,
            "units": self.units,
            "clip_high_count": self.clip_high_count,
            "clip_low_count": self.clip_low_count,
            "clip_high_frac": self.clip_high_frac(),
            "clip_low_frac": self.clip_low_frac(),
            "ratio_mean": self.ratio_mean(),
            "ratio_min": finite(self.ratio_min),
            "ratio_max": finite(self.ratio_max),
            "kl_mean": self.kl_mean(),
            "n_pairs": self.n_pairs,
        })
        .serialize(s)
    }
}

/// Constant per-batch tensors built on the host from the rows.
struct Masks {
    /// M as u8 [b, T]: 1 on loss tokens.
    mask: Tensor,
    /// W [b, T] of §3.8: the reduction weight of each token (0 off the loss mask).
    weights: Tensor,
    /// Σ_t W_{i,t}, `[b]`.
    row_weights: Tensor,
    /// 1 / max(1, |o_i|), `[b]`.
    inv_len: Tensor,
    /// A_i, [b, 1].
    advantages: Tensor,
    /// Host copies for the diagnostics.
    loss_len: Vec<usize>,
    adv: Vec<f32>,
}

fn masks(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    denom: &Denominators,
    t: usize,
    device: &Device,
) -> candle_core::Result<Masks> {
    let b = batch.len();
    let loss_len: Vec<usize> = (0..b).map(|i| batch.loss_len(cfg, i)).collect();
    let per_token: Vec<f64> = loss_len
        .iter()
        .map(|&n| match cfg.loss_agg {
            LossAgg::SeqMeanTokenMean => 1.0 / (denom.sequences.max(1) * n.max(1)) as f64,
            LossAgg::TokenMean => 1.0 / denom.loss_tokens.max(1) as f64,
            LossAgg::SeqMeanTokenSumNorm => {
                1.0 / (denom.sequences.max(1) * denom.max_completion_length) as f64
            }
        })
        .collect();
    let mut mask = vec![0u8; b * t];
    let mut weights = vec![0f32; b * t];
    for (i, &n) in loss_len.iter().enumerate() {
        for j in 0..n {
            mask[i * t + j] = 1;
            weights[i * t + j] = per_token[i] as f32;
        }
    }
    let row_weights: Vec<f32> = loss_len
        .iter()
        .zip(&per_token)
        .map(|(&n, w)| (n as f64 * w) as f32)
        .collect();
    let inv_len: Vec<f32> = loss_len.iter().map(|&n| 1.0 / n.max(1) as f32).collect();
    let adv: Vec<f32> = batch.rows.iter().map(|r| r.advantage).collect();
    Ok(Masks {
        mask: Tensor::from_vec(mask, (b, t), device)?,
        weights: Tensor::from_vec(weights, (b, t), device)?,
        row_weights: Tensor::from_vec(row_weights, b, device)?,
        inv_len: Tensor::from_vec(inv_len, b, device)?,
        advantages: Tensor::from_vec(adv.clone(), (b, 1), device)?,
        loss_len,
        adv,
    })
}

/// −min(min(ρ, δ)·A, clip(ρ, 1−ε_low, 1+ε_high)·A) for ratios ρ and advantages A (broadcast).
fn surrogate(cfg: &AlgoConfig, ratio: &Tensor, adv: &Tensor) -> candle_core::Result<Tensor> {
    let unclipped = match cfg.delta {
        Some(d) => cap_above(ratio, d)?,
        None => ratio.clone(),
    };
    let clipped = clamp_closed(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high())?;
    unclipped
        .broadcast_mul(adv)?
        .minimum(&clipped.broadcast_mul(adv)?)?
        .neg()
}

/// The per-token KL estimator k(Δ), Δ = ℓ^ref − ℓ selected by the mask and clamped.
fn kl_per_token(
    cfg: &AlgoConfig,
    new: &Tensor,
    reference: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let delta = mask.where_cond(&(reference - new)?, &new.zeros_like()?)?;
    let delta = clamp_closed(&delta, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)?;
    match cfg.kl_estimator {
        KlEstimator::K3 => expm1_minus_x(&delta),
        KlEstimator::Abs => abs(&delta),
        KlEstimator::Mse => delta.sqr(),
    }
}

fn as_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)
}

/// Checks the tensors against `batch`, the rows the log-probs are for (not necessarily whole
/// groups: [`loss_rows`] checks the groups of the batch they come from).
fn check_shapes(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    logp: &LogProbs,
) -> Result<(usize, usize), AlgoError> {
    let (b, t) = logp.new.dims2()?;
    let named = [
        ("old", Some(logp.old)),
        ("reference", logp.reference),
        ("entropy", logp.entropy),
    ];
    for (name, tensor) in named {
        if let Some(x) = tensor {
            if x.dims() != [b, t] {
                return Err(AlgoError::Batch(format!(
                    "log-prob tensor `{name}` has shape {:?}, `new` has [{b}, {t}]",
                    x.dims()
                )));
            }
        }
    }
    if b != batch.len() {
        return Err(AlgoError::Batch(format!(
            "log-probs have {b} rows for a batch of {} completions",
            batch.len()
        )));
    }
    if let Some(r) = batch.rows.iter().find(|r| r.length > t) {
        return Err(AlgoError::Batch(format!(
            "completion {} has {} tokens but the log-probs are only {t} wide",
            r.index, r.length
        )));
    }
    if cfg.dpo_enabled() && !cfg.dpo_reference_free && logp.reference.is_none() {
        return Err(AlgoError::Batch(
            "the DGPO pairwise term needs reference log-probs (or set dpo_reference_free: true)"
                .into(),
        ));
    }
    if cfg.beta != 0.0 && logp.reference.is_none() {
        return Err(AlgoError::Batch(format!(
            "beta = {} needs reference log-probs (LoRA off); see AlgoConfig::needs_reference",
            cfg.beta
        )));
    }
    if cfg.entropy_coef > 0.0 && logp.entropy.is_none() {
        return Err(AlgoError::Batch(format!(
            "entropy_coef = {} needs per-token entropies in LogProbs::entropy",
            cfg.entropy_coef
        )));
    }
    Ok((b, t))
}

/// The loss of one (micro-)batch of whole groups under the step denominators `denom`
/// (from [`Denominators::new`] on the whole optimizer-step batch).
///
/// `loss = (1 − c)·(pg + β·kl) + c·dpo − entropy_coef·H̄` with c = `dpo_coef` when the DGPO term
/// is on, else `pg + β·kl − entropy_coef·H̄`. When `denom.is_empty()` the loss is a constant 0:
/// skip the optimizer step.
pub fn loss(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    logp: &LogProbs,
    denom: &Denominators,
) -> Result<LossOutput, AlgoError> {
    let all: Vec<usize> = (0..batch.len()).collect();
    loss_rows(cfg, batch, &all, logp, denom)
}

/// [`loss`] of the (micro-)batch `batch` of whole groups when log-probs were computed only for
/// the rows at positions `rows` (increasing; `logp` has one row per entry of `rows`). Every row
/// left out must be one [`StepBatch::rows_with_gradient`] leaves out, so the value and gradient
/// equal those of [`loss`] on all rows, up to float summation order. The diagnostics (clip
/// counts, ratios, KL sums) cover only the rows given.
pub fn loss_rows(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    rows: &[usize],
    logp: &LogProbs,
    denom: &Denominators,
) -> Result<LossOutput, AlgoError> {
    batch.check_groups(cfg)?;
    let position = positions(cfg, batch, rows)?;
    let computed = StepBatch {
        group_size: batch.group_size,
        rows: rows.iter().map(|&i| batch.rows[i].clone()).collect(),
    };
    // DGPO pairs come from whole groups; every row of a pair is among `rows` (checked above).
    let pairs: Vec<(usize, usize)> = if cfg.dpo_enabled() {
        batch
            .dpo_pairs(cfg)
            .into_iter()
            .filter_map(|(w, l)| Some((position[w]?, position[l]?)))
            .collect()
    } else {
        Vec::new()
    };
    computed_loss(cfg, &computed, &pairs, logp, denom)
}

/// The position in `rows` of each row of `batch` (`None`: left out), after checking that `rows`
/// is increasing, in range and leaves out only rows without gradient.
fn positions(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    rows: &[usize],
) -> Result<Vec<Option<usize>>, AlgoError> {
    let mut position = vec![None; batch.len()];
    for (k, &i) in rows.iter().enumerate() {
        if i >= batch.len() || rows[..k].last().is_some_and(|&prev| prev >= i) {
            return Err(AlgoError::Batch(format!(
                "computed rows {rows:?} are not increasing positions in a batch of {} rows",
                batch.len()
            )));
        }
        position[i] = Some(k);
    }
    if let Some(i) = batch
        .rows_with_gradient(cfg)
        .into_iter()
        .find(|&i| position[i].is_none())
    {
        return Err(AlgoError::Batch(format!(
            "row {} (completion {}) was left out of the loss, but its log-probs change the              gradient (see StepBatch::rows_with_gradient)",
            i, batch.rows[i].index
        )));
    }
    Ok(position)
}

/// The loss over the rows of `batch` (the rows whose log-probs `logp` holds), `pairs` being the
/// DGPO pairs as positions in it.
fn computed_loss(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    pairs: &[(usize, usize)],
    logp: &LogProbs,
    denom: &Denominators,
) -> Result<LossOutput, AlgoError> {
    let (_, t) = check_shapes(cfg, batch, logp)?;
    let device = logp.new.device();
    let m = masks(cfg, batch, denom, t, device)?;
    let new = as_f32(logp.new)?;
    let old = as_f32(logp.old)?.detach();
    let reference = logp.reference.map(as_f32).transpose()?.map(|r| r.detach());
    let mut diag = Diagnostics {
        sequences: batch.rows.iter().filter(|r| r.kept).count(),
        loss_tokens: m.loss_len.iter().sum(),
        ..Diagnostics::default()
    };
    if denom.is_empty() {
        let zero = Tensor::zeros((), DType::F32, device)?;
        return Ok(LossOutput {
            loss: zero,
            value: 0.0,
            pg_loss: 0.0,
            kl_term: reference.as_ref().map(|_| 0.0),
            dpo_loss: cfg.dpo_enabled().then_some(0.0),
            diagnostics: diag,
        });
    }

    // Importance weights: log-ratios selected by the mask before exp, clamped, then exp.
    let zeros = new.zeros_like()?;
    let log_ratio = m.mask.where_cond(&(&new - &old)?, &zeros)?;
    let clamp = cfg.log_ratio_clamp;
    let pg = match cfg.importance_sampling_level {
        ImportanceLevel::Token => {
            let ratio = clamp_closed(&log_ratio, -clamp, clamp)?.exp()?;
            let f = surrogate(cfg, &ratio, &m.advantages)?;
            ratio_diagnostics(cfg, &mut diag, &ratio.to_vec2()?, &m, true);
            (f * &m.weights)?.sum_all()?
        }
        ImportanceLevel::Sequence => {
            let log_s = log_ratio.sum(1)?.mul(&m.inv_len)?;
            let ratio = clamp_closed(&log_s, -clamp, clamp)?.exp()?;
            let f = surrogate(cfg, &ratio, &m.advantages.squeeze(1)?)?;
            let per_row: Vec<f32> = ratio.to_vec1()?;
            ratio_diagnostics(cfg, &mut diag, &[per_row], &m, false);
            (f * &m.row_weights)?.sum_all()?
        }
    };
    let pg_loss = pg.to_scalar::<f32>()? as f64;

    // KL: in the graph when β ≠ 0, on detached log-probs when only reported.
    let mut rl = pg;
    let mut kl_term = None;
    if let Some(reference) = &reference {
        let policy = if cfg.beta != 0.0 {
            new.clone()
        } else {
            new.detach()
        };
        let k = kl_per_token(cfg, &policy, reference, &m.mask)?;
        diag.kl_sum = (&k * m.mask.to_dtype(DType::F32)?)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        let kl = (k * &m.weights)?.sum_all()?;
        kl_term = Some(kl.to_scalar::<f32>()? as f64);
        if cfg.beta != 0.0 {
            rl = (rl + (kl * cfg.beta)?)?;
        }
    }

    let mut total = rl;
    let mut dpo_loss = None;
    if cfg.dpo_enabled() {
        let seq_sum = |x: &Tensor| m.mask.where_cond(x, &zeros)?.sum(1);
        let s = seq_sum(&new)?;
        let s_ref = match (&reference, cfg.dpo_reference_free) {
            (Some(r), false) => Some(seq_sum(r)?),
            _ => None,
        };
        let c = cfg.dpo_coef;
        total = (total * (1.0 - c))?;
        let mut value = 0.0;
        if let Some((term, n)) = dgpo::dpo_term(cfg, pairs, &s, s_ref.as_ref(), denom.pairs)? {
            value = term.to_scalar::<f32>()? as f64;
            diag.n_pairs = n;
            total = (total + (term * c)?)?;
        }
        dpo_loss = Some(value);
    }

    if cfg.entropy_coef > 0.0 {
        if let Some(h) = logp.entropy {
            let h = m.mask.where_cond(&as_f32(h)?, &zeros)?;
            let mean_h = (h.sum_all()? / denom.loss_tokens.max(1) as f64)?;
            total = (total - (mean_h * cfg.entropy_coef)?)?;
        }
    }

    let value = total.to_scalar::<f32>()? as f64;
    Ok(LossOutput {
        loss: total,
        value,
        pg_loss,
        kl_term,
        dpo_loss,
        diagnostics: diag,
    })
}

/// Clip counts and ratio statistics over units: loss tokens (`per_token`) or non-empty rows
/// (`ratios` is then a single row of per-sequence ratios).
fn ratio_diagnostics(
    cfg: &AlgoConfig,
    diag: &mut Diagnostics,
    ratios: &[Vec<f32>],
    m: &Masks,
    per_token: bool,
) {
    let hi = 1.0 + cfg.epsilon_high();
    let lo = 1.0 - cfg.epsilon;
    let mut visit = |rho: f64, a: f32| {
        diag.units += 1;
        diag.ratio_sum += rho;
        diag.ratio_min = diag.ratio_min.min(rho);
        diag.ratio_max = diag.ratio_max.max(rho);
        diag.clip_high_count += usize::from(rho > hi && a > 0.0);
        diag.clip_low_count += usize::from(rho < lo && a < 0.0);
    };
    for (i, (&n, &a)) in m.loss_len.iter().zip(&m.adv).enumerate() {
        if per_token {
            ratios[i][..n].iter().for_each(|&r| visit(r as f64, a));
        } else if n > 0 {
            visit(ratios[0][i] as f64, a);
        }
    }
}
