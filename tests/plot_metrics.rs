//! Training curves: a PNG drawn from a synthetic run, and the errors a user sees for bad input.

use lean_grpo::plot::{plot_run, read_metrics, StepMetrics};
use std::fs;
use std::path::Path;

/// RGB pixels of a PNG file, with its size.
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixels = buf[..info.buffer_size()]
        .chunks(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, pixels)
}

fn run_dir(lines: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
    dir
}

#[test]
fn draws_every_curve_in_its_panel_and_text() {
    let mut lines = String::new();
    for step in 0..40u32 {
        let reward = -0.5 + step as f64 / 40.0;
        let pass = (step as f64 / 50.0).min(1.0);
        let length = 30.0 - step as f64 / 2.0;
        let kl = step as f64 * 1e-3;
        // Extra keys are what a real run logs besides the plotted series.
        lines.push_str(&format!(
            "{{\"step\":{step},\"reward_mean\":{reward},\"pass_rate\":{pass},\"loss\":0.1,\"kl\":0.01,\"lr\":1e-5,\"completion_length_mean\":{length},\"kl_to_start\":{kl}}}\n"
        ));
    }
    let dir = run_dir(&lines);
    let out = dir.path().join("curves.png");
    plot_run(dir.path(), &out).unwrap();

    let (w, h, pixels) = decode(&out);
    assert_eq!((w, h), (1400, 1200));
    // Pixels matching `pred` in the panel at `row` (of 3) and `column` (of 2).
    let count = |pred: &dyn Fn(&[u8; 3]) -> bool, row: u32, column: u32| {
        let (ys, xs) = (
            row * h / 3..(row + 1) * h / 3,
            column * w / 2..(column + 1) * w / 2,
        );
        ys.flat_map(|y| xs.clone().map(move |x| (y * w + x) as usize))
            .filter(|&i| pred(&pixels[i]))
            .count()
    };
    let blue = |p: &[u8; 3]| p[2] > 150 && p[0] < 80; // reward curve
    let red = |p: &[u8; 3]| p[0] > 180 && p[1] < 80 && p[2] < 80; // pass-rate curve
    let green = |p: &[u8; 3]| p[1] > 130 && p[0] < 90 && p[2] < 90; // diagnostics
    let dark = |p: &[u8; 3]| p[0] < 100 && p[1] < 100 && p[2] < 100; // text, axes
    assert!(count(&blue, 0, 0) > 300, "reward curve missing");
    assert!(count(&red, 0, 1) > 300, "pass-rate curve missing");
    assert_eq!(
        count(&red, 0, 0),
        0,
        "pass rate leaked into the reward panel"
    );
    assert!(count(&green, 1, 1) > 300, "completion length curve missing");
    assert!(count(&green, 2, 1) > 300, "KL to the base model missing");
    // Lines without them (share of no-proof replies, entropy here) leave their panels empty.
    assert_eq!(count(&green, 1, 0), 0, "a curve drawn from no data");
    assert_eq!(count(&green, 2, 0), 0, "a curve drawn from no data");
    // The title strip holds only the title text: dark pixels there mean the font rendered.
    let title = (0..30 * w as usize).filter(|&i| dark(&pixels[i])).count();
    assert!(title > 50, "no title text drawn");
    assert!(
        pixels.iter().filter(|p| dark(p)).count() > 2000,
        "no axes or labels drawn"
    );
}

#[test]
fn a_fim_run_gets_a_row_with_its_mask_ratio_and_pass_rate_by_ratio() {
    // An adaptive curriculum: 0.2 for ten steps, then 0.4 (passing less), then 0.6.
    let mut lines = String::new();
    for step in 1..=30u32 {
        let (ratio, pass) = match step {
            1..=10 => (0.2, 0.9),
            11..=20 => (0.4, 0.6),
            _ => (0.6, 0.3),
        };
        lines.push_str(&format!(
            "{{\"step\":{step},\"reward_mean\":{pass},\"pass_rate\":{pass},\"mask_ratio\":{ratio},\"pass_rate_by_ratio\":{{\"0.200\":0.9}}}}\n"
        ));
    }
    let dir = run_dir(&lines);
    let out = dir.path().join("fim.png");
    plot_run(dir.path(), &out).unwrap();
    let (w, h, pixels) = decode(&out);
    assert_eq!((w, h), (1400, 1600), "four rows of panels");
    let in_panel = |pred: &dyn Fn(&[u8; 3]) -> bool, column: u32| {
        let ys = 3 * h / 4..h;
        let xs = column * w / 2..(column + 1) * w / 2;
        ys.flat_map(|y| xs.clone().map(move |x| (y * w + x) as usize))
            .filter(|&i| pred(&pixels[i]))
            .count()
    };
    let green = |p: &[u8; 3]| p[1] > 130 && p[0] < 90 && p[2] < 90;
    let red = |p: &[u8; 3]| p[0] > 180 && p[1] < 80 && p[2] < 80;
    assert!(in_panel(&green, 0) > 300, "mask ratio curve missing");
    assert!(in_panel(&red, 1) > 200, "pass rate by ratio missing");

    // A whole-proof run keeps three rows.
    let plain = run_dir("{\"step\":1,\"reward_mean\":0.5,\"pass_rate\":0.5}\n");
    let out = plain.path().join("plain.png");
    plot_run(plain.path(), &out).unwrap();
    assert_eq!(decode(&out).1, 1200);
}

#[test]
fn single_step_and_null_values_still_plot() {
    let dir = run_dir("{\"step\":3,\"reward_mean\":0.25,\"pass_rate\":null}\n\n");
    let out = dir.path().join("one.png");
    plot_run(dir.path(), &out).unwrap();
    let (_, _, pixels) = decode(&out);
    assert!(
        pixels.iter().any(|p| p[2] > 150 && p[0] < 80),
        "the one reward point is drawn"
    );
}

#[test]
fn reads_last_line_of_a_repeated_step_in_step_order() {
    let dir = run_dir(concat!(
        "{\"step\":2,\"reward_mean\":0.2,\"pass_rate\":0.1}\n",
        "{\"step\":1,\"reward_mean\":0.1,\"pass_rate\":0.0}\n",
        "{\"step\":2,\"reward_mean\":0.9,\"pass_rate\":0.5,\"resumed\":true}\n",
        "{\"step\":3,\"reward_mean\":null,\"pass_rate\":0.6}\n",
    ));
    let metrics = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics,
        [
            StepMetrics {
                step: 1,
                reward_mean: Some(0.1),
                pass_rate: Some(0.0),
                ..StepMetrics::default()
            },
            StepMetrics {
                step: 2,
                reward_mean: Some(0.9),
                pass_rate: Some(0.5),
                ..StepMetrics::default()
            },
            StepMetrics {
                step: 3,
                reward_mean: None,
                pass_rate: Some(0.6),
                ..StepMetrics::default()
            },
        ]
    );
}

fn plot_error(lines: &str) -> (String, String) {
    let dir = run_dir(lines);
    let out = dir.path().join("x.png");
    let err = format!("{:#}", plot_run(dir.path(), &out).unwrap_err());
    assert!(!out.exists(), "no PNG for bad input");
    (err, dir.path().join("metrics.jsonl").display().to_string())
}

#[test]
fn malformed_lines_are_named_by_file_and_line() {
    let good = "{\"step\":0,\"reward_mean\":0.0,\"pass_rate\":0.0}\n";

    let (err, file) = plot_error(&format!("{good}\n{{\"step\":1,\"reward_mean\":0.5,\n"));
    assert!(
        err.contains(&format!("{file}:3: malformed metrics line")),
        "{err}"
    );
    assert!(err.contains("not valid JSON"), "{err}");

    let (err, file) = plot_error(&format!("{good}{{\"step\":1,\"reward_mean\":0.5}}\n"));
    assert!(err.contains(&format!("{file}:2:")), "{err}");
    assert!(err.contains("missing field `pass_rate`"), "{err}");

    let (err, _) = plot_error("{\"step\":-1,\"reward_mean\":0.5,\"pass_rate\":0.1}\n");
    assert!(
        err.contains(":1:") && err.contains("`step` must be a non-negative integer"),
        "{err}"
    );

    let (err, _) = plot_error("{\"step\":1,\"reward_mean\":\"high\",\"pass_rate\":0.1}\n");
    assert!(
        err.contains("`reward_mean` must be a number or null, found \"high\""),
        "{err}"
    );

    let (err, _) = plot_error("[1, 2, 3]\n");
    assert!(err.contains("expected a JSON object"), "{err}");
}

#[test]
fn empty_or_missing_metrics_say_so() {
    let (err, file) = plot_error("\n  \n");
    assert!(
        err.contains(&format!("{file} has no training steps yet")),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        plot_run(dir.path(), &dir.path().join("x.png")).unwrap_err()
    );
    assert!(
        err.contains("reading training metrics") && err.contains("metrics.jsonl"),
        "{err}"
    );
}

#[test]
fn unwritable_output_names_the_path() {
    let dir = run_dir("{\"step\":0,\"reward_mean\":0.0,\"pass_rate\":0.0}\n");
    let out = dir.path().join("no-such-dir").join("x.png");
    let err = format!("{:#}", plot_run(dir.path(), &out).unwrap_err());
    assert!(err.contains(&format!("writing {}", out.display())), "{err}");
}
