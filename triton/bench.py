"""Load figures of libtriton_fastkv.so in a real Triton server: requests/s and p50/p99 time to first
token (TTFT, client side: request sent → first streamed token) at 1, 4 and 16 concurrent clients.

Run triton/run-tests.sh once first (it installs the server and builds the backend and engine), then:
    PYTHONPATH=target/triton-py python3 triton/bench.py [--engine DIR] [--requests N] [--max-tokens N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def one(url, prompt, max_tokens):
    """(TTFT, total seconds) of one streamed request."""
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    start = time.perf_counter()
    ttft = None
    with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=600) as r:
        for line in r:
            if line.startswith(b"data:"):
                if b'"error"' in line:
                    raise RuntimeError(line.decode())
                ttft = ttft or time.perf_counter() - start
    return ttft, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default=os.path.join(ROOT, "target/engines/triton-llama"))
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="Once upon a time, in a land far away, there lived a")
    args = ap.parse_args()
    os.environ.setdefault("FASTKV_TRITONSERVER", os.path.join(ROOT, "target/triton-py/pytriton/tritonserver/bin/tritonserver"))
    os.environ.setdefault("FASTKV_TRITON_BACKENDS", os.path.join(ROOT, "target/triton-backends"))
    os.environ["FASTKV_TRITON_ENGINE"] = args.engine
    os.environ.setdefault("FASTKV_CLI", os.path.join(ROOT, "target/release/fastkv"))
    import test_server  # the tests' server harness: same model repository, ports and shutdown

    test_server.Server.setUpClass()
    try:
        url = f"{test_server.Server.url}/v2/models/fastkv/generate_stream"
        one(url, args.prompt, 2)  # warm-up
        print(f"engine {args.engine}, {args.requests} requests × {args.max_tokens} tokens per level")
        print("clients  requests/s  TTFT p50 (ms)  TTFT p99 (ms)")
        for clients in (1, 4, 16):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                runs = list(pool.map(lambda _: one(url, args.prompt, args.max_tokens), range(args.requests)))
            rps = args.requests / (time.perf_counter() - start)
            ttfts = sorted(t for t, _ in runs)
            p = lambda q: 1000 * ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]
            print(f"{clients:7}  {rps:10.1f}  {p(0.5):13.1f}  {p(0.99):13.1f}")
    finally:
        test_server.Server.tearDownClass()


if __name__ == "__main__":
    main()
