//! Message parsing against captured real outputs (tests/data/lean, copied from the project's
//! fixtures): `lean --json`, plain `lean`, leanprover-community/repl, and the text variants of
//! the sorry warning and of Lean's own timeouts.

mod support;

use lean_grpo::lean::message::{
    parse_lean_output, parse_plain, parse_repl_response, LeanMessage, Severity,
};
use support::fixture;

fn read(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The output without the `exit N` line the capture appended.
fn output(name: &str) -> String {
    read(name)
        .lines()
        .filter(|l| !l.starts_with("exit "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn json_output_of_lean_4_35() {
    let parsed = parse_lean_output(&output("real-4.35.0/axioms_and_mismatch.json.out"));
    assert!(parsed.other.is_empty());
    let severities: Vec<Severity> = parsed.messages.iter().map(|m| m.severity).collect();
    use Severity::*;
    assert_eq!(severities, [Error, Error, Error, Information, Information]);
    let mismatch = &parsed.messages[1];
    assert_eq!(
        (mismatch.pos, mismatch.end_pos),
        (Some((11, 46)), Some((11, 57)))
    );
    assert!(mismatch
        .text
        .starts_with("Type mismatch\n  MyEq.refl ?m.3\nhas type"));
    assert_eq!(mismatch.kind, None, "[anonymous] is no kind");

    let hb = parse_lean_output(&output("real-4.35.0/max_heartbeats.json.out"));
    assert_eq!(
        hb.messages[0].kind.as_deref(),
        Some("runtime.maxHeartbeats")
    );
    assert!(hb.messages[0].is_deterministic_timeout());
    let rec = parse_lean_output(&output("real-4.35.0/max_rec_depth.json.out"));
    assert_eq!(rec.messages[0].kind.as_deref(), Some("runtime.maxRecDepth"));
    assert!(!rec.messages[0].is_deterministic_timeout());
    let no_init = parse_lean_output(&output("real-4.35.0/no_init.json.out"));
    assert_eq!(
        (no_init.messages[0].pos, no_init.messages[0].end_pos),
        (Some((1, 0)), None)
    );
    assert!(
        parse_lean_output("").messages.is_empty(),
        "a clean file prints nothing"
    );
}

#[test]
fn plain_output_matches_the_json_of_the_same_run() {
    for stem in ["axioms_and_mismatch", "parse_error", "max_heartbeats"] {
        let json = parse_lean_output(&output(&format!("real-4.35.0/{stem}.json.out")));
        let plain = parse_plain(&output(&format!("real-4.35.0/{stem}.plain.out")));
        assert_eq!(plain.messages.len(), json.messages.len(), "{stem}");
        for (p, j) in plain.messages.iter().zip(&json.messages) {
            assert_eq!((p.severity, &p.text), (j.severity, &j.text), "{stem}");
            // Plain mode prints information messages without a position.
            let want = if j.severity == Severity::Information {
                None
            } else {
                j.pos
            };
            assert_eq!(p.pos, want, "{stem}");
        }
    }
}

#[test]
fn sorry_warning_in_every_version_and_by_kind() {
    let warn = |text: &str| LeanMessage {
        severity: Severity::Warning,
        pos: None,
        end_pos: None,
        kind: None,
        text: text.into(),
    };
    for stem in [
        "repl_v4.27.0_tactic_sorry.out",
        "repl_v4.33.0-rc2_tactic_sorry.out",
    ] {
        let value: serde_json::Value = serde_json::from_str(&read(stem)).unwrap();
        let r = parse_repl_response(&value);
        assert_eq!((r.env, r.sorries.len()), (Some(0), 1), "{stem}");
        assert!(
            r.messages[0].is_sorry_warning(),
            "{stem}: {:?}",
            r.messages[0]
        );
    }
    for text in read("lean4_sorryWarningDeclName.msg.txt").split("---") {
        let text = text.trim().strip_prefix("warning: ").unwrap();
        assert!(warn(text).is_sorry_warning(), "{text}");
    }
    let json = parse_lean_output(&read("leanjson_v4.34.1_sorry_decide_axioms.jsonl"));
    assert_eq!(json.messages[0].kind.as_deref(), Some("hasSorry"));
    assert!(json.messages[0].is_sorry_warning());
    assert!(!warn("this tactic is never executed").is_sorry_warning());
}

#[test]
fn lean_timeouts_in_every_version() {
    for name in [
        "lean4_3554_heartbeat_timeout.msg.txt",
        "lean4_kernel_maxheartbeats.msg.txt",
    ] {
        let text = read(name);
        let m = LeanMessage {
            severity: Severity::Error,
            pos: None,
            end_pos: None,
            kind: None,
            text: text.trim().strip_prefix("error: ").unwrap().into(),
        };
        assert!(m.is_deterministic_timeout(), "{name}");
    }
    let recursion = read("lean4_3554_max_recursion.msg.txt");
    let m = LeanMessage {
        severity: Severity::Error,
        pos: None,
        end_pos: None,
        kind: None,
        text: recursion,
    };
    assert!(!m.is_deterministic_timeout());
}

#[test]
fn repl_responses_separated_by_blank_lines() {
    let responses: Vec<serde_json::Value> = read("repl_v4.33.0-rc2_line_breaks.out")
        .split("\n\n")
        .filter(|r| !r.trim().is_empty())
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    assert_eq!(responses.len(), 3);
    let first = parse_repl_response(&responses[0]);
    assert_eq!(first.messages.len(), 2);
    assert!(first.messages.iter().all(LeanMessage::is_error));
    assert_eq!(first.messages[1].pos, Some((2, 0)));
    assert_eq!(
        parse_repl_response(&responses[2]),
        lean_grpo::lean::message::ReplResponse {
            env: Some(2),
            ..Default::default()
        }
    );
    let failure: serde_json::Value = serde_json::from_str(
        read("repl_v4.33.0-rc2_unknown_tactic.out")
            .split("\n\n")
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        parse_repl_response(&failure).failure.as_deref(),
        Some("Lean error:\n<input>:1:1: unknown tactic")
    );
    let kimina: serde_json::Value =
        serde_json::from_str(&read("kimina_verify_linter_warnings.json")).unwrap();
    let r = parse_repl_response(&kimina["results"][0]["response"]);
    assert_eq!(r.messages.len(), 4);
    assert!(r
        .messages
        .iter()
        .all(|m| m.severity == Severity::Warning && !m.is_sorry_warning()));
}
