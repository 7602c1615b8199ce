//! From a fill-in-the-middle completion to the proof it completes (docs/fim.md).
//!
//! The completion is the hole's text only: the last `lean` code block, or the bare reply. It is
//! spliced between the hole's prefix and suffix, and the reassembled proof goes through the same
//! screening and checking as a whole proof. A completion that did not fill the hole, but
//! repeated or rewrote the text around it, or kept the hole marker, gets its own verdict
//! (`hole_mismatch`): otherwise a model could earn rewards for text that was not its to write.

use super::extract::last_code_block;
use super::holes::tokens;
use crate::data::fim::{Hole, HOLE_MARKER};

/// What a completion makes of a hole.
#[derive(Debug, Clone, PartialEq)]
pub enum Filled {
    /// The reassembled proof.
    Proof(String),
    /// Nothing to put in the hole.
    Empty,
    /// The completion repeats or rewrites the prefix or suffix, or holds the marker; the text
    /// says which.
    Mismatch(String),
}

/// The suffix (or prefix) counts as rewritten when the completion ends (starts) with as many
/// tokens as it has, at least this many, of which at least three quarters are equal, and has
/// more tokens besides: shorter surroundings (`)`, `exact h`) are too common in honest fills to
/// tell, and a fill that only resembles the next line (`rw [foo]` before `rw [bar]`) is honest.
const NEAR_COPY_MIN_TOKENS: usize = 3;

/// Splices `completion` into `hole` (see the module docs).
pub fn fill_hole(completion: &str, hole: &Hole) -> Filled {
    let block = last_code_block(completion).unwrap_or(completion);
    let fill = reindent(block, hole_column(hole));
    if fill.is_empty() {
        return Filled::Empty;
    }
    if fill.contains(HOLE_MARKER) {
        return Filled::Mismatch(format!(
            "the completion contains the hole marker {HOLE_MARKER}"
        ));
    }
    let ours = texts(&fill);
    let prefix = texts(&hole.prefix);
    let suffix = texts(&hole.suffix);
    if repeats(&ours, &prefix, true) {
        return Filled::Mismatch(
            "the completion repeats or rewrites the text before the hole".into(),
        );
    }
    if repeats(&ours, &suffix, false) {
        return Filled::Mismatch(
            "the completion repeats or rewrites the text after the hole".into(),
        );
    }
    Filled::Proof(hole.splice(&fill))
}

fn texts(src: &str) -> Vec<&str> {
    tokens(src).into_iter().map(|t| &src[t]).collect()
}

/// Whether `fill` starts (`at_start`) or ends with `around`: verbatim, with more besides, when
/// `around` holds a word; or as a near copy when it is long enough (see
/// [`NEAR_COPY_MIN_TOKENS`]).
fn repeats(fill: &[&str], around: &[&str], at_start: bool) -> bool {
    let m = around.len();
    if m == 0 || fill.len() < m {
        return false;
    }
    let part = if at_start {
        &fill[..m]
    } else {
        &fill[fill.len() - m..]
    };
    let has_word = around
        .iter()
        .any(|t| t.chars().next().is_some_and(char::is_alphanumeric));
    if part == around {
        // A fill that is exactly the text around it may be an honest one (`f x x`).
        return has_word && fill.len() > m;
    }
    let same = part.iter().zip(around).filter(|(a, b)| a == b).count();
    m >= NEAR_COPY_MIN_TOKENS && fill.len() > m && 4 * same >= 3 * m
}

/// The column (in characters) of a hole that starts a line (a tactic hole), else 0: a hole in
/// the middle of a line keeps the fill's layout as written.
fn hole_column(hole: &Hole) -> usize {
    let line = hole.prefix.rsplit('\n').next().unwrap_or("");
    if line.trim().is_empty() {
        line.chars().count()
    } else {
        0
    }
}

/// The fill as it goes into the hole: blank lines around it and the first line's indentation
/// dropped (the prefix has it). Later lines keep their indentation when it is already at least
/// the hole's column (written as in the proof); otherwise (written from column 0) they are
/// shifted by the hole's column, so a block stays a block.
fn reindent(block: &str, column: usize) -> String {
    let lines: Vec<&str> = block
        .trim_matches(|c| c == '\n' || c == '\r')
        .lines()
        .map(str::trim_end)
        .collect();
    let Some(first) = lines.first() else {
        return String::new();
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let first_indent = indent(first);
    let rest = &lines[1..];
    let min_rest = rest
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min();
    let shift = match min_rest {
        Some(min) if min < column => column.saturating_sub(first_indent),
        _ => 0,
    };
    let mut out = first.trim_start().to_string();
    for line in rest {
        out.push('\n');
        if !line.trim().is_empty() {
            out.push_str(&" ".repeat(shift));
            out.push_str(line);
        }
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lean::holes::holes;

    const PROOF: &str = "by\n  intro n\n  rw [Nat.add_succ]\n  exact congrArg Nat.succ ih";

    fn middle() -> Hole {
        holes(PROOF)
            .into_iter()
            .find(|h| h.cut == "rw [Nat.add_succ]")
            .expect("the middle line is a hole")
    }

    #[test]
    fn the_cut_text_fills_the_hole_back() {
        let hole = middle();
        assert_eq!(fill_hole(&hole.cut, &hole), Filled::Proof(PROOF.into()));
        let fenced = format!("Here:\n```lean\n{}\n```", hole.cut);
        assert_eq!(fill_hole(&fenced, &hole), Filled::Proof(PROOF.into()));
        assert_eq!(fill_hole("```lean\n\n```", &hole), Filled::Empty);
    }

    #[test]
    fn rewriting_the_surroundings_is_a_mismatch() {
        let hole = middle();
        let edited_suffix = "rw [Nat.add_succ]\n  exact congrArg Nat.succ ih'";
        let whole = format!("{}{}{}", hole.prefix, hole.cut, hole.suffix);
        let repeated_suffix = format!("{}{}", hole.cut, hole.suffix);
        for bad in [
            edited_suffix,
            &whole,
            &repeated_suffix,
            "<HOLE>",
            "simp\n<HOLE>",
        ] {
            assert!(
                matches!(fill_hole(bad, &hole), Filled::Mismatch(_)),
                "{bad:?}"
            );
        }
        // A different honest fill is kept.
        assert!(matches!(fill_hole("simp", &hole), Filled::Proof(_)));
    }

    #[test]
    fn honest_fills_that_resemble_their_surroundings_are_kept() {
        let proof = "by\n  rw [foo]\n  rw [bar]";
        let hole = holes(proof)
            .into_iter()
            .find(|h| h.cut == "rw [foo]")
            .unwrap();
        let expected = "by\n  rw [baz]\n  rw [bar]";
        assert_eq!(fill_hole("rw [baz]", &hole), Filled::Proof(expected.into()));
        let hole = holes("f x x")
            .into_iter()
            .find(|h| h.cut == "x" && h.suffix == " x")
            .unwrap();
        assert_eq!(fill_hole("x", &hole), Filled::Proof("f x x".into()));
    }

    #[test]
    fn blocks_written_from_column_zero_are_indented() {
        let proof = "by\n  intro n\n  cases n\n  · rfl\n  · simp";
        let hole = holes(proof)
            .into_iter()
            .find(|h| h.cut.starts_with("cases n") && h.cut.ends_with("simp"))
            .unwrap();
        let flat = "cases n\n· rfl\n· simp";
        assert_eq!(fill_hole(flat, &hole), Filled::Proof(proof.into()));
    }
}
