#!/usr/bin/env bash
# Does RL with Lean in the loop learn? One command, CPU only, real Lean verdicts.
#
#   scripts/learn-prelude.sh [OUT_DIR]          (default runs/learn-prelude)
#
# 1. `init-model`: a tiny random Qwen2 (hidden 64, 2 layers, ~140k parameters) whose BPE
#    tokenizer is trained on data/prelude.jsonl; or, with MODEL=PATH (a model directory or a
#    .gguf such as `scripts/fetch-model.sh` prints), that pretrained model;
# 2. `sft`: a short supervised warm-up on the first $SFT_LIMIT train records, so the policy
#    sometimes writes an accepted proof;
# 3. for each algorithm: `train` (RL from the warm-up adapter on the train split, real Lean
#    4.35.0 from scripts/test-lean.sh) and `eval` on the 16 held-out test theorems;
# 4. prints a markdown table of sampled pass@1 (n=$EVAL_N samples per theorem, temperature 1,
#    the temperature RL samples at) before and after RL, and writes reward plots.
#
# Everything is seeded ($SEED, default 0): the model, the adapters' init, the example order,
# sampling. Knobs (environment): SEED, ALGORITHMS, RL_STEPS, RL_LR, SFT_LIMIT, SFT_EPOCHS,
# SFT_LR, EVAL_N, MODEL, MAX_LEN (max completion tokens, default 32), BUILD (debug or release), ALGO_CONFIG (JSON passed to `train --algo-config`, e.g.
# '{"dynamic_sampling_metric": "shaped_reward"}'), LEAN (a `lean` binary; default:
# scripts/test-lean.sh fetches one).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/runs/learn-prelude}"
seed="${SEED:-0}"
algorithms="${ALGORITHMS:-grpo dapo drgrpo gspo dgpo}"
rl_steps="${RL_STEPS:-20}"
rl_lr="${RL_LR:-1e-3}"
sft_limit="${SFT_LIMIT:-24}"
sft_epochs="${SFT_EPOCHS:-16}"
sft_lr="${SFT_LR:-1e-2}"
eval_n="${EVAL_N:-8}"
algo_config=()
if [[ -n "${ALGO_CONFIG:-}" ]]; then
    algo_config=(--algo-config "$ALGO_CONFIG")
fi
data="$repo/data/prelude.jsonl"
# Max completion tokens. 47 of the 75 taught replies are 10 tokens (`MyEq.refl _`), all but four
# fit. Not 24: DAPO's overlong shaping penalises the last ⌊len/5⌋ tokens, and at 24 that pushed
# its policy to empty replies (shorter than the garbage) before it found correct ones.
len="${MAX_LEN:-32}"
build="${BUILD:-debug}"

log() { echo "learn-prelude: $*" >&2; }
start=$SECONDS
phase() { log "[$((SECONDS - start))s] $*"; }

lean="${LEAN:-$("$repo/scripts/test-lean.sh")}"
phase "building lean-grpo"
if [[ "$build" == release ]]; then
    (cd "$repo" && cargo build --quiet --release)
else
    (cd "$repo" && cargo build --quiet)
fi
target="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$out"
# A private copy: another build in the same target directory cannot swap it mid-run.
cp "$target/$build/lean-grpo" "$out/lean-grpo"
lg="$out/lean-grpo"
checker=(--lean-cmd "$lean --json" --jobs "$(nproc)")
sampling=(--max-completion-length "$len" --temperature 1.0)

evaluate() { # ADAPTER DIR
    "$lg" -q eval "$data" --split test --model "$model" --adapter "$1" -n "$eval_n" --k 1 \
        --seed "$seed" "${sampling[@]}" "${checker[@]}" --output "$2" >/dev/null
    python3 -c 'import json,sys; print(100 * json.load(open(sys.argv[1]))["pass_at_k"]["1"])' \
        "$2/summary.json"
}

if [[ -n "${MODEL:-}" ]]; then
    model="$MODEL"
    phase "pretrained model $model"
else
    model="$out/model"
    phase "init-model (seed $seed)"
    rm -rf "$model"
    "$lg" init-model --corpus "$data" --output "$model" --seed "$seed" >&2
fi

phase "sft on the first $sft_limit train records, $sft_epochs epochs"
"$lg" -q sft "$data" --split train --model "$model" --limit "$sft_limit" \
    --epochs "$sft_epochs" --batch-size 4 --learning-rate "$sft_lr" --seed "$seed" \
    --output "$out/sft" >&2

phase "pass@1 of the warm-up policy on the test split"
before="$(evaluate "$out/sft" "$out/eval-sft")"
phase "before RL: pass@1 ${before}%"

rows=()
for algo in $algorithms; do
    phase "RL with $algo, $rl_steps steps"
    t0=$SECONDS
    rm -rf "$out/$algo"
    "$lg" -q train "$data" --split train --model "$model" --adapter "$out/sft" \
        --algorithm "$algo" --num-generations 8 --batch-size 2 --max-steps "$rl_steps" \
        --learning-rate "$rl_lr" --seed "$seed" "${sampling[@]}" "${checker[@]}" \
        ${algo_config[@]+"${algo_config[@]}"} --output "$out/$algo" >&2
    rl_seconds=$((SECONDS - t0))
    after="$(evaluate "$out/$algo/adapter" "$out/eval-$algo")"
    "$lg" plot "$out/$algo" >/dev/null
    reward="$(python3 - "$out/$algo/metrics.jsonl" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
half = max(1, len(m) // 2)
first = sum(x["reward_mean"] for x in m[:half]) / half
last = sum(x["reward_mean"] for x in m[-half:]) / half
print(f"{first:.2f} → {last:.2f}")
PY
)"
    phase "$algo: pass@1 ${before}% -> ${after}%"
    rows+=("$(python3 -c 'import sys; b, a = float(sys.argv[1]), float(sys.argv[2]); print(f"| {sys.argv[3]} | {b:.1f}% | {a:.1f}% | {a - b:+.1f} | {sys.argv[4]} | {sys.argv[5]} s |")' \
        "$before" "$after" "$algo" "$reward" "$rl_seconds")")
done

echo
echo "Sampled pass@1 on the 16 test theorems of data/prelude.jsonl (n=$eval_n per theorem, \
temperature 1), seed $seed, $rl_steps RL steps of 2 theorems × 8 proofs:"
echo
echo "| algorithm | pass@1 after SFT | pass@1 after RL | Δ points | train reward (first → second half) | RL time |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "total $((SECONDS - start)) s; runs, samples and reward plots (reward.png) in $out"
