"""`afdserve bench sweep` (bench/sweep.py): the goodput arithmetic against DistServe's and vLLM's definitions, and the
search against a fake OpenAI server whose per-token time grows with the requests in flight, so the load where the
SLO breaks is known in advance."""
import asyncio
import dataclasses
import json
import socket
import threading
import time

import numpy as np
import pytest

from afdserve.bench.serve import RequestResult, ServeSpec
from afdserve.bench.sweep import SweepSpec, parse_goodput, run_sweep, summarize_point


def test_goodput_attainment_and_percentiles_follow_the_definitions():
    # (ttft s, e2el s, output tokens): TPOT = (e2el - ttft) / (tokens - 1)
    shapes = [(0.1, 1.1, 11), (0.2, 2.2, 11), (0.05, 0.55, 6), (0.4, 0.9, 2), (0.1, 0.1, 1)]
    results = [RequestResult(ok=True, ttft=t, e2el=e, output_tokens=n, itl=[(e - t) / max(n - 1, 1)] * (n - 1))
               for t, e, n in shapes] + [RequestResult(ok=False, error="HTTP 500")]
    slo = {"ttft": 250.0, "tpot": 150.0}
    point = summarize_point(results, duration_s=4.0, slo=slo, percentile=90)
    tpot_ms = [100.0, 200.0, 100.0, 500.0]  # the one-token request has no TPOT in the distribution ...
    good = [True, False, True, False, True, False]  # ... and TPOT 0 for goodput (vLLM's); the failed one meets none
    assert (point["completed"], point["failed"]) == (5, 1)
    assert point["output_tok_s"] == pytest.approx(sum(n for _, _, n in shapes) / 4.0)
    assert point["goodput_req_s"] == pytest.approx(sum(good) / 4.0)
    assert point["slo_attainment"] == pytest.approx(sum(good) / len(results))
    assert point["tpot_ms"]["p90"] == pytest.approx(np.percentile(tpot_ms, 90))
    assert point["tpot_ms"]["mean"] == pytest.approx(np.mean(tpot_ms))
    assert point["ttft_ms"]["p50"] == pytest.approx(np.percentile([100, 200, 50, 400, 100], 50))
    assert not point["meets_slo"]  # a failed request, and TPOT p90 well over 150 ms


def test_goodput_flags_take_vllms_syntax_and_refuse_the_rest():
    assert parse_goodput(["ttft:500", "tpot:100", "e2el:2e4"]) == {"ttft": 500.0, "tpot": 100.0, "e2el": 20000.0}
    for bad in ["itl:5", "tpot", "tpot:fast", "tpot:-1"]:
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput([bad])
    with pytest.raises(ValueError, match="one of"):
        SweepSpec(concurrency=(1,), request_rate=(1.0,))
    with pytest.raises(ValueError, match="needs an SLO"):
        SweepSpec(search="concurrency")


BASE_S, PER_ACTIVE_S = 0.002, 0.010  # the fake server's time per token: 2 ms + 10 ms per request in flight
EVENTS: list[tuple[str, tuple[int, ...]]] = []  # ("start" | "end", prompt) per request, in the server's order


@pytest.fixture(scope="module")
def slowing_server():
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    in_flight = [0]

    @app.post("/v1/completions")
    async def completions(body: dict):
        async def stream():
            in_flight[0] += 1
            EVENTS.append(("start", tuple(body["prompt"])))
            try:
                for _ in range(body["max_tokens"]):
                    await asyncio.sleep(BASE_S + PER_ACTIVE_S * in_flight[0])
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x'}]})}\n\n"
                yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': body['max_tokens']}})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                in_flight[0] -= 1
                EVENTS.append(("end", tuple(body["prompt"])))
        return StreamingResponse(stream(), media_type="text/event-stream")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_search_finds_the_concurrency_where_the_tpot_slo_breaks(slowing_server):
    """TPOT at concurrency c is about 2 + 10c ms, so a 47 ms p90 SLO holds up to c = 4 and breaks at 5."""
    workload = ServeSpec(base_url=slowing_server, model="fake", num_requests=16, input_len=4, output_len=6)
    spec = SweepSpec(workload, search="concurrency", search_max=16, slo={"tpot": 47.0}, slo_percentile=90)
    result = run_sweep(spec)
    loads = [p["concurrency"] for p in result["points"]]
    assert loads == sorted(loads) and 1 in loads and 16 in loads
    best = result["max_under_slo"]
    assert best is not None and best["concurrency"] == 4, [(p["concurrency"], p["tpot_ms"]["p90"]) for p in
                                                           result["points"]]
    assert any(p["concurrency"] == 5 and not p["meets_slo"] for p in result["points"])
    assert best["failed"] == 0 and best["slo_attainment"] > 0.5
    assert best["tpot_ms"]["p50"] == pytest.approx(1e3 * (BASE_S + PER_ACTIVE_S * 4), rel=0.3)


def test_workloads_draw_lengths_around_the_means_and_share_the_prefix():
    from afdserve.bench.serve import requests
    fixed = requests(ServeSpec(num_requests=50, input_len=40, output_len=20))
    assert {(len(p), n) for p, n in fixed} == {(40, 20)}
    uniform = requests(ServeSpec(num_requests=400, input_len=40, output_len=20, length_dist="uniform",
                                 shared_prefix_len=7))
    ins, outs = [len(p) - 7 for p, _ in uniform], [n for _, n in uniform]
    assert min(ins) >= 20 and max(ins) <= 60 and abs(np.mean(ins) - 40) < 2
    assert min(outs) >= 10 and max(outs) <= 30 and abs(np.mean(outs) - 20) < 1.5
    assert len({tuple(p[:7]) for p, _ in uniform}) == 1 and len({tuple(p[7:9]) for p, _ in uniform}) > 1
    lognormal = [n for _, n in requests(ServeSpec(num_requests=2000, output_len=64, length_dist="lognormal"))]
    assert abs(np.median(lognormal) - 64) < 4 and 1 <= min(lognormal) and max(lognormal) <= 256
    with pytest.raises(ValueError, match="length_dist"):
        ServeSpec(length_dist="zipf")


def test_multi_turn_conversations_resend_their_history_one_turn_at_a_time(slowing_server):
    from afdserve.bench.serve import conversations, run_requests
    spec = ServeSpec(base_url=slowing_server, model="fake", num_requests=12, input_len=5, output_len=3, turns=3,
                     shared_prefix_len=2, max_concurrency=2)
    chats = conversations(spec)
    assert len(chats) == 4 and all(len(turns) == 3 for turns in chats)
    for turns in chats:  # each prompt: the previous one, the answer's stand-in (3 ids), then 5 new tokens
        for (before, answer), (after, _) in zip(turns, turns[1:]):
            assert after[:len(before)] == before and len(after) == len(before) + answer + 5
    assert len({tuple(turns[0][0][:2]) for turns in chats}) == 1  # the shared prefix
    EVENTS.clear()
    results, _ = asyncio.run(run_requests(spec))
    assert [r.output_tokens for r in results] == [3] * 12
    turn_of = {tuple(prompt): (c, k) for c, turns in enumerate(chats) for k, (prompt, _) in enumerate(turns)}
    for c, turns in enumerate(chats):  # turn k + 1 starts after turn k ended
        for k in range(2):
            ended = EVENTS.index(("end", tuple(turns[k][0])))
            assert EVENTS.index(("start", tuple(turns[k + 1][0]))) > ended
    live, peak = set(), 0  # at most max_concurrency conversations in flight
    for kind, prompt in EVENTS:
        c, k = turn_of[prompt]
        if kind == "start":
            live.add(c)
        elif k == 2:
            live.discard(c)
        peak = max(peak, len(live))
    assert peak == 2
    with pytest.raises(ValueError, match="turns"):
        ServeSpec(num_requests=10, turns=3)


def sweep_result(points: list[tuple[int, float, float, float]]) -> dict:
    """A run_sweep-shaped result from (concurrency, output tok/s, TPOT mean ms, TPOT p90 ms) per point."""
    spec = dataclasses.asdict(SweepSpec(ServeSpec(), concurrency=(1,), slo={"tpot": 150.0}))
    return {"spec": spec, "load": "concurrency", "max_under_slo": None, "points": [
        {"concurrency": c, "output_tok_s": tok_s, "tpot_ms": {"mean": mean, "p50": mean, "p90": p90, "p99": p90}}
        for c, tok_s, mean, p90 in points]}


def test_plots_draw_throughput_against_the_slo_percentile_and_the_pareto(tmp_path):
    from afdserve.bench.plot import plot_sweeps, sweep_figure
    sweeps = {"a": sweep_result([(1, 20.0, 50.0, 55.0), (4, 60.0, 66.7, 80.0), (16, 100.0, 160.0, 200.0)]),
              "b": sweep_result([(1, 25.0, 40.0, 42.0), (8, 90.0, 88.9, 120.0)])}
    fig = sweep_figure(sweeps)
    left, right = fig.axes
    for line, result in zip(left.lines, sweeps.values()):  # throughput against TPOT p90 (the SLO's percentile)
        assert list(line.get_xdata()) == [p["tpot_ms"]["p90"] for p in result["points"]]
        assert list(line.get_ydata()) == [p["output_tok_s"] for p in result["points"]]
    assert [line.get_xdata()[0] for line in left.lines[2:]] == [150.0]  # the SLO line
    for line, result in zip(right.lines, sweeps.values()):  # per user: 1000 / mean TPOT
        assert list(line.get_xdata()) == [p["output_tok_s"] for p in result["points"]]
        assert list(line.get_ydata()) == pytest.approx([1000 / p["tpot_ms"]["mean"] for p in result["points"]])
    out = plot_sweeps(sweeps, tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
