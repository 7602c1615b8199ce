//! Theorem records: loading JSONL with line-numbered errors, and the prompt we ask a model with.

pub mod fim;
mod load;
mod prompt;
mod theorem;

pub use load::{load_theorems, LoadError, TheoremReader};
pub use prompt::{fim_message, user_message};
pub use theorem::Theorem;
