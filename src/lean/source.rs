//! The checked file: `preamble + statement + " " + proof`, then the checker's own
//! `#print axioms NAME` (docs/checker.md §1 and §4.5).

use super::extract::declared_name;
use super::lex::{line_col, mask, words};

/// One assembled source, split where the REPL splits it: the header (imported once per worker)
/// and the body (sent per proof).
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The preamble, ending with a newline when non-empty.
    pub header: String,
    /// Statement, proof and audit.
    pub body: String,
    /// Byte range of the proof in `body`.
    pub proof_start: usize,
    pub proof_end: usize,
    /// 1-based line of `#print axioms` in `body`.
    pub audit_line: usize,
    /// Names the audit may print for our theorem: as declared, and inside the preamble's open
    /// namespaces.
    pub audit_names: Vec<String>,
}

impl Source {
    /// Assemble; `name` is the record's name, used when the statement declares none.
    pub fn new(preamble: &str, statement: &str, proof: &str, name: &str) -> Source {
        let mut header = preamble.to_string();
        if !header.is_empty() && !header.ends_with('\n') {
            header.push('\n');
        }
        let declared = declared_name(statement).unwrap_or_else(|| name.to_string());
        let mut body = String::with_capacity(statement.len() + proof.len() + declared.len() + 24);
        body.push_str(statement);
        body.push(' ');
        let proof_start = body.len();
        body.push_str(proof);
        let proof_end = body.len();
        body.push_str("\n\n#print axioms ");
        body.push_str(&declared);
        body.push('\n');
        let audit_line = body[..proof_end].matches('\n').count() + 3;
        let plain = declared
            .trim_start_matches("_root_.")
            .replace(['«', '»'], "");
        let mut audit_names = vec![plain.clone()];
        let namespace = open_namespace(&header);
        if !namespace.is_empty() && !declared.starts_with("_root_.") {
            audit_names.push(format!("{namespace}.{plain}"));
        }
        Source {
            header,
            body,
            proof_start,
            proof_end,
            audit_line,
            audit_names,
        }
    }

    /// The whole file the process backend writes.
    pub fn full_text(&self) -> String {
        let mut text = String::with_capacity(self.header.len() + self.body.len());
        text.push_str(&self.header);
        text.push_str(&self.body);
        text
    }

    /// Lines the header adds before the body.
    pub fn header_lines(&self) -> usize {
        self.header.matches('\n').count()
    }

    pub fn proof(&self) -> &str {
        &self.body[self.proof_start..self.proof_end]
    }

    /// Position (1-based line, 0-based column) of a body position relative to the proof:
    /// line 1 is the proof's first line and its column 0 is the proof's first character; lines
    /// ≤ 0 are in the statement.
    pub fn relative(&self, line: usize, column: usize) -> (i64, i64) {
        let (pl, pc) = line_col(&self.body, self.proof_start);
        let rel_line = line as i64 - pl as i64 + 1;
        let rel_col = if rel_line == 1 {
            column as i64 - pc as i64
        } else {
            column as i64
        };
        (rel_line, rel_col)
    }
}

/// The namespace open at the end of `header` (`namespace A` … `end A` tracked line by line).
fn open_namespace(header: &str) -> String {
    let masked = mask(header).text;
    let mut stack: Vec<String> = Vec::new();
    for line in masked.lines() {
        let ws = words(line);
        match ws.first().map(|w| w.text.as_str()) {
            Some("namespace") => {
                if let Some(name) = ws.get(1) {
                    stack.extend(name.text.split('.').map(str::to_string));
                }
            }
            Some("end") => {
                let parts = ws.get(1).map_or(0, |n| n.text.split('.').count());
                let keep = stack.len().saturating_sub(parts);
                stack.truncate(keep);
            }
            _ => {}
        }
    }
    stack.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_with_audit_and_positions() {
        let s = Source::new("prelude\n\n", "theorem t : P :=", "by\n  exact h", "t");
        assert_eq!(
            s.full_text(),
            "prelude\n\ntheorem t : P := by\n  exact h\n\n#print axioms t\n"
        );
        assert_eq!(s.audit_line, 4);
        assert_eq!(s.header_lines(), 2);
        assert_eq!(s.relative(1, 17), (1, 0));
        assert_eq!(s.relative(2, 2), (2, 2));
        assert_eq!(s.relative(1, 0), (1, -17));
        assert_eq!(s.proof(), "by\n  exact h");
    }

    #[test]
    fn namespaces_of_the_preamble_qualify_the_audit_name() {
        let s = Source::new(
            "namespace A\nnamespace B.C\nend C\n",
            "theorem t : P :=",
            "h",
            "t",
        );
        assert_eq!(s.audit_names, ["t", "A.B.t"]);
    }
}
