"""The `fastkv serve` child process that does the inference for one worker.

The worker keeps fastkv's own batching server (its scheduler, cache budget and cancellation) and
only adapts the protocol, so the child listens on loopback only. It is tied to the worker's life:
Linux's parent-death signal stops it even when the worker is killed with SIGKILL.
"""

import collections
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port that is free now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the worker dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """`fastkv serve` on 127.0.0.1:`port`; its stderr is echoed with a prefix and its tail kept for
    errors."""

    def __init__(self, binary: str, args: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [binary, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as e:
            raise SystemExit(f"--fastkv: cannot run {binary}: {e}")
        self.stopping = False
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self) -> None:
        for line in self.process.stderr:
            self.tail.append(line.rstrip("\n"))
            print(f"[fastkv serve :{self.port}] {line}", end="", file=sys.stderr, flush=True)

    def watch(self, on_exit) -> None:
        """Calls on_exit(message) from a thread if the child exits without stop() being called."""
        def wait():
            code = self.process.wait()
            if not self.stopping:
                time.sleep(0.2)  # let the echo thread read the last lines
                on_exit(self.failure(f"fastkv serve exited with status {code}"))
        threading.Thread(target=wait, daemon=True).start()

    def failure(self, what: str) -> str:
        return f"{what}; the last lines of its stderr:\n" + "\n".join(self.tail)

    def wait_healthy(self, timeout: float) -> None:
        """Returns once GET /health answers 200; raises SystemExit with the child's stderr tail if it
        exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the echo thread read the last lines
                raise SystemExit(self.failure(f"fastkv serve exited with status {self.process.returncode}"))
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop(grace=5)
        raise SystemExit(self.failure(f"fastkv serve was not healthy after {timeout:.0f} s (--startup-timeout)"))

    def stop(self, grace: float) -> int | None:
        """SIGTERM (fastkv serve drains its running requests), then SIGKILL after `grace` seconds."""
        self.stopping = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

