//! Screening: what a proof may not contain, decided before any process starts
//! (docs/checker.md §2).
//!
//! Model output is untrusted code, and Lean runs code at elaboration time. [`RULES`] is the one
//! list of what is rejected; [`explain_screening`] prints it. Matching runs on the proof with
//! comments and literal contents blanked out ([`super::lex::mask`]), so `-- sorry` or
//! `"theorem"` do not reject, and on whole words, so `sorry_free` does not either. What Lean
//! checks is always the unmodified proof.

use serde::{Deserialize, Serialize};

use super::lex::{line_col, mask, words, Word};

/// Why a proof was rejected before Lean ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screened {
    /// The rule, e.g. `sorry`, `set_option`, `unterminated comment`.
    pub what: String,
    /// The offending text as written (the first word of it).
    pub token: String,
    /// 1-based line in the proof.
    pub line: usize,
}

/// The configurable part of screening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScreenPolicy {
    pub heartbeats_cap: u64,
    pub rec_depth_cap: u64,
    pub allow_native_decide: bool,
}

enum Matcher {
    /// A whole word equal to one of these.
    Word(&'static [&'static str]),
    /// A word whose last dotted part is one of these (`Lean.ofReduceBool`).
    LastPart(&'static [&'static str]),
    /// A word starting with one of these (`pp.all`).
    Prefix(&'static [&'static str]),
    /// `#` followed by a letter: any `#command`.
    HashCommand,
    /// This text anywhere outside comments and strings.
    Text(&'static str),
    /// `open private`.
    OpenPrivate,
    /// `set_option NAME VALUE` unless NAME is `maxHeartbeats`/`maxRecDepth` with 0 < VALUE ≤ cap.
    SetOption,
}

struct Rule {
    what: &'static str,
    matcher: Matcher,
    why: &'static str,
    /// Lifted by `allow_native_decide`.
    native: bool,
}

const fn rule(what: &'static str, matcher: Matcher, why: &'static str) -> Rule {
    Rule {
        what,
        matcher,
        why,
        native: false,
    }
}

/// Every screening rule, in the order `--explain-screening` prints them.
const RULES: &[Rule] = &[
    rule("sorry", Matcher::Word(&["sorry", "admit"]), "a hole in the proof; Lean only warns about it"),
    rule("sorryAx", Matcher::LastPart(&["sorryAx"]), "the axiom behind `sorry`, named directly"),
    rule("axiom", Matcher::Word(&["axiom"]), "declares anything true"),
    rule(
        "declaration",
        Matcher::Word(&[
            "theorem", "lemma", "def", "instance", "abbrev", "example", "structure", "inductive",
            "class", "mutual",
        ]),
        "starts a new declaration; a command can start mid-line too, so these are words anywhere",
    ),
    rule(
        "scope command",
        Matcher::Word(&["namespace", "section", "end", "universe", "variable"]),
        "changes the scope the checker's `#print axioms` runs in",
    ),
    rule("#command", Matcher::HashCommand, "`#eval`, `#print`, `#check`, `#exit`, `#reduce`, `#guard_msgs`, …: run code, end the file or print messages"),
    rule(
        "run_cmd",
        Matcher::Word(&["run_cmd", "run_tac", "run_elab", "run_meta", "by_elab"]),
        "runs arbitrary meta code during elaboration",
    ),
    rule("initialize", Matcher::Word(&["initialize", "builtin_initialize"]), "runs IO when the environment loads"),
    rule("import", Matcher::Word(&["import"]), "loads modules the statement was not checked against"),
    rule(
        "syntax extension",
        Matcher::Word(&[
            "macro", "macro_rules", "elab", "elab_rules", "syntax", "notation", "infix", "infixl",
            "infixr", "prefix", "postfix", "declare_syntax_cat", "register_option",
            "register_simp_attr",
        ]),
        "changes how the rest of the file parses or elaborates",
    ),
    rule("attribute", Matcher::Word(&["attribute"]), "changes existing declarations (simp sets, `implemented_by`, `csimp`, …)"),
    rule("@[", Matcher::Text("@["), "any attribute, including `implemented_by`, `extern`, `csimp`"),
    rule(
        "unsafe",
        Matcher::Word(&["unsafe", "opaque", "partial", "implemented_by", "extern", "csimp"]),
        "escapes the kernel's checks",
    ),
    rule("open private", Matcher::OpenPrivate, "reaches declarations their authors hid"),
    rule("set_option", Matcher::SetOption, "only `maxHeartbeats N` and `maxRecDepth N` with 0 < N ≤ the configured cap"),
    rule(
        "option debug./trace./pp.",
        Matcher::Prefix(&["debug.", "trace.", "pp."]),
        "`debug.skipKernelTC` switches the kernel off; trace and pp options flood the output",
    ),
    Rule {
        what: "native_decide",
        matcher: Matcher::Word(&["native_decide", "native"]),
        why: "`native_decide` / `decide +native` trust the compiler (an extra axiom); `allow_native_decide` lifts this",
        native: true,
    },
    Rule {
        what: "compiler trust",
        matcher: Matcher::LastPart(&["ofReduceBool", "ofReduceNat", "reduceBool", "reduceNat", "trustCompiler"]),
        why: "the axioms behind `native_decide`, named directly; `allow_native_decide` lifts this",
        native: true,
    },
];

/// Check `proof` against every rule; the first offence (by position) is returned.
pub fn screen(proof: &str, policy: &ScreenPolicy) -> Result<(), Screened> {
    let masked = mask(proof);
    if let Some((what, at)) = masked.unterminated {
        return Err(Screened {
            what: format!("unterminated {what}"),
            token: proof[at..].chars().take(2).collect(),
            line: line_col(proof, at).0,
        });
    }
    let ws = words(&masked.text);
    let mut first: Option<(usize, Screened)> = None;
    for rule in RULES
        .iter()
        .filter(|r| !(r.native && policy.allow_native_decide))
    {
        if let Some((at, len)) = find(rule, &masked.text, &ws, policy) {
            if first.as_ref().is_none_or(|(best, _)| at < *best) {
                let token = proof[at..at + len].to_string();
                let line = line_col(proof, at).0;
                first = Some((
                    at,
                    Screened {
                        what: rule.what.to_string(),
                        token,
                        line,
                    },
                ));
            }
        }
    }
    first.map_or(Ok(()), |(_, s)| Err(s))
}

/// Byte offset and length of the first match of `rule`.
fn find(rule: &Rule, masked: &str, ws: &[Word], policy: &ScreenPolicy) -> Option<(usize, usize)> {
    let hit = |w: &Word| Some((w.start, w.end - w.start));
    match &rule.matcher {
        Matcher::Word(list) => ws
            .iter()
            .find(|w| list.contains(&w.text.as_str()))
            .and_then(hit),
        Matcher::LastPart(list) => ws
            .iter()
            .find(|w| {
                w.text
                    .rsplit('.')
                    .next()
                    .is_some_and(|last| list.contains(&last))
            })
            .and_then(hit),
        Matcher::Prefix(list) => ws
            .iter()
            .find(|w| list.iter().any(|p| w.text.starts_with(p)))
            .and_then(hit),
        Matcher::HashCommand => ws.iter().find(|w| w.text.starts_with('#')).and_then(hit),
        Matcher::Text(text) => masked.find(text).map(|at| (at, text.len())),
        Matcher::OpenPrivate => ws
            .windows(2)
            .find(|p| p[0].text == "open" && p[1].text == "private")
            .map(|p| (p[0].start, p[1].end - p[0].start)),
        Matcher::SetOption => ws.iter().enumerate().find_map(|(i, w)| {
            (w.text == "set_option"
                && !allowed_option(masked, ws.get(i + 1), ws.get(i + 2), policy))
            .then(|| (w.start, ws.get(i + 1).map_or(w.end, |n| n.end) - w.start))
        }),
    }
}

fn allowed_option(
    masked: &str,
    name: Option<&Word>,
    value: Option<&Word>,
    policy: &ScreenPolicy,
) -> bool {
    let (Some(name), Some(value)) = (name, value) else {
        return false;
    };
    let cap = match name.text.as_str() {
        "maxHeartbeats" => policy.heartbeats_cap,
        "maxRecDepth" => policy.rec_depth_cap,
        _ => return false,
    };
    let adjacent = masked[name.end..value.start]
        .chars()
        .all(char::is_whitespace);
    let n = value
        .text
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.text.parse::<u64>().ok())
        .flatten();
    adjacent && n.is_some_and(|n| n > 0 && n <= cap)
}

/// The rules as `lean-grpo check --explain-screening` prints them.
pub fn explain_screening() -> String {
    let defaults = super::CheckerOptions::default();
    let mut out = String::from(
        "Screening rejects a proof before Lean runs (verdict `forbidden`, naming the rule, the\n\
         token and its line) when it contains any of the following. Words match whole\n\
         (`sorry_free` is fine); comments and string contents are ignored for matching only\n\
         (`-- sorry` is fine); what Lean checks is always the proof as written.\n\n",
    );
    for rule in RULES {
        let matches = match &rule.matcher {
            Matcher::Word(list) | Matcher::LastPart(list) | Matcher::Prefix(list) => {
                list.join(", ")
            }
            Matcher::HashCommand => "#<command>".to_string(),
            Matcher::Text(text) => (*text).to_string(),
            Matcher::OpenPrivate => "open private".to_string(),
            Matcher::SetOption => "set_option".to_string(),
        };
        out.push_str(&format!(
            "  {:<24} {matches}\n  {:<24} {}\n",
            rule.what, "", rule.why
        ));
    }
    for (what, shape) in [
        ("unterminated comment", "/- with no -/"),
        ("unterminated string", "\" with no closing \""),
    ] {
        out.push_str(&format!(
            "  {what:<24} {shape}\n  {:<24} would hide the rest of the proof from screening\n",
            ""
        ));
    }
    out.push_str(&format!(
        "\nset_option caps (checker section): heartbeats_cap (default {}), rec_depth_cap\n\
         (default {}); 0 is never allowed. The native_decide and compiler-trust rules are lifted\n\
         by allow_native_decide (default false), which also admits their axioms in the audit.\n",
        defaults.heartbeats_cap, defaults.rec_depth_cap
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: ScreenPolicy = ScreenPolicy {
        heartbeats_cap: 400_000,
        rec_depth_cap: 1000,
        allow_native_decide: false,
    };

    fn what(proof: &str) -> Option<String> {
        screen(proof, &POLICY).err().map(|s| s.what)
    }

    #[test]
    fn first_offence_by_position_with_line() {
        let err = screen("by\n  simp\n  exact sorry\n  #eval 1", &POLICY).unwrap_err();
        assert_eq!(
            err,
            Screened {
                what: "sorry".into(),
                token: "sorry".into(),
                line: 3
            }
        );
    }

    #[test]
    fn set_option_caps() {
        assert_eq!(
            what("by\n  set_option maxHeartbeats 400000 in\n  simp"),
            None
        );
        assert_eq!(what("set_option maxRecDepth 1000 in rfl"), None);
        assert_eq!(
            what("set_option maxHeartbeats 0 in rfl").as_deref(),
            Some("set_option")
        );
        assert_eq!(
            what("set_option maxHeartbeats 400001 in rfl").as_deref(),
            Some("set_option")
        );
        assert_eq!(
            what("set_option maxHeartbeats (10) in rfl").as_deref(),
            Some("set_option")
        );
        assert_eq!(
            what("set_option «debug».skipKernelTC true in rfl").as_deref(),
            Some("set_option")
        );
    }

    #[test]
    fn every_rule_is_explained() {
        let text = explain_screening();
        for rule in RULES {
            assert!(text.contains(rule.what), "{} missing", rule.what);
        }
    }
}
