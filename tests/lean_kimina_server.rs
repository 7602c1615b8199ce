//! The `kimina` backend against the real kimina-lean-server: the PyPI package
//! kimina-ast-server 2.1.3, installed by scripts/fetch-kimina.sh, its FastAPI app run as a
//! subprocess on a free port. Only its Lean REPL is replaced: the server starts
//! `lake env REPL_PATH`, and here `lake` is a shim and the REPL is tests/support/fixture_repl.py,
//! which speaks the REPL's JSON protocol and answers with real REPL output from
//! tests/data/lean/. So our requests meet the server's real request validation, and our reader
//! meets its real response, error and timeout shapes.
//!
//! Needs LEAN_GRPO_KIMINA_PYTHON (the environment's python; scripts/test.sh sets it); without it
//! each test prints why it is skipped and passes.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lean_grpo::data::Theorem;
use lean_grpo::lean::{Backend, Checker, Job, VerdictKind};
use support::*;

/// A running kimina-lean-server; killed (SIGKILL) and reaped on drop.
struct Kimina {
    url: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Kimina {
    /// Starts a server and waits until `GET /health` answers.
    fn start(python: &str) -> Kimina {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // kimina runs `lake env REPL_PATH` in the project directory.
        script(
            &bin.join("lake"),
            "[ \"$1\" = env ] && shift\nexec \"$@\"\n",
        );
        let repl = dir.path().join("repl");
        let fake = repo().join("tests/support/fixture_repl.py");
        let log = dir.path().join("repl.log");
        script(
            &repl,
            &format!(
                "exec python3 '{}' --log '{}'\n",
                fake.display(),
                log.display()
            ),
        );
        let port = free_port();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let server_log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(python)
            .args(["-m", "server", "run"])
            // Its settings also read a `.env` file in the working directory: none here.
            .current_dir(dir.path())
            .env("PATH", path)
            .env("LEAN_SERVER_HOST", "127.0.0.1")
            .env("LEAN_SERVER_PORT", port.to_string())
            .env("LEAN_SERVER_REPL_PATH", &repl)
            .env("LEAN_SERVER_PROJECT_DIR", dir.path())
            // The AST export paths it also checks at start are not used by /api/check.
            .env("LEAN_SERVER_SKIP_VALIDATION", "1")
            // Its REPLs run under RLIMIT_AS of this size; the default (8) is read as 8 MiB.
            .env("LEAN_SERVER_MAX_REPL_MEM", "2G")
            .env("LEAN_SERVER_MAX_REPLS", "3")
            .env_remove("LEAN_SERVER_API_KEY")
            .env_remove("LEAN_SERVER_DATABASE_URL")
            .env_remove("LEAN_SERVER_WORKSPACE")
            .stdin(Stdio::null())
            .stdout(server_log.try_clone().unwrap())
            .stderr(server_log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {python} -m server run: {e}"));
        let mut server = Kimina {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        server.wait_healthy();
        server
    }

    fn wait_healthy(&mut self) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            if let Ok(response) = agent.get(&format!("{}/health", self.url)).call() {
                let body: serde_json::Value = response.into_json().unwrap();
                assert_eq!(body, serde_json::json!({"status": "ok"}));
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kimina server exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("kimina server not healthy after 45 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of the server's own log, for failure messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }

    /// Proof commands the fake REPL has received.
    fn proofs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("repl.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("proof"))
            .count()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kimina {
    fn drop(&mut self) {
        self.kill();
    }
}

fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The environment's python from scripts/fetch-kimina.sh, or a visible skip (written to stderr
/// directly: the harness captures `eprintln!` of passing tests).
fn kimina_python(test: &str) -> Option<String> {
    match std::env::var("LEAN_GRPO_KIMINA_PYTHON") {
        Ok(path) if !path.is_empty() => {
            assert!(
                PathBuf::from(&path).exists(),
                "LEAN_GRPO_KIMINA_PYTHON={path} does not exist"
            );
            Some(path)
        }
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP kimina-server {test}: LEAN_GRPO_KIMINA_PYTHON unset (run scripts/test.sh, or export LEAN_GRPO_KIMINA_PYTHON=$(scripts/fetch-kimina.sh))"
            );
            None
        }
    }
}

fn checker(urls: &[String], timeout: f64, jobs: usize) -> Checker {
    let mut o = options(Backend::Kimina, "");
    o.kimina_url = urls.to_vec();
    o.timeout = timeout;
    o.jobs = jobs;
    Checker::new(&o).unwrap()
}

fn job(theorem: &Theorem, directive: &str) -> Job {
    Job::new(theorem, format!("by\n  -- fake:{directive}\n  trivial"))
}

#[test]
fn verdicts_through_the_real_server() {
    let Some(python) = kimina_python("verdicts_through_the_real_server") else {
        return;
    };
    let server = Kimina::start(&python);
    // Whole seconds on the wire; the `hang` proof is stopped by the server's timeout.
    let checker = checker(std::slice::from_ref(&server.url), 2.0, 2);
    let t = theorem("t");
    // Without imports kimina sends the whole snippet as one command, so lines are numbered
    // over the whole file rather than after the split-off header.
    let mut bare = theorem("u");
    bare.imports.clear();
    let jobs = [
        job(&t, "none"),
        job(&t, "error"),
        job(&t, "sorry"),
        job(&t, "hang"),
        job(&t, "repl-error"),
        job(&t, "die"),
        job(&bare, "none"),
        job(&bare, "sorry"),
    ];
    let results = checker.check(&jobs, None).unwrap();
    let kinds: Vec<VerdictKind> = results.iter().map(|c| c.verdict.kind).collect();
    use VerdictKind::*;
    assert_eq!(
        kinds,
        [Accepted, LeanError, Sorry, Timeout, Crashed, Crashed, Accepted, Sorry],
        "{:#?}\n{}",
        results.iter().map(|c| &c.verdict).collect::<Vec<_>>(),
        server.log()
    );
    // The audit was found on its line (after kimina split the import off): nothing else left.
    assert!(results[0].verdict.evidence.messages.is_empty());
    let error = &results[1].verdict.evidence.messages[0];
    assert_eq!(error.text, "unsolved goals\n⊢ Nat");
    // The fixture's error is at line 1, column 15 of what the REPL got: kimina's body, which
    // starts at the statement line `theorem t : True := by` (proof line 1, the proof starting at
    // column 20). Read over the whole snippet it would be on the import line (proof line 0).
    assert_eq!((error.line, error.column), (Some(1), Some(-5)), "{error:?}");
    let detail = |i: usize| {
        results[i]
            .verdict
            .evidence
            .detail
            .clone()
            .unwrap_or_default()
    };
    assert!(detail(3).contains("2 s"), "{}", detail(3));
    // A REPL-level failure comes through as the REPL's own `{"message"}` (as with the `repl`
    // backend: no answer to the audit, so `crashed`, with the REPL's text).
    assert!(
        detail(4).contains("REPL: Lean error:\n<input>:1:1: unknown tactic"),
        "{}",
        detail(4)
    );
    // A REPL that dies mid-command is the server's `error` string, not a timeout.
    assert!(
        detail(5).contains("kimina: Snippet execution failed"),
        "{}",
        detail(5)
    );
    assert!(results.iter().all(|r| r.retries == 0));
    assert_eq!(
        server.proofs(),
        jobs.len(),
        "each proof reached a REPL once"
    );
}

#[test]
fn a_cluster_of_real_servers_with_one_killed_mid_run_gives_every_proof_its_verdict() {
    let Some(python) = kimina_python("cluster_with_one_killed_mid_run") else {
        return;
    };
    let mut servers: Vec<Kimina> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| Kimina::start(&python))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let checker = checker(&urls, 10.0, 3);
    let n = 15;
    let jobs: Vec<Job> = (0..n)
        .map(|i| job(&theorem(&format!("t{i}")), "sleep 0.4"))
        .collect();
    let results = std::thread::scope(|s| {
        let run = s.spawn(|| checker.check(&jobs, None));
        // Kill the first server once it is working on a proof (its REPL got one).
        let deadline = Instant::now() + Duration::from_secs(30);
        while servers[0].proofs() == 0 {
            assert!(Instant::now() < deadline, "server 0 never got a proof");
            std::thread::sleep(Duration::from_millis(20));
        }
        servers[0].kill();
        run.join().unwrap()
    })
    .unwrap();
    assert_eq!(results.len(), n);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.verdict.kind,
            VerdictKind::Accepted,
            "job {i}: {:?}",
            r.verdict
        );
    }
    let retries: u32 = results.iter().map(|r| r.retries).sum();
    assert!(
        retries >= 1,
        "the proof in flight at the killed server went again"
    );
    // The killed server answered fewer proofs than its REPL got (at least one was lost there);
    // the other two took all the rest, that one included.
    let done = [&servers[1], &servers[2]].map(|s| s.proofs());
    let killed = servers[0].proofs();
    assert!(
        done[0] + done[1] > n - killed,
        "the other two took the rest: {done:?}, killed server's REPL got {killed}"
    );
}
