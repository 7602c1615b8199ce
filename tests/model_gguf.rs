//! A GGUF file as a complete model: tokenizer and chat template from its metadata, weights
//! dequantised, head tied to the embeddings when the file has no `output.weight`.
//!
//! Without any download: a GGUF holding the tiny test tokenizer's vocabulary in llama.cpp's
//! metadata keys must tokenize and render exactly like the tokenizer.json it came from, and the
//! metadata errors name the key and its value.
//!
//! With the real SmolLM2-135M-Instruct Q4_1 GGUF (`LEAN_GRPO_SMOLLM2_GGUF`, which
//! `scripts/test.sh` sets from `scripts/fetch-model.sh`): token ids, decoded text and rendered
//! chat prompts equal those of transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)`,
//! and logits equal those of `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` in f32 to
//! 1e-3 with the same 32 greedy tokens. The references in tests/data/gguf/ were written by
//! `scripts/gen-gguf-fixtures.py` (transformers 5.25.0, torch 2.15.0, tokenizers 0.23.3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::IndexOp;
use lean_grpo::model::gguf_tokenizer::tokenizer_from_metadata;
use lean_grpo::model::tokenizer::{ChatMessage, Tokenizer};
use lean_grpo::model::{argmax, Arch, GenerateOptions, LoraOptions, ModelOptions, Policy};
use serde::Deserialize;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The SmolLM2 GGUF, or a visible skip when the variable is unset. A set variable that names
/// no file is a broken setup, not a skip.
fn smollm2(test: &str) -> Option<PathBuf> {
    match std::env::var("LEAN_GRPO_SMOLLM2_GGUF") {
        Ok(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "LEAN_GRPO_SMOLLM2_GGUF={} is not a file; run scripts/fetch-model.sh",
                path.display()
            );
            Some(path)
        }
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {test}: LEAN_GRPO_SMOLLM2_GGUF unset (export LEAN_GRPO_SMOLLM2_GGUF=$(scripts/fetch-model.sh), or run scripts/test.sh)"
            );
            None
        }
    }
}

fn fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = Path::new(ROOT).join("tests/data/gguf").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[derive(Deserialize)]
struct TokenizerFixture {
    vocab_size: usize,
    special_tokens: HashMap<String, String>,
    cases: Vec<Case>,
    chats: Vec<Chat>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_with_special: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(gguf) = smollm2("smollm2_tokenizer_matches_transformers") else {
        return;
    };
    let fx: TokenizerFixture = fixture("smollm2-tokenizer.json");
    assert!(fx.cases.len() >= 30 && fx.chats.len() >= 6);
    // `from_dir` is what train/eval call with the policy's model path; it takes the file.
    let tok = Tokenizer::from_dir(&gguf).unwrap();
    assert_eq!(tok.vocab_size(), fx.vocab_size);
    for (key, token) in &fx.special_tokens {
        assert_eq!(tok.special_token(key), Some(token.as_str()), "{key}");
    }
    // <|im_end|> (2) ends a turn and pads; the template is the file's ChatML one.
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.pad_id(), 2);
    assert!(tok.has_chat_template());

    let mut failures = Vec::new();
    for case in &fx.cases {
        let ids = tok.encode(&case.text, false).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?}: ids {ids:?}, transformers {:?}",
                case.text, case.ids
            ));
        }
        let with_special = tok.encode(&case.text, true).unwrap();
        if with_special != case.ids_with_special {
            failures.push(format!(
                "{:?}: ids with special tokens {with_special:?}, transformers {:?}",
                case.text, case.ids_with_special
            ));
        }
        let decoded = tok.decode(&case.ids, false).unwrap();
        if decoded != case.decoded {
            failures.push(format!("{:?}: decoded as {decoded:?}", case.text));
        }
        let skipped = tok.decode(&case.ids, true).unwrap();
        if skipped != case.decoded_skip_special {
            failures.push(format!(
                "{:?}: decoded without special tokens as {skipped:?}, transformers {:?}",
                case.text, case.decoded_skip_special
            ));
        }
    }
    for chat in &fx.chats {
        let text = tok
            .apply_chat_template(&chat.messages, chat.add_generation_prompt)
            .unwrap();
        if text != chat.text {
            failures.push(format!(
                "chat {:?}: rendered {text:?}, transformers {:?}",
                chat.messages, chat.text
            ));
        }
        if tok.encode(&text, false).unwrap() != chat.ids {
            failures.push(format!("chat {:?}: ids differ", chat.messages));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[derive(Deserialize)]
struct LogitsFixture {
    config: FixtureConfig,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct FixtureConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    tie_word_embeddings: bool,
    rope_theta: f64,
    rms_norm_eps: f64,
}

#[derive(Deserialize)]
struct Prompt {
    label: String,
    text: String,
    ids: Vec<u32>,
    positions: Vec<RowSummary>,
    last_stride: usize,
    last_strided: Vec<f64>,
    greedy: Vec<u32>,
}

#[derive(Deserialize)]
struct RowSummary {
    top_ids: Vec<u32>,
    top_values: Vec<f64>,
    mean: f64,
    std: f64,
    logsumexp: f64,
}

const LOGIT_TOLERANCE: f64 = 1e-3;

#[test]
fn smollm2_logits_and_greedy_tokens_match_transformers() {
    let Some(gguf) = smollm2("smollm2_logits_and_greedy_tokens_match_transformers") else {
        return;
    };
    let fx: LogitsFixture = fixture("smollm2-logits.json");
    let model = ModelOptions {
        model: gguf.display().to_string(),
        device: lean_grpo::model::device::DeviceSpec::Cpu,
        dtype: Some(lean_grpo::model::device::Precision::F32),
        ..ModelOptions::default()
    };
    let lora = LoraOptions {
        r: 2,
        ..LoraOptions::default()
    };
    let policy = Policy::load(&model, &lora, 0).unwrap();
    let c = policy.config();
    let want = &fx.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (
            want.vocab_size,
            want.hidden_size,
            want.num_hidden_layers,
            want.num_attention_heads,
            want.num_key_value_heads
        )
    );
    // The file has no output.weight: the head is the embedding matrix, said by the config.
    assert!(want.tie_word_embeddings && c.tie_word_embeddings);
    assert_eq!(c.rope_theta, want.rope_theta);
    assert!((c.rms_norm_eps - want.rms_norm_eps).abs() < 1e-12);

    let tok = Tokenizer::from_dir(policy.model_dir()).unwrap();
    for prompt in &fx.prompts {
        let label = &prompt.label;
        assert_eq!(
            tok.encode(&prompt.text, false).unwrap(),
            prompt.ids,
            "{label}"
        );
        let logits = policy
            .logits(std::slice::from_ref(&prompt.ids), true)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(logits.len(), prompt.positions.len(), "{label}");
        let mut worst = 0f64;
        for (pos, (row, want)) in logits.iter().zip(&prompt.positions).enumerate() {
            assert_eq!(row.len(), fx.config.vocab_size);
            let row: Vec<f64> = row.iter().map(|&x| f64::from(x)).collect();
            let mut check = |what: &str, ours: f64, theirs: f64| {
                let d = (ours - theirs).abs();
                worst = worst.max(d);
                assert!(
                    d < LOGIT_TOLERANCE,
                    "{label} position {pos}: {what} is {ours}, transformers {theirs}"
                );
            };
            for (&id, &value) in want.top_ids.iter().zip(&want.top_values) {
                check(&format!("logit of token {id}"), row[id as usize], value);
            }
            let (mean, std, lse) = summary(&row);
            check("mean", mean, want.mean);
            check("std", std, want.std);
            check("logsumexp", lse, want.logsumexp);
            // The top token is transformers' unless the two are within the tolerance.
            let top = argmax(&row.iter().map(|&x| x as f32).collect::<Vec<_>>());
            if top != want.top_ids[0] {
                assert!(
                    (want.top_values[0] - want.top_values[1]).abs() < LOGIT_TOLERANCE,
                    "{label} position {pos}: top token {top}, transformers {}",
                    want.top_ids[0]
                );
            }
        }
        let last = logits.last().unwrap();
        let strided: Vec<f32> = last.iter().step_by(prompt.last_stride).copied().collect();
        assert_eq!(strided.len(), prompt.last_strided.len());
        for (k, (&ours, &theirs)) in strided.iter().zip(&prompt.last_strided).enumerate() {
            let d = (f64::from(ours) - theirs).abs();
            worst = worst.max(d);
            assert!(
                d < LOGIT_TOLERANCE,
                "{label}: last-position logit of token {} is {ours}, transformers {theirs}",
                k * prompt.last_stride
            );
        }
        eprintln!("{label}: largest logit difference {worst:.2e}");

        let greedy = generate_greedy(&policy, &prompt.ids, prompt.greedy.len());
        assert_eq!(
            greedy,
            prompt.greedy,
            "{label}: greedy continuation {:?}, transformers {:?}",
            tok.decode(&greedy, false).unwrap(),
            tok.decode(&prompt.greedy, false).unwrap()
        );
    }
}

/// Mean, population standard deviation and log-sum-exp of a row, in f64.
fn summary(row: &[f64]) -> (f64, f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    (mean, var.sqrt(), lse)
}

fn generate_greedy(policy: &Policy, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        eos_ids: Vec::new(),
        adapters: true,
    };
    let gens = policy
        .generate(
            &[prompt.to_vec()],
            1,
            &opts,
            &mut |rows: &[Vec<f32>]| Ok(rows.iter().map(|l| argmax(l)).collect()),
            &mut |_: &[u32]| false,
        )
        .unwrap();
    assert_eq!(gens.len(), 1);
    assert_eq!(gens[0].tokens.len(), n);
    gens.into_iter().next().unwrap().tokens
}

// ---- Without the download: the tiny test tokenizer as GGUF metadata. ----

fn tiny_dir() -> PathBuf {
    Path::new(ROOT).join("tests/data/tokenizer/tiny")
}

/// llama.cpp's metadata for the tiny tokenizer (a GPT-2-style byte-level BPE with three ChatML
/// control tokens), as its converter writes it, with `pre` as the pre-tokenizer name.
fn tiny_metadata(pre: &str) -> Vec<(String, Value)> {
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join(name)).unwrap()).unwrap()
    };
    let json = read("tokenizer.json");
    let config = read("tokenizer_config.json");
    let mut tokens: Vec<(u32, String, i32)> = json["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap() as u32, t.clone(), 1))
        .collect();
    for added in json["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap() as u32;
        if tokens.iter().all(|t| t.0 != id) {
            tokens.push((id, added["content"].as_str().unwrap().to_string(), 3));
        }
    }
    tokens.sort();
    assert!(tokens.iter().enumerate().all(|(i, t)| t.0 as usize == i));
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            pair => Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )),
        })
        .collect();
    let id_of = |t: &str| tokens.iter().find(|x| x.1 == t).unwrap().0;
    let eos = config["eos_token"]["content"].as_str().unwrap();
    vec![
        ("general.architecture".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.1.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(id_of(eos))),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(id_of("<|endoftext|>")),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(config["chat_template"].as_str().unwrap().into()),
        ),
    ]
}

fn write_metadata_only_gguf(path: &Path, md: &[(String, Value)]) {
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = Vec::new();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &tensors).unwrap();
}

const TINY_TEXTS: [&str; 8] = [
    "theorem add_comm (a b : ℕ) : a + b = b + a := by",
    "  intro h\n  exact h\n\n",
    "∀ x, ⟨x₁, x₂⟩ → α",
    "```lean\nexample : 1 = 1 := rfl\n```",
    "a   b\t\tc  ",
    "I'm 12345 it's",
    "<|im_start|>user\nhi<|im_end|>",
    "",
];

#[test]
fn gguf_metadata_rebuilds_the_tokenizer_json_it_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    // The tiny tokenizer uses GPT-2's split (ByteLevel with use_regex).
    write_metadata_only_gguf(&path, &tiny_metadata("gpt-2"));
    let ours = Tokenizer::from_gguf(&path).unwrap();
    let reference = Tokenizer::from_dir(&tiny_dir()).unwrap();
    assert_eq!(ours.vocab_size(), reference.vocab_size());
    for text in TINY_TEXTS {
        let ids = reference.encode(text, false).unwrap();
        assert_eq!(ours.encode(text, false).unwrap(), ids, "{text:?}");
        assert_eq!(ours.decode(&ids, false).unwrap(), text, "{text:?}");
        assert_eq!(
            ours.decode(&ids, true).unwrap(),
            reference.decode(&ids, true).unwrap(),
            "{text:?}"
        );
    }
    let messages = [
        ChatMessage::system("You prove theorems."),
        ChatMessage::user("theorem t : 1 + 1 = 2 := by"),
    ];
    assert_eq!(
        ours.apply_chat_template(&messages, true).unwrap(),
        reference.apply_chat_template(&messages, true).unwrap()
    );
    // EOS is tokenizer.ggml.eos_token_id alone (the directory adds generation_config.json's).
    let im_end = reference.token_to_id("<|im_end|>").unwrap();
    assert_eq!(ours.eos_ids(), &[im_end]);
    assert!(reference.eos_ids().contains(&im_end));
    assert_eq!(ours.special_token("eos_token"), Some("<|im_end|>"));
    assert_eq!(ours.pad_id(), ours.token_to_id("<|endoftext|>").unwrap());

    // The pre-tokenizer comes from `tokenizer.ggml.pre`: Qwen2's split puts each digit alone,
    // GPT-2's keeps " 22" together, so the same vocabulary gives other ids. Expected ids: Python
    // tokenizers 0.23.3 on the tiny tokenizer.json with its pre-tokenizer replaced by
    // Sequence([Split(Regex(<Qwen2's regex>), "isolated"), ByteLevel(use_regex=False)]).
    let qwen = tmp.path().join("qwen2.gguf");
    write_metadata_only_gguf(&qwen, &tiny_metadata("qwen2"));
    let qwen = Tokenizer::from_gguf(&qwen).unwrap();
    for (text, gpt2_ids, qwen2_ids) in [
        (
            "x.1 := 22",
            vec![87, 13, 16, 271, 295, 17],
            vec![87, 13, 16, 271, 220, 17, 17],
        ),
        (" 100", vec![268, 15, 15], vec![220, 16, 15, 15]),
    ] {
        assert_eq!(ours.encode(text, false).unwrap(), gpt2_ids, "{text:?}");
        assert_eq!(qwen.encode(text, false).unwrap(), qwen2_ids, "{text:?}");
        assert_eq!(qwen.decode(&qwen2_ids, false).unwrap(), text);
    }

    // A tokenizer.json beside the file wins over the metadata.
    let beside = tempfile::tempdir().unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_dir().join(name), beside.path().join(name)).unwrap();
    }
    let mut md = tiny_metadata("gpt-2");
    md.retain(|(k, _)| k != "tokenizer.chat_template");
    let path = beside.path().join("model.gguf");
    write_metadata_only_gguf(&path, &md);
    let tok = Tokenizer::from_dir(&path).unwrap();
    assert!(
        tok.has_chat_template(),
        "the chat template of tokenizer_config.json"
    );
}

fn metadata_error(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> String {
    let mut md = tiny_metadata("gpt-2");
    edit(&mut md);
    let map: HashMap<String, Value> = md.into_iter().collect();
    match tokenizer_from_metadata(&map) {
        Ok(_) => panic!("the metadata was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

fn set(md: &mut [(String, Value)], key: &str, value: Value) {
    md.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
}

#[test]
fn unsupported_gguf_tokenizers_are_errors_naming_the_key_and_value() {
    let err = metadata_error(|md| set(md, "tokenizer.ggml.model", Value::String("llama".into())));
    assert!(
        err.contains("tokenizer.ggml.model = \"llama\"") && err.contains("tokenizer.json"),
        "{err}"
    );
    let err = metadata_error(|md| {
        set(
            md,
            "tokenizer.ggml.pre",
            Value::String("chatglm-bpe".into()),
        )
    });
    assert!(
        err.contains("tokenizer.ggml.pre = \"chatglm-bpe\"") && err.contains("smollm"),
        "{err}"
    );
    let err = metadata_error(|md| md.retain(|(k, _)| k != "tokenizer.ggml.pre"));
    assert!(err.contains("no tokenizer.ggml.pre"), "{err}");
    let err = metadata_error(|md| set(md, "tokenizer.ggml.eos_token_id", Value::U32(100_000)));
    assert!(
        err.contains("tokenizer.ggml.eos_token_id = 100000") && err.contains("outside"),
        "{err}"
    );
    let err = metadata_error(|md| set(md, "tokenizer.ggml.padding_token_id", Value::I32(-1)));
    assert!(
        err.contains("tokenizer.ggml.padding_token_id = I32(-1) is not a token id"),
        "{err}"
    );
    let err = metadata_error(|md| {
        set(
            md,
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("nospace".into())]),
        )
    });
    assert!(
        err.contains("tokenizer.ggml.merges[0] = \"nospace\""),
        "{err}"
    );

    // Through the file: the error names the file too.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spm.gguf");
    let mut md = tiny_metadata("gpt-2");
    set(
        &mut md,
        "tokenizer.ggml.model",
        Value::String("llama".into()),
    );
    write_metadata_only_gguf(&path, &md);
    let err = format!("{:#}", Tokenizer::from_dir(&path).unwrap_err());
    assert!(
        err.contains("spm.gguf") && err.contains("\"llama\""),
        "{err}"
    );
}
