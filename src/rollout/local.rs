//! Sampling the groups of a rollout and checking them with Lean.
//!
//! All groups of a rollout are decoded together, one batch of `theorems × G` rows: each
//! prompt is prefilled once and its KV cache copied to its G rows ([`Policy::generate`]), and
//! every decode step then runs the whole batch. On a GPU this is what makes throughput grow
//! with the batch; on the CPU a step's weights are read once for all rows instead of once per
//! group. Lean checks the proofs after the batch, on the checker pool.
//!
//! [`Policy::generate`]: crate::model::Policy::generate

use std::time::Instant;

use anyhow::Result;

use super::{groups, Group, RolloutTimes, Sampled, SamplingSetup};
use crate::data::Theorem;
use crate::lean::Job;
use crate::model::sampler::Sampler;

/// Samples `group_size` completions for each of `theorem_ids` in one generation batch and
/// checks them. Groups come back in the order of `theorem_ids`.
pub fn rollout(
    setup: &SamplingSetup,
    sampler: &mut Sampler,
    theorems: &[Theorem],
    prompts: &[Vec<u32>],
    theorem_ids: &[usize],
    group_size: usize,
) -> Result<(Vec<Group>, RolloutTimes)> {
    let mut times = RolloutTimes::default();
    let start = Instant::now();
    let batch: Vec<Vec<u32>> = theorem_ids.iter().map(|&id| prompts[id].clone()).collect();
    let mut samples = sample_groups(setup, sampler, &batch, group_size)?.into_iter();
    times.sampling = start.elapsed().as_secs_f64();
    let mut sampled = Vec::with_capacity(theorem_ids.len());
    let mut jobs = Vec::with_capacity(theorem_ids.len() * group_size);
    for &id in theorem_ids {
        let group: Vec<Sampled> = samples.by_ref().take(group_size).collect();
        times.tokens += group
            .iter()
            .map(|(tokens, _, _)| tokens.len())
            .sum::<usize>();
        jobs.extend(
            group
                .iter()
                .map(|(_, text, _)| Job::new(&theorems[id], text.clone())),
        );
        sampled.push((id, group));
    }
    let start = Instant::now();
    let verdicts = setup.checker.check(&jobs, None)?;
    times.checking = start.elapsed().as_secs_f64();
    times.checking_tail = times.checking;
    Ok((groups(sampled, verdicts), times))
}

/// Samples `group_size` completions of every prompt in one batch: (tokens, text, truncated)
/// per completion, prompt by prompt.
fn sample_groups(
    setup: &SamplingSetup,
    sampler: &mut Sampler,
    prompts: &[Vec<u32>],
    group_size: usize,
) -> Result<Vec<Sampled>> {
    let tokenizer = setup.tokenizer;
    let mut next_tokens = |rows: &[Vec<f32>]| sampler.sample_rows(rows);
    let stop = &setup.stop;
    let mut stop_check = |tokens: &[u32]| {
        !stop.is_empty()
            && tokenizer
                .decode(tokens, true)
                .is_ok_and(|text| stop.find(&text).is_some())
    };
    let generations = setup.policy.generate(
        prompts,
        group_size,
        &setup.generate,
        &mut next_tokens,
        &mut stop_check,
    )?;
    generations
        .into_iter()
        .map(|generation| {
            let mut text = tokenizer.decode(&generation.tokens, true)?;
            if let Some(found) = stop.find(&text) {
                text.truncate(found.start);
            }
            Ok((generation.tokens, text, generation.truncated))
        })
        .collect()
}
