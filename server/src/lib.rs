//! `fastkv serve`: an OpenAI-compatible HTTP server on fastkv's batching engine
//! ([`fastkv::scheduler`]), on tokio and axum. It speaks the API every OpenAI client already
//! speaks — `/v1/chat/completions`, `/v1/completions` (streamed as server-sent events or not),
//! `/v1/models` — with FastKV's compression per request, and serves `/health`, `/metrics`
//! (Prometheus) and `/openapi.json`.
//!
//! The core library stays synchronous; this crate only moves requests in and tokens out: a request
//! is checked and submitted on a blocking thread (tokenizing may take a while), its events come back
//! from the scheduler's thread through a channel, and a client that goes away drops that channel, which
//! cancels its request at the next step. The port answers at once — `/health` says 503 until the
//! engine is loaded — and SIGTERM or SIGINT stops accepting requests, lets running ones finish within
//! a deadline, and exits.

mod api;
mod error;
mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fastkv::scheduler::{Event, Scheduler, Ticket};
use fastkv::{Device, Engine, Output, Overrides};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use api::{ChatRequest, CompletionRequest, Limits, Shape};
pub use error::ApiError;
use metrics::Metrics;

/// How `fastkv serve` runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub engine: PathBuf,
    pub device: Device,
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer <key>` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// The model name clients ask for (default: the engine directory's name).
    pub served_model_name: Option<String>,
    /// The policy of requests without a `fastkv` object, over the engine's default; a request's own
    /// object applies over it.
    pub policy: Overrides,
    /// The batching engine's limits.
    pub limits: fastkv::scheduler::Limits,
    /// `max_tokens` of a request that names none.
    pub default_max_tokens: usize,
    pub max_body_bytes: usize,
    /// How long running requests may take to finish after SIGTERM / SIGINT.
    pub shutdown_timeout: Duration,
    /// Silence in a stream after which an SSE comment goes out, so that proxies keep a long
    /// prefill's connection open; `None`: never (some clients mis-parse comments).
    pub keep_alive: Option<Duration>,
}

/// Where the server is: loading the engine, serving, or draining before it exits.
enum Phase {
    Starting,
    Ready(Arc<Scheduler>),
    Draining(Arc<Scheduler>),
    Failed(String),
}

struct App {
    phase: RwLock<Phase>,
    model: String,
    api_key: Option<String>,
    limits: Limits,
    max_body: usize,
    metrics: Arc<Metrics>,
    created: u64,
    keep_alive: Option<Duration>,
}

impl App {
    fn new(options: &Options) -> Self {
        let model = options.served_model_name.clone().unwrap_or_else(|| {
            options.engine.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "fastkv".into())
        });
        App {
            phase: RwLock::new(Phase::Starting),
            model,
            api_key: options.api_key.clone(),
            limits: Limits { default_max_tokens: options.default_max_tokens },
            max_body: options.max_body_bytes,
            metrics: Arc::new(Metrics::new()),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            keep_alive: options.keep_alive,
        }
    }

    fn set(&self, phase: Phase) {
        *self.phase.write().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// The scheduler, while the server takes requests.
    fn scheduler(&self) -> Result<Arc<Scheduler>, ApiError> {
        match &*self.phase.read().unwrap_or_else(|e| e.into_inner()) {
            Phase::Ready(s) => Ok(s.clone()),
            Phase::Starting => Err(ApiError::unavailable("The engine is still loading; retry shortly")),
            Phase::Draining(_) => Err(ApiError::unavailable("The server is shutting down")),
            Phase::Failed(e) => Err(ApiError::unavailable(format!("The engine failed to load: {e}"))),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(k) if k.trim() == key => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// The routes, on `app`.
fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, ..ApiError::invalid(None, "no such route") } })
        .with_state(app)
}

/// Loads the engine, starts the batching engine and serves until SIGTERM / SIGINT; then drains.
pub async fn serve(options: Options) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((options.host.as_str(), options.port))
        .await
        .with_context(|| format!("cannot listen on {}:{} (--host, --port)", options.host, options.port))?;
    let addr: SocketAddr = listener.local_addr()?;
    let app = Arc::new(App::new(&options));
    eprintln!("fastkv serve: listening on http://{addr}, model `{}`; loading {}", app.model, options.engine.display());
    let (failed_tx, mut failed) = mpsc::channel::<String>(1);
    {
        let (app, options) = (app.clone(), options.clone());
        tokio::task::spawn_blocking(move || match load(&app, &options) {
            Ok(s) => {
                let c = s.config();
                let device = match options.device {
                    Device::Cpu => format!("cpu, path {}", fastkv::cpu::isa::describe()),
                    d => d.to_string(),
                };
                eprintln!(
                    "fastkv serve: ready ({} on {device}, {:.0} MB of KV cache, {} requests at once)",
                    app.model,
                    c.kv_cache_memory as f64 / 1e6,
                    c.max_running
                );
                app.set(Phase::Ready(Arc::new(s)));
            }
            Err(e) => {
                let message = e.cli_message();
                app.set(Phase::Failed(message.clone()));
                let _ = failed_tx.try_send(message);
            }
        });
    }
    let shutdown = {
        let app = app.clone();
        let timeout = options.shutdown_timeout;
        async move {
            tokio::select! {
                _ = stop_signal() => {}
                Some(_) = failed.recv() => return,
            }
            let scheduler = match &*app.phase.read().unwrap_or_else(|e| e.into_inner()) {
                Phase::Ready(s) => Some(s.clone()),
                _ => None,
            };
            let Some(scheduler) = scheduler else { return };
            eprintln!("fastkv serve: shutting down; running requests have {timeout:?} to finish");
            app.set(Phase::Draining(scheduler.clone()));
            let finished = tokio::task::spawn_blocking(move || scheduler.drain(timeout)).await.unwrap_or(false);
            if !finished {
                eprintln!("fastkv serve: requests still running after {timeout:?} were cancelled");
            }
        }
    };
    axum::serve(listener, router(app.clone())).with_graceful_shutdown(shutdown).await?;
    let failed = match &*app.phase.read().unwrap_or_else(|e| e.into_inner()) {
        Phase::Failed(e) => Some(e.clone()),
        _ => None,
    };
    match failed {
        Some(e) => anyhow::bail!("{e}"),
        None => {
            eprintln!("fastkv serve: stopped");
            Ok(())
        }
    }
}

fn load(app: &App, options: &Options) -> fastkv::Result<Scheduler> {
    let mut engine = Engine::open_on(&options.engine, options.device)?;
    engine.manifest.fastkv = options.policy.apply(engine.default_policy(), engine.spec())?;
    let config = options.limits.config(&engine);
    Ok(Scheduler::start(Arc::new(engine), config, app.metrics.clone()))
}

async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let (status, state) = match &*app.phase.read().unwrap_or_else(|e| e.into_inner()) {
        Phase::Ready(_) => (StatusCode::OK, "ok"),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Phase::Draining(_) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Phase::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
    };
    (status, Json(json!({ "status": state }))).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let stats = match &*app.phase.read().unwrap_or_else(|e| e.into_inner()) {
        Phase::Ready(s) | Phase::Draining(s) => Some(s.stats()),
        _ => None,
    };
    let text = app.metrics.render(stats);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The OpenAPI document, with what this server takes filled in: its one model as the only value of
/// `model`, the largest token id of its vocabulary and the last layer of its model.
async fn openapi(State(app): State<Arc<App>>) -> Response {
    let mut doc: Value = serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is valid JSON");
    let schemas = &mut doc["components"]["schemas"];
    for schema in ["ChatCompletionRequest", "CompletionRequest"] {
        schemas[schema]["properties"]["model"]["enum"] = json!([app.model]);
    }
    if let Ok(s) = app.scheduler() {
        let spec = s.engine().spec();
        let last = spec.vocab_size.saturating_sub(1);
        let prompt = &mut schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"];
        prompt[2]["items"]["maximum"] = json!(last);
        prompt[3]["items"]["items"]["maximum"] = json!(last);
        for layer in ["tsp_layer", "filter_layer"] {
            schemas["Policy"]["properties"][layer]["maximum"] = json!(spec.num_layers.saturating_sub(1));
        }
    }
    Json(doc).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return e.into_response();
    }
    let model = json!({ "id": app.model, "object": "model", "created": app.created, "owned_by": "fastkv" });
    Json(json!({ "object": "list", "data": [model] })).into_response()
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, Kind::Completion).await.unwrap_or_else(IntoResponse::into_response)
}

/// Checks, submits and answers one generation request.
async fn generate(app: Arc<App>, headers: HeaderMap, body: Body, kind: Kind) -> Result<Response, ApiError> {
    app.authorize(&headers)?;
    let scheduler = app.scheduler()?;
    let bytes = axum::body::to_bytes(body, app.max_body).await.map_err(|_| ApiError::too_large(app.max_body))?;
    let engine = scheduler.engine().clone();
    let (model, parsed) = match kind {
        Kind::Chat => {
            let r = ChatRequest::parse(&bytes)?;
            (r.common.model.clone(), r.request(&engine, &app.limits))
        }
        Kind::Completion => {
            let r = CompletionRequest::parse(&bytes)?;
            (r.common.model.clone(), r.request(&engine, &app.limits))
        }
    };
    if model != app.model {
        return Err(ApiError::unknown_model(&model, &app.model));
    }
    let (request, shape) = parsed?;
    let (tx, mut events) = mpsc::unbounded_channel();
    let sink = move |e: Event| if tx.send(e).is_ok() { ControlFlow::Continue(()) } else { ControlFlow::Break(()) };
    let submitted = {
        let scheduler = scheduler.clone();
        tokio::task::spawn_blocking(move || scheduler.submit(request, sink))
            .await
            .map_err(|e| ApiError::internal(format!("the submitting task failed: {e}")))?
    };
    let cancel = Cancel(submitted.map_err(|e| ApiError::from_library(&e, None))?);
    let reply = Reply {
        id: format!("{}-{:024x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, rand::random::<u128>() >> 32),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: app.model.clone(),
        kind,
        engine,
    };
    if shape.stream {
        return Ok(stream(reply, shape, events, cancel, app.keep_alive));
    }
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(t) => {
                if let Some(lp) = &t.logprob {
                    logprobs.push((t.id, lp.clone()));
                }
            }
            Event::Done(out) => return Ok(Json(reply.whole(&out, &logprobs, &shape)).into_response()),
            Event::Failed(e) => return Err(ApiError::from_library(&e, None)),
        }
    }
    Err(ApiError::internal("the request ended without an answer"))
}

/// Cancels its request when dropped: with the handler or stream of a client that went away, the
/// request ends at its next step, or leaves the queue.
struct Cancel(Ticket);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What every response object of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    engine: Arc<Engine>,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices })
    }

    /// The non-streamed response.
    fn whole(&self, out: &Output, logprobs: &[(u32, fastkv::Logprob)], shape: &Shape) -> Value {
        let lp = shape.logprobs.is_some().then(|| self.logprobs(logprobs));
        let mut choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": out.text },
                "logprobs": lp,
                "finish_reason": api::finish_reason(out),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": out.text,
                "logprobs": lp,
                "finish_reason": api::finish_reason(out),
            }),
        };
        if shape.token_ids {
            choice["token_ids"] = json!(out.token_ids);
        }
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = api::usage(out);
        v["fastkv"] = api::extension(out);
        v
    }

    /// The `logprobs` object of some tokens: chat's `content` list, or the completions API's lists.
    fn logprobs(&self, tokens: &[(u32, fastkv::Logprob)]) -> Value {
        match self.kind {
            Kind::Chat => {
                json!({ "content": tokens.iter().map(|(id, lp)| api::chat_logprob(&self.engine, *id, lp)).collect::<Vec<_>>() })
            }
            Kind::Completion => {
                let text = |id: u32| api::token_text(&self.engine, id).0;
                json!({
                    "tokens": tokens.iter().map(|(id, _)| text(*id)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|(_, lp)| {
                        lp.top.iter().map(|&(t, l)| (text(t), json!(l))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                })
            }
        }
    }

    /// A streamed chunk carrying `text` (and the logprobs and, when asked, the id of the token that
    /// released it).
    fn chunk(&self, text: &str, logprobs: Option<Value>, ids: Option<&[u32]>, finish: Option<&str>) -> Value {
        let mut choice = match self.kind {
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({ "content": text }) };
                json!({ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
            Kind::Completion => json!({ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish }),
        };
        if let Some(ids) = ids {
            choice["token_ids"] = json!(ids);
        }
        self.envelope(true, json!([choice]))
    }
}

/// The server-sent events of a streamed request: a task turns fastkv's events into chunks; when the
/// client goes away, the response (and with it the task's channel) is dropped, and the task ends,
/// cancelling the request.
fn stream(
    reply: Reply,
    shape: Shape,
    mut events: mpsc::UnboundedReceiver<Event>,
    cancel: Cancel,
    keep_alive: Option<Duration>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Sse, Infallible>>(64);
    tokio::spawn(async move {
        let _cancel = cancel;
        let send = |v: Value| tx.send(Ok(Sse::default().data(v.to_string())));
        let with_usage = |mut v: Value| {
            if shape.include_usage {
                v["usage"] = Value::Null;
            }
            v
        };
        if reply.kind == Kind::Chat {
            let first = reply.envelope(
                true,
                json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]),
            );
            if send(with_usage(first)).await.is_err() {
                return;
            }
        }
        let mut sent = 0usize;
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = tx.closed() => return,
            };
            let Some(event) = event else { break };
            let chunk = match event {
                Event::Token(t) => {
                    let lp = t.logprob.as_ref().map(|lp| reply.logprobs(&[(t.id, lp.clone())]));
                    if t.text.is_empty() && lp.is_none() && !shape.token_ids {
                        continue;
                    }
                    sent += t.text.len();
                    reply.chunk(&t.text, lp, shape.token_ids.then_some(&[t.id][..]), None)
                }
                Event::Done(out) => {
                    let rest = out.text.get(sent..).unwrap_or("");
                    let mut last =
                        reply.chunk(rest, None, shape.token_ids.then_some(&[][..]), Some(api::finish_reason(&out)));
                    last["fastkv"] = api::extension(&out);
                    if send(with_usage(last)).await.is_err() {
                        return;
                    }
                    if shape.include_usage {
                        let mut usage = reply.envelope(true, json!([]));
                        usage["usage"] = api::usage(&out);
                        let _ = send(usage).await;
                    }
                    break;
                }
                Event::Failed(e) => {
                    let _ = send(ApiError::from_library(&e, None).body()).await;
                    break;
                }
            };
            if send(with_usage(chunk)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Sse::default().data("[DONE]"))).await;
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(rx);
    let sse = axum::response::Sse::new(body);
    match keep_alive {
        Some(interval) => sse.keep_alive(KeepAlive::new().interval(interval)).into_response(),
        None => sse.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            engine: "engines/none".into(),
            device: Device::Cpu,
            host: "127.0.0.1".into(),
            port: 0,
            api_key: Some("secret".into()),
            served_model_name: None,
            policy: Overrides::default(),
            limits: fastkv::scheduler::Limits { max_waiting: 4, max_running: 4, ..Default::default() },
            default_max_tokens: 16,
            max_body_bytes: 1024,
            shutdown_timeout: Duration::from_secs(1),
            keep_alive: None,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// Before the engine is loaded, health and every generation answer 503 (with Retry-After).
    #[test]
    fn a_starting_server_answers_503() {
        let app = Arc::new(App::new(&options()));
        runtime().block_on(async {
            let health = health(State(app.clone())).await;
            assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
            let r = chat(State(app.clone()), headers, Body::from("{}")).await;
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(r.headers().contains_key(header::RETRY_AFTER));
        });
    }

    #[test]
    fn a_wrong_or_missing_key_is_401_before_anything_else() {
        let app = Arc::new(App::new(&options()));
        runtime().block_on(async {
            for value in [None, Some("Bearer wrong"), Some("secret")] {
                let mut headers = HeaderMap::new();
                if let Some(v) = value {
                    headers.insert(header::AUTHORIZATION, v.parse().unwrap());
                }
                let r = completions(State(app.clone()), headers, Body::from("{}")).await;
                assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{value:?}");
            }
        });
    }
}
