//! The Lean checker: source assembly, screening, backends and verdicts.
//!
//! A [`Job`] (theorem + completion) goes through: [`extract_proof`] (last fenced block,
//! restated statement compared and cut) → [`screen()`] (forbidden constructs, before any process
//! runs) → [`Source`] (preamble + statement + proof + the checker's own `#print axioms`) → a
//! backend (`lean` processes, `repl` workers, `kimina` HTTP) → `verdict::judge` → [`Verdict`].
//! [`Checker`] runs batches in parallel with a verdict cache; [`run_check`] is `lean-grpo check`.

mod audit;
mod backend;
mod cache;
mod check;
mod checker;
mod command;
mod extract;
mod fill;
pub mod holes;
mod lex;
pub mod message;
mod options;
pub mod sandbox;
mod screen;
mod source;
mod verdict;

pub use audit::STANDARD_AXIOMS;
pub use check::{run_check, CheckSummary};
pub use checker::{Checked, Checker, Job};
pub(crate) use command::{network_isolation, CommandLine};
pub use extract::{extract_proof, last_code_block, Extracted};
pub use fill::{fill_hole, Filled};
pub use options::{Backend, CheckerOptions};
pub use screen::{explain_screening, screen, ScreenPolicy, Screened};
pub use source::Source;
pub use verdict::{
    judge, progress_before, Evidence, LeanRun, ProofMessage, RunEnd, Verdict, VerdictKind,
};
