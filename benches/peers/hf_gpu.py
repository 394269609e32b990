"""HF transformers on the GPU, the side-by-side anchor of benches/cuda_engine.rs: the same model shape
(an engines/*.json preset's config), random bf16 weights, PyTorch SDPA attention, the same token ids, one
prefill per length with logits only for the last token (`logits_to_keep=1`), timed with CUDA events.

    python3 benches/peers/hf_gpu.py [--preset llama-3.1-8b] [--lengths 32768] [--json FILE]

Needs torch with CUDA and transformers (the GPU machine has both); prints one JSON object.
"""

import argparse
import json
import pathlib
import sys

try:
    import torch
    import transformers
except ImportError as e:
    sys.exit(f"no CUDA device: the HF peer needs torch with CUDA and transformers ({e})")


def tokens(n, vocab):
    # The same ids as benches/cuda_engine.rs: i * 2654435761 mod 2^32 mod vocab.
    return [((i * 2654435761) & 0xFFFFFFFF) % vocab for i in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--lengths", default="32768")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device: torch {torch.__version__} sees none")
    root = pathlib.Path(__file__).resolve().parents[2]
    cfg = json.loads((root / "engines" / f"{a.preset}.json").read_text())["config"]
    config = transformers.AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).eval()
    rows = []
    with torch.inference_mode():
        warm = torch.tensor([tokens(2048, cfg["vocab_size"])], device="cuda")
        model(warm, logits_to_keep=1)
        for n in [int(x) for x in a.lengths.split(",")]:
            ids = torch.tensor([tokens(n, cfg["vocab_size"])], device="cuda")
            times = []
            for _ in range(a.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(ids, logits_to_keep=1, use_cache=True)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            rows.append({"tokens": n, "ttft_s": min(times), "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9})
    out = {"system": f"transformers {transformers.__version__} + torch {torch.__version__}, sdpa, bf16",
           "gpu": torch.cuda.get_device_name(0), "preset": a.preset, "rows": rows}
    text = json.dumps(out)
    if a.json:
        pathlib.Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
