//! The batching engine: one scheduler thread serves many requests on one [`Engine`]. Every
//! iteration runs **one decode step for every running request at once**
//! ([`Backend::decode_batch`](crate::backend::Backend::decode_batch): each weight is read once for the
//! whole batch, attention runs per request over its own cache) and admits waiting requests whose KV
//! cache fits in the memory set aside for caches. A new request's prefill pauses between the pieces
//! of every layer and lets the running requests take their decode steps there, so a long prompt
//! does not freeze the streams already running. Every front end — the Triton backend, `fastkv serve`,
//! `fastkv bench --concurrency` — submits here; stop strings, sampling, cancellation and what is
//! measured are decided once, here and in the session's `Generation`.
//!
//! Admission is exact: a request's cache size follows from its policy and prompt length before its
//! prefill ([`crate::prefill::cache_bytes_bound`]), so FastKV's ~10 % caches admit about ten times the
//! requests of full KV in the same memory. Equality is the contract: a request's tokens do not depend
//! on what else is in the batch (the decode products compute every row the same whatever the batch,
//! [`crate::cpu::gemv`], and each request keeps its own sampler and seed).

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::{KvCache, Step};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::cache_bytes_bound;
use crate::session::{Generation, Output, Prepared, Request, Token};

/// Limits of a batching engine.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Bytes of KV cache — with each request's room for its new tokens — that the running requests
    /// may hold together.
    pub kv_cache_memory: usize,
    /// Requests that may wait for cache memory; beyond them `submit` refuses, retryably.
    pub max_waiting: usize,
    /// Most requests decoding at once.
    pub max_running: usize,
    /// How long a new request's prefill may run before the running requests get a decode step:
    /// `None`, as long as the last step took (prefill and decode share the time, so a running
    /// stream's inter-token latency stays about twice a step); longer favours the new requests' time
    /// to first token, and filling the batch, over the running streams' latency.
    pub prefill_slice: Option<Duration>,
}

impl Config {
    /// Defaults for `engine`: for caches, half the memory its device has free now (after the
    /// weights); at most 64 requests running and 256 waiting; prefill and decode sharing the time.
    pub fn for_engine(engine: &Engine) -> Self {
        Limits::default().config(engine)
    }
}

/// A [`Config`] as a front end takes it (flags, options), before the engine is loaded: the cache
/// memory may be left to the engine.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `None`: half the memory the engine's device has free after loading the weights.
    pub kv_cache_memory: Option<usize>,
    pub max_waiting: usize,
    pub max_running: usize,
    pub prefill_slice: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { kv_cache_memory: None, max_waiting: 256, max_running: 64, prefill_slice: None }
    }
}

impl Limits {
    pub fn config(&self, engine: &Engine) -> Config {
        Config {
            kv_cache_memory: self.kv_cache_memory.unwrap_or_else(|| engine.backend.free_memory() / 2),
            max_waiting: self.max_waiting,
            max_running: self.max_running,
            prefill_slice: self.prefill_slice,
        }
    }
}

/// What a request's submitter receives, in order: tokens as they are generated, then one `Done`
/// or one `Failed`.
#[derive(Debug)]
pub enum Event {
    Token(Token),
    /// Boxed: tokens are most of the events, and stay small.
    Done(Box<Output>),
    Failed(Error),
}

/// Where a request's events go. Called on the scheduler's thread, so it must not block; returning
/// `Break` (its client is gone) cancels the request.
pub trait Sink: Send {
    fn send(&mut self, event: Event) -> ControlFlow<()>;
}

impl<F: FnMut(Event) -> ControlFlow<()> + Send> Sink for F {
    fn send(&mut self, event: Event) -> ControlFlow<()> {
        self(event)
    }
}

/// Receives what the scheduler measures, as it happens, for a front end to export.
pub trait Observer: Send + Sync {
    /// A request's first token, `ttft_s` after it was submitted.
    fn first_token(&self, _ttft_s: f64) {}
    /// A further token, `itl_s` after the previous one of its request.
    fn next_token(&self, _itl_s: f64) {}
    /// A request ended, `e2e_s` after it was submitted.
    fn finished(&self, _output: &Output, _e2e_s: f64) {}
    /// A request ended in `error` — [`Error::Cancelled`] for one cancelled before its first token.
    fn failed(&self, _error: &Error) {}
}

/// An observer that keeps nothing.
pub struct Unobserved;

impl Observer for Unobserved {}

/// The engine's state and totals so far.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Stats {
    /// Requests prefilling or decoding.
    pub running: usize,
    pub waiting: usize,
    /// Bytes set aside for the caches of the running requests (their reserve for new tokens too).
    pub cache_bytes_reserved: usize,
    pub cache_bytes_limit: usize,
    /// K and V the running requests' caches hold, and what full caches of their prompts would.
    pub cache_bytes_held: usize,
    pub cache_bytes_full: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Token rows TSP kept out of the layers after ℓ*, summed over those layers.
    pub prefill_tokens_skipped: u64,
    pub decode_steps: u64,
    /// Tokens decoded in batched steps, and the seconds those steps took: their ratio is the
    /// batched decode throughput.
    pub decoded_tokens: u64,
    pub decode_seconds: f64,
    pub requests_finished: u64,
    /// Requests that ended in an error, those cancelled before their first token included.
    pub requests_failed: u64,
}

/// Lets a submitter cancel its request; cancelling after the end does nothing.
#[derive(Clone)]
pub struct Ticket {
    cancel: Arc<AtomicBool>,
}

impl Ticket {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A request's events as an iterator, for callers with a thread to wait on (tests, benchmarks);
/// dropping it cancels the request.
pub struct Stream {
    events: mpsc::Receiver<Event>,
    ticket: Ticket,
}

impl Iterator for Stream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.events.recv().ok()
    }
}

impl Stream {
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// Waits for the end: the output, or the request's error.
    pub fn finish(self) -> Result<Output> {
        for event in self.events.iter() {
            match event {
                Event::Token(_) => {}
                Event::Done(out) => return Ok(*out),
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::ShuttingDown)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.ticket.cancel();
    }
}

/// A request waiting for memory.
struct Submission {
    request: Request,
    policy: Policy,
    prompt: Prepared,
    bytes: usize,
    sink: Box<dyn Sink>,
    cancel: Arc<AtomicBool>,
    arrived: Instant,
}

struct Queue {
    waiting: VecDeque<Submission>,
    /// No new requests; the thread ends once nothing is left.
    draining: bool,
    /// Everything left is cancelled and the thread ends.
    stop: bool,
}

struct Shared {
    engine: Arc<Engine>,
    config: Config,
    observer: Arc<dyn Observer>,
    queue: Mutex<Queue>,
    wake: Condvar,
    running: AtomicUsize,
    reserved: AtomicUsize,
    held: AtomicUsize,
    full: AtomicUsize,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    skipped: AtomicU64,
    steps: AtomicU64,
    decoded: AtomicU64,
    decode_micros: AtomicU64,
    finished: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends a request in `error`: counted, observed, sent.
    fn fail(&self, sink: &mut dyn Sink, error: Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.observer.failed(&error);
        let _ = sink.send(Event::Failed(error));
    }
}

/// The batching engine: its scheduler thread, and the handle requests are submitted through.
/// Dropping it cancels what is left and waits for the thread.
pub struct Scheduler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler thread on `engine`.
    pub fn start(engine: Arc<Engine>, config: Config, observer: Arc<dyn Observer>) -> Self {
        let shared = Arc::new(Shared {
            engine,
            config,
            observer,
            queue: Mutex::new(Queue { waiting: VecDeque::new(), draining: false, stop: false }),
            wake: Condvar::new(),
            running: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            full: AtomicUsize::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
            decode_micros: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fastkv-scheduler".into())
            .spawn(move || Loop::new(&worker).run())
            .expect("spawn the scheduler thread");
        Scheduler { shared, thread: Some(thread) }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Checks and tokenizes `request` on the calling thread — a bad request fails here, at once,
    /// without touching the others — and queues it; its events go to `sink`. Refused when the queue
    /// is full ([`Error::QueueFull`], retryable), while shutting down, or when its cache could never
    /// fit in the engine's cache memory.
    pub fn submit(&self, request: Request, sink: impl Sink + 'static) -> Result<Ticket> {
        let shared = &self.shared;
        let engine = &shared.engine;
        let policy = request.policy.unwrap_or_else(|| engine.default_policy());
        let prompt = engine.prepare(&request)?;
        engine.backend.check(&policy, prompt.ids.len())?;
        let element = engine.backend.kv_element_bytes();
        let bytes = cache_bytes_bound(engine.spec(), &policy, prompt.ids.len(), prompt.max_new, element);
        if bytes > shared.config.kv_cache_memory {
            return Err(Error::invalid(
                "max_new_tokens",
                format!(
                    "this request's KV cache needs {:.1} MB ({} prompt tokens, {} new, method {}); the engine sets \
                     aside {:.1} MB for caches: shorten the prompt or max_new_tokens, or compress more",
                    bytes as f64 / 1e6,
                    prompt.ids.len(),
                    prompt.max_new,
                    policy.method.name(),
                    shared.config.kv_cache_memory as f64 / 1e6
                ),
            ));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let submission = Submission {
            request,
            policy,
            prompt,
            bytes,
            sink: Box::new(sink),
            cancel: cancel.clone(),
            arrived: Instant::now(),
        };
        let mut queue = shared.lock();
        if queue.draining || queue.stop {
            return Err(Error::ShuttingDown);
        }
        if queue.waiting.len() >= shared.config.max_waiting {
            return Err(Error::QueueFull { waiting: queue.waiting.len() });
        }
        queue.waiting.push_back(submission);
        shared.wake.notify_all();
        Ok(Ticket { cancel })
    }

    /// [`Scheduler::submit`] with the events delivered to a [`Stream`].
    pub fn submit_stream(&self, request: Request) -> Result<Stream> {
        let (tx, events) = mpsc::channel();
        let sink = move |e: Event| if tx.send(e).is_ok() { ControlFlow::Continue(()) } else { ControlFlow::Break(()) };
        Ok(Stream { ticket: self.submit(request, sink)?, events })
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            running: s.running.load(Ordering::Relaxed),
            waiting: s.lock().waiting.len(),
            cache_bytes_reserved: s.reserved.load(Ordering::Relaxed),
            cache_bytes_limit: s.config.kv_cache_memory,
            cache_bytes_held: s.held.load(Ordering::Relaxed),
            cache_bytes_full: s.full.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            prefill_tokens_skipped: s.skipped.load(Ordering::Relaxed),
            decode_steps: s.steps.load(Ordering::Relaxed),
            decoded_tokens: s.decoded.load(Ordering::Relaxed),
            decode_seconds: s.decode_micros.load(Ordering::Relaxed) as f64 / 1e6,
            requests_finished: s.finished.load(Ordering::Relaxed),
            requests_failed: s.failed.load(Ordering::Relaxed),
        }
    }

    /// Takes no new requests and lets those submitted finish, for at most `deadline`; then cancels
    /// what is left. Returns whether everything finished in time.
    pub fn drain(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        let mut queue = self.shared.lock();
        queue.draining = true;
        self.shared.wake.notify_all();
        loop {
            let idle = queue.waiting.is_empty() && self.shared.running.load(Ordering::Relaxed) == 0;
            let now = Instant::now();
            if idle || now >= until {
                queue.stop = true;
                self.shared.wake.notify_all();
                return idle;
            }
            queue = self.shared.wake.wait_timeout(queue, (until - now).min(Duration::from_millis(50))).unwrap().0;
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        {
            let mut queue = self.shared.lock();
            queue.stop = true;
            self.shared.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request that is decoding.
struct Running<'e> {
    gen: Generation<'e>,
    cache: KvCache,
    sink: Box<dyn Sink>,
    cancel: Arc<AtomicBool>,
    bytes: usize,
    held: usize,
    full: usize,
    arrived: Instant,
    last_token: Instant,
}

/// The scheduler thread's state.
struct Loop<'s> {
    shared: &'s Shared,
    running: Vec<Running<'s>>,
    /// When the last decode step ended, and how long it took: a pending prefill gives the running
    /// requests a step whenever it has run for as long as a step takes.
    last_step: Instant,
    step_time: Duration,
}

/// The shortest stretch of prefill between two decode steps.
const MIN_PREFILL_SLICE: Duration = Duration::from_millis(5);

impl<'s> Loop<'s> {
    fn new(shared: &'s Shared) -> Self {
        Loop { shared, running: Vec::new(), last_step: Instant::now(), step_time: Duration::ZERO }
    }

    fn run(mut self) {
        loop {
            match self.next_admission() {
                Admit::Request(submission) => self.admit(*submission),
                Admit::Stop => break,
                Admit::Nothing if self.running.is_empty() => self.wait(),
                Admit::Nothing => {}
            }
            self.step();
        }
        let left = std::mem::take(&mut self.running);
        for r in left {
            self.end(r, None);
        }
        let mut queue = self.shared.lock();
        for mut s in queue.waiting.drain(..) {
            self.shared.fail(&mut *s.sink, Error::ShuttingDown);
        }
    }

    /// The next waiting request whose cache fits, dropping cancelled ones; `Stop` once stopping,
    /// or draining with nothing left.
    fn next_admission(&mut self) -> Admit {
        let shared = self.shared;
        let mut queue = shared.lock();
        if queue.stop || (queue.draining && queue.waiting.is_empty() && self.running.is_empty()) {
            return Admit::Stop;
        }
        queue.waiting.retain_mut(|s| {
            let cancelled = s.cancel.load(Ordering::Relaxed);
            if cancelled {
                shared.fail(&mut *s.sink, Error::Cancelled);
            }
            !cancelled
        });
        let reserved = shared.reserved.load(Ordering::Relaxed);
        match queue.waiting.front() {
            Some(s)
                if self.running.len() < shared.config.max_running
                    && reserved + s.bytes <= shared.config.kv_cache_memory =>
            {
                Admit::Request(Box::new(queue.waiting.pop_front().expect("front exists")))
            }
            _ => Admit::Nothing,
        }
    }

    /// Sleeps until a request arrives or the scheduler stops.
    fn wait(&self) {
        let queue = self.shared.lock();
        if queue.waiting.is_empty() && !queue.stop && !queue.draining {
            drop(self.shared.wake.wait_timeout(queue, Duration::from_millis(200)));
        }
    }

    /// Prefills `s`, pausing for decode steps of the running requests, and starts it decoding.
    fn admit(&mut self, mut s: Submission) {
        let shared = self.shared;
        let engine: &'s Engine = &shared.engine;
        // Running from here: a drain waits for a request in its prefill as for one decoding.
        shared.reserved.fetch_add(s.bytes, Ordering::Relaxed);
        shared.running.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let cancel = s.cancel.clone();
        let prefill = {
            // The piece that just ended predicts the next: the running requests get their step
            // before a piece would take the prefill past its slice, not after.
            let mut piece_start = Instant::now();
            let mut pause = || -> Result<()> {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let slice = shared.config.prefill_slice.unwrap_or(self.step_time.max(MIN_PREFILL_SLICE));
                let piece = piece_start.elapsed();
                if !self.running.is_empty() && self.last_step.elapsed() + piece >= slice {
                    self.step();
                }
                piece_start = Instant::now();
                Ok(())
            };
            engine.backend.prefill_pausing(&s.prompt.ids, &s.policy, s.prompt.max_new, &mut pause)
        };
        let prefill_s = started.elapsed().as_secs_f64();
        let prompt_len = s.prompt.ids.len();
        let begun = prefill.and_then(|prefill| {
            let skipped: usize = prefill.seq_lens.iter().map(|&n| prompt_len - n.min(prompt_len)).sum();
            shared.skipped.fetch_add(skipped as u64, Ordering::Relaxed);
            Generation::new(engine, &s.request, s.policy, s.prompt, prefill, (s.arrived, prefill_s))
        });
        let (gen, cache) = match begun {
            Ok(g) => g,
            Err(e) => {
                shared.reserved.fetch_sub(s.bytes, Ordering::Relaxed);
                shared.running.fetch_sub(1, Ordering::Relaxed);
                shared.fail(&mut *s.sink, e);
                return;
            }
        };
        shared.prompt_tokens.fetch_add(prompt_len as u64, Ordering::Relaxed);
        let spec = engine.spec();
        let full =
            2 * spec.num_layers * prompt_len * spec.num_kv_heads * spec.head_dim * engine.backend.kv_element_bytes();
        let held = cache.bytes();
        shared.held.fetch_add(held, Ordering::Relaxed);
        shared.full.fetch_add(full, Ordering::Relaxed);
        let now = Instant::now();
        let mut r = Running {
            gen,
            cache,
            sink: s.sink,
            cancel: s.cancel,
            bytes: s.bytes,
            held,
            full,
            arrived: s.arrived,
            last_token: now,
        };
        match self.sample(&mut r, true) {
            Ok(()) if !r.gen.is_finished() => self.running.push(r),
            Ok(()) => self.end(r, None),
            Err(e) => self.end(r, Some(e)),
        }
    }

    /// One decode step for every running request, then each samples its next token.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let started = Instant::now();
        let shared = self.shared;
        let decoded = {
            let mut steps: Vec<Step> = self
                .running
                .iter_mut()
                .map(|r| {
                    let (token, position) = r.gen.to_decode().expect("a running request has a token to decode");
                    Step { token, position, cache: &mut r.cache }
                })
                .collect();
            shared.engine.backend.decode_batch(&mut steps)
        };
        shared.steps.fetch_add(1, Ordering::Relaxed);
        shared.decoded.fetch_add(self.running.len() as u64, Ordering::Relaxed);
        shared.decode_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut all = std::mem::take(&mut self.running);
        match decoded {
            Err(e) => {
                // The step failed for all of them (a device error): each gets the message.
                let message = e.to_string();
                for r in all {
                    let e = Error::Device {
                        backend: "batch",
                        operation: "decode step".into(),
                        code: None,
                        message: message.clone(),
                    };
                    self.end(r, Some(e));
                }
            }
            Ok(logits) => {
                for (mut r, logits) in all.drain(..).zip(logits) {
                    r.gen.accept(logits);
                    match self.sample(&mut r, false) {
                        Ok(()) if !r.gen.is_finished() => self.running.push(r),
                        Ok(()) => self.end(r, None),
                        Err(e) => self.end(r, Some(e)),
                    }
                }
            }
        }
        self.last_step = Instant::now();
        self.step_time = self.last_step - started;
    }

    /// Samples `r`'s next token and sends it; a gone client or a cancellation ends the request.
    fn sample(&self, r: &mut Running, first: bool) -> Result<()> {
        if r.cancel.load(Ordering::Relaxed) {
            r.gen.cancel();
            return Ok(());
        }
        if let Some(token) = r.gen.sample()? {
            let now = Instant::now();
            match first {
                true => self.shared.observer.first_token((now - r.arrived).as_secs_f64()),
                false => self.shared.observer.next_token((now - r.last_token).as_secs_f64()),
            }
            r.last_token = now;
            self.shared.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if r.sink.send(Event::Token(token)).is_break() {
                r.gen.cancel();
            }
        }
        Ok(())
    }

    /// Ends `r`: frees its cache and sends its output, or `error`.
    fn end(&self, r: Running, error: Option<Error>) {
        let shared = self.shared;
        let Running { gen, cache, mut sink, bytes, held, full, arrived, .. } = r;
        drop(cache);
        shared.reserved.fetch_sub(bytes, Ordering::Relaxed);
        shared.held.fetch_sub(held, Ordering::Relaxed);
        shared.full.fetch_sub(full, Ordering::Relaxed);
        shared.running.fetch_sub(1, Ordering::Relaxed);
        match error {
            Some(e) => shared.fail(&mut *sink, e),
            None => {
                let output = gen.finish();
                shared.finished.fetch_add(1, Ordering::Relaxed);
                shared.observer.finished(&output, arrived.elapsed().as_secs_f64());
                let _ = sink.send(Event::Done(Box::new(output)));
            }
        }
        shared.wake.notify_all();
    }
}

enum Admit {
    Request(Box<Submission>),
    Nothing,
    Stop,
}
