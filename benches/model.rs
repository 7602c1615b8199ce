//! Policy speed on a Qwen2.5-0.5B-shaped model with random weights generated in memory
//! (24 layers, hidden 896, 14/2 heads, intermediate 4864, vocab 151936), f32 on the CPU: the
//! model section of `lean-grpo bench` in full mode (sampling tokens/s at batch 1 and 8, one
//! training step, reference log-probs, candle-transformers' own qwen2 at batch 1 for context,
//! and peak RSS of sampling and of the training update with and without gradient
//! checkpointing at a 700-token prompt), printed as JSON.
//!
//! `cargo bench --bench model`. Asserts nothing about speed.

use anyhow::Result;
use lean_grpo::bench::{model, Mode, Plan};

fn main() -> Result<()> {
    let (settings, sampling, training, memory) =
        model::measure(&Plan::new(Mode::Full, false).model)?;
    let report = serde_json::json!({
        "settings": settings,
        "sampling": sampling,
        "training": training,
        "memory": memory,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
