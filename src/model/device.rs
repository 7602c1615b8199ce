//! Device and dtype choice, in one place.
//!
//! `--device cpu|cuda|cuda:N|auto` and `--dtype f32|bf16|f16`. Everything else in the model code
//! takes a [`candle_core::Device`] and a [`DType`] and never asks which backend it runs on: the
//! CUDA path is the CPU code with another device.

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// Where the model runs (`model.device`, `--device`): `auto` picks the first CUDA device when
/// the binary was built with the `cuda` feature and a GPU answers, the CPU otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        Ok(match spec {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            _ => match spec.strip_prefix("cuda:") {
                Some(n) => Self::Cuda(n.parse::<usize>().with_context(|| {
                    format!("--device {spec}: `{n}` is not a GPU number (expected e.g. cuda:0)")
                })?),
                None => bail!("--device {spec}: expected `cpu`, `cuda`, `cuda:N` or `auto`"),
            },
        })
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// The device, or why it cannot be had (no CUDA in this build, no such GPU).
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => cuda(ordinal),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    // A CUDA build that falls back to the CPU runs many times slower: say why.
                    match Device::new_cuda(0) {
                        Ok(dev) => return Ok(dev),
                        Err(err) => tracing::warn!(
                            "--device auto: CUDA device 0 is not available ({err}); using the CPU"
                        ),
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device cuda:{ordinal}: this binary was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` or use --device cpu"
        );
    }
    Device::new_cuda(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}: cannot open the GPU"))
}

/// A floating-point precision for the weights (`model.dtype`, `--dtype`) or the merged
/// sampling copy (`model.sample_dtype`, `--sample-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        Ok(match spec.trim() {
            "f32" | "float32" => Self::F32,
            "bf16" | "bfloat16" => Self::Bf16,
            "f16" | "float16" => Self::F16,
            other => bail!("`{other}`: expected `f32`, `bf16` or `f16`"),
        })
    }
}

impl TryFrom<String> for Precision {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Precision> for String {
    fn from(p: Precision) -> String {
        match p {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
        .to_string()
    }
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// The weights' dtype: the one asked for, else f32 on the CPU (bf16 matmuls are ~18x slower
/// there than f32) and bf16 on a GPU.
pub fn model_dtype(spec: Option<Precision>, device: &Device) -> DType {
    match spec {
        Some(p) => p.dtype(),
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
    }
}

/// Keeps large CPU tensors in the malloc heap instead of fresh pages from the kernel.
///
/// candle allocates a new buffer for every op's output and frees it soon after. glibc serves
/// allocations above its mmap threshold (dynamic, from 128 KiB) with new mappings, which the
/// kernel zeroes and faults in page by page on first use, and returns freed heap tops to the
/// kernel. On a Qwen2.5-0.5B-shaped LoRA forward+backward that was 3.9 M minor page faults;
/// with the threshold at its 32 MiB maximum and trimming off, 1.4 M, and the step about 17%
/// faster. The cost is that the process keeps its peak heap, which a training run reaches
/// every step anyway. Only glibc has these knobs; elsewhere this does nothing.
pub fn tune_cpu_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// glibc's ceiling for M_MMAP_THRESHOLD on 64-bit targets.
        const MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;
        // SAFETY: mallopt only changes allocator parameters; it is thread-safe and has no
        // memory-safety preconditions.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}

/// Returns the free pages the allocator holds to the kernel (glibc's `malloc_trim`; elsewhere
/// nothing). With trimming off (see [`tune_cpu_allocator`]) a process keeps its peak heap, so
/// whatever runs next starts from that resident size: call this between phases whose peaks
/// should not add up, or before measuring one phase's peak.
pub fn release_cpu_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_defaults_to_f32() {
        let dev = "cpu".parse::<DeviceSpec>().unwrap().open().unwrap();
        assert!(dev.is_cpu());
        assert_eq!(model_dtype(None, &dev), DType::F32);
        assert_eq!(model_dtype(Some(Precision::Bf16), &dev), DType::BF16);
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!("bfloat16".parse::<Precision>().unwrap(), Precision::Bf16);
    }

    #[test]
    fn bad_specs_name_the_flag() {
        let err = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("--device tpu"), "{err}");
        let err = "cuda:x".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("not a GPU number"), "{err}");
        let err = "f8".parse::<Precision>().unwrap_err().to_string();
        assert!(
            err.contains("`f8`: expected `f32`, `bf16` or `f16`"),
            "{err}"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
    }
}
