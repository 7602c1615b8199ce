//! Rollouts: sampling groups of proofs and checking them with Lean, the layer that `train`,
//! `eval` and `sft` share.
//!
//! A rollout turns theorem indices into [`Group`]s of checked [`Completion`]s. The proofs come
//! from the policy itself ([`local::rollout`], all groups decoded in one batch) or from an
//! OpenAI-compatible server ([`RemoteSampler`]); everything after sampling is the same for both.
//! The prompt a theorem gets is built once, here ([`prompt_tokens`]), so training, evaluation
//! and supervised warm-up all show the model the same text.

mod local;
mod remote;
mod sync;

use anyhow::{Context, Result};

pub use local::rollout;
pub use remote::{chat_request, endpoint_client, rollout_seed, RemoteSampler};
pub use sync::{AdapterSync, LoadedAdapter, SyncOptions};

use crate::data::{user_message, Theorem};
use crate::lean::{Checked, Checker};
use crate::model::sampler::StopStrings;
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::model::{GenerateOptions, Policy, SamplingOptions};

/// One sampled and checked completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Generated tokens, the EOS that ended it included.
    pub tokens: Vec<u32>,
    /// The decoded text the checker saw (cut at a stop string).
    pub text: String,
    pub truncated: bool,
    pub checked: Checked,
    /// Sampled by an endpoint: with which adapter, and how far from the policy.
    pub served: Option<ServedBy>,
}

/// Where an endpoint's sample came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServedBy {
    /// The training steps behind the adapter the server sampled with (`train.sync_steps`);
    /// `None`: the served model itself (off-policy).
    pub adapter_version: Option<usize>,
    /// |log π_server − log π_policy| over the sampled tokens, where the server sent them.
    pub logprob_gap: Option<LogprobGap>,
}

/// A sum of absolute log-prob differences over some tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogprobGap {
    pub abs_sum: f64,
    pub tokens: usize,
}

/// The G completions of one theorem.
#[derive(Debug, Clone)]
pub struct Group {
    /// Index into the theorem list.
    pub theorem: usize,
    pub completions: Vec<Completion>,
}

/// Wall-clock split of one rollout.
#[derive(Debug, Clone, Copy, Default)]
pub struct RolloutTimes {
    /// Time inside the policy's sampling.
    pub sampling: f64,
    /// Time Lean spent on this rollout's groups.
    pub checking: f64,
    /// Time from the end of sampling to the last verdict: what checking added to the step.
    pub checking_tail: f64,
    pub tokens: usize,
}

impl RolloutTimes {
    /// Adds another rollout's times (the rounds of one step).
    pub fn add(&mut self, other: &RolloutTimes) {
        self.sampling += other.sampling;
        self.checking += other.checking;
        self.checking_tail += other.checking_tail;
        self.tokens += other.tokens;
    }
}

/// The prompt tokens of a theorem: the text of [`prompt_text`], whose special tokens the
/// template or the FIM layout already wrote.
pub fn prompt_tokens(tokenizer: &Tokenizer, theorem: &Theorem) -> Result<Vec<u32>> {
    prompt_text(tokenizer, theorem)
        .and_then(|text| tokenizer.encode(&text, false))
        .with_context(|| format!("building the prompt of theorem {}", theorem.name))
}

/// The FIM special tokens that code models pretrained on fill-in-the-middle know.
const FIM_TOKENS: [&str; 3] = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"];

/// The prompt text of a theorem: the instruction of [`user_message`] through the model's chat
/// template (a plain template when the model has none). A fill-in-the-middle example for a base
/// model (no chat template) whose tokenizer has the FIM tokens gets the layout it was
/// pretrained on instead: `<|fim_prefix|>`, source up to the hole, `<|fim_suffix|>`, the rest,
/// `<|fim_middle|>`; the model then writes the hole's text bare.
pub fn prompt_text(tokenizer: &Tokenizer, theorem: &Theorem) -> Result<String> {
    if let Some(hole) = &theorem.hole {
        let has_fim = FIM_TOKENS
            .iter()
            .all(|t| tokenizer.token_to_id(t).is_some());
        if has_fim && !tokenizer.has_chat_template() {
            let [prefix, suffix, middle] = FIM_TOKENS;
            return Ok(format!(
                "{prefix}{}{} {}{suffix}{}{middle}",
                theorem.preamble(),
                theorem.statement,
                hole.prefix,
                hole.suffix
            ));
        }
    }
    let messages = [ChatMessage::user(user_message(theorem))];
    tokenizer.apply_chat_template(&messages, true)
}

/// Everything sampling needs besides the prompts.
pub struct SamplingSetup<'a> {
    pub policy: &'a Policy,
    pub tokenizer: &'a Tokenizer,
    pub checker: &'a Checker,
    pub generate: GenerateOptions,
    pub stop: StopStrings,
}

impl<'a> SamplingSetup<'a> {
    /// Sampling as `sampling` configures it; `adapters: false` samples the base model.
    pub fn new(
        policy: &'a Policy,
        tokenizer: &'a Tokenizer,
        checker: &'a Checker,
        sampling: &SamplingOptions,
        adapters: bool,
    ) -> Self {
        SamplingSetup {
            policy,
            tokenizer,
            checker,
            generate: GenerateOptions {
                max_new_tokens: sampling.max_completion_length,
                eos_ids: tokenizer.eos_ids().to_vec(),
                adapters,
            },
            stop: StopStrings::new(&sampling.stop),
        }
    }
}

/// The prompt tokens of every theorem, in order.
pub fn all_prompt_tokens(tokenizer: &Tokenizer, theorems: &[Theorem]) -> Result<Vec<Vec<u32>>> {
    theorems
        .iter()
        .map(|t| prompt_tokens(tokenizer, t))
        .collect()
}

/// A sampled completion before checking: (tokens, text, truncated).
pub(crate) type Sampled = (Vec<u32>, String, bool);

/// Pairs sampled groups (theorem index, completions) with their verdicts, which come in the
/// same order, group after group.
pub(crate) fn groups(
    sampled: Vec<(usize, Vec<Sampled>)>,
    verdicts: impl IntoIterator<Item = Checked>,
) -> Vec<Group> {
    let mut verdicts = verdicts.into_iter();
    sampled
        .into_iter()
        .map(|(theorem, group)| Group {
            theorem,
            completions: group
                .into_iter()
                .zip(verdicts.by_ref())
                .map(|((tokens, text, truncated), checked)| Completion {
                    tokens,
                    text,
                    truncated,
                    checked,
                    served: None,
                })
                .collect(),
        })
        .collect()
}
