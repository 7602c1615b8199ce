//! Backend `repl`: persistent leanprover-community/repl workers.
//!
//! A worker imports one header (`{"cmd": header}` → env id) and then checks proofs against that
//! environment (`{"cmd": body, "env": id}`), so a Mathlib import is paid once per worker, not
//! per proof. Requests and responses are JSON separated by a blank line. The pool holds at most
//! one worker per job slot, keyed by header, and evicts the least recently used idle worker for
//! a new header. A worker is restarted after `repl_recycle_after` proofs or when its private
//! memory passes `repl_recycle_mb` (the REPL keeps every environment it made); a timeout or a
//! memory overrun kills it, and the next proof starts a fresh one (the header is re-sent).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::lean::command::CommandLine;
use crate::lean::message::{parse_repl_response, LeanMessage, ReplResponse};
use crate::lean::sandbox::{capture, group_private_rss, kill_group, lead_own_group, peek_exit};
use crate::lean::source::Source;
use crate::lean::verdict::{LeanRun, RunEnd};

pub struct ReplSettings {
    pub capacity: usize,
    pub timeout: Duration,
    /// Header imports get at least this long.
    pub header_timeout: Duration,
    pub memory_bytes: u64,
    pub recycle_after: usize,
    pub recycle_bytes: u64,
    pub output_cap: usize,
}

pub struct ReplPool {
    command: CommandLine,
    settings: ReplSettings,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Least recently used first.
    idle: Vec<Worker>,
    busy: usize,
}

enum Reply {
    Json(Value),
    Garbage(String),
}

/// What one request came to.
enum Outcome {
    Reply(ReplResponse),
    Timeout,
    Memory,
    Died(String),
}

struct Worker {
    child: Child,
    pid: libc::pid_t,
    stdin: ChildStdin,
    replies: Receiver<Reply>,
    stderr: Arc<Mutex<Vec<u8>>>,
    header: String,
    env: Option<u64>,
    /// Errors the header itself produced; every proof on this worker carries them.
    header_errors: Vec<LeanMessage>,
    proofs: usize,
    _dir: tempfile::TempDir,
}

impl Drop for Worker {
    fn drop(&mut self) {
        kill_group(self.pid);
        let _ = self.child.wait();
    }
}

impl ReplPool {
    pub fn new(command: CommandLine, settings: ReplSettings) -> ReplPool {
        ReplPool {
            command,
            settings,
            state: Mutex::new(PoolState::default()),
        }
    }

    /// Check one source; a worker that dies mid-proof is replaced and the proof retried once.
    pub fn run(&self, source: &Source) -> anyhow::Result<LeanRun> {
        let mut last_death = String::new();
        for _attempt in 0..2 {
            let mut worker = match self.checkout(&source.header)? {
                Ok(worker) => worker,
                Err(run) => return Ok(run),
            };
            let request = json!({"cmd": source.body, "env": worker.env});
            let outcome =
                worker.request(&request, self.settings.timeout, self.settings.memory_bytes);
            let stderr = worker.stderr_text();
            let end = match outcome {
                Outcome::Reply(response) => {
                    let mut messages = worker.header_errors.clone();
                    messages.extend(response.messages);
                    worker.proofs += 1;
                    self.checkin(worker);
                    let stderr = response.failure.map_or(stderr, |f| format!("REPL: {f}"));
                    let end = RunEnd::Answered;
                    return Ok(LeanRun {
                        end,
                        retries: 0,
                        messages,
                        sorries: response.sorries.len(),
                        stderr,
                    });
                }
                Outcome::Timeout => RunEnd::Timeout(self.settings.timeout.as_secs_f64()),
                Outcome::Memory => RunEnd::Memory(self.settings.memory_bytes >> 20),
                Outcome::Died(why) => {
                    self.discard(worker);
                    last_death = why;
                    continue;
                }
            };
            self.discard(worker);
            return Ok(LeanRun {
                end,
                retries: 0,
                messages: Vec::new(),
                sorries: 0,
                stderr,
            });
        }
        Ok(LeanRun {
            end: RunEnd::Died(last_death),
            retries: 0,
            messages: Vec::new(),
            sorries: 0,
            stderr: String::new(),
        })
    }

    /// A worker with `header` imported: an idle one if any, else a new one (evicting the least
    /// recently used idle worker when the pool is full). `Ok(Err(run))` when the header import
    /// itself failed.
    fn checkout(&self, header: &str) -> anyhow::Result<Result<Worker, LeanRun>> {
        let evicted = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.busy += 1;
            if let Some(i) = state.idle.iter().rposition(|w| w.header == header) {
                return Ok(Ok(state.idle.remove(i)));
            }
            let full = state.idle.len() + state.busy > self.settings.capacity;
            (full && !state.idle.is_empty()).then(|| state.idle.remove(0))
        };
        drop(evicted);
        let started = self.start(header);
        match started {
            Ok(Ok(worker)) => Ok(Ok(worker)),
            other => {
                self.state.lock().unwrap_or_else(|e| e.into_inner()).busy -= 1;
                other
            }
        }
    }

    fn checkin(&self, worker: Worker) {
        let recycle = worker.proofs >= self.settings.recycle_after
            || group_private_rss(worker.pid) > self.settings.recycle_bytes;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.busy -= 1;
        if !recycle {
            state.idle.push(worker);
        }
    }

    fn discard(&self, worker: Worker) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).busy -= 1;
        drop(worker);
    }

    /// Start a worker and import `header`.
    fn start(&self, header: &str) -> anyhow::Result<Result<Worker, LeanRun>> {
        let dir = tempfile::Builder::new()
            .prefix("lean-grpo-repl-")
            .tempdir()
            .context("cannot create a temp dir for a REPL worker")?;
        let mut command = self.command.command(&[], dir.path());
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        lead_own_group(&mut command, false);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start the REPL ({})", self.command.program))?;
        let pid = child.id() as libc::pid_t;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            anyhow::bail!("the REPL process has no pipes");
        };
        let (tx, replies) = mpsc::channel();
        let cap = self.settings.output_cap;
        thread::spawn(move || read_replies(stdout, cap, tx));
        let stderr = capture(stderr, 64 * 1024);
        let mut worker = Worker {
            child,
            pid,
            stdin,
            replies,
            stderr,
            header: header.to_string(),
            env: None,
            header_errors: Vec::new(),
            proofs: 0,
            _dir: dir,
        };
        let timeout = self.settings.header_timeout.max(self.settings.timeout);
        let failed = |why: String, stderr: String| LeanRun {
            end: RunEnd::Died(why),
            retries: 0,
            messages: Vec::new(),
            sorries: 0,
            stderr,
        };
        match worker.request(&json!({"cmd": header}), timeout, self.settings.memory_bytes) {
            Outcome::Reply(response) if response.env.is_some() => {
                worker.env = response.env;
                worker.header_errors = response
                    .messages
                    .into_iter()
                    .filter(LeanMessage::is_error)
                    .map(|mut m| {
                        let line = m.pos.map_or(0, |p| p.0);
                        m.text = format!("in the header, line {line}: {}", m.text);
                        m.pos = None;
                        m.end_pos = None;
                        m
                    })
                    .collect();
                Ok(Ok(worker))
            }
            Outcome::Reply(response) => {
                let why = response
                    .failure
                    .unwrap_or_else(|| "no environment id".into());
                Ok(Err(failed(
                    format!("the REPL rejected the header: {why}"),
                    worker.stderr_text(),
                )))
            }
            Outcome::Timeout => Ok(Err(failed(
                format!("the header import took over {} s", timeout.as_secs()),
                worker.stderr_text(),
            ))),
            Outcome::Memory => Ok(Err(failed(
                "the header import hit the memory limit".into(),
                worker.stderr_text(),
            ))),
            Outcome::Died(why) => Ok(Err(failed(
                format!("the REPL died importing the header: {why}"),
                worker.stderr_text(),
            ))),
        }
    }
}

impl Worker {
    /// Send one request and wait for its reply under the limits.
    fn request(&mut self, request: &Value, timeout: Duration, memory_bytes: u64) -> Outcome {
        let mut line = request.to_string();
        line.push_str("\n\n");
        if let Err(e) = self
            .stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
        {
            return Outcome::Died(format!(
                "cannot write to the REPL ({e}){}",
                self.exit_note()
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Outcome::Timeout;
            }
            match self
                .replies
                .recv_timeout((deadline - now).min(Duration::from_millis(50)))
            {
                Ok(Reply::Json(value)) => return Outcome::Reply(parse_repl_response(&value)),
                Ok(Reply::Garbage(text)) => {
                    return Outcome::Died(format!(
                        "the REPL answered something that is not JSON: {}",
                        clip(&text)
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Outcome::Died(format!("the REPL process ended{}", self.exit_note()))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if group_private_rss(self.pid) > memory_bytes {
                        return Outcome::Memory;
                    }
                }
            }
        }
    }

    fn exit_note(&self) -> String {
        // Give a dying process a moment to finish exiting; never reap here (see `peek_exit`).
        for _ in 0..20 {
            if let Some(how) = peek_exit(self.pid) {
                return format!(" ({how})");
            }
            thread::sleep(Duration::from_millis(5));
        }
        String::new()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Split the REPL's stdout into replies at blank lines.
fn read_replies(stdout: impl std::io::Read, cap: usize, tx: mpsc::Sender<Reply>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let eof = !matches!(reader.read_line(&mut line), Ok(n) if n > 0);
        if !line.trim().is_empty() && buf.len() < cap {
            buf.push_str(&line);
            continue;
        }
        if !buf.trim().is_empty() {
            let reply = match serde_json::from_str::<Value>(&buf) {
                Ok(value) => Reply::Json(value),
                Err(_) => Reply::Garbage(std::mem::take(&mut buf)),
            };
            buf.clear();
            if tx.send(reply).is_err() {
                return;
            }
        }
        if eof {
            return;
        }
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}
