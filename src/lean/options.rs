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

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Lean => "lean",
            Backend::Repl => "repl",
            Backend::Kimina => "kimina",
        }
    }
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
    /// kimina-lean-server base URLs (backend `kimina`): a list, or one string of
    /// comma-separated URLs. Proofs are spread over them (src/lean/backend/kimina.rs).
    #[serde(deserialize_with = "url_list")]
    pub kimina_url: Vec<String>,
    /// Attempts per proof over the kimina servers, with backoff, before the proof's verdict
    /// is `checker_unavailable`.
    pub kimina_attempts: u32,
    /// Environment variable holding the kimina servers' API key (their `LEAN_SERVER_API_KEY`),
    /// sent as `Authorization: Bearer`; `None` for servers without one.
    pub kimina_api_key_env: Option<String>,
    /// A check stops with an error once this many proofs in a row were
    /// `checker_unavailable` (0 = never).
    pub max_unavailable: usize,
    /// Allow `native_decide` / `decide +native` (they add a compiler-trust axiom).
    pub allow_native_decide: bool,
    /// Largest `N` a proof may give in `set_option maxHeartbeats N` (0 is never allowed: it
    /// switches Lean's own timeout off).
    pub heartbeats_cap: u64,
    /// Largest `N` a proof may give in `set_option maxRecDepth N`.
    pub rec_depth_cap: u64,
    /// Output a Lean process may print before it is killed, in MiB (stdout and stderr each).
    pub output_cap_mb: u64,
    /// Run each Lean process without network (`unshare --net`) where the OS allows it.
    pub isolate_network: bool,
    /// Remember verdicts by (backend, Lean, preamble, statement, proof) for the checker's
    /// lifetime, so a proof sampled twice is checked once.
    pub cache: bool,
    /// REPL worker command (backend `repl`); `None` = `lake env repl` in the project.
    pub repl_cmd: Option<String>,
    /// A REPL worker is restarted after this many proofs (its environments pile up).
    pub repl_recycle_after: usize,
    /// A REPL worker whose private memory exceeds this (MiB) after a proof is restarted.
    pub repl_recycle_mb: u64,
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
            kimina_url: Vec::new(),
            kimina_attempts: 4,
            kimina_api_key_env: None,
            max_unavailable: 16,
            allow_native_decide: false,
            heartbeats_cap: 1_000_000,
            rec_depth_cap: 100_000,
            output_cap_mb: 8,
            isolate_network: true,
            cache: true,
            repl_cmd: None,
            repl_recycle_after: 1000,
            repl_recycle_mb: 6144,
        }
    }
}

impl CheckerOptions {
    /// `jobs`, with 0 resolved to the number of cores.
    pub fn effective_jobs(&self) -> usize {
        match self.jobs {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// A list of URLs from a YAML/JSON list or from one comma-separated string; blanks dropped.
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    Ok(items
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}
