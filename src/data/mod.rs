//! Theorem records: loading JSONL with line-numbered errors, and the prompt we ask a model with.

mod theorem;

pub use theorem::Theorem;
