"""fastkv behind NVIDIA Dynamo on one machine, as a client sees it.

Starts Dynamo's frontend (`python -m dynamo.frontend`, round-robin router) and fastkv workers
(dynamo/worker.py, each with its own `fastkv serve` child), all on loopback (cluster.py), and drives
the frontend with the official `openai` client. Every wait has a deadline; every process runs in its
own session and is stopped, its group killed if need be, whatever happens. dynamo/run-tests.sh
installs what this needs and runs it; the environment names the pieces:
  FASTKV_DYNAMO_PYTHON     the Python of target/dynamo-py (ai-dynamo 1.6.1)
  FASTKV_CLI               the fastkv binary [target/release/fastkv]
  FASTKV_DYNAMO_ENGINE     the engine directory [target/engines/serve-test]
  FASTKV_DYNAMO_DISCOVERY  file (Dynamo's file discovery, one host) or etcd (etcd + NATS, started
                           here on loopback, as several hosts would use them) [file]
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from cluster import ENGINE, FASTKV, PYTHON, REPO, Discovery, Process, Worker, environment, free_port, frontend, get, until

MODEL = "fastkv-test"
MAX_RUNNING = 4
CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?"]
TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
# ~1,500 tokens: over the engine's 1,024-token floor, so a FastKV policy actually compresses it.
LONG_PROMPT = " ".join(f"Fact {i}: the {i}th stone of the old wall is grey." for i in range(120)) + " Summarize."


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


class Cluster(unittest.TestCase):
    """One frontend and workers a, b (c joins later), shared by the tests, which run in name order."""

    @classmethod
    def setUpClass(cls):
        for path, what in [(PYTHON, "FASTKV_DYNAMO_PYTHON (dynamo/install.sh)"), (FASTKV, "FASTKV_CLI"),
                           (os.path.join(ENGINE, "engine.json"), "FASTKV_DYNAMO_ENGINE")]:
            if not os.path.exists(path):
                raise unittest.SkipTest(f"{path} not found ({what})")
        (REPO / "target/tmp").mkdir(parents=True, exist_ok=True)
        cls.tmp = Path(tempfile.mkdtemp(prefix="dynamo-test-", dir=REPO / "target/tmp"))
        cls.env = environment(cls.tmp, f"fastkv-test-{os.getpid()}")
        cls.processes: list[Process] = []
        cls.discovery = None
        try:
            cls.discovery = Discovery(cls.tmp, cls.env)
            cls.port = free_port()
            cls.processes.append(frontend(cls.port, cls.env, cls.tmp))
            cls.a = cls.worker("worker-a")
            cls.b = cls.worker("worker-b")
            cls.client = openai_client(f"http://127.0.0.1:{cls.port}")
            until("the frontend to list the model", cls.lists_model, 120)
            for worker in (cls.a, cls.b):
                cls.wait_serving(worker, 120)
        except BaseException:
            cls.failed = True
            cls.tearDownClass()
            raise

    @classmethod
    def worker(cls, name: str) -> Worker:
        worker = Worker(name, cls.env, cls.tmp, MODEL, "--max-running", str(MAX_RUNNING))
        cls.processes.append(worker)
        return worker

    @classmethod
    def tearDownClass(cls):
        for process in reversed(cls.processes):
            process.stop()
        if cls.discovery:
            cls.discovery.stop()
        if cls.failed or os.environ.get("FASTKV_DYNAMO_KEEP_LOGS"):
            print(f"\nthe cluster's logs: {cls.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    failed = False

    def run(self, result=None):
        result = super().run(result)
        if result is not None and not result.wasSuccessful():
            type(self).failed = True
        return result

    @classmethod
    def lists_model(cls) -> bool:
        try:
            return MODEL in [m.id for m in cls.client.models.list().data]
        except openai.APIError:
            return False

    @classmethod
    def wait_serving(cls, worker: Worker, timeout: float) -> int:
        """Sends small requests through the frontend until `worker` has served one (the frontend learns
        of workers asynchronously); returns how many failed on the way."""
        start, failures = worker.served(), 0
        def served():
            nonlocal failures
            try:
                cls.chat("Hi", max_tokens=2)
            except openai.APIError:
                failures += 1
            return worker.served() > start
        until(f"{worker.name} to get traffic", served, timeout, every=0)
        return failures

    @classmethod
    def chat(cls, prompt: str, client=None, **kw):
        client = client or cls.client
        kw = {"temperature": 0, "max_tokens": 32, **kw}
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kw)

    @classmethod
    def complete(cls, prompt: str, client=None, **kw):
        client = client or cls.client
        return client.completions.create(model=MODEL, prompt=prompt, **{"temperature": 0, "max_tokens": 32, **kw})

    def test_01_advertises_device_and_concurrency(self):
        endpoints = self.discovery.endpoints()
        self.assertEqual(len(endpoints), 2, endpoints)
        self.assertEqual({e["device_type"] for e in endpoints}, {"cpu"})
        metrics = get(f"http://127.0.0.1:{self.port}/metrics")
        self.assertIn(f'dynamo_frontend_model_max_num_seqs{{model="{MODEL}"}} {MAX_RUNNING}', metrics)

    def test_02_round_robin_uses_both_workers(self):
        before = [self.a.served(), self.b.served()]
        for i in range(6):
            self.chat(CHAT_PROMPTS[i % len(CHAT_PROMPTS)], max_tokens=4)
        served = [self.a.served() - before[0], self.b.served() - before[1]]
        self.assertEqual(sum(served), 6)
        self.assertEqual(served, [3, 3], "round-robin alternates between the two workers")

    def test_03_chat_greedy_equals_fastkv_serve(self):
        for prompt in CHAT_PROMPTS:
            direct = self.chat(prompt, client=openai_client(self.a.url)).choices[0]
            via = self.chat(prompt).choices[0]
            self.assertEqual(via.message.content, direct.message.content)
            self.assertEqual(via.finish_reason, direct.finish_reason)
            streamed = "".join(c.choices[0].delta.content or "" for c in self.chat(prompt, stream=True) if c.choices)
            self.assertEqual(streamed, direct.message.content)

    def test_04_completions_greedy_equals_fastkv_serve(self):
        for prompt in TEXT_PROMPTS:
            direct = self.complete(prompt, client=openai_client(self.b.url)).choices[0]
            via = self.complete(prompt).choices[0]
            self.assertEqual(via.text, direct.text)
            self.assertEqual(via.finish_reason, direct.finish_reason)
            streamed = "".join(c.choices[0].text for c in self.complete(prompt, stream=True) if c.choices)
            self.assertEqual(streamed, direct.text)

    def test_05_fastkv_policy_overrides_reach_fastkv_serve(self):
        def via(policy: dict, **kw):
            annotation = "fastkv:" + json.dumps(policy)
            return self.chat(LONG_PROMPT, extra_body={"nvext": {"annotations": [annotation]}}, **kw)
        for policy in [{"method": "snapkv", "kv_budget": 64}, {"method": "full"}]:
            direct = self.chat(LONG_PROMPT, client=openai_client(self.a.url), extra_body={"fastkv": policy})
            self.assertEqual(via(policy).choices[0].message.content, direct.choices[0].message.content)
        # fastkv serve checks the object; its 400, naming the field, reaches the client.
        for policy, named in [({"bogus": 1}, "bogus"), ({"tsp_layer": 999}, "fastkv.tsp_layer")]:
            with self.assertRaises(openai.BadRequestError) as e:
                via(policy)
            self.assertIn(named, str(e.exception))
        with self.assertRaises(openai.BadRequestError) as e:  # the worker's own check
            self.chat("Hi", extra_body={"nvext": {"annotations": ["fastkv:{not json"]}})
        self.assertIn("not JSON", str(e.exception))

    def test_06_a_client_that_goes_away_cancels_its_request(self):
        before = sum(w.metric("fastkv_requests_total", 'finish_reason="cancelled"') for w in (self.a, self.b))
        stream = self.complete("Tell me a long story.", stream=True, max_tokens=4000, extra_body={"ignore_eos": True})
        for _, _ in zip(range(3), stream):
            pass
        stream.close()
        until("fastkv serve to cancel the request",
              lambda: sum(w.metric("fastkv_requests_total", 'finish_reason="cancelled"') for w in (self.a, self.b))
              > before, 30)

    def test_07_a_killed_worker_loses_only_its_own_requests(self):
        pool = ThreadPoolExecutor(6)
        futures = [pool.submit(self.complete, f"Story {i}:", max_tokens=300, extra_body={"ignore_eos": True})
                   for i in range(6)]
        def in_flight(w: Worker) -> float:
            return w.metric("fastkv_requests_running") + w.metric("fastkv_requests_waiting")
        until("the workers to hold all six requests", lambda: in_flight(self.a) + in_flight(self.b) == 6, 60)
        self.assertGreater(in_flight(self.b), 0)
        lost = in_flight(self.b)
        self.b.proc.send_signal(signal.SIGKILL)  # the worker alone: its child must follow by itself
        killed = time.monotonic()
        self.b.proc.wait(10)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=180).choices[0].finish_reason)
            except openai.APIError as e:
                outcomes.append(e)
        pool.shutdown()
        errors = [o for o in outcomes if isinstance(o, Exception)]
        self.assertEqual(len(errors), lost, outcomes)
        self.assertEqual(outcomes.count("length"), 6 - lost, outcomes)
        for e in errors:
            self.assertIsInstance(e, openai.APIStatusError)
            self.assertEqual(e.status_code, 503, e)
        # The child dies with its worker (parent-death signal).
        until("the killed worker's fastkv serve to stop", lambda: not self.answers(self.b.url), 15)
        # A killed worker cannot leave discovery: its record lives until its lease runs out (here
        # 7-12 s with file discovery, 20-30 s with etcd). Until then the router may still pick it
        # (a failed connect only sets it aside briefly) and such a request fails fast with 503,
        # unless the frontend migrates requests (--migration-limit).
        until("discovery to drop the killed worker", lambda: len(self.discovery.endpoints()) == 1, 90)
        print(f"\n  discovery dropped the killed worker {time.monotonic() - killed:.1f} s after the kill", file=sys.stderr)
        for i in range(6):
            self.assertEqual(self.chat(CHAT_PROMPTS[i % 3], max_tokens=4).choices[0].finish_reason, "length")

    @staticmethod
    def answers(url: str) -> bool:
        try:
            get(url + "/health", timeout=2)
            return True
        except OSError:
            return False

    def test_08_a_worker_that_joins_later_gets_traffic(self):
        type(self).c = self.worker("worker-c")
        self.assertEqual(self.wait_serving(self.c, 120), 0)

    def test_09_sigterm_finishes_running_requests_and_exits_0(self):
        with ThreadPoolExecutor(2) as pool:  # round-robin: one on a, one on c
            futures = [pool.submit(self.complete, "Once upon a time", max_tokens=64) for _ in range(2)]
            until("a to run a request", lambda: self.a.metric("fastkv_requests_running") >= 1, 30)
            self.a.proc.send_signal(signal.SIGTERM)
            self.assertEqual([f.result(timeout=120).choices[0].finish_reason for f in futures], ["length"] * 2)
        self.assertEqual(self.a.proc.wait(60), 0, self.a.log()[-3000:])
        self.assertFalse(self.answers(self.a.url))
        self.assertIn("Paris", self.chat("What is the capital of France?").choices[0].message.content)

    def test_10_a_worker_whose_fastkv_serve_dies_leaves_and_exits_1(self):
        child = int(subprocess.check_output(["pgrep", "-P", str(self.c.proc.pid), "-f", "serve"]).split()[0])
        os.kill(child, signal.SIGKILL)
        self.assertEqual(self.c.proc.wait(60), 1, self.c.log()[-3000:])
        self.assertIn("fastkv serve exited with status -9", self.c.log())
        self.assertEqual(self.discovery.endpoints(), [], "it unregistered (no waiting for its lease)")


if __name__ == "__main__":
    unittest.main(verbosity=2)
