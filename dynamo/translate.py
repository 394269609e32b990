"""Dynamo's token-level request ↔ fastkv serve's /v1/completions body.

Dynamo's frontend sends a PreprocessedRequest (prompt token ids, stop conditions, sampling options)
and expects token ids back: it detokenizes, applies stop strings and builds the OpenAI response
itself. fastkv serve takes a prompt of token ids and, with `return_token_ids`, streams the ids of
each chunk's tokens, so no text crosses this adapter.
"""

import json
from typing import Any

ANNOTATION = "fastkv:"


def policy_overrides(request: dict[str, Any]) -> dict[str, Any] | None:
    """A request's FastKV policy overrides, from the annotation `fastkv:{...JSON object...}`.

    Dynamo 1.6.1's frontend rejects unknown top-level fields and its `nvext` has no free-form
    object, but it forwards `nvext.annotations` (strings) to the worker untouched, so a client sends
    `"nvext": {"annotations": ["fastkv:{\\"method\\": \\"snapkv\\"}"]}`. The object goes to fastkv
    serve as the body's `fastkv` field, which checks it (an unknown key or a bad value is a 400 that
    names it). Raises ValueError (a 400 for the client) when the annotation is not a JSON object.
    """
    found = [a[len(ANNOTATION):] for a in request.get("annotations") or [] if a.startswith(ANNOTATION)]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError("more than one `fastkv:` annotation")
    try:
        overrides = json.loads(found[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"the `fastkv:` annotation is not JSON: {e}")
    if not isinstance(overrides, dict):
        raise ValueError("the `fastkv:` annotation must be a JSON object of policy overrides")
    return overrides


def completion_body(request: dict[str, Any], model: str) -> dict[str, Any]:
    """The streamed /v1/completions body for one PreprocessedRequest.

    Stop strings are left to the frontend (it stops the stream, which cancels the request here).
    Sampling options fastkv has no equivalent of (top_k, min_p, penalties) are not sent, as fastkv
    serve ignores fields it does not know; n > 1 is refused (ValueError).
    """
    stop = request.get("stop_conditions") or {}
    sampling = request.get("sampling_options") or {}
    if sampling.get("n") not in (None, 1):
        raise ValueError(f"n = {sampling['n']}: fastkv returns one choice per request")
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request["token_ids"]),
        "stream": True,
        "return_token_ids": True,
        "ignore_eos": bool(stop.get("ignore_eos")),
    }
    if stop.get("max_tokens") is not None:
        body["max_tokens"] = stop["max_tokens"]
    for key in ("temperature", "top_p", "seed"):
        if sampling.get(key) is not None:
            body[key] = sampling[key]
    overrides = policy_overrides(request)
    if overrides:
        body["fastkv"] = overrides
    return body


def output(chunk: dict[str, Any]) -> dict[str, Any]:
    """Dynamo's LLM output for one streamed fastkv chunk: its token ids and, on the last, how it
    finished ("stop": EOS or a stop, "length": max_tokens). Raises ValueError for a chunk without
    token ids (a fastkv serve that predates `return_token_ids`)."""
    choice = chunk["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:
        raise ValueError("fastkv serve sent no token_ids: it predates return_token_ids; rebuild it")
    out: dict[str, Any] = {"token_ids": ids, "index": 0}
    if choice.get("finish_reason"):
        out["finish_reason"] = choice["finish_reason"]
    return out
