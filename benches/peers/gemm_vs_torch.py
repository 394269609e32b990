#!/usr/bin/env python3
"""bf16 GEMM GFLOP/s on the engines' projection shapes: ours (AMX / gemm-crate fallback) vs PyTorch.

    cargo bench --bench gemm --no-run   # prints the bench binary's path
    python3 benches/peers/gemm_vs_torch.py target/release/deps/gemm-<hash> [--repeats 5]

Shapes are interleaved (torch, then ours, per shape) so that load from other processes hits both
alike. torch runs `x_bf16 @ w_bf16.T` (oneDNN) on 2 threads, as HF transformers' bf16 Linear does.
"""
import argparse
import subprocess
import time

import torch

SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K): qkv, o, gate|up, down


def torch_gflops(m, n, k, repeats):
    x = torch.randn(m, k).to(torch.bfloat16)
    w = torch.randn(n, k).to(torch.bfloat16)
    torch.matmul(x, w.T)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(x, w.T)
        best = min(best, time.perf_counter() - t)
    return 2 * m * n * k / best / 1e9


def ours_gflops(binary, m, n, k, repeats):
    out = subprocess.run([binary, "--shapes", f"{m}x{n}x{k}", "--repeats", str(repeats)],
                         check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: float(line.split()[4]) for line in out.splitlines() if line.strip()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary", help="the gemm bench binary (cargo bench --bench gemm --no-run)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--m", default="512,1024,2048,4096", help="activation rows, comma-separated")
    a = p.parse_args()
    torch.set_num_threads(2)
    print(f"{'M':>5} {'N':>5} {'K':>5} {'torch':>8} {'amx':>8} {'gemm':>8} {'best/torch':>10}  (GFLOP/s)")
    for m in map(int, a.m.split(",")):
        for n, k in SMOLLM2:
            t = torch_gflops(m, n, k, a.repeats)
            ours = ours_gflops(a.binary, m, n, k, a.repeats)
            amx = ours.get("amx", float("nan"))
            print(f"{m:5} {n:5} {k:5} {t:8.1f} {amx:8.1f} {ours['gemm']:8.1f} {max(ours.values()) / t:10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
