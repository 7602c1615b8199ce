//! Statistics of a group's rewards, shared by the advantages (docs/algorithms.md §3.2–§3.3)
//! and DGPO's pairs (§4.5). All in f64.

/// A group is zero-variance when its shaped rewards span at most this (docs/algorithms.md §3.2).
pub const ZERO_VARIANCE_SPAN: f64 = 1e-9;

/// max − min of a group's rewards ≤ 1e-9.
pub fn is_zero_variance(group: &[f64]) -> bool {
    let max = group.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = group.iter().copied().fold(f64::INFINITY, f64::min);
    group.is_empty() || max - min <= ZERO_VARIANCE_SPAN
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Sample standard deviation (Bessel); 0 for fewer than two values.
pub fn sample_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    (ss / (xs.len() - 1) as f64).sqrt()
}

/// 0-based ranks inside a group; ties share the mean of the ranks they span.
pub fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && xs[order[end]] == xs[order[start]] {
            end += 1;
        }
        let shared = (start + end - 1) as f64 / 2.0;
        for &i in &order[start..end] {
            out[i] = shared;
        }
        start = end;
    }
    out
}
