#!/usr/bin/env python3
"""lean-grpo against Hugging Face transformers and TRL on one machine, in one run, same shapes.

Not run by CI. It needs torch, transformers, trl, peft and datasets from PyPI (versions below
are those it was last run with). Run from the repository root:

    python3 -m venv /tmp/trl
    /tmp/trl/bin/pip install torch==2.15.0 transformers==5.24.0 trl==1.16.0 peft==0.21.2 \
        datasets==5.2.0
    cargo build --release
    /tmp/trl/bin/python benches/peers/side_by_side.py --lean-grpo target/release/lean-grpo

What is compared (issue #20, item 5), on a random model of the Qwen2.5-0.5B shape (24 layers,
hidden 896, 14 query / 2 key-value heads, MLP 4864, vocabulary 151936, untied head), f32, CPU:

- Sampling: one 700-token prompt (a real prompt's length: header, instructions, theorem), 8
  completions of 48 new tokens each (no EOS: every row runs to the end), temperature 1,
  adapters on (LoRA r 16, alpha 32, the seven projections). Ours: `lean-grpo bench`'s
  `memory.sampling_tokens_per_second` (the group decoded in one batch, the prompt prefilled
  once). Theirs: transformers' `generate` on the PEFT model, batch 8 (the prompt repeated 8
  times), `min_new_tokens = max_new_tokens = 48`. Tokens/s include the prefill on both sides.
- Training step: one GRPO update of that group (700 + 48 tokens × 8 rows, half the rewards 1,
  beta 0, GRPO loss), gradient through the LoRA adapters, one AdamW step. Ours: `lean-grpo
  bench`'s `memory.training_step_seconds` and `memory.training_step_checkpointed_seconds` (a
  first update, optimizer created in it). Theirs: TRL 1.16 `GRPOTrainer.compute_loss` on the
  same batch, `backward`, the trainer's optimizer step, with and without gradient
  checkpointing; the first update is timed, as ours, and the second is printed too.
- Peak RSS of each phase: ours from the bench (whole process, weights included); theirs, each
  phase in a fresh Python process (`ru_maxrss`, weights included).

Weights are random on both sides, drawn differently; with no EOS the work is the same for any
weights. The token ids of the prompt and completions follow the bench's own formula.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)
PROMPT, GROUP, NEW = 700, 8, 48
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"])


def token_ids(seed, length, vocab):
    """src/bench/model.rs `token_ids`: the bench's prompt (seed 2) and completions (200 + i)."""
    return [(seed * 7919 + k * 104729) % vocab for k in range(length)]


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_model(checkpointing):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPE, max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_theta=10000.0, rms_norm_eps=1e-6, use_cache=True)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def phase_generate():
    import torch

    model = build_model(False).eval()
    prompt = torch.tensor([token_ids(2, PROMPT, SHAPE["vocab_size"])] * GROUP)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - PROMPT) * GROUP
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


def phase_trl_step(checkpointing):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = build_model(checkpointing)
    work = tempfile.mkdtemp()
    args = GRPOConfig(
        output_dir=work, use_cpu=True, per_device_train_batch_size=GROUP,
        num_generations=GROUP, max_completion_length=NEW, beta=0.0, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", learning_rate=1e-6, bf16=False,
        gradient_checkpointing=checkpointing, report_to=[], save_strategy="no",
        max_steps=2, logging_steps=1)
    dataset = Dataset.from_dict({"prompt": ["x"] * GROUP})
    # The trainer wants a tokenizer; the update below never tokenizes, so any Qwen-style one.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(repo, "tests/data/tiny-qwen2"))
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                          reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                          train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    vocab = SHAPE["vocab_size"]
    inputs = {
        "prompt_ids": torch.tensor([token_ids(2, PROMPT, vocab)] * GROUP),
        "prompt_mask": torch.ones(GROUP, PROMPT, dtype=torch.long),
        "completion_ids": torch.tensor([token_ids(200 + i, NEW, vocab) for i in range(GROUP)]),
        "completion_mask": torch.ones(GROUP, NEW, dtype=torch.long),
        # Half the group right, GRPO-normalised: ±1.
        "advantages": torch.tensor([1.0 if i % 2 else -1.0 for i in range(GROUP)]),
        "num_items_in_batch": torch.tensor(GROUP * NEW),
    }
    model.train()
    # Set by Trainer's own loop, which this update bypasses (no generation, no data loader).
    trainer.current_gradient_accumulation_steps = 1
    times = []
    for _ in range(2):
        start = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"first_seconds": times[0], "second_seconds": times[1]}


def run_phase(name):
    """`name` in a fresh interpreter: its own peak RSS. A phase the kernel kills (the OOM killer
    on a machine too small for it) is a result too: `{"killed": ...}`, its figures None."""
    out = subprocess.run([sys.executable, __file__, "--phase", name],
                         capture_output=True, text=True)
    if out.returncode < 0:
        print(f"phase {name} killed by signal {-out.returncode}", file=sys.stderr)
        return {"killed": f"signal {-out.returncode} (SIGKILL: the OOM killer, see dmesg)"
                if out.returncode == -9 else f"signal {-out.returncode}"}
    if out.returncode != 0:
        sys.exit(f"phase {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lean-grpo", default="target/release/lean-grpo")
    p.add_argument("--bench-json", help="a `lean-grpo bench` summary of this run's machine, "
                   "instead of running the bench here (full mode, same shapes)")
    p.add_argument("--save-bench", help="write the bench summary this run makes to this file "
                   "(to rerun the peers alone with --bench-json)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        import torch
        torch.set_num_threads(os.cpu_count())
        result = {"generate": phase_generate,
                  "trl-step": lambda: phase_trl_step(False),
                  "trl-step-checkpointed": lambda: phase_trl_step(True)}[a.phase]()
        result["peak_rss_gib"] = peak_rss_gib()
        print(json.dumps(result))
        return

    if a.bench_json:
        with open(a.bench_json) as f:
            bench = json.load(f)
    else:
        out = subprocess.run([a.lean_grpo, "bench"], check=True, capture_output=True, text=True)
        bench = json.loads(out.stdout)
        if a.save_bench:
            with open(a.save_bench, "w") as f:
                f.write(out.stdout)
    plan = bench["settings"]["model"]
    assert plan["shape"] == "Qwen2.5-0.5B", "the bench must run in full mode"
    assert (plan["memory_prompt_tokens"], plan["memory_group_size"],
            plan["memory_completion_tokens"]) == (PROMPT, GROUP, NEW), plan
    ours = bench["figures"]["memory"]
    theirs = {name: run_phase(name)
              for name in ["generate", "trl-step", "trl-step-checkpointed"]}
    import peft, torch, transformers, trl
    rows = [
        ("sampling tokens/s (higher is better)", ours["sampling_tokens_per_second"],
         theirs["generate"].get("tokens_per_second")),
        ("sampling peak RSS GiB", ours["sampling_peak_rss_gib"],
         theirs["generate"].get("peak_rss_gib")),
        ("training step s, full graph (first update)", ours["training_step_seconds"],
         theirs["trl-step"].get("first_seconds")),
        ("training step s, checkpointed (first update)",
         ours["training_step_checkpointed_seconds"],
         theirs["trl-step-checkpointed"].get("first_seconds")),
        ("training step peak RSS GiB, full graph", ours["training_step_peak_rss_gib"],
         theirs["trl-step"].get("peak_rss_gib")),
        ("training step peak RSS GiB, checkpointed",
         ours["training_step_checkpointed_peak_rss_gib"],
         theirs["trl-step-checkpointed"].get("peak_rss_gib")),
    ]
    summary = {
        "date": bench["date"],
        "machine": bench["machine"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "peft": peft.__version__},
        "peers": theirs,
        "rows": [{"figure": f, "lean_grpo": o, "peer": t, "ratio": o / t if t else None}
                 for f, o, t in rows],
    }
    print(json.dumps(summary, indent=2))
    print(f"\n| figure | lean-grpo | transformers / TRL | ratio |\n|---|---|---|---|",
          file=sys.stderr)
    for f, o, t in rows:
        peer, ratio = (f"{t:.2f}", f"{o / t:.2f}") if t else ("killed (out of memory)", "-")
        print(f"| {f} | {o:.2f} | {peer} | {ratio} |", file=sys.stderr)


if __name__ == "__main__":
    main()
