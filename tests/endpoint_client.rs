//! The OpenAI-compatible client against a local server: what it sends, how it retries, how it
//! fails, how it bounds concurrency and splits large `n`.

mod endpoint_support;

use endpoint_support::{completion, serve, Reply};
use lean_grpo::endpoint::{ChatRequest, EndpointClient, EndpointOptions, StopReason};
use lean_grpo::model::tokenizer::ChatMessage;
use serde_json::json;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Options for tests: quick backoff so retries cost milliseconds.
fn options(url: &str) -> EndpointOptions {
    EndpointOptions {
        concurrency: 2,
        max_attempts: 3,
        timeout_secs: 20,
        initial_backoff_ms: 5,
        max_backoff_ms: 20,
        ..EndpointOptions::new(url, "served")
    }
}

fn request(prompt: &str, n: usize) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::new("system", "You write Lean 4 proofs."),
            ChatMessage::new("user", prompt),
        ],
        n,
        temperature: 0.7,
        top_p: 0.95,
        max_tokens: 256,
        stop: vec!["```\n".to_string()],
        seed: Some(42),
        model: None,
        logprobs: false,
    }
}

/// Texts `"{prompt} #i"` for the prompt in the request body, so answers show which prompt they
/// belong to.
fn echo(body: &serde_json::Value, finish_reason: &str) -> Reply {
    let prompt = body["messages"][1]["content"].as_str().unwrap_or("?");
    let n = body["n"].as_u64().unwrap_or(1) as usize;
    let texts: Vec<String> = (0..n).map(|i| format!("{prompt} #{i}")).collect();
    Reply::json(200, completion(&texts, finish_reason))
}

/// Samples one prompt `n` times from `url` with [`options`], expecting failure: the error as the
/// user sees it.
fn error_from(url: &str, n: usize) -> String {
    let client = EndpointClient::new(options(url)).unwrap();
    let results = client.complete(&[request("p", n)]);
    format!("{:#}", results[0].as_ref().unwrap_err())
}

#[test]
fn answers_in_input_order_with_finish_reason_and_usage() {
    let server = serve(|_, body| echo(body, if body["n"] == 3 { "length" } else { "stop" }));
    // Base URL with a trailing /v1/ must not double the /v1.
    let client = EndpointClient::new(options(&format!("{}/v1/", server.base))).unwrap();
    assert_eq!(client.url(), format!("{}/v1/chat/completions", server.base));

    let results = client.complete(&[request("p0", 2), request("p1", 3), request("p2", 1)]);
    assert_eq!(results.len(), 3);
    let c0 = results[0].as_ref().unwrap();
    let texts: Vec<&str> = c0.choices.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["p0 #0", "p0 #1"]);
    assert!(!c0.choices[0].truncated());
    let c1 = results[1].as_ref().unwrap();
    assert_eq!(c1.choices.len(), 3);
    assert_eq!(c1.choices[2].text, "p1 #2");
    assert_eq!(c1.choices[0].finish_reason.as_deref(), Some("length"));
    assert!(c1.choices[0].truncated());
    let usage = c1.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (11, 15, 26)
    );
    assert_eq!(results[2].as_ref().unwrap().choices[0].text, "p2 #0");

    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    let first = seen
        .iter()
        .find(|s| s.body["messages"][1]["content"] == "p0")
        .unwrap();
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/v1/chat/completions");
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        first.authorization, None,
        "no --api-key-env, no Authorization header"
    );
    assert_eq!(
        first.body,
        json!({
            "model": "served",
            "messages": [
                {"role": "system", "content": "You write Lean 4 proofs."},
                {"role": "user", "content": "p0"},
            ],
            "n": 2,
            "temperature": 0.7,
            "top_p": 0.95,
            "max_tokens": 256,
            "stop": ["```\n"],
            "seed": 42,
        })
    );
}

#[test]
fn base_url_forms() {
    for (given, path) in [
        (
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/v1/chat/completions",
        ),
        (
            "http://127.0.0.1:9/",
            "http://127.0.0.1:9/v1/chat/completions",
        ),
        (
            "http://127.0.0.1:9/v1",
            "http://127.0.0.1:9/v1/chat/completions",
        ),
        (
            "https://host/openai/v1/chat/completions",
            "https://host/openai/v1/chat/completions",
        ),
    ] {
        assert_eq!(
            EndpointClient::new(options(given)).unwrap().url(),
            path,
            "{given}"
        );
    }
    let err = EndpointClient::new(options("localhost:8000"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("must start with http:// or https://"), "{err}");
}

#[test]
fn retries_429_honouring_retry_after_then_succeeds() {
    let server = serve(|call, body| {
        if call == 0 {
            Reply {
                status: 429,
                headers: vec![("Retry-After", "1".to_string())],
                body: json!({"error": {"message": "rate limited", "type": "rate_limit"}})
                    .to_string(),
                delay: Duration::ZERO,
            }
        } else {
            echo(body, "stop")
        }
    });
    // Backoff alone would wait milliseconds; the server asked for a whole second.
    let client = EndpointClient::new(options(&server.base)).unwrap();
    let start = Instant::now();
    let results = client.complete(&[request("p", 2)]);
    let elapsed = start.elapsed();
    assert_eq!(results[0].as_ref().unwrap().choices.len(), 2);
    assert!(
        elapsed >= Duration::from_millis(950),
        "Retry-After ignored: {elapsed:?}"
    );

    let seen = server.seen();
    assert_eq!(seen.len(), 2, "one 429, one retry");
    assert_eq!(
        seen[0].body, seen[1].body,
        "the retry resends the same request"
    );
    assert_eq!(seen[1].body["model"], "served");
    assert_eq!(seen[1].body["n"], 2);
    assert_eq!(seen[1].body["messages"][1]["content"], "p");
}

#[test]
fn gives_up_after_max_attempts_of_500_naming_url_status_and_message() {
    let server = serve(|_, _| {
        Reply::json(
            500,
            json!({"object": "error", "message": "CUDA out of memory", "code": 500}),
        )
    });
    let err = error_from(&server.base, 1);
    assert!(
        err.contains(&format!("POST {}/v1/chat/completions", server.base)),
        "{err}"
    );
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(err.contains("HTTP 500"), "{err}");
    assert!(err.contains("CUDA out of memory"), "{err}");
    assert_eq!(server.seen().len(), 3);
}

#[test]
fn client_errors_are_not_retried_and_say_what_to_fix() {
    let server = serve(|_, _| {
        Reply::json(
            404,
            json!({"error": {"message": "The model `served` does not exist."}}),
        )
    });
    let err = error_from(&server.base, 1);
    assert!(err.contains("HTTP 404"), "{err}");
    assert!(err.contains("The model `served` does not exist."), "{err}");
    assert!(err.contains("serves a model named \"served\""), "{err}");
    assert_eq!(server.seen().len(), 1, "a 404 is not retried");
}

#[test]
fn non_json_body_is_an_error_not_a_retry() {
    let server = serve(|_, _| Reply {
        status: 200,
        headers: vec![("Content-Type", "text/html".to_string())],
        body: "<html><body>Welcome to nginx!</body></html>".to_string(),
        delay: Duration::ZERO,
    });
    let err = error_from(&server.base, 1);
    assert!(err.contains("not with a usable chat completion"), "{err}");
    assert!(err.contains("Welcome to nginx!"), "{err}");
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn too_few_choices_is_an_error() {
    let server = serve(|_, _| Reply::json(200, completion(&["only one".to_string()], "stop")));
    let err = error_from(&server.base, 4);
    assert!(
        err.contains("asked for n=4 completions, the server returned 1"),
        "{err}"
    );
}

#[test]
fn connection_refused_is_retried_then_reported() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = error_from(&format!("http://127.0.0.1:{port}"), 1);
    assert!(
        err.contains(&format!("POST http://127.0.0.1:{port}/v1/chat/completions")),
        "{err}"
    );
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(err.contains("could not reach the server"), "{err}");
}

#[test]
fn concurrency_bound_is_respected() {
    let server = serve(|_, body| Reply {
        delay: Duration::from_millis(250),
        ..echo(body, "stop")
    });
    // 8 workers (eval's default) on 8 keep-alive connections: more than a small server thread
    // pool holds, which once starved connections in the test server.
    let client = EndpointClient::new(EndpointOptions {
        concurrency: 8,
        ..options(&server.base)
    })
    .unwrap();
    let requests: Vec<ChatRequest> = (0..24).map(|i| request(&format!("p{i}"), 1)).collect();
    let results = client.complete(&requests);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.as_ref().unwrap().choices[0].text, format!("p{i} #0"));
    }
    assert_eq!(server.seen().len(), 24);
    assert_eq!(
        server.max_in_flight(),
        8,
        "8 workers, 24 slow requests: exactly 8 at a time"
    );
}

#[test]
fn stop_reasons_are_reported() {
    let server = serve(|_, _| {
        let mut body = completion(&["a".into(), "b".into(), "c".into()], "stop");
        body["choices"][0]["stop_reason"] = json!("```\n");
        body["choices"][1]["stop_reason"] = json!(151645);
        body["choices"][2]["stop_reason"] = serde_json::Value::Null;
        Reply::json(200, body)
    });
    let client = EndpointClient::new(options(&server.base)).unwrap();
    let results = client.complete(&[request("p", 3)]);
    let reasons: Vec<_> = results[0]
        .as_ref()
        .unwrap()
        .choices
        .iter()
        .map(|c| c.stop_reason.clone())
        .collect();
    assert_eq!(
        reasons,
        [
            Some(StopReason::Text("```\n".into())),
            Some(StopReason::Token(151645)),
            None
        ]
    );
}

#[test]
fn large_n_is_split_with_distinct_seeds() {
    let server = serve(|_, body| {
        let n = body["n"].as_u64().unwrap() as usize;
        let seed = body["seed"].as_u64().unwrap();
        let texts: Vec<String> = (0..n).map(|i| format!("seed {seed} #{i}")).collect();
        Reply::json(200, completion(&texts, "stop"))
    });
    let client = EndpointClient::new(EndpointOptions {
        max_n_per_request: Some(3),
        concurrency: 1, // one at a time, so arrival order is part order
        ..options(&server.base)
    })
    .unwrap();
    let results = client.complete(&[request("p", 7)]);
    let completion = results[0].as_ref().unwrap();
    let texts: Vec<&str> = completion.choices.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "seed 42 #0",
            "seed 42 #1",
            "seed 42 #2",
            "seed 43 #0",
            "seed 43 #1",
            "seed 43 #2",
            "seed 44 #0"
        ]
    );
    let sent: Vec<(u64, u64)> = server
        .seen()
        .iter()
        .map(|s| {
            (
                s.body["n"].as_u64().unwrap(),
                s.body["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sent, [(3, 42), (3, 43), (1, 44)]);
    // Usage is summed over the three parts.
    assert_eq!(completion.usage.unwrap().completion_tokens, 35);
}

#[test]
fn zero_samples_sends_nothing() {
    let server = serve(|_, body| echo(body, "stop"));
    let client = EndpointClient::new(options(&server.base)).unwrap();
    let results = client.complete(&[request("p", 0)]);
    assert!(results[0].as_ref().unwrap().choices.is_empty());
    assert_eq!(server.seen().len(), 0);
}

#[test]
fn adapter_loads_find_vllm_or_sglang_routes_and_tell_refusals_from_failures() {
    use lean_grpo::endpoint::AdapterLoad;
    use std::path::Path;
    let timeout = Duration::from_secs(5);
    // vLLM: /v1/load_lora_adapter answers.
    let vllm = endpoint_support::serve_routes(|_, path, _| match path {
        "/v1/load_lora_adapter" => Reply::json(200, json!("Success")),
        _ => Reply::json(404, json!({"detail": "Not Found"})),
    });
    let client = EndpointClient::new(options(&format!("{}/v1", vllm.base))).unwrap();
    let loaded = client.load_lora_adapter("run-v0", Path::new("/a/run-v0"), timeout);
    assert_eq!(loaded.unwrap(), AdapterLoad::Loaded);
    assert_eq!(
        vllm.seen()[0].body,
        json!({"lora_name": "run-v0", "lora_path": "/a/run-v0"})
    );

    // SGLang: only the root route exists.
    let sglang = endpoint_support::serve_routes(|_, path, _| match path {
        "/load_lora_adapter" | "/unload_lora_adapter" => Reply::json(200, json!({"success": true})),
        _ => Reply::json(404, json!({"detail": "Not Found"})),
    });
    let client = EndpointClient::new(options(&sglang.base)).unwrap();
    let loaded = client.load_lora_adapter("run-v0", Path::new("/a"), timeout);
    assert_eq!(loaded.unwrap(), AdapterLoad::Loaded);
    client.unload_lora_adapter("run-v0", timeout).unwrap();
    let paths: Vec<String> = sglang.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/load_lora_adapter",
            "/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/unload_lora_adapter"
        ]
    );

    // No route anywhere, or LoRA refused: unsupported, with the server's reason.
    let none =
        endpoint_support::serve_routes(|_, _, _| Reply::json(404, json!({"detail": "Not Found"})));
    let client = EndpointClient::new(options(&none.base)).unwrap();
    let answer = client
        .load_lora_adapter("x", Path::new("/a"), timeout)
        .unwrap();
    assert!(matches!(answer, AdapterLoad::Unsupported(why) if why.contains("404")));
    let refusing = endpoint_support::serve_routes(|_, _, _| {
        Reply::json(
            400,
            json!({"object": "error", "message": "LoRA is not enabled"}),
        )
    });
    let client = EndpointClient::new(options(&refusing.base)).unwrap();
    let answer = client
        .load_lora_adapter("x", Path::new("/a"), timeout)
        .unwrap();
    assert!(matches!(answer, AdapterLoad::Unsupported(why) if why.contains("LoRA is not enabled")));

    // A retried load the server had already done counts as loaded; a 5xx is an error.
    let again = endpoint_support::serve_routes(|_, _, _| {
        Reply::json(
            400,
            json!({"message": "The lora adapter 'x' has already been loaded."}),
        )
    });
    let client = EndpointClient::new(options(&again.base)).unwrap();
    let answer = client
        .load_lora_adapter("x", Path::new("/a"), timeout)
        .unwrap();
    assert_eq!(answer, AdapterLoad::Loaded);
    let broken =
        endpoint_support::serve_routes(|_, _, _| Reply::json(500, json!({"message": "oom"})));
    let client = EndpointClient::new(options(&broken.base)).unwrap();
    let error = client
        .load_lora_adapter("x", Path::new("/a"), timeout)
        .unwrap_err();
    assert_eq!(
        lean_grpo::endpoint::HttpError::find(&error).unwrap().status,
        Some(500)
    );
}

#[test]
fn token_logprobs_come_back_with_vllm_token_ids_and_the_adapter_as_model() {
    let server = serve(|_, _| {
        let mut body = completion(&["ab".into()], "stop");
        body["choices"][0]["logprobs"] = json!({"content": [
            {"token": "token_id:17", "logprob": -0.25, "bytes": [97], "top_logprobs": []},
            {"token": "b", "logprob": -1.5, "bytes": [98], "top_logprobs": []}
        ]});
        Reply::json(200, body)
    });
    let client = EndpointClient::new(options(&server.base)).unwrap();
    let mut req = request("p", 1);
    req.model = Some("run-v3".into());
    req.logprobs = true;
    let results = client.complete(&[req]);
    let logprobs = results[0].as_ref().unwrap().choices[0]
        .logprobs
        .clone()
        .unwrap();
    assert_eq!(
        logprobs,
        [
            lean_grpo::endpoint::TokenLogprob {
                id: Some(17),
                logprob: -0.25
            },
            lean_grpo::endpoint::TokenLogprob {
                id: None,
                logprob: -1.5
            },
        ]
    );
    let body = &server.seen()[0].body;
    assert_eq!(body["model"], "run-v3");
    assert_eq!(
        (&body["logprobs"], &body["return_tokens_as_token_ids"]),
        (&json!(true), &json!(true))
    );
    // Without them, neither key is sent (OpenAI itself rejects unknown keys).
    let plain = client.complete(&[request("p", 1)]);
    assert!(plain[0].as_ref().unwrap().choices[0].logprobs.is_some());
    let body = &server.seen()[1].body;
    assert!(body.get("logprobs").is_none() && body.get("return_tokens_as_token_ids").is_none());
    assert_eq!(body["model"], "served");
}
