//! `lean-grpo bench --reduced` end to end: one JSON object on stdout (the same in `--output`)
//! with every figure present, finite and positive, and every proof of the checked subset of
//! data/prelude.jsonl accepted by a real Lean (`LEAN_GRPO_TEST_LEAN`, `scripts/test-lean.sh`).
//! Without that Lean the checker section must say it was skipped (a visible SKIP line here),
//! and the rest is still checked. Asserts nothing about speed.

use std::process::Command;

use lean_grpo::algo::presets::PRESETS;
use serde_json::Value;

#[test]
fn reduced_bench_prints_every_figure() {
    let lean = std::env::var("LEAN_GRPO_TEST_LEAN")
        .ok()
        .filter(|s| !s.is_empty());
    if lean.is_none() {
        eprintln!(
            "SKIP reduced_bench_prints_every_figure (checker part): LEAN_GRPO_TEST_LEAN unset; \
             export LEAN_GRPO_TEST_LEAN=$(scripts/test-lean.sh). Checking the other sections."
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // In a folder that does not exist yet: the bench makes it rather than fail at the end.
    let written = dir.path().join("runs/bench.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lean-grpo"));
    command
        .args(["bench", "--reduced", "--output"])
        .arg(&written)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(lean) = &lean {
        command.args(["--lean-cmd", &format!("'{lean}' --json")]);
    }
    let out = command.output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
    assert_eq!(summary, file, "--output holds what stdout printed");

    assert_eq!(summary["mode"], "reduced");
    assert!(summary["date"].as_str().is_some_and(|d| d.ends_with('Z')));
    let machine = &summary["machine"];
    assert!(machine["cpu"].as_str().is_some_and(|c| !c.is_empty()));
    let cores = machine["cores"].as_u64().expect("machine.cores");
    assert!(cores >= 1);
    assert_eq!(summary["settings"]["model"]["shape"], "small");

    let figures = &summary["figures"];
    let mut expected: Vec<String> = [
        "/sampling/batch_1_tokens_per_second",
        "/sampling/batch_8_tokens_per_second",
        "/sampling/step_one_batch_tokens_per_second",
        "/sampling/step_group_by_group_tokens_per_second",
        "/sampling/f16_merged_batch_1_tokens_per_second",
        "/sampling/f16_merged_batch_8_tokens_per_second",
        "/sampling/f16_merge_seconds",
        "/sampling/candle_transformers_batch_1_tokens_per_second",
        "/training/step_seconds",
        "/training/reference_logprobs_seconds",
        "/memory/training_step_seconds",
        "/memory/training_step_checkpointed_seconds",
        "/memory/sampling_tokens_per_second",
        "/quantized/linear_weights_gib",
        "/quantized/linear_weights_f32_gib",
        "/quantized/sampling_tokens_per_second",
        "/quantized/training_step_seconds",
        "/quantized/training_step_checkpointed_seconds",
    ]
    .map(String::from)
    .to_vec();
    expected.extend(
        PRESETS
            .iter()
            .map(|p| format!("/algorithm_loss/loss_backward_seconds/{}", p.name)),
    );
    // Linux gives peak RSS per phase; each peak includes the weights the process holds.
    if std::path::Path::new("/proc/self/status").exists() {
        let model = figures["memory"]["model_rss_gib"]
            .as_f64()
            .expect("model RSS");
        for phase in [
            "sampling_peak_rss_gib",
            "resident_after_sampling_gib",
            "training_step_peak_rss_gib",
            "training_step_checkpointed_peak_rss_gib",
        ] {
            let peak = figures["memory"][phase].as_f64();
            assert!(
                peak.is_some_and(|p| p > 0.0 && p >= 0.9 * model),
                "{phase} is {peak:?} with the model at {model} GiB"
            );
        }
        // What sampling leaves is measured after it, at most its peak.
        let after = figures["memory"]["resident_after_sampling_gib"].as_f64();
        let peak = figures["memory"]["sampling_peak_rss_gib"].as_f64();
        assert!(
            after.zip(peak).is_some_and(|(a, p)| a <= p),
            "resident after sampling {after:?} above its peak {peak:?}"
        );
        for section in ["memory", "quantized"] {
            expected.extend(
                [
                    "model_rss_gib",
                    "sampling_peak_rss_gib",
                    "resident_after_sampling_gib",
                    "training_step_peak_rss_gib",
                    "training_step_checkpointed_peak_rss_gib",
                ]
                .map(|f| format!("/{section}/{f}")),
            );
        }
    }
    // The reduced shape's linear layers in Q8_0: 34 bytes per 32 weights against 128.
    let quantized = &figures["quantized"];
    assert_eq!(quantized["quantize"], "q8_0");
    let ratio = quantized["linear_weights_gib"].as_f64().unwrap()
        / quantized["linear_weights_f32_gib"].as_f64().unwrap();
    assert!((ratio - 34.0 / 128.0).abs() < 1e-3, "{ratio}");
    assert!(figures["large"].is_null(), "no --large");
    let checker = &figures["checker"];
    match &lean {
        Some(_) => {
            assert_eq!(checker["status"], "measured", "{checker}");
            for config in [
                "bare_loop",
                "bare_loop_all_cores",
                "jobs_1",
                "jobs_all_cores",
            ] {
                for figure in ["seconds", "proofs_per_second", "ms_per_proof"] {
                    expected.push(format!("/checker/{config}/{figure}"));
                }
            }
            expected.push("/checker/speedup_all_cores".into());
            expected.push("/checker/bare_speedup_all_cores".into());
            let settings = &summary["settings"]["checker"];
            assert_eq!(settings["proofs"], 12, "the reduced subset: {settings}");
            assert_eq!(
                checker["accepted"], settings["proofs"],
                "every proof of the subset accepted"
            );
            assert_eq!(settings["jobs"], serde_json::json!([1, cores]));
            assert_eq!(settings["theorems"], "data/prelude.jsonl");
            assert!(checker["overhead_ms_per_proof"]
                .as_f64()
                .is_some_and(f64::is_finite));
        }
        None => {
            assert_eq!(checker["status"], "skipped", "{checker}");
            assert!(
                checker["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("--lean-cmd")),
                "{checker}"
            );
            assert!(summary["settings"]["checker"].is_null());
        }
    }
    for pointer in &expected {
        let value = figures.pointer(pointer).and_then(Value::as_f64);
        assert!(
            value.is_some_and(|v| v.is_finite() && v > 0.0),
            "figure {pointer} is {value:?}, expected a finite positive number:\n{figures:#}"
        );
    }
    // Nothing else hides in the figures: every number is one of the above, the accepted count
    // or the overhead (a difference of two timings, which may be negative).
    let mut numbers = Vec::new();
    collect_numbers(figures, String::new(), &mut numbers);
    for (pointer, _) in &numbers {
        assert!(
            expected.contains(pointer)
                || pointer == "/checker/accepted"
                || pointer == "/checker/overhead_ms_per_proof",
            "unexpected figure {pointer}"
        );
    }
    assert_eq!(
        numbers.len(),
        expected.len() + if lean.is_some() { 2 } else { 0 }
    );
}

fn collect_numbers(value: &Value, at: String, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Number(n) => out.push((at, n.as_f64().unwrap_or(f64::NAN))),
        Value::Object(map) => {
            for (key, v) in map {
                collect_numbers(v, format!("{at}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                collect_numbers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}
