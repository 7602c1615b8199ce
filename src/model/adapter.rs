//! LoRA adapters on disk in PEFT's layout, and merging one into its base model.
//!
//! An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, named the
//! way PEFT names them (`base_model.model.<module>.lora_A.weight`, shape `[r, in]`, and
//! `...lora_B.weight`, shape `[out, r]`), so `PeftModel.from_pretrained`, vLLM's `--lora-modules`
//! and `merge_and_unload` read what we write, and we read adapters trained with TRL + PEFT.
//! The update a module adds to its frozen weight is `(lora_alpha / r) · B · A`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{json, Value as Json};

use super::LoraOptions;
use crate::atomic;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT wraps the model twice (`PeftModel.base_model` is a `LoraModel` whose `.model` is the
/// transformer), so every module path gets this prefix in the state dict.
const PEFT_PREFIX: &str = "base_model.model.";
const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Files of a model directory that hold weights in some format; a merged export copies every
/// other regular file (config, tokenizer, generation config, licence) unchanged.
const WEIGHT_EXTENSIONS: [&str; 9] = [
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "gguf",
    "h5",
    "msgpack",
    "onnx",
];

/// The two LoRA matrices of one adapted linear layer.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    /// Module path in the base model, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[r, in_features]`.
    pub a: Tensor,
    /// `[out_features, r]`.
    pub b: Tensor,
}

/// A loaded adapter: its options, the base model it was trained on, and its weights sorted by
/// module path.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub lora: LoraOptions,
    pub base_model: String,
    pub weights: Vec<AdapterWeights>,
}

impl Adapter {
    /// The factor on `B · A`: `lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.lora.lora_alpha / self.lora.r as f64
    }

    /// Fails when this adapter cannot continue a run configured with `expected` (resuming with
    /// another rank or alpha would silently change the model).
    pub fn ensure_matches(&self, expected: &LoraOptions) -> Result<()> {
        ensure!(
            self.lora.r == expected.r,
            "the adapter has rank r = {} but the run is configured with lora.r = {}; set \
             lora.r = {} or start without the adapter",
            self.lora.r,
            expected.r,
            self.lora.r
        );
        ensure!(
            self.lora.lora_alpha == expected.lora_alpha,
            "the adapter has lora_alpha = {} but the run is configured with lora.lora_alpha = {}",
            self.lora.lora_alpha,
            expected.lora_alpha
        );
        let have: BTreeSet<&String> = self.lora.target_modules.iter().collect();
        let want: BTreeSet<&String> = expected.target_modules.iter().collect();
        ensure!(
            have == want,
            "the adapter targets {have:?} but the run is configured with lora.target_modules = \
             {want:?}"
        );
        Ok(())
    }
}

/// Whether PEFT would adapt `module` for `target` (an exact name or a dotted suffix).
fn module_matches(module: &str, target: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

/// Writes `weights` as a PEFT adapter in `dir`, replacing what was there. The files are written
/// into a temporary sibling directory that is renamed into place, so a crash leaves either the
/// old adapter or the new one, never half of one.
pub fn save_adapter(
    dir: &Path,
    weights: &[AdapterWeights],
    lora: &LoraOptions,
    base_model: &str,
) -> Result<()> {
    ensure!(
        !weights.is_empty(),
        "no LoRA weights to save in {}",
        dir.display()
    );
    let mut tensors = Vec::with_capacity(2 * weights.len());
    let mut seen = BTreeSet::new();
    for w in weights {
        ensure!(
            seen.insert(&w.module),
            "module {} is listed twice",
            w.module
        );
        ensure!(
            lora.target_modules
                .iter()
                .any(|t| module_matches(&w.module, t)),
            "module {} matches none of target_modules {:?}; the adapter config would not \
             describe it",
            w.module,
            lora.target_modules
        );
        check_pair_shapes(&w.module, w.a.dims(), w.b.dims(), lora.r)?;
        tensors.push((
            format!("{PEFT_PREFIX}{}.lora_A.weight", w.module),
            w.a.clone(),
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{}.lora_B.weight", w.module),
            w.b.clone(),
        ));
    }
    let config = adapter_config(lora, base_model);
    atomic::write_dir(dir, true, |tmp| {
        atomic::write_file(
            &tmp.join(ADAPTER_CONFIG_FILE),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        write_safetensors(&tmp.join(ADAPTER_WEIGHTS_FILE), tensors)
    })
}

/// The `adapter_config.json` PEFT writes for a plain LoRA, limited to fields every PEFT release
/// since 0.9 accepts (older ones reject unknown keys).
fn adapter_config(lora: &LoraOptions, base_model: &str) -> Json {
    // PEFT types lora_alpha as an int; keep `32`, not `32.0`, when it is one.
    let alpha = if lora.lora_alpha.fract() == 0.0 && lora.lora_alpha.abs() < 1e15 {
        json!(lora.lora_alpha as i64)
    } else {
        json!(lora.lora_alpha)
    };
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": lora.lora_dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": lora.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

fn check_pair_shapes(module: &str, a: &[usize], b: &[usize], r: usize) -> Result<()> {
    match (a, b) {
        ([ra, _], [_, rb]) if *ra == r && *rb == r => Ok(()),
        ([_, _], [_, _]) => bail!(
            "{module}: lora_A has shape {a:?} and lora_B {b:?}, expected [{r}, in] and \
             [out, {r}] for rank r = {r} (rank mismatch between the weights and the config)"
        ),
        _ => bail!("{module}: lora_A {a:?} and lora_B {b:?} must both be matrices"),
    }
}

/// Reads a PEFT LoRA adapter. Tensors keep their stored dtype and go to `device`.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<Adapter> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !config_path.is_file() {
        bail!(
            "{} not found: {} is not a PEFT adapter directory (expected {ADAPTER_CONFIG_FILE} \
             and {ADAPTER_WEIGHTS_FILE})",
            config_path.display(),
            dir.display()
        );
    }
    let text = fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: Json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let (lora, base_model, target_spec) = parse_adapter_config(&config)
        .with_context(|| format!("unsupported adapter config {}", config_path.display()))?;

    if !weights_path.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (only adapter_model.bin is there: re-save it with PEFT's \
             save_pretrained(safe_serialization=True))"
        } else {
            ""
        };
        bail!("{} not found{hint}", weights_path.display());
    }
    let mut tensors = candle_core::safetensors::load(&weights_path, device)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    let mut modules: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    for name in names {
        let parsed = name.strip_prefix(PEFT_PREFIX).and_then(|rest| {
            rest.strip_suffix(".lora_A.weight")
                .map(|m| (m, true))
                .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, false)))
        });
        let Some((module, is_a)) = parsed else {
            bail!(
                "{}: tensor {name:?} is not a LoRA matrix \
                 ({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight); adapters with \
                 modules_to_save, DoRA or embedding LoRA are not supported",
                weights_path.display()
            );
        };
        let tensor = tensors
            .remove(&name)
            .context("internal: tensor listed but absent")?;
        let entry = modules.entry(module.to_string()).or_default();
        if is_a {
            entry.0 = Some(tensor);
        } else {
            entry.1 = Some(tensor);
        }
    }
    ensure!(
        !modules.is_empty(),
        "{} holds no tensors",
        weights_path.display()
    );

    let mut weights = Vec::with_capacity(modules.len());
    for (module, pair) in modules {
        let (Some(a), Some(b)) = pair else {
            bail!(
                "{}: module {module} has only one of lora_A / lora_B",
                weights_path.display()
            );
        };
        check_pair_shapes(&module, a.dims(), b.dims(), lora.r).with_context(|| {
            format!(
                "{} (r = {} in {ADAPTER_CONFIG_FILE})",
                weights_path.display(),
                lora.r
            )
        })?;
        weights.push(AdapterWeights { module, a, b });
    }

    let mut lora = lora;
    lora.target_modules = match target_spec {
        TargetSpec::List(list) => {
            for w in &weights {
                ensure!(
                    list.iter().any(|t| module_matches(&w.module, t)),
                    "{}: module {} matches none of target_modules {list:?}",
                    config_path.display(),
                    w.module
                );
            }
            list
        }
        // A regex: report the module names the weights actually adapt.
        TargetSpec::Pattern => weights
            .iter()
            .filter_map(|w| w.module.rsplit('.').next().map(str::to_string))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    Ok(Adapter {
        lora,
        base_model,
        weights,
    })
}

enum TargetSpec {
    List(Vec<String>),
    /// PEFT also accepts a regular expression over full module paths.
    Pattern,
}

fn parse_adapter_config(config: &Json) -> Result<(LoraOptions, String, TargetSpec)> {
    let peft_type = config.get("peft_type").and_then(Json::as_str);
    ensure!(
        peft_type == Some("LORA"),
        "peft_type is {}, only \"LORA\" adapters are supported",
        config
            .get("peft_type")
            .map_or("missing".to_string(), Json::to_string)
    );
    let r = config
        .get("r")
        .and_then(Json::as_u64)
        .filter(|&r| r > 0)
        .context("`r` must be a positive integer")? as usize;
    let lora_alpha = config
        .get("lora_alpha")
        .and_then(Json::as_f64)
        .context("`lora_alpha` must be a number")?;
    let lora_dropout = config
        .get("lora_dropout")
        .and_then(Json::as_f64)
        .unwrap_or(0.0);
    let flag = |key: &str| config.get(key).and_then(Json::as_bool).unwrap_or(false);
    ensure!(
        !flag("fan_in_fan_out"),
        "fan_in_fan_out = true (GPT-2 Conv1D layout) is not supported"
    );
    ensure!(!flag("use_dora"), "use_dora = true (DoRA) is not supported");
    ensure!(
        !flag("use_rslora"),
        "use_rslora = true (scaling alpha/sqrt(r)) is not supported"
    );
    for key in ["rank_pattern", "alpha_pattern"] {
        let empty = match config.get(key) {
            None | Some(Json::Null) => true,
            Some(Json::Object(map)) => map.is_empty(),
            Some(_) => false,
        };
        ensure!(empty, "{key} (per-module rank or alpha) is not supported");
    }
    let bias = config.get("bias").and_then(Json::as_str).unwrap_or("none");
    ensure!(
        bias == "none",
        "bias = {bias:?} is not supported, only \"none\""
    );
    match config.get("modules_to_save") {
        None | Some(Json::Null) => {}
        Some(Json::Array(list)) if list.is_empty() => {}
        Some(other) => {
            bail!("modules_to_save = {other} (fully trained extra modules) is not supported")
        }
    }
    let target = match config.get("target_modules") {
        Some(Json::Array(list)) => TargetSpec::List(
            list.iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .context("target_modules must be a list of strings")?,
        ),
        Some(Json::String(_)) => TargetSpec::Pattern,
        _ => bail!("target_modules must be a list of module names or a regex string"),
    };
    let base_model = config
        .get("base_model_name_or_path")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string();
    let lora = LoraOptions {
        r,
        lora_alpha,
        lora_dropout,
        target_modules: Vec::new(),
    };
    Ok((lora, base_model, target))
}

/// What [`export_merged`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    /// Weights that received `scaling · B · A`.
    pub merged_weights: usize,
    /// Safetensors files written (1, or the number of shards).
    pub weight_files: usize,
    /// Other files copied from the base directory, by name.
    pub copied_files: Vec<String>,
}

/// Writes `base_dir`'s model with the adapter of `adapter_dir` merged in, in HF layout, to
/// `out_dir` (which must not exist or be empty): each targeted `<module>.weight` becomes
/// `W + (lora_alpha / r) · B · A`, computed in f32 and stored in W's dtype; every other tensor is
/// copied byte for byte, shard by shard (a sharded model keeps its index). Non-weight files
/// (config.json, tokenizer files, generation_config.json, ...) are copied. Works on tensors
/// only, one shard in memory at a time.
pub fn export_merged(base_dir: &Path, adapter_dir: &Path, out_dir: &Path) -> Result<MergeSummary> {
    let adapter = load_adapter(adapter_dir, &Device::Cpu)?;
    let scaling = adapter.scaling();
    let shards = weight_files(base_dir)?;

    // Every adapted module must exist in the base before anything is written.
    let mut pending: HashMap<String, &AdapterWeights> = adapter
        .weights
        .iter()
        .map(|w| (format!("{}.weight", w.module), w))
        .collect();
    let mut present = BTreeSet::new();
    for shard in &shards {
        present.extend(safetensors_names(shard)?);
    }
    let missing: Vec<&String> = pending.keys().filter(|k| !present.contains(*k)).collect();
    ensure!(
        missing.is_empty(),
        "the adapter in {} adapts weights that {} does not have: {missing:?} (wrong base model? \
         the adapter was trained on {:?})",
        adapter_dir.display(),
        base_dir.display(),
        adapter.base_model
    );

    if out_dir.exists() {
        let mut entries =
            fs::read_dir(out_dir).with_context(|| format!("cannot read {}", out_dir.display()))?;
        ensure!(
            entries.next().is_none(),
            "{} already exists and is not empty; choose a new output directory",
            out_dir.display()
        );
    }

    let mut copied_files = Vec::new();
    let mut merged_weights = 0;
    atomic::write_dir(out_dir, true, |tmp| {
        for shard in &shards {
            let bytes =
                fs::read(shard).with_context(|| format!("cannot read {}", shard.display()))?;
            let st = SafeTensors::deserialize(&bytes)
                .with_context(|| format!("{} is not a safetensors file", shard.display()))?;
            let (_, header) = SafeTensors::read_metadata(&bytes)?;
            let mut out: Vec<(String, OutTensor)> = Vec::with_capacity(st.len());
            for (name, view) in st.iter() {
                let tensor = match pending.remove(name) {
                    Some(w) => {
                        merged_weights += 1;
                        OutTensor::Merged(merge_weight(name, &view, w, scaling)?)
                    }
                    None => OutTensor::Raw(view),
                };
                out.push((name.to_string(), tensor));
            }
            let name = shard.file_name().context("shard without file name")?;
            let metadata = header
                .metadata()
                .clone()
                .unwrap_or_else(|| HashMap::from([("format".to_string(), "pt".to_string())]));
            write_safetensors_with(&tmp.join(name), out, metadata)?;
        }
        for entry in
            fs::read_dir(base_dir).with_context(|| format!("cannot list {}", base_dir.display()))?
        {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let is_weights = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e));
            if path.is_file() && !is_weights {
                let bytes =
                    fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                atomic::write_file(&tmp.join(&name), &bytes)?;
                copied_files.push(name);
            }
        }
        Ok(())
    })?;
    copied_files.sort();
    Ok(MergeSummary {
        merged_weights,
        weight_files: shards.len(),
        copied_files,
    })
}

/// The safetensors files of an HF model directory: the shards named by
/// `model.safetensors.index.json`, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let text = fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: Json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(Json::as_object)
            .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().with_context(|| {
                format!(
                    "{}: weight_map[{tensor:?}] is not a file name",
                    index.display()
                )
            })?;
            files.insert(dir.join(file));
        }
        for file in &files {
            ensure!(
                file.is_file(),
                "{} names shard {} which does not exist",
                index.display(),
                file.display()
            );
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join(SINGLE_WEIGHTS_FILE);
    ensure!(
        single.is_file(),
        "{} has neither {SINGLE_WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}: merging needs the base \
         model's safetensors weights",
        dir.display()
    );
    Ok(vec![single])
}

/// Tensor names of a safetensors file, from its header alone (8-byte length, then JSON).
fn safetensors_names(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let not_safetensors = || format!("{} is not a safetensors file", path.display());
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(not_safetensors)?;
    let len = usize::try_from(u64::from_le_bytes(len)).with_context(not_safetensors)?;
    ensure!(
        len <= 100_000_000,
        "{}: header of {len} bytes",
        not_safetensors()
    );
    let mut header = vec![0u8; len];
    file.read_exact(&mut header).with_context(not_safetensors)?;
    let header: serde_json::Map<String, Json> =
        serde_json::from_slice(&header).with_context(not_safetensors)?;
    Ok(header
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

/// `W + scaling · B · A` in f32, returned in W's dtype.
fn merge_weight(
    name: &str,
    view: &TensorView<'_>,
    w: &AdapterWeights,
    scaling: f64,
) -> Result<Tensor> {
    let base = view
        .load(&Device::Cpu)
        .with_context(|| format!("cannot load base weight {name}"))?;
    let (out_features, r) = w.b.dims2()?;
    let (_, in_features) = w.a.dims2()?;
    ensure!(
        base.dims() == [out_features, in_features],
        "base weight {name} has shape {:?} but the adapter's B·A is [{out_features}, \
         {in_features}] (r = {r})",
        base.dims()
    );
    let delta =
        w.b.to_dtype(DType::F32)?
            .matmul(&w.a.to_dtype(DType::F32)?)?
            .affine(scaling, 0.0)?;
    let merged = (base.to_dtype(DType::F32)? + delta)?;
    Ok(merged.to_dtype(base.dtype())?)
}

/// A tensor of a merged shard: bytes borrowed from the base file, or a merged weight.
enum OutTensor<'a> {
    Raw(TensorView<'a>),
    Merged(Tensor),
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Self::Raw(v) => v.dtype(),
            Self::Merged(t) => View::dtype(t),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Self::Raw(v) => v.shape(),
            Self::Merged(t) => View::shape(t),
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Raw(v) => Cow::Borrowed(v.data()),
            Self::Merged(t) => View::data(t),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Self::Raw(v) => v.data().len(),
            Self::Merged(t) => View::data_len(t),
        }
    }
}

/// Writes `tensors` to `path` with the `{"format": "pt"}` header `transformers` and PEFT check,
/// via a temporary file that is synced and renamed, so a crash never leaves a truncated file.
pub(crate) fn write_safetensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors_with(path, tensors, metadata)
}

fn write_safetensors_with<V: View>(
    path: &Path,
    tensors: Vec<(String, V)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    atomic::write_with(path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp)
            .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))
    })
}
