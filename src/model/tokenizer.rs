//! The model's tokenizer and chat template, loaded from a Hugging Face model directory or, for
//! a `.gguf` model with no `tokenizer.json` beside it, from the file's metadata
//! ([`super::gguf_tokenizer`]).
//!
//! Reads the same three files `transformers` reads: `tokenizer.json` (the vocabulary, merges and
//! pre-tokenizer, through the `tokenizers` crate), `tokenizer_config.json` (special tokens, added
//! tokens, chat template) and `generation_config.json` (the ids that end a generation). The chat
//! template is rendered with minijinja under the settings `transformers` uses (`trim_blocks`,
//! `lstrip_blocks`, Python string methods, `raise_exception`, a Python-style `tojson`), so a
//! prompt renders to the same text, and therefore the same ids, as
//! `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::gguf_tokenizer::read_gguf_tokenizer;

/// The special tokens of `tokenizer_config.json` that templates see as variables.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// Name under which the chat template is registered in the jinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Used when the model ships no chat template (base models): the BOS token when the tokenizer
/// adds one (`add_bos_token: true`), then the message contents joined by a blank line, with no
/// role markers and nothing added for `add_generation_prompt`. A base model continues the raw
/// text, which is what a Lean proof prompt ending in `:= by` wants.
pub const FALLBACK_CHAT_TEMPLATE: &str = "{%- if add_bos_token and bos_token %}{{ bos_token }}{% endif -%}\n\
{%- for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ message.content }}{% endfor -%}";

/// One turn of a conversation, as `transformers` chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A tokenizer with its chat template, special tokens and stop ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    env: Environment<'static>,
    has_chat_template: bool,
    add_bos_token: bool,
    special_tokens: HashMap<&'static str, String>,
    eos_ids: Vec<u32>,
    pad_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.has_chat_template)
            .field("special_tokens", &self.special_tokens)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (required), and, when present, `tokenizer_config.json`,
    /// `chat_template.jinja` / `chat_template.json` (newer `transformers` store the template
    /// there; they win over the config's), `generation_config.json` and `config.json`.
    ///
    /// EOS ids are the union of `generation_config.json`'s `eos_token_id` (int or list; from
    /// `config.json` when there is no generation config) and the id of `tokenizer_config.json`'s
    /// `eos_token`: instruct models end a turn with one and a document with the other. The
    /// padding id is `pad_token`, else `generation_config.pad_token_id`, else the first EOS id
    /// (what TRL does); it only fills masked positions.
    ///
    /// `dir` may also be a `.gguf` file: see [`Self::from_gguf`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if is_gguf_file(dir) {
            return Self::from_gguf(dir);
        }
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            bail!(
                "{} not found: the model directory must hold a Hugging Face `tokenizer.json` \
                 (older models with only vocab.json/merges.txt or tokenizer.model must be \
                 converted with `transformers`' AutoTokenizer.save_pretrained first)",
                tokenizer_path.display()
            );
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", tokenizer_path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?.unwrap_or(Json::Null);
        register_added_tokens(&mut inner, &config, &config_path)?;

        let mut special_tokens = HashMap::new();
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(token) = token_content(config.get(key)) {
                special_tokens.insert(key, token);
            }
        }
        let add_bos_token = config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);

        let template = read_chat_template(dir, &config, &config_path)?;
        let has_chat_template = template.is_some();
        let source = template.unwrap_or_else(|| FALLBACK_CHAT_TEMPLATE.to_string());
        let env = chat_environment(source).with_context(|| {
            format!(
                "the chat template of {} does not parse; fix it or remove it to use the plain \
                 fallback template",
                dir.display()
            )
        })?;

        let gen_path = dir.join("generation_config.json");
        let generation = match read_json_if_exists(&gen_path)? {
            Some(json) => Some((json, gen_path)),
            None => {
                let model_config = dir.join("config.json");
                read_json_if_exists(&model_config)?.map(|json| (json, model_config))
            }
        };
        let mut eos_ids = Vec::new();
        let mut generation_pad = None;
        if let Some((json, path)) = &generation {
            eos_ids = id_list(json.get("eos_token_id"), path, "eos_token_id")?;
            generation_pad = id_list(json.get("pad_token_id"), path, "pad_token_id")?
                .first()
                .copied();
        }
        if let Some(eos) = special_tokens.get("eos_token") {
            eos_ids.push(token_id(&inner, eos, &config_path, "eos_token")?);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();

        let pad_id = match special_tokens.get("pad_token") {
            Some(pad) => token_id(&inner, pad, &config_path, "pad_token")?,
            None => match generation_pad.or_else(|| eos_ids.first().copied()) {
                Some(id) => id,
                None => bail!(
                    "{}: the model declares no EOS token, so generation could never stop; add \
                     `\"eos_token\": \"...\"` to tokenizer_config.json or `eos_token_id` to \
                     generation_config.json",
                    dir.display()
                ),
            },
        };

        Ok(Self {
            inner,
            env,
            has_chat_template,
            add_bos_token,
            special_tokens,
            eos_ids,
            pad_id,
        })
    }

    /// The tokenizer of a `.gguf` model file: from the `tokenizer.json` (and friends, see
    /// [`Self::from_dir`]) in the file's directory when there is one, else from the file's
    /// metadata (see [`super::gguf_tokenizer`]): vocabulary, merges, token types, the
    /// pre-tokenizer named by `tokenizer.ggml.pre`, special tokens and
    /// `tokenizer.chat_template`, as transformers' `AutoTokenizer.from_pretrained(dir,
    /// gguf_file=...)` reads them. EOS ids are `tokenizer.ggml.eos_token_id` and
    /// `eot_token_id`; padding is `padding_token_id`, else the first EOS id.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        if dir.join("tokenizer.json").is_file() {
            return Self::from_dir(dir);
        }
        let origin = path.display();
        let gguf = read_gguf_tokenizer(path)?;
        let has_chat_template = gguf.chat_template.is_some();
        let source = gguf
            .chat_template
            .unwrap_or_else(|| FALLBACK_CHAT_TEMPLATE.to_string());
        let env = chat_environment(source).with_context(|| {
            format!(
                "tokenizer.chat_template of {origin} does not parse; put a tokenizer_config.json \
                 with a working chat_template and the tokenizer.json beside the file"
            )
        })?;
        let pad_id = match gguf.pad_id.or_else(|| gguf.eos_ids.first().copied()) {
            Some(id) => id,
            None => bail!(
                "{origin}: the metadata has no tokenizer.ggml.eos_token_id, so generation could \
                 never stop; put the model's tokenizer.json and generation_config.json beside \
                 the file"
            ),
        };
        Ok(Self {
            inner: gguf.tokenizer,
            env,
            has_chat_template,
            add_bos_token: gguf.add_bos_token,
            special_tokens: gguf.special_tokens.into_iter().collect(),
            eos_ids: gguf.eos_ids,
            pad_id,
        })
    }

    /// Whether the model ships its own chat template; when false, [`FALLBACK_CHAT_TEMPLATE`]
    /// renders prompts.
    pub fn has_chat_template(&self) -> bool {
        self.has_chat_template
    }

    /// Renders `messages` with the chat template. `add_generation_prompt` appends the header of
    /// an assistant turn so the model answers rather than continues the user's text.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`Self::apply_chat_template`] with extra template variables, like `transformers`'
    /// `**kwargs` (Qwen3's `enable_thinking: false`).
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String> {
        let mut ctx: HashMap<String, Value> = HashMap::new();
        // Special tokens first, then the fixed variables, then the caller's: later wins, as in
        // `transformers` where template kwargs override the special-token map.
        for key in SPECIAL_TOKEN_KEYS {
            let value = self.special_tokens.get(key).map(Value::from);
            ctx.insert(key.to_string(), value.unwrap_or(Value::from(())));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("add_bos_token".into(), self.add_bos_token.into());
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        for (key, value) in extra {
            ctx.insert(key.clone(), Value::from_serialize(value));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .context("internal: chat template not registered")?;
        template.render(ctx).map_err(|e| {
            anyhow!(
                "rendering the chat template failed: {e:#}{}",
                e.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            )
        })
    }

    /// Renders `messages` with the generation prompt and encodes the text without adding special
    /// tokens (the template already wrote them), as TRL does for prompts.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, true)?;
        self.encode(&text, false)
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's post-processor (e.g. a BOS
    /// for Llama); leave it off for text rendered by a chat template.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing {} bytes of text failed: {e}", text.len()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special_tokens` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding {} token ids failed: {e}", ids.len()))
    }

    /// Ids that end a generation, sorted and distinct (possibly empty for a bare tokenizer).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The EOS that ends a reply whose text came without token ids (an OpenAI-compatible
    /// server reports only that it stopped): `tokenizer_config.json`'s `eos_token`, which chat
    /// models set to their end-of-turn token, else the smallest EOS id; `None` without any.
    pub fn reply_eos_id(&self) -> Option<u32> {
        self.special_tokens
            .get("eos_token")
            .and_then(|token| self.token_to_id(token))
            .or_else(|| self.eos_ids.first().copied())
    }

    /// Id written at padded positions (see [`Self::from_dir`] for where it comes from).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size including added tokens (the model's embedding may be larger).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The special token configured under `key` (`bos_token`, `eos_token`, `pad_token`, ...).
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens.get(key).map(String::as_str)
    }

    /// The underlying `tokenizers` tokenizer, for offsets or batch encoding.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A path naming a `.gguf` file (by extension, case-insensitive) that exists.
fn is_gguf_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(json))
}

/// A special token in `tokenizer_config.json` is a string, `null`, or an `AddedToken` object
/// `{"content": "...", ...}`.
fn token_content(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn token_id(inner: &tokenizers::Tokenizer, token: &str, path: &Path, field: &str) -> Result<u32> {
    inner.token_to_id(token).with_context(|| {
        format!(
            "{}: {field} {token:?} is not in the vocabulary of tokenizer.json",
            path.display()
        )
    })
}

/// `eos_token_id` / `pad_token_id` are an int, a list of ints, or null.
fn id_list(value: Option<&Json>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let parse = |v: &Json| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| {
                format!(
                    "{}: {field} must be a token id or a list of token ids, found {v}",
                    path.display()
                )
            })
    };
    match value {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(parse).collect(),
        Some(v) => Ok(vec![parse(v)?]),
    }
}

/// Makes sure every token of `added_tokens_decoder` exists with the declared id. They normally
/// are in tokenizer.json already; a token only the config declares is added, and an id clash is
/// an error rather than a silent shift of every later id.
fn register_added_tokens(
    inner: &mut tokenizers::Tokenizer,
    config: &Json,
    path: &Path,
) -> Result<()> {
    let Some(decoder) = config.get("added_tokens_decoder").and_then(Json::as_object) else {
        return Ok(());
    };
    let mut declared: Vec<(u32, String, bool)> = Vec::new();
    for (id, token) in decoder {
        let id: u32 = id.parse().with_context(|| {
            format!(
                "{}: added_tokens_decoder key {id:?} is not a token id",
                path.display()
            )
        })?;
        let content = token_content(Some(token)).with_context(|| {
            format!(
                "{}: added_tokens_decoder[{id}] has no \"content\"",
                path.display()
            )
        })?;
        let special = token
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        declared.push((id, content, special));
    }
    declared.sort();
    for (id, content, special) in declared {
        match inner.token_to_id(&content) {
            Some(existing) if existing == id => {}
            Some(existing) => bail!(
                "{}: added token {content:?} is declared with id {id} but tokenizer.json gives \
                 it id {existing}; the two files come from different tokenizers",
                path.display()
            ),
            None => {
                let token = tokenizers::AddedToken::from(content.clone(), special);
                let added = if special {
                    inner.add_special_tokens([token])
                } else {
                    inner.add_tokens([token])
                };
                added.map_err(|e| {
                    anyhow!("{}: cannot add token {content:?}: {e}", path.display())
                })?;
                let got = inner.token_to_id(&content);
                if got != Some(id) {
                    bail!(
                        "{}: added token {content:?} is declared with id {id} but would get id \
                         {got:?}; ids in added_tokens_decoder must follow tokenizer.json's \
                         vocabulary without gaps",
                        path.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// The chat template source: `chat_template.jinja`, else `chat_template.json`, else the
/// config's `chat_template` (a string, or a list of `{name, template}` where `default` is used).
fn read_chat_template(dir: &Path, config: &Json, config_path: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = fs::read_to_string(&jinja)
            .with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok(Some(text));
    }
    let json_path = dir.join("chat_template.json");
    if let Some(json) = read_json_if_exists(&json_path)? {
        return template_field(json.get("chat_template"), &json_path);
    }
    template_field(config.get("chat_template"), config_path)
}

fn template_field(value: Option<&Json>, path: &Path) -> Result<Option<String>> {
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!(
                        "{}: each chat_template entry must be {{\"name\": ..., \"template\": ...}}",
                        path.display()
                    ),
                }
            }
            bail!(
                "{}: chat_template lists named templates {names:?} but none is called \
                 \"default\"",
                path.display()
            )
        }
        Some(other) => bail!(
            "{}: chat_template must be a string or a list of named templates, found {}",
            path.display(),
            json_kind(other)
        ),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// A jinja environment configured like `transformers`' `ImmutableSandboxedEnvironment`.
fn chat_environment(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_filter("tojson", python_tojson);
    env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(&source))?;
    Ok(env)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (a `transformers` extension marking the
/// assistant's tokens for training masks; it renders its body unchanged) to `{% if true %}` /
/// `{% endif %}`, keeping the whitespace-control dashes, since minijinja does not know the tag.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        let inner = &tag[2..];
        let body = inner.strip_prefix(['-', '+']).unwrap_or(inner);
        let control = &inner[..inner.len() - body.len()];
        let trimmed = body.trim_start();
        let word_len = trimmed
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(trimmed.len());
        let replacement = match &trimmed[..word_len] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => {
                out.push_str("{%");
                out.push_str(control);
                out.push(' ');
                out.push_str(word);
                rest = &trimmed[word_len..];
            }
            None => {
                out.push_str("{%");
                rest = inner;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `transformers`' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, i.e. `", "` and
/// `": "` separators and no HTML escaping (minijinja's own filter escapes `<` and `'`).
fn python_tojson(value: Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            serde::Serialize::serialize(
                &json,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            &json,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter),
        ),
    };
    written
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
}

/// serde_json formatter with Python's default `json.dumps` separators.
struct PythonJsonFormatter;

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn python_item_separator<W: ?Sized + std::io::Write>(
    writer: &mut W,
    first: bool,
) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}
