//! Fill-in-the-middle holes (src/lean/holes.rs): syntax-aligned, with the requested ratio,
//! reproducible, and splicing back to the original proof.

use lean_grpo::data::fim::Hole;
use lean_grpo::lean::holes::{holes, sample_hole, tokens, RATIO_WINDOW};

const TERM: &str = "MyEq.trans (N.succ_add N.z x) (MyEq.congrArg (fun t => N.add t \"a (b\") \
                    (N.zero_add x))";

const TACTIC: &str = "by
  intro n m -- a comment (with a paren
  induction m with
  | zero => simp [foo, \"str -- not a comment\"]
  | succ k ih =>
    /- a block
       comment -/
    rw [Nat.add_succ]
    exact congrArg Nat.succ ih
  exact h.1";

/// The byte offsets where tokens start and end.
fn edges(proof: &str) -> (Vec<usize>, Vec<usize>) {
    let toks = tokens(proof);
    (
        toks.iter().map(|t| t.start).collect(),
        toks.iter().map(|t| t.end).collect(),
    )
}

fn bracket_balance(text: &str) -> i32 {
    tokens(text)
        .into_iter()
        .map(|t| match &text[t] {
            "(" | "[" | "{" | "⟨" => 1,
            ")" | "]" | "}" | "⟩" => -1,
            _ => 0,
        })
        .sum()
}

/// Every hole starts at a token start, ends at a token end, splices back, and cuts the same
/// tokens the proof has there (no identifier, literal or comment is split).
fn assert_aligned(proof: &str, hole: &Hole) {
    assert_eq!(hole.splice(&hole.cut), proof, "{hole:?}");
    if hole.is_whole() {
        return;
    }
    let (starts, ends) = edges(proof);
    let from = hole.prefix.len();
    let to = from + hole.cut.len();
    assert!(starts.contains(&from), "starts inside a token: {hole:?}");
    assert!(ends.contains(&to), "ends inside a token: {hole:?}");
    let inside: Vec<&str> = tokens(proof)
        .into_iter()
        .filter(|t| t.start >= from && t.end <= to)
        .map(|t| &proof[t])
        .collect();
    let own: Vec<&str> = tokens(&hole.cut)
        .into_iter()
        .map(|t| &hole.cut[t])
        .collect();
    assert_eq!(inside, own, "the cut lexes differently alone: {hole:?}");
    assert_eq!(bracket_balance(&hole.cut), 0, "unbalanced: {hole:?}");
    let total = tokens(proof).len() as f64;
    assert!(
        (hole.ratio - own.len() as f64 / total).abs() < 1e-9,
        "{hole:?}"
    );
}

#[test]
fn term_holes_are_sub_terms_or_arguments() {
    let all = holes(TERM);
    assert!(all.len() > 10, "{}", all.len());
    for hole in &all {
        assert_aligned(TERM, hole);
        let cut = hole.cut.trim();
        assert!(
            !cut.starts_with("fun") && !cut.starts_with("=>"),
            "{hole:?}"
        );
        assert!(
            !hole.prefix.ends_with("fun "),
            "a binder is a hole: {hole:?}"
        );
    }
    let cuts: Vec<&str> = all.iter().map(|h| h.cut.as_str()).collect();
    for expected in [
        "(N.succ_add N.z x)",
        "N.succ_add N.z x",
        "N.z x",
        "(N.zero_add x)",
        "\"a (b\"",
        "N.add t \"a (b\"",
    ] {
        assert!(cuts.contains(&expected), "{expected} missing from {cuts:?}");
    }
    // Never half an identifier, half a string, or a bracket without its partner.
    for bad in ["succ_add", "Eq.trans", "\"a", "(N.succ_add", "N.z x)"] {
        assert!(!cuts.contains(&bad), "{bad} is a hole");
    }
}

#[test]
fn tactic_holes_are_whole_lines_and_blocks() {
    let all = holes(TACTIC);
    for hole in &all {
        assert_aligned(TACTIC, hole);
        if hole.is_whole() {
            continue;
        }
        // A hole starts a line (after its indentation) and ends at a line's last token.
        let line_start = hole.prefix.rsplit('\n').next().unwrap_or("");
        assert!(line_start.trim().is_empty(), "mid-line start: {hole:?}");
        let rest = hole.suffix.split('\n').next().unwrap_or("");
        assert!(
            rest.trim().is_empty() || rest.trim_start().starts_with("--"),
            "mid-line end: {hole:?}"
        );
        // A block is never cut in half: the line after the hole is not deeper than its start.
        let indent = line_start.chars().count();
        if let Some(next) = hole.suffix.lines().nth(1).filter(|l| !l.trim().is_empty()) {
            let next_indent = next.len() - next.trim_start().len();
            assert!(next_indent <= indent, "block split: {hole:?}");
        }
    }
    let cuts: Vec<&str> = all.iter().map(|h| h.cut.as_str()).collect();
    assert!(cuts.contains(&"exact h.1"));
    assert!(cuts.contains(&"rw [Nat.add_succ]\n    exact congrArg Nat.succ ih"));
    assert!(
        cuts.iter()
            .any(|c| c.starts_with("induction m with") && c.ends_with("ih")),
        "the induction block as a whole: {cuts:?}"
    );
    // The comment's line-ending text stays outside, and a block comment is never split.
    assert!(!cuts
        .iter()
        .any(|c| c.contains("a block") && !c.contains("comment -/")));
    assert!(
        !cuts.contains(&"| succ k ih =>"),
        "a line without its block"
    );
    assert!(
        !cuts.contains(&"induction m with"),
        "a `with` without its alternatives"
    );
}

#[test]
fn sampled_ratios_are_the_closest_available() {
    for proof in [TERM, TACTIC] {
        let available: Vec<f64> = holes(proof).iter().map(|h| h.ratio).collect();
        for seed in 0..5 {
            for ratio in [0.1, 0.25, 0.5, 0.75, 0.9] {
                let hole = sample_hole(proof, ratio, seed).unwrap();
                let best = available
                    .iter()
                    .map(|r| (r - ratio).abs())
                    .fold(f64::INFINITY, f64::min);
                assert!(
                    (hole.ratio - ratio).abs() <= best + RATIO_WINDOW + 1e-9,
                    "{ratio}: got {} (best distance {best})",
                    hole.ratio
                );
                assert_aligned(proof, &hole);
            }
        }
    }
    // The term fixture has enough holes to land within 0.1 of every ratio asked.
    for ratio in [0.1, 0.3, 0.5, 0.7, 0.9] {
        let hole = sample_hole(TERM, ratio, 7).unwrap();
        assert!((hole.ratio - ratio).abs() <= 0.1, "{ratio}: {}", hole.ratio);
    }
    assert!(sample_hole(TACTIC, 1.0, 1).unwrap().is_whole());
}

#[test]
fn the_same_seed_gives_the_same_hole() {
    for ratio in [0.1, 0.3, 0.5] {
        let first: Vec<Hole> = (0..20)
            .map(|s| sample_hole(TERM, ratio, s).unwrap())
            .collect();
        let again: Vec<Hole> = (0..20)
            .map(|s| sample_hole(TERM, ratio, s).unwrap())
            .collect();
        assert_eq!(first, again);
    }
    // Where several holes are as close (single atoms at 0.1), different seeds vary the hole.
    let distinct: std::collections::HashSet<String> = (0..20)
        .map(|s| sample_hole(TERM, 0.1, s).unwrap().prefix)
        .collect();
    assert!(distinct.len() > 1, "seeds never vary the hole");
}

/// A prelude record with a two-argument term proof, and its FIM example at ratio 0.3.
fn trans_example() -> (lean_grpo::data::Theorem, lean_grpo::data::Theorem) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/prelude.jsonl");
    let theorems = lean_grpo::data::load_theorems(&path, None).unwrap();
    let theorem = theorems
        .into_iter()
        .find(|t| {
            t.proof
                .as_deref()
                .is_some_and(|p| p.starts_with("MyEq.trans ("))
        })
        .unwrap();
    let example = lean_grpo::lean::holes::example(&theorem, 0.3, 5)
        .unwrap()
        .unwrap();
    (theorem, example)
}

#[test]
fn the_prompt_shows_the_hole_and_ratio_one_is_the_whole_proof_task() {
    let (theorem, example) = trans_example();
    let theorem = &theorem;
    let proof = theorem.proof.as_deref().unwrap();
    let hole = example.hole.as_ref().expect("0.3 cuts a hole");
    let message = lean_grpo::data::user_message(&example);
    assert!(message.contains(&format!("{} {}", theorem.statement, hole.marked())));
    assert!(!message.contains(proof), "the prompt gives the answer away");
    let whole = lean_grpo::lean::holes::example(theorem, 1.0, 5)
        .unwrap()
        .unwrap();
    assert!(whole.hole.is_none());
    assert_eq!(
        lean_grpo::data::user_message(&whole),
        lean_grpo::data::user_message(theorem)
    );
}

fn lean_grpo(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lean-grpo"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn task_flags_set_the_config_and_typos_name_the_key() {
    let out = lean_grpo(&["train", "data/toy.jsonl", "--task", "fim", "--print-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(config["train"]["task"], "fim");
    assert_eq!(config["train"]["fim"]["schedule"], "linear");
    let args = [
        "eval",
        "data/toy.jsonl",
        "--task",
        "fim",
        "--mask-ratio",
        "0.3",
        "--print-config",
    ];
    let out = lean_grpo(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(config["eval"]["task"], "fim");
    assert_eq!(config["eval"]["mask_ratio"], 0.3);
    let out = lean_grpo(&[
        "train",
        "data/toy.jsonl",
        "--task",
        "fill",
        "--print-config",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("train.task"), "{stderr}");
}

/// The tiny model's tokenizer in `dir`, with the FIM tokens added and, for `base`, without its
/// chat template.
fn tokenizer_with_fim_tokens(
    dir: &std::path::Path,
    base: bool,
) -> lean_grpo::model::tokenizer::Tokenizer {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-qwen2");
    for name in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(name), dir.join(name)).unwrap();
    }
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(src.join(name)).unwrap()).unwrap()
    };
    let mut tokenizer = read("tokenizer.json");
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let added = tokenizer["added_tokens"].as_array().unwrap();
    let next = vocab
        .values()
        .chain(added.iter().map(|t| &t["id"]))
        .map(|id| id.as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    for (i, content) in ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
        .into_iter()
        .enumerate()
    {
        tokenizer["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": next + i as u64, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    }
    let mut config = read("tokenizer_config.json");
    if base {
        config.as_object_mut().unwrap().remove("chat_template");
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    lean_grpo::model::tokenizer::Tokenizer::from_dir(dir).unwrap()
}

#[test]
fn a_base_model_with_fim_tokens_gets_the_fim_layout_and_a_chat_model_the_marker() {
    let (_, example) = trans_example();
    let hole = example.hole.as_ref().unwrap();
    let (base_dir, chat_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let base = tokenizer_with_fim_tokens(base_dir.path(), true);
    let text = lean_grpo::rollout::prompt_text(&base, &example).unwrap();
    let tail = format!("{}<|fim_suffix|>{}<|fim_middle|>", hole.prefix, hole.suffix);
    assert!(
        text.starts_with("<|fim_prefix|>") && text.ends_with(&tail),
        "{text}"
    );
    let ids = lean_grpo::rollout::prompt_tokens(&base, &example).unwrap();
    let middle = base.token_to_id("<|fim_middle|>").unwrap();
    assert_eq!(
        ids.last(),
        Some(&middle),
        "the FIM tokens are single special tokens"
    );
    let chat = tokenizer_with_fim_tokens(chat_dir.path(), false);
    let text = lean_grpo::rollout::prompt_text(&chat, &example).unwrap();
    assert!(
        text.contains(&hole.marked()) && !text.contains("<|fim_prefix|>"),
        "{text}"
    );
}
