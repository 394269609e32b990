"""Integration tests of libtriton_fastkv.so inside a real Triton server (started here, on 127.0.0.1).

Environment (triton/run-tests.sh sets it): FASTKV_TRITONSERVER (the tritonserver binary),
FASTKV_TRITON_BACKENDS (a backend directory holding fastkv/libtriton_fastkv.so), FASTKV_TRITON_ENGINE
(the engine to serve) and FASTKV_CLI (the fastkv binary whose greedy output is the reference).
"""

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "..", "model_repository", "fastkv", "config.pbtxt")
ENGINE = os.path.abspath(os.environ["FASTKV_TRITON_ENGINE"])
CLI = os.environ["FASTKV_CLI"]
PROMPTS = ["Hello world", "The capital of France is", "Once upon a time, in a land far away"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(prompt, max_tokens, *flags):
    """The CLI's output for `prompt` (greedy unless `flags` say otherwise)."""
    out = subprocess.run(
        [CLI, "run", "--engine", ENGINE, "--prompt", prompt, "--max-new-tokens", str(max_tokens), "--json", *flags],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return json.loads(out.stdout)


def add_model(repo, name, params):
    """A model in `repo` from the template config, with `params` replacing its parameters."""
    with open(TEMPLATE) as f:
        config = f.read()
    config = config.replace('name: "fastkv"', f'name: "{name}"')
    config = re.sub(r'parameters: \{ key: "(\w+)".*\n', lambda m: "", config)
    config = config.replace("count: 1", "count: 2")  # two instances share one engine
    config += "".join(f'parameters: {{ key: "{k}", value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())
    os.makedirs(os.path.join(repo, name, "1"))
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write(config)


class Server(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="fastkv-triton-")
        repo = os.path.join(cls.tmp, "models")
        add_model(repo, "fastkv", {"engine_path": ENGINE, "max_concurrency": "16"})
        add_model(repo, "no_engine", {})
        corrupt = os.path.join(cls.tmp, "corrupt-engine")
        shutil.copytree(ENGINE, corrupt)
        weights = [f for f in os.listdir(corrupt) if f.endswith(".safetensors") and "token" not in f]
        for w in weights:
            with open(os.path.join(corrupt, w), "wb") as f:
                f.write(b"not a safetensors file")
        add_model(repo, "corrupt", {"engine_path": corrupt})
        cls.http, grpc = free_port(), free_port()
        cls.url = f"http://127.0.0.1:{cls.http}"
        cls.grpc_url = f"127.0.0.1:{grpc}"
        cls.log_path = os.path.join(cls.tmp, "server.log")
        cls.log = open(cls.log_path, "w")
        cls.server = subprocess.Popen(
            [
                os.environ["FASTKV_TRITONSERVER"], f"--model-repository={repo}",
                f"--backend-directory={os.environ['FASTKV_TRITON_BACKENDS']}",
                "--http-address=127.0.0.1", f"--http-port={cls.http}",
                "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
                "--allow-metrics=false", "--exit-on-error=false", "--strict-readiness=false",
                "--exit-timeout-secs=20",
            ],
            stdout=cls.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{cls.url}/v2/models/fastkv/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline or cls.server.poll() is not None:
                cls.tearDownClass()
                raise RuntimeError(f"tritonserver did not become ready; see {cls.log_path}")
            time.sleep(0.2)

    @classmethod
    def tearDownClass(cls):
        if cls.server.poll() is None:
            cls.server.kill()
            cls.server.wait()
        cls.log.close()
        if os.environ.get("FASTKV_TRITON_KEEP") is None:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def server_log(self):
        with open(self.log_path) as f:
            return f.read()

    def post(self, path, body):
        """(status, JSON) of a POST to the fastkv model."""
        req = urllib.request.Request(f"{self.url}/v2/models/fastkv/{path}", json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stream(self, body):
        """The events of a generate_stream request, in order."""
        req = urllib.request.Request(
            f"{self.url}/v2/models/fastkv/generate_stream", json.dumps({**body, "stream": True}).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]

    def test_generate_matches_cli(self):
        for prompt in PROMPTS:
            want = cli(prompt, 24)
            status, got = self.post("generate", {"text_input": prompt, "max_tokens": 24})
            self.assertEqual(status, 200, got)
            self.assertEqual(got["text_output"], want["text"])
            self.assertEqual(got["generated_tokens"], want["metrics"]["generated_tokens"])
            self.assertEqual(got["prompt_tokens"], len(want["prompt_ids"]))
            self.assertGreater(got["ttft_s"], 0)

    def test_sampling_and_policy_fields_match_cli(self):
        body = {"text_input": PROMPTS[2], "max_tokens": 20, "temperature": 0.8, "top_k": 50, "seed": 7}
        want = cli(PROMPTS[2], 20, "--temperature", "0.8", "--top-k", "50", "--seed", "7", "--method", "snapkv")
        status, got = self.post("generate", {**body, "method": "snapkv"})
        self.assertEqual((status, got["text_output"]), (200, want["text"]))
        self.assertEqual(got["kv_cache_bytes"], want["metrics"]["kv_cache_bytes"])

    def test_generate_stream_matches_cli(self):
        for prompt in PROMPTS:
            want = cli(prompt, 24)
            events = self.stream({"text_input": prompt, "max_tokens": 24})
            self.assertNotIn("error", events[-1])
            self.assertGreater(len(events), 2, "streamed in one piece")
            self.assertEqual("".join(e["text_output"] for e in events), want["text"])
            self.assertEqual(events[-1]["generated_tokens"], want["metrics"]["generated_tokens"])
            self.assertTrue(all("finish_reason" not in e for e in events[:-1]))

    def test_stop_string_ends_generation(self):
        want = cli(PROMPTS[1], 24)["text"]
        stop = want[5:8]
        events = self.stream({"text_input": PROMPTS[1], "max_tokens": 24, "stop": [stop]})
        self.assertEqual("".join(e["text_output"] for e in events), want[: want.index(stop)])
        self.assertEqual(events[-1]["finish_reason"], "stop")

    def test_16_concurrent_streams_deliver_every_token_in_order(self):
        jobs = [(PROMPTS[i % 3] + " " * (i // 3), 16 + i) for i in range(16)]
        want = [cli(p, n) for p, n in jobs]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda j: self.stream({"text_input": j[0], "max_tokens": j[1]}), jobs))
        for (p, n), w, events in zip(jobs, want, got):
            self.assertNotIn("error", events[-1], p)
            self.assertEqual("".join(e["text_output"] for e in events), w["text"], p)
            self.assertEqual(events[-1]["generated_tokens"], w["metrics"]["generated_tokens"])

    def test_disconnect_cancels_the_request(self):
        body = json.dumps({"text_input": PROMPTS[2], "max_tokens": 4000, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.http), timeout=30) as s:
            s.sendall(
                b"POST /v2/models/fastkv/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            received = b""
            while received.count(b"data:") < 3:
                received += s.recv(4096)
        deadline = time.time() + 30
        while time.time() < deadline:
            m = re.findall(r"request cancelled after (\d+) tokens", self.server_log())
            if m:
                self.assertLess(int(m[-1]), 4000)
                break
            time.sleep(0.1)
        else:
            self.fail("the server did not cancel the abandoned request")
        self.assertEqual(self.post("generate", {"text_input": "ok", "max_tokens": 2})[0], 200)

    def test_bad_inputs_get_errors_naming_the_problem(self):
        with open(os.path.join(os.environ["FASTKV_TRITON_ENGINE"], "engine.json")) as f:
            max_positions = json.load(f)["model"]["max_position_embeddings"]
        too_long = "word " * (max_positions + 100)
        cases = [
            ({"max_tokens": 4}, "text_input is missing"),
            ({"text_input": "", "max_tokens": 4}, "prompt is empty"),
            ({"text_input": too_long, "max_tokens": 4}, "takes at most"),
            ({"text_input": "hi", "max_tokens": -1}, "max_tokens: -1"),
            ({"text_input": "hi", "method": "bogus"}, 'unknown compression method "bogus"'),
            ({"text_input": "hi", "tsp_rate": 2.0}, "invalid tsp_rate"),  # the library's field name, not a CLI flag
            ({"text_input": "hi", "top_p": 0.0}, "invalid top_p"),
            ({"text_input": "hi", "seed": -3}, "seed"),
        ]
        for body, needle in cases:
            status, got = self.post("generate", body)
            self.assertEqual(status, 400, (body, got))
            self.assertIn(needle, got["error"])
        self.assertEqual(self.grpc_error("max_tokens", np.array([4], dtype=np.int64)), "max_tokens")
        status, got = self.post("generate", {"text_input": PROMPTS[0], "max_tokens": 4})
        self.assertEqual((status, got["text_output"]), (200, cli(PROMPTS[0], 4)["text"]))

    def grpc_error(self, name, value):
        """Sends text_input and a wrongly typed `name` over the gRPC stream; returns the input the error names."""
        results = queue.Queue()
        client = grpcclient.InferenceServerClient(self.grpc_url)
        client.start_stream(callback=lambda result, error: results.put(error))
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hi"], dtype=object))
        bad = grpcclient.InferInput(name, list(value.shape), "INT64")
        bad.set_data_from_numpy(value)
        client.async_stream_infer("fastkv", [text, bad])
        error = results.get(timeout=30)
        client.stop_stream()
        client.close()
        self.assertIsNotNone(error)
        self.assertIn("expects 'INT32'", str(error))
        return name if f"input '{name}'" in str(error) else str(error)

    def test_bad_models_fail_to_load_with_a_clear_log(self):
        for model, needle in [
            ("no_engine", "fastkv model no_engine: parameter engine_path is missing"),
            ("corrupt", "fastkv model corrupt: engine "),
        ]:
            try:
                status = urllib.request.urlopen(f"{self.url}/v2/models/{model}/ready", timeout=5).status
            except urllib.error.HTTPError as e:
                status = e.code
            self.assertNotEqual(status, 200, model)
            self.assertIn(needle, self.server_log())

    def test_z_server_shuts_down_cleanly(self):
        """Runs last (unittest sorts by name)."""
        self.server.send_signal(signal.SIGTERM)
        self.assertEqual(self.server.wait(timeout=40), 0)
        log = self.server_log()
        self.assertIn("successfully unloaded 'fastkv'", log)
        self.assertIn("Found 0 live models and 0 in-flight", log)


if __name__ == "__main__":
    unittest.main(verbosity=2)
