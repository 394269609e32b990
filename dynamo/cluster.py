"""A Dynamo cluster on this machine for the tests and the benchmark: the frontend and fastkv workers
as processes on loopback. Discovery is Dynamo's file backend (one host, nothing else to run), or
with FASTKV_DYNAMO_DISCOVERY=etcd, what several hosts use: an etcd server for discovery and a NATS
server (JetStream) for the event plane, both started here on loopback (Debian's etcd-server and
nats-server).

Every process runs in its own session, so that stopping it reaches everything it started; every
wait has a deadline.
"""

import base64
import json
import os
import shutil
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("FASTKV_DYNAMO_PYTHON", str(REPO / "target/dynamo-py/bin/python"))
FASTKV = os.environ.get("FASTKV_CLI", str(REPO / "target/release/fastkv"))
ENGINE = os.environ.get("FASTKV_DYNAMO_ENGINE", str(REPO / "target/engines/serve-test"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def until(what: str, check, timeout: float, every: float = 0.3):
    """check()'s first truthy value; raises AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


DISCOVERY = os.environ.get("FASTKV_DYNAMO_DISCOVERY", "file")


def environment(tmp: Path, namespace: str) -> dict[str, str]:
    """What the frontend and the workers share: every plane on loopback, Dynamo's caches ($HOME) and
    the model folders ($TMPDIR) under `tmp`. Discovery's own variables come from Discovery."""
    tmp = tmp.resolve()
    return {
        **os.environ,
        "DYN_NAMESPACE": namespace,
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


class Process:
    """A process in its own session, its output in `logs`/`name`.log."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name, self.log_path = name, logs / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, cwd=REPO)

    def log(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        def seen():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            return re.search(pattern, self.log())
        return until(f"{pattern!r} in {self.log_path}", seen, timeout)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to its group, SIGKILL to what is left after `timeout` seconds."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def frontend(port: int, env: dict[str, str], logs: Path, *flags: str) -> Process:
    """Dynamo's frontend on 127.0.0.1:`port`, round-robin (a FastKV cache has no reusable prefix)."""
    return Process("frontend", [PYTHON, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port",
                                str(port), "--router-mode", "round-robin",
                                "--discovery-backend", env["DYN_DISCOVERY_BACKEND"],
                                "--namespace", env["DYN_NAMESPACE"], *flags], env, logs)


class Worker(Process):
    """dynamo/worker.py, ready when constructed; `url` is its fastkv serve child's. `cpus` pins the
    worker and its child (taskset)."""

    def __init__(self, name: str, env: dict[str, str], logs: Path, model: str, *flags: str, cpus: str | None = None):
        pin = ["taskset", "-c", cpus] if cpus else []
        args = [*pin, PYTHON, str(REPO / "dynamo/worker.py"), "--engine", ENGINE, "--fastkv", FASTKV,
                "--served-model-name", model, "--discovery-backend", env["DYN_DISCOVERY_BACKEND"], *flags]
        super().__init__(name, args, env, logs)
        self.url = self.wait_for(r"fastkv serve is ready at (http://127\.0\.0\.1:\d+)", 300).group(1)

    def metric(self, name: str, label: str = "") -> float:
        """The sum of a metric's samples in the child's /metrics (those whose labels contain `label`)."""
        total = 0.0
        for line in get(self.url + "/metrics").splitlines():
            m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
            if m and label in (m.group(1) or ""):
                total += float(m.group(2))
        return total

    def served(self) -> float:
        """Requests the child has ended, however they ended."""
        return self.metric("fastkv_requests_total")


class Discovery:
    """How the frontend and the workers find each other (DISCOVERY: file or etcd)."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        tmp = tmp.resolve()
        self.tmp, self.kind, self.processes = tmp, DISCOVERY, []
        if self.kind == "file":
            (tmp / "kv").mkdir(parents=True, exist_ok=True)
            env.update(DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(tmp / "kv"), DYN_EVENT_PLANE="zmq")
        elif self.kind == "etcd":
            for binary in ("etcd", "nats-server"):
                if not shutil.which(binary):
                    raise AssertionError(f"{binary} not found (apt-get install etcd-server nats-server)")
            client, peer, nats = free_port(), free_port(), free_port()
            self.etcd = f"http://127.0.0.1:{client}"
            self.processes.append(Process("etcd", [
                "etcd", "--name", "test", "--data-dir", str(tmp / "etcd"), "--listen-client-urls", self.etcd,
                "--advertise-client-urls", self.etcd, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"test=http://127.0.0.1:{peer}"], env, tmp))
            self.processes.append(Process("nats", [
                "nats-server", "-a", "127.0.0.1", "-p", str(nats), "-js", "-sd", str(tmp / "nats")], env, tmp))
            self.processes[0].wait_for(r"ready to serve client requests", 60)
            self.processes[1].wait_for(r"Server is ready", 60)
            env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=self.etcd,
                       NATS_SERVER=f"nats://127.0.0.1:{nats}", DYN_EVENT_PLANE="nats")
        else:
            raise AssertionError(f"FASTKV_DYNAMO_DISCOVERY={self.kind}: file or etcd")

    def endpoints(self) -> list[dict]:
        """The endpoint instances registered now (what the router may pick)."""
        records = []
        if self.kind == "file":
            for path in (self.tmp / "kv").rglob("*"):
                try:
                    records.append(json.loads(path.read_text()))
                except (OSError, ValueError):  # a folder, or a record being rewritten
                    pass
        else:
            key = base64.b64encode(b"v1/instances/").decode()
            end = base64.b64encode(b"v1/instances0").decode()  # the prefix's range end
            request = urllib.request.Request(self.etcd + "/v3/kv/range", json.dumps({"key": key, "range_end": end}).encode())
            with urllib.request.urlopen(request, timeout=5) as r:
                records = [json.loads(base64.b64decode(kv["value"])) for kv in json.load(r).get("kvs", [])]
        return [r for r in records if isinstance(r, dict) and r.get("type") == "Endpoint"]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
