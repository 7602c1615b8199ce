"""Regenerates tests/data/tokenizer/tiny and prints the expected strings/ids hardcoded in
tests/model_tools_tokenizer.rs.

    pip install tokenizers jinja2
    python3 tests/data/tokenizer/make_fixtures.py            # tiny fixture + its expected ids
    python3 tests/data/tokenizer/make_fixtures.py QWEN_DIR   # ids for the real Qwen tokenizer

The chat template is rendered the way `transformers.apply_chat_template` does it: jinja2's
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loopcontrols), a
`raise_exception` global and a `json.dumps`-based `tojson` filter.
"""
import json
import os
import sys

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def hf_env():
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


TINY_TEMPLATE = """{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message.role) }}
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content.strip() }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def make_tiny(out):
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    text = ["theorem add_comm (a b : Nat) : a + b = b + a := by", "  omega", "  simp [Nat.add_comm]",
            "You are a Lean 4 expert. Prove the theorem.", "lemma foo : 1 + 1 = 2 := by norm_num"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(text, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(f"{out}/tokenizer.json")
    special = [(323, "<|endoftext|>"), (324, "<|im_start|>"), (325, "<|im_end|>")]
    assert all(tok.token_to_id(c) == i for i, c in special)
    config = {
        "add_bos_token": False,
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, c in special},
        "bos_token": None,
        "chat_template": TINY_TEMPLATE,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "Qwen2Tokenizer",
    }
    json.dump(config, open(f"{out}/tokenizer_config.json", "w"), indent=2)
    json.dump({"bos_token_id": 323, "eos_token_id": [325, 323], "do_sample": True, "temperature": 0.7},
              open(f"{out}/generation_config.json", "w"), indent=2)
    msgs = [{"role": "system", "content": " You are a Lean 4 expert. "},
            {"role": "user", "content": "theorem add_comm (a b : Nat) : a + b = b + a := by\n"}]
    report(out, {"lean_prompt": (msgs, True, {})})


def report(d, cases):
    cfg = json.load(open(f"{d}/tokenizer_config.json"))
    template = hf_env().from_string(cfg["chat_template"])
    tok = Tokenizer.from_file(f"{d}/tokenizer.json")
    for name, (msgs, add_generation_prompt, extra) in cases.items():
        text = template.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"),
                               pad_token=cfg.get("pad_token"), **extra)
        print(name, json.dumps(text, ensure_ascii=False))
        print(name, tok.encode(text, add_special_tokens=False).ids)


QWEN_CASES = {
    "system_user": ([{"role": "system", "content": "You are a Lean 4 expert."},
                     {"role": "user", "content": "Prove: theorem t (a b : ℕ) : a + b = b + a := by"}], True, {}),
    "no_think": ([{"role": "user", "content": "Prove 1 + 1 = 2."}], True, {"enable_thinking": False}),
    "history": ([{"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
                 {"role": "user", "content": "Prove it."}], False, {}),
}

if __name__ == "__main__":
    if len(sys.argv) > 1:
        report(sys.argv[1], QWEN_CASES)
        tok = Tokenizer.from_file(f"{sys.argv[1]}/tokenizer.json")
        print("decode_skip", json.dumps(tok.decode([151644, 872, 198, 9707, 151645], skip_special_tokens=True)))
        print("vocab", tok.get_vocab_size(True))
    else:
        make_tiny(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny"))
