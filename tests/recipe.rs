//! `scripts/recipe.sh` (SFT -> eval -> filter -> RL -> eval) end to end in reduced mode: a tiny
//! random model, a few steps, real Lean (`LEAN_GRPO_TEST_LEAN`, scripts/test-lean.sh). A rerun
//! skips every stage whose output exists, and an RL run left without its adapter resumes.

use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn recipe(lean: &str, out: &Path) -> Output {
    let output = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/recipe.sh"))
        .arg("data/prelude.jsonl")
        .arg(out)
        .current_dir(ROOT)
        .env("LEAN_GRPO", env!("CARGO_BIN_EXE_lean-grpo"))
        .env("LEAN", lean)
        .envs([
            ("RL_STEPS", "2"),
            ("NUM_GENERATIONS", "2"),
            ("EVAL_N", "2"),
            ("MAX_LEN", "6"),
            ("SFT_EPOCHS", "1"),
            ("RL_LR", "1e-3"),
            // A random model solves nothing: keep every problem so that RL has some.
            ("MIN_PASS_RATE", "0"),
            ("MAX_PASS_RATE", "1"),
        ])
        .output()
        .unwrap();
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    }
    output
}

#[test]
fn the_recipe_runs_every_stage_once_and_resumes() {
    let Ok(lean) = std::env::var("LEAN_GRPO_TEST_LEAN") else {
        eprintln!("SKIP recipe: LEAN_GRPO_TEST_LEAN unset (run scripts/test.sh)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("recipe");
    let first = recipe(&lean, &out);
    assert!(first.status.success());
    for produced in [
        "model/config.json",
        "sft/adapter_config.json",
        "eval-train/summary.json",
        "train-filtered.jsonl",
        "train-filtered.jsonl.filter.json",
        "rl/metrics.jsonl",
        "rl/adapter/adapter_config.json",
        "eval-test/summary.json",
    ] {
        assert!(out.join(produced).exists(), "{produced} missing");
    }
    let stdout = String::from_utf8_lossy(&first.stdout);
    // The figure itself, not only its label (a Python error once printed the label alone).
    let figure = stdout
        .split("test split after RL:   pass@1 ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_default();
    let number = figure.strip_suffix('%').and_then(|n| n.parse::<f64>().ok());
    assert!(
        number.is_some_and(|n| (0.0..=100.0).contains(&n)),
        "{stdout}"
    );

    // Everything there: every stage is skipped.
    let again = recipe(&lean, &out);
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    for stage in [
        "model",
        "sft",
        "eval (train)",
        "filter",
        "train",
        "eval (test)",
    ] {
        assert!(
            stderr.contains(&format!("{stage}: ")) && stderr.contains("exists, skipped"),
            "{stage}: {stderr}"
        );
    }
    assert_eq!(stderr.matches("exists, skipped").count(), 6, "{stderr}");

    // An RL run cut off before its adapter: resumed from its own directory, not restarted.
    std::fs::remove_dir_all(out.join("rl/adapter")).unwrap();
    std::fs::remove_dir_all(out.join("eval-test")).unwrap();
    let resumed = recipe(&lean, &out);
    assert!(resumed.status.success());
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(stderr.contains("train: resuming"), "{stderr}");
    assert!(out.join("rl/adapter/adapter_config.json").exists());
    let steps = std::fs::read_to_string(out.join("rl/metrics.jsonl")).unwrap();
    assert_eq!(steps.lines().count(), 2, "no step run twice");
}
