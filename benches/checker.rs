//! Checker throughput on the 75 proofs of data/prelude.jsonl with a real Lean
//! (`LEAN_GRPO_TEST_LEAN`, from `scripts/test-lean.sh`): the checker section of
//! `lean-grpo bench` in full mode (proofs/s at jobs=1 and jobs=cores, and the pool's overhead
//! per proof against a bare loop of the same `lean --json` runs), printed as JSON.
//!
//!     export LEAN_GRPO_TEST_LEAN=$(scripts/test-lean.sh)
//!     cargo bench --bench checker

use std::path::Path;

use anyhow::Result;
use lean_grpo::bench::{checker, Mode, Plan};
use lean_grpo::data::load_theorems;

fn main() -> Result<()> {
    let Some(lean) = std::env::var("LEAN_GRPO_TEST_LEAN")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        eprintln!("SKIP bench checker: LEAN_GRPO_TEST_LEAN unset (export LEAN_GRPO_TEST_LEAN=$(scripts/test-lean.sh))");
        return Ok(());
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/prelude.jsonl");
    let theorems = load_theorems(&path, None)?;
    let rounds = Plan::new(Mode::Full, false).checker_rounds;
    let (settings, figures) = checker::measure(&format!("'{lean}' --json"), &theorems, rounds)?;
    let report = serde_json::json!({"settings": settings, "figures": figures});
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
