//! Turning the configured command lines into programs we can start: shell-style splitting,
//! finding the program, and network isolation with `unshare`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// A command line split shell-style, with where it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandLine {
    /// Prefix that isolates the network (`unshare --net --`), or empty.
    pub wrapper: Vec<String>,
    pub program: String,
    pub args: Vec<String>,
    /// Working directory; `None` = the job's temp dir.
    pub cwd: Option<PathBuf>,
}

impl CommandLine {
    /// Parse `line`, check that its program exists, and decide the working directory: `project`
    /// when it is a directory, else (only allowed when `project_required` is false) the job's.
    pub fn new(
        line: &str,
        project: &Path,
        project_required: bool,
        what: &str,
    ) -> anyhow::Result<CommandLine> {
        let mut words = split_words(line)
            .with_context(|| format!("cannot parse the {what} command `{line}`"))?;
        if words.is_empty() {
            bail!("the {what} command is empty");
        }
        let program = words.remove(0);
        if find_program(&program).is_none() {
            bail!(
                "the {what} command `{line}` cannot run: `{program}` is not an executable file or on PATH; \
                 install Lean (elan) or set the command (e.g. --lean-cmd \"/path/to/lean --json\")"
            );
        }
        let cwd = if project.is_dir() {
            Some(
                project
                    .canonicalize()
                    .with_context(|| format!("cannot resolve the project {}", project.display()))?,
            )
        } else if project_required {
            bail!(
                "the Lake project `{}` does not exist, and the default {what} command (`{line}`) runs in it; \
                 create it (see lean_env/README.md), pass --project DIR, or give your own command",
                project.display()
            );
        } else {
            None
        };
        Ok(CommandLine {
            wrapper: Vec::new(),
            program,
            args: words,
            cwd,
        })
    }

    /// The command for one job, `extra` appended, running in `cwd` unless it has its own.
    pub fn command(&self, extra: &[&str], job_dir: &Path) -> Command {
        let mut all = self.wrapper.iter().chain([&self.program]).chain(&self.args);
        let first = all.next().cloned().unwrap_or_default();
        let mut command = Command::new(first);
        command.args(all).args(extra);
        command.current_dir(self.cwd.as_deref().unwrap_or(job_dir));
        command
    }

    /// Everything that identifies what checks proofs (for the verdict cache).
    pub fn identity(&self) -> String {
        let toolchain = self
            .cwd
            .as_ref()
            .and_then(|dir| std::fs::read_to_string(dir.join("lean-toolchain")).ok())
            .unwrap_or_default();
        format!(
            "{} {:?} in {:?} toolchain {}",
            self.program,
            self.args,
            self.cwd,
            toolchain.trim()
        )
    }
}

/// Split like a POSIX shell does words: whitespace separates, `'…'` and `"…"` quote, `\`
/// escapes. No expansion of any kind.
pub fn split_words(line: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => bail!("unterminated single quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => bail!("unterminated double quote"),
                        },
                        Some(c) => word.push(c),
                        None => bail!("unterminated double quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => bail!("trailing backslash"),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The executable `program` names: a path, or a name on PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// The prefix that runs a command without network, if this machine allows one: plain
/// `unshare --net` (root or CAP_SYS_ADMIN), else inside a user namespace. Tried once per
/// checker; the error says why neither worked.
pub fn network_isolation() -> Result<Vec<String>, String> {
    let candidates: [&[&str]; 2] = [
        &["unshare", "--net", "--"],
        &["unshare", "--user", "--map-root-user", "--net", "--"],
    ];
    let mut why = String::from("`unshare` is not on PATH");
    if find_program("unshare").is_none() {
        return Err(why);
    }
    for prefix in candidates {
        let out = Command::new(prefix[0])
            .args(&prefix[1..])
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            Ok(out) if out.status.success() => {
                return Ok(prefix.iter().map(|s| s.to_string()).collect())
            }
            Ok(out) => why = String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Err(e) => why = e.to_string(),
        }
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell() {
        let w = split_words(r#"python3 "/tmp/my dir/fake.py" --mode 'a b' x\ y "q\"t""#).unwrap();
        assert_eq!(
            w,
            [
                "python3",
                "/tmp/my dir/fake.py",
                "--mode",
                "a b",
                "x y",
                "q\"t"
            ]
        );
        assert!(split_words("lean 'open").is_err());
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let err = CommandLine::new(
            "no-such-lean-xyz --json",
            Path::new("/nonexistent"),
            false,
            "lean",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`no-such-lean-xyz` is not an executable file or on PATH"),
            "{err}"
        );
        let err =
            CommandLine::new("sh", Path::new("/nonexistent-project"), true, "lean").unwrap_err();
        assert!(err.to_string().contains("--project DIR"), "{err}");
    }
}
