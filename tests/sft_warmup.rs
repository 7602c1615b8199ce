//! `init-model` builds a loadable, reproducible model whose tokenizer fits the prelude prompts;
//! `sft` lowers the token NLL of the known proofs and writes an adapter that loads back with
//! the same NLL.

use std::path::{Path, PathBuf};

use lean_grpo::config::Config;
use lean_grpo::data::load_theorems;
use lean_grpo::lean::{extract_proof, Extracted};
use lean_grpo::model::init::{init_model, InitOptions};
use lean_grpo::model::tokenizer::{ChatMessage, Tokenizer};
use lean_grpo::model::{LoraOptions, ModelOptions, Policy};
use lean_grpo::rollout::prompt_tokens;
use lean_grpo::sft::theorem_corpus;
use lean_grpo::sft::{completion_text, dataset_nll, examples, run_sft, SftOptions};

fn prelude() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/prelude.jsonl")
}

/// A deliberately small model: one layer, hidden 32, so a test step takes milliseconds.
fn small(seed: u64) -> InitOptions {
    InitOptions {
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        intermediate_size: 64,
        vocab_size: 600,
        max_position_embeddings: 2048,
        seed,
    }
}

fn build(dir: &Path, seed: u64) {
    let theorems = load_theorems(&prelude(), None).unwrap();
    init_model(&theorem_corpus(&theorems), &small(seed), dir).unwrap();
}

fn config(model: &Path) -> Config {
    Config {
        model: ModelOptions {
            model: model.display().to_string(),
            device: lean_grpo::model::device::DeviceSpec::Cpu,
            ..ModelOptions::default()
        },
        lora: LoraOptions {
            r: 4,
            lora_alpha: 8.0,
            ..LoraOptions::default()
        },
        ..Config::default()
    }
}

#[test]
fn init_model_is_a_loadable_chatml_qwen2_with_prompts_that_fit() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), 0);
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(tmp.path().join(file).is_file(), "{file} missing");
    }
    let config = config(tmp.path());
    let policy = Policy::load(&config.model, &config.lora, 0).unwrap();
    assert_eq!(policy.config().hidden_size, 32);
    assert_eq!(policy.config().max_position_embeddings, 2048);

    let tokenizer = Tokenizer::from_dir(tmp.path()).unwrap();
    let prompt = tokenizer
        .apply_chat_template(&[ChatMessage::user("hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(tokenizer.eos_ids().contains(&im_end));
    assert_eq!(
        tokenizer.pad_id(),
        tokenizer.token_to_id("<|endoftext|>").unwrap()
    );

    // The tokenizer was trained on this text: the ~2,000-character prompt is a few hundred
    // tokens (a 256-byte vocabulary would need over 2,000), and it decodes back exactly.
    let theorems = load_theorems(&prelude(), Some("test")).unwrap();
    let text = lean_grpo::data::user_message(&theorems[0]);
    let ids = tokenizer.encode(&text, false).unwrap();
    assert!(ids.len() < text.len() / 2, "{} tokens", ids.len());
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    let prompt = prompt_tokens(&tokenizer, &theorems[0]).unwrap();
    assert!(prompt.len() < 2048);
}

#[test]
fn init_model_weights_are_a_function_of_the_seed() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    build(a.path(), 5);
    build(b.path(), 5);
    build(c.path(), 6);
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(a.path()), read(b.path()));
    assert_ne!(read(a.path()), read(c.path()));
    let tok = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
    assert_eq!(tok(a.path()), tok(c.path()));
}

#[test]
fn init_model_rejects_sizes_it_cannot_build() {
    let tmp = tempfile::tempdir().unwrap();
    let texts = vec!["theorem x : True := trivial".to_string()];
    let odd_heads = InitOptions {
        num_attention_heads: 3,
        ..small(0)
    };
    let err = init_model(&texts, &odd_heads, tmp.path()).unwrap_err();
    assert!(err.to_string().contains("3 heads"), "{err}");
    let tiny_vocab = InitOptions {
        vocab_size: 100,
        ..small(0)
    };
    let err = init_model(&texts, &tiny_vocab, tmp.path()).unwrap_err();
    assert!(err.to_string().contains("256 bytes"), "{err}");
}

#[test]
fn the_taught_reply_extracts_to_the_proof() {
    for theorem in load_theorems(&prelude(), None).unwrap() {
        let proof = theorem.proof.clone().unwrap();
        let got = extract_proof(&completion_text(&proof), &theorem.statement);
        assert_eq!(
            got,
            Extracted::Proof(proof.trim().to_string()),
            "{}",
            theorem.name
        );
    }
}

#[test]
fn sft_lowers_the_nll_and_writes_an_adapter_that_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    build(&model, 0);
    let config = config(&model);
    let theorems = load_theorems(&prelude(), Some("train")).unwrap();
    let options = SftOptions {
        epochs: 4,
        batch_size: 2,
        learning_rate: 1e-2,
        limit: Some(4),
        seed: 3,
    };
    let out = tmp.path().join("adapter");
    let report = run_sft(&config, &theorems, &options, &out, false).unwrap();
    assert_eq!((report.examples, report.steps), (4, 8));
    assert!(
        report.nll_after < report.nll_before - 1.0,
        "NLL {} -> {}",
        report.nll_before,
        report.nll_after
    );
    assert!(out.join("adapter_config.json").is_file());
    assert!(out.join("adapter_model.safetensors").is_file());

    // A fresh policy (adapters start as the identity) scores like the untrained one; with the
    // written adapter it scores exactly like the trained one.
    let policy = Policy::load(&config.model, &config.lora, 99).unwrap();
    let tokenizer = Tokenizer::from_dir(&model).unwrap();
    let data = examples(&tokenizer, &theorems, Some(4)).unwrap();
    let fresh = dataset_nll(&policy, &data, 2).unwrap();
    assert!(
        (fresh - report.nll_before).abs() < 1e-3,
        "{fresh} vs {}",
        report.nll_before
    );
    policy.read_adapter(&out, &config.lora).unwrap();
    let loaded = dataset_nll(&policy, &data, 2).unwrap();
    assert!(
        (loaded - report.nll_after).abs() < 1e-3,
        "{loaded} vs {}",
        report.nll_after
    );
    // Every taught completion ends with the end-of-turn token.
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(data.iter().all(|e| e.completion.last() == Some(&im_end)));
}

#[test]
fn sft_without_proofs_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    build(&model, 0);
    let tokenizer = Tokenizer::from_dir(&model).unwrap();
    let mut theorems = load_theorems(&prelude(), Some("test")).unwrap();
    for t in &mut theorems {
        t.proof = None;
    }
    let err = examples(&tokenizer, &theorems, None).unwrap_err();
    assert!(err.to_string().contains("no record has a `proof`"), "{err}");
}
