//! `lean-grpo bench`: how fast each stage of a training step runs on this machine, as one JSON
//! object: checker proofs/s ([`checker`]), sampling tokens/s and one training step ([`model`]),
//! and the algorithms' loss + backward ([`algo`]), with the machine and every setting that
//! shaped the figures. The `cargo bench` targets call the same functions.
//!
//! [`Mode::Full`] measures what a real run does (a Qwen2.5-0.5B-shaped model, the whole proof
//! file, several rounds); [`Mode::Reduced`] runs the same code on small shapes and a few proofs
//! in well under a minute, so CI can keep the command working.

pub mod algo;
pub mod checker;
mod memory;
pub mod model;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::data::load_theorems;
use crate::model::init::InitOptions;
use crate::model::Quantize;
use algo::LossShape;
use checker::{CheckerFigures, CheckerSettings};
use model::{
    MemoryFigures, ModelPlan, ModelSettings, QuantizedFigures, QuantizedPlan, SamplingFigures,
    TrainingFigures,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Full,
    Reduced,
}

/// What a mode measures: shapes, proof count and repetitions.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    /// Check only the first N proofs of the theorem file (`None`: all of them).
    pub proofs: Option<usize>,
    pub checker_rounds: usize,
    pub model: ModelPlan,
    /// The memory figures again with the linear layers quantized (src/model/quant.rs).
    pub quantized: QuantizedPlan,
    /// `--large`: also a Qwen2.5-7B-shaped model in Q4_K (minutes per phase on a laptop).
    pub large: Option<QuantizedPlan>,
    pub loss: LossShape,
    pub loss_rounds: usize,
}

impl Plan {
    pub fn new(mode: Mode, large: bool) -> Plan {
        let mut plan = Self::base(mode);
        plan.large = large.then(|| QuantizedPlan {
            model: ModelPlan {
                shape: "Qwen2.5-7B",
                model: InitOptions {
                    hidden_size: 3584,
                    num_hidden_layers: 28,
                    num_attention_heads: 28,
                    num_key_value_heads: 4,
                    intermediate_size: 18944,
                    vocab_size: 152_064,
                    max_position_embeddings: 32_768,
                    seed: 0,
                },
                rounds: 1,
                ..plan.model.clone()
            },
            quantize: Quantize::Q4K,
            full_graph: false,
        });
        plan
    }

    fn base(mode: Mode) -> Plan {
        let model = Self::model_plan(mode);
        // Q4_K needs inputs in blocks of 256, which neither the 0.5B shape (hidden 896) nor
        // the reduced one (128) has; llama.cpp's Q4_K_M files of Qwen2.5-0.5B fall back to 8-bit
        // formats for those tensors too.
        let quantize = Quantize::Q8_0;
        let (proofs, checker_rounds, loss, loss_rounds) = match mode {
            Mode::Full => (
                None,
                3,
                LossShape {
                    groups: 16,
                    group_size: 8,
                    tokens: 512,
                },
                5,
            ),
            Mode::Reduced => (
                Some(12),
                1,
                LossShape {
                    groups: 4,
                    group_size: 8,
                    tokens: 128,
                },
                1,
            ),
        };
        Plan {
            mode,
            proofs,
            checker_rounds,
            quantized: QuantizedPlan {
                model: model.clone(),
                quantize,
                full_graph: true,
            },
            model,
            large: None,
            loss,
            loss_rounds,
        }
    }

    fn model_plan(mode: Mode) -> ModelPlan {
        match mode {
            Mode::Full => ModelPlan {
                shape: "Qwen2.5-0.5B",
                model: InitOptions {
                    hidden_size: 896,
                    num_hidden_layers: 24,
                    num_attention_heads: 14,
                    num_key_value_heads: 2,
                    intermediate_size: 4864,
                    vocab_size: 151_936,
                    max_position_embeddings: 32_768,
                    seed: 0,
                },
                prompt_tokens: 15,
                new_tokens: 64,
                group_size: 4,
                train_prompt_tokens: 16,
                train_completion_tokens: 64,
                memory_group_size: 8,
                memory_prompt_tokens: 700,
                memory_completion_tokens: 48,
                rounds: 2,
            },
            Mode::Reduced => ModelPlan {
                shape: "small",
                model: InitOptions {
                    hidden_size: 128,
                    num_hidden_layers: 2,
                    num_attention_heads: 4,
                    num_key_value_heads: 2,
                    intermediate_size: 256,
                    vocab_size: 2048,
                    max_position_embeddings: 512,
                    seed: 0,
                },
                prompt_tokens: 15,
                new_tokens: 32,
                group_size: 4,
                train_prompt_tokens: 16,
                train_completion_tokens: 32,
                memory_group_size: 4,
                memory_prompt_tokens: 128,
                memory_completion_tokens: 16,
                rounds: 1,
            },
        }
    }
}

/// The JSON `lean-grpo bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// UTC, ISO 8601.
    pub date: String,
    pub lean_grpo_version: &'static str,
    pub mode: Mode,
    pub machine: Machine,
    pub settings: Settings,
    /// Measured numbers only: every one is finite and positive, except
    /// `checker.overhead_ms_per_proof` (a difference of two timings).
    pub figures: Figures,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo, else the architecture.
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: Option<f64>,
    pub os: String,
    /// `release` or `debug`: figures of a debug build are not comparable.
    pub build: &'static str,
    /// /proc/loadavg (1, 5, 15 minutes) before and after: other work on the machine skews
    /// every figure.
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// `null` when the checker was skipped.
    pub checker: Option<CheckerRun>,
    pub model: ModelSettings,
    pub quantized: QuantizedPlan,
    /// `null` without `--large`.
    pub large: Option<QuantizedPlan>,
    pub algorithm_loss: LossSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckerRun {
    pub theorems: String,
    #[serde(flatten)]
    pub settings: CheckerSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossSettings {
    #[serde(flatten)]
    pub shape: LossShape,
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub checker: CheckerSection,
    pub sampling: SamplingFigures,
    pub training: TrainingFigures,
    pub memory: MemoryFigures,
    /// The memory figures with the linear layers' base weights quantized.
    pub quantized: QuantizedFigures,
    /// The same at the Qwen2.5-7B shape in Q4_K (`--large`); `null` otherwise.
    pub large: Option<QuantizedFigures>,
    pub algorithm_loss: LossFigures,
}

/// The checker figures, or why there are none.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum CheckerSection {
    Measured(CheckerFigures),
    Skipped { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct LossFigures {
    /// Advantages + loss + backward of one optimizer step's batch, by algorithm.
    pub loss_backward_seconds: BTreeMap<String, f64>,
}

/// Runs every section of `plan`. The checker section needs `lean_cmd` (as `check --lean-cmd`)
/// and a theorem file whose records carry proofs; without a command it is skipped, with the
/// reason in the summary.
pub fn run(plan: &Plan, lean_cmd: Option<&str>, theorems: &Path) -> Result<Summary> {
    let date = utc_date(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    let mut machine = machine();
    let (checker_run, checker_figures) = match lean_cmd.filter(|c| !c.trim().is_empty()) {
        Some(cmd) => {
            let all = load_theorems(theorems, None)?;
            let with_proof: Vec<_> = all.into_iter().filter(|t| t.proof.is_some()).collect();
            if with_proof.is_empty() {
                bail!(
                    "{}: no record has a `proof`; the checker benchmark checks known proofs",
                    theorems.display()
                );
            }
            let take = plan.proofs.unwrap_or(with_proof.len());
            let subset = &with_proof[..take.min(with_proof.len())];
            tracing::info!(
                "bench: checker, {} proofs of {}",
                subset.len(),
                theorems.display()
            );
            let (settings, figures) = checker::measure(cmd, subset, plan.checker_rounds)?;
            let run = CheckerRun {
                theorems: theorems.display().to_string(),
                settings,
            };
            (Some(run), CheckerSection::Measured(figures))
        }
        None => {
            let reason = "no Lean command given (--lean-cmd \"/path/to/lean --json\")".to_string();
            tracing::warn!("bench: checker skipped: {reason}");
            (None, CheckerSection::Skipped { reason })
        }
    };
    tracing::info!("bench: model, {} shape", plan.model.shape);
    let (model, sampling, training, memory) = model::measure(&plan.model)?;
    crate::model::device::release_cpu_memory();
    let quantized = model::measure_quantized(&plan.quantized)?;
    crate::model::device::release_cpu_memory();
    let large = plan
        .large
        .as_ref()
        .map(model::measure_quantized)
        .transpose()?;
    tracing::info!("bench: algorithm loss + backward");
    let loss_backward_seconds = algo::measure(plan.loss, plan.loss_rounds)?;
    machine.load_average_end = load_average();
    Ok(Summary {
        date,
        lean_grpo_version: env!("CARGO_PKG_VERSION"),
        mode: plan.mode,
        machine,
        settings: Settings {
            checker: checker_run,
            model,
            quantized: plan.quantized.clone(),
            large: plan.large.clone(),
            algorithm_loss: LossSettings {
                shape: plan.loss,
                rounds: plan.loss_rounds,
            },
        },
        figures: Figures {
            checker: checker_figures,
            sampling,
            training,
            memory,
            quantized,
            large,
            algorithm_loss: LossFigures {
                loss_backward_seconds,
            },
        },
    })
}

/// Seconds `f` took, and what it returned.
pub(crate) fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let started = Instant::now();
    let value = f()?;
    Ok((started.elapsed().as_secs_f64(), value))
}

/// Runs `f` `rounds` times (at least once): the shortest time, and the last result. The
/// shortest is the run least disturbed by the rest of the machine.
pub(crate) fn best_of<T>(rounds: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let (mut best, mut value) = timed(&mut f)?;
    for _ in 1..rounds {
        let (seconds, v) = timed(&mut f)?;
        best = best.min(seconds);
        value = v;
    }
    Ok((best, value))
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let kib: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some((kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        });
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |c| c.get()),
        memory_gib,
        os: format!("{} {}", std::env::consts::OS, release.trim())
            .trim()
            .to_string(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        load_average_start: load_average(),
        load_average_end: None,
    }
}

fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (Howard Hinnant's `civil_from_days`).
fn utc_date(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_date(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_date(1_796_083_199), "2026-11-30T23:59:59Z");
    }

    #[test]
    fn best_of_keeps_the_shortest_and_runs_at_least_once() {
        let mut calls = 0;
        let (_, last) = best_of(0, || {
            calls += 1;
            Ok(calls)
        })
        .unwrap();
        assert_eq!((calls, last), (1, 1));
        // Only the middle run can finish under 100 ms.
        let mut sleeps = [120u64, 1, 120].into_iter();
        let (best, _) = best_of(3, || {
            std::thread::sleep(std::time::Duration::from_millis(sleeps.next().unwrap()));
            Ok(())
        })
        .unwrap();
        assert!(best < 0.1, "{best}");
    }
}
