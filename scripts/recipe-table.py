#!/usr/bin/env python3
"""The learning table of docs/learning.md from run directories of scripts/recipe.sh.

    scripts/recipe-table.py --seeds 0 1 2 \\
        --sft 'runs/recipe-s{seed}/eval-test-sft' \\
        --run 'dapo=runs/recipe-s{seed}' --run 'grpo=runs/recipe-grpo-s{seed}'

`--sft` is the warm-up's `lean-grpo eval` on the test split, one per seed (`{seed}` is replaced);
each `--run ALGORITHM=DIR` is a recipe directory per seed, holding `rl/metrics.jsonl` and the
RL adapter's test evaluation `eval-test/`. A run that is missing or unfinished is reported as
such, not skipped. Prints two Markdown tables: pass@1 per algorithm (mean and min over seeds,
seeds below their start, steps without gradient, RL stage time) and accepted test samples per
family (the record name's prefix before `_`). Reads files only.
"""

import argparse
import json
import os
import statistics
import sys

FAMILIES = ["add", "congr", "mul", "one", "succ", "zero"]


def pass_at_1(eval_dir):
    with open(os.path.join(eval_dir, "summary.json")) as f:
        return 100 * json.load(f)["pass_at_k"]["1"]


def families(eval_dir):
    """Accepted and drawn samples per family, and how many accepted proofs are `MyEq.refl _`."""
    counts = {fam: [0, 0] for fam in FAMILIES}
    refl = 0
    with open(os.path.join(eval_dir, "results.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            fam = record["name"].split("_")[0]
            counts.setdefault(fam, [0, 0])
            for sample in record["samples"]:
                counts[fam][1] += 1
                if sample["accepted"]:
                    counts[fam][0] += 1
                    refl += (sample.get("proof") or "").strip() == "MyEq.refl _"
    return counts, refl


def rl_stage(run_dir):
    """Steps, steps without gradient (no optimizer step, or every group flat) and minutes."""
    steps = flat = 0
    seconds = 0.0
    with open(os.path.join(run_dir, "rl", "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            steps += 1
            if not m["optimizer_step"] or m["zero_variance_fraction"] >= 1.0:
                flat += 1
            seconds += m["sampling_seconds"] + m["checking_seconds"] + m["training_seconds"]
    return steps, flat, seconds / 60


def add(total, counts):
    for fam, (a, n) in counts.items():
        total.setdefault(fam, [0, 0])
        total[fam][0] += a
        total[fam][1] += n


def family_row(name, total, refl):
    accepted = sum(a for a, _ in total.values())
    cells = [f"{total[f][0]} of {total[f][1]}" if f in total else "–" for f in FAMILIES]
    return f"| {name} | " + " | ".join(cells) + f" | {refl} of {accepted} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", required=True)
    ap.add_argument("--sft", required=True, help="warm-up test eval dir, with {seed}")
    ap.add_argument("--run", action="append", default=[], help="ALGORITHM=DIR with {seed}")
    args = ap.parse_args()

    sft = {s: pass_at_1(args.sft.format(seed=s)) for s in args.seeds}
    sft_total, sft_refl = {}, 0
    for s in args.seeds:
        counts, refl = families(args.sft.format(seed=s))
        add(sft_total, counts)
        sft_refl += refl

    print("| algorithm | seeds | pass@1 after SFT (per seed) | after RL (per seed) | mean | min "
          "| Δ mean | seeds below their start | steps without gradient | RL stage time (mean) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    family_rows = [family_row("SFT", sft_total, sft_refl)]
    for spec in args.run:
        algo, pattern = spec.split("=", 1)
        after, below, flat, steps, minutes = {}, 0, 0, 0, []
        total, refl_all, missing = {}, 0, []
        for s in args.seeds:
            d = pattern.format(seed=s)
            try:
                after[s] = pass_at_1(os.path.join(d, "eval-test"))
                n, f, m = rl_stage(d)
            except (OSError, KeyError, ValueError) as e:
                missing.append(f"seed {s}: {e}")
                continue
            steps, flat, below = steps + n, flat + f, below + (after[s] < sft[s])
            minutes.append(m)
            counts, refl = families(os.path.join(d, "eval-test"))
            add(total, counts)
            refl_all += refl
        for m in missing:
            print(f"{algo}: not finished or missing, {m}", file=sys.stderr)
        if not after:
            continue
        done = list(after)
        start = statistics.mean(sft[s] for s in done)
        mean = statistics.mean(after.values())
        print(f"| {algo} | {' '.join(done)} | {' / '.join(f'{sft[s]:.1f}' for s in done)}% "
              f"| {' / '.join(f'{after[s]:.1f}' for s in done)}% | {mean:.1f}% "
              f"| {min(after.values()):.1f}% | {mean - start:+.1f} | {below} of {len(done)} "
              f"| {flat} of {steps} | {statistics.mean(minutes):.1f} min |")
        family_rows.append(family_row(algo, total, refl_all))
    print()
    print("| policy | " + " | ".join(FAMILIES) + " | of which `MyEq.refl _` |")
    print("|---|" + "---|" * (len(FAMILIES) + 1))
    print("\n".join(family_rows))


if __name__ == "__main__":
    main()
