"""The real `afdserve serve` as a subprocess on a free port (SmolLM2, float32, gRPC off), and /metrics parsing."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import AFDSERVE_COMMAND
from afdserve.bench.soak import process_tree

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "smollm2"
MAX_MODEL_LEN = 2048  # small, so the "prompt over the context" cases stay cheap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, log_path: Path, *extra_args: str):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [*AFDSERVE_COMMAND, "serve", "--model", str(model_dir), "--dtype", "float32",
                   "--grpc-port", "0", "--port", str(self.port), "--served-model-name", MODEL_NAME,
                   "--max-model-len", str(MAX_MODEL_LEN), *extra_args]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "ServerProcess":
        try:
            return self.wait_ready()
        except BaseException:
            self.terminate()
            raise

    def __exit__(self, *exc) -> None:
        self.terminate()

    def url(self, path: str) -> str:
        return self.base_url + path

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        text = httpx.get(self.url("/metrics"), timeout=10).text
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def wait_for(condition, timeout: float = 30, interval: float = 0.1):
    """Polls `condition()` until it returns something truthy; returns it (or the last value after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (Ray's raylet and its workers, for a server running AFD), from /proc."""
    return process_tree(pid)[1:]


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
