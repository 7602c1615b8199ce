//! Off-policy rollouts (`train --endpoint`): completions sampled by an OpenAI-compatible server
//! such as vLLM instead of by the policy.
//!
//! The server answers with text. Each completion is tokenized with the policy's tokenizer into
//! the ids the policy would have had to emit to write it, and from there on it is an ordinary
//! [`Completion`](super::Completion): checked by Lean, rewarded, and trained on with ℓ^old recomputed by the
//! current policy exactly as for local samples (docs/algorithms.md §2, step 1).
//!
//! Without `train.endpoint_adapter_dir` the server never sees the LoRA updates: it keeps
//! serving the model it was started with, so the samples come from that model, not from the
//! policy being trained. The update weighs them as if the current policy had drawn them (its
//! importance ratio is against the current policy, not against the server), which is a good
//! approximation while the adapters stay close to the served model and a worse one as they
//! drift; and the rewards logged per step measure the served model. With it, the adapter is
//! hot-loaded into the server ([`AdapterSync`]) and the server samples from the policy itself;
//! each sample then records the adapter version it came from, and the server's log-probs of its
//! tokens are compared with the policy's (`endpoint_logprob_gap` in metrics.jsonl), which is
//! the off-policy gap a user must see.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;

use super::sync::AdapterSync;
use super::{groups, Group, LogprobGap, RolloutTimes, Sampled, SamplingSetup, ServedBy};
use crate::config::TrainOptions;
use crate::data::{user_message, Theorem};
use crate::endpoint::{
    ChatCompletion, ChatRequest, Choice, EndpointClient, EndpointOptions, HttpError, StopReason,
};
use crate::lean::Job;
use crate::model::sampler::StopStrings;
use crate::model::tokenizer::ChatMessage;
use crate::model::tokenizer::Tokenizer;
use crate::model::SamplingOptions;

/// The client of `train.endpoint`, checked before anything slow starts; `None` when training
/// samples from the policy itself.
pub fn endpoint_client(train: &TrainOptions) -> Result<Option<EndpointClient>> {
    let Some(url) = &train.endpoint else {
        if train.served_model.is_some()
            || train.api_key_env.is_some()
            || train.endpoint_adapter_dir.is_some()
        {
            bail!(
                "train.served_model / train.api_key_env / train.endpoint_adapter_dir \
                 (--served-model / --api-key-env / --endpoint-adapter-dir) only apply with \
                 train.endpoint (--endpoint URL); set the endpoint or drop them"
            );
        }
        return Ok(None);
    };
    if train.endpoint_adapter_dir.is_some() {
        if train.sync_steps == 0 {
            bail!("train.sync_steps must be at least 1 (1 = load the adapter every step)");
        }
        let secs = train.sync_timeout_secs;
        if !(secs.is_finite() && secs > 0.0) {
            bail!("train.sync_timeout_secs must be a positive number of seconds (got {secs})");
        }
    }
    let Some(served_model) = &train.served_model else {
        bail!(
            "--endpoint (train.endpoint) needs --served-model NAME (train.served_model): the name \
             the server knows the model by (vLLM's --served-model-name)"
        );
    };
    let mut options = EndpointOptions::new(url.as_str(), served_model.as_str());
    options.api_key_env = train.api_key_env.clone();
    EndpointClient::new(options).map(Some)
}

/// Samples groups from a server and turns its text back into the policy's tokens.
pub struct RemoteSampler {
    client: EndpointClient,
    sampling: SamplingOptions,
    /// Appended to a completion the server ended with EOS; see [`Tokenizer::reply_eos_id`].
    eos: Option<u32>,
    /// Hot-loads the policy's adapter into the server: on-policy rollouts.
    sync: Option<AdapterSync>,
}

impl RemoteSampler {
    pub fn new(client: EndpointClient, sampling: &SamplingOptions, tokenizer: &Tokenizer) -> Self {
        RemoteSampler {
            client,
            sampling: sampling.clone(),
            eos: tokenizer.reply_eos_id(),
            sync: None,
        }
    }

    /// Samples on-policy: the server is given the policy's adapter by `sync`.
    pub fn with_sync(mut self, sync: AdapterSync) -> Self {
        self.sync = Some(sync);
        self
    }

    /// Brings the server's adapter to the policy's `version` (training steps done) if it is due
    /// (see [`AdapterSync::sync`]); nothing without on-policy sampling.
    pub fn sync(&self, version: usize, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        match &self.sync {
            Some(sync) => sync.sync(&self.client, version, write),
            None => Ok(()),
        }
    }

    /// Unloads the run's adapter from the server at the end of training.
    pub fn finish(&self) {
        if let Some(sync) = &self.sync {
            sync.finish(&self.client);
        }
    }

    /// Samples `group_size` completions of each of `theorem_ids` (one request each, sent
    /// concurrently), then checks them all. Groups come back in the order of `theorem_ids`.
    /// `seed` varies the server's sampling between calls (where the server honours seeds).
    /// `prompts` (by theorem index) are the policy's prompt tokens, which the server's log-probs
    /// are compared against.
    pub fn rollout(
        &self,
        setup: &SamplingSetup,
        theorems: &[Theorem],
        prompts: &[Vec<u32>],
        theorem_ids: &[usize],
        group_size: usize,
        seed: u64,
    ) -> Result<(Vec<Group>, RolloutTimes)> {
        let mut times = RolloutTimes::default();
        let start = Instant::now();
        let (answers, adapter) = self.sample(theorems, theorem_ids, group_size, seed)?;
        times.sampling = start.elapsed().as_secs_f64();

        let mut sampled = Vec::with_capacity(theorem_ids.len());
        let mut choices = Vec::with_capacity(theorem_ids.len());
        for (&id, answer) in theorem_ids.iter().zip(answers) {
            let completion = answer.with_context(|| {
                format!("sampling theorem {} from the endpoint", theorems[id].name)
            })?;
            let group = completion
                .choices
                .iter()
                .map(|choice| self.tokenize(setup.tokenizer, &setup.stop, choice))
                .collect::<Result<Vec<_>>>()?;
            times.tokens += group.iter().map(|c| c.0.len()).sum::<usize>();
            sampled.push((id, group));
            choices.push(completion.choices);
        }
        let gaps = match self.sync {
            Some(_) => logprob_gaps(setup, prompts, theorem_ids, &choices)?,
            None => Vec::new(),
        };
        let jobs: Vec<Job> = sampled
            .iter()
            .flat_map(|(id, group)| {
                let theorem = &theorems[*id];
                group
                    .iter()
                    .map(move |(_, text, _)| Job::new(theorem, text.clone()))
            })
            .collect();
        let start = Instant::now();
        let verdicts = setup.checker.check(&jobs, None)?;
        times.checking = start.elapsed().as_secs_f64();
        times.checking_tail = times.checking;
        if verdicts.len() != jobs.len() {
            bail!(
                "the checker returned {} verdicts for {} proofs",
                verdicts.len(),
                jobs.len()
            );
        }
        let mut groups = groups(sampled, verdicts);
        let mut gaps = gaps.into_iter();
        for completion in groups.iter_mut().flat_map(|g| &mut g.completions) {
            completion.served = Some(ServedBy {
                adapter_version: adapter.as_ref().map(|a| a.version),
                logprob_gap: gaps.next().flatten(),
            });
        }
        Ok((groups, times))
    }

    /// The server's answers to one request per theorem, and the adapter they were sampled with
    /// (`None`: the served model). A server that answers 404 for the adapter has forgotten it
    /// (a restart): it is loaded again and the requests sent again, once.
    fn sample(
        &self,
        theorems: &[Theorem],
        theorem_ids: &[usize],
        group_size: usize,
        seed: u64,
    ) -> Result<(
        Vec<Result<ChatCompletion>>,
        Option<super::sync::LoadedAdapter>,
    )> {
        let adapter = self.sync.as_ref().and_then(AdapterSync::current);
        let requests: Vec<ChatRequest> = theorem_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let mut request = chat_request(
                    &theorems[id],
                    group_size,
                    &self.sampling,
                    request_seed(seed, i),
                );
                request.model = adapter.as_ref().map(|a| a.name.clone());
                request.logprobs = self.sync.is_some();
                request
            })
            .collect();
        let answers = self.client.complete(&requests);
        let forgotten = answers.iter().any(|a| {
            a.as_ref()
                .err()
                .and_then(HttpError::find)
                .is_some_and(|e| e.status == Some(404))
        });
        if let (true, Some(sync)) = (forgotten && adapter.is_some(), &self.sync) {
            if sync.reload(&self.client)? {
                return Ok((self.client.complete(&requests), adapter));
            }
        }
        Ok((answers, adapter))
    }

    /// (tokens, text to check, truncated) of one server completion, as the local sampler would
    /// have produced them: the ids of everything the model generated — its text, then the
    /// stop string or stop token the server reports (servers leave stop strings out of the
    /// text), or the EOS when it stopped for no reported reason (OpenAI and vLLM report none
    /// for EOS) — at most `max_completion_length` of them. A server stopped by `max_tokens`
    /// (`length`) is truncated, with no EOS. The checked text is cut at the first stop string.
    /// The ids need not be those the server sampled (a text can be tokenized several ways);
    /// the update scores exactly these ids, so that does not bias it.
    fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        stop: &StopStrings,
        choice: &Choice,
    ) -> Result<Sampled> {
        let mut generated = choice.text.clone();
        let mut end = None;
        if choice.finish_reason.as_deref() == Some("stop") {
            match &choice.stop_reason {
                Some(StopReason::Text(s)) if !generated.ends_with(s.as_str()) => {
                    generated.push_str(s)
                }
                Some(StopReason::Text(_)) => {}
                Some(StopReason::Token(id)) => end = Some(*id),
                None => end = self.eos,
            }
        }
        let mut tokens = tokenizer.encode(&generated, false)?;
        tokens.extend(end);
        let max = self.sampling.max_completion_length;
        let mut truncated = choice.truncated();
        if tokens.len() > max {
            // Longer in the policy's tokens than the server's: keep what fits, as a sample that
            // ran out of room.
            tokens.truncate(max);
            truncated = true;
            generated = tokenizer.decode(&tokens, true)?;
        }
        if let Some(found) = stop.find(&generated) {
            generated.truncate(found.start);
        }
        Ok((tokens, generated, truncated))
    }
}

/// The request for `n` completions of `theorem`: the bare user message (the server applies its
/// own chat template) with the run's sampling settings.
pub fn chat_request(
    theorem: &Theorem,
    n: usize,
    sampling: &SamplingOptions,
    seed: u64,
) -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage::new("user", user_message(theorem))],
        n,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        max_tokens: sampling.max_completion_length,
        stop: sampling.stop.clone(),
        seed: Some(seed),
        model: None,
        logprobs: false,
    }
}

/// Per completion (group after group), how far the server's log-probs of the tokens it sampled
/// are from the policy's: the policy scores the server's own token ids after the policy's prompt
/// at temperature 1, as vLLM's log-probs are by default (before temperature). `None` for a
/// completion whose tokens the server did not give as ids, or gave outside the vocabulary.
fn logprob_gaps(
    setup: &SamplingSetup,
    prompts: &[Vec<u32>],
    theorem_ids: &[usize],
    choices: &[Vec<Choice>],
) -> Result<Vec<Option<LogprobGap>>> {
    let vocab = setup.policy.config().vocab_size;
    // The scored completions as three parallel lists (the policy's input and the server's
    // figures), and for every completion its row there, if it has one.
    let (mut row_prompts, mut row_tokens, mut server) = (Vec::new(), Vec::new(), Vec::new());
    let mut row_of = Vec::new();
    for (&id, group) in theorem_ids.iter().zip(choices) {
        for choice in group {
            let scored: Option<(Vec<u32>, Vec<f64>)> = choice.logprobs.as_ref().and_then(|l| {
                l.iter()
                    .map(|t| {
                        t.id.filter(|&id| (id as usize) < vocab)
                            .map(|id| (id, t.logprob))
                    })
                    .collect::<Option<Vec<_>>>()
                    .filter(|t| !t.is_empty())
                    .map(|t| t.into_iter().unzip())
            });
            row_of.push(scored.map(|(ids, logprobs)| {
                row_prompts.push(prompts[id].clone());
                row_tokens.push(ids);
                server.push(logprobs);
                server.len() - 1
            }));
        }
    }
    if server.is_empty() {
        return Ok(row_of.iter().map(|_| None).collect());
    }
    let local = setup
        .policy
        .logprobs(&row_prompts, &row_tokens, 1.0, false, true)
        .context("scoring the server's samples with the policy")?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let gap = |r: usize| LogprobGap {
        abs_sum: server[r]
            .iter()
            .zip(&local[r])
            .map(|(s, l)| (s - l).abs())
            .sum(),
        tokens: server[r].len(),
    };
    Ok(row_of.into_iter().map(|row| row.map(gap)).collect())
}

/// The seed of the `index`-th request of a rollout: distinct per request and step, within the
/// non-negative 64-bit range servers accept.
fn request_seed(rollout_seed: u64, index: usize) -> u64 {
    splitmix64(rollout_seed ^ splitmix64(index as u64)) >> 1
}

/// The seed of one rollout of a run: the run's seed, the steps done and the dynamic-sampling
/// round, mixed.
pub fn rollout_seed(run_seed: u64, steps_done: usize, round: usize) -> u64 {
    splitmix64(run_seed ^ splitmix64(((steps_done as u64) << 16) ^ round as u64))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (RemoteSampler, Tokenizer) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-qwen2");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let client =
            EndpointClient::new(EndpointOptions::new("http://127.0.0.1:9", "served")).unwrap();
        let sampling = SamplingOptions {
            max_completion_length: 12,
            ..SamplingOptions::default()
        };
        (RemoteSampler::new(client, &sampling, &tokenizer), tokenizer)
    }

    fn choice(text: &str, finish: &str, stop_reason: Option<StopReason>) -> Choice {
        Choice {
            text: text.into(),
            finish_reason: Some(finish.into()),
            stop_reason,
            logprobs: None,
        }
    }

    #[test]
    fn completions_end_as_the_server_says() {
        let (remote, tok) = tiny();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(tok.reply_eos_id(), Some(im_end));
        let stops = StopStrings::new(&["```\n".to_string()]);
        let ids = |text: &str| tok.encode(text, false).unwrap();

        // EOS: the text, then the end-of-turn token.
        let (tokens, text, truncated) = remote
            .tokenize(&tok, &stops, &choice("N.z", "stop", None))
            .unwrap();
        assert_eq!(tokens, [ids("N.z"), vec![im_end]].concat());
        assert_eq!((text.as_str(), truncated), ("N.z", false));

        // A stop string the server left out of the text: generated, so trained on, not checked.
        let (tokens, text, _) = remote
            .tokenize(
                &tok,
                &stops,
                &choice("a b", "stop", Some(StopReason::Text("```\n".into()))),
            )
            .unwrap();
        assert_eq!(tokens, ids("a b```\n"));
        assert_eq!(text, "a b");

        // A stop token id other than EOS.
        let (tokens, _, _) = remote
            .tokenize(
                &tok,
                &stops,
                &choice("a", "stop", Some(StopReason::Token(5))),
            )
            .unwrap();
        assert_eq!(tokens, [ids("a"), vec![5]].concat());

        // Stopped by max_tokens: no EOS, truncated.
        let (tokens, _, truncated) = remote
            .tokenize(&tok, &stops, &choice("N.z", "length", None))
            .unwrap();
        assert_eq!((tokens, truncated), (ids("N.z"), true));

        // More of the policy's tokens than max_completion_length: cut, truncated, and the
        // checked text is what the kept tokens say.
        let long = "x ".repeat(20);
        let (tokens, text, truncated) = remote
            .tokenize(&tok, &stops, &choice(&long, "stop", None))
            .unwrap();
        assert_eq!(tokens.len(), 12);
        assert!(truncated && !tokens.contains(&im_end));
        assert_eq!(text, tok.decode(&tokens, true).unwrap());
        assert!(long.starts_with(&text) && text.len() < long.len());
    }

    #[test]
    fn request_seeds_differ_and_fit_a_signed_64_bit_integer() {
        let mut seen = std::collections::HashSet::new();
        for step in 0..20 {
            for round in 0..3 {
                for i in 0..8 {
                    let seed = request_seed(rollout_seed(42, step, round), i);
                    assert!(seed <= i64::MAX as u64);
                    assert!(seen.insert(seed), "seed repeated at {step}/{round}/{i}");
                }
            }
        }
        assert_ne!(rollout_seed(1, 0, 0), rollout_seed(2, 0, 0));
    }
}
