//! AdamW against PyTorch's update, schedules against `transformers`, clipping, accumulation and
//! exact resume.

use candle_core::{DType, Device, Tensor, Var};
use lean_grpo::model::optim::{
    clip_grad_norm, AdamW, AdamWParams, GradAccumulator, LrSchedule, ScheduleKind,
};

fn var(values: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().to_vec1::<f32>().unwrap()
}

/// Gradients of `sum(var · c)`, i.e. exactly `c`, through a real backward pass.
fn grads_equal_to(v: &Var, c: &[f32]) -> candle_core::backprop::GradStore {
    let c = Tensor::new(c, &Device::Cpu).unwrap();
    (v.as_tensor() * c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= tol,
            "element {i}: {g} vs {w} (got {got:?})"
        );
    }
}

/// Expected values: `torch.optim.AdamW`'s single-tensor update written out in float64 numpy
/// (param *= 1 - lr·wd; exp_avg.lerp_(g, 1 - β1); exp_avg_sq = β2·v + (1 - β2)·g²;
/// param -= lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)), three steps with the
/// gradients and learning rates below, β = (0.9, 0.999), eps = 1e-8, weight_decay = 0.1.
#[test]
fn adamw_matches_pytorch_over_three_steps() {
    let x = var(&[0.5, -1.0, 2.0, 0.0]);
    let params = AdamWParams {
        weight_decay: 0.1,
        ..AdamWParams::default()
    };
    let mut opt = AdamW::new(vec![("x".into(), x.clone())], params).unwrap();
    let steps: [([f32; 4], f64, [f64; 4]); 3] = [
        (
            [0.1, -0.2, 0.3, 0.0],
            1e-2,
            [
                0.4895000009999999,
                -0.9890000004999999,
                1.9880000003333334,
                0.0,
            ],
        ),
        (
            [-0.05, 0.4, 0.1, 1e-3],
            5e-3,
            [
                0.48792356596966957,
                -0.9903360180770518,
                1.98265068077436,
                -0.0037206315133155067,
            ],
        ),
        (
            [0.2, 0.2, -0.3, -1e-3],
            2e-3,
            [
                0.48650975815543546,
                -0.991176432469149,
                1.9821573766980372,
                -0.0036295240139026927,
            ],
        ),
    ];
    for (i, (g, lr, want)) in steps.iter().enumerate() {
        let grads = grads_equal_to(&x, g);
        opt.step(&grads, *lr).unwrap();
        assert_eq!(opt.steps(), i as u64 + 1);
        assert_close(&values(&x), want, 2e-7);
    }
}

#[test]
fn a_variable_without_gradient_is_an_error_naming_it() {
    let used = var(&[1.0, 2.0]);
    let unused = var(&[3.0]);
    let mut opt = AdamW::new(
        vec![
            ("used".into(), used.clone()),
            ("lora_B.7".into(), unused.clone()),
        ],
        AdamWParams::default(),
    )
    .unwrap();
    let grads = grads_equal_to(&used, &[1.0, 1.0]);
    let err = opt.step(&grads, 1e-3).unwrap_err().to_string();
    assert!(
        err.contains("no gradient for 1 of 2") && err.contains("lora_B.7"),
        "{err}"
    );
    // Nothing moved and no step was counted.
    assert_eq!(values(&used), vec![1.0, 2.0]);
    assert_eq!(opt.steps(), 0);

    let dup = AdamW::new(
        vec![("a".into(), used.clone()), ("a".into(), unused)],
        AdamWParams::default(),
    );
    assert!(dup
        .unwrap_err()
        .to_string()
        .contains("\"a\" is given twice"));
}

/// Values of `transformers.get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup`
/// (num_warmup_steps = 10, num_training_steps = 100, base lr 3e-6), computed with their
/// lambdas in Python.
#[test]
fn schedules_match_transformers() {
    let sched = |kind| LrSchedule {
        kind,
        base_lr: 3e-6,
        warmup_steps: 10,
        total_steps: 100,
    };
    let cosine = sched(ScheduleKind::Cosine);
    let linear = sched(ScheduleKind::Linear);
    let table: [(u64, f64, f64); 8] = [
        (0, 0.0, 0.0),
        (1, 3.0000000000000004e-07, 3.0000000000000004e-07),
        (5, 1.5e-06, 1.5e-06),
        (10, 3e-06, 3e-06),
        (32, 2.5790097005079765e-06, 2.266666666666667e-06),
        (55, 1.5e-06, 1.5e-06),
        (99, 9.137594713563569e-10, 3.3333333333333334e-08),
        (100, 0.0, 0.0),
    ];
    for (step, want_cos, want_lin) in table {
        assert!(
            (cosine.lr(step) - want_cos).abs() < 1e-18,
            "cosine at {step}: {}",
            cosine.lr(step)
        );
        assert!(
            (linear.lr(step) - want_lin).abs() < 1e-18,
            "linear at {step}: {}",
            linear.lr(step)
        );
    }
    let warm = sched(ScheduleKind::ConstantWithWarmup);
    for (step, want) in [(0, 0.0), (4, 1.2e-6), (10, 3e-6), (1000, 3e-6)] {
        assert!(
            (warm.lr(step) - want).abs() < 1e-18,
            "warm-up at {step}: {}",
            warm.lr(step)
        );
    }
    // get_constant_schedule ignores warm-up.
    let constant = sched(ScheduleKind::Constant);
    assert_eq!((constant.lr(0), constant.lr(500)), (3e-6, 3e-6));

    assert_eq!(LrSchedule::warmup_steps_for_ratio(0.1, 95), 10);
    assert_eq!(LrSchedule::warmup_steps_for_ratio(0.0, 95), 0);
    assert_eq!(
        "cosine".parse::<ScheduleKind>().unwrap(),
        ScheduleKind::Cosine
    );
    let err = "cosine_with_restarts"
        .parse::<ScheduleKind>()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown lr_scheduler_type \"cosine_with_restarts\""),
        "{err}"
    );
}

#[test]
fn clip_grad_norm_returns_the_pre_clip_norm_and_scales_like_torch() {
    let a = var(&[0.0, 0.0]);
    let b = var(&[0.0]);
    let loss = |ca: &[f32], cb: &[f32]| {
        let ta = (a.as_tensor() * Tensor::new(ca, &Device::Cpu).unwrap()).unwrap();
        let tb = (b.as_tensor() * Tensor::new(cb, &Device::Cpu).unwrap()).unwrap();
        (ta.sum_all().unwrap() + tb.sum_all().unwrap()).unwrap()
    };
    let mut grads = loss(&[3.0, 4.0], &[12.0]).backward().unwrap();
    let norm = clip_grad_norm([&a, &b], &mut grads, 6.5).unwrap();
    assert!((norm - 13.0).abs() < 1e-12, "{norm}");
    let coef = 6.5 / (13.0 + 1e-6);
    let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_close(&ga, &[3.0 * coef, 4.0 * coef], 1e-6);
    assert_close(&gb, &[12.0 * coef], 1e-6);

    // Below the threshold nothing changes.
    let mut grads = loss(&[0.3, 0.4], &[1.2]).backward().unwrap();
    let norm = clip_grad_norm([&a, &b], &mut grads, 2.0).unwrap();
    assert!((norm - 1.3).abs() < 1e-6, "{norm}");
    assert_eq!(
        grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        vec![0.3, 0.4]
    );

    // A non-finite norm is reported and the gradients are left for the caller to discard.
    let mut grads = loss(&[f32::INFINITY, 1.0], &[1.0]).backward().unwrap();
    let norm = clip_grad_norm([&a, &b], &mut grads, 1.0).unwrap();
    assert!(norm.is_infinite());
    assert_eq!(
        grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        vec![1.0]
    );
}

#[test]
fn accumulated_micro_batches_equal_the_full_batch_gradient() {
    let x = var(&[1.0, -2.0, 0.5]);
    let frozen = Tensor::new(&[2.0f32, 2.0, 2.0], &Device::Cpu).unwrap();
    let micro = |scale: f64| {
        // loss_k = scale · sum(x² · frozen)
        let sq = x.as_tensor().sqr().unwrap();
        ((sq * &frozen).unwrap().sum_all().unwrap() * scale).unwrap()
    };
    let mut acc = GradAccumulator::new([&x]);
    acc.add(micro(0.25).backward().unwrap()).unwrap();
    acc.add(micro(0.75).backward().unwrap()).unwrap();
    assert_eq!(acc.micro_batches(), 2);
    let summed = acc.take();
    assert_eq!(acc.micro_batches(), 0);
    let full = micro(1.0).backward().unwrap();
    let got = summed.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let want = full.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, want);
    assert_eq!(got, vec![4.0, -8.0, 2.0]);
    // Only the tracked variable's gradient is kept.
    assert_eq!(summed.get_ids().count(), 1);
}

fn lora_like_vars() -> Vec<(String, Var)> {
    let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let b = Tensor::new(&[[0.5f32, -0.25, 1.0]], &Device::Cpu).unwrap();
    vec![
        (
            "layers.0.q_proj.lora_A".into(),
            Var::from_tensor(&(a * 0.1).unwrap()).unwrap(),
        ),
        (
            "layers.0.q_proj.lora_B".into(),
            Var::from_tensor(&b).unwrap(),
        ),
    ]
}

/// Runs `n` AdamW steps on a small non-linear loss, with step-dependent learning rates.
fn train(opt: &mut AdamW, n: usize) {
    let input = Tensor::new(&[[1.0f32], [-0.5], [2.0], [0.25]], &Device::Cpu).unwrap();
    for _ in 0..n {
        let vars = opt.vars().to_vec();
        let (a, b) = (vars[0].1.as_tensor(), vars[1].1.as_tensor());
        let out = b.matmul(&a.matmul(&input).unwrap()).unwrap();
        let loss = (out - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let lr = 1e-2 / (1.0 + opt.steps() as f64);
        opt.step(&grads, lr).unwrap();
    }
}

#[test]
fn save_and_load_resume_bit_identically() {
    let params = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let mut first = AdamW::new(lora_like_vars(), params).unwrap();
    train(&mut first, 3);
    let dir = tempfile::tempdir().unwrap();
    first.save(dir.path()).unwrap();
    let at_save: Vec<Tensor> = first
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    train(&mut first, 4);

    // A fresh process: same variable names, weights restored from the checkpoint.
    let restored: Vec<(String, Var)> = lora_like_vars()
        .into_iter()
        .zip(&at_save)
        .map(|((name, _), t)| (name, Var::from_tensor(t).unwrap()))
        .collect();
    let mut second = AdamW::new(restored, params).unwrap();
    second.load(dir.path()).unwrap();
    assert_eq!(second.steps(), 3);
    train(&mut second, 4);
    for ((_, a), (_, b)) in first.vars().iter().zip(second.vars()) {
        let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
        let bits = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&a), bits(&b));
    }
}

#[test]
fn loading_state_for_other_variables_is_an_error() {
    let mut opt = AdamW::new(lora_like_vars(), AdamWParams::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    opt.save(dir.path()).unwrap();
    let other = vec![("layers.0.v_proj.lora_A".to_string(), var(&[1.0]))];
    let mut other = AdamW::new(other, AdamWParams::default()).unwrap();
    let err = other.load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("other variables") && err.contains("layers.0.v_proj.lora_A"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", opt.load(empty.path()).unwrap_err());
    assert!(
        err.contains("cannot read optimizer state") && err.contains("optimizer.json"),
        "{err}"
    );
}
