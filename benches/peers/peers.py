#!/usr/bin/env python3
"""fastkv vs HF transformers (PyTorch CPU, sdpa, bf16 and f32) vs llama.cpp on one machine and model.

    python3 benches/peers/peers.py --fastkv target/release/fastkv --engine ENGINE_DIR --hf HF_DIR \
        --gguf MODEL.gguf [--gguf-bf16 MODEL-bf16.gguf] [--lengths 1024,4096,8192] [--threads 2] \
        [--repeats 3] [--new-tokens 32] [--gemm-bin target/release/deps/gemm-HASH] [--out DIR]

benches/peers/run.sh prepares every input (HF checkpoint, BF16 GGUF, fastkv engine) and calls this.

Same token ids everywhere: the prompt of length L is the tokens of --prompt-file (no special tokens)
repeated to L tokens, exactly what `fastkv bench` feeds itself (src/bench.rs); HF and llama.cpp get
those ids from the HF tokenizer converted from the same GGUF (the cross-check verifies that this
tokenizer gives fastkv's ids). Systems are interleaved: for each length, for each repeat, every
system runs once; the table shows medians over repeats. Untimed warm-up: --warmup rounds of every
system on a 128-token prompt before timing (fastkv: each `fastkv bench` process first runs a
128-token prompt, whose row is dropped). prefill tok/s = L / time to first token (prefill + argmax);
decode tok/s = (new_tokens - 1) / time of the decode steps after the first token, greedy.

Systems: fastkv-full / fastkv (`fastkv bench --methods full,fastkv`, RAYON_NUM_THREADS=--threads);
hf-bf16 / hf-f32 (sdpa, logits_to_keep=1 on every call; hf-f32 = the same bf16 weights upcast);
llama.cpp on the BF16 GGUF and on the original quantized GGUF, each with flash attention on (-fa) and
off (-nofa); n_threads = n_threads_batch = --threads, n_batch = --n-batch (default 512), n_ubatch
default (512).

Decode bandwidth (fastkv rows): bytes per token = weight bytes (every blk.* tensor at 2 bytes/elem
+ the LM head: output.weight if the GGUF has one, else the tied token embedding; the embedding
gather is not counted) + KV bytes = 2 x layers x kv_heads x head_dim x L x --kv-bytes (for
`fastkv` scaled by its kv_cache_bytes / fastkv-full's). GB/s = that x decode tok/s; share = GB/s /
the STREAM-like triad of the GEMM bench binary (`--triad --repeats 5`, RAYON_NUM_THREADS=--threads).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WARM_LEN = 128


# ---------------------------------------------------------------- llama.cpp
def llama_last_logits(llm):
    """Logits of the last evaluated token. llama-cpp-python 0.3.36's Llama.eval no longer copies logits
    into llm.scores unless logits_all=True, so read them from the context: row -1 = the last output."""
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def llama_open(path, extra_bufts=True, **kw):
    """Llama(path, **kw); extra_bufts=False turns off llama.cpp's extra weight buffer types (the AMX
    and CPU_REPACK weight repacking: llama_model_params.use_extra_bufts, which Llama() does not expose)."""
    import llama_cpp.llama_cpp as llama_cpp  # the module llama_cpp.llama.Llama reads the defaults from
    from llama_cpp import Llama
    if extra_bufts:
        return Llama(model_path=path, **kw)
    default = llama_cpp.llama_model_default_params

    def patched():
        p = default()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_model_default_params = patched
    try:
        return Llama(model_path=path, **kw)
    finally:
        llama_cpp.llama_model_default_params = default


PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from peers import llama_open, llama_greedy
llm = llama_open(sys.argv[2], n_ctx=1200, n_threads=int(sys.argv[3]), n_threads_batch=int(sys.argv[3]),
                 n_batch=int(sys.argv[4]), flash_attn=sys.argv[5] == "1", verbose=False)
llama_greedy(llm, [(i * 7919 + 13) % 1000 + 100 for i in range(1100)], 3)
"""


def llama_works(path, threads, n_batch, fa):
    """Whether llama.cpp with its default (AMX/repack) buffers survives a 1100-token prefill + decode
    of this file, in a child process (llama.cpp 0.3.36's AMX Q4_1 path segfaults on some machines)."""
    p = subprocess.run([sys.executable, "-c", PROBE, os.path.dirname(os.path.abspath(__file__)), path,
                        str(threads), str(n_batch), "1" if fa else "0"], capture_output=True, text=True)
    return p.returncode == 0


def llama_greedy(llm, ids, steps):
    llm.reset()
    llm.eval(ids)
    out = [int(np.argmax(llama_last_logits(llm)))]
    for _ in range(steps - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(llama_last_logits(llm))))
    return out


def run_llama(a, llm, ids):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(llama_last_logits(llm)))
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.new_tokens - 1):
        llm.eval([tok])
        tok = int(np.argmax(llama_last_logits(llm)))
    decode = time.perf_counter() - t
    return len(ids) / ttft, (a.new_tokens - 1) / decode


# ---------------------------------------------------------------- HF
def hf_greedy(model, ids, steps):
    import torch
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        res = [int(tok)]
        for _ in range(steps - 1):
            out = model(tok, past_key_values=past, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            res.append(int(tok))
    return res


def run_hf(a, model, ids):
    import torch
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(x, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(a.new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t
    return len(ids) / ttft, (a.new_tokens - 1) / decode


# ---------------------------------------------------------------- fastkv
LLAMA_NOTES = []
CPU_PATH_LINES = []  # "cpu path: ..." lines printed by fastkv
GEMM_CPU_PATH = []  # ... and by the GEMM bench binary


def note_cpu_path(text):
    """Keeps and prints each new "cpu path:" line (only `fastkv bench` prints one, so the first
    timing run shows it)."""
    for line in text.splitlines():
        if line.strip().startswith("cpu path:") and line.strip() not in CPU_PATH_LINES:
            CPU_PATH_LINES.append(line.strip())
            print(f"fastkv {line.strip()}", flush=True)


def ratio(ours, theirs):
    """ours / theirs; NaN where a system decoded nothing (e.g. EOS right after the prompt)."""
    return ours / theirs if theirs > 0 else float("nan")


def run_fastkv(a, length):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    warm = WARM_LEN if length != WARM_LEN else WARM_LEN // 2  # in-process warm-up prompt, row dropped
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.json")
        p = subprocess.run([a.fastkv, "bench", "--engine", a.engine, "--lengths", f"{warm},{length}",
                            "--warmup", "0", "--repeats", "1", "--new-tokens", str(a.new_tokens),
                            "--methods", "full,fastkv", "--prompt-file", a.prompt_file, "--json", path],
                           env=env, capture_output=True, text=True)
        note_cpu_path(p.stdout + p.stderr)
        if p.returncode:
            sys.exit(f"fastkv bench failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        rows = [r for r in json.load(open(path)) if r["length"] == length]
    name = lambda method: "fastkv" if method == "fastkv" else f"fastkv-{method}"
    return {name(r["method"]): (r["prefill_tokens_per_s"]["median"], r["decode_tokens_per_s"]["median"],
                                r["kv_cache_bytes"]) for r in rows}


def fastkv_greedy(a, text, steps, method):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    p = subprocess.run([a.fastkv, "run", "--engine", a.engine, "--prompt", text, "--max-new-tokens", str(steps),
                        "--temperature", "0", "--method", method, "--json"],
                       env=env, capture_output=True, text=True, check=True)
    note_cpu_path(p.stdout + p.stderr)
    out = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
    return out["prompt_ids"], out["token_ids"]


# ---------------------------------------------------------------- machine info
def cpu_info():
    info = {"model": platform.processor() or "?", "flags": {}}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                info["model"] = v.strip()
            if k.strip() == "Flags":
                flags = set(v.split())
                info["flags"] = {f: f in flags for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")}
    except OSError:
        pass
    return info


def triad(a):
    if not a.gemm_bin:
        return None
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = subprocess.run([a.gemm_bin, "--triad", "--repeats", "5"], env=env, capture_output=True, text=True)
    GEMM_CPU_PATH.extend(l.strip() for l in (out.stdout + out.stderr).splitlines() if l.strip().startswith("cpu path:"))
    for line in (out.stdout + out.stderr).splitlines():
        w = line.split()
        if len(w) >= 3 and w[0] == "triad":
            return float(w[1])
    print(f"warning: no triad line from {a.gemm_bin}: {out.stdout[-300:]}{out.stderr[-300:]}")
    return None


def model_bytes(gguf_path):
    """Weight bytes read per decoded token at 2 bytes/elem, and the KV shape, from the GGUF."""
    import gguf
    r = gguf.GGUFReader(gguf_path, "r")
    arch = r.fields["general.architecture"].contents()
    kv = lambda k: r.fields[f"{arch}.{k}"].contents()
    n = {t.name: int(np.prod([int(s) for s in t.shape])) for t in r.tensors}
    layers, heads, kv_heads = int(kv("block_count")), int(kv("attention.head_count")), int(kv("attention.head_count_kv"))
    head_dim = int(kv("attention.key_length")) if f"{arch}.attention.key_length" in r.fields \
        else int(kv("embedding_length")) // heads
    head = "output.weight" if "output.weight" in n else "token_embd.weight"
    weights = 2 * (sum(v for k, v in n.items() if k.startswith("blk.")) + n[head])
    return dict(weight_bytes=weights, lm_head=head, layers=layers, kv_heads=kv_heads, head_dim=head_dim)


# ---------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fastkv", required=True, help="the fastkv binary (cargo build --release)")
    p.add_argument("--engine", required=True, help="fastkv engine directory (bf16)")
    p.add_argument("--hf", required=True, help="HF checkpoint directory of the same model (benches/peers/prepare.py hf)")
    p.add_argument("--gguf", required=True, help="the original (quantized) GGUF: llama.cpp column + model shape")
    p.add_argument("--gguf-bf16", help="BF16 GGUF of the same model, for llama.cpp (benches/peers/prepare.py bf16)")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every system at 128 tokens first")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch (n_ubatch stays default)")
    p.add_argument("--kv-bytes", type=float, default=2, help="bytes per KV element of fastkv's cache")
    p.add_argument("--check-steps", type=int, default=8, help="greedy steps of the correctness cross-check")
    p.add_argument("--prompt-file", default="examples/long_prompt.txt")
    p.add_argument("--gemm-bin", help="GEMM bench binary, for the triad bandwidth")
    p.add_argument("--out", help="directory for results.json, table.md, prefill.png, decode.png")
    a = p.parse_args()
    lengths = [int(v) for v in a.lengths.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(a.threads)
    info = dict(cpu=cpu_info(), threads=a.threads, torch=torch.__version__,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), n_batch=a.n_batch,
                lengths=lengths, repeats=a.repeats, new_tokens=a.new_tokens, kv_bytes=a.kv_bytes)
    tok = AutoTokenizer.from_pretrained(a.hf)
    hf = {f"hf-{name}": AutoModelForCausalLM.from_pretrained(a.hf, dtype=dtype, attn_implementation="sdpa").eval()
          for name, dtype in [("bf16", torch.bfloat16), ("f32", torch.float32)]}
    llms = {}
    if not a.no_llama:
        import llama_cpp
        info["llama_cpp"] = llama_cpp.__version__
        info["llama_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        import gguf
        for tag, path in [("bf16", a.gguf_bf16), (None, a.gguf)]:
            if not path:
                continue
            if tag is None:  # name the quantized column by its file type, e.g. q4_1
                ft = int(gguf.GGUFReader(path, "r").fields["general.file_type"].contents())
                tag = gguf.LlamaFileType(ft).name.replace("MOSTLY_", "").lower()
            for fa in (True, False):
                name = f"llama.cpp-{tag}-{'fa' if fa else 'nofa'}"
                extra = llama_works(path, a.threads, a.n_batch, fa)
                if not extra:
                    name += "-norepack"
                    LLAMA_NOTES.append(f"{name}: llama.cpp crashed on {os.path.basename(path)} with its default "
                                       "AMX/CPU_REPACK weight buffers; this row runs with use_extra_bufts=false")
                    print(f"warning: {LLAMA_NOTES[-1]}")
                llms[name] = llama_open(path, extra, n_ctx=max(lengths + [WARM_LEN]) + a.new_tokens + 16,
                                        n_threads=a.threads, n_threads_batch=a.threads, n_batch=a.n_batch,
                                        flash_attn=fa, verbose=False)
    shape = model_bytes(a.gguf)
    info["triad_gb_s"] = triad(a)

    # ---- correctness cross-check on a short real prompt: same ids, greedy, first --check-steps tokens
    text = " ".join(open(a.prompt_file).read().split()[:48])
    ids, ref = fastkv_greedy(a, text, a.check_steps, "full")
    hf_ids = tok(text, add_special_tokens=True)["input_ids"]
    check = {"prompt_tokens": len(ids), "tokenizer_agrees": hf_ids == ids, "fastkv-full": ref}
    _, check["fastkv"] = fastkv_greedy(a, text, a.check_steps, "fastkv")
    for s, m in hf.items():
        check[s] = hf_greedy(m, ids, a.check_steps)
    for s, llm in llms.items():
        check[s] = llama_greedy(llm, ids, a.check_steps)
    info["gemm_bench_cpu_path"] = GEMM_CPU_PATH[:1]
    info["llama_notes"] = LLAMA_NOTES

    c = info["cpu"]
    print(f"CPU: {c['model']}; " + ", ".join(f"{f}={'yes' if v else 'no'}" for f, v in c["flags"].items()))
    for line in info["gemm_bench_cpu_path"]:
        print(f"GEMM bench {line}")
    print(f"torch {info['torch']} cpu capability: {info['torch_cpu_capability']}")
    if "llama_system_info" in info:
        print(f"llama.cpp {info['llama_cpp']} system info: {info['llama_system_info']}")
    print(f"triad: {info['triad_gb_s']} GB/s on {a.threads} threads")
    print(f"cross-check ({len(ids)}-token prompt, greedy {a.check_steps} steps; HF tokenizer gives fastkv's ids: "
          f"{'yes' if check['tokenizer_agrees'] else 'NO'})")
    for s in ["fastkv-full", "fastkv", *hf, *llms]:
        verdict = "reference" if s == "fastkv-full" else ("matches fastkv-full" if check[s] == ref else
                                                           f"DIFFERS from fastkv-full at step {next(i for i, (x, y) in enumerate(zip(check[s], ref)) if x != y)}")
        print(f"  {s:<22} {check[s]}  {verdict}" + ("  (compressed KV: may differ)" if s == "fastkv" else ""))

    # ---- timing
    base = tok(open(a.prompt_file).read(), add_special_tokens=False)["input_ids"]
    prompt = lambda n: [base[i % len(base)] for i in range(n)]
    for _ in range(a.warmup):
        for m in hf.values():
            run_hf(a, m, prompt(WARM_LEN))
        for llm in llms.values():
            run_llama(a, llm, prompt(WARM_LEN))
    results, kvb = {}, {}  # (system, length) -> [(prefill tok/s, decode tok/s)]
    for length in lengths:
        ids = prompt(length)
        for rep in range(a.repeats):
            for system, (pre, dec, kv) in run_fastkv(a, length).items():
                results.setdefault((system, length), []).append((pre, dec))
                kvb[(system, length)] = kv
            for system, m in hf.items():
                results.setdefault((system, length), []).append(run_hf(a, m, ids))
            for system, llm in llms.items():
                results.setdefault((system, length), []).append(run_llama(a, llm, ids))
            print(f"  length {length} repeat {rep + 1}/{a.repeats} done", flush=True)
            if a.out:  # raw runs so far, so that a late failure loses nothing
                os.makedirs(a.out, exist_ok=True)
                json.dump({f"{s} {l}": v for (s, l), v in results.items()},
                          open(os.path.join(a.out, "peers-raw.json"), "w"), indent=1)
    info["cpu_path"] = CPU_PATH_LINES or ["cpu path: (not reported)"]

    systems = ["fastkv-full", "fastkv", *hf, *llms]
    rows = []
    for length in lengths:
        med = {s: tuple(statistics.median(v) for v in zip(*results[(s, length)])) for s in systems}
        ours = med["fastkv-full"]
        kv_full = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * length * a.kv_bytes
        for s in systems:
            pre, dec = med[s]
            row = dict(system=s, tokens=length, prefill_tok_s=pre, decode_tok_s=dec,
                       prefill_ratio=ratio(ours[0], pre), decode_ratio=ratio(ours[1], dec),
                       runs=[list(r) for r in results[(s, length)]])
            if s.startswith("fastkv"):
                kv = kv_full * (kvb[(s, length)] / kvb[("fastkv-full", length)] if kvb[("fastkv-full", length)] else 1)
                row["bytes_per_token"] = shape["weight_bytes"] + kv
                row["decode_gb_s"] = row["bytes_per_token"] * dec / 1e9
                if info["triad_gb_s"]:
                    row["triad_share"] = row["decode_gb_s"] / info["triad_gb_s"]
            rows.append(row)

    md = [f"Threads {a.threads}; new tokens {a.new_tokens}; medians of {a.repeats} repeat(s). Ratios are "
          "fastkv-full / system (>1: fastkv-full faster). Decode GB/s = (bf16 weights "
          f"{shape['weight_bytes'] / 1e6:.1f} MB incl. LM head {shape['lm_head']} + KV at {a.kv_bytes:g} B/elem) "
          "x decode tok/s; share = of the triad.", "",
          "| system | tokens | prefill tok/s | decode tok/s | prefill ratio | decode ratio | decode GB/s | % triad |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gb = f"{r['decode_gb_s']:.2f}" if "decode_gb_s" in r else ""
        sh = f"{100 * r['triad_share']:.0f}%" if "triad_share" in r else ""
        md.append(f"| {r['system']} | {r['tokens']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
                  f"{r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {gb} | {sh} |")
    hdr = [f"CPU: {c['model']} (" + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in c["flags"].items()) + ")",
           "fastkv " + "; ".join(info["cpu_path"]),
           *(f"GEMM bench {l}" for l in info["gemm_bench_cpu_path"]),
           f"torch {info['torch']}, cpu capability {info['torch_cpu_capability']}",
           f"llama.cpp {info.get('llama_cpp', '-')}, n_batch {a.n_batch}: {info.get('llama_system_info', '-')}",
           f"triad {info['triad_gb_s']} GB/s", *LLAMA_NOTES, "",
           f"Cross-check: {check['prompt_tokens']}-token real prompt, greedy {a.check_steps} steps "
           f"(HF tokenizer gives fastkv's ids: {'yes' if check['tokenizer_agrees'] else 'NO'}):", ""]
    for s in systems:
        hdr.append(f"- {s}: {check[s]} " + ("(reference)" if s == "fastkv-full" else
                                            "matches" if check[s] == ref else "**differs**")
                   + (" (compressed KV: may differ)" if s == "fastkv" else ""))
    table = "\n".join(hdr + [""] + md) + "\n"
    print()
    print(table)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        json.dump(dict(info=info, shape=shape, check=check, rows=rows), open(os.path.join(a.out, "peers.json"), "w"), indent=1)
        open(os.path.join(a.out, "peers.md"), "w").write(table)
        plot(rows, systems, lengths, a.out, a.threads)


def plot(rows, systems, lengths, out, threads):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no charts")
        return
    for key, title, fname in [("prefill_tok_s", "prefill", "prefill.png"), ("decode_tok_s", "decode", "decode.png")]:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        w = 0.8 / len(systems)
        for i, s in enumerate(systems):
            v = [next(r[key] for r in rows if r["system"] == s and r["tokens"] == l) for l in lengths]
            ax.bar([j + i * w for j in range(len(lengths))], v, w, label=s)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(lengths))], [f"{l} tokens" for l in lengths])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} speed, {threads} threads (higher is better)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
