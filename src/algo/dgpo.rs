//! DGPO's pairwise DPO term (docs/algorithms.md §4.5): preference pairs from the rewards in a group,
//! scored by the policy's sequence log-likelihood margin against the reference.

use candle_core::{Result, Tensor};

use super::autograd::softplus;
use super::config::AlgoConfig;

/// Σ_pairs softplus(−z_wl) / `total_pairs` and the number of pairs in this batch.
///
/// `pairs` are this batch's pairs ([`super::StepBatch::dpo_pairs`]) as (winner, loser) rows of
/// `seq_logp` and `seq_logp_ref`, which are S_i and S^ref_i, shape `[b]` (the latter `None` when
/// reference-free: S^ref := 0). `total_pairs` is the step-batch pair count, so micro-batch terms
/// add up to the step's mean. Returns `None` when this batch has no pair.
pub fn dpo_term(
    cfg: &AlgoConfig,
    pairs: &[(usize, usize)],
    seq_logp: &Tensor,
    seq_logp_ref: Option<&Tensor>,
    total_pairs: usize,
) -> Result<Option<(Tensor, usize)>> {
    if pairs.is_empty() || total_pairs == 0 {
        return Ok(None);
    }
    let device = seq_logp.device();
    let w: Vec<u32> = pairs.iter().map(|p| p.0 as u32).collect();
    let l: Vec<u32> = pairs.iter().map(|p| p.1 as u32).collect();
    let w = Tensor::new(w.as_slice(), device)?;
    let l = Tensor::new(l.as_slice(), device)?;
    let margin = |s: &Tensor| -> Result<Tensor> { s.index_select(&w, 0)? - s.index_select(&l, 0)? };
    let mut z = margin(seq_logp)?;
    if let Some(r) = seq_logp_ref {
        z = (z - margin(r)?)?;
    }
    let z = (z * cfg.dpo_beta)?;
    let term = (softplus(&z.neg()?)?.sum_all()? / total_pairs as f64)?;
    Ok(Some((term, pairs.len())))
}
