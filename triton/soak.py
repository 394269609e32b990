"""Bounded soak of libtriton_fastkv.so in a real Triton server on loopback: many gRPC streaming
clients at once, some closing their stream after the first token, some sending malformed requests.
Prints one JSON summary and exits non-zero on any unexpected outcome, if the server stops answering
a normal request, or if its RSS at the end exceeds the RSS at the start by more than --rss-bound-mb.

Run triton/run-tests.sh once first (it installs the server and builds the backend and engine), then:
    PYTHONPATH=target/triton-py python3 triton/soak.py [--engine DIR] [--requests N] [--clients N]
The server is started by the tests' harness (triton/tests/test_server.py), as triton/bench.py does.
"""

import argparse
import json
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPTS = ["Hello world", "The capital of France is", "Once upon a time", "List three colours:", "2 + 2 ="]


def tensor(grpcclient, name, dtype, values):
    t = grpcclient.InferInput(name, [len(values)], dtype)
    t.set_data_from_numpy(np.array(values, dtype=object if dtype == "BYTES" else None))
    return t


def malformed(grpcclient, rng):
    """(kind, inputs) of a request the server must refuse with an error."""
    text = tensor(grpcclient, "text_input", "BYTES", [rng.choice(PROMPTS).encode()])
    cases = {
        "wrong dtype": [text, tensor(grpcclient, "max_tokens", "INT64", np.array([4], dtype=np.int64))],
        "missing input": [tensor(grpcclient, "max_tokens", "INT32", np.array([4], dtype=np.int32))],
        "absurd max_tokens": [text, tensor(grpcclient, "max_tokens", "INT32", np.array([-(2**31)], dtype=np.int32))],
        "bad method": [text, tensor(grpcclient, "method", "BYTES", [b"bogus"])],
        "bad tsp_rate": [text, tensor(grpcclient, "tsp_rate", "FP32", np.array([7.5], dtype=np.float32))],
        "bad kv_budget": [text, tensor(grpcclient, "kv_budget", "INT32", np.array([0], dtype=np.int32))],
        "non-UTF-8 text": [tensor(grpcclient, "text_input", "BYTES", [b"\xff\xfe caf\xe9"])],
    }
    kind = rng.choice(sorted(cases))
    return kind, cases[kind]


def normal(grpcclient, prompt, max_tokens):
    return [
        tensor(grpcclient, "text_input", "BYTES", [prompt.encode()]),
        tensor(grpcclient, "max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
        tensor(grpcclient, "stream", "BOOL", np.array([True])),
    ]


def one(grpcclient, url, inputs, cancel):
    """Sends one streaming request: ("completed", ttft) after its final response, ("cancelled", ttft)
    once its stream is closed after the first token, or ("error", message)."""
    client = grpcclient.InferenceServerClient(url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    start = time.perf_counter()
    ttft = None
    try:
        client.async_stream_infer("fastkv", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                return "error", str(error)
            response = result.get_response()
            if ttft is None and result.as_numpy("text_output") is not None:
                ttft = time.perf_counter() - start
                if cancel:
                    client.stop_stream(cancel_requests=True)
                    return "cancelled", ttft
            if response.parameters["triton_final_response"].bool_param:
                return "completed", ttft
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def server_log(server):
    with open(server.log_path) as f:
        return f.read()


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default=os.path.join(ROOT, "target/engines/triton-SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cancel-share", type=float, default=0.1)
    ap.add_argument("--malformed-share", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=8, help="largest max_tokens of a normal request")
    ap.add_argument("--rss-bound-mb", type=float, default=200, help="allowed RSS growth, start to end")
    ap.add_argument("--seed", type=int, default=17)
    args = ap.parse_args()
    os.environ.setdefault("FASTKV_TRITONSERVER", os.path.join(ROOT, "target/triton-py/pytriton/tritonserver/bin/tritonserver"))
    os.environ.setdefault("FASTKV_TRITON_BACKENDS", os.path.join(ROOT, "target/triton-backends"))
    os.environ["FASTKV_TRITON_ENGINE"] = args.engine
    os.environ.setdefault("FASTKV_CLI", os.path.join(ROOT, "target/release/fastkv"))
    import test_server  # the tests' server harness: same model repository, ports and shutdown
    import tritonclient.grpc as grpcclient

    rng = random.Random(args.seed)
    jobs = []
    for _ in range(args.requests):
        r = rng.random()
        if r < args.malformed_share:
            jobs.append(("malformed",) + malformed(grpcclient, rng))
        elif r < args.malformed_share + args.cancel_share:
            jobs.append(("cancel", "cancel", normal(grpcclient, rng.choice(PROMPTS), 64)))
        else:
            jobs.append(("normal", "normal", normal(grpcclient, rng.choice(PROMPTS), rng.randint(1, args.max_tokens))))

    server = test_server.Server
    server.setUpClass()
    try:
        pid = server.server.pid
        url = server.grpc_url
        # Warm-up at full concurrency, so the start RSS holds the per-thread arenas and buffers in steady use.
        with ThreadPoolExecutor(args.clients) as pool:
            warm = list(pool.map(lambda p: one(grpcclient, url, normal(grpcclient, p, 4), False)[0], PROMPTS * 4))
        if set(warm) != {"completed"}:
            raise RuntimeError(f"the server did not answer the warm-up requests: {warm}")
        rss = {"start": rss_kib(pid), "peak": rss_kib(pid)}
        done = threading.Event()

        def sample():
            while not done.wait(0.25):
                rss["peak"] = max(rss["peak"], rss_kib(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = list(pool.map(lambda job: one(grpcclient, url, job[2], job[0] == "cancel"), jobs))
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        time.sleep(2)  # cancelled requests wind down
        rss["end"] = rss_kib(pid)
        rss["peak"] = max(rss["peak"], rss["end"])
        final = one(grpcclient, url, normal(grpcclient, PROMPTS[1], 4), False)[0]
        cancelled_in_log = server_log(server).count("request cancelled after")
    finally:
        server.tearDownClass()

    counts = {"completed": 0, "errored": 0, "cancelled": 0, "unexpected": 0}
    unexpected, ttfts, errors_by_kind = [], [], {}
    for (role, kind, _), (outcome, detail) in zip(jobs, outcomes):
        expected = {"normal": "completed", "cancel": "cancelled", "malformed": "error"}[role]
        # A request that finishes before its client could cancel it is fine too.
        if outcome == expected or (role == "cancel" and outcome == "completed"):
            counts["errored" if outcome == "error" else outcome] += 1
            if outcome == "completed":
                ttfts.append(detail)
            if outcome == "error":
                errors_by_kind[kind] = errors_by_kind.get(kind, 0) + 1
        else:
            counts["unexpected"] += 1
            unexpected.append({"request": kind, "outcome": outcome, "detail": str(detail)[:300]})
    growth_mb = (rss["end"] - rss["start"]) / 1024
    summary = {
        "requests": args.requests,
        "clients": args.clients,
        "seconds": round(seconds, 1),
        **counts,
        "malformed_by_kind": errors_by_kind,
        "server_cancellations_logged": cancelled_in_log,
        "ttft_ms": {q: round(1000 * percentile(ttfts, p), 1) if ttfts else None for q, p in [("p50", 0.5), ("p99", 0.99)]},
        "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
        "rss_growth_mb": round(growth_mb, 1),
        "rss_bound_mb": args.rss_bound_mb,
        "final_request": final,
        "unexpected_failures": unexpected[:20],
    }
    print(json.dumps(summary, indent=2))
    ok = counts["unexpected"] == 0 and final == "completed" and growth_mb <= args.rss_bound_mb
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
