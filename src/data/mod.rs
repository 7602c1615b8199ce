//! Theorem records: loading JSONL with line-numbered errors, and the prompt we ask a model with.

mod load;
mod prompt;
mod theorem;

pub use load::{load_theorems, LoadError, TheoremReader};
pub use prompt::user_message;
pub use theorem::Theorem;
