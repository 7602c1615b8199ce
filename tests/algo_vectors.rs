//! The algorithm test vectors (docs/algorithms.md §9): every case, evaluated whole and as
//! micro-batches.
//! Set `LEAN_GRPO_ALGO_VECTORS` to check another vector file of the same layout.

mod algo_support;

use algo_support::{case_config, lengths_of, load_vectors, run, tensor2, Case, Tolerance};
use lean_grpo::algo::prepare;

fn close(errors: &mut Vec<String>, tol: Tolerance, what: &str, got: f64, want: f64) {
    if !tol.ok(got, want) {
        errors.push(format!("{what}: got {got}, want {want}"));
    }
}

fn close_grid(
    errors: &mut Vec<String>,
    tol: Tolerance,
    what: &str,
    got: &[Vec<f32>],
    want: &[Vec<f64>],
) {
    for (i, (grow, wrow)) in got.iter().zip(want).enumerate() {
        for (t, (&g, &w)) in grow.iter().zip(wrow).enumerate() {
            close(errors, tol, &format!("{what}[{i}][{t}]"), g as f64, w);
        }
    }
}

fn exact<T: PartialEq + std::fmt::Debug>(errors: &mut Vec<String>, what: &str, got: T, want: T) {
    if got != want {
        errors.push(format!("{what}: got {got:?}, want {want:?}"));
    }
}

fn check_case(case: &Case) -> Vec<String> {
    let mut errors = Vec::new();
    let tol = case.tolerance;
    let (inp, exp) = (&case.inputs, &case.expected);
    let cfg = case_config(case);
    let lengths = lengths_of(&inp.mask);
    let prepared = match prepare(&cfg, &inp.rewards, &lengths, &inp.truncated) {
        Ok(p) => p,
        Err(e) => return vec![format!("prepare failed: {e}")],
    };
    for (i, (&got, &want)) in prepared
        .shaped_rewards
        .iter()
        .zip(&exp.shaped_rewards)
        .enumerate()
    {
        close(&mut errors, tol, &format!("shaped_rewards[{i}]"), got, want);
    }
    exact(&mut errors, "kept", &prepared.kept, &exp.kept);
    for (i, (&got, &want)) in prepared.advantages.iter().zip(&exp.advantages).enumerate() {
        close(
            &mut errors,
            tol,
            &format!("advantages[{i}]"),
            got as f64,
            want,
        );
    }

    let step = prepared.all_rows();
    let new = tensor2(&inp.logp_new);
    let old = tensor2(&inp.logp_old);
    let reference = inp.logp_ref.as_deref().map(tensor2);
    let whole = run(&cfg, &step, &new, &old, reference.as_ref(), 1);
    close(&mut errors, tol, "pg_loss", whole.pg_loss, exp.pg_loss);
    close(&mut errors, tol, "loss", whole.loss, exp.loss);
    for (what, got, want) in [
        ("kl_term", whole.kl_term, exp.kl_term),
        ("dpo_loss", whole.dpo_loss, exp.dpo_loss),
    ] {
        match (got, want) {
            (Some(g), Some(w)) => close(&mut errors, tol, what, g, w),
            (g, w) => exact(&mut errors, what, g, w),
        }
    }
    let d = &whole.diagnostics;
    exact(&mut errors, "n_pairs", d.n_pairs, exp.n_pairs);
    exact(&mut errors, "loss_tokens", d.loss_tokens, exp.loss_tokens);
    exact(
        &mut errors,
        "clip_high_count",
        d.clip_high_count,
        exp.clip_high_count,
    );
    exact(
        &mut errors,
        "clip_low_count",
        d.clip_low_count,
        exp.clip_low_count,
    );
    close_grid(
        &mut errors,
        tol,
        "grad_logp_new",
        &whole.grad,
        &exp.grad_logp_new,
    );

    // One micro-batch per group: the summed loss and gradient equal the whole step's.
    let split = run(&cfg, &step, &new, &old, reference.as_ref(), step.groups());
    close(
        &mut errors,
        tol,
        "micro-batched loss",
        split.loss,
        whole.loss,
    );
    let whole_grad: Vec<Vec<f64>> = whole
        .grad
        .iter()
        .map(|row| row.iter().map(|&x| x as f64).collect())
        .collect();
    close_grid(
        &mut errors,
        tol,
        "micro-batched grad",
        &split.grad,
        &whole_grad,
    );
    exact(
        &mut errors,
        "micro-batched n_pairs",
        split.diagnostics.n_pairs,
        d.n_pairs,
    );
    exact(
        &mut errors,
        "micro-batched clip_high",
        split.diagnostics.clip_high_count,
        d.clip_high_count,
    );
    errors
}

#[test]
fn every_vector_case_matches() {
    let file = load_vectors();
    assert_eq!(file.format, "lean-grpo algorithm vectors v1");
    let mut failures = Vec::new();
    for case in &file.cases {
        let errors = check_case(case);
        if !errors.is_empty() {
            failures.push(format!(
                "{} ({}):\n  {}",
                case.name,
                case.algorithm,
                errors.join("\n  ")
            ));
        }
    }
    println!("checked {} algorithm vector cases", file.cases.len());
    assert!(!file.cases.is_empty(), "the vector file has no cases");
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
