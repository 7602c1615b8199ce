#!/usr/bin/env bash
# Build lean-grpo with candle's CUDA backend (`cargo build --release --features cuda`) using the
# CUDA 13.0 compiler and libraries from PyPI, so no system CUDA toolkit is needed.
#
#   scripts/build-cuda.sh [EXTRA CARGO ARGS]
#
# Environment:
#   CARGO_TARGET_DIR      default <repo>/target/cuda
#   CUDA_COMPUTE_CAP      default: what nvidia-smi reports, else 80; without nvidia-smi set your
#                         GPU's (e.g. 90 for an H100)
#   PYTHON                default python3 (>= 3.9), for the venv
#   LEAN_GRPO_CUDA_CACHE  default <repo>/.cache/cuda: the venv with the NVIDIA wheels (~1.2 GB),
#                         the link directory and the stub
#
# The stub libcuda.so. candle links `-lcuda` (the driver API, which cudarc declares) at build
# time, and libcuda.so ships with the GPU driver, not with the toolkit wheels. When this machine
# has no driver (no libcuda.so.1 anywhere), the script compiles a stand-in that exists only to
# satisfy the linker: it has the soname libcuda.so.1 and exports every driver function cudarc
# declares, each returning CUDA_ERROR_STUB_LIBRARY. A binary run against it starts, and fails
# with that error the moment it opens a GPU. It is never installed or shipped: on a GPU machine
# the loader finds the driver's real libcuda.so.1, and when this script finds one it links
# against that instead and builds no stub.
#
# A first build (every dependency, and candle's CUDA kernels through nvcc) took 43 CPU-minutes here.
#
# Running the result needs libcuda.so.1 (the driver) and the wheels' cudart, cublas (with
# cublasLt) and curand; the script prints the LD_LIBRARY_PATH to use. CPU and CUDA builds ship
# apart.
set -euo pipefail

# CUDA 13.0 (update 2), the release of driver 580. candle's kernels ship as PTX that the driver
# compiles when the binary first opens the GPU, and a driver accepts PTX only up to the ISA of its
# own CUDA release: PTX from a newer nvcc (13.2 was pinned here until 2026-12-06, never run on a
# GPU) fails to load on driver 580 with CUDA_ERROR_UNSUPPORTED_PTX_VERSION. A binary built with
# 13.0 ran on an H200 with driver 580; a newer driver runs it too. Raise these only together with
# the oldest driver you support.
WHEELS=(
    nvidia-cuda-nvcc==13.0.88   # the cu12 nvcc wheel has no `nvcc` binary
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
)
# Libraries candle links by their unversioned name; the wheels ship only the versioned sonames.
LINKED_LIBS=(cudart cublas cublasLt curand nvrtc)

say() { echo "build-cuda: $*" >&2; }
die() { say "$*"; exit 1; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LEAN_GRPO_CUDA_CACHE:-$repo_root/.cache/cuda}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo_root/target/cuda}"
python="${PYTHON:-python3}"
venv="$cache/venv"
link_dir="$cache/link"   # unversioned .so names for the linker
stub_dir="$cache/stub"   # the stand-in libcuda.so.1, when one is built
mkdir -p "$cache"

# 1. The toolkit: a venv with the pinned wheels, reinstalled only when the pins change.
stamp="$venv/.lean-grpo-wheels"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "${WHEELS[*]}" ]]; then
    command -v "$python" >/dev/null || die "$python not found (set PYTHON=...)"
    [[ -x "$venv/bin/pip" ]] || "$python" -m venv "$venv"
    say "installing ${WHEELS[*]} (about 1.1 GB)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "${WHEELS[@]}"
    echo "${WHEELS[*]}" >"$stamp"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_HOME="$site/nvidia/cu13"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc in $CUDA_HOME/bin; delete $venv and rerun"

rm -rf "$link_dir" "$stub_dir"
mkdir -p "$link_dir"
for name in "${LINKED_LIBS[@]}"; do
    versioned=("$CUDA_HOME"/lib/lib"$name".so.[0-9]*)
    [[ -e "${versioned[0]}" ]] || die "the wheels have no lib$name.so.N in $CUDA_HOME/lib"
    ln -s "${versioned[0]}" "$link_dir/lib$name.so"
done

# 2. libcuda: the driver's if this machine has one, else the link-only stub described above.
driver="$(ldconfig -p 2>/dev/null | awk '$1 == "libcuda.so.1" { print $NF; exit }')"
if [[ -z "$driver" ]]; then
    for candidate in /usr/lib*/libcuda.so.1 /usr/lib/*/libcuda.so.1 /usr/lib/wsl/lib/libcuda.so.1
    do
        if [[ -e "$candidate" ]]; then driver="$candidate"; break; fi
    done
fi
if [[ -n "$driver" ]]; then
    say "linking against the driver's $driver"
    ln -s "$driver" "$link_dir/libcuda.so"
    runtime_path="$CUDA_HOME/lib"
else
    say "no libcuda.so.1 on this machine: building a link-only stub in $stub_dir"
    command -v gcc >/dev/null || die "gcc is required to build the stub libcuda.so"
    # The function names come from the cudarc sources this build compiles (its extern "C" block
    # in src/driver/sys/mod.rs), so the stub follows the Cargo.lock, not a copied list.
    cudarc_manifest="$(cd "$repo_root" \
        && cargo metadata --locked --format-version 1 --features cuda \
        | "$venv/bin/python" -c 'import json, sys
packages = json.load(sys.stdin)["packages"]
print(next(p["manifest_path"] for p in packages if p["name"] == "cudarc"))')"
    driver_rs="$(dirname "$cudarc_manifest")/src/driver/sys/mod.rs"
    mkdir -p "$stub_dir"
    "$venv/bin/python" - "$driver_rs" >"$stub_dir/libcuda.c" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
# `fn cuX(` indented inside `extern "C" { ... }`; the public wrappers are `pub unsafe fn`.
names = set(re.findall(r"^\s+fn (cu\w+)\(", text, re.M))
names = sorted(names - {"cuGetErrorName", "cuGetErrorString"})
if len(names) < 100:
    sys.exit(f"only {len(names)} driver functions in {sys.argv[1]}: has cudarc's layout changed?")
print(f"""/* Link-only stand-in for the CUDA driver, generated by scripts/build-cuda.sh from
   {sys.argv[1]}.
   Every call fails with CUDA_ERROR_STUB_LIBRARY (34); a GPU machine uses its driver's libcuda. */
typedef int CUresult;
enum {{ STUB = 34 }};
CUresult cuGetErrorName(CUresult e, const char **s) {{
    *s = e == STUB ? "CUDA_ERROR_STUB_LIBRARY" : "CUDA_ERROR_UNKNOWN";
    return 0;
}}
CUresult cuGetErrorString(CUresult e, const char **s) {{
    *s = e == STUB ? "no CUDA driver: this libcuda.so.1 is the link-only stub from "
                     "scripts/build-cuda.sh; install the NVIDIA driver"
                   : "unknown error";
    return 0;
}}""")
for name in names:
    print(f"CUresult {name}(void) {{ return STUB; }}")
PY
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so.1" "$stub_dir/libcuda.c"
    ln -s "$stub_dir/libcuda.so.1" "$link_dir/libcuda.so"
    say "stub exports $(grep -c 'return STUB' "$stub_dir/libcuda.c") + 2 driver functions"
    runtime_path="$CUDA_HOME/lib:$stub_dir"
fi

# 3. Build. cudarc reads the CUDA version from `nvcc --version` and searches $CUDA_HOME/lib;
# candle-kernels compiles its PTX for CUDA_COMPUTE_CAP (nvidia-smi when unset, absent here).
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [[ -z "${CUDA_COMPUTE_CAP:-}" ]]; then
    CUDA_COMPUTE_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
        | head -n 1 | tr -d '.' || true)"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
fi
say "CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
(cd "$repo_root" && cargo build --locked --release --features cuda "$@")

say "built $CARGO_TARGET_DIR/release/lean-grpo; run it with"
say "  LD_LIBRARY_PATH=$runtime_path $CARGO_TARGET_DIR/release/lean-grpo"
