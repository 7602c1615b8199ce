//! The policy: a Llama/Qwen2/Qwen3 decoder with LoRA adapters, sampling and log-probs.
//!
//! Read in this order: [`device`] (where it runs), [`config`] and [`load`] (what is loaded),
//! [`decoder`] with its layers (`layer`), [`lora`], [`ops`], [`fused`] and `recompute` (the
//! maths), [`policy`] (what the trainer calls).
//! Around it: [`tokenizer`] (text and chat template), [`sampler`] (one token from logits),
//! [`optim`] (AdamW, schedules, clipping) and [`adapter`] (PEFT save/load, merged export).

pub mod adapter;
mod attention;
pub mod config;
pub mod decoder;
pub mod device;
pub mod fused;
pub mod gemv;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod init;
mod layer;
pub mod load;
pub mod lora;
pub mod ops;
pub mod optim;
mod options;
pub mod policy;
mod prefix;
pub mod quant;
mod recompute;

pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use options::{LoraOptions, ModelOptions, SamplingOptions};
pub use policy::{argmax, GenerateOptions, Generation, Policy};
pub use quant::Quantize;
