//! `wkvc serve`: an OpenAI-compatible HTTP server (axum on tokio) over the runtime's
//! continuous-batching scheduler (`wkvc_runtime::scheduler`). This layer only speaks HTTP:
//! request and response bodies, server-sent events, the API key, Prometheus metrics; the
//! batching, sampling, stop conditions and detokenization are the scheduler's.
//!
//! The listener is up before the plan is loaded: `/health` answers 503 until the engine is
//! ready, 200 after. SIGINT or SIGTERM stops admitting (new requests get 503), lets running
//! requests finish for the grace period, cancels what is left and exits 0.

pub mod api;
mod metrics;
pub mod request;

use crate::args::ServeArgs;
use crate::common::{make_engine, open};
use anyhow::{Context, Result, bail};
use api::{ApiError, Sampling, Usage};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use wkvc_runtime::Model;
use wkvc_runtime::scheduler::{
    Event, FinishReason, GenRequest, Scheduler, SchedulerOptions, SubmitError,
};

/// Largest request body accepted.
const BODY_LIMIT: usize = 1 << 20;

/// What the handlers need once the plan is loaded.
struct Ready {
    model: Model,
    scheduler: Scheduler,
    name: String,
    ctx: usize,
    /// the engine, described
    engine: String,
}

struct AppState {
    ready: OnceLock<Ready>,
    /// loading failed: why (health says so)
    failed: OnceLock<String>,
    draining: AtomicBool,
    api_key: Option<String>,
    next_id: AtomicU64,
    created: u64,
}

type Shared = Arc<AppState>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down", None));
        }
        self.ready
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is loading: retry shortly", Some(1)))
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(_), Some(_)) => bail!("give --api-key or --api-key-file, not both"),
        (Some(k), None) => Some(k.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the API key file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if api_key.as_deref() == Some("") {
        bail!("the API key is empty");
    }
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(a, api_key))
}

async fn serve(a: ServeArgs, api_key: Option<String>) -> Result<()> {
    let state: Shared = Arc::new(AppState {
        ready: OnceLock::new(),
        failed: OnceLock::new(),
        draining: AtomicBool::new(false),
        api_key,
        next_id: AtomicU64::new(1),
        created: now_secs(),
    });
    let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    let addr = listener.local_addr().context("listener address")?;
    eprintln!(
        "wkvc serve: listening on http://{addr} (loading {})",
        a.model.display()
    );
    // load in the background: /health says 503 meanwhile
    let st = state.clone();
    let load = a.clone();
    let loader = tokio::task::spawn_blocking(move || {
        let r = (|| -> Result<Ready> {
            let model = open(&load.model)?;
            let engine = make_engine(&model, &load.eng)?;
            let describe = engine.describe();
            let ctx = load.ctx.min(model.config.max_position_embeddings);
            let scheduler = Scheduler::start(
                engine,
                SchedulerOptions {
                    parallel: load.parallel,
                    ctx,
                    queue: load.queue,
                },
            )?;
            let name = load.model_name.clone().unwrap_or_else(|| {
                load.model
                    .file_stem()
                    .map_or("wkvc".into(), |s| s.to_string_lossy().into_owned())
            });
            Ok(Ready {
                model,
                scheduler,
                name,
                ctx,
                engine: describe,
            })
        })();
        match r {
            Ok(ready) => {
                eprintln!(
                    "wkvc serve: ready: model {} on {}, {} sequences of {} tokens, queue {}",
                    ready.name,
                    ready.engine,
                    ready.scheduler.options().parallel,
                    ready.ctx,
                    ready.scheduler.options().queue
                );
                let _ = st.ready.set(ready);
            }
            Err(e) => {
                eprintln!("wkvc serve: cannot load the model: {e:#}");
                let _ = st.failed.set(format!("{e:#}"));
            }
        }
    });
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::render))
        .merge(protected)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                code: Some("not_found"),
                retry_after: None,
            }
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state.clone());
    let st = state.clone();
    let grace = Duration::from_secs(a.grace);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            eprintln!(
                "wkvc serve: stopping: no new requests; running ones finish within {}s",
                grace.as_secs()
            );
            st.draining.store(true, Ordering::SeqCst);
            let st2 = st.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(r) = st2.ready.get() {
                    r.scheduler.shutdown(grace);
                }
            })
            .await;
        })
        .await
        .context("the server failed")?;
    let _ = loader.await;
    if state.ready.get().is_none() && state.failed.get().is_some() {
        bail!("the model could not be loaded");
    }
    eprintln!("wkvc serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The API key, where one is set: `Authorization: Bearer KEY`.
async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: if given.is_none() {
                    "missing API key: send Authorization: Bearer KEY".into()
                } else {
                    "invalid API key".into()
                },
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
                retry_after: None,
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(st): State<Shared>) -> Response {
    if st.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stopping"})),
        )
            .into_response();
    }
    match (st.ready.get(), st.failed.get()) {
        (Some(_), _) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        (None, Some(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "error": e})),
        )
            .into_response(),
        (None, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn models(State(st): State<Shared>) -> Result<Response, ApiError> {
    let r = st.ready()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": r.name, "object": "model", "created": st.created, "owned_by": "wkvc",
                  "max_model_len": r.ctx}],
    }))
    .into_response())
}

/// The body, or the extractor's rejection (too large, unreadable) in OpenAI's shape.
fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        let status = e.status();
        ApiError {
            status,
            message: if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("the request body exceeds {BODY_LIMIT} bytes")
            } else {
                e.body_text()
            },
            kind: "invalid_request_error",
            code: (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large"),
            retry_after: None,
        }
    })
}

async fn tokenize(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = st.ready()?;
    let body = body(b)?;
    let tok = r
        .model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let ids = request::tokenize(&body, tok)?;
    Ok(Json(json!({"tokens": ids})).into_response())
}

async fn detokenize(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = st.ready()?;
    let body = body(b)?;
    let tok = r
        .model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let text = request::detokenize(&body, tok, r.model.config.vocab_size)?;
    Ok(Json(json!({"content": text})).into_response())
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull(_) => ApiError::unavailable(e.to_string(), Some(1)),
        SubmitError::ShuttingDown => ApiError::unavailable(e.to_string(), None),
        SubmitError::TooLong { .. } => {
            ApiError::bad_request(e.to_string(), Some("context_length_exceeded"))
        }
        SubmitError::EmptyPrompt | SubmitError::BadToken(_) => {
            ApiError::bad_request(e.to_string(), None)
        }
    }
}

/// Start a request; its events arrive on the returned receiver (dropping it cancels).
fn start(r: &Ready, req: GenRequest) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    r.scheduler
        .submit(req, Box::new(move |e| tx.send(e).is_ok()))
        .map_err(submit_error)?;
    Ok(rx)
}

/// How a response is shaped: text completion or chat.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

async fn completions(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = st.ready()?;
    let body = body(b)?;
    let tok = r
        .model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (g, sampling) = request::completion(&body, tok, r.ctx)?;
    respond(&st, r, g, &sampling, Kind::Text).await
}

async fn chat(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = st.ready()?;
    let body = body(b)?;
    let tok = r
        .model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (g, sampling) = request::chat(&body, tok, r.ctx)?;
    respond(&st, r, g, &sampling, Kind::Chat).await
}

/// Run the request and answer: one JSON body, or server-sent events.
async fn respond(
    st: &Shared,
    r: &Ready,
    g: GenRequest,
    s: &Sampling,
    kind: Kind,
) -> Result<Response, ApiError> {
    let id = st.id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let model = s.model.clone().unwrap_or_else(|| r.name.clone());
    let created = now_secs();
    let mut rx = start(r, g)?;
    if s.stream == Some(true) {
        let usage_chunk = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let stream = async_stream::stream! {
            let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            let chunk = |delta: serde_json::Value, finish: Option<&str>| {
                let choice = if kind == Kind::Chat {
                    json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
                } else {
                    json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null})
                };
                json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
            };
            if kind == Kind::Chat {
                yield Ok::<_, std::convert::Infallible>(SseEvent::default().data(chunk(json!({"role": "assistant", "content": ""}), None).to_string()));
            }
            while let Some(e) = rx.recv().await {
                match e {
                    Event::Token { text, .. } => {
                        if !text.is_empty() {
                            yield Ok(SseEvent::default().data(chunk(json!({"content": text}), None).to_string()));
                        }
                    }
                    Event::Done { reason, prompt_tokens, completion_tokens, text } => {
                        if let FinishReason::Error(m) = &reason {
                            yield Ok(SseEvent::default().data(json!({"error": {"message": m, "type": "server_error", "code": null}}).to_string()));
                            break;
                        }
                        if !text.is_empty() {
                            yield Ok(SseEvent::default().data(chunk(json!({"content": text}), None).to_string()));
                        }
                        yield Ok(SseEvent::default().data(chunk(json!({}), Some(reason.name())).to_string()));
                        if usage_chunk {
                            let u = Usage::new(prompt_tokens, completion_tokens);
                            yield Ok(SseEvent::default().data(json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": u}).to_string()));
                        }
                        break;
                    }
                }
            }
            yield Ok(SseEvent::default().data("[DONE]"));
        };
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                text: t,
            } => {
                if let FinishReason::Error(m) = reason {
                    return Err(ApiError::internal(m));
                }
                if reason == FinishReason::Cancelled {
                    return Err(ApiError::unavailable(
                        "the request was cancelled (the server is stopping)",
                        None,
                    ));
                }
                text.push_str(&t);
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let body = match kind {
                    Kind::Chat => json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": reason.name(), "logprobs": null}],
                        "usage": usage,
                    }),
                    Kind::Text => json!({
                        "id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": text, "finish_reason": reason.name(), "logprobs": null}],
                        "usage": usage,
                    }),
                };
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::internal(
        "the scheduler ended the request without an answer",
    ))
}
