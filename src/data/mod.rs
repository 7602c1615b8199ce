//! Theorem records: loading JSONL with line-numbered errors.
