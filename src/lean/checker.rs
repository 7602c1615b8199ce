//! The checker: from (theorem, completion) jobs to verdicts, in parallel, in input order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::ProgressBar;
use serde::Serialize;

use super::backend::{Backoff, KiminaCluster, ProcessBackend, ReplPool, ReplSettings, Runner};
use super::cache::{self, VerdictCache};
use super::command::{network_isolation, CommandLine};
use super::extract::{extract_proof, Extracted};
use super::fill::{fill_hole, Filled};
use super::options::{Backend, CheckerOptions};
use super::sandbox::Limits;
use super::screen::{screen, ScreenPolicy};
use super::source::Source;
use super::verdict::{judge, without_run, Verdict, VerdictKind};
use crate::data::fim::Hole;
use crate::data::Theorem;

const DEFAULT_LEAN_CMD: &str = "lake env lean --json";
const DEFAULT_REPL_CMD: &str = "lake env repl";

/// One proof to check: a theorem from the data set and what the model wrote for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The record's name (used for `#print axioms` when the statement declares none).
    pub name: String,
    pub preamble: String,
    /// From the data set, never from the model.
    pub statement: String,
    /// The model's completion (fenced block, restated theorem or bare proof) or a proof.
    pub completion: String,
    /// A fill-in-the-middle job: the completion fills this hole (docs/fim.md).
    pub hole: Option<Hole>,
}

impl Job {
    pub fn new(theorem: &Theorem, completion: impl Into<String>) -> Job {
        Job {
            name: theorem.name.clone(),
            preamble: theorem.preamble(),
            statement: theorem.statement.clone(),
            completion: completion.into(),
            hole: theorem.hole.clone(),
        }
    }
}

/// The verdict on one job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checked {
    pub verdict: Verdict,
    /// Wall-clock seconds Lean took (0 when no process ran).
    pub seconds: f64,
    /// The verdict came from the cache or from an identical job of the same batch.
    pub cached: bool,
    /// The proof extracted from the completion, as checked (`None` when there was none).
    pub proof: Option<String>,
    /// Requests sent again to another kimina server before the verdict.
    pub retries: u32,
}

/// Checks proofs with the configured backend. `Send + Sync`: one checker can serve a training
/// loop from another thread while the model samples.
pub struct Checker {
    options: CheckerOptions,
    runner: Runner,
    identity: String,
    policy: ScreenPolicy,
    cache: Option<VerdictCache>,
    /// `checker_unavailable` verdicts in a row (see [`Checker::count_unavailable`]).
    unavailable_in_a_row: AtomicUsize,
}

enum Prepared {
    Done(Verdict, Option<String>),
    Run { source: Source, key: cache::Key },
}

impl Checker {
    /// Validate the options and set the backend up (no Lean process starts here).
    pub fn new(options: &CheckerOptions) -> anyhow::Result<Checker> {
        if !(options.timeout.is_finite() && options.timeout > 0.0) {
            bail!(
                "checker timeout must be a positive number of seconds, got {}",
                options.timeout
            );
        }
        if options.memory_mb == 0 || options.output_cap_mb == 0 {
            bail!("checker memory_mb and output_cap_mb must be positive");
        }
        let timeout = Duration::from_secs_f64(options.timeout);
        let memory_bytes = options.memory_mb << 20;
        let output_cap = (options.output_cap_mb << 20) as usize;
        let (runner, identity) = match options.backend {
            Backend::Lean => {
                let command = local_command(
                    options,
                    options.lean_cmd.as_deref(),
                    DEFAULT_LEAN_CMD,
                    "lean",
                )?;
                let identity = command.identity();
                let limits = Limits {
                    timeout,
                    memory_bytes: Some(memory_bytes),
                    output_cap,
                };
                (
                    Runner::Process(ProcessBackend { command, limits }),
                    identity,
                )
            }
            Backend::Repl => {
                let command = local_command(
                    options,
                    options.repl_cmd.as_deref(),
                    DEFAULT_REPL_CMD,
                    "repl",
                )?;
                let identity = command.identity();
                let settings = ReplSettings {
                    capacity: options.effective_jobs(),
                    timeout,
                    header_timeout: Duration::from_secs(600),
                    memory_bytes,
                    recycle_after: options.repl_recycle_after.max(1),
                    recycle_bytes: options.repl_recycle_mb << 20,
                    output_cap,
                };
                (Runner::Repl(ReplPool::new(command, settings)), identity)
            }
            Backend::Kimina => {
                if options.kimina_url.is_empty() {
                    bail!(
                        "backend kimina needs the server URL: --kimina-url URL (repeat it, or \
                         give a comma list, for several servers; or kimina_url in the checker \
                         section)"
                    );
                }
                let backoff = Backoff {
                    attempts: options.kimina_attempts.max(1),
                    ..Backoff::default()
                };
                let api_key = match &options.kimina_api_key_env {
                    Some(var) => Some(kimina_api_key(var)?),
                    None => None,
                };
                let client =
                    KiminaCluster::new(&options.kimina_url, options.timeout, backoff, api_key);
                let identity = client.identity();
                (Runner::Kimina(client), identity)
            }
        };
        let identity = format!(
            "{} | {identity} | timeout {} memory {} native {} caps {}/{}",
            options.backend.name(),
            options.timeout,
            options.memory_mb,
            options.allow_native_decide,
            options.heartbeats_cap,
            options.rec_depth_cap
        );
        let policy = ScreenPolicy {
            heartbeats_cap: options.heartbeats_cap,
            rec_depth_cap: options.rec_depth_cap,
            allow_native_decide: options.allow_native_decide,
        };
        let cache = options.cache.then(VerdictCache::default);
        Ok(Checker {
            options: options.clone(),
            runner,
            identity,
            policy,
            cache,
            unavailable_in_a_row: AtomicUsize::new(0),
        })
    }

    pub fn options(&self) -> &CheckerOptions {
        &self.options
    }

    /// Check every job; results come back in input order. Identical jobs (same theorem and
    /// proof) are checked once. Errors only when the checker itself fails (Lean cannot start,
    /// the kimina server is unreachable): a proof's failure is always a verdict.
    pub fn check(
        &self,
        jobs: &[Job],
        progress: Option<&ProgressBar>,
    ) -> anyhow::Result<Vec<Checked>> {
        let tick = || {
            if let Some(bar) = progress {
                bar.inc(1);
            }
        };
        let mut results: Vec<Option<Checked>> = vec![None; jobs.len()];
        let mut first_of: HashMap<cache::Key, usize> = HashMap::new();
        let mut duplicates: Vec<(usize, usize)> = Vec::new();
        let mut todo: Vec<(usize, Source)> = Vec::new();
        let mut keys: Vec<Option<cache::Key>> = vec![None; jobs.len()];
        for (i, job) in jobs.iter().enumerate() {
            match self.prepare(job) {
                Prepared::Done(verdict, proof) => {
                    results[i] = Some(Checked {
                        verdict,
                        seconds: 0.0,
                        cached: false,
                        proof,
                        retries: 0,
                    });
                    tick();
                }
                Prepared::Run { source, key } => {
                    keys[i] = Some(key);
                    if let Some(&first) = first_of.get(&key) {
                        duplicates.push((i, first));
                        continue;
                    }
                    first_of.insert(key, i);
                    let proof = Some(source.proof().to_string());
                    if let Some(verdict) = self.cache.as_ref().and_then(|c| c.get(&key)) {
                        results[i] = Some(Checked {
                            verdict,
                            seconds: 0.0,
                            cached: true,
                            proof,
                            retries: 0,
                        });
                        tick();
                    } else {
                        todo.push((i, source));
                    }
                }
            }
        }
        let ran = self.run_all(&todo, &tick)?;
        for ((i, _), checked) in todo.iter().zip(ran) {
            if let (Some(cache), Some(key)) = (&self.cache, keys[*i]) {
                cache.insert(key, &checked.verdict);
            }
            results[*i] = Some(checked);
        }
        for (i, first) in duplicates {
            let mut checked = results[first]
                .clone()
                .context("a duplicate job's original has no verdict")?;
            checked.cached = true;
            checked.seconds = 0.0;
            checked.retries = 0;
            results[i] = Some(checked);
            tick();
        }
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.with_context(|| format!("job {i} got no verdict")))
            .collect()
    }

    /// Extraction, statement comparison and screening: everything decided without Lean.
    fn prepare(&self, job: &Job) -> Prepared {
        let extracted = match &job.hole {
            Some(hole) => match fill_hole(&job.completion, hole) {
                Filled::Proof(proof) => Extracted::Proof(proof),
                Filled::Empty => Extracted::NoProof,
                Filled::Mismatch(why) => {
                    return Prepared::Done(without_run(VerdictKind::HoleMismatch, why), None)
                }
            },
            None => extract_proof(&job.completion, &job.statement),
        };
        let proof = match extracted {
            Extracted::Proof(proof) => proof,
            Extracted::NoProof => {
                return Prepared::Done(
                    without_run(VerdictKind::NoProof, "the completion has no proof text"),
                    None,
                )
            }
            Extracted::StatementChanged { restated } => {
                let mut verdict = without_run(
                    VerdictKind::StatementChanged,
                    "the completion restates a different statement",
                );
                verdict.evidence.restated = Some(restated);
                return Prepared::Done(verdict, None);
            }
        };
        if let Err(screened) = screen(&proof, &self.policy) {
            return Prepared::Done(Verdict::forbidden(screened), Some(proof));
        }
        let key = cache::key(&self.identity, &job.preamble, &job.statement, &proof);
        Prepared::Run {
            source: Source::new(&job.preamble, &job.statement, &proof, &job.name),
            key,
        }
    }

    /// Run the sources on `jobs` threads (each mostly waits on Lean), in input order.
    fn run_all(
        &self,
        todo: &[(usize, Source)],
        tick: &(dyn Fn() + Sync),
    ) -> anyhow::Result<Vec<Checked>> {
        let slots: Vec<Mutex<Option<Checked>>> = todo.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let threads = self.options.effective_jobs().min(todo.len());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= todo.len() || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let (index, source) = &todo[k];
                    let started = Instant::now();
                    match self.runner.run(source, &index.to_string()) {
                        Ok(run) => {
                            let verdict = judge(&run, source, self.options.allow_native_decide);
                            if let Err(e) = self.count_unavailable(&verdict) {
                                failed.store(true, Ordering::SeqCst);
                                let mut first = error.lock().unwrap_or_else(|e| e.into_inner());
                                first.get_or_insert(e);
                            }
                            let seconds = started.elapsed().as_secs_f64();
                            let proof = Some(source.proof().to_string());
                            *slots[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(Checked {
                                verdict,
                                seconds,
                                cached: false,
                                proof,
                                retries: run.retries,
                            });
                            tick();
                        }
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                        }
                    }
                });
            }
        });
        if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e.context("the checker failed"));
        }
        slots
            .into_iter()
            .map(|slot| {
                slot.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .context("a job was not run")
            })
            .collect()
    }
}

impl Checker {
    /// Counts `checker_unavailable` verdicts in a row (across calls); an error once there are
    /// `max_unavailable` of them, so a run whose servers are all gone stops instead of
    /// training on empty rewards.
    fn count_unavailable(&self, verdict: &Verdict) -> anyhow::Result<()> {
        if verdict.kind != VerdictKind::CheckerUnavailable {
            self.unavailable_in_a_row.store(0, Ordering::SeqCst);
            return Ok(());
        }
        let n = self.unavailable_in_a_row.fetch_add(1, Ordering::SeqCst) + 1;
        let limit = self.options.max_unavailable;
        // Workers race on the counter, so the one that reports may have counted past the limit;
        // the message names the limit, which is what was crossed, the same on every run.
        if limit > 0 && n >= limit {
            bail!(
                "{limit} proofs in a row got no verdict: no kimina server answered ({}). Last: {}. \
                 Start or fix the servers (or raise checker.max_unavailable) and resume",
                self.options.kimina_url.join(", "),
                verdict.evidence.detail.as_deref().unwrap_or("no detail")
            );
        }
        Ok(())
    }
}

/// The command of a local backend, wrapped for network isolation when configured.
fn local_command(
    options: &CheckerOptions,
    configured: Option<&str>,
    default: &str,
    what: &str,
) -> anyhow::Result<CommandLine> {
    let line = configured.unwrap_or(default);
    let mut command = CommandLine::new(line, &options.project, configured.is_none(), what)?;
    if options.isolate_network {
        match network_isolation() {
            Ok(prefix) => command.wrapper = prefix,
            Err(why) => tracing::warn!(
                "Lean will run WITH network access: `unshare --net` is not available here ({why}). \
                 Set `isolate_network: false` in the checker section to silence this warning."
            ),
        }
    }
    Ok(command)
}

/// The kimina API key from the environment variable `checker.kimina_api_key_env` names.
fn kimina_api_key(var: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_string()),
        _ => bail!(
            "environment variable {var} (checker.kimina_api_key_env) is unset or empty: export \
             the kimina servers' API key (their LEAN_SERVER_API_KEY) in it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checker>();
    }
}
