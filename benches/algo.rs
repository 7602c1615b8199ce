//! Advantages + loss + backward for one optimizer step of 16 groups × 8 completions × 512
//! tokens on CPU, for each algorithm. `cargo bench --bench algo`.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lean_grpo::algo::{loss, prepare, presets::PRESETS, AlgoConfig, Denominators, LogProbs};
use rand::{Rng, SeedableRng};
use serde_json::Map;

const GROUPS: usize = 16;
const G: usize = 8;
const T: usize = 512;

struct Inputs {
    rewards: Vec<f64>,
    lengths: Vec<usize>,
    truncated: Vec<bool>,
    new: Var,
    old: Tensor,
    reference: Tensor,
}

fn inputs() -> candle_core::Result<Inputs> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let b = GROUPS * G;
    let rewards = (0..b).map(|_| f64::from(rng.random_bool(0.3))).collect();
    let lengths: Vec<usize> = (0..b).map(|_| rng.random_range(32..=T)).collect();
    let truncated = lengths.iter().map(|&l| l == T).collect();
    let old: Vec<f32> = (0..b * T).map(|_| rng.random_range(-4.0..-0.01)).collect();
    let jitter = |rng: &mut rand::rngs::StdRng, xs: &[f32]| -> Vec<f32> {
        xs.iter().map(|x| x + rng.random_range(-0.2..0.2)).collect()
    };
    let new = jitter(&mut rng, &old);
    let reference = jitter(&mut rng, &old);
    let dev = Device::Cpu;
    Ok(Inputs {
        rewards,
        lengths,
        truncated,
        new: Var::from_vec(new, (b, T), &dev)?,
        old: Tensor::from_vec(old, (b, T), &dev)?,
        reference: Tensor::from_vec(reference, (b, T), &dev)?,
    })
}

fn step(cfg: &AlgoConfig, x: &Inputs) -> f64 {
    let p = prepare(cfg, &x.rewards, &x.lengths, &x.truncated).expect("prepare");
    let batch = p.kept_rows();
    let rows: Vec<u32> = batch.rows.iter().map(|r| r.index as u32).collect();
    let idx = Tensor::new(rows.as_slice(), &Device::Cpu).expect("index");
    let pick = |t: &Tensor| t.index_select(&idx, 0).expect("select");
    let (new, old, reference) = (pick(x.new.as_tensor()), pick(&x.old), pick(&x.reference));
    let denom = Denominators::new(cfg, &batch).expect("denominators");
    let logp = LogProbs {
        new: &new,
        old: &old,
        reference: cfg.needs_reference().then_some(&reference),
        entropy: None,
    };
    let out = loss(cfg, &batch, &logp, &denom).expect("loss");
    let grads = out.loss.backward().expect("backward");
    assert!(grads.get(x.new.as_tensor()).is_some());
    out.value
}

fn bench(c: &mut Criterion) {
    let x = inputs().expect("inputs");
    let mut group = c.benchmark_group("algo_step_16x8x512");
    for p in PRESETS {
        let cfg = AlgoConfig::resolve(p.name, &Map::new(), G, T).expect("preset");
        group.bench_with_input(BenchmarkId::from_parameter(p.name), &cfg, |b, cfg| {
            b.iter(|| step(cfg, &x))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
