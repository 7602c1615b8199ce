//! The three ways a source gets checked; each returns a [`LeanRun`] for [`super::verdict::judge`].

mod kimina;
mod process;
mod repl;

pub use kimina::{Backoff, KiminaCluster};
pub use process::ProcessBackend;
pub use repl::{ReplPool, ReplSettings};

use super::source::Source;
use super::verdict::LeanRun;

pub enum Runner {
    Process(ProcessBackend),
    Repl(ReplPool),
    Kimina(KiminaCluster),
}

impl Runner {
    /// Check one source; `id` names it in a kimina batch. Errors are the checker's failures
    /// (cannot start Lean, server unreachable), never the proof's.
    pub fn run(&self, source: &Source, id: &str) -> anyhow::Result<LeanRun> {
        match self {
            Runner::Process(backend) => backend.run(source),
            Runner::Repl(pool) => pool.run(source),
            Runner::Kimina(client) => client.run(source, id),
        }
    }
}
