//! The checker against a real Lean 4.35.0 (`scripts/test-lean.sh`, `LEAN_GRPO_TEST_LEAN`), on
//! the `prelude` theorems of data/prelude.jsonl. Skips, visibly, when the variable is unset.

mod support;

use std::time::Instant;

use lean_grpo::data::Theorem;
use lean_grpo::lean::{Backend, Checked, Checker, CheckerOptions, Job, VerdictKind};
use support::*;

/// The verdict of one job.
fn check_one(checker: &Checker, job: &Job) -> Checked {
    let mut all = checker
        .check(std::slice::from_ref(job), None)
        .expect("the checker runs");
    all.pop().expect("one verdict per job")
}

fn real_options(lean: &str) -> CheckerOptions {
    let mut o = options(Backend::Lean, &format!("'{lean}' --json"));
    o.timeout = 20.0;
    o
}

#[test]
fn all_prelude_proofs_are_accepted() {
    let Some(lean) = real_lean("all_prelude_proofs_are_accepted") else {
        return;
    };
    let theorems = prelude();
    assert_eq!(theorems.len(), 75);
    let checker = Checker::new(&real_options(&lean)).unwrap();
    let jobs: Vec<Job> = theorems
        .iter()
        .map(|(t, _)| Job::new(t, t.proof.clone().unwrap()))
        .collect();
    let started = Instant::now();
    let results = checker.check(&jobs, None).unwrap();
    eprintln!(
        "75 prelude proofs in {:.2} s with jobs=2",
        started.elapsed().as_secs_f64()
    );
    for ((t, _), r) in theorems.iter().zip(&results) {
        assert_eq!(
            r.verdict.kind,
            VerdictKind::Accepted,
            "{}: {:?}",
            t.name,
            r.verdict
        );
        assert!(
            r.verdict.evidence.axioms.is_empty(),
            "{}: {:?}",
            t.name,
            r.verdict.evidence.axioms
        );
    }
}

#[test]
fn a_proof_of_another_family_is_a_lean_error() {
    let Some(lean) = real_lean("a_proof_of_another_family_is_a_lean_error") else {
        return;
    };
    let theorems = prelude();
    // Each theorem gets the proof of the next theorem (cyclically) of a different family whose
    // text differs from its own.
    let mut jobs = Vec::new();
    let mut pairs = Vec::new();
    for (i, (t, family)) in theorems.iter().enumerate() {
        let own = t.proof.as_deref().unwrap();
        let (donor, _) = (1..theorems.len())
            .map(|k| &theorems[(i + k) % theorems.len()])
            .find(|(d, f)| f != family && d.proof.as_deref() != Some(own))
            .unwrap();
        jobs.push(Job::new(t, donor.proof.clone().unwrap()));
        pairs.push((t.name.clone(), donor.name.clone()));
    }
    let checker = Checker::new(&real_options(&lean)).unwrap();
    let results = checker.check(&jobs, None).unwrap();
    for ((name, donor), r) in pairs.iter().zip(&results) {
        assert_eq!(
            r.verdict.kind,
            VerdictKind::LeanError,
            "{name} with the proof of {donor}: {:?}",
            r.verdict
        );
        let first = r
            .verdict
            .evidence
            .messages
            .iter()
            .find(|m| m.text.contains("mismatch") || m.text.contains("nknown"));
        assert!(first.is_some(), "{name}: {:?}", r.verdict.evidence.messages);
    }
}

#[test]
fn error_positions_are_relative_to_the_proof() {
    let Some(lean) = real_lean("error_positions_are_relative_to_the_proof") else {
        return;
    };
    let (t, _) = prelude()
        .into_iter()
        .find(|(t, _)| t.name == "add_0_2")
        .unwrap();
    let checker = Checker::new(&real_options(&lean)).unwrap();
    let r = check_one(
        &checker,
        &Job::new(&t, "MyEq.trans\n    (MyEq.refl _)\n    (N.zero_add N.two)"),
    );
    assert_eq!(r.verdict.kind, VerdictKind::Accepted, "{:?}", r.verdict);
    let r = check_one(
        &checker,
        &Job::new(
            &t,
            "MyEq.trans\n    (MyEq.refl _)\n    (N.zero_add N.three)",
        ),
    );
    assert_eq!(r.verdict.kind, VerdictKind::LeanError);
    let m = r
        .verdict
        .evidence
        .messages
        .iter()
        .find(|m| m.line.is_some_and(|l| l >= 1))
        .expect("an error in the proof");
    assert_eq!(m.line, Some(3), "{:?}", r.verdict.evidence.messages);
    assert!(m.column.is_some_and(|c| c >= 4), "{m:?}");
    let progress = r.verdict.partial_progress().unwrap();
    assert!(progress > 0.0 && progress < 1.0, "{progress}");
}

/// A proof that makes Lean unfold the products in full (the recursion limit raised).
const UNFOLD: &str = "set_option maxRecDepth 100000 in MyEq.refl _";

/// 9, 81 and 729 as products of `N.three`.
fn products() -> (String, String, String) {
    let t9 = "(N.mul N.three N.three)".to_string();
    let t81 = format!("(N.mul {t9} {t9})");
    let t729 = format!("(N.mul {t81} {t9})");
    (t9, t81, t729)
}

/// The prelude header with `extra` declarations appended.
fn with_header(extra: &str, name: &str, statement: &str) -> Theorem {
    let (base, _) = prelude().into_iter().next().unwrap();
    Theorem {
        name: name.into(),
        statement: statement.into(),
        header: Some(format!("{}{extra}\n\n", base.header.unwrap())),
        context: None,
        imports: vec![],
        proof: None,
        split: None,
        hole: None,
    }
}

#[test]
fn a_proof_that_needs_longer_than_the_timeout_is_a_timeout() {
    let Some(lean) = real_lean("a_proof_that_needs_longer_than_the_timeout_is_a_timeout") else {
        return;
    };
    let (t9, t81, t729) = products();
    let t = with_header(
        "",
        "slow",
        &format!("theorem slow : MyEq (N.mul {t81} {t81}) (N.mul {t9} {t729}) :="),
    );
    let mut o = real_options(&lean);
    o.timeout = 2.0;
    let checker = Checker::new(&o).unwrap();
    // Unfolding the products (6561 unary steps) with a raised recursion limit takes ~17 s.
    let started = Instant::now();
    let r = check_one(&checker, &Job::new(&t, UNFOLD));
    assert_eq!(r.verdict.kind, VerdictKind::Timeout, "{:?}", r.verdict);
    assert!(
        started.elapsed().as_secs_f64() < 3.0,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_proof_that_outgrows_the_memory_limit_is_memory() {
    let Some(lean) = real_lean("a_proof_that_outgrows_the_memory_limit_is_memory") else {
        return;
    };
    let (_, t81, t729) = products();
    let statement =
        format!("theorem big : MyEq (N.mul {t729} {t729}) (N.mul {t81} (N.mul {t81} {t81})) :=");
    let t = with_header("", "big", &statement);
    let mut o = real_options(&lean);
    o.memory_mb = 60; // Lean starts at ~35 MiB of private memory and grows ~15 MiB/s here.
    let checker = Checker::new(&o).unwrap();
    let r = check_one(&checker, &Job::new(&t, UNFOLD));
    assert_eq!(r.verdict.kind, VerdictKind::Memory, "{:?}", r.verdict);
}

#[test]
fn a_foreign_axiom_fails_the_audit() {
    let Some(lean) = real_lean("a_foreign_axiom_fails_the_audit") else {
        return;
    };
    let t = with_header(
        "axiom cheat : ∀ (p : Prop), p",
        "uses_cheat",
        "theorem uses_cheat : MyEq N.one N.two :=",
    );
    let checker = Checker::new(&real_options(&lean)).unwrap();
    let r = check_one(&checker, &Job::new(&t, "cheat _"));
    assert_eq!(r.verdict.kind, VerdictKind::Axioms, "{:?}", r.verdict);
    assert_eq!(r.verdict.evidence.axioms, ["cheat"]);
}

#[test]
fn a_broken_header_is_never_accepted() {
    let Some(lean) = real_lean("a_broken_header_is_never_accepted") else {
        return;
    };
    // Without `Init`, `sorry` cannot elaborate: the header itself has an error.
    let t = with_header(
        "theorem helper : MyEq N.one N.two := sorry",
        "via_helper",
        "theorem via_helper : MyEq N.one N.two :=",
    );
    let checker = Checker::new(&real_options(&lean)).unwrap();
    let r = check_one(&checker, &Job::new(&t, "helper"));
    assert_eq!(r.verdict.kind, VerdictKind::LeanError, "{:?}", r.verdict);
    let in_header = r
        .verdict
        .evidence
        .messages
        .iter()
        .find(|m| m.text.starts_with("in the header, line 38:"));
    assert!(
        in_header.is_some_and(|m| m.line.is_none()),
        "{:?}",
        r.verdict.evidence.messages
    );
}
