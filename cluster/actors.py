"""Where AFD workers run (`--distributed-executor-backend`, vLLM's name for the same choice):

    ray  Ray actors, on any node of a Ray cluster (a private local one by default; `--ray-address` joins one)
    mp   one local process per worker, on this host only; no Ray needed, which is what a GPU host without Ray runs

Both give the AFD executor the same small interface: start a worker object, call its methods asynchronously, wait
for and read the results, kill a worker. A method that raises in a worker surfaces as WorkerRaisedError; a worker
that died (or never answers) as WorkerLostError. Neither message carries the backend's internals; the full error
goes to the executor's log.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path



class WorkerRaisedError(RuntimeError):
    """A worker's method raised; `cause` is the exception's class name, `detail` its traceback (for the log)."""

    def __init__(self, cause: str, detail: str):
        last_line = detail.strip().splitlines()[-1] if detail.strip() else cause
        super().__init__(f"in an AFD worker: {last_line}")  # e.g. a worker's model that failed to load says why
        self.cause, self.detail = cause, detail


class WorkerLostError(RuntimeError):
    """A worker died, was killed, or did not answer in time. The message says which, with no pid or address (it
    reaches clients)."""


def make_actors(backend: str, ray_address: str | None = None):
    """backend: "ray" or "mp" (engine/config.EXECUTOR_BACKENDS, which ParallelConfig checks)."""
    return RayActors(ray_address) if backend == "ray" else ProcessActors()


# ---- Ray ----------------------------------------------------------------------------------------------------------
class RayActors:
    name = "ray"

    def __init__(self, address: str | None):
        import ray
        self._ray = ray
        self._owns_ray = init_ray(address)  # a local cluster started here is stopped by shutdown(); a joined one stays

    def start(self, cls: type, *args, role: str):
        """role: afd_attention or afd_ffn, the custom resource that pins the worker to its nodes where any has it."""
        return self._ray.remote(num_cpus=0, **_role_placement(role))(cls).remote(*args)

    def call(self, worker, method: str, *args, **kwargs):
        return getattr(worker, method).remote(*args, **kwargs)

    def host(self, worker) -> str:
        """The address peers reach `worker` at."""
        return self.get([self.call(worker, "node_ip")])[0]

    def ready(self, futures: list, timeout: float) -> list:
        """The futures done within `timeout` seconds (all of them, or fewer when the time ran out)."""
        return self._ray.wait(futures, num_returns=len(futures), timeout=timeout)[0]

    def get(self, futures: list, timeout: float | None = None) -> list:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(futures, timeout=timeout)
        except exceptions.RayTaskError as e:  # the worker is alive, its method raised
            raise WorkerRaisedError(type(getattr(e, "cause", None) or e).__name__, str(e)) from e
        except (exceptions.RayActorError, exceptions.GetTimeoutError) as e:
            raise WorkerLostError(type(e).__name__) from e

    def kill(self, worker) -> None:
        self._ray.kill(worker)

    def shutdown(self) -> None:
        if self._owns_ray:
            stop_local_ray()


def init_ray(address: str | None) -> bool:
    """Connects this process to Ray; True if this call started it (the caller then shuts it down)."""
    import ray
    if ray.is_initialized():
        return False
    if address is None:
        # A private local cluster ("local": never join one that `ray start` left on this host). Actors take no CPU
        # slots, so any xAyF fits on a small host.
        ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    return True


def stop_local_ray() -> None:
    """ray.shutdown() for a cluster this process started, and then its raylet's agents (ray::DashboardAgent,
    ray::RuntimeEnvAgent): started from a thread other than the main one (the engine thread), Ray leaves them
    running after the rest of it has stopped. They are the processes that hold files of this cluster's session
    directory (their logs)."""
    import ray
    session = ray._private.worker._global_node.get_session_dir_path()
    ray.shutdown()
    left = [pid for pid in _pids_holding(session) if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (3 if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(process_alive(pid) for pid in left):
            time.sleep(0.1)
        left = [pid for pid in left if process_alive(pid)]
        if not left:
            return


def _pids_holding(directory: str) -> list[int]:
    """Processes with a file below `directory` open, from /proc (none where there is no /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd).startswith(directory) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def process_alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _role_placement(resource: str) -> dict:
    """Pins a role's workers to the nodes that advertise `resource`, when any does (a tiny share of it, so any
    number of workers fits on such a node)."""
    import ray
    if any(resource in node["Resources"] for node in ray.nodes() if node["Alive"]):
        return {"resources": {resource: 0.001}}
    return {}


# ---- local processes ----------------------------------------------------------------------------------------------
class ProcessActors:
    """Each worker is a child process that builds the worker object and then runs its method calls one at a time,
    in arrival order, as a Ray actor does (the FFN worker's serving loop is its own thread there too)."""
    name = "mp"

    def start(self, cls: type, *args, role: str) -> ProcessWorker:
        return ProcessWorker(cls, args)

    def call(self, worker: ProcessWorker, method: str, *args, **kwargs) -> concurrent.futures.Future:
        return worker.call(method, args, kwargs)

    def host(self, worker: ProcessWorker) -> str:
        return "127.0.0.1"

    def ready(self, futures: list, timeout: float) -> list:
        concurrent.futures.wait(futures, timeout=timeout)
        return [f for f in futures if f.done()]

    def get(self, futures: list, timeout: float | None = None) -> list:
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for future in futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results.append(future.result(timeout=left))
            except concurrent.futures.TimeoutError:
                raise WorkerLostError(f"no answer in {timeout} s") from None
        return results

    def kill(self, worker: ProcessWorker) -> None:
        worker.kill()

    def shutdown(self) -> None:
        pass  # the executor kills its workers; nothing else was started


# The child runs this, with the parent's import path: a fresh interpreter, not multiprocessing's spawn, which would
# first re-run the parent's main script (an `LLM(...)` at a script's top level would start workers recursively).
# Its command line ends with the worker's class, which is how `ps` tells the workers apart.
_CHILD_MAIN = ("import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('AFDSERVE_WORKER_SYS_PATH')); "
               "from afdserve.cluster.actors import serve_worker; serve_worker(sys.argv[1])")


class ProcessWorker:
    """The parent's end of one worker process: a connection for calls, one for results, and a thread that hands
    each result to its future (or fails them all once the process is gone)."""

    def __init__(self, cls: type, args: tuple):
        authkey = secrets.token_bytes(16)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            env = {**os.environ, _AUTHKEY_ENV: authkey.hex(), "AFDSERVE_WORKER_SYS_PATH": json.dumps(sys.path)}
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD_MAIN, listener.address, cls.__name__],
                                            env=env)
            self._calls, self._results = _accept(listener, self.process), _accept(listener, self.process)
        self.name = cls.__name__
        self._ids = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()  # the engine thread and a /metrics reader both call
        self._lost = False
        # Call 0 is the constructor; a failed one is reported again on every later call, so nothing waits on it here.
        self._pending[next(self._ids)] = concurrent.futures.Future()
        self._calls.send((cls, args))
        threading.Thread(target=self._read_results, daemon=True, name=f"afdserve-{self.name}-results").start()

    def call(self, method: str, args: tuple, kwargs: dict) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._lost:
                future.set_exception(WorkerLostError("the worker process has exited"))
                return future
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                self._calls.send((call_id, method, args, kwargs))
            except OSError:  # the process is gone: the results thread fails every pending call
                pass
        return future

    def _read_results(self) -> None:
        while True:
            try:
                call_id, ok, value = self._results.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(call_id)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(WorkerRaisedError(*value))
        code = self.process.wait()
        with self._lock:
            self._lost = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(WorkerLostError(f"the worker process exited with code {code}"))

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._calls.close()


_AUTHKEY_ENV = "AFDSERVE_WORKER_AUTHKEY"
WORKER_START_TIMEOUT_S = 300  # from spawn to connected: the interpreter and its imports (torch), not the model


def _accept(listener: Listener, process: subprocess.Popen) -> Connection:
    """The child's next connection. A child that exits first (a broken environment), or does not connect within
    WORKER_START_TIMEOUT_S (a hung import), is killed and raises."""
    result: list = []

    def accept() -> None:
        try:
            result.append(listener.accept())
        except Exception as e:  # noqa: BLE001 - the listener closed, or a peer failed authentication
            result.append(e)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while thread.is_alive():
        thread.join(timeout=0.5)
        if thread.is_alive() and process.poll() is not None:
            raise WorkerLostError(f"the worker process exited with code {process.returncode} before it started")
        if thread.is_alive() and time.monotonic() > deadline:
            process.kill()
            raise WorkerLostError(f"the worker process did not start within {WORKER_START_TIMEOUT_S} s")
    if isinstance(result[0], Exception):
        process.kill()
        raise WorkerLostError(f"the worker process could not connect ({type(result[0]).__name__})")
    return result[0]


def serve_worker(address: str) -> None:
    """The worker process: build the object, then run calls until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the parent decides
    authkey = bytes.fromhex(os.environ.pop(_AUTHKEY_ENV))
    calls, results = Client(address, "AF_UNIX", authkey), Client(address, "AF_UNIX", authkey)
    cls, args = calls.recv()
    try:
        worker, error = cls(*args), None
        results.send((0, True, None))
    except BaseException as e:  # noqa: BLE001 - reported on every call, as Ray reports a failed constructor
        worker, error = None, (type(e).__name__, traceback.format_exc())
        results.send((0, False, error))
    while True:
        try:
            call_id, method, call_args, kwargs = calls.recv()
        except (EOFError, OSError):  # the parent closed the connection or died: nothing more will come
            os._exit(0)
        if error is not None:
            results.send((call_id, False, error))
            continue
        try:
            results.send((call_id, True, getattr(worker, method)(*call_args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - the parent decides what a failed call means
            results.send((call_id, False, (type(e).__name__, traceback.format_exc())))
