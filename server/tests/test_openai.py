"""`fastkv serve` against the official `openai` client, on loopback.

Every test talks to a real server process (the `fastkv` binary named by FASTKV_CLI) serving the engine
named by FASTKV_SERVE_ENGINE; server/run-tests.sh builds both and installs the pinned client.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

CLI = os.environ["FASTKV_CLI"]
ENGINE = os.environ["FASTKV_SERVE_ENGINE"]
KEY = "test-key"
MODEL = "served"

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "What is a key-value cache?",
    "Explain gravity to a child.",
    "Name a colour of the rainbow.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Give me a word that rhymes with cat.",
    "Why is the sky blue?",
    "Describe a cup of tea in one sentence.",
    "What is two plus two?",
    "Say hello in French.",
    "What is the tallest mountain?",
    "Recommend a book about the ocean.",
]


class Server:
    """A `fastkv serve` process on a free loopback port, ready when constructed."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [CLI, "serve", "--engine", ENGINE, "--port", "0", "--api-key", KEY, "--served-model-name", MODEL, *args],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log = []
        line = self._line(r"listening on (http://\S+),")
        self.url = line.group(1)
        self._line(r"ready \(")
        threading.Thread(target=self._drain, daemon=True).start()

    def _line(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError("fastkv serve exited:\n" + "".join(self.log))
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "".join(self.log))

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def get(self, path):
        """(status, body text) of a GET."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name):
        """The sum of a metric's samples whose line starts with `name` (labels included in `name`)."""
        _, text = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.proc.stderr.close()


def greedy(client, prompt, max_tokens=24, **kw):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens, **kw
    )
    return r


def wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


class OpenAIClient(unittest.TestCase):
    """One server for the tests that do not stop or fill it."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("--max-body-bytes", "64K", "--default-max-tokens", "32")
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        assert cls.server.proc.returncode == 0, "".join(cls.server.log)

    def test_models_and_health(self):
        self.assertEqual([m.id for m in self.client.models.list()], [MODEL])
        self.assertEqual(self.server.get("/health"), (200, '{"status":"ok"}'))
        status, doc = self.server.get("/openapi.json")
        self.assertEqual(status, 200)
        paths = json.loads(doc)["paths"]
        for path in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"]:
            self.assertIn(path, paths)

    def test_chat_streamed_equals_whole_with_usage(self):
        whole = greedy(self.client, PROMPTS[0], max_tokens=20)
        choice = whole.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertTrue(choice.message.content)
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertGreater(whole.usage.prompt_tokens, 5)
        self.assertLessEqual(whole.usage.completion_tokens, 20)
        self.assertEqual(whole.usage.total_tokens, whole.usage.prompt_tokens + whole.usage.completion_tokens)
        ext = whole.model_extra["fastkv"]
        self.assertGreater(ext["kv_cache_bytes"], 0)
        self.assertLessEqual(ext["kv_cache_bytes"], ext["kv_cache_bytes_full"])
        self.assertGreater(ext["ttft_s"], 0)

        chunks = list(
            self.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPTS[0]}],
                temperature=0,
                max_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, choice.message.content)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, [choice.finish_reason])
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage, whole.usage)
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))

    def test_multi_turn_chat_goes_through_the_template(self):
        one = greedy(self.client, "My name is Ada.", max_tokens=8)
        turns = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": one.choices[0].message.content},
            {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]},
        ]
        r = self.client.chat.completions.create(model=MODEL, messages=turns, temperature=0, max_tokens=8)
        self.assertGreater(r.usage.prompt_tokens, one.usage.prompt_tokens + 10)

    def test_completions_from_text_and_token_ids(self):
        text = self.client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12)
        self.assertEqual(text.object, "text_completion")
        streamed = "".join(
            c.choices[0].text
            for c in self.client.completions.create(
                model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12, stream=True
            )
        )
        self.assertEqual(streamed, text.choices[0].text)
        # The same prompt as token ids, from the server's own logprobs of a greedy continuation of it.
        ids = self.client.completions.create(
            model=MODEL, prompt=[[1, 2, 3, 4, 5, 6, 7, 8]], temperature=0, max_tokens=6
        )
        self.assertEqual(ids.usage.prompt_tokens, 8)
        again = self.client.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5, 6, 7, 8], temperature=0, max_tokens=6)
        self.assertEqual(again.choices[0].text, ids.choices[0].text)

    def test_return_token_ids_gives_the_generated_ids(self):
        prompt = [1, 2, 3, 4, 5, 6, 7, 8]
        ask = dict(model=MODEL, temperature=0, max_tokens=8, extra_body={"return_token_ids": True})
        whole = self.client.completions.create(prompt=prompt, **ask).model_dump()
        ids = whole["choices"][0]["token_ids"]
        self.assertEqual(len(ids), whole["usage"]["completion_tokens"])
        chunks = [c.model_dump() for c in self.client.completions.create(prompt=prompt, stream=True, **ask)]
        self.assertEqual([i for c in chunks for i in c["choices"][0]["token_ids"]], ids)
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks), whole["choices"][0]["text"])
        # They are the tokens the model chose: continuing the prompt plus the first gives the rest.
        rest = self.client.completions.create(prompt=prompt + ids[:1], **{**ask, "max_tokens": 7}).model_dump()
        self.assertEqual(rest["choices"][0]["token_ids"], ids[1:])
        chat = self.client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **ask).model_dump()
        self.assertEqual(len(chat["choices"][0]["token_ids"]), chat["usage"]["completion_tokens"])

    def test_max_completion_tokens_and_default_max_tokens(self):
        r = self.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count from one to one hundred."}],
            temperature=0,
            max_completion_tokens=5,
            extra_body={"fastkv": {"method": "full"}},
        )
        self.assertEqual((r.usage.completion_tokens, r.choices[0].finish_reason), (5, "length"))
        r = self.client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, extra_body={"ignore_me": 1})
        self.assertLessEqual(r.usage.completion_tokens, 32)

    def test_stop_strings_end_the_text_before_them(self):
        prompt = "Count from one to twenty in words, separated by commas."
        full = greedy(self.client, prompt, max_tokens=40).choices[0].message.content
        self.assertGreater(len(full), 12, full)
        stop = full[8:11]
        cut = greedy(self.client, prompt, max_tokens=40, stop=[stop, "\u2603"])
        self.assertEqual(cut.choices[0].message.content, full[: full.index(stop)])
        self.assertEqual(cut.choices[0].finish_reason, "stop")
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in self.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=40,
                stop=stop,
                stream=True,
            )
        )
        self.assertEqual(streamed, full[: full.index(stop)])

    def test_a_seed_reproduces_a_sample(self):
        def sample(seed):
            return self.client.completions.create(
                model=MODEL, prompt="My favourite animal is", temperature=1.0, top_p=0.95, seed=seed, max_tokens=24
            ).choices[0].text

        first = sample(7)
        self.assertEqual(sample(7), first)
        self.assertTrue(any(sample(s) != first for s in (8, 9, 10)))
        # top_p = 0 keeps only the most likely token: greedy, whatever the temperature.
        once = dict(model=MODEL, prompt="My favourite animal is", max_tokens=24)
        greedy_text = self.client.completions.create(temperature=0, **once).choices[0].text
        self.assertEqual(self.client.completions.create(temperature=1.5, top_p=0, **once).choices[0].text, greedy_text)

    def test_logprobs(self):
        r = greedy(self.client, PROMPTS[2], max_tokens=10, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), r.usage.completion_tokens)
        self.assertEqual("".join(t.token for t in content), r.choices[0].message.content)
        for t in content:
            self.assertEqual(len(t.top_logprobs), 3)
            tops = [x.logprob for x in t.top_logprobs]
            self.assertEqual(tops, sorted(tops, reverse=True))
            self.assertLessEqual(tops[0], 0.0)
            # Greedy: the chosen token is the most likely one.
            self.assertEqual(t.logprob, tops[0])
            self.assertEqual(t.token, t.top_logprobs[0].token)
            self.assertEqual(bytes(t.bytes).decode(), t.token)

        c = self.client.completions.create(model=MODEL, prompt="The sun", temperature=0, max_tokens=5, logprobs=2)
        lp = c.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 5)
        self.assertEqual("".join(lp.tokens), c.choices[0].text)
        self.assertTrue(all(len(top) == 2 and max(top.values()) <= 0 for top in lp.top_logprobs))

    def test_the_fastkv_object_sets_the_policy(self):
        prompt = " ".join(PROMPTS) * 4
        full = greedy(self.client, prompt, max_tokens=4, extra_body={"fastkv": {"method": "full"}})
        ext = full.model_extra["fastkv"]
        self.assertEqual((ext["method"], ext["kv_cache_bytes"]), ("full", ext["kv_cache_bytes_full"]))
        small = greedy(
            self.client, prompt, max_tokens=4, extra_body={"fastkv": {"method": "snapkv-gqa", "kv_budget": 32, "min_prompt_len": 0, "min_kv_budget": 0}}
        )
        ext = small.model_extra["fastkv"]
        self.assertEqual(ext["method"], "snapkv-gqa")
        self.assertLess(ext["kv_cache_bytes"], ext["kv_cache_bytes_full"] / 4)
        with self.assertRaises(openai.BadRequestError) as e:
            greedy(self.client, prompt, extra_body={"fastkv": {"method": "nonsense"}})
        self.assertIn("fastkv", e.exception.body["param"])
        with self.assertRaises(openai.BadRequestError) as e:
            greedy(self.client, prompt, extra_body={"fastkv": {"tsp_rate": 2.5}})
        self.assertEqual(e.exception.body["param"], "fastkv.tsp_rate")

    def test_bad_fields_are_400_naming_the_field(self):
        cases = [
            ({"temperature": 5}, "temperature"),
            ({"top_p": 1.5}, "top_p"),
            ({"n": 2}, "n"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
            ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
            ({"extra_body": {"messages": []}}, "messages"),
            ({"extra_body": {"messages": [{"role": "user", "content": 7}]}}, "messages[0].content"),
        ]
        for kw, field in cases:
            with self.subTest(field=field), self.assertRaises(openai.BadRequestError) as e:
                self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kw)
            self.assertEqual(e.exception.status_code, 400)
            self.assertEqual(e.exception.body["param"], field)
            self.assertIn(field.split("[")[0], e.exception.body["message"])
            self.assertEqual(e.exception.body["type"], "invalid_request_error")
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=2)
        self.assertEqual(e.exception.body["param"], "prompt")

    def test_auth_model_and_size_errors(self):
        with self.assertRaises(openai.AuthenticationError):
            self.server.client(key="wrong").models.list()
        with self.assertRaises(openai.AuthenticationError):
            greedy(self.server.client(key="wrong"), "hi")
        with self.assertRaises(openai.NotFoundError) as e:
            self.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(e.exception.body["code"], "model_not_found")
        with self.assertRaises(openai.APIStatusError) as e:
            greedy(self.client, "x" * 70_000)
        self.assertEqual(e.exception.status_code, 413)
        # The server keeps serving after every one of them.
        self.assertTrue(greedy(self.client, "hi", max_tokens=2).choices[0].message.content is not None)

    def test_a_client_that_leaves_frees_its_slot(self):
        cancelled = 'fastkv_requests_total{finish_reason="cancelled"}'
        before = self.server.metric(cancelled)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 4000,
            "stream": True,
            "ignore_eos": True,
        }
        host, port = self.server.url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        data = [line for line in (response.readline() for _ in range(8)) if line.startswith(b"data:")]
        self.assertGreaterEqual(len(data), 3)
        self.assertEqual(self.server.metric("fastkv_requests_running"), 1)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.assertTrue(wait_for(lambda: self.server.metric(cancelled) == before + 1), self.server.get("/metrics")[1])
        self.assertEqual(self.server.metric("fastkv_requests_running"), 0)
        self.assertEqual(self.server.metric("fastkv_kv_cache_reserved_bytes"), 0)

    def test_16_concurrent_streams_give_the_single_request_tokens(self):
        def stream(prompt):
            chunks = self.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=24,
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        alone = [stream(p) for p in PROMPTS]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(stream, PROMPTS))
        self.assertEqual(together, alone)
        self.assertTrue(all(alone))

    def test_metrics_count_what_was_served(self):
        greedy(self.client, PROMPTS[3], max_tokens=4)
        _, text = self.server.get("/metrics")
        for name in [
            "fastkv_time_to_first_token_seconds_bucket",
            "fastkv_inter_token_latency_seconds_bucket",
            "fastkv_e2e_request_latency_seconds_count",
            "fastkv_requests_running",
            "fastkv_requests_waiting",
            "fastkv_kv_cache_held_bytes",
            "fastkv_prompt_tokens_total",
            "fastkv_generation_tokens_total",
            "fastkv_prefill_tokens_skipped_total",
        ]:
            self.assertIn(name, text)
        self.assertGreater(self.server.metric("fastkv_generation_tokens_total"), 0)
        self.assertGreater(self.server.metric("fastkv_time_to_first_token_seconds_count"), 0)


class FullQueue(unittest.TestCase):
    def test_a_full_queue_is_429_with_retry_after(self):
        server = Server("--max-running", "1", "--max-waiting", "1")
        try:
            client = server.client()
            long = dict(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            running, waiting = client.chat.completions.create(**long), None
            next(iter(running))
            waiting = client.chat.completions.create(**long)
            self.assertTrue(wait_for(lambda: server.metric("fastkv_requests_waiting") == 1))
            with self.assertRaises(openai.RateLimitError) as e:
                greedy(client, "hi")
            self.assertEqual(e.exception.response.headers["retry-after"], "1")
            self.assertEqual(e.exception.body["code"], "queue_full")
            running.close()
            waiting.close()
            self.assertTrue(wait_for(lambda: server.metric("fastkv_requests_running") == 0))
            self.assertTrue(greedy(client, "hi", max_tokens=2).choices)
        finally:
            server.stop()


class ServerPolicy(unittest.TestCase):
    def test_policy_flags_set_the_default_a_request_object_overrides(self):
        server = Server("--method", "full")
        try:
            client = server.client()
            self.assertEqual(greedy(client, "hi", max_tokens=2).model_extra["fastkv"]["method"], "full")
            own = greedy(client, "hi", max_tokens=2, extra_body={"fastkv": {"method": "snapkv-gqa"}})
            self.assertEqual(own.model_extra["fastkv"]["method"], "snapkv-gqa")
        finally:
            server.stop()

    def test_an_impossible_policy_flag_stops_the_server_naming_it(self):
        proc = subprocess.run(
            [CLI, "serve", "--engine", ENGINE, "--port", "0", "--tsp-layer", "999"],
            capture_output=True, text=True, timeout=120,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("invalid --tsp-layer", proc.stderr)


class KeepAlive(unittest.TestCase):
    def test_a_long_prefill_sends_comments_only_when_asked(self):
        def lines_before_data(server):
            body = {"model": MODEL, "prompt": list(range(100, 3100)), "max_tokens": 1, "stream": True}
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
            response = conn.getresponse()
            lines = []
            while not (line := response.readline()).startswith(b"data:"):
                lines.append(line.strip())
            conn.close()
            return lines

        for flag, comments in (("1", True), ("0", False)):
            server = Server("--sse-keep-alive", flag)
            try:
                self.assertEqual(b":" in lines_before_data(server), comments, f"--sse-keep-alive {flag}")
            finally:
                server.stop()


class Shutdown(unittest.TestCase):
    def test_sigterm_drains_running_requests_answers_503_and_exits_0(self):
        server = Server("--shutdown-timeout", "60")
        client = server.client()
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        it = iter(chunks)
        next(it)
        server.proc.send_signal(signal.SIGTERM)
        self.assertTrue(wait_for(lambda: server.get("/health")[0] == 503), "".join(server.log))
        self.assertIn("draining", server.get("/health")[1])
        with self.assertRaises(openai.InternalServerError) as e:
            greedy(client, "hi")
        self.assertEqual(e.exception.status_code, 503)
        rest = list(it)
        self.assertEqual(rest[-1].choices[0].finish_reason, "length")
        self.assertEqual(server.proc.wait(timeout=60), 0, "".join(server.log))
        server.stop()


if __name__ == "__main__":
    unittest.main()
