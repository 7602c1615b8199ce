//! The run directory: `config.yaml`, `metrics.jsonl`, `samples.jsonl`, `checkpoints/step-N/`
//! and the final `adapter/`.
//!
//! Checkpoints are written under a temporary name and renamed into place, so a crash leaves
//! either the whole checkpoint or none of it; `--resume` takes the newest complete one and
//! drops the metric and sample lines written after it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cursor::Cursor;
use super::metrics::{StepMetrics, TrainSample};
use crate::atomic;
use crate::config::Config;
use crate::model::sampler::SamplerState;

/// What a checkpoint stores besides the adapter and the optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    pub cursor: Cursor,
    /// The sampling RNG, so the resumed run draws the same tokens.
    pub sampler: SamplerState,
}

impl TrainerState {
    /// The state of a run before its first step.
    pub fn start(sampler: SamplerState) -> TrainerState {
        TrainerState {
            step: 0,
            cursor: Cursor::start(),
            sampler,
        }
    }
}

pub struct RunDir {
    root: PathBuf,
    metrics: File,
    samples: File,
}

const CONFIG: &str = "config.yaml";
const CHECKPOINTS: &str = "checkpoints";

impl RunDir {
    /// Fails when `root` cannot take a new run (it holds one already); creates nothing.
    pub fn ensure_new(root: &Path) -> Result<()> {
        if root.join(CONFIG).exists() {
            bail!(
                "{} already holds a run; continue it with `--resume {}` or choose another \
                 `--output`",
                root.display(),
                root.display()
            );
        }
        Ok(())
    }

    /// Starts a new run in `root`, which must not hold a run already.
    pub fn create(root: &Path, config: &Config) -> Result<RunDir> {
        Self::ensure_new(root)?;
        fs::create_dir_all(root.join(CHECKPOINTS))
            .with_context(|| format!("cannot create the run directory {}", root.display()))?;
        atomic::write_file(&root.join(CONFIG), config.to_yaml().as_bytes())?;
        Self::open(root)
    }

    /// Reopens the run in `root` for `--resume`: the configuration must be the one it was
    /// started with. Only `train.max_steps` and `train.output_dir` may change, and, in a run that
    /// samples from an endpoint, where that endpoint is (a server restarted elsewhere, or on a
    /// newer checkpoint).
    pub fn resume(root: &Path, config: &Config) -> Result<(RunDir, Option<PathBuf>)> {
        let saved_path = root.join(CONFIG);
        let saved = Config::load(Some(&saved_path), &[], None)
            .with_context(|| format!("{} is not a run directory to resume", root.display()))?;
        let differences = differing_keys(&saved, config);
        if !differences.is_empty() {
            bail!(
                "cannot resume {}: the configuration differs from the one the run started with \
                 in {}; resume with the same flags and config file (only --max-steps and the \
                 --endpoint settings of an endpoint run may change), or start a new run",
                root.display(),
                differences.join(", ")
            );
        }
        // A longer max_steps is the usual reason to resume a finished run.
        atomic::write_file(&saved_path, config.to_yaml().as_bytes())?;
        let latest = latest_checkpoint(root)?;
        let step = match &latest {
            Some(dir) => read_state(dir)?.step,
            None => 0,
        };
        truncate_after(&root.join("metrics.jsonl"), step)?;
        truncate_after(&root.join("samples.jsonl"), step)?;
        Ok((Self::open(root)?, latest))
    }

    fn open(root: &Path) -> Result<RunDir> {
        let append = |name: &str| {
            let path = root.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))
        };
        Ok(RunDir {
            root: root.to_owned(),
            metrics: append("metrics.jsonl")?,
            samples: append("samples.jsonl")?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn append_metrics(&mut self, metrics: &StepMetrics) -> Result<()> {
        append_line(&mut self.metrics, metrics).context("writing metrics.jsonl")
    }

    pub fn append_samples(&mut self, samples: &[TrainSample]) -> Result<()> {
        for sample in samples {
            append_line(&mut self.samples, sample).context("writing samples.jsonl")?;
        }
        Ok(())
    }

    /// Writes `checkpoints/step-N` through `fill(dir)` and the trainer state, atomically
    /// (a crash leaves the whole checkpoint or none of it), then deletes all but the newest
    /// `keep`.
    pub fn save_checkpoint(
        &self,
        state: &TrainerState,
        keep: usize,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let target = self
            .root
            .join(CHECKPOINTS)
            .join(format!("step-{}", state.step));
        atomic::write_dir(&target, true, |dir| {
            fill(dir)?;
            let json = serde_json::to_vec_pretty(state)?;
            atomic::write_file(&dir.join("trainer_state.json"), &json)
        })
        .with_context(|| format!("writing the checkpoint {}", target.display()))?;
        let mut all = checkpoints(&self.root)?;
        while all.len() > keep.max(1) {
            let (_, oldest) = all.remove(0);
            fs::remove_dir_all(&oldest)
                .with_context(|| format!("cannot delete old checkpoint {}", oldest.display()))?;
        }
        Ok(target)
    }
}

/// The trainer state of a checkpoint directory.
pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join("trainer_state.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
}

/// Complete checkpoints, oldest first.
fn checkpoints(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = root.join(CHECKPOINTS);
    let mut found = Vec::new();
    if !dir.exists() {
        return Ok(found);
    }
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step {
            if path.join("trainer_state.json").exists() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(root)?.pop().map(|(_, path)| path))
}

/// Keeps only the JSON lines of `path` whose `step` is at most `step`.
fn truncate_after(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut kept = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let line_step = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("step").and_then(Value::as_u64));
        if line_step.is_some_and(|s| s as usize <= step) {
            kept.extend_from_slice(line.as_bytes());
            kept.push(b'\n');
        }
    }
    atomic::write_file(path, &kept)
}

fn append_line(file: &mut File, value: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    file.write_all(&line)?;
    file.flush()?;
    Ok(())
}

/// Keys (as `section.key`) whose values differ, ignoring those a resume may change.
fn differing_keys(a: &Config, b: &Config) -> Vec<String> {
    // Sampling from a server stays sampling from a server; which server may change.
    let both_remote = a.train.endpoint.is_some() && b.train.endpoint.is_some();
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["(unreadable configuration)".into()];
    };
    let mut out = Vec::new();
    for (section, a_value) in &a {
        let b_value = b.get(section).cloned().unwrap_or(Value::Null);
        match (a_value, &b_value) {
            (Value::Object(a_keys), Value::Object(b_keys)) => {
                let mut keys: Vec<&String> = a_keys.keys().chain(b_keys.keys()).collect();
                keys.sort();
                keys.dedup();
                for key in keys {
                    let resumable = section == "train"
                        && (matches!(key.as_str(), "max_steps" | "output_dir")
                            || both_remote
                                && matches!(
                                    key.as_str(),
                                    "endpoint" | "served_model" | "api_key_env"
                                ));
                    if !resumable && a_keys.get(key) != b_keys.get(key) {
                        out.push(format!("{section}.{key}"));
                    }
                }
            }
            _ if *a_value != b_value => out.push(section.clone()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(url: Option<&str>) -> Config {
        let mut config = Config::default();
        config.train.endpoint = url.map(String::from);
        config.train.served_model = url.map(|_| "prover".to_string());
        config
    }

    #[test]
    fn an_endpoint_run_may_move_its_server_but_not_change_its_sampler() {
        let a = remote(Some("http://a:8000"));
        let mut b = remote(Some("http://b:8000"));
        b.train.served_model = Some("prover-step-100".into());
        b.train.max_steps = Some(10);
        assert!(differing_keys(&a, &b).is_empty());
        assert_eq!(
            differing_keys(&remote(None), &a),
            ["train.endpoint", "train.served_model"]
        );
        assert_eq!(
            differing_keys(&a, &remote(None)),
            ["train.endpoint", "train.served_model"]
        );
        b.train.learning_rate = 1.0;
        assert_eq!(differing_keys(&a, &b), ["train.learning_rate"]);
    }
}
