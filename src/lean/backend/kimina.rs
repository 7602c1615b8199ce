//! Backend `kimina`: one kimina-lean-server or several (a cluster) over HTTP.
//!
//! `POST {url}/api/check` with `{"snippets": [{"id", "code"}], "timeout": T}` answers
//! `{"results": [{"id", "time", "error" | "response"}]}` where `response` is a REPL response.
//! Our verdict rules apply on top of it, unchanged. The shapes are checked against the real
//! server (PyPI kimina-ast-server 2.1.3) in tests/lean_kimina_server.rs.
//!
//! With several servers each proof goes to the healthy one with the fewest requests in flight.
//! A server that fails (no connection, an HTTP 5xx, a timeout) is marked down and the proof is
//! sent elsewhere after a backoff; a down server is asked again only once its own backoff has
//! passed and a probe (`GET {url}/health`, any HTTP answer) finds it up. A proof that no server
//! could check gets the verdict `checker_unavailable`: no reward, never cached (docs/checker.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::lean::message::{parse_repl_response, LeanMessage};
use crate::lean::source::Source;
use crate::lean::verdict::{LeanRun, RunEnd};

/// The servers proofs are spread over.
pub struct KiminaCluster {
    servers: Vec<Server>,
    agent: ureq::Agent,
    /// A short-timeout agent for health probes.
    probe: ureq::Agent,
    timeout: f64,
    backoff: Backoff,
    /// Rotates which server wins a tie of in-flight counts, so a sequential check spreads too.
    turn: AtomicUsize,
    /// Sent as `Authorization: Bearer` (the servers' `LEAN_SERVER_API_KEY`).
    api_key: Option<String>,
}

/// How long to wait before asking again.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Attempts per proof across all servers before it is `checker_unavailable`.
    pub attempts: u32,
    /// First wait; doubled per attempt (and per consecutive failure of a server), capped.
    pub first: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 4,
            first: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    fn after(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.min(16);
        self.first.saturating_mul(factor).min(self.cap)
    }
}

struct Server {
    url: String,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Failures in a row; 0 = up.
    failures: u32,
    /// When a down server may be probed again.
    retry_at: Option<Instant>,
}

/// Why a request did not give an answer.
enum Failure {
    /// The server is down or overloaded: try another.
    Server(String),
    /// Our request is wrong (HTTP 4xx): no server will take it.
    Refused(String),
}

impl KiminaCluster {
    pub fn new(
        urls: &[String],
        timeout: f64,
        backoff: Backoff,
        api_key: Option<String>,
    ) -> KiminaCluster {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            // The server may queue the snippet before its own timeout starts.
            .timeout_read(Duration::from_secs_f64(timeout * 2.0 + 60.0))
            .build();
        let probe = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let servers = urls
            .iter()
            .map(|u| Server {
                url: u.trim().trim_end_matches('/').to_string(),
                in_flight: AtomicUsize::new(0),
                health: Mutex::new(Health::default()),
            })
            .collect();
        KiminaCluster {
            servers,
            agent,
            probe,
            timeout,
            backoff,
            turn: AtomicUsize::new(0),
            api_key,
        }
    }

    /// What the verdict cache keys on: the servers, in order.
    pub fn identity(&self) -> String {
        let urls: Vec<&str> = self.servers.iter().map(|s| s.url.as_str()).collect();
        format!("kimina {}", urls.join(","))
    }

    pub fn run(&self, source: &Source, id: &str) -> anyhow::Result<LeanRun> {
        let code = source.full_text();
        // The server takes whole seconds.
        let seconds = self.timeout.ceil().max(1.0) as u64;
        let request = json!({"snippets": [{"id": id, "code": code}], "timeout": seconds});
        let mut errors: Vec<String> = Vec::new();
        for attempt in 0..self.backoff.attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(self.backoff.after(attempt - 1));
            }
            let Some(server) = self.pick() else {
                errors.push("every server is down".into());
                continue;
            };
            server.in_flight.fetch_add(1, Ordering::SeqCst);
            let answer = self.post(server, &request);
            server.in_flight.fetch_sub(1, Ordering::SeqCst);
            // The server's own trouble (no free REPL, a REPL it could not start) says nothing
            // about the proof: another server, or this one later, may check it.
            let answer = answer.and_then(|body| match server_fault(&body, id) {
                Some(why) => Err(Failure::Server(why)),
                None => Ok(body),
            });
            match answer {
                Ok(body) => {
                    server.mark_up();
                    let mut run = read_result(&body, id, source, &code, self.timeout)
                        .with_context(|| format!("kimina server {}", server.url))?;
                    run.retries = attempt;
                    return Ok(run);
                }
                Err(Failure::Refused(why)) => bail!("{why}"),
                Err(Failure::Server(why)) => {
                    tracing::warn!("kimina server {} failed, marked down: {why}", server.url);
                    server.mark_down(&self.backoff);
                    errors.push(format!("{}: {why}", server.url));
                }
            }
        }
        let attempts = self.backoff.attempts.max(1);
        Ok(LeanRun {
            end: RunEnd::Unavailable(format!(
                "no kimina server could check it in {attempts} attempts: {}",
                errors.join("; ")
            )),
            retries: attempts - 1,
            messages: Vec::new(),
            sorries: 0,
            stderr: String::new(),
        })
    }

    /// The up server with the fewest requests in flight; else a down one whose backoff has
    /// passed and that answers a probe.
    fn pick(&self) -> Option<&Server> {
        let n = self.servers.len();
        let start = self.turn.fetch_add(1, Ordering::SeqCst) % n.max(1);
        let up = (0..n)
            .map(|k| &self.servers[(start + k) % n])
            .filter(|s| s.is_up())
            .min_by_key(|s| s.in_flight.load(Ordering::SeqCst));
        if up.is_some() {
            return up;
        }
        let now = Instant::now();
        let due = self.servers.iter().filter(|s| s.probe_due(now));
        for server in due {
            let url = format!("{}/health", server.url);
            match self.probe.get(&url).call() {
                // Any HTTP answer, even a 404 from a server without that route, means it is up.
                Ok(_) | Err(ureq::Error::Status(..)) => {
                    server.mark_up();
                    return Some(server);
                }
                Err(_) => server.mark_down(&self.backoff),
            }
        }
        None
    }

    fn post(&self, server: &Server, request: &Value) -> Result<Value, Failure> {
        // The server mounts its check router under `/api` (only `/health` and the old
        // `/verify` are at the root).
        let endpoint = format!("{}/api/check", server.url);
        let mut post = self.agent.post(&endpoint);
        if let Some(key) = &self.api_key {
            post = post.set("Authorization", &format!("Bearer {key}"));
        }
        match post.send_json(request) {
            Ok(response) => response.into_json().map_err(|e| {
                Failure::Server(format!(
                    "{endpoint} answered something that is not JSON ({e})"
                ))
            }),
            Err(ureq::Error::Status(status, response)) if status < 500 => {
                let text = response.into_string().unwrap_or_default();
                Err(Failure::Refused(format!(
                    "{endpoint} refused the request (HTTP {status}): {}",
                    text.trim()
                )))
            }
            Err(e) => Err(Failure::Server(e.to_string())),
        }
    }
}

impl Server {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_up(&self) -> bool {
        self.health().failures == 0
    }

    fn probe_due(&self, now: Instant) -> bool {
        self.health().retry_at.is_none_or(|t| t <= now)
    }

    fn mark_up(&self) {
        *self.health() = Health::default();
    }

    fn mark_down(&self, backoff: &Backoff) {
        let mut health = self.health();
        health.failures += 1;
        health.retry_at = Some(Instant::now() + backoff.after(health.failures - 1));
    }
}

/// Errors kimina-lean-server gives a snippet when it could not run it at all (its
/// `routers/check.py`): no free REPL, or a REPL it failed to start or prepare.
const SERVER_FAULTS: [&str; 4] = [
    "No available REPLs",
    "Failed to get REPL",
    "Failed to get replacement REPL",
    "REPL prep failed",
];

/// The server-side error of snippet `id`'s result, if it is one of [`SERVER_FAULTS`].
fn server_fault(body: &Value, id: &str) -> Option<String> {
    let results = body.get("results")?.as_array()?;
    let result = results
        .iter()
        .find(|r| r.get("id").and_then(Value::as_str) == Some(id))
        .or_else(|| (results.len() == 1).then(|| &results[0]))?;
    let error = result.get("error")?.as_str()?;
    SERVER_FAULTS
        .iter()
        .any(|fault| error.starts_with(fault))
        .then(|| format!("the server could not run the proof: {error}"))
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
        retries: 0,
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
