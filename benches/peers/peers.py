#!/usr/bin/env python3
"""fastkv vs HF transformers (PyTorch CPU, sdpa, bf16 and f32) vs llama.cpp on one machine and model.

    python3 benches/peers/peers.py --fastkv target/release/fastkv --engine ENGINE_DIR \
        --hf HF_MODEL_DIR [--gguf MODEL-bf16.gguf] [--lengths 1024,4096,8192] [--threads 2]

Run it by hand (not in CI) once per model (SmolLM2, Qwen2.5-0.5B): ENGINE_DIR is the model built by
fastkv-build (bf16), HF_MODEL_DIR the same checkpoint, the GGUF its bf16/f16 conversion
(`pip install llama-cpp-python` for that column; without --gguf it is skipped). Systems are
interleaved per length and repeat so that background load hits all alike. Every system gets the same
prompt length and greedy-decodes --new-tokens tokens; prefill tok/s = length / TTFT, decode tok/s
over the generated tokens after the first. fastkv runs full KV and FastKV (`fastkv bench`).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time


def run_fastkv(a, length):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        subprocess.run([a.fastkv, "bench", "--engine", a.engine, "--lengths", str(length), "--warmup", "0",
                        "--repeats", "1", "--new-tokens", str(a.new_tokens), "--methods", "full,fastkv",
                        "--json", f.name], check=True, env=env, stdout=subprocess.DEVNULL)
        rows = json.load(open(f.name))
    name = lambda method: "fastkv" if method == "fastkv" else f"fastkv-{method}"
    return {name(r["method"]): (r["prefill_tokens_per_s"]["median"], r["decode_tokens_per_s"]["median"])
            for r in rows}


def prompt_ids(length, vocab):
    # Fixed pseudo-random ids: speed does not depend on the text, and all systems see the same tokens.
    return [(i * 7919 + 13) % (vocab // 2) + vocab // 4 for i in range(length)]


def run_hf(a, model, length):
    import torch
    ids = torch.tensor([prompt_ids(length, model.config.vocab_size)])
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        ttft = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(a.new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t
    return length / ttft, (a.new_tokens - 1) / decode


def run_llama(a, llm, length):
    import numpy as np
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids(length, llm.n_vocab()))
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.new_tokens - 1):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = time.perf_counter() - t
    return length / ttft, (a.new_tokens - 1) / decode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fastkv", required=True, help="the fastkv binary (cargo build --release)")
    p.add_argument("--engine", required=True, help="fastkv engine directory (bf16)")
    p.add_argument("--hf", required=True, help="HF checkpoint directory of the same model, or a .gguf file "
                   "(transformers dequantizes it; e.g. the file the engine was built from)")
    p.add_argument("--gguf", help="bf16/f16 GGUF of the same model, for llama.cpp")
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    lengths = [int(v) for v in a.lengths.split(",")]

    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    source = dict(pretrained_model_name_or_path=a.hf)
    if a.hf.endswith(".gguf"):
        path = os.path.realpath(a.hf)
        source = dict(pretrained_model_name_or_path=os.path.dirname(path), gguf_file=os.path.basename(path))
    hf = {f"hf-{name}": AutoModelForCausalLM.from_pretrained(**source, dtype=dtype, attn_implementation="sdpa").eval()
          for name, dtype in [("bf16", torch.bfloat16), ("f32", torch.float32)]}
    llm = None
    if a.gguf:
        from llama_cpp import Llama
        llm = Llama(model_path=a.gguf, n_ctx=max(lengths) + a.new_tokens + 16, n_threads=a.threads,
                    n_threads_batch=a.threads, n_batch=512, verbose=False)

    for model in hf.values():  # warm-up: first calls pay one-time dispatch and allocation costs
        run_hf(a, model, 64)
    if llm is not None:
        run_llama(a, llm, 64)
    results = {}  # (system, length) -> [(prefill tok/s, decode tok/s)]
    for length in lengths:
        for _ in range(a.repeats):
            for system, r in run_fastkv(a, length).items():
                results.setdefault((system, length), []).append(r)
            for system, model in hf.items():
                results.setdefault((system, length), []).append(run_hf(a, model, length))
            if llm is not None:
                results.setdefault(("llama.cpp", length), []).append(run_llama(a, llm, length))

    systems = sorted({s for s, _ in results}, key=lambda s: (not s.startswith("fastkv"), s))
    print(f"{'system':<16} {'tokens':>6} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'fastkv-full/x prefill':>22} {'decode':>7}")
    for length in lengths:
        ours = [statistics.median(v) for v in zip(*results[("fastkv-full", length)])]
        for s in systems:
            pre, dec = (statistics.median(v) for v in zip(*results[(s, length)]))
            print(f"{s:<16} {length:>6} {pre:>14.1f} {dec:>13.2f} {ours[0] / pre:>22.2f} {ours[1] / dec:>7.2f}")


if __name__ == "__main__":
    main()
