//! `GET /metrics`: the scheduler's figures in Prometheus' text format. The two gauges an
//! inference gateway reads of a model server are `wkvc_requests_waiting` (queue depth) and
//! `wkvc_kv_cache_utilization` (0..1).

use super::Shared;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use wkvc_runtime::scheduler::Histogram;

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (buckets, count, sum) = h.read();
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, c) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

pub async fn render(State(st): State<Shared>) -> Response {
    let mut out = String::new();
    let ready = st.ready.get();
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        &mut out,
        "wkvc_ready",
        "1 when the model is loaded and requests are admitted",
        f64::from(u8::from(
            ready.is_some() && !st.draining.load(Ordering::SeqCst),
        )),
    );
    if let Some(r) = ready {
        let m = r.scheduler.metrics();
        let ld = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
        gauge(
            &mut out,
            "wkvc_requests_running",
            "requests being generated",
            ld(&m.running),
        );
        gauge(
            &mut out,
            "wkvc_requests_waiting",
            "requests queued for a free sequence",
            ld(&m.waiting),
        );
        gauge(
            &mut out,
            "wkvc_kv_cache_utilization",
            "KV cache tokens held by running requests over the tokens the server may hold",
            m.kv_utilisation(),
        );
        gauge(
            &mut out,
            "wkvc_kv_cache_tokens",
            "KV cache tokens held by running requests",
            ld(&m.kv_used_tokens),
        );
        gauge(
            &mut out,
            "wkvc_kv_cache_capacity_tokens",
            "KV cache tokens the server may hold (parallel x ctx)",
            ld(&m.kv_capacity_tokens),
        );
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let ld64 = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "wkvc_prompt_tokens_total",
            "prompt tokens processed",
            ld64(&m.prompt_tokens),
        );
        counter(
            &mut out,
            "wkvc_generation_tokens_total",
            "tokens generated",
            ld64(&m.generated_tokens),
        );
        counter(
            &mut out,
            "wkvc_steps_total",
            "batched engine steps",
            ld64(&m.steps),
        );
        let _ = writeln!(
            out,
            "# HELP wkvc_requests_total requests finished, by reason\n# TYPE wkvc_requests_total counter"
        );
        for (reason, v) in [
            ("stop", &m.requests_stop),
            ("length", &m.requests_length),
            ("cancelled", &m.requests_cancelled),
            ("error", &m.requests_error),
            ("refused", &m.requests_refused),
        ] {
            let _ = writeln!(
                out,
                "wkvc_requests_total{{finish=\"{reason}\"}} {}",
                ld64(v)
            );
        }
        histogram(
            &mut out,
            "wkvc_time_to_first_token_seconds",
            "time from a request's arrival to its first token",
            &m.time_to_first_token,
        );
        histogram(
            &mut out,
            "wkvc_time_per_output_token_seconds",
            "time between a request's tokens",
            &m.time_per_token,
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
