//! Where the weights come from: a local directory in Hugging Face layout (`config.json` +
//! `*.safetensors`, sharded through `model.safetensors.index.json`), a GGUF file (dequantised),
//! or a hub id resolved through the `hf-hub` cache. Every source ends as the same
//! [`ModelFiles`]: a [`ModelConfig`] and a [`WeightSource`](super::weights::WeightSource) by HF tensor name.

use super::config::ModelConfig;
use super::gguf;
use super::quant::Quantize;
use super::weights::{ModelFiles, SafetensorsWeights};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// How to reach the hub; [`HubSettings::from_env`] reads `HF_HOME`, `HF_ENDPOINT` and
/// `HF_HUB_OFFLINE` like the Python client.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    pub endpoint: Option<String>,
    pub offline: bool,
}

impl HubSettings {
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
            .unwrap_or(false);
        Self {
            cache_dir: Cache::from_env().path().clone(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|s| !s.is_empty()),
            offline,
        }
    }
}

/// Loads `model` (a directory, a `.gguf` file, or a hub id at `revision`); `quantize` says
/// what becomes of the linear layers' weights (src/model/quant.rs).
pub fn load_model(
    model: &str,
    revision: &str,
    hub: &HubSettings,
    device: &Device,
    dtype: DType,
    quantize: Quantize,
) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return gguf::load_gguf(path, device, dtype, quantize);
    }
    if quantize == Quantize::Keep {
        bail!(
            "--quantize keep: {model} is not a GGUF file, so it has no quantized weights to \
             keep; use --quantize q8_0 or q4_k to quantize it at load"
        );
    }
    if path.is_dir() {
        return load_dir_quantized(path, device, dtype, quantize);
    }
    if path.exists() {
        bail!("--model {model}: expected a directory in Hugging Face layout or a .gguf file");
    }
    if looks_local(model) {
        bail!("--model {model}: no such file or directory");
    }
    let dir = resolve_hub(model, revision, hub)?;
    load_dir_quantized(&dir, device, dtype, quantize)
        .with_context(|| format!("loading hub model {model}"))
}

fn looks_local(model: &str) -> bool {
    model.starts_with('.')
        || model.starts_with('/')
        || model.starts_with('~')
        || model.ends_with(".gguf")
        || model.split('/').count() != 2
}

/// Loads a directory in HF layout, weights as they are.
pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<ModelFiles> {
    load_dir_quantized(dir, device, dtype, Quantize::None)
}

/// Loads a directory in HF layout, the linear layers quantized as `quantize` says.
pub fn load_dir_quantized(
    dir: &Path,
    device: &Device,
    dtype: DType,
    quantize: Quantize,
) -> Result<ModelFiles> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; like every safetensors reader, we assume
    // nobody truncates them while the model is loaded.
    let mmaped = unsafe { MmapedSafetensors::multi(&files) }
        .with_context(|| format!("cannot read the safetensors files in {}", dir.display()))?;
    let weights = SafetensorsWeights {
        files: mmaped,
        device: device.clone(),
        dtype,
        origin: dir.display().to_string(),
        quantize: quantize.target(),
    };
    Ok(ModelFiles {
        config,
        weights: Box::new(weights),
        dir: dir.to_path_buf(),
    })
}

/// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let shards = shard_names(&index)?;
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!(
                "{} lists {}, which is missing",
                index.display(),
                missing.display()
            );
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{} has neither model.safetensors nor model.safetensors.index.json (PyTorch .bin \
         checkpoints are not supported: convert them with transformers' \
         `save_pretrained(..., safe_serialization=True)`)",
        dir.display()
    )
}

fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    map.values()
        .map(|v| {
            v.as_str().map(str::to_owned).with_context(|| {
                format!(
                    "{}: weight_map value {v} is not a file name",
                    index.display()
                )
            })
        })
        .collect()
}

/// Files fetched besides the weights so that the snapshot directory is complete for the
/// tokenizer and generation settings; absent ones are fine.
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// The local snapshot directory of hub model `id`, downloading what the cache lacks.
pub fn resolve_hub(id: &str, revision: &str, hub: &HubSettings) -> Result<PathBuf> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::new(hub.cache_dir.clone()).repo(repo.clone());
    if let Some(config) = cache.get("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        if safetensors_files(&dir).is_ok() {
            return Ok(dir);
        }
    }
    let how_to_fix = format!(
        "to fix: on a machine with internet run `huggingface-cli download {id}` (or \
         `hf download {id}`) and copy its cache ({}) here, or point --model at a local \
         directory holding config.json and *.safetensors",
        hub.cache_dir.display()
    );
    if hub.offline {
        bail!(
            "model {id} (revision {revision}) is not in the Hugging Face cache {} and \
             HF_HUB_OFFLINE is set; {how_to_fix}",
            hub.cache_dir.display()
        );
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_progress(false)
        .with_retries(1);
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .context("cannot set up the Hugging Face hub client")?
        .repo(repo);
    let fetch = |file: &str| -> Result<PathBuf> {
        api.get(file).map_err(|e| match &e {
            hf_hub::api::sync::ApiError::RequestError(re)
                if matches!(**re, ureq::Error::Status(404, _)) =>
            {
                anyhow::anyhow!("{id} has no file {file} at revision {revision}")
            }
            _ => anyhow::anyhow!(
                "cannot download {file} of {id} from the Hugging Face hub ({e}): the model is \
                 not cached and the hub is unreachable; {how_to_fix}"
            ),
        })
    };
    let config = fetch("config.json")?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&index)? {
                fetch(&shard)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors").with_context(|| {
                format!("{id} has neither model.safetensors nor model.safetensors.index.json")
            })?;
        }
    }
    for file in OPTIONAL_FILES {
        // Absent optional files are normal (older repos have no generation_config.json).
        let _ = fetch(file);
    }
    Ok(dir)
}
