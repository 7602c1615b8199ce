#!/usr/bin/env python3
"""One GRPO step of Hugging Face TRL's GRPOTrainer vs lean-grpo, on CPU, same model and shapes.

Not run by CI. It needs torch, transformers, trl, peft and datasets from PyPI (torch's Linux
wheel pulls NVIDIA's CUDA libraries too: about 6 GB installed, unused on CPU). Run from the
repository root, with a built lean-grpo:

    python3 -m venv /tmp/trl
    /tmp/trl/bin/pip install torch==2.15.0 transformers==5.24.0 trl==1.16.0 peft==0.21.2 \
        datasets==5.2.0
    cargo build --release
    target/release/lean-grpo init-model --corpus data/prelude.jsonl --output /tmp/tiny --seed 0
    /tmp/trl/bin/python benches/peers/trl_grpo_step.py --model /tmp/tiny \
        --lean-grpo target/release/lean-grpo --lean "$(scripts/test-lean.sh)"

(Those are the versions it was last run with; newer ones may rename GRPOConfig fields again.)

What is compared: a training step of GRPO with LoRA (r 16, alpha 32, all seven projections) on
the same tiny Qwen2 model directory, 2 prompts from data/prelude.jsonl (train split) through
the same ChatML template, 4 completions each, at most 24 new tokens, temperature 1, f32, one
optimizer step per training step, and each trainer's GRPO defaults where they agree: beta 0 (no
reference pass), clip epsilon 0.2, rewards scaled by the group's std, and GRPO's loss
aggregation (TRL's `loss_type="grpo"`; TRL 1.x defaults to "dapo"). TRL runs without gradient
checkpointing and in f32 (its GRPOConfig defaults to both checkpointing and bf16), as lean-grpo
does. TRL's reward is a string test (does the completion contain `MyEq.refl`), which costs
nothing; lean-grpo's reward is a real Lean verdict, so its figure is sampling + training seconds
from metrics.jsonl, with the Lean time (overlapped with sampling anyway) left out. Each side
runs 3 steps; the median of steps 2 and 3 is reported (step 1 pays for warm-up).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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
            temperature=1.0,
            beta=0.0,
            loss_type="grpo",
            bf16=False,
            gradient_checkpointing=False,
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
             "--lean-cmd", f"{shlex.quote(lean)} --json", "--output", run],
            check=True,
        )
        with open(os.path.join(run, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f]
    return statistics.median(s["sampling_seconds"] + s["training_seconds"] for s in steps[1:])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


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
    import peft
    import torch
    import transformers
    import trl

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")
    print(f"step: {PROMPTS} prompts x {GROUP} completions, <= {MAX_NEW} new tokens, LoRA r16")
    print(f"lean-grpo  {ours:8.3f} s/step (sampling + training)")
    print(f"TRL        {theirs:8.3f} s/step")
    print(f"ratio TRL / lean-grpo: {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
