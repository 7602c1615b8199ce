#!/usr/bin/env bash
# The learning table over seeds: scripts/learn-prelude.sh once per seed, every seed's RL
# starting from the same SFT policy, then per algorithm the test pass@1 before and after RL
# (mean and min over seeds), the seeds that ended below their start, and the RL time.
#
#   SEEDS="0 1 2" MODEL="$(scripts/fetch-model.sh)" scripts/learn-seeds.sh OUT_DIR
#
# The first seed runs the SFT warm-up (OUT_DIR/seed-S/sft); the others start RL from it, so the
# spread over seeds is the spread of RL (its sampling, example order and dropout) and of the
# sampled evaluation, not of the warm-up. Each seed's "before" is the warm-up policy evaluated
# with that seed, so a seed is compared with a start measured under the same sampling noise.
# Every other knob (ALGORITHMS, RL_STEPS, RL_LR, MAX_LEN, SFT_*, EVAL_N, BUILD, LEAN_GRPO,
# RL_DATA, TAG, ...) goes through to scripts/learn-prelude.sh unchanged. Resumable: finished
# (seed, algorithm) runs are not run again.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/runs/learn-seeds}"
seeds=(${SEEDS:-0 1 2})
mkdir -p "$out"

sft="${SFT_ADAPTER:-$out/seed-${seeds[0]}/sft}"
for seed in "${seeds[@]}"; do
    dir="$out/seed-$seed"
    rm -f "$dir/results.jsonl"
    if [[ -f "$sft/adapter_config.json" ]]; then
        SEED="$seed" SFT_ADAPTER="$sft" "$repo/scripts/learn-prelude.sh" "$dir" >/dev/null
    else
        SEED="$seed" "$repo/scripts/learn-prelude.sh" "$dir" >/dev/null
    fi
done

python3 - "$out" "${seeds[@]}" <<'PY'
import collections, json, sys
out, seeds = sys.argv[1], sys.argv[2:]
by_run = collections.defaultdict(list)
for s in seeds:
    for line in open(f"{out}/seed-{s}/results.jsonl"):
        r = json.loads(line)
        by_run[r["run"]].append(r)
print(f"Sampled test pass@1 (16 theorems, n = 8, temperature 1), seeds {' '.join(seeds)}:")
print()
print("| run | pass@1 after SFT (mean) | after RL: mean | min | Δ mean | seeds below start "
      "| steps without gradient | RL time (mean) |")
print("|---|---|---|---|---|---|---|---|")
for run, rs in by_run.items():
    n = len(rs)
    before = sum(r["pass_at_1_before"] for r in rs) / n
    after = [r["pass_at_1_after"] for r in rs]
    below = sum(1 for r in rs if r["pass_at_1_after"] < r["pass_at_1_before"])
    delta = sum(r["pass_at_1_after"] - r["pass_at_1_before"] for r in rs) / n
    flat = sum(r["steps_without_gradient"] for r in rs)
    steps = sum(r["steps"] for r in rs)
    secs = sum(r["rl_seconds"] for r in rs) / n
    print(f"| {run} | {before:.1f}% | {sum(after) / n:.1f}% | {min(after):.1f}% | {delta:+.1f} "
          f"| {below} of {n} | {flat} of {steps} | {secs / 60:.1f} min |")

# Which proofs count: accepted test samples per family (the record name's first word), summed
# over seeds, and how many of them are the one-liner `MyEq.refl _` the warm-up mostly taught.
def accepted(eval_dir):
    counts, refl, total = collections.Counter(), 0, collections.Counter()
    for line in open(f"{eval_dir}/results.jsonl"):
        problem = json.loads(line)
        family = problem["name"].split("_")[0]
        for sample in problem["samples"]:
            total[family] += 1
            if sample["accepted"]:
                counts[family] += 1
                refl += sample.get("proof", "").strip() == "MyEq.refl _"
    return counts, refl, total

rows = {"sft": [accepted(f"{out}/seed-{s}/eval-sft") for s in seeds]}
for run in by_run:
    rows[run] = [accepted(f"{out}/seed-{s}/eval-{run}") for s in seeds]
families = sorted({f for rs in rows.values() for _, _, t in rs for f in t})
print()
print("Accepted test samples per family, all seeds together (of the samples drawn):")
print()
print("| policy | " + " | ".join(families) + " | of which `MyEq.refl _` |")
print("|---|" + "---|" * (len(families) + 1))
for run, rs in rows.items():
    cells = []
    for f in families:
        cells.append(f"{sum(c[f] for c, _, _ in rs)} of {sum(t[f] for _, _, t in rs)}")
    total = sum(sum(c.values()) for c, _, _ in rs)
    refl = sum(r for _, r, _ in rs)
    print(f"| {run} | " + " | ".join(cells) + f" | {refl} of {total} |")
PY
