"""What Dynamo's frontend gives and costs in front of fastkv workers, measured with NVIDIA's aiperf.

1. Frontend latency: the same streamed chat requests, one at a time, straight to a worker's
   `fastkv serve` and through the frontend (one worker); p50 of request latency and of time to
   first token, and their difference.
2. Scaling: requests/s through the frontend with one worker, then two, when the workers are the
   bottleneck: each worker and its fastkv child pinned to its own core (taskset), ~2K-token prompts,
   a fixed number of new tokens (ignore_eos), a fixed concurrency; not streamed, so that the load
   generator parses one answer per request rather than one event per token.

The frontend and aiperf are not pinned: on a 2-core machine they share the cores with the workers,
and aiperf's processes take half a core to a core. So each run is also replayed (the same request
bodies, aiperf's inputs.json) by threads blocking on urllib, which cost next to nothing.
Writes aiperf's exports and a summary.json under --out; prints the summary.
Usage: target/dynamo-py/bin/python dynamo/bench.py [--engine DIR] (dynamo/install.sh --bench first).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster import ENGINE, REPO, Discovery, Worker, environment, free_port, frontend, get, until

AIPERF = REPO / "target/aiperf-py/bin/aiperf"
MODEL = "fastkv-bench"


def aiperf(name: str, url: str, tokenizer: Path, out: Path, isl: int, osl: int, concurrency: int,
           requests: int, warmup: int, streaming: bool) -> dict:
    """One aiperf run of chat requests; its metrics (profile_export_aiperf.json). Token counts are the
    server's (`usage`), so that aiperf does not spend a core re-tokenizing answers."""
    run = out / name
    command = [str(AIPERF), "profile", "--model", MODEL, "--url", url, "--endpoint-type", "chat",
               *(["--streaming"] if streaming else []), "--use-server-token-count",
               "--tokenizer", str(tokenizer), "--isl", str(isl), "--isl-stddev", "0", "--osl", str(osl),
               "--osl-stddev", "0", "--extra-inputs", "ignore_eos:true", "--concurrency", str(concurrency),
               "--request-count", str(requests), "--warmup-request-count", str(warmup), "--random-seed", "1",
               "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry", "--output-artifact-dir", str(run)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    print(f"bench: {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    with open(out / f"{name}.log", "wb") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True, timeout=1800)
    metrics = json.loads((run / "profile_export_aiperf.json").read_text())
    if metrics.get("request_error_rate", {}).get("avg"):
        raise SystemExit(f"bench: {name}: requests failed: {metrics.get('error_summary')} (see {run})")
    return metrics


def replay(url: str, run: Path, concurrency: int, stream: bool) -> tuple[float, float, float]:
    """The request bodies aiperf sent in `run` (its inputs.json) sent again by `concurrency` threads
    blocking on urllib, a load generator that costs next to no CPU where aiperf's own processes take
    half a core to a core here. Returns requests/s and the p50s of latency and of time to first
    token (streamed) in ms."""
    bodies = [p for s in json.loads((run / "inputs.json").read_text())["data"] for p in s["payloads"]]
    def send(body: dict) -> tuple[float, float]:
        data = json.dumps({**body, "stream": stream}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data, {"Content-Type": "application/json"})
        start, first = time.monotonic(), None
        with urllib.request.urlopen(request, timeout=600) as r:
            for line in r:  # one line when not streamed
                if first is None and b'"content":"' in line.replace(b" ", b"") and b'"content":""' not in line:
                    first = time.monotonic()
        end = time.monotonic()
        return (first or end) - start, end - start
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, bodies))
    rps = len(bodies) / (time.monotonic() - start)
    return rps, 1000 * statistics.median(r[1] for r in results), 1000 * statistics.median(r[0] for r in results)


def stat(metrics: dict, name: str, key: str) -> float:
    return metrics[name][key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=ENGINE, help="engine directory [default: target/engines/serve-test]")
    p.add_argument("--isl", type=int, default=2000, help="prompt tokens of the scaling runs [2000]")
    p.add_argument("--osl", type=int, default=48, help="new tokens of every request [48]")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight in the scaling runs [4]")
    p.add_argument("--requests", type=int, default=32, help="requests per scaling run [32]")
    p.add_argument("--latency-isl", type=int, default=256, help="prompt tokens of the latency runs [256]")
    p.add_argument("--latency-requests", type=int, default=20, help="requests per latency run [20]")
    p.add_argument("--out", type=Path, default=REPO / f"target/dynamo-bench/{time.strftime('%Y%m%d-%H%M%S')}")
    args = p.parse_args()
    os.environ["FASTKV_DYNAMO_ENGINE"] = str(Path(args.engine).resolve())
    if not AIPERF.exists():
        raise SystemExit(f"{AIPERF} not found: run dynamo/install.sh --bench")
    out = args.out.resolve()
    out.mkdir(parents=True)
    env = environment(out, f"fastkv-bench-{os.getpid()}")
    discovery = Discovery(out, env)
    port = free_port()
    front_url = f"http://127.0.0.1:{port}"
    processes = [*discovery.processes, frontend(port, env, out)]
    summary: dict = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}, "args": vars(args) | {"out": str(out)}}
    try:
        def start(name: str, cpu: str) -> Worker:
            worker = Worker(name, env, out, MODEL, "--max-running", str(args.concurrency), cpus=cpu)
            processes.append(worker)
            return worker

        def serving(worker: Worker) -> None:
            before = worker.served()
            def one():
                body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
                try:
                    subprocess.run(["curl", "-sf", "-m", "30", front_url + "/v1/chat/completions", "-H",
                                    "content-type: application/json", "-d", body], capture_output=True, timeout=40)
                except subprocess.TimeoutExpired:
                    pass
                return worker.served() > before
            until(f"{worker.name} to get traffic", one, 120, every=0)

        a = start("worker-a", "0")
        until("the frontend to list the model", lambda: MODEL in get(front_url + "/v1/models"), 120)
        serving(a)
        tokenizer = out / "fastkv-dynamo" / MODEL  # the HF folder the worker wrote ($TMPDIR)
        lat = dict(tokenizer=tokenizer, out=out, isl=args.latency_isl, osl=args.osl, concurrency=1,
                   requests=args.latency_requests, warmup=2, streaming=True)
        direct = aiperf("latency-direct", a.url, **lat)
        via = aiperf("latency-frontend", front_url, **lat)
        _, direct_latency, direct_ttft = replay(a.url, out / "latency-direct", 1, stream=True)
        _, via_latency, via_ttft = replay(front_url, out / "latency-direct", 1, stream=True)
        summary["latency"] = {
            "requests": f"{args.latency_requests} streamed chat requests one at a time, ~{args.latency_isl} prompt "
                        f"tokens, {args.osl} new tokens",
            **{f"{where}_{m}_p50_ms": stat(r, m, "p50") for where, r in [("direct", direct), ("frontend", via)]
               for m in ("request_latency", "time_to_first_token")},
        }
        for m in ("request_latency", "time_to_first_token"):
            summary["latency"][f"added_{m}_p50_ms"] = stat(via, m, "p50") - stat(direct, m, "p50")
        summary["latency"] |= {
            "replayed_direct_request_latency_p50_ms": direct_latency,
            "replayed_frontend_request_latency_p50_ms": via_latency,
            "replayed_added_request_latency_p50_ms": via_latency - direct_latency,
            "replayed_direct_time_to_first_token_p50_ms": direct_ttft,
            "replayed_frontend_time_to_first_token_p50_ms": via_ttft,
            "replayed_added_time_to_first_token_p50_ms": via_ttft - direct_ttft,
        }
        load = dict(tokenizer=tokenizer, out=out, isl=args.isl, osl=args.osl, concurrency=args.concurrency,
                    requests=args.requests, warmup=args.concurrency, streaming=False)
        one = aiperf("scaling-1-worker", front_url, **load)
        one_replayed, _, _ = replay(front_url, out / "scaling-1-worker", args.concurrency, stream=False)
        b = start("worker-b", "1")
        serving(b)
        served = a.served(), b.served()
        two = aiperf("scaling-2-workers", front_url, **load)
        split = [a.served() - served[0], b.served() - served[1]]  # warm-up included
        two_replayed, _, _ = replay(front_url, out / "scaling-2-workers", args.concurrency, stream=False)
        summary["scaling"] = {
            "requests": f"{args.requests} chat requests (not streamed), ~{args.isl} prompt tokens, {args.osl} new tokens, "
                        f"concurrency {args.concurrency}; each worker pinned to one core",
            "one_worker_rps": stat(one, "request_throughput", "avg"),
            "two_workers_rps": stat(two, "request_throughput", "avg"),
            "two_workers_split": split,
            "one_worker_latency_p50_ms": stat(one, "request_latency", "p50"),
            "two_workers_latency_p50_ms": stat(two, "request_latency", "p50"),
        }
        summary["scaling"]["speedup"] = summary["scaling"]["two_workers_rps"] / summary["scaling"]["one_worker_rps"]
        summary["scaling"] |= {
            "replayed_one_worker_rps": one_replayed,
            "replayed_two_workers_rps": two_replayed,
            "replayed_speedup": two_replayed / one_replayed,
        }
        summary["machine"]["load_after"] = os.getloadavg()
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    finally:
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    main()
