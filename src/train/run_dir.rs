//! The run directory: `config.yaml`, `metrics.jsonl`, `samples.jsonl`, `checkpoints/step-N/`
//! and the final `adapter/`.
//!
//! Checkpoints are written under a temporary name and renamed into place, so a crash leaves
//! either the whole checkpoint or none of it; `--resume` takes the newest complete one and
//! drops the metric and sample lines written after it.
//!
//! The directory is enough to continue a run: `config.yaml` is the effective configuration and
//! `theorems.json` names the theorem file with the sha256 of its content, so `--resume RUN`
//! alone finds both, and a theorem file edited since is refused rather than silently trained on.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::curriculum::Curriculum;
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
    /// `train.task: fim`: the mask-ratio curriculum, so the resumed run cuts the same holes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curriculum: Option<Curriculum>,
}

impl TrainerState {
    /// The state of a run before its first step.
    pub fn start(sampler: SamplerState) -> TrainerState {
        TrainerState {
            step: 0,
            cursor: Cursor::start(),
            sampler,
            curriculum: None,
        }
    }
}

/// The theorem file a run trains on, as `theorems.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TheoremFile {
    /// Absolute, so a resume from another working directory finds it.
    pub path: PathBuf,
    /// sha256 of the file's bytes, in hex.
    pub sha256: String,
}

impl TheoremFile {
    /// Fingerprints the file at `path`.
    pub fn read(path: &Path) -> Result<TheoremFile> {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let path = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(TheoremFile { path, sha256 })
    }
}

pub struct RunDir {
    root: PathBuf,
    metrics: File,
    samples: File,
}

const CONFIG: &str = "config.yaml";
const THEOREMS: &str = "theorems.json";
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
    pub fn create(root: &Path, config: &Config, theorems: &TheoremFile) -> Result<RunDir> {
        Self::ensure_new(root)?;
        fs::create_dir_all(root.join(CHECKPOINTS))
            .with_context(|| format!("cannot create the run directory {}", root.display()))?;
        atomic::write_file(&root.join(THEOREMS), &serde_json::to_vec_pretty(theorems)?)?;
        atomic::write_file(&root.join(CONFIG), config.to_yaml().as_bytes())?;
        Self::open(root)
    }

    /// The configuration the run in `root` was started with: what `--resume` continues with.
    pub fn saved_config(root: &Path) -> Result<Config> {
        let path = root.join(CONFIG);
        if !path.exists() {
            bail!(
                "{} is not a run directory to resume: it has no {CONFIG}",
                root.display()
            );
        }
        Config::load(Some(&path), &[], None)
            .with_context(|| format!("cannot resume {}", root.display()))
    }

    /// The theorem file the run in `root` trains on; `None` for a run started before runs
    /// recorded it.
    pub fn saved_theorems(root: &Path) -> Result<Option<TheoremFile>> {
        let path = root.join(THEOREMS);
        if !path.exists() {
            return Ok(None);
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let file = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        Ok(Some(file))
    }

    /// Reopens the run in `root` for `--resume`. `config` is the run's own configuration with
    /// the flags and file given to `--resume` over it: only `train.max_steps`, `train.output_dir`
    /// and, in a run that samples from an endpoint, where that endpoint is (a server restarted
    /// elsewhere, or on a newer checkpoint) may differ. `theorems` must be the file the run
    /// started on, byte for byte.
    pub fn resume(
        root: &Path,
        config: &Config,
        theorems: &TheoremFile,
    ) -> Result<(RunDir, Option<PathBuf>)> {
        let saved = Self::saved_config(root)?;
        if let Some(key) = differing_keys(&saved, config).first() {
            bail!(
                "cannot resume {root}: `{key}` is {was} in the run and {now} here; a resumed run \
                 keeps its configuration ({root}/{CONFIG}) and may change only --max-steps and, \
                 sampling from an endpoint, the --endpoint settings. Drop the flag or config key \
                 to continue the run, or start a new run with `--output NEW_DIR`",
                root = root.display(),
                was = key_value(&saved, key),
                now = key_value(config, key),
            );
        }
        match Self::saved_theorems(root)? {
            Some(started) if started.sha256 != theorems.sha256 => bail!(
                "cannot resume {}: {} is not the theorem file the run started on ({}, sha256 {}; \
                 now sha256 {}); resume with that file as it was, or start a new run on this one \
                 with `--output NEW_DIR`",
                root.display(),
                theorems.path.display(),
                started.path.display(),
                started.sha256,
                theorems.sha256
            ),
            Some(_) => {}
            None => {
                tracing::warn!(
                    "{} predates theorem fingerprints; trusting that {} is the file it started on",
                    root.display(),
                    theorems.path.display()
                );
                atomic::write_file(&root.join(THEOREMS), &serde_json::to_vec_pretty(theorems)?)?;
            }
        }
        // A longer max_steps is the usual reason to resume a finished run.
        atomic::write_file(&root.join(CONFIG), config.to_yaml().as_bytes())?;
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

/// The value of `section.key` in `config`, as the user would write it.
fn key_value(config: &Config, key: &str) -> String {
    let value = serde_json::to_value(config).unwrap_or(Value::Null);
    let found = key.split_once('.').map_or(value.get(key), |(section, k)| {
        value.get(section).and_then(|s| s.get(k))
    });
    match found {
        None | Some(Value::Null) => "unset".into(),
        Some(v) => v.to_string(),
    }
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
                                    "endpoint"
                                        | "served_model"
                                        | "api_key_env"
                                        | "endpoint_adapter_dir"
                                        | "sync_steps"
                                        | "sync_timeout_secs"
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
