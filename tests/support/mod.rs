//! Shared by the `lean_*` test files: fake commands, options, data, process checks; and by
//! the end-to-end tests: running the binary ([`binary`]).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod binary;
pub mod gguf;

use lean_grpo::data::Theorem;
use lean_grpo::lean::{Backend, CheckerOptions};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/data/lean").join(name)
}

/// `python3 tests/support/fake_lean.py --json`, usable as `lean_cmd`.
pub fn fake_lean_cmd() -> String {
    format!(
        "python3 '{}' --json",
        repo().join("tests/support/fake_lean.py").display()
    )
}

/// `python3 tests/support/fake_repl.py ARGS`, usable as `repl_cmd`.
pub fn fake_repl_cmd(args: &str) -> String {
    format!(
        "python3 '{}' {args}",
        repo().join("tests/support/fake_repl.py").display()
    )
}

/// Options for a local command; the project does not exist, so jobs run in their temp dirs.
pub fn options(backend: Backend, cmd: &str) -> CheckerOptions {
    let mut o = CheckerOptions {
        backend,
        project: PathBuf::from("/nonexistent/lean_env"),
        jobs: 2,
        timeout: 10.0,
        ..CheckerOptions::default()
    };
    match backend {
        Backend::Lean => o.lean_cmd = Some(cmd.to_string()),
        Backend::Repl => o.repl_cmd = Some(cmd.to_string()),
        Backend::Kimina => o.kimina_url = vec![cmd.to_string()],
    }
    o
}

/// A theorem with a one-line header, for the fakes (they never read the statement).
pub fn theorem(name: &str) -> Theorem {
    Theorem {
        name: name.to_string(),
        statement: format!("theorem {name} : True :="),
        context: None,
        imports: vec!["Fake".to_string()],
        header: None,
        proof: None,
        split: None,
        hole: None,
    }
}

/// data/prelude.jsonl with each record's family.
pub fn prelude() -> Vec<(Theorem, String)> {
    let text =
        std::fs::read_to_string(repo().join("data/prelude.jsonl")).expect("data/prelude.jsonl");
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("prelude record");
            let family = value["family"].as_str().expect("family").to_string();
            (
                serde_json::from_value(value).expect("prelude theorem"),
                family,
            )
        })
        .collect()
}

/// The real Lean binary of `scripts/test-lean.sh`, or a visible skip. The skip line is
/// written to stderr directly: the test harness captures `eprintln!` of passing tests.
pub fn real_lean(test: &str) -> Option<String> {
    match std::env::var("LEAN_GRPO_TEST_LEAN") {
        Ok(path) if !path.is_empty() => Some(path),
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP real-lean {test}: LEAN_GRPO_TEST_LEAN unset (export LEAN_GRPO_TEST_LEAN=$(scripts/test-lean.sh))"
            );
            None
        }
    }
}

/// Is `pid` a live (not zombie) process?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Is `pid` a zombie child of this test process?
pub fn zombie_of_ours(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next();
    let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
    state == Some("Z") && ppid == Some(std::process::id())
}

/// Pids written one per line to `path` (empty when it does not exist).
pub fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Every child process of this test process (direct children only).
pub fn children_of_ours() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(me) {
            out.push(pid);
        }
    }
    out
}
