//! `lean-grpo check`: verdicts for a theorem file's own proofs or for model completions.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checker::{Checker, Job};
use super::options::CheckerOptions;
use super::verdict::VerdictKind;
use crate::data::Theorem;

/// Counts of one `check` run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckSummary {
    pub total: usize,
    pub accepted: usize,
    pub rejected: usize,
    /// Count per verdict kind (only kinds that occurred).
    pub by_kind: BTreeMap<VerdictKind, usize>,
    /// Requests sent again to another kimina server (a cluster's failovers).
    pub retries: usize,
}

impl fmt::Display for CheckSummary {
    /// `N accepted, M rejected (lean_error: 2, sorry: 1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} accepted, {} rejected", self.accepted, self.rejected)?;
        let rejections: Vec<String> = self
            .by_kind
            .iter()
            .filter(|(kind, _)| **kind != VerdictKind::Accepted)
            .map(|(kind, n)| format!("{kind}: {n}"))
            .collect();
        if !rejections.is_empty() {
            write!(f, " ({})", rejections.join(", "))?;
        }
        if self.retries > 0 {
            write!(f, "; {} checker retries", self.retries)?;
        }
        Ok(())
    }
}

/// One line of a completions file. Other fields (`expect_accepted`, a model name, ...) are
/// ignored, as they are in theorem files, so a file written for another tool checks as is.
#[derive(Deserialize)]
struct CompletionRecord {
    name: String,
    completion: String,
}

/// Check each theorem's `proof`, or (with `completions`, JSONL of `{"name", "completion"}`)
/// each completion against the theorem of that name. Writes one JSON line per job to `output`
/// (stdout when `None`): `name`, `kind`, `accepted`, `seconds`, `cached`, `proof`, `evidence`.
pub fn run_check(
    theorems: &[Theorem],
    completions: Option<&Path>,
    output: Option<&Path>,
    options: &CheckerOptions,
    show_progress: bool,
) -> anyhow::Result<CheckSummary> {
    let jobs = match completions {
        Some(path) => completion_jobs(theorems, path)?,
        None => proof_jobs(theorems)?,
    };
    let checker = Checker::new(options)?;
    let bar = crate::progress::bar(jobs.len(), 0, "proof", show_progress);
    let results = checker.check(&jobs, Some(&bar))?;
    bar.finish_and_clear();

    let mut sink: Box<dyn Write> = match output {
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let mut summary = CheckSummary {
        total: jobs.len(),
        ..CheckSummary::default()
    };
    for (job, checked) in jobs.iter().zip(&results) {
        let kind = checked.verdict.kind;
        *summary.by_kind.entry(kind).or_default() += 1;
        summary.retries += checked.retries as usize;
        if checked.verdict.is_accepted() {
            summary.accepted += 1;
        } else {
            summary.rejected += 1;
        }
        let line = json!({
            "name": job.name,
            "kind": kind,
            "accepted": checked.verdict.is_accepted(),
            "seconds": (checked.seconds * 1000.0).round() / 1000.0,
            "cached": checked.cached,
            "proof": checked.proof,
            "evidence": checked.verdict.evidence,
        });
        writeln!(sink, "{line}").context("cannot write a verdict line")?;
    }
    sink.flush().context("cannot write the verdicts")?;
    Ok(summary)
}

fn proof_jobs(theorems: &[Theorem]) -> anyhow::Result<Vec<Job>> {
    let missing: Vec<&str> = theorems
        .iter()
        .filter(|t| t.proof.is_none())
        .map(|t| t.name.as_str())
        .collect();
    if let Some(first) = missing.first() {
        bail!(
            "{} of {} theorems have no `proof` (first: `{first}`); give model completions with --completions FILE",
            missing.len(),
            theorems.len()
        );
    }
    Ok(theorems
        .iter()
        .map(|t| Job::new(t, t.proof.clone().unwrap_or_default()))
        .collect())
}

fn completion_jobs(theorems: &[Theorem], path: &Path) -> anyhow::Result<Vec<Job>> {
    let by_name: HashMap<&str, &Theorem> = theorems.iter().map(|t| (t.name.as_str(), t)).collect();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open completions file {}", path.display()))?;
    let mut jobs = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let record: CompletionRecord = serde_json::from_str(&line)
            .with_context(|| format!("{}: expected {{\"name\": …, \"completion\": …}}", at()))?;
        let theorem = by_name.get(record.name.as_str()).with_context(|| {
            format!(
                "{}: no theorem named `{}` in the theorem file",
                at(),
                record.name
            )
        })?;
        jobs.push(Job::new(theorem, record.completion));
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_lists_rejections_by_kind() {
        let mut s = CheckSummary {
            total: 4,
            accepted: 1,
            rejected: 3,
            ..Default::default()
        };
        s.by_kind.insert(VerdictKind::Accepted, 1);
        s.by_kind.insert(VerdictKind::Sorry, 1);
        s.by_kind.insert(VerdictKind::LeanError, 2);
        assert_eq!(
            s.to_string(),
            "1 accepted, 3 rejected (lean_error: 2, sorry: 1)"
        );
    }
}
