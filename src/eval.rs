//! pass@k evaluation: sample n proofs per theorem from a local policy or an OpenAI-compatible
//! endpoint, check each with Lean, and report pass@k with the unbiased estimator.
//!
//! The output directory holds `results.jsonl` (per problem: the exact prompt sent, every sample,
//! its verdict) and `summary.json`; the table goes to stdout. pass@k can be recomputed from
//! `results.jsonl` alone.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, Task, DEFAULT_K};
use crate::data::fim::Hole;
use crate::data::{user_message, Theorem};
use crate::endpoint::{ChatRequest, EndpointClient, EndpointOptions};
use crate::lean::{holes, Checked, Checker, Evidence, Job, VerdictKind};
use crate::model::sampler::Sampler;
use crate::model::tokenizer::Tokenizer;
use crate::model::Policy;
use crate::passk::{self, PassAtKSummary, ProblemCounts};
use crate::rollout::{all_prompt_tokens, chat_request, prompt_text, rollout, SamplingSetup};

/// One sample of one problem, as written to `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSample {
    pub completion: String,
    pub proof: Option<String>,
    pub verdict: VerdictKind,
    pub accepted: bool,
    pub evidence: Evidence,
    pub truncated: bool,
    pub seconds: f64,
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProblemResult {
    pub name: String,
    /// The exact text the model was given: the chat-templated prompt for a local model, the
    /// user message for an endpoint (which applies its own template).
    pub prompt: String,
    pub samples: Vec<EvalSample>,
    pub accepted: usize,
    /// With `--task fim`: the hole the samples fill (its `cut` is the reference answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hole: Option<Hole>,
}

pub struct EvalReport {
    pub output_dir: PathBuf,
    pub summary: PassAtKSummary,
}

/// Samples `eval.num_samples` proofs per theorem from the local model, or from `eval.endpoint`
/// when one is set, checks them and writes the results.
pub fn evaluate(config: &Config, theorems: &[Theorem], show_progress: bool) -> Result<EvalReport> {
    let eval = &config.eval;
    if eval.num_samples == 0 {
        bail!("eval.num_samples (-n) must be at least 1");
    }
    let ks = k_values(eval.k.as_deref(), eval.num_samples)?;
    let examples;
    let theorems = match eval.task {
        Task::Proof => theorems,
        Task::Fim => {
            examples = holes::examples(theorems, eval.mask_ratio, eval.seed)?;
            if examples.is_empty() {
                bail!("--task fim needs records with a `proof`, and none of these has one");
            }
            &examples[..]
        }
    };
    let output_dir = eval.output_dir.clone().unwrap_or_else(default_output_dir);
    std::fs::create_dir_all(&output_dir).with_context(|| {
        format!(
            "cannot create the output directory {}",
            output_dir.display()
        )
    })?;
    // What produced the results (model, adapter, sampling, samples per problem): the pass-rate
    // filter records it beside its output, so a filtered set can be made again.
    crate::atomic::write_file(&output_dir.join("config.yaml"), config.to_yaml().as_bytes())?;
    let results_path = output_dir.join("results.jsonl");
    let mut results = BufWriter::new(
        File::create(&results_path)
            .with_context(|| format!("cannot write {}", results_path.display()))?,
    );
    let checker = Checker::new(&config.checker)?;
    let bar = crate::progress::bar(theorems.len(), 0, "theorem", show_progress);
    let mut counts = Vec::with_capacity(theorems.len());
    let mut write = |problem: ProblemResult| -> Result<()> {
        counts.push(ProblemCounts {
            name: problem.name.clone(),
            samples: problem.samples.len(),
            accepted: problem.accepted,
        });
        serde_json::to_writer(&mut results, &problem)?;
        results.write_all(b"\n")?;
        bar.inc(1);
        Ok(())
    };
    match &eval.endpoint {
        None => local(config, theorems, &checker, &mut write)?,
        Some(url) => {
            let served = eval.served_model.as_ref().unwrap_or(&config.model.model);
            let mut options = EndpointOptions::new(url.as_str(), served.as_str());
            options.api_key_env = eval.api_key_env.clone();
            options.concurrency = eval.concurrency.max(1);
            let client = EndpointClient::new(options)?;
            endpoint(config, theorems, &client, &checker, &mut write)?;
        }
    }
    bar.finish_and_clear();
    results.flush()?;
    let summary = passk::summarize(&counts, &ks);
    let summary_path = output_dir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    Ok(EvalReport {
        output_dir,
        summary,
    })
}

/// The k values to report for `n` samples: the explicit `--k` values (each must lie in 1..=n),
/// or those of [`DEFAULT_K`] that fit n, saying which were left out.
fn k_values(explicit: Option<&[usize]>, n: usize) -> Result<Vec<usize>> {
    if let Some(ks) = explicit {
        if let Some(&k) = ks.iter().find(|&&k| k == 0 || k > n) {
            return Err(ConfigError::new(
                "eval.k (--k)",
                format!("pass@{k} needs 1 <= k <= n, and n (-n / eval.num_samples) is {n}; lower --k or raise -n"),
            )
            .into());
        }
        return Ok(ks.to_vec());
    }
    let (fit, dropped): (Vec<usize>, Vec<usize>) = DEFAULT_K.iter().partition(|&&k| k <= n);
    if !dropped.is_empty() {
        let dropped: Vec<String> = dropped.iter().map(|k| format!("pass@{k}")).collect();
        tracing::info!(
            "reporting pass@k for k <= n = {n} only; {} left out (raise -n to get them)",
            dropped.join(", ")
        );
    }
    Ok(fit)
}

/// Theorems sampled per rollout, one generation batch of `CHUNK × n` rows: a batch that keeps
/// decoding efficient, small enough for a progress bar that moves.
const CHUNK: usize = 4;

fn local(
    config: &Config,
    theorems: &[Theorem],
    checker: &Checker,
    write: &mut dyn FnMut(ProblemResult) -> Result<()>,
) -> Result<()> {
    // `Policy::load` applies `model.adapter`; without one, sample the base model alone.
    let policy = Policy::load(&config.model, &config.lora, config.eval.seed)?;
    let tokenizer = Tokenizer::from_dir(policy.model_dir())?;
    let adapters = config.model.adapter.is_some();
    let prompts = all_prompt_tokens(&tokenizer, theorems)?;
    let setup = SamplingSetup::new(&policy, &tokenizer, checker, &config.sampling, adapters);
    let mut sampler = Sampler::new(&config.sampling, config.eval.seed);
    let ids: Vec<usize> = (0..theorems.len()).collect();
    for chunk in ids.chunks(CHUNK) {
        let (groups, _) = rollout(
            &setup,
            &mut sampler,
            theorems,
            &prompts,
            chunk,
            config.eval.num_samples,
        )?;
        for group in groups {
            let theorem = &theorems[group.theorem];
            let prompt = prompt_text(&tokenizer, theorem)?;
            let samples = group
                .completions
                .into_iter()
                .map(|c| sample_result(c.text, c.truncated, c.checked))
                .collect();
            write(problem(theorem, prompt, samples))?;
        }
    }
    Ok(())
}

fn endpoint(
    config: &Config,
    theorems: &[Theorem],
    client: &EndpointClient,
    checker: &Checker,
    write: &mut dyn FnMut(ProblemResult) -> Result<()>,
) -> Result<()> {
    let sampling = &config.sampling;
    for chunk in theorems.chunks(CHUNK * 4) {
        let requests: Vec<ChatRequest> = chunk
            .iter()
            .map(|t| chat_request(t, config.eval.num_samples, sampling, config.eval.seed))
            .collect();
        let answers = client.complete(&requests);
        for (theorem, answer) in chunk.iter().zip(answers) {
            let completion = answer
                .with_context(|| format!("sampling theorem {} from the endpoint", theorem.name))?;
            let jobs: Vec<Job> = completion
                .choices
                .iter()
                .map(|c| Job::new(theorem, c.text.clone()))
                .collect();
            let checked = checker.check(&jobs, None)?;
            let samples = completion
                .choices
                .into_iter()
                .zip(checked)
                .map(|(choice, checked)| {
                    let truncated = choice.truncated();
                    sample_result(choice.text, truncated, checked)
                })
                .collect();
            write(problem(theorem, user_message(theorem), samples))?;
        }
    }
    Ok(())
}

fn sample_result(completion: String, truncated: bool, checked: Checked) -> EvalSample {
    EvalSample {
        completion,
        proof: checked.proof,
        verdict: checked.verdict.kind,
        accepted: checked.verdict.is_accepted(),
        evidence: checked.verdict.evidence,
        truncated,
        seconds: checked.seconds,
    }
}

fn problem(theorem: &Theorem, prompt: String, samples: Vec<EvalSample>) -> ProblemResult {
    ProblemResult {
        name: theorem.name.clone(),
        prompt,
        accepted: samples.iter().filter(|s| s.accepted).count(),
        samples,
        hole: theorem.hole.clone(),
    }
}

fn default_output_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    PathBuf::from("evals").join(secs.to_string())
}
