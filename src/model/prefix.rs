//! Which prompt tokens a log-prob pass computes once: the split of (prompt, completion) rows
//! into levels of token rows, each row computed once and continuing a row of the level before
//! (`decoder::SharedBatch`).
//!
//! Three splits, and the pass takes the one with the fewest padded positions (what the layers
//! compute):
//! * **per prompt**: distinct prompts → completions. A group's G completions share one prompt:
//!   the RL case of one theorem.
//! * **common prefix**: the prompts' longest common start → the rest of each prompt, then its
//!   completion. Prompts that differ only at the end (the same instructions and preamble, a
//!   different statement) are the SFT case: four prelude prompts of ~790 tokens that share ~750
//!   cost ~1000 positions instead of ~3200.
//! * **common start, then per prompt**: the common start → the rest of each distinct prompt →
//!   completions. An RL step of several theorems: two prelude groups of 8 cost ~1300 positions
//!   instead of ~2100 per prompt.
//!
//! All give the same log-probs up to float summation order: a token attends to the same keys at
//! the same positions whichever level holds them.

use std::collections::HashMap;

/// The levels of a batch of rows, and where each predicting position lands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PrefixLayout {
    /// Level 0 is computed alone; each later level's rows continue rows of the level before.
    /// The last level holds one row per (prompt, completion) row, in order.
    pub(crate) levels: Vec<Level>,
}

/// One level of a [`PrefixLayout`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Level {
    /// The token rows, each computed once.
    pub(crate) rows: Vec<Vec<u32>>,
    /// The row of the level before that each row continues (empty at level 0).
    pub(crate) parent: Vec<usize>,
}

/// Where a hidden state is: position `at` of row `row` of level `level`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Slot {
    pub(crate) level: usize,
    pub(crate) row: usize,
    pub(crate) at: usize,
}

impl PrefixLayout {
    /// The cheapest split; ties go to the fewest levels. Prompts must not be empty.
    pub(crate) fn new(prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Self {
        let distinct = Distinct::of(prompts);
        // A completion's last token is only a target: no position reads it.
        let tails: Vec<Vec<u32>> = completions
            .iter()
            .map(|c| c[..c.len().saturating_sub(1)].to_vec())
            .collect();
        let mut best = Self::per_prompt(&distinct, &tails);
        let common = common_len(&distinct.prompts);
        if common == 0 {
            return best;
        }
        let mut candidates = vec![Self::common_prefix(prompts, &tails, common)];
        if distinct.prompts.iter().any(|p| p.len() > common) {
            candidates.push(Self::common_then_per_prompt(&distinct, tails, common));
        }
        for candidate in candidates {
            if candidate.positions() < best.positions() {
                best = candidate;
            }
        }
        best
    }

    fn per_prompt(distinct: &Distinct, tails: &[Vec<u32>]) -> Self {
        Self {
            levels: vec![
                Level::root(distinct.prompts.clone()),
                Level {
                    rows: tails.to_vec(),
                    parent: distinct.of_row.clone(),
                },
            ],
        }
    }

    /// The first `len` tokens of every prompt as the one root (`len` ≥ 1, at most the common
    /// length), then each row's prompt rest and completion.
    fn common_prefix(prompts: &[Vec<u32>], tails: &[Vec<u32>], len: usize) -> Self {
        let rows = prompts
            .iter()
            .zip(tails)
            .map(|(p, t)| [&p[len..], t].concat())
            .collect();
        Self {
            levels: vec![
                Level::root(vec![prompts[0][..len].to_vec()]),
                Level {
                    parent: vec![0; prompts.len()],
                    rows,
                },
            ],
        }
    }

    fn common_then_per_prompt(distinct: &Distinct, tails: Vec<Vec<u32>>, len: usize) -> Self {
        let rests: Vec<Vec<u32>> = distinct.prompts.iter().map(|p| p[len..].to_vec()).collect();
        Self {
            levels: vec![
                Level::root(vec![distinct.prompts[0][..len].to_vec()]),
                Level {
                    parent: vec![0; rests.len()],
                    rows: rests,
                },
                Level {
                    rows: tails,
                    parent: distinct.of_row.clone(),
                },
            ],
        }
    }

    /// Padded positions the layers compute: each level's rows × its longest row.
    fn positions(&self) -> usize {
        self.levels
            .iter()
            .map(|l| l.rows.len() * l.rows.iter().map(Vec::len).max().unwrap_or(0))
            .sum()
    }

    /// The hidden state at position `pos` of row `i` (prompt and completion counted together).
    pub(crate) fn slot(&self, i: usize, pos: usize) -> Slot {
        let up = |(level, row): (usize, usize)| (level - 1, self.levels[level].parent[row]);
        let len = |(level, row): (usize, usize)| self.levels[level].rows[row].len();
        // From the row in the last level up to the ancestor that holds `pos`; `start` is the
        // tokens of the ancestors above the current one.
        let mut at = (self.levels.len() - 1, i);
        let ancestors = std::iter::successors(Some(at), |&a| (a.0 > 0).then(|| up(a)));
        let mut start: usize = ancestors.skip(1).map(len).sum();
        while pos < start {
            at = up(at);
            start -= len(at);
        }
        Slot {
            level: at.0,
            row: at.1,
            at: pos - start,
        }
    }
}

impl Level {
    fn root(rows: Vec<Vec<u32>>) -> Self {
        Self {
            rows,
            parent: Vec::new(),
        }
    }
}

/// The distinct prompts of a batch, in order of first appearance, and which one each row has.
struct Distinct {
    prompts: Vec<Vec<u32>>,
    of_row: Vec<usize>,
}

impl Distinct {
    fn of(prompts: &[Vec<u32>]) -> Self {
        let mut seen: HashMap<&[u32], usize> = HashMap::new();
        let mut distinct: Vec<Vec<u32>> = Vec::new();
        let of_row = prompts
            .iter()
            .map(|p| {
                *seen.entry(p.as_slice()).or_insert_with(|| {
                    distinct.push(p.clone());
                    distinct.len() - 1
                })
            })
            .collect();
        Self {
            prompts: distinct,
            of_row,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&[u32]]) -> Vec<Vec<u32>> {
        v.iter().map(|r| r.to_vec()).collect()
    }

    fn slot(level: usize, row: usize, at: usize) -> Slot {
        Slot { level, row, at }
    }

    #[test]
    fn a_group_keeps_its_prompt_as_the_prefix() {
        // One group of three: per prompt computes 4 + 3 × 2 = 10 positions; the common start is
        // the whole prompt, and the common-prefix split computes the same 10.
        let prompts = rows(&[&[1, 2, 3, 4], &[1, 2, 3, 4], &[1, 2, 3, 4]]);
        let completions = rows(&[&[7, 8, 9], &[7], &[8, 9]]);
        let l = PrefixLayout::new(&prompts, &completions);
        assert_eq!(l.levels.len(), 2);
        assert_eq!(l.levels[0].rows, rows(&[&[1, 2, 3, 4]]));
        assert_eq!(l.levels[1].parent, [0, 0, 0]);
        assert_eq!(l.levels[1].rows, rows(&[&[7, 8], &[], &[8]]));
        // Row 0's first completion token is predicted by the prompt's last position.
        assert_eq!(l.slot(0, 3), slot(0, 0, 3));
        assert_eq!(l.slot(0, 4), slot(1, 0, 0));
        assert_eq!(l.slot(2, 3), slot(0, 0, 3));
    }

    #[test]
    fn groups_of_prompts_with_a_common_start_share_it_then_their_own_rest() {
        // Two groups of two: per prompt computes 2 × 5 + 4 × 2 = 18 positions, the common
        // prefix (2 tokens) 2 + 4 × 5 = 22, the common start, then each prompt's rest,
        // 2 + 2 × 3 + 4 × 2 = 16.
        let prompts = rows(&[
            &[1, 2, 3, 4, 5],
            &[1, 2, 3, 4, 5],
            &[1, 2, 6, 7],
            &[1, 2, 6, 7],
        ]);
        let completions = rows(&[&[7, 8, 9], &[7], &[8, 9], &[]]);
        let l = PrefixLayout::new(&prompts, &completions);
        let rests = &l.levels[1];
        assert_eq!(l.levels[0].rows, rows(&[&[1, 2]]));
        assert_eq!(
            (&rests.rows, &rests.parent),
            (&rows(&[&[3, 4, 5], &[6, 7]]), &vec![0, 0])
        );
        assert_eq!(l.levels[2].parent, [0, 0, 1, 1]);
        assert_eq!(l.levels[2].rows, rows(&[&[7, 8], &[], &[8], &[]]));
        assert_eq!(l.positions(), 16);
        // Row 2's prompt ends in its rest (position 3 is the rest's index 1); its completion
        // starts after the 2 + 2 tokens of its ancestors.
        assert_eq!(l.slot(2, 1), slot(0, 0, 1));
        assert_eq!(l.slot(2, 3), slot(1, 1, 1));
        assert_eq!(l.slot(2, 4), slot(2, 2, 0));
        assert_eq!(l.slot(0, 6), slot(2, 0, 1));
    }

    #[test]
    fn distinct_prompts_with_a_long_common_start_share_it() {
        // Per prompt: 3 × 6 + 3 × 1 = 21 positions; common prefix: 5 + 3 × 2 = 11; common
        // start, then the three distinct rests: 5 + 3 × 1 + 3 × 1 = 11, a tie the fewer levels
        // win.
        let prompts = rows(&[&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5, 7], &[1, 2, 3, 4, 5]]);
        let completions = rows(&[&[8, 9], &[9], &[8, 8]]);
        let l = PrefixLayout::new(&prompts, &completions);
        assert_eq!(l.levels.len(), 2);
        assert_eq!(l.levels[0].rows, rows(&[&[1, 2, 3, 4, 5]]));
        assert_eq!(l.levels[1].parent, [0, 0, 0]);
        assert_eq!(l.levels[1].rows, rows(&[&[6, 8], &[7], &[8]]));
        // Row 0 predicts its first completion token from its own prompt's end, now in its tail;
        // row 2, whose prompt is the common prefix, from the prefix.
        assert_eq!(l.slot(0, 5), slot(1, 0, 0));
        assert_eq!(l.slot(0, 6), slot(1, 0, 1));
        assert_eq!(l.slot(2, 4), slot(0, 0, 4));
        assert_eq!(l.slot(2, 5), slot(1, 2, 0));
    }

    #[test]
    fn prompts_with_nothing_in_common_stay_apart() {
        let prompts = rows(&[&[1, 2], &[3, 4]]);
        let completions = rows(&[&[5], &[6]]);
        let l = PrefixLayout::new(&prompts, &completions);
        assert_eq!(l.levels[0].rows, prompts);
        assert_eq!(l.levels[1].parent, [0, 1]);
    }
}
