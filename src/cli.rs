//! Command-line types. Every flag that has a configuration key maps onto it in one place
//! (the `overrides` method of each argument group), so precedence is always defaults < file < flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Override;
use crate::lean::Backend;

#[derive(Debug, Parser)]
#[command(
    name = "lean-grpo",
    version,
    about = "Train language models to write Lean 4 proofs, with real Lean in the loop",
    long_about = "Train language models to write Lean 4 proofs by reinforcement learning with the \
Lean checker in the loop. A proof earns reward only when Lean accepts it: no error, no `sorry`, \
and `#print axioms` lists only the standard axioms.",
    after_help = "Examples:\n  lean-grpo train data/prelude.jsonl --algorithm dapo --model Qwen/Qwen2.5-0.5B-Instruct\n  \
lean-grpo eval data/minif2f.jsonl --split test -n 32 --k 1,8,32\n  \
lean-grpo check data/prelude.jsonl --lean-cmd \"lean --json\"\n  lean-grpo algorithms"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors; no progress bars.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train LoRA adapters by RL on a theorem file.
    #[command(
        long_about = "Train LoRA adapters by reinforcement learning. Each step samples \
`--num-generations` proofs for each of `--batch-size` theorems, checks every proof with Lean, \
turns verdicts into rewards and updates the adapters with the chosen algorithm. The run directory \
holds the effective config, per-step metrics, every sample with its verdict, and checkpoints.

With `--endpoint URL --served-model NAME` the proofs are sampled by an OpenAI-compatible server \
(vLLM, SGLang) instead of the local policy, which is much faster than sampling with candle on a \
CPU. Each completion's text is tokenized with the policy's tokenizer (plus the EOS token when the \
server stopped at one) and its log-probs are recomputed by the policy before the update; checking, \
rewards, the update and the run directory are those of a local run. The server does NOT see the \
LoRA updates unless `--endpoint-adapter-dir DIR` is given: it keeps serving the model it was \
started with, so the rollouts are off-policy. The update treats them as if the current policy had \
sampled them, which holds while the adapters stay close to the served model and less so as they \
drift; the rewards and pass rates in metrics.jsonl (which says `\"sampler\": \"endpoint\"`) \
measure the served model, not the adapters. With `--endpoint-adapter-dir DIR` (a directory the \
server can read) the policy's adapter is written there and hot-loaded into the server every \
`--sync-steps` steps (vLLM: start it with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; \
SGLang: --enable-lora), so the server samples from the policy being trained; each sample records \
the adapter version it came from, and metrics.jsonl logs `endpoint_current_share` and \
`endpoint_logprob_gap`, the mean |log π_server − log π_policy| of the sampled tokens. A server \
that cannot hot-load makes the run off-policy, with one warning. Serve the same base model with \
the same tokenizer as --model.",
        after_help = "Examples:\n  lean-grpo train data/prelude.jsonl --split train --algorithm dapo --model ./my-model\n  \
lean-grpo train data/minif2f.jsonl --split valid --config configs/grpo.yaml --algo-config '{\"beta\": 0.04}'\n  \
lean-grpo train --resume runs/dapo-20261122-101500\n  \
lean-grpo train data/minif2f.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --endpoint http://gpu-box:8000 --served-model Qwen/Qwen2.5-0.5B-Instruct --endpoint-adapter-dir /shared/adapters"
    )]
    Train(TrainArgs),
    /// Keep the theorems whose pass rate, measured by an `eval` run, lies in a band.
    #[command(
        long_about = "Keep the theorems whose pass rate, measured by an `eval` run (its \
`results.jsonl`), lies in [--min-pass-rate, --max-pass-rate]. A problem the model always or \
never solves gives groups of equal rewards, so zero advantages: sampling and checking it \
teaches nothing. The defaults keep what is solved sometimes. The kept records go to -o \
unchanged; OUT.filter.json beside it records the evaluation read (with its configuration), \
the band and the counts, and a histogram of pass rates is printed.",
        after_help = "Example:\n  lean-grpo eval data/prelude.jsonl --split train -n 8 --model M --adapter sft -o evals/sft-train\n  \
lean-grpo filter data/prelude.jsonl --split train --from evals/sft-train -o data/prelude-filtered.jsonl"
    )]
    Filter(FilterArgs),
    /// Convert a public Lean dataset (JSONL, JSON array or Parquet) to our theorem JSONL.
    #[command(
        long_about = "Convert a public Lean 4 theorem dataset to our theorem JSONL, validating \
every record: a statement cut to end with `:=` (placeholder `by`/`sorry` removed), imports and \
options moved to `header`, a known proof kept where the dataset has one. Records that cannot be \
converted are skipped with their file:line (or row) and reason; duplicate statements are \
dropped. The field names of each format are listed in docs/data.md.",
        after_help = "Examples:\n  lean-grpo prepare minif2f.jsonl --format deepseek-minif2f -o data/minif2f.jsonl\n  \
lean-grpo prepare train-00000-of-00001.parquet --format numina --split-ratio 0.05 --limit 2000 -o data/numina.jsonl"
    )]
    Prepare(PrepareArgs),
    /// Measure pass@k of a model (or an OpenAI-compatible endpoint) on a theorem file.
    #[command(
        long_about = "Measure pass@k: sample `-n` proofs per theorem from a local model (with an \
optional adapter) or from an OpenAI-compatible endpoint such as vLLM, check each with Lean, and \
report pass@k with the unbiased estimator 1 - C(n-c, k)/C(n, k). Writes the exact prompt, every \
sample and its verdict per problem, and a summary.",
        after_help = "Examples:\n  lean-grpo eval data/minif2f.jsonl --split test --model ./merged -n 32 --k 1,8,32\n  \
lean-grpo eval data/minif2f.jsonl --endpoint http://localhost:8000 --served-model prover --api-key-env VLLM_KEY"
    )]
    Eval(EvalArgs),
    /// Check proofs with Lean and report a verdict for each.
    #[command(
        long_about = "Check each record's `proof` (or, with `--completions`, model completions) \
with Lean and print a verdict per proof. Writes one JSON line per proof to `--output`, prints \
`N accepted, M rejected` with counts per kind, and exits with 1 if any proof was rejected.",
        after_help = "Examples:\n  lean-grpo check data/prelude.jsonl --lean-cmd \"/opt/lean/bin/lean --json\"\n  \
lean-grpo check data/minif2f.jsonl --completions samples.jsonl --output verdicts.jsonl --jobs 8\n  \
lean-grpo check --explain-screening"
    )]
    Check(CheckArgs),
    /// List the policy-optimisation algorithms and their defaults.
    #[command(
        long_about = "List the algorithms `--algorithm` accepts (GRPO, DAPO, Dr. GRPO, GSPO, DGPO): \
what each is, its advantage, importance ratio, clipping, loss reduction, and the defaults that \
differ from GRPO. Any key can be overridden with `--algo-config`.",
        after_help = "Examples:\n  lean-grpo algorithms\n  lean-grpo algorithms --json | jq '.[].name'"
    )]
    Algorithms(AlgorithmsArgs),
    /// Write merged full weights (base + LoRA adapter) in Hugging Face layout.
    #[command(
        long_about = "Merge a PEFT LoRA adapter into its base model and write full weights in \
Hugging Face layout (safetensors, config and tokenizer files), for servers that do not load \
adapters. The adapter itself (`adapter/` of a run) already loads in PEFT, transformers and vLLM.",
        after_help = "Examples:\n  lean-grpo export --merge --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/dapo-1/adapter --output merged/"
    )]
    Export(ExportArgs),
    /// Plot reward mean and pass rate per step of a training run (PNG).
    #[command(
        long_about = "Draw the reward mean and pass rate of every step of a run (from its \
`metrics.jsonl`) into a PNG, so a run can be looked at instead of read.",
        after_help = "Examples:\n  lean-grpo plot runs/dapo-1\n  lean-grpo plot runs/dapo-1 --output reward.png"
    )]
    Plot(PlotArgs),
    // ---- learning experiments (SFT warm-up, from-scratch models) ----
    /// Supervised warm-up of LoRA adapters on records that carry a proof.
    #[command(
        long_about = "Fine-tune LoRA adapters on the known proofs of a theorem file: the prompt is \
exactly the one `train` and `eval` use, the target is the proof in a ```lean block followed by the \
end-of-turn token, and the loss is the mean token negative log-likelihood. Writes a PEFT adapter \
that `train --adapter DIR` starts RL from (\"SFT + RL\") and `eval --adapter DIR` measures.",
        after_help = "Examples:\n  lean-grpo sft data/prelude.jsonl --split train --model ./tiny --output sft-adapter\n  \
lean-grpo sft data/prelude.jsonl --split train --limit 16 --epochs 2 --learning-rate 3e-3 --model ./tiny -o warm\n  \
lean-grpo train data/prelude.jsonl --split train --model ./tiny --adapter warm --algorithm dapo"
    )]
    Sft(SftArgs),
    /// Build a tiny random Qwen2 model (tokenizer trained on a theorem file) for experiments.
    #[command(
        long_about = "Write a randomly initialised Qwen2 model in Hugging Face layout: a byte-level \
BPE tokenizer trained on the prompts and proofs of a theorem file (special tokens <|endoftext|>, \
<|im_start|>, <|im_end|>; ChatML chat template), config.json, generation_config.json and seeded f32 \
weights in model.safetensors. The same corpus and seed give the same model. For from-scratch \
experiments on CPU: does an algorithm learn at all, in minutes, with no download?",
        after_help = "Examples:\n  lean-grpo init-model --corpus data/prelude.jsonl --output tiny\n  \
lean-grpo init-model --corpus data/prelude.jsonl --output tiny --hidden 128 --layers 4 --vocab 2048 --seed 7"
    )]
    InitModel(InitModelArgs),
    /// Measure checker, sampling and training speed on this machine; print a JSON summary.
    #[command(
        long_about = "Measure how fast each stage of a training step runs here and print one JSON \
object: checker proofs/s at one job and at one job per core (against a bare loop of the same Lean \
command), sampling tokens/s at batch 1 and 8, one training step (the trainer's update of a group \
of 4 completions: forward with gradient through the LoRA adapters, GRPO loss, backward, AdamW \
step; timed after one untimed step, as every step of a run but its first), and the loss + \
backward of each algorithm, with the date, the machine and the settings. The default (full) \
mode uses a Qwen2.5-0.5B-shaped random model and every proof of the file; `--reduced` runs the \
same code on small shapes and 12 proofs in well under a minute. Without `--lean-cmd` the \
checker section is reported as skipped. Progress goes to stderr.",
        after_help = "Examples:\n  lean-grpo bench --lean-cmd \"$(scripts/test-lean.sh) --json\" --output bench.json\n  \
lean-grpo bench data/prelude.jsonl --reduced --lean-cmd \"lean --json\"\n  \
lean-grpo bench --reduced | jq .figures.sampling"
    )]
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Merge the adapter into the base weights (the only export there is).
    #[arg(long, required = true)]
    pub merge: bool,
    /// Base model: hub id or local directory in HF layout.
    #[arg(long, value_name = "ID_OR_DIR")]
    pub model: String,
    /// PEFT adapter directory.
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Directory to write the merged model to.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A run directory (holding metrics.jsonl).
    pub run_dir: PathBuf,
    /// PNG to write (default RUN_DIR/reward.png).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `--config`, `--print-config` and the model/sampling flags shared by `train` and `eval`.
#[derive(Debug, Args, Default)]
pub struct ConfigArgs {
    /// Configuration file (YAML or JSON, by extension); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Where the policy comes from.
#[derive(Debug, Args, Default)]
pub struct ModelArgs {
    /// Hugging Face hub id or local directory in HF layout.
    #[arg(long, value_name = "ID_OR_DIR")]
    pub model: Option<String>,
    /// PEFT adapter directory to start from.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// f32, bf16 or f16 (default f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Sample from a merged copy of the weights in this dtype: the model's, or f16 for an f32
    /// model on the CPU (about 1.4x faster decoding there). Default: through the adapters.
    #[arg(long, value_name = "DTYPE")]
    pub sample_dtype: Option<String>,
    /// The frozen base of the linear layers (and of an embedding table not tied to the head):
    /// none (dequantized, exact), keep (a GGUF's quantized tensors stay quantized, QLoRA-style)
    /// or q8_0 / q4_k (quantized at load).
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<String>,
}

impl ModelArgs {
    fn overrides(&self, out: &mut Vec<Override>) {
        push(out, "model", "model", &self.model);
        push(out, "model", "adapter", &self.adapter);
        push(out, "model", "device", &self.device);
        push(out, "model", "dtype", &self.dtype);
        push(out, "model", "sample_dtype", &self.sample_dtype);
        push(out, "model", "quantize", &self.quantize);
    }
}

/// How Lean is run; shared by `check`, `train` and `eval`.
#[derive(Debug, Args, Default)]
pub struct CheckerArgs {
    /// lean (one process per proof), repl (persistent workers) or kimina (HTTP).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Wall-clock limit per proof, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Proofs checked in parallel (default: one per core).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Command that checks one file, the path appended (default `lake env lean --json`).
    #[arg(long, value_name = "CMD")]
    pub lean_cmd: Option<String>,
    /// The Lake project Lean runs in (default `lean_env`).
    #[arg(long, value_name = "DIR")]
    pub project: Option<PathBuf>,
    /// kimina-lean-server URL (with `--backend kimina`); repeat it or give a comma list for
    /// several servers, which share the proofs and stand in for each other.
    #[arg(long, value_name = "URL")]
    pub kimina_url: Vec<String>,
}

impl CheckerArgs {
    fn overrides(&self, out: &mut Vec<Override>) {
        push(out, "checker", "backend", &self.backend);
        push(out, "checker", "timeout", &self.timeout);
        push(out, "checker", "jobs", &self.jobs);
        push(out, "checker", "lean_cmd", &self.lean_cmd);
        push(out, "checker", "project", &self.project);
        if !self.kimina_url.is_empty() {
            push(out, "checker", "kimina_url", &Some(&self.kimina_url));
        }
    }
}

/// How completions are sampled, for `train` and `eval`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// New tokens per completion, at most.
    #[arg(long)]
    pub max_completion_length: Option<usize>,
}

impl SamplingArgs {
    fn overrides(&self, out: &mut Vec<Override>) {
        push(out, "sampling", "temperature", &self.temperature);
        let max = &self.max_completion_length;
        push(out, "sampling", "max_completion_length", max);
    }
}

/// An OpenAI-compatible server to sample from, for `train` and `eval`.
#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// Sample proofs from this OpenAI-compatible server instead of the local model. In `train`
    /// the server does not see the LoRA updates, so rollouts are off-policy (see above).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Model name the endpoint serves (`train`: required; `eval`: default `--model`).
    #[arg(long, value_name = "NAME", requires = "endpoint")]
    pub served_model: Option<String>,
    /// Environment variable holding the endpoint's API key.
    #[arg(long, value_name = "VAR", requires = "endpoint")]
    pub api_key_env: Option<String>,
}

impl EndpointArgs {
    /// The keys of `section` (`train` or `eval`) these flags set.
    fn overrides(&self, section: &'static str, out: &mut Vec<Override>) {
        push(out, section, "endpoint", &self.endpoint);
        push(out, section, "served_model", &self.served_model);
        push(out, section, "api_key_env", &self.api_key_env);
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Theorem file (JSONL, one record per line); with `--resume`, the run's own by default.
    #[arg(required_unless_present = "resume")]
    pub theorems: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub checker: CheckerArgs,
    /// grpo, dapo, drgrpo, gspo or dgpo.
    #[arg(long)]
    pub algorithm: Option<String>,
    /// JSON object overriding keys of the algorithm's preset, e.g. '{"beta": 0.04}'.
    #[arg(long, value_name = "JSON")]
    pub algo_config: Option<String>,
    /// Completions per theorem (G).
    #[arg(long)]
    pub num_generations: Option<usize>,
    /// Theorems per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Keep every layer's activations for the backward instead of recomputing them
    /// (`train.gradient_checkpointing: false`): about one forward faster per update, in up to
    /// ten times the memory.
    #[arg(long)]
    pub no_gradient_checkpointing: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train only on records of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// Run directory.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Continue a run from its latest checkpoint, with the run's configuration and theorem
    /// file; only --max-steps and the --endpoint settings may change.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// On-policy endpoint rollouts: write the policy's adapter into DIR, which the server must
    /// be able to read, and hot-load it into the server (see above).
    #[arg(long, value_name = "DIR", requires = "endpoint")]
    pub endpoint_adapter_dir: Option<PathBuf>,
    /// With --endpoint-adapter-dir: load a new adapter every N steps (default 1).
    #[arg(long, value_name = "N", requires = "endpoint_adapter_dir")]
    pub sync_steps: Option<usize>,
    /// `proof` (whole proofs) or `fim` (fill holes in the records' proofs, with the mask-ratio
    /// curriculum of the `train.fim` config section).
    #[arg(long, value_name = "proof|fim")]
    pub task: Option<String>,
}

impl TrainArgs {
    /// The flags that set configuration keys.
    pub fn overrides(&self) -> Vec<Override> {
        let mut out = Vec::new();
        self.model.overrides(&mut out);
        self.checker.overrides(&mut out);
        push(&mut out, "train", "algorithm", &self.algorithm);
        push(&mut out, "train", "num_generations", &self.num_generations);
        push(&mut out, "train", "batch_size", &self.batch_size);
        push(&mut out, "train", "max_steps", &self.max_steps);
        push(&mut out, "train", "num_train_epochs", &self.epochs);
        push(&mut out, "train", "learning_rate", &self.learning_rate);
        push(&mut out, "lora", "r", &self.lora_rank);
        let checkpointing = self.no_gradient_checkpointing.then_some(false);
        push(&mut out, "train", "gradient_checkpointing", &checkpointing);
        self.sampling.overrides(&mut out);
        push(&mut out, "train", "seed", &self.seed);
        push(&mut out, "train", "split", &self.split);
        push(&mut out, "train", "output_dir", &self.output);
        push(&mut out, "train", "task", &self.task);
        self.endpoint.overrides("train", &mut out);
        let adapter_dir = &self.endpoint_adapter_dir;
        push(&mut out, "train", "endpoint_adapter_dir", adapter_dir);
        push(&mut out, "train", "sync_steps", &self.sync_steps);
        out
    }
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The dataset file: .jsonl, .json (an array of records) or .parquet.
    pub input: PathBuf,
    /// The dataset's layout.
    #[arg(long, value_enum)]
    pub format: crate::data::prepare::Format,
    /// Where to write the theorem JSONL.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Give every record a split: `test` for about this share, `train` for the rest (the same
    /// record gets the same split for the same --seed, whatever the file's order).
    #[arg(long, value_name = "SHARE")]
    pub split_ratio: Option<f64>,
    /// Keep this many records, drawn by --seed.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Theorem file (JSONL) the evaluation ran on.
    pub theorems: PathBuf,
    /// The output directory of a `lean-grpo eval` run on these theorems.
    #[arg(long, value_name = "EVAL_DIR")]
    pub from: PathBuf,
    /// Keep records of this split only.
    #[arg(long)]
    pub split: Option<String>,
    /// Lowest pass rate kept (inclusive); the default drops problems never solved.
    #[arg(long, default_value_t = 0.01, value_name = "RATE")]
    pub min_pass_rate: f64,
    /// Highest pass rate kept (inclusive); the default drops problems always solved.
    #[arg(long, default_value_t = 0.99, value_name = "RATE")]
    pub max_pass_rate: f64,
    /// Where to write the kept records (JSONL).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Theorem file (JSONL).
    pub theorems: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub checker: CheckerArgs,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// Samples per problem.
    #[arg(short = 'n', long = "num-samples", value_name = "SAMPLES")]
    pub num_samples: Option<usize>,
    /// k values of pass@k, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "K,K,...")]
    pub k: Option<Vec<usize>>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Evaluate only records of this split.
    #[arg(long)]
    pub split: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory for per-problem results and the summary.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// `proof` (whole proofs) or `fim` (fill holes cut at --mask-ratio in the records' proofs,
    /// the same holes for the same --seed).
    #[arg(long, value_name = "proof|fim")]
    pub task: Option<String>,
    /// The hole's share of the proof's tokens with `--task fim` (1.0 = the whole proof).
    #[arg(long, value_name = "R")]
    pub mask_ratio: Option<f64>,
}

impl EvalArgs {
    pub fn overrides(&self) -> Vec<Override> {
        let mut out = Vec::new();
        self.model.overrides(&mut out);
        self.checker.overrides(&mut out);
        push(&mut out, "eval", "num_samples", &self.num_samples);
        push(&mut out, "eval", "k", &self.k);
        self.sampling.overrides(&mut out);
        self.endpoint.overrides("eval", &mut out);
        push(&mut out, "eval", "split", &self.split);
        push(&mut out, "eval", "seed", &self.seed);
        push(&mut out, "eval", "output_dir", &self.output);
        push(&mut out, "eval", "task", &self.task);
        push(&mut out, "eval", "mask_ratio", &self.mask_ratio);
        out
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Theorem file (JSONL); each record's `proof` is checked unless `--completions` is given.
    #[arg(required_unless_present = "explain_screening")]
    pub theorems: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub checker: CheckerArgs,
    /// JSONL of {"name", "completion"}: model completions to check against the theorems.
    #[arg(long, value_name = "FILE")]
    pub completions: Option<PathBuf>,
    /// Write one JSON line per proof here.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Check only records of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// Print what screening rejects before Lean runs, and exit.
    #[arg(long)]
    pub explain_screening: bool,
}

impl CheckArgs {
    pub fn overrides(&self) -> Vec<Override> {
        let mut out = Vec::new();
        self.checker.overrides(&mut out);
        out
    }
}

#[derive(Debug, Args)]
pub struct AlgorithmsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn push<T: serde::Serialize>(
    out: &mut Vec<Override>,
    section: &'static str,
    key: &'static str,
    value: &Option<T>,
) {
    if let Some(value) = value {
        out.push(Override::new(section, key, value));
    }
}

// ---- learning experiments: `sft` and `init-model` ----

#[derive(Debug, Args)]
pub struct SftArgs {
    /// Theorem file (JSONL); records without a `proof` are skipped.
    pub theorems: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Learn only from records of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// Learn only from the first N records with a proof.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Passes over the examples.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub learning_rate: f64,
    /// Seeds the adapters' initialisation and the example order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory to write the PEFT adapter to.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
    /// Keep every layer's activations for the backward instead of recomputing them.
    #[arg(long)]
    pub no_gradient_checkpointing: bool,
}

impl SftArgs {
    /// The flags that set configuration keys (model, adapter rank, checkpointing).
    pub fn overrides(&self) -> Vec<Override> {
        let mut out = Vec::new();
        self.model.overrides(&mut out);
        push(&mut out, "lora", "r", &self.lora_rank);
        let checkpointing = self.no_gradient_checkpointing.then_some(false);
        push(&mut out, "train", "gradient_checkpointing", &checkpointing);
        out
    }
}

#[derive(Debug, Args)]
pub struct InitModelArgs {
    /// Theorem file (JSONL) whose prompts and proofs train the tokenizer.
    #[arg(long, value_name = "FILE")]
    pub corpus: PathBuf,
    /// Directory to write the model to.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
    /// Hidden size (split into --heads heads of even size).
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// MLP size (default 2 × hidden).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Target tokenizer vocabulary (a small corpus may give fewer tokens).
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_position_embeddings: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Theorem file whose `proof`s the checker figures are measured on.
    #[arg(default_value = "data/prelude.jsonl")]
    pub theorems: PathBuf,
    /// Command that checks one file, the path appended (as in `check`); without it the
    /// checker section is skipped.
    #[arg(long, value_name = "CMD")]
    pub lean_cmd: Option<String>,
    /// Small shapes, 12 proofs, one round: for CI, under a minute.
    #[arg(long)]
    pub reduced: bool,
    /// Also measure a Qwen2.5-7B-shaped model with a Q4_K base: memory of sampling and of one
    /// checkpointed training step (a peak of about 13 GB; many minutes on a laptop CPU).
    #[arg(long)]
    pub large: bool,
    /// Also write the JSON summary here.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}
