//! Verdict → reward.
