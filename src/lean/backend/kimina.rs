//! Backend `kimina`: a kimina-lean-server (or a cluster behind one URL) over HTTP.
//!
//! `POST {url}/check` with `{"snippets": [{"id", "code"}], "timeout": T}` answers
//! `{"results": [{"id", "time", "error" | "response"}]}` where `response` is a REPL response.
//! Our verdict rules apply on top of it, unchanged.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::lean::message::{parse_repl_response, LeanMessage};
use crate::lean::source::Source;
use crate::lean::verdict::{LeanRun, RunEnd};

pub struct KiminaClient {
    agent: ureq::Agent,
    url: String,
    timeout: f64,
}

const ATTEMPTS: u32 = 3;

impl KiminaClient {
    pub fn new(url: &str, timeout: f64) -> KiminaClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            // The server may queue the snippet before its own timeout starts.
            .timeout_read(Duration::from_secs_f64(timeout * 2.0 + 60.0))
            .build();
        KiminaClient {
            agent,
            url: url.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    pub fn identity(&self) -> String {
        format!("kimina {}", self.url)
    }

    pub fn run(&self, source: &Source, id: &str) -> anyhow::Result<LeanRun> {
        let code = source.full_text();
        // The server takes whole seconds.
        let seconds = self.timeout.ceil().max(1.0) as u64;
        let request = json!({"snippets": [{"id": id, "code": code}], "timeout": seconds});
        let endpoint = format!("{}/check", self.url);
        let mut last_error = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1 << (attempt - 1)));
            }
            match self.agent.post(&endpoint).send_json(&request) {
                Ok(response) => {
                    let body: Value = response.into_json().with_context(|| {
                        format!("{endpoint} answered something that is not JSON")
                    })?;
                    return read_result(&body, id, source, &code, self.timeout);
                }
                // 4xx: our request is wrong; retrying will not help.
                Err(ureq::Error::Status(status, response)) if status < 500 => {
                    let text = response.into_string().unwrap_or_default();
                    bail!(
                        "{endpoint} refused the request (HTTP {status}): {}",
                        text.trim()
                    );
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        bail!("kimina server {endpoint} failed {ATTEMPTS} times; last error: {last_error}")
    }
}

fn read_result(
    body: &Value,
    id: &str,
    source: &Source,
    code: &str,
    timeout: f64,
) -> anyhow::Result<LeanRun> {
    let results = body
        .get("results")
        .and_then(Value::as_array)
        .context("kimina answer has no `results` list")?;
    let result = results
        .iter()
        .find(|r| {
            r.get("id")
                .or_else(|| r.get("custom_id"))
                .and_then(Value::as_str)
                == Some(id)
        })
        .or_else(|| (results.len() == 1).then(|| &results[0]))
        .with_context(|| format!("kimina answer has no result for snippet {id}"))?;
    let mut run = LeanRun {
        end: RunEnd::Answered,
        messages: Vec::new(),
        sorries: 0,
        stderr: String::new(),
    };
    if let Some(error) = result.get("error").and_then(Value::as_str) {
        run.end = if error.to_lowercase().contains("timed out")
            || error.to_lowercase().contains("timeout")
        {
            RunEnd::Timeout(timeout)
        } else {
            RunEnd::Died(format!("kimina: {error}"))
        };
        return Ok(run);
    }
    let Some(response) = result.get("response").filter(|r| !r.is_null()) else {
        run.end = RunEnd::Died("kimina returned neither an error nor a response".into());
        return Ok(run);
    };
    let response = parse_repl_response(response);
    run.sorries = response.sorries.len();
    if let Some(failure) = response.failure {
        run.stderr = format!("REPL: {failure}");
    }
    run.messages = to_body(response.messages, source, code);
    Ok(run)
}

/// kimina numbers lines either over the whole snippet or (older servers) over what follows
/// the import lines it split off; pick the numbering under which our audit lands on its line.
fn to_body(messages: Vec<LeanMessage>, source: &Source, code: &str) -> Vec<LeanMessage> {
    let split = code
        .lines()
        .take_while(|l| l.trim().is_empty() || l.trim().starts_with("import "))
        .count();
    let header = source.header_lines();
    let whole = crate::lean::message::into_body(messages.clone(), header);
    let audit_at = |ms: &[LeanMessage]| {
        ms.iter().any(|m| {
            m.pos.is_some_and(|p| p.0 == source.audit_line)
                && m.severity == crate::lean::message::Severity::Information
        })
    };
    if split == 0 || audit_at(&whole) {
        return whole;
    }
    let shifted: Vec<LeanMessage> = messages
        .into_iter()
        .map(|mut m| {
            m.pos = m.pos.map(|(l, c)| (l + split, c));
            m.end_pos = m.end_pos.map(|(l, c)| (l + split, c));
            m
        })
        .collect();
    let shifted = crate::lean::message::into_body(shifted, header);
    if audit_at(&shifted) {
        shifted
    } else {
        whole
    }
}
