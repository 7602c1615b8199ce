#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers on the SmolLM2-135M-Instruct GGUF.

Not run by CI: the outputs are committed under tests/data/gguf/ and read by
tests/model_gguf.rs. Re-run after changing the strings or prompts below with

    python3 -m venv .cache/venv
    .cache/venv/bin/pip install torch transformers gguf tokenizers
    .cache/venv/bin/python scripts/gen-gguf-fixtures.py "$(scripts/fetch-model.sh)"

Writes
  - tests/data/gguf/smollm2-tokenizer.json: for each test string, the ids of
    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` with and without special tokens and the
    decoded text; for a few conversations, `apply_chat_template(..., tokenize=False)` and its ids;
    the special tokens the tokenizer reports.
  - tests/data/gguf/smollm2-logits.json: for a few prompts, the logits of
    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`: at every position
    the top 8 (id, value) and the row's mean, standard deviation and log-sum-exp; at the last
    position every 7th logit (7022 of the 49152); and 32 greedy tokens (argmax of a full
    forward pass per step, no EOS stop) with the top-1/top-2 margin of each step. Values are
    rounded to 1e-5, well under the 1e-3 the test allows.
"""
import hashlib
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "gguf")
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TOP_K = 8
STRIDE = 7
GREEDY_TOKENS = 32

# Lean 4 source, unicode math, whitespace runs, code fences, digits, contractions, special
# tokens written inline, and scripts the vocabulary barely covers.
STRINGS = [
    "theorem add_comm (a b : ℕ) : a + b = b + a := by",
    "  intro h\n  exact h",
    "∀ x : α, ∃ y : β, f x = y → g y ≠ x",
    "fun ⟨a, b⟩ => ⟨b, a⟩",
    "x₁ + x₂ ≤ x₃ ∧ y⁻¹ * y = 1",
    "theorem foo : ¬ (p ∧ ¬ p) := fun ⟨hp, hnp⟩ => hnp hp",
    "example (h : a ∣ b) (h' : b ∣ c) : a ∣ c := dvd_trans h h'",
    "∑ i ∈ Finset.range n, (i : ℝ) ^ 2 ≥ 0",
    "λ x ↦ x ∘ f ⁻¹' s ⊆ t ∪ u ∩ v",
    "```lean\ntheorem t : 1 + 1 = 2 := by norm_num\n```",
    "```\ncode\n```\n\n```python\nprint('hi')\n```",
    "    four spaces",
    "a  b   c    d     e",
    "\t\ttabs\tand\tspaces \t mixed",
    "trailing spaces   ",
    "\n\n\nthree newlines then text\n\n",
    "line one\r\nline two\r\n",
    " leading space",
    "12345 + 67890 = 80235",
    "x = 3.14159, y = -2e10, z = 0x1F",
    "version 1.2.3-rc4",
    "I'm sure it's what they'd've done, isn't it? DON'T SHOUT'S",
    "<|im_start|>user\nProve it.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<repo_name>lean4<file_sep>Main.lean",
    "emoji 🦀 and 🚀🚀 and 👩‍💻",
    "日本語のテキストと中文文本",
    "Ünïcödé àccents — dashes – and “quotes” ‘single’",
    "sorry",
    "by\n  simp only [Nat.add_comm, Nat.mul_comm]\n  ring_nf\n  omega",
    "theorem t {α : Type u} [inst : DecidableEq α] (l : List α) : l.length = l.length := rfl",
    "#print axioms foo",
    "-- a comment\n/- block\n   comment -/",
    "",
    " ",
    "a",
    "𝔽 𝕜 ℤ ℚ ℂ 𝒪",
    "h.1.2.symm ▸ rfl",
    "$$ \\int_0^1 x^2 \\, dx = \\frac{1}{3} $$",
    "https://leanprover-community.github.io/mathlib4_docs/",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Prove: theorem t (a b : ℕ) : a + b = b + a := by"}],
    [
        {"role": "system", "content": "You are a Lean 4 expert. Reply with a proof only."},
        {"role": "user", "content": "theorem foo (p : Prop) (hp : p) : p ∧ p := by"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! ```lean\nexample : True := trivial\n```"},
        {"role": "user", "content": "  spaces  and\ttabs\n"},
    ],
]

# Logit prompts: two chat-rendered (default and explicit system message) and one raw text.
RAW_PROMPT = "theorem add_zero (n : Nat) : n + 0 = n := by\n  "


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def r5(x):
    return round(float(x), 5)


def row_summary(row):
    row = row.double()
    values, ids = torch.topk(row, TOP_K)
    return {
        "top_ids": ids.tolist(),
        "top_values": [r5(v) for v in values],
        "mean": r5(row.mean()),
        "std": r5(row.std(unbiased=False)),
        "logsumexp": r5(torch.logsumexp(row, 0)),
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen-gguf-fixtures.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = os.path.abspath(sys.argv[1])
    digest = sha256(path)
    if digest != EXPECTED_SHA256:
        sys.exit(f"{path} has sha256 {digest}, expected {EXPECTED_SHA256}")
    directory, name = os.path.split(path)
    os.makedirs(OUT, exist_ok=True)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    import tokenizers

    versions["tokenizers"] = tokenizers.__version__

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    cases = []
    for text in STRINGS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": tok.encode(text, add_special_tokens=True),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    chats = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            chats.append(
                {
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "text": text,
                    "ids": tok.encode(text, add_special_tokens=False),
                }
            )
    tokenizer_fixture = {
        "gguf_sha256": digest,
        "versions": versions,
        "vocab_size": len(tok),
        "special_tokens": {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
        },
        "cases": cases,
        "chats": chats,
    }
    with open(os.path.join(OUT, "smollm2-tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    prompts = [
        ("chat_default_system", tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)),
        ("chat_own_system", tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)),
        ("raw_text", RAW_PROMPT),
    ]
    records = []
    with torch.no_grad():
        for label, text in prompts:
            ids = tok.encode(text, add_special_tokens=False)
            logits = model(torch.tensor([ids])).logits[0]
            positions = [row_summary(row) for row in logits]
            last = logits[-1]
            greedy, margins = [], []
            seq = list(ids)
            for _ in range(GREEDY_TOKENS):
                row = model(torch.tensor([seq])).logits[0, -1].double()
                top2 = torch.topk(row, 2)
                nxt = int(top2.indices[0])
                greedy.append(nxt)
                margins.append(r5(top2.values[0] - top2.values[1]))
                seq.append(nxt)
            records.append(
                {
                    "label": label,
                    "text": text,
                    "ids": ids,
                    "positions": positions,
                    "last_stride": STRIDE,
                    "last_strided": [r5(v) for v in last[::STRIDE]],
                    "greedy": greedy,
                    "greedy_margins": margins,
                    "greedy_text": tok.decode(greedy),
                }
            )
            print(f"{label}: {len(ids)} tokens, min greedy margin {min(margins):.4f}: {tok.decode(greedy)!r}")
    config = model.config
    logits_fixture = {
        "gguf_sha256": digest,
        "versions": versions,
        "dtype": "float32",
        "config": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
            "rope_theta": float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]),
            "rms_norm_eps": float(config.rms_norm_eps),
        },
        "prompts": records,
    }
    with open(os.path.join(OUT, "smollm2-logits.json"), "w", encoding="utf-8") as f:
        json.dump(logits_fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    for fname in ("smollm2-tokenizer.json", "smollm2-logits.json"):
        p = os.path.join(OUT, fname)
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
