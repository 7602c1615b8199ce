//! pass@k: the probability that at least one of `k` samples solves a problem.
//!
//! We draw `n ≥ k` samples per problem, count the `c` that the checker accepts, and use the
//! unbiased estimator of Chen et al. (2021), `1 − C(n−c, k) / C(n, k)`. Taking the fraction of
//! problems solved within the first `k` samples would also be unbiased but throws away the other
//! `n − k` samples; computing the binomials directly overflows long before realistic `n`.
//! So the ratio is evaluated as the product `∏_{i=n−c+1}^{n} (1 − k/i)`, which stays in `[0, 1]`
//! at every step.
//!
//! When `k > n` the estimator is undefined: with fewer samples than `k` there is no unbiased
//! estimate, and any number printed would be a guess. Those cells are `None` and the table says
//! how many samples were missing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Unbiased pass@k for one problem with `n` samples of which `c` were accepted.
///
/// Returns `None` when the estimate does not exist: `k == 0` or `k > n`.
///
/// # Panics
/// If `c > n`: more accepted samples than samples is a counting bug in the caller, not data.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    assert!(c <= n, "pass_at_k: {c} accepted samples out of only {n}");
    if k == 0 || k > n {
        return None;
    }
    // Every size-k subset contains an accepted sample.
    if n - c < k {
        return Some(1.0);
    }
    let miss_all: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    Some(1.0 - miss_all)
}

/// The checker's counts for one problem: the input of pass@k.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemCounts {
    /// Theorem name, carried into the report so a reader can find the problem.
    pub name: String,
    /// Samples drawn.
    pub samples: usize,
    /// Samples the checker accepted.
    pub accepted: usize,
}

/// pass@k of one problem for each requested `k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemPassAtK {
    pub name: String,
    pub samples: usize,
    pub accepted: usize,
    /// `k → pass@k`; `None` where `k > samples`.
    pub pass_at_k: BTreeMap<usize, Option<f64>>,
}

/// pass@k over a set of problems: what `eval` writes to its JSON report and prints as a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassAtKSummary {
    /// Number of problems evaluated.
    pub problems: usize,
    /// Fewest samples any problem got; pass@k exists for every `k` up to this.
    pub min_samples_per_problem: usize,
    /// Most samples any problem got (equal to the minimum in a normal run).
    pub max_samples_per_problem: usize,
    /// Problems with at least one accepted sample.
    pub solved: usize,
    /// `k →` mean pass@k over all problems; `None` if some problem has fewer than `k` samples,
    /// since averaging only the problems that have enough samples would bias the mean.
    pub pass_at_k: BTreeMap<usize, Option<f64>>,
    /// Per-problem values, in input order.
    pub per_problem: Vec<ProblemPassAtK>,
}

/// Computes per-problem pass@k and the mean over problems for every `k` in `ks`.
///
/// Duplicate `k`s are reported once; `k == 0` is reported as not computable.
///
/// # Panics
/// If some problem has more accepted samples than samples (see [`pass_at_k`]).
pub fn summarize(problems: &[ProblemCounts], ks: &[usize]) -> PassAtKSummary {
    let per_problem: Vec<ProblemPassAtK> = problems
        .iter()
        .map(|p| ProblemPassAtK {
            name: p.name.clone(),
            samples: p.samples,
            accepted: p.accepted,
            pass_at_k: ks
                .iter()
                .map(|&k| (k, pass_at_k(p.samples, p.accepted, k)))
                .collect(),
        })
        .collect();
    let pass_at_k = ks
        .iter()
        .map(|&k| {
            let values: Option<Vec<f64>> = per_problem.iter().map(|p| p.pass_at_k[&k]).collect();
            let mean = values
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64);
            (k, mean)
        })
        .collect();
    PassAtKSummary {
        problems: problems.len(),
        min_samples_per_problem: problems.iter().map(|p| p.samples).min().unwrap_or(0),
        max_samples_per_problem: problems.iter().map(|p| p.samples).max().unwrap_or(0),
        solved: problems.iter().filter(|p| p.accepted > 0).count(),
        pass_at_k,
        per_problem,
    }
}

/// Renders the summary as a plain-text table for the terminal and logs.
///
/// ```text
/// pass@k over 3 problems, 10 samples each, 2 solved
///    k   pass@k
///    1    36.67%
///   16   n/a (needs 16 samples per problem, fewest drawn was 10)
/// ```
pub fn render_table(summary: &PassAtKSummary) -> String {
    let samples = if summary.min_samples_per_problem == summary.max_samples_per_problem {
        format!("{} samples each", summary.min_samples_per_problem)
    } else {
        format!(
            "{}-{} samples each",
            summary.min_samples_per_problem, summary.max_samples_per_problem
        )
    };
    let mut out = format!(
        "pass@k over {} problems, {samples}, {} solved\n",
        summary.problems, summary.solved
    );
    let width = summary
        .pass_at_k
        .keys()
        .map(|k| k.to_string().len())
        .max()
        .unwrap_or(1)
        .max(1);
    let _ = writeln!(out, "  {:>width$}   pass@k", "k");
    for (k, value) in &summary.pass_at_k {
        let cell = match value {
            Some(v) => format!("{:6.2}%", 100.0 * v),
            None if summary.problems == 0 => "n/a (no problems)".to_string(),
            None if *k == 0 => "n/a (k must be at least 1)".to_string(),
            None => format!(
                "n/a (needs {k} samples per problem, fewest drawn was {})",
                summary.min_samples_per_problem
            ),
        };
        let _ = writeln!(out, "  {k:>width$}   {cell}");
    }
    out
}
