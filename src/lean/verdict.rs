//! The verdict on one proof and the evidence behind it (docs/checker.md §4), and the
//! partial-credit measure the reward may use (§5).

use serde::{Deserialize, Serialize};

use super::audit::{axiom_allowed, parse_audit};
use super::lex::{line_col, mask};
use super::message::{LeanMessage, Severity};
use super::screen::Screened;
use super::source::Source;

/// Accepted, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    Accepted,
    LeanError,
    Sorry,
    Forbidden,
    Axioms,
    StatementChanged,
    Timeout,
    Memory,
    Crashed,
    NoProof,
    /// A fill-in-the-middle completion that repeats or rewrites the text around the hole, or
    /// contains the hole marker (docs/fim.md): it did not fill the hole.
    HoleMismatch,
    /// No checker could run the proof (every kimina server failed or timed out, retried with
    /// backoff): the checker's failure, not the proof's. No reward, never cached.
    CheckerUnavailable,
}

impl VerdictKind {
    pub const ALL: [VerdictKind; 12] = [
        VerdictKind::Accepted,
        VerdictKind::LeanError,
        VerdictKind::Sorry,
        VerdictKind::Forbidden,
        VerdictKind::Axioms,
        VerdictKind::StatementChanged,
        VerdictKind::Timeout,
        VerdictKind::Memory,
        VerdictKind::Crashed,
        VerdictKind::NoProof,
        VerdictKind::HoleMismatch,
        VerdictKind::CheckerUnavailable,
    ];

    /// The snake_case name used in JSON and reports.
    pub fn name(self) -> &'static str {
        match self {
            VerdictKind::Accepted => "accepted",
            VerdictKind::LeanError => "lean_error",
            VerdictKind::Sorry => "sorry",
            VerdictKind::Forbidden => "forbidden",
            VerdictKind::Axioms => "axioms",
            VerdictKind::StatementChanged => "statement_changed",
            VerdictKind::Timeout => "timeout",
            VerdictKind::Memory => "memory",
            VerdictKind::Crashed => "crashed",
            VerdictKind::NoProof => "no_proof",
            VerdictKind::HoleMismatch => "hole_mismatch",
            VerdictKind::CheckerUnavailable => "checker_unavailable",
        }
    }
}

impl std::fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Lean message positioned relative to the proof: line 1 is the proof's first line and
/// column 0 its first character; lines ≤ 0 are in the statement, lines past the proof are the
/// checker's audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProofMessage {
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `None` for plain-mode messages printed without a position.
    pub line: Option<i64>,
    pub column: Option<i64>,
    pub text: String,
}

/// What the verdict rests on; empty parts are left out of JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ProofMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screened: Option<Screened>,
    /// For `axioms`: the foreign ones; for `accepted`: everything the audit listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub axioms: Vec<String>,
    /// For `statement_changed`: the restated statement, whitespace-normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restated: Option<String>,
    /// Exit status, signal, limit hit, stderr excerpt: whatever explains timeouts and crashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Fraction of the proof before the first error, see [`progress_before`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
}

impl Evidence {
    pub fn is_empty(&self) -> bool {
        *self == Evidence::default()
    }

    fn detail(detail: impl Into<String>) -> Evidence {
        Evidence {
            detail: Some(detail.into()),
            ..Evidence::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub kind: VerdictKind,
    #[serde(default, skip_serializing_if = "Evidence::is_empty")]
    pub evidence: Evidence,
}

impl Verdict {
    pub fn new(kind: VerdictKind, evidence: Evidence) -> Verdict {
        Verdict { kind, evidence }
    }

    pub fn is_accepted(&self) -> bool {
        self.kind == VerdictKind::Accepted
    }

    pub fn forbidden(screened: Screened) -> Verdict {
        Verdict::new(
            VerdictKind::Forbidden,
            Evidence {
                screened: Some(screened),
                ..Evidence::default()
            },
        )
    }

    /// The fraction (in `[0, 1]`) of the proof that ends before its first error, for partial
    /// credit. `None` when partial credit must not be given (accepted, `sorry`, `forbidden`,
    /// `axioms`, `statement_changed`) or when no error position is known (e.g. killed at the
    /// wall-clock limit).
    pub fn partial_progress(&self) -> Option<f64> {
        match self.kind {
            VerdictKind::LeanError
            | VerdictKind::Timeout
            | VerdictKind::Memory
            | VerdictKind::Crashed => self.evidence.progress,
            VerdictKind::NoProof => Some(0.0),
            _ => None,
        }
    }
}

/// The fraction of `proof` that ends before the error at (`line`, `column`) (proof-relative, as
/// in [`ProofMessage`]): of its tactic lines when it has two or more (blank lines, comments and
/// a first line that is just `by` do not count), else of its whitespace-separated tokens.
pub fn progress_before(proof: &str, line: i64, column: i64) -> f64 {
    if line < 1 {
        return 0.0;
    }
    let masked = mask(proof).text;
    let error = (line, column);
    let mut lines: Vec<(i64, i64)> = Vec::new(); // (line, end column) of each tactic line
    for (i, text) in masked.lines().enumerate() {
        let trimmed = text.trim();
        if trimmed.is_empty() || (i == 0 && trimmed == "by") {
            continue;
        }
        lines.push((i as i64 + 1, text.trim_end().chars().count() as i64));
    }
    let ends: Vec<(i64, i64)> = if lines.len() >= 2 {
        lines
    } else {
        let mut ends = Vec::new();
        let mut offset = 0;
        for piece in masked.split_inclusive(char::is_whitespace) {
            let token = piece.trim_end();
            if !token.is_empty() {
                let (l, c) = line_col(&masked, offset + token.len());
                ends.push((l as i64, c as i64));
            }
            offset += piece.len();
        }
        ends
    };
    if ends.is_empty() {
        return 0.0;
    }
    ends.iter().filter(|&&end| end <= error).count() as f64 / ends.len() as f64
}

/// How a backend's run of one source ended, before its messages are read.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// A `lean` process exited with this code.
    Exited(i32),
    /// A REPL (local or behind kimina) answered.
    Answered,
    /// Killed by a signal we did not send.
    Signaled(i32),
    /// Killed at the wall-clock limit (seconds).
    Timeout(f64),
    /// Killed at the memory limit (MiB).
    Memory(u64),
    /// Killed for printing more than this many bytes.
    OutputCap(u64),
    /// The worker or server failed without an answer.
    Died(String),
    /// No server could be reached to run it (retries exhausted).
    Unavailable(String),
}

/// Everything a backend learnt from running one source, in body line numbering.
#[derive(Debug, Clone, PartialEq)]
pub struct LeanRun {
    pub end: RunEnd,
    pub messages: Vec<LeanMessage>,
    /// `sorry`s the REPL reported.
    pub sorries: usize,
    /// stderr, or a REPL-level failure text.
    pub stderr: String,
    /// Requests sent again (to another kimina server) before this answer.
    pub retries: u32,
}

const MAX_MESSAGES: usize = 32;
const MAX_TEXT: usize = 4000;

/// Decide the verdict of a run by the rules of docs/checker.md §4 (screening has already passed).
pub fn judge(run: &LeanRun, source: &Source, allow_native_decide: bool) -> Verdict {
    let audit = find_audit(&run.messages, source);
    let mut evidence = Evidence {
        messages: run
            .messages
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != audit.as_ref().map(|(at, _, _)| *at))
            .take(MAX_MESSAGES)
            .map(|(_, m)| proof_message(m, source))
            .collect(),
        ..Evidence::default()
    };
    let stderr_tail = tail(&run.stderr, 1500);
    let reject = |kind, detail: String, mut evidence: Evidence| {
        evidence.detail = Some(detail);
        Verdict::new(kind, evidence)
    };
    match &run.end {
        RunEnd::Timeout(seconds) => {
            return reject(
                VerdictKind::Timeout,
                format!("killed at the wall-clock limit of {seconds} s"),
                evidence,
            )
        }
        RunEnd::Memory(mb) => {
            return reject(
                VerdictKind::Memory,
                format!("killed at the memory limit of {mb} MiB"),
                evidence,
            )
        }
        RunEnd::OutputCap(bytes) => {
            return reject(
                VerdictKind::Crashed,
                format!("killed after printing more than {bytes} bytes"),
                evidence,
            )
        }
        RunEnd::Signaled(signal) => {
            return reject(
                VerdictKind::Crashed,
                format!(
                    "killed by signal {signal} ({}){stderr_tail}",
                    signal_name(*signal)
                ),
                evidence,
            )
        }
        RunEnd::Died(why) => {
            return reject(
                VerdictKind::Crashed,
                format!("{why}{stderr_tail}"),
                evidence,
            )
        }
        RunEnd::Unavailable(why) => {
            return reject(VerdictKind::CheckerUnavailable, why.clone(), evidence)
        }
        RunEnd::Exited(code) if *code != 0 && *code != 1 => {
            return reject(
                VerdictKind::Crashed,
                format!("exited with code {code}{stderr_tail}"),
                evidence,
            )
        }
        RunEnd::Exited(_) | RunEnd::Answered => {}
    }
    if run.stderr.contains("out of memory") {
        return reject(
            VerdictKind::Memory,
            format!("Lean ran out of memory{stderr_tail}"),
            evidence,
        );
    }
    // The first error inside the proof; else the first anywhere (the statement: no progress).
    // Lean also reports some errors on the whole declaration (in `prelude` mode every error is
    // followed by `internal exception #3` at the statement), which must not hide the proof's.
    let error_positions: Vec<(i64, i64)> = run
        .messages
        .iter()
        .filter(|m| m.is_error())
        .filter_map(|m| m.pos)
        .map(|(l, c)| source.relative(l, c))
        .collect();
    let first_error = error_positions
        .iter()
        .filter(|pos| **pos >= (1, 0))
        .min()
        .or_else(|| error_positions.iter().min())
        .copied();
    evidence.progress = first_error.map(|(l, c)| progress_before(source.proof(), l, c));
    if run
        .messages
        .iter()
        .any(LeanMessage::is_deterministic_timeout)
    {
        return reject(
            VerdictKind::Timeout,
            "Lean's heartbeat limit (maxHeartbeats) was reached".into(),
            evidence,
        );
    }
    if run.messages.iter().any(LeanMessage::is_error) {
        return Verdict::new(VerdictKind::LeanError, evidence);
    }
    evidence.progress = None;
    if run.end == RunEnd::Exited(1) {
        return reject(
            VerdictKind::Crashed,
            format!("exited with code 1 without an error message{stderr_tail}"),
            evidence,
        );
    }
    if run.sorries > 0 || run.messages.iter().any(LeanMessage::is_sorry_warning) {
        return Verdict::new(VerdictKind::Sorry, evidence);
    }
    let Some((_, _, axioms)) = audit else {
        let why = "Lean gave no answer to the checker's `#print axioms` (the file did not run to its end)";
        return reject(
            VerdictKind::Crashed,
            format!("{why}{stderr_tail}"),
            evidence,
        );
    };
    let foreign: Vec<String> = axioms
        .iter()
        .filter(|a| !axiom_allowed(a, allow_native_decide))
        .cloned()
        .collect();
    if foreign.is_empty() {
        evidence.axioms = axioms;
        Verdict::new(VerdictKind::Accepted, evidence)
    } else {
        evidence.axioms = foreign;
        Verdict::new(VerdictKind::Axioms, evidence)
    }
}

/// The answer to our `#print axioms`: an information message on the appended line (or, in
/// plain mode where it has no position, the last message) naming our theorem.
fn find_audit(messages: &[LeanMessage], source: &Source) -> Option<(usize, String, Vec<String>)> {
    messages.iter().enumerate().rev().find_map(|(i, m)| {
        let placed = match m.pos {
            Some((line, _)) => line == source.audit_line,
            None => i + 1 == messages.len(),
        };
        if m.severity != Severity::Information || !placed {
            return None;
        }
        let (name, axioms) = parse_audit(&m.text)?;
        source
            .audit_names
            .contains(&name)
            .then_some((i, name, axioms))
    })
}

fn proof_message(m: &LeanMessage, source: &Source) -> ProofMessage {
    let rel = m.pos.map(|(l, c)| source.relative(l, c));
    let mut text = m.text.clone();
    if text.len() > MAX_TEXT {
        let cut = (0..=MAX_TEXT)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    ProofMessage {
        severity: m.severity,
        kind: m.kind.clone(),
        line: rel.map(|r| r.0),
        column: rel.map(|r| r.1),
        text,
    }
}

/// The last `max` bytes of `s` as a `": …"` suffix, or nothing when `s` is blank.
fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.is_empty() {
        return String::new();
    }
    let start = (s.len().saturating_sub(max)..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!(": {}", &s[start..])
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// A verdict that needs no Lean run.
pub(crate) fn without_run(kind: VerdictKind, detail: impl Into<String>) -> Verdict {
    Verdict::new(kind, Evidence::detail(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_tactic_lines_then_tokens() {
        let proof = "by\n  intro h\n  -- note\n  cases h\n  exact foo";
        assert_eq!(progress_before(proof, 5, 2), 2.0 / 3.0);
        assert_eq!(progress_before(proof, 1, 0), 0.0);
        assert_eq!(progress_before("MyEq.trans (f a) (g b)", 1, 11), 1.0 / 5.0);
        assert_eq!(progress_before("MyEq.refl _", 0, 3), 0.0);
    }

    #[test]
    fn kinds_serialise_snake_case() {
        let v = Verdict::new(VerdictKind::StatementChanged, Evidence::default());
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"kind":"statement_changed"}"#
        );
        assert_eq!(VerdictKind::ALL.map(VerdictKind::name).len(), 12);
    }
}
