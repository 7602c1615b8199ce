//! The examples of one training step: the theorems as they are (`train.task: proof`), or with
//! a hole cut at the step's mask ratio (`train.task: fim`, docs/fim.md), and their prompts.

use std::borrow::Cow;

use anyhow::{Context, Result};

use crate::data::Theorem;
use crate::lean::holes;
use crate::model::tokenizer::Tokenizer;
use crate::rollout::prompt_tokens;

/// The holes of a FIM step: cut at `ratio`, drawn with `seed`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Holes {
    pub ratio: f64,
    pub seed: u64,
}

/// What a step shows the model, indexed like the run's theorems.
pub(super) struct StepTask<'a> {
    pub theorems: Cow<'a, [Theorem]>,
    pub prompts: Cow<'a, [Vec<u32>]>,
    holes: Option<Holes>,
    /// FIM: which theorems already have their hole and prompt (only drawn ones are built, so a
    /// step costs its batch, not the data set).
    ready: Vec<bool>,
}

impl<'a> StepTask<'a> {
    /// Whole proofs with `prompts`, or (with `holes`) FIM examples built on demand.
    pub fn new(theorems: &'a [Theorem], prompts: &'a [Vec<u32>], holes: Option<Holes>) -> Self {
        match holes {
            None => StepTask {
                theorems: Cow::Borrowed(theorems),
                prompts: Cow::Borrowed(prompts),
                holes,
                ready: Vec::new(),
            },
            Some(_) => StepTask {
                theorems: Cow::Owned(theorems.to_vec()),
                prompts: Cow::Owned(vec![Vec::new(); theorems.len()]),
                holes,
                ready: vec![false; theorems.len()],
            },
        }
    }

    /// Cuts the holes of `ids` and builds their prompts (FIM only; a theorem drawn twice in a
    /// step keeps its hole).
    pub fn prepare(&mut self, ids: &[usize], tokenizer: &Tokenizer) -> Result<()> {
        let Some(holes) = self.holes else {
            return Ok(());
        };
        for &id in ids {
            if self.ready[id] {
                continue;
            }
            let theorems = self.theorems.to_mut();
            let example = holes::example(&theorems[id], holes.ratio, holes.seed)?
                .with_context(|| format!("theorem {} has no proof to cut", theorems[id].name))?;
            self.prompts.to_mut()[id] = prompt_tokens(tokenizer, &example)?;
            theorems[id] = example;
            self.ready[id] = true;
        }
        Ok(())
    }
}
