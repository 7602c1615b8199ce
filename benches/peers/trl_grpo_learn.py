#!/usr/bin/env python3
"""RL on SmolLM2-135M-Instruct with Hugging Face TRL, the same setup as lean-grpo's GRPO run.

Not run by CI. The other half of the learning comparison in docs/learning.md: TRL's
GRPOTrainer with a PEFT LoRA adapter, started from the same SFT adapter as lean-grpo's RL runs
(scripts/learn-seeds.sh), on the same train split, rewarded by the same real Lean verdict
(`lean-grpo check --completions`, Lean 4.35.0 from scripts/test-lean.sh), and then evaluated by
the same `lean-grpo eval` on the 16 test theorems. Run from the repository root:

    python3 -m venv /tmp/trl
    /tmp/trl/bin/pip install torch==2.15.0 transformers==5.24.0 trl==1.16.0 peft==0.21.2 \
        datasets==5.2.0 gguf
    /tmp/trl/bin/python benches/peers/trl_grpo_learn.py \
        --model "$(scripts/fetch-model.sh)" --sft runs/smol/seed-0/sft \
        --lean-grpo target/release/lean-grpo --lean "$(scripts/test-lean.sh)" \
        --output runs/smol/trl-s0 --seed 0

What is the same on both sides: the model (the GGUF, dequantised to f32 by transformers'
`gguf_file=` loader, as lean-grpo dequantises it), the prompt (the chat template of the GGUF
with its default system message; the script checks that its rendering is byte-identical to the
prompts lean-grpo's own eval recorded, and stops if not), LoRA r 16, alpha 32, dropout 0 on all
seven projections, starting from the SFT adapter; 2 theorems x 8 completions per step, at most
48 new tokens, temperature 1, top-p 1, no top-k; GRPO with beta 0, clip epsilon 0.2, rewards
scaled by the group's std, the per-sequence token-mean loss (TRL's `loss_type="grpo"`); one
optimizer step per batch; AdamW with lr 1e-4 constant, betas 0.9 / 0.99, eps 1e-8, no weight
decay, gradient norm clipped at 1; 10 steps; f32 and gradient checkpointing on both sides. The
reward is 1 for a proof Lean accepts and 0 otherwise (lean-grpo's `binary` reward).

What differs: the order in which train theorems are drawn (each trainer's own seeded
shuffle), the random streams, and TRL's sampling (transformers' `generate`) against lean-grpo's.

It writes OUTPUT/adapter (PEFT layout, read by `lean-grpo eval --adapter`), OUTPUT/eval (the
`lean-grpo eval` directory), and OUTPUT/summary.json with pass@1 before and after, the train
wall time and the per-step rewards.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP = 8
THEOREMS_PER_STEP = 2
MAX_NEW = 48
STEPS = 10
LEARNING_RATE = 1e-4
EVAL_N = 8


def preamble(record):
    """lean-grpo's `Theorem::preamble` (src/data/theorem.rs): the header, or imports + context."""
    if record.get("header"):
        return record["header"]
    out = "".join(f"import {m}\n" for m in record.get("imports") or [])
    if record.get("context"):
        out += record["context"] + "\n\n"
    return out


def user_message(record):
    """lean-grpo's whole-proof instruction (src/data/prompt.rs)."""
    return (
        "Complete the following Lean 4 theorem. Reply with the proof that follows `:=` "
        "(a term, or `by` followed by indented tactics) in a ```lean code block. "
        "Do not restate the theorem or change its statement.\n\n```lean\n"
        + preamble(record)
        + record["statement"]
        + "\n```"
    )


def render(tokenizer, record):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(record)}],
        tokenize=False,
        add_generation_prompt=True,
    )


def check_prompts(tokenizer, records, eval_dir):
    """Stops unless our prompts equal, byte for byte, those lean-grpo's eval recorded."""
    by_name = {r["name"]: r for r in records}
    seen = 0
    with open(os.path.join(eval_dir, "results.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            ours = render(tokenizer, by_name[row["name"]])
            if ours != row["prompt"]:
                sys.exit(f"prompt of {row['name']} differs from lean-grpo's:\n{ours!r}\n"
                         f"vs\n{row['prompt']!r}")
            seen += 1
    print(f"prompts: {seen} rendered prompts byte-identical to lean-grpo's", file=sys.stderr)


class LeanReward:
    """The binary reward: `lean-grpo check --completions` on every completion of a batch."""

    __name__ = "lean_verdict"

    def __init__(self, binary, lean, data):
        self.binary, self.lean, self.data = binary, lean, data
        self.steps = []

    def __call__(self, prompts, completions, name, **_):
        with tempfile.TemporaryDirectory() as tmp:
            inp = os.path.join(tmp, "completions.jsonl")
            out = os.path.join(tmp, "verdicts.jsonl")
            with open(inp, "w") as f:
                for n, c in zip(name, completions):
                    f.write(json.dumps({"name": n, "completion": c}) + "\n")
            # Exit status 1 means "some proof was rejected", which is the normal case.
            proc = subprocess.run(
                [self.binary, "-q", "check", self.data, "--completions", inp, "-o", out,
                 "--lean-cmd", f"{shlex.quote(self.lean)} --json", "--jobs",
                 str(os.cpu_count())],
                capture_output=True, text=True,
            )
            if proc.returncode not in (0, 1) or not os.path.exists(out):
                sys.exit(f"lean-grpo check failed ({proc.returncode}):\n{proc.stderr}")
            with open(out) as f:
                verdicts = [json.loads(line) for line in f]
        if len(verdicts) != len(completions):
            sys.exit(f"{len(verdicts)} verdicts for {len(completions)} completions")
        rewards = [1.0 if v["accepted"] else 0.0 for v in verdicts]
        self.steps.append(sum(rewards) / len(rewards))
        return rewards


def evaluate(binary, lean, model, adapter, data, out, seed):
    subprocess.run(
        [binary, "-q", "eval", data, "--split", "test", "--model", model, "--adapter", adapter,
         "-n", str(EVAL_N), "--k", "1", "--seed", str(seed), "--max-completion-length",
         str(MAX_NEW), "--temperature", "1.0", "--lean-cmd", f"{shlex.quote(lean)} --json",
         "--jobs", str(os.cpu_count()), "--output", out],
        check=True, stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(out, "summary.json")) as f:
        return 100 * json.load(f)["pass_at_k"]["1"]


def train(a, records):
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(a.seed)
    model_dir, gguf = os.path.split(os.path.abspath(a.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    check_prompts(tokenizer, records, a.sft_eval)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=torch.float32)
    # transformers' GGUF loader dequantises every tensor at load, so the weights are plain f32
    # tensors; only a GGUF "quantization" marker is left, and Trainer refuses to train a model
    # carrying it. Dropping the marker trains exactly the weights loaded.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = PeftModel.from_pretrained(model, a.sft, is_trainable=True)

    train_records = [r for r in records if r.get("split") == "train"]
    dataset = Dataset.from_dict({
        "prompt": [render(tokenizer, r) for r in train_records],
        "name": [r["name"] for r in train_records],
    })
    reward = LeanReward(a.lean_grpo, a.lean, a.data)
    args = GRPOConfig(
        output_dir=os.path.join(a.output, "trl"),
        use_cpu=True,
        per_device_train_batch_size=THEOREMS_PER_STEP * GROUP,
        num_generations=GROUP,
        max_completion_length=MAX_NEW,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=True,
        max_steps=a.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    adapter = os.path.join(a.output, "adapter")
    trainer.model.save_pretrained(adapter)
    return adapter, seconds, reward.steps, trainer.state.log_history


def main():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the SmolLM2 .gguf (scripts/fetch-model.sh)")
    p.add_argument("--sft", required=True, help="the SFT adapter lean-grpo's RL started from")
    p.add_argument("--sft-eval", help="lean-grpo's eval of the SFT adapter with this seed "
                   "(default: SFT/../eval-sft); its prompts are compared with ours")
    p.add_argument("--lean-grpo", default=os.path.join(repo, "target/release/lean-grpo"))
    p.add_argument("--lean", required=True, help="a lean binary (scripts/test-lean.sh)")
    p.add_argument("--data", default=os.path.join(repo, "data/prelude.jsonl"))
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (lean-grpo's "
                   "RL_STEPS in the comparison)")
    a = p.parse_args()
    a.sft_eval = a.sft_eval or os.path.join(os.path.dirname(os.path.abspath(a.sft)), "eval-sft")
    os.makedirs(a.output, exist_ok=True)
    with open(a.data) as f:
        records = [json.loads(line) for line in f if line.strip()]

    adapter, seconds, rewards, log = train(a, records)
    with open(os.path.join(a.sft_eval, "summary.json")) as f:
        before = 100 * json.load(f)["pass_at_k"]["1"]
    after = evaluate(a.lean_grpo, a.lean, a.model, adapter, a.data,
                     os.path.join(a.output, "eval"), a.seed)

    import peft
    import torch
    import transformers
    import trl

    summary = {
        "trainer": f"trl {trl.__version__} GRPOTrainer, peft {peft.__version__}, transformers "
                   f"{transformers.__version__}, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "seed": a.seed,
        "steps": a.steps,
        "pass_at_1_before": before,
        "pass_at_1_after": after,
        "train_seconds": seconds,
        "reward_per_step": rewards,
        "log_history": log,
    }
    with open(os.path.join(a.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"TRL GRPO seed {a.seed}: test pass@1 {before:.1f}% -> {after:.1f}% "
          f"({after - before:+.1f}), {a.steps} steps in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
