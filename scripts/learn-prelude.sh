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
# scripts/test-lean.sh fetches one), LEAN_GRPO (a built binary instead of building one),
# SFT_ADAPTER (an existing warm-up adapter: step 2 is skipped, so several RL seeds can start
# from the same SFT policy), RL_DATA (the theorem file RL trains on, default data/prelude.jsonl;
# e.g. one written by `lean-grpo filter`), TAG (suffix of the per-algorithm run names),
# TRAIN_ARGS (more `train` flags, split on spaces, e.g. "--task fim" for the fill-in-the-middle
# curriculum of docs/fim.md; evaluation stays on whole proofs).
#
# Resumable: an algorithm whose evaluation is already in OUT_DIR is not run again. Every result
# is appended to OUT_DIR/results.jsonl (one JSON object per algorithm) for scripts/learn-seeds.sh.
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
read -r -a train_args <<<"${TRAIN_ARGS:-}"
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

rl_data="${RL_DATA:-$data}"
tag="${TAG:-}"

lean="${LEAN:-$("$repo/scripts/test-lean.sh")}"
mkdir -p "$out"
if [[ -n "${LEAN_GRPO:-}" ]]; then
    lg="$LEAN_GRPO"
else
    phase "building lean-grpo"
    if [[ "$build" == release ]]; then
        (cd "$repo" && cargo build --quiet --release)
    else
        (cd "$repo" && cargo build --quiet)
    fi
    target="${CARGO_TARGET_DIR:-$repo/target}"
    # A private copy: another build in the same target directory cannot swap it mid-run.
    cp "$target/$build/lean-grpo" "$out/lean-grpo"
    lg="$out/lean-grpo"
fi
checker=(--lean-cmd "$lean --json" --jobs "$(nproc)")
sampling=(--max-completion-length "$len" --temperature 1.0)

pass_at_1() { # EVAL_DIR
    python3 -c 'import json,sys; print(100 * json.load(open(sys.argv[1]))["pass_at_k"]["1"])' \
        "$1/summary.json"
}
evaluate() { # ADAPTER DIR
    "$lg" -q eval "$data" --split test --model "$model" --adapter "$1" -n "$eval_n" --k 1 \
        --seed "$seed" "${sampling[@]}" "${checker[@]}" --output "$2" >/dev/null
    pass_at_1 "$2"
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

if [[ -n "${SFT_ADAPTER:-}" ]]; then
    sft="$SFT_ADAPTER"
    phase "warm-up adapter $sft (given; no SFT)"
else
    sft="$out/sft"
    phase "sft on the first $sft_limit train records, $sft_epochs epochs"
    "$lg" -q sft "$data" --split train --model "$model" --limit "$sft_limit" \
        --epochs "$sft_epochs" --batch-size 4 --learning-rate "$sft_lr" --seed "$seed" \
        --output "$sft" >&2
fi

phase "pass@1 of the warm-up policy on the test split"
if [[ -f "$out/eval-sft/summary.json" ]]; then
    before="$(pass_at_1 "$out/eval-sft")"
else
    before="$(evaluate "$sft" "$out/eval-sft")"
fi
phase "before RL: pass@1 ${before}%"

rows=()
for algo in $algorithms; do
    run="$algo$tag"
    if [[ -f "$out/eval-$run/summary.json" && -f "$out/$run/rl_seconds" ]]; then
        phase "$run: evaluated already, not run again"
        after="$(pass_at_1 "$out/eval-$run")"
        rl_seconds="$(cat "$out/$run/rl_seconds")"
    else
        phase "RL with $algo on $rl_data, $rl_steps steps"
        t0=$SECONDS
        rm -rf "$out/$run" "$out/eval-$run"
        "$lg" -q train "$rl_data" --split train --model "$model" --adapter "$sft" \
            --algorithm "$algo" --num-generations 8 --batch-size 2 --max-steps "$rl_steps" \
            --learning-rate "$rl_lr" --seed "$seed" "${sampling[@]}" "${checker[@]}" \
            ${algo_config[@]+"${algo_config[@]}"} ${train_args[@]+"${train_args[@]}"} \
            --output "$out/$run" >&2
        rl_seconds=$((SECONDS - t0))
        after="$(evaluate "$out/$run/adapter" "$out/eval-$run")"
        echo "$rl_seconds" >"$out/$run/rl_seconds"
        "$lg" plot "$out/$run" >/dev/null
    fi
    reward="$(python3 - "$out/$run/metrics.jsonl" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
half = max(1, len(m) // 2)
first = sum(x["reward_mean"] for x in m[:half]) / half
last = sum(x["reward_mean"] for x in m[-half:]) / half
print(f"{first:.2f} → {last:.2f}")
PY
)"
    phase "$run: pass@1 ${before}% -> ${after}%"
    python3 - "$out/$run/metrics.jsonl" "$run" "$algo" "$seed" "$before" "$after" "$rl_seconds" \
        >>"$out/results.jsonl" <<'PY'
import json, sys
path, run, algo, seed, before, after, secs = sys.argv[1:]
m = [json.loads(l) for l in open(path)]
print(json.dumps({
    "run": run, "algorithm": algo, "seed": int(seed),
    "pass_at_1_before": float(before), "pass_at_1_after": float(after),
    "rl_seconds": int(secs), "steps": len(m),
    # Steps whose every kept row had advantage 0: the optimizer got no gradient.
    "steps_without_gradient": sum(1 for x in m if x["rows_skipped"] == x["completions"]),
    "zero_variance_fraction_mean": sum(x["zero_variance_fraction"] for x in m) / len(m),
    "completions": sum(x["completions"] for x in m),
}))
PY
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
