//! API keys come from the environment variable the user names. A test binary of its own: it sets
//! an environment variable, which must not race with other tests' threads.

mod endpoint_support;

use endpoint_support::{completion, serve, Reply};
use lean_grpo::endpoint::{ChatRequest, EndpointClient, EndpointOptions};
use lean_grpo::model::tokenizer::ChatMessage;

#[test]
fn api_key_from_named_variable() {
    const VAR: &str = "LEAN_GRPO_TEST_ENDPOINT_KEY";
    let server = serve(|_, _| Reply::json(200, completion(&["ok".to_string()], "stop")));
    let options = EndpointOptions {
        api_key_env: Some(VAR.to_string()),
        ..EndpointOptions::new(server.base.clone(), "served")
    };

    // Unset: the error names the variable and the flag.
    std::env::remove_var(VAR);
    let err = EndpointClient::new(options.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("environment variable LEAN_GRPO_TEST_ENDPOINT_KEY"),
        "{err}"
    );
    assert!(err.contains("--api-key-env"), "{err}");

    std::env::set_var(VAR, "sk-test-123");
    let client = EndpointClient::new(options).unwrap();
    assert!(
        !format!("{client:?}").contains("sk-test-123"),
        "the key must not leak into logs"
    );
    let request = ChatRequest {
        messages: vec![ChatMessage::new("user", "hi")],
        n: 1,
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 8,
        stop: Vec::new(),
        seed: None,
        model: None,
        logprobs: false,
    };
    let results = client.complete(&[request]);
    assert_eq!(results[0].as_ref().unwrap().choices[0].text, "ok");
    let seen = server.seen();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-test-123"));
    // Empty stop list and no seed are left out rather than sent as [] / null.
    assert!(
        seen[0].body.get("stop").is_none() && seen[0].body.get("seed").is_none(),
        "{:?}",
        seen[0].body
    );
}
