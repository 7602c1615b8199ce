//! Running the `lean-grpo` binary on the committed tiny model: shared by the end-to-end tests.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The committed tiny Qwen2 with room for prelude prompts (its config allows 256 positions;
/// RoPE has no learned positions, so widening the limit changes no weight).
pub fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-qwen2");
    std::fs::create_dir_all(&model).unwrap();
    let src = Path::new(ROOT).join("tests/data/tiny-qwen2");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let config = model.join("config.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["max_position_embeddings"] = 4096.into();
    std::fs::write(&config, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    model
}

pub fn lean_grpo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lean-grpo"));
    cmd.current_dir(ROOT).arg("-q");
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("lean-grpo runs");
    if !out.status.success() {
        eprintln!(
            "lean-grpo failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Starts `cmd` (a `train` run writing `run_dir`) and SIGKILLs it once the checkpoint of
/// `step` is on disk: no handler runs and nothing is saved on the way out, as when a machine
/// dies or the OOM killer strikes.
pub fn kill_after_checkpoint(cmd: &mut Command, run_dir: &Path, step: usize) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = run_dir.join(format!("checkpoints/step-{step}/trainer_state.json"));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !state.exists() {
        assert!(Instant::now() < deadline, "no step-{step} checkpoint");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("training ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

pub fn json_lines(path: &Path) -> Vec<Value> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::BufReader::new(file)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

/// A metrics line without its timings (which differ between runs).
pub fn reproducible(mut metrics: Value) -> Value {
    let obj = metrics.as_object_mut().unwrap();
    obj.retain(|k, _| !k.ends_with("_seconds") && k != "tokens_per_second");
    metrics
}

/// A short `train` run of the tiny model on the prelude's train split, checked by `lean`.
pub fn train_args(
    model: &Path,
    lean: &str,
    out: &Path,
    algorithm: &str,
    steps: usize,
) -> Vec<String> {
    [
        "train",
        "data/prelude.jsonl",
        "--split",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--algorithm",
        algorithm,
        "--num-generations",
        "2",
        "--batch-size",
        "2",
        "--max-steps",
        &steps.to_string(),
        "--max-completion-length",
        "6",
        "--lean-cmd",
        &format!("{lean} --json"),
        "--jobs",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}
