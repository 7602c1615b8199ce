//! Running one untrusted process under limits: its own process group, stdin closed, capped
//! stdout/stderr, a wall-clock timeout and a memory limit, and nothing left behind.
//!
//! Memory is limited by an RSS watchdog, not `RLIMIT_AS`: Lean maps every imported `.olean`
//! into its address space (Mathlib is several GiB of mappings before a proof is even read), so
//! an address-space limit either kills honest imports or has to be so loose that it limits
//! nothing. The watchdog sums the *private* resident memory (`RssAnon`) of every process in the
//! group, which is what a runaway proof grows, and leaves the shared, file-backed olean pages
//! out. It polls every 50 ms, so a process can overshoot by what it allocates in that time.
//!
//! Cleanup: the child leads its own process group (`setpgid` in `pre_exec`). When it exits we
//! see it without reaping it (`waitid(…, WNOWAIT)`), SIGKILL the whole group (so a grandchild
//! that forked and slept dies too), and only then reap: while the leader is an unreaped zombie
//! its pid, and so the group id, cannot be reused by an unrelated process. The same kill runs on
//! every exit path (normal exit, timeout, memory, output flood).

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Limits for one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub timeout: Duration,
    /// Private resident memory of the whole process group, in bytes.
    pub memory_bytes: Option<u64>,
    /// Bytes kept (and allowed) per stream; more kills the process.
    pub output_cap: usize,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    Timeout,
    Memory,
    OutputCap,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOutput {
    pub exit: Exit,
    /// At most `output_cap` bytes each.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Wall-clock time from spawn to exit.
    pub seconds: f64,
}

enum Event {
    Exited,
    OverCap,
    StreamDone,
}

/// Spawn `command` (stdin, stdout and stderr are set here) and wait for it under `limits`.
/// Errors only when the process cannot be started; everything the process does is in the
/// returned [`Exit`].
pub fn run_limited(mut command: Command, limits: &Limits) -> anyhow::Result<ProcessOutput> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    lead_own_group(&mut command, true);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    if let Some(pipe) = child.stdout.take() {
        spawn_reader(
            pipe,
            Arc::clone(&stdout),
            limits.output_cap,
            Some(tx.clone()),
        );
    }
    if let Some(pipe) = child.stderr.take() {
        spawn_reader(
            pipe,
            Arc::clone(&stderr),
            limits.output_cap,
            Some(tx.clone()),
        );
    }
    let waiter = {
        let tx = tx.clone();
        thread::spawn(move || {
            wait_no_reap(pid);
            let _ = tx.send(Event::Exited);
        })
    };
    drop(tx);

    let deadline = started + limits.timeout;
    let tick = Duration::from_millis(50);
    let mut streams_done = 0;
    let mut verdict: Option<Exit> = None;
    let mut exited = false;
    while !exited {
        let now = Instant::now();
        if now >= deadline {
            verdict = Some(Exit::Timeout);
            break;
        }
        match rx.recv_timeout(tick.min(deadline - now)) {
            Ok(Event::Exited) => exited = true,
            Ok(Event::OverCap) => {
                verdict = Some(Exit::OutputCap);
                break;
            }
            Ok(Event::StreamDone) => streams_done += 1,
            Err(RecvTimeoutError::Timeout) => {
                if limits
                    .memory_bytes
                    .is_some_and(|max| group_private_rss(pid) > max)
                {
                    verdict = Some(Exit::Memory);
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // Every path: kill what is left of the group while the leader is not yet reaped.
    kill_group(pid);
    let _ = waiter.join();
    let status = reap(&mut child);
    let seconds = started.elapsed().as_secs_f64();
    // The pipes close once every process holding them is dead; a process that escaped the
    // group (setsid) could hold them open, so wait a bounded time and keep what was read.
    let drain_deadline = Instant::now() + Duration::from_secs(2);
    while streams_done < 2 {
        match rx.recv_timeout(drain_deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::StreamDone) => streams_done += 1,
            Ok(Event::OverCap) if verdict.is_none() => verdict = Some(Exit::OutputCap),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let exit = verdict.unwrap_or(match status {
        Some(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Signal(0),
        },
        None => Exit::Signal(0),
    });
    let take = |buf: &Arc<Mutex<Vec<u8>>>| {
        std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()))
    };
    Ok(ProcessOutput {
        exit,
        stdout: take(&stdout),
        stderr: take(&stderr),
        seconds,
    })
}

/// Make the child of `command` the leader of a new process group (so the whole group can be
/// killed). With `die_with_thread`, the kernel also kills it when the thread that started it
/// ends (`PR_SET_PDEATHSIG`), which covers the checker being killed mid-proof; long-lived
/// workers started from short-lived threads must not use it (they end on stdin EOF instead).
pub fn lead_own_group(command: &mut Command, die_with_thread: bool) {
    // SAFETY: `setpgid` and `prctl` are async-signal-safe and touch no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if die_with_thread {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
}

/// Read `pipe` to its end on a thread, keeping its first `cap` bytes.
pub fn capture(pipe: impl Read + Send + 'static, cap: usize) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    spawn_reader(pipe, Arc::clone(&buf), cap, None);
    buf
}

/// Read `pipe` to its end, keeping at most `cap` bytes; report going over the cap once.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
    tx: Option<Sender<Event>>,
) {
    thread::spawn(move || {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut over = false;
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let mut buf = buf.lock().unwrap_or_else(|e| e.into_inner());
                    let room = cap.saturating_sub(buf.len());
                    buf.extend_from_slice(&chunk[..n.min(room)]);
                    if n > room && !over {
                        over = true;
                        if let Some(tx) = &tx {
                            let _ = tx.send(Event::OverCap);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if let Some(tx) = &tx {
            let _ = tx.send(Event::StreamDone);
        }
    });
}

/// Block until `pid` has exited, leaving it unreaped (a zombie that still holds its pid).
fn wait_no_reap(pid: libc::pid_t) {
    loop {
        // SAFETY: `info` is a plain struct the kernel fills; the call has no other effects.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// How `pid` ended, if it has, without reaping it (so its group id stays reserved until the
/// caller kills the group and reaps).
pub fn peek_exit(pid: libc::pid_t) -> Option<String> {
    // SAFETY: `info` is a plain struct the kernel fills; WNOWAIT leaves the child unreaped.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    // SAFETY: for a child that exited, `si_pid` and `si_status` are set.
    let (child, status) = unsafe { (info.si_pid(), info.si_status()) };
    if rc != 0 || child == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => format!("exit status {status}"),
        _ => format!("killed by signal {status}"),
    })
}

/// SIGKILL every process of group `pgid`.
pub fn kill_group(pgid: libc::pid_t) {
    // SAFETY: signalling a process group we created; ESRCH (already gone) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    child.wait().ok()
}

/// Sum of `RssAnon` over the processes of group `pgid`, in bytes.
pub fn group_private_rss(pgid: libc::pid_t) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, pgrp, …
        let Some(after) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        if after
            .split_whitespace()
            .nth(2)
            .and_then(|g| g.parse::<i32>().ok())
            != Some(pgid)
        {
            continue;
        }
        total += private_rss(pid);
    }
    total
}

/// `RssAnon` of one process, in bytes (0 when it is gone).
pub fn private_rss(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
