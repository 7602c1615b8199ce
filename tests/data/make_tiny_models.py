#!/usr/bin/env python3
"""Builds the tiny random models under tests/data/ and their reference outputs.

Not run by CI: the outputs are committed. Re-run after changing it with
    pip install torch transformers safetensors tokenizers
    python tests/data/make_tiny_models.py

Each of tests/data/tiny-{qwen2,llama,qwen3}/ gets config.json, model.safetensors (f32),
tokenizer.json, tokenizer_config.json (ChatML template) and reference.json:
  - "ids", "logits": one sequence and Hugging Face transformers' logits at every position;
  - "greedy": {"prompt", "tokens"}: 20 greedy tokens after the prompt (argmax, no EOS stop);
  - "batch": two right-padded rows and the logits of their real positions;
  - "batch_greedy": the two prompts of "batch", left-padded with an attention mask and
    position ids like transformers' generate(), and 20 greedy tokens for each.
Weights are drawn with a larger spread than the usual init (and non-trivial norms and biases)
so that logits are far from uniform and greedy choices are not decided by rounding.
"""
import json
import os
import shutil

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VOCAB = 320
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus():
    with open(os.path.join(ROOT, "data", "prelude.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            yield rec.get("header", "") + "\n" + rec.get("statement", "")


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIAL), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(SPECIAL)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * 1.5)


def greedy(model, prompt, n=20):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(model(ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def greedy_left_padded(model, prompts, n=20, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    outs = [[] for _ in prompts]
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1)
        for o, t in zip(outs, nxt.tolist()):
            o.append(t)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    return outs


def rounded(t):
    return [[float(f"{x:.7g}") for x in row] for row in t.tolist()]


def make(name, cls, cfg, tok, seed):
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize(model, gen)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": cfg.max_position_embeddings,
        }, f, indent=2)

    text = "theorem add_0_2 : MyEq (N.add N.z (N.s N.z)) N.one :="
    ids = tok.encode(text).ids[:24]
    short = tok.encode("inductive N where").ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        g = greedy(model, ids[:10])
        rows = [ids, short]
        width = max(len(r) for r in rows)
        batch_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        batch_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        blog = model(input_ids=batch_ids, attention_mask=batch_mask).logits
        batch_logits = [rounded(blog[i, : len(r)]) for i, r in enumerate(rows)]
        bg = greedy_left_padded(model, [ids[:10], short])
    ref = {
        "ids": ids,
        "logits": rounded(logits),
        "greedy": {"prompt": ids[:10], "tokens": g},
        "batch": {"rows": rows, "logits": batch_logits},
        "batch_greedy": {"prompts": [ids[:10], short], "tokens": bg},
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(name, sum(p.numel() for p in model.parameters()), "parameters")


def main():
    tok = build_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=eos, torch_dtype="float32")
    make("tiny-qwen2", Qwen2ForCausalLM,
         Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True,
                     use_sliding_window=False), tok, 1)
    make("tiny-llama", LlamaForCausalLM,
         LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}), tok, 2)
    make("tiny-qwen3", Qwen3ForCausalLM,
         Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False,
                     attention_bias=False), tok, 3)


if __name__ == "__main__":
    main()
