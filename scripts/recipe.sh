#!/usr/bin/env bash
# SFT -> filter -> RL, the formal-math RL recipe, as one resumable pipeline (docs/data.md):
#
#   scripts/recipe.sh THEOREMS.jsonl OUT_DIR
#
#   1. sft       supervised warm-up on the train records with a `proof`     -> OUT/sft/
#   2. eval      the warm-up policy on the train split, EVAL_N samples each   -> OUT/eval-train/
#   3. filter    keep the train problems solved sometimes                     -> OUT/train-filtered.jsonl
#   4. train     RL on the filtered problems                                  -> OUT/rl/
#   5. eval      the RL policy on the test split                              -> OUT/eval-test/
#
# Every stage writes into OUT and is skipped when its output is there, so a rerun after a crash
# continues where it stopped (an RL run that was cut off resumes from its last checkpoint).
# Knobs (environment): MODEL (default: a tiny random model made by `init-model`), ALGORITHM
# (dapo), RL_STEPS (20), RL_LR (1e-4), NUM_GENERATIONS (8), BATCH_SIZE (2), SFT_EPOCHS (4),
# SFT_LR (1e-3), EVAL_N (8), MAX_LEN (48), MIN_PASS_RATE / MAX_PASS_RATE (0.01 / 0.99), SEED (0),
# LEAN (a `lean` binary; default: scripts/test-lean.sh fetches one), LEAN_GRPO (the binary;
# default: a release build).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ne 2 ]]; then
    echo "usage: scripts/recipe.sh THEOREMS.jsonl OUT_DIR" >&2
    exit 2
fi
data="$(realpath "$1")"
out="$2"
mkdir -p "$out"
out="$(realpath "$out")"
seed="${SEED:-0}"
len="${MAX_LEN:-48}"
eval_n="${EVAL_N:-8}"

log() { echo "recipe: [$SECONDS s] $*" >&2; }
skip() { log "$1: $2 exists, skipped"; }

lg="${LEAN_GRPO:-}"
if [[ -z "$lg" ]]; then
    (cd "$repo" && cargo build --quiet --release)
    lg="${CARGO_TARGET_DIR:-$repo/target}/release/lean-grpo"
fi
lean="${LEAN:-$("$repo/scripts/test-lean.sh")}"
checker=(--lean-cmd "$lean --json" --jobs "$(nproc)")
sampling=(--max-completion-length "$len" --temperature 1.0)

model="${MODEL:-$out/model}"
if [[ -z "${MODEL:-}" ]]; then
    if [[ -f "$model/config.json" ]]; then
        skip model "$model"
    else
        log "model: a tiny random model (init-model, seed $seed)"
        "$lg" -q init-model --corpus "$data" --output "$model" --seed "$seed" >&2
    fi
fi

if [[ -f "$out/sft/adapter_config.json" ]]; then
    skip sft "$out/sft"
else
    log "sft: ${SFT_EPOCHS:-4} epochs on the train records with a proof"
    "$lg" -q sft "$data" --split train --model "$model" --epochs "${SFT_EPOCHS:-4}" \
        --learning-rate "${SFT_LR:-1e-3}" --seed "$seed" --output "$out/sft" >&2
fi

evaluate() { # SPLIT ADAPTER DIR
    if [[ -f "$3/summary.json" ]]; then
        skip "eval ($1)" "$3/summary.json"
        return
    fi
    log "eval: the $1 split, $eval_n samples per problem"
    "$lg" -q eval "$data" --split "$1" --model "$model" --adapter "$2" -n "$eval_n" --k 1 \
        --seed "$seed" "${sampling[@]}" "${checker[@]}" --output "$3" >/dev/null
}

evaluate train "$out/sft" "$out/eval-train"

filtered="$out/train-filtered.jsonl"
if [[ -f "$filtered" ]]; then
    skip filter "$filtered"
else
    log "filter: train problems with pass rate in [${MIN_PASS_RATE:-0.01}, ${MAX_PASS_RATE:-0.99}]"
    "$lg" filter "$data" --split train --from "$out/eval-train" \
        --min-pass-rate "${MIN_PASS_RATE:-0.01}" --max-pass-rate "${MAX_PASS_RATE:-0.99}" \
        -o "$filtered" >&2
fi
if [[ ! -s "$filtered" ]]; then
    log "filter kept no problem: nothing for RL to learn from; lower MIN_PASS_RATE or raise EVAL_N"
    exit 1
fi

if [[ -d "$out/rl/adapter" ]]; then
    skip train "$out/rl/adapter"
elif [[ -f "$out/rl/config.yaml" ]]; then
    log "train: resuming $out/rl"
    "$lg" -q train --resume "$out/rl" >&2
else
    log "train: ${ALGORITHM:-dapo}, ${RL_STEPS:-20} steps on the filtered problems"
    "$lg" -q train "$filtered" --model "$model" --adapter "$out/sft" \
        --algorithm "${ALGORITHM:-dapo}" --num-generations "${NUM_GENERATIONS:-8}" \
        --batch-size "${BATCH_SIZE:-2}" --max-steps "${RL_STEPS:-20}" \
        --learning-rate "${RL_LR:-1e-4}" --seed "$seed" "${sampling[@]}" "${checker[@]}" \
        --output "$out/rl" >&2
fi

evaluate test "$out/rl/adapter" "$out/eval-test"

pass() { python3 -c 'import json,sys; print("%.1f%%" % (100 * json.load(open(sys.argv[1]))["pass_at_k"]["1"]))' "$1"; }
echo "train split after SFT: pass@1 $(pass "$out/eval-train/summary.json")"
echo "filtered: $(wc -l < "$filtered") problems ($filtered)"
echo "test split after RL:   pass@1 $(pass "$out/eval-test/summary.json")"
