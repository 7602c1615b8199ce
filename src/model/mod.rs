//! The policy: a Llama/Qwen2/Qwen3 decoder with LoRA adapters, sampling and log-probs.

mod options;

// Policy tools (branch `mtools`): tokenizer and chat template, sampling, optimiser, PEFT adapters.
pub mod adapter;
pub mod optim;
pub mod sampler;
pub mod tokenizer;

pub use options::{LoraOptions, ModelOptions, SamplingOptions};
