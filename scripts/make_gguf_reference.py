#!/usr/bin/env python3
"""Regenerates tests/fixtures/gguf/: what an independent implementation computes on the real GGUF
models, the small golden outputs tests/gguf.rs checks fastkv-build's GGUF import against.

- dequant.json: blocks of every supported ggml type with gguf-py's dequantization of them: the
  first and last block of one tensor per type found in the model files, plus random blocks
  (sane f16 scales) of every type.
- <model>.json: per prompt, the reference tokenizer's ids, last-token logits (top 32 ids and every
  64th id) and a 16-token greedy continuation from transformers loading the GGUF itself
  (gguf_file=..., float32; it dequantizes with gguf-py and converts the tokenizer on its own).

Needs (once, not in CI):  pip install gguf==0.19.0 torch transformers; scripts/models.sh [--with-qwen]
Run from the repository root:  python3 scripts/make_gguf_reference.py [--with-qwen]
"""
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "target" / "models"
OUT = ROOT / "tests" / "fixtures" / "gguf"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = "Qwen2.5-Coder-0.5B-Instruct.gguf"

PROMPTS = [
    "The capital of France is",
    "Numbers 12345 and 3.14159, punctuation!? \"quotes\" -- and\n\nnewlines\tand    runs of    spaces. "
    "Café, naïve, 中文, emoji 🚀🎉.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    " ".join(["Key-value caches grow with the prompt, so long-context inference spends most of its memory on"
              " them. Token-selective propagation keeps only the tokens that later layers attend to, and"
              " grouped-query attention lets several query heads share one key-value head."] * 3)
    + " In one sentence, the main idea is",
]
CHAT_MESSAGE = "What is 2+2? Answer briefly."
SUPPORTED = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of the f16 scale fields in one block (random bytes there could be NaN or huge).
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2],
              T.Q5_K: [0, 2], T.Q6_K: [208]}


def block_entry(kind, raw, source):
    values = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8), kind).reshape(-1)
    return {"type": kind.name, "source": source, "bytes": raw.hex(), "values": [float(v) for v in values]}


def dequant_fixture(files):
    blocks = []
    for path in files:
        seen = set()
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type in seen:
                continue
            seen.add(t.tensor_type)
            raw = bytes(np.asarray(t.data).view(np.uint8).reshape(-1))
            _, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            for at, name in [(0, "first"), (len(raw) - size, "last")]:
                blocks.append(block_entry(t.tensor_type, raw[at:at + size], f"{path.name}: {t.name}, {name} block"))
    rng = np.random.default_rng(0)
    for kind in SUPPORTED:
        if kind == T.F32:
            raw = rng.standard_normal(8).astype("<f4").tobytes()
        elif kind == T.F16:
            raw = rng.standard_normal(8).astype("<f2").tobytes()
        elif kind == T.BF16:
            raw = (rng.standard_normal(8).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            b = bytearray(rng.integers(0, 256, gguf.GGML_QUANT_SIZES[kind][1], dtype=np.uint8).tobytes())
            for at in F16_FIELDS[kind]:
                b[at:at + 2] = np.float16(rng.uniform(-0.1, 0.1)).astype("<f2").tobytes()
            raw = bytes(b)
        blocks.append(block_entry(kind, raw, "random bytes"))
    return {"gguf_py": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0", "blocks": blocks}


def model_fixture(path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT_MESSAGE}], add_generation_prompt=True,
                                   tokenize=False)
    prompts = []
    for text in PROMPTS + [chat]:
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1].double().numpy()
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                                 min_new_tokens=16, eos_token_id=None, pad_token_id=0)
        pick = sorted(set(np.argsort(-logits)[:32].tolist()) | set(range(0, len(logits), 64)))
        prompts.append({"text": text, "ids": ids, "logit_ids": pick,
                        "logits": [float(f"{logits[i]:.7g}") for i in pick],
                        "greedy": out[0, len(ids):].tolist(),
                        "greedy_text": tok.decode(out[0, len(ids):])})
        print(f"{path.name}: {len(ids)} tokens -> {prompts[-1]['greedy_text']!r}", file=sys.stderr)
    eos = model.generation_config.eos_token_id
    return {"file": path.name, "transformers": transformers.__version__, "torch": torch.__version__,
            "eos_token_ids": eos if isinstance(eos, list) else [eos],
            "chat_message": CHAT_MESSAGE, "chat_text": chat, "prompts": prompts}


def main():
    files = [MODELS / SMOL] + ([MODELS / QWEN] if "--with-qwen" in sys.argv else [])
    for f in files:
        if not f.exists():
            sys.exit(f"{f} not found: run scripts/models.sh{' --with-qwen' if f.name == QWEN else ''} first")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dequant.json").write_text(json.dumps(dequant_fixture(files)) + "\n")
    for f, name in zip(files, ["smollm2", "qwen2.5-coder"]):
        (OUT / f"{name}.json").write_text(json.dumps(model_fixture(f), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
