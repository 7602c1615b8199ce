//! Fill-in-the-middle with real Lean (`LEAN_GRPO_TEST_LEAN`, scripts/test-lean.sh): splicing on
//! every prelude record, the `hole_mismatch` verdict, `train --task fim` for every algorithm with
//! its curriculum state and resume, and `eval --task fim`. Skips, visibly, without Lean.

mod support;

use std::path::Path;
use std::process::Command;

use lean_grpo::eval::ProblemResult;
use lean_grpo::lean::holes;
use lean_grpo::lean::{Backend, Checker, Job, VerdictKind};
use serde_json::Value;
use support::binary::{
    json_lines, kill_after_checkpoint, lean_grpo, reproducible, run, tiny_model, train_args,
};
use support::*;

fn checker(lean: &str) -> Checker {
    let mut o = options(Backend::Lean, &format!("'{lean}' --json"));
    o.timeout = 20.0;
    Checker::new(&o).unwrap()
}

#[test]
fn every_prelude_hole_filled_with_its_cut_is_accepted() {
    let Some(lean) = real_lean("every_prelude_hole_filled_with_its_cut_is_accepted") else {
        return;
    };
    let theorems: Vec<_> = prelude().into_iter().map(|(t, _)| t).collect();
    let mut jobs = Vec::new();
    for ratio in [0.1, 0.5, 1.0] {
        let examples = holes::examples(&theorems, ratio, 11).unwrap();
        assert_eq!(
            examples.len(),
            theorems.len(),
            "every prelude record has a proof"
        );
        for example in examples {
            let original = example.proof.clone().unwrap();
            let completion = match &example.hole {
                Some(hole) => {
                    assert_eq!(hole.splice(&hole.cut), original);
                    format!("```lean\n{}\n```", hole.cut)
                }
                None => original,
            };
            jobs.push((ratio, Job::new(&example, completion)));
        }
    }
    let only: Vec<Job> = jobs.iter().map(|(_, j)| j.clone()).collect();
    let results = checker(&lean).check(&only, None).unwrap();
    for ((ratio, job), r) in jobs.iter().zip(&results) {
        assert_eq!(
            r.verdict.kind,
            VerdictKind::Accepted,
            "{} at {ratio}: {:?}",
            job.name,
            r.verdict
        );
        let original = prelude()
            .into_iter()
            .find(|(t, _)| t.name == job.name)
            .and_then(|(t, _)| t.proof)
            .unwrap();
        assert_eq!(r.proof.as_deref(), Some(original.as_str()), "{}", job.name);
    }
}

#[test]
fn a_completion_that_edits_the_suffix_is_rejected() {
    let Some(lean) = real_lean("a_completion_that_edits_the_suffix_is_rejected") else {
        return;
    };
    let (theorem, _) = prelude()
        .into_iter()
        .find(|(t, _)| {
            t.proof
                .as_deref()
                .is_some_and(|p| p.starts_with("MyEq.trans ("))
        })
        .unwrap();
    let hole = holes::holes(theorem.proof.as_deref().unwrap())
        .into_iter()
        .find(|h| h.cut.starts_with("(N.succ_add") && h.suffix.contains("MyEq.congrArg"))
        .unwrap();
    let example = theorem.with_hole(hole.clone());
    // The right fill, then the same with the suffix's last argument edited, the suffix
    // repeated, and the hole marker kept.
    let edited = format!("{}{}", hole.cut, hole.suffix.replacen("N.s", "N.z", 1));
    let repeated = format!("{}{}", hole.cut, hole.suffix);
    let completions = [hole.cut.clone(), edited, repeated, "<HOLE>".to_string()];
    let jobs: Vec<Job> = completions
        .iter()
        .map(|c| Job::new(&example, c.clone()))
        .collect();
    let results = checker(&lean).check(&jobs, None).unwrap();
    let kinds: Vec<VerdictKind> = results.iter().map(|r| r.verdict.kind).collect();
    assert_eq!(
        kinds,
        [
            VerdictKind::Accepted,
            VerdictKind::HoleMismatch,
            VerdictKind::HoleMismatch,
            VerdictKind::HoleMismatch
        ]
    );
    // Spliced as it is, the edited completion is a proof Lean would reject: the verdict is not
    // standing in for an acceptance.
    let spliced = hole.splice(&completions[1]);
    let whole = Job::new(&theorem, spliced);
    let r = checker(&lean).check(&[whole], None).unwrap();
    assert_ne!(r[0].verdict.kind, VerdictKind::Accepted);
}

// ---- the binary: train and eval ----

/// `train --task fim` with `config`, as the other end-to-end runs train.
fn fim_train(
    model: &Path,
    lean: &str,
    out: &Path,
    algorithm: &str,
    config: &Path,
    steps: usize,
) -> Command {
    let mut cmd = lean_grpo();
    cmd.args(train_args(model, lean, out, algorithm, steps))
        .args(["--task", "fim", "--config", config.to_str().unwrap()]);
    cmd
}

#[test]
fn fim_training_of_every_algorithm_writes_its_curriculum() {
    let Some(lean) = real_lean("fim_training_of_every_algorithm_writes_its_curriculum") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let config = tmp.path().join("fim.yaml");
    std::fs::write(
        &config,
        "train:\n  fim:\n    start_ratio: 0.4\n    end_ratio: 1.0\n",
    )
    .unwrap();
    for algorithm in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        let out = tmp.path().join(format!("run-{algorithm}"));
        let result = run(&mut fim_train(&model, &lean, &out, algorithm, &config, 2));
        assert!(result.status.success(), "{algorithm} failed");
        let metrics = json_lines(&out.join("metrics.jsonl"));
        let ratios: Vec<f64> = metrics
            .iter()
            .map(|m| m["mask_ratio"].as_f64().unwrap())
            .collect();
        assert_eq!(ratios, [0.4, 1.0], "{algorithm}: linear from start to end");
        let by_ratio = metrics[1]["pass_rate_by_ratio"].as_object().unwrap();
        let keys: Vec<&String> = by_ratio.keys().collect();
        assert_eq!(keys, ["0.400", "1.000"], "{algorithm}");
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("checkpoints/step-2/trainer_state.json")).unwrap(),
        )
        .unwrap();
        let curriculum = &state["curriculum"];
        assert_eq!(curriculum["ratio"], 1.0, "{algorithm}: {state}");
        assert_eq!(
            curriculum["by_ratio"]["0.400"]["completions"], metrics[0]["completions"],
            "{algorithm}: {state}"
        );
        let samples = json_lines(&out.join("samples.jsonl"));
        let first: Vec<&Value> = samples.iter().filter(|s| s["step"] == 1).collect();
        assert!(!first.is_empty());
        for s in &first {
            let hole = &s["hole"];
            assert!(
                hole["cut"].is_string(),
                "{algorithm}: step 1 has holes: {s}"
            );
            if let Some(proof) = s["proof"].as_str() {
                let prefix = hole["prefix"].as_str().unwrap();
                let suffix = hole["suffix"].as_str().unwrap();
                assert!(proof.starts_with(prefix) && proof.ends_with(suffix), "{s}");
            }
        }
        assert!(
            samples
                .iter()
                .filter(|s| s["step"] == 2)
                .all(|s| s.get("hole").is_none()),
            "{algorithm}: ratio 1 is the whole-proof task"
        );
    }
}

#[test]
fn an_adaptive_fim_run_resumed_reproduces_the_uninterrupted_one() {
    let Some(lean) = real_lean("an_adaptive_fim_run_resumed_reproduces_the_uninterrupted_one")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // A random model passes nothing, so thresholds below 0 make the ratio rise after every
    // step (window 1): the resumed run must restore a ratio that has moved.
    let config = tmp.path().join("adaptive.yaml");
    std::fs::write(
        &config,
        "train:\n  save_steps: 1\n  fim:\n    schedule: adaptive\n    start_ratio: 0.2\n    \
         end_ratio: 1.0\n    window: 1\n    raise_above: -1.0\n    lower_below: -2.0\n",
    )
    .unwrap();
    let whole = tmp.path().join("whole");
    assert!(
        run(&mut fim_train(&model, &lean, &whole, "grpo", &config, 4))
            .status
            .success()
    );
    // Killed after the step-2 checkpoint of the same 4-step run, then resumed from its
    // directory alone.
    let part = tmp.path().join("part");
    kill_after_checkpoint(
        &mut fim_train(&model, &lean, &part, "grpo", &config, 4),
        &part,
        2,
    );
    let resume = ["train", "--resume", part.to_str().unwrap()];
    assert!(run(lean_grpo().args(resume)).status.success());
    let a: Vec<Value> = json_lines(&whole.join("metrics.jsonl"))
        .into_iter()
        .map(reproducible)
        .collect();
    let b: Vec<Value> = json_lines(&part.join("metrics.jsonl"))
        .into_iter()
        .map(reproducible)
        .collect();
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
    let ratios: Vec<f64> = a
        .iter()
        .map(|m| m["mask_ratio"].as_f64().unwrap())
        .collect();
    assert_eq!(ratios, [0.2, 0.3, 0.4, 0.5]);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(part.join("checkpoints/step-4/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["curriculum"]["ratio"], 0.6, "{state}");
    assert_eq!(state["curriculum"]["by_ratio"]["0.300"]["completions"], 4);
}

#[test]
fn fim_eval_cuts_the_same_holes_every_run() {
    let Some(lean) = real_lean("fim_eval_cuts_the_same_holes_every_run") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let eval = |out: &Path| {
        let result = run(lean_grpo().args([
            "eval",
            "data/prelude.jsonl",
            "--split",
            "test",
            "--task",
            "fim",
            "--mask-ratio",
            "0.5",
            "--model",
            model.to_str().unwrap(),
            "-n",
            "1",
            "--max-completion-length",
            "3",
            "--lean-cmd",
            &format!("{lean} --json"),
            "--output",
            out.to_str().unwrap(),
        ]));
        assert!(result.status.success());
        std::fs::read_to_string(out.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<ProblemResult>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let first = eval(&tmp.path().join("a"));
    let again = eval(&tmp.path().join("b"));
    assert_eq!(first.len(), 16);
    for (p, q) in first.iter().zip(&again) {
        let hole = p
            .hole
            .as_ref()
            .expect("every test record gets a hole at 0.5");
        assert_eq!(Some(hole), q.hole.as_ref());
        assert!(p.prompt.contains(&hole.marked()), "{}", p.prompt);
    }
}
