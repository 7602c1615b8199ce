//! The `kimina` backend against a local HTTP server that answers like kimina-lean-server
//! (`POST /api/check`, REPL-shaped responses, as in tests/data/lean/kimina_*.json). The real
//! server is exercised in tests/lean_kimina_server.rs.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lean_grpo::lean::{Backend, Checker, Job, VerdictKind};
use serde_json::{json, Value};
use support::*;

/// A kimina stand-in on a free local port; records every `/check` request body.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<Value>>>,
    /// The `Authorization` header of each request.
    auth: Arc<Mutex<Vec<Option<String>>>>,
    /// Set to stop listening (the port then refuses connections).
    stop: Arc<AtomicBool>,
}

fn serve() -> Server {
    serve_dying_after(usize::MAX)
}

/// A server that answers `answered` checks, then drops the next request unanswered and stops
/// listening: a server killed mid-run.
fn serve_dying_after(answered: usize) -> Server {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind a local port");
    let url = format!(
        "http://{}",
        server.server_addr().to_ip().expect("ip address")
    );
    let requests = Arc::new(Mutex::new(Vec::new()));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, stopped, auth_seen) = (Arc::clone(&requests), Arc::clone(&stop), Arc::clone(&auth));
    let failures = AtomicUsize::new(0);
    let busy = AtomicUsize::new(0);
    std::thread::spawn(move || {
        while !stopped.load(Ordering::SeqCst) {
            let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            if request.url() != "/api/check" {
                let _ = request
                    .respond(tiny_http::Response::from_string("not found").with_status_code(404));
                continue;
            }
            let header = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.to_string());
            auth_seen.lock().unwrap().push(header);
            let mut body = String::new();
            request.as_reader().read_to_string(&mut body).unwrap();
            let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push(value.clone());
                seen.len()
            };
            if n > answered {
                stopped.store(true, Ordering::SeqCst);
                break; // `request` and `server` dropped: the connection closes unanswered.
            }
            let code = value["snippets"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if code.contains("fake:server-error-once")
                && failures.fetch_add(1, Ordering::SeqCst) == 0
            {
                let _ = request
                    .respond(tiny_http::Response::from_string("overloaded").with_status_code(503));
                continue;
            }
            let id = value["snippets"][0]["id"].clone();
            // kimina's own answer when all its REPLs are busy (routers/check.py).
            if code.contains("fake:no-repl-once") && busy.fetch_add(1, Ordering::SeqCst) == 0 {
                let answer = json!({"results": [{"id": id, "error": "No available REPLs"}]});
                let _ = request.respond(tiny_http::Response::from_string(answer.to_string()));
                continue;
            }
            let answer = json!({"results": [answer(&code, id)]});
            let header = tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap();
            let _ = request
                .respond(tiny_http::Response::from_string(answer.to_string()).with_header(header));
        }
    });
    Server {
        url,
        requests,
        auth,
        stop,
    }
}

/// A URL on which nothing listens.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
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
        job("no-repl-once"),
    ];
    let results = checker.check(&jobs, None).unwrap();
    let kinds: Vec<VerdictKind> = results.iter().map(|c| c.verdict.kind).collect();
    use VerdictKind::*;
    assert_eq!(
        kinds,
        [Accepted, LeanError, Sorry, Axioms, Timeout, Accepted, Accepted, Accepted]
    );
    // A server with no free REPL is asked again: its answer is no verdict on the proof.
    assert!(results[7].retries >= 1);
    let m = &results[1].verdict.evidence.messages[0];
    assert_eq!((m.line, m.column), (Some(3), Some(2)));
    assert_eq!(results[3].verdict.evidence.axioms, ["cheat"]);

    let requests = server.requests.lock().unwrap();
    assert_eq!(
        requests.len(),
        jobs.len() + 2,
        "one retry after the 503, one after 'No available REPLs'"
    );
    assert!(server.auth.lock().unwrap().iter().all(Option::is_none));
    let first = &requests[0];
    assert_eq!(first["timeout"], json!(10));
    let code = first["snippets"][0]["code"].as_str().unwrap();
    assert!(
        code.starts_with("import Fake\ntheorem t : True := by\n")
            && code.ends_with("\n\n#print axioms t\n"),
        "{code}"
    );
}

/// Distinct jobs (distinct theorems: identical jobs would be checked once).
fn jobs(n: usize) -> Vec<Job> {
    (0..n)
        .map(|i| Job::new(&theorem(&format!("t{i}")), "by\n  -- fake:none\n  trivial"))
        .collect()
}

fn cluster(urls: &[String], attempts: u32, max_unavailable: usize) -> Checker {
    let mut o = options(Backend::Kimina, "");
    o.kimina_url = urls.to_vec();
    o.kimina_attempts = attempts;
    o.max_unavailable = max_unavailable;
    Checker::new(&o).unwrap()
}

#[test]
fn proofs_spread_over_a_cluster_and_a_server_killed_mid_run_loses_no_verdict() {
    // The dying server needs only its second request to die, and 24 proofs make sure it gets it
    // whatever the threads' timing (with 12 and a third request to die, a loaded machine made it
    // miss now and then).
    let (a, b, c) = (serve_dying_after(1), serve(), serve());
    let urls = [a.url.clone(), b.url.clone(), c.url.clone()];
    let checker = cluster(&urls, 4, 16);
    let jobs = jobs(24);
    let results = checker.check(&jobs, None).unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.verdict.kind,
            VerdictKind::Accepted,
            "job {i}: {:?}",
            r.verdict
        );
    }
    assert!(a.stop.load(Ordering::SeqCst), "the first server died");
    let counts = [&a, &b, &c].map(|s| s.requests.lock().unwrap().len());
    // The dying server took 1 and dropped a second; the others took the rest between them.
    assert_eq!(counts[0], 2, "{counts:?}");
    assert!(counts[1] >= 6 && counts[2] >= 6, "spread: {counts:?}");
    assert_eq!(counts[1] + counts[2], 23, "{counts:?}");
    let retries: u32 = results.iter().map(|r| r.retries).sum();
    // The dropped request went again (one more if the other thread's request was queued at
    // the dying server).
    assert!((1..=2).contains(&retries), "{retries} retries");
}

#[test]
fn with_every_server_down_each_proof_is_checker_unavailable_and_the_run_stops() {
    let urls = [dead_url(), dead_url()];
    // Below the stop: each proof gets its verdict, with what failed, and is not cached.
    let checker = cluster(&urls, 2, 16);
    let results = checker.check(&jobs(2), None).unwrap();
    for r in &results {
        assert_eq!(r.verdict.kind, VerdictKind::CheckerUnavailable);
        let detail = r.verdict.evidence.detail.as_deref().unwrap_or_default();
        assert!(
            detail.contains(&urls[0]) || detail.contains(&urls[1]),
            "{detail}"
        );
        assert_eq!(r.retries, 1);
    }
    let again = checker.check(&jobs(1), None).unwrap();
    assert!(!again[0].cached, "an unavailable verdict is never cached");
    // At the stop: a clear error that names the servers and the knob.
    let checker = cluster(&urls, 1, 3);
    let err = format!("{:#}", checker.check(&jobs(4), None).unwrap_err());
    assert!(err.contains("3 proofs in a row got no verdict"), "{err}");
    assert!(
        err.contains(&urls[0]) && err.contains("checker.max_unavailable"),
        "{err}"
    );
    let mut no_url = options(Backend::Kimina, "");
    no_url.kimina_url = Vec::new();
    let err = Checker::new(&no_url).err().expect("needs a URL");
    assert!(err.to_string().contains("--kimina-url"), "{err}");
}

#[test]
fn kimina_urls_come_as_a_list_or_a_comma_string() {
    use lean_grpo::lean::CheckerOptions;
    let from = |yaml: &str| -> Vec<String> {
        let o: CheckerOptions = serde_yaml_ng::from_str(yaml).unwrap();
        o.kimina_url
    };
    let want = ["http://a:8000", "http://b:8000"]
        .map(String::from)
        .to_vec();
    assert_eq!(from("kimina_url: http://a:8000, http://b:8000"), want);
    assert_eq!(from("kimina_url: [http://a:8000, http://b:8000]"), want);
    assert!(from("backend: kimina").is_empty());
}

#[test]
fn the_api_key_goes_in_the_authorization_header() {
    let server = serve();
    let mut o = options(Backend::Kimina, &server.url);
    o.kimina_api_key_env = Some("LEAN_GRPO_TEST_KIMINA_KEY".into());
    let error = Checker::new(&o).err().unwrap().to_string();
    assert!(
        error.contains("LEAN_GRPO_TEST_KIMINA_KEY") && error.contains("LEAN_SERVER_API_KEY"),
        "{error}"
    );
    std::env::set_var("LEAN_GRPO_TEST_KIMINA_KEY", "k-123");
    let checker = Checker::new(&o).unwrap();
    let results = checker.check(&[job("none")], None).unwrap();
    assert_eq!(results[0].verdict.kind, VerdictKind::Accepted);
    let auth = server.auth.lock().unwrap().clone();
    assert_eq!(auth, [Some("Bearer k-123".to_string())]);
}
