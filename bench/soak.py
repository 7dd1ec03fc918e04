"""A soak run against a running server: mixed streaming load for many minutes, clients that hang up mid-stream, and
one AFD worker killed on the way; what a long-lived deployment would notice, reported minute by minute.

`concurrency` clients loop until the time is up, each sending one request after another: completions or chat (half
each), streamed or not (three quarters streamed), random token-id or word prompts of `prompt_tokens` and outputs of
`max_tokens` (uniform draws), EOS ignored. A share of the streamed ones (`disconnect_fraction`) hang up after a few
chunks. At `kill_at_minute` the newest `ray::FFNWorker` below the server process is killed (SIGKILL); the engine
replaces it and the requests in flight recompute. Each request ends as one of:
    ok            200 and, for a stream, its final chunk and [DONE]
    disconnected  the client hung up on purpose
    failed        an error the server answered in the API's shape (a 4xx/5xx body, or an SSE error event)
    lost          anything else: no answer, a broken connection, a stream cut off without [DONE] or error
Per minute: requests started and their ends, p50 / p99 end-to-end latency and p99 TTFT of the ok ones, the server's
RSS (its process and the processes below it, Ray's workers among them) and KV usage. At the end, once the load
stops: whether every request left the engine and every KV block came back (`kv_cache_usage_perc` 0).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

OUTCOMES = ("ok", "disconnected", "failed", "lost")


@dataclass(frozen=True)
class SoakSpec:
    base_url: str = "http://127.0.0.1:8000"
    model: str = "smollm2"
    server_pid: int | None = None  # for RSS and the worker kill
    minutes: float = 20.0
    concurrency: int = 8
    prompt_tokens: tuple[int, int] = (8, 256)
    max_tokens: tuple[int, int] = (8, 96)
    disconnect_fraction: float = 0.15
    kill_at_minute: float | None = 10.0
    seed: int = 0


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_ffn_worker(server_pid: int) -> int | None:
    """SIGKILLs the newest ray::FFNWorker below the server; its pid, or None if there is none."""
    workers = [pid for pid in process_tree(server_pid) if _cmdline(pid).startswith("ray::FFNWorker")]
    if not workers:
        return None
    os.kill(max(workers), signal.SIGKILL)
    return max(workers)


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        if line.startswith("afdserve:") and " " in line:
            name, value = line.split("{", 1)[0].split(" ", 1)[0], line.rsplit(" ", 1)[1]
            values[name] = values.get(name, 0.0) + float(value)
    return values


class _Client:
    def __init__(self, spec: SoakSpec, rng: random.Random, records: list):
        self.spec, self.rng, self.records = spec, rng, records

    def _body(self) -> tuple[str, dict, bool, bool]:
        spec, rng = self.spec, self.rng
        n_prompt, n_out = rng.randint(*spec.prompt_tokens), rng.randint(*spec.max_tokens)
        stream = rng.random() < 0.75
        hang_up = stream and rng.random() < spec.disconnect_fraction
        body = {"model": spec.model, "max_tokens": n_out, "temperature": rng.choice([0.0, 0.8]), "stream": stream,
                "ignore_eos": True}
        if rng.random() < 0.5:
            body["prompt"] = [rng.randrange(100, 49000) for _ in range(n_prompt)]
            return "/v1/completions", body, stream, hang_up
        words = " ".join(rng.choice(["soak", "load", "token", "server", "cache", "block"]) for _ in range(n_prompt))
        body["messages"] = [{"role": "user", "content": words}]
        return "/v1/chat/completions", body, stream, hang_up

    async def run(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            path, body, stream, hang_up = self._body()
            start = time.monotonic()
            record = {"start": start, "ttft": None, "e2e": None}
            try:
                record["outcome"] = await (self._stream(client, path, body, hang_up, record) if stream else
                                           self._whole(client, path, body))
            except (httpx.HTTPError, json.JSONDecodeError):
                record["outcome"] = "lost"
            record["e2e"] = time.monotonic() - start
            self.records.append(record)

    async def _whole(self, client, path, body) -> str:
        response = await client.post(path, json=body)
        if response.status_code == 200:
            return "ok" if response.json()["choices"][0]["finish_reason"] else "lost"
        return "failed" if "error" in response.json() else "lost"

    async def _stream(self, client, path, body, hang_up: bool, record: dict) -> str:
        chunks_before_hang_up = self.rng.randint(1, 4)
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return "failed" if "error" in response.json() else "lost"
            seen = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return "ok"
                if "error" in json.loads(data):
                    return "failed"
                seen += 1
                if record["ttft"] is None:
                    record["ttft"] = time.monotonic() - record["start"]
                if hang_up and seen >= chunks_before_hang_up:
                    return "disconnected"  # leaving the block closes the connection
        return "lost"


async def _run(spec: SoakSpec) -> dict:
    records: list[dict] = []
    minutes: list[dict] = []
    rng = random.Random(spec.seed)
    start = time.monotonic()
    until = start + spec.minutes * 60
    limits = httpx.Limits(max_connections=spec.concurrency + 4)
    async with httpx.AsyncClient(base_url=spec.base_url, timeout=300, limits=limits) as client:
        clients = [_Client(spec, random.Random(rng.random()), records) for _ in range(spec.concurrency)]
        load = asyncio.gather(*(c.run(client, until) for c in clients))
        killed = None
        for minute in range(int(np.ceil(spec.minutes))):
            while time.monotonic() < min(start + (minute + 1) * 60, until) and not load.done():
                if (killed is None and spec.kill_at_minute is not None and spec.server_pid
                        and time.monotonic() - start >= spec.kill_at_minute * 60):
                    killed = {"pid": kill_ffn_worker(spec.server_pid), "at_s": time.monotonic() - start}
                await asyncio.sleep(1)
            metrics = await _metrics(client)
            minutes.append({"minute": minute + 1,
                            "rss_mib": _rss_mib(process_tree(spec.server_pid)) if spec.server_pid else None,
                            "kv_usage": metrics.get("afdserve:kv_cache_usage_perc")})
        await load
        for m in minutes:  # by start minute, once every request has ended
            m.update(_minute_summary(records, start + (m["minute"] - 1) * 60))
        deadline = time.monotonic() + 60
        while True:  # the load has stopped: every request should leave the engine and free its blocks
            metrics = await _metrics(client)
            idle = not metrics.get("afdserve:num_requests_running") and not metrics.get(
                "afdserve:num_requests_waiting")
            if (idle and not metrics.get("afdserve:kv_cache_usage_perc")) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        health = (await client.get("/health")).status_code
    counts = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    return {"spec": asdict(spec), "requests": len(records), **counts, "killed_worker": killed,
            "health_after": health, "idle_after": idle, "kv_usage_after": metrics.get("afdserve:kv_cache_usage_perc"),
            "rss_growth_mib": (minutes[-1]["rss_mib"] - minutes[0]["rss_mib"]) if spec.server_pid else None,
            "minutes": minutes}


def _minute_summary(records: list[dict], since: float) -> dict:
    these = [r for r in records if since <= r["start"] < since + 60]
    ok = [r for r in these if r["outcome"] == "ok"]
    e2e = [r["e2e"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"started": len(these), **{o: sum(r["outcome"] == o for r in these) for o in OUTCOMES},
            "e2e_p50_s": float(np.percentile(e2e, 50)) if e2e else None,
            "e2e_p99_s": float(np.percentile(e2e, 99)) if e2e else None,
            "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else None}


def run_soak(spec: SoakSpec) -> dict:
    return asyncio.run(_run(spec))


def format_soak_result(r: dict) -> str:
    lines = [f"{'min':>3} {'started':>7} {'ok':>4} {'disc':>4} {'failed':>6} {'lost':>4} {'e2e p50':>8} "
             f"{'e2e p99':>8} {'TTFT p99':>8} {'RSS MiB':>8} {'KV use':>6}"]

    def sec(v):
        return f"{v:>8.2f}" if v is not None else f"{'-':>8}"
    for m in r["minutes"]:
        rss = f"{m['rss_mib']:>8.0f}" if m["rss_mib"] is not None else f"{'-':>8}"
        kv = f"{m['kv_usage']:>6.2f}" if m["kv_usage"] is not None else f"{'-':>6}"
        lines.append(f"{m['minute']:>3} {m['started']:>7} {m['ok']:>4} {m['disconnected']:>4} {m['failed']:>6} "
                     f"{m['lost']:>4} {sec(m['e2e_p50_s'])} {sec(m['e2e_p99_s'])} {sec(m['ttft_p99_s'])} {rss} {kv}")
    lines.append(f"requests {r['requests']}: ok {r['ok']}, disconnected {r['disconnected']}, failed {r['failed']}, "
                 f"lost {r['lost']}; worker killed: {r['killed_worker']}; after the load: /health {r['health_after']}, "
                 f"idle {r['idle_after']}, KV usage {r['kv_usage_after']}; RSS growth {r['rss_growth_mib']} MiB")
    return "\n".join(lines)
