//! On-policy rollouts from a server (`train.endpoint_adapter_dir`): the policy's LoRA adapter is
//! written where the server can read it and hot-loaded under a new name every
//! `train.sync_steps` steps, and requests sample with that name, so the server samples from the
//! policy being trained rather than from the model it was started with (docs/design.md §5).
//!
//! A server that cannot hot-load (no runtime LoRA route, LoRA not enabled, the adapter refused)
//! turns the run into an off-policy one, with one warning. A server that fails a load (timeout,
//! 5xx) costs that sync only: the step samples from the adapter loaded before, and its samples
//! say which version that was. A server that forgot its adapters (a restart) is given the
//! current one again when it answers that it does not know it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::endpoint::{AdapterLoad, EndpointClient};

/// Where and how often the policy's adapter goes to the server.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// A directory both the trainer and the server can read; each version is a subdirectory.
    pub dir: PathBuf,
    /// The adapters are named `{prefix}-v{version}` (the run's name: runs sharing a server do
    /// not collide).
    pub prefix: String,
    /// Load a new version once the server's lags this many steps behind the policy.
    pub every: usize,
    /// How long a load may take before it counts as failed.
    pub timeout: Duration,
}

/// The adapter the server samples with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedAdapter {
    /// Training steps the policy had taken when it was written.
    pub version: usize,
    /// The model name requests give.
    pub name: String,
    path: PathBuf,
}

/// Keeps one server's adapter in step with the policy.
#[derive(Debug)]
pub struct AdapterSync {
    options: SyncOptions,
    state: Mutex<SyncState>,
}

#[derive(Debug, Default)]
struct SyncState {
    /// The server cannot hot-load: every sample comes from the served model.
    off_policy: bool,
    loaded: Option<LoadedAdapter>,
}

impl AdapterSync {
    /// Creates the adapter directory, whose absolute path is what the server is sent.
    pub fn new(mut options: SyncOptions) -> Result<AdapterSync> {
        fs::create_dir_all(&options.dir).with_context(|| {
            format!(
                "cannot create train.endpoint_adapter_dir {}",
                options.dir.display()
            )
        })?;
        options.dir = options.dir.canonicalize().with_context(|| {
            format!(
                "cannot resolve train.endpoint_adapter_dir {}",
                options.dir.display()
            )
        })?;
        options.every = options.every.max(1);
        Ok(AdapterSync {
            options,
            state: Mutex::new(SyncState::default()),
        })
    }

    /// Brings the server to the policy's `version` (training steps done) when its adapter is
    /// `every` or more steps older, or from another run's timeline (a resume). `write(dir)`
    /// writes the policy's adapter as a PEFT directory.
    pub fn sync(
        &self,
        client: &EndpointClient,
        version: usize,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.lock();
        if state.off_policy {
            return Ok(());
        }
        if let Some(loaded) = &state.loaded {
            let lag = version.checked_sub(loaded.version);
            if lag.is_some_and(|lag| lag < self.options.every) {
                return Ok(());
            }
        }
        let name = format!("{}-v{version}", self.options.prefix);
        let path = self.options.dir.join(&name);
        write(&path)?;
        match client.load_lora_adapter(&name, &path, self.options.timeout) {
            Ok(AdapterLoad::Loaded) => {
                tracing::debug!("the endpoint loaded adapter {name}");
                let new = LoadedAdapter {
                    version,
                    name,
                    path,
                };
                if let Some(old) = state.loaded.replace(new) {
                    self.retire(client, &old);
                }
            }
            Ok(AdapterLoad::Unsupported(why)) => {
                tracing::warn!(
                    "the endpoint cannot hot-load LoRA adapters ({why}); training goes on \
                     OFF-POLICY: every step samples from the served model, which does not see \
                     the updates. For on-policy rollouts start vLLM with --enable-lora and \
                     VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (SGLang: --enable-lora) and give it \
                     read access to {}",
                    self.options.dir.display()
                );
                state.off_policy = true;
                remove(&path);
                if let Some(old) = state.loaded.take() {
                    remove(&old.path);
                }
            }
            Err(error) => {
                let from = match &state.loaded {
                    Some(loaded) => format!("adapter {} (version {})", loaded.name, loaded.version),
                    None => "the served model".to_string(),
                };
                tracing::warn!(
                    "the endpoint did not load adapter {name}: {error:#}; this step samples from \
                     {from}, and the next one tries again"
                );
                remove(&path);
            }
        }
        Ok(())
    }

    /// The adapter to sample with; `None`: the served model.
    pub fn current(&self) -> Option<LoadedAdapter> {
        self.lock().loaded.clone()
    }

    /// Loads the current adapter again after the server said it does not know it (it was
    /// restarted). Whether it is loaded now.
    pub fn reload(&self, client: &EndpointClient) -> Result<bool> {
        let Some(loaded) = self.current() else {
            return Ok(false);
        };
        tracing::warn!(
            "the endpoint does not know adapter {} (restarted?); loading it again",
            loaded.name
        );
        let answer = client.load_lora_adapter(&loaded.name, &loaded.path, self.options.timeout)?;
        Ok(answer == AdapterLoad::Loaded)
    }

    /// Unloads the last adapter at the end of a run and deletes its directory; the run's own
    /// `adapter/` keeps the trained weights.
    pub fn finish(&self, client: &EndpointClient) {
        if let Some(old) = self.lock().loaded.take() {
            self.retire(client, &old);
        }
    }

    fn retire(&self, client: &EndpointClient, old: &LoadedAdapter) {
        if let Err(error) = client.unload_lora_adapter(&old.name, self.options.timeout) {
            tracing::debug!("unloading adapter {}: {error:#}", old.name);
        }
        remove(&old.path);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn remove(path: &Path) {
    if let Err(error) = fs::remove_dir_all(path) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!("removing {}: {error}", path.display());
        }
    }
}
