//! A local OpenAI-compatible stand-in for the endpoint tests: answers with whatever the test's
//! handler says, records what it was sent, and counts requests in flight.
//!
//! It is a small HTTP/1.1 server on `std::net` with one thread per connection. (tiny_http was
//! used before, but its pool serves each keep-alive connection with one of a few threads for the
//! connection's whole life; when a client opens more connections at once than it has threads
//! (`eval` opens 8), the extra connections' requests are never read and the client waits out
//! its timeout.)

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
            headers: vec![("Content-Type", "application/json".to_string())],
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
    stop: Arc<AtomicBool>,
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
    /// Stops accepting: the accept loop sees the flag on the connection made to wake it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.base.trim_start_matches("http://"));
    }
}

type Handler = dyn Fn(usize, &str, &serde_json::Value) -> Reply + Send + Sync;

struct Shared {
    handler: Box<Handler>,
    seen: Arc<Mutex<Vec<Seen>>>,
    in_flight: AtomicUsize,
    max_in_flight: Arc<AtomicUsize>,
}

/// Starts a server on 127.0.0.1 at a free port. `handler(call_number, request_body)` decides the
/// reply; call numbers count from 0 in arrival order. Every connection has its own thread.
pub fn serve<F>(handler: F) -> TestServer
where
    F: Fn(usize, &serde_json::Value) -> Reply + Send + Sync + 'static,
{
    serve_routes(move |call, _path, body| handler(call, body))
}

/// [`serve`] with the request path given to the handler: `handler(call_number, path, body)`.
pub fn serve_routes<F>(handler: F) -> TestServer
where
    F: Fn(usize, &str, &serde_json::Value) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let shared = Arc::new(Shared {
        handler: Box::new(handler),
        seen: seen.clone(),
        in_flight: AtomicUsize::new(0),
        max_in_flight: max_in_flight.clone(),
    });
    {
        let stop = stop.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                thread::spawn(move || {
                    let _ = serve_connection(stream, &shared);
                });
            }
        });
    }
    TestServer {
        base: format!("http://127.0.0.1:{port}"),
        stop,
        seen,
        max_in_flight,
    }
}

/// Answers the requests of one keep-alive connection until the client closes it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut raw = vec![0; length];
        reader.read_exact(&mut raw)?;
        let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);

        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let call = {
            let mut seen = shared.seen.lock().unwrap();
            seen.push(Seen {
                method,
                path: path.clone(),
                authorization: header("authorization"),
                content_type: header("content-type"),
                body: body.clone(),
            });
            seen.len() - 1
        };
        let reply = (shared.handler)(call, &path, &body);
        thread::sleep(reply.delay);
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);

        let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
        for (name, value) in &reply.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
        writer.write_all(head.as_bytes())?;
        writer.write_all(reply.body.as_bytes())?;
        writer.flush()?;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
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
