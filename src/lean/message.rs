//! Lean's messages in the three shapes backends return: `lean --json` lines, plain `lean`
//! output (fallback), and leanprover-community/repl responses (also what kimina wraps).

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Information,
    Warning,
    Error,
}

impl Severity {
    fn parse(s: &str) -> Option<Severity> {
        match s {
            "information" | "info" => Some(Severity::Information),
            "warning" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

/// 1-based line, 0-based column.
pub type Position = (usize, usize);

/// One message as the backend numbered it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeanMessage {
    pub severity: Severity,
    /// 1-based line, 0-based column (codepoints); `None` for plain-mode messages printed bare.
    pub pos: Option<Position>,
    pub end_pos: Option<Position>,
    /// `hasSorry`, `runtime.maxHeartbeats`, … (`--json` of recent Lean only).
    pub kind: Option<String>,
    pub text: String,
}

impl LeanMessage {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The sorry warning, by kind or by any of its texts across versions:
    /// `declaration uses 'sorry'`, ``declaration uses `sorry` ``, ``declaration `X` uses `sorry` ``.
    pub fn is_sorry_warning(&self) -> bool {
        self.kind.as_deref() == Some("hasSorry")
            || (self.severity == Severity::Warning
                && self.text.starts_with("declaration ")
                && (self.text.contains("uses 'sorry'") || self.text.contains("uses `sorry`")))
    }

    /// Lean's own (deterministic, heartbeat-based) timeouts, elaborator or kernel.
    pub fn is_deterministic_timeout(&self) -> bool {
        self.is_error()
            && (self.kind.as_deref() == Some("runtime.maxHeartbeats")
                || self.text.contains("(deterministic) timeout")
                || self.text.contains("(kernel) deterministic timeout"))
    }
}

fn pos(value: &Value) -> Option<(usize, usize)> {
    let line = value.get("line")?.as_u64()?;
    let column = value.get("column")?.as_u64()?;
    Some((line as usize, column as usize))
}

/// A message object of `lean --json` or of a REPL response (`data` or `message` holds the text).
pub fn message_from_json(value: &Value) -> Option<LeanMessage> {
    let severity = Severity::parse(value.get("severity")?.as_str()?)?;
    let text = value
        .get("data")
        .or_else(|| value.get("message"))?
        .as_str()?
        .to_string();
    Some(LeanMessage {
        severity,
        pos: value.get("pos").and_then(pos),
        end_pos: value.get("endPos").and_then(pos),
        kind: value
            .get("kind")
            .and_then(Value::as_str)
            .filter(|k| *k != "[anonymous]")
            .map(str::to_string),
        text,
    })
}

/// Renumber messages of a whole file (header + body) to body lines. Messages inside the header
/// lose their position (the proof cannot have caused them) and say where they were.
pub fn into_body(messages: Vec<LeanMessage>, header_lines: usize) -> Vec<LeanMessage> {
    messages
        .into_iter()
        .map(|mut m| {
            match m.pos {
                Some((line, _)) if line <= header_lines => {
                    m.text = format!("in the header, line {line}: {}", m.text);
                    m.pos = None;
                    m.end_pos = None;
                }
                Some((line, column)) => {
                    m.pos = Some((line - header_lines, column));
                    m.end_pos = m.end_pos.map(|(l, c)| (l.saturating_sub(header_lines), c));
                }
                None => {}
            }
            m
        })
        .collect()
}

/// What a `lean` process printed, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedOutput {
    pub messages: Vec<LeanMessage>,
    /// Lines that were neither messages nor their continuations (Lake's build chatter, …).
    pub other: Vec<String>,
}

/// Parse `lean --json` output, falling back to the plain format when no line is a JSON
/// message.
pub fn parse_lean_output(stdout: &str) -> ParsedOutput {
    let mut out = ParsedOutput::default();
    let mut json_lines = 0;
    for line in stdout.lines() {
        let message = line
            .trim_start()
            .starts_with('{')
            .then(|| serde_json::from_str::<Value>(line).ok())
            .flatten()
            .and_then(|v| message_from_json(&v));
        match message {
            Some(m) => {
                json_lines += 1;
                out.messages.push(m);
            }
            None if !line.trim().is_empty() => out.other.push(line.to_string()),
            None => {}
        }
    }
    if json_lines == 0 {
        return parse_plain(stdout);
    }
    out
}

/// Plain `lean FILE` output: `FILE:L:C: severity: text` (or `FILE:L:C-L:C: …`,
/// `error(kind): …`), continuation lines, and bare `#print axioms` answers.
pub fn parse_plain(stdout: &str) -> ParsedOutput {
    let mut out = ParsedOutput::default();
    let mut current: Option<LeanMessage> = None;
    for line in stdout.lines() {
        let started = plain_header(line).or_else(|| bare_audit(line));
        match started {
            Some(m) => {
                out.messages.extend(current.take());
                current = Some(m);
            }
            None => match current.as_mut() {
                Some(m) => {
                    m.text.push('\n');
                    m.text.push_str(line);
                }
                None if !line.trim().is_empty() => out.other.push(line.to_string()),
                None => {}
            },
        }
    }
    out.messages.extend(current);
    out
}

fn bare_audit(line: &str) -> Option<LeanMessage> {
    let audit = line.starts_with('\'')
        && (line.contains("' does not depend on any axioms")
            || line.contains("' depends on axioms:"));
    audit.then(|| LeanMessage {
        severity: Severity::Information,
        pos: None,
        end_pos: None,
        kind: None,
        text: line.to_string(),
    })
}

/// `FILE:L:C[-L:C]: severity[(kind)]: text`.
fn plain_header(line: &str) -> Option<LeanMessage> {
    for severity in ["error", "warning", "information", "info"] {
        let mut search = 0;
        while let Some(found) = line[search..].find(&format!(": {severity}")) {
            let at = search + found;
            search = at + 2;
            let rest = &line[at + 2 + severity.len()..];
            let (kind, text) = if let Some(r) = rest.strip_prefix(": ") {
                (None, r)
            } else if let Some(r) = rest.strip_prefix('(') {
                let close = r.find("): ")?;
                (Some(r[..close].to_string()), &r[close + 3..])
            } else if rest == ":" {
                (None, "")
            } else {
                continue;
            };
            let Some((start, end)) = location(&line[..at]) else {
                continue;
            };
            return Some(LeanMessage {
                severity: Severity::parse(severity)?,
                pos: Some(start),
                end_pos: end,
                kind,
                text: text.to_string(),
            });
        }
    }
    None
}

/// The `L:C` or `L:C-L:C` suffix of `FILE:L:C…`.
fn location(prefix: &str) -> Option<(Position, Option<Position>)> {
    let pair = |s: &str| -> Option<(usize, usize)> {
        let (l, c) = s.split_once(':')?;
        Some((l.parse().ok()?, c.parse().ok()?))
    };
    let (head, range) = match prefix.rsplit_once('-') {
        Some((head, end)) if pair(end).is_some() && head.matches(':').count() >= 2 => {
            (head, pair(end))
        }
        _ => (prefix, None),
    };
    let mut parts = head.rsplitn(3, ':');
    let column = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    parts.next().filter(|file| !file.is_empty())?;
    Some(((line, column), range))
}

/// A leanprover-community/repl response to a command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplResponse {
    pub env: Option<u64>,
    pub messages: Vec<LeanMessage>,
    /// Positions of `sorry`s the REPL found.
    pub sorries: Vec<(usize, usize)>,
    /// A REPL-level failure (`{"message": "…"}`), not a Lean message.
    pub failure: Option<String>,
}

/// Parse one REPL response object.
pub fn parse_repl_response(value: &Value) -> ReplResponse {
    let list = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let failure = value
        .get("message")
        .and_then(Value::as_str)
        .filter(|_| value.get("severity").is_none())
        .map(str::to_string);
    ReplResponse {
        env: value.get("env").and_then(Value::as_u64),
        messages: list("messages")
            .iter()
            .filter_map(message_from_json)
            .collect(),
        sorries: list("sorries")
            .iter()
            .map(|s| s.get("pos").and_then(pos).unwrap_or((0, 0)))
            .collect(),
        failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_with_ranges_kinds_continuations_and_bare_info() {
        let out = "f.lean:3:7-3:9: error(lean.unknownIdentifier): Unknown identifier `x`\n  more\n\
                   f.lean:5:0: warning: declaration uses 'sorry'\n't' depends on axioms: [propext,\n Quot.sound]\n";
        let parsed = parse_plain(out);
        assert_eq!(parsed.messages.len(), 3);
        let e = &parsed.messages[0];
        assert_eq!(
            (e.pos, e.end_pos, e.kind.as_deref()),
            (Some((3, 7)), Some((3, 9)), Some("lean.unknownIdentifier"))
        );
        assert_eq!(e.text, "Unknown identifier `x`\n  more");
        assert!(parsed.messages[1].is_sorry_warning());
        assert_eq!(parsed.messages[2].pos, None);
        assert!(parsed.messages[2].text.ends_with("Quot.sound]"));
    }

    #[test]
    fn repl_failure_is_not_a_message() {
        let v: Value =
            serde_json::from_str(r#"{"message": "Lean error:\n<input>:1:1: unknown tactic"}"#)
                .unwrap();
        let r = parse_repl_response(&v);
        assert!(r.failure.is_some() && r.messages.is_empty());
    }
}
