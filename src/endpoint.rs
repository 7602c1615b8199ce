//! Client for OpenAI-compatible chat completion servers (vLLM, SGLang, OpenAI itself).
//!
//! `eval` can sample from a model served elsewhere instead of the in-process decoder: a vLLM
//! server on a GPU box is much faster than candle on CPU. This module only speaks the wire
//! protocol, `POST {base}/v1/chat/completions`; prompts, proof extraction and checking stay with
//! the caller.
//!
//! Servers under load answer 429 or 5xx and connections drop, so every request is retried with
//! exponential backoff and jitter up to a bounded number of attempts. A `Retry-After` given in
//! seconds (what vLLM, SGLang and OpenAI send) replaces the backoff; the rarer HTTP-date form
//! falls back to the backoff.
//! Requests run on a fixed pool of worker threads so a large eval cannot open hundreds of
//! connections at once. Servers cap `n` (samples per prompt), so a request may be split into
//! several smaller ones whose choices are concatenated.

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::model::tokenizer::ChatMessage;

/// How to reach the server and how hard to try.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointOptions {
    /// Base URL, e.g. `http://localhost:8000` or `http://localhost:8000/v1`; a full
    /// `.../chat/completions` URL is used as is.
    pub url: String,
    /// The model name the server knows (vLLM's `--served-model-name`, or an OpenAI model id).
    pub served_model: String,
    /// Name of the environment variable holding the API key, sent as `Authorization: Bearer`.
    /// `None` for servers without authentication. The key itself never goes in a config file.
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Attempts per request, counting the first; transient failures are retried until then.
    pub max_attempts: u32,
    /// Limit for one HTTP exchange (connect, send, whole response), in seconds.
    pub timeout_secs: u64,
    /// Largest `n` the server accepts in one request; larger requests are split.
    pub max_n_per_request: Option<usize>,
    /// First retry delay; doubles on every further attempt.
    pub initial_backoff_ms: u64,
    /// Ceiling of the retry delay (a server's `Retry-After` may ask for longer).
    pub max_backoff_ms: u64,
}

impl EndpointOptions {
    /// Options with the defaults: 8 requests in flight, 6 attempts, 10 minute timeout, backoff
    /// from 1 s up to 60 s, no API key, no limit on `n`.
    pub fn new(url: impl Into<String>, served_model: impl Into<String>) -> Self {
        EndpointOptions {
            url: url.into(),
            served_model: served_model.into(),
            api_key_env: None,
            concurrency: 8,
            max_attempts: 6,
            timeout_secs: 600,
            max_n_per_request: None,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        }
    }
}

/// One prompt and how to sample it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model (or LoRA adapter) the server samples with; `None`: the client's served model.
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Completions wanted for this prompt.
    pub n: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Sent as `max_tokens`, which vLLM, SGLang and OpenAI's chat models accept.
    pub max_tokens: usize,
    /// Stop sequences; omitted from the request when empty.
    pub stop: Vec<String>,
    /// Sampling seed where the server supports it. A split request sends `seed + i` to its
    /// `i`-th part, so the parts do not repeat each other's samples.
    pub seed: Option<u64>,
    /// Ask for the log-prob of every sampled token, with its id (vLLM's
    /// `return_tokens_as_token_ids`), to measure how far the server's model is from the policy.
    pub logprobs: bool,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The assistant message's content (empty if the server sent `null`).
    pub text: String,
    /// `stop`, `length` (hit `max_tokens`: the text is truncated), ...; `None` if not reported.
    pub finish_reason: Option<String>,
    /// What ended a `stop` completion, when the server says (vLLM's `stop_reason`; OpenAI does
    /// not send it). `None` for an EOS token or an unreported reason.
    pub stop_reason: Option<StopReason>,
    /// The sampled tokens with their log-probs, when they were asked for and the server sent
    /// them; `id` is `None` where the server named the token by text only.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// One sampled token as the server scored it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    pub id: Option<u32>,
    pub logprob: f64,
}

/// The stop sequence that ended a completion (vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// One of the request's `stop` strings; servers leave it out of the text.
    Text(String),
    /// A stop token id other than EOS (vLLM's `stop_token_ids`).
    Token(u32),
}

impl Choice {
    /// The server stopped because of `max_tokens`, so the proof is likely cut off.
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

/// Token counts as the server reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    fn add(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            total_tokens: self.total_tokens + other.total_tokens,
        }
    }
}

/// The answer to one [`ChatRequest`]: exactly `n` choices.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCompletion {
    pub choices: Vec<Choice>,
    /// Summed over the parts of a split request; `None` if any part came without usage.
    pub usage: Option<Usage>,
}

/// A blocking client with a bounded worker pool. Cheap to share by reference across threads.
pub struct EndpointClient {
    agent: ureq::Agent,
    url: String,
    served_model: String,
    api_key: Option<String>,
    options: EndpointOptions,
}

impl fmt::Debug for EndpointClient {
    /// Leaves the API key out: debug output ends up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointClient")
            .field("url", &self.url)
            .field("served_model", &self.served_model)
            .field("api_key_env", &self.options.api_key_env)
            .finish_non_exhaustive()
    }
}

impl EndpointClient {
    /// Checks the options and reads the API key from the environment.
    pub fn new(options: EndpointOptions) -> Result<Self> {
        let url = chat_completions_url(&options.url)?;
        if options.served_model.trim().is_empty() {
            bail!("the served model name is empty: give the name the server knows the model by (vLLM's --served-model-name)");
        }
        if options.concurrency == 0 {
            bail!("endpoint concurrency must be at least 1");
        }
        if options.max_attempts == 0 {
            bail!("endpoint max_attempts must be at least 1 (the first try counts)");
        }
        if options.max_n_per_request == Some(0) {
            bail!("max_n_per_request must be at least 1");
        }
        let api_key = match &options.api_key_env {
            None => None,
            Some(var) => Some(read_api_key(var)?),
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(options.timeout_secs.max(1)))
            .max_idle_connections_per_host(options.concurrency)
            .user_agent(concat!("lean-grpo/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(EndpointClient {
            agent,
            url,
            served_model: options.served_model.clone(),
            api_key,
            options,
        })
    }

    /// The full chat completions URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks the server to load the PEFT adapter in `path` (a directory the server can read) under
    /// `name`, which requests then give as their model: vLLM's runtime LoRA loading
    /// (`POST /v1/load_lora_adapter`, on with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and
    /// `--enable-lora`), or SGLang's (`POST /load_lora_adapter`). A server without either
    /// route, or one that refuses the adapter (HTTP 4xx), answers [`AdapterLoad::Unsupported`];
    /// an error is a server that did not answer in `timeout` or failed (5xx) after retries.
    pub fn load_lora_adapter(
        &self,
        name: &str,
        path: &Path,
        timeout: Duration,
    ) -> Result<AdapterLoad> {
        let body = serde_json::json!({"lora_name": name, "lora_path": path}).to_string();
        let mut missing = Vec::new();
        for url in self.adapter_urls("load_lora_adapter") {
            let Err(error) = self.post_with_retries(&url, &body, ADAPTER_ATTEMPTS, Some(timeout))
            else {
                return Ok(AdapterLoad::Loaded);
            };
            let message = format!("{error:#}");
            match HttpError::find(&error).and_then(|e| e.status) {
                // No such route here: the other server kind may have it.
                Some(404 | 405) => missing.push(message),
                // A retried load that had in fact succeeded (vLLM: "has already been loaded").
                Some(400) if message.contains("already") => return Ok(AdapterLoad::Loaded),
                Some(400..=499) => return Ok(AdapterLoad::Unsupported(message)),
                _ => return Err(error),
            }
        }
        Ok(AdapterLoad::Unsupported(missing.join("; ")))
    }

    /// Asks the server to drop the adapter loaded as `name` (vLLM's or SGLang's
    /// `unload_lora_adapter`), freeing its slot.
    pub fn unload_lora_adapter(&self, name: &str, timeout: Duration) -> Result<()> {
        let body = serde_json::json!({"lora_name": name}).to_string();
        let mut errors = Vec::new();
        for url in self.adapter_urls("unload_lora_adapter") {
            match self.post_with_retries(&url, &body, ADAPTER_ATTEMPTS, Some(timeout)) {
                Ok(_) => return Ok(()),
                Err(error) => errors.push(format!("{error:#}")),
            }
        }
        bail!("{}", errors.join("; "))
    }

    /// The URLs of an adapter route: vLLM's under `/v1`, then SGLang's at the root.
    fn adapter_urls(&self, route: &str) -> [String; 2] {
        let v1 = self
            .url
            .strip_suffix("/chat/completions")
            .unwrap_or(&self.url);
        let root = v1.strip_suffix("/v1").unwrap_or(v1);
        [format!("{v1}/{route}"), format!("{root}/{route}")]
    }

    /// Samples every request, at most `concurrency` HTTP requests at a time. Results come back in
    /// input order; one failing prompt does not stop the others.
    pub fn complete(&self, requests: &[ChatRequest]) -> Vec<Result<ChatCompletion>> {
        let parts = split_requests(requests, self.options.max_n_per_request);
        let next = AtomicUsize::new(0);
        let mut part_results: Vec<Option<Result<ChatCompletion>>> = Vec::new();
        part_results.resize_with(parts.len(), || None);
        thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            for _ in 0..self.options.concurrency.min(parts.len()) {
                let tx = tx.clone();
                let (next, parts) = (&next, &parts);
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(part) = parts.get(i) else { break };
                    let result = self.complete_part(&requests[part.request], part);
                    if tx.send((i, result)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (i, result) in rx {
                part_results[i] = Some(result);
            }
        });
        merge_parts(requests.len(), &parts, part_results)
    }

    /// One HTTP request (one part of a possibly split [`ChatRequest`]), with retries.
    fn complete_part(&self, request: &ChatRequest, part: &Part) -> Result<ChatCompletion> {
        let body = WireRequest {
            model: request.model.as_deref().unwrap_or(&self.served_model),
            messages: &request.messages,
            n: part.n,
            temperature: request.temperature,
            top_p: request.top_p,
            max_tokens: request.max_tokens,
            stop: &request.stop,
            seed: request.seed.map(|s| s.wrapping_add(part.index as u64)),
            logprobs: request.logprobs.then_some(true),
            return_tokens_as_token_ids: request.logprobs.then_some(true),
        };
        let body = serde_json::to_string(&body).context("encoding the chat completion request")?;
        let text = self.post_with_retries(&self.url, &body, self.options.max_attempts, None)?;
        parse_response(&text, part.n).with_context(|| {
            format!(
                "POST {}: the server answered 200 but not with a usable chat completion \
                 (is this an OpenAI-compatible endpoint?)",
                self.url
            )
        })
    }

    /// POSTs `body` to `url` until it succeeds, fails for good, or `max` attempts are spent; a
    /// failure is an [`HttpError`] (with the last status), so callers can tell a missing route
    /// from a dead server. `timeout` replaces the client's for this exchange.
    fn post_with_retries(
        &self,
        url: &str,
        body: &str,
        max: u32,
        timeout: Option<Duration>,
    ) -> Result<String> {
        let mut attempt = 1;
        loop {
            let failure = match self.post_once(url, body, timeout) {
                Ok(text) => return Ok(text),
                Err(failure) => failure,
            };
            if !failure.retryable {
                return Err(HttpError {
                    status: failure.status,
                    message: format!("POST {url}: {}", failure.message),
                }
                .into());
            }
            if attempt >= max {
                return Err(HttpError {
                    status: failure.status,
                    message: format!(
                        "POST {url}: gave up after {max} attempt{}; last failure: {}",
                        if max == 1 { "" } else { "s" },
                        failure.message
                    ),
                }
                .into());
            }
            let delay = self.retry_delay(attempt, failure.retry_after);
            tracing::warn!(
                url = %url,
                attempt,
                max_attempts = max,
                delay_ms = delay.as_millis() as u64,
                "{}; retrying",
                failure.message
            );
            thread::sleep(delay);
            attempt += 1;
        }
    }

    fn post_once(
        &self,
        url: &str,
        body: &str,
        timeout: Option<Duration>,
    ) -> std::result::Result<String, Failure> {
        let mut request = self.agent.post(url).set("Content-Type", "application/json");
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(key) = &self.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.send_string(body) {
            Ok(response) => {
                let mut text = String::new();
                response
                    .into_reader()
                    .read_to_string(&mut text)
                    .map_err(|e| Failure {
                        status: None,
                        message: format!("reading the response body: {e}"),
                        retryable: true,
                        retry_after: None,
                    })?;
                Ok(text)
            }
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER_SECS)));
                let reason = response.status_text().to_string();
                let body = response.into_string().unwrap_or_default();
                let mut message = format!("HTTP {status} {reason}: {}", server_message(&body));
                message.push_str(&self.status_hint(status));
                Err(Failure {
                    status: Some(status),
                    message,
                    retryable: status == 408 || status == 429 || status >= 500,
                    retry_after,
                })
            }
            Err(ureq::Error::Transport(transport)) => {
                use ureq::ErrorKind::*;
                let retryable = matches!(transport.kind(), Dns | ConnectionFailed | Io | BadStatus);
                // Transport's Display repeats the URL, which the caller's message already names.
                let mut message = format!("could not reach the server: {}", transport.kind());
                if let Some(detail) = transport.message() {
                    message.push_str(&format!(": {detail}"));
                }
                if let Some(source) = std::error::Error::source(&transport) {
                    message.push_str(&format!(": {source}"));
                }
                Err(Failure {
                    status: None,
                    message,
                    retryable,
                    retry_after: None,
                })
            }
        }
    }

    /// A pointer to the likely fix for statuses that retrying cannot cure.
    fn status_hint(&self, status: u16) -> String {
        match (status, &self.options.api_key_env) {
            (401 | 403, Some(var)) => format!(" (check the API key in ${var})"),
            (401 | 403, None) => {
                " (the server wants an API key: pass --api-key-env NAME_OF_VARIABLE)".to_string()
            }
            (404, _) => format!(
                " (check the endpoint URL and that the server serves a model named {:?})",
                self.served_model
            ),
            _ => String::new(),
        }
    }

    /// Exponential backoff with jitter, or what the server asked for.
    fn retry_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait;
        }
        let exp = self
            .options
            .initial_backoff_ms
            .saturating_mul(1u64 << (attempt - 1).min(30))
            .min(self.options.max_backoff_ms);
        // Jitter in [exp/2, exp] keeps workers that failed together from retrying together.
        let ms = if exp == 0 {
            0
        } else {
            rand::rng().random_range(exp / 2..=exp)
        };
        Duration::from_millis(ms)
    }
}

/// Attempts of an adapter load or unload: it is retried after a timeout or a 5xx, but a server
/// that keeps failing costs one step its sync, not the run.
const ADAPTER_ATTEMPTS: u32 = 2;

/// What a server did with an adapter it was asked to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterLoad {
    Loaded,
    /// The server has no runtime adapter loading or refused this adapter; the reason it gave.
    Unsupported(String),
}

/// A server asking for longer than this is treated as asking for this (10 minutes).
const MAX_RETRY_AFTER_SECS: f64 = 600.0;

/// A request that failed for good: what the server (or the connection) said.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    /// The HTTP status of the last answer; `None` when no answer came (refused, timed out).
    pub status: Option<u16>,
    message: String,
}

impl HttpError {
    /// The `HttpError` somewhere in `error`'s chain of causes.
    pub fn find(error: &anyhow::Error) -> Option<&HttpError> {
        error.chain().find_map(|e| e.downcast_ref::<HttpError>())
    }
}

/// Why one attempt failed, and whether another may succeed.
struct Failure {
    status: Option<u16>,
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

fn read_api_key(var: &str) -> Result<String> {
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_string()),
        Ok(_) => bail!("environment variable {var} (named by --api-key-env) is empty; export the API key in it"),
        Err(std::env::VarError::NotPresent) => bail!(
            "environment variable {var} (named by --api-key-env) is not set; export the API key \
             in it, or drop --api-key-env for a server without authentication"
        ),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("environment variable {var} (named by --api-key-env) is not valid UTF-8")
        }
    }
}

/// `http://host:8000`, `http://host:8000/`, `http://host:8000/v1` and `.../v1/` all mean
/// `http://host:8000/v1/chat/completions`; a URL already ending in `/chat/completions` is kept.
fn chat_completions_url(base: &str) -> Result<String> {
    let trimmed = base.trim().trim_end_matches('/');
    if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
        bail!("endpoint URL {base:?} must start with http:// or https:// (e.g. http://localhost:8000/v1)");
    }
    if trimmed.ends_with("/chat/completions") {
        return Ok(trimmed.to_string());
    }
    let root = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    Ok(format!("{root}/v1/chat/completions"))
}

/// The human part of an error body: OpenAI's `{"error": {"message"}}`, vLLM's older
/// `{"message"}`, or the raw body cut short.
fn server_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("error"))
            .and_then(|m| m.as_str())
            .map(str::to_string)
    });
    from_json.unwrap_or_else(|| {
        let body = body.trim();
        if body.is_empty() {
            "(empty body)".to_string()
        } else {
            abbreviate(body)
        }
    })
}

fn abbreviate(text: &str) -> String {
    const LIMIT: usize = 300;
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    n: usize,
    temperature: f64,
    top_p: f64,
    max_tokens: usize,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    /// vLLM names each token `token_id:N` instead of by its text; other servers ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    return_tokens_as_token_ids: Option<bool>,
}

#[derive(Deserialize)]
struct WireResponse {
    choices: Vec<WireChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: usize,
    message: WireMessage,
    finish_reason: Option<String>,
    /// vLLM: the stop string or token id that ended the completion, `null` for EOS.
    #[serde(default)]
    stop_reason: Option<serde_json::Value>,
    #[serde(default)]
    logprobs: Option<WireLogprobs>,
}

/// OpenAI's `choices[i].logprobs`: `{"content": [{"token", "logprob", ...}]}`.
#[derive(Deserialize)]
struct WireLogprobs {
    content: Option<Vec<WireTokenLogprob>>,
}

#[derive(Deserialize)]
struct WireTokenLogprob {
    token: String,
    logprob: f64,
}

impl WireTokenLogprob {
    fn parse(self) -> TokenLogprob {
        TokenLogprob {
            id: self
                .token
                .strip_prefix("token_id:")
                .and_then(|id| id.parse().ok()),
            logprob: self.logprob,
        }
    }
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
}

fn parse_response(text: &str, n: usize) -> Result<ChatCompletion> {
    let response: WireResponse = serde_json::from_str(text).with_context(|| {
        format!(
            "the body is not a chat completion JSON: {}",
            abbreviate(text)
        )
    })?;
    let mut choices = response.choices;
    if choices.len() != n {
        bail!(
            "asked for n={n} completions, the server returned {}",
            choices.len()
        );
    }
    choices.sort_by_key(|c| c.index);
    Ok(ChatCompletion {
        choices: choices
            .into_iter()
            .map(|c| Choice {
                text: c.message.content.unwrap_or_default(),
                finish_reason: c.finish_reason,
                stop_reason: match c.stop_reason {
                    Some(serde_json::Value::String(s)) => Some(StopReason::Text(s)),
                    Some(serde_json::Value::Number(n)) => n
                        .as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .map(StopReason::Token),
                    _ => None,
                },
                logprobs: c
                    .logprobs
                    .and_then(|l| l.content)
                    .map(|content| content.into_iter().map(WireTokenLogprob::parse).collect()),
            })
            .collect(),
        usage: response.usage,
    })
}

/// One HTTP request's share of a [`ChatRequest`].
struct Part {
    /// Index of the request in the caller's slice.
    request: usize,
    /// Index of this part within its request.
    index: usize,
    n: usize,
}

fn split_requests(requests: &[ChatRequest], max_n: Option<usize>) -> Vec<Part> {
    let mut parts = Vec::new();
    for (request, r) in requests.iter().enumerate() {
        let chunk = max_n.unwrap_or(r.n).max(1);
        let mut remaining = r.n;
        let mut index = 0;
        while remaining > 0 {
            let n = remaining.min(chunk);
            parts.push(Part { request, index, n });
            remaining -= n;
            index += 1;
        }
    }
    parts
}

/// Concatenates the parts of each request in order; the first failing part fails the request.
fn merge_parts(
    requests: usize,
    parts: &[Part],
    results: Vec<Option<Result<ChatCompletion>>>,
) -> Vec<Result<ChatCompletion>> {
    let mut parts_per_request = vec![0usize; requests];
    for part in parts {
        parts_per_request[part.request] += 1;
    }
    // A request for n = 0 sends nothing and so has no usage to report.
    let mut merged: Vec<Result<ChatCompletion>> = parts_per_request
        .iter()
        .map(|&count| {
            Ok(ChatCompletion {
                choices: Vec::new(),
                usage: (count > 0).then(Usage::default),
            })
        })
        .collect();
    for (part, result) in parts.iter().zip(results) {
        let slot = &mut merged[part.request];
        let Ok(acc) = slot else { continue };
        let result = result.unwrap_or_else(|| Err(anyhow!("worker thread ended without a result")));
        match result {
            Ok(completion) => {
                acc.choices.extend(completion.choices);
                acc.usage = acc.usage.zip(completion.usage).map(|(a, b)| a.add(b));
            }
            Err(e) if parts_per_request[part.request] > 1 => {
                *slot = Err(e.context(format!(
                    "part {} of {} of a request split by max_n_per_request",
                    part.index + 1,
                    parts_per_request[part.request]
                )));
            }
            Err(e) => *slot = Err(e),
        }
    }
    merged
}
