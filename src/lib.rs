//! lean-grpo: reinforcement learning for Lean 4 proofs with the Lean checker in the loop.
//!
//! The pipeline reads top to bottom in the module tree:
//! [`data`] → [`model`] (sample) → [`lean`] (verify) → [`reward`] → [`algo`] (advantages, loss)
//! → [`train`]; [`eval`] measures pass@k with the same sampling and checking; [`bench`](mod@bench) times
//! each stage.

pub mod algo;
pub mod atomic;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod endpoint;
pub mod eval;
pub mod lean;
pub mod model;
pub mod passk;
pub mod plot;
pub mod progress;
pub mod reward;
pub mod rollout;
pub mod sft;
pub mod train;
