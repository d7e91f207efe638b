//! `wkvc serve` with real clients: a W4KV4 plan of the demo model served on loopback, then
//!
//! - the official `openai` Python package (`tests/serve/openai_client.py`): chat and text
//!   completions, streamed and not, usage, the model list, a context overflow and a wrong key;
//! - a bounded load test (`tests/serve/load.py`): 64 requests, 16 at a time, prompts of
//!   several lengths, some streamed, some cancelled midway; every greedy answer must equal
//!   `wkvc run`'s for its prompt, and /metrics must show nothing running or waiting and an
//!   empty KV cache afterwards;
//! - raw HTTP for what a client library hides: /health, malformed JSON, a body over the limit,
//!   a full queue answering 503 with Retry-After;
//! - SIGTERM while a request runs: it completes, and the server exits 0.
//!
//! Needs the demo model and a Python with `openai` (`$WKVC_PYTHON`; `scripts/test.sh` makes a
//! virtual environment); each is a skip, said once, where absent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wkvc_tests::{Group, demo_model, skip, temp_dir};

const WKVC: &str = env!("CARGO_BIN_EXE_wkvc");
const KEY: &str = "test-key-123";

/// A minimal HTTP/1.1 exchange: (status, headers, body).
fn http(addr: &str, method: &str, path: &str, body: &[u8], auth: bool) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let auth = if auth {
        format!("Authorization: Bearer {KEY}\r\n")
    } else {
        String::new()
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // a body the server refuses may be cut short: that is its answer, not an error here
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(plan: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(WKVC)
            .arg("serve")
            .arg(plan)
            .args(["--port", "0", "--threads", "2", "--api-key", KEY])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("wkvc serve starts");
        let err = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(err).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server says where it listens")
                .expect("stderr line");
            if let Some(a) = line.split("http://").nth(1) {
                break a.split_whitespace().next().unwrap_or("").to_string();
            }
        };
        // keep draining stderr so the server never blocks on it
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let t0 = Instant::now();
        loop {
            let (st, _, _) = http(&addr, "GET", "/health", b"", false);
            if st == 200 {
                break;
            }
            assert!(
                st == 503 && t0.elapsed() < Duration::from_secs(120),
                "health {st}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Server { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGTERM; the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("the server exits")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A W4KV4 RTN plan of the demo model (smoothing from sampled text).
fn plan(dir: &Path, model: &Path) -> PathBuf {
    let p = dir.join("demo.wkv");
    let out = Command::new(WKVC)
        .arg("compile")
        .arg(model)
        .arg("-o")
        .arg(&p)
        .args(["--calib-tokens", "256", "--threads", "2"])
        .output()
        .expect("wkvc compile runs");
    assert!(
        out.status.success(),
        "compile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// `wkvc run`'s greedy continuation of `prompt`.
fn greedy(plan: &Path, prompt: &str, n: usize) -> String {
    let out = Command::new(WKVC)
        .arg("run")
        .arg(plan)
        .args(["-p", prompt, "-n", &n.to_string(), "--threads", "2"])
        .output()
        .expect("wkvc run runs");
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = text.strip_suffix('\n').unwrap_or(&text);
    text.strip_prefix(prompt)
        .expect("run echoes the prompt")
        .to_string()
}

fn python(script: &str, args: &[&str]) -> (bool, String) {
    let py = std::env::var("WKVC_PYTHON").expect("checked by the caller");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/serve")
        .join(script);
    let out = Command::new(py)
        .arg(path)
        .args(args)
        .output()
        .expect("python runs");
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!("{script} stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), so)
}

#[test]
fn serve_answers_openai_clients_under_load_and_stops_cleanly() {
    let Some(model) = demo_model() else {
        return;
    };
    let have_python = std::env::var_os("WKVC_PYTHON").is_some_and(|p| Path::new(&p).exists());
    if !have_python {
        skip(
            Group::PythonClient,
            "no Python with the openai package ($WKVC_PYTHON; scripts/test.sh makes one)",
        );
    }
    let dir = temp_dir("serve");
    let plan = plan(&dir, &model);

    // raw HTTP checks on a server with a queue of 1 and one sequence
    {
        // a grace period far beyond the request's time on any machine: the running request
        // must complete however slow (a loaded CI machine) the engine is
        let s = Server::start(
            &plan,
            &[
                "--parallel",
                "1",
                "--queue",
                "1",
                "--ctx",
                "512",
                "--grace",
                "600",
            ],
        );
        let addr = s.addr.clone();
        let (st, _, b) = http(&addr, "POST", "/v1/completions", b"{nope", true);
        assert!(
            st == 400 && b.contains("\"invalid_request_error\""),
            "{st} {b}"
        );
        let (st, _, b) = http(&addr, "GET", "/v1/models", b"", false);
        assert!(st == 401 && b.contains("invalid_api_key"), "{st} {b}");
        let big = vec![b'a'; 2 << 20];
        let (st, _, b) = http(&addr, "POST", "/v1/completions", &big, true);
        assert!(st == 413 && b.contains("request_too_large"), "{st} {b}");
        let (st, _, b) = http(
            &addr,
            "POST",
            "/v1/chat/completions",
            br#"{"messages": []}"#,
            true,
        );
        assert!(st == 400 && b.contains("messages"), "{st} {b}");
        // one long request runs, one waits, the third is refused with Retry-After
        let long = br#"{"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}"#;
        let a1 = addr.clone();
        let h1 = std::thread::spawn(move || http(&a1, "POST", "/v1/completions", long, true));
        std::thread::sleep(Duration::from_millis(300));
        let a2 = addr.clone();
        let h2 = std::thread::spawn(move || http(&a2, "POST", "/v1/completions", long, true));
        std::thread::sleep(Duration::from_millis(300));
        let (st, head, b) = http(&addr, "POST", "/v1/completions", long, true);
        assert!(
            st == 503 && head.to_ascii_lowercase().contains("retry-after") && b.contains("queue"),
            "{st} {head} {b}"
        );
        // SIGTERM: the running request completes, the waiting one is refused, exit 0
        let status = s.stop();
        let (st1, _, b1) = h1.join().expect("first request");
        assert!(st1 == 200 && b1.contains("\"finish_reason\""), "{st1} {b1}");
        let (st2, _, _) = h2.join().expect("second request");
        assert!(st2 == 200 || st2 == 503, "the waiting request: {st2}");
        assert!(status.success(), "wkvc serve exits 0 on SIGTERM: {status}");
    }
    // --grace 0: SIGTERM cancels a running request at its next step (the documented 503),
    // unless it had finished already, and the server exits 0 without waiting for it
    {
        let s = Server::start(&plan, &["--parallel", "1", "--ctx", "512", "--grace", "0"]);
        let addr = s.addr.clone();
        let long = br#"{"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}"#;
        let h = std::thread::spawn(move || http(&addr, "POST", "/v1/completions", long, true));
        std::thread::sleep(Duration::from_millis(300));
        let status = s.stop();
        let (st, _, b) = h.join().expect("request");
        assert!(
            (st == 200 && b.contains("\"finish_reason\""))
                || (st == 503 && b.contains("the server is stopping")),
            "{st} {b}"
        );
        assert!(status.success(), "wkvc serve exits 0 on SIGTERM: {status}");
    }
    if !have_python {
        return;
    }

    // the openai client and the load test, against wkvc run's greedy answers
    let prompts = [
        ("The capital of France is", 12usize),
        ("Once upon a time, in a small village,", 40),
        ("def fibonacci(n):", 30),
        ("The three primary colors are", 20),
        (
            "In 1969, astronauts landed on the Moon for the first time. The mission was called",
            25,
        ),
        ("Water boils at", 8),
    ];
    let cases: Vec<serde_json::Value> = prompts
        .iter()
        .map(|&(p, n)| serde_json::json!({"prompt": p, "max_tokens": n, "greedy": greedy(&plan, p, n)}))
        .collect();
    let load = dir.join("load.json");
    std::fs::write(&load, serde_json::to_string(&cases).expect("json")).expect("write cases");
    let one = dir.join("one.json");
    std::fs::write(&one, cases[1].to_string()).expect("write case");
    let s = Server::start(&plan, &["--parallel", "8", "--ctx", "1024"]);
    let url = s.url();
    let (ok, out) = python("openai_client.py", &[&url, KEY, &one.to_string_lossy()]);
    eprintln!("openai client: {out}");
    assert!(ok, "the openai client checks failed: {out}");
    let (ok, out) = python("load.py", &[&url, KEY, &load.to_string_lossy(), "64", "16"]);
    eprintln!("load test: {out}");
    assert!(ok, "the load test failed: {out}");
    let status = s.stop();
    assert!(status.success(), "wkvc serve exits 0 on SIGTERM: {status}");
    let _ = std::fs::remove_dir_all(dir);
}
