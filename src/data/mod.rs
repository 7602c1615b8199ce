//! Theorem records: loading JSONL with line-numbered errors, the prompt we ask a model with, and
//! the data stages before training (`prepare` from public datasets, the pass-rate filter).

pub mod filter;
pub mod fim;
mod load;
pub mod prepare;
mod prompt;
mod theorem;

pub use load::{load_theorems, LoadError, TheoremReader};
pub use prompt::{fim_message, user_message};
pub use theorem::Theorem;

/// Writes `theorems` as our theorem JSONL, one record per line, atomically.
pub fn write_theorems(path: &std::path::Path, theorems: &[Theorem]) -> anyhow::Result<()> {
    let mut jsonl = Vec::new();
    for theorem in theorems {
        serde_json::to_writer(&mut jsonl, theorem)?;
        jsonl.push(b'\n');
    }
    crate::atomic::write_file(path, &jsonl)
}
