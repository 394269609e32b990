#!/usr/bin/env python3
"""The serving benchmark's table and charts (called by benches/serve/run.sh).

    report.py OUT SYSTEMS CONCURRENCY INPUT_LEN OUTPUT_LEN THREADS

Reads OUT/<system>-c<concurrency>.json (`vllm bench serve --save-result`), writes OUT/table.md,
OUT/results.json, OUT/throughput.png and OUT/ttft.png, and prints the table. Ratios are fastkv's
figure over the peer's at the same concurrency, from the same run.
"""
import json
import os
import platform
import re
import subprocess
import sys
import time

out, systems, concs, input_len, output_len, threads = sys.argv[1:7]
systems, concs = systems.split(","), [int(c) for c in concs.split(",")]


def load(system, c):
    path = os.path.join(out, f"{system}-c{c}.json")
    if not os.path.exists(path):
        return None
    r = json.load(open(path))
    return r if r.get("completed") else None


results = {s: {c: load(s, c) for c in concs} for s in systems}


def cpu():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    # fastkv serve names its CPU path in its ready line: "ready (smollm2 on cpu, path avx512bf16 (…), …".
    path = ""
    for s in ("fastkv", "fastkv-full"):
        log = os.path.join(out, f"{s}.server.log")
        if os.path.exists(log):
            m = re.search(r"on cpu, path (\S+)", open(log).read())
            path = m.group(1) if m else path
    return f"{name}, {os.cpu_count()} CPUs" + (f"; fastkv's CPU path {path}" if path else "")


def cell(r, key, scale=1.0, digits=1):
    return "—" if r is None else f"{r[key] * scale:.{digits}f}"


lines = [
    f"Serving benchmark, {time.strftime('%Y-%m-%d')}: {cpu()}; {threads} threads per server;",
    f"{input_len}-token random prompts, {output_len} new tokens each (ignore_eos, greedy);"
    " load by `vllm bench serve` (vLLM 0.32.0).",
    "",
    "| system | concurrency | requests | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |",
    "|---|---|---|---|---|---|---|---|---|",
]
for s in systems:
    for c in concs:
        r = results[s][c]
        n = "failed" if r is None else f"{r['completed']}" + (f" ({r['failed']} failed)" if r.get("failed") else "")
        lines.append(
            f"| {s} | {c} | {n} | {cell(r, 'request_throughput', digits=3)} | {cell(r, 'output_throughput')} "
            f"| {cell(r, 'p50_ttft_ms', digits=0)} | {cell(r, 'p99_ttft_ms', digits=0)} "
            f"| {cell(r, 'p50_itl_ms')} | {cell(r, 'p99_itl_ms')} |"
        )

peers = [p for p in ("llama-server", "vllm") if p in systems]
ours = [s for s in ("fastkv", "fastkv-full") if s in systems]
if peers and ours:
    lines += ["", "| fastkv vs peer | concurrency | output tok/s | TTFT p50 (peer / ours) |", "|---|---|---|---|"]
    for s in ours:
        for p in peers:
            for c in concs:
                a, b = results[s][c], results[p][c]
                if a and b:
                    lines.append(
                        f"| {s} / {p} | {c} | {a['output_throughput'] / b['output_throughput']:.2f}× "
                        f"| {b['p50_ttft_ms'] / a['p50_ttft_ms']:.2f}× |"
                    )
table = "\n".join(lines) + "\n"
open(os.path.join(out, "table.md"), "w").write(table)
json.dump({s: {str(c): r for c, r in v.items()} for s, v in results.items()}, open(os.path.join(out, "results.json"), "w"))
print(table)

import matplotlib  # noqa: E402  (only the charts need it)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

for key, label, name in [
    ("output_throughput", "output tokens/s", "throughput.png"),
    ("p50_ttft_ms", "TTFT p50 (ms)", "ttft.png"),
]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in systems:
        pts = [(c, results[s][c][key]) for c in concs if results[s][c]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(label)
    ax.set_title(f"SmolLM2-135M, {input_len}-token prompts, {output_len} new tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
