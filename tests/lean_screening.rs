//! Screening (docs/checker.md §2): for every rule, a proof it must reject and a harmless
//! look-alike it must let through; and the extraction rules of §1 that decide what is screened.

use lean_grpo::lean::{
    explain_screening, extract_proof, screen, Extracted, ScreenPolicy, Screened,
};

const POLICY: ScreenPolicy = ScreenPolicy {
    heartbeats_cap: 400_000,
    rec_depth_cap: 10_000,
    allow_native_decide: false,
};

fn rejected(proof: &str) -> Screened {
    screen(proof, &POLICY).expect_err(&format!("must be rejected: {proof:?}"))
}

fn passes(proof: &str) {
    if let Err(s) = screen(proof, &POLICY) {
        panic!("must pass: {proof:?}, rejected as {s:?}");
    }
}

/// (rule, rejected proof, token reported, harmless look-alike)
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "sorry",
        "by\n  simp\n  sorry",
        "sorry",
        "by\n  -- sorry, this was hard\n  exact sorry_free h",
    ),
    ("sorry", "by admit", "admit", "by exact admits_x"),
    (
        "sorryAx",
        "sorryAx _ false",
        "sorryAx",
        "by exact mySorryAxLike",
    ),
    (
        "axiom",
        "by\n  axiom foo : False",
        "axiom",
        "by exact axiom_free h",
    ),
    (
        "declaration",
        "by\n  trivial\ntheorem evil : False := sorry_free",
        "theorem",
        "by\n  have h := \"theorem t : False\"\n  trivial",
    ),
    (
        "declaration",
        "by trivial def x := 1",
        "def",
        "by exact h.def_eq",
    ),
    (
        "declaration",
        "rfl\nlemma l : True := trivial",
        "lemma",
        "by exact lemma_1",
    ),
    (
        "declaration",
        "rfl\ninstance : Inhabited Nat := ⟨0⟩",
        "instance",
        "by exact inferInstance",
    ),
    (
        "declaration",
        "rfl\nabbrev A := Nat",
        "abbrev",
        "by exact abbrev_ok",
    ),
    (
        "declaration",
        "rfl\nexample : True := trivial",
        "example",
        "by exact example_1",
    ),
    (
        "scope command",
        "rfl\nnamespace Foo",
        "namespace",
        "by exact namespace_x",
    ),
    (
        "scope command",
        "rfl\nend Foo",
        "end",
        "by exact h.endpoint",
    ),
    (
        "#command",
        "rfl\n#eval IO.println \"hi\"",
        "#eval",
        "by exact #[1, 2].size_pos",
    ),
    (
        "#command",
        "rfl\n#print axioms t",
        "#print",
        "by\n  -- #print axioms t\n  rfl",
    ),
    (
        "#command",
        "rfl\n#exit",
        "#exit",
        "by simp [show (\"#exit\" : String).length = 5 from rfl]",
    ),
    ("#command", "rfl\n#check Nat", "#check", "by exact check_ok"),
    (
        "#command",
        "rfl\n#reduce 1 + 1",
        "#reduce",
        "by exact reduce_ok",
    ),
    (
        "run_cmd",
        "by\n  run_tac Lean.Elab.Tactic.evalTactic",
        "run_tac",
        "by exact run_tactic_lemma",
    ),
    (
        "run_cmd",
        "rfl\nrun_cmd Lean.logInfo \"x\"",
        "run_cmd",
        "by exact run_cmd_free",
    ),
    (
        "run_cmd",
        "rfl\nrun_elab pure ()",
        "run_elab",
        "by exact h.run_elab_x",
    ),
    (
        "initialize",
        "rfl\ninitialize pure ()",
        "initialize",
        "by exact initialized",
    ),
    (
        "initialize",
        "rfl\nbuiltin_initialize pure ()",
        "builtin_initialize",
        "by exact builtin_init",
    ),
    (
        "import",
        "rfl\nimport Mathlib",
        "import",
        "by exact important_lemma",
    ),
    (
        "syntax extension",
        "rfl\nmacro \"x\" : tactic => `(tactic| rfl)",
        "macro",
        "by exact macro_free",
    ),
    (
        "syntax extension",
        "rfl\nmacro_rules | `(tactic| trivial) => `(tactic| sorry_free)",
        "macro_rules",
        "by exact macro_rulesx",
    ),
    (
        "syntax extension",
        "rfl\nelab \"x\" : tactic => pure ()",
        "elab",
        "by exact elaborate",
    ),
    (
        "syntax extension",
        "rfl\nelab_rules : tactic | _ => pure ()",
        "elab_rules",
        "by exact h.elab_rules_x",
    ),
    (
        "syntax extension",
        "rfl\nsyntax \"x\" : tactic",
        "syntax",
        "by exact syntax_ok",
    ),
    (
        "syntax extension",
        "rfl\nnotation \"⊤⊤\" => True",
        "notation",
        "by exact notational",
    ),
    (
        "syntax extension",
        "rfl\ninfixl:65 \" +++ \" => Nat.add",
        "infixl",
        "by exact infix_free",
    ),
    (
        "syntax extension",
        "rfl\nprefix:max \"√\" => Nat.sqrt",
        "prefix",
        "by exact List.prefix_refl",
    ),
    (
        "syntax extension",
        "rfl\npostfix:max \"!\" => Nat.factorial",
        "postfix",
        "by exact postfixed",
    ),
    (
        "attribute",
        "rfl\nattribute [simp] Nat.add_comm",
        "attribute",
        "by exact attributed",
    ),
    (
        "@[",
        "by\n  trivial\n@[implemented_by foo] def x := 1",
        "@[",
        "by simp [@Nat.add_comm]",
    ),
    (
        "unsafe",
        "by exact unsafe (cast lcProof ())",
        "unsafe",
        "by exact unsafe_free",
    ),
    (
        "unsafe",
        "rfl\nopaque x : Nat",
        "opaque",
        "by exact opaque_free",
    ),
    (
        "unsafe",
        "rfl\npartial def f : Nat → Nat := f",
        "partial",
        "by exact partial_sum_le",
    ),
    (
        "open private",
        "by\n  open private foo in\n  exact foo",
        "open private",
        "by\n  open Nat in\n  exact private_lemma",
    ),
    (
        "set_option",
        "by\n  set_option maxHeartbeats 0 in\n  simp",
        "set_option maxHeartbeats",
        "by\n  set_option maxHeartbeats 400000 in\n  simp",
    ),
    (
        "set_option",
        "set_option debug.skipKernelTC true in rfl",
        "set_option debug.skipKernelTC",
        "by\n  set_option maxRecDepth 10000 in\n  rfl",
    ),
    (
        "set_option",
        "by\n  set_option linter.all false in\n  simp",
        "set_option linter.all",
        "by\n  -- set_option maxHeartbeats 0 in\n  simp",
    ),
    (
        "option debug./trace./pp.",
        "by\n  with_options `pp.all\n  rfl",
        "pp.all",
        "by exact h.pp_lemma",
    ),
    (
        "option debug./trace./pp.",
        "by exact (Lean.Option.get opts `debug.skipKernelTC)",
        "debug.skipKernelTC",
        "by exact debug_ok",
    ),
    (
        "option debug./trace./pp.",
        "by\n  trace.Meta.x\n  rfl",
        "trace.Meta.x",
        "by\n  trace \"done\"\n  rfl",
    ),
    (
        "native_decide",
        "by native_decide",
        "native_decide",
        "by decide",
    ),
    (
        "native_decide",
        "by decide +native",
        "native",
        "by decide +kernel",
    ),
    (
        "compiler trust",
        "Lean.ofReduceBool _ _ rfl",
        "Lean.ofReduceBool",
        "by exact ofReduce_free",
    ),
    (
        "unterminated comment",
        "by\n  simp /- and then\n  sorry",
        "/-",
        "by\n  simp /- closed -/\n  rfl",
    ),
    (
        "unterminated string",
        "by\n  simp [\"\n  sorry",
        "\"",
        "by\n  simp [\"a\\\"b\"]",
    ),
];

#[test]
fn every_rule_rejects_its_case_and_passes_its_look_alike() {
    for (what, bad, token, harmless) in CASES {
        let s = rejected(bad);
        assert_eq!(s.what, *what, "{bad:?}");
        assert!(
            s.token.starts_with(token),
            "{bad:?}: token {:?}, expected {token:?}",
            s.token
        );
        passes(harmless);
    }
}

#[test]
fn every_listed_rule_has_a_case() {
    let text = explain_screening();
    for (what, ..) in CASES {
        assert!(text.contains(what), "{what} is not in --explain-screening");
    }
    for rule in [
        "sorry",
        "sorryAx",
        "axiom",
        "declaration",
        "scope command",
        "#command",
        "run_cmd",
        "initialize",
        "import",
        "syntax extension",
        "attribute",
        "@[",
        "unsafe",
        "open private",
        "set_option",
        "option debug./trace./pp.",
        "native_decide",
        "compiler trust",
    ] {
        assert!(
            CASES.iter().any(|(what, ..)| what == &rule),
            "no case for rule {rule}"
        );
    }
}

#[test]
fn the_reported_line_is_the_offence_line() {
    let s = rejected("by\n  intro h\n  -- sorry in a comment\n  exact (sorry : False)");
    assert_eq!((s.what.as_str(), s.line), ("sorry", 4));
}

#[test]
fn comments_strings_and_block_comments_hide_nothing_but_themselves() {
    passes("by\n  /- sorry /- nested sorry -/ still comment -/\n  simp -- admit\n  exact \"#eval\".length_pos");
    // A string that closes lets the code after it be screened.
    assert_eq!(rejected("by\n  simp [\"x\"]; exact sorry").what, "sorry");
    // Interpolated strings contain code.
    assert_eq!(rejected("by\n  exact s!\"{sorry}\"").what, "sorry");
}

#[test]
fn set_option_caps_are_configurable_and_never_zero() {
    let tight = ScreenPolicy {
        heartbeats_cap: 1000,
        ..POLICY
    };
    assert!(screen("set_option maxHeartbeats 1000 in rfl", &tight).is_ok());
    assert!(screen("set_option maxHeartbeats 1001 in rfl", &tight).is_err());
    let loose = ScreenPolicy {
        heartbeats_cap: u64::MAX,
        ..POLICY
    };
    assert!(screen("set_option maxHeartbeats 0 in rfl", &loose).is_err());
}

#[test]
fn native_decide_is_allowed_only_when_configured() {
    let allow = ScreenPolicy {
        allow_native_decide: true,
        ..POLICY
    };
    assert!(screen("by native_decide", &allow).is_ok());
    assert!(screen("by decide +native", &allow).is_ok());
    assert!(screen("by native_decide", &POLICY).is_err());
}

#[test]
fn extraction_takes_the_last_lean_block_and_cuts_the_restated_theorem() {
    let stmt = "theorem foo (n : N) : MyEq (N.add N.z n) n :=";
    let completion = "Here is a first try:\n```lean\ntheorem foo (n : N) : MyEq (N.add N.z n) n := by\n  sorry\n```\n\
                      And the real one:\n```lean4\ntheorem foo (n : N) :\n    MyEq (N.add N.z n) n :=\n  N.zero_add n\n```\n";
    assert_eq!(
        extract_proof(completion, stmt),
        Extracted::Proof("N.zero_add n".into())
    );
    let changed = "```lean\ntheorem foo (n : N) : MyEq n n := MyEq.refl _\n```";
    assert_eq!(
        extract_proof(changed, stmt),
        Extracted::StatementChanged {
            restated: "theorem foo (n : N) : MyEq n n".into()
        }
    );
    // Tactic lines keep their indentation.
    let kept = extract_proof(
        "```lean\ntheorem foo (n : N) : MyEq (N.add N.z n) n := by\n  intro h\n    exact h\n```",
        stmt,
    );
    assert_eq!(kept, Extracted::Proof("by\n  intro h\n    exact h".into()));
    assert_eq!(
        extract_proof(
            "```lean\ntheorem foo (n : N) : MyEq (N.add N.z n) n :=\n```",
            stmt
        ),
        Extracted::NoProof
    );
}
