//! The binary as a user meets it: help texts, exit codes, printed configuration.

use std::process::{Command, Output};

fn lean_grpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lean-grpo"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_subcommand_help_has_examples() {
    let top = lean_grpo(&["--help"]);
    assert!(top.status.success());
    assert!(stdout(&top).contains("Examples:"));
    for sub in ["train", "eval", "check", "algorithms", "bench"] {
        let out = lean_grpo(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help failed");
        let text = stdout(&out);
        assert!(
            text.contains("Examples:"),
            "{sub} --help has no examples:\n{text}"
        );
        assert!(
            text.contains(&format!("lean-grpo {sub}")),
            "{sub} --help example does not use it"
        );
    }
}

#[test]
fn bad_usage_exits_2() {
    let out = lean_grpo(&["train"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("<THEOREMS>"));
    let out = lean_grpo(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_config_exits_2_with_the_key() {
    let out = lean_grpo(&[
        "train",
        "data/toy.jsonl",
        "--algo-config",
        "{not json",
        "--print-config",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: --algo-config: invalid JSON"),
        "{}",
        stderr(&out)
    );
}

/// Typed keys fail when the configuration is read, before any model load, naming the key.
#[test]
fn typos_in_typed_keys_are_input_errors_naming_the_key() {
    for (args, want) in [
        (
            &["--algo-config", r#"{"entropy_coef": 0.01}"#][..],
            "`entropy_coef` must be 0",
        ),
        (
            &["--algo-config", r#"{"dynamic_sampling_metric": "acc"}"#][..],
            "`dynamic_sampling_metric` must be one of reward, shaped_reward",
        ),
        (
            &["--device", "tpu"][..],
            "`model.device`: --device tpu: expected",
        ),
        (
            &["--dtype", "f8"][..],
            "`model.dtype`: `f8`: expected `f32`, `bf16` or `f16`",
        ),
    ] {
        let mut all = vec!["train", "data/toy.jsonl", "--print-config"];
        all.extend_from_slice(args);
        let out = lean_grpo(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}

/// `eval --endpoint` is configuration like `train --endpoint`: it lands in the `eval` section.
#[test]
fn eval_endpoint_flags_set_the_eval_section() {
    let out = lean_grpo(&[
        "eval",
        "data/toy.jsonl",
        "--endpoint",
        "http://127.0.0.1:9",
        "--served-model",
        "prover",
        "--print-config",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value = serde_yaml_ng::from_str(&stdout(&out)).unwrap();
    assert_eq!(config["eval"]["endpoint"], "http://127.0.0.1:9");
    assert_eq!(config["eval"]["served_model"], "prover");
    assert!(config["train"]["endpoint"].is_null());
    // --served-model without --endpoint is a usage error.
    let out = lean_grpo(&["eval", "data/toy.jsonl", "--served-model", "p"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn print_config_round_trips_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = lean_grpo(&[
        "train",
        "data/toy.jsonl",
        "--algorithm",
        "dapo",
        "--learning-rate",
        "2e-5",
        "--lean-cmd",
        "lean --json",
        "--print-config",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("algorithm: dapo"));
    // Every algorithm key is written out, the preset's included.
    assert!(
        printed.contains("dynamic_sampling_metric: reward"),
        "{printed}"
    );
    assert!(printed.contains("epsilon_high: 0.28"), "{printed}");
    let path = dir.path().join("effective.yaml");
    std::fs::write(&path, &printed).unwrap();
    let again = lean_grpo(&[
        "train",
        "data/toy.jsonl",
        "--config",
        path.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), printed);
}

#[test]
fn algorithms_lists_all_five_as_text_and_json() {
    let out = lean_grpo(&["algorithms"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for name in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        assert!(text.contains(name), "table lacks {name}:\n{text}");
    }
    let out = lean_grpo(&["algorithms", "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("--json prints JSON");
    let text = json.to_string();
    for name in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        assert!(text.contains(&format!("\"{name}\"")), "JSON lacks {name}");
    }
    let dapo = &json["algorithms"][1];
    assert_eq!(dapo["name"], "dapo");
    assert_eq!(dapo["resolved"]["dynamic_sampling_metric"], "reward");
    assert!(dapo["advantage"]
        .as_str()
        .unwrap()
        .contains("groups with equal task rewards dropped"));
}
