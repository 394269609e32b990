//! `/metrics` in Prometheus's text format (the `prometheus` crate): the scheduler's measurements —
//! time to first token, inter-token latency and end-to-end latency as histograms, requests by how
//! they finished — recorded as they happen ([`Metrics`] is the scheduler's [`Observer`]), and its
//! state — running and waiting requests, cache bytes reserved, held, limited, and what full caches
//! would hold, token totals, prefill tokens TSP did not propagate — read at each scrape.

use std::sync::Mutex;

use fastkv::scheduler::{Observer, Stats};
use fastkv::{FinishReason, Output};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    requests: IntCounterVec,
    running: IntGauge,
    waiting: IntGauge,
    cache_reserved: IntGauge,
    cache_limit: IntGauge,
    cache_held: IntGauge,
    cache_full: IntGauge,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    skipped_tokens: IntCounter,
    /// The scheduler's totals at the last scrape: the counters grow by the difference.
    last: Mutex<Stats>,
}

/// Buckets of a latency histogram, in seconds.
const LATENCY: [f64; 17] =
    [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];
const E2E: [f64; 12] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let requests = IntCounterVec::new(
            Opts::new("fastkv_requests_total", "Requests that ended, by how (stop, length, cancelled, error)."),
            &["finish_reason"],
        )
        .expect("valid counter");
        registry.register(Box::new(requests.clone())).expect("unique metric");
        Metrics {
            ttft: histogram("fastkv_time_to_first_token_seconds", "Submission to first token.", &LATENCY),
            itl: histogram("fastkv_inter_token_latency_seconds", "Between consecutive tokens of a request.", &LATENCY),
            e2e: histogram("fastkv_e2e_request_latency_seconds", "Submission to the end of a request.", &E2E),
            running: gauge("fastkv_requests_running", "Requests prefilling or decoding now."),
            waiting: gauge("fastkv_requests_waiting", "Requests waiting for KV-cache memory."),
            cache_reserved: gauge(
                "fastkv_kv_cache_reserved_bytes",
                "KV cache set aside for the running requests, their room for new tokens included.",
            ),
            cache_limit: gauge("fastkv_kv_cache_limit_bytes", "KV-cache memory of the engine (--kv-cache-memory)."),
            cache_held: gauge("fastkv_kv_cache_held_bytes", "K and V the running requests' caches hold."),
            cache_full: gauge(
                "fastkv_kv_cache_full_bytes",
                "What full caches of the running requests' prompts would hold (minus held: what compression saves).",
            ),
            prompt_tokens: counter("fastkv_prompt_tokens_total", "Prompt tokens prefilled."),
            generated_tokens: counter("fastkv_generation_tokens_total", "Tokens generated."),
            skipped_tokens: counter(
                "fastkv_prefill_tokens_skipped_total",
                "Token rows TSP kept out of the layers after its layer, summed over those layers.",
            ),
            requests,
            registry,
            last: Mutex::new(Stats::default()),
        }
    }

    /// The text exposition of every metric, with `stats` (the scheduler's, when it runs).
    pub fn render(&self, stats: Option<Stats>) -> String {
        if let Some(s) = stats {
            self.running.set(s.running as i64);
            self.waiting.set(s.waiting as i64);
            self.cache_reserved.set(s.cache_bytes_reserved as i64);
            self.cache_limit.set(s.cache_bytes_limit as i64);
            self.cache_held.set(s.cache_bytes_held as i64);
            self.cache_full.set(s.cache_bytes_full as i64);
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            self.prompt_tokens.inc_by(s.prompt_tokens.saturating_sub(last.prompt_tokens));
            self.generated_tokens.inc_by(s.generated_tokens.saturating_sub(last.generated_tokens));
            self.skipped_tokens.inc_by(s.prefill_tokens_skipped.saturating_sub(last.prefill_tokens_skipped));
            *last = s;
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding never fails");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Metrics {
    fn first_token(&self, ttft_s: f64) {
        self.ttft.observe(ttft_s);
    }

    fn next_token(&self, itl_s: f64) {
        self.itl.observe(itl_s);
    }

    fn finished(&self, output: &Output, e2e_s: f64) {
        self.e2e.observe(e2e_s);
        let how = match output.finish_reason {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        };
        self.requests.with_label_values(&[how]).inc();
    }

    fn failed(&self, error: &fastkv::Error) {
        let how = if matches!(error, fastkv::Error::Cancelled) { "cancelled" } else { "error" };
        self.requests.with_label_values(&[how]).inc();
    }
}
