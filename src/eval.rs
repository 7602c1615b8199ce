//! pass@k evaluation.
