#!/usr/bin/env python3
"""One GRPO step of Hugging Face TRL's GRPOTrainer vs lean-grpo, on CPU, same model and shapes.

Not run by CI (it needs torch, transformers, trl, peft, datasets: about 1 GB):

    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch --index-url \
        https://download.pytorch.org/whl/cpu && /tmp/trl/bin/pip install trl peft datasets
    lean-grpo init-model --corpus data/prelude.jsonl --output /tmp/tiny --seed 0
    /tmp/trl/bin/python benches/peers/trl_grpo_step.py --model /tmp/tiny \
        --lean-grpo target/debug/lean-grpo --lean "$(scripts/test-lean.sh)"

What is compared: a training step of GRPO with LoRA (r 16, alpha 32, all seven projections) on
the same tiny Qwen2 model directory, 2 prompts from data/prelude.jsonl (train split) through
the same ChatML template, 4 completions each, at most 24 new tokens, temperature 1, beta 0.04
(both trainers' GRPO default), one optimizer step per training step. TRL's reward is a string
test (does the completion contain `MyEq.refl`), which costs nothing; lean-grpo's reward is a
real Lean verdict, so its figure is sampling + training seconds from metrics.jsonl, with the
Lean time (overlapped with sampling anyway) left out. Each side runs 3 steps; the median of
steps 2 and 3 is reported (step 1 pays for warm-up).

Status: written against TRL's documented GRPOConfig/GRPOTrainer API; it has not been run in
this repository's CI or on the development machine (no torch there).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GROUP = 4
PROMPTS = 2
MAX_NEW = 24
STEPS = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def user_message(record):
    # The instruction of lean-grpo's src/data/prompt.rs, with the record's preamble.
    preamble = record.get("header") or ""
    return (
        "Complete the following Lean 4 theorem. Reply with the proof that follows `:=` "
        "(a term, or `by` followed by indented tactics) in a ```lean code block. "
        "Do not restate the theorem or change its statement.\n\n```lean\n"
        + preamble
        + record["statement"]
        + "\n```"
    )


def trl_step_seconds(model_dir, records):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    prompts = [[{"role": "user", "content": user_message(r)}] for r in records]
    dataset = Dataset.from_dict({"prompt": prompts * STEPS})

    def reward(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if "MyEq.refl" in t else 0.0 for t in texts]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            per_device_train_batch_size=PROMPTS * GROUP,
            num_generations=GROUP,
            max_completion_length=MAX_NEW,
            max_prompt_length=2048,
            temperature=1.0,
            beta=0.04,
            learning_rate=5e-3,
            max_steps=STEPS,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
        )
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[clock],
        )
        trainer.train()
    return statistics.median(clock.times[1:])


def lean_grpo_step_seconds(binary, model_dir, lean, data):
    with tempfile.TemporaryDirectory() as out:
        run = os.path.join(out, "run")
        subprocess.run(
            [binary, "-q", "train", data, "--split", "train", "--model", model_dir,
             "--algorithm", "grpo", "--num-generations", str(GROUP), "--batch-size",
             str(PROMPTS), "--max-steps", str(STEPS), "--max-completion-length", str(MAX_NEW),
             "--temperature", "1.0", "--learning-rate", "5e-3", "--seed", "0",
             "--lean-cmd", f"{lean} --json", "--output", run],
            check=True,
        )
        with open(os.path.join(run, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f]
    return statistics.median(s["sampling_seconds"] + s["training_seconds"] for s in steps[1:])


def main():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory from `lean-grpo init-model`")
    p.add_argument("--lean-grpo", default=os.path.join(repo, "target/debug/lean-grpo"))
    p.add_argument("--lean", required=True, help="a lean binary (scripts/test-lean.sh)")
    p.add_argument("--data", default=os.path.join(repo, "data/prelude.jsonl"))
    a = p.parse_args()
    with open(a.data) as f:
        records = [r for r in map(json.loads, f) if r.get("split") == "train"][:PROMPTS]
    ours = lean_grpo_step_seconds(a.lean_grpo, a.model, a.lean, a.data)
    theirs = trl_step_seconds(a.model, records)
    print(f"machine: {os.cpu_count()} cores, {sys.platform}")
    print(f"step: {PROMPTS} prompts x {GROUP} completions, <= {MAX_NEW} new tokens, LoRA r16")
    print(f"lean-grpo  {ours:8.3f} s/step (sampling + training)")
    print(f"TRL        {theirs:8.3f} s/step")
    print(f"ratio TRL / lean-grpo: {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
