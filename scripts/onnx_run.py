#!/usr/bin/env python3
"""Checks and runs a fastkv ONNX export (fastkv-build --export-onnx DIR) with onnx and onnxruntime.

    onnx_run.py check DIR
        onnx.checker.check_model (with the external weights) on all five graphs.
    onnx_run.py run DIR --ids IDS.json --new-tokens N --out OUT.json
        prefill.reference.onnx on the token ids of IDS.json (a JSON list), then greedy decoding with
        decode.reference.onnx until N tokens are chosen; writes JSON: logits (last prompt token),
        kept (per layer, per KV head, the sorted original positions cached), tsp_positions and tokens.

tests/onnx.rs runs both against the CPU engine; scripts/onnx-deps.sh installs the pinned packages.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

GRAPHS = ["prefill.onnx", "decode.onnx", "prefill.reference.onnx", "decode.reference.onnx", "decode_cached.onnx"]


def check(directory):
    for name in GRAPHS:
        onnx.checker.check_model(os.path.join(directory, name))
        print(f"{name}: ok")


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("FASTKV_ORT_THREADS", "2"))
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(directory, ids, new_tokens):
    prefill = session(os.path.join(directory, "prefill.reference.onnx"))
    meta = prefill.get_modelmeta().custom_metadata_map
    lo, hi = int(meta["fastkv.min_prompt_len"]), int(meta["fastkv.max_prompt_len"])
    if not lo <= len(ids) <= hi:
        sys.exit(f"onnx_run.py: the prompt has {len(ids)} tokens; this export takes {lo}..={hi} (every FastKV gate open)")
    layers = int(meta["fastkv.num_layers"])
    names = [o.name for o in prefill.get_outputs()]
    out = dict(zip(names, prefill.run(None, {"input_ids": np.asarray(ids, dtype=np.int64)})))
    del prefill
    result = {
        "logits": out["logits"].tolist(),
        "kept": [[sorted(row) for row in out[f"pos_{l}"].tolist()] for l in range(layers)],
        "tsp_positions": out["tsp_positions"].tolist(),
    }
    cache = {}
    for l in range(layers):
        cache[f"past_k_{l}"], cache[f"past_v_{l}"], cache[f"past_pos_{l}"] = out[f"k_{l}"], out[f"v_{l}"], out[f"pos_{l}"]
    tokens = [int(np.argmax(out["logits"]))]
    decode = session(os.path.join(directory, "decode.reference.onnx"))
    names = [o.name for o in decode.get_outputs()]
    while len(tokens) < new_tokens:
        feed = {"input_id": np.asarray([tokens[-1]], np.int64), "position": np.asarray([len(ids) + len(tokens) - 1], np.int64)}
        step = dict(zip(names, decode.run(None, {**feed, **cache})))
        for l in range(layers):
            for part in ("k", "v", "pos"):
                cache[f"past_{part}_{l}"] = step[f"present_{part}_{l}"]
        tokens.append(int(np.argmax(step["logits"])))
    result["tokens"] = tokens
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check").add_argument("dir")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--ids", required=True)
    r.add_argument("--new-tokens", type=int, default=5)
    r.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "check":
        check(args.dir)
    else:
        with open(args.ids) as f:
            ids = json.load(f)
        with open(args.out, "w") as f:
            json.dump(run(args.dir, ids, args.new_tokens), f)


if __name__ == "__main__":
    main()
