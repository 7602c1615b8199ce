//! Checker throughput: known-good proofs checked by the pool at one job and at one job per
//! core, against a bare loop that runs the same Lean command on the same files with no pool,
//! sandbox, limits or message parsing, one after another and split over one thread per core.
//! The difference at one job is what the pool costs per proof; the bare loop's own speed-up on
//! all cores is what the machine allows, the ceiling for the pool's.

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::timed;
use crate::data::Theorem;
use crate::lean::{network_isolation, Checker, CheckerOptions, CommandLine, Job, Source};

/// What the checker section ran with.
#[derive(Debug, Clone, Serialize)]
pub struct CheckerSettings {
    pub lean_cmd: String,
    pub proofs: usize,
    /// Pool sizes measured: 1 and the number of cores.
    pub jobs: [usize; 2],
    pub rounds: usize,
    /// Lean ran without network (`unshare --net`), as `check` does by default.
    pub network_isolation: bool,
}

/// Wall-clock time for the whole proof set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    pub seconds: f64,
    pub proofs_per_second: f64,
    pub ms_per_proof: f64,
}

impl Throughput {
    fn new(proofs: usize, seconds: f64) -> Throughput {
        Throughput {
            seconds,
            proofs_per_second: proofs as f64 / seconds,
            ms_per_proof: seconds * 1000.0 / proofs as f64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckerFigures {
    /// Proofs Lean accepted in every round of every configuration (all of them, or the
    /// measurement fails: a rejected proof would time an error path).
    pub accepted: usize,
    pub bare_loop: Throughput,
    /// The bare loop split over one thread per core.
    pub bare_loop_all_cores: Throughput,
    pub jobs_1: Throughput,
    pub jobs_all_cores: Throughput,
    /// `jobs_1` minus the bare loop, per proof: process sandbox, limits, `unshare`, temp files
    /// and verdict parsing. A difference of two timings, so noise can make it slightly negative.
    pub overhead_ms_per_proof: f64,
    /// `jobs_1` time over `jobs_all_cores` time.
    pub speedup_all_cores: f64,
    /// The bare loop's time over its time on all cores: the speed-up this machine gives the
    /// same processes without the pool (below the core count when cores share memory
    /// bandwidth, caches or a hypervisor's time).
    pub bare_speedup_all_cores: f64,
}

/// Checks the `proof` of every theorem `rounds` times in each configuration and keeps each
/// configuration's best round. Rounds interleave the configurations, so load from elsewhere on
/// the machine spreads over all of them.
pub fn measure(
    lean_cmd: &str,
    theorems: &[Theorem],
    rounds: usize,
) -> Result<(CheckerSettings, CheckerFigures)> {
    if theorems.is_empty() {
        bail!("the checker benchmark needs at least one theorem with a `proof`");
    }
    if let Some(t) = theorems.iter().find(|t| t.proof.is_none()) {
        bail!("theorem `{}` has no `proof` to check", t.name);
    }
    let jobs: Vec<Job> = theorems
        .iter()
        .map(|t| Job::new(t, t.proof.clone().unwrap_or_default()))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let options = |jobs| CheckerOptions {
        lean_cmd: Some(lean_cmd.to_string()),
        jobs,
        // Every round must run Lean: a cached verdict would time a hash lookup.
        cache: false,
        ..CheckerOptions::default()
    };
    let pools = [Checker::new(&options(1))?, Checker::new(&options(cores))?];
    let defaults = options(1);
    let bare = CommandLine::new(lean_cmd, &defaults.project, false, "lean")?;
    let n = jobs.len();
    let mut best = [f64::INFINITY; 4];
    for round in 1..=rounds.max(1) {
        best[0] = best[0].min(timed(|| bare_loop(&bare, theorems))?.0);
        best[3] = best[3].min(timed(|| bare_loop_parallel(&bare, theorems, cores))?.0);
        for (pool, slot) in pools.iter().zip(&mut best[1..3]) {
            let seconds = timed(|| {
                let results = pool.check(&jobs, None)?;
                if let Some((job, r)) = jobs
                    .iter()
                    .zip(&results)
                    .find(|(_, r)| !r.verdict.is_accepted())
                {
                    bail!(
                        "the proof of `{}` was not accepted ({}): the checker benchmark needs \
                         proofs that Lean accepts with this command",
                        job.name,
                        r.verdict.kind
                    );
                }
                Ok(())
            })?
            .0;
            *slot = slot.min(seconds);
        }
        tracing::info!(
            "bench: checker round {round}: bare loop {:.2} s ({:.2} s on {cores} threads), \
             jobs=1 {:.2} s, jobs={cores} {:.2} s (best so far, {n} proofs)",
            best[0],
            best[3],
            best[1],
            best[2]
        );
    }
    let settings = CheckerSettings {
        lean_cmd: lean_cmd.to_string(),
        proofs: n,
        jobs: [1, cores],
        rounds: rounds.max(1),
        network_isolation: defaults.isolate_network && network_isolation().is_ok(),
    };
    let figures = CheckerFigures {
        accepted: n,
        bare_loop: Throughput::new(n, best[0]),
        bare_loop_all_cores: Throughput::new(n, best[3]),
        jobs_1: Throughput::new(n, best[1]),
        jobs_all_cores: Throughput::new(n, best[2]),
        overhead_ms_per_proof: (best[1] - best[0]) * 1000.0 / n as f64,
        speedup_all_cores: best[1] / best[2],
        bare_speedup_all_cores: best[0] / best[3],
    };
    Ok((settings, figures))
}

/// [`bare_loop`] on `threads` threads, each with every `threads`-th theorem.
fn bare_loop_parallel(command: &CommandLine, theorems: &[Theorem], threads: usize) -> Result<()> {
    let threads = threads.max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let share: Vec<Theorem> =
                    theorems.iter().skip(k).step_by(threads).cloned().collect();
                scope.spawn(move || bare_loop(command, &share))
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("a bare-loop thread panicked"))?
        })
    })
}

/// The same files as the pool checks, written and run one after another in one directory.
fn bare_loop(command: &CommandLine, theorems: &[Theorem]) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let file = dir.path().join("Check.lean");
    for t in theorems {
        let proof = t.proof.as_deref().unwrap_or_default();
        let source = Source::new(&t.preamble(), &t.statement, proof, &t.name);
        std::fs::write(&file, source.full_text())
            .with_context(|| format!("cannot write {}", file.display()))?;
        let path = file.to_string_lossy();
        let out = command
            .command(&[path.as_ref()], dir.path())
            .stdin(Stdio::null())
            .output()
            .context("cannot run the Lean command")?;
        if !out.status.success() {
            bail!(
                "Lean rejected the proof of `{}` ({}): {}",
                t.name,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    Ok(())
}
