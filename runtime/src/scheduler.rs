//! Continuous batching: a `Scheduler` owns an engine and one worker thread that advances every
//! running request in one batched step (`Engine::step`): a prompt piece of up to `CHUNK`
//! tokens for a request still prefilling (pieces start at multiples of `CHUNK`, as when the
//! prompt runs alone), one token for each request decoding. New requests are admitted at step
//! boundaries, up to `parallel` sequences and the KV tokens those may hold (`parallel x
//! ctx`); the rest wait in a bounded queue. Sampling, stop conditions (end-of-generation
//! tokens, stop strings, the token limit) and incremental detokenization happen here, so a
//! library user gets what `wkvc serve` gets.
//!
//! A request's events go to its sink (a closure); a sink that returns false (its receiver
//! went away: a client disconnected) cancels the request at the next step, as does its
//! `CancelToken`; its session and KV cache are freed then.

use crate::engine::{BatchItem, Engine, Session};
use crate::{CancelToken, RuntimeError, Sampler, StreamDecoder};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use wkvc_passes::lower::CHUNK;

/// Limits of a scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerOptions {
    /// sequences advanced together at most
    pub parallel: usize,
    /// context of each sequence (prompt plus generated tokens)
    pub ctx: usize,
    /// requests that may wait for a free sequence; more are refused
    pub queue: usize,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// stop strings: generation ends before the first one that appears (not emitted)
    pub stop: Vec<String>,
    /// never stop at (or sample) end-of-generation tokens
    pub ignore_eos: bool,
    pub cancel: CancelToken,
}

/// Why a request ended.
#[derive(Clone, Debug, PartialEq)]
pub enum FinishReason {
    /// an end-of-generation token or a stop string
    Stop,
    /// `max_tokens`
    Length,
    /// the sink went away or the token was cancelled
    Cancelled,
    Error(String),
}

impl FinishReason {
    /// The OpenAI name (`stop`, `length`), or what else happened.
    pub fn name(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error(_) => "error",
        }
    }
}

/// What a request's sink receives.
#[derive(Clone, Debug)]
pub enum Event {
    /// a generated token and the text it completes (may be empty: held back until its UTF-8
    /// is complete or while it may be the start of a stop string)
    Token { id: u32, text: String },
    /// the end, with the token counts
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// text held back and released at the end
        text: String,
    },
}

/// Receives a request's events; returns false when nobody listens any more (cancels).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting): retry later")]
    QueueFull(usize),
    #[error(
        "the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceed the context of \
         {ctx} tokens"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        ctx: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {0} is not in the vocabulary")]
    BadToken(u32),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Bucket bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram: counts per bucket (cumulative when read), sum and count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    /// sum in microseconds
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        for (b, &le) in self.buckets.iter().zip(&LATENCY_BUCKETS) {
            if seconds <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// (upper bound, cumulative count) per bucket, then the total count and the sum in s.
    pub fn read(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let b = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&le, c)| (le, c.load(Ordering::Relaxed)))
            .collect();
        (
            b,
            self.count.load(Ordering::Relaxed),
            self.sum_us.load(Ordering::Relaxed) as f64 * 1e-6,
        )
    }
}

/// What a scheduler has done and holds now.
#[derive(Debug, Default)]
pub struct Metrics {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// KV tokens the running sequences hold now, and what the scheduler may hold at most
    pub kv_used_tokens: AtomicUsize,
    pub kv_capacity_tokens: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub requests_stop: AtomicU64,
    pub requests_length: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_error: AtomicU64,
    pub requests_refused: AtomicU64,
    pub steps: AtomicU64,
    pub time_to_first_token: Histogram,
    pub time_per_token: Histogram,
}

impl Metrics {
    /// KV cache utilisation, 0..1.
    pub fn kv_utilisation(&self) -> f64 {
        let cap = self.kv_capacity_tokens.load(Ordering::Relaxed).max(1);
        self.kv_used_tokens.load(Ordering::Relaxed) as f64 / cap as f64
    }
}

enum Msg {
    Submit(Box<GenRequest>, Sink, Instant),
    /// stop admitting; cancel what still runs at the deadline
    Shutdown(Instant),
}

/// A request in flight.
struct Running {
    req: Box<GenRequest>,
    sink: Sink,
    session: Session,
    sampler: Sampler,
    decoder: StreamDecoder,
    /// prompt tokens run so far
    prefilled: usize,
    /// the token to run next (decoding)
    next: Option<u32>,
    generated: usize,
    /// text decoded and not yet sent (a possible stop-string prefix)
    pending: String,
    submitted: Instant,
    last_token: Option<Instant>,
}

/// Continuous batching over an engine (module docs).
pub struct Scheduler {
    tx: Mutex<mpsc::Sender<Msg>>,
    metrics: Arc<Metrics>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    opts: SchedulerOptions,
    vocab: usize,
}

impl Scheduler {
    /// Start the worker thread.
    pub fn start(engine: Engine, opts: SchedulerOptions) -> Result<Scheduler, RuntimeError> {
        if opts.parallel == 0 || opts.ctx < 2 {
            return Err(RuntimeError::Invalid(format!(
                "a scheduler needs at least one sequence and a context of 2 tokens, got \
                 {} and {}",
                opts.parallel, opts.ctx
            )));
        }
        // the model's tokenizer is built here, before any request waits for it
        engine.model().tokenizer()?;
        let metrics = Arc::new(Metrics::default());
        metrics
            .kv_capacity_tokens
            .store(opts.parallel * opts.ctx, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let vocab = engine.vocab_size();
        let m = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("wkvc-scheduler".into())
            .spawn(move || Worker::new(engine, opts, m).run(rx))
            .map_err(|e| RuntimeError::Invalid(format!("cannot start the scheduler: {e}")))?;
        Ok(Scheduler {
            tx: Mutex::new(tx),
            metrics,
            worker: Mutex::new(Some(worker)),
            opts,
            vocab,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn options(&self) -> SchedulerOptions {
        self.opts
    }

    /// Queue a request; its events go to `sink`. Refused at once when it cannot fit the
    /// context or the queue is full.
    pub fn submit(&self, req: GenRequest, sink: Sink) -> Result<(), SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.prompt.len() + req.max_tokens > self.opts.ctx {
            return Err(SubmitError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                ctx: self.opts.ctx,
            });
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::BadToken(t));
        }
        let waiting = self.metrics.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.opts.queue {
            self.metrics.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics
                .requests_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull(waiting));
        }
        let tx = self.tx.lock().map_err(|_| SubmitError::ShuttingDown)?;
        tx.send(Msg::Submit(Box::new(req), sink, Instant::now()))
            .map_err(|_| {
                self.metrics.waiting.fetch_sub(1, Ordering::SeqCst);
                SubmitError::ShuttingDown
            })
    }

    /// Stop admitting; let running requests finish for up to `grace`, then cancel the rest;
    /// wait for the worker.
    pub fn shutdown(&self, grace: Duration) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Msg::Shutdown(Instant::now() + grace));
        }
        if let Ok(mut w) = self.worker.lock()
            && let Some(h) = w.take()
        {
            let _ = h.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

struct Worker {
    engine: Engine,
    opts: SchedulerOptions,
    metrics: Arc<Metrics>,
    waiting: VecDeque<(Box<GenRequest>, Sink, Instant)>,
    running: Vec<Running>,
    deadline: Option<Instant>,
}

impl Worker {
    fn new(engine: Engine, opts: SchedulerOptions, metrics: Arc<Metrics>) -> Worker {
        Worker {
            engine,
            opts,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            deadline: None,
        }
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Submit(r, s, t) => self.waiting.push_back((r, s, t)),
            Msg::Shutdown(d) => self.deadline = Some(d),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            // new messages; block when there is nothing to do
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.deadline.is_some() {
                    return;
                }
                match rx.recv() {
                    Ok(m) => self.take(m),
                    Err(_) => return,
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.take(m);
            }
            if let Some(d) = self.deadline {
                // refuse what waits; cancel what runs once the grace period is over
                while let Some((_, mut sink, _)) = self.waiting.pop_front() {
                    self.metrics.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.metrics
                        .requests_cancelled
                        .fetch_add(1, Ordering::Relaxed);
                    sink(Event::Done {
                        reason: FinishReason::Cancelled,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        text: String::new(),
                    });
                }
                if Instant::now() >= d {
                    for r in self.running.iter_mut() {
                        r.req.cancel.cancel();
                    }
                }
            }
            self.admit();
            self.step();
        }
    }

    /// Running requests' KV tokens (reserved for their whole length).
    fn reserved(&self) -> usize {
        self.running
            .iter()
            .map(|r| r.req.prompt.len() + r.req.max_tokens)
            .sum()
    }

    fn admit(&mut self) {
        let budget = self.opts.parallel * self.opts.ctx;
        while self.running.len() < self.opts.parallel {
            let Some((req, _, _)) = self.waiting.front() else {
                break;
            };
            let need = req.prompt.len() + req.max_tokens;
            if self.reserved() + need > budget {
                break;
            }
            let Some((req, sink, submitted)) = self.waiting.pop_front() else {
                break;
            };
            self.metrics.waiting.fetch_sub(1, Ordering::SeqCst);
            let sampler = Sampler::new(req.temperature, req.top_p, req.seed);
            let session = self.engine.session(need.max(1));
            self.running.push(Running {
                req,
                sink,
                session,
                sampler,
                decoder: StreamDecoder::new(),
                prefilled: 0,
                next: None,
                generated: 0,
                pending: String::new(),
                submitted,
                last_token: None,
            });
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.metrics
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.metrics.kv_used_tokens.store(
            self.running.iter().map(|r| r.session.len()).sum(),
            Ordering::Relaxed,
        );
    }

    /// One batched step of every running request, then sampling and events.
    fn step(&mut self) {
        // cancelled requests leave first
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.cancel.is_cancelled() {
                let r = self.running.swap_remove(i);
                self.finish(r, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
        if self.running.is_empty() {
            self.update_gauges();
            return;
        }
        // decoding requests first (they take one row each), then prompt pieces
        self.running.sort_by_key(|r| r.next.is_none());
        let pieces: Vec<Vec<u32>> = self
            .running
            .iter()
            .map(|r| match r.next {
                Some(t) => vec![t],
                None => {
                    let rest = &r.req.prompt[r.prefilled..];
                    rest[..rest.len().min(CHUNK)].to_vec()
                }
            })
            .collect();
        let mut batch: Vec<BatchItem> = self
            .running
            .iter_mut()
            .zip(&pieces)
            .map(|(r, p)| BatchItem::new(&mut r.session, p))
            .collect();
        let result = self.engine.step(&mut batch);
        drop(batch);
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            let msg = e.to_string();
            for r in std::mem::take(&mut self.running) {
                self.finish(r, FinishReason::Error(msg.clone()));
            }
            self.update_gauges();
            return;
        }
        let model = self.engine.model().clone();
        let tok = match model.tokenizer() {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                for r in std::mem::take(&mut self.running) {
                    self.finish(r, FinishReason::Error(msg.clone()));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut done = Vec::new();
        for (i, (r, piece)) in self.running.iter_mut().zip(&pieces).enumerate() {
            if r.next.is_none() {
                r.prefilled += piece.len();
                self.metrics
                    .prompt_tokens
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                if r.prefilled < r.req.prompt.len() {
                    continue;
                }
            }
            // a token from the last logits
            let mut logits = r.session.logits().to_vec();
            if r.req.ignore_eos {
                for &e in &tok.spec.eos_ids {
                    if let Some(l) = logits.get_mut(e as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let id = r.sampler.sample(&logits);
            match r.last_token {
                None => self
                    .metrics
                    .time_to_first_token
                    .observe(now.duration_since(r.submitted).as_secs_f64()),
                Some(t) => self
                    .metrics
                    .time_per_token
                    .observe(now.duration_since(t).as_secs_f64()),
            }
            r.last_token = Some(now);
            if !r.req.ignore_eos && tok.is_eos(id) {
                done.push((i, FinishReason::Stop));
                continue;
            }
            r.generated += 1;
            self.metrics
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            let piece = match r.decoder.push(tok, id) {
                Ok(p) => p,
                Err(e) => {
                    done.push((i, FinishReason::Error(e.to_string())));
                    continue;
                }
            };
            r.pending.push_str(&piece);
            // a stop string ends the text before it
            if let Some(at) = r
                .req
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| r.pending.find(s.as_str()))
                .min()
            {
                r.pending.truncate(at);
                done.push((i, FinishReason::Stop));
                continue;
            }
            // send what cannot be the start of a stop string
            let hold = held_back(&r.pending, &r.req.stop);
            let send: String = r.pending.drain(..r.pending.len() - hold).collect();
            if !(r.sink)(Event::Token { id, text: send }) {
                done.push((i, FinishReason::Cancelled));
                continue;
            }
            if r.generated >= r.req.max_tokens {
                done.push((i, FinishReason::Length));
                continue;
            }
            r.next = Some(id);
        }
        // finished ones leave, last index first
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let r = self.running.swap_remove(i);
            self.finish(r, reason);
        }
        self.update_gauges();
    }

    fn finish(&self, mut r: Running, reason: FinishReason) {
        let counter = match reason {
            FinishReason::Stop => &self.metrics.requests_stop,
            FinishReason::Length => &self.metrics.requests_length,
            FinishReason::Cancelled => &self.metrics.requests_cancelled,
            FinishReason::Error(_) => &self.metrics.requests_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let text = if reason == FinishReason::Cancelled {
            String::new()
        } else {
            std::mem::take(&mut r.pending)
        };
        (r.sink)(Event::Done {
            reason,
            prompt_tokens: r.req.prompt.len(),
            completion_tokens: r.generated,
            text,
        });
        // the session (and its KV cache) is freed here
    }
}

/// Bytes at the end of `text` that could be the start of one of `stop` (held back).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop.iter().filter(|s| !s.is_empty()) {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_possible_stop_prefix_is_held_back() {
        let stop = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(super::held_back("hello\n", &stop), 1);
        assert_eq!(super::held_back("hello\n\nUs", &stop), 4);
        assert_eq!(super::held_back("hello EN", &stop), 2);
        assert_eq!(super::held_back("hello", &stop), 0);
    }
}
