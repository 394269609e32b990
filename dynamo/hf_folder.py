"""The Hugging Face-style model folder that Dynamo's frontend needs, written from a fastkv engine
directory.

The frontend tokenizes, applies the chat template and detokenizes itself, and it reads those from
an HF folder (config.json, tokenizer.json, tokenizer_config.json, generation_config.json); it
cannot read fastkv's engine.json. Everything here comes from engine.json and the engine's own
tokenizer.json, so the frontend's token ids are the ids fastkv would have made.
"""

import json
import os
import tempfile
from pathlib import Path

# fastkv's `arch` → (HF architecture class, HF model_type).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def read_engine(engine: Path) -> dict:
    """engine.json, with an error that names the file when it is missing or not a fastkv engine."""
    path = engine / "engine.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"--engine: {path} not found (an engine directory is what fastkv-build writes)")
    except json.JSONDecodeError as e:
        raise SystemExit(f"--engine: {path} is not JSON: {e}")
    if spec.get("format") != "fastkv-engine" or "model" not in spec or "tokenizer" not in spec:
        raise SystemExit(f"--engine: {path} is not a fastkv engine description (format fastkv-engine)")
    if not (engine / "tokenizer.json").is_file():
        raise SystemExit(f"--engine: {engine / 'tokenizer.json'} not found; the frontend needs it to tokenize")
    return spec


def token_id(tokenizer: dict, text: str | None) -> int | None:
    """The id of a special token's text in tokenizer.json's added tokens, if it is one."""
    return next((t["id"] for t in tokenizer.get("added_tokens", []) if t["content"] == text), None)


def default_dir(served_model_name: str) -> Path:
    """The same path for every worker of a model: Dynamo's frontend accepts a second worker only
    when its model card, which records the folder's path, matches the first's."""
    return Path(tempfile.gettempdir()) / "fastkv-dynamo" / served_model_name.replace("/", "--")


def _replace(path: Path, data: bytes) -> None:
    """Writes atomically, so that a frontend never reads a half-written file while a second worker
    on the host rewrites the same folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write(engine: Path, out: Path) -> dict:
    """Writes the folder at `out` (replacing what this function wrote there before); returns engine.json."""
    spec = read_engine(engine)
    model, tok = spec["model"], spec["tokenizer"]
    arch = model["arch"]
    if arch not in ARCHITECTURES:
        raise SystemExit(f"--engine: architecture {arch!r} in engine.json has no HF equivalent here")
    cls, model_type = ARCHITECTURES[arch]
    tokenizer = json.loads((engine / "tokenizer.json").read_text())
    eos = list(tok["eos_token_ids"])
    bos = token_id(tokenizer, tok.get("bos_token"))
    scaling = dict(model.get("rope_scaling") or {})
    kind = scaling.pop("type", "none")
    config = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": model["vocab_size"],
        "hidden_size": model["hidden_size"],
        "intermediate_size": model.get("intermediate_size"),
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_heads"],
        "num_key_value_heads": model["num_kv_heads"],
        "head_dim": model["head_dim"],
        "max_position_embeddings": model["max_position_embeddings"],
        "rope_theta": model["rope_theta"],
        "rope_scaling": None if kind == "none" else {"rope_type": kind, **scaling},
        "rms_norm_eps": model["rms_norm_eps"],
        "tie_word_embeddings": model.get("tie_word_embeddings", False),
        "sliding_window": model.get("sliding_window"),
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "bfloat16",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.get("bos_token"),
        "eos_token": tok.get("eos_token"),
        "chat_template": tok.get("chat_template"),
        "model_max_length": model["max_position_embeddings"],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": eos}
    out.mkdir(parents=True, exist_ok=True)
    for name, value in [
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ]:
        _replace(out / name, (json.dumps(value, indent=2) + "\n").encode())
    _replace(out / "tokenizer.json", (engine / "tokenizer.json").read_bytes())
    return spec
