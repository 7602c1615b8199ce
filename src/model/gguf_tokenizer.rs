//! The tokenizer a GGUF file describes in its metadata (llama.cpp's `tokenizer.*` keys), built
//! as a `tokenizers::Tokenizer`, with the special tokens, stop ids and chat template that
//! [`super::tokenizer::Tokenizer`] needs. Used when `--model` is a `.gguf` file with no
//! `tokenizer.json` beside it.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: GPT-2, Llama 3, Qwen2,
//! SmolLM, DeepSeek-Coder, ...) are built. The file stores the vocabulary, merges and token
//! types but not the pre-tokenizer: it names it (`tokenizer.ggml.pre`), and [`PRE_TOKENIZERS`]
//! maps each supported name to the split regexes of the model's own `tokenizer.json`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GPT-2's split: contractions, letters, digits and other symbols each with one optional
/// leading space, then whitespace runs. Written in GPT-2's `encoder.py` and used by
/// `tokenizers`' `ByteLevel` pre-tokenizer when `use_regex` is on.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Qwen2's split: case-insensitive contractions, one digit per piece, newlines kept apart from
/// other whitespace. The `pre_tokenizer` regex of Qwen2's `tokenizer.json` (transformers ships
/// it as `PRETOKENIZE_REGEX` in `models/qwen2/tokenization_qwen2.py`; llama.cpp's
/// `llama-vocab.cpp` quotes it as the original of its `LLAMA_VOCAB_PRE_TYPE_QWEN2` regex).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split: as Qwen2's but digits in runs of up to three. The `pre_tokenizer` regex
/// of Meta Llama 3's `tokenizer.json` (quoted as the original in llama.cpp's `llama-vocab.cpp`
/// for `LLAMA_VOCAB_PRE_TYPE_LLAMA3`; transformers' `integrations/gguf` has it as
/// `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one family of `tokenizer.ggml.pre` values cuts text before BPE.
pub struct PreTokenizerSpec {
    /// The `tokenizer.ggml.pre` values llama.cpp's converter writes for this family.
    pub names: &'static [&'static str],
    /// Regexes applied in order, each cutting every piece further and keeping its matches as
    /// pieces of their own (`tokenizers`' `Split` with `Isolated`); the pieces are then mapped
    /// to GPT-2's byte alphabet.
    pub splits: &'static [&'static str],
    /// A piece that is itself in the vocabulary becomes that token without merging (the
    /// `ignore_merges` of the model's `tokenizer.json`).
    pub ignore_merges: bool,
}

/// The supported pre-tokenizers, as data. Sources, per entry: the model's own
/// `tokenizer.json`, checked against llama.cpp's `src/llama-vocab.cpp` (`llm_tokenizer_bpe`,
/// which lists the regexes per `LLAMA_VOCAB_PRE_TYPE_*`) and against the table of
/// transformers' `integrations/gguf/gguf_tokenizer_mapping.py`.
pub const PRE_TOKENIZERS: &[PreTokenizerSpec] = &[
    // GPT-2 itself and models that kept its tokenizer: llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2.
    PreTokenizerSpec {
        names: &["gpt-2", "mpt", "olmo"],
        splits: &[GPT2_SPLIT],
        ignore_merges: false,
    },
    // SmolLM/SmolLM2 and StarCoder: `tokenizer.json` has Digits(individual_digits) then
    // ByteLevel(use_regex): every digit alone, then GPT-2's split. llama.cpp groups
    // LLAMA_VOCAB_PRE_TYPE_SMOLLM with STARCODER and REFACT under these two regexes.
    // transformers' GGUF loader applies GPT-2's split without the digit step; the two agree on
    // SmolLM2, whose vocabulary has no token of two digits or of a space and a digit.
    PreTokenizerSpec {
        names: &["smollm", "starcoder", "refact"],
        splits: &[r"\p{N}", GPT2_SPLIT],
        ignore_merges: false,
    },
    // Qwen2, Qwen2.5, Qwen3 and the DeepSeek-R1 Qwen distills: llama.cpp's
    // LLAMA_VOCAB_PRE_TYPE_QWEN2 (which also covers `stablelm2`).
    PreTokenizerSpec {
        names: &["qwen2", "deepseek-r1-qwen", "stablelm2"],
        splits: &[QWEN2_SPLIT],
        ignore_merges: false,
    },
    // Llama 3.x and models that reuse its tokenizer: llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3,
    // for which llama.cpp also turns on ignore_merges, as Llama 3's `tokenizer.json` does.
    // (transformers' GGUF loader leaves ignore_merges off.)
    PreTokenizerSpec {
        names: &[
            "llama-bpe",
            "llama3",
            "llama-v3",
            "falcon3",
            "smaug-bpe",
            "dbrx",
        ],
        splits: &[LLAMA3_SPLIT],
        ignore_merges: true,
    },
    // DeepSeek-Coder: its `tokenizer.json` has four Splits and Digits(individual_digits);
    // llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER lists the same five regexes. (transformers'
    // GGUF loader has no entry for it and applies GPT-2's split.)
    PreTokenizerSpec {
        names: &["deepseek-coder"],
        splits: &[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ],
        ignore_merges: false,
    },
];

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// What a GGUF file's metadata says about its tokenizer.
pub struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` where the file gives their ids.
    pub special_tokens: Vec<(&'static str, String)>,
    /// `tokenizer.ggml.eos_token_id` and, when present, `tokenizer.ggml.eot_token_id` (llama.cpp
    /// ends a generation at either), sorted and distinct.
    pub eos_ids: Vec<u32>,
    /// `tokenizer.ggml.padding_token_id`, when present.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (false when absent).
    pub add_bos_token: bool,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
}

/// Reads the metadata of the GGUF file at `path` (not its tensors) and builds its tokenizer.
pub fn read_gguf_tokenizer(path: &Path) -> Result<GgufTokenizer> {
    let origin = path.display().to_string();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {origin}"))?;
    let content =
        Content::read(&mut file).with_context(|| format!("{origin} is not a GGUF file"))?;
    tokenizer_from_metadata(&content.metadata)
        .with_context(|| format!("building the tokenizer from the metadata of {origin}"))
}

/// Builds the tokenizer from GGUF metadata. Errors name the offending key and its value.
pub fn tokenizer_from_metadata(md: &HashMap<String, Value>) -> Result<GgufTokenizer> {
    const FIX: &str = "to use this model anyway, put its Hugging Face tokenizer.json (and \
                       tokenizer_config.json) in the directory of the .gguf file";
    let model = string(md, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "tokenizer.ggml.model = {model:?} is not supported: only byte-level BPE \
             vocabularies (\"gpt2\") are built from GGUF metadata; {FIX}"
        );
    }
    let pre = string(md, "tokenizer.ggml.pre")?;
    let spec = PRE_TOKENIZERS
        .iter()
        .find(|s| s.names.contains(&pre.as_str()))
        .with_context(|| {
            let known: Vec<&str> = PRE_TOKENIZERS.iter().flat_map(|s| s.names).copied().collect();
            format!(
                "tokenizer.ggml.pre = {pre:?} is not a supported pre-tokenizer (supported: {}); {FIX}",
                known.join(", ")
            )
        })?;

    let tokens: Vec<String> = array(md, "tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.to_string()
                .cloned()
                .map_err(|_| anyhow!("tokenizer.ggml.tokens[{i}] is not a string"))
        })
        .collect::<Result<_>>()?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .to_vec()
            .map_err(|_| anyhow!("tokenizer.ggml.token_type is not an array"))?
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.to_i32()
                    .map_err(|_| anyhow!("tokenizer.ggml.token_type[{i}] is not an i32"))
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        bail!(
            "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
            types.len(),
            tokens.len()
        );
    }
    let merges: Vec<(String, String)> = array(md, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let merge = v
                .to_string()
                .map_err(|_| anyhow!("tokenizer.ggml.merges[{i}] is not a string"))?;
            let (a, b) = merge.split_once(' ').with_context(|| {
                format!(
                    "tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens separated by a space"
                )
            })?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;

    // Byte-level vocabularies spell every token in GPT-2's byte alphabet; a token spelled
    // otherwise (some converters store added tokens as raw text) is respelled from its UTF-8
    // bytes, as transformers' GGUF loader does. Later duplicates win, as in a Python dict.
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(token) {
            token.clone()
        } else {
            token.bytes().map(|b| alphabet[usize::from(b)]).collect()
        };
        vocab.insert(spelled, id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| anyhow!("the vocabulary and merges do not form a BPE model: {e}"))?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in spec.splits {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("internal: pre-tokenizer regex {regex:?} of {pre:?}: {e}"))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, true, false).into());

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let token_of = |key: &str| -> Result<Option<(u32, String)>> {
        let Some(v) = md.get(key) else {
            return Ok(None);
        };
        let id = match v {
            Value::U32(id) => *id,
            Value::I32(id) if *id >= 0 => *id as u32,
            Value::U64(id) if *id <= u64::from(u32::MAX) => *id as u32,
            _ => bail!("{key} = {v:?} is not a token id"),
        };
        let token = tokens.get(id as usize).with_context(|| {
            format!(
                "{key} = {id} is outside the vocabulary of {} tokens",
                tokens.len()
            )
        })?;
        Ok(Some((id, token.clone())))
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let eot = token_of("tokenizer.ggml.eot_token_id")?;
    let unk = token_of("tokenizer.ggml.unknown_token_id")?;
    let pad = token_of("tokenizer.ggml.padding_token_id")?;

    // Control tokens (`<|im_start|>`, `<|endoftext|>`) are matched whole and are special;
    // user-defined ones (`<think>`) are matched whole but are text. A control token spelled
    // outside the byte alphabet is a converter's mislabel and stays an ordinary token (adding
    // it would give it a new id past the vocabulary), as in transformers' GGUF loader.
    let mut special: Vec<AddedToken> = Vec::new();
    let mut plain: Vec<AddedToken> = Vec::new();
    for (token, kind) in tokens.iter().zip(&types) {
        match *kind {
            TOKEN_TYPE_CONTROL if in_alphabet(token) => {
                special.push(AddedToken::from(token.clone(), true).normalized(false));
            }
            TOKEN_TYPE_USER_DEFINED if in_alphabet(token) => {
                plain.push(AddedToken::from(token.clone(), false).normalized(false));
            }
            _ => {}
        }
    }
    for (_, token) in [&bos, &eos, &eot, &unk, &pad].into_iter().flatten() {
        if in_alphabet(token) && !special.iter().any(|t| &t.content == token) {
            special.push(AddedToken::from(token.clone(), true).normalized(false));
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| anyhow!("cannot register the control tokens: {e}"))?;
    tokenizer
        .add_tokens(plain)
        .map_err(|e| anyhow!("cannot register the user-defined tokens: {e}"))?;

    let flag = |key: &str| -> Result<bool> {
        match md.get(key) {
            None => Ok(false),
            Some(v) => v
                .to_bool()
                .map_err(|_| anyhow!("{key} = {v:?} is not a boolean")),
        }
    };
    let add_bos_token = flag("tokenizer.ggml.add_bos_token")?;
    let add_eos_token = flag("tokenizer.ggml.add_eos_token")?;
    if add_bos_token || add_eos_token {
        let mut pieces: Vec<String> = Vec::new();
        let mut specials: Vec<(String, u32)> = Vec::new();
        let mut push = |key: &str, entry: &Option<(u32, String)>, pieces: &mut Vec<String>| {
            let (id, token) = entry.as_ref().with_context(|| {
                format!("{key} is true but the file gives no id for that token")
            })?;
            if token.chars().any(char::is_whitespace) {
                bail!("the special token {token:?} contains whitespace and cannot be added by a template");
            }
            pieces.push(token.clone());
            specials.push((token.clone(), *id));
            Ok(())
        };
        if add_bos_token {
            push("tokenizer.ggml.add_bos_token", &bos, &mut pieces)?;
        }
        pieces.push("$A".into());
        if add_eos_token {
            push("tokenizer.ggml.add_eos_token", &eos, &mut pieces)?;
        }
        specials.dedup();
        let template = TemplateProcessing::builder()
            .try_single(pieces)
            .map_err(|e| anyhow!("internal: BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| anyhow!("internal: BOS/EOS template: {e}"))?;
        tokenizer.with_post_processor(Some(template));
    }

    let mut special_tokens = Vec::new();
    for (name, entry) in [
        ("bos_token", &bos),
        ("eos_token", &eos),
        ("pad_token", &pad),
        ("unk_token", &unk),
    ] {
        if let Some((_, token)) = entry {
            special_tokens.push((name, token.clone()));
        }
    }
    let mut eos_ids: Vec<u32> = [&eos, &eot].into_iter().flatten().map(|e| e.0).collect();
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let chat_template = match md.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(
            v.to_string()
                .map_err(|_| anyhow!("tokenizer.chat_template is not a string"))?
                .clone(),
        ),
    };
    Ok(GgufTokenizer {
        tokenizer,
        special_tokens,
        eos_ids,
        pad_id: pad.map(|p| p.0),
        add_bos_token,
        chat_template,
    })
}

fn string(md: &HashMap<String, Value>, key: &str) -> Result<String> {
    let v = md
        .get(key)
        .with_context(|| format!("the metadata has no {key}"))?;
    v.to_string()
        .cloned()
        .map_err(|_| anyhow!("{key} = {v:?} is not a string"))
}

fn array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Vec<Value>> {
    md.get(key)
        .with_context(|| format!("the metadata has no {key}"))?
        .to_vec()
        .map_err(|_| anyhow!("{key} is not an array"))
}

/// GPT-2's byte alphabet: the character standing for each byte value. Printable Latin-1 bytes
/// stand for themselves; the other 68 map, in byte order, to U+0100 onwards.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a[usize::from(b' ')], 'Ġ');
        assert_eq!(a[usize::from(b'\n')], 'Ċ');
        assert_eq!(a[usize::from(b'A')], 'A');
        assert_eq!(a[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for spec in PRE_TOKENIZERS {
            for regex in spec.splits {
                Split::new(
                    SplitPattern::Regex((*regex).to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{:?}: {regex:?}: {e}", spec.names));
            }
        }
    }
}
