//! Sampling filters, reproducible random streams and stop strings.

use std::collections::BTreeSet;

use lean_grpo::model::sampler::{Sampler, SamplerState, StopMatch, StopStrings};
use lean_grpo::model::SamplingOptions;

fn opts(temperature: f64, top_k: usize, top_p: f64, min_p: f64) -> SamplingOptions {
    SamplingOptions {
        temperature,
        top_k,
        top_p,
        min_p,
        ..SamplingOptions::default()
    }
}

/// Logits whose softmax at temperature 1 is exactly `probs` (up to rounding).
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[sampler.sample(logits).unwrap() as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

#[test]
fn temperature_zero_is_argmax_and_ignores_the_seed() {
    let logits = [0.1f32, 2.5, -1.0, 2.5, 0.0];
    for seed in 0..5 {
        let mut s = Sampler::new(&opts(0.0, 0, 1.0, 0.0), seed);
        assert!(s.is_greedy());
        // First index among equal maxima, like torch.argmax.
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }
    let mut s = Sampler::new(&opts(0.0, 0, 1.0, 0.0), 0);
    assert_eq!(s.sample(&[f32::NAN, -3.0, f32::NEG_INFINITY]).unwrap(), 1);
}

#[test]
fn top_k_one_is_argmax() {
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32;
    let mut s = Sampler::new(&opts(1.5, 1, 1.0, 0.0), 42);
    for _ in 0..200 {
        assert_eq!(s.sample(&logits).unwrap(), best);
    }
}

#[test]
fn same_seed_same_stream_other_seed_other_stream() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let draw = |seed| {
        let mut s = Sampler::new(&opts(1.0, 0, 1.0, 0.0), seed);
        (0..300)
            .map(|_| s.sample(&logits).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

#[test]
fn restored_state_continues_identically() {
    let o = opts(0.8, 20, 0.95, 0.01);
    let logits: Vec<f32> = (0..500).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
    let mut a = Sampler::new(&o, 1234);
    for _ in 0..137 {
        a.sample(&logits).unwrap();
    }
    let saved = serde_json::to_string(&a.state()).unwrap();
    let continued: Vec<u32> = (0..200).map(|_| a.sample(&logits).unwrap()).collect();

    let state: SamplerState = serde_json::from_str(&saved).unwrap();
    let mut b = Sampler::from_state(&o, state);
    let resumed: Vec<u32> = (0..200).map(|_| b.sample(&logits).unwrap()).collect();
    assert_eq!(continued, resumed);
    assert_eq!(a.state(), b.state());
}

#[test]
fn every_draw_consumes_one_random_number_whatever_the_filters() {
    // The stream position after n draws does not depend on the options, so changing top-k in
    // a resumed run does not shift the samples of later rows.
    let logits: Vec<f32> = (0..300).map(|i| (i as f32 * 0.7).sin() * 4.0).collect();
    let state_after = |o: SamplingOptions| {
        let mut s = Sampler::new(&o, 21);
        for _ in 0..50 {
            s.sample(&logits).unwrap();
        }
        s.state()
    };
    let plain = state_after(opts(1.0, 0, 1.0, 0.0));
    assert_eq!(state_after(opts(0.7, 1, 0.5, 0.3)), plain);
    assert_eq!(state_after(opts(1.3, 40, 0.9, 0.0)), plain);
    assert_ne!(plain, Sampler::new(&opts(1.0, 0, 1.0, 0.0), 21).state());
}

#[test]
fn frequencies_match_the_tempered_softmax() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -2.0, 3.0];
    let t = 0.7;
    let weights: Vec<f64> = logits.iter().map(|&l| (f64::from(l) / t).exp()).collect();
    let z: f64 = weights.iter().sum();
    let expected: Vec<f64> = weights.iter().map(|w| w / z).collect();

    let draws = 200_000;
    let mut s = Sampler::new(&opts(t, 0, 1.0, 0.0), 99);
    let got = frequencies(&mut s, &logits, draws);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        // Five standard errors of a binomial frequency.
        let tol = 5.0 * (e * (1.0 - e) / draws as f64).sqrt();
        assert!(
            (g - e).abs() <= tol,
            "token {i}: frequency {g} vs softmax {e} (tol {tol})"
        );
    }
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p() {
    let logits = logits_of(&[0.3, 0.5, 0.05, 0.15]);
    // Sorted: 1 (0.5), 0 (0.3), 3 (0.15), 2 (0.05). Mass before token 0 is 0.5 < 0.75: kept;
    // before token 3 it is 0.8 >= 0.75: cut.
    let mut s = Sampler::new(&opts(1.0, 0, 0.75, 0.0), 5);
    let f = frequencies(&mut s, &logits, 40_000);
    assert_eq!((f[2], f[3]), (0.0, 0.0), "{f:?}");
    assert!(
        (f[1] - 0.625).abs() < 0.015 && (f[0] - 0.375).abs() < 0.015,
        "{f:?}"
    );

    let mut s = Sampler::new(&opts(1.0, 0, 0.85, 0.0), 5);
    let f = frequencies(&mut s, &logits, 40_000);
    assert_eq!(f[2], 0.0, "{f:?}");
    assert!(f[3] > 0.1, "{f:?}");
}

#[test]
fn top_p_on_a_flat_vocabulary_matches_a_full_sort() {
    // Mass spread over ~thousands of tokens forces the nucleus past its first prefix.
    let n = 4_000;
    let logits: Vec<f32> = (0..n)
        .map(|i| ((i * 104_729) % 3989) as f32 / 3989.0)
        .collect();
    let t = 0.5;
    let top_p = 0.6;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| (f64::from(logits[i]) / t).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut mass = 0.0;
    let mut allowed = BTreeSet::new();
    for (&i, wi) in idx.iter().zip(&w) {
        if mass >= top_p * z {
            break;
        }
        allowed.insert(i as u32);
        mass += wi;
    }
    assert!(allowed.len() > 500, "{}", allowed.len());

    let mut s = Sampler::new(&opts(t, 0, top_p, 0.0), 3);
    let mut seen = BTreeSet::new();
    for _ in 0..20_000 {
        let id = s.sample(&logits).unwrap();
        assert!(allowed.contains(&id), "token {id} is outside the nucleus");
        seen.insert(id);
    }
    // The most probable excluded token is right after the cut; the kept set is well covered.
    assert!(seen.len() as f64 > 0.9 * allowed.len() as f64);
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_best() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    // Threshold 0.2 × 0.5 = 0.1: token 3 (0.05) goes, token 2 (0.15) stays.
    let mut s = Sampler::new(&opts(1.0, 0, 1.0, 0.2), 11);
    let f = frequencies(&mut s, &logits, 40_000);
    assert_eq!(f[3], 0.0, "{f:?}");
    assert!((f[2] - 0.15 / 0.95).abs() < 0.01, "{f:?}");
}

#[test]
fn filters_apply_after_temperature_in_hf_order() {
    // At T = 0.25 the probabilities become ∝ p^4: [0.0625, 0.0081, 0.0005, ~0]/Σ, so top-p 0.85
    // keeps only token 0, where at T = 1 it would keep three tokens.
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let mut s = Sampler::new(&opts(0.25, 0, 0.85, 0.0), 1);
    for _ in 0..2000 {
        assert_eq!(s.sample(&logits).unwrap(), 0);
    }
    // top-k 2 then min-p relative to the best survivor.
    let mut s = Sampler::new(&opts(1.0, 2, 1.0, 0.7), 1);
    let f = frequencies(&mut s, &logits, 5000);
    assert_eq!(f[0], 1.0, "{f:?}");
}

#[test]
fn nan_logits_are_never_drawn_and_an_all_nan_row_is_an_error() {
    let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
    let mut s = Sampler::new(&opts(1.0, 0, 1.0, 0.0), 0);
    let f = frequencies(&mut s, &logits, 2000);
    assert_eq!((f[0], f[2]), (0.0, 0.0));
    // +inf is not a certainty but an overflow: excluded too.
    let f = frequencies(&mut s, &[f32::INFINITY, 0.0, -1.0], 500);
    assert_eq!(f[0], 0.0);

    let err = s
        .sample(&[f32::NAN, f32::NEG_INFINITY])
        .unwrap_err()
        .to_string();
    assert!(err.contains("none of the 2 logits is finite"), "{err}");
}

#[test]
fn stop_strings_find_the_earliest_match() {
    let stops = StopStrings::new(&["```".to_string(), "\n\n\n".to_string(), String::new()]);
    assert!(!stops.is_empty());
    let text = "theorem t : True := by\n  trivial\n```\nmore";
    assert_eq!(stops.find(text), Some(StopMatch { start: 33, end: 36 }));
    assert_eq!(&text[..33], "theorem t : True := by\n  trivial\n");
    assert_eq!(stops.find("no stop here"), None);

    // Only empty strings: nothing to stop on.
    let none = StopStrings::new(&[String::new()]);
    assert!(none.is_empty());
    assert_eq!(none.find("anything"), None);

    // On a tie of start positions the longer stop string wins.
    let nested = StopStrings::new(&["END".to_string(), "END!".to_string()]);
    assert_eq!(nested.find("xEND!"), Some(StopMatch { start: 1, end: 5 }));
}

#[test]
fn stop_strings_incremental_search_catches_matches_across_chunks() {
    let stops = StopStrings::new(&["</proof>".to_string()]);
    // The text grows in chunks that split the stop string; each call searches only new text
    // (plus the overlap a stop string can straddle).
    let chunks = ["simp ∀ ", "done </pr", "oof> trailing"];
    let mut text = String::new();
    let mut checked = 0;
    let mut found = None;
    for chunk in chunks {
        text.push_str(chunk);
        if let Some(m) = stops.find_new(&text, checked) {
            found = Some(m);
            break;
        }
        checked = text.len();
    }
    let m = found.unwrap();
    assert_eq!(&text[m.start..m.end], "</proof>");
    assert_eq!(&text[..m.start], "simp ∀ done ");

    // A checked offset inside a multi-byte character is moved back to a boundary.
    // Here the window would start at byte 1, inside "∀" (bytes 0..3).
    let stops = StopStrings::new(&["zzz".to_string(), "b".to_string()]);
    assert_eq!(
        stops.find_new("∀b", 3),
        Some(StopMatch { start: 3, end: 4 })
    );
}

#[test]
fn a_batch_of_rows_draws_what_row_by_row_sampling_draws() {
    let rows: Vec<Vec<f32>> = (0..9)
        .map(|r| {
            (0..400)
                .map(|i| ((i * (r + 3)) as f32 * 0.013).sin() * 4.0)
                .collect()
        })
        .collect();
    for o in [
        opts(1.0, 0, 1.0, 0.0),
        opts(0.7, 40, 0.9, 0.02),
        opts(0.0, 0, 1.0, 0.0),
    ] {
        let (mut batch, mut single) = (Sampler::new(&o, 42), Sampler::new(&o, 42));
        for _ in 0..20 {
            let together = batch.sample_rows(&rows).unwrap();
            let one_by_one: Vec<u32> = rows.iter().map(|r| single.sample(r).unwrap()).collect();
            assert_eq!(together, one_by_one);
        }
        assert_eq!(batch.state(), single.state());
    }
    let mut bad = rows.clone();
    bad[4] = vec![f32::NAN; 400];
    let err = Sampler::new(&opts(1.0, 0, 1.0, 0.0), 1)
        .sample_rows(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("none of the 400 logits is finite"), "{err}");
}

/// The entropy a step reports is that of the temperature-scaled distribution the tokens were
/// drawn from, before the filters, averaged over draws and reset when taken.
#[test]
fn sampled_entropy_is_the_mean_entropy_of_the_scaled_distributions() {
    let probs = [0.5, 0.25, 0.125, 0.125];
    let h = -probs.iter().map(|p: &f64| p * p.ln()).sum::<f64>();
    let uniform = vec![0.0f32; 8];
    // top-k does not change the figure: it describes the policy, not the filter.
    let mut s = Sampler::new(&opts(1.0, 2, 1.0, 0.0), 3);
    assert_eq!(s.take_entropy(), None, "nothing drawn yet");
    s.sample(&logits_of(&probs)).unwrap();
    s.sample_rows(&[uniform.clone(), logits_of(&probs)])
        .unwrap();
    let mean = s.take_entropy().unwrap();
    let want = (2.0 * h + 8f64.ln()) / 3.0;
    assert!((mean - want).abs() < 1e-5, "{mean} vs {want}");
    assert_eq!(s.take_entropy(), None, "taking resets");
    // Temperature 2 flattens: the entropy of softmax(logits / 2).
    let mut s = Sampler::new(&opts(2.0, 0, 1.0, 0.0), 3);
    s.sample(&logits_of(&probs)).unwrap();
    let scaled: Vec<f64> = probs.iter().map(|p| p.sqrt()).collect();
    let z: f64 = scaled.iter().sum();
    let h2 = -scaled.iter().map(|q| q / z * (q / z).ln()).sum::<f64>();
    assert!((s.take_entropy().unwrap() - h2).abs() < 1e-5);
    // Greedy decoding draws from no distribution.
    let mut s = Sampler::new(&opts(0.0, 0, 1.0, 0.0), 3);
    s.sample(&uniform).unwrap();
    assert_eq!(s.take_entropy(), None);
}
