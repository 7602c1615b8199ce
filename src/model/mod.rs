//! The policy: a Llama/Qwen2/Qwen3 decoder with LoRA adapters, sampling and log-probs.

mod options;

pub use options::{LoraOptions, ModelOptions, SamplingOptions};
