//! From a model completion to the proof text that follows `:=` (docs/checker.md §1).
//!
//! The statement that is checked always comes from the data set. A completion that restates
//! the theorem is compared with ours and cut after its first top-level `:=`; everything else
//! is kept verbatim (tactic lines must keep their indentation).

use super::lex::{self, mask, top_level_assign, words};

/// What a completion yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Extracted {
    /// The proof term (usually `by` and tactics), trimmed.
    Proof(String),
    /// The completion restated the theorem with a different statement (shown, normalised).
    StatementChanged { restated: String },
    /// Nothing to check.
    NoProof,
}

const DECL_KEYWORDS: [&str; 3] = ["theorem", "lemma", "example"];

/// The last fenced code block tagged `lean`, `lean4` or untagged; a block still open at the end
/// of the text (a truncated sample) runs to the end.
pub fn last_code_block(text: &str) -> Option<&str> {
    let mut found = None;
    let mut open: Option<(usize, bool)> = None; // (content start, wanted language)
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if let Some(info) = trimmed.strip_prefix("```") {
            match open {
                None => {
                    let lang = info.trim().to_ascii_lowercase();
                    let wanted = matches!(lang.as_str(), "" | "lean" | "lean4");
                    open = Some((offset + line.len(), wanted));
                }
                Some((start, wanted)) => {
                    if wanted {
                        found = Some(&text[start..offset]);
                    }
                    open = None;
                }
            }
        }
        offset += line.len();
    }
    if let Some((start, true)) = open {
        found = Some(&text[start.min(text.len())..]);
    }
    found
}

/// Extract the proof of theorem `name` (data-set `statement`) from a model completion.
pub fn extract_proof(completion: &str, statement: &str) -> Extracted {
    let text = last_code_block(completion).unwrap_or(completion);
    let masked = mask(text).text;
    let ours = signature(statement);
    let name = ours.as_ref().and_then(|(_, name)| name.clone());
    let Some(decl) = find_restatement(text, &masked, name.as_deref()) else {
        let proof = text.trim();
        let proof = proof.strip_prefix(":=").map_or(proof, str::trim_start);
        return if proof.is_empty() {
            Extracted::NoProof
        } else {
            Extracted::Proof(proof.to_string())
        };
    };
    let Some(assign) = top_level_assign(&masked[decl..]).map(|at| decl + at) else {
        return Extracted::NoProof;
    };
    let restated = &text[decl..assign];
    let same = match (&ours, signature(restated)) {
        (Some((ours, _)), Some((theirs, _))) => *ours == theirs,
        _ => false,
    };
    if !same {
        return Extracted::StatementChanged {
            restated: lex::normalise_space(restated),
        };
    }
    let proof = text[assign + 2..].trim();
    if proof.is_empty() {
        Extracted::NoProof
    } else {
        Extracted::Proof(proof.to_string())
    }
}

/// Byte offset of the declaration keyword that restates the theorem: `theorem NAME` /
/// `lemma NAME` anywhere, else a `theorem`/`lemma`/`example` that starts a line.
fn find_restatement(text: &str, masked: &str, name: Option<&str>) -> Option<usize> {
    let ws = words(masked);
    let named = ws.windows(2).find(|pair| {
        matches!(pair[0].text.as_str(), "theorem" | "lemma")
            && name.is_some_and(|n| pair[1].text == n || pair[1].text.ends_with(&format!(".{n}")))
    });
    if let Some(pair) = named {
        return Some(pair[0].start);
    }
    ws.iter()
        .find(|w| {
            DECL_KEYWORDS.contains(&w.text.as_str())
                && text[..w.start]
                    .rsplit('\n')
                    .next()
                    .is_some_and(|pre| pre.trim().is_empty())
        })
        .map(|w| w.start)
}

/// The comparable part of a statement (without its keyword, name and final `:=`), as tokens
/// separated by single spaces, and the declared name. `None` without a declaration keyword.
fn signature(statement: &str) -> Option<(String, Option<String>)> {
    let statement = statement.trim_end();
    let statement = statement.strip_suffix(":=").unwrap_or(statement);
    let masked = mask(statement).text;
    let ws = words(&masked);
    let keyword = ws
        .iter()
        .position(|w| DECL_KEYWORDS.contains(&w.text.as_str()))?;
    let (rest_start, name) = match ws[keyword].text.as_str() {
        "example" => (ws[keyword].end, None),
        _ => {
            let name = ws.get(keyword + 1)?;
            (name.end, Some(name.text.clone()))
        }
    };
    Some((tokens(&masked[rest_start..]), name))
}

/// Whitespace-insensitive around punctuation: `(n:N)` and `(n : N)` compare equal, `a b` and
/// `ab` do not.
fn tokens(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if lex::is_ident_char(c) || c == '.' {
            out.push(c);
        } else if c.is_whitespace() {
            out.push(' ');
        } else {
            out.push(' ');
            out.push(c);
            out.push(' ');
        }
    }
    lex::normalise_space(&out)
}

/// The name `#print axioms` is given: the declared name as written in the statement.
pub fn declared_name(statement: &str) -> Option<String> {
    let masked = mask(statement).text;
    let ws = words(&masked);
    let keyword = ws
        .iter()
        .position(|w| matches!(w.text.as_str(), "theorem" | "lemma"))?;
    let name = ws.get(keyword + 1)?;
    Some(statement[name.start..name.end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STMT: &str = "theorem add_comm' (a b : N) : MyEq (N.add a b) (N.add b a) :=";

    #[test]
    fn bare_proof_is_kept_verbatim() {
        assert_eq!(
            extract_proof("  by\n  intro h\n  exact h\n", STMT),
            Extracted::Proof("by\n  intro h\n  exact h".into())
        );
        assert_eq!(
            extract_proof(":= rfl", STMT),
            Extracted::Proof("rfl".into())
        );
        assert_eq!(extract_proof("  \n", STMT), Extracted::NoProof);
    }

    #[test]
    fn last_lean_block_wins() {
        let c = "Idea:\n```lean\nby simp\n```\nBetter:\n```python\nx = 1\n```\n```lean4\nby\n  rfl\n```\nDone.";
        assert_eq!(extract_proof(c, STMT), Extracted::Proof("by\n  rfl".into()));
        assert_eq!(last_code_block("```\nby omega"), Some("by omega"));
        assert_eq!(last_code_block("no block"), None);
    }

    #[test]
    fn restated_statement_is_compared_and_cut() {
        let c = "```lean\nimport Mathlib\n\ntheorem add_comm' (a b:N) :\n    MyEq (N.add a b) (N.add b a) := by\n  exact foo a b\n```";
        assert_eq!(
            extract_proof(c, STMT),
            Extracted::Proof("by\n  exact foo a b".into())
        );
        let changed = "theorem add_comm' (a b : N) : MyEq (N.add a b) (N.add a b) := MyEq.refl _";
        assert!(matches!(
            extract_proof(changed, STMT),
            Extracted::StatementChanged { .. }
        ));
        let named_default = "theorem t (x : N := N.z) : P x := by\n  exact h";
        assert_eq!(
            extract_proof(named_default, "theorem t (x : N := N.z) : P x :="),
            Extracted::Proof("by\n  exact h".into())
        );
    }

    #[test]
    fn theorem_in_a_comment_is_not_a_restatement() {
        let c = "-- theorem add_comm' is easy\nby exact h";
        assert_eq!(extract_proof(c, STMT), Extracted::Proof(c.into()));
    }

    #[test]
    fn declared_name_keeps_primes() {
        assert_eq!(declared_name(STMT).as_deref(), Some("add_comm'"));
        assert_eq!(declared_name("example : True :="), None);
    }
}
