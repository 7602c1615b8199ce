//! DGPO's pairwise DPO term (docs/algorithms.md §4.5): preference pairs from the rewards in a group,
//! scored by the policy's sequence log-likelihood margin against the reference.

use candle_core::{Result, Tensor};

use super::advantage::is_zero_variance;
use super::autograd::softplus;
use super::batch::StepBatch;
use super::config::AlgoConfig;

/// Ordered pairs (winner, loser) of row positions in `batch`, group by group: kept rows with
/// loss tokens, reward gap above `pairwise_margin`; with `dpo_max_pairs_per_group` = K > 0 only
/// the K largest gaps per group, ties in (w, l) order. Zero-variance groups give none.
pub fn pairs(cfg: &AlgoConfig, batch: &StepBatch) -> Vec<(usize, usize)> {
    let g = cfg.group_size.max(1);
    let mut out = Vec::new();
    for start in (0..batch.len()).step_by(g) {
        let end = (start + g).min(batch.len());
        let rewards: Vec<f64> = batch.rows[start..end]
            .iter()
            .map(|r| r.shaped_reward)
            .collect();
        if is_zero_variance(&rewards) {
            continue;
        }
        let eligible = |i: usize| batch.rows[i].kept && batch.loss_len(cfg, i) > 0;
        let mut group: Vec<(f64, usize, usize)> = Vec::new();
        for w in (start..end).filter(|&i| eligible(i)) {
            for l in (start..end).filter(|&i| eligible(i)) {
                let gap = batch.rows[w].shaped_reward - batch.rows[l].shaped_reward;
                if gap > cfg.pairwise_margin {
                    group.push((gap, w, l));
                }
            }
        }
        if cfg.dpo_max_pairs_per_group > 0 {
            // Stable sort by decreasing gap keeps (w, l) order among equal gaps.
            group.sort_by(|a, b| b.0.total_cmp(&a.0));
            group.truncate(cfg.dpo_max_pairs_per_group);
        }
        out.extend(group.into_iter().map(|(_, w, l)| (w, l)));
    }
    out
}

/// Σ_pairs softplus(−z_wl) / `total_pairs` and the number of pairs in this batch.
///
/// `seq_logp` and `seq_logp_ref` are S_i and S^ref_i, shape [b] (the latter `None` when
/// reference-free: S^ref := 0). `total_pairs` is the step-batch pair count, so micro-batch terms
/// add up to the step's mean. Returns `None` when this batch has no pair.
pub fn dpo_term(
    cfg: &AlgoConfig,
    batch: &StepBatch,
    seq_logp: &Tensor,
    seq_logp_ref: Option<&Tensor>,
    total_pairs: usize,
) -> Result<Option<(Tensor, usize)>> {
    let pairs = pairs(cfg, batch);
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
