#!/usr/bin/env python3
"""Regenerates tests/fixtures/: tiny random-weight checkpoints of every supported architecture and
what HF transformers computes on them (last-token logits, 16-token greedy continuations, chat
template), the golden outputs the Rust CPU engine is tested against.

Needs (once, not in CI):  pip install torch transformers tokenizers safetensors
Run from the repository root:  python3 scripts/make_fixtures.py
Deterministic for a given torch/transformers version (recorded in each expected.json).
"""
import json
import math
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Deterministic English text: the tokenizer's training corpus and the prompts.
WORDS = ("the model reads a long prompt and keeps only the tokens that matter most for the answer while "
         "the cache stores keys and values for every layer so decoding can attend to what was kept "
         "attention heads share keys in groups and each group scores the window of recent queries "
         "propagation passes selected hidden states to deeper layers which makes prefill much faster "
         "a needle hidden in a haystack of essays tests whether the right tokens survive compression").split()


def text(n_words, seed):
    return " ".join(WORDS[(seed * 7 + i * i * 3 + i) % len(WORDS)] for i in range(n_words))


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [text(200, s) for s in range(50)] + [" ".join(WORDS)]
    tok.train_from_iterator(corpus, trainer)
    return tok


def randomize(model, seed):
    """Weights with a visible spread of logits, and random norm weights so a norm bug can't hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) * 1.5)


def common(vocab, **kw):
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, **kw)


def fixtures(vocab):
    return [
        ("llama", LlamaForCausalLM, LlamaConfig(**common(vocab, tie_word_embeddings=False,
            rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
         torch.float32, "legacy", None),
        ("mistral", MistralForCausalLM, MistralConfig(**common(vocab, head_dim=32, sliding_window=128,
            tie_word_embeddings=False, rope_theta=10000.0)), torch.bfloat16, "rope_parameters", None),
        ("qwen2", Qwen2ForCausalLM, Qwen2Config(**common(vocab, tie_word_embeddings=True, rope_theta=1e6)),
         torch.float16, "legacy", None),
        ("qwen3", Qwen3ForCausalLM, Qwen3Config(**{**common(vocab, head_dim=32, tie_word_embeddings=False,
            rope_theta=1e6), "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8}),
         torch.bfloat16, "rope_parameters", "300KB"),
    ]


def to_legacy_rope(cfg):
    """transformers 5 writes rope_parameters; older checkpoints have rope_theta / rope_scaling."""
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        return cfg
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp
    return cfg


def main():
    torch.manual_seed(0)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    prompts = [text(12, 1), text(90, 2), text(560, 3)]
    for seed, (name, cls, config, dtype, style, shard) in enumerate(fixtures(vocab)):
        d = OUT / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        model = cls(config).eval()
        randomize(model, seed)
        model.to(dtype).save_pretrained(d, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg = to_legacy_rope(cfg) if style == "legacy" else cfg
        assert ("rope_parameters" in cfg) == (style == "rope_parameters"), (name, cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": CHAT_TEMPLATE, "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
            "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
        eos = [ids["<|end_of_text|>"], ids["<|im_end|>"]] if name in ("llama", "qwen3") else ids["<|end_of_text|>"]
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 0}, indent=2))
        for junk in d.glob("chat_template.jinja"):
            junk.unlink()

        # Reload from disk in f32: exactly what the Rust engine reads.
        ref = cls.from_pretrained(d, dtype=torch.float32).eval()
        if name == "mistral":
            assert ref.config.sliding_window == 128  # shorter than the long prompt: the mask matters
        out = {"config_style": style, "dtype": str(dtype).removeprefix("torch."),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "prompts": []}
        for p in prompts:
            pid = tok.encode(p, add_special_tokens=False).ids
            x = torch.tensor([pid])
            with torch.no_grad():
                logits = ref(x).logits[0, -1].tolist()
                gen = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                                   min_new_tokens=16, eos_token_id=None, pad_token_id=0)
            out["prompts"].append({"text": p, "ids": pid, "last_logits": [float(f"{v:.8g}") for v in logits],
                                   "greedy": gen[0, len(pid):].tolist()})
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                                       chat_template=CHAT_TEMPLATE)
        rendered = hf_tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                              tokenize=False)
        out["chat_example"] = {"text": rendered, "ids": tok.encode(rendered, add_special_tokens=False).ids}
        (d / "expected.json").write_text(json.dumps(out))
        print(f"{name}: {style}, {out['dtype']}, {[len(p['ids']) for p in out['prompts']]} prompt tokens")
    print(f"vocab {vocab}, specials {ids}, torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
