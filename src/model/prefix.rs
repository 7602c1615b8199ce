//! Which prompt tokens a log-prob pass computes once: the split of (prompt, completion) rows
//! into prefixes, each run through the model once, and the tails that continue them
//! (`decoder::SharedBatch`).
//!
//! Two splits, and the pass takes the one with fewer padded positions (what the layers compute):
//! * **per prompt**: each distinct prompt is a prefix, and a row's tail is its completion. A
//!   group's G completions share one prompt, so this is the RL case.
//! * **common prefix**: the prompts' longest common prefix is the only prefix, and a row's tail
//!   is the rest of its prompt, then its completion. Prompts that differ only at the end (the
//!   same instructions and preamble, a different statement) are the SFT case: four prelude
//!   prompts of ~790 tokens that share ~750 cost ~1000 positions instead of ~3200.
//!
//! Both give the same log-probs up to float summation order: a tail token attends to the same
//! keys at the same positions either way.

use std::collections::HashMap;

/// The prefixes and tails of a batch of rows, and where each predicting position lands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PrefixLayout {
    /// The token rows computed once.
    pub(crate) prefixes: Vec<Vec<u32>>,
    /// The prefix each row continues.
    pub(crate) prefix_of: Vec<usize>,
    /// Each row after its prefix: the rest of its prompt, then its completion but the last token
    /// (a completion's last token is only a target: no position reads it).
    pub(crate) tails: Vec<Vec<u32>>,
}

/// Where a hidden state is, in the `[prefixes × P + rows × C]` rows of a shared forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Slot {
    /// Prefix `k`, position `j`.
    Prefix(usize, usize),
    /// Row `i`'s tail, position `j`.
    Tail(usize, usize),
}

impl PrefixLayout {
    /// The cheaper of the two splits; ties go to per prompt. Prompts must not be empty.
    pub(crate) fn new(prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Self {
        let per_prompt = Self::per_prompt(prompts, completions);
        let common = common_len(prompts);
        // The common layout's positions, counted before building it.
        let longest_tail = prompts
            .iter()
            .zip(completions)
            .map(|(p, c)| p.len() - common + without_last(c).len())
            .max()
            .unwrap_or(0);
        if common > 0 && common + prompts.len() * longest_tail < per_prompt.positions() {
            Self::common_prefix(prompts, completions, common)
        } else {
            per_prompt
        }
    }

    fn per_prompt(prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Self {
        let mut seen: HashMap<&[u32], usize> = HashMap::new();
        let mut prefixes: Vec<Vec<u32>> = Vec::new();
        let prefix_of = prompts
            .iter()
            .map(|p| {
                *seen.entry(p.as_slice()).or_insert_with(|| {
                    prefixes.push(p.clone());
                    prefixes.len() - 1
                })
            })
            .collect();
        let tails = completions
            .iter()
            .map(|c| without_last(c).to_vec())
            .collect();
        Self {
            prefixes,
            prefix_of,
            tails,
        }
    }

    /// The first `len` tokens of every prompt as the one prefix (`len` ≥ 1, at most
    /// `common_len`).
    fn common_prefix(prompts: &[Vec<u32>], completions: &[Vec<u32>], len: usize) -> Self {
        let tails = prompts
            .iter()
            .zip(completions)
            .map(|(p, c)| [&p[len..], without_last(c)].concat())
            .collect();
        Self {
            prefixes: vec![prompts[0][..len].to_vec()],
            prefix_of: vec![0; prompts.len()],
            tails,
        }
    }

    /// Padded positions the layers compute: prefixes × longest prefix + rows × longest tail.
    fn positions(&self) -> usize {
        let longest = |rows: &[Vec<u32>]| rows.iter().map(Vec::len).max().unwrap_or(0);
        self.prefixes.len() * longest(&self.prefixes) + self.tails.len() * longest(&self.tails)
    }

    /// The hidden state at position `pos` of row `i` (prompt and completion counted together).
    pub(crate) fn slot(&self, i: usize, pos: usize) -> Slot {
        let k = self.prefix_of[i];
        let len = self.prefixes[k].len();
        if pos < len {
            Slot::Prefix(k, pos)
        } else {
            Slot::Tail(i, pos - len)
        }
    }
}

/// The length of the prompts' longest common prefix (0 for no prompt).
fn common_len(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    prompts.iter().fold(first.len(), |len, p| {
        first[..len]
            .iter()
            .zip(p)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

fn without_last(c: &[u32]) -> &[u32] {
    &c[..c.len().saturating_sub(1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&[u32]]) -> Vec<Vec<u32>> {
        v.iter().map(|r| r.to_vec()).collect()
    }

    #[test]
    fn a_group_keeps_its_prompt_as_the_prefix() {
        // Two groups of two: per prompt computes 2 × 4 + 4 × 2 = 16 positions, the common
        // prefix (2 tokens) 2 + 4 × 4 = 18.
        let prompts = rows(&[&[1, 2, 3, 4], &[1, 2, 3, 4], &[1, 2, 5, 6], &[1, 2, 5, 6]]);
        let completions = rows(&[&[7, 8, 9], &[7], &[8, 9], &[]]);
        let l = PrefixLayout::new(&prompts, &completions);
        assert_eq!(l.prefixes, rows(&[&[1, 2, 3, 4], &[1, 2, 5, 6]]));
        assert_eq!(l.prefix_of, [0, 0, 1, 1]);
        assert_eq!(l.tails, rows(&[&[7, 8], &[], &[8], &[]]));
        // Row 0's first completion token is predicted by the prompt's last position.
        assert_eq!(l.slot(0, 3), Slot::Prefix(0, 3));
        assert_eq!(l.slot(0, 4), Slot::Tail(0, 0));
        assert_eq!(l.slot(2, 3), Slot::Prefix(1, 3));
    }

    #[test]
    fn distinct_prompts_with_a_long_common_start_share_it() {
        // Per prompt: 3 × 6 + 3 × 1 = 21 positions; common prefix: 5 + 3 × 2 = 11.
        let prompts = rows(&[&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5, 7], &[1, 2, 3, 4, 5]]);
        let completions = rows(&[&[8, 9], &[9], &[8, 8]]);
        let l = PrefixLayout::new(&prompts, &completions);
        assert_eq!(l.prefixes, rows(&[&[1, 2, 3, 4, 5]]));
        assert_eq!(l.prefix_of, [0, 0, 0]);
        assert_eq!(l.tails, rows(&[&[6, 8], &[7], &[8]]));
        // Row 0 predicts its first completion token from its own prompt's end, now in its tail;
        // row 2, whose prompt is the common prefix, from the prefix.
        assert_eq!(l.slot(0, 5), Slot::Tail(0, 0));
        assert_eq!(l.slot(0, 6), Slot::Tail(0, 1));
        assert_eq!(l.slot(2, 4), Slot::Prefix(0, 4));
        assert_eq!(l.slot(2, 5), Slot::Tail(2, 0));
    }

    #[test]
    fn prompts_with_nothing_in_common_stay_apart() {
        let prompts = rows(&[&[1, 2], &[3, 4]]);
        let completions = rows(&[&[5], &[6]]);
        let l = PrefixLayout::new(&prompts, &completions);
        assert_eq!(l.prefixes, prompts);
        assert_eq!(l.prefix_of, [0, 1]);
    }
}
