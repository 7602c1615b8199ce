use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which service turns a Lean source into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One `lean` process per proof (default: `lake env lean --json` in the Lake project).
    #[default]
    Lean,
    /// Persistent leanprover-community/repl workers, one header import per worker.
    Repl,
    /// A kimina-lean-server over HTTP.
    Kimina,
}

/// The `checker` section of a configuration file; flags of `check`, `train` and `eval`
/// override it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckerOptions {
    pub backend: Backend,
    /// Command that checks one file, the file path appended; `None` = `lake env lean --json`.
    pub lean_cmd: Option<String>,
    /// The Lake project the command runs in.
    pub project: PathBuf,
    /// Parallel jobs; 0 = one per core.
    pub jobs: usize,
    /// Wall-clock limit per proof, in seconds.
    pub timeout: f64,
    /// Memory limit per Lean process, in MiB.
    pub memory_mb: u64,
    /// kimina-lean-server base URL (backend `kimina`).
    pub kimina_url: Option<String>,
    /// Allow `native_decide` / `decide +native` (they add a compiler-trust axiom).
    pub allow_native_decide: bool,
}

impl Default for CheckerOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Lean,
            lean_cmd: None,
            project: PathBuf::from("lean_env"),
            jobs: 0,
            timeout: 60.0,
            memory_mb: 8192,
            kimina_url: None,
            allow_native_decide: false,
        }
    }
}
