#!/usr/bin/env python3
"""Prepare one GGUF model for the side-by-side benchmark (called by benches/peers/run.sh).

    prepare.py hf     SRC.gguf OUT_DIR      # HF checkpoint (bf16 safetensors + tokenizer), via transformers
    prepare.py bf16   SRC.gguf OUT.gguf     # the same model as a BF16 GGUF for llama.cpp
    prepare.py verify SRC.gguf OUT.gguf     # llama.cpp loads both and greedy-decodes the same tokens

The HF checkpoint is saved in bf16: transformers dequantizes the GGUF to f32 and we round once to
bf16, exactly as fastkv-build --dtype bf16 and the BF16 GGUF do, so that every system (HF bf16, HF
f32 = bf16 weights upcast, llama.cpp BF16, fastkv bf16) runs the very same weight values.

The BF16 GGUF: every tensor is dequantized to f32 with the gguf package; tensors of two or more
dimensions are stored as BF16 (round-to-nearest-even), 1-D tensors (norm weights, biases) stay F32
as convert_hf_to_gguf.py does; every metadata KV pair (tokenizer included) is copied and
general.file_type is set to MOSTLY_BF16.
"""
import os
import sys

import numpy as np


def to_hf(src, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = os.path.realpath(src)
    d, f = os.path.dirname(src), os.path.basename(src)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    import shutil
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy its (dequantized)
    # weights into a plain model of the same config and save that.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} (tie_word_embeddings={model.config.tie_word_embeddings})")


def to_bf16(src, out):
    import gguf
    from gguf import GGMLQuantizationType as Q, GGUFValueType as V
    r = gguf.GGUFReader(src, "r")
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out + ".tmp", arch=arch, endianess=r.endianess)
    align = r.fields.get("general.alignment")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == V.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    if align is not None:
        w.add_custom_alignment(int(align.contents()))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    counts = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(v) for v in reversed(t.shape)])  # numpy order: ggml shape reversed
        if x.ndim >= 2:
            w.add_tensor(t.name, gguf.quants.quantize(x, Q.BF16), raw_dtype=Q.BF16)
            counts["BF16"] = counts.get("BF16", 0) + 1
        else:
            w.add_tensor(t.name, x)
            counts["F32"] = counts.get("F32", 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(out + ".tmp", out)
    print(f"wrote {out}: {counts}")


def greedy(path, text, steps):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import llama_greedy, llama_open, llama_works
    extra = llama_works(path, 2, 512, False)  # llama.cpp's AMX Q4_1 path segfaults on some machines
    if not extra:
        print(f"note: {os.path.basename(path)}: llama.cpp crashes with AMX/repack buffers; using use_extra_bufts=false")
    llm = llama_open(path, extra, n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False)
    ids = llm.tokenize(text, add_bos=True)
    return ids, llama_greedy(llm, ids, steps)


def verify(src, bf16):
    text = b"The capital of France is Paris. The capital of Germany is"
    (ia, a), (ib, b) = greedy(src, text, 8), greedy(bf16, text, 8)
    print(f"prompt ids {'identical' if ia == ib else 'DIFFER'} ({len(ia)} tokens)")
    print(f"llama.cpp greedy, original: {a}\nllama.cpp greedy, BF16:     {b}")
    print("BF16 GGUF verify:", "MATCH" if a == b and ia == ib else
          "DIFFER (the BF16 file is the dequantized original; a differing argmax would point at a bad conversion)")
    sys.exit(0 if ia == ib else 1)


if __name__ == "__main__":
    cmd, src, out = sys.argv[1:4]
    {"hf": to_hf, "bf16": to_bf16, "verify": verify}[cmd](src, out)
