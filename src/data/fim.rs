//! Fill-in-the-middle examples (docs/fim.md): a record's known proof cut in three, the model
//! writing the middle. Where holes may be cut is Lean syntax, so the cutting is the checker's
//! ([`crate::lean::holes`]); this is the shape every layer passes around.

use serde::{Deserialize, Serialize};

use super::Theorem;

/// What the prompt shows where the hole is; a completion containing it is rejected.
pub const HOLE_MARKER: &str = "<HOLE>";

/// A proof cut in three: `prefix + cut + suffix` is the original proof.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hole {
    pub prefix: String,
    /// The text the model has to write (the reference answer).
    pub cut: String,
    pub suffix: String,
    /// The cut's share of the proof's tokens.
    pub ratio: f64,
}

impl Hole {
    /// The whole proof is the hole: the whole-proof task.
    pub fn is_whole(&self) -> bool {
        self.prefix.is_empty() && self.suffix.is_empty()
    }

    /// The proof with `fill` in the hole.
    pub fn splice(&self, fill: &str) -> String {
        format!("{}{fill}{}", self.prefix, self.suffix)
    }

    /// The proof as the prompt shows it.
    pub fn marked(&self) -> String {
        self.splice(HOLE_MARKER)
    }
}

/// The records of `theorems` that have a proof (the only ones a hole can be cut in), and how
/// many were left out; the count is logged, so a file without proofs is noticed, not an error.
pub fn with_proofs(theorems: &[Theorem]) -> (Vec<Theorem>, usize) {
    let kept: Vec<Theorem> = theorems
        .iter()
        .filter(|t| t.proof.as_deref().is_some_and(|p| !p.trim().is_empty()))
        .cloned()
        .collect();
    let skipped = theorems.len() - kept.len();
    if skipped > 0 {
        tracing::info!(
            "fill-in-the-middle: {skipped} of {} records have no proof and are skipped",
            theorems.len()
        );
    }
    (kept, skipped)
}
