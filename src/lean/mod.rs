//! The Lean checker: source assembly, screening, backends and verdicts.

mod options;

pub use options::{Backend, CheckerOptions};
