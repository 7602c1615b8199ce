//! A local OpenAI-compatible stand-in for the endpoint tests: answers with whatever the test's
//! handler says, records what it was sent, and counts requests in flight.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the server answers to one request.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Time the handler holds the request before answering (to overlap requests).
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: serde_json::Value,
}

pub struct TestServer {
    pub base: String,
    server: Arc<tiny_http::Server>,
    seen: Arc<Mutex<Vec<Seen>>>,
    max_in_flight: Arc<AtomicUsize>,
}

impl TestServer {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// Starts a server on 127.0.0.1 at a free port. `handler(call_number, request_body)` decides the
/// reply; call numbers count from 0 in arrival order. Each request is handled on its own thread.
pub fn serve<F>(handler: F) -> TestServer
where
    F: Fn(usize, &serde_json::Value) -> Reply + Send + Sync + 'static,
{
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    {
        let (server, seen, max_in_flight) = (server.clone(), seen.clone(), max_in_flight.clone());
        thread::spawn(move || {
            while let Ok(mut request) = server.recv() {
                let (seen, handler) = (seen.clone(), handler.clone());
                let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
                thread::spawn(move || {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_in_flight.fetch_max(now, Ordering::SeqCst);
                    let mut raw = String::new();
                    request.as_reader().read_to_string(&mut raw).unwrap();
                    let body = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
                    let header = |name: &str| {
                        request
                            .headers()
                            .iter()
                            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                            .map(|h| h.value.as_str().to_string())
                    };
                    let call = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Seen {
                            method: request.method().to_string(),
                            path: request.url().to_string(),
                            authorization: header("Authorization"),
                            content_type: header("Content-Type"),
                            body: body.clone(),
                        });
                        seen.len() - 1
                    };
                    let reply = handler(call, &body);
                    thread::sleep(reply.delay);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let mut response =
                        tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
                    for (name, value) in reply.headers {
                        response = response.with_header(
                            tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
                                .unwrap(),
                        );
                    }
                    let _ = request.respond(response);
                });
            }
        });
    }
    TestServer {
        base: format!("http://127.0.0.1:{port}"),
        server,
        seen,
        max_in_flight,
    }
}

/// An OpenAI chat completion body with one choice per text, all finishing with `finish_reason`.
pub fn completion(texts: &[String], finish_reason: &str) -> serde_json::Value {
    let choices: Vec<serde_json::Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "index": i,
                "message": {"role": "assistant", "content": t},
                "finish_reason": finish_reason,
            })
        })
        .collect();
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "served",
        "choices": choices,
        "usage": {"prompt_tokens": 11, "completion_tokens": 5 * texts.len(), "total_tokens": 11 + 5 * texts.len()},
    })
}
