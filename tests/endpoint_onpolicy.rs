//! On-policy endpoint rollouts (`train --endpoint-adapter-dir`), end to end: the binary trains
//! the tiny model with real Lean while a local server that speaks the vLLM API subset we use
//! (`/v1/chat/completions` with token log-probs and ids, `/v1/load_lora_adapter`,
//! `/v1/unload_lora_adapter`) really samples from the same tiny model with the adapter it was
//! told to load, through this crate's own policy.

mod endpoint_support;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use endpoint_support::{serve_routes, Reply, TestServer};
use lean_grpo::config::Config;
use lean_grpo::model::sampler::Sampler;
use lean_grpo::model::tokenizer::{ChatMessage, Tokenizer};
use lean_grpo::model::{GenerateOptions, LoraOptions, Policy, SamplingOptions};
use serde_json::{json, Value};
use support::binary::{json_lines, lean_grpo, run, tiny_model, train_args};
use support::real_lean;

/// What the server does with a load request, by the adapter's name.
type LoadRule = dyn Fn(&str) -> Option<Reply> + Send + Sync;

/// The vLLM stand-in's state: the tiny model, the adapters it has loaded, and what it saw.
struct PolicyServer {
    policy: Mutex<Policy>,
    tokenizer: Tokenizer,
    lora: LoraOptions,
    adapters: Mutex<HashMap<String, PathBuf>>,
    /// `Some(reply)` answers a load with it instead of loading (a refusal, a slow server).
    load_rule: Box<LoadRule>,
    /// Forget every adapter when this chat request (0-based) arrives: a restart.
    restart_at: Option<usize>,
    chats: Mutex<usize>,
    /// (route, adapter name) of every load and unload, in order.
    log: Mutex<Vec<(String, String)>>,
}

impl PolicyServer {
    fn start(
        model: &Path,
        load_rule: impl Fn(&str) -> Option<Reply> + Send + Sync + 'static,
        restart_at: Option<usize>,
    ) -> (TestServer, Arc<PolicyServer>) {
        let mut options = Config::default().model;
        options.model = model.to_str().unwrap().to_string();
        let lora = LoraOptions::default();
        let state = Arc::new(PolicyServer {
            policy: Mutex::new(Policy::load(&options, &lora, 0).unwrap()),
            tokenizer: Tokenizer::from_dir(model).unwrap(),
            lora,
            adapters: Mutex::new(HashMap::new()),
            load_rule: Box::new(load_rule),
            restart_at,
            chats: Mutex::new(0),
            log: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let server = serve_routes(move |_, path, body| shared.answer(path, body));
        (server, state)
    }

    fn answer(&self, path: &str, body: &Value) -> Reply {
        let name = body["lora_name"].as_str().unwrap_or_default().to_string();
        match path {
            "/v1/load_lora_adapter" => {
                self.log.lock().unwrap().push(("load".into(), name.clone()));
                if let Some(reply) = (self.load_rule)(&name) {
                    return reply;
                }
                let dir = PathBuf::from(body["lora_path"].as_str().unwrap());
                assert!(dir.is_absolute(), "the server is sent an absolute path");
                // vLLM reads the PEFT directory when it loads: it must be complete now.
                lean_grpo::model::adapter::load_adapter(&dir, &candle_core::Device::Cpu).unwrap();
                let copy = tempfile::tempdir().unwrap().keep();
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let file = entry.unwrap().path();
                    std::fs::copy(&file, copy.join(file.file_name().unwrap())).unwrap();
                }
                self.adapters.lock().unwrap().insert(name, copy);
                Reply::json(200, json!("Success: LoRA adapter loaded"))
            }
            "/v1/unload_lora_adapter" => {
                self.log
                    .lock()
                    .unwrap()
                    .push(("unload".into(), name.clone()));
                match self.adapters.lock().unwrap().remove(&name) {
                    Some(_) => Reply::json(200, json!("Success: LoRA adapter unloaded")),
                    None => not_found(&format!("The lora adapter '{name}' cannot be found.")),
                }
            }
            "/v1/chat/completions" => self.chat(body),
            _ => not_found("no such route"),
        }
    }

    fn chat(&self, body: &Value) -> Reply {
        let call = {
            let mut chats = self.chats.lock().unwrap();
            *chats += 1;
            *chats - 1
        };
        if Some(call) == self.restart_at {
            self.adapters.lock().unwrap().clear();
        }
        assert_eq!(
            body["logprobs"], true,
            "on-policy requests ask for log-probs"
        );
        assert_eq!(body["return_tokens_as_token_ids"], true);
        let model = body["model"].as_str().unwrap();
        let policy = self.policy.lock().unwrap();
        let adapters = model != "served";
        if adapters {
            let Some(dir) = self.adapters.lock().unwrap().get(model).cloned() else {
                return not_found(&format!("The model `{model}` does not exist."));
            };
            policy.read_adapter(&dir, &self.lora).unwrap();
        }
        let messages: Vec<ChatMessage> = serde_json::from_value(body["messages"].clone()).unwrap();
        let prompt = self.tokenizer.encode_chat(&messages).unwrap();
        let n = body["n"].as_u64().unwrap() as usize;
        let sampling = SamplingOptions {
            temperature: body["temperature"].as_f64().unwrap(),
            ..SamplingOptions::default()
        };
        let mut sampler = Sampler::new(&sampling, body["seed"].as_u64().unwrap_or(0));
        let options = GenerateOptions {
            max_new_tokens: body["max_tokens"].as_u64().unwrap() as usize,
            eos_ids: self.tokenizer.eos_ids().to_vec(),
            adapters,
        };
        let generations = policy
            .generate(
                std::slice::from_ref(&prompt),
                n,
                &options,
                &mut |rows| sampler.sample_rows(rows),
                &mut |_| false,
            )
            .unwrap();
        let completions: Vec<Vec<u32>> = generations.iter().map(|g| g.tokens.clone()).collect();
        // vLLM's default log-probs: the model's, before temperature.
        let logprobs = policy
            .logprobs(&vec![prompt; n], &completions, 1.0, false, adapters)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let choices: Vec<Value> = generations
            .iter()
            .zip(&logprobs)
            .enumerate()
            .map(|(i, (g, lp))| {
                let content: Vec<Value> = g
                    .tokens
                    .iter()
                    .zip(lp)
                    .map(|(id, l)| json!({"token": format!("token_id:{id}"), "logprob": l, "bytes": null, "top_logprobs": []}))
                    .collect();
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": self.tokenizer.decode(&g.tokens, true).unwrap()},
                    "logprobs": {"content": content},
                    "finish_reason": if g.finished_by_eos { "stop" } else { "length" },
                    "stop_reason": null,
                })
            })
            .collect();
        Reply::json(
            200,
            json!({"id": "chatcmpl-1", "object": "chat.completion", "model": model, "choices": choices}),
        )
    }

    fn log(&self) -> Vec<(String, String)> {
        self.log.lock().unwrap().clone()
    }
}

/// vLLM's error body.
fn not_found(message: &str) -> Reply {
    Reply::json(
        404,
        json!({"object": "error", "message": message, "type": "NotFoundError", "code": 404}),
    )
}

/// A warm-start adapter whose B matrices are random (a fresh one has B = 0 and equals the base
/// model), so the policy differs from the served model from step 1.
fn warm_adapter(model: &Path, dir: &Path) {
    let mut options = Config::default().model;
    options.model = model.to_str().unwrap().to_string();
    let lora = LoraOptions::default();
    let policy = Policy::load(&options, &lora, 7).unwrap();
    for (i, (_, _, b)) in policy.lora_vars().into_iter().enumerate() {
        let noise = candle_core::Tensor::randn(0f32, 0.05, b.shape(), b.device()).unwrap();
        b.set(&noise)
            .unwrap_or_else(|e| panic!("B of module {i}: {e}"));
    }
    policy.write_adapter(dir, &lora, &options.model).unwrap();
}

/// A `train` run through the server: GRPO, 2 theorems × 2 proofs, from a random warm-start
/// adapter. The tiny model's proofs all fail with the same length, so every advantage is 0; the
/// adapters still change every step through AdamW's decoupled weight decay (lr 0.05 × 2: A and
/// B shrink by 10% a step), which is what makes a stale adapter measurable.
fn train_through(
    server: &TestServer,
    lean: &str,
    tmp: &Path,
    steps: usize,
    extra: &[&str],
) -> (PathBuf, std::process::Output) {
    let model = tmp.join("tiny-qwen2");
    let out = tmp.join("run");
    let config = tmp.join("config.yaml");
    std::fs::write(
        &config,
        "train:\n  weight_decay: 2.0\n  sync_timeout_secs: 0.5\n",
    )
    .unwrap();
    let warm = tmp.join("warm-adapter");
    warm_adapter(&model, &warm);
    let mut args = train_args(&model, lean, &out, "grpo", steps);
    args.extend(
        [
            "--endpoint",
            &server.base,
            "--served-model",
            "served",
            "--endpoint-adapter-dir",
            tmp.join("adapters").to_str().unwrap(),
            "--adapter",
            warm.to_str().unwrap(),
            "--learning-rate",
            "0.05",
            "--config",
            config.to_str().unwrap(),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = run(lean_grpo()
        .args(&args)
        .env("LEAN_GRPO_LOG", "lean_grpo=warn"));
    (out, output)
}

/// Per step: (endpoint_current_share, endpoint_logprob_gap).
fn sync_metrics(run: &Path) -> Vec<(f64, f64)> {
    let metrics: Vec<(f64, f64)> = json_lines(&run.join("metrics.jsonl"))
        .iter()
        .map(|m| {
            assert_eq!(m["sampler"], "endpoint");
            (
                m["endpoint_current_share"].as_f64().unwrap(),
                m["endpoint_logprob_gap"].as_f64().unwrap(),
            )
        })
        .collect();
    eprintln!("(current share, log-prob gap) per step: {metrics:?}");
    metrics
}

/// Per step, the adapter versions its samples record.
fn sample_versions(run: &Path) -> Vec<Vec<Option<u64>>> {
    let mut by_step: Vec<Vec<Option<u64>>> = Vec::new();
    for s in json_lines(&run.join("samples.jsonl")) {
        let step = s["step"].as_u64().unwrap() as usize;
        if by_step.len() < step {
            by_step.resize(step, Vec::new());
        }
        by_step[step - 1].push(s["adapter_version"].as_u64());
    }
    by_step
}

fn names(log: &[(String, String)]) -> Vec<String> {
    log.iter()
        .map(|(route, name)| format!("{route} {}", name.rsplit('-').next().unwrap()))
        .collect()
}

#[test]
fn the_server_samples_with_the_policy_adapter_synced_every_step() {
    let Some(lean) = real_lean("the_server_samples_with_the_policy_adapter_synced_every_step")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (server, state) = PolicyServer::start(&model, |_| None, None);
    let (run_dir, output) = train_through(&server, &lean, tmp.path(), 3, &[]);
    assert!(output.status.success());

    // After each sync the server's log-probs of its samples equal the policy's.
    let metrics = sync_metrics(&run_dir);
    assert_eq!(metrics.len(), 3);
    for (step, (share, gap)) in metrics.iter().enumerate() {
        assert_eq!(
            *share,
            1.0,
            "step {}: every sample from the current adapter",
            step + 1
        );
        assert!(*gap < 1e-4, "step {}: gap {gap}", step + 1);
    }
    let versions = sample_versions(&run_dir);
    for (step, v) in versions.iter().enumerate() {
        assert!(
            v.iter().all(|v| *v == Some(step as u64)),
            "step {}: {v:?}",
            step + 1
        );
    }
    assert_eq!(
        names(&state.log()),
        [
            "load v0",
            "load v1",
            "unload v0",
            "load v2",
            "unload v1",
            "unload v2"
        ],
        "one load per step, the previous version unloaded, the last at the end"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("adapters"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "unloaded adapters are deleted: {left:?}");
}

#[test]
fn a_server_that_cannot_hot_load_warns_once_and_training_goes_on_off_policy() {
    let Some(lean) =
        real_lean("a_server_that_cannot_hot_load_warns_once_and_training_goes_on_off_policy")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let refuse = |_: &str| {
        Some(Reply::json(
            400,
            json!({"object": "error", "message": "LoRA is not enabled. Use --enable-lora to enable LoRA.", "type": "BadRequestError", "code": 400}),
        ))
    };
    let (server, state) = PolicyServer::start(&model, refuse, None);
    let (run_dir, output) = train_through(&server, &lean, tmp.path(), 3, &[]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("cannot hot-load LoRA adapters").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("LoRA is not enabled"), "{stderr}");
    assert!(stderr.contains("OFF-POLICY"), "{stderr}");
    assert_eq!(names(&state.log()), ["load v0"], "asked once, never again");

    let metrics = sync_metrics(&run_dir);
    assert_eq!(metrics.len(), 3);
    assert!(metrics.iter().all(|(share, _)| *share == 0.0));
    // The control of the test above: the policy is not the served model, and the gap shows it.
    let (_, gap) = metrics[2];
    assert!(
        gap > 1e-3,
        "off-policy gap at step 3: {gap}; {:?}",
        json_lines(&run_dir.join("metrics.jsonl"))
    );
    assert!(sample_versions(&run_dir)
        .iter()
        .flatten()
        .all(Option::is_none));
    assert!(run_dir.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn a_load_that_times_out_costs_one_sync() {
    let Some(lean) = real_lean("a_load_that_times_out_costs_one_sync") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Version 1 takes longer than sync_timeout_secs (0.5 s), on every attempt.
    let slow = |name: &str| {
        name.ends_with("-v1").then(|| Reply {
            delay: Duration::from_secs(2),
            ..Reply::json(200, json!("Success"))
        })
    };
    let (server, state) = PolicyServer::start(&model, slow, None);
    let (run_dir, output) = train_through(&server, &lean, tmp.path(), 3, &[]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("did not load adapter")
            && stderr.contains("this step samples from adapter"),
        "{stderr}"
    );
    assert_eq!(
        names(&state.log()),
        [
            "load v0",
            "load v1",
            "load v1",
            "load v2",
            "unload v0",
            "unload v2"
        ],
        "two attempts at v1, then v2 replaces v0"
    );
    let metrics = sync_metrics(&run_dir);
    assert_eq!(metrics[1].0, 0.0, "step 2 sampled from version 0");
    assert!(
        metrics[1].1 > 1e-3,
        "and that shows in the gap: {}",
        metrics[1].1
    );
    assert_eq!(metrics[2].0, 1.0);
    assert!(metrics[2].1 < 1e-4);
    let versions = sample_versions(&run_dir);
    assert!(versions[1].iter().all(|v| *v == Some(0)));
}

#[test]
fn a_restarted_server_gets_the_adapter_again() {
    let Some(lean) = real_lean("a_restarted_server_gets_the_adapter_again") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Step 1 sends two chat requests (two theorems); the server restarts before the third.
    let (server, state) = PolicyServer::start(&model, |_| None, Some(2));
    let (run_dir, output) = train_through(&server, &lean, tmp.path(), 3, &["--sync-steps", "2"]);
    assert!(output.status.success());
    assert_eq!(
        names(&state.log()),
        ["load v0", "load v0", "load v2", "unload v0", "unload v2"],
        "v0 loaded again after the restart; with --sync-steps 2 the next load is v2"
    );
    let metrics = sync_metrics(&run_dir);
    let shares: Vec<f64> = metrics.iter().map(|m| m.0).collect();
    assert_eq!(
        shares,
        [1.0, 0.0, 1.0],
        "step 2 samples from version 0 by design"
    );
    assert!(metrics[0].1 < 1e-4 && metrics[2].1 < 1e-4, "{metrics:?}");
    assert_eq!(sample_versions(&run_dir)[1], vec![Some(0); 4]);
}
