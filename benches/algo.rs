//! Advantages + loss + backward of one optimizer step of 16 groups × 8 completions × 512
//! tokens on CPU, for each algorithm, under criterion's statistics: the code and inputs
//! `lean-grpo bench` times (it reports the best of a few runs). `cargo bench --bench algo`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lean_grpo::algo::presets::PRESETS;
use lean_grpo::bench::algo::{loss_backward, preset, LossInputs};
use lean_grpo::bench::{Mode, Plan};

fn bench(c: &mut Criterion) {
    let shape = Plan::new(Mode::Full, false).loss;
    let x = LossInputs::new(shape, 7).expect("inputs");
    let name = format!(
        "algo_step_{}x{}x{}",
        shape.groups, shape.group_size, shape.tokens
    );
    let mut group = c.benchmark_group(name);
    for p in PRESETS {
        let cfg = preset(p.name, shape).expect("preset");
        group.bench_with_input(BenchmarkId::from_parameter(p.name), &cfg, |b, cfg| {
            b.iter(|| loss_backward(cfg, &x).expect("loss and backward"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
