//! Shared by the algo integration tests: the vector file, and running a loss with backprop over
//! micro-batches of whole groups.

#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use lean_grpo::algo::{self, AlgoConfig, BatchShape, Denominators, LogProbs, StepBatch};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
pub struct VectorFile {
    pub format: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub algorithm: String,
    pub config: Map<String, Value>,
    pub inputs: Inputs,
    pub expected: Expected,
    pub tolerance: Tolerance,
}

#[derive(Debug, Deserialize)]
pub struct Inputs {
    pub group_size: usize,
    pub rewards: Vec<f64>,
    pub mask: Vec<Vec<u8>>,
    pub truncated: Vec<bool>,
    pub logp_new: Vec<Vec<f64>>,
    pub logp_old: Vec<Vec<f64>>,
    pub logp_ref: Option<Vec<Vec<f64>>>,
}

#[derive(Debug, Deserialize)]
pub struct Expected {
    pub shaped_rewards: Vec<f64>,
    pub kept: Vec<bool>,
    pub advantages: Vec<f64>,
    pub pg_loss: f64,
    pub kl_term: Option<f64>,
    pub dpo_loss: Option<f64>,
    pub n_pairs: usize,
    pub loss: f64,
    pub grad_logp_new: Vec<Vec<f64>>,
    pub loss_tokens: usize,
    pub clip_high_count: usize,
    pub clip_low_count: usize,
}

#[derive(Debug, Deserialize, Clone, Copy)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

impl Tolerance {
    pub fn ok(&self, got: f64, want: f64) -> bool {
        (got - want).abs() <= self.abs + self.rel * want.abs()
    }
}

/// `LEAN_GRPO_ALGO_VECTORS` when set, else the public file copied into tests/data.
pub fn vector_path() -> PathBuf {
    match std::env::var_os("LEAN_GRPO_ALGO_VECTORS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/algorithm_vectors.json"),
    }
}

pub fn load_vectors() -> VectorFile {
    let path = vector_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The case's config object, resolved (its `algorithm` key must agree with the preset).
pub fn case_config(case: &Case) -> AlgoConfig {
    let algorithm = case.config["algorithm"].as_str().unwrap_or(&case.algorithm);
    let l = case.config["max_completion_length"]
        .as_u64()
        .expect("max_completion_length in config") as usize;
    // The vectors give L_max among the algorithm keys; the trainer passes it as the batch shape.
    let mut keys = case.config.clone();
    keys.remove("max_completion_length");
    keys.remove("group_size");
    let shape = BatchShape {
        group_size: case.inputs.group_size,
        max_completion_length: l,
    };
    AlgoConfig::resolve(algorithm, &keys, shape)
        .unwrap_or_else(|e| panic!("{}: config does not resolve: {e}", case.name))
}

/// Prefix-shaped mask rows → lengths (asserting the shape).
pub fn lengths_of(mask: &[Vec<u8>]) -> Vec<usize> {
    mask.iter()
        .map(|row| {
            let n = row.iter().filter(|&&m| m == 1).count();
            assert!(
                row[..n].iter().all(|&m| m == 1),
                "mask row is not prefix-shaped"
            );
            n
        })
        .collect()
}

pub fn tensor2(rows: &[Vec<f64>]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).expect("tensor")
}

/// Result of evaluating a step batch as `parts` micro-batches and summing.
pub struct Run {
    pub loss: f64,
    pub pg_loss: f64,
    pub kl_term: Option<f64>,
    pub dpo_loss: Option<f64>,
    pub diagnostics: algo::Diagnostics,
    pub grad: Vec<Vec<f32>>,
}

/// Runs the loss on `parts` micro-batches of `step` (whole groups) under the step's
/// denominators, backpropagating each into one shared variable, and sums everything.
pub fn run(
    cfg: &AlgoConfig,
    step: &StepBatch,
    new: &Tensor,
    old: &Tensor,
    reference: Option<&Tensor>,
    parts: usize,
) -> Run {
    let var = Var::from_tensor(new).expect("var");
    let denom = Denominators::new(cfg, step).expect("denominators");
    let mut out = Run {
        loss: 0.0,
        pg_loss: 0.0,
        kl_term: None,
        dpo_loss: None,
        diagnostics: algo::Diagnostics::default(),
        grad: vec![vec![0.0; new.dims()[1]]; new.dims()[0]],
    };
    let add = |acc: &mut Option<f64>, x: Option<f64>| {
        if let Some(x) = x {
            *acc = Some(acc.unwrap_or(0.0) + x);
        }
    };
    let mut start = 0;
    for micro in step.split(parts) {
        let n = micro.len();
        let narrow = |t: &Tensor| t.narrow(0, start, n).expect("narrow");
        let new_m = var.as_tensor().narrow(0, start, n).expect("narrow");
        let old_m = narrow(old);
        let ref_m = reference.map(narrow);
        let logp = LogProbs {
            new: &new_m,
            old: &old_m,
            reference: ref_m.as_ref(),
            entropy: None,
        };
        let o = algo::loss(cfg, &micro, &logp, &denom).expect("loss");
        out.loss += o.value;
        out.pg_loss += o.pg_loss;
        add(&mut out.kl_term, o.kl_term);
        add(&mut out.dpo_loss, o.dpo_loss);
        out.diagnostics.merge(&o.diagnostics);
        let grads = o.loss.backward().expect("backward");
        if let Some(g) = grads.get(var.as_tensor()) {
            let g: Vec<Vec<f32>> = g.to_vec2().expect("grad");
            for (acc, row) in out.grad.iter_mut().zip(g) {
                for (a, x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
        }
        start += n;
    }
    out
}

/// Deterministic log-probs [b, t]: `old` in [−4, −0.05], `new` and `reference` within ±`spread`
/// of it, and junk (−17.25) in cells at or past each row's length.
pub fn synthetic_logps(
    lengths: &[usize],
    t: usize,
    spread: f64,
    seed: u64,
) -> (Tensor, Tensor, Tensor) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let b = lengths.len();
    let mut grids = [
        vec![vec![0.0; t]; b],
        vec![vec![0.0; t]; b],
        vec![vec![0.0; t]; b],
    ];
    for (i, &len) in lengths.iter().enumerate() {
        for j in 0..t {
            if j >= len {
                for g in grids.iter_mut() {
                    g[i][j] = -17.25;
                }
                continue;
            }
            let old: f64 = rng.random_range(-4.0..-0.05);
            grids[1][i][j] = old;
            grids[0][i][j] = old + rng.random_range(-spread..=spread);
            grids[2][i][j] = old + rng.random_range(-spread..=spread);
        }
    }
    let [new, old, reference] = grids;
    (tensor2(&new), tensor2(&old), tensor2(&reference))
}
