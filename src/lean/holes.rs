//! Where a hole may be cut in a proof (docs/fim.md), by Lean syntax.
//!
//! Holes are spans of whole lexer tokens ([`tokens`]): a token is an identifier (dotted parts
//! joined), a number, a string or char literal, a bracket, or a run of symbol characters;
//! comments are not tokens. So a hole boundary never falls inside an identifier, a literal or a
//! comment. In a `by` proof a hole is a run of whole tactic lines, blocks kept whole; in a term
//! proof it is a run of atoms (identifiers, literals, bracketed sub-terms) between separators,
//! i.e. a sub-term or some application arguments. The mask ratio is the hole's share of the
//! proof's tokens; ratio 1.0 is the whole proof, which is the whole-proof task.

use std::ops::Range;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::lex::{is_ident_char, mask};
use crate::data::fim::{with_proofs, Hole};
use crate::data::Theorem;

/// Candidates within this distance of the closest ratio are drawn from, so that different seeds
/// cut different holes while every pick stays close to the requested ratio.
pub const RATIO_WINDOW: f64 = 0.02;

/// The byte ranges of the lexer tokens of `src`, in order (see the module docs).
pub fn tokens(src: &str) -> Vec<Range<usize>> {
    let masked = mask(src).text;
    let m = masked.as_bytes();
    let o = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < m.len() {
        let c = masked[i..].chars().next().unwrap_or(' ');
        let len = c.len_utf8();
        let start = i;
        if c.is_whitespace() {
            i += len;
            continue;
        }
        if c == '"' {
            // The contents are blanked, so the next quote of the masked text closes it.
            i = masked[i + 1..].find('"').map_or(m.len(), |n| i + 1 + n + 1);
        } else if c == '\'' && m.get(i + 1) == Some(&b' ') && o.get(i + 1) != Some(&b' ') {
            // A char literal, blanked between its quotes.
            i = masked[i + 1..]
                .find('\'')
                .map_or(m.len(), |n| i + 1 + n + 1);
        } else if is_ident_char(c) || c == '«' {
            i = word_end(&masked, i);
        } else if is_bracket(c) {
            i += len;
        } else {
            i += len;
            while let Some(n) = masked[i..].chars().next() {
                if n.is_whitespace() || is_ident_char(n) || is_bracket(n) || matches!(n, '"' | '«')
                {
                    break;
                }
                i += n.len_utf8();
            }
        }
        out.push(start..i);
    }
    out
}

/// End of the identifier starting at `at`: dotted parts and `«…»` quotes belong to it.
fn word_end(masked: &str, at: usize) -> usize {
    let mut i = at;
    let mut chars = masked[at..].char_indices().peekable();
    while let Some((off, c)) = chars.next() {
        if c == '«' {
            for (off, c) in chars.by_ref() {
                i = at + off + c.len_utf8();
                if c == '»' {
                    break;
                }
            }
        } else if is_ident_char(c) {
            i = at + off + c.len_utf8();
        } else if c == '.'
            && chars
                .peek()
                .is_some_and(|&(_, n)| is_ident_char(n) || n == '«')
        {
            i = at + off + 1;
        } else {
            break;
        }
    }
    i
}

fn is_bracket(c: char) -> bool {
    matches!(c, '(' | ')' | '[' | ']' | '{' | '}' | '⟨' | '⟩')
}

fn closer(c: char) -> Option<char> {
    Some(match c {
        '(' => ')',
        '[' => ']',
        '{' => '}',
        '⟨' => '⟩',
        _ => return None,
    })
}

/// Words that structure a term rather than being one: a hole never consists of them.
const KEYWORDS: &[&str] = &[
    "fun", "λ", "by", "have", "show", "from", "let", "match", "with", "at", "then", "else", "if",
    "do", "in", "calc", "using", "suffices", "obtain", "where",
];

/// A candidate hole: a token range `[first, end)` of the proof.
type Span = Range<usize>;

/// Every syntax-aligned hole of `proof` as a token range, the whole proof included.
fn candidates(proof: &str, toks: &[Range<usize>]) -> Vec<Span> {
    let whole: Span = 0..toks.len();
    let mut out = vec![whole];
    if toks.is_empty() {
        return out;
    }
    if &proof[toks[0].clone()] == "by" {
        tactic_candidates(proof, toks, &mut out);
    } else {
        term_candidates(proof, toks, 0..toks.len(), &mut out);
    }
    out.sort_by_key(|s| (s.start, s.end));
    out.dedup();
    out
}

/// Runs of whole tactic lines after `by`: a run starts at a line, keeps every line indented at
/// least as deep, and ends before a line indented no deeper than its first (blocks stay whole).
fn tactic_candidates(proof: &str, toks: &[Range<usize>], out: &mut Vec<Span>) {
    // (first token, indent column) of each line holding tokens, after `by`.
    let mut lines: Vec<(usize, usize)> = Vec::new();
    let mut last_line = usize::MAX;
    for (k, t) in toks.iter().enumerate().skip(1) {
        let line_start = proof[..t.start].rfind('\n').map_or(0, |n| n + 1);
        if line_start != last_line {
            last_line = line_start;
            lines.push((k, proof[line_start..t.start].chars().count()));
        }
    }
    for i in 0..lines.len() {
        let indent = lines[i].1;
        for j in i + 1..=lines.len() {
            // The run is lines i..j. It may end before a shallower line, or before one as deep
            // that does not continue the construct above it (`| alt =>` does: `match`,
            // `induction … with`).
            let next = lines.get(j);
            let closes = next.is_none_or(|&(first, next_indent)| {
                next_indent < indent
                    || (next_indent == indent && &proof[toks[first].clone()] != "|")
            });
            if closes {
                out.push(lines[i].0..next.map_or(toks.len(), |l| l.0));
            }
            if next.is_some_and(|l| l.1 < indent) {
                break;
            }
        }
    }
}

/// Runs of atoms (identifiers, literals, bracket groups) between separators, in `range` and in
/// every bracket group inside it.
fn term_candidates(proof: &str, toks: &[Range<usize>], range: Range<usize>, out: &mut Vec<Span>) {
    let mut run: Vec<Span> = Vec::new();
    let flush = |run: &mut Vec<Span>, out: &mut Vec<Span>| {
        for a in 0..run.len() {
            for b in a..run.len() {
                out.push(run[a].start..run[b].end);
            }
        }
        run.clear();
    };
    let mut k = range.start;
    while k < range.end {
        let text = &proof[toks[k].clone()];
        let first = text.chars().next().unwrap_or(' ');
        if let Some(close) = closer(first) {
            let end = matching(proof, toks, k, range.end, first, close);
            if let Some(end) = end {
                term_candidates(proof, toks, k + 1..end, out);
                run.push(k..end + 1);
                k = end + 1;
                continue;
            }
        }
        if text == "fun" || text == "λ" {
            // Binders are not sub-terms: the next candidate starts after `=>`.
            flush(&mut run, out);
            k = (k..range.end)
                .find(|&n| matches!(&proof[toks[n].clone()], "=>" | "↦"))
                .map_or(range.end, |n| n + 1);
            continue;
        }
        if text == ":=" {
            // A named argument's name (`(motive := …)`) is not a sub-term either.
            run.pop();
        }
        let atom = (is_ident_char(first) || matches!(first, '"' | '\'' | '«'))
            && !KEYWORDS.contains(&text);
        if atom {
            run.push(k..k + 1);
        } else {
            flush(&mut run, out);
        }
        k += 1;
    }
    flush(&mut run, out);
}

/// The token closing the bracket opened at `open`, before `end`.
fn matching(
    proof: &str,
    toks: &[Range<usize>],
    open: usize,
    end: usize,
    o: char,
    c: char,
) -> Option<usize> {
    let mut depth = 0usize;
    for (k, t) in toks.iter().enumerate().take(end).skip(open) {
        let text = &proof[t.clone()];
        if text.starts_with(o) {
            depth += 1;
        } else if text.starts_with(c) {
            depth -= 1;
            if depth == 0 {
                return Some(k);
            }
        }
    }
    None
}

/// Every syntax-aligned hole of `proof`, the whole proof included.
pub fn holes(proof: &str) -> Vec<Hole> {
    let toks = tokens(proof);
    let total = toks.len().max(1) as f64;
    candidates(proof, &toks)
        .into_iter()
        .map(|span| hole_of(proof, &toks, span, total))
        .collect()
}

fn hole_of(proof: &str, toks: &[Range<usize>], span: Span, total: f64) -> Hole {
    if span.start == 0 && span.end == toks.len() {
        return Hole {
            prefix: String::new(),
            cut: proof.to_string(),
            suffix: String::new(),
            ratio: 1.0,
        };
    }
    let from = toks[span.start].start;
    let to = toks[span.end - 1].end;
    Hole {
        prefix: proof[..from].to_string(),
        cut: proof[from..to].to_string(),
        suffix: proof[to..].to_string(),
        ratio: (span.end - span.start) as f64 / total,
    }
}

/// A hole of `proof` with a ratio closest to `ratio`, drawn by `seed` among those within
/// [`RATIO_WINDOW`] of the closest; the same arguments always give the same hole. A ratio of 1
/// or more is the whole proof.
pub fn sample_hole(proof: &str, ratio: f64, seed: u64) -> Result<Hole> {
    if !(ratio.is_finite() && ratio > 0.0) {
        bail!("the mask ratio must be a number in (0, 1], got {ratio}");
    }
    let all = holes(proof);
    if ratio >= 1.0 {
        return Ok(all.into_iter().find(Hole::is_whole).unwrap_or(Hole {
            prefix: String::new(),
            cut: proof.to_string(),
            suffix: String::new(),
            ratio: 1.0,
        }));
    }
    let best = all
        .iter()
        .map(|h| (h.ratio - ratio).abs())
        .fold(f64::INFINITY, f64::min);
    let mut close: Vec<Hole> = all
        .into_iter()
        .filter(|h| (h.ratio - ratio).abs() <= best + RATIO_WINDOW)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pick = rng.random_range(0..close.len());
    Ok(close.swap_remove(pick))
}

/// `theorem` as a fill-in-the-middle example at `ratio`, its hole drawn by `seed` and the
/// theorem's name (so each theorem gets its own hole, and the same one every run); `None` when
/// it has no proof.
pub fn example(theorem: &Theorem, ratio: f64, seed: u64) -> Result<Option<Theorem>> {
    let Some(proof) = theorem.proof.as_deref().filter(|p| !p.trim().is_empty()) else {
        return Ok(None);
    };
    let hole = sample_hole(proof, ratio, hole_seed(seed, &theorem.name, ratio))?;
    Ok(Some(theorem.with_hole(hole)))
}

/// The fill-in-the-middle examples of every record with a proof (see [`with_proofs`]).
pub fn examples(theorems: &[Theorem], ratio: f64, seed: u64) -> Result<Vec<Theorem>> {
    let (kept, _) = with_proofs(theorems);
    kept.iter()
        .filter_map(|t| example(t, ratio, seed).transpose())
        .collect()
}

/// A stable 64-bit key for (seed, theorem name, ratio): the seed of that theorem's hole.
pub fn hole_seed(seed: u64, name: &str, ratio: f64) -> u64 {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = seed
        .to_le_bytes()
        .into_iter()
        .chain(name.bytes())
        .chain(ratio.to_bits().to_le_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(src: &str) -> Vec<&str> {
        tokens(src).into_iter().map(|r| &src[r]).collect()
    }

    #[test]
    fn tokens_keep_identifiers_literals_and_skip_comments() {
        assert_eq!(
            texts("exact Nat.succ_le h.1 -- a comment\n/- x y -/ \"a b\" 'c' (f x) := ⟨a⟩"),
            [
                "exact",
                "Nat.succ_le",
                "h.1",
                "\"a b\"",
                "'c'",
                "(",
                "f",
                "x",
                ")",
                ":=",
                "⟨",
                "a",
                "⟩"
            ]
        );
    }

    #[test]
    fn whole_proof_is_ratio_one() {
        let h = sample_hole("MyEq.refl _", 1.0, 3).unwrap();
        assert!(h.is_whole());
        assert_eq!(h.cut, "MyEq.refl _");
        assert!(sample_hole("rfl", 0.0, 3).is_err());
    }
}
