//! Just enough of Lean's lexical structure to read model output safely: comments, string and
//! char literals, quoted identifiers and words.
//!
//! [`mask`] blanks out comments and literal contents byte for byte (a masked character becomes
//! as many spaces as it had UTF-8 bytes, newlines are kept), so every byte offset and line of
//! the masked text is the same as in the original. Matching runs on the masked text; what Lean
//! sees is always the original.

/// The original text with comments and literal contents blanked out.
#[derive(Debug, Clone)]
pub struct Masked {
    pub text: String,
    /// A comment or string that never ends, and the byte offset where it starts.
    pub unterminated: Option<(&'static str, usize)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Code,
    /// Block comment with its nesting depth (Lean's `/- … -/` nest).
    Comment(u32),
    /// A string literal; `true` when `{…}` inside is code (`s!"…"`, `m!"…"`, `f!"…"`).
    Str(bool),
    /// `r#"…"#` with this many `#`.
    RawStr(usize),
}

/// Blank comments and literal contents out of `src` (see the module docs).
pub fn mask(src: &str) -> Masked {
    let bytes = src.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    // Modes we return to: an interpolated string resumes after the `}` that closes its `{`.
    let mut stack: Vec<Mode> = Vec::new();
    let mut mode = Mode::Code;
    let mut brace_depth: Vec<u32> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for &b in &bytes[from..to] {
            out.push(if b == b'\n' { b'\n' } else { b' ' });
        }
    };
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        match mode {
            Mode::Code => {
                if b == b'-' && next == Some(b'-') {
                    let end = src[i..].find('\n').map_or(bytes.len(), |n| i + n);
                    blank(&mut out, i, end);
                    i = end;
                    continue;
                }
                if b == b'/' && next == Some(b'-') {
                    start = i;
                    mode = Mode::Comment(1);
                    blank(&mut out, i, i + 2);
                    i += 2;
                    continue;
                }
                if b == b'"' {
                    start = i;
                    let interpolated = i > 0 && bytes[i - 1] == b'!';
                    mode = Mode::Str(interpolated);
                    out.push(b'"');
                    i += 1;
                    continue;
                }
                if b == b'r' && !prev_is_ident(src, i) {
                    let hashes = bytes[i + 1..].iter().take_while(|&&c| c == b'#').count();
                    if bytes.get(i + 1 + hashes) == Some(&b'"') {
                        start = i;
                        mode = Mode::RawStr(hashes);
                        out.extend_from_slice(&bytes[i..i + 2 + hashes]);
                        i += 2 + hashes;
                        continue;
                    }
                }
                if b == b'\'' && !prev_is_ident(src, i) {
                    if let Some(len) = char_literal_len(&src[i..]) {
                        out.push(b'\'');
                        blank(&mut out, i + 1, i + len - 1);
                        out.push(b'\'');
                        i += len;
                        continue;
                    }
                }
                if b == b'{' {
                    if let Some(depth) = brace_depth.last_mut() {
                        *depth += 1;
                    }
                } else if b == b'}' {
                    if let Some(depth) = brace_depth.last_mut() {
                        if *depth == 0 {
                            brace_depth.pop();
                            mode = stack.pop().unwrap_or(Mode::Code);
                            out.push(b'}');
                            i += 1;
                            continue;
                        }
                        *depth -= 1;
                    }
                }
                out.push(b);
                i += 1;
            }
            Mode::Comment(depth) => {
                if b == b'-' && next == Some(b'/') {
                    blank(&mut out, i, i + 2);
                    i += 2;
                    mode = if depth == 1 {
                        Mode::Code
                    } else {
                        Mode::Comment(depth - 1)
                    };
                } else if b == b'/' && next == Some(b'-') {
                    blank(&mut out, i, i + 2);
                    i += 2;
                    mode = Mode::Comment(depth + 1);
                } else {
                    blank(&mut out, i, i + 1);
                    i += 1;
                }
            }
            Mode::Str(interpolated) => {
                if b == b'\\' && next.is_some() {
                    let len = 1 + utf8_len(bytes[i + 1]);
                    blank(&mut out, i, i + len);
                    i += len;
                } else if b == b'"' {
                    out.push(b'"');
                    i += 1;
                    mode = stack.pop().unwrap_or(Mode::Code);
                } else if interpolated && b == b'{' {
                    out.push(b'{');
                    i += 1;
                    stack.push(mode);
                    brace_depth.push(0);
                    mode = Mode::Code;
                } else {
                    blank(&mut out, i, i + 1);
                    i += 1;
                }
            }
            Mode::RawStr(hashes) => {
                let closes = b == b'"'
                    && bytes.len() >= i + 1 + hashes
                    && bytes[i + 1..i + 1 + hashes].iter().all(|&c| c == b'#');
                if closes {
                    out.extend_from_slice(&bytes[i..i + 1 + hashes]);
                    i += 1 + hashes;
                    mode = Mode::Code;
                } else {
                    blank(&mut out, i, i + 1);
                    i += 1;
                }
            }
        }
    }
    let unterminated = match mode {
        Mode::Code if stack.is_empty() => None,
        Mode::Comment(_) => Some(("comment", start)),
        _ => Some(("string", start)),
    };
    // Every masked byte is ASCII and every kept byte is copied whole, so this is valid UTF-8
    // whenever `src` is; fall back to a lossy copy rather than panic.
    let text = String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    Masked { text, unterminated }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Length in bytes of a char literal `'x'` / `'\n'` / `'\u{…}'` at the start of `s`.
fn char_literal_len(s: &str) -> Option<usize> {
    let mut chars = s.char_indices().skip(1);
    let (_, c) = chars.next()?;
    if c == '\\' {
        // An escape: scan to the closing quote within a short window.
        let close = s[1..]
            .char_indices()
            .skip(2)
            .take(10)
            .find(|&(_, c)| c == '\'')?;
        return Some(1 + close.0 + 1);
    }
    let (at, close) = chars.next()?;
    (close == '\'' && c != '\'').then_some(at + 1)
}

/// Lean's `isIdRest`: letters, digits, `_`, `'`, `!`, `?` and sub/superscripts.
pub fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric()
        || matches!(c, '_' | '\'' | '!' | '?')
        || ('\u{2080}'..='\u{209C}').contains(&c)
        || ('\u{1D62}'..='\u{1D6A}').contains(&c)
}

fn prev_is_ident(src: &str, at: usize) -> bool {
    src[..at].chars().next_back().is_some_and(is_ident_char)
}

/// A word of the masked text: an identifier (dotted parts joined, `«»` quotes removed) or a
/// `#command`.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub text: String,
    /// Byte offset of its first character.
    pub start: usize,
    pub end: usize,
}

/// The words of `masked`, in order.
pub fn words(masked: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut chars = masked.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        let starts_word =
            is_ident_char(c) || c == '«' || (c == '#' && next_is_letter(masked, start));
        if !starts_word {
            chars.next();
            continue;
        }
        let mut text = String::new();
        let mut end = start;
        if c == '#' {
            text.push('#');
            chars.next();
            end = start + 1;
        }
        while let Some(&(at, c)) = chars.peek() {
            if c == '«' {
                // A quoted identifier part: everything up to `»` belongs to the word.
                chars.next();
                end = at + c.len_utf8();
                for (at, c) in chars.by_ref() {
                    end = at + c.len_utf8();
                    if c == '»' {
                        break;
                    }
                    text.push(c);
                }
            } else if is_ident_char(c) {
                text.push(c);
                chars.next();
                end = at + c.len_utf8();
            } else if c == '.'
                && masked[at + 1..]
                    .chars()
                    .next()
                    .is_some_and(|n| is_ident_char(n) || n == '«')
                && !text.is_empty()
            {
                text.push('.');
                chars.next();
                end = at + 1;
            } else {
                break;
            }
        }
        out.push(Word { text, start, end });
    }
    out
}

fn next_is_letter(s: &str, at: usize) -> bool {
    s[at + 1..]
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic())
}

/// 1-based line and 0-based column (in characters, as Lean counts) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |n| n + 1);
    (line, before[line_start..].chars().count())
}

/// Byte offset of the first top-level `:=` in `masked` (outside `()`, `[]`, `{}`, `⟨⟩`).
pub fn top_level_assign(masked: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut prev = '\0';
    for (at, c) in masked.char_indices() {
        match c {
            '(' | '[' | '{' | '⟨' => depth += 1,
            ')' | ']' | '}' | '⟩' => depth -= 1,
            '=' if prev == ':' && depth <= 0 => return Some(at - 1),
            _ => {}
        }
        prev = c;
    }
    None
}

/// Collapse every run of whitespace to one space and trim.
pub fn normalise_space(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_comments_and_strings_keeping_offsets() {
        let src = "exact h -- sorry\n/- a /- nested -/ sorry -/ rfl \"sorry\" s!\"x{sorry}\"";
        let m = mask(src);
        assert_eq!(m.text.len(), src.len());
        assert!(m.unterminated.is_none());
        assert_eq!(m.text.matches("sorry").count(), 1, "{}", m.text);
        assert!(m.text.contains("rfl"));
        assert_eq!(m.text.lines().count(), 2);
    }

    #[test]
    fn unterminated_comment_and_string_are_reported() {
        assert_eq!(mask("rfl /- open").unterminated, Some(("comment", 4)));
        assert_eq!(mask("rfl \"open").unterminated, Some(("string", 4)));
        assert_eq!(mask("rfl /- a -/ -- b").unterminated, None);
    }

    #[test]
    fn char_literals_and_primes() {
        let m = mask("fun h' => h' '\"' sorry");
        assert!(m.unterminated.is_none(), "{m:?}");
        assert!(m.text.contains("sorry"));
        assert_eq!(mask("'\\n' '\\''").unterminated, None);
    }

    #[test]
    fn words_join_dots_and_unquote() {
        let ws: Vec<_> = words("exact Nat.succ_le h.1 #eval «debug».x #[1] sorry_free")
            .into_iter()
            .map(|w| w.text)
            .collect();
        assert_eq!(
            ws,
            [
                "exact",
                "Nat.succ_le",
                "h.1",
                "#eval",
                "debug.x",
                "1",
                "sorry_free"
            ]
        );
    }

    #[test]
    fn positions_count_characters() {
        let text = "αβ\nγ x";
        let x = text.find('x').unwrap();
        assert_eq!(line_col(text, x), (2, 2));
        assert_eq!(
            top_level_assign("theorem t (x : N := 1) : P := by"),
            Some(27)
        );
    }
}
