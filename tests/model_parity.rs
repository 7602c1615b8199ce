//! Our decoder against Hugging Face transformers on tiny random Qwen2/Llama(3-rope)/Qwen3
//! models (`tests/data/make_tiny_models.py` wrote the weights and the reference outputs).

use candle_core::{IndexOp, Tensor};
use lean_grpo::model::{argmax, GenerateOptions, LoraOptions, ModelOptions, Policy};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Greedy {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
}

#[derive(Deserialize)]
struct Batch {
    rows: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
}

#[derive(Deserialize)]
struct BatchGreedy {
    prompts: Vec<Vec<u32>>,
    tokens: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Greedy,
    batch: Batch,
    batch_greedy: BatchGreedy,
}

const MODELS: [&str; 3] = ["tiny-qwen2", "tiny-llama", "tiny-qwen3"];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn load(name: &str) -> (Policy, Reference) {
    let model = ModelOptions {
        model: dir(name).display().to_string(),
        device: lean_grpo::model::device::DeviceSpec::Cpu,
        ..ModelOptions::default()
    };
    let lora = LoraOptions {
        r: 4,
        ..LoraOptions::default()
    };
    let policy = Policy::load(&model, &lora, 7).unwrap();
    let text = std::fs::read_to_string(dir(name).join("reference.json")).unwrap();
    (policy, serde_json::from_str(&text).unwrap())
}

fn max_abs_diff(ours: &Tensor, theirs: &[Vec<f32>]) -> f32 {
    let ours = ours.to_vec2::<f32>().unwrap();
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .flat_map(|(a, b)| {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

fn greedy_opts(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        eos_ids: Vec::new(),
        adapters: true,
    }
}

fn generate_greedy(policy: &Policy, prompts: &[Vec<u32>], group: usize, n: usize) -> Vec<Vec<u32>> {
    let gens = policy
        .generate(
            prompts,
            group,
            &greedy_opts(n),
            &mut |rows: &[Vec<f32>]| Ok(rows.iter().map(|l| argmax(l)).collect()),
            &mut |_: &[u32]| false,
        )
        .unwrap();
    for g in &gens {
        assert!(g.truncated && !g.finished_by_eos);
        assert_eq!(g.tokens.len(), n);
    }
    gens.into_iter().map(|g| g.tokens).collect()
}

#[test]
fn logits_match_transformers() {
    for name in MODELS {
        let (policy, r) = load(name);
        let logits = policy
            .logits(std::slice::from_ref(&r.ids), true)
            .unwrap()
            .i(0)
            .unwrap();
        let d = max_abs_diff(&logits, &r.logits);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        // Adapters with B = 0 leave the model unchanged; switching them off changes nothing.
        let base = policy
            .logits(std::slice::from_ref(&r.ids), false)
            .unwrap()
            .i(0)
            .unwrap();
        assert!(
            max_abs_diff(&base, &r.logits) < 1e-4,
            "{name}: reference policy differs"
        );
    }
}

#[test]
fn padded_batch_logits_match_transformers() {
    for name in MODELS {
        let (policy, r) = load(name);
        let logits = policy.logits(&r.batch.rows, true).unwrap();
        for (i, row) in r.batch.rows.iter().enumerate() {
            let ours = logits.i(i).unwrap().narrow(0, 0, row.len()).unwrap();
            let d = max_abs_diff(&ours, &r.batch.logits[i]);
            assert!(d < 1e-4, "{name} row {i}: logits differ by {d}");
        }
    }
}

#[test]
fn greedy_tokens_match_with_and_without_kv_cache() {
    for name in MODELS {
        let (policy, r) = load(name);
        let cached = generate_greedy(&policy, std::slice::from_ref(&r.greedy.prompt), 1, 20);
        assert_eq!(cached[0], r.greedy.tokens, "{name}: KV-cache greedy");
        // No cache: the full training forward on the growing sequence.
        let mut seq = r.greedy.prompt.clone();
        for _ in 0..20 {
            let logits = policy.logits(std::slice::from_ref(&seq), true).unwrap();
            let last = logits
                .i((0, seq.len() - 1))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            seq.push(argmax(&last));
        }
        assert_eq!(
            seq[r.greedy.prompt.len()..],
            r.greedy.tokens,
            "{name}: no-cache greedy"
        );
    }
}

#[test]
fn left_padded_batch_greedy_matches_transformers_and_groups_share_prefill() {
    for name in MODELS {
        let (policy, r) = load(name);
        let got = generate_greedy(&policy, &r.batch_greedy.prompts, 1, 20);
        assert_eq!(
            got, r.batch_greedy.tokens,
            "{name}: left-padded batch greedy"
        );
        // Three completions per prompt, laid out prompt-major; greedy makes them identical.
        let got = generate_greedy(&policy, &r.batch_greedy.prompts, 3, 20);
        assert_eq!(got.len(), 6);
        for (i, toks) in got.iter().enumerate() {
            assert_eq!(
                toks,
                &r.batch_greedy.tokens[i / 3],
                "{name}: completion {i}"
            );
        }
    }
}

#[test]
fn eos_and_stop_end_completions_and_leave_the_batch() {
    let (policy, r) = load("tiny-qwen2");
    let want = &r.batch_greedy.tokens;
    // EOS = the 5th greedy token of prompt 0: it ends there; prompt 1 runs on (unless it emits
    // that token too), and its tokens are unaffected by prompt 0 leaving the batch.
    let eos = want[0][4];
    let opts = GenerateOptions {
        max_new_tokens: 20,
        eos_ids: vec![eos],
        adapters: true,
    };
    let gens = policy
        .generate(
            &r.batch_greedy.prompts,
            2,
            &opts,
            &mut |rows: &[Vec<f32>]| Ok(rows.iter().map(|l| argmax(l)).collect()),
            &mut |_: &[u32]| false,
        )
        .unwrap();
    for (i, g) in gens.iter().enumerate() {
        let full = &want[i / 2];
        match full.iter().position(|&t| t == eos) {
            Some(k) => {
                assert_eq!(g.tokens, full[..=k], "completion {i}");
                assert!(g.finished_by_eos && !g.truncated);
            }
            None => {
                assert_eq!(&g.tokens, full, "completion {i}");
                assert!(g.truncated && !g.finished_by_eos);
            }
        }
    }
    // A stop callback ends a completion after 3 tokens, neither EOS nor truncated.
    let gens = policy
        .generate(
            &r.batch_greedy.prompts[1..],
            1,
            &greedy_opts(20),
            &mut |rows: &[Vec<f32>]| Ok(rows.iter().map(|l| argmax(l)).collect()),
            &mut |t: &[u32]| t.len() == 3,
        )
        .unwrap();
    assert_eq!(gens[0].tokens, want[1][..3]);
    assert!(!gens[0].finished_by_eos && !gens[0].truncated);
}

#[test]
fn seeded_sampling_is_reproducible_and_groups_differ() {
    use lean_grpo::model::sampler::Sampler;
    use lean_grpo::model::SamplingOptions;
    let (policy, r) = load("tiny-qwen3");
    let opts = SamplingOptions {
        temperature: 1.0,
        top_p: 0.95,
        ..SamplingOptions::default()
    };
    let run = |seed: u64| {
        let mut sampler = Sampler::new(&opts, seed);
        policy
            .generate(
                &r.batch_greedy.prompts,
                4,
                &greedy_opts(12),
                &mut |rows: &[Vec<f32>]| sampler.sample_rows(rows),
                &mut |_: &[u32]| false,
            )
            .unwrap()
    };
    let a = run(5);
    assert_eq!(a, run(5));
    assert_ne!(a, run(6));
    let first: Vec<&Vec<u32>> = a[..4].iter().map(|g| &g.tokens).collect();
    assert!(
        first.iter().any(|t| *t != first[0]),
        "4 samples of one prompt all equal: {first:?}"
    );
    // Temperature 0 through the sampler is greedy: the transformers reference again.
    let greedy = SamplingOptions {
        temperature: 0.0,
        ..SamplingOptions::default()
    };
    let mut sampler = Sampler::new(&greedy, 0);
    let g = policy
        .generate(
            &r.batch_greedy.prompts,
            1,
            &greedy_opts(20),
            &mut |rows: &[Vec<f32>]| sampler.sample_rows(rows),
            &mut |_: &[u32]| false,
        )
        .unwrap();
    let got: Vec<Vec<u32>> = g.into_iter().map(|g| g.tokens).collect();
    assert_eq!(got, r.batch_greedy.tokens);
}

#[test]
fn bad_inputs_are_refused_with_a_reason() {
    let (policy, _) = load("tiny-qwen2");
    let gen = |prompts: &[Vec<u32>], n: usize| {
        policy
            .generate(
                prompts,
                1,
                &greedy_opts(n),
                &mut |rows: &[Vec<f32>]| Ok(rows.iter().map(|l| argmax(l)).collect()),
                &mut |_: &[u32]| false,
            )
            .unwrap_err()
            .to_string()
    };
    let err = gen(&[vec![5, 999]], 3);
    assert!(
        err.contains("token id 999") && err.contains("vocabulary of 320"),
        "{err}"
    );
    let err = gen(&[vec![1; 250]], 10);
    assert!(err.contains("exceeds the model's 256 positions"), "{err}");
    let err = policy
        .logprobs(&[vec![]], &[vec![1]], 1.0, false, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 0 is empty"), "{err}");
    let err = policy
        .logprobs(&[vec![1]], &[vec![1]], 0.0, false, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("temperature"), "{err}");
}

#[test]
fn tiny_models_ship_a_working_tokenizer_and_chat_template() {
    use lean_grpo::model::tokenizer::{ChatMessage, Tokenizer};
    let (_, r) = load("tiny-qwen2");
    let tok = Tokenizer::from_dir(&dir("tiny-qwen2")).unwrap();
    let text = "theorem add_0_2 : MyEq (N.add N.z (N.s N.z)) N.one :=";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids[..r.ids.len()], r.ids);
    assert!(tok.has_chat_template());
    let chat = tok.encode_chat(&[ChatMessage::user("prove it")]).unwrap();
    let shown = tok.decode(&chat, false).unwrap();
    assert!(
        shown.starts_with("<|im_start|>user\nprove it<|im_end|>\n<|im_start|>assistant\n"),
        "{shown}"
    );
    assert!(tok
        .eos_ids()
        .contains(&tok.token_to_id("<|im_end|>").unwrap()));
}
