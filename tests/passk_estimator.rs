//! The pass@k estimator against known values, the naive binomial formula, and its invariants.

use lean_grpo::passk::{pass_at_k, render_table, summarize, ProblemCounts};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

/// `C(n, k)` exactly, in u128 (enough for n ≤ 60).
fn binomial(n: u128, k: u128) -> u128 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    (0..k).fold(1u128, |acc, i| acc * (n - i) / (i + 1))
}

#[test]
fn known_values() {
    // n = 10: nothing solved, one solved, all solved.
    for k in [1, 5, 10] {
        assert_eq!(pass_at_k(10, 0, k), Some(0.0), "c=0 k={k}");
        assert_eq!(pass_at_k(10, 10, k), Some(1.0), "c=10 k={k}");
    }
    // One accepted of ten: pass@k = k/10.
    assert!(close(pass_at_k(10, 1, 1).unwrap(), 0.1));
    assert!(close(pass_at_k(10, 1, 5).unwrap(), 0.5));
    assert!(close(pass_at_k(10, 1, 10).unwrap(), 1.0));
    // pass@1 is the accepted fraction.
    assert!(close(pass_at_k(2, 1, 1).unwrap(), 0.5));
    assert!(close(pass_at_k(10, 3, 1).unwrap(), 0.3));
    // n=4 c=2 k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6.
    assert!(close(pass_at_k(4, 2, 2).unwrap(), 5.0 / 6.0));
    // n=10 c=2 k=5: 1 - C(8,5)/C(10,5) = 1 - 56/252.
    assert!(close(pass_at_k(10, 2, 5).unwrap(), 1.0 - 56.0 / 252.0));
}

#[test]
fn not_computable_when_k_exceeds_n_or_is_zero() {
    assert_eq!(pass_at_k(10, 3, 11), None);
    assert_eq!(pass_at_k(0, 0, 1), None);
    assert_eq!(pass_at_k(10, 3, 0), None);
}

#[test]
fn matches_naive_binomial_formula_for_small_n() {
    for n in 1..=30u128 {
        for c in 0..=n {
            for k in 1..=n {
                let naive = 1.0 - binomial(n - c, k) as f64 / binomial(n, k) as f64;
                let stable = pass_at_k(n as usize, c as usize, k as usize).unwrap();
                assert!(
                    (naive - stable).abs() < 1e-12,
                    "n={n} c={c} k={k}: naive {naive} vs product {stable}"
                );
            }
        }
    }
}

#[test]
fn stable_where_binomials_overflow() {
    // C(1000, 500) is ~1e299 and C(2000, 1000) overflows f64; the product form does not care.
    let v = pass_at_k(2000, 1, 1000).unwrap();
    assert!(close(v, 0.5), "{v}");
    let v = pass_at_k(5000, 7, 64).unwrap();
    assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{v}");
}

#[test]
fn monotone_in_k_and_in_c() {
    for n in [1usize, 2, 7, 16, 64] {
        for c in 0..=n {
            let values: Vec<f64> = (1..=n).map(|k| pass_at_k(n, c, k).unwrap()).collect();
            for w in values.windows(2) {
                assert!(
                    w[0] <= w[1] + 1e-15,
                    "n={n} c={c}: not monotone in k: {values:?}"
                );
            }
            if c < n {
                for k in 1..=n {
                    assert!(
                        pass_at_k(n, c, k) <= pass_at_k(n, c + 1, k),
                        "n={n} c={c} k={k}"
                    );
                }
            }
        }
    }
}

#[test]
fn mean_over_problems_and_table() {
    let problems = vec![
        ProblemCounts {
            name: "a".into(),
            samples: 10,
            accepted: 0,
        },
        ProblemCounts {
            name: "b".into(),
            samples: 10,
            accepted: 1,
        },
        ProblemCounts {
            name: "c".into(),
            samples: 10,
            accepted: 10,
        },
    ];
    let s = summarize(&problems, &[1, 5, 16]);
    assert_eq!(s.problems, 3);
    assert_eq!(s.solved, 2);
    assert_eq!(
        (s.min_samples_per_problem, s.max_samples_per_problem),
        (10, 10)
    );
    assert!(close(s.pass_at_k[&1].unwrap(), (0.0 + 0.1 + 1.0) / 3.0));
    assert!(close(s.pass_at_k[&5].unwrap(), (0.0 + 0.5 + 1.0) / 3.0));
    assert_eq!(s.pass_at_k[&16], None);
    assert_eq!(s.per_problem[1].name, "b");
    assert!(close(s.per_problem[1].pass_at_k[&5].unwrap(), 0.5));

    let table = render_table(&s);
    assert!(
        table.starts_with("pass@k over 3 problems, 10 samples each, 2 solved\n"),
        "{table}"
    );
    assert!(table.contains("   1    36.67%\n"), "{table}");
    assert!(table.contains("   5    50.00%\n"), "{table}");
    assert!(
        table.contains("  16   n/a (needs 16 samples per problem, fewest drawn was 10)\n"),
        "{table}"
    );

    // JSON round trip: k keys survive as numbers-in-strings and come back as usize.
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"16\":null"), "{json}");
    let back: lean_grpo::passk::PassAtKSummary = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn one_short_problem_makes_the_mean_not_computable() {
    let problems = vec![
        ProblemCounts {
            name: "full".into(),
            samples: 8,
            accepted: 8,
        },
        ProblemCounts {
            name: "short".into(),
            samples: 4,
            accepted: 0,
        },
    ];
    let s = summarize(&problems, &[4, 8]);
    assert!(close(s.pass_at_k[&4].unwrap(), 0.5));
    assert_eq!(
        s.pass_at_k[&8], None,
        "averaging only `full` would report 100%"
    );
    assert!(render_table(&s).contains("4-8 samples each"));
}

#[test]
fn empty_problem_set() {
    let s = summarize(&[], &[1]);
    assert_eq!(s.pass_at_k[&1], None);
    assert!(render_table(&s).contains("n/a (no problems)"));
}
