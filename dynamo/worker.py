"""fastkv as an NVIDIA Dynamo worker.

Starts `fastkv serve` as a child on a free loopback port, registers the engine's model with Dynamo
(an HF-style folder written from the engine directory, so that the frontend tokenizes exactly as
fastkv would) and serves Dynamo's `generate` endpoint by streaming each request's token ids through
the child's /v1/completions. Built on ai-dynamo's Python backend SDK (dynamo.common.backend), whose
Rust worker owns discovery registration, cancellation monitoring and graceful shutdown.

SIGTERM: the worker leaves discovery (no new requests), waits Dynamo's grace period
(DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS, 5 s), then stops the child, which lets its running
requests finish (--shutdown-timeout), and exits 0. If the child dies, the worker leaves discovery
and exits 1; if the worker dies, the child gets SIGTERM (Linux's parent-death signal). FastKV policy overrides per request: the
annotation `fastkv:{...}` in the OpenAI body's `nvext.annotations` (see translate.py).
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
from dynamo._core import Context
from dynamo.common.backend import EngineConfig, LLMEngine, LlmRegistration, WorkerConfig
from dynamo.common.backend.run import run
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument, Unknown

import hf_folder
import translate
from child import Child

log = logging.getLogger("fastkv.dynamo")
REPO = Path(__file__).resolve().parent.parent
child_failure: str | None = None  # why the worker stops itself, if it does


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python dynamo/worker.py",
        description=__doc__,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    fastkv = p.add_argument_group("fastkv serve (the child that does the inference)")
    fastkv.add_argument("--engine", required=True, type=Path, help="engine directory written by fastkv-build")
    fastkv.add_argument("--fastkv", default=str(REPO / "target/release/fastkv"),
                        help="the fastkv binary [default: target/release/fastkv of this repository]")
    fastkv.add_argument("--device", default="cpu",
                        help="cpu or cuda:N [default: cpu]; also advertised to Dynamo as the device type")
    fastkv.add_argument("--max-running", type=int, default=64,
                        help="most requests decoding at once [default: 64]; advertised to Dynamo as max_num_seqs")
    fastkv.add_argument("--kv-cache-memory", help="memory for the KV caches (K, M, G suffixes) [default: fastkv's]")
    fastkv.add_argument("--max-waiting", type=int, help="requests that may wait for cache memory [default: fastkv's]")
    fastkv.add_argument("--prefill-slice-ms", type=int,
                        help="milliseconds a new request's prefill may run before a decode step [default: fastkv's]")
    fastkv.add_argument("--shutdown-timeout", type=int, default=30,
                        help="seconds running requests may take to finish after SIGTERM [default: 30]")
    fastkv.add_argument("--startup-timeout", type=float, default=600,
                        help="seconds to wait for the child's GET /health to answer 200 [default: 600]")
    dynamo = p.add_argument_group("Dynamo")
    dynamo.add_argument("--served-model-name", help="the model name clients send [default: the engine directory's name]")
    dynamo.add_argument("--model-dir", type=Path,
                        help="where to write the HF-style model folder; the same path for every worker of "
                        "a model (Dynamo compares the paths) [default: $TMPDIR/fastkv-dynamo/<served name>]")
    dynamo.add_argument("--namespace", default=env("DYN_NAMESPACE", "dynamo"),
                        help="Dynamo namespace [default: $DYN_NAMESPACE or dynamo]")
    dynamo.add_argument("--component", default="fastkv", help="Dynamo component [default: fastkv]")
    dynamo.add_argument("--endpoint", default="generate", help="Dynamo endpoint [default: generate]")
    dynamo.add_argument("--discovery-backend", default=env("DYN_DISCOVERY_BACKEND", "etcd"),
                        choices=["etcd", "file", "kubernetes", "mem"],
                        help="how workers and frontends find each other: etcd (ETCD_ENDPOINTS), or file "
                        "(DYN_FILE_KV, one host) [default: $DYN_DISCOVERY_BACKEND or etcd]")
    dynamo.add_argument("--request-plane", default=env("DYN_REQUEST_PLANE", "tcp"), choices=["tcp", "nats"],
                        help="[default: $DYN_REQUEST_PLANE or tcp]")
    dynamo.add_argument("--event-plane", default=env("DYN_EVENT_PLANE"), choices=["nats", "zmq"],
                        help="[default: $DYN_EVENT_PLANE or Dynamo's choice]")
    return p


def error_message(body: str | bytes) -> str:
    """The message (and field) of an OpenAI-style error body, or the body itself."""
    try:
        error = json.loads(body)["error"]
        return error["message"] + (f" ({error['param']})" if error.get("param") else "")
    except (ValueError, KeyError, TypeError):
        return body if isinstance(body, str) else body.decode(errors="replace")


class FastkvEngine(LLMEngine):
    """One `fastkv serve` child behind Dynamo's engine contract."""

    def __init__(self, args: argparse.Namespace, name: str, model_dir: Path, spec: dict):
        self.args, self.name, self.model_dir, self.spec = args, name, model_dir, spec
        self.child: Child | None = None
        self.http: aiohttp.ClientSession | None = None
        self.streams: dict[str, aiohttp.ClientResponse] = {}  # by request id, for abort()

    @classmethod
    async def from_args(cls, argv=None):
        args = parser().parse_args(argv)
        if not Path(args.fastkv).is_file():
            raise SystemExit(f"--fastkv: {args.fastkv} not found (cargo build --release -p fastkv-cli makes it)")
        if args.max_running < 1:
            raise SystemExit("--max-running: must be at least 1")
        if args.device != "cpu" and not args.device.startswith("cuda:"):
            raise SystemExit(f"--device: {args.device!r} is neither cpu nor cuda:N")
        if args.device == "cpu":
            # Dynamo advertises an endpoint as CUDA unless CUDA_VISIBLE_DEVICES hides every GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        args.engine = args.engine.resolve()
        name = args.served_model_name or args.engine.name
        # Absolute: the path is part of the model card every worker and frontend compares.
        model_dir = (args.model_dir or hf_folder.default_dir(name)).resolve()
        spec = hf_folder.write(args.engine, model_dir)
        engine = cls(args, name, model_dir, spec)
        config = WorkerConfig(
            namespace=args.namespace,
            component=args.component,
            endpoint=args.endpoint,
            model_name=str(model_dir),
            served_model_name=name,
            discovery_backend=args.discovery_backend,
            request_plane=args.request_plane,
            event_plane=args.event_plane,
            # A FastKV cache depends on the whole prompt: there are no reusable prefix blocks to report.
            enable_kv_routing=False,
            enable_local_indexer=False,
        )
        return engine, config

    async def start(self, worker_id: int) -> EngineConfig:
        a = self.args
        flags = ["--engine", str(a.engine), "--served-model-name", self.name, "--device", a.device,
                 "--max-running", str(a.max_running), "--shutdown-timeout", str(a.shutdown_timeout)]
        for flag, value in [("--kv-cache-memory", a.kv_cache_memory), ("--max-waiting", a.max_waiting),
                            ("--prefill-slice-ms", a.prefill_slice_ms)]:
            if value is not None:
                flags += [flag, str(value)]
        self.child = Child(a.fastkv, flags)
        await asyncio.to_thread(self.child.wait_healthy, a.startup_timeout)
        self.child.watch(self.child_exited)
        # No total timeout: generations may be long. Loopback connects are quick.
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=10), connector=aiohttp.TCPConnector(limit=0)
        )
        log.info("fastkv serve is ready at %s; Dynamo worker %s", self.child.url, worker_id)
        return EngineConfig(
            model=str(self.model_dir),
            served_model_name=self.name,
            llm=LlmRegistration(
                context_length=self.spec["model"]["max_position_embeddings"], max_num_seqs=a.max_running
            ),
        )

    async def generate(self, request, context: Context):
        try:
            body = translate.completion_body(request, self.name)
        except ValueError as e:
            raise InvalidArgument(str(e))
        prompt_tokens, generated = len(request["token_ids"]), 0
        try:
            response = await self.http.post(f"{self.child.url}/v1/completions", json=body)
        except aiohttp.ClientError as e:
            raise EngineShutdown(f"fastkv serve is unreachable: {e}")
        self.streams[context.id()] = response
        try:
            if response.status != 200:
                message = f"fastkv serve answered {response.status}: {error_message(await response.text())}"
                raise InvalidArgument(message) if response.status == 400 else Unknown(message)
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue  # blank separators and keep-alive comments
                data = line[len(b"data: "):].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise Unknown(f"fastkv serve: {error_message(data)}")
                try:
                    out = translate.output(chunk)
                except ValueError as e:
                    raise Unknown(str(e))
                generated += len(out["token_ids"])
                if "finish_reason" in out:
                    out["completion_usage"] = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": generated,
                        "total_tokens": prompt_tokens + generated,
                    }
                yield out
            if not context.is_stopped():
                raise Unknown("fastkv serve's stream ended before [DONE]")
        except aiohttp.ClientError as e:
            if not context.is_stopped():  # else abort() closed it
                raise Unknown(f"fastkv serve's stream broke: {e}")
        finally:
            self.streams.pop(context.id(), None)
            response.close()

    def child_exited(self, message: str) -> None:
        """A worker without its child must not stay in discovery: SIGTERM itself, so that it
        unregisters at once (no waiting for its lease) and exits; main() makes the exit status 1."""
        global child_failure
        child_failure = message
        log.error("%s", message)
        os.kill(os.getpid(), signal.SIGTERM)

    async def abort(self, context: Context) -> None:
        """Closing the HTTP stream is how fastkv serve learns that the client went away: it cancels
        the request at its next step."""
        response = self.streams.pop(context.id(), None)
        if response is not None:
            response.close()

    async def cleanup(self) -> None:
        # The child first: on SIGTERM it finishes its running requests, whose streams still need
        # the HTTP session to reach Dynamo.
        if self.child is not None:
            code = await asyncio.to_thread(self.child.stop, self.args.shutdown_timeout + 5)
            log.info("fastkv serve stopped (exit status %s)", code)
            self.child = None
        if self.http is not None:
            await self.http.close()
            self.http = None


def main() -> None:
    # --help without starting Dynamo's runtime (run() parses the arguments inside it).
    if {"-h", "--help"} & set(sys.argv[1:]):
        parser().print_help()
        return
    run(FastkvEngine)
    if child_failure:
        sys.exit(1)


if __name__ == "__main__":
    main()
