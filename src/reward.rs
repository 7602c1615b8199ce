//! Verdict → reward.
//!
//! Binary by default: every strong published prover was trained on "Lean accepted it or not".
//! `partial` gives a rejected proof a share of a small cap for the part of it that ends before
//! Lean's first error (docs/checker.md §5), never for `sorry`, `forbidden`, `axioms` or
//! `statement_changed`, and the cap is below 1 so any complete proof beats any partial one.
//! DAPO's overlong shaping is not here: it belongs to the algorithm (it reads lengths, not
//! verdicts).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::lean::Verdict;

/// What a verdict earns before any length penalty (`train.reward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardPreset {
    /// 1 when Lean accepts the proof, 0 otherwise.
    Binary,
    /// 1 when accepted; a rejected proof earns up to `partial_credit_cap` for the share of it
    /// before Lean's first error.
    Partial,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewardFn {
    partial_cap: Option<f64>,
    length_penalty: f64,
}

impl RewardFn {
    /// The reward of `preset` (`train.reward`), with `partial_credit_cap` for partial credit
    /// and `length_penalty` per completion token.
    pub fn new(preset: RewardPreset, partial_credit_cap: f64, length_penalty: f64) -> Result<Self> {
        let partial_cap = match preset {
            RewardPreset::Binary => None,
            RewardPreset::Partial => {
                let cap = partial_credit_cap;
                if !(0.0..1.0).contains(&cap) {
                    bail!(
                        "train.partial_credit_cap must be in [0, 1) so that a complete proof \
                         always beats a partial one, got {cap}"
                    );
                }
                Some(cap)
            }
        };
        if !(length_penalty.is_finite() && length_penalty >= 0.0) {
            bail!("train.length_penalty must be a finite number >= 0, got {length_penalty}");
        }
        Ok(RewardFn {
            partial_cap,
            length_penalty,
        })
    }

    /// The reward of one completion of `completion_tokens` tokens.
    pub fn reward(&self, verdict: &Verdict, completion_tokens: usize) -> f64 {
        let base = if verdict.is_accepted() {
            1.0
        } else {
            match (self.partial_cap, verdict.partial_progress()) {
                (Some(cap), Some(progress)) => cap * progress.clamp(0.0, 1.0),
                _ => 0.0,
            }
        };
        base - self.length_penalty * completion_tokens as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lean::{Evidence, VerdictKind};

    fn verdict(kind: VerdictKind, progress: Option<f64>) -> Verdict {
        Verdict::new(
            kind,
            Evidence {
                progress,
                ..Evidence::default()
            },
        )
    }

    /// `train.reward` as a config file gives it, with the default cap and no length penalty.
    struct Options {
        preset: RewardPreset,
        partial_credit_cap: f64,
        length_penalty: f64,
    }

    fn options(reward: &str) -> Options {
        Options {
            preset: serde_json::from_value(serde_json::json!(reward)).unwrap(),
            partial_credit_cap: crate::config::TrainOptions::default().partial_credit_cap,
            length_penalty: 0.0,
        }
    }

    impl RewardFn {
        fn from_options(o: &Options) -> Result<RewardFn> {
            RewardFn::new(o.preset, o.partial_credit_cap, o.length_penalty)
        }
    }

    #[test]
    fn binary_counts_only_accepted() {
        let r = RewardFn::from_options(&options("binary")).unwrap();
        assert_eq!(r.reward(&verdict(VerdictKind::Accepted, None), 10), 1.0);
        for kind in VerdictKind::ALL
            .into_iter()
            .filter(|k| *k != VerdictKind::Accepted)
        {
            assert_eq!(r.reward(&verdict(kind, Some(0.9)), 10), 0.0, "{kind}");
        }
    }

    #[test]
    fn partial_credit_is_capped_and_never_for_cheats() {
        let r = RewardFn::from_options(&options("partial")).unwrap();
        let half = r.reward(&verdict(VerdictKind::LeanError, Some(0.5)), 10);
        assert!(
            (half - 0.15).abs() < 1e-12,
            "0.3 cap × 0.5 progress, got {half}"
        );
        let full = r.reward(&verdict(VerdictKind::LeanError, Some(1.0)), 10);
        assert!(full < 1.0);
        for kind in [
            VerdictKind::Sorry,
            VerdictKind::Forbidden,
            VerdictKind::Axioms,
            VerdictKind::StatementChanged,
        ] {
            assert_eq!(r.reward(&verdict(kind, Some(1.0)), 10), 0.0, "{kind}");
        }
        assert_eq!(r.reward(&verdict(VerdictKind::Accepted, None), 10), 1.0);
    }

    #[test]
    fn length_penalty_applies_per_token() {
        let mut opts = options("binary");
        opts.length_penalty = 0.001;
        let r = RewardFn::from_options(&opts).unwrap();
        let got = r.reward(&verdict(VerdictKind::Accepted, None), 100);
        assert!((got - 0.9).abs() < 1e-12);
    }

    #[test]
    fn bad_presets_are_named() {
        let flags = [crate::config::Override::new("train", "reward", "dense")];
        let err = crate::config::Config::load(None, &flags, None)
            .expect_err("dense is no preset")
            .to_string();
        assert!(
            err.contains("`train.reward`: unknown variant `dense`, expected `binary` or `partial`"),
            "{err}"
        );
        let mut opts = options("partial");
        opts.partial_credit_cap = 1.0;
        assert!(RewardFn::from_options(&opts).is_err());
    }
}
