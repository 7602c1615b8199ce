//! `train`, `eval` and `plot` end to end: the binary, a tiny committed model, and real Lean on
//! `data/prelude.jsonl` (the real-Lean tier: `LEAN_GRPO_TEST_LEAN`, see scripts/test-lean.sh).

mod endpoint_support;
mod support;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use lean_grpo::config::Config;
use lean_grpo::eval::ProblemResult;
use lean_grpo::passk;
use serde_json::Value;
use support::binary::{
    json_lines, kill_after_checkpoint, lean_grpo, reproducible, run, tiny_model, train_args,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn real_lean() -> Option<String> {
    match std::env::var("LEAN_GRPO_TEST_LEAN") {
        Ok(path) if !path.is_empty() => Some(path),
        _ => {
            eprintln!("SKIP real-lean: LEAN_GRPO_TEST_LEAN unset (run scripts/test.sh)");
            None
        }
    }
}

#[test]
fn every_algorithm_trains_three_steps_and_writes_its_run_directory() {
    let Some(lean) = real_lean() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    for algorithm in ["grpo", "dapo", "drgrpo", "gspo", "dgpo"] {
        let out = tmp.path().join(format!("run-{algorithm}"));
        let result = run(lean_grpo().args(train_args(&model, &lean, &out, algorithm, 3)));
        assert!(result.status.success(), "{algorithm} failed");
        let config = Config::load(Some(&out.join("config.yaml")), &[], None).unwrap();
        assert_eq!(config.train.algorithm, algorithm);
        let metrics = json_lines(&out.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 3, "{algorithm}: one metrics line per step");
        for (i, m) in metrics.iter().enumerate() {
            assert_eq!(m["step"], i + 1);
            for key in [
                "reward_mean",
                "reward_std",
                "pass_rate",
                "verdicts",
                "clip_low_frac",
                "clip_high_frac",
                "completion_length_mean",
                "completion_length_max",
                "sampling_seconds",
                "checking_seconds",
                "training_seconds",
                "tokens_per_second",
                "zero_variance_fraction",
            ] {
                assert!(
                    m.get(key).is_some(),
                    "{algorithm}: metrics line lacks {key}"
                );
            }
            let counted: u64 = m["verdicts"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(counted, m["completions"].as_u64().unwrap());
            // The collapse diagnostics: reply shares that add up with the pass rate, and the
            // entropy the policy sampled at (a tiny random model is far from collapsed).
            let shares: f64 = [
                "share_no_proof",
                "share_screened",
                "share_lean_error",
                "pass_rate",
            ]
            .iter()
            .map(|k| m[*k].as_f64().unwrap())
            .sum();
            assert!(shares <= 1.0 + 1e-9, "{algorithm}: shares {shares}");
            let share_of = |kind: &str| {
                m["verdicts"][kind].as_u64().unwrap_or(0) as f64
                    / m["completions"].as_u64().unwrap() as f64
            };
            assert!((m["share_no_proof"].as_f64().unwrap() - share_of("no_proof")).abs() < 1e-12);
            let entropy = m["sampled_entropy"].as_f64().unwrap();
            assert!(
                entropy > 0.1 && entropy.is_finite(),
                "{algorithm}: {entropy}"
            );
            // Rows that cannot change the gradient were skipped, at most every trained row.
            assert!(m["rows_skipped"].as_u64().unwrap() <= m["completions"].as_u64().unwrap());
            // The drift from the base model: null when no row was computed, else ≥ 0, and 0 at
            // the first step, whose sampling policy is the base model (LoRA B = 0).
            let kl = &m["kl_to_start"];
            assert!(
                kl.is_null() || kl.as_f64().unwrap() >= 0.0,
                "{algorithm}: {kl}"
            );
            if i == 0 {
                assert!(
                    kl.is_null() || kl.as_f64().unwrap() < 1e-9,
                    "{algorithm}: {kl}"
                );
            }
        }
        let samples = json_lines(&out.join("samples.jsonl"));
        let sampled: u64 = metrics
            .iter()
            .map(|m| m["completions"].as_u64().unwrap())
            .sum();
        assert_eq!(
            samples.len() as u64,
            sampled,
            "{algorithm}: every completion is kept"
        );
        for s in &samples {
            assert!(
                s["theorem"].is_string() && s["verdict"].is_string() && s["reward"].is_number()
            );
        }
        // Each computed completion carries its own KL to the base model, per token; the step's
        // `kl_to_start` is their mean weighted by tokens, and a step without one has none.
        for m in &metrics {
            let step = m["step"].as_u64().unwrap();
            let (mut sum, mut tokens) = (0.0, 0.0);
            for s in samples.iter().filter(|s| s["step"].as_u64() == Some(step)) {
                if let Some(kl) = s["kl_to_start"].as_f64() {
                    let n = s["tokens"].as_f64().unwrap();
                    sum += kl * n;
                    tokens += n;
                }
            }
            match m["kl_to_start"].as_f64() {
                Some(kl) => assert!(
                    tokens > 0.0 && (sum / tokens - kl).abs() <= 1e-9 * kl.max(1e-9),
                    "{algorithm} step {step}: samples give {}, metrics {kl}",
                    sum / tokens
                ),
                None => assert_eq!(tokens, 0.0, "{algorithm} step {step}"),
            }
        }
        let last = out.join("checkpoints/step-3");
        for file in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(
                last.join(file).is_file(),
                "{algorithm}: checkpoint lacks {file}"
            );
        }
        let adapter: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(adapter["peft_type"], "LORA");
    }
}

#[test]
fn resume_from_the_run_directory_alone_reproduces_the_uninterrupted_run() {
    let Some(lean) = real_lean() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Rewards must differ within groups, or no step updates the adapters and the comparison is
    // between two untouched models. This random model writes bytes that Lean rejects at their
    // first token, so partial credit is 0 everywhere; a length penalty with a stop string that
    // random text often contains gives completions of 1 to 6 tokens, and so different rewards.
    let config = tmp.path().join("moving.yaml");
    std::fs::write(
        &config,
        "sampling:\n  stop: [\" \"]\ntrain:\n  length_penalty: 0.01\n  save_steps: 1\n  \
         learning_rate: 0.01\n",
    )
    .unwrap();
    let with_config = |out: &Path| {
        let mut args = train_args(&model, &lean, out, "grpo", 6);
        args.extend(["--config".into(), config.to_str().unwrap().into()]);
        args
    };
    let whole = tmp.path().join("whole");
    assert!(run(lean_grpo().args(with_config(&whole))).status.success());

    let killed = tmp.path().join("killed");
    kill_after_checkpoint(lean_grpo().args(with_config(&killed)), &killed, 3);
    assert!(
        lora_b_max_abs(&killed.join("checkpoints/step-3")) > 0.0,
        "the adapter the resumed run starts from has moved"
    );

    // The run directory alone: no theorem file, no model, no config, no flags.
    let resume = ["train", "--resume", killed.to_str().unwrap()];
    assert!(run(lean_grpo().args(resume)).status.success());

    let a = json_lines(&whole.join("metrics.jsonl"));
    let b = json_lines(&killed.join("metrics.jsonl"));
    let steps = |m: &[Value]| {
        m.iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&b), [1, 2, 3, 4, 5, 6], "every step logged once");
    assert!(
        a.iter()
            .all(|m| m["reward_std"].as_f64().unwrap() > 0.0
                && m["grad_norm"].as_f64().unwrap() > 0.0),
        "every step learns something: {a:?}"
    );
    for step in 0..6 {
        assert_eq!(
            reproducible(a[step].clone()),
            reproducible(b[step].clone()),
            "step {}",
            step + 1
        );
    }
    let adapter =
        |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        adapter(&whole),
        adapter(&killed),
        "the final adapters are bit-identical"
    );
}

#[test]
fn resume_refuses_another_configuration_or_theorem_file() {
    let Some(lean) = real_lean() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let theorems = tmp.path().join("theorems.jsonl");
    std::fs::copy(Path::new(ROOT).join("data/prelude.jsonl"), &theorems).unwrap();
    let out = tmp.path().join("run");
    let mut args = train_args(&model, &lean, &out, "grpo", 1);
    args[1] = theorems.to_str().unwrap().into();
    assert!(run(lean_grpo().args(&args)).status.success());
    let refusal = |extra: &[&str]| {
        let mut args = vec!["train", "--resume", out.to_str().unwrap()];
        args.extend(extra);
        let result = lean_grpo().args(&args).output().unwrap();
        assert!(!result.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&result.stderr).into_owned()
    };

    let stderr = refusal(&["--learning-rate", "0.5"]);
    assert!(
        stderr.contains("`train.learning_rate` is 0.00001 in the run and 0.5 here")
            && stderr.contains("--output NEW_DIR"),
        "{stderr}"
    );
    let other = tmp.path().join("other.yaml");
    std::fs::write(&other, "sampling:\n  temperature: 0.3\n").unwrap();
    let stderr = refusal(&["--config", other.to_str().unwrap()]);
    assert!(
        stderr.contains("`sampling.temperature` is 1.0 in the run and 0.3 here"),
        "{stderr}"
    );

    // The same file, named or not, continues the run; one byte more and it is refused.
    let same = [
        "train",
        theorems.to_str().unwrap(),
        "--resume",
        out.to_str().unwrap(),
    ];
    assert!(run(lean_grpo().args(same).args(["--max-steps", "2"]))
        .status
        .success());
    assert_eq!(json_lines(&out.join("metrics.jsonl")).len(), 2);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&theorems)
        .unwrap();
    writeln!(file).unwrap();
    let stderr = refusal(&["--max-steps", "3"]);
    assert!(
        stderr.contains(&format!(
            "{} is not the theorem file the run started on",
            theorems.display()
        )),
        "{stderr}"
    );

    // A new run into the same directory is refused too, pointing at --resume.
    let result = lean_grpo()
        .args(train_args(&model, &lean, &out, "grpo", 1))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("already holds a run; continue it with `--resume"),
        "{stderr}"
    );
}

#[test]
fn a_checkpoint_is_written_when_save_every_minutes_has_passed() {
    let Some(lean) = real_lean() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Three steps with only the given checkpoint rules; which step-N checkpoints exist after.
    let saved_after = |name: &str, rules: &str| {
        let config = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&config, format!("train:\n  save_total_limit: 10\n{rules}")).unwrap();
        let out = tmp.path().join(name);
        let mut args = train_args(&model, &lean, &out, "grpo", 3);
        args.extend(["--config".into(), config.to_str().unwrap().into()]);
        assert!(run(lean_grpo().args(&args)).status.success());
        (1..=3)
            .map(|n| {
                out.join(format!("checkpoints/step-{n}/trainer_state.json"))
                    .exists()
            })
            .collect::<Vec<bool>>()
    };
    // No step-based checkpoints; 6 ms is shorter than any step, so one follows every step.
    let timed = "  save_steps: 0\n  save_every_minutes: 0.0001\n";
    assert_eq!(saved_after("timed", timed), [true, true, true]);
    // With the time rule off, only the final checkpoint is written.
    let untimed = "  save_steps: 0\n  save_every_minutes: 0\n";
    assert_eq!(saved_after("untimed", untimed), [false, false, true]);
}

#[test]
fn malformed_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let base = |extra: &[&str]| {
        let mut cmd = lean_grpo();
        cmd.args([
            "train",
            "data/prelude.jsonl",
            "--max-steps",
            "1",
            "--lean-cmd",
            "true",
        ]);
        cmd.args(extra);
        cmd.output().unwrap()
    };
    // A model directory that does not exist.
    let out = base(&[
        "--model",
        "./no/such/model",
        "--output",
        tmp.path().join("a").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("./no/such/model") && stderr.contains("no such file or directory"),
        "{stderr}"
    );
    // A theorem file with a bad line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"name\": \"a\", \"statement\": \"theorem a : True :=\"}\n[1]\n",
    )
    .unwrap();
    let out = lean_grpo()
        .args([
            "train",
            bad.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.jsonl:2: expected a JSON object"),
        "{stderr}"
    );
    // An output directory that cannot be written.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let out = base(&[
        "--model",
        model.to_str().unwrap(),
        "--output",
        blocker.join("run").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot create the run directory"),
        "{stderr}"
    );
    // A model whose tokenizer has no chat template: the plain template is used, with a warning.
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, plain.join(path.file_name().unwrap())).unwrap();
    }
    let config_path = plain.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let tokenizer = lean_grpo::model::tokenizer::Tokenizer::from_dir(&plain).unwrap();
    assert!(!tokenizer.has_chat_template());
    let prompt = lean_grpo::rollout::prompt_tokens(
        &tokenizer,
        &lean_grpo::data::load_theorems(&Path::new(ROOT).join("data/prelude.jsonl"), None).unwrap()
            [0],
    )
    .unwrap();
    assert!(!prompt.is_empty());
}

/// An OpenAI-compatible server on loopback for `theorems`: the first request gets 429, then
/// each request is answered with `choices(theorem, n)` — (text, finish_reason) per choice — for
/// the theorem whose exact user message it carries; any other prompt gets 400.
fn fake_openai(
    theorems: &[lean_grpo::data::Theorem],
    choices: impl Fn(&lean_grpo::data::Theorem, usize) -> Vec<(String, &'static str)>
        + Send
        + Sync
        + 'static,
) -> endpoint_support::TestServer {
    use endpoint_support::{serve, Reply};
    let by_message: std::collections::HashMap<String, lean_grpo::data::Theorem> = theorems
        .iter()
        .map(|t| (lean_grpo::data::user_message(t), t.clone()))
        .collect();
    serve(move |call, body| {
        if call == 0 {
            return Reply::json(429, serde_json::json!({"error": {"message": "slow down"}}));
        }
        let message = body["messages"][0]["content"].as_str().unwrap_or_default();
        let Some(theorem) = by_message.get(message) else {
            return Reply::json(
                400,
                serde_json::json!({"error": {"message": "unknown prompt"}}),
            );
        };
        let n = body["n"].as_u64().unwrap_or(0) as usize;
        let choices: Vec<Value> = choices(theorem, n)
            .into_iter()
            .enumerate()
            .map(|(i, (text, finish))| {
                serde_json::json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
            })
            .collect();
        Reply::json(
            200,
            serde_json::json!({"id": "x", "object": "chat.completion", "choices": choices}),
        )
    })
}

/// `eval` of the prelude test split through the endpoint at `base`, `n` samples each, into `out`.
fn endpoint_eval_args(base: &str, lean: &str, n: usize, out: &Path) -> Vec<String> {
    let args = [
        "eval",
        "data/prelude.jsonl",
        "--split",
        "test",
        "--endpoint",
        base,
    ];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.extend([
        "--served-model".into(),
        "prover".into(),
        "-n".into(),
        n.to_string(),
    ]);
    args.extend(["--lean-cmd".into(), format!("{lean} --json")]);
    args.extend(["--output".into(), out.to_str().unwrap().into()]);
    args
}

/// The fenced reply a prover gives.
fn reply(proof: &str) -> String {
    format!("```lean\n{proof}\n```")
}

fn ends_in_even_digit(name: &str) -> bool {
    name.ends_with(|c: char| c.is_ascii_digit() && (c as u8 - b'0') % 2 == 0)
}

#[test]
fn eval_through_an_endpoint_writes_pass_at_k_that_recomputes() {
    let Some(lean) = real_lean() else { return };
    let theorems =
        lean_grpo::data::load_theorems(&Path::new(ROOT).join("data/prelude.jsonl"), Some("test"))
            .unwrap();
    // The real proof as the first choice for theorems whose name ends in an even digit.
    let server = fake_openai(&theorems, |theorem, n| {
        (0..n)
            .map(|i| {
                let good = i == 0 && ends_in_even_digit(&theorem.name);
                let text = if good {
                    reply(theorem.proof.as_deref().unwrap())
                } else {
                    "N.z".to_string()
                };
                (text, "stop")
            })
            .collect()
    });
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eval");
    let result = run(lean_grpo()
        .args(endpoint_eval_args(&server.base, &lean, 3, &out))
        .args(["--k", "1,3", "--jobs", "2"]));
    assert!(result.status.success());
    eprintln!("eval --endpoint: {:.1?}", start.elapsed());
    let requests = server.seen();
    assert_eq!(
        requests.len(),
        theorems.len() + 1,
        "one request per problem, and the refused one again"
    );
    assert!(requests[1..].iter().any(|r| r.body == requests[0].body));
    assert!(requests
        .iter()
        .all(|r| r.body["model"] == "prover" && r.body["n"] == 3));

    let problems: Vec<ProblemResult> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(problems.len(), theorems.len());
    let counts: Vec<passk::ProblemCounts> = problems
        .iter()
        .map(|p| {
            let theorem = theorems.iter().find(|t| t.name == p.name).unwrap();
            assert_eq!(
                p.prompt,
                lean_grpo::data::user_message(theorem),
                "the prompt sent is kept"
            );
            passk::ProblemCounts {
                name: p.name.clone(),
                samples: p.samples.len(),
                accepted: p.samples.iter().filter(|s| s.accepted).count(),
            }
        })
        .collect();
    let expected_solved = theorems
        .iter()
        .filter(|t| ends_in_even_digit(&t.name))
        .count();
    let solved = counts.iter().filter(|c| c.accepted > 0).count();
    assert_eq!(
        solved, expected_solved,
        "exactly the theorems given their real proof are solved"
    );
    assert!(solved > 0 && solved < theorems.len());
    let summary: passk::PassAtKSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let recomputed = passk::summarize(&counts, &[1, 3]);
    assert_eq!(summary.pass_at_k, recomputed.pass_at_k);
    let pass3 = recomputed.pass_at_k[&3].unwrap();
    assert!((pass3 - solved as f64 / theorems.len() as f64).abs() < 1e-12);
    // The table on stdout has a row per k with the same numbers.
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains(&format!("{solved} solved")), "{stdout}");
    for (k, value) in &recomputed.pass_at_k {
        let row = [k.to_string(), format!("{:.2}%", 100.0 * value.unwrap())];
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().eq(row.iter().map(String::as_str))),
            "no row {row:?} in\n{stdout}"
        );
    }
}

/// `filter` on the results of a real `eval` (real Lean, scripted replies): problems solved
/// 0 of 4, 2 of 4 and 4 of 4 times, by position; the default band keeps the middle ones only,
/// unchanged, and records the evaluation's configuration beside its output.
#[test]
fn filter_keeps_the_problems_an_eval_solved_sometimes() {
    let Some(lean) = real_lean() else { return };
    let theorems =
        lean_grpo::data::load_theorems(&Path::new(ROOT).join("data/prelude.jsonl"), Some("test"))
            .unwrap();
    let position: std::collections::HashMap<String, usize> = theorems
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let solved_of_4 = move |name: &str| [0, 2, 4][position[name] % 3];
    let server = fake_openai(&theorems, move |theorem, n| {
        let good = solved_of_4(&theorem.name);
        (0..n)
            .map(|i| match i < good {
                true => (reply(theorem.proof.as_deref().unwrap()), "stop"),
                false => ("N.z".to_string(), "stop"),
            })
            .collect()
    });
    let tmp = tempfile::tempdir().unwrap();
    let eval_dir = tmp.path().join("eval");
    let eval = endpoint_eval_args(&server.base, &lean, 4, &eval_dir);
    assert!(run(lean_grpo().args(eval).args(["--k", "1"]))
        .status
        .success());

    let out = tmp.path().join("filtered.jsonl");
    let filter = [
        "filter",
        "data/prelude.jsonl",
        "--split",
        "test",
        "--from",
        eval_dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let result = run(lean_grpo().args(filter));
    assert!(result.status.success());
    let kept: Vec<Value> = json_lines(&out);
    let expected: Vec<Value> = theorems
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 1)
        .map(|(_, t)| serde_json::to_value(t).unwrap())
        .collect();
    assert_eq!(
        kept, expected,
        "the sometimes-solved records, unchanged, in file order"
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    let (never, always) = (theorems.len().div_ceil(3), theorems.len() / 3);
    assert!(
        stdout.contains(&format!(
            "{} records read, {} kept (pass rate in [0.01, 0.99]), {never} below, {always} above",
            theorems.len(),
            expected.len()
        )),
        "{stdout}"
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("filtered.jsonl.filter.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["eval_config"]["eval"]["num_samples"], 4);
    assert_eq!(
        report["eval_config"]["eval"]["endpoint"],
        server.base.as_str()
    );
    let bins: Vec<(String, u64)> = report["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b[0].as_str().unwrap().to_string(), b[1].as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        bins,
        [
            ("0".to_string(), never as u64),
            ("(0.4, 0.5]".to_string(), expected.len() as u64),
            ("1".to_string(), always as u64)
        ]
    );

    // The whole band keeps every record; a directory that is no eval is named in the error.
    let all = tmp.path().join("all.jsonl");
    let mut whole = filter.to_vec();
    whole[7] = all.to_str().unwrap();
    whole.extend(["--min-pass-rate", "0", "--max-pass-rate", "1"]);
    assert!(run(lean_grpo().args(&whole)).status.success());
    assert_eq!(json_lines(&all).len(), theorems.len());
    let mut wrong = filter.to_vec();
    wrong[5] = tmp.path().to_str().unwrap();
    let result = lean_grpo().args(&wrong).output().unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("must be the output directory of `lean-grpo eval`"),
        "{stderr}"
    );
}

/// `eval -n 1` reports the default k values that fit n (pass@1) instead of failing on pass@8;
/// an explicit `--k` that does not fit is an input error naming the fix.
#[test]
fn eval_with_one_sample_reports_the_default_ks_that_fit() {
    let Some(lean) = real_lean() else { return };
    let theorems =
        lean_grpo::data::load_theorems(&Path::new(ROOT).join("data/prelude.jsonl"), Some("test"))
            .unwrap();
    let server = fake_openai(&theorems, |theorem, n| {
        (0..n)
            .map(|_| (reply(theorem.proof.as_deref().unwrap()), "stop"))
            .collect()
    });
    let tmp = tempfile::tempdir().unwrap();
    let eval = |out: &Path, extra: &[&str]| {
        let mut cmd = lean_grpo();
        cmd.args([
            "eval",
            "data/prelude.jsonl",
            "--split",
            "test",
            "--endpoint",
            &server.base,
            "--served-model",
            "prover",
            "-n",
            "1",
            "--lean-cmd",
            &format!("{lean} --json"),
            "--output",
            out.to_str().unwrap(),
        ])
        .args(extra);
        cmd.output().unwrap()
    };
    let out = tmp.path().join("one");
    let result = eval(&out, &[]);
    assert!(result.status.success(), "{result:?}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let ks: Vec<&String> = summary["pass_at_k"].as_object().unwrap().keys().collect();
    assert_eq!(ks, ["1"], "{summary}");
    assert_eq!(summary["pass_at_k"]["1"], 1.0);

    let result = eval(&tmp.path().join("bad"), &["--k", "1,4"]);
    assert_eq!(result.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("pass@4 needs 1 <= k <= n") && stderr.contains("lower --k or raise -n"),
        "{stderr}"
    );
}

#[test]
fn eval_with_a_local_model_and_plot_of_a_run() {
    let Some(lean) = real_lean() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("eval");
    let result = run(lean_grpo().args([
        "eval",
        "data/prelude.jsonl",
        "--split",
        "test",
        "--model",
        model.to_str().unwrap(),
        "-n",
        "2",
        "--k",
        "1,2",
        "--max-completion-length",
        "4",
        "--lean-cmd",
        &format!("{lean} --json"),
        "--output",
        out.to_str().unwrap(),
    ]));
    assert!(result.status.success());
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let problems: Vec<ProblemResult> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(problems.len(), 16);
    assert!(problems
        .iter()
        .all(|p| p.samples.len() == 2 && p.prompt.starts_with("<|im_start|>user\n")));

    let run_dir = tmp.path().join("run");
    assert!(
        run(lean_grpo().args(train_args(&model, &lean, &run_dir, "grpo", 2)))
            .status
            .success()
    );
    let png = tmp.path().join("reward.png");
    assert!(run(lean_grpo().args([
        "plot",
        run_dir.to_str().unwrap(),
        "--output",
        png.to_str().unwrap()
    ]))
    .status
    .success());
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert!(info.width > 100 && info.height > 100);
    let first = &buf[..3];
    assert!(
        buf.chunks(3).any(|px| px != first),
        "the plot is not a blank image"
    );
    let _ = std::io::stdout().flush();
}

/// The largest |value| in the LoRA B matrices of an adapter directory. B starts at zero, so this
/// is 0 exactly when training never moved the adapter.
fn lora_b_max_abs(adapter: &Path) -> f32 {
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let b: Vec<f32> = tensors
        .iter()
        .filter(|(name, _)| name.contains("lora_B"))
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    assert!(!b.is_empty(), "the adapter has no lora_B weights");
    b.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Whether the fake server gives theorem `name` its real proof (in the first choice).
fn served_proof(name: &str) -> bool {
    !name.starts_with("mul_")
}

/// A wrong proof, cut off.
const WRONG: &str = "```lean\nN.z";

#[test]
fn train_through_an_endpoint_learns_from_the_servers_proofs() {
    let Some(lean) = real_lean() else { return };
    let theorems =
        lean_grpo::data::load_theorems(&Path::new(ROOT).join("data/prelude.jsonl"), Some("train"))
            .unwrap();
    // For a theorem the server "knows", the first choice is its real proof, ended by EOS; every
    // other choice is a wrong proof cut off by max_tokens.
    let server = fake_openai(&theorems, |theorem, n| {
        (0..n)
            .map(|i| {
                if i == 0 && served_proof(&theorem.name) {
                    (reply(theorem.proof.as_deref().unwrap()), "stop")
                } else {
                    (WRONG.to_string(), "length")
                }
            })
            .collect()
    });
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    let mut args = train_args(&model, &lean, &out, "grpo", 2);
    let at = args
        .iter()
        .position(|a| a == "--max-completion-length")
        .unwrap();
    args[at + 1] = "128".into();
    args.extend(["--endpoint", &server.base, "--served-model", "prover"].map(String::from));
    let start = Instant::now();
    let result = run(lean_grpo().args(&args));
    assert!(result.status.success());
    eprintln!("train --endpoint: {:.1?}", start.elapsed());

    let config = Config::load(Some(&out.join("config.yaml")), &[], None).unwrap();
    assert_eq!(config.train.endpoint.as_deref(), Some(server.base.as_str()));
    assert_eq!(config.train.served_model.as_deref(), Some("prover"));

    // One refused request, then one per theorem per step (grpo does not resample).
    let seen = server.seen();
    assert_eq!(seen.len(), 1 + 2 * 2, "the 429 is retried once");
    assert!(
        seen[1..].iter().any(|r| r.body == seen[0].body),
        "the refused request is sent again"
    );
    let seeds: std::collections::BTreeSet<u64> = seen
        .iter()
        .map(|r| r.body["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds.len(), 4, "each theorem of each step has its own seed");
    for request in &seen {
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(request.body["model"], "prover");
        assert_eq!(request.body["n"], 2);
        assert_eq!(request.body["max_tokens"], 128);
        assert_eq!(request.body["messages"].as_array().unwrap().len(), 1);
        assert_eq!(request.body["messages"][0]["role"], "user");
    }

    let tokenizer = lean_grpo::model::tokenizer::Tokenizer::from_dir(&model).unwrap();
    let samples = json_lines(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 2 * 2 * 2);
    for s in &samples {
        let name = s["theorem"].as_str().unwrap();
        let text = s["completion"].as_str().unwrap();
        let is_proof = text != WRONG;
        assert!(
            !is_proof || (served_proof(name) && s["index"] == 0),
            "{name}: the server's completions are kept as sent"
        );
        let verdict = s["verdict"].as_str().unwrap();
        assert_eq!(s["accepted"], is_proof, "{name}: {text:?} is {verdict}");
        assert_eq!(s["reward"], if is_proof { 1.0 } else { 0.0 });
        assert_eq!(
            s["truncated"], !is_proof,
            "finish_reason length is truncation"
        );
        let ids = tokenizer.encode(text, false).unwrap().len();
        // A "stop" completion ends with the end-of-turn token, appended to the text's tokens.
        let expected = if is_proof { ids + 1 } else { ids };
        assert_eq!(
            s["tokens"], expected,
            "{name}: the policy's tokens of {text:?}"
        );
    }
    let metrics = json_lines(&out.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    assert!(metrics.iter().all(|m| m["sampler"] == "endpoint"));
    assert!(
        metrics
            .iter()
            .any(|m| m["reward_mean"].as_f64().unwrap() > 0.0
                && m["zero_variance_fraction"].as_f64().unwrap() < 1.0
                && m["optimizer_step"] == true),
        "some step learned from a proof that beat its sibling: {metrics:?}"
    );
    assert!(
        lora_b_max_abs(&out.join("adapter")) > 0.0,
        "the adapter moved away from its initial value"
    );
    // The policy starts as the base model and leaves it once it has learned.
    let kl: Vec<f64> = metrics
        .iter()
        .map(|m| m["kl_to_start"].as_f64().unwrap())
        .collect();
    assert!(kl[0] < 1e-9 && kl[1] > 1e-9, "kl_to_start per step: {kl:?}");
}

#[test]
fn train_endpoint_without_served_model_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    let result = lean_grpo()
        .args([
            "train",
            "data/prelude.jsonl",
            "--model",
            model.to_str().unwrap(),
            "--lean-cmd",
            "true",
            "--endpoint",
            "http://127.0.0.1:9",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("--endpoint (train.endpoint) needs --served-model NAME"),
        "{stderr}"
    );
    assert!(!out.exists(), "no run directory is left behind");
}

/// docs/algorithms.md §3.2: DAPO filters groups on the task reward. A server whose proofs all fail
/// (real Lean says so), some short, some long enough for the overlong penalty, gives groups whose
/// shaped rewards differ only by length: under the default `dynamic_sampling_metric: reward` no
/// group is kept, no optimizer step is taken and the adapter stays where it started; under
/// `shaped_reward` the same samples train the policy on length alone.
#[test]
fn dapo_takes_no_step_when_every_proof_fails_whatever_the_lengths() {
    let Some(lean) = real_lean() else { return };
    let theorems =
        lean_grpo::data::load_theorems(&Path::new(ROOT).join("data/prelude.jsonl"), Some("train"))
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let tokenizer = lean_grpo::model::tokenizer::Tokenizer::from_dir(&model).unwrap();
    // L = 64, C = ⌊64/5⌋ = 12: a reply of more than 52 tokens is penalised, a short one is not.
    let mut long = String::from("```lean\nN.z");
    while tokenizer.encode(&long, false).unwrap().len() < 58 {
        long.push_str(" N.z");
    }
    let short = String::from("```lean\nN.z");
    let server = fake_openai(&theorems, move |_, n| {
        (0..n)
            .map(|i| (if i % 2 == 0 { &short } else { &long }.clone(), "stop"))
            .collect()
    });
    let run_dapo = |metric: &str| {
        let out = tmp.path().join(metric);
        let mut args = train_args(&model, &lean, &out, "dapo", 1);
        let at = args
            .iter()
            .position(|a| a == "--max-completion-length")
            .unwrap();
        args[at + 1] = "64".into();
        args.extend(
            [
                "--endpoint",
                &server.base,
                "--served-model",
                "prover",
                "--algo-config",
                &format!(r#"{{"dynamic_sampling_metric": "{metric}"}}"#),
            ]
            .map(String::from),
        );
        assert!(run(lean_grpo().args(&args)).status.success());
        let samples = json_lines(&out.join("samples.jsonl"));
        assert!(samples.iter().all(|s| s["accepted"] == false));
        let lengths: std::collections::BTreeSet<u64> = samples
            .iter()
            .map(|s| s["tokens"].as_u64().unwrap())
            .collect();
        assert!(lengths.len() > 1 && lengths.iter().any(|&l| l > 52));
        let metrics = json_lines(&out.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 1);
        (metrics[0].clone(), lora_b_max_abs(&out.join("adapter")))
    };

    let (m, moved) = run_dapo("reward");
    assert_eq!(m["optimizer_step"], false, "{m}");
    assert!(
        m["sampled_entropy"].is_null(),
        "an endpoint reports no entropy: {m}"
    );
    assert_eq!(
        m["resample_rounds"], 3,
        "DAPO resampled before giving up: {m}"
    );
    let groups = m["completions"].as_u64().unwrap() / 2;
    assert_eq!(m["groups_dropped"], groups, "{m}");
    assert_eq!(m["groups_dropped_flat_reward"], groups, "{m}");
    assert_eq!(m["kept_groups_none_accepted"], 0, "{m}");
    assert_eq!(moved, 0.0, "no step was taken, so LoRA B is still zero");

    let (m, moved) = run_dapo("shaped_reward");
    assert_eq!(m["optimizer_step"], true, "{m}");
    assert_eq!(m["groups_dropped"], 0, "{m}");
    assert_eq!(m["kept_groups_none_accepted"], 2, "{m}");
    assert!(moved > 0.0, "the length-only groups moved the adapter");
}

/// A run whose model cannot be loaded leaves no run directory behind.
#[test]
fn a_failed_model_load_creates_no_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let missing = tmp.path().join("no-such-model");
    let result = lean_grpo()
        .args([
            "train",
            "data/prelude.jsonl",
            "--model",
            missing.to_str().unwrap(),
            "--lean-cmd",
            "true",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("no-such-model"), "{stderr}");
    assert!(!out.exists(), "{} was created", out.display());
}
