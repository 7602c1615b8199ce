//! Drawing the next token from a row of logits, and finding stop strings in decoded text.
//!
//! The filters run in the order of `transformers`' `generate()` warpers: temperature, top-k,
//! top-p, min-p, each on the distribution the previous one left. The random stream is a
//! `ChaCha8Rng` whose full state can be saved in a checkpoint, so a resumed run draws the same
//! tokens an uninterrupted one would have.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::SamplingOptions;

/// The sampler's resumable state: the random stream's seed, stream and position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    rng: ChaCha8Rng,
}

/// Draws token ids from logits according to [`SamplingOptions`].
#[derive(Debug, Clone)]
pub struct Sampler {
    filters: Filters,
    rng: ChaCha8Rng,
    scratch: Scratch,
    /// Sum and count of the entropies of the distributions tokens were drawn from since the
    /// last [`Sampler::take_entropy`].
    entropy: (f64, usize),
}

/// The distribution filters, applied to one row given its uniform draw.
#[derive(Debug, Clone, Copy)]
struct Filters {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    min_p: f64,
}

/// Buffers reused across calls (one row of vocabulary each).
#[derive(Debug, Clone, Default)]
struct Scratch {
    probs: Vec<f32>,
    order: Vec<u64>,
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
            filters: Filters {
                temperature: opts.temperature,
                top_k: opts.top_k,
                top_p: opts.top_p,
                min_p: opts.min_p,
            },
            rng: state.rng,
            scratch: Scratch::default(),
            entropy: (0.0, 0),
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
        self.filters.temperature <= 0.0
    }

    /// The next token id for one row of logits (length = vocabulary size).
    ///
    /// Temperature 0 is greedy: the first index of the largest logit, and no random number is
    /// consumed. Otherwise exactly one uniform number is drawn per call, whatever the filters
    /// keep, so the stream stays aligned across runs. NaN and infinite logits count as
    /// impossible tokens; a row with no finite logit is an error (the forward pass produced
    /// garbage).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let (best, max) = finite_argmax(logits)?;
        if self.is_greedy() {
            return Ok(best);
        }
        let u: f64 = self.rng.random();
        let (token, entropy) = self.filters.pick(logits, best, max, u, &mut self.scratch);
        self.entropy.0 += entropy;
        self.entropy.1 += 1;
        Ok(token)
    }

    /// The mean entropy (nats) of the temperature-scaled distributions tokens were drawn from
    /// since the last call, before top-k, top-p and min-p: how spread out the policy still is
    /// (a collapsing policy drives it toward 0). `None` when nothing was drawn or decoding is
    /// greedy. Resets the running mean.
    pub fn take_entropy(&mut self) -> Option<f64> {
        let (sum, n) = std::mem::take(&mut self.entropy);
        (n > 0).then(|| sum / n as f64)
    }

    /// The next token of every row: what [`Self::sample`] called on each row in order gives
    /// (the uniform numbers are drawn in row order first), with the rows picked in parallel.
    ///
    /// Why: a decoding step of a batch of 8 spends ~10% of its time here, over 152k logits
    /// per row, on one core while the other waits.
    pub fn sample_rows(&mut self, rows: &[Vec<f32>]) -> Result<Vec<u32>> {
        let bests = rows
            .par_iter()
            .map(|row| finite_argmax(row))
            .collect::<Result<Vec<_>>>()?;
        if self.is_greedy() {
            return Ok(bests.into_iter().map(|(best, _)| best).collect());
        }
        let draws: Vec<f64> = rows.iter().map(|_| self.rng.random()).collect();
        let filters = self.filters;
        let picked: Vec<(u32, f64)> = rows
            .par_iter()
            .zip(bests)
            .zip(draws)
            .map_init(Scratch::default, |scratch, ((row, (best, max)), u)| {
                filters.pick(row, best, max, u, scratch)
            })
            .collect();
        // Summed in row order, so the figure is the same on every run.
        for (_, entropy) in &picked {
            self.entropy.0 += entropy;
            self.entropy.1 += 1;
        }
        Ok(picked.into_iter().map(|(token, _)| token).collect())
    }
}

impl Filters {
    /// The token where `u` falls in the distribution of `logits` (largest finite logit `max`
    /// at `best`) after temperature, top-k, top-p and min-p, and the entropy of the
    /// temperature-scaled distribution before the filters.
    fn pick(
        &self,
        logits: &[f32],
        best: u32,
        max: f32,
        u: f64,
        scratch: &mut Scratch,
    ) -> (u32, f64) {
        // Temperature, then unnormalised probabilities q = exp(s) relative to the best token
        // (whose weight is exactly 1, so min-p is a plain threshold). With Z = Σq the entropy
        // is ln Z − Σ q·s / Z.
        let inv_t = (1.0 / self.temperature) as f32;
        scratch.probs.clear();
        let mut weighted = 0.0f64;
        scratch.probs.extend(logits.iter().map(|&l| {
            if l.is_finite() {
                let scaled = (l - max) * inv_t;
                let q = scaled.exp();
                weighted += f64::from(q * scaled);
                q
            } else {
                0.0
            }
        }));
        let probs = &scratch.probs;
        let z: f64 = probs.iter().map(|&q| f64::from(q)).sum();
        let entropy = (z.ln() - weighted / z).max(0.0);
        let filtered =
            (self.top_k > 0 && self.top_k < logits.len()) || self.top_p < 1.0 || self.min_p > 0.0;
        if !filtered {
            return (
                draw(u, probs, 0..logits.len() as u32).unwrap_or(best),
                entropy,
            );
        }

        // Candidates as rank keys: the probability's bits (monotonic for positive floats) above
        // the complemented id, so a descending key order is "more probable first, lower id
        // first among equals" and every comparison is one integer compare.
        scratch.order.clear();
        scratch.order.extend(
            probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0.0)
                .map(|(i, &p)| rank_key(i as u32, p)),
        );
        let by_rank = |a: &u64, b: &u64| b.cmp(a);

        // Top-k: the k best-ranked tokens.
        if self.top_k > 0 && self.top_k < scratch.order.len() {
            scratch
                .order
                .select_nth_unstable_by(self.top_k - 1, by_rank);
            scratch.order.truncate(self.top_k);
        }

        // Top-p: keep a token when the mass ranked above it is below top_p of the kept mass
        // (HF removes tokens whose ascending cumulative mass is <= 1 - top_p; always keeps the
        // best). Found by quickselect on mass instead of a sort: `order[..lo]` is kept,
        // `order[hi..]` dropped, and everything in `order[lo..hi]` ranks between them.
        if self.top_p < 1.0 {
            let mass_of = |keys: &[u64]| keys.iter().map(|&k| f64::from(key_prob(k))).sum::<f64>();
            let target = self.top_p * mass_of(&scratch.order);
            let (mut lo, mut hi, mut above) = (0, scratch.order.len(), 0.0);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                scratch.order[lo..hi].select_nth_unstable_by(mid - lo, by_rank);
                let upper = mass_of(&scratch.order[lo..mid]);
                if above + upper >= target {
                    hi = mid;
                } else {
                    above += upper + f64::from(key_prob(scratch.order[mid]));
                    lo = mid + 1;
                }
            }
            // lo = 0 only when top_p is 0; the last partition put the best token first.
            scratch.order.truncate(lo.max(1));
        }

        // Min-p: drop tokens less probable than min_p times the best one.
        if self.min_p > 0.0 {
            let threshold = self.min_p as f32;
            scratch.order.retain(|&k| key_prob(k) >= threshold);
        }

        let token = draw(u, probs, scratch.order.iter().map(|&k| key_id(k))).unwrap_or(best);
        (token, entropy)
    }
}

/// Inverse CDF: the token where `u` (in [0, 1)) falls among the cumulated `probs` of `ids`.
/// `None` when `ids` carry no mass.
fn draw(u: f64, probs: &[f32], ids: impl Iterator<Item = u32> + Clone) -> Option<u32> {
    let total: f64 = ids.clone().map(|i| f64::from(probs[i as usize])).sum();
    let mut remaining = u * total;
    let mut last = None;
    for i in ids {
        let p = f64::from(probs[i as usize]);
        if p > 0.0 {
            remaining -= p;
            last = Some(i);
            if remaining < 0.0 {
                return last;
            }
        }
    }
    // Rounding left a sliver of mass: the last token with mass owns it.
    last
}

fn rank_key(id: u32, prob: f32) -> u64 {
    (u64::from(prob.to_bits()) << 32) | u64::from(u32::MAX - id)
}

fn key_prob(key: u64) -> f32 {
    f32::from_bits((key >> 32) as u32)
}

fn key_id(key: u64) -> u32 {
    u32::MAX - key as u32
}

/// [`argmax`], or the error a row without a finite logit is.
fn finite_argmax(logits: &[f32]) -> Result<(u32, f32)> {
    match argmax(logits) {
        Some(found) => Ok(found),
        None => bail!(
            "cannot sample: none of the {} logits is finite (NaN or inf in the forward pass)",
            logits.len()
        ),
    }
}

/// Index and value of the largest finite logit (first one on ties).
fn argmax(logits: &[f32]) -> Option<(u32, f32)> {
    let mut best = f32::NEG_INFINITY;
    let mut index = None;
    for (i, &l) in logits.iter().enumerate() {
        // NaN compares false; +inf is excluded explicitly.
        if l > best && l != f32::INFINITY {
            best = l;
            index = Some(i as u32);
        }
    }
    index.map(|i| (i, best))
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
