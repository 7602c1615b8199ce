//! Drawing the next token from a row of logits, and finding stop strings in decoded text.
//!
//! The filters run in the order of `transformers`' `generate()` warpers: temperature, top-k,
//! top-p, min-p, each on the distribution the previous one left. The random stream is a
//! `ChaCha8Rng` whose full state can be saved in a checkpoint, so a resumed run draws the same
//! tokens an uninterrupted one would have.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::SamplingOptions;

/// First chunk of candidates sorted for top-p; chunks double until they hold `top_p` of the mass.
/// Real distributions put that mass on a few dozen tokens, so the full vocabulary is rarely
/// sorted.
const NUCLEUS_FIRST_PREFIX: usize = 64;

/// The sampler's resumable state: the random stream's seed, stream and position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    rng: ChaCha8Rng,
}

/// Draws token ids from logits according to [`SamplingOptions`].
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    min_p: f64,
    rng: ChaCha8Rng,
    /// Scratch buffers reused across calls (one row of vocabulary each).
    probs: Vec<f64>,
    order: Vec<u32>,
}

impl Sampler {
    /// A sampler whose random stream is fully determined by `seed`.
    pub fn new(opts: &SamplingOptions, seed: u64) -> Self {
        Self::from_state(
            opts,
            SamplerState {
                rng: ChaCha8Rng::seed_from_u64(seed),
            },
        )
    }

    /// Resumes the random stream saved by [`Self::state`].
    pub fn from_state(opts: &SamplingOptions, state: SamplerState) -> Self {
        Self {
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
            min_p: opts.min_p,
            rng: state.rng,
            probs: Vec::new(),
            order: Vec::new(),
        }
    }

    /// The random stream's position, to store in a checkpoint.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            rng: self.rng.clone(),
        }
    }

    /// Whether draws are deterministic argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The next token id for one row of logits (length = vocabulary size).
    ///
    /// Temperature 0 is greedy: the first index of the largest logit, and no random number is
    /// consumed. Otherwise exactly one uniform number is drawn per call, whatever the filters
    /// keep, so the stream stays aligned across runs. NaN logits count as -inf; a row with no
    /// finite logit is an error (the forward pass produced garbage).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let Some((best, max)) = argmax(logits) else {
            bail!(
                "cannot sample: none of the {} logits is finite (NaN or inf in the forward pass)",
                logits.len()
            );
        };
        if self.is_greedy() {
            return Ok(best);
        }
        let u: f64 = self.rng.random();

        // Temperature, then unnormalised probabilities relative to the best token (whose weight
        // is exactly 1, so min-p is a plain threshold).
        let inv_t = 1.0 / self.temperature;
        self.probs.clear();
        self.probs.extend(logits.iter().map(|&l| {
            if l.is_nan() {
                0.0
            } else {
                ((f64::from(l) - f64::from(max)) * inv_t).exp()
            }
        }));

        self.order.clear();
        self.order
            .extend((0..logits.len() as u32).filter(|&i| self.probs[i as usize] > 0.0));
        let probs = &self.probs;
        let by_prob_desc = |a: &u32, b: &u32| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        };

        // Top-k: the k most probable tokens (ties beyond k go by lower id).
        if self.top_k > 0 && self.top_k < self.order.len() {
            self.order
                .select_nth_unstable_by(self.top_k - 1, by_prob_desc);
            self.order.truncate(self.top_k);
        }

        // Top-p: the most probable tokens whose preceding mass is below top_p of the kept mass.
        // Sorted in growing chunks: `order[..sorted]` is sorted and ranks above everything after
        // it, so each chunk is selected from the tail and only the chunk itself is sorted.
        if self.top_p < 1.0 {
            let total: f64 = self.order.iter().map(|&i| probs[i as usize]).sum();
            let target = self.top_p * total;
            let len = self.order.len();
            let (mut sorted, mut chunk, mut mass) = (0, NUCLEUS_FIRST_PREFIX, 0.0);
            'nucleus: while sorted < len {
                let end = (sorted + chunk).min(len);
                if end < len {
                    self.order[sorted..].select_nth_unstable_by(end - sorted - 1, by_prob_desc);
                }
                self.order[sorted..end].sort_unstable_by(by_prob_desc);
                for rank in sorted..end {
                    if mass >= target && rank > 0 {
                        self.order.truncate(rank);
                        break 'nucleus;
                    }
                    mass += probs[self.order[rank] as usize];
                }
                sorted = end;
                chunk *= 2;
            }
        }

        // Min-p: drop tokens less probable than min_p times the best one.
        if self.min_p > 0.0 {
            let threshold = self.min_p;
            self.order.retain(|&i| probs[i as usize] >= threshold);
        }

        // Inverse CDF over the kept tokens, in id order so the result does not depend on how
        // the filters above happened to permute them.
        self.order.sort_unstable();
        let total: f64 = self.order.iter().map(|&i| probs[i as usize]).sum();
        let mut remaining = u * total;
        for &i in &self.order {
            remaining -= probs[i as usize];
            if remaining < 0.0 {
                return Ok(i);
            }
        }
        // Rounding left a sliver of mass: the last kept token owns it.
        Ok(*self.order.last().unwrap_or(&best))
    }
}

/// Index and value of the largest finite logit (first one on ties).
fn argmax(logits: &[f32]) -> Option<(u32, f32)> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i as u32, l));
        }
    }
    best
}

/// Where a stop string occurs in decoded text (byte offsets into that text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopMatch {
    /// Start of the stop string: truncate here to drop it.
    pub start: usize,
    /// End of the stop string: truncate here to keep it.
    pub end: usize,
}

/// The user's stop strings (besides EOS tokens). Matching is on decoded text because a stop
/// string can span several tokens and a token can hold the end of one plus more text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStrings {
    stops: Vec<String>,
    longest: usize,
}

impl StopStrings {
    /// Empty strings are ignored: they would end every completion before its first token.
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// The earliest occurrence of any stop string in `text` (the longest one on a tie).
    pub fn find(&self, text: &str) -> Option<StopMatch> {
        self.find_new(text, 0)
    }

    /// Like [`Self::find`], for a completion that grows: `checked` is the length of `text`
    /// already searched by an earlier call (that found nothing). Only matches that end after
    /// `checked` can be new, so the search starts `longest - 1` bytes before it.
    pub fn find_new(&self, text: &str, checked: usize) -> Option<StopMatch> {
        let mut from = checked
            .saturating_sub(self.longest.saturating_sub(1))
            .min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &text[from..];
        self.stops
            .iter()
            .filter_map(|stop| {
                window.find(stop.as_str()).map(|at| StopMatch {
                    start: from + at,
                    end: from + at + stop.len(),
                })
            })
            .min_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)))
    }
}
