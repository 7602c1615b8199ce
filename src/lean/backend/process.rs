//! Backend `lean`: one process per proof, the whole file on disk in a fresh temp dir.

use std::time::Duration;

use anyhow::Context;

use crate::lean::command::CommandLine;
use crate::lean::message::{into_body, parse_lean_output};
use crate::lean::sandbox::{run_limited, Exit, Limits};
use crate::lean::source::Source;
use crate::lean::verdict::{LeanRun, RunEnd};

pub struct ProcessBackend {
    pub command: CommandLine,
    pub limits: Limits,
}

impl ProcessBackend {
    pub fn run(&self, source: &Source) -> anyhow::Result<LeanRun> {
        let dir = tempfile::Builder::new()
            .prefix("lean-grpo-")
            .tempdir()
            .context("cannot create a temp dir for a proof")?;
        let file = dir.path().join("Check.lean");
        std::fs::write(&file, source.full_text())
            .with_context(|| format!("cannot write {}", file.display()))?;
        let file_arg = file.to_string_lossy().into_owned();
        let output = run_limited(self.command.command(&[&file_arg], dir.path()), &self.limits)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let parsed = parse_lean_output(&stdout);
        let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        // Lines that are not messages (Lake's own errors, a panic) explain crashes.
        for line in parsed.other.iter().take(20) {
            stderr.push('\n');
            stderr.push_str(line);
        }
        let end = match output.exit {
            Exit::Code(code) => RunEnd::Exited(code),
            Exit::Signal(signal) => RunEnd::Signaled(signal),
            Exit::Timeout => RunEnd::Timeout(round(self.limits.timeout)),
            Exit::Memory => RunEnd::Memory(self.limits.memory_bytes.unwrap_or(0) >> 20),
            Exit::OutputCap => RunEnd::OutputCap(self.limits.output_cap as u64),
        };
        Ok(LeanRun {
            end,
            retries: 0,
            messages: into_body(parsed.messages, source.header_lines()),
            sorries: 0,
            stderr,
        })
    }
}

fn round(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
