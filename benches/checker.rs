//! Checker throughput on the 75 proofs of data/prelude.jsonl with a real Lean
//! (`LEAN_GRPO_TEST_LEAN`, from `scripts/test-lean.sh`): proofs per second at jobs=1 and
//! jobs=cores, and the pool's overhead per proof against a bare loop of the same `lean --json`
//! invocations. Prints figures; asserts nothing about speed.
//!
//!     export LEAN_GRPO_TEST_LEAN=$(scripts/test-lean.sh)
//!     cargo bench --bench checker

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use lean_grpo::data::Theorem;
use lean_grpo::lean::{Backend, Checker, CheckerOptions, Job, Source};

const ROUNDS: usize = 3;

fn main() {
    let Some(lean) = std::env::var("LEAN_GRPO_TEST_LEAN")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        eprintln!("SKIP bench checker: LEAN_GRPO_TEST_LEAN unset (export LEAN_GRPO_TEST_LEAN=$(scripts/test-lean.sh))");
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/prelude.jsonl");
    let text = std::fs::read_to_string(&path).expect("data/prelude.jsonl");
    let theorems: Vec<Theorem> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("prelude record"))
        .collect();
    let jobs: Vec<Job> = theorems
        .iter()
        .map(|t| Job::new(t, t.proof.clone().unwrap_or_default()))
        .collect();
    let n = jobs.len();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("checker bench: {n} prelude proofs, real Lean at {lean}, {cores} cores, best of {ROUNDS} rounds");

    // Rounds interleave the configurations, so load from elsewhere on the machine spreads over
    // all of them; each configuration keeps its best round.
    let configs = [(1, false), (1, true), (cores, false), (cores, true)];
    let checkers: Vec<Checker> = configs
        .iter()
        .map(|&(jobs_n, isolate)| {
            let options = CheckerOptions {
                backend: Backend::Lean,
                lean_cmd: Some(format!("'{lean}' --json")),
                project: "/nonexistent/lean_env".into(),
                jobs: jobs_n,
                timeout: 60.0,
                cache: false,
                isolate_network: isolate,
                ..CheckerOptions::default()
            };
            Checker::new(&options).expect("checker")
        })
        .collect();
    let mut bare = f64::INFINITY;
    let mut pooled = vec![f64::INFINITY; configs.len()];
    for _ in 0..ROUNDS {
        bare = bare.min(timed(|| bare_loop(&lean, &theorems)));
        for (checker, best) in checkers.iter().zip(pooled.iter_mut()) {
            *best = best.min(timed(|| {
                let results = checker.check(&jobs, None).expect("check");
                let accepted = results.iter().filter(|c| c.verdict.is_accepted()).count();
                assert_eq!(accepted, n, "every prelude proof must be accepted");
            }));
        }
    }
    report("bare loop (lean --json, sequential)", n, bare, None);
    for (&(jobs_n, isolate), seconds) in configs.iter().zip(pooled) {
        let label = format!(
            "checker jobs={jobs_n} unshare={}",
            if isolate { "on" } else { "off" }
        );
        report(&label, n, seconds, (jobs_n == 1).then_some(bare));
    }
}

/// The same files, written and checked one after another with no pool, limits or parsing.
fn bare_loop(lean: &str, theorems: &[Theorem]) {
    let dir = tempfile::tempdir().expect("temp dir");
    for t in theorems {
        let source = Source::new(
            &t.preamble(),
            &t.statement,
            t.proof.as_deref().unwrap_or_default(),
            &t.name,
        );
        let file = dir.path().join("Check.lean");
        std::fs::write(&file, source.full_text()).expect("write");
        let out = Command::new(lean)
            .arg("--json")
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .expect("run lean");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

fn timed(f: impl FnOnce()) -> f64 {
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64()
}

fn report(label: &str, n: usize, seconds: f64, bare: Option<f64>) {
    let per = seconds / n as f64 * 1000.0;
    let mut line = format!(
        "{label:<38} {:>7.2} s  {:>6.1} proofs/s  {per:>6.1} ms/proof",
        seconds,
        n as f64 / seconds
    );
    if let Some(bare) = bare {
        let overhead = (seconds - bare) / n as f64 * 1000.0;
        line.push_str(&format!(
            "  ratio to bare {:.3}  overhead {overhead:+.1} ms/proof",
            seconds / bare
        ));
    }
    println!("{line}");
}
