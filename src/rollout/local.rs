//! Sampling groups of proofs and checking them, overlapped: while the policy samples the next
//! theorem's group, the checker pool is already running Lean on the previous one.

use std::sync::mpsc;
use std::time::Instant;

use anyhow::Result;

use super::{groups, Group, RolloutTimes, Sampled, SamplingSetup};
use crate::data::Theorem;
use crate::lean::{Checked, Job};
use crate::model::sampler::Sampler;

/// Samples `group_size` completions for each of `theorem_ids` (one generation batch per
/// theorem, its prompt prefilled once) and checks them while the next group is sampled.
/// Groups come back in the order of `theorem_ids`.
pub fn rollout(
    setup: &SamplingSetup,
    sampler: &mut Sampler,
    theorems: &[Theorem],
    prompts: &[Vec<u32>],
    theorem_ids: &[usize],
    group_size: usize,
) -> Result<(Vec<Group>, RolloutTimes)> {
    let mut times = RolloutTimes::default();
    let checker = setup.checker;
    std::thread::scope(|scope| -> Result<(Vec<Group>, RolloutTimes)> {
        let (to_checker, inbox) = mpsc::channel::<Vec<Job>>();
        let lean = scope.spawn(move || -> Result<(Vec<Vec<Checked>>, f64)> {
            let mut verdicts = Vec::new();
            let mut busy = 0.0;
            for jobs in inbox {
                let start = Instant::now();
                verdicts.push(checker.check(&jobs, None)?);
                busy += start.elapsed().as_secs_f64();
            }
            Ok((verdicts, busy))
        });
        let mut sampled = Vec::with_capacity(theorem_ids.len());
        let sampling_result = (|| -> Result<()> {
            for &id in theorem_ids {
                let start = Instant::now();
                let group = sample_group(setup, sampler, &prompts[id], group_size)?;
                times.sampling += start.elapsed().as_secs_f64();
                times.tokens += group
                    .iter()
                    .map(|(tokens, _, _)| tokens.len())
                    .sum::<usize>();
                let jobs = group
                    .iter()
                    .map(|(_, text, _)| Job::new(&theorems[id], text.clone()))
                    .collect();
                // A send fails only when the checker thread has stopped on an error, which
                // `join` reports below.
                let _ = to_checker.send(jobs);
                sampled.push((id, group));
            }
            Ok(())
        })();
        drop(to_checker);
        let tail_start = Instant::now();
        let checked = lean
            .join()
            .map_err(|_| anyhow::anyhow!("the checker thread panicked"))?;
        sampling_result?;
        let (verdicts, busy) = checked?;
        times.checking = busy;
        times.checking_tail = tail_start.elapsed().as_secs_f64();
        Ok((groups(sampled, verdicts.into_iter().flatten()), times))
    })
}

/// Samples one group: (tokens, text, truncated) per completion.
fn sample_group(
    setup: &SamplingSetup,
    sampler: &mut Sampler,
    prompt: &[u32],
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
        &[prompt.to_vec()],
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
