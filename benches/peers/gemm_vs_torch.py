#!/usr/bin/env python3
"""bf16 GEMM GFLOP/s on the engines' projection shapes: every path of our GEMM bench vs PyTorch.

    python3 benches/peers/gemm_vs_torch.py target/release/deps/gemm-<hash> [--models smollm2,qwen]
        [--m 512,2048] [--repeats 5] [--threads 2] [--md FILE] [--json FILE]

The bench binary prints `PATH M N K GFLOP/s` for each path it has (amx, gemm, avx512bf16, ...);
every such line becomes a column (first word = path name). Shapes are interleaved (torch, then ours,
per shape) so that load from other processes hits both alike; both sides report the best of
--repeats. torch runs `x_bf16 @ w_bf16.T` (oneDNN) on --threads threads, as HF transformers' bf16
Linear does; ours runs with RAYON_NUM_THREADS=--threads. best/torch = fastest of our paths / torch.
"""
import argparse
import json
import os
import subprocess
import time

import torch

SHAPES = {  # (N, K) of the fused projections: qkv, o, gate|up, down
    "smollm2": [("qkv", 960, 576), ("o", 576, 576), ("gate|up", 3072, 576), ("down", 576, 1536)],
    # Qwen2.5-0.5B: hidden 896, 14 heads, 2 kv heads, head_dim 64, intermediate 4864
    "qwen": [("qkv", 1152, 896), ("o", 896, 896), ("gate|up", 9728, 896), ("down", 896, 4864)],
}


def torch_gflops(m, n, k, repeats):
    x = torch.randn(m, k).to(torch.bfloat16)
    w = torch.randn(n, k).to(torch.bfloat16)
    x @ w.T
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ w.T
        best = min(best, time.perf_counter() - t)
    return 2 * m * n * k / best / 1e9


def ours_gflops(binary, m, n, k, repeats, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([binary, "--shapes", f"{m}x{n}x{k}", "--repeats", str(repeats)],
                         check=True, capture_output=True, text=True, env=env).stdout
    res = {}
    for line in out.splitlines():
        w = line.split()
        if len(w) >= 5 and all(v.isdigit() for v in w[1:4]):
            try:
                res[w[0]] = float(w[4])
            except ValueError:
                pass
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary", help="the gemm bench binary (cargo bench --bench gemm --no-run)")
    p.add_argument("--models", default="smollm2,qwen", help=f"comma-separated, of {','.join(SHAPES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", default="512,2048", help="activation rows, comma-separated")
    p.add_argument("--md", help="also write the table as markdown here")
    p.add_argument("--json", help="also write the rows as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for model in a.models.split(","):
        for m in map(int, a.m.split(",")):
            for name, n, k in SHAPES[model]:
                t = torch_gflops(m, n, k, a.repeats)
                ours = ours_gflops(a.binary, m, n, k, a.repeats, a.threads)
                rows.append(dict(model=model, proj=name, m=m, n=n, k=k, torch=t, ours=ours,
                                 best_path=max(ours, key=ours.get) if ours else None,
                                 ratio=max(ours.values()) / t if ours else float("nan")))
                print(f"{model} {name:<8} {m}x{n}x{k}: torch {t:.1f} " +
                      " ".join(f"{p_} {v:.1f}" for p_, v in ours.items()), flush=True)
    paths = sorted({p_ for r in rows for p_ in r["ours"]})
    md = [f"bf16 GEMM GFLOP/s, {a.threads} threads, best of {a.repeats} (torch = `x @ w.T`, oneDNN)", "",
          "| model | proj | M | N | K | torch | " + " | ".join(paths) + " | best/torch |",
          "|---|---|---:|---:|---:|---:|" + "---:|" * len(paths) + "---:|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['proj']} | {r['m']} | {r['n']} | {r['k']} | {r['torch']:.1f} | " +
                  " | ".join(f"{r['ours'][p_]:.1f}" if p_ in r["ours"] else "-" for p_ in paths) +
                  f" | {r['ratio']:.2f} |")
    table = "\n".join(md) + "\n"
    print()
    print(table)
    if a.md:
        open(a.md, "w").write(table)
    if a.json:
        json.dump(dict(threads=a.threads, repeats=a.repeats, torch=torch.__version__, rows=rows), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
