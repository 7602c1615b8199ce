//! The process backend against a fake `lean` (tests/support/fake_lean.py) that speaks Lean's
//! `--json` and plain formats: one test per verdict kind, the message variants of the captured
//! fixtures, and the faults (hang, crash, flood, forks, memory).

mod support;

use std::time::{Duration, Instant};

use lean_grpo::lean::sandbox::{run_limited, Exit, Limits};
use lean_grpo::lean::{run_check, Backend, Checked, Checker, CheckerOptions, Job, VerdictKind};
use support::*;

fn opts() -> CheckerOptions {
    options(Backend::Lean, &fake_lean_cmd())
}

fn check_with(opts: &CheckerOptions, completion: &str) -> Checked {
    let checker = Checker::new(opts).expect("checker");
    check_one(&checker, &Job::new(&theorem("t"), completion))
}

/// The verdict of one job.
fn check_one(checker: &Checker, job: &Job) -> Checked {
    let mut all = checker
        .check(std::slice::from_ref(job), None)
        .expect("the checker runs");
    all.pop().expect("one verdict per job")
}

/// The verdict's detail text (timeouts and crashes always have one).
fn detail(c: &Checked) -> String {
    c.verdict
        .evidence
        .detail
        .clone()
        .unwrap_or_else(|| panic!("no detail: {:?}", c.verdict))
}

fn check(completion: &str) -> Checked {
    check_with(&opts(), completion)
}

#[test]
fn accepted_when_lean_is_silent_and_the_audit_is_clean() {
    let c = check("```lean\ntheorem t : True := by\n  trivial\n```");
    assert_eq!(c.verdict.kind, VerdictKind::Accepted, "{:?}", c.verdict);
    assert_eq!(c.proof.as_deref(), Some("by\n  trivial"));
    assert!(c.verdict.evidence.axioms.is_empty());
    assert!(!c.cached && c.seconds > 0.0);
}

#[test]
fn lean_error_carries_positions_relative_to_the_proof_and_progress() {
    let c = check("by\n  -- fake:error\n  exact foo");
    assert_eq!(c.verdict.kind, VerdictKind::LeanError);
    let m = &c.verdict.evidence.messages[0];
    assert_eq!((m.line, m.column), (Some(3), Some(2)));
    assert!(
        m.text.starts_with("Type mismatch\n  MyEq.refl ?m.3"),
        "{}",
        m.text
    );
    // One tactic line, so tokens count: `by` ends before the error, `exact` and `foo` do not.
    let progress = c
        .verdict
        .partial_progress()
        .expect("lean_error gets progress");
    assert!((progress - 1.0 / 3.0).abs() < 1e-9, "{progress}");
    let json = serde_json::to_value(&c.verdict).unwrap();
    assert_eq!(json["kind"], "lean_error");
    assert_eq!(json["evidence"]["messages"][0]["line"], 3);
}

#[test]
fn named_error_kinds_are_kept() {
    let c = check("by\n  -- fake:unknown-id\n  exact rfl_this_is_not_a_thing");
    assert_eq!(c.verdict.kind, VerdictKind::LeanError);
    assert_eq!(
        c.verdict.evidence.messages[0].kind.as_deref(),
        Some("lean.unknownIdentifier._namedError")
    );
}

#[test]
fn sorry_in_every_text_variant_and_by_kind_alone() {
    for variant in ["sorry-old", "sorry-tick", "sorry-decl", "sorry-kind-only"] {
        let c = check(&format!("by\n  -- fake:{variant}\n  trivial"));
        assert_eq!(
            c.verdict.kind,
            VerdictKind::Sorry,
            "{variant}: {:?}",
            c.verdict
        );
        assert_eq!(
            c.verdict.partial_progress(),
            None,
            "never partial credit for sorry"
        );
    }
}

#[test]
fn captured_json_lines_replayed_give_their_verdicts() {
    let replay = |file: &str, lines: &str| {
        format!(
            "by\n  -- fake:replay {} {lines}\n  trivial",
            fixture(file).display()
        )
    };
    let cases = [
        (
            "leanjson_v4.34.1_sorry_decide_axioms.jsonl",
            "1 4",
            VerdictKind::Sorry,
        ),
        (
            "leanjson_v4.34.1_sorry_decide_axioms.jsonl",
            "2 3",
            VerdictKind::LeanError,
        ),
        (
            "leanjson_v4.34.1_sorry_decide_axioms.jsonl",
            "3",
            VerdictKind::Accepted,
        ),
        (
            "leanjson_v4.34.1_sorry_decide_axioms.jsonl",
            "4",
            VerdictKind::Axioms,
        ),
        (
            "leanjson_v4.31.0_sorry_unknownid_axioms.jsonl",
            "4",
            VerdictKind::Accepted,
        ),
        (
            "leanjson_v4.31.0_sorry_unknownid_axioms.jsonl",
            "5",
            VerdictKind::Axioms,
        ),
        (
            "leanjson_v4.31.0_sorry_unknownid_axioms.jsonl",
            "1 2 6",
            VerdictKind::LeanError,
        ),
        (
            "real-4.35.0/axioms_and_mismatch.json.out",
            "5",
            VerdictKind::Axioms,
        ),
        (
            "real-4.35.0/axioms_and_mismatch.json.out",
            "2 3 4",
            VerdictKind::LeanError,
        ),
        (
            "real-4.35.0/max_heartbeats.json.out",
            "1",
            VerdictKind::Timeout,
        ),
        (
            "real-4.35.0/max_rec_depth.json.out",
            "1",
            VerdictKind::LeanError,
        ),
        ("real-4.35.0/ok.json.out", "1", VerdictKind::Accepted),
    ];
    let checker = Checker::new(&opts()).unwrap();
    let jobs: Vec<Job> = cases
        .iter()
        .map(|(f, l, _)| Job::new(&theorem("t"), replay(f, l)))
        .collect();
    let results = checker.check(&jobs, None).unwrap();
    for ((file, lines, want), got) in cases.iter().zip(&results) {
        assert_eq!(
            got.verdict.kind, *want,
            "{file} lines {lines}: {:?}",
            got.verdict
        );
    }
    assert_eq!(results[3].verdict.evidence.axioms, ["sorryAx"]);
    assert_eq!(
        results[4].verdict.evidence.axioms,
        ["propext", "Classical.choice", "Quot.sound"]
    );
    assert_eq!(
        results[5].verdict.evidence.axioms,
        ["Empiricist.nd._native.native_decide.ax_1_1"]
    );
    assert_eq!(results[7].verdict.evidence.axioms, ["cheat"]);

    // native_decide's per-use axiom is fine once allowed.
    let mut native = opts();
    native.allow_native_decide = true;
    let c = check_with(
        &native,
        &replay("leanjson_v4.31.0_sorry_unknownid_axioms.jsonl", "5"),
    );
    assert_eq!(c.verdict.kind, VerdictKind::Accepted);
}

#[test]
fn foreign_axioms_and_wrapped_lists() {
    let c = check("by\n  -- fake:axiom cheat\n  trivial");
    assert_eq!(
        (c.verdict.kind, c.verdict.evidence.axioms.clone()),
        (VerdictKind::Axioms, vec!["cheat".to_string()])
    );
    let c = check("by\n  -- fake:axioms-wrapped\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Accepted);
    assert_eq!(
        c.verdict.evidence.axioms,
        ["propext", "Classical.choice", "Quot.sound"]
    );
}

#[test]
fn an_audit_answer_printed_elsewhere_does_not_count() {
    // e.g. `trace "'t' does not depend on any axioms"` inside the proof.
    let c = check("by\n  -- fake:spoof-audit\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Axioms);
    assert_eq!(c.verdict.evidence.axioms, ["sorryAx"]);
}

#[test]
fn missing_audit_answer_is_never_accepted() {
    let c = check("by\n  -- fake:no-audit\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Crashed);
    assert!(detail(&c).contains("#print axioms"));
}

#[test]
fn lean_heartbeat_limits_are_timeouts() {
    for directive in ["heartbeats", "kernel-heartbeats"] {
        let c = check(&format!("by\n  -- fake:{directive}\n  trivial"));
        assert_eq!(c.verdict.kind, VerdictKind::Timeout, "{directive}");
        assert!(detail(&c).contains("heartbeat"));
    }
}

#[test]
fn odd_exits_are_crashes_with_the_reason() {
    let c = check("by\n  -- fake:exit 3\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Crashed);
    let why = detail(&c);
    assert!(
        why.contains("exited with code 3") && why.contains("lake: error: build failed"),
        "{why}"
    );
    let c = check("by\n  -- fake:exit 1\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Crashed);
    assert!(detail(&c).contains("without an error message"));
}

#[test]
fn killed_by_a_signal_is_crashed() {
    let c = check("by\n  -- fake:crash\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Crashed);
    assert!(detail(&c).contains("signal 11 (SIGSEGV)"));
}

#[test]
fn plain_output_is_parsed_when_json_is_off() {
    let plain = options(Backend::Lean, &fake_lean_cmd().replace(" --json", ""));
    assert_eq!(
        check_with(&plain, "by\n  trivial").verdict.kind,
        VerdictKind::Accepted
    );
    let c = check_with(&plain, "by\n  -- fake:unknown-id\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::LeanError);
    let m = &c.verdict.evidence.messages[0];
    assert_eq!(
        (m.line, m.column, m.kind.as_deref()),
        (Some(3), Some(8), Some("lean.unknownIdentifier"))
    );
    assert_eq!(
        check_with(&plain, "by\n  -- fake:axiom cheat\n  trivial")
            .verdict
            .kind,
        VerdictKind::Axioms
    );
}

#[test]
fn statement_changed_no_proof_and_forbidden_never_start_lean() {
    let c = check("```lean\ntheorem t : False := by\n  -- fake:crash\n  trivial\n```");
    assert_eq!(c.verdict.kind, VerdictKind::StatementChanged);
    assert_eq!(
        c.verdict.evidence.restated.as_deref(),
        Some("theorem t : False")
    );
    assert_eq!(c.seconds, 0.0);
    assert_eq!(check("```lean\n```").verdict.kind, VerdictKind::NoProof);
    assert_eq!(check("  ").verdict.partial_progress(), Some(0.0));
    let c = check("by\n  -- fake:crash\n  exact sorry");
    assert_eq!(c.verdict.kind, VerdictKind::Forbidden);
    let screened = c.verdict.evidence.screened.unwrap();
    assert_eq!(
        (
            screened.what.as_str(),
            screened.token.as_str(),
            screened.line
        ),
        ("sorry", "sorry", 3)
    );
    assert_eq!(c.seconds, 0.0);
}

#[test]
fn memory_limit_kills_the_process() {
    let mut o = opts();
    o.memory_mb = 100;
    let started = Instant::now();
    let c = check_with(&o, "by\n  -- fake:memory 400\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Memory, "{:?}", c.verdict);
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn hang_is_a_timeout_within_a_second_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let mut o = opts();
    o.timeout = 1.0;
    let started = Instant::now();
    let c = check_with(
        &o,
        &format!("by\n  -- fake:hang {}\n  trivial", pidfile.display()),
    );
    let elapsed = started.elapsed();
    assert_eq!(c.verdict.kind, VerdictKind::Timeout);
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let pid = pids(&pidfile)[0];
    assert!(
        !alive(pid) && !zombie_of_ours(pid),
        "lean pid {pid} survived"
    );
}

#[test]
fn forked_children_die_with_the_group_on_every_exit_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.timeout = 1.0;
    for (directive, want) in [
        ("fork-exit", VerdictKind::Accepted),
        ("fork-hang", VerdictKind::Timeout),
    ] {
        let pidfile = dir.path().join(directive);
        let c = check_with(
            &o,
            &format!("by\n  -- fake:{directive} {}\n  trivial", pidfile.display()),
        );
        assert_eq!(c.verdict.kind, want, "{directive}");
        // Wait until both the child and its sleeping fork have written their pids.
        let all = pids(&pidfile);
        assert_eq!(all.len(), 2, "{directive}: {all:?}");
        for pid in all {
            // SIGKILL to the group is sent when the check returns; a killed process still
            // has to be scheduled to exit, which a loaded machine can delay by a few ms.
            let deadline = Instant::now() + Duration::from_secs(1);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(
                !alive(pid),
                "{directive}: pid {pid} is still running after 1 s"
            );
            assert!(
                !zombie_of_ours(pid),
                "{directive}: pid {pid} was not reaped"
            );
        }
    }
}

#[test]
fn output_flood_is_capped_and_killed() {
    // Through the checker: 50 MB of output against the default 8 MiB cap.
    let c = check("by\n  -- fake:flood 50\n  trivial");
    assert_eq!(c.verdict.kind, VerdictKind::Crashed);
    assert!(detail(&c).contains("printing more than 8388608 bytes"));

    // And the capture itself stays within the cap.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Flood.lean");
    std::fs::write(
        &file,
        "theorem t : True := by\n  -- fake:flood 50\n  trivial\n\n#print axioms t\n",
    )
    .unwrap();
    let mut command = std::process::Command::new("python3");
    command
        .arg(repo().join("tests/support/fake_lean.py"))
        .arg("--json")
        .arg(&file);
    let limits = Limits {
        timeout: Duration::from_secs(20),
        memory_bytes: None,
        output_cap: 1 << 20,
    };
    let out = run_limited(command, &limits).unwrap();
    assert_eq!(out.exit, Exit::OutputCap);
    assert_eq!(out.stdout.len(), 1 << 20);
}

#[test]
fn batches_keep_input_order_and_a_crash_does_not_spill_over() {
    let checker = Checker::new(&opts()).unwrap();
    let completions = [
        "by\n  -- fake:slow 0.5\n  trivial",
        "by\n  -- fake:crash\n  trivial",
        "by\n  trivial",
        "by\n  -- fake:error\n  trivial",
        "by\n  -- fake:axiom cheat\n  trivial",
    ];
    let jobs: Vec<Job> = completions
        .iter()
        .map(|c| Job::new(&theorem("t"), *c))
        .collect();
    let kinds: Vec<VerdictKind> = checker
        .check(&jobs, None)
        .unwrap()
        .iter()
        .map(|c| c.verdict.kind)
        .collect();
    use VerdictKind::*;
    assert_eq!(kinds, [Accepted, Crashed, Accepted, LeanError, Axioms]);
}

#[test]
fn identical_jobs_are_checked_once_and_remembered() {
    let checker = Checker::new(&opts()).unwrap();
    let job = Job::new(&theorem("t"), "by\n  -- fake:slow 0.3\n  trivial");
    let first = checker.check(&[job.clone(), job.clone()], None).unwrap();
    assert!(!first[0].cached && first[1].cached);
    assert_eq!(first[0].verdict, first[1].verdict);
    let again = check_one(&checker, &job);
    assert!(again.cached && again.seconds == 0.0);
    // A crash is not remembered: it may be the machine's fault.
    let crash = Job::new(&theorem("t"), "by\n  -- fake:crash\n  trivial");
    check_one(&checker, &crash);
    assert!(!check_one(&checker, &crash).cached);
}

#[test]
fn check_command_writes_jsonl_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = theorem("a");
    a.proof = Some("by\n  trivial".into());
    let mut b = theorem("b");
    b.proof = Some("by\n  -- fake:error\n  trivial".into());
    let out = dir.path().join("verdicts.jsonl");
    let summary = run_check(&[a.clone(), b.clone()], None, Some(&out), &opts(), false).unwrap();
    assert_eq!(
        summary.to_string(),
        "1 accepted, 1 rejected (lean_error: 1)"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["name"], "a");
    assert_eq!(lines[0]["accepted"], true);
    assert_eq!(lines[1]["kind"], "lean_error");
    assert_eq!(lines[1]["evidence"]["messages"][0]["line"], 3);

    let completions = dir.path().join("completions.jsonl");
    std::fs::write(&completions, "{\"name\": \"a\", \"completion\": \"by\\n  trivial\"}\n\n{\"name\": \"zz\", \"completion\": \"rfl\"}\n").unwrap();
    let err = run_check(
        &[a.clone(), b.clone()],
        Some(&completions),
        Some(&out),
        &opts(),
        false,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("completions.jsonl:3: no theorem named `zz`"),
        "{err:#}"
    );

    // Extra fields are ignored, as in theorem files: a file written for another tool checks.
    std::fs::write(
        &completions,
        "{\"name\": \"a\", \"completion\": \"by\\n  trivial\", \"expect_accepted\": true}\n\
         {\"name\": \"b\", \"completion\": \"by\\n  -- fake:error\\n  trivial\", \"model\": \"m\"}\n",
    )
    .unwrap();
    let summary = run_check(&[a, b], Some(&completions), Some(&out), &opts(), false).unwrap();
    assert_eq!(
        summary.to_string(),
        "1 accepted, 1 rejected (lean_error: 1)"
    );
}

#[test]
fn a_missing_lean_is_an_error_before_any_job() {
    let o = options(Backend::Lean, "/nonexistent/bin/lean --json");
    let err = Checker::new(&o).err().expect("must fail");
    assert!(
        err.to_string()
            .contains("`/nonexistent/bin/lean` is not an executable file"),
        "{err}"
    );
    // The default command needs `lake` on PATH and the Lake project; without either the error
    // names what is missing and the way out.
    let default = CheckerOptions {
        project: "/nonexistent/lean_env".into(),
        ..CheckerOptions::default()
    };
    let err = Checker::new(&default).err().expect("must fail").to_string();
    let has_lake = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("lake").is_file()));
    if has_lake {
        assert!(
            err.contains("/nonexistent/lean_env") && err.contains("--project DIR"),
            "{err}"
        );
    } else {
        assert!(
            err.contains("`lake` is not an executable file or on PATH")
                && err.contains("--lean-cmd"),
            "{err}"
        );
    }
}
