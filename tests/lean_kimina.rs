//! The `kimina` backend against a local HTTP server that answers like kimina-lean-server
//! (`POST /check`, REPL-shaped responses, as in tests/data/lean/kimina_*.json).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lean_grpo::lean::{Backend, Checker, Job, VerdictKind};
use serde_json::{json, Value};
use support::*;

/// A kimina stand-in on a free local port; records every request body.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<Value>>>,
}

fn serve() -> Server {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind a local port");
    let url = format!(
        "http://{}",
        server.server_addr().to_ip().expect("ip address")
    );
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    let failures = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            request.as_reader().read_to_string(&mut body).unwrap();
            let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            seen.lock().unwrap().push(value.clone());
            let code = value["snippets"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if request.url() != "/check" {
                let _ = request
                    .respond(tiny_http::Response::from_string("not found").with_status_code(404));
                continue;
            }
            if code.contains("fake:server-error-once")
                && failures.fetch_add(1, Ordering::SeqCst) == 0
            {
                let _ = request
                    .respond(tiny_http::Response::from_string("overloaded").with_status_code(503));
                continue;
            }
            let id = value["snippets"][0]["id"].clone();
            let answer = json!({"results": [answer(&code, id)]});
            let header = tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap();
            let _ = request
                .respond(tiny_http::Response::from_string(answer.to_string()).with_header(header));
        }
    });
    Server { url, requests }
}

/// One result, decided by the snippet's `-- fake:WHAT` directive.
fn answer(code: &str, id: Value) -> Value {
    let lines: Vec<&str> = code.split('\n').collect();
    let audit = lines
        .iter()
        .position(|l| l.starts_with("#print axioms"))
        .map_or(0, |i| i + 1);
    let name = lines
        .get(audit.saturating_sub(1))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?");
    let at = lines
        .iter()
        .position(|l| l.contains("-- fake:"))
        .map_or(1, |i| i + 1);
    let what = lines
        .get(at - 1)
        .and_then(|l| l.split("-- fake:").nth(1))
        .unwrap_or("")
        .trim();
    let pos = |line: usize, column: usize| json!({"line": line, "column": column});
    let info = |line: usize, text: String| json!({"severity": "info", "pos": pos(line, 0), "endPos": pos(line, 6), "data": text});
    let clean = format!("'{name}' does not depend on any axioms");
    let response = match what {
        "kimina-timeout" => {
            return json!({"id": id, "error": "Lean process timed out", "response": null})
        }
        "error" => json!({"messages": [
            {"severity": "error", "pos": pos(at + 1, 2), "endPos": pos(at + 1, 7), "data": "unsolved goals\n⊢ True"},
            info(audit, clean)]}),
        "sorry" => json!({
            "sorries": [{"proofState": 0, "pos": pos(at + 1, 2), "endPos": pos(at + 1, 7), "goal": "⊢ True"}],
            "messages": [{"severity": "warning", "pos": pos(1, 8), "endPos": pos(1, 9), "data": "declaration uses 'sorry'"},
                         info(audit, format!("'{name}' depends on axioms: [sorryAx]"))]}),
        // Older servers number lines after the import lines they split off (one here).
        "old-split" => json!({"messages": [info(audit - 1, clean)]}),
        "axiom" => {
            json!({"messages": [info(audit, format!("'{name}' depends on axioms: [propext, cheat]"))]})
        }
        _ => json!({"messages": [info(audit, clean)]}),
    };
    let mut response = response;
    response["time"] = json!(0.34);
    json!({"id": id, "time": 0.34, "response": response})
}

fn checker(url: &str) -> Checker {
    Checker::new(&options(Backend::Kimina, url)).unwrap()
}

fn job(directive: &str) -> Job {
    Job::new(
        &theorem("t"),
        format!("by\n  -- fake:{directive}\n  trivial"),
    )
}

#[test]
fn verdicts_from_kimina_answers() {
    let server = serve();
    let checker = checker(&server.url);
    let jobs = [
        job("none"),
        job("error"),
        job("sorry"),
        job("axiom"),
        job("kimina-timeout"),
        job("old-split"),
        job("server-error-once"),
    ];
    let results = checker.check(&jobs, None).unwrap();
    let kinds: Vec<VerdictKind> = results.iter().map(|c| c.verdict.kind).collect();
    use VerdictKind::*;
    assert_eq!(
        kinds,
        [Accepted, LeanError, Sorry, Axioms, Timeout, Accepted, Accepted]
    );
    let m = &results[1].verdict.evidence.messages[0];
    assert_eq!((m.line, m.column), (Some(3), Some(2)));
    assert_eq!(results[3].verdict.evidence.axioms, ["cheat"]);

    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), jobs.len() + 1, "one retry after the 503");
    let first = &requests[0];
    assert_eq!(first["timeout"], json!(10));
    let code = first["snippets"][0]["code"].as_str().unwrap();
    assert!(
        code.starts_with("import Fake\ntheorem t : True := by\n")
            && code.ends_with("\n\n#print axioms t\n"),
        "{code}"
    );
}

#[test]
fn an_unreachable_server_is_an_error_not_a_verdict() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = checker(&url).check(&[job("none")], None).unwrap_err();
    assert!(format!("{err:#}").contains("failed 3 times"), "{err:#}");
    let mut no_url = options(Backend::Kimina, "");
    no_url.kimina_url = None;
    let err = Checker::new(&no_url).err().expect("needs a URL");
    assert!(err.to_string().contains("--kimina-url"), "{err}");
}
