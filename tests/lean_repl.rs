//! The `repl` backend against a fake leanprover-community/repl (tests/support/fake_repl.py):
//! verdicts from REPL responses, header reuse, LRU eviction, recycling, and workers that hang,
//! die or get killed mid-batch.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

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

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn options(&self, jobs: usize) -> CheckerOptions {
        let args = format!(
            "--pidfile '{}' --log '{}'",
            self.pidfile().display(),
            self.log().display()
        );
        let mut o = options(Backend::Repl, &fake_repl_cmd(&args));
        o.jobs = jobs;
        o
    }

    fn pidfile(&self) -> std::path::PathBuf {
        self.dir.path().join("pids")
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("log")
    }

    /// How many requests of each kind the workers got: (headers, proofs).
    fn requests(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let headers = log.lines().filter(|l| l.ends_with(" header")).count();
        (headers, log.lines().count() - headers)
    }

    fn marker(&self) -> std::path::PathBuf {
        self.dir.path().join("died-once")
    }
}

fn with_header(name: &str, module: &str) -> Theorem {
    let mut t = theorem(name);
    t.imports = vec![module.to_string()];
    t
}

fn kinds(checker: &Checker, jobs: &[Job]) -> Vec<VerdictKind> {
    checker
        .check(jobs, None)
        .unwrap()
        .into_iter()
        .map(|c| c.verdict.kind)
        .collect()
}

fn job(directive: &str) -> Job {
    Job::new(
        &theorem("t"),
        format!("by\n  -- fake:{directive}\n  trivial"),
    )
}

#[test]
fn verdicts_from_repl_responses_with_one_header_import_per_worker() {
    let fake = Fake::new();
    let checker = Checker::new(&fake.options(2)).unwrap();
    let jobs = [
        Job::new(&theorem("t"), "by\n  trivial"),
        job("error"),
        job("sorry"),
        job("axiom cheat"),
        Job::new(&theorem("t"), "by\n  exact (t)"),
        Job::new(&theorem("t"), "by\n  exact sorry"),
    ];
    use VerdictKind::*;
    assert_eq!(
        kinds(&checker, &jobs),
        [Accepted, LeanError, Sorry, Axioms, Accepted, Forbidden]
    );
    let (headers, proofs) = fake.requests();
    assert_eq!(proofs, 5);
    assert!(headers <= 2, "{headers} header imports for 2 workers");
    let checked = check_one(&checker, &job("error"));
    let m = &checked.verdict.evidence.messages[0];
    assert_eq!(
        (m.line, m.column, m.text.as_str()),
        (Some(3), Some(2), "unsolved goals\n⊢ Nat")
    );
}

#[test]
fn a_timeout_kills_the_worker_and_the_next_proof_reimports_the_header() {
    let fake = Fake::new();
    let mut o = fake.options(1);
    o.timeout = 1.0;
    let checker = Checker::new(&o).unwrap();
    let ok = Job::new(&theorem("t"), "by\n  trivial");
    let started = Instant::now();
    use VerdictKind::*;
    assert_eq!(
        kinds(&checker, &[ok.clone(), job("hang"), job("axiom a")]),
        [Accepted, Timeout, Axioms]
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        fake.requests().0,
        2,
        "the header is sent again to the new worker"
    );
    let workers = pids(&fake.pidfile());
    assert_eq!(workers.len(), 2);
    assert!(
        !alive(workers[0]) && !zombie_of_ours(workers[0]),
        "the hung worker is gone"
    );
}

#[test]
fn a_worker_that_dies_mid_proof_is_replaced_and_the_proof_retried() {
    let fake = Fake::new();
    let checker = Checker::new(&fake.options(2)).unwrap();
    let once = Job::new(
        &theorem("t"),
        format!(
            "by\n  -- fake:die-once {}\n  trivial",
            fake.marker().display()
        ),
    );
    let jobs = [
        job("axiom a"),
        once,
        job("die"),
        job("axiom b"),
        Job::new(&theorem("t"), "by\n  trivial"),
    ];
    let results = checker.check(&jobs, None).unwrap();
    let got: Vec<VerdictKind> = results.iter().map(|c| c.verdict.kind).collect();
    use VerdictKind::*;
    assert_eq!(got, [Axioms, Accepted, Crashed, Axioms, Accepted]);
    assert!(results[2]
        .verdict
        .evidence
        .detail
        .as_deref()
        .unwrap()
        .contains("REPL process ended (exit status 1)"));
}

#[test]
fn a_worker_killed_from_outside_mid_batch_loses_no_verdict() {
    let fake = Fake::new();
    let checker = Checker::new(&fake.options(1)).unwrap();
    let jobs: Vec<Job> = (0..4).map(|i| job(&format!("sleep 0.{}", 3 + i))).collect();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Kill the first worker while it sleeps on a proof.
            let deadline = Instant::now() + Duration::from_secs(5);
            while fake.requests().1 < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let first = pids(&fake.pidfile())[0];
            // SAFETY: SIGKILL to a process this test started.
            unsafe { libc::kill(first as i32, libc::SIGKILL) };
        });
        let got = kinds(&checker, &jobs);
        assert_eq!(got, [VerdictKind::Accepted; 4]);
    });
    assert_eq!(pids(&fake.pidfile()).len(), 2, "one replacement worker");
}

#[test]
fn workers_are_keyed_by_header_with_lru_eviction_and_recycled() {
    let fake = Fake::new();
    let mut o = fake.options(1);
    o.repl_recycle_after = 3;
    let checker = Checker::new(&o).unwrap();
    // Distinct proofs (a numbered comment) defeat the verdict cache.
    let mut n = 0;
    let mut on = |module: &str| {
        n += 1;
        Job::new(
            &with_header("t", module),
            format!("by\n  -- {n}\n  trivial"),
        )
    };
    let batches = [
        vec![on("A"), on("A")],
        vec![on("B")],
        vec![on("A")],
        vec![on("A"), on("A"), on("A")],
    ];
    for jobs in batches {
        assert!(kinds(&checker, &jobs)
            .iter()
            .all(|k| *k == VerdictKind::Accepted));
    }
    // A, (A) | B evicts A | A evicts B | (A) (A) then recycled after 3 proofs | A again.
    let (headers, proofs) = fake.requests();
    assert_eq!(proofs, 7);
    assert_eq!(
        headers,
        4,
        "{}",
        std::fs::read_to_string(fake.log()).unwrap()
    );
}

#[test]
fn the_memory_limit_applies_to_workers() {
    let fake = Fake::new();
    let mut o = fake.options(1);
    o.memory_mb = 100;
    let checker = Checker::new(&o).unwrap();
    use VerdictKind::*;
    let ok = Job::new(&theorem("t"), "by\n  trivial");
    assert_eq!(
        kinds(&checker, &[job("memory 400"), ok]),
        [Memory, Accepted]
    );
}

#[test]
fn dropping_the_checker_stops_every_worker() {
    let fake = Fake::new();
    let checker = Checker::new(&fake.options(2)).unwrap();
    let jobs: Vec<Job> = (0..4).map(|i| job(&format!("axiom a{i}"))).collect();
    assert!(kinds(&checker, &jobs)
        .iter()
        .all(|k| *k == VerdictKind::Axioms));
    let workers = pids(&fake.pidfile());
    assert!(!workers.is_empty() && workers.iter().all(|p| alive(*p)));
    drop(checker);
    for pid in workers {
        assert!(
            !alive(pid) && !zombie_of_ours(pid),
            "worker {pid} outlived the checker"
        );
    }
    assert!(!Path::new(&fake.dir.path().join("nothing")).exists());
}
